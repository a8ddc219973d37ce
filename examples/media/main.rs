//! Streams a VP8 test pattern into a call and records what comes back.
//!
//! A Rust host has no camera: this peer reads encoded frames from an IVF file (by default the
//! committed `pattern.ivf`: 3 s of ffmpeg's `testsrc` at 320×240, 30 fps, VP8) and sends them in
//! real time, looping, to every member of a call in a room; every member's video it receives is
//! written to an IVF file per member (`--record DIR`), playable with `ffplay`.
//!
//! ```text
//! cargo run --release --example media -- --demo                    # two peers in one process
//! cargo run --release --example media -- --url ws://127.0.0.1:8080 --room studio --record out/
//! ```
//!
//! Against a browser: run the server with `--serve-examples`, this peer with `--url` and
//! `--room`, and open `http://127.0.0.1:8080/index.html?room=studio&call=1`; the page joins the
//! room's call with its camera, plays the pattern and sends its camera back. A member's video
//! is recorded from its first keyframe (one is requested when its first frame is not) to
//! `DIR/<fingerprint>.ivf` (`DIR/<fingerprint>-<track>.ivf` for a second video track) when
//! VP8 or VP9; other codecs (H.264, AV1) are logged and skipped, as is audio.
//!
//! `--demo` starts an embedded server, a sender and a receiver (UDP on 127.0.0.1), streams the
//! pattern once through a call and checks that the receiver recorded every frame byte for byte.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use peerlink::media::ivf::{IvfReader, IvfWriter};
use peerlink::{CallConfig, CallEvent, ClientConfig, Codec, Fingerprint, MediaEvent, MediaFrame, NodeConfig, NodeEvent, ReceivedFrame, RoomEvent, RoomOptions, Source, TrackId};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};

/// Streams a VP8 test pattern into a call and records what comes back.
#[derive(Parser, Debug)]
pub(crate) struct Args {
    /// Run a sender and a receiver in this process on an embedded server.
    #[arg(long)]
    demo: bool,
    /// The signaling server.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    url: String,
    /// The room (created if it does not exist).
    #[arg(long, default_value = "studio")]
    room: String,
    /// An IVF file of VP8 or VP9 frames to send (default: the committed test pattern).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Write each member's video to `DIR/<fingerprint>.ivf`.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Stop after this many seconds (0: run until interrupted by SIGINT or SIGTERM).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// UDP on 127.0.0.1 only (peers on this machine; a browser then needs
    /// `--allow-loopback-in-peer-connection`). Default: every interface (the demo: loopback).
    #[arg(long)]
    loopback: bool,
}

const PATTERN: &[u8] = include_bytes!("pattern.ivf");

/// Frames of an IVF file with their RTP timestamps and when to send them (from the start).
struct Clip {
    codec: Codec,
    size: (u16, u16),
    frames: Vec<(Duration, u64, Vec<u8>)>,
    length: Duration,
}

impl Clip {
    fn parse(bytes: &[u8]) -> Result<Clip> {
        let reader = IvfReader::new(bytes)?;
        let h = reader.header();
        let mut frames = Vec::new();
        for f in reader {
            let f = f?;
            let rtp = h.rtp_time(f.timestamp);
            frames.push((Duration::from_micros(rtp * 1_000_000 / u64::from(h.codec.clock_rate())), rtp, f.data.to_vec()));
        }
        let Some(last) = frames.last() else { bail!("no frames in the clip") };
        // One frame's time after the last one.
        let step = if frames.len() > 1 { last.0 / (frames.len() as u32 - 1) } else { Duration::from_millis(33) };
        let length = last.0 + step;
        Ok(Clip { codec: h.codec, size: (h.width, h.height), frames, length })
    }
}

/// A remote track's recording.
enum Recording {
    /// No keyframe yet: frames are dropped until one comes (one is requested when a frame
    /// that is not arrives, again every second).
    Waiting(Option<Instant>),
    /// Frames from the first keyframe on, with that keyframe's RTP time.
    Writing(IvfWriter, u64),
    /// Not VP8 or VP9 (logged once).
    Skipped,
}

