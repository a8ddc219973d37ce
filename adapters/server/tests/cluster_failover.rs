//! A three-node signaling cluster for real: a `redis-server` on a free port and three
//! `peerlink-server` processes on it. Clients spread over the nodes share namespaces and rooms,
//! broadcast, match and kick across nodes; then one node is killed (SIGKILL: no goodbye, its
//! sockets just vanish) and its client resumes on another node — the real `peerlink` client,
//! failing over through `ClientConfig::fallback_urls` — with every relay addressed to it
//! during the failover delivered.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::process::Child;
use std::time::{Duration, Instant};

use common::*;
use peerlink::protocol::{ClientMessage, RoomConfig, ServerMessage};
use peerlink::{ClientConfig, ClientEvent};
use serde_json::value::RawValue;
use serde_json::json;

/// Three server processes on one Redis; each killed when dropped.
struct Cluster {
    nodes: Vec<Child>,
    urls: Vec<String>,
    _redis: Redis,
}

impl Cluster {
    fn start() -> Cluster {
        let redis = Redis::start();
        let url = redis.url();
        let (nodes, urls): (Vec<Child>, Vec<String>) =
            (0..3).map(|_| spawn_binary(&["--listen", "127.0.0.1:0", "--redis", &url])).unzip();
        for u in &urls {
            wait_until("the node's cluster link is up", || get(addr_of(u), "/healthz").status == 200);
        }
        Cluster { nodes, urls, _redis: redis }
    }

