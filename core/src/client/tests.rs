//! Sans-IO tests of the client core, against the real server core, on virtual time.

// A test changes one or two settings of the defaults it names; that reads best as assignments.
#![allow(clippy::field_reassign_with_default)]

use super::*;
use crate::server::{ConnId, Server, ServerConfig, ServerTransmit};
use serde_json::json;

fn ident(seed: u64) -> Identity {
    Identity::generate(&mut ChaCha20Rng::seed_from_u64(seed))
}

fn cfg() -> ClientConfig {
    ClientConfig::new("ws://virtual").alias("t")
}

struct Node {
    c: Client,
    conn: Option<ConnId>,
    events: Vec<ClientEvent>,
    /// Texts the client sent.
    sent: Vec<String>,
    /// Close codes the client sent.
    closes: Vec<u16>,
    connects: usize,
    /// Connect attempts fail at once.
    offline: bool,
    /// Frames from the server to this node are lost (a half-dead link).
    deaf: bool,
    /// Frames from this node to the server are lost.
    mute: bool,
}

/// One server and N clients wired in memory, on a virtual clock.
struct Net {
    s: Server,
    nodes: Vec<Node>,
    base: Instant,
    now: Instant,
    next_conn: u64,
}

impl Net {
    fn new(server: ServerConfig) -> Self {
        let base = Instant::now();
        Net { s: Server::new(server, 11, base, 1_700_000_000_000), nodes: Vec::new(), base, now: base, next_conn: 1 }
    }

    fn add(&mut self, config: ClientConfig, seed: u64) -> usize {
        let c = Client::new(config, ident(seed), 1000 + seed, self.now).unwrap();
        self.nodes.push(Node {
            c,
            conn: None,
            events: Vec::new(),
            sent: Vec::new(),
            closes: Vec::new(),
            connects: 0,
            offline: false,
            deaf: false,
            mute: false,
        });
        self.nodes.len() - 1
    }

    /// Adds a client, connects it and runs until it is registered.
    fn registered(&mut self, config: ClientConfig, seed: u64) -> usize {
        let i = self.add(config, seed);
        self.nodes[i].c.connect(self.now).unwrap();
        self.pump();
        assert!(self.nodes[i].c.is_registered(), "{:?}", self.nodes[i].events);
        self.nodes[i].events.clear();
        i
    }

    fn fp(&self, i: usize) -> Fingerprint {
        self.nodes[i].c.fingerprint()
    }

    /// Passes frames until neither side has anything left.
    fn pump(&mut self) {
        let now = self.now;
        for _ in 0..10_000 {
            let mut busy = false;
            for n in &mut self.nodes {
                while let Some(t) = n.c.poll_transmit() {
                    busy = true;
                    match t {
                        ClientTransmit::Connect { url } => {
                            assert_eq!(url, n.c.config().url);
                            n.connects += 1;
                            if let Some(old) = n.conn.take() {
                                self.s.handle_disconnect(old, now).unwrap();
                            }
                            if n.offline {
                                n.c.handle_disconnected(now, None).unwrap();
                            } else {
                                let conn = ConnId(self.next_conn);
                                self.next_conn += 1;
                                self.s.handle_connect(conn, now).unwrap();
                                n.conn = Some(conn);
                                n.c.handle_connected(now).unwrap();
                            }
                        }
                        ClientTransmit::Text(text) => {
                            n.sent.push(text.clone());
                            if let (Some(conn), false) = (n.conn, n.mute) {
                                self.s.handle_message(conn, now, &text).unwrap();
                            }
                        }
                        ClientTransmit::Close { code } => {
                            n.closes.push(code);
                            if let Some(conn) = n.conn.take() {
                                self.s.handle_disconnect(conn, now).unwrap();
                            }
                        }
                    }
                }
                while let Some(e) = n.c.poll_event() {
                    busy = true;
                    n.events.push(e);
                }
            }
            while let Some(t) = self.s.poll_transmit() {
                busy = true;
                match t {
                    ServerTransmit::Text { conn, text } => {
                        self.s.handle_sent(conn, text.len());
                        if let Some(n) = self.nodes.iter_mut().find(|n| n.conn == Some(conn)) {
                            if !n.deaf {
                                n.c.handle_text(now, &text).unwrap();
                            }
                        }
                    }
                    ServerTransmit::Close { conn, code } => {
                        if let Some(n) = self.nodes.iter_mut().find(|n| n.conn == Some(conn)) {
                            n.conn = None;
                            n.c.handle_disconnected(now, Some(code.code())).unwrap();
                        }
                    }
                }
            }
            if !busy {
                return;
            }
        }
        panic!("network never went quiet");
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.nodes.iter().filter_map(|n| n.c.poll_timeout()).chain(self.s.poll_timeout()).min()
    }