/// The width and height in a VP8 keyframe's header (RFC 6386, 9.1), if `data` is one.
fn vp8_size(data: &[u8]) -> Option<(u16, u16)> {
    if data.len() < 10 || data[0] & 1 != 0 || data[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    Some((u16::from_le_bytes([data[6], data[7]]) & 0x3fff, u16::from_le_bytes([data[8], data[9]]) & 0x3fff))
}

/// One peer: sends the clip to the call's members in real time and records what arrives.
struct Peer {
    node: PollNode,
    room: String,
    clip: Clip,
    next: usize,
    loops: u64,
    started: Option<Instant>,
    recordings: BTreeMap<(Fingerprint, TrackId), Recording>,
    sent: u64,
    /// The last room error (e.g. joining a room that does not exist).
    room_error: Option<String>,
}

impl Peer {
    fn new(url: &str, alias: &str, room: &str, clip: Clip, udp: UdpBind) -> Result<Peer> {
        let node = PollNode::new(NodeConfig::with_client(ClientConfig::new(url).alias(alias)), PollOptions { udp, ..Default::default() })?;
        Ok(Peer { node, room: room.to_owned(), clip, next: 0, loops: 0, started: None, recordings: BTreeMap::new(), sent: 0, room_error: None })
    }

    /// Records a remote frame (VP8 or VP9 video; anything else is logged once and skipped).
    fn record(&mut self, peer: Fingerprint, track: TrackId, frame: &ReceivedFrame) -> Result<()> {
        let key = (peer, track);
        let recording = match self.recordings.get_mut(&key) {
            Some(r) => r,
            None if !matches!(frame.codec, Codec::Vp8 | Codec::Vp9) => {
                println!("media       not recording {} from {}: {:?} (only VP8 and VP9 go to IVF)", key.1, peer.short(), frame.codec);
                self.recordings.entry(key.clone()).or_insert(Recording::Skipped)
            }
            None => self.recordings.entry(key.clone()).or_insert(Recording::Waiting(None)),
        };
        if let Recording::Waiting(asked) = recording {
            if !frame.keyframe {
                // A decoder could not start here: ask for a keyframe and drop until it.
                if asked.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    *asked = Some(Instant::now());
                    self.node.request_keyframe(key.0, &key.1)?;
                }
                return Ok(());
            }
            let (w, h) = if frame.codec == Codec::Vp8 { vp8_size(&frame.data).unwrap_or(self.clip.size) } else { self.clip.size };
            println!("media       recording {} from {} ({:?}, {w}×{h})", key.1, peer.short(), frame.codec);
            let writer = IvfWriter::new(frame.codec, w, h, (1, 90_000)).context("an IVF writer for VP8/VP9")?;
            *self.recordings.get_mut(&key).expect("inserted above") = Recording::Writing(writer, frame.rtp_time);
        }
        if let Some(Recording::Writing(writer, first)) = self.recordings.get_mut(&key) {
            writer.push(frame.rtp_time.wrapping_sub(*first) & 0xffff_ffff, &frame.data);
        }
        Ok(())
    }

    /// Polls the node and handles its events; sends the frames that are due.
    fn turn(&mut self, log: bool) -> Result<()> {
        self.node.poll(Instant::now())?;
        while let Some(e) = self.node.poll_event() {
            match e {
                // Each remote track (CallEvent::RemoteStream lists a member's first one only).
                NodeEvent::Media(MediaEvent::TrackAdded { peer, track }) if log && !track.local => {
                    println!("media       {} sends {:?} track {} (stream {})", peer.short(), track.kind, track.id, track.stream);
                }
                NodeEvent::Call(CallEvent::RemoteStreamRemoved { peer, .. }) if log => println!("media       {} stopped", peer.short()),
                NodeEvent::Media(MediaEvent::Frame { peer, track, frame }) => self.record(peer, track, &frame)?,
                NodeEvent::Media(MediaEvent::KeyframeRequested { .. }) => {
                    // The clip's keyframes come every second; start it over for a prompt one.
                    self.next = 0;
                    self.started = Some(Instant::now());
                }
                NodeEvent::Room(RoomEvent::PeerJoined { peer, .. }) if log => println!("media       {} ({}) joined", peer.alias, peer.fingerprint.short()),
                NodeEvent::Room(RoomEvent::PeerLeft { peer, .. }) if log => println!("media       {} left", peer.short()),
                NodeEvent::Room(RoomEvent::Error { error, .. }) => {
                    if log {
                        println!("media       room: {error}");
                    }
                    self.room_error = Some(error.to_string());
                }
                _ => {}
            }
        }
        self.send_due()
    }

    fn send_due(&mut self) -> Result<()> {
        while let (Some(started), Some((at, rtp, data))) = (self.started, self.clip.frames.get(self.next)) {
            if *at > started.elapsed() {
                break;
            }
            let rtp_time = rtp + self.loops * (self.clip.length.as_micros() as u64 * u64::from(self.clip.codec.clock_rate()) / 1_000_000);
            let frame = MediaFrame { codec: self.clip.codec, rtp_time, data: data.clone().into() };
            let n = self.node.room(&self.room).send_call_frame(Source::Video, frame)?;
            self.sent += n as u64;
            self.next += 1;
            if self.next == self.clip.frames.len() {
                self.next = 0;
                self.loops += 1;
                self.started = Some(started + self.clip.length);
            }
        }
        Ok(())
    }

    fn start_sending(&mut self) {
        self.started = Some(Instant::now());
    }

    /// The recordings written so far: (member, track, IVF file).
    fn written(&self) -> impl Iterator<Item = (Fingerprint, &TrackId, &IvfWriter)> {
        self.recordings.iter().filter_map(|((peer, track), r)| match r {
            Recording::Writing(writer, _) => Some((*peer, track, writer)),
            _ => None,
        })
    }

    /// Writes each member's video to `DIR/<fingerprint>.ivf` (a second video track of the
    /// same member to `DIR/<fingerprint>-<track>.ivf`).
    fn save(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut named = std::collections::BTreeSet::new();
        for (peer, track, rec) in self.written() {
            let name = if named.insert(peer) { format!("{peer}.ivf") } else { format!("{peer}-{}.ivf", track.0.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")) };
            let path = dir.join(name);
            std::fs::write(&path, rec.bytes())?;
            println!("media       recorded {} frames of {track} from {} to {}", count(rec.bytes()), peer.short(), path.display());
        }
        Ok(())
    }
}

fn count(ivf: &[u8]) -> usize {
    IvfReader::new(ivf).map(|r| r.count()).unwrap_or(0)
}

fn clip(args: &Args) -> Result<Clip> {
    match &args.file {
        Some(path) => Clip::parse(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?),
        None => Clip::parse(PATTERN),
    }
}

fn wait(peers: &mut [&mut Peer], what: &str, done: impl Fn(&[&mut Peer]) -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done(peers) {
        anyhow::ensure!(Instant::now() < deadline, "{what}: timed out");
        for p in peers.iter_mut() {
            p.turn(false)?;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

pub(crate) fn demo(args: &Args) -> Result<()> {
    let server = peerlink_server::spawn(peerlink_server::ServerOptions::local())?;
    let url = server.url();
    let mut sender = Peer::new(&url, "sender", &args.room, clip(args)?, UdpBind::Loopback)?;
    let mut receiver = Peer::new(&url, "receiver", &args.room, clip(args)?, UdpBind::Loopback)?;
    wait(&mut [&mut sender, &mut receiver], "registering", |p| p.iter().all(|p| p.node.is_registered()))?;
    let t0 = Instant::now();
    sender.node.create_room(&args.room, RoomOptions::direct())?;
    wait(&mut [&mut sender, &mut receiver], "creating", |p| p[0].node.room_info(&p[0].room).is_some())?;
    receiver.node.join_room(&args.room)?;
    wait(&mut [&mut sender, &mut receiver], "joining", |p| p[1].node.room_info(&p[1].room).is_some())?;
    for p in [&mut sender, &mut receiver] {
        p.node.room(&p.room).start_call(CallConfig::audio_video())?;
    }
    let fr = receiver.node.fingerprint();
    wait(&mut [&mut sender, &mut receiver], "call", |p| {
        p[0].node.get_peer(&fr).is_some_and(|v| v.tracks.iter().any(|t| t.local && t.id.0 == "video"))
            && p[1].node.get_peer(&p[0].node.fingerprint()).is_some_and(|v| v.tracks.iter().any(|t| !t.local && t.id.0 == "video"))
    })?;
    // The sender's track is agreed once the receiver has answered: wait for a frame to go.
    sender.start_sending();
    let frames = sender.clip.frames.len() as u64;
    let deadline = Instant::now() + sender.clip.length + Duration::from_secs(5);
    while sender.loops == 0 && Instant::now() < deadline {
        sender.turn(false)?;
        receiver.turn(false)?;
        std::thread::sleep(Duration::from_millis(1));
    }
    let first = sender.sent.saturating_sub(frames);
    println!("media       sender streamed {frames} VP8 frames ({} KiB, {}×{}) in {:.1?} after the room was created", PATTERN.len() / 1024, sender.clip.size.0, sender.clip.size.1, t0.elapsed());
    let settle = Instant::now() + Duration::from_millis(500);
    while Instant::now() < settle {
        sender.turn(false)?;
        receiver.turn(false)?;
        std::thread::sleep(Duration::from_millis(1));
    }
    let (_, _, rec) = receiver.written().next().context("the receiver recorded nothing")?;
    let got: Vec<Vec<u8>> = IvfReader::new(rec.bytes())?.map(|f| f.map(|f| f.data.to_vec())).collect::<Result<_, _>>()?;
    let want: Vec<&Vec<u8>> = sender.clip.frames.iter().map(|(_, _, d)| d).collect();
    anyhow::ensure!(got.len() as u64 >= frames.saturating_sub(first), "received {} of {frames} frames", got.len());
    let same = got.iter().zip(&want).filter(|(a, b)| a == *b).count();
    println!("media       receiver recorded {} frames; the first {same} are the clip, byte for byte, in order", got.len());
    anyhow::ensure!(same == got.len().min(want.len()), "frames differ");
    if let Some(dir) = &args.record {
        receiver.save(dir)?;
    }
    Ok(())
}

fn serve(args: &Args) -> Result<()> {
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, interrupted.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, interrupted.clone())?;
    let udp = if args.loopback { UdpBind::Loopback } else { UdpBind::AllInterfaces };
    let mut peer = Peer::new(&args.url, "media", &args.room, clip(args)?, udp)?;
    wait(&mut [&mut peer], "registering", |p| p[0].node.is_registered())?;
    // Join the room, or create it (a group room) when the server says it does not exist.
    peer.node.join_room(&args.room)?;
    wait(&mut [&mut peer], "joining", |p| p[0].node.room_info(&p[0].room).is_some() || p[0].room_error.is_some())?;
    if let Some(error) = peer.room_error.take() {
        println!("media       could not join `{}` ({error}): creating it", args.room);
        peer.node.create_room(&args.room, RoomOptions::group(8))?;
        wait(&mut [&mut peer], "creating", |p| p[0].node.room_info(&p[0].room).is_some() || p[0].room_error.is_some())?;
        if let Some(error) = peer.room_error.take() {
            bail!("could not create `{}`: {error}", args.room);
        }
    }
    // Video only: this peer has no audio to send.
    peer.node.room(&args.room).start_call(CallConfig::video_only())?;
    peer.start_sending();
    println!("media       in `{}` as {}: streaming the clip to every member", args.room, peer.node.fingerprint().short());
    if let Some(host) = args.url.strip_prefix("ws://").or_else(|| args.url.strip_prefix("wss://")) {
        let scheme = if args.url.starts_with("wss://") { "https" } else { "http" };
        println!("media       a browser joins with {scheme}://{}/index.html?room={}&call=1 (a server run with --serve-examples)", host.trim_end_matches('/'), args.room);
    }
    let t0 = Instant::now();
    let stop = (args.seconds > 0).then(|| t0 + Duration::from_secs(args.seconds));
    while !interrupted.load(std::sync::atomic::Ordering::Relaxed) && stop.is_none_or(|s| Instant::now() < s) {
        peer.turn(true)?;
        std::thread::sleep(Duration::from_millis(2));
    }
    println!("media       stopping after {:.1?}: {} frames sent (to all members)", t0.elapsed(), peer.sent);
    if let Some(dir) = &args.record {
        peer.save(dir)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    let args = Args::parse();
    if args.demo { demo(&args) } else { serve(&args) }
}
