//! Media benchmarks (harness = false): how long a joiner waits for the first remote video
//! frame, and what a 5-member conference costs each member.
//!
//! Goals (from the issue): "time from join to the first remote video frame, Rust to Rust
//! (median of 10); a 5-member GroupMedia conference of Rust Nodes on loopback, each sending
//! 30 fps VP8 at 1 Mbit/s: CPU per member and frames lost".
//!
//! Everything runs in this process on 127.0.0.1: the real signaling server
//! (`peerlink_server::spawn`, its own thread, pinned to CPU 0 unless BENCH_PIN=0), every
//! node a `peerlink_blocking::PollNode` with its own UDP socket, driven through the core
//! `Node` it wraps (`PollNode::node`: `start_call`, `send_call_frame`, ...).
//!
//! **Frames are synthetic.** No encoder runs: a video frame is `BENCH_MEDIA_FRAME` bytes
//! (default 4,167 = 1 Mbit/s at 30 fps) shaped like VP8 (first byte 0x10, a keyframe, every
//! 30th frame and when the receiver asked for one; else 0x11, an interframe), then a header
//! (sender, sequence number, send time) and deterministic filler; an audio frame is 80
//! bytes every 20 ms (Opus-sized, first byte 0xfc). str0m packetizes and depacketizes them
//! like real VP8 and Opus (RTP, SRTP, the VP8 payload descriptor, keyframe detection from the
//! frame's P bit), so the transport's work is real; decoding and encoding are not included.
//! Receivers check every frame's length, header and filler.
//!
//! # 1. Join to first remote video frame (Rust to Rust)
//!
//! Fresh nodes A and B every run. A creates a 1:1 room (`RoomOptions::direct`), starts a
//! call (`CallConfig::audio_video`) and, every 33.3 ms, sends a video frame with
//! `send_call_frame(Source::Video, ..)` and a 16-byte room message (`room_send` to all).
//! After 6 of A's ticks and a fraction of an interval (golden-ratio steps over the runs, so
//! B's join falls all over the interval between two ticks), B calls `join_room` (the clock starts), and
//! `start_call` as soon as it has `RoomEvent::Joined`. Measured: from B's `join_room` call
//! to B's first `MediaEvent::Frame` on A's video track. Like a browser's decoder, B asks for a keyframe
//! (`request_keyframe`) when its first frame is not one, and A encodes its next frame as a
//! keyframe on `MediaEvent::KeyframeRequested`; the time to B's first keyframe (the first
//! frame a decoder could show) is printed too.
//!
//! **Baseline, same runs:** from the same `join_room` call to B's first room message from A
//! (same 30/s cadence, sent in the same tick as each video frame, so the wait for A's next
//! tick is alike in both). A room message may take the server's relay before the direct
//! connection is up; media needs the connection (ICE, DTLS), then a renegotiation that adds
//! the tracks (A's and B's cross: perfect negotiation settles them), then A's next frame. The
//! difference is what media adds on top of joining; the time to B's direct path (the room's
//! `PathChanged`) is printed as the step in between. Median, p90 (nearest rank), min and max
//! of `BENCH_MEDIA_RUNS` runs after `BENCH_MEDIA_WARMUP_RUNS` unreported ones. A and B are
//! polled round-robin by one thread pinned to CPU 1 (50 us sleep after a quiet round).
//!
//! Reading it: a frame can only go out at A's next tick, so once the track is negotiated the
//! first frame still waits up to 33 ms, and the room message likewise; when both are ready
//! before the same tick they arrive together (a difference of 0). The step "A's video track
//! at B" (`MediaEvent::TrackAdded`) is when media could first flow, whatever the frame rate.
//! On loopback the direct path is up about 6 ms after the join. It used to take about 56 ms
//! when A's first STUN check overtook its answer (which goes through the server): str0m's ICE
//! agent (`is` 0.11) holds such a request until the credentials arrive and then paced its own
//! checks from a stale clock (one Ta, 50 ms); the node now releases the held checks when the
//! answer is applied (`Peer::release_early_checks`, `tests/sim/early_checks.rs`).
//!
//! # 2. A 5-member GroupMedia conference
//!
//! `BENCH_MEDIA_MEMBERS` (5) fresh nodes in one group room, every pair connected directly,
//! every member in the call (`CallConfig::audio_video`) with all tracks negotiated (setup
//! untimed). Then each member runs on its own thread, not pinned (the OS spreads them), and
//! sends 30 fps video and 50 fps audio with `send_call_frame` (each call writes the frame to
//! all 4 others) for `BENCH_MEDIA_WARMUP_S` (2 s) of warm-up and `BENCH_MEDIA_SECS` (20 s)
//! measured, then 1 s more while late frames arrive. Member i's frames are due i/5 of a
//! frame interval after member 0's, as independent cameras would be (in step, each member
//! would get the others' frames in one wakeup). A member's thread waits in
//! `PollNode::next_event` (poll(2) on its sockets) until its next frame is due, as an
//! application would: no busy polling, so its CPU time is the node's work.
//!
//! Per member: CPU time of its thread over the measured 20 s (`getrusage(RUSAGE_THREAD)`),
//! as % of one core; video and audio frames it sent in that window and to how many members
//! each went; frames received of those the others sent in the window (by sequence number,
//! each exactly once) and lost (expected: 4 x 30 x 20 = 2,400 video frames), duplicates,
//! corrupt frames, frames str0m marked not contiguous, keyframe requests both ways; the
//! received frame-payload bitrate (RTP/SRTP/UDP headers not counted); one-way frame latency
//! (send call to `MediaEvent::Frame`, same clock); how late its thread sent frames. Also
//! the whole process's CPU and the machine's busy CPUs (/proc/stat, all processes) over the
//! window.
//!
//! **The machine has 2 cores**: 5 member threads (plus the server's, idle here) share them,
//! so a member's frames can wait for a core; the send lag and latency figures show it.
//!
//! **Baseline, same run, same nodes, just before:** the same conference with 1 sender and 4
//! receivers (member 0 sends the same frames; the others are in the call, tracks negotiated,
//! sending nothing). Chosen because it splits a member's work into its parts: sending one
//! stream to 4 members (S, member 0's CPU) and receiving one stream (R, the mean of the 4
//! receivers'). In the full conference each member sends one stream and receives 4, so if
//! the cost were linear a member would use F + (S - F) + 4(R - F), where F is the idle floor
//! (timers, RTCP, keepalives, the wakeups for them) that S and R each include once: F is
//! measured first, `BENCH_MEDIA_IDLE_SECS` (5) with nobody sending. The printed ratio,
//! measured / predicted, says how far the conference is from the sum of its parts: below 1,
//! work is shared (several streams' packets handled per wakeup and per `poll`); above 1,
//! contention (5 threads on 2 cores) or work that grows faster than the streams. The
//! baseline also shows whether any loss needs the full load. (An audio-only baseline would
//! only price video against audio; the same bytes as room messages would compare SCTP with
//! SRTP, not say what a conference member's CPU is made of.)
//!
//! Run: `cargo bench -p peerlink-tests --bench media` (about 60 s with the defaults, plus the build).
//! Env: BENCH_MEDIA_RUNS (10), BENCH_MEDIA_WARMUP_RUNS (1), BENCH_MEDIA_TIMEOUT_S (30, per
//! run and per setup), BENCH_MEDIA_MEMBERS (5), BENCH_MEDIA_SECS (20), BENCH_MEDIA_WARMUP_S
//! (2), BENCH_MEDIA_IDLE_SECS (5), BENCH_MEDIA_FRAME (4167 bytes), BENCH_MEDIA_AUDIO_FRAME
//! (80 bytes), BENCH_MEDIA_SKIP_JOIN=1, BENCH_MEDIA_SKIP_CONFERENCE=1,
//! BENCH_MEDIA_SKIP_BASELINE=1 (the conference without its idle and 1-sender phases),
//! BENCH_PIN (1; 0 pins nothing), RUST_LOG (tracing to stderr).

