//! Sans-IO tests of the server core on virtual time: no sockets, no threads.

// A test changes one or two settings of the defaults it names; that reads best as assignments.
#![allow(clippy::field_reassign_with_default)]

use super::*;
use crate::identity::Identity;
use crate::protocol::{ClientMessage, ServerMessage, decode_server, register_context};
use rand::SeedableRng;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet, VecDeque};

const UNIX_MS: u64 = 1_700_000_000_000;

fn ident(seed: u64) -> Identity {
    Identity::generate(&mut ChaCha20Rng::seed_from_u64(seed))
}

/// A server on a virtual clock with raw-frame "clients" identified by connection id.
struct H {
    s: Server,
    base: Instant,
    now: Instant,
    rng: ChaCha20Rng,
    nonce: HashMap<ConnId, String>,
    inbox: HashMap<ConnId, VecDeque<ServerMessage>>,
    closed: HashMap<ConnId, CloseCode>,
    /// Connections whose flushed bytes are never reported (slow consumers).
    unacked: HashSet<ConnId>,
    next_conn: u64,
}

impl H {
    fn new(cfg: ServerConfig) -> Self {
        let base = Instant::now();
        H {
            s: Server::new(cfg, 7, base, UNIX_MS),
            base,
            now: base,
            rng: ChaCha20Rng::seed_from_u64(99),
            nonce: HashMap::new(),
            inbox: HashMap::new(),
            closed: HashMap::new(),
            unacked: HashSet::new(),
            next_conn: 1,
        }
    }

    fn default() -> Self {
        Self::new(ServerConfig::default())
    }

    /// Drains every transmit into the per-connection inboxes.
    fn pump(&mut self) {
        while let Some(t) = self.s.poll_transmit() {
            match t {
                ServerTransmit::Text { conn, text } => {
                    assert!(!self.closed.contains_key(&conn), "frame to {conn:?} after its close: {text}");
                    if !self.unacked.contains(&conn) {
                        self.s.handle_sent(conn, text.len());
                    }
                    let msg = decode_server(&text).unwrap_or_else(|e| panic!("server sent undecodable {text}: {e}"));
                    if let ServerMessage::Challenge { nonce, .. } = &msg {
                        self.nonce.insert(conn, nonce.clone());
                    }
                    self.inbox.entry(conn).or_default().push_back(msg);
                }
                ServerTransmit::Close { conn, code } => {
                    assert!(self.closed.insert(conn, code).is_none(), "{conn:?} closed twice");
                }
            }
        }
        // `list_rooms` trusts its index of open rooms: it must match the rooms after every input.
        let open: Vec<&String> = {
            let mut v: Vec<&String> =
                self.s.rooms.iter().filter(|(_, r)| r.members.len() < r.max_size as usize).map(|(id, _)| id).collect();
            v.sort();
            v
        };
        assert!(self.s.open_rooms.iter().eq(open), "open room index out of step with the rooms");
    }

    /// Opens a connection and consumes its challenge (which must be its first frame).
    fn connect(&mut self) -> ConnId {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.connect_as(conn);
        conn
    }

    fn connect_as(&mut self, conn: ConnId) {
        self.closed.remove(&conn);
        self.s.handle_connect(conn, self.now).unwrap();
        self.pump();
        let first = self.inbox.get_mut(&conn).and_then(|q| q.pop_front());
        match first {
            Some(ServerMessage::Challenge { version, server_id, auth_required, .. }) => {
                assert_eq!(version, PROTOCOL_VERSION);
                assert_eq!(server_id, self.s.config().server_id);
                assert_eq!(auth_required, self.s.config().auth.is_some());
            }
            other => panic!("first frame is not a challenge: {other:?}"),
        }
    }

    fn send(&mut self, conn: ConnId, text: &str) {
        self.s.handle_message(conn, self.now, text).unwrap();
        self.pump();
    }

    fn req(&mut self, conn: ConnId, v: Value) -> Vec<ServerMessage> {
        self.send(conn, &v.to_string());
        self.take(conn)
    }

    /// Sends a request and returns its single reply.
    fn one(&mut self, conn: ConnId, v: Value) -> ServerMessage {
        let mut out = self.req(conn, v.clone());
        assert_eq!(out.len(), 1, "expected one reply to {v}, got {out:?}");
        out.pop().unwrap()
    }

    fn take(&mut self, conn: ConnId) -> Vec<ServerMessage> {
        self.inbox.get_mut(&conn).map(|q| q.drain(..).collect()).unwrap_or_default()
    }

    fn register_frame(&mut self, conn: ConnId, id: &Identity, req_id: u64, token: Option<&str>) -> String {
        let nonce = self.nonce[&conn].clone();
        let server_id = self.s.config().server_id.clone();
        let alias = format!("peer-{}", id.fingerprint().short());
        ClientMessage::register(req_id, id, &mut self.rng, &server_id, &nonce, &alias, None, token).encode()
    }

    /// Registers `id` on `conn` and returns every frame sent to it in reply.
    fn register(&mut self, conn: ConnId, id: &Identity) -> Vec<ServerMessage> {
        let frame = self.register_frame(conn, id, 1, None);
        self.send(conn, &frame);
        self.take(conn)
    }

    /// Connects and registers a fresh identity from `seed`.
    fn peer(&mut self, seed: u64) -> (ConnId, Identity) {
        let id = ident(seed);
        let conn = self.connect();
        let out = self.register(conn, &id);
        assert!(
            matches!(&out[..], [ServerMessage::Registered { fingerprint, resumed: false, .. }] if *fingerprint == id.fingerprint()),
            "{out:?}"
        );
        (conn, id)
    }

    #[allow(dead_code)]
    fn set_now(&mut self, t: Instant) {
        assert!(t >= self.now);
        self.now = t;
    }

    #[allow(dead_code)]
    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.s.handle_timeout(self.now).unwrap();
        self.pump();
    }

    /// Jumps to the earliest deadline and handles it; false when there is none.
    fn step(&mut self) -> bool {
        let Some(t) = self.s.poll_timeout() else { return false };
        self.now = self.now.max(t);
        self.s.handle_timeout(self.now).unwrap();
        self.pump();
        if let Some(next) = self.s.poll_timeout() {
            assert!(next > self.now, "poll_timeout did not move past {:?}", self.now - self.base);
        }
        true
    }

    /// Steps through every deadline up to `base + at`, then sets the clock there.
    fn run_until(&mut self, at: Duration) {
        let end = self.base + at;
        while self.s.poll_timeout().is_some_and(|t| t <= end) {
            self.step();
        }
        self.now = self.now.max(end);
    }

    fn disconnect(&mut self, conn: ConnId) {
        self.s.handle_disconnect(conn, self.now).unwrap();
        self.pump();
    }
}

/// The payloads of `msgs`, which must all be relays from `sender`.
fn relays_from(msgs: &[ServerMessage], sender: &Identity) -> Vec<Value> {
    msgs.iter()
        .map(|m| match m {
            ServerMessage::Relay { from, payload } => {
                assert_eq!(*from, sender.fingerprint());
                payload.to_value()
            }
            other => panic!("expected a relay from {}, got {other:?}", sender.fingerprint().short()),
        })
        .collect()
}

fn error_of(msg: &ServerMessage) -> (Option<u64>, ErrorCode) {
    match msg {
        ServerMessage::Error { id, code, .. } => (*id, *code),
        other => panic!("expected an error, got {other:?}"),
    }
}

fn peer_fps(peers: &[PeerInfo]) -> Vec<Fingerprint> {
    peers.iter().map(|p| p.fingerprint).collect()
}

fn join(h: &mut H, conn: ConnId, ns: &str, id: u64) -> Vec<ServerMessage> {
    h.req(conn, json!({"type": "join", "id": id, "namespace": ns}))
}

fn joined_peers(msgs: &[ServerMessage]) -> Vec<Fingerprint> {
    match msgs {
        [ServerMessage::Joined { peers, total, .. }] => {
            assert_eq!(*total, peers.len());
            peer_fps(peers)
        }
        other => panic!("expected one joined, got {other:?}"),
    }
}

// ---- registration ---------------------------------------------------------------------------

