//! Room fan-out throughput (harness = false).
//!
//! **What is measured.** A group room of `BENCH_FANOUT_MEMBERS` (10) members on 127.0.0.1:
//! the real signaling server in-process (its own thread), every member a
//! `peerlink_blocking::PollNode` with its own UDP socket. Every member sends
//! `BENCH_FANOUT_MSG`-byte (1 KiB) binary messages to the whole room, as fast as backpressure
//! allows, for `BENCH_FANOUT_SECS` seconds (or until it has sent `BENCH_FANOUT_MSGS`, when
//! set); then everything in flight is delivered. The figure is the aggregate delivery rate:
//! messages delivered, summed over all receivers (one broadcast counts `members - 1` times),
//! divided by the time from the start of sending to the last delivery. Room setup (creating,
//! joining, the direct connections) is not timed.
//!
//! Every message carries its sender's index and a sequence number; each receiver checks per
//! sender that they arrive in order, each exactly once, with the right length, contents and
//! sender fingerprint. At the end every (sender, receiver) count must equal what the sender
//! sent, with no duplicate, gap or reordering (also during a grace period after the last
//! delivery, to catch late duplicates), and every message must have come by the expected
//! path; otherwise the run FAILS (and the exit code says so). This checks what the
//! application sees: retransmissions the room layer makes and drops again itself (its RTO)
//! are invisible here (`RUST_LOG=peerlink::room=debug` shows them as "sending again"). In
//! the room configurations a refused relay frame or a lost signaling connection is not an
//! error (the rooms are meant to send again): such runs print a NOTE with the counts, and
//! the delivery check decides; in the baseline a refused frame is a lost message.
//!
//! **Configurations** (`BENCH_FANOUT_MODES`, comma-separated; default `direct,relay,relay_only`):
//!   * `direct`: rooms, `Node::room_send(to: None)` over the direct paths (the internal
//!     channel of each connection), against the **baseline** of the application doing the
//!     same fan-out itself: a full mesh of plain connections (`connect_to_peer`), each message
//!     sent with `Node::send_binary` on the default channel to every peer (backpressure:
//!     `SendError::WouldBlock`, then wait for `BufferedAmountLow` of that peer; message k+1
//!     starts once every peer accepted message k, the same all-or-nothing pace a room send
//!     has).
//!   * `relay`: rooms, `Node::room_broadcast_via_server` with the direct paths up: every
//!     data message is forced through the server's relay (batched and signed by the room
//!     layer, paced at `RoomsConfig::relay_rate`); the room's acknowledgements still take the
//!     direct paths, since only the data is forced.
//!   * `relay_only`: rooms with no direct path at all (`NodeConfig::max_peers = 0` on every
//!     member, so nobody can connect): `room_send` goes by relay, acknowledgements too. This
//!     is the "every link forced through the relay" case; `relay` is the API's own forcing.
//!   * The relay **baseline** for both: the application relays each message itself with
//!     plain `client().relay()` to every member (one frame per message per recipient, JSON
//!     `{"s":sender,"q":seq,"d":"<base64>"}`, no signing, no acknowledgements, no room
//!     layer), paced by the same token bucket the rooms use (`relay_rate` frames/s,
//!     `relay_burst` burst, per node), so both stay under the server's per-connection limit
//!     and spend the same frame budget.
//!
//! **Fairness and threading.** The machine this was written for has 2 cores. The server
//! thread is pinned to CPU 0 and all the members are polled round-robin by one thread pinned
//! to CPU 1 (`BENCH_FANOUT_THREADS=2` splits them over two threads, pinned to CPUs 1 and 0;
//! BENCH_PIN=0 pins nothing). A member's turn: send up to `BENCH_FANOUT_PER_TURN` (32)
//! messages, fewer when refused (`WouldBlock`), then `PollNode::poll` and handle its events;
//! a round in which nothing happened sleeps 100 us. The cap per turn keeps the ten members
//! of one thread taking turns like ten applications would; `BENCH_FANOUT_PER_TURN=0` sends
//! until refused instead (each member then queues its whole room window, 512 messages per
//! member, at once). The figures depend on it a lot, the rooms' more than the baseline's:
//! compare a few values before reading much into one. The configurations alternate within
//! each round (baseline, rooms, ... then round 2), on fresh nodes every run, so a drifting
//! machine slows all alike; results give medians and the per-round ratios, plus deliveries
//! per CPU-second of the members' thread, which other load skews less. The load average is
//! printed at the start and the end. The server keeps its default limits (200 frames/s per
//! connection, burst 400) unless `BENCH_FANOUT_SERVER_RATE` is set, which is printed.
//!
//! Run: `cargo bench -p peerlink-tests --bench room_fanout` (about 30 s with the defaults).
//! Env: BENCH_FANOUT_MEMBERS (10), BENCH_FANOUT_MSG (1024 bytes), BENCH_FANOUT_SECS (2, sending
//! time per run), BENCH_FANOUT_MSGS (0: no cap; else messages per member), BENCH_FANOUT_RUNS
//! (2), BENCH_FANOUT_MODES (direct,relay,relay_only; also `direct:rooms`, `direct:baseline`,
//! `relay:rooms`, `relay:baseline`, `relay_only:rooms` for one configuration alone, e.g. to
//! profile it), BENCH_FANOUT_THREADS (1), BENCH_FANOUT_PER_TURN (32; 0: until refused),
//! BENCH_FANOUT_RELAY_RATE / BENCH_FANOUT_RELAY_BURST (the rooms' defaults, 100 / 100; set on
//! the rooms and used by the relay baseline), BENCH_FANOUT_SERVER_RATE (unset: the server's
//! default limit; else frames/s per connection, burst twice that), BENCH_FANOUT_TIMEOUT_S (60,
//! per run), BENCH_FANOUT_GRACE_MS (300), BENCH_PIN (1).