mod common;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::BenchError as Error;
use common::measure::{MachineCpu, env_f64, env_u64, loadavg, nearest_rank, process_cpu, thread_cpu, unpin_thread};
use common::nodes::{IDLE_SLEEP, close_nodes, direct_room, failure, fresh_nodes, pump_nodes, until_nodes};
use peerlink::{
    CallConfig, CallEvent, Codec, Fingerprint, MediaEvent, MediaFrame, NodeError, NodeEvent, PeerState, RoomData, RoomError, RoomEvent,
    RoomOptions, RoomPath, Source,
};
use peerlink_blocking::PollNode;

/// Video frames per second.
const FPS: u64 = 30;
/// Audio frames per second (20 ms Opus packets).
const AUDIO_FPS: u64 = 50;
/// A keyframe every this many video frames.
const KEYFRAME_EVERY: u64 = 30;
/// Bytes before a frame's filler: codec byte (1), sender (1), sequence number (4), send
/// time in ns since the phase's start (8).
const HEADER: usize = 14;
/// VP8's first byte: P bit clear (keyframe) or set (interframe).
const VP8_KEY: u8 = 0x10;
const VP8_DELTA: u8 = 0x11;
/// An Opus TOC byte (CELT FB 20 ms, one frame).
const OPUS_TOC: u8 = 0xfc;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ----------------------------------------------------------------------------------------
// Settings
// ----------------------------------------------------------------------------------------

struct Plan {
    runs: usize,
    warmup_runs: usize,
    timeout: Duration,
    members: usize,
    secs: u64,
    idle_secs: u64,
    warmup_secs: u64,
    video_bytes: usize,
    audio_bytes: usize,
    join: bool,
    conference: bool,
    baseline: bool,
}

impl Plan {
    fn from_env() -> Result<Self, Error> {
        let flag = |name: &str| std::env::var(name).is_ok_and(|v| v == "1");
        let plan = Plan {
            runs: env_u64("BENCH_MEDIA_RUNS", 10)? as usize,
            warmup_runs: env_u64("BENCH_MEDIA_WARMUP_RUNS", 1)? as usize,
            timeout: Duration::from_secs_f64(env_f64("BENCH_MEDIA_TIMEOUT_S", 30.0)?),
            members: env_u64("BENCH_MEDIA_MEMBERS", 5)? as usize,
            secs: env_u64("BENCH_MEDIA_SECS", 20)?,
            idle_secs: env_u64("BENCH_MEDIA_IDLE_SECS", 5)?,
            warmup_secs: env_u64("BENCH_MEDIA_WARMUP_S", 2)?,
            video_bytes: env_u64("BENCH_MEDIA_FRAME", 4167)? as usize,
            audio_bytes: env_u64("BENCH_MEDIA_AUDIO_FRAME", 80)? as usize,
            join: !flag("BENCH_MEDIA_SKIP_JOIN"),
            conference: !flag("BENCH_MEDIA_SKIP_CONFERENCE"),
            baseline: !flag("BENCH_MEDIA_SKIP_BASELINE"),
        };
        let members_ok = (2..=255).contains(&plan.members);
        if plan.runs == 0 || !members_ok || plan.secs == 0 || plan.idle_secs == 0 || plan.video_bytes <= HEADER || plan.audio_bytes <= HEADER {
            return Err(format!("need BENCH_MEDIA_RUNS > 0, MEMBERS 2 to 255, SECS and IDLE_SECS > 0, frames > {HEADER} bytes").into());
        }
        Ok(plan)
    }
}

// ----------------------------------------------------------------------------------------
// Synthetic frames
// ----------------------------------------------------------------------------------------

/// The filler byte at `i` of frame `seq` of `sender`.
fn filler(sender: u8, seq: u32, i: usize) -> u8 {
    (i as u32).wrapping_mul(31).wrapping_add(seq.wrapping_mul(7)).wrapping_add(u32::from(sender) * 101) as u8
}

