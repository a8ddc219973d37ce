//! The same seed gives the identical trace (every event of every node at its virtual time); a
//! different seed gives a different one.

use std::time::Duration;

use peerlink_sim::{LinkConfig, Sim};

use crate::harness::*;

/// Three nodes on a lossy, jittery network: connect, talk, partition, heal.
fn scenario(seed: u64) -> (u64, Vec<String>) {
    let mut sim = Sim::new(seed);
    sim.set_default_link(LinkConfig::new(Duration::from_millis(30)).jitter(Duration::from_millis(15)).loss(0.05).duplicate(0.02));
    let n: Vec<_> = (0..3).map(|i| sim.add_node(format!("n{i}"), config())).collect();
    sim.run_for(Duration::from_millis(300));
    let fps: Vec<_> = n.iter().map(|x| sim.fingerprint(*x)).collect();
    sim.with_node(n[0], |node, now| node.connect_to_peer(now, fps[1])).unwrap();
    sim.with_node(n[2], |node, now| node.connect_to_peer(now, fps[0])).unwrap();
    sim.with_node(n[2], |node, now| node.connect_to_peer(now, fps[1])).unwrap();
    sim.run_until(Duration::from_secs(20), |sim| connected(sim, n[0], n[1]) && connected(sim, n[2], n[0]) && connected(sim, n[2], n[1]));
    for i in 0..10 {
        sim.with_node(n[0], |node, now| node.send_text(now, fps[1], None, &format!("{i}"))).ok();
        sim.with_node(n[1], |node, now| node.send_binary(now, fps[2], None, &[i; 100])).ok();
        sim.run_for(Duration::from_millis(37));
    }
    sim.partition(n[0], n[1]);
    sim.run_for(Duration::from_secs(8));
    sim.heal(n[0], n[1]);
    sim.run_for(Duration::from_secs(10));
    let log = n.iter().flat_map(|x| sim.events(*x).iter().map(move |(t, e)| format!("{x:?} {t:?} {e:?}"))).collect();
    (sim.trace_hash(), log)
}

#[test]
fn same_seed_same_trace_other_seed_other_trace() {
    let (h1, log1) = scenario(1234);
    let (h2, log2) = scenario(1234);
    assert_eq!(log1, log2);
    assert_eq!(h1, h2);
    assert!(log1.len() > 30, "the scenario did little: {log1:#?}");
    let (h3, log3) = scenario(1235);
    assert_ne!(h1, h3);
    assert_ne!(log1, log3);
}
