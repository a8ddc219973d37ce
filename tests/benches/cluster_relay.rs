//! Cluster relay benchmark (harness = false): the same `CLIENTS` raw-protocol clients relaying
//! to random other clients against
//!   * **3 nodes**: three `peerlink-server` binaries (child processes) with one `--server-id`
//!     and `--redis` on a `redis-server` this bench starts on a free loopback port; client `i`
//!     is on node `i % 3`, so about two thirds of the relays (printed) cross nodes through
//!     Redis pub/sub (publisher thread → `PUBLISH` → Redis → the target node's subscriber
//!     thread → its event loop), and
//!   * **1 node**: one `peerlink-server` without `--redis`, every client on it
//!     (BENCH_SINGLE_REDIS=1 makes it a one-node cluster on the same Redis, under another
//!     `--server-id`, so every relay is local but the node carries the cluster link).
//!
//! Both sets of clients stay registered for the whole run and the configurations are measured
//! in alternating rounds (3-node first in even rounds, 1-node first in odd ones), so a
//! disturbance from elsewhere on the machine hits both.
//!
//! The load generator is relay_load's (`common/relay_gen.rs`: non-blocking sockets, one epoll
//! instance per generator thread, per-thread latency histograms):
//!   1. max throughput: closed loop with a window of `WINDOW` relays in flight; delivered
//!      relays/s over `MEASURE` seconds after a 1 s warm-up, BENCH_ROUNDS rounds per
//!      configuration; the headline is each configuration's median and their ratio;
//!   2. latency: paced at one rate for both configurations, by default half of the smaller of
//!      the two median maxima (so both carry it), each client once per period from a random
//!      offset; the payload carries the send time, the receiver records `now - sent`; the
//!      histograms of all rounds of a configuration are merged for p50/p99/p99.9/max.
//!
//! Before measuring, every node's `/healthz` must say 200 (cluster link up) and a probe client
//! on each node relays to a probe on each other node (with an `id`): the `ok` must come back
//! and the relay must arrive, else the bench panics. The probes register after the load's
//! clients, and Redis keeps one publisher's order, so once they pass every node knows every
//! other node's clients.
//!
//! **This is a 2-core machine**: the 3 nodes, Redis and the load generator all share the 2
//! cores, nothing is pinned (BENCH_PIN is ignored), and the 3-node figures measure what the
//! cluster costs on the same hardware (Redis and the extra hops), not how it scales across
//! machines. CPU per process over each measuring window is printed, to show where the time
//! goes (nodes vs Redis vs generator).
//!
//! Runs `cargo build --release -p peerlink-server` first (BENCH_NO_BUILD=1 skips it); the bench
//! starts and, at the end or on a panic, kills exactly the processes it started (by their
//! `Child` handles). Run: `cargo bench -p peerlink-tests --bench cluster_relay`.
//! Env: BENCH_CLIENTS (999), BENCH_ROUNDS (3), BENCH_MEASURE_SECS (3), BENCH_WINDOW (4000),
//! BENCH_CLIENT_THREADS (1), BENCH_PACED_FRACTION (0.5 of the smaller median max),
//! BENCH_PACED_RATE (an absolute paced rate in relays/s instead), BENCH_SERVER_ARGS (extra
//! flags for every node), BENCH_SINGLE_REDIS=1 (see above).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message;
use common::ChildServer;
use common::redis::RedisServer;
use common::relay_gen::{Load, Saturation, quantile_us};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use peerlink::protocol::{self, ErrorCode, ServerMessage};

const NODES: usize = 3;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn env_f64(name: &str) -> Option<f64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// `GET /healthz` on a node answers 200 (for a cluster node: its Redis link is up).
fn healthy(addr: &str) -> bool {
    let Ok(mut tcp) = TcpStream::connect(addr) else { return false };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut head = [0u8; 12];
    tcp.write_all(request.as_bytes()).is_ok() && tcp.read_exact(&mut head).is_ok() && head.ends_with(b" 200")
}

/// The next server frame on `ws` within 5 s, decoded; panics (naming `what`) otherwise.
async fn next_frame(ws: &mut common::Ws, what: &str) -> String {
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return t.as_str().to_owned(),
                Some(Ok(_)) => continue,
                other => panic!("cluster check: {what}: connection ended: {other:?}"),
            }
        }
    };
    let timeout = async {
        smol::Timer::after(Duration::from_secs(5)).await;
        panic!("cluster check: {what}: nothing within 5 s")
    };
    smol::future::or(read, timeout).await
}