    /// Jumps the clock to the earliest deadline and handles it everywhere.
    fn step(&mut self) -> bool {
        let Some(t) = self.next_deadline() else { return false };
        self.now = self.now.max(t);
        let now = self.now;
        for n in &mut self.nodes {
            n.c.handle_timeout(now).unwrap();
            assert!(n.c.poll_timeout().is_none_or(|d| d > now), "client deadline did not move past now");
        }
        self.s.handle_timeout(now).unwrap();
        assert!(self.s.poll_timeout().is_none_or(|d| d > now));
        self.pump();
        true
    }

    fn run_until(&mut self, at: Duration) {
        let end = self.base + at;
        while self.next_deadline().is_some_and(|t| t <= end) {
            self.step();
        }
        self.now = self.now.max(end);
    }

    /// The socket drops under both sides (each learns of it).
    fn cut(&mut self, i: usize) {
        let conn = self.nodes[i].conn.take().expect("connected");
        self.s.handle_disconnect(conn, self.now).unwrap();
        self.nodes[i].c.handle_disconnected(self.now, None).unwrap();
        self.pump();
    }

    fn events(&mut self, i: usize) -> Vec<ClientEvent> {
        std::mem::take(&mut self.nodes[i].events)
    }
}

fn reconnect_delays(events: &[ClientEvent]) -> Vec<(u32, Duration)> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Reconnecting { attempt, delay } => Some((*attempt, *delay)),
            _ => None,
        })
        .collect()
}

fn responses(events: &[ClientEvent]) -> Vec<(RequestId, Result<Response, RequestError>)> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Response { request, result } => Some((*request, result.clone())),
            _ => None,
        })
        .collect()
}

fn frame_type(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text).unwrap()["type"].as_str().unwrap().to_owned()
}

// ---- registration and the outbox ---------------------------------------------------------------

#[test]
fn registers_on_the_challenge_with_its_own_fingerprint() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.add(cfg().alias("alice"), 1);
    assert!(!net.nodes[a].c.is_registered());
    net.nodes[a].c.connect(net.now).unwrap();
    net.pump();
    let fp = net.fp(a);
    assert_eq!(
        net.events(a),
        vec![ClientEvent::Connected, ClientEvent::Registered { fingerprint: fp, alias: "alice".into() }]
    );
    assert!(net.nodes[a].c.is_registered());
    assert_eq!(frame_type(&net.nodes[a].sent[0]), "register");
    assert_eq!(net.s.stats().active_sessions, 1);
}

#[test]
fn requests_before_registration_wait_in_the_outbox_and_go_out_after_register() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.add(cfg(), 1);
    assert_eq!(net.nodes[a].c.join(net.now, "n", None, None), Err(ClientError::NotConnected));
    net.nodes[a].c.connect(net.now).unwrap();
    let now = net.now;
    let p = net.nodes[a].c.ping(now).unwrap();
    let j = net.nodes[a].c.join(now, "lobby", Some("app"), None).unwrap();
    net.nodes[a].c.broadcast("lobby", &json!({"x": 1})).unwrap();
    net.pump();
    let types: Vec<String> = net.nodes[a].sent.iter().map(|t| frame_type(t)).collect();
    assert_eq!(types, ["register", "ping", "join", "broadcast"]);
    let ev = net.events(a);
    let rs = responses(&ev);
    assert_eq!(rs.len(), 2);
    assert!(matches!(rs[0], (id, Ok(Response::Pong { .. })) if id == p));
    assert!(matches!(&rs[1], (id, Ok(Response::Joined { namespace, .. })) if *id == j && namespace == "lobby"));
    let lists = ev.iter().filter(|e| matches!(e, ClientEvent::PeerList { .. })).count();
    assert_eq!(lists, 1, "one join, one peer list: {ev:?}");
}

#[test]
fn a_full_outbox_refuses_with_outbox_full() {
    let mut net = Net::new(ServerConfig::default());
    let mut c = cfg();
    c.outbox_frames = 2;
    let a = net.add(c, 1);
    net.nodes[a].c.connect(net.now).unwrap();
    let now = net.now;
    net.nodes[a].c.ping(now).unwrap();
    net.nodes[a].c.discover(now, "n", None).unwrap();
    assert_eq!(net.nodes[a].c.ping(now), Err(ClientError::OutboxFull(2)));
    let me = net.fp(a);
    assert_eq!(net.nodes[a].c.relay(me, &1), Err(ClientError::OutboxFull(2)));
    net.pump();
    assert_eq!(responses(&net.events(a)).len(), 2);
    // Once registered the outbox no longer limits.
    for _ in 0..5 {
        net.nodes[a].c.ping(now).unwrap();
    }
}

// ---- reconnecting ------------------------------------------------------------------------------