/// A frame: codec byte, header, filler.
fn make_frame(len: usize, tag: u8, sender: u8, seq: u32, sent_ns: u64) -> Vec<u8> {
    let mut data = Vec::with_capacity(len);
    data.push(tag);
    data.push(sender);
    data.extend_from_slice(&seq.to_le_bytes());
    data.extend_from_slice(&sent_ns.to_le_bytes());
    data.extend((HEADER..len).map(|i| filler(sender, seq, i)));
    data
}

/// A received frame's codec byte, sender, sequence number and send time, if it is whole.
fn parse_frame(data: &[u8], len: usize) -> Option<(u8, u8, u32, u64)> {
    if data.len() != len {
        return None;
    }
    let sender = data[1];
    let seq = u32::from_le_bytes(data[2..6].try_into().ok()?);
    let sent_ns = u64::from_le_bytes(data[6..HEADER].try_into().ok()?);
    data[HEADER..].iter().enumerate().all(|(i, b)| *b == filler(sender, seq, HEADER + i)).then_some((data[0], sender, seq, sent_ns))
}

// ----------------------------------------------------------------------------------------
// 1. Join to the first remote video frame
// ----------------------------------------------------------------------------------------

/// One run's times, from B's `join_room` call.
#[derive(Debug, Clone, Copy)]
struct JoinSample {
    joined: Duration,
    first_message: Duration,
    message_path: RoomPath,
    direct: Option<Duration>,
    video_track: Duration,
    first_frame: Duration,
    first_frame_key: bool,
    first_keyframe: Duration,
    keyframe_requested: bool,
}

/// B's milestones as they come.
#[derive(Default)]
struct JoinProgress {
    joined: Option<Instant>,
    first_message: Option<(Instant, RoomPath)>,
    direct: Option<Instant>,
    video_track: Option<Instant>,
    first_frame: Option<(Instant, bool)>,
    first_keyframe: Option<Instant>,
    keyframe_requested: bool,
    /// A was asked for a keyframe: its next frame is one.
    keyframe_pending: bool,
}

/// One run; B joins `phase` (0 to 1) of a frame interval after one of A's ticks.
fn time_first_frame(url: &str, room: &str, plan: &Plan, phase: f64) -> Result<JoinSample, Error> {
    let deadline = Instant::now() + plan.timeout;
    let mut nodes = fresh_nodes(url, 2, deadline)?;
    let result = first_frame_on(&mut nodes, room, plan, deadline, phase);
    close_nodes(nodes);
    result
}

fn first_frame_on(nodes: &mut [PollNode], room: &str, plan: &Plan, deadline: Instant, phase: f64) -> Result<JoinSample, Error> {
    let fa = nodes[0].fingerprint();
    nodes[0].node().create_room(Instant::now(), room, RoomOptions::direct())?;
    until_nodes(nodes, "room created", deadline, |_: &mut PollNode, i, e| failure(i, &e), |ns| ns[0].node().room(room).is_some())?;
    nodes[0].node().start_call(Instant::now(), room, CallConfig::audio_video())?;

    let period = Duration::from_nanos(1_000_000_000 / FPS);
    let first_tick = Instant::now();
    let mut next_tick = first_tick;
    let mut seq: u32 = 0;
    let mut p = JoinProgress::default();
    let mut join_at: Option<Instant> = None;
    let warm_until = first_tick + period * 6 + period.mul_f64(phase);
    loop {
        let now = Instant::now();
        if now >= deadline {
            let have = [("Joined", p.joined.is_some()), ("message", p.first_message.is_some()), ("video track", p.video_track.is_some())];
            let have: Vec<&str> = have.iter().filter(|(_, h)| *h).map(|(w, _)| *w).collect();
            return Err(format!("timed out (BENCH_MEDIA_TIMEOUT_S); B had: {}", have.join(", ")).into());
        }
        // A's tick: a video frame and a room message, at 30/s.
        if now >= next_tick {
            let key = u64::from(seq).is_multiple_of(KEYFRAME_EVERY) || std::mem::take(&mut p.keyframe_pending);
            let data = make_frame(plan.video_bytes, if key { VP8_KEY } else { VP8_DELTA }, 0, seq, 0);
            let frame = MediaFrame { codec: Codec::Vp8, rtp_time: u64::from(seq) * (90_000 / FPS), data: data.into() };
            nodes[0].node().send_call_frame(now, room, Source::Video, frame)?;
            match nodes[0].node().room_send(now, room, None, RoomData::Binary(seq.to_le_bytes().repeat(4))) {
                Ok(()) | Err(NodeError::Room(RoomError::WouldBlock { .. })) => {}
                Err(e) => return Err(e.into()),
            }
            seq += 1;
            next_tick += period;
            if next_tick < now {
                next_tick = now + period;
            }
        }
        if join_at.is_none() && now >= warm_until {
            let t = Instant::now();
            nodes[1].node().join_room(t, room)?;
            join_at = Some(t);
        }
        let any = pump_nodes(nodes, &mut |node: &mut PollNode, i: usize, e: NodeEvent| -> Result<(), Error> {
            failure(i, &e)?;
            let now = Instant::now();
            match (i, e) {
                (0, NodeEvent::Media(MediaEvent::KeyframeRequested { track, .. })) if track == Source::Video.track_id() => {
                    p.keyframe_pending = true;
                }
                (1, NodeEvent::Room(RoomEvent::Joined { .. })) => {
                    p.joined.get_or_insert(now);
                    node.node().start_call(now, room, CallConfig::audio_video())?;
                }
                (1, NodeEvent::Room(RoomEvent::Data { from, path, .. })) if from == fa => {
                    p.first_message.get_or_insert((now, path));
                }
                (1, NodeEvent::Room(RoomEvent::PathChanged { peer, path: RoomPath::Direct, .. })) if peer == fa => {
                    p.direct.get_or_insert(now);
                }
                (1, NodeEvent::Media(MediaEvent::TrackAdded { peer, track })) if peer == fa && !track.local && track.id == Source::Video.track_id() => {
                    p.video_track.get_or_insert(now);
                }
                (1, NodeEvent::Media(MediaEvent::Frame { peer, track, frame })) if peer == fa && track == Source::Video.track_id() => {
                    parse_frame(&frame.data, plan.video_bytes).ok_or("B: a corrupt video frame")?;
                    p.first_frame.get_or_insert((now, frame.keyframe));
                    if frame.keyframe {
                        p.first_keyframe.get_or_insert(now);
                    } else if p.first_keyframe.is_none() && !p.keyframe_requested {
                        node.node().request_keyframe(now, peer, &track)?;
                        p.keyframe_requested = true;
                    }
                }
                _ => {}
            }
            Ok(())
        })?;
        if let Some(t0) = join_at
            && let (Some(joined), Some((msg, path)), Some((frame, key)), Some(keyframe), Some(track)) =
                (p.joined, p.first_message, p.first_frame, p.first_keyframe, p.video_track)
        {
            // The direct path: from its event, else (already direct when joined) the view.
            let direct = p.direct.or_else(|| {
                let view = nodes[1].node().room(room)?;
                view.members.iter().any(|m| m.info.fingerprint == fa && m.path == RoomPath::Direct).then_some(joined)
            });
            return Ok(JoinSample {
                joined: joined - t0,
                first_message: msg - t0,
                message_path: path,
                direct: direct.map(|d| d - t0),
                video_track: track - t0,
                first_frame: frame - t0,
                first_frame_key: key,
                first_keyframe: keyframe - t0,
                keyframe_requested: p.keyframe_requested,
            });
        }
        if !any {
            std::thread::sleep(IDLE_SLEEP);
        }
    }
}

