//! Network relay benchmark (harness = false): `CLIENTS` registered raw-protocol clients over
//! real WebSockets on 127.0.0.1, each relaying to random other clients, against
//!   * the real `peerlink-server` binary (a child process), and
//!   * a baseline: a minimal async-tungstenite relay (this bench binary re-invoked with
//!     `--baseline-server`: fingerprint -> connection HashMap, frames forwarded verbatim, only
//!     `to` extracted with serde_json, no rate limits).
//!
//! The load generator (`common/relay_gen.rs`) shares the 2 cores with the server, so it is built
//! to cost as little as possible: each generator thread owns a share of the clients as
//! non-blocking sockets with synchronous tungstenite, waits on one `polling` (epoll) instance in
//! level mode, and keeps its own latency histogram (no task wake-ups, no cross-thread channels,
//! no shared lock). (An async generator with one task per client cost about 30 us of CPU per
//! message and saturated its core at a third of the rate it could offer.)
//!
//! Phase 1 (max throughput): closed loop with a global window of `WINDOW` messages in flight;
//! delivered messages/s over a `MEASURE` window after a warm-up.
//! Phase 2 (latency): paced at 50,000 msg/s (half of the 100,000 msg/s goal; the same load for
//! both servers) and then at half of the server's own phase-1 rate (each client sends once per
//! period from a random offset); the payload carries the send time (nanoseconds since a shared
//! `Instant` in this process, taken when the frame is written); the receiver records
//! `now - sent`; p50/p99/p99.9/max reported.
//!
//! By default the server runs on CPU 0 and the generator (one thread) on CPU 1, so that on
//! this 2-core machine each has a core and neither's queueing shows up in the other's figures;
//! the baseline server then runs one thread too. BENCH_PIN=0 lets both share both cores.
//!
//! Runs `cargo build --release -p peerlink-server` first (no-op when up to date; BENCH_NO_BUILD=1
//! skips it) and uses target/release/peerlink-server. Run: `cargo bench -p peerlink-tests --bench relay_load`.
//! Env: BENCH_CLIENTS (1000), BENCH_MEASURE_SECS (5), BENCH_WINDOW (4000),
//! BENCH_CLIENT_THREADS (1), BENCH_BASELINE_THREADS (1 pinned, 2 not), BENCH_SERVER_ARGS (extra
//! server flags), BENCH_PACED_RATES ("50000": phase 2 rates in msg/s; the first is the
//! headline), BENCH_PACED_FRACTIONS ("0.5": more phase 2 rates, as fractions of phase 1),
//! BENCH_SKIP_BASELINE=1 (peerlink only, for profiling), BENCH_PIN=0 (no pinning),
//! BENCH_SPIN=1 (a pinned generator busy-polls instead of sleeping in epoll).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::ChildServer;
use common::relay_gen::{Load, quantile_us};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Paced {
    fraction: f64,
    target: f64,
    got: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    server_cores: f64,
    gen_cores: f64,
}

struct Results {
    paced: Vec<Paced>,
    max_rate: f64,
    paced_target: f64,
    paced_rate: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    other: u64,
    lost: u64,
    server_cores: f64,
    gen_cores: f64,
}

fn run_against(threads: usize, server: &ChildServer, ids: &[Arc<peerlink::Identity>]) -> Results {
    let addr = server.addr.clone();
    let measure = Duration::from_secs(env_or("BENCH_MEASURE_SECS", 5));
    let window = env_or("BENCH_WINDOW", 4000) as i64;
    let warmup = Duration::from_secs(1);
    let pids = [server.pid()];
    let load = Load::start(&format!("relay_load[{addr}]"), std::slice::from_ref(&addr), ids, threads);

    // Phase 1: saturation, closed loop.
    let sat = load.saturate(window, warmup, measure, &pids);
    let (max_rate, server_cores, gen_cores) = (sat.rate, sat.cores[0], sat.gen_cores);
    eprintln!(
        "relay_load[{addr}]: phase 1: {max_rate:.0} delivered/s (sent {}, undelivered {}); CPU: server {server_cores:.2} cores ({:.1} us/msg), load generator {gen_cores:.2} cores",
        sat.sent,
        sat.undelivered,
        server_cores * 1e6 / max_rate.max(1.0)
    );

    // Phase 2: paced at fractions of the max rate (0.5 = the headline; more from
    // BENCH_PACED_FRACTIONS, e.g. "0.5,0.25,0.1") and at absolute rates (BENCH_PACED_RATES);
    // latency recorded after a warm-up.
    let parse = |name: &str, default: &str| -> Vec<f64> {
        std::env::var(name)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .filter_map(|f| f.trim().parse().ok())
            .collect()
    };
    // The headline rate first: 50,000/s, half of the 100,000/s goal, the same absolute load for
    // both servers.
    let mut targets: Vec<(f64, f64)> = parse("BENCH_PACED_RATES", "50000").into_iter().map(|r| (r / max_rate.max(1.0), r)).collect();
    targets.extend(parse("BENCH_PACED_FRACTIONS", "0.5").into_iter().map(|f| (f, max_rate * f)));
    let mut paced_runs = Vec::new();
    let mut lost2 = 0;
    for (fraction, paced_target) in targets {
        let p = load.paced(paced_target, warmup, measure, &pids);
        lost2 += p.undelivered;
        let run = Paced {
            fraction,
            target: p.target,
            got: p.got,
            p50_us: quantile_us(&p.hist, 0.50),
            p99_us: quantile_us(&p.hist, 0.99),
            p999_us: quantile_us(&p.hist, 0.999),
            max_us: p.hist.max() as f64 / 1000.0,
            server_cores: p.cores[0],
            gen_cores: p.gen_cores,
        };
        eprintln!(
            "relay_load[{addr}]: paced x{fraction:.2} @ {:.0}/s (got {:.0}/s): p50 {:.1} us p99 {:.1} us p99.9 {:.1} us max {:.1} us; CPU: server {:.2} cores, load generator {:.2} cores",
            run.target, run.got, run.p50_us, run.p99_us, run.p999_us, run.max_us, run.server_cores, run.gen_cores
        );
        paced_runs.push(run);
    }

    // Tear down: every generator thread closes its clients.
    let other = load.other();
    let closed = load.stop();
    if closed > 0 {
        eprintln!("relay_load[{addr}]: {closed} connections were closed by the server during the run");
    }
    let head = paced_runs.first().expect("at least one paced rate");
    Results {
        max_rate,
        paced_target: head.target,
        paced_rate: head.got,
        p50_us: head.p50_us,
        p99_us: head.p99_us,
        p999_us: head.p999_us,
        max_us: head.max_us,
        paced: paced_runs,
        other,
        lost: sat.undelivered + lost2,
        server_cores,
        gen_cores,
    }
}

