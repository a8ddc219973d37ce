//! An end-to-end encrypted room on real sockets (the real server over WebSockets, UDP on
//! 127.0.0.1, str0m, the blocking adapter): the key exchange completes through the server,
//! room messages arrive both ways, a message sent before the session was ready arrives after
//! it, sealed batches move to the direct path once it is up, and a file sent between the
//! members arrives sealed and intact. The simulator's scenarios (`tests/sim/encrypted_room.rs`)
//! force every link through an instrumented relay and try the bad inputs.

use std::time::{Duration, Instant};

use peerlink::transfer::TransferEvent;
use peerlink::{EncryptionEvent, Fingerprint, JoinOptions, NodeConfig, NodeEvent, Payload, RoomEvent, RoomOptions, RoomPath};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use peerlink_tests::{client_config, start_server};

const ROOM: &str = "vault";

fn node(url: &str, alias: &str) -> PollNode {
    PollNode::new(NodeConfig::with_client(client_config(url, alias)), PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap()
}

#[derive(Default)]
struct Seen {
    ready: Vec<Fingerprint>,
    refused: Vec<String>,
    texts: Vec<serde_json::Value>,
    paths: Vec<RoomPath>,
    transfers: Vec<TransferEvent>,
    room_errors: Vec<String>,
}

struct World {
    nodes: [PollNode; 2],
    seen: [Seen; 2],
}

impl World {
    fn pump(&mut self) {
        for (n, s) in self.nodes.iter_mut().zip(&mut self.seen) {
            n.poll(Instant::now()).unwrap();
            while let Some(e) = n.poll_event() {
                match e {
                    NodeEvent::Encryption(EncryptionEvent::Ready { peer, .. }) => s.ready.push(peer),
                    NodeEvent::Encryption(EncryptionEvent::Refused { error, .. }) => s.refused.push(error.to_string()),
                    NodeEvent::Room(RoomEvent::Data { data: Payload::Text(t), path, .. }) => {
                        s.texts.push(serde_json::from_str(&t).unwrap());
                        s.paths.push(path);
                    }
                    NodeEvent::Room(RoomEvent::Error { error, .. }) => s.room_errors.push(error.to_string()),
                    NodeEvent::Transfer(TransferEvent::Offered { peer, offer, .. }) => n.accept_to_memory(peer, offer.id).unwrap(),
                    NodeEvent::Transfer(t) => s.transfers.push(t),
                    _ => {}
                }
            }
        }
    }

    fn until(&mut self, what: &str, max: Duration, done: impl Fn(&World) -> bool) {
        let deadline = Instant::now() + max;
        while !done(self) {
            assert!(Instant::now() < deadline, "{what}: timed out");
            self.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn an_encrypted_room_exchanges_keys_messages_and_a_sealed_file() {
    let server = start_server(peerlink::ServerConfig::default());
    let url = server.url();
    let mut w = World { nodes: [node(&url, "a"), node(&url, "b")], seen: Default::default() };
    w.until("registered", Duration::from_secs(10), |w| w.nodes.iter().all(PollNode::is_registered));
    let (fa, fb) = (w.nodes[0].fingerprint(), w.nodes[1].fingerprint());
    w.nodes[0].create_room(ROOM, RoomOptions::direct().encrypted()).unwrap();
    w.until("a in the room", Duration::from_secs(5), |w| w.nodes[0].room_info(ROOM).is_some());
    w.nodes[1].join_room_with(ROOM, JoinOptions::encrypted()).unwrap();
    w.until("b in the room", Duration::from_secs(5), |w| w.nodes[1].room_info(ROOM).is_some_and(|r| !r.members.is_empty()));
    // Sent at once: it waits for the session, then goes sealed.
    w.nodes[1].room(ROOM).send(&serde_json::json!({ "early": true })).unwrap();
    w.until("sessions ready", Duration::from_secs(15), |w| w.seen[0].ready.contains(&fb) && w.seen[1].ready.contains(&fa));
    assert!(w.nodes.iter().all(|n| n.room_info(ROOM).unwrap().encrypted));
    for i in 0..50 {
        w.nodes[0].room(ROOM).send(&serde_json::json!({ "n": i })).unwrap();
        w.nodes[1].room(ROOM).send(&serde_json::json!({ "n": i })).unwrap();
    }
    w.until("messages", Duration::from_secs(20), |w| w.seen[0].texts.len() >= 51 && w.seen[1].texts.len() >= 50);
    assert_eq!(w.seen[0].texts[0], serde_json::json!({ "early": true }), "the early message first");
    let numbers = |v: &[serde_json::Value]| v.iter().map(|v| v["n"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(numbers(&w.seen[0].texts[1..]), (0..50).collect::<Vec<_>>());
    assert_eq!(numbers(&w.seen[1].texts), (0..50).collect::<Vec<_>>());
    // The direct path came up and carried (sealed) room traffic.
    w.until("direct", Duration::from_secs(10), |w| w.nodes[0].room_info(ROOM).unwrap().members[0].path == RoomPath::Direct);
    w.nodes[0].room(ROOM).send(&serde_json::json!({ "n": 50 })).unwrap();
    w.until("on the direct path", Duration::from_secs(10), |w| w.seen[1].texts.len() >= 51);
    assert_eq!(w.seen[1].paths.last(), Some(&RoomPath::Direct));

    // A file between the members: sealed in its own lane, intact.
    let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let id = w.nodes[0].send_bytes(fb, "secret.bin", data.clone()).unwrap();
    let received = |w: &World| {
        w.seen[1].transfers.iter().find_map(|t| match t {
            TransferEvent::Received { id: i, data, .. } if *i == id => Some(data.clone()),
            _ => None,
        })
    };
    w.until("file", Duration::from_secs(60), |w| received(w).is_some());
    assert!(received(&w).as_deref() == Some(&data[..]), "the file arrived intact");
    for s in &w.seen {
        assert!(s.refused.is_empty(), "nothing refused: {:?}", s.refused);
        assert!(s.room_errors.is_empty(), "no room errors: {:?}", s.room_errors);
    }
    drop(server);
}
