//! Restarting ICE on a working connection keeps it working (same session, same channels).

use std::time::Duration;

use peerlink::PeerState;

use crate::harness::*;

#[test]
fn manual_ice_restart_keeps_the_session() {
    let (mut sim, n) = world(71, 2);
    let (a, b) = (n[0], n[1]);
    let (a_fp, b_fp) = (sim.fingerprint(a), sim.fingerprint(b));
    connect(&mut sim, a, b, Duration::from_secs(5));
    let session = sim.node(a).get_peer(&b_fp).unwrap().session;
    for (x, y) in [(a, b_fp), (b, a_fp)] {
        sim.with_node(x, |n, now| n.restart_ice(now, y)).unwrap();
        sim.run_for(Duration::from_secs(3));
        assert!(connected(&sim, a, b), "{:?} {:?}", states(&sim, a, b), states(&sim, b, a));
    }
    assert_eq!(sim.node(b).get_peer(&a_fp).unwrap().session, session);
    sim.with_node(a, |n, now| n.send_text(now, b_fp, None, "still here")).unwrap();
    sim.run_for(Duration::from_secs(1));
    assert_eq!(received(&sim, b, a), ["still here"]);
    for (x, y) in [(a, b), (b, a)] {
        assert!(!states(&sim, x, y).iter().any(|(_, s)| *s != PeerState::Connecting && *s != PeerState::Connected));
    }
}
