//! Three peers join a namespace and see exactly the frame exchange of the reference design:
//! peer list for the joiner, `peer_joined` for the others, `peer_left` on a clean leave.

use std::time::Duration;

use peerlink::{ClientEvent, Fingerprint};
use peerlink_tests::*;

fn next_namespace_event(b: &mut peerlink_blocking::Client) -> ClientEvent {
    loop {
        let e = b.next_event(WAIT).unwrap().expect("an event in time");
        if matches!(e, ClientEvent::PeerJoined { .. } | ClientEvent::PeerLeft { .. }) {
            return e;
        }
    }
}

#[test]
fn three_peers_see_the_reference_exchange_across_both_adapters() {
    let server = start_server(Default::default());
    let url = server.url();
    // A and C use the blocking adapter, B the smol adapter.
    let mut a = peerlink_blocking::Client::connect(client_config(&url, "a")).unwrap();
    assert!(a.join("lobby").unwrap().is_empty(), "A is first: empty peer list");
    let fa = a.fingerprint();

    let (b_tx, b_rx) = std::sync::mpsc::channel::<Fingerprint>();
    let (c_tx, c_rx) = std::sync::mpsc::channel::<Fingerprint>();
    let url_b = url.clone();
    let b_thread = std::thread::spawn(move || {
        run_async(async move {
            let (b, mut events) = peerlink_smol::Client::connect(client_config(&url_b, "b")).await.unwrap();
            let peers = b.join("lobby").await.unwrap();
            assert_eq!(fingerprints(&peers), vec![fa], "B sees [A]");
            b_tx.send(b.fingerprint()).unwrap();
            let fc = c_rx.recv().unwrap();
            let mut seen = Vec::new();
            while let Some(e) = events.next().await {
                match e {
                    ClientEvent::PeerJoined { namespace, peer } => seen.push(("joined", namespace, peer.fingerprint)),
                    ClientEvent::PeerLeft { namespace, fingerprint } => {
                        seen.push(("left", namespace, fingerprint));
                        break;
                    }
                    _ => {}
                }
            }
            assert_eq!(seen, vec![("joined", "lobby".to_string(), fc), ("left", "lobby".to_string(), fc)]);
            b.disconnect().await;
        })
    });

    let fb = b_rx.recv_timeout(WAIT).unwrap();
    match next_namespace_event(&mut a) {
        ClientEvent::PeerJoined { namespace, peer } => assert_eq!((namespace.as_str(), peer.fingerprint), ("lobby", fb)),
        other => panic!("A expected peer_joined B, got {other:?}"),
    }

    let mut c = peerlink_blocking::Client::connect(client_config(&url, "c")).unwrap();
    let peers = c.join("lobby").unwrap();
    assert_eq!(fingerprints(&peers), vec![fa, fb], "C sees [A, B] in join order");
    assert_eq!(peers[0].alias, "a");
    c_tx.send(c.fingerprint()).unwrap();
    let fc = c.fingerprint();
    match next_namespace_event(&mut a) {
        ClientEvent::PeerJoined { peer, .. } => assert_eq!(peer.fingerprint, fc),
        other => panic!("A expected peer_joined C, got {other:?}"),
    }

    // A clean disconnect: everyone sees C leave at once (no resume grace).
    c.disconnect();
    match next_namespace_event(&mut a) {
        ClientEvent::PeerLeft { namespace, fingerprint } => assert_eq!((namespace.as_str(), fingerprint), ("lobby", fc)),
        other => panic!("A expected peer_left C, got {other:?}"),
    }
    b_thread.join().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    a.disconnect();
    server.shutdown();
}
