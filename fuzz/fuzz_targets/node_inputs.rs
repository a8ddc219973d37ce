//! Fuzz target `node_inputs`: a sequence of [`Step`]s decoded from the fuzzer's bytes drives a
//! small `peerlink-sim` world (two real `Node`s and the real server core, fixed seed): virtual
//! time, calls between the nodes and to strangers, junk datagrams (raw or in STUN, DTLS and
//! RTP framing) from the peer's real address or from strangers, relay payloads (negotiation
//! messages built from the live sessions and real SDPs and signed with the sender's real key,
//! hand-made `peerlink` objects, raw JSON), channel sends, closes, ICE restarts, partitions,
//! signaling outages and tampered server frames. After every step:
//!
//! * nothing panicked and the simulation makes progress (no livelock at one instant);
//! * every node's `poll_timeout` is `None` or after now, once due timers have run;
//! * no node holds more live connections than `max_peers`, nor one to itself;
//! * every node's events tell a consistent story per peer: `Connected`, `Disconnected`,
//!   channel events and data only for a connection that exists (after `Connecting`, before
//!   `Failed`/`Closed`), and `ChannelClosed` only for a channel announced open;
//! * command results are the documented ones (`SelfConnect`, `TooManyPeers`, `UnknownPeer`).
//!
//! At the end both nodes close: no connection is left, every timer runs out, the server holds
//! no connection or session.
//!
//! This file is also the harness: `tests/sim/fuzz_replay.rs` (crate `peerlink-tests`, which
//! depends on `peerlink-sim`) includes it as a module to replay `fuzz/corpus/node_inputs/`
//! under `cargo test`; `cfg(test)` tells the two apart. The steps are decoded by hand rather
//! than with `arbitrary` (the tests crate does not depend on it), and [`encode_steps`] writes
//! them back, for seeds.

#![cfg_attr(not(test), no_main)]
#![allow(dead_code, reason = "the fuzz target and the replay test each use a part")]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::Duration;

use peerlink::identity::{Fingerprint, Identity};
use peerlink::peer::signal::{self, RejectReason, SdpKind, SessionId, Signal};
use peerlink::{ChannelOptions, NodeConfig, NodeError, NodeEvent, PeerState, Reliability, SendError};
use peerlink_sim::{NodeId, Sim};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use serde_json::value::RawValue;

#[path = "../bytes.rs"]
#[allow(clippy::duplicate_mod, reason = "a crate root of its own in the fuzz build; the replay test includes both targets")]
mod bytes;
use bytes::{Reader, Writer};

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = node_inputs(data);
});

/// Most steps taken from one input.
pub const MAX_STEPS: usize = 64;
/// Most virtual time all `Advance` steps of one input may add up to.
pub const MAX_ADVANCE: Duration = Duration::from_secs(180);
/// `max_peers` of both nodes (small, so calls to strangers reach it).
pub const MAX_PEERS: usize = 2;
/// Steps the simulation may take without its clock moving before it counts as a livelock.
const MAX_STEPS_PER_INSTANT: usize = 10_000;
/// The world's seed.
const SEED: u64 = 7;
/// Nodes in the world; the other identities are strangers (never connected to the server).
const NODES: usize = 2;
const STRANGERS: usize = 2;
/// SDPs and candidate lines seen on the signaling path, kept as templates.
const MAX_TEMPLATES: usize = 4;

/// A minimal data-channel offer, the SDP template before a real one has been seen.
const FALLBACK_SDP: &str = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
    a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\n\
    a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=setup:actpass\r\n\
    m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sctp-port:5000\r\n\
    a=max-message-size:262144\r\n";
const FALLBACK_CANDIDATE: &str = "candidate:1 1 udp 2130706431 10.0.0.2 5000 typ host";

// ---- steps ------------------------------------------------------------------------------