/// Median, p90 (nearest rank), min and max, in ms.
fn summary(v: &[Duration]) -> String {
    let mut v = v.to_vec();
    v.sort();
    let med = common::median(v.iter().map(|d| ms(*d)).collect()).unwrap_or(f64::NAN);
    format!("median {med:.1} ms, p90 {:.1}, min {:.1}, max {:.1}", ms(nearest_rank(&v, 0.9)), ms(v[0]), ms(v[v.len() - 1]))
}

fn bench_join(url: &str, plan: &Plan) -> bool {
    println!(
        "media: [1] join -> first remote video frame: fresh nodes A and B every run, {} timed runs (+{} warm-up), A sends {} fps video \
         ({} B frames) + a room message per frame; A and B polled by one thread{}",
        plan.runs,
        plan.warmup_runs,
        FPS,
        plan.video_bytes,
        if common::pinned() { " pinned to CPU 1, server on CPU 0" } else { ", nothing pinned" }
    );
    let mut samples = Vec::new();
    let mut failed = false;
    for run in 0..plan.warmup_runs + plan.runs {
        let timed = run >= plan.warmup_runs;
        let label = if timed { format!("run {}/{}", run + 1 - plan.warmup_runs, plan.runs) } else { format!("warm-up {}", run + 1) };
        // Where B's join falls between two of A's ticks, spread evenly over the runs.
        let phase = (run as f64 * 0.618_034).fract();
        match time_first_frame(url, &format!("first-frame-{run}"), plan, phase) {
            Ok(s) => {
                println!(
                    "media: [1] {label}: joined {:.1} ms, first room message {:.1} ms ({:?}), direct path {}, A's video track {:.1} ms, \
                     first video frame {:.1} ms ({}), first keyframe {:.1} ms{}",
                    ms(s.joined),
                    ms(s.first_message),
                    s.message_path,
                    s.direct.map_or("n/a".into(), |d| format!("{:.1} ms", ms(d))),
                    ms(s.video_track),
                    ms(s.first_frame),
                    if s.first_frame_key { "a keyframe" } else { "an interframe" },
                    ms(s.first_keyframe),
                    if s.keyframe_requested { " (B asked for it)" } else { "" },
                );
                if timed {
                    samples.push(s);
                }
            }
            Err(e) => {
                println!("media: [1] {label}: FAILED: {e}");
                failed = true;
            }
        }
    }
    if samples.is_empty() {
        println!("media: [1] RESULT n/a (every run failed)");
        return false;
    }
    let pick = |f: fn(&JoinSample) -> Duration| samples.iter().map(f).collect::<Vec<_>>();
    let frames = pick(|s| s.first_frame);
    let messages = pick(|s| s.first_message);
    let med = |v: &[Duration]| common::median(v.iter().map(|d| ms(*d)).collect()).unwrap_or(f64::NAN);
    let diffs: Vec<f64> = samples.iter().map(|s| ms(s.first_frame) - ms(s.first_message)).collect();
    let relayed = samples.iter().filter(|s| s.message_path == RoomPath::Relay).count();
    println!("media: [1] RESULT join_room -> first remote video frame: {} ({} runs)", summary(&frames), samples.len());
    println!(
        "media: [1] RESULT baseline join_room -> first room message from A: {} ({relayed} of {} first messages by relay)",
        summary(&messages),
        samples.len()
    );
    println!(
        "media: [1] RESULT media adds {:.1} ms (difference of medians; median of per-run differences {:.1} ms)",
        med(&frames) - med(&messages),
        common::median(diffs).unwrap_or(f64::NAN)
    );
    let directs: Vec<Duration> = samples.iter().filter_map(|s| s.direct).collect();
    println!(
        "media: [1] steps: Joined {}; direct path {}; A's video track at B {}; first keyframe {}",
        summary(&pick(|s| s.joined)),
        if directs.is_empty() { "n/a".into() } else { summary(&directs) },
        summary(&pick(|s| s.video_track)),
        summary(&pick(|s| s.first_keyframe)),
    );
    !failed
}

// ----------------------------------------------------------------------------------------
// 2. The conference
// ----------------------------------------------------------------------------------------

/// One phase's clock: frame `k` of a stream is due at `base + k / fps`; frames
/// `[first, end)` are the measured ones.
struct Timeline {
    base: Instant,
    video: std::ops::Range<u64>,
    audio: std::ops::Range<u64>,
    start: Instant,
    end: Instant,
    stop: Instant,
}