fn backoff_run(seed: u64) -> Vec<(u32, Duration)> {
    let mut net = Net::new(ServerConfig::default());
    let mut c = cfg();
    c.reconnect_delay = Duration::from_secs(1);
    c.reconnect_max_delay = Duration::from_secs(8);
    let a = net.registered(c, seed);
    net.nodes[a].offline = true;
    net.cut(a);
    net.run_until(Duration::from_secs(120));
    reconnect_delays(&net.events(a))
}

#[test]
fn reconnect_backoff_grows_exponentially_with_jitter_and_is_capped() {
    let delays = backoff_run(1);
    assert!(delays.len() >= 8, "{delays:?}");
    for (i, (attempt, delay)) in delays.iter().enumerate() {
        assert_eq!(*attempt, i as u32 + 1);
        let step = Duration::from_secs(1 << i.min(3));
        assert!(*delay >= step / 2 && *delay <= step, "attempt {attempt}: {delay:?} not in [{:?}, {step:?}]", step / 2);
    }
    let distinct: std::collections::HashSet<_> = delays[3..].iter().map(|d| d.1).collect();
    assert!(distinct.len() > 1, "jittered");
}

#[test]
fn reconnect_delays_are_deterministic_for_a_seed() {
    assert_eq!(backoff_run(5), backoff_run(5));
    assert_ne!(backoff_run(5), backoff_run(6));
}

#[test]
fn reconnects_and_registers_again_when_the_server_is_back() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.registered(cfg(), 1);
    net.nodes[a].offline = true;
    net.cut(a);
    net.run_until(Duration::from_secs(5));
    net.nodes[a].offline = false;
    net.run_until(Duration::from_secs(40));
    assert!(net.nodes[a].c.is_registered());
    let ev = net.events(a);
    assert!(ev.contains(&ClientEvent::Reconnected { resumed: true }), "{ev:?}");
    assert!(matches!(ev[0], ClientEvent::Disconnected { code: None, will_reconnect: true }));
}

#[test]
fn a_request_that_times_out_in_the_outbox_is_never_sent() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.registered(cfg(), 1);
    net.nodes[a].offline = true;
    net.cut(a);
    let now = net.now;
    let p = net.nodes[a].c.ping(now).unwrap();
    // Offline past the request timeout: the ping fails while still waiting in the outbox.
    net.run_until(Duration::from_secs(40));
    let rs = responses(&net.events(a));
    assert!(rs.iter().any(|(id, r)| *id == p && *r == Err(RequestError::TimedOut)), "{rs:?}");
    net.nodes[a].sent.clear();
    net.nodes[a].offline = false;
    net.run_until(Duration::from_secs(80));
    assert!(net.nodes[a].c.is_registered());
    let types: Vec<String> = net.nodes[a].sent.iter().map(|t| frame_type(t)).collect();
    assert_eq!(types.first().map(String::as_str), Some("register"));
    let pings_before_keepalive = types.iter().skip(1).take_while(|t| *t != "register").filter(|t| *t == "ping").count();
    assert!(pings_before_keepalive <= 1, "the timed-out ping was withdrawn (only keep-alives go out): {types:?}");
    assert!(responses(&net.events(a)).is_empty(), "no late reply for a request already answered");
}

#[test]
fn a_room_closed_while_the_session_was_lost_is_reported_closed_not_as_an_error() {
    let mut net = Net::new(ServerConfig::default());
    let owner = net.registered(cfg(), 1);
    let member = net.registered(cfg(), 2);
    let now = net.now;
    net.nodes[owner].c.create_room(now, "den", None, None).unwrap();
    net.pump();
    net.nodes[member].c.join_room(now, "den").unwrap();
    net.pump();
    net.events(member);
    // The member is away past the resume grace (30 s): the server ends its session.
    net.nodes[member].offline = true;
    net.cut(member);
    net.run_until(Duration::from_secs(35));
    let now = net.now;
    net.nodes[owner].c.close_room(now, "den").unwrap();
    net.pump();
    net.nodes[member].offline = false;
    net.run_until(Duration::from_secs(70));
    assert!(net.nodes[member].c.is_registered());
    let ev = net.events(member);
    assert!(ev.contains(&ClientEvent::Reconnected { resumed: false }), "{ev:?}");
    assert!(ev.contains(&ClientEvent::RoomClosed { room_id: "den".into() }), "{ev:?}");
    assert!(!ev.iter().any(|e| matches!(e, ClientEvent::Error(_))), "no spurious error: {ev:?}");
    assert_eq!(net.nodes[member].c.rooms().count(), 0);
}

