//! Connection setup (harness = false): from `connect_to_peer` to the default channel being
//! open on the caller, over real UDP on 127.0.0.1, negotiation relayed by the real signaling
//! server (in-process, its own thread). Each node runs on its own thread with the blocking
//! adapter's `PollNode` (as an application would). 50 timed connections after 5 warm-ups;
//! between them the caller closes and the callee forgets the session.
//!
//! Two configurations in the same run:
//!   * peerlink's defaults (DTLS 1.3 when both sides speak it, SNAP, pre-negotiated channel);
//!   * the baseline: str0m's defaults for what str0m lets us choose (DTLS 1.2, no SNAP).
//!
//! Then the same in the simulator: the number of network round trips between the moment
//! signaling is done (signaling latency zero) and the channel being open, on a 100 ms RTT link.
//!
//! Run: `cargo bench -p peerlink-tests --bench peer_setup`. Env: BENCH_SETUP_RUNS (50).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use peerlink::peer::DtlsVersion;
use peerlink::{NodeConfig, NodeEvent, PeerConfig, PeerState};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use peerlink_sim::{LinkConfig, Sim};

fn node(url: &str, peer: &PeerConfig) -> PollNode {
    let mut config = NodeConfig::new(url);
    config.peer = peer.clone();
    PollNode::new(config, PollOptions { udp: UdpBind::Loopback, ..Default::default() }).expect("node")
}

fn wait_registered(n: &mut PollNode) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !n.is_registered() {
        assert!(Instant::now() < deadline, "not registered");
        let _ = n.next_event(Duration::from_millis(50)).expect("poll");
    }
    while n.poll_event().is_some() {}
}

/// Measures `runs` setups; returns the durations.
fn measure(url: &str, peer: &PeerConfig, runs: usize) -> Vec<Duration> {
    let mut caller = node(url, peer);
    let callee_peer = peer.clone();
    let url2 = url.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let (fp_tx, fp_rx) = mpsc::channel();
    let stop2 = stop.clone();
    let callee = std::thread::spawn(move || {
        let mut n = node(&url2, &callee_peer);
        wait_registered(&mut n);
        fp_tx.send(n.fingerprint()).unwrap();
        while !stop2.load(Ordering::Relaxed) {
            if let Err(e) = n.next_event(Duration::from_millis(20)) {
                panic!("callee: {e}");
            }
        }
    });
    wait_registered(&mut caller);
    let target = fp_rx.recv().unwrap();
    let mut times = Vec::new();
    for i in 0..runs + 5 {
        let start = Instant::now();
        caller.connect_to_peer(target).expect("connect");
        loop {
            match caller.next_event(Duration::from_secs(10)).expect("poll") {
                Some(NodeEvent::ChannelOpen { channel, .. }) if channel == "default" => break,
                Some(NodeEvent::PeerError { error, .. }) => panic!("setup failed: {error}"),
                Some(_) => {}
                None => panic!("setup timed out"),
            }
        }
        let took = start.elapsed();
        if i >= 5 {
            times.push(took);
        }
        caller.node().close_peer(Instant::now(), target).expect("close");
        loop {
            match caller.next_event(Duration::from_millis(5)).expect("poll") {
                Some(NodeEvent::PeerState { state: PeerState::Closed, .. }) | None => break,
                Some(_) => {}
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    callee.join().unwrap();
    times
}

fn stats(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    let p = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    (p(0.5), p(0.95))
}

/// Round trips after signaling, in the simulator: signaling takes no time, the UDP link has
/// a 100 ms round trip; the time from `connect_to_peer` to the caller's channel-open event, in
/// round trips.
fn sim_round_trips(peer: &PeerConfig) -> f64 {
    let mut sim = Sim::new(1);
    sim.set_signaling_latency(Duration::ZERO);
    sim.set_default_link(LinkConfig::new(Duration::from_millis(50)));
    let mut config = NodeConfig::new("sim://server");
    config.peer = peer.clone();
    let a = sim.add_node("a", config.clone());
    let b = sim.add_node("b", config);
    sim.run_for(Duration::from_millis(100));
    let fb = sim.fingerprint(b);
    let start = sim.elapsed();
    sim.with_node(a, |n, now| n.connect_to_peer(now, fb)).unwrap();
    let open = |sim: &Sim| sim.events(a).iter().any(|(_, e)| matches!(e, NodeEvent::ChannelOpen { .. }));
    assert!(sim.run_until(Duration::from_secs(10), open));
    let at = sim.events(a).iter().find(|(_, e)| matches!(e, NodeEvent::ChannelOpen { .. })).unwrap().0;
    (at - start).as_secs_f64() / 0.1
}

fn main() {
    let runs = std::env::var("BENCH_SETUP_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let server = peerlink_server::spawn(peerlink_server::ServerOptions::local()).expect("server");
    let url = server.url();
    let ours = PeerConfig::default();
    let mut str0m_like = PeerConfig::default();
    str0m_like.dtls_version = DtlsVersion::Dtls12;
    str0m_like.snap = false;

    let mut base = measure(&url, &str0m_like, runs);
    let mut mine = measure(&url, &ours, runs);
    let (b50, b95) = stats(&mut base);
    let (m50, m95) = stats(&mut mine);
    println!("peer_setup: {runs} connections each, loopback UDP, real server");
    println!("peer_setup: baseline (DTLS 1.2, no SNAP): median {:.2} ms, p95 {:.2} ms", b50.as_secs_f64() * 1e3, b95.as_secs_f64() * 1e3);
    println!("peer_setup: peerlink defaults:            median {:.2} ms, p95 {:.2} ms", m50.as_secs_f64() * 1e3, m95.as_secs_f64() * 1e3);
    println!(
        "peer_setup: RESULT median {:.2} ms (goal < 25 ms: {}), ratio to baseline {:.2}",
        m50.as_secs_f64() * 1e3,
        if m50 < Duration::from_millis(25) { "MET" } else { "MISSED" },
        m50.as_secs_f64() / b50.as_secs_f64()
    );
    let rt_base = sim_round_trips(&str0m_like);
    let rt_mine = sim_round_trips(&ours);
    println!("peer_setup: simulator, round trips from connect_to_peer to channel open (signaling instant, 100 ms RTT):");
    println!("peer_setup: RESULT round trips: peerlink {rt_mine:.2}, baseline (DTLS 1.2, no SNAP) {rt_base:.2}");
}
