//! Bad input from the network gets a typed event and loses nothing: malformed negotiation
//! messages, junk datagrams, refused calls; a spurious timeout does nothing and the next
//! deadline always moves forward.

use std::time::Duration;

use peerlink::peer::signal::{RejectReason, SignalError};
use peerlink::{NodeConfig, NodeError, NodeEvent, PeerError};
use peerlink_sim::Sim;

use crate::harness::*;

#[test]
fn malformed_negotiation_messages_are_reported_and_dropped() {
    let (mut sim, n) = world(81, 2);
    let (a, b) = (n[0], n[1]);
    let (fa, fb) = (sim.fingerprint(a), sim.fingerprint(b));
    connect(&mut sim, a, b, Duration::from_secs(5));
    let sid = "00".repeat(16);
    let junk = [
        serde_json::json!({"peerlink": "rtc/7", "t": "offer"}),
        serde_json::json!({"peerlink": "rtc/1", "t": "offer", "sid": sid}),
        serde_json::json!({"peerlink": "rtc/1", "t": "answer", "sid": "short", "sdp": "x", "key": "k", "sig": "s"}),
        serde_json::json!({"peerlink": "rtc/1", "t": "teleport", "sid": sid}),
        serde_json::json!({"peerlink": "rtc/1", "t": "candidate", "sid": sid, "candidate": "x".repeat(600)}),
    ];
    for payload in &junk {
        sim.with_node(a, |node, _| node.client_mut().relay(fb, payload)).unwrap();
    }
    // Well-formed but meaningless: a candidate line that does not parse, an answer nobody asked
    // for, an offer for an unknown session with a bad signature.
    let session = sim.node(b).get_peer(&fa).unwrap().session.clone();
    for payload in [
        serde_json::json!({"peerlink": "rtc/1", "t": "candidate", "sid": session, "candidate": "candidate:garbage"}),
        serde_json::json!({"peerlink": "rtc/1", "t": "answer", "sid": session, "sdp": "v=0", "key": "k", "sig": "s"}),
    ] {
        sim.with_node(a, |node, _| node.client_mut().relay(fb, &payload)).unwrap();
    }
    // An application payload that merely has a `peerlink` member of another kind is not ours.
    sim.with_node(a, |node, _| node.client_mut().relay(fb, &serde_json::json!({"peerlink": 5}))).unwrap();
    sim.run_for(Duration::from_millis(500));
    let bad: Vec<_> = sim
        .events(b)
        .iter()
        .filter_map(|(_, e)| match e {
            NodeEvent::BadSignal { from, error } if *from == fa => Some(error.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(bad.len(), junk.len(), "{bad:?}");
    assert_eq!(bad[0], SignalError::Version("rtc/7".into()));
    assert!(matches!(&bad[1], SignalError::Malformed(m) if m.contains("sdp")));
    assert!(matches!(&bad[4], SignalError::TooLong("candidate")));
    assert!(sim.events(b).iter().any(|(_, e)| matches!(e, NodeEvent::Signaling(peerlink::ClientEvent::Relay { .. }))));
    // Nothing was lost: the connection still works both ways.
    assert!(connected(&sim, a, b));
    sim.with_node(b, |node, now| node.send_text(now, fa, None, "fine")).unwrap();
    sim.run_for(Duration::from_millis(200));
    assert_eq!(received(&sim, a, b), ["fine"]);
}

#[test]
fn junk_datagrams_are_dropped_without_harm() {
    let (mut sim, n) = world(82, 2);
    let (a, b) = (n[0], n[1]);
    let fb = sim.fingerprint(b);
    connect(&mut sim, a, b, Duration::from_secs(5));
    let from_b = sim.addr(b);
    let stranger = "10.9.9.9:9".parse().unwrap();
    let mut junk: Vec<Vec<u8>> = vec![vec![], vec![0], vec![0xff; 1500], b"GET / HTTP/1.1\r\n".to_vec()];
    // Things that look like STUN, DTLS and RTP but are not right.
    junk.push([&[0u8, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42][..], &[0; 12]].concat());
    junk.push([&[0u8, 1, 0, 8, 0x21, 0x12, 0xa4, 0x42][..], &[0; 12]].concat());
    junk.push([&[22u8, 0xfe, 0xfd][..], &[0xaa; 60]].concat());
    junk.push([&[23u8, 0xfe, 0xfd][..], &[0x55; 200]].concat());
    junk.push([&[0x80u8, 96][..], &[0; 30]].concat());
    for j in &junk {
        // Both from a stranger and spoofed from the real peer's address.
        sim.inject_datagram(a, stranger, j);
        sim.inject_datagram(a, from_b, j);
    }
    sim.run_for(Duration::from_secs(1));
    assert!(connected(&sim, a, b), "{:?}", states(&sim, a, b));
    sim.with_node(a, |node, now| node.send_text(now, fb, None, "still fine")).unwrap();
    sim.run_for(Duration::from_millis(300));
    assert_eq!(received(&sim, b, a), ["still fine"]);
}

#[test]
fn refused_calls_get_typed_errors() {
    let mut sim = Sim::new(83);
    let mut shy = NodeConfig::new("sim://server");
    shy.accept_incoming = false;
    let mut tiny = NodeConfig::new("sim://server");
    tiny.max_peers = 1;
    let a = sim.add_node("a", config());
    let b = sim.add_node("shy", shy);
    let c = sim.add_node("tiny", tiny);
    let d = sim.add_node("d", config());
    sim.run_for(Duration::from_millis(300));
    let (fa, fb, fc) = (sim.fingerprint(a), sim.fingerprint(b), sim.fingerprint(c));

    // Calling oneself is refused at once.
    assert_eq!(sim.with_node(a, |n, now| n.connect_to_peer(now, fa)), Err(NodeError::SelfConnect));
    // A node that accepts no calls refuses with `refused`.
    sim.with_node(a, |n, now| n.connect_to_peer(now, fb)).unwrap();
    // A full node refuses with `busy`; and cannot call out either.
    connect(&mut sim, d, c, Duration::from_secs(5));
    sim.with_node(a, |n, now| n.connect_to_peer(now, fc)).unwrap();
    assert_eq!(sim.with_node(c, |n, now| n.connect_to_peer(now, fa)), Err(NodeError::TooManyPeers(1)));
    sim.run_for(Duration::from_secs(1));
    let errors: Vec<_> = sim
        .events(a)
        .iter()
        .filter_map(|(_, e)| match e {
            NodeEvent::PeerError { peer, error } => Some((*peer, error.clone())),
            _ => None,
        })
        .collect();
    assert!(errors.contains(&(fb, PeerError::Rejected(RejectReason::Refused))), "{errors:?}");
    assert!(errors.contains(&(fc, PeerError::Rejected(RejectReason::Busy))), "{errors:?}");
    assert!(sim.node(a).get_peer(&fb).is_none() && sim.node(a).get_peer(&fc).is_none());
    // The full node's existing connection is untouched.
    assert!(connected(&sim, c, d));
}

#[test]
fn poll_timeout_moves_forward_and_spurious_timeouts_do_nothing() {
    let (mut sim, n) = world(84, 2);
    let (a, b) = (n[0], n[1]);
    connect(&mut sim, a, b, Duration::from_secs(5));
    sim.run_for(Duration::from_secs(2));
    let before = sim.events(a).len();
    // Early and repeated timeouts change nothing.
    for _ in 0..3 {
        let now = sim.now();
        let next = sim.node(a).poll_timeout().expect("a connected node has timers");
        sim.with_node(a, |node, now| node.handle_timeout(now)).unwrap();
        assert_eq!(sim.events(a).len(), before);
        assert!(sim.node(a).poll_timeout().unwrap() >= next.min(now));
    }
    // Driving by the deadline always advances it.
    for _ in 0..200 {
        let next = sim.node(a).poll_timeout().unwrap();
        let t = next.max(sim.now());
        sim.run_until(t - sim.now(), |_| false);
        sim.with_node(a, |node, now| node.handle_timeout(now)).unwrap();
        let after = sim.node(a).poll_timeout().unwrap();
        assert!(after > sim.now(), "deadline stuck at {after:?} (now {:?})", sim.now());
    }
    assert!(connected(&sim, a, b));
}