fn report(name: &str, r: &Results) {
    println!(
        "relay_load: {name:<9} max delivered {:>9.0} msg/s | paced @ {:>8.0}/s (got {:>8.0}/s): p50 {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us  max {:>8.1} us | non-relay frames {} undelivered {} | phase-1 CPU: server {:.2} cores ({:.1} us/msg), generator {:.2} cores",
        r.max_rate, r.paced_target, r.paced_rate, r.p50_us, r.p99_us, r.p999_us, r.max_us, r.other, r.lost,
        r.server_cores, r.server_cores * 1e6 / r.max_rate.max(1.0), r.gen_cores
    );
    for p in r.paced.iter().skip(1) {
        println!(
            "relay_load: {name:<9}   also paced x{} @ {:>8.0}/s (got {:>8.0}/s): p50 {:>8.1} us  p99 {:>8.1} us  p99.9 {:>8.1} us  max {:>8.1} us",
            p.fraction, p.target, p.got, p.p50_us, p.p99_us, p.p999_us, p.max_us
        );
    }
}

fn main() {
    if common::maybe_run_baseline_server() {
        return;
    }
    let nofile = common::raise_nofile();
    let clients = env_or("BENCH_CLIENTS", 1000) as usize;
    // One generator thread: pinned to its own core, two threads only time-slice each other
    // (a thread holding the core for a scheduler slice while the other's sockets wait showed up
    // as tens of milliseconds in the p99).
    let threads = env_or("BENCH_CLIENT_THREADS", 1) as usize;
    println!("relay_load: {clients} clients, load generator on {threads} threads, RLIMIT_NOFILE {nofile}");
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("relay_load: loadavg at start: {}", l.trim());
    }
    let server_bin = common::peerlink_server_binary();
    let me = std::env::current_exe().unwrap();
    let ids = common::identities(clients);
    common::pin_generator();
    if common::pinned() {
        println!("relay_load: server on CPU 0, load generator on CPU 1 (BENCH_PIN=0 to share both)");
    }

    // Baseline first, then peerlink-server, each in its own child process.
    // BENCH_SKIP_BASELINE=1 measures peerlink alone (for profiling; the RESULT lines then
    // compare against nothing and are not printed).
    let skip_baseline = std::env::var("BENCH_SKIP_BASELINE").is_ok_and(|v| v == "1");
    let b = (!skip_baseline).then(|| {
        let baseline = common::spawn_server("baseline-relay", &me, &["--baseline-server"]);
        let b = run_against(threads, &baseline, &ids);
        baseline.stop();
        report("baseline", &b);
        b
    });

    let extra = std::env::var("BENCH_SERVER_ARGS").unwrap_or_default();
    let mut args = vec!["--listen", "127.0.0.1:0", "--rate", "1000000", "--burst", "1000000", "--raise-nofile"];
    args.extend(extra.split_whitespace());
    let server = common::spawn_server("peerlink-server", &server_bin, &args);
    let p = run_against(threads, &server, &ids);
    server.stop();
    report("peerlink", &p);

    let Some(b) = b else { return };
    println!(
        "relay_load: RESULT peerlink max delivered {:.0} msg/s (goal >= 100000: {}), baseline {:.0} msg/s, ratio {:.3}",
        p.max_rate,
        if p.max_rate >= 100_000.0 { "MET" } else { "MISSED" },
        b.max_rate,
        p.max_rate / b.max_rate
    );
    for (i, (pp, bp)) in p.paced.iter().zip(&b.paced).enumerate() {
        let what = if i == 0 { "goal p99 < 10 ms" } else { "no goal" };
        println!(
            "relay_load: RESULT peerlink p50 {:.1} us p99 {:.1} us at {:.0}/s ({what}: {}), baseline p50 {:.1} us p99 {:.1} us at {:.0}/s, p99 ratio {:.3}",
            pp.p50_us,
            pp.p99_us,
            pp.got,
            if pp.p99_us < 10_000.0 { "MET" } else { "MISSED" },
            bp.p50_us,
            bp.p99_us,
            bp.got,
            pp.p99_us / bp.p99_us
        );
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("relay_load: loadavg at end: {}", l.trim());
    }
}
