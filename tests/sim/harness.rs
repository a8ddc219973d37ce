//! Helpers shared by the simulation scenarios.

use std::time::Duration;

use peerlink::{MediaEvent, NodeConfig, NodeEvent, PeerState, RoomEvent, RoomOptions};
use peerlink_sim::{NodeId, Sim};

pub fn config() -> NodeConfig {
    NodeConfig::new("sim://server")
}

/// Logs to the test output with `RUST_LOG` (once per process).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
}

/// A world with `n` registered nodes.
pub fn world(seed: u64, n: usize) -> (Sim, Vec<NodeId>) {
    init_tracing();
    let mut sim = Sim::new(seed);
    let nodes: Vec<NodeId> = (0..n).map(|i| sim.add_node(format!("n{i}"), config())).collect();
    let registered = sim.run_until(Duration::from_secs(5), |sim| {
        nodes.iter().all(|n| sim.events(*n).iter().any(|(_, e)| matches!(e, NodeEvent::Signaling(peerlink::ClientEvent::Registered { .. }))))
    });
    assert!(registered, "nodes did not register");
    (sim, nodes)
}

/// The state `a` has for its connection to `b`.
pub fn state(sim: &Sim, a: NodeId, b: NodeId) -> Option<PeerState> {
    sim.node(a).get_peer(&sim.fingerprint(b)).map(|p| p.state)
}

/// Whether `a` and `b` are connected both ways with the default channel open.
pub fn connected(sim: &Sim, a: NodeId, b: NodeId) -> bool {
    [(a, b), (b, a)].iter().all(|&(x, y)| {
        sim.node(x).get_peer(&sim.fingerprint(y)).is_some_and(|p| p.state == PeerState::Connected && p.channels.iter().any(|c| c == "default"))
    })
}

/// Every `Data` message `node` received from `from`, as text (binary as `bin:N`).
pub fn received(sim: &Sim, node: NodeId, from: NodeId) -> Vec<String> {
    let fp = sim.fingerprint(from);
    sim.events(node)
        .iter()
        .filter_map(|(_, e)| match e {
            NodeEvent::Data { peer, data, .. } if *peer == fp => Some(match data {
                peerlink::Payload::Text(t) => t.clone(),
                peerlink::Payload::Binary(b) => format!("bin:{}", b.len()),
            }),
            _ => None,
        })
        .collect()
}

/// Every state `node` went through for its connection to `other`.
pub fn states(sim: &Sim, node: NodeId, other: NodeId) -> Vec<(Duration, PeerState)> {
    let fp = sim.fingerprint(other);
    sim.events(node)
        .iter()
        .filter_map(|(t, e)| match e {
            NodeEvent::PeerState { peer, state } if *peer == fp => Some((*t, *state)),
            _ => None,
        })
        .collect()
}

/// Calls `b` from `a` and runs until both sides are connected (panics after `max`).
pub fn connect(sim: &mut Sim, a: NodeId, b: NodeId, max: Duration) {
    let fp = sim.fingerprint(b);
    sim.with_node(a, |n, now| n.connect_to_peer(now, fp)).unwrap();
    assert!(sim.run_until(max, |sim| connected(sim, a, b)), "{} and {} did not connect: {:?} / {:?}", sim.name(a), sim.name(b), states(sim, a, b), states(sim, b, a));
}

/// `n` registered nodes with `config`; the first creates `room`, the rest join it.
pub fn room_world(room: &str, seed: u64, n: usize, config: NodeConfig) -> (Sim, Vec<NodeId>) {
    init_tracing();
    let mut sim = Sim::new(seed);
    let nodes: Vec<NodeId> = (0..n).map(|i| sim.add_node(format!("n{i}"), config.clone())).collect();
    assert!(sim.run_until(Duration::from_secs(5), |sim| nodes.iter().all(|n| sim.node(*n).client().is_registered())));
    sim.with_node(nodes[0], |node, now| node.create_room(now, room, RoomOptions::group(8))).unwrap();
    assert!(sim.run_until(Duration::from_secs(2), |sim| joined(sim, nodes[0])));
    for &n in &nodes[1..] {
        sim.with_node(n, |node, now| node.join_room(now, room)).unwrap();
        assert!(sim.run_until(Duration::from_secs(2), |sim| joined(sim, n)));
    }
    (sim, nodes)
}

pub fn joined(sim: &Sim, n: NodeId) -> bool {
    sim.events(n).iter().any(|(_, e)| matches!(e, NodeEvent::Room(RoomEvent::Joined { .. })))
}

/// The media events `n` saw, in order.
pub fn media(sim: &Sim, n: NodeId) -> Vec<MediaEvent> {
    sim.events(n)
        .iter()
        .filter_map(|(_, e)| match e {
            NodeEvent::Media(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}
