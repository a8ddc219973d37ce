//! Idle-connection memory benchmark (harness = false).
//!
//! Starts the real `peerlink-server` binary (`--raise-nofile --max-connections 20000`) as a child
//! process, reads its VmRSS, opens `CONNS` registered idle connections (at most 200 connecting
//! at once, to stay clear of SYN/accept-queue overflow), waits ~2 s, reads VmRSS again and
//! reports (after - before) / CONNS bytes per connection. Baseline in the same run: a bare
//! async-tungstenite server (this bench binary re-invoked with `--hold-server`) that accepts and
//! holds WebSocket connections; same measurement, ratio printed.
//!
//! Runs `cargo build --release -p peerlink-server` first (no-op when up to date; BENCH_NO_BUILD=1
//! skips it) and uses target/release/peerlink-server. Run: `cargo bench -p peerlink-tests --bench idle_memory`.
//! Env: BENCH_CONNS (10000), BENCH_IN_FLIGHT (200), BENCH_CLIENT_THREADS (2),
//! BENCH_BASELINE_THREADS (2), BENCH_SERVER_ARGS (extra server flags).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ChildServer, Pool};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Measured {
    before: u64,
    after: u64,
    per_conn: f64,
}

fn measure(pool: &Pool, server: &ChildServer, ids: Option<&[Arc<peerlink::Identity>]>, conns: usize) -> Measured {
    // Let the server settle after startup before the first reading.
    std::thread::sleep(Duration::from_millis(500));
    let before = common::vm_rss(server.pid());
    let addr = server.addr.clone();
    let ex = pool.ex.clone();
    let ids: Option<Vec<_>> = ids.map(<[_]>::to_vec);
    let in_flight = env_or("BENCH_IN_FLIGHT", 200) as usize;
    let t0 = Instant::now();
    let held = pool.block_on(async move {
        common::bounded(&ex, conns, in_flight, move |i| {
            let addr = addr.clone();
            let id = ids.as_ref().map(|ids| ids[i].clone());
            async move {
                match id {
                    Some(id) => common::connect_registered(&addr, &id, i as u64).await.0,
                    None => common::open(&addr).await,
                }
            }
        })
        .await
    });
    eprintln!("idle_memory[{}]: {} connections open in {:.2?}", server.name, held.len(), t0.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    let after = common::vm_rss(server.pid());
    // Close by dropping the sockets (the server sees EOF/reset).
    drop(held);
    Measured { before, after, per_conn: after.saturating_sub(before) as f64 / conns as f64 }
}

fn report(name: &str, m: &Measured, conns: usize) {
    println!(
        "idle_memory: {name:<9} VmRSS before {:>7} KiB, after {conns} conns {:>7} KiB -> {:>8.0} bytes/conn ({:.2} KiB)",
        m.before / 1024,
        m.after / 1024,
        m.per_conn,
        m.per_conn / 1024.0
    );
}

fn main() {
    if common::maybe_run_baseline_server() {
        return;
    }
    let nofile = common::raise_nofile();
    let conns = env_or("BENCH_CONNS", 10_000) as usize;
    let threads = env_or("BENCH_CLIENT_THREADS", 2) as usize;
    println!("idle_memory: {conns} idle connections per server, RLIMIT_NOFILE {nofile}");
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("idle_memory: loadavg at start: {}", l.trim());
    }
    assert!(nofile as usize > conns + 100, "RLIMIT_NOFILE {nofile} too low for {conns} connections");
    let server_bin = common::peerlink_server_binary();
    let me = std::env::current_exe().unwrap();
    let t0 = Instant::now();
    let ids = common::identities(conns);
    eprintln!("idle_memory: {conns} identities in {:.2?}", t0.elapsed());
    let pool = Pool::new(threads);

    // Diagnostic: BENCH_EXTERNAL_ADDR=HOST:PORT only opens the registered connections to an
    // already running server (e.g. one under heaptrack), holds them ~5 s and exits.
    if let Ok(addr) = std::env::var("BENCH_EXTERNAL_ADDR") {
        let ex = pool.ex.clone();
        let ids = ids.clone();
        let held = pool.block_on(async move {
            common::bounded(&ex, conns, 200, move |i| {
                let (addr, id) = (addr.clone(), ids[i].clone());
                async move { common::connect_registered(&addr, &id, i as u64).await.0 }
            })
            .await
        });
        println!("idle_memory: {} connections held on the external server", held.len());
        std::thread::sleep(Duration::from_secs(5));
        drop(held);
        pool.shutdown();
        return;
    }

    let baseline = common::spawn_server("baseline-hold", &me, &["--hold-server"]);
    let b = measure(&pool, &baseline, None, conns);
    baseline.stop();
    report("baseline", &b, conns);
    // Let the client side's sockets finish closing before the next server.
    std::thread::sleep(Duration::from_millis(500));

    let extra = std::env::var("BENCH_SERVER_ARGS").unwrap_or_default();
    let mut args = vec!["--listen", "127.0.0.1:0", "--raise-nofile", "--max-connections", "20000"];
    args.extend(extra.split_whitespace());
    let server = common::spawn_server("peerlink-server", &server_bin, &args);
    let p = measure(&pool, &server, Some(&ids), conns);
    server.stop();
    report("peerlink", &p, conns);
    pool.shutdown();

    println!(
        "idle_memory: RESULT peerlink {:.0} bytes/conn ({:.2} KiB; goal <= 16 KiB: {}), baseline {:.0} bytes/conn ({:.2} KiB), ratio {:.3}",
        p.per_conn,
        p.per_conn / 1024.0,
        if p.per_conn <= 16.0 * 1024.0 { "MET" } else { "MISSED" },
        b.per_conn,
        b.per_conn / 1024.0,
        p.per_conn / b.per_conn
    );
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("idle_memory: loadavg at end: {}", l.trim());
    }
}
