//! The full mesh of `multi-peer-signaling.md`: three peers join a namespace and see each
//! other; A calls B, C calls A, C calls B; every pair is connected and talks.

use std::time::Duration;

use peerlink::{ClientEvent, NodeEvent};

use crate::harness::*;

#[test]
fn a_calls_b_c_calls_a_c_calls_b() {
    let (mut sim, n) = world(51, 3);
    let (a, b, c) = (n[0], n[1], n[2]);
    for x in [a, b, c] {
        sim.with_node(x, |node, now| node.client_mut().join(now, "mesh", None, None)).unwrap();
        sim.run_for(Duration::from_millis(100));
    }
    // C saw A and B in its peer list.
    let c_list = sim.events(c).iter().find_map(|(_, e)| match e {
        NodeEvent::Signaling(ClientEvent::PeerList { peers, .. }) => Some(peers.iter().map(|p| p.fingerprint).collect::<Vec<_>>()),
        _ => None,
    });
    assert_eq!(c_list, Some(vec![sim.fingerprint(a), sim.fingerprint(b)]));

    connect(&mut sim, a, b, Duration::from_secs(5));
    connect(&mut sim, c, a, Duration::from_secs(5));
    connect(&mut sim, c, b, Duration::from_secs(5));
    for (x, y) in [(a, b), (a, c), (b, c)] {
        assert!(connected(&sim, x, y));
    }
    for x in [a, b, c] {
        for y in [a, b, c] {
            if x != y {
                let fy = sim.fingerprint(y);
                let msg = format!("{}->{}", sim.name(x), sim.name(y));
                sim.with_node(x, |node, now| node.send_text(now, fy, None, &msg)).unwrap();
            }
        }
    }
    sim.run_for(Duration::from_millis(500));
    for x in [a, b, c] {
        for y in [a, b, c] {
            if x != y {
                assert_eq!(received(&sim, y, x), [format!("{}->{}", sim.name(x), sim.name(y))]);
            }
        }
    }
}
