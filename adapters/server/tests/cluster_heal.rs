//! A signaling cluster healing after a Redis outage, against a real `redis-server`: two nodes
//! in this process on one Redis; Redis is killed (the nodes report the link down, refuse remote
//! relays with `unavailable` and keep serving their own clients) and started again on the same
//! port (the nodes reconnect within their backoff, resynchronise, and relay across again).
//!
//! Every wait is bounded polling ([`wait_until`]); no assertion rests on a fixed sleep.

mod common;

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use peerlink::identity::Fingerprint;
use peerlink::protocol::{ClientMessage, ErrorCode, ServerMessage};
use peerlink_server::{ServerHandle, ServerOptions, spawn};
use serde_json::value::RawValue;

const LOBBY: &str = "lobby";

/// A registered client that tells replies from what arrives unasked: replies are matched to
/// their request by id, and relays and namespace notices that arrive meanwhile are kept, in
/// order, for [`Peer::next_relay`] and [`Peer::next_notice`]. (Notices from another node come
/// whenever Redis delivers them, so a test cannot expect them at a fixed place in the stream.)
struct Peer {
    ws: Ws,
    fp: Fingerprint,
    next_id: u64,
    stash: VecDeque<ServerMessage>,
}

fn reply_id(m: &ServerMessage) -> Option<u64> {
    match m {
        ServerMessage::Ok { id } | ServerMessage::Joined { id, .. } | ServerMessage::Discovered { id, .. } => Some(*id),
        ServerMessage::Error { id, .. } => *id,
        _ => None,
    }
}

fn is_notice(m: &ServerMessage) -> bool {
    matches!(m, ServerMessage::PeerJoined { .. } | ServerMessage::PeerLeft { .. })
}

impl Peer {
    fn new(url: &str, seed: u64) -> Peer {
        Peer { ws: connect_registered(url, seed), fp: identity(seed).fingerprint(), next_id: 100, stash: VecDeque::new() }
    }

    /// Sends the request that `build` makes with a fresh id and returns its reply.
    fn request(&mut self, build: impl FnOnce(u64) -> String) -> ServerMessage {
        self.next_id += 1;
        let id = self.next_id;
        self.ws.send(tungstenite::Message::text(build(id))).expect("send");
        loop {
            let m = recv(&mut self.ws);
            if reply_id(&m) == Some(id) {
                return m;
            }
            self.stash.push_back(m);
        }
    }

    /// Joins `namespace`; returns the other members it lists, sorted.
    fn join(&mut self, namespace: &str) -> Vec<Fingerprint> {
        let reply = self.request(|id| ClientMessage::Join { id, namespace: namespace.into(), app_type: None, app_version: None }.encode());
        let ServerMessage::Joined { peers, .. } = reply else { panic!("join: {reply:?}") };
        sorted(peers.into_iter().map(|p| p.fingerprint))
    }

    /// The members `discover` lists in `namespace`, sorted.
    fn discover(&mut self, namespace: &str) -> Vec<Fingerprint> {
        let reply = self.request(|id| ClientMessage::Discover { id, namespace: namespace.into(), limit: None }.encode());
        let ServerMessage::Discovered { peers, .. } = reply else { panic!("discover: {reply:?}") };
        sorted(peers.into_iter().map(|p| p.fingerprint))
    }

    /// Relays `payload` (JSON text) to `to`; returns the reply (`ok` or an error).
    fn relay(&mut self, to: Fingerprint, payload: &str) -> ServerMessage {
        let payload = RawValue::from_string(payload.into()).unwrap();
        self.request(|id| ClientMessage::Relay { id: Some(id), to, payload: &payload }.encode())
    }

    /// The next message for which `want` holds, from what was kept or else from the socket
    /// (keeping what comes before it).
    fn next_where(&mut self, what: &str, want: impl Fn(&ServerMessage) -> bool) -> ServerMessage {
        if let Some(i) = self.stash.iter().position(&want) {
            return self.stash.remove(i).unwrap();
        }
        loop {
            let m = recv(&mut self.ws);
            if want(&m) {
                return m;
            }
            assert!(is_notice(&m) || matches!(m, ServerMessage::Relay { .. }), "unexpected while waiting for {what}: {m:?}");
            self.stash.push_back(m);
        }
    }

