//! The default channel is reliable and ordered: a burst of messages written as fast as the
//! send buffer allows arrives complete and in order, over a clean and over a lossy link.

use std::time::Duration;

use peerlink::{NodeError, NodeEvent, Payload, SendError};
use peerlink_sim::LinkConfig;

use crate::harness::*;

fn burst(seed: u64, link: LinkConfig, count: u32, size: usize) {
    let (mut sim, n) = world(seed, 2);
    let (a, b) = (n[0], n[1]);
    sim.set_link(a, b, link);
    let fb = sim.fingerprint(b);
    connect(&mut sim, a, b, Duration::from_secs(10));
    let mut next = 0u32;
    let deadline = sim.elapsed() + Duration::from_secs(120);
    let count_got = |sim: &peerlink_sim::Sim| sim.events(b).iter().filter(|(_, e)| matches!(e, NodeEvent::Data { .. })).count();
    while (count_got(&sim) as u32) < count {
        assert!(sim.elapsed() < deadline, "stuck after {} of {count}", count_got(&sim));
        while next < count {
            let mut msg = vec![0u8; size];
            msg[..4].copy_from_slice(&next.to_le_bytes());
            match sim.with_node(a, |node, now| node.send_binary(now, fb, None, &msg)) {
                Ok(()) => next += 1,
                Err(NodeError::Send(SendError::WouldBlock { .. })) => break,
                Err(e) => panic!("{e}"),
            }
        }
        sim.run_for(Duration::from_millis(5));
    }
    let got: Vec<u32> = sim
        .events(b)
        .iter()
        .filter_map(|(_, e)| match e {
            NodeEvent::Data { data: Payload::Binary(d), .. } => Some(u32::from_le_bytes(d[..4].try_into().unwrap())),
            _ => None,
        })
        .collect();
    assert_eq!(got, (0..count).collect::<Vec<_>>());
}

#[test]
fn a_burst_arrives_complete_and_in_order() {
    burst(91, LinkConfig::new(Duration::from_millis(1)), 2000, 16 * 1024);
}

#[test]
fn a_burst_over_a_lossy_link_arrives_complete_and_in_order() {
    burst(92, LinkConfig::new(Duration::from_millis(20)).loss(0.02).jitter(Duration::from_millis(5)), 300, 16 * 1024);
}