impl Timeline {
    fn new(base: Instant, warmup_secs: u64, secs: u64) -> Self {
        let start = base + Duration::from_secs(warmup_secs);
        let end = start + Duration::from_secs(secs);
        Timeline {
            base,
            video: warmup_secs * FPS..(warmup_secs + secs) * FPS,
            audio: warmup_secs * AUDIO_FPS..(warmup_secs + secs) * AUDIO_FPS,
            start,
            end,
            stop: end + Duration::from_secs(1),
        }
    }

    /// When frame `k` of `member`'s stream at `fps` is due. Members are offset by a
    /// fraction of a frame interval each (`member / members`), as independent cameras and
    /// microphones would be: in step, every member would receive the others' frames in one
    /// wakeup, which flatters the CPU figures.
    fn due(&self, member: usize, members: usize, k: u64, fps: u64) -> Instant {
        self.base + Duration::from_nanos((k * members as u64 + member as u64) * 1_000_000_000 / (fps * members as u64))
    }
}

/// Received frames of one sender's measured window: how often each arrived.
struct Rx {
    video: Vec<u8>,
    audio: Vec<u8>,
}

/// A member across phases.
struct Member {
    idx: usize,
    node: PollNode,
    /// Frames sent in earlier phases (RTP time continues).
    video_sent: u64,
    audio_sent: u64,
}

/// One member's figures for one phase.
#[derive(Debug, Default, Clone)]
struct MemberStats {
    cpu: Duration,
    sent_video: u64,
    sent_audio: u64,
    /// Sum over measured frames of the members each went to.
    video_deliveries: u64,
    audio_deliveries: u64,
    /// Measured frames that went to fewer than all others.
    short_sends: u64,
    max_lag: Duration,
    /// Measured frames sent more than 10 ms after they were due.
    late_sends: u64,
    expected_video: u64,
    expected_audio: u64,
    rx_video: u64,
    rx_audio: u64,
    duplicates: u64,
    corrupt: u64,
    keyframe_flag_wrong: u64,
    not_contiguous: u64,
    keyframes_received: u64,
    keyframe_requests_sent: u64,
    keyframe_requests_received: u64,
    rx_bytes: u64,
    /// One-way latency of measured video frames received, microseconds.
    latency_us: Vec<u32>,
    errors: Vec<String>,
}

impl MemberStats {
    fn lost_video(&self) -> u64 {
        self.expected_video - self.rx_video
    }

    fn lost_audio(&self) -> u64 {
        self.expected_audio - self.rx_audio
    }
}

/// What a member's thread does with one event.
struct Receiver<'a> {
    idx: usize,
    plan: &'a Plan,
    tl: &'a Timeline,
    index_of: &'a HashMap<Fingerprint, usize>,
    rx: Vec<Rx>,
    keyframe_pending: bool,
    /// When a keyframe was last asked of each member.
    asked: Vec<Option<Instant>>,
}

impl Receiver<'_> {
    fn on_event(&mut self, node: &mut PollNode, e: NodeEvent, st: &mut MemberStats) -> Result<(), Error> {
        if let Err(err) = failure(self.idx, &e) {
            st.errors.push(err.to_string());
            return Ok(());
        }
        match e {
            NodeEvent::Media(MediaEvent::Frame { peer, track, frame }) => {
                let Some(&s) = self.index_of.get(&peer) else { return Ok(()) };
                let video = track == Source::Video.track_id();
                let len = if video { self.plan.video_bytes } else { self.plan.audio_bytes };
                let Some((tag, _, seq, sent_ns)) = parse_frame(&frame.data, len).filter(|h| usize::from(h.1) == s) else {
                    st.corrupt += 1;
                    return Ok(());
                };
                let now = Instant::now();
                let seq = u64::from(seq);
                let (range, counts) =
                    if video { (&self.tl.video, &mut self.rx[s].video) } else { (&self.tl.audio, &mut self.rx[s].audio) };
                // Frames of the warm-up and the drain only count towards keyframe requests.
                let measured = range.contains(&seq);
                if measured {
                    let c = &mut counts[(seq - range.start) as usize];
                    *c = c.saturating_add(1);
                    if *c > 1 {
                        st.duplicates += 1;
                    } else {
                        st.rx_bytes += frame.data.len() as u64;
                        if video {
                            let sent = self.tl.base + Duration::from_nanos(sent_ns);
                            st.latency_us.push(now.saturating_duration_since(sent).as_micros().min(u128::from(u32::MAX)) as u32);
                        }
                    }
                }
                if video {
                    if measured {
                        st.keyframe_flag_wrong += u64::from(frame.keyframe != (tag == VP8_KEY));
                        st.keyframes_received += u64::from(frame.keyframe);
                        st.not_contiguous += u64::from(!frame.contiguous);
                    }
                    // A decoder would ask for a keyframe (at most every 300 ms per member).
                    if !frame.contiguous && self.asked[s].is_none_or(|t| now - t > Duration::from_millis(300)) {
                        self.asked[s] = Some(now);
                        node.node().request_keyframe(now, peer, &track)?;
                        st.keyframe_requests_sent += 1;
                    }
                }
            }
            NodeEvent::Media(MediaEvent::KeyframeRequested { track, .. }) if track == Source::Video.track_id() => {
                self.keyframe_pending = true;
                st.keyframe_requests_received += 1;
            }
            NodeEvent::Media(MediaEvent::TrackRemoved { peer, track }) => {
                st.errors.push(format!("member {}: track {track} of {peer} removed", self.idx));
            }
            NodeEvent::Call(CallEvent::RemoteStreamRemoved { peer, .. }) => {
                st.errors.push(format!("member {}: the stream of {peer} was removed", self.idx));
            }
            NodeEvent::PeerState { peer, state } if state != PeerState::Connected => {
                st.errors.push(format!("member {}: connection to {peer} {state:?}", self.idx));
            }
            _ => {}
        }
        Ok(())
    }
}