/// One input to the world. Node and peer indices are taken modulo the number of choices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Runs the world for `ms` milliseconds (within [`MAX_ADVANCE`] per input).
    Advance { ms: u16 },
    /// `connect_to_peer` from node `from` to node `to % 4` (2 and 3 are strangers).
    Connect { from: u8, to: u8 },
    /// A datagram delivered to node `to` from `source % 4`: the other node's address, a
    /// stranger, the other node's IP on another port, the node's own address.
    Datagram { to: u8, source: u8, framing: u8, body: Vec<u8> },
    /// Node `from` relays `payload` to the other node through the server.
    Relay { from: u8, payload: Payload },
    /// Node `from` sends `len * 2` bytes to the other node on channel `channel % 3`
    /// (`default`, `chat`, `nope`).
    Send { from: u8, channel: u8, binary: bool, len: u16 },
    /// Node `node` opens a channel to the other node (label `label % 5`, see [`LABELS`]).
    CreateChannel { node: u8, label: u8, ordered: bool, reliability: u8, param: u16 },
    /// `close_peer` from `node` to node `target % 3` (2 is a stranger).
    ClosePeer { node: u8, target: u8 },
    /// `restart_ice` from `node` to the other node.
    RestartIce { node: u8 },
    /// Partitions (`cut`) or heals the UDP path between the nodes.
    Partition { cut: bool },
    /// Cuts or restores a node's signaling connection.
    SignalingDown { node: u8, down: bool },
    /// The next server frame to `node` is dropped, or has `edits` applied.
    Tamper { node: u8, drop: bool, edits: Vec<Edit> },
}

/// A relay payload for [`Step::Relay`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A negotiation message built from the world's state (see [`SignalSpec`]).
    Signal(SignalSpec),
    /// A `{"peerlink": .., "t": .., "sid": ..}` object with some of the other fields.
    Object { version: u8, kind: u8, sid: u8, fields: u8, text: Vec<u8> },
    /// The bytes themselves, if they are UTF-8 JSON (else nothing is sent).
    Raw(Vec<u8>),
}

/// A negotiation message: `kind % 5` is offer, answer, candidate, bye, reject; `session % 3`
/// the sender's session with the recipient, the recipient's, or a made-up one; offers and
/// answers carry an SDP seen on the signaling path (`template`) with `sdp_edits`, signed by
/// the sender (`signer % 3 == 0`), a stranger (1) or nobody (2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalSpec {
    pub kind: u8,
    pub session: u8,
    pub template: u8,
    pub sdp_edits: Vec<Edit>,
    pub signer: u8,
    pub candidate_edits: Vec<Edit>,
    pub reason: u8,
}

/// A byte edit: `op % 3` overwrites, inserts or removes at `pos` (modulo the length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edit {
    pub pos: u16,
    pub op: u8,
    pub byte: u8,
}

/// Channel labels for [`Step::CreateChannel`]: valid, taken, empty, too long, valid.
pub const LABELS: [&str; 5] = ["chat", "default", "", "", "c2"];
const SEND_LABELS: [&str; 3] = ["default", "chat", "nope"];
const MAX_EDITS: usize = 16;
const MAX_DATAGRAM: usize = 1500;
const MAX_TEXT: usize = 2048;

impl Reader<'_> {
    fn edits(&mut self) -> Vec<Edit> {
        let n = usize::from(self.u8()) % (MAX_EDITS + 1);
        (0..n).map(|_| Edit { pos: self.u16(), op: self.u8(), byte: self.u8() }).collect()
    }
}

impl Writer {
    fn edits(&mut self, edits: &[Edit]) {
        self.u8(edits.len() as u8);
        for e in edits {
            self.u16(e.pos);
            self.u8(e.op);
            self.u8(e.byte);
        }
    }
}

impl Step {
    fn decode(r: &mut Reader<'_>) -> Step {
        match r.u8() % 11 {
            0 => Step::Advance { ms: r.u16() },
            1 => Step::Connect { from: r.u8(), to: r.u8() },
            2 => Step::Datagram { to: r.u8(), source: r.u8(), framing: r.u8(), body: r.blob(MAX_DATAGRAM) },
            3 => Step::Relay { from: r.u8(), payload: Payload::decode(r) },
            4 => Step::Send { from: r.u8(), channel: r.u8(), binary: r.bool(), len: r.u16() },
            5 => Step::CreateChannel { node: r.u8(), label: r.u8(), ordered: r.bool(), reliability: r.u8(), param: r.u16() },
            6 => Step::ClosePeer { node: r.u8(), target: r.u8() },
            7 => Step::RestartIce { node: r.u8() },
            8 => Step::Partition { cut: r.bool() },
            9 => Step::SignalingDown { node: r.u8(), down: r.bool() },
            _ => Step::Tamper { node: r.u8(), drop: r.bool(), edits: r.edits() },
        }
    }

