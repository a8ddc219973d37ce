//! 100% loss for 30 s, then the path works again: the connection is found disconnected, ICE
//! restarts, and it reconnects and carries data again.

use std::time::Duration;

use peerlink::PeerState;
use peerlink_sim::LinkConfig;

use crate::harness::*;

#[test]
fn thirty_seconds_of_total_loss_then_recovery_reconnects() {
    let (mut sim, n) = world(21, 2);
    let (a, b) = (n[0], n[1]);
    let b_fp = sim.fingerprint(b);
    let a_fp = sim.fingerprint(a);
    connect(&mut sim, a, b, Duration::from_secs(5));
    let clean = LinkConfig::new(Duration::from_millis(20));
    sim.set_link(a, b, clean.loss(1.0));
    let cut = sim.elapsed();
    sim.with_node(a, |n, now| n.send_text(now, b_fp, None, "during the outage")).unwrap();
    sim.run_for(Duration::from_secs(30));
    for (x, y) in [(a, b), (b, a)] {
        let s = states(&sim, x, y);
        let lost = s.iter().find(|(t, s)| *t > cut && *s == PeerState::Disconnected);
        assert!(lost.is_some(), "{} never noticed: {s:?}", sim.name(x));
        assert!(lost.unwrap().0 - cut <= Duration::from_secs(6), "{} noticed late: {s:?}", sim.name(x));
    }
    sim.set_link(a, b, clean);
    let healed = sim.elapsed();
    assert!(sim.run_until(Duration::from_secs(30), |sim| connected(sim, a, b)), "{:?} / {:?}", states(&sim, a, b), states(&sim, b, a));
    println!("reconnected {:?} after the path came back", sim.elapsed() - healed);
    // The same session (ICE restarted, DTLS and SCTP kept): the message sent during the outage
    // arrives, then new ones.
    sim.with_node(b, |n, now| n.send_text(now, a_fp, None, "after")).unwrap();
    assert!(sim.run_until(Duration::from_secs(70), |sim| received(sim, b, a) == ["during the outage"] && received(sim, a, b) == ["after"]),
        "{:?} {:?}", received(&sim, b, a), received(&sim, a, b));
    let restarts = sim.events(a).iter().chain(sim.events(b)).filter(|(_, e)| matches!(e, peerlink::NodeEvent::PeerState { state: PeerState::Failed, .. })).count();
    assert_eq!(restarts, 0, "no connection failed");
}