/// One member's thread for one phase.
fn run_member(m: &mut Member, room: &str, sending: bool, tl: &Timeline, plan: &Plan, fps: &[Fingerprint], abort: &AtomicBool) -> MemberStats {
    unpin_thread();
    let mut st = MemberStats::default();
    let index_of: HashMap<Fingerprint, usize> = fps.iter().enumerate().map(|(i, f)| (*f, i)).collect();
    let window = |r: &std::ops::Range<u64>| vec![0u8; (r.end - r.start) as usize];
    let mut rcv = Receiver {
        idx: m.idx,
        plan,
        tl,
        index_of: &index_of,
        rx: fps.iter().map(|_| Rx { video: window(&tl.video), audio: window(&tl.audio) }).collect(),
        keyframe_pending: false,
        asked: vec![None; fps.len()],
    };
    if let Err(e) = member_loop(m, room, sending, &mut rcv, &mut st, abort) {
        st.errors.push(format!("member {}: {e}", m.idx));
        abort.store(true, Ordering::Relaxed);
    }
    for (s, rx) in rcv.rx.iter().enumerate() {
        if s == m.idx {
            continue;
        }
        st.rx_video += rx.video.iter().filter(|c| **c > 0).count() as u64;
        st.rx_audio += rx.audio.iter().filter(|c| **c > 0).count() as u64;
    }
    st
}

/// One of a member's outgoing streams in a phase.
struct Outgoing {
    source: Source,
    codec: Codec,
    fps: u64,
    bytes: usize,
    /// The measured frames.
    window: std::ops::Range<u64>,
    /// Frames sent in earlier phases (RTP time goes on).
    before: u64,
    /// The next frame's number in this phase.
    next: u64,
    sent: u64,
    deliveries: u64,
    /// Measured frames that went to fewer than all others.
    short: u64,
    max_lag: Duration,
    /// Measured frames sent more than 10 ms after they were due.
    late: u64,
}

impl Outgoing {
    fn new(source: Source, fps: u64, window: &std::ops::Range<u64>, before: u64, plan: &Plan) -> Self {
        let (codec, bytes) = if source == Source::Audio { (Codec::Opus, plan.audio_bytes) } else { (Codec::Vp8, plan.video_bytes) };
        Outgoing { source, codec, fps, bytes, window: window.clone(), before, next: 0, sent: 0, deliveries: 0, short: 0, max_lag: Duration::ZERO, late: 0 }
    }

    /// When the next frame is due.
    fn due(&self, m: &Member, tl: &Timeline, plan: &Plan) -> Instant {
        tl.due(m.idx, plan.members, self.next, self.fps)
    }

    /// Sends every frame due by `now`, late or not (a late thread sends a burst: the count
    /// the receivers expect stays exact, and the lag is reported). Video frames are
    /// keyframes every [`KEYFRAME_EVERY`] and when one was asked for. Returns whether
    /// anything went.
    fn send_due(&mut self, m: &mut Member, room: &str, now: Instant, tl: &Timeline, plan: &Plan, keyframe_pending: &mut bool) -> Result<bool, Error> {
        let mut any = false;
        while self.due(m, tl, plan) <= now {
            let due = self.due(m, tl, plan);
            let tag = match self.codec {
                Codec::Opus => OPUS_TOC,
                _ if self.next.is_multiple_of(KEYFRAME_EVERY) || std::mem::take(keyframe_pending) => VP8_KEY,
                _ => VP8_DELTA,
            };
            let t = Instant::now();
            let data = make_frame(self.bytes, tag, m.idx as u8, self.next as u32, (t - tl.base).as_nanos() as u64);
            let rtp_time = (self.before + self.next) * u64::from(self.codec.clock_rate()) / self.fps;
            let to = m.node.node().send_call_frame(t, room, self.source, MediaFrame { codec: self.codec, rtp_time, data: data.into() })? as u64;
            if self.window.contains(&self.next) {
                self.sent += 1;
                self.deliveries += to;
                self.short += u64::from(to < plan.members as u64 - 1);
                self.max_lag = self.max_lag.max(t - due);
                self.late += u64::from(t - due > Duration::from_millis(10));
            }
            self.next += 1;
            any = true;
        }
        Ok(any)
    }
}

fn member_loop(m: &mut Member, room: &str, sending: bool, rcv: &mut Receiver<'_>, st: &mut MemberStats, abort: &AtomicBool) -> Result<(), Error> {
    let (tl, plan) = (rcv.tl, rcv.plan);
    let mut video = Outgoing::new(Source::Video, FPS, &tl.video, m.video_sent, plan);
    let mut audio = Outgoing::new(Source::Audio, AUDIO_FPS, &tl.audio, m.audio_sent, plan);
    let (mut cpu_start, mut cpu_end) = (None, None);
    loop {
        let now = Instant::now();
        if cpu_start.is_none() && now >= tl.start {
            cpu_start = Some(thread_cpu());
        }
        if cpu_end.is_none() && now >= tl.end {
            cpu_end = Some(thread_cpu());
        }
        if now >= tl.stop || abort.load(Ordering::Relaxed) {
            break;
        }
        let mut wake = tl.stop;
        if sending {
            let v = video.send_due(m, room, now, tl, plan, &mut rcv.keyframe_pending)?;
            let a = audio.send_due(m, room, now, tl, plan, &mut rcv.keyframe_pending)?;
            if v || a {
                m.node.poll(Instant::now())?;
            }
            wake = wake.min(video.due(m, tl, plan)).min(audio.due(m, tl, plan));
        }
        for (taken, at) in [(cpu_start, tl.start), (cpu_end, tl.end)] {
            if taken.is_none() {
                wake = wake.min(at);
            }
        }
        // Wait (poll(2) on the node's sockets) for an event or the next thing due.
        if let Some(e) = m.node.next_event(wake.saturating_duration_since(Instant::now()))? {
            rcv.on_event(&mut m.node, e, st)?;
        }
        while let Some(e) = m.node.poll_event() {
            rcv.on_event(&mut m.node, e, st)?;
        }
    }
    if let (Some(a), Some(b)) = (cpu_start, cpu_end) {
        st.cpu = b - a;
    }
    (st.sent_video, st.video_deliveries, st.sent_audio, st.audio_deliveries) = (video.sent, video.deliveries, audio.sent, audio.deliveries);
    st.short_sends = video.short + audio.short;
    st.max_lag = video.max_lag.max(audio.max_lag);
    st.late_sends = video.late;
    m.video_sent += video.next;
    m.audio_sent += audio.next;
    Ok(())
}