    fn encode(&self, w: &mut Writer) {
        match self {
            Step::Advance { ms } => {
                w.u8(0);
                w.u16(*ms);
            }
            Step::Connect { from, to } => {
                w.u8(1);
                w.u8(*from);
                w.u8(*to);
            }
            Step::Datagram { to, source, framing, body } => {
                w.u8(2);
                w.u8(*to);
                w.u8(*source);
                w.u8(*framing);
                w.blob(body);
            }
            Step::Relay { from, payload } => {
                w.u8(3);
                w.u8(*from);
                payload.encode(w);
            }
            Step::Send { from, channel, binary, len } => {
                w.u8(4);
                w.u8(*from);
                w.u8(*channel);
                w.u8(u8::from(*binary));
                w.u16(*len);
            }
            Step::CreateChannel { node, label, ordered, reliability, param } => {
                w.u8(5);
                w.u8(*node);
                w.u8(*label);
                w.u8(u8::from(*ordered));
                w.u8(*reliability);
                w.u16(*param);
            }
            Step::ClosePeer { node, target } => {
                w.u8(6);
                w.u8(*node);
                w.u8(*target);
            }
            Step::RestartIce { node } => {
                w.u8(7);
                w.u8(*node);
            }
            Step::Partition { cut } => {
                w.u8(8);
                w.u8(u8::from(*cut));
            }
            Step::SignalingDown { node, down } => {
                w.u8(9);
                w.u8(*node);
                w.u8(u8::from(*down));
            }
            Step::Tamper { node, drop, edits } => {
                w.u8(10);
                w.u8(*node);
                w.u8(u8::from(*drop));
                w.edits(edits);
            }
        }
    }
}

impl Payload {
    fn decode(r: &mut Reader<'_>) -> Payload {
        match r.u8() % 3 {
            0 => Payload::Signal(SignalSpec {
                kind: r.u8(),
                session: r.u8(),
                template: r.u8(),
                sdp_edits: r.edits(),
                signer: r.u8(),
                candidate_edits: r.edits(),
                reason: r.u8(),
            }),
            1 => Payload::Object { version: r.u8(), kind: r.u8(), sid: r.u8(), fields: r.u8(), text: r.blob(MAX_TEXT) },
            _ => Payload::Raw(r.blob(MAX_TEXT)),
        }
    }

    fn encode(&self, w: &mut Writer) {
        match self {
            Payload::Signal(s) => {
                w.u8(0);
                w.u8(s.kind);
                w.u8(s.session);
                w.u8(s.template);
                w.edits(&s.sdp_edits);
                w.u8(s.signer);
                w.edits(&s.candidate_edits);
                w.u8(s.reason);
            }
            Payload::Object { version, kind, sid, fields, text } => {
                w.u8(1);
                w.u8(*version);
                w.u8(*kind);
                w.u8(*sid);
                w.u8(*fields);
                w.blob(text);
            }
            Payload::Raw(bytes) => {
                w.u8(2);
                w.blob(bytes);
            }
        }
    }
}

/// Decodes up to [`MAX_STEPS`] steps from `data`.
pub fn decode_steps(data: &[u8]) -> Vec<Step> {
    let mut r = Reader(data);
    let mut steps = Vec::new();
    while steps.len() < MAX_STEPS && !r.is_empty() {
        steps.push(Step::decode(&mut r));
    }
    steps
}

/// Encodes steps as [`decode_steps`] reads them (for hand-written seeds).
pub fn encode_steps(steps: &[Step]) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    for step in steps {
        step.encode(&mut w);
    }
    w.0
}

