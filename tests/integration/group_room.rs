//! A group room of 5 on real sockets (the real server over WebSocket, real UDP on 127.0.0.1,
//! str0m underneath): all-to-all and to-one delivery over the direct paths, a sixth member
//! refused, a kick, and the owner closing the room.

use std::time::{Duration, Instant};

use peerlink::{ErrorCode, NodeConfig, NodeEvent, Payload, RoomData, RoomError, RoomEvent, RoomOptions, RoomPath};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use peerlink_tests::{WAIT, client_config, start_server};

const ROOM: &str = "team";

struct Group {
    nodes: Vec<PollNode>,
    logs: Vec<Vec<RoomEvent>>,
}

impl Group {
    fn until(&mut self, what: &str, done: impl Fn(&Group) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "{what}: timed out\n{:#?}", self.logs);
            for (n, log) in self.nodes.iter_mut().zip(self.logs.iter_mut()) {
                n.poll(Instant::now()).unwrap();
                while let Some(e) = n.poll_event() {
                    if let NodeEvent::Room(e) = e {
                        log.push(e);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn received(&self, i: usize) -> Vec<(String, peerlink::Fingerprint, RoomPath)> {
        self.logs[i]
            .iter()
            .filter_map(|e| match e {
                RoomEvent::Data { from, data: Payload::Text(t), path, .. } => Some((t.clone(), *from, *path)),
                _ => None,
            })
            .collect()
    }
}

fn poll_node(url: &str, alias: &str) -> PollNode {
    PollNode::new(NodeConfig::with_client(client_config(url, alias)), PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap()
}

#[test]
fn a_group_of_five_talks_directly_refuses_a_sixth_kicks_and_closes() {
    let server = start_server(peerlink::ServerConfig::default());
    let url = server.url();
    let nodes: Vec<PollNode> = (0..6).map(|i| poll_node(&url, &format!("m{i}"))).collect();
    let mut g = Group { logs: vec![Vec::new(); nodes.len()], nodes };
    g.until("registered", |g| g.nodes.iter().all(PollNode::is_registered));
    let fps: Vec<_> = g.nodes.iter().map(PollNode::fingerprint).collect();

    g.nodes[0].create_room(ROOM, RoomOptions::group(5).metadata(serde_json::json!({ "topic": "demo" }))).unwrap();
    g.until("created", |g| g.logs[0].iter().any(|e| matches!(e, RoomEvent::Joined { .. })));
    for i in 1..5 {
        g.nodes[i].join_room(ROOM).unwrap();
        g.until("joined", |g| g.logs[i].iter().any(|e| matches!(e, RoomEvent::Joined { .. })));
    }
    // Everyone has a direct path to everyone.
    g.until("full mesh", |g| {
        (0..5).all(|i| g.nodes[i].room_info(ROOM).is_some_and(|r| r.members.len() == 4 && r.members.iter().all(|m| m.path == RoomPath::Direct)))
    });
    let view = g.nodes[3].room_info(ROOM).unwrap();
    assert_eq!(view.owner, fps[0]);
    assert_eq!(view.max_size, 5);
    assert_eq!(view.metadata.as_ref().map(|m| m.0.get()), Some(r#"{"topic":"demo"}"#));

    // A sixth is refused with the server's `room_full`.
    g.nodes[5].join_room(ROOM).unwrap();
    g.until("refused", |g| !g.logs[5].is_empty());
    assert!(
        matches!(&g.logs[5][0], RoomEvent::Error { error: RoomError::Request(e), .. } if e.code() == Some(ErrorCode::RoomFull)),
        "{:?}",
        g.logs[5]
    );

    // All to all, then m1 to m2 alone.
    for i in 0..5 {
        for k in 0..10 {
            g.nodes[i].room(ROOM).send_data(None, RoomData::Text(format!("m{i}:{k}"))).unwrap();
        }
    }
    g.nodes[1].room(ROOM).send_to(fps[2], &serde_json::json!({ "dm": true })).unwrap();
    g.until("all to all", |g| (0..5).all(|i| g.received(i).len() >= 40 + usize::from(i == 2)));
    for i in 0..5 {
        let got = g.received(i);
        for j in (0..5).filter(|j| *j != i) {
            let from_j: Vec<&str> = got.iter().filter(|(_, f, _)| *f == fps[j]).map(|(t, _, _)| t.as_str()).filter(|t| !t.starts_with('{')).collect();
            let want: Vec<String> = (0..10).map(|k| format!("m{j}:{k}")).collect();
            assert_eq!(from_j, want, "m{i} from m{j}");
        }
        assert!(got.iter().all(|(_, _, p)| *p == RoomPath::Direct));
        let dms = got.iter().filter(|(t, _, _)| t == r#"{"dm":true}"#).count();
        assert_eq!(dms, usize::from(i == 2), "m{i}");
    }

    // The owner kicks m4: m4 hears it, the rest see it leave; m4's connections close.
    assert!(matches!(g.nodes[1].room(ROOM).kick(fps[4]), Err(peerlink_blocking::Error::Node(peerlink::NodeError::Room(RoomError::NotOwner)))));
    g.nodes[0].room(ROOM).kick(fps[4]).unwrap();
    g.until("kicked", |g| {
        g.logs[4].contains(&RoomEvent::Kicked { room: ROOM.into() })
            && (1..4).all(|i| g.logs[i].iter().any(|e| matches!(e, RoomEvent::PeerLeft { peer, kicked: true, .. } if *peer == fps[4])))
    });
    assert!(g.nodes[4].room_info(ROOM).is_none());
    g.nodes[1].room(ROOM).send_data(None, RoomData::Text("after".into())).unwrap();
    g.until("after the kick", |g| [0, 2, 3].iter().all(|&i| g.received(i).iter().any(|(t, _, _)| t == "after")));

    // The owner closes it: everyone else hears `Closed`.
    g.nodes[0].room(ROOM).leave().unwrap();
    g.until("closed", |g| (0..4).all(|i| g.logs[i].contains(&RoomEvent::Closed { room: ROOM.into() })));
    assert!((0..5).all(|i| g.nodes[i].room_info(ROOM).is_none()));
    drop(server);
}
