//! A 500 ms round trip with 10% loss and jitter still connects, and carries data.

use std::time::Duration;

use peerlink_sim::LinkConfig;

use crate::harness::*;

#[test]
fn half_second_rtt_with_ten_percent_loss_and_jitter_connects() {
    for seed in [1, 2, 3] {
        let (mut sim, n) = world(seed, 2);
        let (a, b) = (n[0], n[1]);
        sim.set_link(a, b, LinkConfig::new(Duration::from_millis(240)).jitter(Duration::from_millis(20)).loss(0.10));
        let b_fp = sim.fingerprint(b);
        connect(&mut sim, a, b, Duration::from_secs(30));
        for i in 0..20 {
            sim.with_node(a, |n, now| n.send_text(now, b_fp, None, &format!("m{i}"))).unwrap();
        }
        assert!(sim.run_until(Duration::from_secs(30), |sim| received(sim, b, a).len() == 20), "seed {seed}: {:?}", received(&sim, b, a));
        // Reliable and ordered despite loss and jitter.
        assert_eq!(received(&sim, b, a), (0..20).map(|i| format!("m{i}")).collect::<Vec<_>>());
        assert!(sim.net_stats().lost > 0, "the link lost nothing: the test tests nothing");
    }
}

#[test]
fn duplication_reordering_and_a_small_mtu_are_survived() {
    let (mut sim, n) = world(5, 2);
    let (a, b) = (n[0], n[1]);
    sim.set_link(
        a,
        b,
        LinkConfig::new(Duration::from_millis(30))
            .duplicate(0.2)
            .reorder(0.2, Duration::from_millis(40))
            .jitter(Duration::from_millis(10))
            .mtu(1200),
    );
    let b_fp = sim.fingerprint(b);
    connect(&mut sim, a, b, Duration::from_secs(20));
    let mut i = 0u8;
    while i < 50 {
        // Backpressure: a full send window refuses, and room comes back as the link drains.
        match sim.with_node(a, |n, now| n.send_binary(now, b_fp, None, &vec![i; 3000])) {
            Ok(()) => i += 1,
            Err(peerlink::NodeError::Send(peerlink::SendError::WouldBlock { .. })) => sim.run_for(Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(sim.run_until(Duration::from_secs(20), |sim| received(sim, b, a).len() == 50));
    assert_eq!(received(&sim, b, a).len(), 50, "exactly once despite duplicates");
    let stats = sim.net_stats();
    assert!(stats.duplicated > 0);
    assert_eq!(stats.too_big, 0, "str0m's packets fit a 1200-byte MTU");
}
