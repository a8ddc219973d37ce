//! Fuzz harness shared by the cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`) and the corpus
//! replay test (`core/tests/fuzz_corpus.rs`), both through `#[path = ".../harness.rs"] mod harness;`.
//!
//! * [`decode_frames`]: arbitrary bytes through both decoders; whatever decodes must re-encode,
//!   decode again and re-encode to the same text.
//! * [`server_core`]: an `arbitrary` sequence of [`Step`]s driving one [`Server`] on a virtual
//!   clock with small limits, checking invariants after every step and a clean teardown.
//! * [`stun_decode`]: arbitrary bytes through the STUN codec; it never panics, agrees with its
//!   own demultiplexing, and whatever decodes as a Binding request or success re-encodes to
//!   the same message.
//! * [`peer_signal`]: arbitrary text as a relay payload through the peer negotiation codec
//!   (whatever decodes must re-encode to an equal `Signal`) and as an SDP through
//!   `sdp_fingerprint`.
//!
//! * [`room_batch`]: the `room/1` codec: arbitrary text as a batch body (whatever decodes is
//!   valid, fits its `encoded_len` and round-trips strictly) and as a relay payload (nothing
//!   is accepted that is not signed by its sender for its recipient), `arbitrary` items through
//!   an encode/decode round trip, and payloads signed here with mutations that must be refused.
//! * [`sync`]: arbitrary bytes as a sync message: through the `sync/1` decoder (whatever
//!   decodes round-trips through the encoders), into a last-writer-wins and an operational
//!   `StateSync` and into a `CrdtSync` (refused input changes nothing; nothing panics).
//! * [`e2e`]: arbitrary bytes as a key-exchange message to a `GroupKeyManager` idle, offered
//!   and answered (a refusal changes nothing; no session from anything but the genuine
//!   message), or as a program of deliveries of sealed messages, edited or not, to a derived
//!   `E2e` session (only genuine messages open, once, as a model of the replay window and
//!   epochs says; a refusal changes nothing).
//! * [`turn_decode`]: arbitrary bytes through the TURN codec and into an allocated
//!   `TurnClient` as a datagram from its server.
//!
//! The `node_inputs` target (real `Node`s on `peerlink-sim`) keeps its harness in its own file,
//! `fuzz_targets/node_inputs.rs`: it needs `peerlink-sim`, which `peerlink`'s tests cannot
//! depend on, so its corpus is replayed by the `peerlink-tests` crate instead. So does the
//! `xfer` target (the `xfer/1` transfers against a reference model), replayed there too; both
//! decode their steps by hand (`bytes.rs`), as that crate does not depend on `arbitrary`.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use peerlink::e2e::{E2e, E2eError, GroupKeyManager, KeyExchangeEvent, Limits};
use peerlink::identity::{Fingerprint, Identity};
use peerlink::peer::signal::{self, Signal};
use peerlink::protocol::{self, ClientMessage, PROTOCOL_VERSION, ServerMessage};
use peerlink::room::RoomData;
use peerlink::room::wire::{self, Item, WireError};
use peerlink::server::{ConnId, RateLimit, Server, ServerConfig, ServerTransmit};
use peerlink::stun::{self, StunError, StunMessage};
use peerlink::sync::state::MAX_KEY_LEN;
use peerlink::sync::wire as sync_wire;
use peerlink::sync::{CrdtConfig, CrdtEvent, CrdtSync, StateConfig, StateEvent, StateSync};
use peerlink::yrs::updates::decoder::Decode;
use peerlink::yrs::updates::encoder::Encode;
use peerlink::yrs::{Array, Map, ReadTxn, Text, Transact};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use serde_json::value::RawValue;

// ---- decode_frames ----------------------------------------------------------------------

/// Decodes `data` (if UTF-8) as a client and as a server frame; every success must round-trip.
pub fn decode_frames(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    check_client_roundtrip(text);
    check_server_roundtrip(text);
}

fn check_client_roundtrip(text: &str) {
    let Ok(msg) = protocol::decode_client(text) else { return };
    let encoded = msg.encode();
    let back = protocol::decode_client(&encoded)
        .unwrap_or_else(|e| panic!("client frame {text:?} re-encoded as {encoded:?} does not decode: {e}"));
    assert_eq!(back.id(), msg.id(), "request id changed through {encoded:?}");
    assert_eq!(back.encode(), encoded, "client frame {text:?} does not re-encode identically");
}

fn check_server_roundtrip(text: &str) {
    let Ok(msg) = protocol::decode_server(text) else { return };
    let encoded = msg.encode();
    let back = protocol::decode_server(&encoded)
        .unwrap_or_else(|e| panic!("server frame {text:?} re-encoded as {encoded:?} does not decode: {e}"));
    // Exact, floats included: serde_json's `float_roundtrip` makes `meta`/`metadata` floats
    // (decoded through `Value`) survive a round trip bit for bit.
    assert_eq!(back.encode(), encoded, "server frame {text:?} does not re-encode identically");
}

// ---- server_core ------------------------------------------------------------------------

/// Most steps taken from one input.
pub const MAX_STEPS: usize = 256;
/// Connection ids used: `ConnId(conn % CONNS)`.
const CONNS: u8 = 8;
/// Seeded identities that can register validly.
const IDENTITIES: usize = 4;

const NAMESPACES: [&str; 3] = ["lobby", "game", "n\u{e9}"];
const ROOMS: [&str; 3] = ["r1", "r2", "room \"3\""];

/// One input to the server.
#[derive(Debug, Arbitrary)]
pub enum Step {
    /// `handle_connect`.
    Connect(u8),
    /// `handle_message` with a frame from the dictionary (possibly mutated) or arbitrary text.
    Message(u8, Frame),
    /// A `register` frame for one of the seeded identities, signed over the nonce the server
    /// sent to that connection (`variant` selects a few deliberately wrong ones).
    Register { conn: u8, identity: u8, variant: u8 },
    /// `handle_binary`.
    Binary(u8),
    /// `handle_sent` of `n * 16` bytes.
    Sent(u8, u16),
    /// `handle_disconnect`.
    Disconnect(u8),
    /// Moves the clock forward `ms` milliseconds.
    Advance(u16),
}

/// A text frame for [`Step::Message`].
#[derive(Debug, Arbitrary)]
pub enum Frame {
    Template(Template),
    Mutated(Template, Vec<Edit>),
    Raw(String),
}

/// A valid-ish frame from the dictionary; the fields pick its kind and its values.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct Template {
    kind: u8,
    ns: u8,
    room: u8,
    peer: u8,
    id: u8,
    n: u8,
}

/// A byte edit applied to a template's text.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct Edit {
    pos: u16,
    op: u8,
    byte: u8,
}

struct Fixtures {
    identities: Vec<Identity>,
}

fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| Fixtures {
        identities: (0..IDENTITIES as u64)
            .map(|seed| Identity::generate(&mut ChaCha20Rng::seed_from_u64(1000 + seed)))
            .collect(),
    })
}

/// The small server configuration every run uses: low limits, short timeouts, resume on.
pub fn fuzz_config() -> ServerConfig {
    let mut c = ServerConfig::default();
    c.max_frame_size = 2048;
    c.max_connections = 6;
    c.max_namespaces_per_client = 2;
    c.max_rooms_per_client = 2;
    c.max_rooms = 3;
    c.rate_limit = RateLimit { per_second: 20, burst: 8 };
    c.flood_close_after = 4;
    c.idle_timeout = Duration::from_secs(20);
    c.register_timeout = Duration::from_secs(4);
    c.max_register_failures = 2;
    c.outbound_queue_bytes = 4096;
    c.resume_grace = Duration::from_secs(6);
    c.resume_queue_frames = 4;
    c.resume_queue_bytes = 1024;
    c.room_ttl = Duration::from_secs(5);
    c.default_room_size = 3;
    c.max_room_size = 4;
    c.match_timeout = Duration::from_secs(7);
    c.max_peer_list = 2;
    c.max_discover = 2;
    c
}