#[test]
fn gives_up_after_max_reconnect_attempts() {
    let mut net = Net::new(ServerConfig::default());
    let mut c = cfg();
    c.max_reconnect_attempts = Some(3);
    let a = net.registered(c, 1);
    net.nodes[a].offline = true;
    net.cut(a);
    net.run_until(Duration::from_secs(600));
    assert_eq!(net.nodes[a].connects, 1 + 3);
    let ev = net.events(a);
    assert_eq!(reconnect_delays(&ev).len(), 3);
    let n = ev.len();
    assert_eq!(ev[n - 2], ClientEvent::Error(ClientError::ReconnectExhausted(3)));
    assert_eq!(ev[n - 1], ClientEvent::Disconnected { code: None, will_reconnect: false });
    assert_eq!(net.nodes[a].c.poll_timeout(), None);
    assert_eq!(net.nodes[a].c.ping(net.now), Err(ClientError::NotConnected));
    // connect() starts over.
    net.nodes[a].offline = false;
    net.nodes[a].c.connect(net.now).unwrap();
    net.pump();
    assert!(net.nodes[a].c.is_registered());
}

#[test]
fn replaced_4002_stops_without_reconnecting() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.registered(cfg(), 1);
    let twin = net.registered(cfg(), 1);
    assert!(net.nodes[twin].c.is_registered());
    assert!(!net.nodes[a].c.is_registered());
    let ev = net.events(a);
    assert_eq!(
        ev,
        vec![
            ClientEvent::Error(ClientError::Replaced),
            ClientEvent::Disconnected { code: Some(4002), will_reconnect: false }
        ]
    );
    net.run_until(Duration::from_secs(120));
    assert_eq!(net.nodes[a].connects, 1);
    assert_eq!(net.nodes[a].c.poll_timeout(), None);
}

#[test]
fn sends_a_ping_every_ping_interval() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.registered(cfg(), 1);
    net.run_until(Duration::from_secs(101));
    let pings = net.nodes[a].sent.iter().filter(|t| frame_type(t) == "ping").count();
    assert_eq!(pings, 4, "at 25, 50, 75 and 100 s");
    assert!(net.nodes[a].c.is_registered(), "pings keep the server's idle timer quiet");
    assert_eq!(net.nodes[a].connects, 1);
}

#[test]
fn a_silent_connection_is_found_dead_closed_and_replaced() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.registered(cfg(), 1);
    net.nodes[a].deaf = true;
    net.run_until(Duration::from_secs(35) - Duration::from_millis(1));
    assert!(net.nodes[a].c.is_registered());
    assert!(net.nodes[a].closes.is_empty());
    net.run_until(Duration::from_secs(35));
    assert_eq!(net.nodes[a].closes, vec![CloseCode::GoingAway.code()]);
    let ev = net.events(a);
    assert!(matches!(ev[0], ClientEvent::Disconnected { code: None, will_reconnect: true }), "{ev:?}");
    assert!(matches!(ev[1], ClientEvent::Reconnecting { attempt: 1, .. }));
    net.nodes[a].deaf = false;
    net.run_until(Duration::from_secs(40));
    assert!(net.nodes[a].c.is_registered());
    assert_eq!(net.nodes[a].connects, 2);
}

