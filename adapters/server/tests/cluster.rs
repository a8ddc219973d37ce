//! A signaling cluster for real: a `redis-server` on a free port, three server nodes on it
//! (two in this process, one the binary with `--redis`), and WebSocket clients on different
//! nodes that see each other in a namespace and relay to each other; then Redis stops.

mod common;

use std::process::Child;

use common::*;
use peerlink::protocol::{ClientMessage, ErrorCode, ServerMessage};
use peerlink_server::{ServerOptions, spawn};

/// The binary, killed when dropped.
struct Binary(Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn clients_on_different_nodes_share_namespaces_and_relay_across_redis() {
    let redis = Redis::start();
    let node = |_| spawn(ServerOptions { redis: Some(redis.url()), ..ServerOptions::local() }).unwrap();
    let (n0, n1) = (node(0), node(1));
    let (child, url2) = spawn_binary(&["--listen", "127.0.0.1:0", "--redis", &redis.url()]);
    let _n2 = Binary(child);
    let urls = [n0.url(), n1.url(), url2];
    // Every node reports healthy once its link is up (degraded until then).
    for url in &urls {
        wait_until("the node's cluster link is up", || get(addr_of(url), "/healthz").status == 200);
    }

    let mut a = connect_registered(&urls[0], 1);
    let mut b = connect_registered(&urls[1], 2);
    let mut c = connect_registered(&urls[2], 3);
    assert!(join(&mut a, 1, "lobby").is_empty());
    // Membership travels through Redis: node 1 learns of a's join shortly.
    let mut n = 10;
    wait_until("node 1 lists a in the lobby", || {
        n += 1;
        discover(&mut b, n, "lobby") == 1
    });
    let peers = join(&mut b, 2, "lobby");
    assert_eq!(peers.iter().map(|p| p.fingerprint).collect::<Vec<_>>(), vec![identity(1).fingerprint()]);
    match recv(&mut a) {
        ServerMessage::PeerJoined { namespace, peer } => {
            assert_eq!(namespace, "lobby");
            assert_eq!(peer.fingerprint, identity(2).fingerprint());
        }
        other => panic!("{other:?}"),
    }
    wait_until("node 2 lists a and b in the lobby", || {
        n += 1;
        discover(&mut c, n, "lobby") == 2
    });
    let mut peers: Vec<_> = join(&mut c, 3, "lobby").into_iter().map(|p| p.fingerprint).collect();
    peers.sort();
    let mut expected = vec![identity(1).fingerprint(), identity(2).fingerprint()];
    expected.sort();
    assert_eq!(peers, expected);
    for ws in [&mut a, &mut b] {
        assert!(matches!(recv(ws), ServerMessage::PeerJoined { peer, .. } if peer.fingerprint == identity(3).fingerprint()));
    }

    // a (node 0) relays to c (the binary) and gets the `ok` node 2 sends back; c answers.
    relay(&mut a, Some(20), 3, r#"{"sdp":"offer"}"#);
    assert_eq!(recv(&mut a), ServerMessage::Ok { id: 20 });
    match recv(&mut c) {
        ServerMessage::Relay { from, payload } => {
            assert_eq!(from, identity(1).fingerprint());
            assert_eq!(payload.get(), r#"{"sdp":"offer"}"#);
        }
        other => panic!("{other:?}"),
    }
    relay(&mut c, None, 1, r#""answer""#);
    assert!(matches!(recv(&mut a), ServerMessage::Relay { from, .. } if from == identity(3).fingerprint()));
    // Registered nowhere: the same error as a single server gives.
    relay(&mut a, Some(21), 99, "1");
    assert!(matches!(recv(&mut a), ServerMessage::Error { id: Some(21), code: ErrorCode::PeerNotFound, .. }));

    // b says goodbye on node 1: a and c are told.
    send(&mut b, &ClientMessage::Bye);
    for ws in [&mut a, &mut c] {
        assert!(matches!(recv(ws), ServerMessage::PeerLeft { fingerprint, .. } if fingerprint == identity(2).fingerprint()));
    }

    // Redis stops: every node is degraded, a relay to another node fails clearly, a local one
    // still goes through.
    let mut a2 = connect_registered(&urls[0], 4);
    drop(redis);
    wait_until("node 0 reports the link down", || get(addr_of(&urls[0]), "/healthz").status == 503);
    relay(&mut a, Some(30), 3, "1");
    assert!(matches!(recv(&mut a), ServerMessage::Error { id: Some(30), code: ErrorCode::Unavailable, .. }));
    relay(&mut a, Some(31), 4, "1");
    assert_eq!(recv(&mut a), ServerMessage::Ok { id: 31 });
    assert!(matches!(recv(&mut a2), ServerMessage::Relay { from, .. } if from == identity(1).fingerprint()));
}