    /// The next relayed payload: its sender and text.
    fn next_relay(&mut self) -> (Fingerprint, String) {
        match self.next_where("a relay", |m| matches!(m, ServerMessage::Relay { .. })) {
            ServerMessage::Relay { from, payload } => (from, payload.get().to_owned()),
            _ => unreachable!(),
        }
    }

    /// The next `peer_joined` or `peer_left`.
    fn next_notice(&mut self) -> ServerMessage {
        self.next_where("a namespace notice", is_notice)
    }

    /// Says goodbye: the session ends at once.
    fn bye(mut self) {
        send(&mut self.ws, &ClientMessage::Bye);
    }
}

fn sorted(fps: impl IntoIterator<Item = Fingerprint>) -> Vec<Fingerprint> {
    let mut v: Vec<_> = fps.into_iter().collect();
    v.sort();
    v
}

/// `from` relays to `to`: the reply is `ok` (from `to`'s node) and the payload arrives.
fn relays(from: &mut Peer, to: &mut Peer, payload: &str) {
    match from.relay(to.fp, payload) {
        ServerMessage::Ok { .. } => {}
        other => panic!("relay {} -> {}: expected ok, got {other:?}", from.fp.short(), to.fp.short()),
    }
    assert_eq!(to.next_relay(), (from.fp, payload.to_owned()), "relay {} -> {}", from.fp.short(), to.fp.short());
}

fn assert_joined(notice: ServerMessage, who: Fingerprint) {
    match notice {
        ServerMessage::PeerJoined { namespace, peer } => assert_eq!((namespace.as_str(), peer.fingerprint), (LOBBY, who)),
        other => panic!("expected peer_joined of {}, got {other:?}", who.short()),
    }
}

fn assert_left(notice: ServerMessage, who: Fingerprint) {
    match notice {
        ServerMessage::PeerLeft { namespace, fingerprint } => assert_eq!((namespace.as_str(), fingerprint), (LOBBY, who)),
        other => panic!("expected peer_left of {}, got {other:?}", who.short()),
    }
}

/// `first` (alone so far) joins the lobby; once `second`'s node lists it there, `second`
/// joins too, and `first` is told.
fn meet(first: &mut Peer, second: &mut Peer) {
    assert!(first.join(LOBBY).is_empty());
    wait_until("the other node lists the first client in the lobby", || second.discover(LOBBY) == [first.fp]);
    assert_eq!(second.join(LOBBY), [first.fp]);
    assert_joined(first.next_notice(), second.fp);
}

/// Redis and two nodes on it (with their URLs), each node reporting healthy (its link up).
fn two_nodes() -> (Redis, [ServerHandle; 2], [String; 2]) {
    let redis = Redis::start();
    let nodes = [(); 2].map(|_| spawn(ServerOptions { redis: Some(redis.url()), ..ServerOptions::local() }).unwrap());
    wait_healthy(&nodes, "its cluster link first comes up");
    let urls = [nodes[0].url(), nodes[1].url()];
    (redis, nodes, urls)
}

fn healthz(node: &ServerHandle) -> Response {
    get(addr_of(&node.url()), "/healthz")
}

fn wait_healthy(nodes: &[ServerHandle], when: &str) {
    for (i, node) in nodes.iter().enumerate() {
        wait_until(&format!("node {}'s /healthz answers 200 once {when}", i + 1), || healthz(node).status == 200);
    }
}

fn wait_link_down(nodes: &[ServerHandle]) {
    for (i, node) in nodes.iter().enumerate() {
        wait_until(&format!("node {}'s /healthz answers 503 with Redis stopped", i + 1), || healthz(node).status == 503);
        let body = String::from_utf8(healthz(node).body).unwrap();
        assert!(body.contains("cluster link down"), "node {}'s /healthz: {body}", i + 1);
    }
}