mod common;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use peerlink::{
    ClientEvent, Fingerprint, NodeConfig, NodeError, NodeEvent, Payload, PeerState, RoomData, RoomError, RoomEvent,
    RoomOptions, RoomPath, RoomsConfig, SendError,
};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use serde_json::value::RawValue;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Sleep after a round of all members in which nothing happened.
const IDLE_SLEEP: Duration = Duration::from_micros(100);
/// Setup steps (registration, connections, joining) must finish within this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Header of every message: sender index (u32 LE), sequence number (u64 LE).
const HEADER: usize = 12;

// ----------------------------------------------------------------------------------------
// Settings
// ----------------------------------------------------------------------------------------

fn env_u64(name: &str, default: u64) -> Result<u64, Error> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|e| format!("{name}={v:?}: {e}").into()),
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(e) => Err(format!("{name}: {e}").into()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Baseline: full mesh of plain connections, `send_binary` to each peer.
    AppDirect,
    /// `room_send` over the direct paths.
    RoomDirect,
    /// Baseline: plain `client().relay()` to each member, paced.
    AppRelay,
    /// `room_broadcast_via_server`, direct paths up.
    RoomViaServer,
    /// `room_send` with no direct connection possible (`max_peers = 0`).
    RoomRelayOnly,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::AppDirect => "baseline: app fan-out, send_binary over a full mesh",
            Kind::RoomDirect => "room_send, direct paths",
            Kind::AppRelay => "baseline: app fan-out, plain client.relay (paced)",
            Kind::RoomViaServer => "room_broadcast_via_server (direct paths up)",
            Kind::RoomRelayOnly => "room_send, relay only (max_peers = 0)",
        }
    }

    fn is_room(self) -> bool {
        matches!(self, Kind::RoomDirect | Kind::RoomViaServer | Kind::RoomRelayOnly)
    }

    /// The path every room message must arrive by.
    fn expected_path(self) -> Option<RoomPath> {
        match self {
            Kind::RoomDirect => Some(RoomPath::Direct),
            Kind::RoomViaServer | Kind::RoomRelayOnly => Some(RoomPath::Relay),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Plan {
    members: usize,
    msg_size: usize,
    send_for: Duration,
    /// Messages per member; 0: no cap.
    msgs: u64,
    runs: usize,
    threads: usize,
    kinds: Vec<Kind>,
    relay_rate: u32,
    relay_burst: u32,
    server_rate: Option<u32>,
    timeout: Duration,
    grace: Duration,
    /// Messages a member sends per turn at most, before the next member's turn.
    per_turn: usize,
    pin: bool,
}

impl Plan {
    fn from_env() -> Result<Self, Error> {
        let members = env_u64("BENCH_FANOUT_MEMBERS", 10)? as usize;
        let msg_size = env_u64("BENCH_FANOUT_MSG", 1024)? as usize;
        let secs = match std::env::var("BENCH_FANOUT_SECS") {
            Ok(v) => v.trim().parse::<f64>().map_err(|e| format!("BENCH_FANOUT_SECS={v:?}: {e}"))?,
            Err(_) => 2.0,
        };
        let defaults = RoomsConfig::default();
        let modes = std::env::var("BENCH_FANOUT_MODES").unwrap_or_else(|_| "direct,relay,relay_only".into());
        let mut kinds = Vec::new();
        for mode in modes.split(',').map(str::trim) {
            let add: &[Kind] = match mode {
                "direct" => &[Kind::AppDirect, Kind::RoomDirect],
                "relay" => &[Kind::AppRelay, Kind::RoomViaServer],
                "relay_only" => &[Kind::AppRelay, Kind::RoomRelayOnly],
                // One configuration alone (no baseline), e.g. to profile it.
                "direct:rooms" => &[Kind::RoomDirect],
                "direct:baseline" => &[Kind::AppDirect],
                "relay:rooms" => &[Kind::RoomViaServer],
                "relay:baseline" => &[Kind::AppRelay],
                "relay_only:rooms" => &[Kind::RoomRelayOnly],
                other => return Err(format!("BENCH_FANOUT_MODES: unknown mode {other:?}").into()),
            };
            for k in add {
                if !kinds.contains(k) {
                    kinds.push(*k);
                }
            }
        }
        let server_rate = match std::env::var("BENCH_FANOUT_SERVER_RATE") {
            Ok(v) => Some(v.trim().parse().map_err(|e| format!("BENCH_FANOUT_SERVER_RATE={v:?}: {e}"))?),
            Err(_) => None,
        };
        let plan = Plan {
            members,
            msg_size,
            send_for: Duration::from_secs_f64(secs),
            msgs: env_u64("BENCH_FANOUT_MSGS", 0)?,
            runs: env_u64("BENCH_FANOUT_RUNS", 2)? as usize,
            threads: env_u64("BENCH_FANOUT_THREADS", 1)? as usize,
            kinds,
            relay_rate: env_u64("BENCH_FANOUT_RELAY_RATE", u64::from(defaults.relay_rate))? as u32,
            relay_burst: env_u64("BENCH_FANOUT_RELAY_BURST", u64::from(defaults.relay_burst))? as u32,
            server_rate,
            timeout: Duration::from_secs(env_u64("BENCH_FANOUT_TIMEOUT_S", 60)?),
            grace: Duration::from_millis(env_u64("BENCH_FANOUT_GRACE_MS", 300)?),
            per_turn: match env_u64("BENCH_FANOUT_PER_TURN", 32)? {
                0 => usize::MAX,
                n => n as usize,
            },
            pin: common::pinned(),
        };
        if plan.members < 2 || plan.msg_size < HEADER + 1 || plan.runs == 0 || plan.threads == 0 || plan.relay_rate == 0 {
            return Err("need BENCH_FANOUT_MEMBERS >= 2, BENCH_FANOUT_MSG > 12, RUNS, THREADS and RELAY_RATE > 0".into());
        }
        if plan.send_for.is_zero() && plan.msgs == 0 {
            return Err("BENCH_FANOUT_SECS = 0 needs BENCH_FANOUT_MSGS".into());
        }
        Ok(plan)
    }
}

// ----------------------------------------------------------------------------------------
// Small helpers: pinning, CPU time, base64
// ----------------------------------------------------------------------------------------


const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for chunk in text.chunks(4) {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

/// The contents of message `seq` of `sender`: header, then a filler that depends on both.
fn make_msg(size: usize, sender: usize, seq: u64) -> Vec<u8> {
    let fill = (sender as u64).wrapping_mul(31).wrapping_add(seq) as u8;
    let mut msg = vec![fill; size];
    msg[..4].copy_from_slice(&(sender as u32).to_le_bytes());
    msg[4..HEADER].copy_from_slice(&seq.to_le_bytes());
    msg
}

/// Checks a message's length and filler; returns its (sender, seq).
fn parse_msg(size: usize, data: &[u8]) -> Result<(usize, u64), String> {
    if data.len() != size {
        return Err(format!("message of {} bytes, expected {size}", data.len()));
    }
    let sender = u32::from_le_bytes(data[..4].try_into().expect("4 bytes")) as usize;
    let seq = u64::from_le_bytes(data[4..HEADER].try_into().expect("8 bytes"));
    let fill = (sender as u64).wrapping_mul(31).wrapping_add(seq) as u8;
    if data[HEADER] != fill || data[size - 1] != fill {
        return Err(format!("message {seq} of member {sender}: corrupted contents"));
    }
    Ok((sender, seq))
}

#[derive(serde::Deserialize)]
struct RelayMsg<'a> {
    s: usize,
    q: u64,
    #[serde(borrow)]
    d: &'a str,
}

// ----------------------------------------------------------------------------------------
// Setup (untimed)
// ----------------------------------------------------------------------------------------

fn new_node(url: &str, plan: &Plan, kind: Kind) -> Result<PollNode, Error> {
    let mut config = NodeConfig::new(url);
    config.rooms.relay_rate = plan.relay_rate;
    config.rooms.relay_burst = plan.relay_burst;
    if kind == Kind::RoomRelayOnly {
        // Nobody can call anybody: every room link takes the relay, acknowledgements too.
        config.max_peers = 0;
    }
    Ok(PollNode::new(config, PollOptions { udp: UdpBind::Loopback, ..Default::default() })?)
}

/// Polls every node once and hands their events to `on`; returns whether there was any.
fn pump(nodes: &mut [PollNode], on: &mut impl FnMut(usize, NodeEvent) -> Result<(), Error>) -> Result<bool, Error> {
    let mut any = false;
    for (i, n) in nodes.iter_mut().enumerate() {
        n.poll(Instant::now())?;
        while let Some(e) = n.poll_event() {
            any = true;
            on(i, e)?;
        }
    }
    Ok(any)
}

/// Pumps until `done`.
fn until(
    nodes: &mut [PollNode],
    what: &str,
    mut on: impl FnMut(usize, NodeEvent) -> Result<(), Error>,
    mut done: impl FnMut(&mut [PollNode]) -> bool,
) -> Result<(), Error> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    while !done(nodes) {
        if Instant::now() >= deadline {
            return Err(format!("setup: {what}: timed out").into());
        }
        if !pump(nodes, &mut on)? {
            std::thread::sleep(IDLE_SLEEP);
        }
    }
    Ok(())
}

/// Fails on events that mean setup went wrong.
fn setup_event(i: usize, e: &NodeEvent) -> Result<(), Error> {
    match e {
        NodeEvent::PeerError { error, .. } => Err(format!("setup: member {i}: {error}").into()),
        NodeEvent::Room(RoomEvent::Error { error, .. }) => Err(format!("setup: member {i}: room: {error}").into()),
        NodeEvent::Signaling(ClientEvent::Error(error)) => Err(format!("setup: member {i}: signaling: {error}").into()),
        _ => Ok(()),
    }
}

/// Fresh nodes, registered, and connected the way `kind` needs; returns them and the room.
fn setup(url: &str, plan: &Plan, kind: Kind, room: &str) -> Result<Vec<PollNode>, Error> {
    let n = plan.members;
    let mut nodes = (0..n).map(|_| new_node(url, plan, kind)).collect::<Result<Vec<_>, _>>()?;
    until(&mut nodes, "registration", |i, e| setup_event(i, &e), |ns| ns.iter().all(PollNode::is_registered))?;
    let fps: Vec<Fingerprint> = nodes.iter().map(PollNode::fingerprint).collect();
    match kind {
        Kind::AppDirect => {
            let now = Instant::now();
            for i in 1..n {
                for &fp in &fps[..i] {
                    nodes[i].node().connect_to_peer(now, fp)?;
                }
            }
            let index: HashMap<Fingerprint, usize> = fps.iter().enumerate().map(|(i, f)| (*f, i)).collect();
            let mut open = vec![vec![false; n]; n];
            let count = std::cell::Cell::new(0);
            until(
                &mut nodes,
                "full mesh of plain connections",
                |i, e| {
                    setup_event(i, &e)?;
                    if let NodeEvent::ChannelOpen { peer, channel } = &e
                        && channel == "default"
                        && !std::mem::replace(&mut open[i][index[peer]], true)
                    {
                        count.set(count.get() + 1);
                    }
                    Ok(())
                },
                |_| count.get() == n * (n - 1),
            )?;
        }
        Kind::AppRelay => {}
        Kind::RoomDirect | Kind::RoomViaServer | Kind::RoomRelayOnly => {
            nodes[0].node().create_room(Instant::now(), room, RoomOptions::group(n as u32))?;
            let created = std::cell::Cell::new(false);
            until(
                &mut nodes,
                "room created",
                |i, e| {
                    setup_event(i, &e)?;
                    if matches!(e, NodeEvent::Room(RoomEvent::Joined { .. })) {
                        created.set(true);
                    }
                    Ok(())
                },
                |_| created.get(),
            )?;
            let now = Instant::now();
            for node in &mut nodes[1..] {
                node.node().join_room(now, room)?;
            }
            let want = if kind == Kind::RoomRelayOnly { RoomPath::Relay } else { RoomPath::Direct };
            until(
                &mut nodes,
                "everyone in the room, on the expected paths",
                |i, e| setup_event(i, &e),
                |ns| {
                    ns.iter_mut().all(|node| {
                        node.node()
                            .room(room)
                            .is_some_and(|r| r.members.len() == n - 1 && r.members.iter().all(|m| m.path == want))
                    })
                },
            )?;
        }
    }
    Ok(nodes)
}

// ----------------------------------------------------------------------------------------
// The measured phase
// ----------------------------------------------------------------------------------------

/// What the threads of one run share.
struct Shared {
    start: Instant,
    /// No new message starts after this.
    send_until: Instant,
    /// The run fails when not done by then.
    deadline: Instant,
    /// Messages each member sent in all, once it stopped sending (`u64::MAX` before).
    final_sent: Vec<AtomicU64>,
    /// Members that received everything.
    complete: AtomicUsize,
    /// A thread failed: the others stop.
    abort: AtomicBool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Rx {
    /// The next sequence number expected.
    next: u64,
    /// Messages delivered once, in order or not.
    count: u64,
    duplicates: u64,
    /// Messages skipped (arrived later than a later one, or never).
    gaps: u64,
}

struct Member {
    idx: usize,
    kind: Kind,
    node: PollNode,
    room: String,
    /// The others: (index, fingerprint).
    peers: Vec<(usize, Fingerprint)>,
    index_of: HashMap<Fingerprint, usize>,
    // -- sending
    /// Messages fully sent (to every peer): the sequence number of the next one.
    next_seq: u64,
    /// Baselines: positions in `peers` the current message still has to go to.
    pending: Vec<usize>,
    current: Vec<u8>,
    current_relay: Option<Box<RawValue>>,
    /// AppDirect: the default channel to that peer refused a send; cleared by `BufferedAmountLow`.
    peer_blocked: Vec<bool>,
    /// Rooms: a send was refused; cleared by `Writable`.
    room_blocked: bool,
    /// AppRelay: token bucket.
    tokens: f64,
    tokens_at: Instant,
    done_sending: bool,
    // -- receiving
    rx: Vec<Rx>,
    last_delivery: Option<Instant>,
    complete: bool,
    // -- counts
    would_block: u64,
    writable: u64,
    direct_msgs: u64,
    relay_msgs: u64,
    path_changes: u64,
    /// Rooms only: signaling errors and disconnections met (not fatal for rooms).
    signaling_trouble: Vec<String>,
}

impl Member {
    fn new(idx: usize, kind: Kind, node: PollNode, fps: &[Fingerprint], room: &str, plan: &Plan) -> Self {
        let peers: Vec<(usize, Fingerprint)> = fps.iter().copied().enumerate().filter(|(i, _)| *i != idx).collect();
        Member {
            idx,
            kind,
            node,
            room: room.to_owned(),
            index_of: fps.iter().enumerate().map(|(i, f)| (*f, i)).collect(),
            next_seq: 0,
            pending: Vec::new(),
            current: Vec::new(),
            current_relay: None,
            peer_blocked: vec![false; peers.len()],
            peers,
            room_blocked: false,
            tokens: f64::from(plan.relay_burst),
            tokens_at: Instant::now(),
            done_sending: false,
            rx: vec![Rx::default(); fps.len()],
            last_delivery: None,
            complete: false,
            would_block: 0,
            writable: 0,
            direct_msgs: 0,
            relay_msgs: 0,
            path_changes: 0,
            signaling_trouble: Vec::new(),
        }
    }

    /// Whether a new message may start now.
    fn may_start(&self, now: Instant, shared: &Shared, plan: &Plan) -> bool {
        let by_time = plan.msgs > 0 && plan.send_for.is_zero() || now < shared.send_until;
        by_time && (plan.msgs == 0 || self.next_seq < plan.msgs)
    }

    /// Sends what it may this turn; returns whether it sent anything.
    fn send_turn(&mut self, now: Instant, shared: &Shared, plan: &Plan) -> Result<bool, Error> {
        if self.done_sending {
            return Ok(false);
        }
        let start_seq = self.next_seq;
        let mut progress = false;
        match self.kind {
            Kind::RoomDirect | Kind::RoomViaServer | Kind::RoomRelayOnly => {
                for _ in 0..plan.per_turn {
                    if !self.may_start(now, shared, plan) {
                        self.done_sending = true;
                        break;
                    }
                    if self.room_blocked {
                        break;
                    }
                    let data = RoomData::Binary(make_msg(plan.msg_size, self.idx, self.next_seq));
                    let result = if self.kind == Kind::RoomViaServer {
                        self.node.node().room_broadcast_via_server(now, &self.room, data)
                    } else {
                        self.node.node().room_send(now, &self.room, None, data)
                    };
                    match result {
                        Ok(()) => self.next_seq += 1,
                        Err(NodeError::Room(RoomError::WouldBlock { .. })) => {
                            self.room_blocked = true;
                            self.would_block += 1;
                        }
                        Err(e) => return Err(format!("member {}: room send: {e}", self.idx).into()),
                    }
                }
            }
            Kind::AppDirect => {
                for _ in 0..plan.per_turn {
                    if self.pending.is_empty() {
                        if !self.may_start(now, shared, plan) {
                            self.done_sending = true;
                            break;
                        }
                        self.current = make_msg(plan.msg_size, self.idx, self.next_seq);
                        self.pending = (0..self.peers.len()).collect();
                    }
                    let mut failure = None;
                    let (node, peers, blocked, current) = (&mut self.node, &self.peers, &mut self.peer_blocked, &self.current);
                    let mut refused = 0;
                    self.pending.retain(|&p| {
                        if blocked[p] || failure.is_some() {
                            return true;
                        }
                        match node.node().send_binary(now, peers[p].1, None, current) {
                            Ok(()) => {
                                progress = true;
                                false
                            }
                            Err(NodeError::Send(SendError::WouldBlock { .. })) => {
                                blocked[p] = true;
                                refused += 1;
                                true
                            }
                            Err(e) => {
                                failure = Some(e);
                                true
                            }
                        }
                    });
                    self.would_block += refused;
                    if let Some(e) = failure {
                        return Err(format!("member {}: send_binary: {e}", self.idx).into());
                    }
                    if !self.pending.is_empty() {
                        break;
                    }
                    self.next_seq += 1;
                }
            }
            Kind::AppRelay => {
                let rate = f64::from(plan.relay_rate);
                self.tokens = (self.tokens + now.saturating_duration_since(self.tokens_at).as_secs_f64() * rate)
                    .min(f64::from(plan.relay_burst));
                self.tokens_at = now;
                for _ in 0..plan.per_turn {
                    if self.pending.is_empty() {
                        if !self.may_start(now, shared, plan) {
                            self.done_sending = true;
                            break;
                        }
                        let msg = make_msg(plan.msg_size, self.idx, self.next_seq);
                        let json = format!(r#"{{"s":{},"q":{},"d":"{}"}}"#, self.idx, self.next_seq, b64_encode(&msg));
                        self.current_relay = Some(RawValue::from_string(json)?);
                        self.pending = (0..self.peers.len()).collect();
                    }
                    let payload = self.current_relay.as_deref().expect("a current message");
                    while let Some(&p) = self.pending.last() {
                        if self.tokens < 1.0 {
                            break;
                        }
                        self.node.client().relay(self.peers[p].1, payload)?;
                        self.tokens -= 1.0;
                        self.pending.pop();
                        progress = true;
                    }
                    if !self.pending.is_empty() {
                        break;
                    }
                    self.next_seq += 1;
                }
            }
        }
        if self.done_sending {
            shared.final_sent[self.idx].store(self.next_seq, Ordering::Release);
        }
        Ok(progress || self.next_seq != start_seq)
    }

    fn on_message(&mut self, now: Instant, from: Fingerprint, data: &[u8], plan: &Plan) -> Result<(), Error> {
        let (sender, seq) = parse_msg(plan.msg_size, data).map_err(|e| format!("member {}: {e}", self.idx))?;
        if self.index_of.get(&from) != Some(&sender) || sender == self.idx {
            return Err(format!("member {}: message of member {sender} came from {}", self.idx, from.short()).into());
        }
        let rx = &mut self.rx[sender];
        if seq == rx.next {
            rx.next += 1;
            rx.count += 1;
        } else if seq < rx.next {
            rx.duplicates += 1;
        } else {
            rx.gaps += seq - rx.next;
            rx.next = seq + 1;
            rx.count += 1;
        }
        self.last_delivery = Some(now);
        Ok(())
    }

    fn on_event(&mut self, now: Instant, event: NodeEvent, plan: &Plan) -> Result<(), Error> {
        let me = self.idx;
        match event {
            NodeEvent::Room(RoomEvent::Data { from, data: Payload::Binary(data), path, .. }) => {
                match path {
                    RoomPath::Direct => self.direct_msgs += 1,
                    RoomPath::Relay => self.relay_msgs += 1,
                }
                self.on_message(now, from, &data, plan)?;
            }
            NodeEvent::Room(RoomEvent::Writable { .. }) => {
                self.room_blocked = false;
                self.writable += 1;
            }
            NodeEvent::Room(RoomEvent::PathChanged { .. }) => self.path_changes += 1,
            NodeEvent::Room(
                e @ (RoomEvent::Error { .. }
                | RoomEvent::PeerLeft { .. }
                | RoomEvent::Closed { .. }
                | RoomEvent::Kicked { .. }
                | RoomEvent::Data { .. }),
            ) => return Err(format!("member {me}: unexpected room event {e:?}").into()),
            NodeEvent::Data { peer, channel, data: Payload::Binary(data) } if channel == "default" => {
                self.direct_msgs += 1;
                self.on_message(now, peer, &data, plan)?;
            }
            NodeEvent::Data { channel, .. } => return Err(format!("member {me}: unexpected data on {channel}").into()),
            NodeEvent::BufferedAmountLow { peer, channel } if channel == "default" => {
                if let Some(p) = self.peers.iter().position(|(_, f)| *f == peer) {
                    self.peer_blocked[p] = false;
                    self.writable += 1;
                }
            }
            NodeEvent::Signaling(ClientEvent::Relay { from, payload }) => {
                let m: RelayMsg<'_> = serde_json::from_str(payload.0.get()).map_err(|e| format!("member {me}: relay: {e}"))?;
                let data = b64_decode(m.d).ok_or_else(|| format!("member {me}: relay: bad base64"))?;
                if parse_msg(plan.msg_size, &data).ok() != Some((m.s, m.q)) {
                    return Err(format!("member {me}: relay: header does not match the contents").into());
                }
                self.relay_msgs += 1;
                self.on_message(now, from, &data, plan)?;
            }
            // The rooms are meant to survive a refused relay frame or a lost signaling
            // connection (they send again): counted and reported, and the delivery check
            // decides. Without a room layer (the baseline) a refused frame is a lost message.
            NodeEvent::Signaling(ClientEvent::Error(error)) if self.kind.is_room() => {
                self.signaling_trouble.push(format!("member {me}: {error}"));
            }
            NodeEvent::Signaling(e @ (ClientEvent::Disconnected { .. } | ClientEvent::Reconnected { .. }))
                if self.kind.is_room() =>
            {
                self.signaling_trouble.push(format!("member {me}: {e:?}"));
            }
            NodeEvent::Signaling(ClientEvent::Error(error)) => {
                return Err(format!("member {me}: signaling error (server refused a frame?): {error}").into());
            }
            NodeEvent::Signaling(e @ ClientEvent::Disconnected { .. }) => return Err(format!("member {me}: {e:?}").into()),
            NodeEvent::PeerError { peer, error } => return Err(format!("member {me}: connection to {}: {error}", peer.short()).into()),
            NodeEvent::PeerState { peer, state: state @ (PeerState::Disconnected | PeerState::Failed | PeerState::Closed) } => {
                return Err(format!("member {me}: connection to {} went {state:?}", peer.short()).into());
            }
            _ => {}
        }
        Ok(())
    }

    /// Whether everything every other member sent (once they all stopped) arrived here.
    fn check_complete(&self, shared: &Shared) -> bool {
        self.peers.iter().all(|(s, _)| {
            let sent = shared.final_sent[*s].load(Ordering::Acquire);
            sent != u64::MAX && self.rx[*s].count >= sent
        })
    }
}

/// Drives `members` (one thread's share) until all members everywhere have everything and
/// the grace period is over. Returns this thread's CPU time and its rounds (turns of every
/// member).
fn drive(members: &mut [Member], shared: &Shared, plan: &Plan) -> Result<(Duration, u64), Error> {
    let cpu_start = common::measure::thread_cpu();
    let mut grace_end: Option<Instant> = None;
    let mut rounds = 0;
    loop {
        rounds += 1;
        let now = Instant::now();
        if shared.abort.load(Ordering::Relaxed) {
            return Err("stopped: another thread failed".into());
        }
        if now >= shared.deadline {
            let complete = shared.complete.load(Ordering::Relaxed);
            return Err(format!("timed out (BENCH_FANOUT_TIMEOUT_S) with {complete}/{} members complete", plan.members).into());
        }
        let mut progress = false;
        for m in members.iter_mut() {
            progress |= m.send_turn(now, shared, plan)?;
            m.node.poll(Instant::now())?;
            let now = Instant::now();
            while let Some(e) = m.node.poll_event() {
                progress = true;
                m.on_event(now, e, plan)?;
            }
            if !m.complete && m.check_complete(shared) {
                m.complete = true;
                shared.complete.fetch_add(1, Ordering::AcqRel);
            }
        }
        if shared.complete.load(Ordering::Acquire) == plan.members {
            let end = *grace_end.get_or_insert(now + plan.grace);
            if now >= end {
                return Ok((common::measure::thread_cpu().saturating_sub(cpu_start), rounds));
            }
        }
        if !progress {
            std::thread::sleep(IDLE_SLEEP);
        }
    }
}

/// The outcome of one run.
#[derive(Debug, Clone)]
struct RunStats {
    delivered: u64,
    elapsed: Duration,
    sent: u64,
    would_block: u64,
    writable: u64,
    direct_msgs: u64,
    relay_msgs: u64,
    node_cpu: Duration,
    process_cpu: Duration,
    setup: Duration,
    /// Signaling errors and disconnections the rooms met (they are expected to recover).
    trouble: Vec<String>,
    /// From the end of the sending time to the last delivery.
    tail: Duration,
    rounds: u64,
}

impl RunStats {
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.elapsed.as_secs_f64()
    }
}

fn run_once(url: &str, plan: &Plan, kind: Kind, run: usize) -> Result<RunStats, Error> {
    let room = format!("fanout-{run}-{kind:?}").to_lowercase();
    let setup_start = Instant::now();
    let nodes = setup(url, plan, kind, &room)?;
    let setup = setup_start.elapsed();
    let fps: Vec<Fingerprint> = nodes.iter().map(PollNode::fingerprint).collect();
    let mut members: Vec<Member> =
        nodes.into_iter().enumerate().map(|(i, node)| Member::new(i, kind, node, &fps, &room, plan)).collect();

    let start = Instant::now();
    let shared = Shared {
        start,
        send_until: start + plan.send_for,
        deadline: start + plan.timeout,
        final_sent: (0..plan.members).map(|_| AtomicU64::new(u64::MAX)).collect(),
        complete: AtomicUsize::new(0),
        abort: AtomicBool::new(false),
    };
    for m in &mut members {
        m.tokens_at = start;
    }
    let process_cpu_start = common::measure::process_cpu();
    let threads = plan.threads.min(plan.members);
    let per_thread = plan.members.div_ceil(threads);
    let results: Vec<Result<(Duration, u64), Error>> = if threads == 1 {
        vec![drive(&mut members, &shared, plan)]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = members
                .chunks_mut(per_thread)
                .enumerate()
                .map(|(t, chunk)| {
                    let shared = &shared;
                    scope.spawn(move || {
                        common::pin_thread(1 + t);
                        let r = drive(chunk, shared, plan);
                        if r.is_err() {
                            shared.abort.store(true, Ordering::Relaxed);
                        }
                        r
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into()))).collect()
        })
    };
    let process_cpu = common::measure::process_cpu().saturating_sub(process_cpu_start);
    let mut node_cpu = Duration::ZERO;
    let mut rounds = 0;
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok((cpu, r)) => {
                node_cpu += cpu;
                rounds = rounds.max(r);
            }
            Err(e) => failures.push(e.to_string()),
        }
    }

    // Verify: every (sender, receiver) pair exactly once, in order, by the expected path.
    let mut problems = Vec::new();
    let (mut delivered, mut sent) = (0, 0);
    for s in 0..plan.members {
        sent += shared.final_sent[s].load(Ordering::Acquire);
    }
    for m in &members {
        for (s, _) in &m.peers {
            let want = shared.final_sent[*s].load(Ordering::Acquire);
            let rx = m.rx[*s];
            delivered += rx.count;
            if rx.count != want || rx.next != want || rx.duplicates != 0 || rx.gaps != 0 {
                problems.push(format!(
                    "{s}->{}: sent {want}, delivered {} (next seq {}), {} duplicates, {} skipped",
                    m.idx, rx.count, rx.next, rx.duplicates, rx.gaps
                ));
            }
        }
        if let Some(path) = kind.expected_path() {
            let wrong = if path == RoomPath::Direct { m.relay_msgs } else { m.direct_msgs };
            if wrong != 0 {
                problems.push(format!("member {}: {wrong} messages came by the other path than {path:?}", m.idx));
            }
        }
        if kind.is_room() && m.path_changes != 0 {
            problems.push(format!("member {}: {} path changes during the run", m.idx, m.path_changes));
        }
    }
    if !failures.is_empty() || !problems.is_empty() {
        let n = problems.len();
        problems.truncate(10);
        let mut trouble: Vec<String> = members.iter().flat_map(|m| m.signaling_trouble.iter().cloned()).collect();
        let nt = trouble.len();
        trouble.truncate(6);
        return Err(format!(
            "{}DELIVERY CHECK FAILED ({n} problems; sender totals are u64::MAX where a sender never stopped): {}; \
             signaling trouble met by the rooms ({nt}): {}",
            failures.iter().map(|f| format!("{f}; ")).collect::<String>(),
            problems.join("; "),
            trouble.join("; ")
        )
        .into());
    }
    let last = members.iter().filter_map(|m| m.last_delivery).max().ok_or("nothing delivered")?;
    let stats = RunStats {
        delivered,
        elapsed: last.saturating_duration_since(shared.start),
        sent,
        would_block: members.iter().map(|m| m.would_block).sum(),
        writable: members.iter().map(|m| m.writable).sum(),
        direct_msgs: members.iter().map(|m| m.direct_msgs).sum(),
        relay_msgs: members.iter().map(|m| m.relay_msgs).sum(),
        node_cpu,
        process_cpu,
        setup,
        tail: last.saturating_duration_since(shared.send_until),
        trouble: members.iter().flat_map(|m| m.signaling_trouble.iter().cloned()).collect(),
        rounds,
    };
    // Close cleanly so the server does not keep parked sessions around.
    let now = Instant::now();
    for m in &mut members {
        let _ = m.node.node().close(now);
        let _ = m.node.poll(now);
    }
    Ok(stats)
}

