//! Managed rooms on three tokio Nodes over real UDP on 127.0.0.1 through the real signaling
//! server: one creates a room, two join and connect directly; everyone talks to everyone and to one; presence is
//! seen; a non-owner's kick is refused; a member leaves and the others see it go.

use std::time::Duration;

use peerlink::{ErrorCode, Fingerprint, NodeConfig, NodeError, NodeEvent, Payload, RoomError, RoomEvent, RoomOptions, RoomPath};
use peerlink_tokio::{ConnectOptions, Error, Node, NodeEvents, UdpBind};
use serde_json::json;

const ROOM: &str = "tokio-team";

/// A node and the room events it has seen so far.
struct Member {
    node: Node,
    events: NodeEvents,
    log: Vec<RoomEvent>,
}

impl Member {
    async fn connect(url: &str, alias: &str) -> Member {
        let config = NodeConfig::with_client(peerlink::ClientConfig::new(url).alias(alias));
        let options = ConnectOptions { udp: UdpBind::Loopback, ..Default::default() };
        let (node, events) = Node::connect_with(config, options).await.expect("node");
        Member { node, events, log: Vec::new() }
    }

    /// Reads events until the room events seen so far satisfy `done`.
    async fn until(&mut self, what: &str, done: impl Fn(&[RoomEvent]) -> bool) {
        let wait = async {
            while !done(&self.log) {
                match self.events.next().await {
                    Some(NodeEvent::Room(e)) => self.log.push(e),
                    Some(_) => {}
                    None => panic!("{what}: event stream ended"),
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), wait).await.is_err() {
            panic!("{what}: timed out\n{:#?}", self.log);
        }
    }
}

/// The texts `log` holds from `from`, in arrival order, with their paths.
fn received(log: &[RoomEvent], from: Fingerprint) -> Vec<(String, RoomPath)> {
    log.iter()
        .filter_map(|e| match e {
            RoomEvent::Data { from: f, data: Payload::Text(t), path, .. } if *f == from => Some((t.clone(), *path)),
            _ => None,
        })
        .collect()
}

fn texts(log: &[RoomEvent], from: Fingerprint) -> Vec<String> {
    received(log, from).into_iter().map(|(t, _)| t).collect()
}

fn server_code(err: &Error) -> Option<ErrorCode> {
    match err {
        Error::Node(NodeError::Room(RoomError::Request(e))) => e.code(),
        _ => None,
    }
}

#[tokio::test]
async fn three_nodes_share_a_room() {
    let server = peerlink_server::spawn(peerlink_server::ServerOptions::local()).unwrap();
    let url = server.url();
    let mut a = Member::connect(&url, "a").await;
    let mut b = Member::connect(&url, "b").await;
    let mut c = Member::connect(&url, "c").await;
    let (fa, fb, fc) = (a.node.fingerprint(), b.node.fingerprint(), c.node.fingerprint());

    // Creating resolves once in the room; the event still reaches the stream.
    let room_a = a.node.create_room(ROOM, RoomOptions::group(4).metadata(json!({ "topic": "tokio" }))).await.unwrap();
    assert_eq!(room_a.id(), ROOM);
    a.until("joined", |log| log.iter().any(|e| matches!(e, RoomEvent::Joined { room, .. } if room == ROOM))).await;

    // The server's refusals fail the call with the room's error.
    let err = b.node.create_room(ROOM, RoomOptions::group(4)).await.unwrap_err();
    assert_eq!(server_code(&err), Some(ErrorCode::RoomExists), "{err:?}");
    let err = b.node.join_room("no-such-room").await.unwrap_err();
    assert_eq!(server_code(&err), Some(ErrorCode::RoomNotFound), "{err:?}");

    // Listed while it has space.
    let rooms = c.node.list_rooms(Some("tokio-"), None).await.unwrap();
    assert_eq!(rooms.iter().map(|r| (r.details.room_id.as_str(), r.members)).collect::<Vec<_>>(), vec![(ROOM, 1)]);

    let room_b = b.node.join_room(ROOM).await.unwrap();
    let room_c = c.node.join_room(ROOM).await.unwrap();
    let view = room_c.info().await.expect("in the room");
    assert_eq!((view.owner, view.max_size), (fa, 4));
    assert_eq!(view.metadata.as_ref().map(|m| m.0.get()), Some(r#"{"topic":"tokio"}"#));
    a.until("both joined", |log| {
        [fb, fc].iter().all(|f| log.iter().any(|e| matches!(e, RoomEvent::PeerJoined { peer, .. } if peer.fingerprint == *f)))
    })
    .await;

    // The members connect directly over UDP.
    a.until("direct paths", |log| {
        [fb, fc].iter().all(|f| log.iter().any(|e| matches!(e, RoomEvent::PathChanged { peer, path: RoomPath::Direct, .. } if peer == f)))
    })
    .await;

    // Everyone to everyone, in order, then b to c alone.
    for (i, room) in [&room_a, &room_b, &room_c].into_iter().enumerate() {
        for k in 0..5 {
            room.send(&json!({ "from": i, "k": k })).await.unwrap();
        }
    }
    room_b.send_to(fc, &json!("only for c")).await.unwrap();
    let want = |i: usize| (0..5).map(|k| format!(r#"{{"from":{i},"k":{k}}}"#)).collect::<Vec<_>>();
    a.until("a hears b and c", |log| texts(log, fb).len() >= 5 && texts(log, fc).len() >= 5).await;
    b.until("b hears a and c", |log| texts(log, fa).len() >= 5 && texts(log, fc).len() >= 5).await;
    c.until("c hears a and b", |log| texts(log, fa).len() >= 5 && texts(log, fb).len() >= 6).await;
    assert_eq!((texts(&a.log, fb), texts(&a.log, fc)), (want(1), want(2)));
    assert_eq!((texts(&b.log, fa), texts(&b.log, fc)), (want(0), want(2)));
    assert_eq!(texts(&c.log, fa), want(0));
    assert_eq!(texts(&c.log, fb), [want(1), vec![r#""only for c""#.to_owned()]].concat());

    // Through the server even where a direct path is up.
    room_a.broadcast_via_server(&json!("via server")).await.unwrap();
    for m in [&mut b, &mut c] {
        m.until("relayed", |log| received(log, fa).iter().any(|(t, _)| t == r#""via server""#)).await;
        assert!(received(&m.log, fa).contains(&(r#""via server""#.to_owned(), RoomPath::Relay)));
    }

    // Presence: b's state reaches the others.
    room_b.set_presence(Some(&json!({ "cursor": 3 }))).await.unwrap();
    for m in [&mut a, &mut c] {
        m.until("presence", |log| {
            log.iter().any(|e| matches!(e, RoomEvent::Presence { peer, state: Some(s), .. } if *peer == fb && *s == json!({ "cursor": 3 })))
        })
        .await;
    }

    // Only the owner kicks; nothing is sent for the refusal.
    let err = room_b.kick(fc).await.unwrap_err();
    assert!(matches!(err, Error::Node(NodeError::Room(RoomError::NotOwner))), "{err:?}");

    // c leaves: the others see it go; c is no longer in the room.
    room_c.leave().await.unwrap();
    for m in [&mut a, &mut b] {
        m.until("c left", |log| log.iter().any(|e| matches!(e, RoomEvent::PeerLeft { peer, kicked: false, .. } if *peer == fc)))
            .await;
    }
    c.until("closed for c", |log| log.contains(&RoomEvent::Closed { room: ROOM.into() })).await;
    assert!(room_c.info().await.is_none());
    let err = room_c.send(&"late").await.unwrap_err();
    assert!(matches!(err, Error::Node(NodeError::Room(RoomError::NotJoined(_)))), "{err:?}");
    // The room handle needs no I/O; the rest still talk.
    assert_eq!(a.node.room(ROOM).info().await.map(|v| v.members.len()), Some(1));
    room_b.send(&"still here").await.unwrap();
    a.until("after c left", |log| texts(log, fb).contains(&r#""still here""#.to_owned())).await;

    for m in [&a, &b, &c] {
        m.node.close().await;
    }
    server.shutdown();
}
