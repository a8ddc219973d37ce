//! Cluster tests: several core servers wired in memory, the test carrying every cluster
//! message between them (through its wire form) the way the adapter's broker would.

use super::*;

/// Nodes of one cluster; `settle` delivers cluster messages until none is left.
struct Net {
    nodes: Vec<H>,
    /// Nodes cut off: what they publish is lost and nothing reaches them.
    cut: HashSet<usize>,
}

impl Net {
    fn new(n: usize) -> Self {
        let mut net = Net {
            nodes: Vec::new(),
            cut: HashSet::new(),
        };
        for _ in 0..n {
            net.add();
        }
        net
    }

    /// Adds a node and brings its link up.
    fn add(&mut self) -> usize {
        let i = self.nodes.len();
        let mut h = H::default();
        h.next_conn = 100 * (i as u64 + 1);
        h.s.enable_cluster(ClusterConfig::new(NodeId(i as u64 + 1)));
        h.s.handle_cluster_link(h.now, true).unwrap();
        h.pump();
        self.nodes.push(h);
        self.settle();
        i
    }

    fn settle(&mut self) {
        for _ in 0..100 {
            let mut sent = Vec::new();
            for (i, h) in self.nodes.iter_mut().enumerate() {
                let from = h.s.node_id().unwrap();
                while let Some(t) = h.s.poll_cluster() {
                    if !self.cut.contains(&i) {
                        sent.push((i, t.target, encode_cluster(from, &t.message)));
                    }
                }
            }
            if sent.is_empty() {
                return;
            }
            for (i, target, wire) in sent {
                let (from, message) = decode_cluster(&wire).unwrap();
                for (j, h) in self.nodes.iter_mut().enumerate() {
                    let to_it = match target {
                        ClusterTarget::All => j != i,
                        ClusterTarget::Node(n) => h.s.node_id() == Some(n),
                    };
                    if to_it && !self.cut.contains(&j) {
                        h.s.handle_cluster(h.now, from, message.clone()).unwrap();
                        h.pump();
                    }
                }
            }
        }
        panic!("cluster messages never settle");
    }

    /// A request from a client of node `n`; returns its replies once the cluster settled.
    fn req(&mut self, n: usize, conn: ConnId, v: Value) -> Vec<ServerMessage> {
        self.nodes[n].send(conn, &v.to_string());
        self.settle();
        self.nodes[n].take(conn)
    }

    fn peer(&mut self, n: usize, seed: u64) -> (ConnId, Identity) {
        let p = self.nodes[n].peer(seed);
        self.settle();
        p
    }
}

fn relay(to: &Identity, id: Option<u64>, payload: Value) -> Value {
    match id {
        Some(id) => {
            json!({"type": "relay", "id": id, "to": to.fingerprint().to_string(), "payload": payload})
        }
        None => json!({"type": "relay", "to": to.fingerprint().to_string(), "payload": payload}),
    }
}

#[test]
fn relay_reaches_a_peer_on_another_node_and_its_ok_comes_back() {
    let mut net = Net::new(2);
    let (a, ia) = net.peer(0, 1);
    let (b, ib) = net.peer(1, 2);
    let payload = json!({"sdp": "offer", "n": [1, 2]});
    assert_eq!(
        net.req(0, a, relay(&ib, Some(7), payload.clone())),
        vec![ServerMessage::Ok { id: 7 }]
    );
    match &net.nodes[1].take(b)[..] {
        [ServerMessage::Relay { from, payload: p }] => {
            assert_eq!(*from, ia.fingerprint());
            assert_eq!(p.to_value(), payload);
        }
        other => panic!("{other:?}"),
    }
    // Fire-and-forget: delivered, no ok.
    assert!(net.req(0, a, relay(&ib, None, json!(2))).is_empty());
    assert_eq!(net.nodes[1].take(b).len(), 1);
    // And back the other way.
    assert_eq!(
        net.req(1, b, relay(&ia, Some(3), json!("hi"))),
        vec![ServerMessage::Ok { id: 3 }]
    );
    assert!(
        matches!(&net.nodes[0].take(a)[..], [ServerMessage::Relay { from, .. }] if *from == ib.fingerprint())
    );
    // Registered nowhere: the same error as on a single server, and nothing is published.
    let out = net.req(0, a, relay(&ident(50), Some(4), json!(1)));
    assert_eq!(error_of(&out[0]), (Some(4), ErrorCode::PeerNotFound));
    assert_eq!(net.nodes[0].s.poll_cluster(), None);
}

