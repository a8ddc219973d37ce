//! Memory per connected idle peer (harness = false). A counting global allocator measures live
//! heap bytes.
//!
//! peerlink: in the simulator (real Nodes, real str0m, no sockets), a hub node connects to 100
//! other nodes; once every connection is up and idle for 5 virtual seconds, the heap growth
//! since all nodes registered, divided by 100, is the cost of one connected peer *on each side*
//! (the hub's end and the remote node's end: two `Peer`s); half of it is one end.
//!
//! Baseline, same run: 100 pairs of raw str0m `Rtc`s at default settings (one data channel,
//! connected by passing their datagrams in memory), heap growth per `Rtc`.
//!
//! Run: `cargo bench -p peerlink-tests --bench peer_memory`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use peerlink::{NodeConfig, NodeEvent, PeerState};
use peerlink_sim::Sim;
use str0m::change::SdpOffer;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const PEERS: usize = 100;

fn peerlink_per_connection() -> f64 {
    let mut sim = Sim::new(5);
    let mut config = NodeConfig::new("sim://server");
    // BENCH_MEM_PEER=dtls12,nosnap: what str0m's defaults cost inside peerlink (diagnostic).
    for opt in std::env::var("BENCH_MEM_PEER").unwrap_or_default().split(',') {
        match opt {
            "dtls12" => config.peer.dtls_version = peerlink::peer::DtlsVersion::Dtls12,
            "nosnap" => config.peer.snap = false,
            _ => {}
        }
    }
    let hub = sim.add_node("hub", config.clone());
    let others: Vec<_> = (0..PEERS).map(|i| sim.add_node(format!("n{i}"), config.clone())).collect();
    sim.run_for(Duration::from_secs(1));
    for n in std::iter::once(hub).chain(others.iter().copied()) {
        sim.take_events(n);
    }
    let before = live();
    for &n in &others {
        let fp = sim.fingerprint(n);
        sim.with_node(hub, |node, now| node.connect_to_peer(now, fp)).unwrap();
    }
    let all_up = |sim: &Sim| others.iter().all(|&n| sim.node(hub).get_peer(&sim.fingerprint(n)).is_some_and(|p| p.state == PeerState::Connected));
    assert!(sim.run_until(Duration::from_secs(30), all_up), "not all connected");
    sim.run_for(Duration::from_secs(5));
    for n in std::iter::once(hub).chain(others.iter().copied()) {
        let events = sim.take_events(n);
        assert!(!events.iter().any(|(_, e)| matches!(e, NodeEvent::PeerError { .. })));
    }
    let after = live();
    (after - before) as f64 / PEERS as f64
}

/// Drains an Rtc into `out` (datagrams); returns its next timeout.
fn drain(rtc: &mut Rtc, out: &mut Vec<(std::net::SocketAddr, std::net::SocketAddr, Vec<u8>)>) -> Instant {
    loop {
        match rtc.poll_output().expect("poll_output") {
            Output::Timeout(t) => return t,
            Output::Transmit(t) => out.push((t.source, t.destination, t.contents.into())),
            Output::Event(Event::ChannelOpen(..)) | Output::Event(_) => {}
        }
    }
}

fn raw_str0m_per_rtc() -> f64 {
    let before = live();
    let mut pairs = Vec::new();
    let start = Instant::now();
    for i in 0..PEERS {
        let now = start;
        let a_addr = format!("10.1.{}.{}:5000", i / 250, i % 250 + 1).parse().unwrap();
        let b_addr = format!("10.2.{}.{}:5000", i / 250, i % 250 + 1).parse().unwrap();
        let mut a = Rtc::new(now);
        let mut b = Rtc::new(now);
        a.add_local_candidate(Candidate::host(a_addr, "udp").unwrap());
        b.add_local_candidate(Candidate::host(b_addr, "udp").unwrap());
        let mut api = a.sdp_api();
        api.add_channel("data".into());
        let (offer, pending) = api.apply().unwrap();
        let offer = SdpOffer::from_sdp_string(&offer.to_sdp_string()).unwrap();
        let answer = b.sdp_api().accept_offer(offer).unwrap();
        a.sdp_api().accept_answer(pending, answer).unwrap();
        pairs.push((a, b));
    }
    // Run every pair to connected and 5 s of idle, shuttling datagrams in memory.
    let mut now = start;
    let end = start + Duration::from_secs(8);
    let mut connected = 0;
    while now < end {
        connected = 0;
        for (a, b) in &mut pairs {
            let mut to_b = Vec::new();
            let mut to_a = Vec::new();
            a.handle_input(Input::Timeout(now)).unwrap();
            b.handle_input(Input::Timeout(now)).unwrap();
            drain(a, &mut to_b);
            drain(b, &mut to_a);
            for _ in 0..20 {
                if to_a.is_empty() && to_b.is_empty() {
                    break;
                }
                for (src, dst, data) in std::mem::take(&mut to_b) {
                    let r = Receive::new(Protocol::Udp, src, dst, &data).unwrap();
                    b.handle_input(Input::Receive(now, r)).unwrap();
                    drain(b, &mut to_a);
                }
                for (src, dst, data) in std::mem::take(&mut to_a) {
                    let r = Receive::new(Protocol::Udp, src, dst, &data).unwrap();
                    a.handle_input(Input::Receive(now, r)).unwrap();
                    drain(a, &mut to_b);
                }
            }
            if a.is_connected() && b.is_connected() {
                connected += 1;
            }
        }
        now += Duration::from_millis(10);
    }
    assert_eq!(connected, PEERS, "raw str0m pairs did not all connect");
    let after = live();
    let per = (after - before) as f64 / (2 * PEERS) as f64;
    drop(pairs);
    per
}

fn main() {
    let base = raw_str0m_per_rtc();
    let per_connection = peerlink_per_connection();
    let per_end = per_connection / 2.0;
    println!("peer_memory: {PEERS} connected idle peers");
    println!("peer_memory: baseline raw str0m Rtc (defaults, connected, one channel): {:.1} KiB each", base / 1024.0);
    println!(
        "peer_memory: peerlink: {:.1} KiB per connection (both ends), {:.1} KiB per connected peer on one side",
        per_connection / 1024.0,
        per_end / 1024.0
    );
    println!(
        "peer_memory: RESULT {:.1} KiB per connected idle peer (goal < 256 KiB: {}), ratio to raw str0m {:.2}",
        per_end / 1024.0,
        if per_end < 256.0 * 1024.0 { "MET" } else { "MISSED" },
        per_end / base
    );
}