fn apply_edits(text: &str, edits: &[Edit]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for e in edits.iter().take(MAX_EDITS) {
        let pos = usize::from(e.pos) % (bytes.len() + 1);
        match e.op % 3 {
            0 if pos < bytes.len() => bytes[pos] = e.byte,
            1 => bytes.insert(pos, e.byte),
            _ if pos < bytes.len() => {
                bytes.remove(pos);
            }
            _ => bytes.push(e.byte),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Wraps `body` in a datagram framing: raw, STUN (valid header, cookie and length), a DTLS
/// record (valid header and length) or an RTP-looking packet.
fn frame(framing: u8, body: &[u8]) -> Vec<u8> {
    let at = |i: usize| body.get(i).copied().unwrap_or(0);
    match framing % 4 {
        0 => body.to_vec(),
        1 => {
            let rest = body.get(14..).unwrap_or_default();
            let padded = (rest.len() + 3) & !3;
            let mut out = vec![at(0) & 0x03, at(1)];
            out.extend_from_slice(&(padded as u16).to_be_bytes());
            out.extend_from_slice(&peerlink::stun::MAGIC_COOKIE.to_be_bytes());
            out.extend((2..14).map(at));
            out.extend_from_slice(rest);
            out.resize(20 + padded, 0);
            out
        }
        2 => {
            let rest = body.get(8..).unwrap_or_default();
            let mut out = vec![20 + at(0) % 4, 0xfe, 0xfd, 0, at(1)];
            out.extend((2..8).map(at));
            out.extend_from_slice(&(rest.len() as u16).to_be_bytes());
            out.extend_from_slice(rest);
            out
        }
        _ => {
            let mut out = vec![0x80 | (at(0) & 0x3f)];
            out.extend_from_slice(body.get(1..).unwrap_or_default());
            out
        }
    }
}

// ---- the world --------------------------------------------------------------------------

struct Fixtures {
    /// The nodes' identities, then the strangers'.
    identities: Vec<Identity>,
    /// Their fingerprints.
    fingerprints: Vec<Fingerprint>,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let identities: Vec<Identity> = (0..(NODES + STRANGERS) as u64)
            .map(|i| Identity::generate(&mut ChaCha20Rng::seed_from_u64(2000 + i)))
            .collect();
        let fingerprints = identities.iter().map(Identity::fingerprint).collect();
        Fixtures { identities, fingerprints }
    })
}

/// What the signaling filter shares with the harness.
#[derive(Default)]
struct Shared {
    /// SDPs of offers and answers seen on the signaling path (newest last).
    sdps: Vec<String>,
    /// Candidate lines seen on the signaling path (newest last).
    candidates: Vec<String>,
    /// Per node: what to do to the next server frame (drop it: `None` edits).
    tamper: [Option<Option<Vec<Edit>>>; NODES],
}

impl Shared {
    /// Keeps the SDPs and candidates of negotiation messages as templates.
    fn observe(&mut self, text: &str) {
        if !text.contains(signal::SIGNAL_VERSION) {
            return;
        }
        let Ok(frame) = serde_json::from_str::<serde_json::Value>(text) else { return };
        let payload = &frame["payload"];
        let (list, value) = match (payload["sdp"].as_str(), payload["candidate"].as_str()) {
            (Some(sdp), _) => (&mut self.sdps, sdp),
            (None, Some(c)) => (&mut self.candidates, c),
            _ => return,
        };
        if !list.iter().any(|s| s == value) {
            if list.len() == MAX_TEMPLATES {
                list.remove(0);
            }
            list.push(value.to_owned());
        }
    }

    fn filter(&mut self, node: NodeId, text: &str) -> Option<String> {
        self.observe(text);
        match self.tamper.get_mut(node.0).and_then(Option::take) {
            None => Some(text.to_owned()),
            Some(None) => None,
            Some(Some(edits)) => Some(apply_edits(text, &edits)),
        }
    }
}

/// The event-stream state of one node's connection to one peer.
#[derive(Debug, Default)]
struct Track {
    /// A connection exists (`Connecting` seen, no `Failed`/`Closed` since).
    alive: bool,
    /// Channels announced open and not closed since.
    open: Vec<String>,
}

/// What one [`node_inputs`] run reached, so tests can check that seeds get somewhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// Steps run.
    pub steps: usize,
    /// `PeerState::Connected` events.
    pub connected: usize,
    /// `Incoming` events.
    pub incoming: usize,
    /// `ChannelOpen` events.
    pub channels_opened: usize,
    /// `Data` events.
    pub data: usize,
    /// `BadSignal` events.
    pub bad_signals: usize,
    /// `PeerError` events.
    pub peer_errors: usize,
    /// `PeerState::Disconnected` events.
    pub disconnected: usize,
    /// Most live connections one node held.
    pub max_live_peers: usize,
    /// Command results that were refusals (`TooManyPeers`, `UnknownPeer`, ...).
    pub refused: usize,
}

