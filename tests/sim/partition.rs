//! A partition produces a disconnected event within the configured timeout; healing it
//! reconnects.

use std::time::Duration;

use peerlink::{NodeConfig, PeerState};
use peerlink_sim::Sim;

use crate::harness::*;

#[test]
fn partition_is_noticed_within_the_disconnect_timeout() {
    for timeout in [Duration::from_secs(2), Duration::from_secs(5)] {
        let mut sim = Sim::new(31);
        let mut config = NodeConfig::new("sim://server");
        config.peer.disconnect_timeout = timeout;
        let a = sim.add_node("a", config.clone());
        let b = sim.add_node("b", config);
        sim.run_for(Duration::from_millis(200));
        connect(&mut sim, a, b, Duration::from_secs(5));
        sim.run_for(Duration::from_secs(3));
        sim.partition(a, b);
        let cut = sim.elapsed();
        sim.run_for(timeout + Duration::from_secs(2));
        for (x, y) in [(a, b), (b, a)] {
            let s = states(&sim, x, y);
            let (at, _) = *s.iter().find(|(t, s)| *t > cut && *s == PeerState::Disconnected).unwrap_or_else(|| panic!("{s:?}"));
            // Silence is measured from the last datagram, which came at most one keep-alive
            // interval (1 s) before the cut.
            assert!(at - cut <= timeout, "{timeout:?}: noticed after {:?}", at - cut);
            assert!(at - cut >= timeout - Duration::from_millis(1100), "{timeout:?}: noticed too early, after {:?}", at - cut);
        }
        sim.heal(a, b);
        assert!(sim.run_until(Duration::from_secs(20), |sim| connected(sim, a, b)));
    }
}
