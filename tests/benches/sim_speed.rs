//! Simulator speed (harness = false): a 10-node full mesh (45 connections) on a 5 ms link,
//! connected, then 60 virtual seconds of a chatty application (every node sends a 200-byte
//! message to every other node every 100 ms) with keep-alives; wall time measured. The ratio
//! that matters is virtual time over wall time (how much faster than real time it runs); the
//! baseline is the same world idle (keep-alives only), so the cost of the traffic shows.
//!
//! Run: `cargo bench -p peerlink-tests --bench sim_speed`.

use std::time::{Duration, Instant};

use peerlink::{NodeConfig, PeerState};
use peerlink_sim::{LinkConfig, NodeId, Sim};

const NODES: usize = 10;
const VIRTUAL: Duration = Duration::from_secs(60);

fn mesh(seed: u64) -> (Sim, Vec<NodeId>) {
    let mut sim = Sim::new(seed);
    sim.set_default_link(LinkConfig::new(Duration::from_millis(5)));
    let nodes: Vec<NodeId> = (0..NODES).map(|i| sim.add_node(format!("n{i}"), NodeConfig::new("sim://server"))).collect();
    sim.run_for(Duration::from_millis(200));
    for (i, &a) in nodes.iter().enumerate() {
        for &b in &nodes[i + 1..] {
            let fb = sim.fingerprint(b);
            sim.with_node(a, |n, now| n.connect_to_peer(now, fb)).unwrap();
        }
    }
    let all = |sim: &Sim| {
        nodes.iter().all(|&a| nodes.iter().all(|&b| a == b || sim.node(a).get_peer(&sim.fingerprint(b)).is_some_and(|p| p.state == PeerState::Connected)))
    };
    assert!(sim.run_until(Duration::from_secs(10), all), "the mesh did not form");
    (sim, nodes)
}

fn run(chatty: bool) -> (Duration, Duration, u64) {
    let started = Instant::now();
    let (mut sim, nodes) = mesh(3);
    let setup = started.elapsed();
    let fps: Vec<_> = nodes.iter().map(|&n| sim.fingerprint(n)).collect();
    let t0 = Instant::now();
    let ticks = VIRTUAL.as_millis() / 100;
    let payload = [7u8; 200];
    for _ in 0..ticks {
        if chatty {
            for (i, &a) in nodes.iter().enumerate() {
                for (j, fb) in fps.iter().enumerate() {
                    if i != j {
                        sim.with_node(a, |n, now| n.send_binary(now, *fb, None, &payload)).unwrap();
                    }
                }
            }
        }
        sim.run_for(Duration::from_millis(100));
        for &n in &nodes {
            sim.take_events(n);
        }
    }
    (setup, t0.elapsed(), sim.net_stats().delivered)
}

fn main() {
    let (idle_setup, idle, idle_datagrams) = run(false);
    let (setup, busy, datagrams) = run(true);
    println!("sim_speed: {NODES}-node full mesh ({} connections), {VIRTUAL:?} of virtual time", NODES * (NODES - 1) / 2);
    println!("sim_speed: mesh formed in {idle_setup:.2?} / {setup:.2?} of wall time");
    println!("sim_speed: baseline idle (keep-alives only): {idle:.2?} wall, {idle_datagrams} datagrams, {:.0}x real time", VIRTUAL.as_secs_f64() / idle.as_secs_f64());
    println!("sim_speed: chatty (90 messages / 100 ms): {busy:.2?} wall, {datagrams} datagrams, {:.0}x real time", VIRTUAL.as_secs_f64() / busy.as_secs_f64());
    println!(
        "sim_speed: RESULT 60 virtual seconds of a 10-node mesh in {:.2} s wall (goal < 5 s: {}), chatty/idle ratio {:.2}",
        busy.as_secs_f64(),
        if busy < Duration::from_secs(5) { "MET" } else { "MISSED" },
        busy.as_secs_f64() / idle.as_secs_f64()
    );
}