fn terminal(state: PeerState) -> bool {
    matches!(state, PeerState::Failed | PeerState::Closed)
}

fn parse_session(hex: &str) -> Option<SessionId> {
    let mut b = [0u8; 16];
    for (i, out) in b.iter_mut().enumerate() {
        *out = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(SessionId(b))
}

/// The harness around one world.
struct World {
    sim: Sim,
    nodes: [NodeId; NODES],
    shared: Rc<RefCell<Shared>>,
    /// Virtual time added by `Advance` steps so far.
    advanced: Duration,
    /// Per node: events checked so far, and the per-peer story.
    seen: [usize; NODES],
    tracks: [BTreeMap<Fingerprint, Track>; NODES],
    /// Signs forged negotiation messages.
    rng: ChaCha20Rng,
    summary: Summary,
}

impl World {
    fn new() -> Self {
        let f = fixtures();
        let mut sim = Sim::new(SEED);
        let nodes = [0, 1].map(|i| {
            let mut config = NodeConfig::new("sim://server");
            config.max_peers = MAX_PEERS;
            sim.add_node_with_identity(format!("n{i}"), config, f.identities[i].clone())
        });
        let shared = Rc::new(RefCell::new(Shared::default()));
        let filter = Rc::clone(&shared);
        sim.set_signaling_filter(move |node, text| filter.borrow_mut().filter(node, text));
        let mut world = World {
            sim,
            nodes,
            shared,
            advanced: Duration::ZERO,
            seen: [0; NODES],
            tracks: Default::default(),
            rng: ChaCha20Rng::seed_from_u64(SEED),
            summary: Summary::default(),
        };
        // Both register before the first step.
        world.run(Duration::from_millis(200));
        world.check();
        world
    }

    fn fp(&self, i: usize) -> Fingerprint {
        fixtures().fingerprints[i]
    }

    /// Node `n % 2` and the other one.
    fn pair(n: u8) -> (usize, usize) {
        let i = usize::from(n) % NODES;
        (i, 1 - i)
    }

    fn live_peers(&self, i: usize) -> usize {
        let node = self.sim.node(self.nodes[i]);
        node.peers().filter(|fp| node.get_peer(fp).is_some_and(|p| !terminal(p.state))).count()
    }

    /// Runs the simulation for `d` (all timers due by then included), refusing livelocks.
    fn run(&mut self, d: Duration) {
        let limit = self.sim.now() + d;
        let mut at = self.sim.now();
        let mut same = 0;
        while self.sim.step(limit) {
            if self.sim.now() == at {
                same += 1;
                assert!(same < MAX_STEPS_PER_INSTANT, "livelock: the simulation keeps stepping at {:?}", self.sim.elapsed());
            } else {
                at = self.sim.now();
                same = 0;
            }
        }
    }

    fn step(&mut self, step: &Step) {
        self.summary.steps += 1;
        match step {
            Step::Advance { ms } => {
                let d = Duration::from_millis(u64::from(*ms)).min(MAX_ADVANCE - self.advanced);
                self.advanced += d;
                self.run(d);
            }
            Step::Connect { from, to } => self.connect(*from, *to),
            Step::Datagram { to, source, framing, body } => {
                let (i, j) = World::pair(*to);
                let other = self.sim.addr(self.nodes[j]);
                let source = match source % 4 {
                    0 => other,
                    1 => SocketAddr::from(([10, 9, 9, 9], 9)),
                    2 => SocketAddr::new(other.ip(), other.port().wrapping_add(1)),
                    _ => self.sim.addr(self.nodes[i]),
                };
                self.sim.inject_datagram(self.nodes[i], source, &frame(*framing, body));
            }
            Step::Relay { from, payload } => {
                let (i, j) = World::pair(*from);
                let to = self.fp(j);
                if let Some(payload) = self.payload(i, j, payload) {
                    // Refusals (not registered, outbox full) are the client's business.
                    let _ = self.sim.with_node(self.nodes[i], |node, _| node.client_mut().relay(to, &*payload));
                }
            }
            Step::Send { from, channel, binary, len } => {
                let (i, j) = World::pair(*from);
                let to = self.fp(j);
                let label = SEND_LABELS[usize::from(*channel) % SEND_LABELS.len()];
                let known = self.sim.node(self.nodes[i]).get_peer(&to).is_some();
                let data: Vec<u8> = (0..usize::from(*len) * 2).map(|k| b'a' + (k % 26) as u8).collect();
                let result = self.sim.with_node(self.nodes[i], |node, now| {
                    if *binary {
                        node.send_binary(now, to, Some(label), &data)
                    } else {
                        node.send_text(now, to, Some(label), std::str::from_utf8(&data).expect("ASCII"))
                    }
                });
                match result {
                    Ok(()) => assert!(known, "a send to an unknown peer was accepted"),
                    Err(NodeError::Send(SendError::UnknownPeer(fp))) => {
                        assert!(!known && fp == to, "UnknownPeer({fp}) for a known peer");
                        self.summary.refused += 1;
                    }
                    Err(NodeError::Send(_)) => self.summary.refused += 1,
                    Err(e) => panic!("send: unexpected {e:?}"),
                }
            }
            Step::CreateChannel { node, label, ordered, reliability, param } => {
                let (i, j) = World::pair(*node);
                let to = self.fp(j);
                let label = match usize::from(*label) % LABELS.len() {
                    3 => "l".repeat(peerlink::peer::MAX_LABEL_LEN + 1),
                    k => LABELS[k].to_owned(),
                };
                let mut options = ChannelOptions::new(label).reliability(match reliability % 3 {
                    0 => Reliability::Reliable,
                    1 => Reliability::MaxRetransmits(*param),
                    _ => Reliability::MaxLifetime(Duration::from_millis(u64::from(*param))),
                });
                if !ordered {
                    options = options.unordered();
                }
                let known = self.sim.node(self.nodes[i]).get_peer(&to).is_some();
                match self.sim.with_node(self.nodes[i], |n, now| n.create_data_channel(now, to, options)) {
                    Ok(()) => assert!(known, "a channel to an unknown peer was created"),
                    Err(NodeError::Channel(_)) => self.summary.refused += 1,
                    Err(e) => panic!("create_data_channel: unexpected {e:?}"),
                }
            }
            Step::ClosePeer { node, target } => {
                let (i, _) = World::pair(*node);
                let to = self.fp(match target % 3 {
                    2 => NODES,
                    _ => usize::from(*target) % NODES,
                });
                let result = self.sim.with_node(self.nodes[i], |n, now| n.close_peer(now, to));
                assert_eq!(result, Ok(()), "close_peer");
            }
            Step::RestartIce { node } => {
                let (i, j) = World::pair(*node);
                let to = self.fp(j);
                let known = self.sim.node(self.nodes[i]).get_peer(&to).is_some();
                let result = self.sim.with_node(self.nodes[i], |n, now| n.restart_ice(now, to));
                let expected = if known { Ok(()) } else { Err(NodeError::Send(SendError::UnknownPeer(to))) };
                assert_eq!(result, expected, "restart_ice");
            }
            Step::Partition { cut } => {
                let [a, b] = self.nodes;
                if *cut {
                    self.sim.partition(a, b);
                } else {
                    self.sim.heal(a, b);
                }
            }
            Step::SignalingDown { node, down } => {
                let (i, _) = World::pair(*node);
                self.sim.set_signaling_down(self.nodes[i], *down);
            }
            Step::Tamper { node, drop, edits } => {
                let (i, _) = World::pair(*node);
                self.shared.borrow_mut().tamper[i] = Some((!drop).then(|| edits.clone()));
            }
        }
        // Whatever is due now runs before the checks.
        self.run(Duration::ZERO);
        self.check();
    }

    fn connect(&mut self, from: u8, to: u8) {
        let (i, _) = World::pair(from);
        let target = usize::from(to) % (NODES + STRANGERS);
        let fp = self.fp(target);
        let node = self.sim.node(self.nodes[i]);
        let has_live = node.get_peer(&fp).is_some_and(|p| !terminal(p.state));
        let live = self.live_peers(i);
        let result = self.sim.with_node(self.nodes[i], |n, now| n.connect_to_peer(now, fp));
        let expected = if target == i {
            Err(NodeError::SelfConnect)
        } else if !has_live && live >= MAX_PEERS {
            Err(NodeError::TooManyPeers(MAX_PEERS))
        } else {
            Ok(())
        };
        if result.is_err() {
            self.summary.refused += 1;
        }
        assert_eq!(result, expected, "connect_to_peer from n{i} to #{target} with {live} live peers");
    }

    /// Builds a relay payload from node `i` to node `j`; `None` when the raw bytes are not JSON.
    fn payload(&mut self, i: usize, j: usize, payload: &Payload) -> Option<Box<RawValue>> {
        let text = match payload {
            Payload::Signal(spec) => self.signal(i, j, spec).encode(),
            Payload::Object { version, kind, sid, fields, text } => {
                let text = String::from_utf8_lossy(text);
                let mut object = serde_json::Map::new();
                let version = match version % 4 {
                    0 => signal::SIGNAL_VERSION.into(),
                    1 => "rtc/2".into(),
                    2 => serde_json::Value::from(*version),
                    _ => serde_json::Value::Null,
                };
                object.insert("peerlink".into(), version);
                let kinds = ["offer", "answer", "candidate", "bye", "reject", "warp"];
                object.insert("t".into(), kinds[usize::from(*kind) % kinds.len()].into());
                let sid = match sid % 3 {
                    0 => self.session(i, j, 0).to_string(),
                    1 => format!("{sid:02x}").repeat(16),
                    _ => text.chars().take(40).collect(),
                };
                object.insert("sid".into(), sid.into());
                for (bit, name) in ["sdp", "key", "sig", "candidate", "reason"].into_iter().enumerate() {
                    if fields & (1 << bit) != 0 {
                        object.insert(name.into(), text.clone().into());
                    }
                }
                serde_json::Value::Object(object).to_string()
            }
            Payload::Raw(bytes) => String::from_utf8(bytes.clone()).ok()?,
        };
        RawValue::from_string(text).ok()
    }

    /// The session `i` has with `j` (`which == 0`), `j` with `i` (1), or a made-up one.
    fn session(&self, i: usize, j: usize, which: u8) -> SessionId {
        let (a, b) = match which % 3 {
            0 => (i, j),
            1 => (j, i),
            _ => return SessionId([which; 16]),
        };
        self.sim
            .node(self.nodes[a])
            .get_peer(&self.fp(b))
            .and_then(|p| parse_session(&p.session))
            .unwrap_or(SessionId([0x5a; 16]))
    }

    fn signal(&mut self, i: usize, j: usize, spec: &SignalSpec) -> Signal {
        let session = self.session(i, j, spec.session);
        let shared = self.shared.borrow();
        match spec.kind % 5 {
            kind @ (0 | 1) => {
                let template = match shared.sdps.len() {
                    0 => FALLBACK_SDP,
                    n => &shared.sdps[usize::from(spec.template) % n],
                };
                let sdp = apply_edits(template, &spec.sdp_edits);
                let kind = if kind == 0 { SdpKind::Offer } else { SdpKind::Answer };
                let dtls = signal::sdp_fingerprint(&sdp).unwrap_or_default();
                let ids = &fixtures().identities;
                let recipient = self.fp(j);
                let (key, sig) = match spec.signer % 3 {
                    0 => signal::sign_dtls(&ids[i], &mut self.rng, kind, session, &recipient, &dtls),
                    1 => signal::sign_dtls(&ids[NODES], &mut self.rng, kind, session, &recipient, &dtls),
                    _ => ("AAAA".into(), "AAAA".into()),
                };
                match kind {
                    SdpKind::Offer => Signal::Offer { session, sdp, key, sig },
                    SdpKind::Answer => Signal::Answer { session, sdp, key, sig },
                }
            }
            2 => {
                let template = match shared.candidates.len() {
                    0 => FALLBACK_CANDIDATE,
                    n => &shared.candidates[usize::from(spec.template) % n],
                };
                Signal::Candidate { session, candidate: apply_edits(template, &spec.candidate_edits) }
            }
            3 => Signal::Bye { session },
            _ => {
                let reasons = [RejectReason::IdentityMismatch, RejectReason::BadDescription, RejectReason::Refused, RejectReason::Busy];
                Signal::Reject { session, reason: reasons[usize::from(spec.reason) % reasons.len()] }
            }
        }
    }

    /// The invariants that hold after every step.
    fn check(&mut self) {
        let now = self.sim.now();
        for i in 0..NODES {
            let node = self.sim.node(self.nodes[i]);
            if let Some(at) = node.poll_timeout() {
                assert!(at > now, "n{i}: poll_timeout {:?} is not after now {:?}", at - now, self.sim.elapsed());
            }
            let me = self.fp(i);
            let mut live = 0;
            for fp in node.peers() {
                assert_ne!(fp, me, "n{i} has a connection to itself");
                let view = node.get_peer(&fp).expect("a listed peer has a view");
                assert_eq!(view.fingerprint, fp);
                assert!(parse_session(&view.session).is_some(), "session {:?}", view.session);
                if !terminal(view.state) {
                    live += 1;
                }
            }
            assert!(live <= MAX_PEERS, "n{i} has {live} live connections, more than max_peers {MAX_PEERS}");
            self.summary.max_live_peers = self.summary.max_live_peers.max(live);
            self.check_events(i);
        }
    }

    /// Follows node `i`'s new events, per peer.
    fn check_events(&mut self, i: usize) {
        let events = self.sim.events(self.nodes[i]);
        let tracks = &mut self.tracks[i];
        let s = &mut self.summary;
        for (at, event) in &events[self.seen[i]..] {
            match event {
                NodeEvent::PeerState { peer, state } => {
                    let t = tracks.entry(*peer).or_default();
                    match state {
                        PeerState::Connecting => *t = Track { alive: true, open: Vec::new() },
                        PeerState::Failed | PeerState::Closed => *t = Track::default(),
                        PeerState::Connected | PeerState::Disconnected => {
                            assert!(t.alive, "n{i} at {at:?}: {state:?} for {} with no connection", peer.short());
                            if *state == PeerState::Connected {
                                s.connected += 1;
                            } else {
                                s.disconnected += 1;
                            }
                        }
                    }
                }
                NodeEvent::ChannelOpen { peer, channel } => {
                    let t = tracks.entry(*peer).or_default();
                    assert!(t.alive, "n{i} at {at:?}: channel `{channel}` opened with no connection");
                    t.open.push(channel.clone());
                    s.channels_opened += 1;
                }
                NodeEvent::ChannelClosed { peer, channel } => {
                    let t = tracks.entry(*peer).or_default();
                    let pos = t.open.iter().position(|c| c == channel);
                    let pos = pos.unwrap_or_else(|| panic!("n{i} at {at:?}: channel `{channel}` closed but not open ({:?})", t.open));
                    t.open.remove(pos);
                }
                NodeEvent::Data { peer, channel, .. } => {
                    assert!(tracks.entry(*peer).or_default().alive, "n{i} at {at:?}: data on `{channel}` with no connection");
                    s.data += 1;
                }
                NodeEvent::BufferedAmountLow { peer, channel } => {
                    assert!(tracks.entry(*peer).or_default().alive, "n{i} at {at:?}: buffered-amount-low on `{channel}` with no connection");
                }
                NodeEvent::Incoming { .. } => s.incoming += 1,
                NodeEvent::BadSignal { .. } => s.bad_signals += 1,
                NodeEvent::PeerError { .. } => s.peer_errors += 1,
                _ => {}
            }
        }
        self.seen[i] = events.len();
    }

    /// Closes both nodes and runs every timer out: nothing may be left.
    fn teardown(&mut self) {
        for i in 0..NODES {
            let result = self.sim.with_node(self.nodes[i], |n, now| n.close(now));
            assert_eq!(result, Ok(()), "close");
            assert_eq!(self.sim.node(self.nodes[i]).peers().count(), 0, "n{i} has connections after close");
        }
        self.run(Duration::from_secs(3600));
        self.check();
        for i in 0..NODES {
            let node = self.sim.node(self.nodes[i]);
            assert_eq!(node.peers().count(), 0, "n{i} has connections after close");
            assert_eq!(node.poll_timeout(), None, "n{i} still has timers after close");
        }
        let s = self.sim.server().stats();
        assert_eq!((s.connections, s.active_sessions, s.parked_sessions), (0, 0, 0), "server after both closed: {s:?}");
    }
}

/// Runs the steps decoded from `data` in a fresh world, checking invariants throughout.
pub fn node_inputs(data: &[u8]) -> Summary {
    let steps = decode_steps(data);
    let mut world = World::new();
    for step in &steps {
        world.step(step);
    }
    world.teardown();
    world.summary
}
