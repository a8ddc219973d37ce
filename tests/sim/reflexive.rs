//! Server-reflexive candidates: two nodes behind NATs, reachable only at their public
//! addresses, learn them from a STUN server and connect through them.

use std::net::SocketAddr;
use std::time::Duration;

use peerlink::NodeEvent;
use peerlink_sim::Sim;

use crate::harness::*;

#[test]
fn nat_ed_nodes_connect_through_stun_learned_addresses() {
    let mut sim = Sim::new(61);
    let stun: SocketAddr = "198.51.100.1:3478".parse().unwrap();
    sim.add_stun_server(stun);
    let a = sim.add_node_behind_nat("a", config(), "203.0.113.1".parse().unwrap());
    let b = sim.add_node_behind_nat("b", config(), "203.0.113.2".parse().unwrap());
    sim.run_for(Duration::from_secs(1));
    for (x, public) in [(a, "203.0.113.1:5000"), (b, "203.0.113.2:5000")] {
        let mapped = sim.events(x).iter().find_map(|(_, e)| match e {
            NodeEvent::ReflexiveAddress { mapped, server, .. } if *server == stun => Some(*mapped),
            _ => None,
        });
        assert_eq!(mapped, Some(public.parse().unwrap()));
        assert!(sim.node(x).local_candidates().iter().any(|c| c.contains("typ srflx")));
    }
    connect(&mut sim, a, b, Duration::from_secs(10));
}

#[test]
fn without_stun_nat_ed_nodes_cannot_connect() {
    let mut sim = Sim::new(62);
    let a = sim.add_node_behind_nat("a", config(), "203.0.113.1".parse().unwrap());
    let b = sim.add_node_behind_nat("b", config(), "203.0.113.2".parse().unwrap());
    sim.run_for(Duration::from_secs(1));
    let fb = sim.fingerprint(b);
    sim.with_node(a, |n, now| n.connect_to_peer(now, fb)).unwrap();
    assert!(!sim.run_until(Duration::from_secs(5), |sim| connected(sim, a, b)), "host candidates alone must not work here");
}