impl Template {
    fn render(&self) -> String {
        let f = fixtures();
        let ns = NAMESPACES[self.ns as usize % NAMESPACES.len()];
        let ns = serde_str(ns);
        let room = serde_str(ROOMS[self.room as usize % ROOMS.len()]);
        let peer = match self.peer as usize % (IDENTITIES + 1) {
            i if i < IDENTITIES => f.identities[i].fingerprint().to_string(),
            _ => "00".repeat(32),
        };
        let id = self.id;
        let n = self.n;
        match self.kind % 20 {
            0 => format!(r#"{{"type":"join","id":{id},"namespace":{ns},"app_type":"game","app_version":"{n}"}}"#),
            1 => format!(r#"{{"type":"leave","id":{id},"namespace":{ns}}}"#),
            2 => format!(r#"{{"type":"discover","id":{id},"namespace":{ns},"limit":{n}}}"#),
            3 => format!(r#"{{"type":"match","id":{id},"namespace":{ns},"group_size":{},"criteria":{{"k":{}}}}}"#, 2 + n % 3, n % 2),
            4 => format!(r#"{{"type":"match","id":{id},"namespace":{ns},"group_size":2}}"#),
            5 => format!(r#"{{"type":"cancel_match","id":{id},"namespace":{ns}}}"#),
            6 => format!(r#"{{"type":"relay","id":{id},"to":"{peer}","payload":{{"x":{n}}}}}"#),
            7 => format!(r#"{{"type":"relay","to":"{peer}","payload":"{}"}}"#, "p".repeat(n as usize * 8)),
            8 => format!(r#"{{"type":"broadcast","id":{id},"namespace":{ns},"payload":[{n}]}}"#),
            9 => format!(r#"{{"type":"broadcast","namespace":{ns},"payload":"{}"}}"#, "b".repeat(n as usize * 8)),
            10 => format!(r#"{{"type":"create_room","id":{id},"room_id":{room},"config":{{"max_size":{},"metadata":{{"m":{n}}}}}}}"#, n % 6),
            11 => format!(r#"{{"type":"create_room","id":{id},"room_id":{room}}}"#),
            12 => format!(r#"{{"type":"join_room","id":{id},"room_id":{room}}}"#),
            13 => format!(r#"{{"type":"leave_room","id":{id},"room_id":{room}}}"#),
            14 => format!(r#"{{"type":"room_info","id":{id},"room_id":{room}}}"#),
            15 => format!(r#"{{"type":"kick","id":{id},"room_id":{room},"fingerprint":"{peer}"}}"#),
            16 => format!(r#"{{"type":"close_room","id":{id},"room_id":{room}}}"#),
            17 => format!(r#"{{"type":"ping","id":{id}}}"#),
            18 => r#"{"type":"bye"}"#.to_owned(),
            _ => format!(r#"{{"type":"register","id":{id},"version":1,"public_key":"AAAA","signature":"AAAA","alias":"x"}}"#),
        }
    }
}

fn serde_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Frame {
    fn render(&self) -> String {
        match self {
            Frame::Template(t) => t.render(),
            Frame::Mutated(t, edits) => {
                let mut bytes = t.render().into_bytes();
                for e in edits.iter().take(16) {
                    let pos = if bytes.is_empty() { 0 } else { e.pos as usize % (bytes.len() + 1) };
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
            Frame::Raw(s) => s.clone(),
        }
    }
}

/// The harness around one server: a virtual clock and a mirror of what it must hold.
struct Driver {
    server: Server,
    base: Instant,
    now: Instant,
    rng: ChaCha20Rng,
    /// Connections the server holds, as the adapter sees them.
    open: HashSet<ConnId>,
    /// The challenge nonce each open connection got.
    nonces: HashMap<ConnId, String>,
    /// Bytes sent to each open connection and not yet reported flushed.
    unacked: HashMap<ConnId, usize>,
    steps: usize,
    next_req: u64,
    summary: Summary,
}

/// What one [`server_core`] run reached, so tests can check that seeds get past registration.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    /// `registered` replies seen.
    pub registered: usize,
    /// Most sessions held at once.
    pub max_sessions: usize,
    /// Most namespaces held at once.
    pub max_namespaces: usize,
    /// Most rooms held at once.
    pub max_rooms: usize,
    /// `matched` frames seen.
    pub matched: usize,
}

impl Driver {
    fn new() -> Self {
        let base = Instant::now();
        Driver {
            server: Server::new(fuzz_config(), 7, base, 1_700_000_000_000),
            base,
            now: base,
            rng: ChaCha20Rng::seed_from_u64(99),
            open: HashSet::new(),
            nonces: HashMap::new(),
            unacked: HashMap::new(),
            steps: 0,
            next_req: 1_000,
            summary: Summary::default(),
        }
    }

    /// Drains `poll_transmit` (it must terminate) and checks every output.
    fn drain(&mut self) {
        let mut closed = HashSet::new();
        for _ in 0..1_000_000 {
            let Some(t) = self.server.poll_transmit() else { return };
            match t {
                ServerTransmit::Text { conn, text } => {
                    assert!(!closed.contains(&conn), "text to {conn:?} after its close: {text}");
                    assert!(self.open.contains(&conn), "text to {conn:?}, which is not open: {text}");
                    let msg = protocol::decode_server(&text)
                        .unwrap_or_else(|e| panic!("server sent an undecodable frame {text:?}: {e}"));
                    match msg {
                        ServerMessage::Challenge { nonce, .. } => {
                            self.nonces.insert(conn, nonce);
                        }
                        ServerMessage::Registered { .. } => self.summary.registered += 1,
                        ServerMessage::Matched { .. } => self.summary.matched += 1,
                        _ => {}
                    }
                    *self.unacked.entry(conn).or_default() += text.len();
                }
                ServerTransmit::Close { conn, .. } => {
                    assert!(closed.insert(conn), "{conn:?} closed twice");
                    assert!(self.open.remove(&conn), "close of {conn:?}, which is not open");
                    self.nonces.remove(&conn);
                    self.unacked.remove(&conn);
                }
            }
        }
        panic!("poll_transmit did not drain");
    }

    fn register_frame(&mut self, conn: ConnId, identity: usize, variant: u8) -> String {
        let f = fixtures();
        let id = &f.identities[identity];
        let nonce = self.nonces.get(&conn).cloned().unwrap_or_else(|| "no-nonce".into());
        let server_id = self.server.config().server_id.clone();
        let (signer, context_nonce, version) = match variant % 6 {
            // Signed by another identity: bad signature.
            3 => (&f.identities[(identity + 1) % IDENTITIES], nonce.clone(), PROTOCOL_VERSION),
            // Signed over a stale nonce: bad signature.
            4 => (id, format!("{nonce}x"), PROTOCOL_VERSION),
            // Unsupported version.
            5 => (id, nonce.clone(), PROTOCOL_VERSION + 1),
            _ => (id, nonce.clone(), PROTOCOL_VERSION),
        };
        let sig = signer.sign(&mut self.rng, &protocol::register_context(&server_id, &context_nonce)).to_base64();
        let meta_text = format!(r#"{{"v":{variant}}}"#);
        let meta = peerlink::RawJson::from_string(meta_text).ok();
        self.next_req += 1;
        ClientMessage::Register {
            id: self.next_req,
            version,
            public_key: id.public_key().to_base64().into(),
            alias: format!("id{identity}").into(),
            meta: if variant % 6 == 1 { meta.as_ref().map(|m| &*m.0) } else { None },
            signature: sig.into(),
            token: if variant % 6 == 2 { Some("not.a.token".into()) } else { None },
        }
        .encode()
    }

    fn step(&mut self, step: &Step) {
        self.steps += 1;
        let conn_of = |c: u8| ConnId(u64::from(c % CONNS));
        match step {
            Step::Connect(c) => {
                let conn = conn_of(*c);
                if self.open.contains(&conn) {
                    assert!(self.server.handle_connect(conn, self.now).is_err(), "duplicate connect accepted");
                } else {
                    self.server.handle_connect(conn, self.now).expect("connect");
                    self.open.insert(conn);
                }
            }
            Step::Message(c, frame) => {
                let text = frame.render();
                self.server.handle_message(conn_of(*c), self.now, &text).expect("message");
            }
            Step::Register { conn, identity, variant } => {
                let conn = conn_of(*conn);
                let text = self.register_frame(conn, *identity as usize % IDENTITIES, *variant);
                self.server.handle_message(conn, self.now, &text).expect("register");
            }
            Step::Binary(c) => {
                self.server.handle_binary(conn_of(*c), self.now, &[0, 1, 2]).expect("binary");
            }
            Step::Sent(c, n) => {
                let conn = conn_of(*c);
                let n = usize::from(*n) * 16;
                self.server.handle_sent(conn, n);
                if let Some(u) = self.unacked.get_mut(&conn) {
                    *u = u.saturating_sub(n);
                }
            }
            Step::Disconnect(c) => {
                let conn = conn_of(*c);
                self.server.handle_disconnect(conn, self.now).expect("disconnect");
                // The adapter forgets it; the server must not send to it again.
                self.forget(conn);
            }
            Step::Advance(ms) => {
                self.now += Duration::from_millis(u64::from(*ms));
            }
        }
        self.drain();
        self.server.handle_timeout(self.now).expect("timeout");
        self.drain();
        if let Some(at) = self.server.poll_timeout() {
            assert!(at > self.now, "poll_timeout {:?} is not after now after handle_timeout", at - self.base);
        }
        self.check_stats();
    }

    fn forget(&mut self, conn: ConnId) {
        self.open.remove(&conn);
        self.nonces.remove(&conn);
        self.unacked.remove(&conn);
    }

    fn check_stats(&mut self) {
        let s = self.server.stats();
        let m = &mut self.summary;
        m.max_sessions = m.max_sessions.max(s.active_sessions + s.parked_sessions);
        m.max_namespaces = m.max_namespaces.max(s.namespaces);
        m.max_rooms = m.max_rooms.max(s.rooms);
        let c = self.server.config();
        let sessions = s.active_sessions + s.parked_sessions;
        assert_eq!(s.connections, self.open.len(), "connections: {s:?}");
        assert!(s.connections <= c.max_connections, "{s:?}");
        assert!(s.active_sessions <= s.connections, "{s:?}");
        assert!(sessions <= IDENTITIES, "more sessions than identities: {s:?}");
        assert!(s.pending_matches <= sessions * c.max_namespaces_per_client, "{s:?}");
        assert!(s.namespaces <= sessions * c.max_namespaces_per_client, "{s:?}");
        assert!(s.rooms <= c.max_rooms, "{s:?}");
        assert!(s.parked_bytes <= s.parked_sessions * c.resume_queue_bytes, "{s:?}");
        let unacked: usize = self.unacked.values().sum();
        assert_eq!(s.outbound_bytes, unacked, "outbound bytes: {s:?}");
        for (conn, u) in &self.unacked {
            assert!(*u <= c.outbound_queue_bytes, "{conn:?} has {u} bytes outstanding");
        }
        assert!(s.timers <= 64 + 64 * self.steps, "timers: {s:?}");
    }

    /// Disconnects everyone, runs every timer out and checks that nothing is left.
    fn teardown(&mut self) {
        let mut conns: Vec<ConnId> = self.open.iter().copied().collect();
        conns.sort();
        for conn in conns {
            self.server.handle_disconnect(conn, self.now).expect("disconnect");
            self.forget(conn);
            self.drain();
        }
        let mut rounds = 0;
        while let Some(at) = self.server.poll_timeout() {
            rounds += 1;
            assert!(rounds <= 32, "timers keep firing after everyone left: {:?}", self.server.stats());
            self.now = self.now.max(at);
            self.server.handle_timeout(self.now).expect("timeout");
            self.drain();
        }
        self.now += Duration::from_secs(3600);
        self.server.handle_timeout(self.now).expect("timeout");
        self.drain();
        let s = self.server.stats();
        assert_eq!(s.connections, 0, "{s:?}");
        assert_eq!(s.active_sessions, 0, "{s:?}");
        assert_eq!(s.parked_sessions, 0, "{s:?}");
        assert_eq!(s.namespaces, 0, "{s:?}");
        assert_eq!(s.rooms, 0, "{s:?}");
        assert_eq!(s.pending_matches, 0, "{s:?}");
        assert_eq!(s.outbound_bytes, 0, "{s:?}");
        assert_eq!(s.parked_bytes, 0, "{s:?}");
        assert_eq!(s.timers, 0, "{s:?}");
    }
}

/// Decodes up to [`MAX_STEPS`] steps from `data`.
pub fn decode_steps(data: &[u8]) -> Vec<Step> {
    let mut u = Unstructured::new(data);
    let mut steps = Vec::new();
    while steps.len() < MAX_STEPS && !u.is_empty() {
        match Step::arbitrary(&mut u) {
            Ok(s) => steps.push(s),
            Err(_) => break,
        }
    }
    steps
}

/// Runs the steps decoded from `data` against one server, checking invariants throughout.
pub fn server_core(data: &[u8]) -> Summary {
    let steps = decode_steps(data);
    let mut d = Driver::new();
    for step in &steps {
        d.step(step);
    }
    d.teardown();
    d.summary
}

// ---- stun_decode ------------------------------------------------------------------------

/// Decodes `data` as a STUN message. The codec must agree with its own demultiplexing
/// (`is_stun`, `transaction_id`), type its refusals consistently with the header, and whatever
/// decodes as a Binding request or success must re-encode (with `binding_request` /
/// `binding_success`) to a message that decodes to the same thing.
pub fn stun_decode(data: &[u8]) {
    let looks_stun = stun::is_stun(data);
    let tid = stun::transaction_id(data);
    assert_eq!(tid.is_some(), looks_stun, "is_stun and transaction_id disagree");
    let decoded = stun::decode(data);
    let header = looks_stun.then(|| {
        let kind = u16::from_be_bytes([data[0], data[1]]);
        let len = usize::from(u16::from_be_bytes([data[2], data[3]]));
        (kind, len % 4 == 0 && 20 + len == data.len())
    });
    match (&decoded, header) {
        (Err(StunError::NotStun), None | Some((_, false))) => return,
        (Err(e), None | Some((_, false))) => panic!("{e:?} for a datagram that is not well-formed STUN"),
        (Err(StunError::NotStun), Some((_, true))) => panic!("a well-formed STUN header refused as not STUN"),
        (Ok(_), None | Some((_, false))) => panic!("decoded a datagram that is not well-formed STUN: {decoded:?}"),
        (_, Some((kind, true))) => check_stun_kind(kind, &decoded),
    }
    let Ok(msg) = decoded else { return };
    let tid = tid.expect("is_stun");
    match msg {
        StunMessage::BindingRequest { transaction } => {
            assert_eq!(transaction, tid, "request transaction");
            let encoded = stun::binding_request(transaction);
            assert_eq!(stun::decode(&encoded), Ok(msg), "re-encoded request {encoded:02x?}");
            if data.len() == encoded.len() {
                // No attributes: the encoding is the canonical one.
                assert_eq!(encoded, data, "an attribute-less request re-encodes differently");
            }
        }
        StunMessage::BindingSuccess { transaction, mapped } => {
            assert_eq!(transaction, tid, "success transaction");
            let encoded = stun::binding_success(transaction, mapped);
            assert!(stun::is_stun(&encoded), "re-encoded success is not STUN: {encoded:02x?}");
            assert_eq!(stun::decode(&encoded), Ok(msg), "re-encoded success {encoded:02x?}");
        }
        StunMessage::BindingError { transaction, .. } => assert_eq!(transaction, tid, "error transaction"),
    }
}

/// The decoder's answer for a well-formed header of message type `kind`.
fn check_stun_kind(kind: u16, decoded: &Result<StunMessage, StunError>) {
    match (kind, decoded) {
        (0x0001, Ok(StunMessage::BindingRequest { .. })) => {}
        (0x0101, Ok(StunMessage::BindingSuccess { .. }) | Err(StunError::NoMappedAddress | StunError::Truncated)) => {}
        (0x0111, Ok(StunMessage::BindingError { .. }) | Err(StunError::Truncated)) => {}
        (0x0001 | 0x0101 | 0x0111, other) => panic!("message type {kind:#06x} decoded as {other:?}"),
        (_, Err(StunError::Unsupported(k))) => assert_eq!(*k, kind, "Unsupported names another type"),
        (_, other) => panic!("message type {kind:#06x} decoded as {other:?}"),
    }
}

// ---- peer_signal ------------------------------------------------------------------------

/// Takes `data` (if UTF-8) as an SDP for `sdp_fingerprint` and, if it is JSON, as a relay
/// payload for `Signal::decode`; every signal that decodes must re-encode to JSON that
/// decodes to an equal signal and re-encodes identically.
pub fn peer_signal(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(fingerprint) = signal::sdp_fingerprint(text) {
        // The canonical form reads back as itself (it is what signatures cover).
        let again = signal::sdp_fingerprint(&format!("a=fingerprint:{fingerprint}\r\n"));
        assert_eq!(again.as_deref(), Some(fingerprint.as_str()), "the canonical fingerprint does not read back");
    }
    let Ok(payload) = RawValue::from_string(text.to_owned()) else { return };
    let Ok(Some(msg)) = Signal::decode(&payload) else { return };
    let encoded = msg.encode();
    let raw = RawValue::from_string(encoded.clone())
        .unwrap_or_else(|e| panic!("signal {text:?} re-encoded as {encoded:?}, which is not JSON: {e}"));
    let back = Signal::decode(&raw)
        .unwrap_or_else(|e| panic!("signal {text:?} re-encoded as {encoded:?} does not decode: {e}"))
        .unwrap_or_else(|| panic!("signal {text:?} re-encoded as {encoded:?} is not a signal"));
    assert_eq!(back, msg, "signal changed through {encoded:?}");
    assert_eq!(back.encode(), encoded, "signal {text:?} does not re-encode identically");
}

// ---- room_batch -------------------------------------------------------------------------

/// [`room_batch`] input whose first byte is this: a relayed batch, signed here (see
/// [`room_signed`]).
pub const ROOM_MODE_SIGNED: u8 = b'S';
/// [`room_batch`] input whose first byte is this: `arbitrary` items, encoded then decoded.
pub const ROOM_MODE_ITEMS: u8 = b'I';
/// Most signature checks one signed input asks for.
pub const ROOM_MAX_MUTATIONS: usize = 4;

/// The sender, the recipient and a third party (the server, or another member).
struct RoomFixtures {
    a: Identity,
    b: Identity,
    c: Identity,
}

fn room_fixtures() -> &'static RoomFixtures {
    static F: OnceLock<RoomFixtures> = OnceLock::new();
    F.get_or_init(|| {
        let id = |seed| Identity::generate(&mut ChaCha20Rng::seed_from_u64(seed));
        RoomFixtures { a: id(2000), b: id(2001), c: id(2002) }
    })
}

/// The `room/1` codec (`peerlink::room::wire`). The first byte picks the mode:
///
/// * `S` ([`ROOM_MODE_SIGNED`]): the rest goes to [`room_signed`].
/// * `I` ([`ROOM_MODE_ITEMS`]): the rest, through `arbitrary`, is a list of valid items; they
///   must encode within their `encoded_len` and decode back to themselves.
/// * anything else: the rest (if UTF-8) is a batch body for `decode_batch` ([`check_room_batch`])
///   and a relay payload for `is_relayed` and `decode_relayed`, which must refuse it unless it
///   is a genuine batch between the fixed identities claimed ([`check_relayed_text`]).
pub fn room_batch(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode {
        ROOM_MODE_SIGNED => room_signed(rest),
        ROOM_MODE_ITEMS => room_items(rest),
        _ => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            let batch = check_room_batch(text);
            check_room_body(text, batch.as_ref());
            check_is_relayed(text);
            check_relayed_text(text);
        }
    }
}

/// Whether `s` is exactly one JSON value, without surrounding whitespace.
fn is_json_value(s: &str) -> bool {
    serde_json::from_str::<&RawValue>(s).is_ok_and(|raw| raw.get() == s)
}

/// What the rooms rely on in a decoded item.
fn check_room_item(item: &Item) {
    let room = item.room();
    assert!(!room.is_empty() && room.len() <= wire::MAX_ROOM_LEN, "room id of {} bytes: {item:?}", room.len());
    match item {
        Item::Data { seq, data, .. } => {
            assert!(*seq > 0, "data with sequence number 0: {item:?}");
            if let RoomData::Json(j) = data {
                assert!(is_json_value(j), "JSON data that is not one JSON value: {item:?}");
            }
        }
        Item::Ack { .. } => {}
        Item::Presence { ttl_ms, state, .. } => {
            assert!(*ttl_ms <= wire::MAX_PRESENCE_TTL_MS, "presence ttl over the limit: {item:?}");
            if let Some(s) = state {
                assert!(s != "null" && is_json_value(s), "presence state that is not a JSON value: {item:?}");
            }
        }
    }
}

/// Every item encodes within its `encoded_len`, and a message's `wire_len` (what counts
/// against the size limit) is its encoded size; the batch decodes back to `items` and
/// re-encodes to the same text.
fn check_room_encoding(items: &[Item]) {
    use base64::Engine as _;
    let mut total = 0;
    for item in items {
        let mut one = String::new();
        item.encode_into(&mut one);
        assert!(one.len() <= item.encoded_len(), "encoded_len {} is below the {} bytes of {one}", item.encoded_len(), one.len());
        total += one.len();
        if let Item::Data { data, .. } = item {
            let size = match data {
                RoomData::Json(j) => j.len(),
                RoomData::Text(t) => serde_json::to_string(t).expect("a string serializes").len(),
                RoomData::Binary(b) | RoomData::Sync(b) => base64::engine::general_purpose::STANDARD.encode(b).len(),
            };
            assert_eq!(data.wire_len(), size, "wire_len of {data:?}");
        }
    }
    let encoded = wire::encode_batch(items);
    assert_eq!(encoded.len(), 8 + total + items.len().saturating_sub(1), "batch framing of {encoded}");
    let back = wire::decode_batch(&encoded).unwrap_or_else(|e| panic!("{items:?} encoded as {encoded:?} does not decode: {e}"));
    assert_eq!(back, items, "items changed through {encoded:?}");
    assert_eq!(wire::encode_batch(&back), encoded, "a batch does not re-encode identically");
}

/// `decode_batch(text)`, checking that whatever decodes is valid and round-trips strictly.
pub fn check_room_batch(text: &str) -> Result<Vec<Item>, WireError> {
    let items = wire::decode_batch(text)?;
    assert!(items.len() <= wire::MAX_ITEMS, "{} items decoded", items.len());
    items.iter().for_each(check_room_item);
    check_room_encoding(&items);
    Ok(items)
}

/// `decode_body(text)` (plaintext or sealed): a body it takes as items is exactly what
/// `decode_batch` takes; one it takes as sealed is a JSON object whose `z` is base64 of those
/// bytes; anything else is refused as `decode_batch` refuses it.
fn check_room_body(text: &str, batch: Result<&Vec<Item>, &WireError>) {
    use base64::Engine as _;
    match wire::decode_body(text) {
        Ok(wire::Body::Items(items)) => assert_eq!(Ok(&items), batch, "decode_body and decode_batch disagree on {text:?}"),
        Ok(wire::Body::Sealed(bytes)) => {
            assert!(text.trim_start().starts_with('{'), "a sealed body that is not an object: {text:?}");
            let v: serde_json::Value = serde_json::from_str(text).expect("a sealed body is JSON");
            let z = v["z"].as_str().expect("a sealed body has a string z");
            assert_eq!(base64::engine::general_purpose::STANDARD.decode(z).ok(), Some(bytes), "{text:?}");
        }
        Err(e) => {
            // A body with a `z` member is a sealed one, and refused when `z` is not base64
            // even if its `m` would make a batch.
            let sealed = serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v.is_object() && v.get("z").is_some());
            if let (Ok(items), false) = (batch, sealed) {
                panic!("decode_body refused ({e}) what decode_batch took ({items:?}): {text:?}");
            }
        }
    }
}

/// `is_relayed` only claims JSON objects whose `peerlink` member is `"room/1"`.
fn check_is_relayed(text: &str) {
    if !wire::is_relayed(text) {
        return;
    }
    // A map, not a struct: serde lets a struct come from an array too. Values stay raw, so
    // deep nesting elsewhere is no reason to disagree.
    let object = serde_json::from_str::<HashMap<String, &RawValue>>(text)
        .unwrap_or_else(|e| panic!("is_relayed accepted {text:?}, which is not a JSON object: {e}"));
    let tag = object.get("peerlink").map(|v| v.get());
    assert_eq!(tag, Some("\"room/1\""), "is_relayed accepted {text:?}");
}

/// `decode_relayed(text)` between every two of the fixed identities: whatever it accepts must
/// be a genuine batch from the one to the other, checked here independently.
fn check_relayed_text(text: &str) {
    let f = room_fixtures();
    let ids = [&f.a, &f.b, &f.c];
    for from in ids {
        for me in ids {
            if std::ptr::eq(from, me) {
                continue;
            }
            match wire::decode_relayed(text, &from.fingerprint(), &me.fingerprint()) {
                Ok((items, key)) => {
                    assert_eq!(key.to_base64(), from.public_key().to_base64(), "accepted with another key: {text:?}");
                    let body = check_genuine(text, from, me);
                    assert_eq!(wire::decode_batch(&body).as_ref(), Ok(&items), "accepted items that are not the body's: {text:?}");
                }
                // Only the body can have too many items: the signature must have been checked first.
                Err(WireError::TooManyItems) => {
                    check_genuine(text, from, me);
                }
                Err(_) => {}
            }
        }
    }
}

/// Checks without `decode_relayed` that `text` is a relay payload signed by `from` for `me`,
/// and returns its body.
fn check_genuine(text: &str, from: &Identity, me: &Identity) -> String {
    use peerlink::identity::{PublicKey, Signature};
    let field = |name: &str, raw: &RawValue| -> String {
        serde_json::from_str::<String>(raw.get()).unwrap_or_else(|e| panic!("accepted with a `{name}` that is not a string ({e}): {text:?}"))
    };
    // The envelope is a struct: an object with these members, or an array of them in order.
    let names = ["peerlink", "key", "sig", "to", "body"];
    let values: HashMap<String, String> = if let Ok(object) = serde_json::from_str::<HashMap<String, &RawValue>>(text) {
        names
            .iter()
            .map(|n| {
                let raw = object.get(*n).unwrap_or_else(|| panic!("accepted without `{n}`: {text:?}"));
                (n.to_string(), field(n, raw))
            })
            .collect()
    } else {
        let array = serde_json::from_str::<Vec<&RawValue>>(text).unwrap_or_else(|e| panic!("accepted a non-envelope ({e}): {text:?}"));
        assert_eq!(array.len(), names.len(), "accepted an array envelope: {text:?}");
        names.iter().zip(array).map(|(n, raw)| (n.to_string(), field(n, raw))).collect()
    };
    let to: Fingerprint = values["to"].parse().unwrap_or_else(|e| panic!("accepted with a bad `to` ({e}): {text:?}"));
    assert_eq!(to, me.fingerprint(), "accepted a batch for someone else: {text:?}");
    let key = PublicKey::from_base64(&values["key"]).unwrap_or_else(|e| panic!("accepted with a bad key ({e}): {text:?}"));
    assert_eq!(key.fingerprint(), from.fingerprint(), "accepted with another sender's key: {text:?}");
    let sig = Signature::from_base64(&values["sig"]).unwrap_or_else(|e| panic!("accepted with a bad signature ({e}): {text:?}"));
    let body = values["body"].clone();
    let message = format!("peerlink room/1\n{}\n{}\n{body}", from.fingerprint(), me.fingerprint());
    key.verify(message.as_bytes(), &sig).unwrap_or_else(|e| panic!("accepted a signature that does not verify ({e}): {text:?}"));
    body
}

/// Who signs a payload, for whom, and where it claims to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Signing {
    /// The sender, for the recipient.
    Genuine,
    /// The third party, with its own key, for the recipient.
    ByThirdParty,
    /// The sender, for the third party.
    ForThirdParty,
}

/// Signs `body`; `true` if this is the first time (this process) for these arguments.
/// Memoized: signing and verifying are most of a signed input's time, and the fuzzer tries
/// many mutation lists on one body.
fn signed_payload(seed: u8, signing: Signing, body: &str) -> (String, bool) {
    use std::cell::RefCell;
    thread_local! {
        static CACHE: RefCell<HashMap<(u8, Signing, String), String>> = RefCell::new(HashMap::new());
    }
    let key = (seed, signing, body.to_owned());
    if let Some(p) = CACHE.with(|c| c.borrow().get(&key).cloned()) {
        return (p, false);
    }
    let f = room_fixtures();
    let mut rng = ChaCha20Rng::seed_from_u64(u64::from(seed));
    let (signer, to) = match signing {
        Signing::Genuine => (&f.a, f.b.fingerprint()),
        Signing::ByThirdParty => (&f.c, f.b.fingerprint()),
        Signing::ForThirdParty => (&f.a, f.c.fingerprint()),
    };
    let payload = wire::encode_relayed(signer, &mut rng, &to, body);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= 4096 {
            c.clear();
        }
        c.insert(key, payload.clone());
    });
    (payload, true)
}

/// `payload` with member `name` replaced by `value`.
fn with_member(payload: &str, name: &str, value: serde_json::Value) -> String {
    let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(payload).expect("our payload is an object");
    assert!(object.insert(name.to_owned(), value).is_some(), "no `{name}` in {payload}");
    serde_json::to_string(&object).expect("serializes")
}

fn member(payload: &str, name: &str) -> String {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(payload).expect("our payload is an object");
    object[name].as_str().expect("a string member").to_owned()
}

/// Flips byte `pos % len` of `bytes` with `xor` (appends `xor` to an empty one).
fn flip(bytes: &mut Vec<u8>, pos: u16, xor: u8) {
    if bytes.is_empty() {
        bytes.push(xor);
    } else {
        let i = usize::from(pos) % bytes.len();
        bytes[i] ^= xor;
    }
}

/// One change to a genuine payload, from 4 input bytes: `[kind, pos_lo, pos_hi, xor]`.
#[derive(Debug, Clone, Copy)]
pub struct Mutation {
    kind: u8,
    pos: u16,
    xor: u8,
}

impl Mutation {
    pub fn from_bytes(b: [u8; 4]) -> Self {
        Mutation { kind: b[0], pos: u16::from_le_bytes([b[1], b[2]]), xor: if b[3] == 0 { 1 } else { b[3] } }
    }

    /// Mutation kinds (`kind % KINDS`; see [`room_signed`]).
    pub const KINDS: u8 = 8;
}

/// A signed input: `[seed, n, n × [kind, pos_lo, pos_hi, xor], body...]` (`n % 5` mutations).
/// The body (lossy UTF-8) is signed by the fixed sender for the fixed recipient with an RNG
/// seeded by `seed`. The genuine payload must be claimed by `is_relayed` and decode to what
/// `decode_batch` makes of the body (any body error unchanged); claimed by the wrong sender or
/// delivered to the wrong recipient it must be refused (checked once per process for each
/// seed and body: the answer cannot change); and each mutation must make it fail:
///
/// 0. a byte of the body flipped: "signature does not verify";
/// 1. a byte of the signature flipped (base64 re-encoded): `BadSignature`;
/// 2. a byte of the key flipped (base64 re-encoded): `BadSignature`;
/// 3. a byte of `to` flipped: "addressed to another peer";
/// 4. a byte of the signature's base64 text flipped: refused;
/// 5. a byte of the key's base64 text flipped: refused;
/// 6. a byte anywhere in the payload text flipped: refused, or (JSON being what it is) the
///    same items from the same key;
/// 7. re-signed (`pos` even) by the third party with its own key, claiming the sender: "the key
///    is not the sender's"; or (`pos` odd) signed by the sender for the third party and `to`
///    rewritten to the recipient: "signature does not verify".
pub fn room_signed(data: &[u8]) {
    use peerlink::identity::PublicKey;
    let [seed, n, rest @ ..] = data else { return };
    let n = usize::from(n % (ROOM_MAX_MUTATIONS as u8 + 1)).min(rest.len() / 4);
    let (mutations, body) = rest.split_at(n * 4);
    let body = String::from_utf8_lossy(body).into_owned();
    let f = room_fixtures();
    let (a, b, c) = (f.a.fingerprint(), f.b.fingerprint(), f.c.fingerprint());
    let (payload, first) = signed_payload(*seed, Signing::Genuine, &body);
    let expected = check_room_batch(&body);
    let key_of = |k: &PublicKey| k.to_base64();
    let refused = |text: &str, from: &Fingerprint, me: &Fingerprint, why: Option<&'static str>, what: &str| {
        match (wire::decode_relayed(text, from, me), why) {
            (Err(WireError::BadSignature(got)), Some(want)) => assert_eq!(got, want, "{what}: {text}"),
            (Err(WireError::BadSignature(_)), None) => {}
            (other, _) => panic!("{what}: {other:?} for {text}"),
        }
    };
    if first {
        assert!(wire::is_relayed(&payload), "our own payload is not claimed: {payload}");
        check_is_relayed(&payload);
        match (wire::decode_relayed(&payload, &a, &b), &expected) {
            (Ok((items, key)), Ok(want)) => {
                assert_eq!(&items, want, "a genuine payload's items: {payload}");
                assert_eq!(key_of(&key), f.a.public_key().to_base64(), "a genuine payload's key");
            }
            (Err(got), Err(want)) => assert_eq!(&got, want, "a genuine payload with a bad body: {payload}"),
            (got, want) => panic!("genuine payload {payload}: decode_relayed {got:?}, decode_batch {want:?}"),
        }
        refused(&payload, &c, &b, Some("the key is not the sender's"), "claimed by the wrong sender");
        refused(&payload, &a, &c, Some("addressed to another peer"), "delivered to the wrong recipient");
    }

    for m in mutations.chunks_exact(4) {
        let m = Mutation::from_bytes(m.try_into().expect("4 bytes"));
        match m.kind % Mutation::KINDS {
            0 => {
                let mut bytes = body.clone().into_bytes();
                flip(&mut bytes, m.pos, m.xor);
                let altered = String::from_utf8_lossy(&bytes).into_owned();
                if altered == body {
                    continue;
                }
                let text = with_member(&payload, "body", altered.into());
                refused(&text, &a, &b, Some("signature does not verify"), "body flipped");
            }
            1 | 2 => {
                use base64::Engine as _;
                let (name, what) = if m.kind % Mutation::KINDS == 1 { ("sig", "signature flipped") } else { ("key", "key flipped") };
                let b64 = base64::engine::general_purpose::STANDARD;
                let mut bytes = b64.decode(member(&payload, name)).expect("our base64");
                flip(&mut bytes, m.pos, m.xor);
                let text = with_member(&payload, name, b64.encode(&bytes).into());
                refused(&text, &a, &b, None, what);
            }
            3 => {
                let mut bytes = b.as_bytes().to_vec();
                flip(&mut bytes, m.pos, m.xor);
                let to = Fingerprint::from_bytes(bytes.try_into().expect("32 bytes"));
                let text = with_member(&payload, "to", to.to_string().into());
                refused(&text, &a, &b, Some("addressed to another peer"), "recipient flipped");
            }
            4 | 5 => {
                let name = if m.kind % Mutation::KINDS == 4 { "sig" } else { "key" };
                let mut bytes = member(&payload, name).into_bytes();
                flip(&mut bytes, m.pos, m.xor);
                let Ok(altered) = String::from_utf8(bytes) else { continue };
                let text = with_member(&payload, name, altered.into());
                assert!(wire::decode_relayed(&text, &a, &b).is_err(), "{name} text flipped: {text}");
            }
            6 => {
                let mut bytes = payload.clone().into_bytes();
                flip(&mut bytes, m.pos, m.xor);
                let Ok(text) = String::from_utf8(bytes) else { continue };
                check_is_relayed(&text);
                if let Ok((items, key)) = wire::decode_relayed(&text, &a, &b) {
                    assert_eq!(Ok(&items), expected.as_ref(), "payload flipped into other items: {text}");
                    assert_eq!(key_of(&key), f.a.public_key().to_base64(), "payload flipped into another key: {text}");
                    check_genuine(&text, &f.a, &f.b);
                }
            }
            _ if m.pos & 1 == 0 => {
                let (text, _) = signed_payload(*seed, Signing::ByThirdParty, &body);
                refused(&text, &a, &b, Some("the key is not the sender's"), "re-signed by a third party");
            }
            _ => {
                let text = with_member(&signed_payload(*seed, Signing::ForThirdParty, &body).0, "to", b.to_string().into());
                refused(&text, &a, &b, Some("signature does not verify"), "redirected");
            }
        }
    }
}

/// An item as `arbitrary` makes it; [`ArbItem::valid`] turns it into one the rooms could send.
#[derive(Debug, Arbitrary)]
enum ArbItem {
    Data { room: String, epoch: u64, seq: u64, data: ArbData },
    Ack { room: String, epoch: u64, seq: u64 },
    Presence { room: String, epoch: u64, version: u64, ttl_ms: u64, state: Option<String> },
}

#[derive(Debug, Arbitrary)]
enum ArbData {
    Json(String),
    Text(String),
    Binary(Vec<u8>),
}

/// `s` if it is JSON (whitespace trimmed), else `s` as a JSON string.
fn as_json(s: &str) -> String {
    match serde_json::from_str::<&RawValue>(s) {
        Ok(raw) => raw.get().to_owned(),
        Err(_) => serde_json::to_string(s).expect("a string serializes"),
    }
}

impl ArbItem {
    fn valid(self) -> Item {
        let room = |mut r: String| {
            if r.is_empty() {
                r.push('r');
            }
            let mut end = r.len().min(wire::MAX_ROOM_LEN);
            while !r.is_char_boundary(end) {
                end -= 1;
            }
            r.truncate(end.max(1));
            if r.is_empty() { "r".to_owned() } else { r }
        };
        match self {
            ArbItem::Data { room: r, epoch, seq, data } => Item::Data {
                room: room(r),
                epoch,
                seq: seq.max(1),
                data: match data {
                    ArbData::Json(s) => RoomData::Json(as_json(&s)),
                    ArbData::Text(s) => RoomData::Text(s),
                    ArbData::Binary(b) => RoomData::Binary(b),
                },
            },
            ArbItem::Ack { room: r, epoch, seq } => Item::Ack { room: room(r), epoch, seq },
            ArbItem::Presence { room: r, epoch, version, ttl_ms, state } => Item::Presence {
                room: room(r),
                epoch,
                version,
                ttl_ms: ttl_ms.min(wire::MAX_PRESENCE_TTL_MS),
                state: state.map(|s| as_json(&s)).filter(|s| s != "null"),
            },
        }
    }
}

/// Valid items from `arbitrary` through `encode_batch` and back.
fn room_items(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut items = Vec::new();
    while items.len() < wire::MAX_ITEMS && !u.is_empty() {
        match ArbItem::arbitrary(&mut u) {
            Ok(item) => items.push(item.valid()),
            Err(_) => break,
        }
    }
    items.iter().for_each(check_room_item);
    check_room_encoding(&items);
}

/// Raw relay payloads for the `room_batch` corpus: `(name, accepted, payload)`, written as
/// `seed-relayed-<name>` (mode byte `R`) by the ignored test `write_room_batch_relayed_seeds`
/// in `core/tests/fuzz_corpus.rs`. `accepted`: `decode_relayed` from the fixed sender to the
/// fixed recipient takes it.
pub fn room_relayed_seeds() -> Vec<(&'static str, bool, String)> {
    let f = room_fixtures();
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let (b, c) = (f.b.fingerprint(), f.c.fingerprint());
    let mixed = wire::encode_batch(&[
        Item::Data { room: "r\"1".into(), epoch: 7, seq: 1, data: RoomData::Json(r#"{"a":[1,2]}"#.into()) },
        Item::Data { room: "r".into(), epoch: 7, seq: 2, data: RoomData::Text("h\u{e9} \"q\"\n\u{1}".into()) },
        Item::Data { room: "r".into(), epoch: 7, seq: 3, data: RoomData::Binary(vec![0, 255, 3]) },
        Item::Ack { room: "r".into(), epoch: u64::MAX, seq: 0 },
        Item::Presence { room: "r".into(), epoch: 7, version: 3, ttl_ms: 1000, state: Some(r#"{"typing":true}"#.into()) },
        Item::Presence { room: "r".into(), epoch: 7, version: 4, ttl_ms: 1000, state: None },
    ]);
    let ack = r#"{"m":[{"t":"a","r":"r","e":1,"s":1}]}"#;
    let mut sign = |by: &Identity, to: &Fingerprint, body: &str| wire::encode_relayed(by, &mut rng, to, body);
    let genuine = sign(&f.a, &b, &mixed);
    let member = |payload: &str, name: &str| {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(payload).expect("an object");
        object[name].clone()
    };
    let array = serde_json::to_string(&["peerlink", "key", "sig", "to", "body"].map(|n| member(&genuine, n))).expect("serializes");
    vec![
        ("genuine-empty", true, sign(&f.a, &b, r#"{"m":[]}"#)),
        ("genuine-ack", true, sign(&f.a, &b, ack)),
        ("genuine-mixed", true, genuine.clone()),
        // serde lets a struct come from an array: decode_relayed takes it (still signed).
        ("genuine-array", true, array),
        ("genuine-bad-body", false, sign(&f.a, &b, r#"{"m":[{"t":"a","r":"r","e":1}]}"#)),
        ("genuine-not-a-batch", false, sign(&f.a, &b, "hello")),
        ("for-someone-else", false, sign(&f.a, &c, ack)),
        ("redirected", false, with_member(&sign(&f.a, &c, ack), "to", b.to_string().into())),
        ("forged-key", false, sign(&f.c, &b, ack)),
        ("body-altered", false, with_member(&genuine, "body", mixed.replace("\"s\":1", "\"s\":5").into())),
        ("uppercase-to", false, with_member(&genuine, "to", b.to_string().to_uppercase().into())),
        ("spaced", true, serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(&genuine).expect("JSON")).expect("serializes")),
        // The tag must be plain (not `is_relayed`, then Malformed).
        ("escaped-tag", false, genuine.replacen("room/1", "room\\/1", 1)),
        // The tag is for `is_relayed` (false here); the signature covers a fixed "room/1".
        ("other-tag", true, genuine.replacen("room/1", "rtc/1", 1)),
        ("tag-only", false, r#"{"peerlink":"room/1"}"#.to_owned()),
        ("tag-array", false, r#"["room/1"]"#.to_owned()),
    ]
}

/// Whether `decode_relayed` from the fixed sender to the fixed recipient accepts `payload`.
pub fn room_relayed_accepted(payload: &str) -> bool {
    let f = room_fixtures();
    wire::decode_relayed(payload, &f.a.fingerprint(), &f.b.fingerprint()).is_ok()
}

// ---- sync -------------------------------------------------------------------------------

/// Wall-clock milliseconds of the sync fixtures (the seeds carry timestamps near it, within
/// `max_clock_offset`).
pub const SYNC_UNIX_MS: u64 = 1_700_000_000_000;
/// The document the CRDT fixture has open.
pub const SYNC_DOC: &str = "doc";
/// Largest value the state fixtures (and the decoder check) take, as their default config.
const SYNC_MAX_JSON: usize = 64 * 1024;

fn sync_fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// The fixtures' own fingerprint.
pub fn sync_me() -> Fingerprint {
    sync_fp(1)
}

/// The member every input comes from.
pub fn sync_peer() -> Fingerprint {
    sync_fp(2)
}

/// The instant the sync fixtures and replays count from (read once).
pub fn sync_now() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Operational merge: the sorted union of arrays of strings (a join, as the docs ask).
fn sync_union(_: &str, a: Option<&serde_json::Value>, b: Option<&serde_json::Value>) -> Option<serde_json::Value> {
    let set: std::collections::BTreeSet<&str> =
        [a, b].into_iter().flatten().flat_map(|v| v.as_array().into_iter().flatten()).filter_map(|v| v.as_str()).collect();
    Some(serde_json::json!(set))
}

fn sync_state_config(operational: bool) -> StateConfig {
    if operational { StateConfig::operational(sync_union) } else { StateConfig::lww() }
}

/// A replica holding a few entries and a tombstone, with [`sync_peer`] a member, drained.
/// `me` picks its fingerprint (the seeds' other side is a replica built the same way).
fn sync_state_replica(operational: bool, me: Fingerprint, salt: &str) -> StateSync {
    let now = sync_now();
    let mut s = StateSync::new(sync_state_config(operational), me);
    let value = |i: u64| serde_json::json!([format!("{salt}{i}")]);
    for (i, key) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
        s.set(now, SYNC_UNIX_MS + i as u64, &format!("{salt}{key}"), value(i as u64)).expect("set");
        s.set(now, SYNC_UNIX_MS + i as u64, key, value(i as u64)).expect("set");
    }
    s.delete(now, SYNC_UNIX_MS + 10, "c").expect("delete");
    s.flush();
    while s.poll_message().is_some() {}
    while s.poll_event().is_some() {}
    s
}

/// The state fixture: [`sync_state_replica`] as [`sync_me`], with [`sync_peer`] a member.
pub fn sync_state_fixture(operational: bool) -> StateSync {
    let mut s = sync_state_replica(operational, sync_me(), "m");
    s.handle_member_up(sync_now(), sync_peer());
    while s.poll_message().is_some() {}
    s
}

/// A CRDT replica with [`SYNC_DOC`] open and edited (text, map, array), flushed, drained.
fn sync_crdt_replica(me: Fingerprint, seed: u64, text: &str) -> CrdtSync {
    let now = sync_now();
    let mut c = CrdtSync::new(CrdtConfig::default(), me, seed);
    let doc = c.open(now, SYNC_DOC).expect("open").clone();
    {
        let (t, m, a) = (doc.get_or_insert_text("text"), doc.get_or_insert_map("shared"), doc.get_or_insert_array("array"));
        let mut txn = doc.transact_mut();
        t.insert(&mut txn, 0, text);
        m.insert(&mut txn, text, seed as i64);
        a.push_back(&mut txn, text);
    }
    c.flush(now);
    while c.poll_message().is_some() {}
    while c.poll_event().is_some() {}
    c
}

/// The CRDT fixture: [`sync_crdt_replica`] as [`sync_me`], with [`sync_peer`] a member.
pub fn sync_crdt_fixture() -> CrdtSync {
    let mut c = sync_crdt_replica(sync_me(), 1, "hello");
    c.handle_member_up(sync_now(), sync_peer());
    while c.poll_message().is_some() {}
    c
}

fn sync_state_vector(c: &CrdtSync) -> Vec<u8> {
    c.doc(SYNC_DOC).expect("the fixture's document").transact().state_vector().encode_v1()
}

/// `data` as one message from a member, through everything a replica decodes off the
/// network:
///
/// * `sync::wire::decode` (`sync/1` state messages): whatever decodes re-encodes with the
///   encoders `StateSync` uses, and that decodes to the same message and re-encodes to the
///   same bytes;
/// * a last-writer-wins and an operational `StateSync` holding entries: no panic; a
///   `BadMessage` exactly when the decoder refuses (or, for entries, when the checks before
///   applying them refuse), and then the map and its digest are as before;
/// * a `CrdtSync` with a document open: no panic escapes (yrs panics are caught inside); a
///   `BadMessage` leaves the document's state vector as it was; afterwards the document
///   still answers a handshake.
pub fn sync(data: &[u8]) {
    sync_decode(data);
    sync_state(data, false);
    sync_state(data, true);
    sync_crdt(data);
}

/// [`sync`] under libFuzzer. libfuzzer-sys installs a panic hook that aborts before
/// unwinding, so the `catch_unwind` with which `CrdtSync` contains yrs panics would never
/// get to run: around the `CrdtSync` part the hook is swapped for a silent one, and a panic
/// that gets out of `CrdtSync` is raised again with the fuzzer's hook back (a crash). This
/// needs `panic = "unwind"`, which cargo-fuzz builds with (libfuzzer-sys aborts from its
/// hook for that reason); under `panic = "abort"` the `CrdtSync` part is skipped.
pub fn sync_in_fuzzer(data: &[u8]) {
    sync_decode(data);
    sync_state(data, false);
    sync_state(data, true);
    if cfg!(panic = "abort") {
        return;
    }
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| sync_crdt(data));
    std::panic::set_hook(hook);
    if let Err(payload) = result {
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("(no message)");
        panic!("the CrdtSync part failed (a panic got out of CrdtSync, or a check): {message}");
    }
}

/// Encodes a state message with the encoders `StateSync` uses.
pub fn sync_encode(message: &sync_wire::Message) -> Vec<u8> {
    use sync_wire::Message;
    match message {
        Message::Entries(entries) => {
            let (mut nodes, mut body) = (sync_wire::NodeTable::default(), Vec::new());
            sync_wire::put_varint(&mut body, entries.len() as u64);
            for e in entries {
                let siblings = e.siblings.iter().map(|s| (&s.node, s.counter, s.json.as_deref()));
                sync_wire::put_entry(&mut body, &mut nodes, &e.key, &e.version, e.json.as_deref(), siblings);
            }
            sync_wire::with_nodes(sync_wire::Type::Entries, &nodes, &body)
        }
        Message::Digest(cells) => sync_wire::digest(cells),
        Message::SubDigest(parts) => sync_wire::sub_digest(parts),
        Message::Summaries(leaves) => {
            let (mut nodes, mut body) = (sync_wire::NodeTable::default(), Vec::new());
            sync_wire::put_varint(&mut body, leaves.len() as u64);
            for (leaf, items) in leaves {
                sync_wire::put_leaf(&mut body, &mut nodes, *leaf, items.iter().map(|(k, v)| (k.as_str(), v)));
            }
            sync_wire::with_nodes(sync_wire::Type::Summaries, &nodes, &body)
        }
        Message::WantPrefixes(prefixes) => sync_wire::want_prefixes(prefixes),
        Message::WantKeys(keys) => sync_wire::want_keys(keys.iter().map(String::as_str)),
        Message::Hello => sync_wire::hello(),
    }
}

fn sync_decode(data: &[u8]) {
    let Ok(message) = sync_wire::decode(data, MAX_KEY_LEN, SYNC_MAX_JSON) else { return };
    let encoded = sync_encode(&message);
    let back = sync_wire::decode(&encoded, MAX_KEY_LEN, SYNC_MAX_JSON)
        .unwrap_or_else(|e| panic!("{message:?} re-encoded as {encoded:?} does not decode: {e}"));
    assert_eq!(back, message, "{message:?} changed through its encoding {encoded:?}");
    assert_eq!(sync_encode(&back), encoded, "{message:?} does not re-encode identically");
}

fn sync_state(data: &[u8], operational: bool) {
    let mut s = sync_state_fixture(operational);
    let map = |s: &StateSync| s.get_all().into_iter().map(|(k, v)| (k.to_owned(), v.clone())).collect::<Vec<_>>();
    let (digest, before) = (s.digest(), map(&s));
    s.handle_message(sync_now(), SYNC_UNIX_MS, sync_peer(), data);
    let mut bad = None;
    while let Some(event) = s.poll_event() {
        if let StateEvent::BadMessage { error, .. } = event {
            assert!(bad.is_none(), "two BadMessage events for one message");
            bad = Some(error);
        }
    }
    while s.poll_message().is_some() {}
    let refused = sync_wire::decode(data, MAX_KEY_LEN, SYNC_MAX_JSON).is_err();
    if refused {
        assert!(bad.is_some(), "the decoder refuses it, the replica does not report it");
    }
    if let Some(error) = bad {
        assert!(refused || data.get(1) == Some(&(sync_wire::Type::Entries as u8)), "refused ({error}) though it decodes and is not entries");
        assert_eq!(s.digest(), digest, "refused ({error}), but the digest changed");
        assert_eq!(map(&s), before, "refused ({error}), but the map changed");
    }
}

fn sync_crdt(data: &[u8]) {
    let now = sync_now();
    let mut c = sync_crdt_fixture();
    let before = sync_state_vector(&c);
    c.handle_message(now, sync_peer(), data);
    while c.poll_message().is_some() {}
    let mut bad = None;
    while let Some(event) = c.poll_event() {
        if let CrdtEvent::BadMessage { error, .. } = event {
            bad = Some(error);
        }
    }
    // A known limitation (see `crdt.rs`, "Trust", and the ignored test
    // `crdt_update_refused_while_integrating_is_applied_in_part` in `core/tests/fuzz_corpus.rs`):
    // an update that decodes but that yrs refuses while integrating it may be applied in part.
    if let Some(error) = bad.filter(|_| !sync_crdt_update_decodes(data)) {
        assert_eq!(sync_state_vector(&c), before, "refused ({error}), but the state vector changed");
    }
    // Whatever came in, a member's `SyncStep1` (here: "I have nothing") is still answered.
    let mut step1 = Vec::new();
    sync_wire::put_str(&mut step1, SYNC_DOC);
    step1.extend([0, 0, 1, 0]);
    c.handle_message(now, sync_peer(), &step1);
    while let Some(event) = c.poll_event() {
        assert!(!matches!(event, CrdtEvent::BadMessage { .. }), "a handshake refused after {data:?}: {event:?}");
    }
    assert!(c.poll_message().is_some(), "no answer to a handshake");
}

/// Whether `data` is a y-protocols `SyncStep2` or `Update` whose payload yrs decodes.
pub fn sync_crdt_update_decodes(data: &[u8]) -> bool {
    let payload = || -> Result<&[u8], peerlink::sync::SyncWireError> {
        let mut r = sync_wire::Reader::new(data);
        r.str(usize::MAX)?;
        if r.varint()? != 0 || !matches!(r.varint()?, 1 | 2) {
            return Err(peerlink::sync::SyncWireError::Malformed("not an update".into()));
        }
        let n = r.varint()?;
        r.bytes(usize::try_from(n).unwrap_or(usize::MAX))
    };
    let Ok(payload) = payload() else { return false };
    std::panic::catch_unwind(|| peerlink::yrs::Update::decode_v1(payload).is_ok()).unwrap_or(false)
}

/// Valid messages for the `sync` corpus, from real replicas meeting the fixtures:
/// `(name, bytes)`, written as `seed-<name>` by the ignored test `write_sync_seeds` in
/// `core/tests/fuzz_corpus.rs`. `lww-*` and `op-*` are state messages (both directions of a
/// catch-up, and broadcast changes), `crdt-*` y-protocols messages.
pub fn sync_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = Vec::new();
    for (mode, operational) in [("lww", false), ("op", true)] {
        let mut a = sync_state_replica(operational, sync_me(), "m");
        let mut b = sync_state_replica(operational, sync_peer(), "p");
        let mut ms = SYNC_UNIX_MS + 100;
        // Concurrent with `a`'s writes of the same keys (siblings, in operational mode).
        b.set(sync_now(), ms, "a", serde_json::json!(["x"])).expect("set");
        b.delete(sync_now(), ms, "b").expect("delete");
        b.flush();
        let mut out = Vec::new();
        while let Some(m) = b.poll_message() {
            out.push(m.bytes);
        }
        let mut t = sync_now();
        a.handle_member_up(t, sync_peer());
        b.handle_member_up(t, sync_me());
        for _ in 0..20 {
            let mut moved = false;
            for from in [0, 1] {
                let (x, y) = if from == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
                let sender = if from == 0 { sync_me() } else { sync_peer() };
                while let Some(m) = x.poll_message() {
                    moved = true;
                    y.handle_message(t, ms, sender, &m.bytes);
                    out.push(m.bytes);
                }
            }
            if !moved {
                t += Duration::from_millis(500);
                ms += 500;
                a.handle_timeout(t, ms);
                b.handle_timeout(t, ms);
            }
        }
        out.push(sync_wire::hello());
        let mut unique = HashSet::new();
        out.retain(|m| unique.insert(m.clone()));
        seeds.extend(out.into_iter().enumerate().map(|(i, m)| (format!("{mode}-{i:02}"), m)));
    }
    let now = sync_now();
    let mut a = sync_crdt_replica(sync_me(), 1, "hello");
    let mut b = sync_crdt_replica(sync_peer(), 2, "world");
    a.handle_member_up(now, sync_peer());
    b.handle_member_up(now, sync_me());
    let mut out = Vec::new();
    for round in 0..4 {
        if round == 2 {
            let doc = b.doc(SYNC_DOC).expect("open").clone();
            let (t, m, arr) = (doc.get_or_insert_text("text"), doc.get_or_insert_map("shared"), doc.get_or_insert_array("array"));
            let mut txn = doc.transact_mut();
            t.insert(&mut txn, 2, "--");
            t.remove_range(&mut txn, 0, 1);
            m.remove(&mut txn, "world");
            m.insert(&mut txn, "k", "v");
            arr.insert(&mut txn, 0, 7);
            arr.remove(&mut txn, 1);
            drop(txn);
            b.flush(now);
            b.set_awareness(now, SYNC_DOC, Some(serde_json::json!({"cursor": 3, "name": "b"}))).expect("awareness");
        }
        for from in [0, 1] {
            let (x, y) = if from == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
            let sender = if from == 0 { sync_me() } else { sync_peer() };
            while let Some(m) = x.poll_message() {
                y.handle_message(now, sender, &m.bytes);
                out.push(m.bytes);
            }
        }
    }
    b.set_awareness(now, SYNC_DOC, None).expect("awareness");
    out.extend(std::iter::from_fn(|| b.poll_message()).map(|m| m.bytes));
    let mut unique = HashSet::new();
    out.retain(|m| unique.insert(m.clone()));
    seeds.extend(out.into_iter().enumerate().map(|(i, m)| (format!("crdt-{i:02}"), m)));
    seeds
}

// ---- e2e --------------------------------------------------------------------------------

/// [`e2e`] input whose first byte is this (modulo 4): the rest is one key-exchange message
/// to the manager with nothing under way ([`e2e_idle`]).
pub const E2E_MODE_IDLE: u8 = 0;
/// ... to the manager that has offered to both peers ([`e2e_offered`]).
pub const E2E_MODE_OFFERED: u8 = 1;
/// ... to the manager that has answered both peers ([`e2e_answered`]).
pub const E2E_MODE_ANSWERED: u8 = 2;
/// [`e2e`] input whose first byte is this (modulo 4): the rest is a program of deliveries
/// (see [`e2e_decrypt`]).
pub const E2E_MODE_DECRYPT: u8 = 3;
/// Bytes of a genuine answer and finish (`e2e::exchange`'s `ANSWER_LEN`, `FINISH_LEN`).
const E2E_ANSWER_LEN: usize = 2 + 32 + 65 + 65 + 64 + 32;
const E2E_FINISH_LEN: usize = 2 + 65 + 64 + 32;
/// Epochs a receiver moves forward in one step (`e2e`'s `MAX_EPOCH_JUMP`).
const E2E_MAX_EPOCH_JUMP: u32 = 4;
/// Associated data the sealed messages are sealed with (by index).
const E2E_AADS: [&[u8]; 3] = [b"", b"room", b"room/other"];
/// Most operations taken from one decrypt program, and most messages sealed in one.
const E2E_MAX_OPS: usize = 96;
const E2E_MAX_SEALED: usize = 4096;

/// The identities of the exchange fixtures and the genuine messages they answer.
pub struct E2eFixtures {
    /// The manager under test.
    pub me: Identity,
    /// Its two peers, one with a smaller fingerprint than `me` and one with a greater (both
    /// ways of resolving simultaneous offers).
    pub peers: [Identity; 2],
    /// The offers the peers make to `me` (what [`e2e_answered`] answers).
    pub offers: [Vec<u8>; 2],
    /// The peers' genuine answers to the offers of [`e2e_offered`].
    pub answers: [Vec<u8>; 2],
    /// The peers' genuine finishes to the answers of [`e2e_answered`].
    pub finishes: [Vec<u8>; 2],
    /// A complete exchange between the same identities, made earlier with other keys:
    /// `[offer, answer, finish]` with peer 0 as the initiator (old signatures for the corpus).
    pub stale: [Vec<u8>; 3],
}

fn e2e_identity(seed: u64) -> Identity {
    Identity::generate(&mut ChaCha20Rng::seed_from_u64(seed))
}

/// The exchange fixtures (built once: every manager is rebuilt from them per input, so the
/// same input always meets the same keys and nonces).
pub fn e2e_fixtures() -> &'static E2eFixtures {
    static FIXTURES: OnceLock<E2eFixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let me = e2e_identity(7001);
        // One peer on each side of `me` in fingerprint order.
        let mut lower = None;
        let mut upper = None;
        for seed in 7002.. {
            let id = e2e_identity(seed);
            if id.fingerprint() < me.fingerprint() {
                lower.get_or_insert(id);
            } else {
                upper.get_or_insert(id);
            }
            if lower.is_some() && upper.is_some() {
                break;
            }
        }
        let peers = [lower.expect("a lower peer"), upper.expect("an upper peer")];
        let mf = me.fingerprint();
        let peer_manager = |k: usize, seed: u64| GroupKeyManager::new(peers[k].clone(), seed);
        let offers = [0, 1].map(|k| peer_manager(k, 7100 + k as u64).exchange_with(mf).expect("offer"));
        let (_, my_offers) = e2e_offered_with(&me, &peers);
        let answers = [0, 1].map(|k| {
            peer_manager(k, 7200 + k as u64).handle_incoming_key_exchange(mf, &my_offers[k]).expect("answer").expect("an answer")
        });
        let (_, my_answers) = e2e_answered_with(&me, &peers, &offers);
        let finishes = [0, 1].map(|k| {
            let mut p = peer_manager(k, 7100 + k as u64);
            p.exchange_with(mf).expect("the same offer again");
            p.handle_incoming_key_exchange(mf, &my_answers[k]).expect("finish").expect("a finish")
        });
        let mut old_me = GroupKeyManager::new(me.clone(), 7300);
        let mut old_peer = peer_manager(0, 7301);
        let offer = old_peer.exchange_with(mf).expect("offer");
        let answer = old_me.handle_incoming_key_exchange(peers[0].fingerprint(), &offer).expect("answer").expect("an answer");
        let finish = old_peer.handle_incoming_key_exchange(mf, &answer).expect("finish").expect("a finish");
        E2eFixtures { me, peers, offers, answers, finishes, stale: [offer, answer, finish] }
    })
}

fn e2e_offered_with(me: &Identity, peers: &[Identity; 2]) -> (GroupKeyManager, [Vec<u8>; 2]) {
    let mut m = GroupKeyManager::new(me.clone(), 7400);
    let offers = [0, 1].map(|k| m.exchange_with(peers[k].fingerprint()).expect("offer"));
    (m, offers)
}

fn e2e_answered_with(me: &Identity, peers: &[Identity; 2], offers: &[Vec<u8>; 2]) -> (GroupKeyManager, [Vec<u8>; 2]) {
    let mut m = GroupKeyManager::new(me.clone(), 7500);
    let answers = [0, 1].map(|k| m.handle_incoming_key_exchange(peers[k].fingerprint(), &offers[k]).expect("answer").expect("an answer"));
    while m.poll_event().is_some() {}
    (m, answers)
}

/// The manager with nothing under way.
pub fn e2e_idle() -> GroupKeyManager {
    GroupKeyManager::new(e2e_fixtures().me.clone(), 7600)
}

/// The manager that has offered to both peers ([`E2eFixtures::answers`] complete them).
pub fn e2e_offered() -> GroupKeyManager {
    let f = e2e_fixtures();
    e2e_offered_with(&f.me, &f.peers).0
}

/// The manager that has answered both peers' offers ([`E2eFixtures::finishes`] complete
/// them).
pub fn e2e_answered() -> GroupKeyManager {
    let f = e2e_fixtures();
    e2e_answered_with(&f.me, &f.peers, &f.offers).0
}

/// What a manager holds for one peer: a session (its id) and whether an exchange is under way.
type E2ePeerState = (Option<[u8; 8]>, bool);

fn e2e_peer_state(m: &GroupKeyManager, peer: &Fingerprint) -> E2ePeerState {
    assert_eq!(m.has_session(peer), m.session(peer).is_some());
    (m.session(peer).map(|s| s.id()), m.is_exchanging(peer))
}

/// `data` as one e2e input: by its first byte (modulo 4), a key-exchange message to a
/// manager in one of three states ([`e2e_exchange`]) or a program of deliveries to a derived
/// session ([`e2e_decrypt`]). (One state per input: the fixtures cost public-key operations,
/// which the fuzzer's instrumentation makes slow.)
pub fn e2e(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        E2E_MODE_DECRYPT => e2e_decrypt(rest),
        state => e2e_exchange(state, rest),
    }
}

/// `msg` as a key-exchange message from each peer in turn (then from the first again) to a
/// manager in `state` ([`E2E_MODE_IDLE`], [`E2E_MODE_OFFERED`], [`E2E_MODE_ANSWERED`]).
/// Nothing panics; an `Err` leaves every session and exchange as it was and reports nothing
/// (and, for a message of the length of an exchange message, the exchange under way still
/// completes afterwards with the genuine message); an `Ok` is either an offer answered (an
/// exchange under way, the session if any untouched) or the genuine answer or finish this
/// state expects, byte for byte: no session is ever established from anything else.
pub fn e2e_exchange(state: u8, msg: &[u8]) {
    let f = e2e_fixtures();
    let (mut m, genuine) = match state {
        E2E_MODE_IDLE => (e2e_idle(), None),
        E2E_MODE_OFFERED => (e2e_offered(), Some(&f.answers)),
        _ => (e2e_answered(), Some(&f.finishes)),
    };
    let fps = f.peers.each_ref().map(Identity::fingerprint);
    let exchange_len = [2 + 32 + 65, E2E_ANSWER_LEN, E2E_FINISH_LEN].contains(&msg.len());
    for k in [0, 1] {
        let expected = genuine.map(|g| &g[k]).filter(|_| !m.has_session(&fps[k]));
        let failed = e2e_exchange_step(&mut m, &fps, k, msg, expected.map(Vec::as_slice));
        // An error changed nothing: the exchange under way completes as it would have.
        if let (Some(err), Some(g), true) = (failed, expected, exchange_len) {
            m.handle_incoming_key_exchange(fps[k], g).unwrap_or_else(|e| panic!("state {state}, peer {k}: after {err} the genuine message fails: {e}"));
            assert!(m.has_session(&fps[k]), "state {state}, peer {k}: after {err} the genuine message makes no session");
            while m.poll_event().is_some() {}
        }
    }
    // Once more from peer 0, which may have a session now (never replaced from fuzz input).
    e2e_exchange_step(&mut m, &fps, 0, msg, None);
}

/// One message from peer `k`; returns the error, if it failed.
fn e2e_exchange_step(m: &mut GroupKeyManager, fps: &[Fingerprint; 2], k: usize, msg: &[u8], genuine: Option<&[u8]>) -> Option<E2eError> {
    let before = fps.map(|p| e2e_peer_state(m, &p));
    let result = m.handle_incoming_key_exchange(fps[k], msg);
    let events: Vec<KeyExchangeEvent> = std::iter::from_fn(|| m.poll_event()).collect();
    let after = fps.map(|p| e2e_peer_state(m, &p));
    assert_eq!(after[1 - k], before[1 - k], "a message from one peer changed the other's state ({result:?})");
    let is_genuine = genuine == Some(msg);
    match result {
        Err(e) => {
            assert_eq!(after, before, "refused ({e}), but the state changed");
            assert!(events.is_empty(), "refused ({e}), but reported {events:?}");
            assert!(!is_genuine, "the genuine message is refused: {e}");
            Some(e)
        }
        Ok(Some(reply)) if msg.get(1) == Some(&1) => {
            // An offer: answered with this side's signed key, an exchange under way, the
            // session (if any) still the old one.
            assert_eq!(reply.len(), E2E_ANSWER_LEN);
            assert_eq!(reply[..2], [msg[0], 2]);
            assert_eq!(reply[99..164], e2e_fixtures().me.public_key().to_sec1());
            assert_eq!(after[k], (before[k].0, true), "an offer answered");
            assert!(events.is_empty(), "an offer answered, but reported {events:?}");
            None
        }
        Ok(Some(reply)) if msg.get(1) == Some(&3) && !is_genuine => {
            // The finish of the session in place, again (its confirm was lost): confirmed
            // again, nothing else.
            assert!(before[k].0.is_some(), "a finish with no session is confirmed ({msg:?})");
            assert_eq!((reply.len(), reply[1]), (peerlink::e2e::exchange::CONFIRM_LEN, 4));
            assert_eq!(after, before, "a repeated finish changed the state");
            assert!(events.is_empty(), "a repeated finish reported {events:?}");
            None
        }
        Ok(reply) => {
            assert!(is_genuine, "a session from a message that is not the genuine one ({msg:?})");
            let want = match msg.get(1) {
                Some(&2) => Some(E2E_FINISH_LEN),
                _ => Some(peerlink::e2e::exchange::CONFIRM_LEN),
            };
            assert_eq!(reply.as_ref().map(Vec::len), want);
            let id = after[k].0.expect("a session");
            assert!(!after[k].1 && before[k].0 != Some(id), "{before:?} -> {after:?}");
            let established = KeyExchangeEvent::Established { peer: fps[k], session: id };
            if msg.get(1) == Some(&2) {
                // The initiator waits for the confirm.
                assert_eq!(events, [established]);
            } else {
                assert_eq!(events, [established, KeyExchangeEvent::Confirmed { peer: fps[k], session: id }]);
            }
            None
        }
    }
}

/// What a receiver must do with the genuine messages of one peer: which epochs it holds and
/// which counters of them it accepted (the module docs' rules, written out).
#[derive(Default)]
struct E2eReceiverModel {
    epoch: u32,
    window: E2eWindowModel,
    prev: Option<(u32, E2eWindowModel)>,
}

#[derive(Default, Clone)]
struct E2eWindowModel {
    /// One more than the highest counter accepted.
    top: u64,
    accepted: HashSet<u64>,
}

impl E2eWindowModel {
    fn check(&self, counter: u64) -> Result<(), E2eError> {
        if counter >= self.top {
            Ok(())
        } else if self.top - 1 - counter >= peerlink::e2e::REPLAY_WINDOW {
            Err(E2eError::TooOld { counter })
        } else if self.accepted.contains(&counter) {
            Err(E2eError::Replay { counter })
        } else {
            Ok(())
        }
    }

    fn mark(&mut self, counter: u64) {
        self.accepted.insert(counter);
        self.top = self.top.max(counter + 1);
    }
}

impl E2eReceiverModel {
    /// The outcome for a genuine message of `epoch` and `counter` (`OldKey`'s fields aside).
    fn predict(&self, epoch: u32, counter: u64) -> Result<(), E2eError> {
        if epoch == self.epoch {
            self.window.check(counter)
        } else if let Some((_, w)) = self.prev.as_ref().filter(|(e, _)| *e == epoch) {
            w.check(counter)
        } else if epoch > self.epoch && epoch - self.epoch <= E2E_MAX_EPOCH_JUMP {
            Ok(())
        } else {
            Err(E2eError::OldKey { session: String::new(), epoch })
        }
    }

    fn accept(&mut self, epoch: u32, counter: u64) {
        if epoch == self.epoch {
            self.window.mark(counter);
        } else if let Some((_, w)) = self.prev.as_mut().filter(|(e, _)| *e == epoch) {
            w.mark(counter);
        } else {
            let mut window = E2eWindowModel::default();
            window.mark(counter);
            let previous = std::mem::replace(&mut self.window, window);
            // The epoch just before stays: the old current one, or a skipped one (empty).
            self.prev = Some(if self.epoch + 1 == epoch { (self.epoch, previous) } else { (epoch - 1, E2eWindowModel::default()) });
            self.epoch = epoch;
        }
    }
}

/// A message sealed by a peer of the receiver.
struct E2eSealed {
    /// Index of the sender in [`E2eBench::peers`].
    from: usize,
    bytes: Vec<u8>,
    aad: usize,
    plain: Vec<u8>,
}

/// A receiver `b` with sessions with two senders `a` and `c` (derived with
/// `E2e::derive_key`), everything they sealed for it, and what it must have accepted.
struct E2eBench {
    b: E2e,
    senders: [E2e; 2],
    peers: [Fingerprint; 2],
    receiver: Fingerprint,
    sealed: Vec<E2eSealed>,
    /// Messages `b` sealed for `a` (not for `b` to open).
    decoys: Vec<Vec<u8>>,
    accepted: HashSet<usize>,
    models: [E2eReceiverModel; 2],
}

fn e2e_fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

impl E2eBench {
    fn new(limits: Limits) -> Self {
        let rng = |seed: u64| ChaCha20Rng::seed_from_u64(seed);
        let (af, bf, cf) = (e2e_fp(0x10), e2e_fp(0x20), e2e_fp(0x30));
        let mut a = E2e::new(af, &mut rng(8001)).with_limits(limits);
        let mut b = E2e::new(bf, &mut rng(8002)).with_limits(limits);
        let mut c = E2e::new(cf, &mut rng(8003)).with_limits(limits);
        let (pa, pb, pc) = (*a.public_key(), *b.public_key(), *c.public_key());
        a.derive_key(bf, &pb).expect("derive");
        c.derive_key(bf, &pb).expect("derive");
        b.derive_key(af, &pa).expect("derive");
        b.derive_key(cf, &pc).expect("derive");
        let mut bench = E2eBench {
            b,
            senders: [a, c],
            peers: [af, cf],
            receiver: bf,
            sealed: Vec::new(),
            decoys: Vec::new(),
            accepted: HashSet::new(),
            models: Default::default(),
        };
        for i in 0..12 {
            bench.seal(0, i % 3);
        }
        for (i, aad) in E2E_AADS.iter().enumerate() {
            bench.seal(1, i);
            let decoy = bench.b.encrypt(&af, format!("decoy {i}").as_bytes(), aad).expect("seal");
            bench.decoys.push(decoy);
        }
        bench
    }

    fn seal(&mut self, from: usize, aad: usize) -> usize {
        let n = self.sealed.len();
        let plain: Vec<u8> = format!("{from}:{n}:").bytes().cycle().take(3 + n % 5 * 9).collect();
        let bytes = self.senders[from].encrypt(&self.receiver, &plain, E2E_AADS[aad]).expect("seal");
        self.sealed.push(E2eSealed { from, bytes, aad, plain });
        n
    }

    /// `message` with `aad` from peer `from`: opened exactly if it is a genuine message the
    /// model accepts, refused as the model says if it is genuine, refused otherwise.
    fn deliver(&mut self, from: usize, message: &[u8], aad: &[u8]) {
        let genuine = self.sealed.iter().position(|s| s.from == from && s.bytes == message && E2E_AADS[s.aad] == aad);
        let result = self.b.decrypt(&self.peers[from], message, aad);
        let Some(i) = genuine else {
            if let Ok(plain) = result {
                panic!("a message never sealed opened: {message:?} (aad {aad:?}, from peer {from}) -> {plain:?}");
            }
            return;
        };
        let epoch = u32::from_be_bytes(message[9..13].try_into().expect("4 bytes"));
        let counter = u64::from_be_bytes(message[13..21].try_into().expect("8 bytes"));
        let model = &mut self.models[from];
        match (model.predict(epoch, counter), result) {
            (Ok(()), Ok(plain)) => {
                assert_eq!(plain, self.sealed[i].plain, "message {i} opened to something else");
                assert!(self.accepted.insert(i), "message {i} accepted twice");
                model.accept(epoch, counter);
            }
            (Err(E2eError::OldKey { .. }), Err(E2eError::OldKey { epoch: got, .. })) => assert_eq!(got, epoch),
            (Err(want), Err(got)) => assert_eq!(got, want, "genuine message {i} (epoch {epoch}, counter {counter})"),
            (want, got) => panic!("genuine message {i} (epoch {epoch}, counter {counter}, accepted before: {}): expected {want:?}, got {:?}", self.accepted.contains(&i), got.map(|_| "opened")),
        }
    }
}

/// Reads a decrypt program.
struct E2eProgram<'a> {
    data: &'a [u8],
}

impl E2eProgram<'_> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.data.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.data = rest;
        b
    }

    fn index(&mut self, len: usize) -> usize {
        (u16::from_le_bytes([self.byte(), self.byte()]) as usize) % len.max(1)
    }
}

/// A program of deliveries to a receiver with sessions derived with two senders (see
/// [`E2eBench`]); its first byte sets the rekeying limits (low bits: a few messages per key,
/// or the default; bit 4: a few bytes per key), then operations, each a byte and its
/// arguments:
///
/// * `0`: a sender seals 1..16 more messages;
/// * `1`: a sealed message delivered as it is (from its sender or the other, with its
///   associated data or another);
/// * `2`: a sealed message or a decoy (sealed by the receiver) delivered after 1..4 edits:
///   bytes flipped, set, cut, appended, the epoch or counter changed, the header or the body
///   swapped with another message's;
/// * `3`: raw bytes from the program as a message;
/// * `4`: a message from a peer with no session (`NoKey`);
/// * `5`: a sender seals 64..1280 more messages (past the replay window).
///
/// Checked: nothing that was not sealed by the peer for this associated data ever opens; a
/// genuine message opens exactly when the model says (once, to its plaintext; inside the
/// replay window, current, previous or a few next epochs) and is otherwise refused as the
/// model says; so an error never changes what later messages do. At the end every sender
/// seals a fresh message, then its last 64 undelivered ones are delivered in order, through
/// the same checks.
pub fn e2e_decrypt(program: &[u8]) {
    let mut p = E2eProgram { data: program };
    let lim = p.byte();
    let messages = if lim & 0x08 != 0 { 1 << 24 } else { 1 + u64::from(lim & 0x07) };
    let bytes = if lim & 0x10 != 0 { 24 + u64::from(lim >> 5) * 16 } else { 1 << 36 };
    let mut t = E2eBench::new(Limits::new(messages, bytes));
    for _ in 0..E2E_MAX_OPS {
        if p.data.is_empty() {
            break;
        }
        match p.byte() % 6 {
            0 => {
                let (from, n) = (usize::from(p.byte() & 1), 1 + p.byte() % 16);
                for _ in 0..n {
                    if t.sealed.len() < E2E_MAX_SEALED {
                        let aad = usize::from(p.byte() % 3);
                        t.seal(from, aad);
                    }
                }
            }
            1 => {
                let i = p.index(t.sealed.len());
                let how = p.byte();
                let s = &t.sealed[i];
                let from = if how & 1 != 0 { 1 - s.from } else { s.from };
                let aad = if how & 2 != 0 { usize::from(how >> 2) % 3 } else { s.aad };
                let message = s.bytes.clone();
                t.deliver(from, &message, E2E_AADS[aad]);
            }
            2 => {
                let pick = p.index(t.sealed.len() + t.decoys.len());
                let (mut m, from, aad) = match t.sealed.get(pick) {
                    Some(s) => (s.bytes.clone(), s.from, s.aad),
                    None => (t.decoys[pick - t.sealed.len()].clone(), 0, 0),
                };
                let edits = 1 + p.byte() % 4;
                for _ in 0..edits {
                    let (kind, pos, val) = (p.byte() % 8, p.index(m.len()), p.byte());
                    match kind {
                        0 | 1 if !m.is_empty() => m[pos] = if kind == 0 { m[pos] ^ val } else { val },
                        2 => m.truncate(pos),
                        3 => m.insert(pos.min(m.len()), val),
                        4 if m.len() >= 21 => {
                            let epoch = u32::from_be_bytes(m[9..13].try_into().expect("4 bytes")).wrapping_add(i32::from(val as i8) as u32);
                            m[9..13].copy_from_slice(&epoch.to_be_bytes());
                        }
                        5 if m.len() >= 21 => {
                            let counter = u64::from_be_bytes(m[13..21].try_into().expect("8 bytes"));
                            let counter = if val == 0x80 { u64::MAX } else { counter.wrapping_add(i64::from(val as i8) as u64) };
                            m[13..21].copy_from_slice(&counter.to_be_bytes());
                        }
                        6 | 7 if m.len() >= 21 => {
                            let other = &t.sealed[pos % t.sealed.len()].bytes;
                            if kind == 6 {
                                m[..21].copy_from_slice(&other[..21]);
                            } else {
                                m.truncate(21);
                                m.extend_from_slice(&other[21..]);
                            }
                        }
                        _ => {}
                    }
                }
                let how = p.byte();
                let from = if how & 1 != 0 { 1 - from } else { from };
                let aad = if how & 2 != 0 { usize::from(how >> 2) % 3 } else { aad };
                t.deliver(from, &m, E2E_AADS[aad]);
            }
            3 => {
                let how = p.byte();
                let len = usize::from(p.byte()).min(p.data.len());
                let (m, rest) = p.data.split_at(len);
                p.data = rest;
                t.deliver(usize::from(how & 1), m, E2E_AADS[usize::from(how >> 1) % 3]);
            }
            4 => {
                let i = p.index(t.sealed.len());
                let stranger = e2e_fp(0x40 + p.byte() % 4);
                let r = t.b.decrypt(&stranger, &t.sealed[i].bytes, E2E_AADS[t.sealed[i].aad]);
                assert_eq!(r, Err(E2eError::NoKey(stranger)));
            }
            _ => {
                let (from, n) = (usize::from(p.byte() & 1), 64 * (1 + usize::from(p.byte() % 20)));
                for k in 0..n.min(E2E_MAX_SEALED.saturating_sub(t.sealed.len())) {
                    t.seal(from, k % 3);
                }
            }
        }
    }
    // Whatever came before, fresh messages and the undelivered ones get what the model says.
    for from in [0, 1] {
        let i = t.seal(from, 1);
        let m = t.sealed[i].bytes.clone();
        t.deliver(from, &m, E2E_AADS[1]);
        let pending: Vec<usize> = (0..t.sealed.len()).filter(|i| t.sealed[*i].from == from && !t.accepted.contains(i)).collect();
        for i in pending.iter().copied().skip(pending.len().saturating_sub(64)) {
            let (m, aad) = (t.sealed[i].bytes.clone(), t.sealed[i].aad);
            t.deliver(from, &m, E2E_AADS[aad]);
        }
    }
}

/// Seeds for the `e2e` corpus, written as `seed-<name>` by the ignored test
/// `write_e2e_seeds` in `core/tests/fuzz_corpus.rs`: `x-<state>-*` genuine exchange messages
/// (the peers' offers, the genuine answers and finishes the fixtures expect, and an exchange
/// between the same identities made earlier) to the manager in that state, `d-*` decrypt
/// programs (a genuine sealed
/// message as raw bytes, in-order and reordered deliveries across rekeying, replays, edits,
/// wrong peer or associated data, a skip past the replay window).
pub fn e2e_seeds() -> Vec<(String, Vec<u8>)> {
    let f = e2e_fixtures();
    let x = |state: u8, m: &[u8]| [&[state][..], m].concat();
    let (idle, offered, answered) = (E2E_MODE_IDLE, E2E_MODE_OFFERED, E2E_MODE_ANSWERED);
    let mut seeds = vec![
        ("x-idle-offer-0".to_owned(), x(idle, &f.offers[0])),
        ("x-offered-offer-0".to_owned(), x(offered, &f.offers[0])),
        ("x-offered-offer-1".to_owned(), x(offered, &f.offers[1])),
        ("x-answered-offer-1".to_owned(), x(answered, &f.offers[1])),
        ("x-offered-answer-0".to_owned(), x(offered, &f.answers[0])),
        ("x-offered-answer-1".to_owned(), x(offered, &f.answers[1])),
        ("x-answered-finish-0".to_owned(), x(answered, &f.finishes[0])),
        ("x-answered-finish-1".to_owned(), x(answered, &f.finishes[1])),
        ("x-offered-stale-answer".to_owned(), x(offered, &f.stale[1])),
        ("x-answered-stale-finish".to_owned(), x(answered, &f.stale[2])),
    ];
    let d = |program: &[u8]| [&[E2E_MODE_DECRYPT][..], program].concat();
    // A genuine message (the first `a` sealed, limits: 3 per key) as raw bytes.
    let first = E2eBench::new(Limits::new(3, 1 << 36)).sealed[0].bytes.clone();
    let mut raw = vec![0x02, 3, 0, u8::try_from(first.len()).expect("a short message")];
    raw.extend_from_slice(&first);
    seeds.push(("d-raw".to_owned(), d(&raw)));
    // Everything in order (4 per key), then replays.
    let mut in_order = vec![0x03];
    for i in 0..15u16 {
        in_order.extend([1, i.to_le_bytes()[0], 0, 0]);
    }
    in_order.extend([1, 0, 0, 0, 1, 5, 0, 0]);
    seeds.push(("d-in-order".to_owned(), d(&in_order)));
    // Reordered across epochs (2 per key): stragglers, jumps, old keys.
    let mut reordered = vec![0x01];
    for i in [1u8, 0, 3, 2, 6, 4, 5, 11, 7, 10, 9, 8] {
        reordered.extend([1, i, 0, 0]);
    }
    seeds.push(("d-reordered".to_owned(), d(&reordered)));
    // Edits of genuine messages, then the genuine ones.
    let mut edits = vec![0x08];
    for (i, kind) in [(0u8, 0u8), (1, 4), (2, 5), (3, 6), (4, 7), (5, 2), (6, 3), (7, 1)] {
        edits.extend([2, i, 0, 0, kind, 21, 0, 1, 0]);
    }
    for i in 0..8u8 {
        edits.extend([1, i, 0, 0]);
    }
    seeds.push(("d-edits".to_owned(), d(&edits)));
    // The wrong sender, the wrong associated data, a stranger, then right.
    seeds.push(("d-wrong-peer-aad".to_owned(), d(&[0x08, 1, 12, 0, 1, 1, 0, 0, 0b110, 4, 0, 0, 0, 1, 12, 0, 0, 1, 0, 0, 0])));
    // Many messages, delivered newest first and then one past the window; decoys edited.
    seeds.push(("d-skip-window".to_owned(), d(&[0x08, 5, 0, 17, 1, 0x8e, 0x04, 0, 1, 0, 0, 0, 1, 1, 0, 0, 2, 0x8f, 0x04, 0, 0, 1, 0, 1, 0])));
    // Rekeying by bytes (bit 4: a few bytes per key) with sealing on the way.
    seeds.push(("d-bytes-limit".to_owned(), d(&[0x38, 0, 0, 6, 0, 1, 2, 0, 1, 2, 1, 1, 14, 0, 0, 1, 16, 0, 0, 1, 13, 0, 0, 1, 17, 0, 0, 1, 3, 0, 0])));
    seeds
}

/// `turn_decode`: arbitrary bytes through the TURN codec (never panics; ChannelData that
/// decodes re-encodes to the same channel and data) and, as a datagram from the server, into a
/// `TurnClient` with an allocation, a permission being created and a channel being bound:
/// whatever it hands back as relayed data is part of the input, and its next deadline after
/// `handle_timeout` is later than the time it was called with.
pub fn turn_decode(data: &[u8]) {
    use peerlink::turn::codec::{self, Class, Encoder, LongTermKey};
    use peerlink::turn::{TurnClient, TurnConfig, TurnCredentials};
    if let Ok(m) = codec::decode(data) {
        let _ = m.verify(&LongTermKey::new("u", "r", "p"));
    }
    if let Ok((channel, payload)) = codec::decode_channel_data(data) {
        let again = codec::encode_channel_data(channel, payload, true);
        assert_eq!(codec::decode_channel_data(&again), Ok((channel, payload)));
    }
    let server = std::net::SocketAddr::from(([127, 0, 0, 1], 3478));
    let peer = std::net::SocketAddr::from(([127, 0, 0, 2], 4000));
    let now = Instant::now();
    let credentials = TurnCredentials { username: "u".into(), password: "p".into() };
    let mut client = TurnClient::new(server, server, credentials, TurnConfig::default(), 0, now);
    // 401, then a signed success: the scripted server's half of the Allocate.
    let answer = |client: &mut TurnClient, reply: &dyn Fn(&codec::Message<'_>) -> Vec<u8>| {
        let request = client.poll_transmit().expect("a request").contents;
        let request = codec::decode(&request).expect("our own request decodes");
        let bytes = reply(&request);
        client.handle_datagram(now, server, &bytes);
    };
    answer(&mut client, &|r| {
        let mut e = Encoder::new(r.method, Class::Error, r.transaction);
        e.error_code(401, "Unauthorized").realm("r").nonce("n");
        e.finish(None, true)
    });
    answer(&mut client, &|r| {
        let mut e = Encoder::new(r.method, Class::Success, r.transaction);
        e.xor_relayed_address(server).xor_mapped_address(server).lifetime(600);
        e.finish(Some(&LongTermKey::new("u", "r", "p")), true)
    });
    assert!(client.relayed().is_some(), "the scripted allocation succeeds");
    client.create_permission(now, peer.ip()).unwrap();
    client.bind_channel(now, peer).unwrap();
    while client.poll_transmit().is_some() {}
    if let Some((_, payload)) = client.handle_datagram(now, server, data) {
        let range = data.as_ptr_range();
        assert!(range.contains(&payload.as_ptr()) || payload.is_empty(), "relayed data comes from the datagram");
    }
    while client.poll_event().is_some() {}
    if let Some(t) = client.poll_timeout() {
        client.handle_timeout(t);
        assert!(client.poll_timeout().is_none_or(|next| next > t), "the deadline moves forward");
    }
}
