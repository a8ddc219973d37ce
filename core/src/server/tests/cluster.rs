//! Cluster tests: several core servers wired in memory, the test carrying every cluster
//! message between them (through its wire form) the way the adapter's broker would.

use super::*;

/// Nodes of one cluster; `settle` delivers cluster messages until none is left. Messages of
/// one publisher on one channel to one subscriber can be held back and released later, in their
/// order (Redis keeps only per-publisher, per-channel order).
/// Channel of a cluster message: `true` for the `all` channel, `false` for a node channel.
type Hold = (usize, usize, bool);

struct Net {
    nodes: Vec<H>,
    /// Nodes cut off: what they publish is lost and nothing reaches them.
    cut: HashSet<usize>,
    /// (publisher, subscriber, all-channel) pairs whose messages are held back.
    hold: HashSet<Hold>,
    held: HashMap<Hold, VecDeque<String>>,
}

impl Net {
    fn new(n: usize) -> Self {
        let mut net = Net { nodes: Vec::new(), cut: HashSet::new(), hold: HashSet::new(), held: HashMap::new() };
        for _ in 0..n {
            net.add();
        }
        net
    }

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

    fn deliver(&mut self, j: usize, wire: &str) {
        let (from, message) = decode_cluster(wire).unwrap();
        let h = &mut self.nodes[j];
        h.s.handle_cluster(h.now, from, message).unwrap();
        h.pump();
    }