/// One phase's outcome.
struct Phase {
    senders: usize,
    /// Measured seconds.
    secs: u64,
    members: Vec<MemberStats>,
    process_cpu: Duration,
    busy_cpus: Option<f64>,
}

impl Phase {
    fn failed(&self) -> bool {
        self.members.iter().any(|m| !m.errors.is_empty())
    }

    /// CPU time over the phase as % of one core.
    fn pct(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() / self.secs as f64 * 100.0
    }

    /// The mean of some members' CPU, % of one core.
    fn mean_pct(&self, members: std::ops::Range<usize>) -> f64 {
        let n = members.len().max(1) as f64;
        self.members[members].iter().map(|m| self.pct(m.cpu)).sum::<f64>() / n
    }

    /// Each member's CPU, % of one core, for printing.
    fn list_pct(&self, members: std::ops::Range<usize>) -> String {
        self.members[members].iter().map(|m| format!("{:.2}", self.pct(m.cpu))).collect::<Vec<_>>().join(" / ")
    }

    /// Received frame payload, Mbit/s.
    fn mbps(&self, m: &MemberStats) -> f64 {
        m.rx_bytes as f64 * 8.0 / self.secs as f64 / 1e6
    }

    fn lost(&self) -> u64 {
        self.members.iter().map(|m| m.lost_video() + m.lost_audio()).sum()
    }
}

/// Runs one phase on every member's thread: the first `senders` members send, for
/// `secs` measured seconds after the warm-up.
fn run_phase(members: &mut [Member], room: &str, senders: usize, secs: u64, plan: &Plan) -> Phase {
    let fps: Vec<Fingerprint> = members.iter().map(|m| m.node.fingerprint()).collect();
    let warmup = if senders == 0 { 0 } else { plan.warmup_secs };
    let tl = Timeline::new(Instant::now() + Duration::from_millis(50), warmup, secs);
    let abort = AtomicBool::new(false);
    let (tl, fps, abort) = (&tl, &fps, &abort);
    let (mut stats, process_cpu, busy_cpus) = std::thread::scope(|scope| {
        let handles: Vec<_> = members
            .iter_mut()
            .map(|m| {
                let sending = m.idx < senders;
                scope.spawn(move || run_member(m, room, sending, tl, plan, fps, abort))
            })
            .collect();
        std::thread::sleep(tl.start.saturating_duration_since(Instant::now()));
        let (cpu0, machine0) = (process_cpu(), MachineCpu::now());
        std::thread::sleep(tl.end.saturating_duration_since(Instant::now()));
        let (cpu1, machine1) = (process_cpu(), MachineCpu::now());
        let busy = machine0.zip(machine1).map(|(a, b)| b.busy_cpus_since(&a));
        let stats: Vec<MemberStats> = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| MemberStats { errors: vec!["thread panicked".into()], ..Default::default() }))
            .collect();
        (stats, cpu1 - cpu0, busy)
    });
    for (i, st) in stats.iter_mut().enumerate() {
        let sending_others = (0..senders).filter(|s| *s != i).count() as u64;
        st.expected_video = sending_others * (tl.video.end - tl.video.start);
        st.expected_audio = sending_others * (tl.audio.end - tl.audio.start);
    }
    Phase { senders, secs, members: stats, process_cpu, busy_cpus }
}

fn print_phase(phase: &Phase, plan: &Plan, label: &str) {
    println!(
        "media: [2] {label}: {} of {} members sending, {} s measured; process CPU {:.1}% of one core; machine busy {} of {} CPUs (all processes)",
        phase.senders,
        plan.members,
        phase.secs,
        phase.pct(phase.process_cpu),
        phase.busy_cpus.map_or("n/a".into(), |b| format!("{b:.2}")),
        common::measure::machine_cpus(),
    );
    for (i, m) in phase.members.iter().enumerate() {
        let mut lat = m.latency_us.clone();
        lat.sort_unstable();
        let latency = if lat.is_empty() {
            "n/a".into()
        } else {
            let at = |q| f64::from(nearest_rank(&lat, q)) / 1e3;
            format!("{:.2}/{:.2}/{:.2} ms", at(0.5), at(0.99), at(1.0))
        };
        let sent = if m.sent_video + m.sent_audio == 0 {
            "sent nothing".to_owned()
        } else {
            format!(
                "sent {} video + {} audio frames ({} + {} deliveries, {} to fewer than all; send lag max {:.1} ms, {} video frames >10 ms late)",
                m.sent_video,
                m.sent_audio,
                m.video_deliveries,
                m.audio_deliveries,
                m.short_sends,
                ms(m.max_lag),
                m.late_sends,
            )
        };
        let received = if m.expected_video + m.expected_audio == 0 {
            "expected nothing".to_owned()
        } else {
            format!(
                "received {}/{} video, {}/{} audio: LOST {} video, {} audio; {} duplicates, {} corrupt, {} keyframe flags wrong, {} not contiguous; \
                 {} keyframes, keyframe requests sent {}; {:.3} Mbit/s of frame payload; video latency p50/p99/max {latency}",
                m.rx_video,
                m.expected_video,
                m.rx_audio,
                m.expected_audio,
                m.lost_video(),
                m.lost_audio(),
                m.duplicates,
                m.corrupt,
                m.keyframe_flag_wrong,
                m.not_contiguous,
                m.keyframes_received,
                m.keyframe_requests_sent,
                phase.mbps(m),
            )
        };
        println!(
            "media: [2] {label}: member {i}: CPU {:.2}% of one core ({:.3} s); {sent}; {received}; keyframe requests received {}",
            phase.pct(m.cpu),
            m.cpu.as_secs_f64(),
            m.keyframe_requests_received,
        );
        for e in m.errors.iter().take(5) {
            println!("media: [2] {label}: member {i}: ERROR {e}");
        }
    }
}