#[test]
fn after_a_fresh_session_it_rejoins_its_namespaces_and_rooms() {
    let mut sc = ServerConfig::default();
    sc.resume_grace = Duration::ZERO;
    let mut net = Net::new(sc);
    let a = net.registered(cfg(), 1);
    let b = net.registered(cfg(), 2);
    let now = net.now;
    net.nodes[a].c.join(now, "lobby", Some("game"), Some("2")).unwrap();
    net.nodes[a].c.create_room(now, "r", Some(4), None).unwrap();
    net.nodes[b].c.join(now, "lobby", None, None).unwrap();
    net.pump();
    net.events(a);
    net.events(b);
    net.cut(a);
    assert!(net.events(b).iter().any(|e| matches!(e, ClientEvent::PeerLeft { .. })));
    net.run_until(Duration::from_secs(2));
    assert!(net.nodes[a].c.is_registered());
    let ev = net.events(a);
    let pos_re = ev.iter().position(|e| *e == ClientEvent::Reconnected { resumed: false }).expect("reconnected");
    let pos_list = ev
        .iter()
        .position(|e| matches!(e, ClientEvent::PeerList { namespace, peers } if namespace == "lobby" && peers.len() == 1))
        .expect("peer list");
    assert!(pos_list > pos_re);
    assert!(responses(&ev).is_empty(), "automatic re-joins are not user responses");
    assert!(!ev.iter().any(|e| matches!(e, ClientEvent::Error(_))), "{ev:?}");
    // b sees a again, with its app type; the room has a again.
    assert!(net.events(b).iter().any(|e| matches!(e, ClientEvent::PeerJoined { peer, .. } if peer.app_type.as_deref() == Some("game"))));
    let id = net.nodes[b].c.room_info(net.now, "r").unwrap();
    net.pump();
    match &responses(&net.events(b))[..] {
        [(rid, Ok(Response::RoomInfo { members: 1, .. }))] if *rid == id => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_room_rejoined_after_a_fresh_session_is_reported_with_its_current_members() {
    let mut net = Net::new(ServerConfig { resume_grace: Duration::ZERO, ..ServerConfig::default() });
    let a = net.registered(cfg(), 1);
    let b = net.registered(cfg(), 2);
    let c = net.registered(cfg(), 3);
    let now = net.now;
    net.nodes[a].c.create_room(now, "den", Some(4), Some(&json!({"topic": "chess"}))).unwrap();
    net.pump();
    net.nodes[b].c.join_room(now, "den").unwrap();
    net.pump();
    net.cut(a);
    // While a is away (its session gone), c joins: the re-joined room is not the one a left.
    net.nodes[c].c.join_room(net.now, "den").unwrap();
    net.pump();
    net.events(a);
    net.run_until(Duration::from_secs(2));
    assert!(net.nodes[a].c.is_registered());
    let ev = net.events(a);
    let pos_re = ev.iter().position(|e| *e == ClientEvent::Reconnected { resumed: false }).expect("reconnected");
    let rejoined: Vec<(usize, &RoomDetails, &Vec<PeerInfo>)> = ev
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e {
            ClientEvent::RoomRejoined { room, peers } => Some((i, room, peers)),
            _ => None,
        })
        .collect();
    let [(pos, room, peers)] = rejoined[..] else { panic!("one RoomRejoined: {ev:?}") };
    assert!(pos > pos_re);
    let fa = net.fp(a);
    assert_eq!((room.room_id.as_str(), room.owner, room.max_size), ("den", fa, 4));
    assert_eq!(room.metadata.as_ref().map(RawJson::to_value), Some(json!({"topic": "chess"})));
    let mut got: Vec<Fingerprint> = peers.iter().map(|p| p.fingerprint).collect();
    let mut want = vec![net.fp(b), net.fp(c)];
    got.sort_by_key(|f| f.to_string());
    want.sort_by_key(|f| f.to_string());
    assert_eq!(got, want, "the current other members");
    assert!(responses(&ev).is_empty(), "an automatic re-join is not a user response");
    assert_eq!(net.nodes[a].c.rooms().collect::<Vec<_>>(), ["den"]);
}

#[test]
fn a_resumed_session_sends_no_rejoins() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.registered(cfg(), 1);
    let now = net.now;
    net.nodes[a].c.join(now, "lobby", None, None).unwrap();
    net.nodes[a].c.create_room(now, "r", None, None).unwrap();
    net.pump();
    net.cut(a);
    let before = net.nodes[a].sent.len();
    net.run_until(Duration::from_secs(2));
    let types: Vec<String> = net.nodes[a].sent[before..].iter().map(|t| frame_type(t)).collect();
    assert_eq!(types, ["register"]);
    assert!(net.events(a).contains(&ClientEvent::Reconnected { resumed: true }));
}

// ---- requests ------------------------------------------------------------------------------------

#[test]
fn in_flight_requests_fail_with_disconnected_on_a_drop() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.registered(cfg(), 1);
    net.nodes[a].deaf = true;
    let p = net.nodes[a].c.ping(net.now).unwrap();
    net.pump();
    net.cut(a);
    assert_eq!(responses(&net.events(a)), vec![(p, Err(RequestError::Disconnected))]);
    // Requests made while reconnecting wait and succeed.
    net.nodes[a].deaf = false;
    let q = net.nodes[a].c.ping(net.now).unwrap();
    net.run_until(Duration::from_secs(2));
    assert!(matches!(&responses(&net.events(a))[..], [(id, Ok(Response::Pong { .. }))] if *id == q));
}

#[test]
fn unanswered_requests_time_out_after_request_timeout() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.registered(cfg(), 1);
    net.nodes[a].mute = true;
    let p = net.nodes[a].c.discover(net.now, "n", None).unwrap();
    net.pump();
    net.run_until(Duration::from_secs(30) - Duration::from_millis(1));
    assert!(responses(&net.events(a)).is_empty());
    net.run_until(Duration::from_secs(30));
    assert_eq!(responses(&net.events(a)), vec![(p, Err(RequestError::TimedOut))]);
}

#[test]
fn server_errors_reach_the_request() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.registered(cfg(), 1);
    let r = net.nodes[a].c.join_room(net.now, "missing").unwrap();
    net.nodes[a].c.relay(Fingerprint::from_bytes([9; 32]), &json!({"x": 1})).unwrap();
    net.pump();
    let ev = net.events(a);
    match &responses(&ev)[..] {
        [(id, Err(e))] if *id == r => assert_eq!(e.code(), Some(ErrorCode::RoomNotFound)),
        other => panic!("{other:?}"),
    }
    assert!(ev.iter().any(|e| matches!(e, ClientEvent::Error(ClientError::Server { code: ErrorCode::PeerNotFound, .. }))));
}