/// A probe client on each node relays (with an id) to the probe of every other node: the `ok`
/// must come back from the target's node and the relay must arrive there. `peer_not_found`
/// (the target's `session_up` still on its way) is retried for up to 10 s. Panics otherwise.
fn check_cross_node(addrs: &[String], probes: &[Arc<peerlink::Identity>]) {
    smol::block_on(async {
        let mut ws = Vec::new();
        for (i, (addr, id)) in addrs.iter().zip(probes).enumerate() {
            ws.push(common::connect_registered(addr, id, 0xc0ffee + i as u64).await.0);
        }
        let fps: Vec<_> = probes.iter().map(|p| p.fingerprint()).collect();
        let mut req = 0u64;
        for from in 0..addrs.len() {
            for to in (0..addrs.len()).filter(|&to| to != from) {
                let what = format!("relay from node {from} to node {to}");
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    req += 1;
                    let text = format!(r#"{{"type":"relay","id":{req},"to":"{}","payload":{{"probe":{from}}}}}"#, fps[to]);
                    ws[from].send(Message::text(text)).await.expect("probe send");
                    let answer = next_frame(&mut ws[from], &what).await;
                    match protocol::decode_server(&answer) {
                        Ok(ServerMessage::Ok { id }) if id == req => break,
                        Ok(ServerMessage::Error { code: ErrorCode::PeerNotFound, .. }) if Instant::now() < deadline => {
                            smol::Timer::after(Duration::from_millis(50)).await;
                        }
                        _ => panic!("cluster check: {what}: expected ok, got {answer}"),
                    }
                }
                let arrived = next_frame(&mut ws[to], &what).await;
                match protocol::decode_server(&arrived) {
                    Ok(ServerMessage::Relay { from: sender, payload })
                        if sender == fps[from] && payload.get() == format!(r#"{{"probe":{from}}}"#) => {}
                    _ => panic!("cluster check: {what}: expected the relay, got {arrived}"),
                }
            }
        }
        for w in &mut ws {
            let _ = w.send(Message::text(r#"{"type":"bye"}"#)).await;
            let _ = w.close(None).await;
        }
    });
}

/// "; Redis: N PUBLISH (X per relay sent, Y us each inside Redis)" between two
/// `publish_stats` samples, or nothing when there were none.
fn publishes(before: Option<(u64, u64)>, after: Option<(u64, u64)>, sent: u64) -> String {
    let ((c0, u0), (c1, u1)) = (before.unwrap_or((0, 0)), after.unwrap_or((0, 0)));
    let calls = c1.saturating_sub(c0);
    if calls == 0 {
        return String::new();
    }
    format!(
        "; Redis: {calls} PUBLISH ({:.2} per relay sent, {:.1} us each inside Redis)",
        calls as f64 / sent.max(1) as f64,
        u1.saturating_sub(u0) as f64 / calls as f64
    )
}

/// One configuration under test: its servers, their load, and what its rounds measured.
struct Config {
    name: &'static str,
    servers: Vec<ChildServer>,
    /// Watched for CPU: the servers, then Redis when it serves this configuration.
    pids: Vec<u32>,
    load: Load,
    sat: Vec<Saturation>,
    latency: Histogram<u64>,
    paced: Vec<(f64, f64, f64)>,
    undelivered: u64,
}

impl Config {
    fn median_max(&self) -> f64 {
        common::median(self.sat.iter().map(|s| s.rate).collect()).unwrap_or(0.0)
    }

    /// "node0 0.61 node1 0.58 ... redis 0.32 gen 0.40" for cores of `pids` then the generator.
    fn cpu(&self, cores: &[f64], gen_cores: f64) -> String {
        let names = (0..self.servers.len()).map(|i| format!("node{i}")).chain(["redis".to_owned()]);
        let mut s: Vec<String> = names.zip(cores).map(|(n, c)| format!("{n} {c:.2}")).collect();
        s.push(format!("gen {gen_cores:.2}"));
        format!("{} = {:.2} cores", s.join(" "), cores.iter().sum::<f64>() + gen_cores)
    }
}

fn main() {
    common::never_pin();
    let nofile = common::raise_nofile();
    let clients = env_or("BENCH_CLIENTS", 999) as usize;
    let rounds = env_or("BENCH_ROUNDS", 3).max(1) as usize;
    let measure = Duration::from_secs(env_or("BENCH_MEASURE_SECS", 3));
    let warmup = Duration::from_secs(1);
    let window = env_or("BENCH_WINDOW", 4000) as i64;
    let threads = env_or("BENCH_CLIENT_THREADS", 1) as usize;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "cluster_relay: {clients} clients, {rounds} alternating rounds, {NODES} nodes + 1 Redis vs 1 node; load generator on {threads} thread(s); RLIMIT_NOFILE {nofile}"
    );
    println!(
        "cluster_relay: NOTE {cpus} CPU(s) on this machine: the {NODES} nodes, redis-server and the load generator all share them (no pinning); the 3-node figures are the cluster's cost on the same cores, not scaling across machines"
    );
    // Of the ordered pairs (sender, target), those whose ends are on different nodes.
    let crossing = (0..clients).map(|i| (0..clients).filter(|&j| j != i && j % NODES != i % NODES).count()).sum::<usize>()
        as f64
        / (clients * (clients - 1)).max(1) as f64;
    println!("cluster_relay: 3-node: client i on node i % 3, random targets: {:.1}% of relays cross nodes", crossing * 100.0);
    println!("cluster_relay: loadavg at start: {}", common::measure::loadavg());

    let server_bin = common::peerlink_server_binary();
    let redis = RedisServer::start();
    println!("cluster_relay: redis-server pid {} on port {}", redis.pid(), redis.port);
    let extra = std::env::var("BENCH_SERVER_ARGS").unwrap_or_default();
    let redis_url = redis.url();
    let spawn = |name: &'static str, cluster: Option<&str>| {
        let mut args = vec!["--listen", "127.0.0.1:0", "--rate", "1000000", "--burst", "1000000", "--raise-nofile"];
        if let Some(server_id) = cluster {
            args.extend(["--server-id", server_id, "--redis", &redis_url]);
        }
        args.extend(extra.split_whitespace());
        common::spawn_server(name, &server_bin, &args)
    };
    let nodes: Vec<ChildServer> =
        ["cluster-node-0", "cluster-node-1", "cluster-node-2"].into_iter().map(|n| spawn(n, Some("bench-cluster"))).collect();
    let single_redis = std::env::var("BENCH_SINGLE_REDIS").is_ok_and(|v| v == "1");
    let single = spawn("single-node", single_redis.then_some("bench-single"));
    let deadline = Instant::now() + Duration::from_secs(15);
    for s in nodes.iter().chain([&single]) {
        while !healthy(&s.addr) {
            assert!(Instant::now() < deadline, "{} ({}) not healthy (cluster link up?) within 15 s; log {}", s.name, s.addr, s.log.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let node_addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    println!("cluster_relay: nodes {node_addrs:?} (pids {:?}), single node {} (pid {}{})",
        nodes.iter().map(|n| n.pid()).collect::<Vec<_>>(), single.addr, single.pid(),
        if single_redis { ", on Redis too" } else { ", no Redis" });

    // The load's clients first, then the probes (see the doc comment: ordering).
    let all_ids = common::identities(clients + NODES);
    let (ids, probes) = all_ids.split_at(clients);
    let cluster_load = Load::start("cluster_relay[3-node]", &node_addrs, ids, threads);
    let t = Instant::now();
    check_cross_node(&node_addrs, probes);
    println!("cluster_relay: cluster check passed: relays between every pair of nodes acknowledged and delivered ({:.0?})", t.elapsed());
    let single_load = Load::start("cluster_relay[1-node]", std::slice::from_ref(&single.addr), ids, threads);

    let mut cluster_pids: Vec<u32> = nodes.iter().map(|n| n.pid()).collect();
    cluster_pids.push(redis.pid());
    let mut single_pids = vec![single.pid()];
    if single_redis {
        single_pids.push(redis.pid());
    }
    let new_config = |name, servers, pids, load| Config {
        name,
        servers,
        pids,
        load,
        sat: Vec::new(),
        latency: Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap(),
        paced: Vec::new(),
        undelivered: 0,
    };
    let mut configs = [
        new_config("3-node", nodes, cluster_pids, cluster_load),
        new_config("1-node", vec![single], single_pids, single_load),
    ];
    // Even rounds 3-node first, odd rounds 1-node first.
    let order = |round: usize| if round.is_multiple_of(2) { [0, 1] } else { [1, 0] };

    // Phase 1: max throughput, closed loop.
    for round in 0..rounds {
        for k in order(round) {
            let c = &mut configs[k];
            let before = redis.publish_stats();
            let s = c.load.saturate(window, warmup, measure, &c.pids);
            println!(
                "cluster_relay: round {round} {:<6} max {:>8.0} relays/s (sent {}, undelivered {}); CPU {}{}",
                c.name,
                s.rate,
                s.sent,
                s.undelivered,
                c.cpu(&s.cores, s.gen_cores),
                publishes(before, redis.publish_stats(), s.sent)
            );
            c.undelivered += s.undelivered;
            c.sat.push(s);
        }
    }
    let (max3, max1) = (configs[0].median_max(), configs[1].median_max());

    // Phase 2: latency at one paced rate both can carry.
    let fraction = env_f64("BENCH_PACED_FRACTION").unwrap_or(0.5);
    let paced_rate = env_f64("BENCH_PACED_RATE").unwrap_or(max3.min(max1) * fraction);
    println!("cluster_relay: paced rate {paced_rate:.0} relays/s for both");
    for round in 0..rounds {
        for k in order(round) {
            let c = &mut configs[k];
            let p = c.load.paced(paced_rate, warmup, measure, &c.pids);
            let (p50, p99) = (quantile_us(&p.hist, 0.5), quantile_us(&p.hist, 0.99));
            println!(
                "cluster_relay: round {round} {:<6} paced @ {:.0}/s (got {:.0}/s): p50 {p50:>8.1} us  p99 {p99:>8.1} us  max {:>8.1} us (undelivered {}); CPU {}",
                c.name, p.target, p.got, p.hist.max() as f64 / 1000.0, p.undelivered, c.cpu(&p.cores, p.gen_cores)
            );
            c.latency.add(&p.hist).unwrap();
            c.paced.push((p.got, p50, p99));
            c.undelivered += p.undelivered;
        }
    }

    // Tear down: clients first, then the servers (SIGTERM by PID), Redis last (on drop).
    let mut latency = Vec::new();
    for c in configs {
        let (other, sent, median_max) = (c.load.other(), c.load.sent(), c.median_max());
        let closed = c.load.stop();
        let h = &c.latency;
        let (p50, p99, p999) = (quantile_us(h, 0.5), quantile_us(h, 0.99), quantile_us(h, 0.999));
        println!(
            "cluster_relay: {:<6} median max {:>8.0} relays/s (rounds: {}) | paced @ {paced_rate:.0}/s, {rounds} rounds merged: p50 {p50:.1} us p99 {p99:.1} us p99.9 {p999:.1} us max {:.1} us | sent {sent}, undelivered {}, non-relay frames {other}, closed by server {closed}",
            c.name,
            median_max,
            c.sat.iter().map(|s| format!("{:.0}", s.rate)).collect::<Vec<_>>().join(", "),
            h.max() as f64 / 1000.0,
            c.undelivered
        );
        latency.push((p50, p99));
        for s in c.servers {
            s.stop();
        }
    }
    println!(
        "cluster_relay: RESULT max throughput: 3-node {max3:.0} relays/s, 1-node {max1:.0} relays/s (medians of {rounds} rounds); ratio 3-node/1-node {:.3}",
        max3 / max1.max(1.0)
    );
    let [(p50_3, p99_3), (p50_1, p99_1)] = latency[..] else { unreachable!("two configurations") };
    println!(
        "cluster_relay: RESULT latency at {paced_rate:.0} relays/s: 3-node p50 {p50_3:.1} us p99 {p99_3:.1} us, 1-node p50 {p50_1:.1} us p99 {p99_1:.1} us; ratio 3-node/1-node p50 {:.2} p99 {:.2}",
        p50_3 / p50_1.max(0.001),
        p99_3 / p99_1.max(0.001)
    );
    drop(redis);
    println!("cluster_relay: loadavg at end: {}", common::measure::loadavg());
}
