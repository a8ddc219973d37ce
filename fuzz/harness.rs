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
            let _ = check_room_batch(text);
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

fn sync_now() -> Instant {
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