    fn metrics(&self, node: usize) -> String {
        String::from_utf8(get(addr_of(&self.urls[node]), "/metrics").body).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends a request and returns the reply with its id, passing over notices that come first.
fn request(ws: &mut Ws, msg: &ClientMessage<'_>) -> ServerMessage {
    let id = msg.id();
    send(ws, msg);
    loop {
        let m = recv(ws);
        if reply_id(&m) == id {
            return m;
        }
    }
}

/// The request id a reply answers (`None` for notices).
fn reply_id(m: &ServerMessage) -> Option<u64> {
    match m {
        ServerMessage::Ok { id }
        | ServerMessage::Discovered { id, .. }
        | ServerMessage::RoomCreated { id, .. }
        | ServerMessage::RoomJoined { id, .. }
        | ServerMessage::RoomInfo { id, .. }
        | ServerMessage::Matched { id, .. } => Some(*id),
        ServerMessage::Error { id, .. } => *id,
        _ => None,
    }
}

/// Polls `discover` on `ws` until `n` others are listed in `namespace`.
fn wait_members(ws: &mut Ws, namespace: &str, n: usize) {
    let mut id = 1000;
    wait_until("the namespace lists every member", || {
        id += 1;
        match request(ws, &ClientMessage::Discover { id, namespace: namespace.into(), limit: None }) {
            ServerMessage::Discovered { peers, .. } => peers.len() == n,
            other => panic!("{other:?}"),
        }
    });
}

/// Reads frames until one matches, failing on anything `forbidden` says.
fn recv_until(ws: &mut Ws, what: &str, mut pred: impl FnMut(&ServerMessage) -> bool) -> ServerMessage {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(Instant::now() < deadline, "no {what}");
        let m = recv(ws);
        if pred(&m) {
            return m;
        }
    }
}

#[test]
fn clients_of_three_nodes_share_rooms_broadcast_match_and_kick() {
    let cluster = Cluster::start();
    let mut ws: Vec<Ws> = (0..3).map(|n| connect_registered(&cluster.urls[n], n as u64 + 1)).collect();
    let fp = |n: usize| identity(n as u64 + 1).fingerprint();
    for (n, w) in ws.iter_mut().enumerate() {
        send(w, &ClientMessage::Join { id: 1, namespace: "lobby".into(), app_type: None, app_version: None });
        assert!(matches!(recv(w), ServerMessage::Joined { .. }), "node {n}");
    }
    for w in ws.iter_mut() {
        wait_members(w, "lobby", 2);
    }
    // A broadcast from node 0 reaches the members on nodes 1 and 2.
    let payload = RawValue::from_string(r#"{"hello":"all"}"#.into()).unwrap();
    send(&mut ws[0], &ClientMessage::Broadcast { id: Some(2), namespace: "lobby".into(), payload: &payload });
    recv_until(&mut ws[0], "ok for the broadcast", |m| *m == ServerMessage::Ok { id: 2 });
    for n in [1, 2] {
        let m = recv_until(&mut ws[n], "the broadcast", |m| matches!(m, ServerMessage::Broadcast { .. }));
        assert!(matches!(m, ServerMessage::Broadcast { from, payload, .. } if from == fp(0) && payload.get() == r#"{"hello":"all"}"#));
    }

    // A room created on node 0, joined from nodes 1 and 2.
    let create = ClientMessage::CreateRoom { id: 3, room_id: "arena".into(), config: RoomConfig { max_size: Some(3), metadata: None } };
    assert!(matches!(request(&mut ws[0], &create), ServerMessage::RoomCreated { .. }));
    for n in [1, 2] {
        let mut id = 100;
        wait_until("the room is known on every node", || {
            id += 1;
            matches!(request(&mut ws[n], &ClientMessage::RoomInfo { id, room_id: "arena".into() }), ServerMessage::RoomInfo { .. })
        });
    }
    match request(&mut ws[1], &ClientMessage::JoinRoom { id: 4, room_id: "arena".into() }) {
        ServerMessage::RoomJoined { owner, peers, .. } => {
            assert_eq!(owner, fp(0));
            assert_eq!(peers.iter().map(|p| p.fingerprint).collect::<Vec<_>>(), vec![fp(0)]);
        }
        other => panic!("{other:?}"),
    }
    match request(&mut ws[2], &ClientMessage::JoinRoom { id: 5, room_id: "arena".into() }) {
        ServerMessage::RoomJoined { peers, .. } => assert_eq!(peers.len(), 2),
        other => panic!("{other:?}"),
    }
    for (n, joined) in [(0, 1), (0, 2), (1, 2)] {
        let m = recv_until(&mut ws[n], "room_peer_joined", |m| matches!(m, ServerMessage::RoomPeerJoined { .. }));
        assert!(matches!(&m, ServerMessage::RoomPeerJoined { peer, .. } if peer.fingerprint == fp(joined)), "{n}: {m:?}");
    }
    // Full, as seen from node 1 for a fourth client.
    let mut d = connect_registered(&cluster.urls[1], 4);
    let m = request(&mut d, &ClientMessage::JoinRoom { id: 6, room_id: "arena".into() });
    assert!(matches!(m, ServerMessage::Error { code: peerlink::protocol::ErrorCode::RoomFull, .. }), "{m:?}");

    // A match of three, one client per node: one session id for all.
    let mut sessions = HashSet::new();
    for (n, w) in ws.iter_mut().enumerate() {
        send(w, &ClientMessage::Match { id: 7, namespace: "duel".into(), criteria: None, group_size: 3 });
        let _ = n;
    }
    for w in ws.iter_mut() {
        match recv_until(w, "matched", |m| matches!(m, ServerMessage::Matched { .. } | ServerMessage::Error { .. })) {
            ServerMessage::Matched { id: 7, session_id, peers, .. } => {
                assert_eq!(peers.len(), 3);
                sessions.insert(session_id);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sessions.len(), 1);

    // The owner (node 0) kicks the member on node 2: node 2 tells it, node 1 tells the other.
    let kick = ClientMessage::Kick { id: 8, room_id: "arena".into(), fingerprint: fp(2) };
    assert_eq!(request(&mut ws[0], &kick), ServerMessage::Ok { id: 8 });
    recv_until(&mut ws[2], "kicked", |m| matches!(m, ServerMessage::Kicked { room_id } if room_id == "arena"));
    let m = recv_until(&mut ws[1], "room_peer_left", |m| matches!(m, ServerMessage::RoomPeerLeft { .. }));
    assert!(matches!(m, ServerMessage::RoomPeerLeft { fingerprint, kicked: true, .. } if fingerprint == fp(2)));
    // And the room is open again for d.
    assert!(matches!(request(&mut d, &ClientMessage::JoinRoom { id: 9, room_id: "arena".into() }), ServerMessage::RoomJoined { .. }));
}

#[test]
fn a_killed_nodes_client_resumes_on_another_node_and_no_relay_to_it_is_lost() {
    let mut cluster = Cluster::start();
    // The mover: the real client, on node 2, failing over to nodes 0 and 1.
    let mut config = ClientConfig::new(&cluster.urls[2]).alias("mover").fallback_url(&cluster.urls[0]).fallback_url(&cluster.urls[1]);
    config.reconnect_delay = Duration::from_millis(50);
    config.reconnect_max_delay = Duration::from_millis(400);
    let options = peerlink_blocking::PollOptions { identity: Some(identity(9)), seed: Some(1), ..Default::default() };
    let mut mover = peerlink_blocking::Client::connect_with(config, options).unwrap();
    mover.join("ns").unwrap();
    // Two senders, on nodes 0 and 1, in the namespace too (to see that the mover never leaves).
    let mut senders = [connect_registered(&cluster.urls[0], 1), connect_registered(&cluster.urls[1], 2)];
    for s in senders.iter_mut() {
        send(s, &ClientMessage::Join { id: 1, namespace: "ns".into(), app_type: None, app_version: None });
        assert!(matches!(recv(s), ServerMessage::Joined { .. }));
    }
    for s in senders.iter_mut() {
        wait_members(s, "ns", 2);
    }
    let target = identity(9).fingerprint();

    // Both send relays (each asking for an ok) at about 200/s each; node 2 is killed a third of
    // the way through.
    const N: u64 = 240;
    for i in 0..N {
        if i == N / 3 {
            cluster.nodes[2].kill().unwrap();
            cluster.nodes[2].wait().unwrap();
        }
        for (k, s) in senders.iter_mut().enumerate() {
            let payload = RawValue::from_string(format!(r#"{{"k":{k},"n":{i}}}"#)).unwrap();
            send(s, &ClientMessage::Relay { id: Some(10 + i), to: target, payload: &payload });
        }
        // Keep the mover's client going meanwhile (it notices the loss and fails over).
        mover.poll_client().poll(Instant::now()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }

    // The mover gets every relay of both senders, wherever it was when it was sent.
    let mut got: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut duplicates = 0;
    let (mut resumed, mut reconnecting) = (None, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 2 * N as usize {
        assert!(Instant::now() < deadline, "only {} of {} relays arrived; missing {:?}", got.len(), 2 * N, (0..2).flat_map(|k| (0..N).map(move |i| (k, i))).filter(|p| !got.contains(p)).take(20).collect::<Vec<_>>());
        match mover.next_event(Duration::from_millis(200)).unwrap() {
            Some(ClientEvent::Relay { from, payload }) => {
                let v = payload.to_value();
                let key = (v["k"].as_u64().unwrap(), v["n"].as_u64().unwrap());
                assert_eq!(from, identity(key.0 + 1).fingerprint());
                if !got.insert(key) {
                    duplicates += 1;
                }
            }
            Some(ClientEvent::Reconnected { resumed: r }) => resumed = Some(r),
            Some(ClientEvent::Reconnecting { .. }) => reconnecting += 1,
            Some(ClientEvent::PeerLeft { .. }) => panic!("a resumed session sees nobody leave"),
            _ => {}
        }
    }
    assert!(reconnecting >= 1);
    assert_eq!(resumed, Some(true), "the session resumed on the other node");
    eprintln!("all {} relays arrived ({duplicates} twice: sent by the dead node and not yet acknowledged)", 2 * N);
    // Every sender got its ok for every relay, and never saw the mover leave.
    for (k, s) in senders.iter_mut().enumerate() {
        let mut oks = HashSet::new();
        while oks.len() < N as usize {
            match recv(s) {
                ServerMessage::Ok { id } => assert!(oks.insert(id), "sender {k}: ok {id} twice"),
                ServerMessage::PeerLeft { fingerprint, .. } if fingerprint == target => panic!("sender {k} saw the mover leave"),
                ServerMessage::Error { id, code, message } => panic!("sender {k}: relay {id:?} failed: {code:?} {message}"),
                _ => {}
            }
        }
    }
    // The mover is where it moved, in its namespace, reachable and reaching.
    assert_eq!(mover.discover("ns", None).unwrap().len(), 2);
    mover.relay(identity(1).fingerprint(), &json!("back")).unwrap();
    recv_until(&mut senders[0], "the mover's relay", |m| matches!(m, ServerMessage::Relay { from, .. } if *from == target));
    // The survivors counted one node gone.
    for n in [0, 1] {
        assert!(cluster.metrics(n).contains("\npeerlink_cluster_nodes_gone_total 1\n"), "{}", cluster.metrics(n));
    }
}