#[test]
fn relay_to_a_session_that_ended_in_flight_gets_peer_not_found_from_its_node() {
    let mut net = Net::new(2);
    let (a, _) = net.peer(0, 1);
    let (b, ib) = net.peer(1, 2);
    // b leaves, but node 1's `session_down` has not reached node 0 when a relays.
    net.nodes[1].send(b, r#"{"type":"bye"}"#);
    net.nodes[0].send(a, &relay(&ib, Some(9), json!(1)).to_string());
    assert!(
        net.nodes[0].take(a).is_empty(),
        "the answer comes from node 1"
    );
    net.settle();
    let out = net.nodes[0].take(a);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(error_of(&out[0]), (Some(9), ErrorCode::PeerNotFound));
    assert_eq!(net.nodes[0].s.remote_sessions(), 0);
}

#[test]
fn namespace_membership_spans_nodes() {
    let mut net = Net::new(2);
    let (a, ia) = net.peer(0, 1);
    let (b, ib) = net.peer(1, 2);
    let (c, ic) = net.peer(1, 3);
    let joined = net.req(
        0,
        a,
        json!({"type": "join", "id": 1, "namespace": "game", "app_type": "chess"}),
    );
    assert!(joined_peers(&joined).is_empty());
    let joined = net.req(1, b, json!({"type": "join", "id": 1, "namespace": "game"}));
    assert_eq!(joined_peers(&joined), vec![ia.fingerprint()]);
    match &joined[0] {
        ServerMessage::Joined { peers, .. } => {
            assert_eq!(peers[0].alias, format!("peer-{}", ia.fingerprint().short()));
            assert_eq!(peers[0].app_type.as_deref(), Some("chess"));
        }
        other => panic!("{other:?}"),
    }
    match &net.nodes[0].take(a)[..] {
        [ServerMessage::PeerJoined { namespace, peer }] => {
            assert_eq!(namespace, "game");
            assert_eq!(peer.fingerprint, ib.fingerprint());
        }
        other => panic!("{other:?}"),
    }
    let joined = net.req(1, c, json!({"type": "join", "id": 1, "namespace": "game"}));
    assert_eq!(
        joined_peers(&joined),
        vec![ia.fingerprint(), ib.fingerprint()]
    );
    assert!(
        matches!(&net.nodes[0].take(a)[..], [ServerMessage::PeerJoined { peer, .. }] if peer.fingerprint == ic.fingerprint())
    );
    assert!(
        matches!(&net.nodes[1].take(b)[..], [ServerMessage::PeerJoined { peer, .. }] if peer.fingerprint == ic.fingerprint())
    );
    // discover sees across nodes too.
    match &net.req(
        0,
        a,
        json!({"type": "discover", "id": 2, "namespace": "game"}),
    )[..]
    {
        [ServerMessage::Discovered { peers, .. }] => {
            assert_eq!(peer_fps(peers), vec![ib.fingerprint(), ic.fingerprint()])
        }
        other => panic!("{other:?}"),
    }
    // A broadcast reaches the members on the other node once each.
    assert!(
        net.req(
            0,
            a,
            json!({"type": "broadcast", "namespace": "game", "payload": "all"})
        )
        .is_empty()
    );
    for conn in [b, c] {
        assert!(
            matches!(&net.nodes[1].take(conn)[..], [ServerMessage::Broadcast { from, .. }] if *from == ia.fingerprint())
        );
    }
    // Leaving is seen on the other node; so is a session's end.
    assert_eq!(
        net.req(1, b, json!({"type": "leave", "id": 3, "namespace": "game"})),
        vec![ServerMessage::Ok { id: 3 }]
    );
    assert!(
        matches!(&net.nodes[0].take(a)[..], [ServerMessage::PeerLeft { fingerprint, .. }] if *fingerprint == ib.fingerprint())
    );
    assert!(
        matches!(&net.nodes[1].take(c)[..], [ServerMessage::PeerLeft { fingerprint, .. }] if *fingerprint == ib.fingerprint())
    );
    net.nodes[0].send(a, r#"{"type":"bye"}"#);
    net.settle();
    assert!(
        matches!(&net.nodes[1].take(c)[..], [ServerMessage::PeerLeft { fingerprint, .. }] if *fingerprint == ia.fingerprint())
    );
    assert_eq!(net.nodes[1].s.remote_sessions(), 0);
    // Node 1 holds only its own member now.
    assert_eq!(
        joined_peers(&net.req(1, b, json!({"type": "join", "id": 4, "namespace": "game"}))),
        vec![ic.fingerprint()]
    );
}

#[test]
fn a_node_that_links_up_late_learns_the_existing_sessions() {
    let mut net = Net::new(1);
    let (a, ia) = net.peer(0, 1);
    assert!(
        joined_peers(&net.req(0, a, json!({"type": "join", "id": 1, "namespace": "lobby"})))
            .is_empty()
    );
    let n = net.add();
    assert_eq!(net.nodes[n].s.remote_sessions(), 1);
    let (b, ib) = net.peer(n, 2);
    assert_eq!(
        joined_peers(&net.req(n, b, json!({"type": "join", "id": 1, "namespace": "lobby"}))),
        vec![ia.fingerprint()]
    );
    assert_eq!(
        net.req(n, b, relay(&ia, Some(2), json!(1))),
        vec![ServerMessage::Ok { id: 2 }]
    );
    let out = net.nodes[0].take(a);
    assert!(
        matches!(&out[..], [ServerMessage::PeerJoined { peer, .. }, ServerMessage::Relay { .. }] if peer.fingerprint == ib.fingerprint()),
        "{out:?}"
    );
}

#[test]
fn a_node_leaving_or_gone_takes_its_sessions_out_of_the_cluster() {
    let mut net = Net::new(3);
    let (a, _) = net.peer(0, 1);
    let (b, ib) = net.peer(1, 2);
    let (c, ic) = net.peer(2, 3);
    for (n, conn) in [(0, a), (1, b), (2, c)] {
        net.req(n, conn, json!({"type": "join", "id": 1, "namespace": "ns"}));
    }
    for (n, conn) in [(0, a), (1, b), (2, c)] {
        net.nodes[n].take(conn);
    }
    // Node 1 leaves cleanly: its `bye` takes b out everywhere.
    let now = net.nodes[1].now;
    net.nodes[1].s.leave_cluster(now).unwrap();
    net.settle();
    net.cut.insert(1);
    assert!(
        matches!(&net.nodes[0].take(a)[..], [ServerMessage::PeerLeft { fingerprint, .. }] if *fingerprint == ib.fingerprint())
    );
    assert!(
        matches!(&net.nodes[2].take(c)[..], [ServerMessage::PeerLeft { fingerprint, .. }] if *fingerprint == ib.fingerprint())
    );
    let out = net.req(0, a, relay(&ib, Some(5), json!(1)));
    assert_eq!(error_of(&out[0]), (Some(5), ErrorCode::PeerNotFound));
    // Node 2 vanishes without a word; the adapter reports it gone.
    net.cut.insert(2);
    let now = net.nodes[0].now;
    net.nodes[0].s.handle_node_gone(now, NodeId(3)).unwrap();
    net.nodes[0].pump();
    assert!(
        matches!(&net.nodes[0].take(a)[..], [ServerMessage::PeerLeft { fingerprint, .. }] if *fingerprint == ic.fingerprint())
    );
    assert_eq!(net.nodes[0].s.remote_sessions(), 0);
    assert!(
        joined_peers(&net.req(0, a, json!({"type": "join", "id": 2, "namespace": "ns"})))
            .is_empty()
    );
}

#[test]
fn with_the_link_down_health_is_degraded_and_remote_relays_fail_with_unavailable() {
    let mut net = Net::new(2);
    let (a, _) = net.peer(0, 1);
    let (_, ib) = net.peer(1, 2);
    let (a2, ia2) = net.peer(0, 3);
    assert_eq!(
        net.nodes[0].s.health(net.nodes[0].now).status,
        HealthStatus::Ok
    );
    let now = net.nodes[0].now;
    net.nodes[0].s.handle_cluster_link(now, false).unwrap();
    let health = net.nodes[0].s.health(now);
    assert_eq!(health.status, HealthStatus::Degraded);
    assert_eq!(health.reasons, vec!["cluster link down".to_owned()]);
    let out = net.req(0, a, relay(&ib, Some(1), json!(1)));
    assert_eq!(error_of(&out[0]), (Some(1), ErrorCode::Unavailable));
    // Local relays keep working.
    assert_eq!(
        net.req(0, a, relay(&ia2, Some(2), json!(1))),
        vec![ServerMessage::Ok { id: 2 }]
    );
    assert_eq!(net.nodes[0].take(a2).len(), 1);
    // Back up: healthy, and the relay goes through.
    net.nodes[0].s.handle_cluster_link(now, true).unwrap();
    net.settle();
    assert_eq!(net.nodes[0].s.health(now).status, HealthStatus::Ok);
    assert_eq!(
        net.req(0, a, relay(&ib, Some(3), json!(1))),
        vec![ServerMessage::Ok { id: 3 }]
    );
}

#[test]
fn a_single_server_publishes_nothing_and_ignores_cluster_input() {
    let mut h = H::default();
    let (a, _) = h.peer(1);
    join(&mut h, a, "ns", 1);
    assert_eq!(h.s.poll_cluster(), None);
    let up = ClusterMessage::SessionUp {
        fingerprint: ident(2).fingerprint(),
        alias: "x".into(),
        meta: None,
        namespaces: vec![],
    };
    h.s.handle_cluster(h.now, NodeId(9), up).unwrap();
    assert_eq!(h.s.remote_sessions(), 0);
    assert!(joined_peers(&join(&mut h, a, "ns", 2)).is_empty());
}

#[test]
fn remote_sessions_beyond_the_bound_are_not_recorded_and_counted() {
    let mut h = H::default();
    let mut cfg = ClusterConfig::new(NodeId(1));
    cfg.max_remote_sessions = 2;
    h.s.enable_cluster(cfg);
    h.s.handle_cluster_link(h.now, true).unwrap();
    for seed in 1..=3 {
        let up = ClusterMessage::SessionUp {
            fingerprint: ident(seed).fingerprint(),
            alias: String::new(),
            meta: None,
            namespaces: vec![],
        };
        h.s.handle_cluster(h.now, NodeId(2), up).unwrap();
    }
    assert_eq!(h.s.remote_sessions(), 2);
    assert_eq!(h.s.cluster_dropped(), 1);
}

#[test]
fn cluster_messages_round_trip_through_their_wire_form() {
    let msg = ClusterMessage::Relay {
        from: ident(1).fingerprint(),
        to: ident(2).fingerprint(),
        id: Some(4),
        payload: RawJson::from_string(r#"{"a":[1,2]}"#.into()).unwrap(),
    };
    let wire = encode_cluster(NodeId(77), &msg);
    assert_eq!(decode_cluster(&wire).unwrap(), (NodeId(77), msg));
    assert!(matches!(
        decode_cluster("{\"from\":1}"),
        Err(ClusterDecodeError::Malformed(_))
    ));
}
