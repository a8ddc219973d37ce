//! Glare: A and B call each other at the same instant. Over 200 seeds, exactly one connection
//! results every time, the same on both sides.

use std::collections::BTreeSet;
use std::time::Duration;

use peerlink::NodeEvent;

use crate::harness::*;

#[test]
fn simultaneous_calls_yield_one_connection() {
    for seed in 0..200 {
        let (mut sim, n) = world(seed, 2);
        let (a, b) = (n[0], n[1]);
        let (a_fp, b_fp) = (sim.fingerprint(a), sim.fingerprint(b));
        sim.with_node(a, |n, now| n.connect_to_peer(now, b_fp)).unwrap();
        sim.with_node(b, |n, now| n.connect_to_peer(now, a_fp)).unwrap();
        assert!(sim.run_until(Duration::from_secs(10), |sim| connected(sim, a, b)), "seed {seed}: {:?} / {:?}", states(&sim, a, b), states(&sim, b, a));
        sim.run_for(Duration::from_secs(2));
        // One session, the same on both sides, and no second connection came and went.
        let (pa, pb) = (sim.node(a).get_peer(&b_fp).unwrap(), sim.node(b).get_peer(&a_fp).unwrap());
        assert_eq!(pa.session, pb.session, "seed {seed}");
        assert_ne!(pa.offerer, pb.offerer, "seed {seed}: exactly one side's offer was used");
        // The impolite side (higher fingerprint) made the surviving offer.
        assert_eq!(pa.offerer, a_fp > b_fp, "seed {seed}");
        for (x, y) in [(a, b), (b, a)] {
            let s: Vec<_> = states(&sim, x, y).into_iter().map(|(_, s)| s).collect();
            assert_eq!(s.iter().filter(|s| **s == peerlink::PeerState::Connected).count(), 1, "seed {seed}: {s:?}");
            assert!(!s.contains(&peerlink::PeerState::Failed) && !s.contains(&peerlink::PeerState::Closed), "seed {seed}: {s:?}");
            let opened: BTreeSet<_> = sim.events(x).iter().filter_map(|(_, e)| matches!(e, NodeEvent::ChannelOpen { .. }).then_some(())).collect();
            assert_eq!(opened.len(), 1);
        }
        // And it carries data both ways.
        sim.with_node(a, |n, now| n.send_text(now, b_fp, None, "from a")).unwrap();
        sim.with_node(b, |n, now| n.send_text(now, a_fp, None, "from b")).unwrap();
        sim.run_for(Duration::from_millis(500));
        assert_eq!(received(&sim, b, a), ["from a"], "seed {seed}");
        assert_eq!(received(&sim, a, b), ["from b"], "seed {seed}");
    }
}
