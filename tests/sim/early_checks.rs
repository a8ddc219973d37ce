//! The caller's ICE checks start as soon as the answer arrives, even when the callee's checks
//! got there first.
//!
//! With signaling slower than the direct path (the usual case: the server is farther away
//! than the peer, or busy), the callee's STUN checks reach the caller before the answer does.
//! str0m's ICE agent holds them until it has the remote's credentials, then answers one per
//! timeout and paces its own checks from a clock that the early return does not move: without
//! the node's help (`Peer::release_early_checks`) the caller's checks started up to 50 ms
//! after the answer. Here the link's round trip is 2 ms and the signaling one-way latency
//! varies; the time from the answer's arrival (four signaling hops after `connect_to_peer`)
//! to the caller's open channel must be a handful of round trips (ICE, DTLS 1.3, SCTP), never
//! the 50 ms pacing.

use std::time::Duration;

use peerlink::{NodeConfig, NodeEvent};
use peerlink_sim::{LinkConfig, Sim};

/// Round trip of the direct path.
const RTT: Duration = Duration::from_millis(2);

#[test]
fn checks_start_when_the_answer_arrives() {
    let mut worst = Duration::ZERO;
    for (seed, signaling_ms) in [(1, 3), (2, 7), (3, 11), (4, 13), (5, 17), (6, 19), (7, 23), (8, 29)] {
        let signaling = Duration::from_millis(signaling_ms);
        let mut sim = Sim::new(seed);
        sim.set_signaling_latency(signaling);
        sim.set_default_link(LinkConfig::new(RTT / 2));
        let a = sim.add_node("a", NodeConfig::new("sim://server"));
        let b = sim.add_node("b", NodeConfig::new("sim://server"));
        sim.run_for(Duration::from_millis(200));
        let fb = sim.fingerprint(b);
        let start = sim.elapsed();
        sim.with_node(a, |n, now| n.connect_to_peer(now, fb)).expect("connect");
        let open = |sim: &Sim| sim.events(a).iter().any(|(_, e)| matches!(e, NodeEvent::ChannelOpen { .. }));
        assert!(sim.run_until(Duration::from_secs(10), open), "seed {seed}: no channel");
        let at = sim.events(a).iter().find(|(_, e)| matches!(e, NodeEvent::ChannelOpen { .. })).expect("open").0;
        // Offer: caller → server → callee; answer: callee → server → caller.
        let answered = start + signaling * 4;
        let after = at.saturating_sub(answered);
        eprintln!("signaling {signaling_ms} ms: channel open {:?} after connect_to_peer, {after:?} after the answer", at - start);
        worst = worst.max(after);
    }
    // ICE (1 RTT), DTLS 1.3 (2), SCTP (1, or none with SNAP), and slack for timers: 8 RTTs.
    assert!(worst <= RTT * 8, "the channel opened {worst:?} after the answer: checks waited");
}