    /// Delivers until nothing is left; false if it never settles within `rounds`.
    fn try_settle(&mut self, rounds: usize) -> bool {
        for _ in 0..rounds {
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
                return true;
            }
            for (i, target, wire) in sent {
                for j in 0..self.nodes.len() {
                    let (to_it, all) = match target {
                        ClusterTarget::All => (j != i, true),
                        ClusterTarget::Node(n) => (self.nodes[j].s.node_id() == Some(n), false),
                    };
                    if !to_it || self.cut.contains(&j) {
                        continue;
                    }
                    if self.hold.contains(&(i, j, all)) {
                        self.held.entry((i, j, all)).or_default().push_back(wire.clone());
                        continue;
                    }
                    self.deliver(j, &wire);
                }
            }
        }
        false
    }

    fn settle(&mut self) {
        assert!(self.try_settle(100), "cluster messages never settle");
    }

    /// Stops holding `key` and delivers what was held, in order (even from a node cut since:
    /// the broker already has it).
    fn release(&mut self, key: Hold) {
        self.hold.remove(&key);
        let msgs = self.held.remove(&key).unwrap_or_default();
        for wire in msgs {
            if !self.cut.contains(&key.1) {
                self.deliver(key.1, &wire);
            }
        }
        self.settle();
    }

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

    fn advance(&mut self, d: Duration) {
        let step = Duration::from_millis(100);
        let mut done = Duration::ZERO;
        while done < d {
            done += step;
            for (i, h) in self.nodes.iter_mut().enumerate() {
                if self.cut.contains(&i) {
                    continue;
                }
                h.now += step;
                if done.subsec_millis() == 0 {
                    let conns: Vec<ConnId> =
                        h.s.conns.iter().filter(|(_, c)| c.session.is_some()).map(|(id, _)| *id).collect();
                    for conn in conns {
                        h.s.handle_message(conn, h.now, r#"{"type":"ping","id":0}"#).unwrap();
                        h.pump();
                        let inbox = h.inbox.entry(conn).or_default();
                        inbox.retain(|m| !matches!(m, ServerMessage::Pong { id: 0 }));
                    }
                }
                h.s.handle_timeout(h.now).unwrap();
                h.pump();
            }
            self.settle();
        }
    }

    /// Registers identity `seed` on node `n` with a new connection, without settling.
    fn register_unsettled(&mut self, n: usize, seed: u64) -> (ConnId, Vec<ServerMessage>) {
        let conn = self.nodes[n].connect();
        let out = self.nodes[n].register(conn, &ident(seed));
        (conn, out)
    }

    /// Registers identity `seed` on node `n` with a new connection; returns it and the replies.
    fn register(&mut self, n: usize, seed: u64) -> (ConnId, Vec<ServerMessage>) {
        let (conn, out) = self.register_unsettled(n, seed);
        self.settle();
        let mut all = out;
        all.extend(self.nodes[n].take(conn));
        (conn, all)
    }

    /// The members of `room` in node `n`'s copy, if it has one.
    fn members(&self, n: usize, room: &str) -> Option<Vec<Fingerprint>> {
        self.nodes[n].s.rooms.get(room).map(|r| r.members.clone())
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
fn a_node_leaving_or_gone_keeps_its_sessions_for_the_resume_grace_then_drops_them() {
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
    // Node 1 leaves cleanly, node 2 vanishes without a word (the adapter reports it gone).
    let now = net.nodes[1].now;
    net.nodes[1].s.leave_cluster(now).unwrap();
    net.settle();
    net.cut.insert(1);
    net.cut.insert(2);
    let now = net.nodes[0].now;
    net.nodes[0].s.handle_node_gone(now, NodeId(3)).unwrap();
    net.nodes[0].pump();
    // Their clients may resume elsewhere: no peer_left yet, and relays to them are held (ok).
    assert!(net.nodes[0].take(a).is_empty());
    assert_eq!(net.nodes[0].s.cluster_stats().unwrap().waiting_sessions, 2);
    assert_eq!(net.req(0, a, relay(&ib, Some(5), json!(1))), vec![ServerMessage::Ok { id: 5 }]);
    // The grace ends: they leave.
    net.advance(Duration::from_secs(31));
    let out = net.nodes[0].take(a);
    let left: HashSet<Fingerprint> = out
        .iter()
        .map(|m| match m {
            ServerMessage::PeerLeft { fingerprint, .. } => *fingerprint,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(left, HashSet::from([ib.fingerprint(), ic.fingerprint()]));
    assert_eq!(net.nodes[0].s.remote_sessions(), 0);
    let out = net.req(0, a, relay(&ib, Some(6), json!(1)));
    assert_eq!(error_of(&out[0]), (Some(6), ErrorCode::PeerNotFound));
    assert!(joined_peers(&net.req(0, a, json!({"type": "join", "id": 2, "namespace": "ns"}))).is_empty());
    assert_eq!(net.nodes[0].s.metrics(net.nodes[0].now).resume_queue_drops, 1, "the held relay was never picked up");
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
        generation: 1,
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
            generation: 1,
        };
        h.s.handle_cluster(h.now, NodeId(2), up).unwrap();
    }
    assert_eq!(h.s.remote_sessions(), 2);
    assert_eq!(h.s.cluster_dropped(), 1);
}

#[test]
fn cluster_messages_round_trip_through_their_wire_form() {
    let msg = ClusterMessage::Relay {
        seq: 9,
        origin: NodeId(77),
        hops: 0,
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

#[test]
fn rooms_span_nodes_join_leave_kick_and_close_from_any_node() {
    let mut net = Net::new(3);
    let (a, ia) = net.peer(0, 1);
    let (b, ib) = net.peer(1, 2);
    let (c, ic) = net.peer(2, 3);
    // a creates the room on node 0, which holds it.
    let out = net.req(0, a, json!({"type": "create_room", "id": 1, "room_id": "r", "config": {"max_size": 3, "metadata": {"m": 1}}}));
    assert!(matches!(&out[..], [ServerMessage::RoomCreated { .. }]), "{out:?}");
    // Every node lists it and answers room_info from its replica.
    for (n, conn) in [(1, b), (2, c)] {
        match &net.req(n, conn, json!({"type": "room_info", "id": 2, "room_id": "r"}))[..] {
            [ServerMessage::RoomInfo { owner, members: 1, max_size: 3, .. }] => assert_eq!(*owner, ia.fingerprint()),
            other => panic!("{other:?}"),
        }
        let out = net.req(n, conn, json!({"type": "list_rooms", "id": 3}));
        assert!(matches!(&out[..], [ServerMessage::Rooms { rooms, .. }] if rooms.len() == 1 && rooms[0].room_id == "r"), "{out:?}");
    }
    // b (node 1) joins: its reply comes from node 0, a hears of it.
    match &net.req(1, b, json!({"type": "join_room", "id": 4, "room_id": "r"}))[..] {
        [ServerMessage::RoomJoined { id: 4, peers, owner, .. }] => {
            assert_eq!(*owner, ia.fingerprint());
            assert_eq!(peers.iter().map(|p| p.fingerprint).collect::<Vec<_>>(), vec![ia.fingerprint()]);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&net.nodes[0].take(a)[..], [ServerMessage::RoomPeerJoined { peer, .. }] if peer.fingerprint == ib.fingerprint()));
    // c (node 2) joins: a and b are told, each by its own node.
    let out = net.req(2, c, json!({"type": "join_room", "id": 5, "room_id": "r"}));
    assert!(matches!(&out[..], [ServerMessage::RoomJoined { peers, .. }] if peers.len() == 2), "{out:?}");
    for (n, conn) in [(0, a), (1, b)] {
        let out = net.nodes[n].take(conn);
        assert!(matches!(&out[..], [ServerMessage::RoomPeerJoined { peer, .. }] if peer.fingerprint == ic.fingerprint()), "{out:?}");
    }
    // Full now, on every node.
    let (d, _) = net.peer(1, 4);
    let out = net.req(1, d, json!({"type": "join_room", "id": 6, "room_id": "r"}));
    assert_eq!(error_of(&out[0]), (Some(6), ErrorCode::RoomFull));
    // Only the owner kicks, wherever the request comes from.
    let out = net.req(1, b, json!({"type": "kick", "id": 7, "room_id": "r", "fingerprint": ic.fingerprint().to_string()}));
    assert_eq!(error_of(&out[0]), (Some(7), ErrorCode::NotRoomOwner));
    // a kicks c: c is told `kicked` by node 2, b sees it leave, kicked.
    let out = net.req(0, a, json!({"type": "kick", "id": 8, "room_id": "r", "fingerprint": ic.fingerprint().to_string()}));
    assert!(out.contains(&ServerMessage::Ok { id: 8 }), "{out:?}");
    assert!(matches!(&net.nodes[2].take(c)[..], [ServerMessage::Kicked { room_id }] if room_id == "r"));
    let out = net.nodes[1].take(b);
    assert!(matches!(&out[..], [ServerMessage::RoomPeerLeft { fingerprint, kicked: true, .. }] if *fingerprint == ic.fingerprint()), "{out:?}");
    // c is no longer in it: leave_room from node 2 is refused there.
    let out = net.req(2, c, json!({"type": "leave_room", "id": 9, "room_id": "r"}));
    assert_eq!(error_of(&out[0]), (Some(9), ErrorCode::NotInRoom));
    // b leaves through node 1; a is told.
    assert_eq!(net.req(1, b, json!({"type": "leave_room", "id": 10, "room_id": "r"})), vec![ServerMessage::Ok { id: 10 }]);
    assert!(matches!(&net.nodes[0].take(a)[..], [ServerMessage::RoomPeerLeft { kicked: false, .. }]));
    // b joins again and the room is closed: b is told by node 1.
    net.req(1, b, json!({"type": "join_room", "id": 11, "room_id": "r"}));
    net.nodes[0].take(a);
    assert_eq!(net.req(0, a, json!({"type": "close_room", "id": 12, "room_id": "r"})), vec![ServerMessage::Ok { id: 12 }]);
    assert!(matches!(&net.nodes[1].take(b)[..], [ServerMessage::RoomClosed { room_id }] if room_id == "r"));
    for (n, conn) in [(1, b), (2, c)] {
        let out = net.req(n, conn, json!({"type": "room_info", "id": 13, "room_id": "r"}));
        assert_eq!(error_of(&out[0]), (Some(13), ErrorCode::RoomNotFound));
    }
    // A room id is taken cluster-wide.
    net.req(1, b, json!({"type": "create_room", "id": 14, "room_id": "s"}));
    let out = net.req(2, c, json!({"type": "create_room", "id": 15, "room_id": "s"}));
    assert_eq!(error_of(&out[0]), (Some(15), ErrorCode::RoomExists));
}

#[test]
fn a_room_owner_on_another_node_closes_and_the_session_end_leaves() {
    let mut net = Net::new(2);
    let (a, _) = net.peer(0, 1);
    let (b, ib) = net.peer(1, 2);
    net.req(0, a, json!({"type": "create_room", "id": 1, "room_id": "r"}));
    net.req(1, b, json!({"type": "join_room", "id": 2, "room_id": "r"}));
    net.nodes[0].take(a);
    // b's session ends (bye on node 1): node 0 removes it from the room.
    net.nodes[1].send(b, r#"{"type":"bye"}"#);
    net.settle();
    let out = net.nodes[0].take(a);
    assert!(out.iter().any(|m| matches!(m, ServerMessage::RoomPeerLeft { fingerprint, .. } if *fingerprint == ib.fingerprint())), "{out:?}");
    match &net.req(0, a, json!({"type": "room_info", "id": 3, "room_id": "r"}))[..] {
        [ServerMessage::RoomInfo { members: 1, .. }] => {}
        other => panic!("{other:?}"),
    }
    // An owner on node 1 of a room held by node 1 ... and closing from the owner's node when
    // the room is held elsewhere: b2 creates on node 1, a joins, then b2 closes.
    let (b2, _) = net.peer(1, 3);
    net.req(1, b2, json!({"type": "create_room", "id": 4, "room_id": "q"}));
    net.req(0, a, json!({"type": "join_room", "id": 5, "room_id": "q"}));
    assert!(matches!(&net.nodes[1].take(b2)[..], [ServerMessage::RoomPeerJoined { .. }]));
    assert_eq!(net.req(1, b2, json!({"type": "close_room", "id": 6, "room_id": "q"})), vec![ServerMessage::Ok { id: 6 }]);
    assert!(net.nodes[0].take(a).iter().any(|m| matches!(m, ServerMessage::RoomClosed { .. })));
}

#[test]
fn a_match_forms_from_clients_of_three_nodes() {
    let mut net = Net::new(3);
    let mut clients = Vec::new();
    for n in 0..3 {
        clients.push((n, net.peer(n, 10 + n as u64)));
    }
    let mut outs = Vec::new();
    for (i, (n, (conn, _))) in clients.iter().enumerate() {
        let out = net.req(*n, *conn, json!({"type": "match", "id": 20 + i, "namespace": "game", "criteria": {"mode": "duel", "lvl": 3}, "group_size": 3}));
        if i < 2 {
            assert!(out.is_empty(), "{out:?}");
        }
        outs.push(out);
    }
    let mut sessions = HashSet::new();
    for (i, (n, (conn, _))) in clients.iter().enumerate() {
        let mut out = std::mem::take(&mut outs[i]);
        out.extend(net.nodes[*n].take(*conn));
        match &out[..] {
            [ServerMessage::Matched { id, session_id, peers, namespace }] => {
                assert_eq!(*id, 20 + i as u64);
                assert_eq!(namespace, "game");
                assert_eq!(peers.len(), 3);
                sessions.insert(session_id.clone());
            }
            other => panic!("client {i}: {other:?}"),
        }
    }
    assert_eq!(sessions.len(), 1, "one session id for the group");
    for (n, (conn, _)) in &clients {
        net.nodes[*n].take(*conn);
    }
    // Cancelling works whichever node holds the queue, and it is gone from there.
    for (n, (conn, _)) in &clients {
        assert!(net.req(*n, *conn, json!({"type": "match", "id": 30, "namespace": "g2", "group_size": 2})).is_empty());
        assert_eq!(net.req(*n, *conn, json!({"type": "cancel_match", "id": 31, "namespace": "g2"})), vec![
            ServerMessage::Error { id: Some(30), code: ErrorCode::MatchCancelled, message: "match request cancelled".into() },
            ServerMessage::Ok { id: 31 },
        ]);
    }
    let pending: usize = net.nodes.iter().map(|h| h.s.stats().pending_matches).sum();
    assert_eq!(pending, 0);
    // A lone request times out, answered by whichever node holds it.
    let (n, (conn, _)) = clients[0];
    assert!(net.req(n, conn, json!({"type": "match", "id": 40, "namespace": "alone", "group_size": 2})).is_empty());
    net.advance(Duration::from_secs(61));
    let out = net.nodes[n].take(conn);
    assert!(out.iter().any(|m| matches!(m, ServerMessage::Error { id: Some(40), code: ErrorCode::MatchTimeout, .. })), "{out:?}");
}

#[test]
fn match_queues_spread_over_the_nodes() {
    let net = Net::new(3);
    let mut owners = HashSet::new();
    for k in 0..64 {
        let key = format!("2\nns{k}\n{{}}");
        // Every node agrees on the holder.
        let views: Vec<NodeId> = net
            .nodes
            .iter()
            .map(|h| h.s.match_owner(&key).unwrap_or_else(|| h.s.node_id().unwrap()))
            .collect();
        assert!(views.windows(2).all(|w| w[0] == w[1]), "{views:?}");
        owners.insert(views[0]);
    }
    assert_eq!(owners.len(), 3, "64 queues use every node");
}

#[test]
fn a_silent_node_is_gone_after_the_timeout_and_its_client_resumes_on_another_node_with_nothing_lost() {
    let mut net = Net::new(3);
    let (a, ia) = net.peer(0, 1);
    let (b, _) = net.peer(1, 2);
    let (c, ic) = net.peer(2, 3);
    for (n, conn) in [(0, a), (1, b), (2, c)] {
        net.req(n, conn, json!({"type": "join", "id": 1, "namespace": "ns"}));
    }
    net.req(0, a, json!({"type": "create_room", "id": 2, "room_id": "r"}));
    net.req(2, c, json!({"type": "join_room", "id": 3, "room_id": "r"}));
    for (n, conn) in [(0, a), (1, b), (2, c)] {
        net.nodes[n].take(conn);
    }
    // Node 2 dies. A relay to c sent before anyone notices gets no answer yet...
    net.cut.insert(2);
    net.nodes[0].send(a, &relay(&ic, Some(50), json!({"n": 1})).to_string());
    net.settle();
    assert!(net.nodes[0].take(a).is_empty());
    assert_eq!(net.nodes[0].s.cluster_stats().unwrap().pending_relays, 1);
    // ...until the heartbeats stop for 5 s: then it is held for c, and ok'd.
    net.advance(Duration::from_millis(5_500));
    assert_eq!(net.nodes[0].take(a), vec![ServerMessage::Ok { id: 50 }]);
    assert!(net.nodes[1].take(b).is_empty(), "no peer_left while c may resume");
    for h in &net.nodes[..2] {
        let stats = h.s.cluster_stats().unwrap();
        assert_eq!((stats.nodes, stats.waiting_sessions, stats.nodes_gone), (1, 1, 1));
    }
    // More for c while it is between nodes: a relay from node 1, a broadcast from node 0.
    assert_eq!(net.req(1, b, relay(&ic, Some(51), json!({"n": 2}))), vec![ServerMessage::Ok { id: 51 }]);
    net.req(0, a, json!({"type": "broadcast", "namespace": "ns", "payload": {"n": 3}}));
    // c's client reconnects to node 1 with the same identity: resumed, in its namespace and
    // room, and everything held for it arrives.
    let (c2, out) = net.register(1, 3);
    match &out[0] {
        ServerMessage::Registered { resumed: true, namespaces, rooms, .. } => {
            assert_eq!(namespaces, &vec!["ns".to_owned()]);
            assert_eq!(rooms, &vec!["r".to_owned()]);
        }
        other => panic!("{other:?}"),
    }
    let got: Vec<Value> = out[1..]
        .iter()
        .map(|m| match m {
            ServerMessage::Relay { payload, .. } => payload.to_value(),
            ServerMessage::Broadcast { payload, .. } => payload.to_value(),
            other => panic!("{other:?}"),
        })
        .collect();
    // Each sender's frames in their order (node 0's relay was held there, node 1's at node 1).
    assert_eq!(got.len(), 3, "{got:?}");
    let pos = |v: Value| got.iter().position(|g| *g == v).unwrap_or_else(|| panic!("{v} missing from {got:?}"));
    assert!(pos(json!({"n": 1})) < pos(json!({"n": 3})));
    pos(json!({"n": 2}));
    // Nobody saw c leave, and it is reachable again from every node.
    assert!(net.nodes[0].take(a).iter().all(|m| !matches!(m, ServerMessage::PeerLeft { .. } | ServerMessage::RoomPeerLeft { .. })));
    assert_eq!(net.req(0, a, relay(&ic, Some(52), json!(4))), vec![ServerMessage::Ok { id: 52 }]);
    assert!(matches!(&net.nodes[1].take(c2)[..], [ServerMessage::Relay { from, .. }] if *from == ia.fingerprint()));
    match &net.req(0, a, json!({"type": "room_info", "id": 4, "room_id": "r"}))[..] {
        [ServerMessage::RoomInfo { members: 2, .. }] => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(net.nodes[1].s.cluster_stats().unwrap().sessions_adopted, 1);
    // The grace passes: nothing more happens to c.
    net.advance(Duration::from_secs(31));
    assert!(net.nodes[0].take(a).is_empty());
    assert_eq!(net.nodes[0].s.remote_sessions(), 2);
}

#[test]
fn rooms_and_match_queues_of_a_gone_node_move_to_a_live_one() {
    let mut net = Net::new(3);
    let (a, _) = net.peer(0, 1);
    let (b, _) = net.peer(1, 2);
    let (c, ic) = net.peer(2, 3);
    // The room is held by node 2, whose client c owns it.
    net.req(2, c, json!({"type": "create_room", "id": 1, "room_id": "r", "config": {"max_size": 4}}));
    net.req(0, a, json!({"type": "join_room", "id": 2, "room_id": "r"}));
    net.req(1, b, json!({"type": "join_room", "id": 3, "room_id": "r"}));
    net.nodes[0].take(a);
    // A pending match of a, in a queue node 2 holds (found by trying namespaces).
    let key_ns = (0..200)
        .map(|k| format!("m{k}"))
        .find(|ns| net.nodes[0].s.match_owner(&format!("2\n{ns}\n{{}}")) == Some(NodeId(3)))
        .expect("some namespace hashes to node 3");
    assert!(net.req(0, a, json!({"type": "match", "id": 9, "namespace": key_ns, "group_size": 2})).is_empty());
    net.cut.insert(2);
    net.advance(Duration::from_secs(6));
    // The room lives on (node 0 took it over): b can still leave and join, a is told.
    assert_eq!(net.req(1, b, json!({"type": "leave_room", "id": 4, "room_id": "r"})), vec![ServerMessage::Ok { id: 4 }]);
    assert!(net.nodes[0].take(a).iter().any(|m| matches!(m, ServerMessage::RoomPeerLeft { .. })));
    assert!(matches!(&net.req(1, b, json!({"type": "join_room", "id": 5, "room_id": "r"}))[..], [ServerMessage::RoomJoined { .. }]));
    // c's grace ends without it coming back: it leaves the room it owned.
    net.advance(Duration::from_secs(31));
    let out = net.nodes[0].take(a);
    assert!(out.iter().any(|m| matches!(m, ServerMessage::RoomPeerLeft { fingerprint, .. } if *fingerprint == ic.fingerprint())), "{out:?}");
    // a's match request moved to a live node: b's request of the same kind completes it.
    let out = net.req(1, b, json!({"type": "match", "id": 10, "namespace": key_ns, "group_size": 2}));
    let mut all = out;
    all.extend(net.nodes[0].take(a));
    assert_eq!(all.iter().filter(|m| matches!(m, ServerMessage::Matched { .. })).count(), 2, "{all:?}");
}

#[test]
fn a_client_moving_to_another_live_node_takes_its_session_along() {
    let mut net = Net::new(2);
    let (a, _) = net.peer(0, 1);
    let (b, _) = net.peer(1, 2);
    net.req(0, a, json!({"type": "join", "id": 1, "namespace": "ns"}));
    net.req(1, b, json!({"type": "join", "id": 1, "namespace": "ns"}));
    net.nodes[0].take(a);
    // b's client registers on node 0 while its node-1 connection is still open.
    let (b2, out) = net.register(0, 2);
    assert!(matches!(&out[0], ServerMessage::Registered { resumed: true, namespaces, .. } if namespaces == &vec!["ns".to_owned()]), "{out:?}");
    assert_eq!(net.nodes[1].closed.get(&b), Some(&CloseCode::Replaced), "the old connection is closed as replaced");
    assert!(net.nodes[0].take(a).is_empty(), "a saw no leave and no join");
    assert_eq!(net.nodes[1].s.cluster_stats().unwrap().sessions_handed_over, 1);
    // b is reachable on node 0 from both nodes.
    let (x, _) = net.peer(1, 5);
    assert_eq!(net.req(1, x, relay(&ident(2), Some(1), json!("hi"))), vec![ServerMessage::Ok { id: 1 }]);
    assert_eq!(net.req(0, a, relay(&ident(2), Some(2), json!("hi"))), vec![ServerMessage::Ok { id: 2 }]);
    assert_eq!(net.nodes[0].take(b2).len(), 2);
}

#[test]
fn what_ended_while_the_link_was_down_is_repaired_when_it_returns() {
    let mut net = Net::new(2);
    let (a, _) = net.peer(0, 1);
    let (b, ib) = net.peer(1, 2);
    let (b2, _) = net.peer(1, 3);
    net.req(0, a, json!({"type": "join", "id": 1, "namespace": "ns"}));
    net.req(1, b, json!({"type": "join", "id": 1, "namespace": "ns"}));
    net.req(1, b2, json!({"type": "create_room", "id": 2, "room_id": "r"}));
    net.req(0, a, json!({"type": "join_room", "id": 3, "room_id": "r"}));
    net.nodes[0].take(a);
    // Node 1 loses Redis: b leaves for good and the room is closed; nobody hears.
    let now = net.nodes[1].now;
    net.nodes[1].s.handle_cluster_link(now, false).unwrap();
    net.nodes[1].send(b, r#"{"type":"bye"}"#);
    net.req(1, b2, json!({"type": "close_room", "id": 4, "room_id": "r"}));
    net.settle();
    assert!(net.nodes[0].take(a).is_empty());
    // Back: node 0 learns both. The room at once; b after node_timeout (5 s), in case it only
    // moved to a node whose announcement is still on its way.
    net.nodes[1].s.handle_cluster_link(now, true).unwrap();
    net.settle();
    let out = net.nodes[0].take(a);
    assert!(out.iter().any(|m| matches!(m, ServerMessage::RoomClosed { room_id } if room_id == "r")), "{out:?}");
    assert!(!out.iter().any(|m| matches!(m, ServerMessage::PeerLeft { .. })), "{out:?}");
    net.advance(Duration::from_secs(6));
    let out = net.nodes[0].take(a);
    assert!(matches!(&out[..], [ServerMessage::PeerLeft { fingerprint, .. }] if *fingerprint == ib.fingerprint()), "{out:?}");
    assert_eq!(net.nodes[0].s.remote_sessions(), 1);
}

#[test]
fn a_room_created_on_two_nodes_at_once_is_settled_for_the_earlier() {
    let mut net = Net::new(2);
    let (a, _) = net.peer(0, 1);
    let (b, ib) = net.peer(1, 2);
    // Both create "r" before hearing of the other's (node 1 a millisecond earlier).
    net.nodes[1].now += Duration::from_millis(0);
    net.nodes[0].now += Duration::from_millis(1);
    net.nodes[1].send(b, &json!({"type": "create_room", "id": 1, "room_id": "r"}).to_string());
    net.nodes[0].send(a, &json!({"type": "create_room", "id": 1, "room_id": "r"}).to_string());
    assert!(matches!(&net.nodes[0].take(a)[..], [ServerMessage::RoomCreated { .. }]));
    assert!(matches!(&net.nodes[1].take(b)[..], [ServerMessage::RoomCreated { .. }]));
    net.settle();
    // a's room lost: a is told it closed; both nodes agree on b's.
    assert!(matches!(&net.nodes[0].take(a)[..], [ServerMessage::RoomClosed { room_id }] if room_id == "r"));
    assert!(net.nodes[1].take(b).is_empty());
    for (n, conn) in [(0, a), (1, b)] {
        match &net.req(n, conn, json!({"type": "room_info", "id": 2, "room_id": "r"}))[..] {
            [ServerMessage::RoomInfo { owner, members: 1, .. }] => assert_eq!(*owner, ib.fingerprint()),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn cluster_state_shows_in_the_metrics() {
    let mut net = Net::new(2);
    let (a, _) = net.peer(0, 1);
    let (_, ib) = net.peer(1, 2);
    net.req(0, a, relay(&ib, Some(1), json!(1)));
    let now = net.nodes[0].now;
    let text = net.nodes[0].s.metrics(now).to_prometheus();
    assert!(text.contains("peerlink_cluster_link_up{node=\"0000000000000001\"} 1\n"), "{text}");
    assert!(text.contains("\npeerlink_cluster_nodes 1\n"), "{text}");
    assert!(text.contains("\npeerlink_cluster_remote_sessions 1\n"), "{text}");
    assert!(text.contains("\npeerlink_cluster_pending_relays 0\n"), "{text}");
    net.nodes[0].s.handle_cluster_link_drops(3);
    let text = net.nodes[0].s.metrics(now).to_prometheus();
    assert!(text.contains("\npeerlink_cluster_link_dropped_total 3\n"), "{text}");
    net.nodes[0].s.handle_cluster_link(now, false).unwrap();
    let text = net.nodes[0].s.metrics(now).to_prometheus();
    assert!(text.contains("peerlink_cluster_link_up{node=\"0000000000000001\"} 0\n"), "{text}");
    // A single server has no cluster section.
    let h = H::default();
    assert!(!h.s.metrics(h.now).to_prometheus().contains("peerlink_cluster_"));
}

#[test]
fn a_leaving_node_sends_relays_back_and_hands_queued_frames_to_where_its_clients_resume() {
    let mut net = Net::new(2);
    let (a, ia) = net.peer(0, 1);
    let (b, ib) = net.peer(1, 2);
    // b's connection drops: its session is parked on node 1, and a relay is queued there.
    net.nodes[1].disconnect(b);
    assert_eq!(net.req(0, a, relay(&ib, Some(1), json!({"n": 1}))), vec![ServerMessage::Ok { id: 1 }]);
    // Node 1 starts leaving; before node 0 hears its bye, a relays again: node 1 sends it back,
    // and node 0 holds it for b (ok).
    let now = net.nodes[1].now;
    net.nodes[1].s.leave_cluster(now).unwrap();
    let bye: Vec<_> = std::iter::from_fn(|| net.nodes[1].s.poll_cluster()).collect();
    assert!(matches!(&bye[..], [ClusterTransmit { message: ClusterMessage::Bye, .. }]));
    assert!(net.nodes[1].s.handing_over(), "a queued frame waits to be handed over");
    assert_eq!(net.req(0, a, relay(&ib, Some(2), json!({"n": 2}))), vec![ServerMessage::Ok { id: 2 }]);
    assert_eq!(net.nodes[0].s.cluster_stats().unwrap().waiting_sessions, 1);
    // b's client resumes on node 0: it gets both, the first handed over by node 1.
    let (_, out) = net.register(0, 2);
    assert!(matches!(&out[0], ServerMessage::Registered { resumed: true, .. }), "{out:?}");
    let got = relays_from(&out[1..], &ia);
    let mut sorted = got.clone();
    sorted.sort_by_key(|v| v["n"].as_u64());
    assert_eq!(sorted, vec![json!({"n": 1}), json!({"n": 2})], "{got:?}");
    assert!(!net.nodes[1].s.handing_over());
    // The departed node's later heartbeats or hellos do not bring it back.
    net.nodes[1].advance(Duration::from_secs(2));
    net.settle();
    assert_eq!(net.nodes[0].s.cluster_stats().unwrap().nodes, 0);
}

// ---- regressions found in review (each failed before its fix) ----------------------------

fn relay_payloads(msgs: &[ServerMessage]) -> Vec<Value> {
    msgs.iter()
        .filter_map(|m| match m {
            ServerMessage::Relay { payload, .. } => Some(payload.to_value()),
            _ => None,
        })
        .collect()
}

/// A member's session ends (its node sends the holder a `leave`) while the room's holder has
/// just died, before anyone noticed. The `leave` is lost with the holder; the node that takes
/// the room over removes the member that is no session anywhere, so the room can empty and
/// expire. (Before the fix the ghost member stayed for good.)
#[test]
fn a_member_ending_while_its_rooms_holder_dies_is_pruned_by_the_node_taking_the_room_over() {
    let mut net = Net::new(3);
    let (a, ia) = net.peer(0, 1);
    let (c, _) = net.peer(2, 3);
    net.req(2, c, json!({"type": "create_room", "id": 1, "room_id": "r"}));
    assert!(matches!(&net.req(0, a, json!({"type": "join_room", "id": 2, "room_id": "r"}))[..], [ServerMessage::RoomJoined { .. }]));
    // Node 2 (the holder) dies; a's client says bye before anyone notices.
    net.cut.insert(2);
    net.nodes[0].send(a, r#"{"type":"bye"}"#);
    net.settle();
    assert_eq!(net.nodes[0].s.remote_sessions() + net.nodes[0].s.sessions.len(), 1, "only c is known");
    // Node 0 takes the room over; then c's grace ends and the room should empty and expire.
    net.advance(Duration::from_secs(6));
    assert!(net.nodes[0].s.rooms.get("r").is_some_and(|r| r.home.is_none()), "node 0 holds r now");
    net.advance(Duration::from_secs(31 + 61));
    let members = net.members(0, "r");
    assert!(
        members.is_none(),
        "room r still exists with members {:?} (a = {}): a ghost member that is no session anywhere",
        members.unwrap().iter().map(|f| f.short()).collect::<Vec<_>>(),
        ia.fingerprint().short()
    );
}

/// A client joins a room held by another node and its session ends at once. Its node's
/// `room_request` (node channel) and `session_down` (all channel) may reach the holder in
/// either order; when `session_down` comes first, the holder drops the request of a session it
/// knows nowhere instead of adding a ghost member.
#[test]
fn a_join_overtaken_by_the_session_down_adds_no_ghost_member() {
    let mut net = Net::new(2);
    let (h, _) = net.peer(1, 2);
    net.req(1, h, json!({"type": "create_room", "id": 1, "room_id": "r"}));
    let (a, ia) = net.peer(0, 1);
    // Node 0's node-channel messages to node 1 are slow; its `all` messages are not.
    net.hold.insert((0, 1, false));
    net.nodes[0].send(a, &json!({"type": "join_room", "id": 2, "room_id": "r"}).to_string());
    net.nodes[0].send(a, r#"{"type":"bye"}"#);
    net.settle();
    net.release((0, 1, false));
    let members = net.members(1, "r").unwrap();
    assert!(
        !members.contains(&ia.fingerprint()),
        "the holder lists the ended session {} as a member of r",
        ia.fingerprint().short()
    );
}

/// A client moves from node 1 to node 2 (node 1 alive, hands it over). Node 1's full
/// announcement (any `hello`: a node starting, a link coming back) reaches node 0 before node
/// 2's `session_up` (two publishers: no order between them). At node 0's `synced` the session,
/// still recorded as node 1's and not announced by it, waits `node_timeout` instead of leaving
/// at once, and node 2's announcement then moves it: nobody sees it leave, it stays in the room.
#[test]
fn a_moved_session_stays_when_its_old_nodes_resync_overtakes_the_new_nodes_announcement() {
    let mut net = Net::new(3);
    let (h, _) = net.peer(0, 10);
    let (x, ix) = net.peer(1, 11);
    net.req(0, h, json!({"type": "join", "id": 1, "namespace": "ns"}));
    net.req(1, x, json!({"type": "join", "id": 1, "namespace": "ns"}));
    net.req(0, h, json!({"type": "create_room", "id": 2, "room_id": "r"}));
    net.req(1, x, json!({"type": "join_room", "id": 3, "room_id": "r"}));
    net.nodes[0].take(h);
    // Node 2's messages to node 0 are slow.
    net.hold.insert((2, 0, true));
    net.hold.insert((2, 0, false));
    let (_, out) = net.register_unsettled(2, 11);
    assert!(matches!(&out[0], ServerMessage::Registered { resumed: true, .. }), "{out:?}");
    net.settle();
    assert_eq!(net.nodes[1].closed.get(&x), Some(&CloseCode::Replaced));
    // Node 0's link flaps: it says hello, every node announces itself.
    let now = net.nodes[0].now;
    net.nodes[0].s.handle_cluster_link(now, false).unwrap();
    net.nodes[0].s.handle_cluster_link(now, true).unwrap();
    net.nodes[0].pump();
    net.settle();
    net.release((2, 0, true));
    net.release((2, 0, false));
    let seen = net.nodes[0].take(h);
    let members = net.members(0, "r").unwrap();
    assert!(
        members.contains(&ix.fingerprint()),
        "x was dropped from room r though it only moved (h saw {seen:?})"
    );
    assert!(
        !seen.iter().any(|m| matches!(m, ServerMessage::PeerLeft { .. } | ServerMessage::RoomPeerLeft { .. })),
        "h saw x leave: {seen:?}"
    );
}

/// A relay reaches the node its target has just left and is passed on (`hops`) to the new
/// node, which dies before answering. The origin recorded the relay as sent to the first node;
/// finding the second one gone (where its replica now places the target) routes it again, and
/// the target gets it when it resumes.
#[test]
fn a_relay_passed_on_to_a_node_that_dies_is_routed_again() {
    let mut net = Net::new(3);
    let (a, _) = net.peer(0, 1);
    let (c, ic) = net.peer(1, 3);
    // c's client moves to node 2; node 2's announcement is slow to reach node 0.
    net.hold.insert((2, 0, true));
    net.hold.insert((2, 0, false));
    net.register_unsettled(2, 3);
    net.settle();
    assert_eq!(net.nodes[1].closed.get(&c), Some(&CloseCode::Replaced));
    // a relays to c through node 1, which passes both on to node 2; node 2 dies meanwhile.
    net.nodes[0].send(a, &relay(&ic, Some(7), json!({"n": 1})).to_string());
    net.nodes[0].send(a, &relay(&ic, None, json!({"n": 2})).to_string());
    net.cut.insert(2);
    net.settle();
    // What node 2 published before it died still reaches node 0.
    net.release((2, 0, true));
    net.release((2, 0, false));
    // Both nodes find node 2 gone; c waits for its client, which resumes on node 1.
    net.advance(Duration::from_secs(6));
    let (c2, mut got) = net.register_unsettled(1, 3);
    net.settle();
    net.advance(Duration::from_secs(10));
    got.extend(net.nodes[1].take(c2));
    let from_a = net.nodes[0].take(a);
    assert_eq!(
        relay_payloads(&got),
        vec![json!({"n": 1}), json!({"n": 2})],
        "c got {got:?}; a got {from_a:?}"
    );
}

/// A client with a relay in flight moves to another live node: the relay's answer (`ok`, or
/// an error) comes back to the old node after the hand-over and is passed on to the new one.
#[test]
fn a_relay_answer_arriving_after_the_sender_moved_follows_it() {
    let mut net = Net::new(2);
    let (a, _) = net.peer(0, 1);
    let (b, ib) = net.peer(1, 2);
    net.nodes[0].send(a, &relay(&ib, Some(1), json!("x")).to_string());
    let (a2, mut got) = net.register_unsettled(1, 1);
    net.settle();
    assert_eq!(net.nodes[1].take(b).len(), 1, "b got the relay");
    got.extend(net.nodes[1].take(a2));
    let old = net.nodes[0].take(a);
    assert!(
        got.contains(&ServerMessage::Ok { id: 1 }) || old.contains(&ServerMessage::Ok { id: 1 }),
        "the ok for relay 1 reached neither connection: new {got:?}, old {old:?}"
    );
}

/// Two nodes whose replicas name each other as the holder (stale `room_state`s applied in the
/// wrong order) pass a room request back and forth only until `hops` reaches 2; then it is
/// answered `unavailable` where it is, and the cluster settles.
#[test]
fn a_room_request_at_the_hop_limit_is_answered_not_forwarded_again() {
    let mut net = Net::new(2);
    let (a, _) = net.peer(0, 1);
    // Both nodes hold a replica of "r" naming the other as its holder.
    let state = |creator: u64| ClusterMessage::RoomState {
        room_id: "r".into(),
        owner: ident(9).fingerprint(),
        max_size: 4,
        metadata: None,
        members: vec![ident(9).fingerprint()],
        kicked: vec![],
        created: 5,
        creator: NodeId(creator),
    };
    for (n, from) in [(0, 2), (1, 1)] {
        let h = &mut net.nodes[n];
        h.s.handle_cluster(h.now, NodeId(from), state(7)).unwrap();
        h.pump();
    }
    net.nodes[0].send(a, &json!({"type": "join_room", "id": 1, "room_id": "r"}).to_string());
    assert!(net.try_settle(50), "the room request bounces between the nodes forever");
}

#[test]
fn a_pending_match_of_a_client_that_moves_is_cancelled_and_it_is_told_on_its_new_node() {
    let mut net = Net::new(2);
    let (a, _) = net.peer(0, 1);
    assert!(net.req(0, a, json!({"type": "match", "id": 5, "namespace": "arena", "group_size": 2})).is_empty());
    // a's client registers on node 1: its request is withdrawn, and it hears so there.
    let (_, out) = net.register(1, 1);
    assert!(matches!(&out[0], ServerMessage::Registered { resumed: true, .. }), "{out:?}");
    assert!(
        out.iter().any(|m| matches!(m, ServerMessage::Error { id: Some(5), code: ErrorCode::MatchCancelled, .. })),
        "{out:?}"
    );
    let pending: usize = net.nodes.iter().map(|h| h.s.stats().pending_matches).sum();
    assert_eq!(pending, 0, "no waiter left behind on either node");
}

#[test]
fn match_requests_follow_their_queue_to_a_node_that_joins() {
    // A namespace whose queue node 1 holds among nodes 1 and 2, and node 3 once it joins.
    let probe3 = Net::new(3);
    let probe2 = Net::new(2);
    let owner = |net: &Net, key: &str| net.nodes[0].s.match_owner(key).unwrap_or(NodeId(1));
    let ns = (0..500)
        .map(|k| format!("q{k}"))
        .find(|ns| {
            let key = format!("2\n{ns}\n{{}}");
            owner(&probe2, &key) == NodeId(1) && owner(&probe3, &key) == NodeId(3)
        })
        .expect("some namespace moves to node 3");
    let mut net = Net::new(2);
    let (a, _) = net.peer(1, 1);
    assert!(net.req(1, a, json!({"type": "match", "id": 4, "namespace": ns, "group_size": 2})).is_empty());
    assert_eq!(net.nodes[0].s.stats().pending_matches, 1, "node 1 holds the queue");
    // Node 3 joins: the queue moves to it, a's request with it.
    net.add();
    assert_eq!(net.nodes[0].s.stats().pending_matches, 0);
    assert_eq!(net.nodes[2].s.stats().pending_matches, 1);
    // b's request of the same kind goes to node 3 and completes the group.
    let (b, _) = net.peer(0, 2);
    let mut out = net.req(0, b, json!({"type": "match", "id": 6, "namespace": ns, "group_size": 2}));
    out.extend(net.nodes[1].take(a));
    assert_eq!(out.iter().filter(|m| matches!(m, ServerMessage::Matched { .. })).count(), 2, "{out:?}");
}