/// Fresh members in one room, every call started and every track negotiated both ways.
fn conference_setup(url: &str, room: &str, plan: &Plan) -> Result<Vec<Member>, Error> {
    let n = plan.members;
    let deadline = Instant::now() + plan.timeout;
    let mut nodes = fresh_nodes(url, n, deadline)?;
    direct_room(&mut nodes, room, deadline)?;
    let now = Instant::now();
    for node in &mut nodes {
        node.node().start_call(now, room, CallConfig::audio_video())?;
    }
    // Local tracks agreed (audio + video to each other member) and remote tracks arrived.
    let tracks = std::cell::RefCell::new(vec![(0usize, 0usize); n]);
    until_nodes(
        &mut nodes,
        "every track negotiated",
        deadline,
        |_: &mut PollNode, i, e| {
            failure(i, &e)?;
            if let NodeEvent::Media(MediaEvent::TrackAdded { track, .. }) = e {
                let t = &mut tracks.borrow_mut()[i];
                if track.local { t.0 += 1 } else { t.1 += 1 }
            }
            Ok(())
        },
        |_| tracks.borrow().iter().all(|t| *t == (2 * (n - 1), 2 * (n - 1))),
    )?;
    Ok(nodes.into_iter().enumerate().map(|(idx, node)| Member { idx, node, video_sent: 0, audio_sent: 0 }).collect())
}

fn bench_conference(url: &str, plan: &Plan) -> bool {
    println!(
        "media: [2] conference: {} members, each {} fps x {} B video (~{:.2} Mbit/s) + {} fps x {} B audio, to every other member; \
         {} s warm-up, {} s measured; one thread per member, not pinned, on a machine with {} CPUs",
        plan.members,
        FPS,
        plan.video_bytes,
        (plan.video_bytes as u64 * 8 * FPS) as f64 / 1e6,
        AUDIO_FPS,
        plan.audio_bytes,
        plan.warmup_secs,
        plan.secs,
        common::measure::machine_cpus(),
    );
    let room = "conference";
    let setup = Instant::now();
    let mut members = match conference_setup(url, room, plan) {
        Ok(m) => m,
        Err(e) => {
            println!("media: [2] setup FAILED: {e}");
            return false;
        }
    };
    println!("media: [2] setup (join, direct mesh, calls, all tracks negotiated) took {:.2} s", setup.elapsed().as_secs_f64());
    println!("media: [2] load average before: {}", loadavg());
    let mut phases = Vec::new();
    if plan.baseline {
        let idle = run_phase(&mut members, room, 0, plan.idle_secs, plan);
        print_phase(&idle, plan, "idle (nobody sending)");
        let one = run_phase(&mut members, room, 1, plan.secs, plan);
        print_phase(&one, plan, "baseline (1 sender)");
        println!("media: [2] load average between: {}", loadavg());
        phases.push(idle);
        phases.push(one);
    }
    let full = run_phase(&mut members, room, plan.members, plan.secs, plan);
    print_phase(&full, plan, "conference");
    close_nodes(members.into_iter().map(|m| m.node).collect());

    let n = plan.members;
    let lost_v: u64 = full.members.iter().map(MemberStats::lost_video).sum();
    let lost_a: u64 = full.members.iter().map(MemberStats::lost_audio).sum();
    let exp_v: u64 = full.members.iter().map(|m| m.expected_video).sum();
    let exp_a: u64 = full.members.iter().map(|m| m.expected_audio).sum();
    let rate = full.members.iter().map(|m| full.mbps(m)).sum::<f64>() / n as f64;
    let measured = full.mean_pct(0..n);
    println!(
        "media: [2] RESULT conference of {n}: CPU per member {} % of one core (mean {measured:.2}%); lost {lost_v} of {exp_v} video frames \
         and {lost_a} of {exp_a} audio frames; mean received {rate:.3} Mbit/s of frame payload per member",
        full.list_pct(0..n),
    );
    if let [idle, one] = &phases[..] {
        let f = idle.mean_pct(0..n);
        let s = one.pct(one.members[0].cpu);
        let r = one.mean_pct(1..n);
        let predicted = (s - f) + (n - 1) as f64 * (r - f) + f;
        println!(
            "media: [2] RESULT baseline (1 sender, {} receivers): sender S = {s:.2}%, receivers R = {} % (mean {r:.2}%), lost {} frames; \
             idle floor F = {f:.2}% (mean of {n} silent members); a conference member predicted as F + (S - F) + {}(R - F) = {predicted:.2}%, \
             measured {measured:.2}%: ratio {:.2}",
            n - 1,
            one.list_pct(1..n),
            one.lost(),
            n - 1,
            measured / predicted,
        );
    }
    println!("media: [2] load average after: {}", loadavg());
    !(full.failed() || phases.iter().any(Phase::failed))
}

// ----------------------------------------------------------------------------------------
// Main
// ----------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let wall = Instant::now();
    common::nodes::tracing_from_env();
    let plan = match Plan::from_env() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("media: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Pinned: the server on CPU 0; this thread (and the nodes of part 1) on CPU 1.
    let server = match common::nodes::local_server() {
        Ok(server) => server,
        Err(e) => {
            eprintln!("media: signaling server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url = server.url();
    println!("media: real signaling server in-process at {url}; UDP on 127.0.0.1; synthetic VP8/Opus frames (see the docs)");
    println!("media: load average at start: {} (other processes on the machine skew every figure)", loadavg());
    let mut ok = true;
    if plan.join {
        ok &= bench_join(&url, &plan);
    }
    if plan.conference {
        ok &= bench_conference(&url, &plan);
    }
    println!("media: load average at the end: {}; wall time {:.1} s", loadavg(), wall.elapsed().as_secs_f64());
    drop(server);
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