#[test]
fn relay_broadcast_and_match_end_to_end() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.registered(cfg().meta(json!({"emoji": "🦀"})), 1);
    let b = net.registered(cfg(), 2);
    let now = net.now;
    net.nodes[a].c.join(now, "n", None, None).unwrap();
    net.nodes[b].c.join(now, "n", None, None).unwrap();
    net.pump();
    let ev = net.events(b);
    assert!(
        ev.iter().any(|e| matches!(e, ClientEvent::PeerList { peers, .. }
            if peers.len() == 1 && peers[0].meta.as_ref().map(|m| m.to_value()) == Some(json!({"emoji": "🦀"})))),
        "{ev:?}"
    );
    let fb = net.fp(b);
    net.nodes[a].c.relay(fb, &json!({"sdp": "x"})).unwrap();
    net.nodes[a].c.broadcast("n", &json!([1, 2])).unwrap();
    net.pump();
    let fa = net.fp(a);
    let ev = net.events(b);
    assert!(ev.contains(&ClientEvent::Relay { from: fa, payload: RawJson::from_string(r#"{"sdp":"x"}"#.into()).unwrap() }));
    assert!(ev.iter().any(|e| matches!(e, ClientEvent::Broadcast { from, namespace, .. } if *from == fa && namespace == "n")));
    net.events(a);
    let ma = net.nodes[a].c.match_peers(now, "m", Some(&json!({"lvl": 1, "mode": "x"})), 2).unwrap();
    let mb = net.nodes[b].c.match_peers(now, "m", Some(&json!({"mode": "x", "lvl": 1})), 2).unwrap();
    net.pump();
    let ra = responses(&net.events(a));
    let rb = responses(&net.events(b));
    match (&ra[..], &rb[..]) {
        ([(ia, Ok(Response::Matched(x)))], [(ib, Ok(Response::Matched(y)))]) => {
            assert_eq!((*ia, *ib), (ma, mb));
            assert_eq!(x, y);
            assert_eq!(x.peers.len(), 2);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn list_rooms_reply_decodes_into_rooms() {
    let mut net = Net::new(ServerConfig::default());
    let owner = net.registered(cfg(), 1);
    let a = net.registered(cfg(), 2);
    let now = net.now;
    net.nodes[owner].c.create_room(now, "lan-1", Some(2), Some(&json!({"map": "dust"}))).unwrap();
    net.nodes[owner].c.create_room(now, "lan-0", Some(1), None).unwrap();
    net.nodes[owner].c.create_room(now, "web", None, None).unwrap();
    net.pump();
    let r = net.nodes[a].c.list_rooms(now, Some("lan-"), None).unwrap();
    net.pump();
    let details = RoomDetails {
        room_id: "lan-1".into(),
        owner: net.fp(owner),
        max_size: 2,
        metadata: Some(RawJson::from_value(&json!({"map": "dust"})).unwrap()),
    };
    let want = Response::Rooms(vec![RoomSummary { details, members: 1 }]);
    assert_eq!(responses(&net.events(a)), vec![(r, Ok(want))], "the full room lan-0 is not listed");
    let r = net.nodes[a].c.list_rooms(now, None, Some(1)).unwrap();
    net.pump();
    match &responses(&net.events(a))[..] {
        [(id, Ok(Response::Rooms(rooms)))] if *id == r => {
            let ids: Vec<&str> = rooms.iter().map(|s| s.details.room_id.as_str()).collect();
            assert_eq!(ids, ["lan-1"]);
        }
        other => panic!("{other:?}"),
    }
    let sent = net.nodes[a].sent.len();
    assert!(matches!(net.nodes[a].c.list_rooms(now, Some("bad\n"), None), Err(ClientError::InvalidInput(_))));
    assert_eq!(net.nodes[a].sent.len(), sent, "nothing sent for a bad prefix");
}

#[test]
fn turn_credentials_reply_decodes_into_issued_credentials() {
    let mut server = ServerConfig::default();
    server.turn = Some(crate::server::TurnSecretConfig::new("s3cret", ["turn:10.0.0.1:3478", "turn:turn.example.org"]).ttl(Duration::from_secs(300)));
    let mut net = Net::new(server);
    let a = net.registered(cfg(), 1);
    let now = net.now;
    let r = net.nodes[a].c.turn_credentials(now).unwrap();
    net.pump();
    let issued = match &responses(&net.events(a))[..] {
        [(id, Ok(Response::TurnCredentials(issued)))] if *id == r => issued.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(issued.ttl, Duration::from_secs(300));
    assert_eq!(issued.expires_at(), net.now + Duration::from_secs(300));
    let expiry = issued.expiry_unix_secs().expect("the user name starts with the expiry");
    assert_eq!(issued.username, format!("{expiry}:{}", net.fp(a)));
    assert_eq!(issued.credential, crate::server::turn_rest_credentials(b"s3cret", expiry, &net.fp(a)).1);
    assert!(!format!("{issued:?}").contains(&issued.credential), "the password stays out of Debug");
    // Ready for a node: both URLs as TURN servers with these credentials.
    let servers = issued.ice_server().turn_servers();
    let hosts: Vec<(&str, u16)> = servers.iter().map(|s| (s.host.as_str(), s.port)).collect();
    assert_eq!(hosts, [("10.0.0.1", 3478), ("turn.example.org", 3478)]);
    assert!(servers.iter().all(|s| s.credentials == issued.credentials()));
}

#[test]
fn turn_credentials_from_a_server_without_a_secret_fail_with_turn_unavailable() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.registered(cfg(), 1);
    let now = net.now;
    let r = net.nodes[a].c.turn_credentials(now).unwrap();
    net.pump();
    match &responses(&net.events(a))[..] {
        [(id, Err(e))] if *id == r => assert_eq!(e.code(), Some(ErrorCode::TurnUnavailable)),
        other => panic!("{other:?}"),
    }
}

// ---- fatal conditions ----------------------------------------------------------------------------

#[test]
fn unexpected_server_id_is_fatal() {
    let mut net = Net::new(ServerConfig::default());
    let mut c = cfg();
    c.expected_server_id = Some("elsewhere".into());
    let a = net.add(c, 1);
    net.nodes[a].c.connect(net.now).unwrap();
    net.pump();
    assert!(net.nodes[a].sent.is_empty(), "never signs for the wrong server");
    assert_eq!(net.nodes[a].closes, vec![CloseCode::PolicyViolation.code()]);
    let ev = net.events(a);
    assert!(ev.contains(&ClientEvent::Error(ClientError::ServerIdMismatch {
        expected: "elsewhere".into(),
        got: "peerlink".into()
    })));
    assert_eq!(ev.last(), Some(&ClientEvent::Disconnected { code: None, will_reconnect: false }));
    net.run_until(Duration::from_secs(100));
    assert_eq!(net.nodes[a].connects, 1);
}

/// Drives one client by hand through connect and challenge; returns it and its register frame.
fn hand_driven(now: Instant) -> (Client, String) {
    let mut c = Client::new(cfg(), ident(1), 3, now).unwrap();
    c.connect(now).unwrap();
    assert!(matches!(c.poll_transmit(), Some(ClientTransmit::Connect { .. })));
    c.handle_connected(now).unwrap();
    let challenge = ServerMessage::Challenge { version: 1, server_id: "s".into(), nonce: "bm9uY2U=".into(), auth_required: false };
    c.handle_text(now, &challenge.encode()).unwrap();
    let Some(ClientTransmit::Text(reg)) = c.poll_transmit() else { panic!() };
    assert_eq!(c.poll_event(), Some(ClientEvent::Connected));
    assert_eq!(c.poll_event(), None);
    (c, reg)
}

#[test]
fn a_server_assigned_fingerprint_that_is_not_ours_is_fatal() {
    let now = Instant::now();
    let (mut c, reg) = hand_driven(now);
    assert_eq!(frame_type(&reg), "register");
    let liar = ServerMessage::Registered {
        id: 1,
        fingerprint: ident(2).fingerprint(),
        alias: "".into(),
        resumed: false,
        namespaces: vec![],
        rooms: vec![],
        missed: 0,
    };
    c.handle_text(now, &liar.encode()).unwrap();
    assert!(!c.is_registered());
    assert_eq!(c.poll_transmit(), Some(ClientTransmit::Close { code: 1008 }));
    let ev: Vec<_> = std::iter::from_fn(|| c.poll_event()).collect();
    assert!(ev.iter().any(|e| matches!(e, ClientEvent::Error(ClientError::Protocol(_)))), "{ev:?}");
    assert_eq!(ev.last(), Some(&ClientEvent::Disconnected { code: None, will_reconnect: false }));
    assert_eq!(c.poll_timeout(), None);
}

#[test]
fn bad_signature_refusal_is_fatal_and_undecodable_frames_are_skipped() {
    let now = Instant::now();
    let (mut c, _) = hand_driven(now);
    c.handle_text(now, "{nope").unwrap();
    assert!(matches!(c.poll_event(), Some(ClientEvent::Error(ClientError::Protocol(_)))));
    let refused = ServerMessage::Error { id: Some(1), code: ErrorCode::BadSignature, message: "no".into() };
    c.handle_text(now, &refused.encode()).unwrap();
    assert_eq!(c.poll_transmit(), Some(ClientTransmit::Close { code: 1008 }));
    let ev: Vec<_> = std::iter::from_fn(|| c.poll_event()).collect();
    assert!(matches!(ev[0], ClientEvent::Error(ClientError::RegistrationRefused { code: ErrorCode::BadSignature, .. })));
}

#[test]
fn connect_timeout_without_a_challenge_reconnects() {
    let now = Instant::now();
    let mut c = Client::new(cfg(), ident(1), 3, now).unwrap();
    c.connect(now).unwrap();
    let _ = c.poll_transmit();
    c.handle_connected(now).unwrap();
    let t = c.poll_timeout().unwrap();
    assert_eq!(t, now + Duration::from_secs(10));
    c.handle_timeout(t - Duration::from_millis(1)).unwrap();
    assert_eq!(c.poll_transmit(), None);
    c.handle_timeout(t).unwrap();
    assert_eq!(c.poll_transmit(), Some(ClientTransmit::Close { code: 1001 }));
    assert!(c.poll_timeout().unwrap() > t);
}

// ---- time ----------------------------------------------------------------------------------------

#[test]
fn poll_timeout_moves_forward_and_spurious_timeouts_do_nothing() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.registered(cfg(), 1);
    net.nodes[a].mute = true;
    net.nodes[a].c.ping(net.now).unwrap();
    net.pump();
    let first = net.nodes[a].c.poll_timeout().unwrap();
    net.nodes[a].c.handle_timeout(first - Duration::from_millis(1)).unwrap();
    assert_eq!(net.nodes[a].c.poll_transmit(), None);
    assert_eq!(net.nodes[a].c.poll_event(), None);
    assert_eq!(net.nodes[a].c.poll_timeout(), Some(first));
    // step() asserts every deadline moves past now, through pings, timeouts, death and backoff.
    for _ in 0..200 {
        assert!(net.step());
    }
}

#[test]
fn disconnect_sends_bye_and_stops() {
    let mut net = Net::new(ServerConfig::default());
    let a = net.registered(cfg(), 1);
    let b = net.registered(cfg(), 2);
    let now = net.now;
    net.nodes[a].c.join(now, "n", None, None).unwrap();
    net.nodes[b].c.join(now, "n", None, None).unwrap();
    net.pump();
    net.events(a);
    net.nodes[b].c.disconnect(net.now).unwrap();
    net.pump();
    assert_eq!(net.nodes[b].sent.last().map(|t| frame_type(t)), Some("bye".into()));
    assert!(net.events(a).iter().any(|e| matches!(e, ClientEvent::PeerLeft { .. })), "peers see it leave at once");
    assert_eq!(net.nodes[b].c.poll_timeout(), None);
    assert_eq!(net.nodes[b].c.namespaces().count(), 0);
    net.run_until(Duration::from_secs(100));
    assert_eq!(net.nodes[b].connects, 1);
}

#[test]
fn a_lost_connection_fails_over_to_the_next_server_in_turn() {
    let config = cfg().fallback_url("ws://node-b").fallback_url("ws://node-c");
    assert_eq!((config.url_for(0), config.url_for(1), config.url_for(2), config.url_for(3)), ("ws://virtual", "ws://node-b", "ws://node-c", "ws://virtual"));
    let mut now = Instant::now();
    let mut c = Client::new(config, ident(1), 1, now).unwrap();
    c.connect(now).unwrap();
    let mut urls = Vec::new();
    for _ in 0..4 {
        while let Some(t) = c.poll_transmit() {
            if let ClientTransmit::Connect { url } = t {
                urls.push(url);
            }
        }
        // The socket cannot be opened: the next attempt, after the backoff, goes elsewhere.
        c.handle_disconnected(now, None).unwrap();
        now = c.poll_timeout().expect("a reconnect is scheduled");
        c.handle_timeout(now).unwrap();
    }
    assert_eq!(urls, ["ws://virtual", "ws://node-b", "ws://node-c", "ws://virtual"]);
    // Without fallbacks every attempt goes to `url`.
    let mut c = Client::new(cfg(), ident(2), 1, now).unwrap();
    c.connect(now).unwrap();
    c.handle_disconnected(now, None).unwrap();
    let t = c.poll_timeout().unwrap();
    c.handle_timeout(t).unwrap();
    let urls: Vec<String> = std::iter::from_fn(|| c.poll_transmit())
        .filter_map(|t| match t {
            ClientTransmit::Connect { url } => Some(url),
            _ => None,
        })
        .collect();
    assert_eq!(urls, ["ws://virtual", "ws://virtual"]);
}