#[test]
fn challenge_first_then_register_yields_sha256_of_the_key_as_fingerprint() {
    let mut h = H::default();
    let id = ident(1);
    let conn = h.connect();
    let out = h.register(conn, &id);
    let key = B64.decode(id.public_key().to_base64()).unwrap();
    let expected = Fingerprint::from_bytes(Sha256::digest(&key).into());
    match &out[..] {
        [ServerMessage::Registered { id: 1, fingerprint, resumed: false, namespaces, rooms, missed: 0, .. }] => {
            assert_eq!(*fingerprint, expected);
            assert!(namespaces.is_empty() && rooms.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.s.stats().active_sessions, 1);
    // Registering again on the same connection is refused.
    let frame = h.register_frame(conn, &id, 2, None);
    h.send(conn, &frame);
    assert_eq!(error_of(&h.take(conn)[0]), (Some(2), ErrorCode::AlreadyRegistered));
}

#[test]
fn challenges_carry_fresh_nonces() {
    let mut h = H::default();
    let a = h.connect();
    let b = h.connect();
    assert_ne!(h.nonce[&a], h.nonce[&b]);
    assert_eq!(B64.decode(&h.nonce[&a]).unwrap().len(), 32);
}

#[test]
fn signature_by_another_key_is_bad_signature() {
    let mut h = H::default();
    let (me, other) = (ident(1), ident(2));
    let conn = h.connect();
    let nonce = h.nonce[&conn].clone();
    let sig = other.sign(&mut h.rng, &register_context("peerlink", &nonce)).to_base64();
    let frame = ClientMessage::Register {
        id: 4,
        version: PROTOCOL_VERSION,
        public_key: me.public_key().to_base64().into(),
        alias: "".into(),
        meta: None,
        signature: sig.into(),
        token: None,
    }
    .encode();
    h.send(conn, &frame);
    assert_eq!(error_of(&h.take(conn)[0]), (Some(4), ErrorCode::BadSignature));
    assert_eq!(h.s.stats().active_sessions, 0);
    assert!(!h.closed.contains_key(&conn), "one failure does not close");
}

#[test]
fn register_replayed_from_another_connection_is_bad_signature() {
    let mut h = H::default();
    let id = ident(1);
    let a = h.connect();
    let b = h.connect();
    let captured = h.register_frame(a, &id, 1, None);
    h.send(b, &captured);
    assert_eq!(error_of(&h.take(b)[0]), (Some(1), ErrorCode::BadSignature));
    // A signature for another server id does not verify either.
    let nonce = h.nonce[&b].clone();
    let forged = ClientMessage::register(2, &id, &mut h.rng, "other-server", &nonce, "", None, None).encode();
    h.send(b, &forged);
    assert_eq!(error_of(&h.take(b)[0]), (Some(2), ErrorCode::BadSignature));
    // The original connection can still use it.
    h.send(a, &captured);
    assert!(matches!(h.take(a)[..], [ServerMessage::Registered { .. }]));
}

#[test]
fn three_failed_registrations_close_with_1008() {
    let mut h = H::default();
    let id = ident(1);
    let a = h.connect();
    let b = h.connect();
    let foreign = h.register_frame(a, &id, 1, None);
    for i in 0..3 {
        assert!(!h.closed.contains_key(&b), "closed after {i} failures");
        h.send(b, &foreign);
        assert_eq!(error_of(&h.take(b)[0]).1, ErrorCode::BadSignature);
    }
    assert_eq!(h.closed.get(&b), Some(&CloseCode::PolicyViolation));
    assert_eq!(h.s.stats().connections, 1);
}

#[test]
fn unsupported_version_and_bad_key_are_refused() {
    let mut h = H::default();
    let id = ident(1);
    let c = h.connect();
    let frame = h.register_frame(c, &id, 3, None);
    let mut v: Value = serde_json::from_str(&frame).unwrap();
    v["version"] = json!(2);
    assert_eq!(error_of(&h.one(c, v.clone())), (Some(3), ErrorCode::UnsupportedVersion));
    v["version"] = json!(1);
    v["public_key"] = json!("AAAA");
    assert_eq!(error_of(&h.one(c, v)), (Some(3), ErrorCode::InvalidField));
}

#[test]
fn requests_before_registering_get_not_registered() {
    let mut h = H::default();
    let c = h.connect();
    for (i, v) in [
        json!({"type": "join", "id": 10, "namespace": "n"}),
        json!({"type": "ping", "id": 11}),
        json!({"type": "relay", "id": 12, "to": ident(3).fingerprint().to_string(), "payload": 1}),
        json!({"type": "create_room", "id": 13, "room_id": "r"}),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(error_of(&h.one(c, v)), (Some(10 + i as u64), ErrorCode::NotRegistered));
    }
    assert_eq!(h.s.stats().namespaces, 0);
    assert_eq!(h.s.stats().rooms, 0);
}

#[test]
fn malformed_frames_get_their_codes_with_the_request_id_when_readable() {
    let mut h = H::default();
    let (c, _) = h.peer(1);
    let cases: &[(&str, Option<u64>, ErrorCode)] = &[
        (r#"{"type":"warp","id":5}"#, Some(5), ErrorCode::UnknownType),
        (r#"{"id":6}"#, Some(6), ErrorCode::MissingField),
        (r#"{"type":"join","id":7}"#, Some(7), ErrorCode::MissingField),
        (r#"{"type":"ping"}"#, None, ErrorCode::MissingField),
        (r#"{"type":"join","id":8,"namespace":5}"#, Some(8), ErrorCode::InvalidField),
        (r#"{"type":5,"id":9}"#, Some(9), ErrorCode::InvalidField),
        (r#"{"type":"join","id":10,"namespace":""}"#, Some(10), ErrorCode::InvalidField),
        (r#"{"type":"match","id":11,"namespace":"n","group_size":1}"#, Some(11), ErrorCode::InvalidField),
        (r#"{"type":"relay","id":12,"to":"nothex","payload":1}"#, Some(12), ErrorCode::InvalidField),
        (r#"{"type":"join","id":"x","namespace":"n"}"#, None, ErrorCode::InvalidField),
        (r#"{"type":"join","id":13"#, None, ErrorCode::BadJson),
        ("not json", None, ErrorCode::BadJson),
        ("[1,2]", None, ErrorCode::BadJson),
        ("42", None, ErrorCode::BadJson),
        ("", None, ErrorCode::BadJson),
    ];
    for (text, id, code) in cases {
        h.send(c, text);
        let out = h.take(c);
        assert_eq!(out.len(), 1, "{text}: {out:?}");
        assert_eq!(error_of(&out[0]), (*id, *code), "{text}");
    }
    assert!(!h.closed.contains_key(&c), "bad frames do not close the connection");
    // Still serving.
    assert_eq!(h.one(c, json!({"type": "ping", "id": 99})), ServerMessage::Pong { id: 99 });
}

#[test]
fn relay_or_broadcast_carrying_from_is_invalid_field() {
    let mut h = H::default();
    let (a, ida) = h.peer(1);
    let (b, idb) = h.peer(2);
    join(&mut h, a, "n", 1);
    join(&mut h, b, "n", 1);
    h.take(a);
    let forged = json!({"type": "relay", "id": 3, "to": idb.fingerprint().to_string(),
        "from": ida.fingerprint().to_string(), "payload": {"x": 1}});
    assert_eq!(error_of(&h.one(a, forged)), (Some(3), ErrorCode::InvalidField));
    let forged = json!({"type": "broadcast", "id": 4, "namespace": "n", "from": idb.fingerprint().to_string(), "payload": 1});
    assert_eq!(error_of(&h.one(a, forged)), (Some(4), ErrorCode::InvalidField));
    assert!(h.take(b).is_empty(), "nothing delivered");
}

#[test]
fn binary_frame_closes_with_1003() {
    let mut h = H::default();
    let c = h.connect();
    h.s.handle_binary(c, h.now, b"\x00\x01").unwrap();
    h.pump();
    assert_eq!(h.closed.get(&c), Some(&CloseCode::UnsupportedData));
    assert_eq!(h.s.stats().connections, 0);
}

#[test]
fn oversized_frame_closes_with_1009() {
    let mut cfg = ServerConfig::default();
    cfg.max_frame_size = 400;
    let mut h = H::new(cfg);
    let (c, _) = h.peer(1);
    let ok = format!(r#"{{"type":"ping","id":1,"pad":"{}"}}"#, "x".repeat(400 - 31));
    assert_eq!(ok.len(), 400);
    h.send(c, &ok);
    assert_eq!(h.take(c), vec![ServerMessage::Pong { id: 1 }]);
    let big = format!(r#"{{"type":"ping","id":1,"pad":"{}"}}"#, "x".repeat(401 - 31));
    h.send(c, &big);
    assert!(h.take(c).is_empty());
    assert_eq!(h.closed.get(&c), Some(&CloseCode::MessageTooBig));
}

#[test]
fn flooding_gets_one_rate_limited_error_then_silence_then_1008() {
    let mut cfg = ServerConfig::default();
    cfg.rate_limit = RateLimit { per_second: 10, burst: 4 };
    cfg.flood_close_after = 5;
    let mut h = H::new(cfg);
    let (c, _) = h.peer(1); // one token
    for i in 0..3 {
        assert_eq!(h.one(c, json!({"type": "ping", "id": i})), ServerMessage::Pong { id: i });
    }
    // Bucket empty: the first drop is reported with its id, the rest are silent.
    assert_eq!(error_of(&h.one(c, json!({"type": "ping", "id": 50}))), (Some(50), ErrorCode::RateLimited));
    for i in 0..4 {
        assert!(h.req(c, json!({"type": "ping", "id": 51 + i})).is_empty());
    }
    assert!(!h.closed.contains_key(&c), "5 drops are tolerated");
    // The bucket refills with time: a frame gets through and resets the run.
    h.set_now(h.now + Duration::from_millis(100));
    assert_eq!(h.one(c, json!({"type": "ping", "id": 60})), ServerMessage::Pong { id: 60 });
    assert_eq!(error_of(&h.one(c, json!({"type": "ping", "id": 61}))), (Some(61), ErrorCode::RateLimited));
    for i in 0..4 {
        assert!(h.req(c, json!({"type": "ping", "id": 62 + i})).is_empty());
    }
    assert!(!h.closed.contains_key(&c));
    assert!(h.req(c, json!({"type": "ping", "id": 70})).is_empty());
    assert_eq!(h.closed.get(&c), Some(&CloseCode::PolicyViolation));
}

#[test]
fn the_33rd_namespace_is_too_many_namespaces() {
    let mut h = H::default();
    let (c, _) = h.peer(1);
    for i in 0..32 {
        joined_peers(&join(&mut h, c, &format!("ns{i}"), i));
    }
    assert_eq!(error_of(&join(&mut h, c, "one-more", 40)[0]), (Some(40), ErrorCode::TooManyNamespaces));
    // Re-joining one it is in is still fine.
    joined_peers(&join(&mut h, c, "ns3", 41));
    assert_eq!(h.s.stats().namespaces, 32);
}

#[test]
fn unregistered_connection_is_closed_with_4003_at_the_register_timeout() {
    let mut h = H::default();
    let c = h.connect();
    let (r, _) = h.peer(1);
    h.run_until(Duration::from_secs(10) - Duration::from_millis(1));
    assert!(!h.closed.contains_key(&c));
    h.run_until(Duration::from_secs(10));
    assert_eq!(h.closed.get(&c), Some(&CloseCode::RegisterTimeout));
    assert!(!h.closed.contains_key(&r), "registered connections are not affected");
}

#[test]
fn silent_connection_is_closed_with_4000_at_the_idle_timeout() {
    let mut h = H::default();
    let (quiet, _) = h.peer(1);
    let (chatty, _) = h.peer(2);
    for s in [20, 40, 59, 79] {
        h.run_until(Duration::from_secs(s));
        assert!(h.req(chatty, json!({"type": "ping", "id": s})).len() == 1);
    }
    assert_eq!(h.closed.get(&quiet), Some(&CloseCode::IdleTimeout));
    assert!(!h.closed.contains_key(&chatty), "frames keep a connection alive");
    h.run_until(Duration::from_secs(79 + 60));
    assert_eq!(h.closed.get(&chatty), Some(&CloseCode::IdleTimeout));
}

#[test]
fn reused_conn_id_is_not_closed_by_its_predecessors_register_timer() {
    let mut h = H::default();
    let c = h.connect();
    h.disconnect(c);
    h.run_until(Duration::from_secs(8));
    h.connect_as(c);
    h.run_until(Duration::from_secs(12));
    assert!(!h.closed.contains_key(&c), "closed by a stale timer 2 s after connecting");
    h.run_until(Duration::from_secs(18));
    assert_eq!(h.closed.get(&c), Some(&CloseCode::RegisterTimeout));
}

// ---- namespaces ------------------------------------------------------------------------------

#[test]
fn three_peers_join_exactly_as_the_multi_peer_signaling_exchange() {
    let mut h = H::default();
    let (a, ia) = h.peer(1);
    let (b, ib) = h.peer(2);
    let (c, ic) = h.peer(3);
    let (fa, fb, fc) = (ia.fingerprint(), ib.fingerprint(), ic.fingerprint());

    assert_eq!(joined_peers(&join(&mut h, a, "lobby", 1)), vec![]);

    assert_eq!(joined_peers(&join(&mut h, b, "lobby", 1)), vec![fa]);
    match &h.take(a)[..] {
        [ServerMessage::PeerJoined { namespace, peer }] => assert_eq!((namespace.as_str(), peer.fingerprint), ("lobby", fb)),
        other => panic!("{other:?}"),
    }

    assert_eq!(joined_peers(&join(&mut h, c, "lobby", 1)), vec![fa, fb]);
    for x in [a, b] {
        match &h.take(x)[..] {
            [ServerMessage::PeerJoined { namespace, peer }] => assert_eq!((namespace.as_str(), peer.fingerprint), ("lobby", fc)),
            other => panic!("{other:?}"),
        }
    }

    h.send(c, r#"{"type":"bye"}"#);
    assert_eq!(h.closed.get(&c), Some(&CloseCode::Normal));
    assert!(h.take(c).is_empty());
    for x in [a, b] {
        assert_eq!(h.take(x), vec![ServerMessage::PeerLeft { namespace: "lobby".into(), fingerprint: fc }]);
    }
    assert_eq!(h.s.stats().active_sessions, 2);
    assert_eq!(h.s.stats().parked_sessions, 0, "bye ends the session at once");
}

#[test]
fn join_is_idempotent_and_notifies_nobody() {
    let mut h = H::default();
    let (a, _) = h.peer(1);
    let (b, ib) = h.peer(2);
    join(&mut h, a, "n", 1);
    join(&mut h, b, "n", 1);
    h.take(a);
    assert_eq!(joined_peers(&join(&mut h, b, "n", 2)), joined_peers(&join(&mut h, b, "n", 3)));
    assert!(h.take(a).is_empty());
    // Only one membership: one leave ends it, a second is not_in_namespace.
    assert_eq!(h.one(b, json!({"type": "leave", "id": 4, "namespace": "n"})), ServerMessage::Ok { id: 4 });
    assert_eq!(h.take(a), vec![ServerMessage::PeerLeft { namespace: "n".into(), fingerprint: ib.fingerprint() }]);
    assert_eq!(
        error_of(&h.one(b, json!({"type": "leave", "id": 5, "namespace": "n"}))),
        (Some(5), ErrorCode::NotInNamespace)
    );
}

#[test]
fn leaving_the_last_member_removes_the_namespace() {
    let mut h = H::default();
    let (a, _) = h.peer(1);
    join(&mut h, a, "n", 1);
    assert_eq!(h.s.stats().namespaces, 1);
    assert_eq!(h.one(a, json!({"type": "leave", "id": 2, "namespace": "n"})), ServerMessage::Ok { id: 2 });
    assert_eq!(h.s.stats().namespaces, 0);
}

#[test]
fn discover_lists_members_without_joining_and_honours_limit() {
    let mut h = H::default();
    let (a, ia) = h.peer(1);
    let (b, ib) = h.peer(2);
    let (d, _) = h.peer(3);
    h.req(a, json!({"type": "join", "id": 1, "namespace": "n", "app_type": "game", "app_version": "1.2"}));
    join(&mut h, b, "n", 1);
    h.take(a);
    match h.one(d, json!({"type": "discover", "id": 2, "namespace": "n"})) {
        ServerMessage::Discovered { id: 2, namespace, peers } => {
            assert_eq!(namespace, "n");
            assert_eq!(peer_fps(&peers), vec![ia.fingerprint(), ib.fingerprint()]);
            assert_eq!(peers[0].app_type.as_deref(), Some("game"));
            assert_eq!(peers[0].app_version.as_deref(), Some("1.2"));
        }
        other => panic!("{other:?}"),
    }
    match h.one(d, json!({"type": "discover", "id": 3, "namespace": "n", "limit": 1})) {
        ServerMessage::Discovered { peers, .. } => assert_eq!(peer_fps(&peers), vec![ia.fingerprint()]),
        other => panic!("{other:?}"),
    }
    match h.one(d, json!({"type": "discover", "id": 4, "namespace": "empty"})) {
        ServerMessage::Discovered { peers, .. } => assert!(peers.is_empty()),
        other => panic!("{other:?}"),
    }
    assert!(h.take(a).is_empty() && h.take(b).is_empty(), "discover notifies nobody");
    assert_eq!(h.s.stats().namespaces, 1);
}

#[test]
fn relay_reaches_only_its_target_with_server_stamped_from() {
    let mut h = H::default();
    let (a, ia) = h.peer(1);
    let (b, ib) = h.peer(2);
    let (c, _) = h.peer(3);
    let payload = json!({"sdp": "offer", "n": [1, 2, 3]});
    let out = h.req(a, json!({"type": "relay", "id": 7, "to": ib.fingerprint().to_string(), "payload": payload}));
    assert_eq!(out, vec![ServerMessage::Ok { id: 7 }]);
    match &h.take(b)[..] {
        [ServerMessage::Relay { from, payload: p }] => {
            assert_eq!(*from, ia.fingerprint());
            assert_eq!(p.to_value(), payload);
        }
        other => panic!("{other:?}"),
    }
    assert!(h.take(c).is_empty());
    // Fire-and-forget: no ok.
    assert!(h.req(a, json!({"type": "relay", "to": ib.fingerprint().to_string(), "payload": 1})).is_empty());
    assert_eq!(h.take(b).len(), 1);
}

#[test]
fn relay_to_an_unknown_peer_is_peer_not_found() {
    let mut h = H::default();
    let (a, _) = h.peer(1);
    let nobody = ident(50).fingerprint().to_string();
    assert_eq!(
        error_of(&h.one(a, json!({"type": "relay", "id": 3, "to": nobody, "payload": 1}))),
        (Some(3), ErrorCode::PeerNotFound)
    );
    assert_eq!(
        error_of(&h.one(a, json!({"type": "relay", "to": nobody, "payload": 1}))),
        (None, ErrorCode::PeerNotFound)
    );
}

#[test]
fn broadcast_reaches_every_other_member_and_nobody_outside() {
    let mut h = H::default();
    let (a, ia) = h.peer(1);
    let (b, _) = h.peer(2);
    let (c, _) = h.peer(3);
    let (out, _) = h.peer(4);
    for x in [a, b, c] {
        join(&mut h, x, "n", 1);
    }
    join(&mut h, out, "other", 1);
    for x in [a, b, c, out] {
        h.take(x);
    }
    assert_eq!(
        h.req(a, json!({"type": "broadcast", "id": 9, "namespace": "n", "payload": {"hi": true}})),
        vec![ServerMessage::Ok { id: 9 }]
    );
    for x in [b, c] {
        match &h.take(x)[..] {
            [ServerMessage::Broadcast { from, namespace, payload }] => {
                assert_eq!((*from, namespace.as_str()), (ia.fingerprint(), "n"));
                assert_eq!(payload.to_value(), json!({"hi": true}));
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(h.take(out).is_empty());
    assert_eq!(
        error_of(&h.one(out, json!({"type": "broadcast", "id": 10, "namespace": "n", "payload": 1}))),
        (Some(10), ErrorCode::NotInNamespace)
    );
    assert!(h.take(a).is_empty() && h.take(b).is_empty());
}

// ---- matchmaking -----------------------------------------------------------------------------

fn match_req(h: &mut H, conn: ConnId, id: u64, criteria: Value, size: u32) -> Vec<ServerMessage> {
    h.req(conn, json!({"type": "match", "id": id, "namespace": "m", "criteria": criteria, "group_size": size}))
}

#[test]
fn match_forms_groups_only_among_equal_criteria_regardless_of_key_order() {
    let mut h = H::default();
    let peers: Vec<(ConnId, Identity)> = (1..=5).map(|i| h.peer(i)).collect();
    let eu = json!({"region": "eu", "mode": "duel"});
    let us = json!({"region": "us", "mode": "duel"});
    assert!(match_req(&mut h, peers[0].0, 100, eu.clone(), 3).is_empty());
    assert!(match_req(&mut h, peers[1].0, 200, us.clone(), 3).is_empty());
    // Same criteria, keys in the other order, as raw text.
    h.send(peers[2].0, r#"{"type":"match","id":300,"namespace":"m","criteria":{"mode":"duel","region":"eu"},"group_size":3}"#);
    assert!(h.take(peers[2].0).is_empty());
    // Same criteria, other group size: separate queue.
    assert!(match_req(&mut h, peers[3].0, 400, eu.clone(), 2).is_empty());
    assert_eq!(h.s.stats().pending_matches, 4);
    // The third eu/3 request completes the group.
    let last = match_req(&mut h, peers[4].0, 500, eu.clone(), 3);
    let mut sessions = HashSet::new();
    let mut orders = HashSet::new();
    let group = [(peers[0].0, 100), (peers[2].0, 300), (peers[4].0, 500)];
    for (conn, want_id) in group {
        let msgs = if conn == peers[4].0 { last.clone() } else { h.take(conn) };
        match &msgs[..] {
            [ServerMessage::Matched { id, namespace, session_id, peers: members }] => {
                assert_eq!(*id, want_id, "each member gets its own request id");
                assert_eq!(namespace, "m");
                sessions.insert(session_id.clone());
                orders.insert(peer_fps(members));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sessions.len(), 1);
    assert_eq!(orders.len(), 1);
    let order = orders.into_iter().next().unwrap();
    assert_eq!(order, vec![peers[0].1.fingerprint(), peers[2].1.fingerprint(), peers[4].1.fingerprint()]);
    assert!(h.take(peers[1].0).is_empty() && h.take(peers[3].0).is_empty());
    assert_eq!(h.s.stats().pending_matches, 2);
}

#[test]
fn consecutive_matches_get_fresh_session_ids() {
    let mut h = H::default();
    let (a, _) = h.peer(1);
    let (b, _) = h.peer(2);
    let mut ids = Vec::new();
    for round in 0..2 {
        match_req(&mut h, a, round, json!({}), 2);
        match &match_req(&mut h, b, round, json!({}), 2)[..] {
            [ServerMessage::Matched { session_id, .. }] => ids.push(session_id.clone()),
            other => panic!("{other:?}"),
        }
        h.take(a);
    }
    assert_ne!(ids[0], ids[1]);
}

#[test]
fn match_times_out_with_match_timeout() {
    let mut h = H::default();
    let (a, _) = h.peer(1);
    assert!(match_req(&mut h, a, 8, json!({"k": 1}), 2).is_empty());
    h.run_until(Duration::from_secs(30));
    // Keep the connection alive past the idle timeout.
    h.req(a, json!({"type": "ping", "id": 1}));
    h.run_until(Duration::from_secs(60) - Duration::from_millis(1));
    assert!(h.take(a).is_empty());
    h.run_until(Duration::from_secs(60));
    assert_eq!(error_of(&h.take(a)[0]), (Some(8), ErrorCode::MatchTimeout));
    assert_eq!(h.s.stats().pending_matches, 0);
    // A late partner starts a new queue rather than matching the expired request.
    let (b, _) = h.peer(2);
    assert!(match_req(&mut h, b, 9, json!({"k": 1}), 2).is_empty());
}

#[test]
fn cancel_match_withdraws_the_request_and_a_new_match_replaces_the_old() {
    let mut h = H::default();
    let (a, _) = h.peer(1);
    let (b, _) = h.peer(2);
    match_req(&mut h, a, 1, json!({}), 2);
    let out = h.req(a, json!({"type": "cancel_match", "id": 2, "namespace": "m"}));
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(error_of(&out[0]), (Some(1), ErrorCode::MatchCancelled));
    assert_eq!(out[1], ServerMessage::Ok { id: 2 });
    assert_eq!(h.s.stats().pending_matches, 0);
    assert!(match_req(&mut h, b, 3, json!({}), 2).is_empty(), "the cancelled request does not match");
    assert_eq!(
        error_of(&h.one(a, json!({"type": "cancel_match", "id": 4, "namespace": "m"}))),
        (Some(4), ErrorCode::InvalidField)
    );
    // Replace: the old request fails with match_cancelled.
    match_req(&mut h, a, 5, json!({"x": 1}), 2);
    let out = match_req(&mut h, a, 6, json!({"x": 2}), 2);
    assert_eq!(error_of(&out[0]), (Some(5), ErrorCode::MatchCancelled));
    assert_eq!(h.s.stats().pending_matches, 2);
}

// ---- rooms -----------------------------------------------------------------------------------

#[test]
fn room_create_join_info_full_and_exists() {
    let mut h = H::default();
    let (o, io) = h.peer(1);
    let (b, ib) = h.peer(2);
    let (c, _) = h.peer(3);
    match h.one(o, json!({"type": "create_room", "id": 1, "room_id": "r", "config": {"max_size": 2, "metadata": {"game": "chess"}}})) {
        ServerMessage::RoomCreated { id: 1, room_id, owner, max_size: 2, metadata } => {
            assert_eq!((room_id.as_str(), owner), ("r", io.fingerprint()));
            assert_eq!(metadata.unwrap().to_value(), json!({"game": "chess"}));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        error_of(&h.one(c, json!({"type": "create_room", "id": 2, "room_id": "r"}))),
        (Some(2), ErrorCode::RoomExists)
    );
    match h.one(b, json!({"type": "join_room", "id": 3, "room_id": "r"})) {
        ServerMessage::RoomJoined { id: 3, owner, peers, max_size: 2, .. } => {
            assert_eq!(owner, io.fingerprint());
            assert_eq!(peer_fps(&peers), vec![io.fingerprint()]);
        }
        other => panic!("{other:?}"),
    }
    match &h.take(o)[..] {
        [ServerMessage::RoomPeerJoined { room_id, peer }] => assert_eq!((room_id.as_str(), peer.fingerprint), ("r", ib.fingerprint())),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        error_of(&h.one(c, json!({"type": "join_room", "id": 4, "room_id": "r"}))),
        (Some(4), ErrorCode::RoomFull)
    );
    match h.one(c, json!({"type": "room_info", "id": 5, "room_id": "r"})) {
        ServerMessage::RoomInfo { id: 5, members: 2, max_size: 2, owner, .. } => assert_eq!(owner, io.fingerprint()),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        error_of(&h.one(c, json!({"type": "join_room", "id": 6, "room_id": "nope"}))),
        (Some(6), ErrorCode::RoomNotFound)
    );
    assert_eq!(
        error_of(&h.one(c, json!({"type": "create_room", "id": 7, "room_id": "big", "config": {"max_size": 1000}}))),
        (Some(7), ErrorCode::InvalidField)
    );
}

#[test]
fn owner_kick_tells_the_target_kicked_and_the_rest_kicked_true() {
    let mut h = H::default();
    let (o, _) = h.peer(1);
    let (b, ib) = h.peer(2);
    let (c, _) = h.peer(3);
    h.one(o, json!({"type": "create_room", "id": 1, "room_id": "r"}));
    h.one(b, json!({"type": "join_room", "id": 1, "room_id": "r"}));
    h.one(c, json!({"type": "join_room", "id": 1, "room_id": "r"}));
    h.take(o);
    h.take(b);
    assert_eq!(
        error_of(&h.one(c, json!({"type": "kick", "id": 2, "room_id": "r", "fingerprint": ib.fingerprint().to_string()}))),
        (Some(2), ErrorCode::NotRoomOwner)
    );
    assert!(h.take(b).is_empty());
    let out = h.req(o, json!({"type": "kick", "id": 3, "room_id": "r", "fingerprint": ib.fingerprint().to_string()}));
    let left = ServerMessage::RoomPeerLeft { room_id: "r".into(), fingerprint: ib.fingerprint(), kicked: true };
    assert_eq!(out, vec![left.clone(), ServerMessage::Ok { id: 3 }]);
    assert_eq!(h.take(c), vec![left]);
    assert_eq!(h.take(b), vec![ServerMessage::Kicked { room_id: "r".into() }]);
    assert_eq!(
        error_of(&h.one(o, json!({"type": "kick", "id": 4, "room_id": "r", "fingerprint": ib.fingerprint().to_string()}))),
        (Some(4), ErrorCode::NotInRoom)
    );
    match h.one(b, json!({"type": "room_info", "id": 5, "room_id": "r"})) {
        ServerMessage::RoomInfo { members: 2, .. } => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn close_room_tells_every_other_member_and_removes_it() {
    let mut h = H::default();
    let (o, _) = h.peer(1);
    let (b, _) = h.peer(2);
    h.one(o, json!({"type": "create_room", "id": 1, "room_id": "r"}));
    h.one(b, json!({"type": "join_room", "id": 1, "room_id": "r"}));
    h.take(o);
    assert_eq!(
        error_of(&h.one(b, json!({"type": "close_room", "id": 2, "room_id": "r"}))),
        (Some(2), ErrorCode::NotRoomOwner)
    );
    assert_eq!(h.one(o, json!({"type": "close_room", "id": 3, "room_id": "r"})), ServerMessage::Ok { id: 3 });
    assert_eq!(h.take(b), vec![ServerMessage::RoomClosed { room_id: "r".into() }]);
    assert_eq!(h.s.stats().rooms, 0);
    assert_eq!(
        error_of(&h.one(b, json!({"type": "leave_room", "id": 4, "room_id": "r"}))),
        (Some(4), ErrorCode::NotInRoom)
    );
    // Both may be in another 16 rooms: the closed one no longer counts.
    for i in 0..16 {
        assert!(matches!(h.one(b, json!({"type": "create_room", "id": 10 + i, "room_id": format!("b{i}")})), ServerMessage::RoomCreated { .. }));
    }
    assert_eq!(
        error_of(&h.one(b, json!({"type": "create_room", "id": 30, "room_id": "b16"}))),
        (Some(30), ErrorCode::TooManyRooms)
    );
}

#[test]
fn empty_room_is_removed_after_room_ttl_unless_rejoined() {
    let mut h = H::default();
    let (o, _) = h.peer(1);
    h.one(o, json!({"type": "create_room", "id": 1, "room_id": "r"}));
    h.one(o, json!({"type": "create_room", "id": 2, "room_id": "kept"}));
    assert_eq!(h.one(o, json!({"type": "leave_room", "id": 3, "room_id": "r"})), ServerMessage::Ok { id: 3 });
    assert_eq!(h.one(o, json!({"type": "leave_room", "id": 4, "room_id": "kept"})), ServerMessage::Ok { id: 4 });
    h.run_until(Duration::from_secs(30));
    h.req(o, json!({"type": "ping", "id": 5}));
    assert!(matches!(h.one(o, json!({"type": "join_room", "id": 6, "room_id": "kept"})), ServerMessage::RoomJoined { .. }));
    h.run_until(Duration::from_secs(60) - Duration::from_millis(1));
    assert_eq!(h.s.stats().rooms, 2);
    h.run_until(Duration::from_secs(60));
    assert_eq!(h.s.stats().rooms, 1);
    assert_eq!(
        error_of(&h.one(o, json!({"type": "room_info", "id": 7, "room_id": "r"}))),
        (Some(7), ErrorCode::RoomNotFound)
    );
}

fn list_rooms(h: &mut H, conn: ConnId, v: Value) -> Vec<(String, u32, usize)> {
    match h.one(conn, v) {
        ServerMessage::Rooms { rooms, .. } => rooms.into_iter().map(|r| (r.room_id, r.max_size, r.members)).collect(),
        other => panic!("{other:?}"),
    }
}

fn listed(rooms: &[(&str, u32, usize)]) -> Vec<(String, u32, usize)> {
    rooms.iter().map(|(id, max, n)| (id.to_string(), *max, *n)).collect()
}

#[test]
fn list_rooms_lists_open_rooms_by_prefix_in_id_order() {
    let mut h = H::default();
    let (o, io) = h.peer(1);
    let (b, _) = h.peer(2);
    let (c, _) = h.peer(3);
    let rooms = [("game-b", 2), ("game-a", 3), ("game-full", 1), ("chat", 4), ("gamer", 2)];
    for (i, (room, max)) in rooms.into_iter().enumerate() {
        let config = json!({"max_size": max, "metadata": {"n": i}});
        h.one(o, json!({"type": "create_room", "id": i, "room_id": room, "config": config}));
    }
    match h.one(c, json!({"type": "list_rooms", "id": 9, "prefix": "game-"})) {
        ServerMessage::Rooms { id: 9, rooms } => {
            let ids: Vec<&str> = rooms.iter().map(|r| r.room_id.as_str()).collect();
            assert_eq!(ids, ["game-a", "game-b"], "sorted, prefix only, the full room left out");
            assert_eq!(rooms[0].owner, io.fingerprint());
            assert_eq!((rooms[0].max_size, rooms[0].members), (3, 1));
            assert_eq!(rooms[0].metadata.as_ref().unwrap().to_value(), json!({"n": 1}));
        }
        other => panic!("{other:?}"),
    }
    let all = listed(&[("chat", 4, 1), ("game-a", 3, 1), ("game-b", 2, 1), ("gamer", 2, 1)]);
    assert_eq!(list_rooms(&mut h, c, json!({"type": "list_rooms", "id": 10})), all);
    assert_eq!(list_rooms(&mut h, c, json!({"type": "list_rooms", "id": 11, "prefix": ""})), all);
    assert_eq!(list_rooms(&mut h, c, json!({"type": "list_rooms", "id": 12, "prefix": null})), all);
    assert_eq!(list_rooms(&mut h, c, json!({"type": "list_rooms", "id": 13, "prefix": "game-b-"})), vec![]);
    assert_eq!(list_rooms(&mut h, c, json!({"type": "list_rooms", "id": 14, "prefix": "z"})), vec![]);
    assert!(h.take(o).is_empty() && h.take(b).is_empty(), "list_rooms notifies nobody");

    // A room drops out of the list when it fills up and comes back when someone leaves.
    h.one(b, json!({"type": "join_room", "id": 20, "room_id": "game-b"}));
    let games = json!({"type": "list_rooms", "id": 21, "prefix": "game"});
    assert_eq!(list_rooms(&mut h, c, games.clone()), listed(&[("game-a", 3, 1), ("gamer", 2, 1)]));
    h.one(b, json!({"type": "leave_room", "id": 22, "room_id": "game-b"}));
    h.take(o);
    assert_eq!(list_rooms(&mut h, c, games.clone()), listed(&[("game-a", 3, 1), ("game-b", 2, 1), ("gamer", 2, 1)]));
    // Closed rooms are gone; rooms left empty are listed until their TTL removes them.
    h.one(o, json!({"type": "close_room", "id": 23, "room_id": "game-a"}));
    h.one(o, json!({"type": "leave_room", "id": 24, "room_id": "gamer"}));
    h.one(o, json!({"type": "leave_room", "id": 25, "room_id": "game-full"}));
    assert_eq!(list_rooms(&mut h, c, games.clone()), listed(&[("game-b", 2, 1), ("game-full", 1, 0), ("gamer", 2, 0)]));
    h.run_until(Duration::from_secs(30));
    h.req(c, json!({"type": "ping", "id": 26}));
    h.run_until(Duration::from_secs(61));
    assert_eq!(list_rooms(&mut h, c, games), listed(&[("game-b", 2, 1)]));
}

#[test]
fn list_rooms_limit_defaults_to_and_is_clamped_at_max_list_rooms() {
    let mut h = H::new(ServerConfig { max_list_rooms: 3, ..ServerConfig::default() });
    let (o, _) = h.peer(1);
    for i in 0..5 {
        h.one(o, json!({"type": "create_room", "id": i, "room_id": format!("r{i}")}));
    }
    let ids = |h: &mut H, v: Value| -> Vec<String> { list_rooms(h, o, v).into_iter().map(|r| r.0).collect() };
    assert_eq!(ids(&mut h, json!({"type": "list_rooms", "id": 1})), ["r0", "r1", "r2"]);
    assert_eq!(ids(&mut h, json!({"type": "list_rooms", "id": 2, "limit": 2})), ["r0", "r1"]);
    assert_eq!(ids(&mut h, json!({"type": "list_rooms", "id": 3, "limit": 1000})), ["r0", "r1", "r2"]);
    assert_eq!(ids(&mut h, json!({"type": "list_rooms", "id": 4, "limit": 0})), Vec::<String>::new());
    assert_eq!(ServerConfig::default().max_list_rooms, 100);
}

#[test]
fn list_rooms_with_a_bad_prefix_is_invalid_field() {
    let mut h = H::default();
    let (a, _) = h.peer(1);
    let long = "x".repeat(protocol::MAX_NAME_LEN + 1);
    for (id, prefix) in [(1, json!("a\u{7}")), (2, json!(long)), (3, json!(7)), (4, json!(["a"]))] {
        assert_eq!(
            error_of(&h.one(a, json!({"type": "list_rooms", "id": id, "prefix": prefix}))),
            (Some(id), ErrorCode::InvalidField),
            "{prefix}"
        );
    }
    assert_eq!(
        error_of(&h.one(a, json!({"type": "list_rooms", "id": 5, "limit": "ten"}))),
        (Some(5), ErrorCode::InvalidField)
    );
    let longest = "x".repeat(protocol::MAX_NAME_LEN);
    let reply = h.one(a, json!({"type": "list_rooms", "id": 6, "prefix": longest}));
    assert!(matches!(reply, ServerMessage::Rooms { id: 6, .. }), "{reply:?}");
    let unregistered = h.connect();
    assert_eq!(
        error_of(&h.one(unregistered, json!({"type": "list_rooms", "id": 7}))),
        (Some(7), ErrorCode::NotRegistered)
    );
}

// ---- resume ----------------------------------------------------------------------------------

#[test]
fn dropped_session_is_parked_then_resumed_with_queued_relays() {
    let mut h = H::default();
    let (a, ia) = h.peer(1);
    let (b, ib) = h.peer(2);
    join(&mut h, a, "n", 1);
    join(&mut h, b, "n", 1);
    h.one(b, json!({"type": "create_room", "id": 2, "room_id": "r"}));
    h.take(a);
    h.disconnect(b);
    assert!(h.take(a).is_empty(), "no peer_left while parked");
    assert_eq!(h.s.stats().parked_sessions, 1);
    for i in 0..3 {
        let out = h.req(a, json!({"type": "relay", "id": 10 + i, "to": ib.fingerprint().to_string(), "payload": i}));
        assert_eq!(out, vec![ServerMessage::Ok { id: 10 + i }]);
    }
    assert!(h.s.stats().parked_bytes > 0);
    h.run_until(Duration::from_secs(20));
    let b2 = h.connect();
    let out = h.register(b2, &ib);
    match &out[0] {
        ServerMessage::Registered { resumed: true, namespaces, rooms, missed: 0, fingerprint, .. } => {
            assert_eq!(*fingerprint, ib.fingerprint());
            assert_eq!(namespaces, &vec!["n".to_owned()]);
            assert_eq!(rooms, &vec!["r".to_owned()]);
        }
        other => panic!("{other:?}"),
    }
    let relayed = relays_from(&out[1..], &ia);
    assert_eq!(relayed, vec![json!(0), json!(1), json!(2)], "queued frames follow in order");
    assert_eq!(h.s.stats().parked_bytes, 0);
    assert_eq!(h.s.stats().parked_sessions, 0);
    // The old grace timer does not end the resumed session.
    h.run_until(Duration::from_secs(40));
    assert!(h.take(a).iter().all(|m| !matches!(m, ServerMessage::PeerLeft { .. })));
    assert_eq!(h.s.stats().active_sessions, 2);
}

#[test]
fn relays_beyond_a_parked_queue_get_queue_full_and_other_frames_count_as_missed() {
    let mut cfg = ServerConfig::default();
    cfg.resume_queue_frames = 2;
    let mut h = H::new(cfg);
    let (a, _) = h.peer(1);
    let (b, ib) = h.peer(2);
    join(&mut h, b, "n", 1);
    h.disconnect(b);
    for i in 0..2 {
        assert_eq!(
            h.one(a, json!({"type": "relay", "id": i, "to": ib.fingerprint().to_string(), "payload": i})),
            ServerMessage::Ok { id: i }
        );
    }
    assert_eq!(
        error_of(&h.one(a, json!({"type": "relay", "id": 7, "to": ib.fingerprint().to_string(), "payload": 7}))),
        (Some(7), ErrorCode::QueueFull)
    );
    assert_eq!(
        error_of(&h.one(a, json!({"type": "relay", "to": ib.fingerprint().to_string(), "payload": 8}))),
        (None, ErrorCode::QueueFull)
    );
    // A notice that does not fit is counted.
    join(&mut h, a, "n", 9);
    let b2 = h.connect();
    let out = h.register(b2, &ib);
    assert!(matches!(&out[0], ServerMessage::Registered { resumed: true, missed: 1, .. }), "{out:?}");
    assert_eq!(out.len(), 3);
    let m = h.s.metrics(h.now);
    assert_eq!((m.relays, m.errors_sent(ErrorCode::QueueFull), m.resume_queue_drops), (2, 2, 1));
    assert_eq!((m.registrations, m.sessions_resumed, m.disconnects), (3, 1, 1));
}

#[test]
fn grace_expiry_ends_the_session_and_tells_the_others() {
    let mut h = H::default();
    let (a, _) = h.peer(1);
    let (b, ib) = h.peer(2);
    join(&mut h, a, "n", 1);
    join(&mut h, b, "n", 1);
    h.take(a);
    h.one(a, json!({"type": "create_room", "id": 2, "room_id": "r"}));
    h.one(b, json!({"type": "join_room", "id": 3, "room_id": "r"}));
    h.take(a);
    h.run_until(Duration::from_secs(5));
    h.disconnect(b);
    h.req(a, json!({"type": "ping", "id": 1}));
    h.run_until(Duration::from_secs(35) - Duration::from_millis(1));
    assert!(h.take(a).is_empty());
    h.run_until(Duration::from_secs(35));
    let out = h.take(a);
    assert!(out.contains(&ServerMessage::PeerLeft { namespace: "n".into(), fingerprint: ib.fingerprint() }), "{out:?}");
    assert!(out.contains(&ServerMessage::RoomPeerLeft { room_id: "r".into(), fingerprint: ib.fingerprint(), kicked: false }));
    assert_eq!(h.s.stats().parked_sessions, 0);
    // A later registration is a fresh session.
    let b2 = h.connect();
    assert!(matches!(h.register(b2, &ib)[..], [ServerMessage::Registered { resumed: false, .. }]));
}

#[test]
fn registering_while_the_old_connection_is_open_replaces_it_with_4002() {
    let mut h = H::default();
    let (a, _) = h.peer(1);
    let (old, ib) = h.peer(2);
    join(&mut h, old, "n", 1);
    join(&mut h, a, "n", 1);
    h.take(old);
    let new = h.connect();
    let out = h.register(new, &ib);
    assert!(matches!(&out[0], ServerMessage::Registered { resumed: true, .. }), "{out:?}");
    assert_eq!(h.closed.get(&old), Some(&CloseCode::Replaced));
    assert!(h.take(a).is_empty(), "a takeover is not a leave");
    assert_eq!(h.s.stats().active_sessions, 2);
    assert_eq!(h.s.stats().connections, 3 - 1);
    h.req(a, json!({"type": "relay", "to": ib.fingerprint().to_string(), "payload": 1}));
    assert_eq!(h.take(new).len(), 1);
    // The adapter reporting the old socket's end changes nothing.
    h.disconnect(old);
    assert_eq!(h.s.stats().active_sessions, 2);
    assert_eq!(h.s.stats().parked_sessions, 0);
}

#[test]
fn resume_disabled_ends_the_session_at_once() {
    let mut cfg = ServerConfig::default();
    cfg.resume_grace = Duration::ZERO;
    let mut h = H::new(cfg);
    let (a, _) = h.peer(1);
    let (b, ib) = h.peer(2);
    join(&mut h, a, "n", 1);
    join(&mut h, b, "n", 1);
    h.take(a);
    h.disconnect(b);
    assert_eq!(h.take(a), vec![ServerMessage::PeerLeft { namespace: "n".into(), fingerprint: ib.fingerprint() }]);
    assert_eq!(h.s.stats().parked_sessions, 0);
}

#[test]
fn slow_consumer_is_closed_with_4001_and_its_session_parked() {
    let mut cfg = ServerConfig::default();
    cfg.outbound_queue_bytes = 4096;
    let mut h = H::new(cfg);
    let (a, _) = h.peer(1);
    let b = h.connect();
    h.unacked.insert(b);
    let ib = ident(2);
    h.register(b, &ib);
    let pad = "x".repeat(200);
    let mut sent = 0;
    while !h.closed.contains_key(&b) {
        h.req(a, json!({"type": "relay", "to": ib.fingerprint().to_string(), "payload": pad}));
        sent += 1;
        assert!(sent < 100, "never closed");
        assert!(h.s.stats().outbound_bytes <= 4096);
    }
    assert_eq!(h.closed[&b], CloseCode::SlowConsumer);
    assert!(sent > 10);
    assert_eq!(h.s.metrics(h.now).closes(CloseCode::SlowConsumer), 1);
    let st = h.s.stats();
    assert_eq!((st.connections, st.parked_sessions, st.outbound_bytes), (1, 1, 0));
    // The frame that did not fit waits in the parked session.
    let b2 = h.connect();
    let out = h.register(b2, &ib);
    assert!(matches!(&out[..], [ServerMessage::Registered { resumed: true, .. }, ServerMessage::Relay { .. }]), "{out:?}");
}

#[test]
fn a_resume_flush_that_overflows_keeps_the_rest_queued() {
    let mut cfg = ServerConfig::default();
    cfg.outbound_queue_bytes = 2048;
    let mut h = H::new(cfg);
    let (a, _) = h.peer(1);
    let (b, ib) = h.peer(2);
    h.disconnect(b);
    // Queue more for the parked session than one outbound queue holds.
    for i in 0..20 {
        h.req(a, json!({"type": "relay", "to": ib.fingerprint().to_string(), "payload": [i, "x".repeat(200)]}));
    }
    // The new connection never reports flushed bytes: the flush overflows it.
    let b2 = h.connect();
    h.unacked.insert(b2);
    let first = h.register(b2, &ib);
    assert_eq!(h.closed.get(&b2), Some(&CloseCode::SlowConsumer));
    let delivered = first.iter().filter(|m| matches!(m, ServerMessage::Relay { .. })).count();
    assert!(delivered < 20, "the flush overflowed: {delivered}");
    // Nothing was dropped: the rest waits for the next resumes, in order. (Each flush happens
    // within one input, before any bytes can be reported sent, so each carries at most one
    // outbound queue's worth.)
    let mut all = first;
    loop {
        let next = h.connect();
        all.extend(h.register(next, &ib));
        if !h.closed.contains_key(&next) {
            break;
        }
    }
    let order: Vec<i64> = all
        .iter()
        .filter_map(|m| match m {
            ServerMessage::Relay { payload, .. } => payload.to_value()[0].as_i64(),
            _ => None,
        })
        .collect();
    assert_eq!(order, (0..20).collect::<Vec<_>>(), "every queued relay exactly once, in order");
}

#[test]
fn handle_sent_frees_outbound_budget() {
    let mut cfg = ServerConfig::default();
    cfg.outbound_queue_bytes = 4096;
    let mut h = H::new(cfg);
    let (a, _) = h.peer(1);
    let (b, ib) = h.peer(2);
    for _ in 0..200 {
        h.req(a, json!({"type": "relay", "to": ib.fingerprint().to_string(), "payload": "x".repeat(200)}));
    }
    assert!(!h.closed.contains_key(&b));
    assert_eq!(h.take(b).len(), 200);
    assert_eq!(h.s.stats().outbound_bytes, 0);
}

// ---- time --------------------------------------------------------------------------------------

#[test]
fn poll_timeout_moves_forward_and_spurious_timeouts_emit_nothing() {
    let mut h = H::default();
    let (a, _) = h.peer(1);
    let _idle = h.connect();
    match_req(&mut h, a, 1, json!({}), 2);
    h.one(a, json!({"type": "create_room", "id": 2, "room_id": "r"}));
    h.one(a, json!({"type": "leave_room", "id": 3, "room_id": "r"}));
    let (b, _) = h.peer(2);
    h.disconnect(b);
    // Spurious: before the first deadline nothing happens.
    let first = h.s.poll_timeout().unwrap();
    let before = h.s.stats();
    h.s.handle_timeout(first - Duration::from_millis(1)).unwrap();
    assert!(h.s.poll_transmit().is_none());
    assert_eq!(h.s.stats(), before);
    assert_eq!(h.s.poll_timeout(), Some(first));
    let mut steps = 0;
    while h.step() {
        // step() asserts the deadline moved past now.
        steps += 1;
        assert!(steps < 1000);
        let t = h.now;
        h.s.handle_timeout(t).unwrap();
        assert!(h.s.poll_transmit().is_none(), "a second handle_timeout at the same instant emits nothing");
    }
    assert_eq!(h.s.stats(), ServerStats::default());
}

#[test]
fn stats_return_to_baseline_after_clients_leave() {
    let mut h = H::default();
    let base = h.s.stats();
    assert_eq!(base, ServerStats::default());
    for round in 0..2 {
        let mut conns = Vec::new();
        for i in 0..4 {
            let (c, _) = h.peer(round * 10 + i);
            join(&mut h, c, "n", 1);
            h.one(c, json!({"type": "create_room", "id": 2, "room_id": format!("r{i}")}));
            match_req(&mut h, c, 3, json!({"i": i}), 2);
            conns.push(c);
        }
        let unreg = h.connect();
        h.send(unreg, "garbage");
        let st = h.s.stats();
        assert_eq!((st.connections, st.active_sessions, st.namespaces, st.rooms, st.pending_matches), (5, 4, 1, 4, 4));
        // Two say bye, two drop (and their grace expires), one never registered.
        h.send(conns[0], r#"{"type":"bye"}"#);
        h.send(conns[1], r#"{"type":"bye"}"#);
        h.disconnect(conns[2]);
        h.disconnect(conns[3]);
        h.disconnect(unreg);
        while h.step() {}
        assert_eq!(h.s.stats(), base, "round {round}");
        for c in conns {
            h.take(c);
        }
    }
}

// ---- access tokens --------------------------------------------------------------------------

#[test]
fn hs256_tokens_are_checked_at_registration_on_the_virtual_wall_clock() {
    let secret = b"s3cret".to_vec();
    let mut cfg = ServerConfig::default();
    cfg.auth = Some(AuthConfig::new(AuthKey::Hs256(secret.clone())));
    let mut h = H::new(cfg);
    let start_s = UNIX_MS / 1000;
    let id = ident(1);
    // 200 s of virtual time pass before anyone connects.
    h.set_now(h.base + Duration::from_secs(200));
    let reg = |h: &mut H, token: Option<&str>| {
        let c = h.connect();
        let frame = h.register_frame(c, &id, 5, token);
        h.send(c, &frame);
        h.take(c).pop().unwrap()
    };
    assert_eq!(error_of(&reg(&mut h, None)), (Some(5), ErrorCode::AuthRequired));
    let wrong_key = sign_hs256(b"other", &json!({"exp": start_s + 1000}));
    assert_eq!(error_of(&reg(&mut h, Some(&wrong_key))), (Some(5), ErrorCode::AuthInvalid));
    assert_eq!(error_of(&reg(&mut h, Some("not.a.jwt"))), (Some(5), ErrorCode::AuthInvalid));
    // Valid at Server::new, expired 200 s later (beyond the 30 s leeway).
    let expired = sign_hs256(&secret, &json!({"exp": start_s + 100}));
    assert_eq!(error_of(&reg(&mut h, Some(&expired))), (Some(5), ErrorCode::AuthExpired));
    let other_fp = sign_hs256(&secret, &json!({"exp": start_s + 1000, "fp": ident(2).fingerprint().to_string()}));
    assert_eq!(error_of(&reg(&mut h, Some(&other_fp))), (Some(5), ErrorCode::AuthInvalid));
    let good = sign_hs256(&secret, &json!({"exp": start_s + 1000, "fp": id.fingerprint().to_string()}));
    assert!(matches!(reg(&mut h, Some(&good)), ServerMessage::Registered { .. }));
}

#[test]
fn peer_meta_and_room_metadata_arrive_decodable() {
    let mut h = H::default();
    let (a, _) = h.peer(1);
    let ib = ident(2);
    let b = h.connect();
    let frame = h.register_frame(b, &ib, 1, None);
    let mut v: Value = serde_json::from_str(&frame).unwrap();
    v["meta"] = json!({"avatar": "cat", "level": 3});
    h.one(b, v);
    join(&mut h, b, "n", 1);
    // The pump decodes every frame: `joined` and `peer_joined` carry b's meta.
    match &join(&mut h, a, "n", 1)[..] {
        [ServerMessage::Joined { peers, .. }] => {
            assert_eq!(peers[0].meta.as_ref().unwrap().to_value(), json!({"avatar": "cat", "level": 3}))
        }
        other => panic!("{other:?}"),
    }
    h.take(b);
    let out = h.req(a, json!({"type": "relay", "id": 2, "to": ib.fingerprint().to_string(), "payload": {"b": 1, "a": [1.50, 2]}}));
    assert_eq!(out, vec![ServerMessage::Ok { id: 2 }]);
    match &h.take(b)[..] {
        [ServerMessage::Relay { payload, .. }] => assert_eq!(payload.get(), r#"{"a":[1.5,2],"b":1}"#),
        other => panic!("{other:?}"),
    }
    // Relay payloads are delivered verbatim.
    let to = ib.fingerprint().to_string();
    h.send(a, &format!(r#"{{"type":"relay","to":"{to}","payload":{{"z": 1,  "a" :2}}}}"#));
    match &h.take(b)[..] {
        [ServerMessage::Relay { payload, .. }] => assert_eq!(payload.get(), r#"{"z": 1,  "a" :2}"#),
        other => panic!("{other:?}"),
    }
}


// ---- metrics ------------------------------------------------------------------------------

#[test]
fn metrics_count_registrations_messages_relays_and_errors() {
    let mut h = H::default();
    let m = h.s.metrics(h.now);
    assert_eq!((m.connections_accepted, m.registrations, m.relays), (0, 0, 0));
    let (a, _) = h.peer(1);
    let (b, ib) = h.peer(2);
    let (c, _) = h.peer(3);
    let m = h.s.metrics(h.now);
    assert_eq!((m.connections_accepted, m.registrations, m.sessions_resumed), (3, 3, 0));
    assert_eq!((m.stats.connections, m.stats.active_sessions), (3, 3));
    assert_eq!(m.messages_received(MessageType::Register), 3);
    assert_eq!(m.server_id, "peerlink");
    // Relays: two delivered, one to nobody.
    for _ in 0..2 {
        h.req(a, json!({"type": "relay", "to": ib.fingerprint().to_string(), "payload": 1}));
    }
    let nobody = ident(50).fingerprint().to_string();
    h.one(a, json!({"type": "relay", "id": 3, "to": nobody, "payload": 1}));
    // A broadcast to two others in one namespace.
    for (conn, id) in [(a, 4), (b, 5), (c, 6)] {
        join(&mut h, conn, "n", id);
    }
    h.req(a, json!({"type": "broadcast", "namespace": "n", "payload": "hi"}));
    h.take(b);
    h.take(c);
    h.one(b, json!({"type": "create_room", "id": 7, "room_id": "r"}));
    // Bad frames: not JSON, a type nobody has (twice, different texts: one label), a
    // missing field.
    h.one(c, json!({"type": "ping", "id": 8}));
    h.send(c, "not json");
    h.take(c);
    h.one(c, json!({"type": "teleport", "id": 9}));
    h.one(c, json!({"type": "warp-drive-xyz", "id": 10}));
    h.one(c, json!({"type": "join", "id": 11}));
    h.take(a);
    h.take(b);
    h.take(c);
    h.s.handle_binary(c, h.now, b"\x00").unwrap();
    h.pump();
    h.advance(Duration::from_millis(10));
    let m = h.s.metrics(h.now);
    assert_eq!(m.relays, 2);
    assert_eq!((m.broadcasts, m.broadcast_deliveries), (1, 2));
    // Invalid: bad JSON and a missing field.
    let received = [(MessageType::Relay, 3), (MessageType::Broadcast, 1), (MessageType::Join, 3), (MessageType::CreateRoom, 1)];
    let received = received.into_iter().chain([(MessageType::Ping, 1), (MessageType::Unknown, 2), (MessageType::Invalid, 2)]);
    for kind in MessageType::ALL {
        let expected = received.clone().find(|(k, _)| *k == kind).map_or(0, |(_, n)| n);
        let expected = if kind == MessageType::Register { 3 } else { expected };
        assert_eq!(m.messages_received(kind), expected, "{kind:?}");
    }
    let sent = [(ErrorCode::PeerNotFound, 1), (ErrorCode::BadJson, 1), (ErrorCode::UnknownType, 2), (ErrorCode::MissingField, 1)];
    for code in ErrorCode::ALL {
        let expected = sent.iter().find(|(c, _)| *c == code).map_or(0, |(_, n)| *n);
        assert_eq!(m.errors_sent(code), expected, "{code}");
    }
    assert_eq!(m.closes(CloseCode::UnsupportedData), 1);
    assert_eq!((m.stats.connections, m.stats.namespaces, m.stats.rooms), (2, 1, 1));
    assert_eq!((m.stats.active_sessions, m.stats.parked_sessions), (2, 1), "the binary frame parked c's session");
    assert_eq!(m.disconnects, 0);
    assert_eq!(m.uptime, Duration::from_millis(10));
    // The exposition carries the same figures.
    let text = m.to_prometheus();
    for line in [
        "peerlink_relays_total 2",
        "peerlink_registrations_total 3",
        "peerlink_messages_received_total{type=\"unknown\"} 2",
        "peerlink_errors_sent_total{code=\"peer_not_found\"} 1",
        "peerlink_closes_total{code=\"1003\"} 1",
        "peerlink_connections_open 2",
        "peerlink_namespaces 1",
        "peerlink_rooms 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    // A disconnect from the client's side; bye closes with 1000.
    h.disconnect(a);
    h.req(b, json!({"type": "bye"}));
    let m = h.s.metrics(h.now);
    assert_eq!((m.disconnects, m.closes(CloseCode::Normal), m.messages_received(MessageType::Bye)), (1, 1, 1));
    assert_eq!(m.stats.connections, 0);
    let health = h.s.health(h.now);
    assert_eq!((health.status, health.connections, health.sessions), (HealthStatus::Ok, 0, 0));
}

#[test]
fn metrics_count_rate_limited_frames_and_flood_closes() {
    let mut cfg = ServerConfig::default();
    cfg.rate_limit = RateLimit { per_second: 10, burst: 4 };
    cfg.flood_close_after = 5;
    let mut h = H::new(cfg);
    let (c, _) = h.peer(1);
    for i in 0..3 {
        h.one(c, json!({"type": "ping", "id": i}));
    }
    for i in 0..6 {
        h.req(c, json!({"type": "ping", "id": 10 + i}));
    }
    assert_eq!(h.closed.get(&c), Some(&CloseCode::PolicyViolation));
    let m = h.s.metrics(h.now);
    assert_eq!(m.rate_limited_frames, 6);
    assert_eq!(m.errors_sent(ErrorCode::RateLimited), 1, "only the first drop is answered");
    assert_eq!(m.messages_received(MessageType::Ping), 3, "dropped frames are not decoded");
    assert_eq!(m.closes(CloseCode::PolicyViolation), 1);
}

#[test]
fn metrics_count_refused_connections_as_closes_not_accepts() {
    let mut cfg = ServerConfig::default();
    cfg.max_connections = 2;
    let mut h = H::new(cfg);
    h.connect();
    h.connect();
    h.s.handle_connect(ConnId(99), h.now).unwrap();
    h.pump();
    assert_eq!(h.closed.get(&ConnId(99)), Some(&CloseCode::TryAgainLater));
    let m = h.s.metrics(h.now);
    assert_eq!((m.connections_accepted, m.closes(CloseCode::TryAgainLater), m.stats.connections), (2, 1, 2));
}

// ---- TURN credentials -------------------------------------------------------------------------

fn turn_config() -> ServerConfig {
    let mut cfg = ServerConfig::default();
    cfg.turn = Some(TurnSecretConfig::new("s3cret", ["turn:127.0.0.1:3478?transport=udp"]).ttl(Duration::from_secs(600)));
    cfg
}

#[test]
fn turn_credentials_before_registering_are_not_registered() {
    let mut h = H::new(turn_config());
    let c = h.connect();
    assert_eq!(error_of(&h.one(c, json!({"type": "turn_credentials", "id": 4}))), (Some(4), ErrorCode::NotRegistered));
    assert_eq!(h.s.metrics(h.now).errors_sent(ErrorCode::NotRegistered), 1);
}

#[test]
fn turn_credentials_without_a_secret_are_turn_unavailable() {
    let mut h = H::default();
    let (c, _) = h.peer(1);
    assert_eq!(error_of(&h.one(c, json!({"type": "turn_credentials", "id": 5}))), (Some(5), ErrorCode::TurnUnavailable));
    let m = h.s.metrics(h.now);
    assert_eq!((m.errors_sent(ErrorCode::TurnUnavailable), m.messages_received(MessageType::TurnCredentials)), (1, 1));
}

#[test]
fn turn_credentials_expire_ttl_after_the_servers_wall_clock() {
    let mut h = H::new(turn_config());
    let (c, id) = h.peer(1);
    // 90.5 s after the server started: its wall clock is UNIX_MS + 90.5 s.
    h.set_now(h.base + Duration::from_millis(90_500));
    let (username, credential, ttl, urls) = match h.one(c, json!({"type": "turn_credentials", "id": 6})) {
        ServerMessage::TurnCredentials { id: 6, username, credential, ttl, urls } => (username, credential, ttl, urls),
        other => panic!("{other:?}"),
    };
    let expiry = UNIX_MS / 1000 + 90 + 600;
    assert_eq!(username, format!("{expiry}:{}", id.fingerprint()));
    assert_eq!(ttl, 600);
    assert_eq!(urls, ["turn:127.0.0.1:3478?transport=udp"]);
    assert_eq!(credential, turn_rest_credentials(b"s3cret", expiry, &id.fingerprint()).1);
    // Each client gets its own user name.
    let (c2, id2) = h.peer(2);
    match h.one(c2, json!({"type": "turn_credentials", "id": 7})) {
        ServerMessage::TurnCredentials { username, .. } => assert_eq!(username, format!("{expiry}:{}", id2.fingerprint())),
        other => panic!("{other:?}"),
    }
}

mod cluster;