#[test]
fn cluster_heals_after_redis_restarts_on_the_same_port() {
    let (mut redis, nodes, [n1, n2]) = two_nodes();

    // a on node 1, b on node 2, both in the lobby; relays cross both ways.
    let mut a = Peer::new(&n1, 1);
    let mut b = Peer::new(&n2, 2);
    let mut a2 = Peer::new(&n1, 3);
    meet(&mut a, &mut b);
    relays(&mut a, &mut b, r#"{"sdp":"offer"}"#);
    relays(&mut b, &mut a, r#"{"sdp":"answer"}"#);

    // Redis stops.
    redis.stop();
    wait_link_down(&nodes);
    // A relay to the other node fails clearly, either way.
    let (a_fp, b_fp) = (a.fp, b.fp);
    for (from, to) in [(&mut a, b_fp), (&mut b, a_fp)] {
        match from.relay(to, r#""down""#) {
            ServerMessage::Error { code: ErrorCode::Unavailable, .. } => {}
            other => panic!("relay {} -> {} with Redis down: expected unavailable, got {other:?}", from.fp.short(), to.short()),
        }
    }
    // Between two clients of node 1, relays go on.
    relays(&mut a, &mut a2, r#""local""#);
    relays(&mut a2, &mut a, r#""local back""#);
    // c registers and joins the lobby on node 2: node 2 lists it (and still lists a, from the
    // replica it kept), node 1 does not know it.
    let mut c = Peer::new(&n2, 4);
    assert_eq!(c.join(LOBBY), sorted([a.fp, b.fp]));
    assert_joined(b.next_notice(), c.fp);
    assert_eq!(b.discover(LOBBY), sorted([a.fp, c.fp]));
    assert_eq!(a.discover(LOBBY), [b.fp], "node 1 must not see c while Redis is down");

    // Redis comes back on the same port: both links come up within the reconnect backoff
    // (100 ms doubling to 5 s) and relays cross again, both ways.
    redis.restart();
    wait_healthy(&nodes, "Redis is back");
    relays(&mut a, &mut b, r#""a to b again""#);
    relays(&mut b, &mut a, r#""b to a again""#);
    // And node 1 learns c, who joined node 2 during the outage (whichever node resubscribed
    // first: each one's `hello` makes the other announce everything again).
    wait_until("node 1 lists c, who joined node 2 while Redis was down", || a.discover(LOBBY) == sorted([b.fp, c.fp]));
    relays(&mut a, &mut c, r#""a to c""#);
}

/// Nothing is published while the link is down, so no `session_down` for d is ever sent. Repaired by the full announcement (`resync` … `synced`) every node publishes when a link
/// comes back: what node 1 no longer announces is gone from node 2.
#[test]
fn a_session_that_ended_while_redis_was_down_leaves_the_other_nodes_after_heal() {
    let (mut redis, nodes, [n1, n2]) = two_nodes();

    // d on node 1 and b on node 2 in the lobby.
    let mut b = Peer::new(&n2, 2);
    let mut d = Peer::new(&n1, 5);
    meet(&mut b, &mut d);
    let d_fp = d.fp;

    // Redis stops; a joins the lobby on node 1, then d leaves (bye): a is told at once.
    redis.stop();
    wait_link_down(&nodes);
    let mut a = Peer::new(&n1, 1);
    assert_eq!(a.join(LOBBY), sorted([b.fp, d_fp]));
    d.bye();
    assert_left(a.next_notice(), d_fp);
    assert_eq!(a.discover(LOBBY), [b.fp]);

    // Redis is back: node 2 must drop d, who ended on node 1 while Redis was down.
    redis.restart();
    wait_healthy(&nodes, "Redis is back");
    wait_until("node 2 no longer lists d, who left node 1 while Redis was down", || !b.discover(LOBBY).contains(&d_fp));
    // b is told both changes it missed: a joined, d left (in whichever order they came).
    let notices = [b.next_notice(), b.next_notice()];
    let left = notices.iter().position(|n| matches!(n, ServerMessage::PeerLeft { .. })).expect("a peer_left");
    assert_left(notices[left].clone(), d_fp);
    assert_joined(notices[1 - left].clone(), a.fp);
}

/// A TCP proxy on 127.0.0.1 in front of Redis for one node, so that node's link can be kept
/// from coming back while the others' does: while closed it accepts and drops every connection.
struct Gate {
    port: u16,
    open: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Gate {
    fn start(redis: &Redis) -> Gate {
        let upstream = redis.addr();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, stop) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(false)));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let accept = {
            let (open, stop, conns) = (open.clone(), stop.clone(), conns.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let client = match listener.accept() {
                        Ok((client, _)) => client,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(e) => panic!("gate accept: {e}"),
                    };
                    if !open.load(Ordering::Acquire) {
                        continue; // dropped: the node's connection attempt fails
                    }
                    client.set_nonblocking(false).unwrap();
                    let Ok(server) = TcpStream::connect(upstream) else { continue };
                    for (from, to) in [(&client, &server), (&server, &client)] {
                        let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                    conns.lock().unwrap().extend([client, server]);
                }
            })
        };
        Gate { port, open, stop, conns, accept: Some(accept) }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::Release);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        // Ends the copying threads.
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// How many `PUBLISH` commands Redis has run since it started.
fn publishes(redis: &Redis) -> u64 {
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let info: String = redis::cmd("INFO").arg("commandstats").query(&mut con).unwrap();
    let line = info.lines().find(|l| l.starts_with("cmdstat_publish:"));
    line.map_or(0, |l| l.split("calls=").nth(1).unwrap().split(',').next().unwrap().parse().unwrap())
}

/// After an outage a node learns the sessions that joined other nodes meanwhile: from their
/// re-announcement when it is already subscribed, otherwise from the re-announcement its own
/// `hello` asks for. The second case is made certain here: node 1 reaches Redis through a
/// [`Gate`] held closed until node 2 has re-announced its sessions (with only node 2 listening).
/// (Until the publisher reconnected after every outage, this `hello` went out on a connection
/// Redis had closed and was lost.)
#[test]
fn a_node_whose_link_returns_last_learns_sessions_that_joined_while_redis_was_down() {
    let mut redis = Redis::start();
    let gate = Gate::start(&redis);
    let nodes = [gate.url(), redis.url()].map(|url| spawn(ServerOptions { redis: Some(url), ..ServerOptions::local() }).unwrap());
    wait_healthy(&nodes, "its cluster link first comes up");
    let [n1, n2] = [nodes[0].url(), nodes[1].url()];
    let mut a = Peer::new(&n1, 1);
    let mut b = Peer::new(&n2, 2);
    meet(&mut a, &mut b);

    // Redis stops; c joins on node 2; Redis is back, but node 1 cannot reach it yet.
    gate.set_open(false);
    redis.stop();
    wait_link_down(&nodes);
    let mut c = Peer::new(&n2, 4);
    assert_eq!(c.join(LOBBY), sorted([a.fp, b.fp]));
    redis.restart();
    wait_healthy(&nodes[1..], "Redis is back");
    // Node 2 re-announced b and c (two PUBLISHes at least, besides its hello) with nobody to hear.
    wait_until("node 2 re-announces its sessions", || publishes(&redis) >= 2);
    assert_eq!(healthz(&nodes[0]).status, 503, "node 1's link must still be down");

    // Node 1's link comes back: its hello makes node 2 announce c again.
    gate.set_open(true);
    wait_healthy(&nodes[..1], "its link may reach Redis again");
    wait_until("a (node 1) discovers c, who joined node 2 while node 1's link was down", || a.discover(LOBBY).contains(&c.fp));
    assert_eq!(a.discover(LOBBY), sorted([b.fp, c.fp]));
    assert_joined(a.next_notice(), c.fp);
    relays(&mut a, &mut c, r#""a to c""#);
    relays(&mut c, &mut a, r#""c to a""#);
    relays(&mut a, &mut b, r#""a to b""#);
}
