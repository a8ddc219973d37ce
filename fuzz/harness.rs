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
//! The `node_inputs` target (real `Node`s on `peerlink-sim`) keeps its harness in its own file,
//! `fuzz_targets/node_inputs.rs`: it needs `peerlink-sim`, which `peerlink`'s tests cannot
//! depend on, so its corpus is replayed by the `peerlink-tests` crate instead.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use peerlink::identity::Identity;
use peerlink::peer::signal::{self, Signal};
use peerlink::protocol::{self, ClientMessage, PROTOCOL_VERSION, ServerMessage};
use peerlink::server::{ConnId, RateLimit, Server, ServerConfig, ServerTransmit};
use peerlink::stun::{self, StunError, StunMessage};
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