// ----------------------------------------------------------------------------------------
// Main
// ----------------------------------------------------------------------------------------

/// The 1, 5 and 15 minute load averages, as /proc/loadavg has them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}


fn main() -> ExitCode {
    let wall = Instant::now();
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let plan = match Plan::from_env() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("room_fanout: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The server's thread inherits CPU 0; the members' thread (this one) then moves to CPU 1.
    common::pin_thread(0);
    let mut options = peerlink_server::ServerOptions::local();
    if let Some(rate) = plan.server_rate {
        options.config.rate_limit = peerlink::server::RateLimit { per_second: rate, burst: rate.saturating_mul(2) };
    }
    let limit = options.config.rate_limit;
    let server = match peerlink_server::spawn(options) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("room_fanout: signaling server: {e}");
            return ExitCode::FAILURE;
        }
    };
    common::pin_thread(1);
    let url = server.url();
    println!(
        "room_fanout: {} members, {}-byte messages to the whole room, sending for {:.1} s{} per run, {} run(s) per configuration, \
         UDP on 127.0.0.1, real server in-process",
        plan.members,
        plan.msg_size,
        plan.send_for.as_secs_f64(),
        if plan.msgs > 0 { format!(" (at most {} messages per member)", plan.msgs) } else { String::new() },
        plan.runs
    );
    println!(
        "room_fanout: threads: server pinned to CPU 0, members polled by {} thread(s){}; rooms relay_rate {} frames/s burst {} \
         (the relay baseline paces the same); server rate limit {} frames/s burst {} per connection{}",
        plan.threads,
        if plan.pin { " pinned from CPU 1 on" } else { " (BENCH_PIN=0: nothing pinned)" },
        plan.relay_rate,
        plan.relay_burst,
        limit.per_second,
        limit.burst,
        if plan.server_rate.is_some() { " (RAISED by BENCH_FANOUT_SERVER_RATE)" } else { " (default)" },
    );

    println!("room_fanout: load average at start: {} (other processes on the machine skew every figure)", loadavg());
    let mut results: Vec<(Kind, Vec<Option<RunStats>>)> = plan.kinds.iter().map(|k| (*k, Vec::new())).collect();
    let mut failed = false;
    for run in 1..=plan.runs {
        for (kind, series) in &mut results {
            match run_once(&url, &plan, *kind, run) {
                Ok(s) => {
                    println!(
                        "room_fanout: {}: run {run}/{}: {} delivered ({} sent x {} receivers, each exactly once) in {:.2} s = {:.0} msgs/s; \
                         wouldblock {}, writable {}; by direct {} / relay {}; cpu: members {:.2} s, process {:.2} s; \
                         last delivery {:.2} s after sending stopped; {} polling rounds; setup {:.2} s",
                        kind.label(),
                        plan.runs,
                        s.delivered,
                        s.sent,
                        plan.members - 1,
                        s.elapsed.as_secs_f64(),
                        s.rate(),
                        s.would_block,
                        s.writable,
                        s.direct_msgs,
                        s.relay_msgs,
                        s.node_cpu.as_secs_f64(),
                        s.process_cpu.as_secs_f64(),
                        s.tail.as_secs_f64(),
                        s.rounds,
                        s.setup.as_secs_f64(),
                    );
                    if !s.trouble.is_empty() {
                        let mut t = s.trouble.clone();
                        t.sort();
                        t.dedup();
                        let count = |what: &str| s.trouble.iter().filter(|t| t.contains(what)).count();
                        println!(
                            "room_fanout: {}: run {run}: NOTE the rooms met {} signaling errors/disconnections ({} Disconnected, \
                             of which {} with 4001 (server outbound queue full); {} frames refused with queue_full; {} rate_limited) \
                             and still delivered everything exactly once: {}",
                            kind.label(),
                            s.trouble.len(),
                            count("Disconnected"),
                            count("Some(4001)"),
                            count("queue_full"),
                            count("rate_limited"),
                            t.iter().take(4).cloned().collect::<Vec<_>>().join("; ")
                        );
                    }
                    series.push(Some(s));
                }
                Err(e) => {
                    eprintln!("room_fanout: {}: run {run}/{} FAILED: {e}", kind.label(), plan.runs);
                    println!("room_fanout: {}: run {run}/{} FAILED", kind.label(), plan.runs);
                    failed = true;
                    series.push(None);
                }
            }
        }
    }

    let series = |k: Kind| results.iter().find(|(kind, _)| *kind == k).map(|(_, s)| s);
    for (kind, runs) in &results {
        let ok: Vec<&RunStats> = runs.iter().flatten().collect();
        if let Some(m) = common::median(ok.iter().map(|s| s.rate()).collect()) {
            let cpu = common::median(ok.iter().map(|s| s.delivered as f64 / s.node_cpu.as_secs_f64()).collect()).unwrap_or(0.0);
            println!(
                "room_fanout: {}: median {m:.0} msgs/s over {} run(s) ({:.0} deliveries per CPU-second of the members' thread(s))",
                kind.label(),
                ok.len(),
                cpu
            );
        }
    }
    let compare = |name: &str, base: Kind, ours: Kind| {
        let (Some(b), Some(o)) = (series(base), series(ours)) else { return };
        let rates = |s: &Vec<Option<RunStats>>| common::median(s.iter().flatten().map(RunStats::rate).collect());
        let (Some(bm), Some(om)) = (rates(b), rates(o)) else {
            println!("room_fanout: RESULT {name}: n/a (failed runs)");
            return;
        };
        let rounds: Vec<String> = b
            .iter()
            .zip(o)
            .map(|(b, o)| match (b, o) {
                (Some(b), Some(o)) => format!("{:.2}", o.rate() / b.rate()),
                _ => "n/a".into(),
            })
            .collect();
        println!(
            "room_fanout: RESULT {name}: {} median {om:.0} msgs/s vs {} {bm:.0} msgs/s: ratio {:.2} (per round {})",
            ours.label(),
            base.label(),
            om / bm,
            rounds.join(", ")
        );
    };
    compare("direct", Kind::AppDirect, Kind::RoomDirect);
    compare("relay", Kind::AppRelay, Kind::RoomViaServer);
    compare("relay only", Kind::AppRelay, Kind::RoomRelayOnly);
    let total: usize = results.iter().map(|(_, s)| s.len()).sum();
    let bad: usize = results.iter().map(|(_, s)| s.iter().filter(|r| r.is_none()).count()).sum();
    println!(
        "room_fanout: RESULT delivery check: {} of {total} runs delivered every message exactly once, in order, by the expected path; wall time {:.1} s",
        total - bad,
        wall.elapsed().as_secs_f64()
    );
    println!("room_fanout: load average at the end: {}", loadavg());
    drop(server);
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
