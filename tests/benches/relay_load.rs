//! Network relay benchmark (harness = false): `CLIENTS` registered raw-protocol clients over
//! real WebSockets on 127.0.0.1, each relaying to random other clients, against
//!   * the real `peerlink-server` binary (a child process), and
//!   * a baseline: a minimal async-tungstenite relay (this bench binary re-invoked with
//!     `--baseline-server`: fingerprint -> connection HashMap, frames forwarded verbatim, only
//!     `to` extracted with serde_json, no rate limits).
//!
//! Phase 1 (max throughput): closed loop with a global window of `WINDOW` messages in flight;
//! delivered messages/s over a `MEASURE` window after a warm-up.
//! Phase 2 (latency): paced at half of phase 1's rate (each client on its own timer); the
//! payload carries the send time (nanoseconds since a shared `Instant` in this process); the
//! receiver records `now - sent` in an HdrHistogram; p50/p99/p99.9/max reported.
//!
//! Runs `cargo build --release -p peerlink-server` first (no-op when up to date; BENCH_NO_BUILD=1
//! skips it) and uses target/release/peerlink-server. Run: `cargo bench -p peerlink-tests --bench relay_load`.
//! Env: BENCH_CLIENTS (1000), BENCH_MEASURE_SECS (5), BENCH_WINDOW (4000),
//! BENCH_CLIENT_THREADS (2), BENCH_BASELINE_THREADS (2), BENCH_SERVER_ARGS (extra server flags),
//! BENCH_PACED_FRACTIONS ("0.5": phase 2 rates as fractions of phase 1; the first is the headline).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message;
use common::{ChildServer, Pool};
use async_tungstenite::{WebSocketReceiver, WebSocketSender};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

type Tx = WebSocketSender<smol::net::TcpStream>;
type Rx = WebSocketReceiver<smol::net::TcpStream>;

struct Shared {
    base: Instant,
    fps: Vec<String>,
    sent: AtomicU64,
    delivered: AtomicU64,
    other: AtomicU64,
    record: AtomicBool,
    hist: Mutex<Histogram<u64>>,
    /// Window credits (phase 1): one per message allowed in flight.
    credits: (async_channel::Sender<()>, async_channel::Receiver<()>),
    windowed: AtomicBool,
    stop: AtomicBool,
}

const PAD: &str = "candidate:1 1 UDP 2122252543 192.168.1.77 50000 typ host generation 0";

fn frame(shared: &Shared, to: usize, seq: u64) -> String {
    let t = shared.base.elapsed().as_nanos() as u64;
    format!(r#"{{"type":"relay","to":"{}","payload":{{"t":{t},"n":{seq},"c":"{PAD}"}}}}"#, shared.fps[to])
}

fn sent_time(text: &str) -> Option<u64> {
    let i = text.find("\"t\":")? + 4;
    let digits = text[i..].bytes().take_while(u8::is_ascii_digit).count();
    text[i..i + digits].parse().ok()
}

async fn receiver(shared: Arc<Shared>, mut rx: Rx) {
    let mut shown = 0;
    while let Some(msg) = rx.next().await {
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(c)) => {
                if !shared.stop.load(Ordering::Relaxed) {
                    eprintln!("relay_load: connection closed by server: {c:?}");
                }
                break;
            }
            Ok(_) => continue,
            Err(_) => break,
        };
        let text = text.as_str();
        match sent_time(text) {
            Some(t) if text.contains("\"relay\"") => {
                shared.delivered.fetch_add(1, Ordering::Relaxed);
                if shared.windowed.load(Ordering::Relaxed) {
                    let _ = shared.credits.0.try_send(());
                }
                if shared.record.load(Ordering::Relaxed) {
                    let now = shared.base.elapsed().as_nanos() as u64;
                    let _ = shared.hist.lock().unwrap().record(now.saturating_sub(t).max(1));
                }
            }
            _ => {
                shared.other.fetch_add(1, Ordering::Relaxed);
                if shown < 3 {
                    shown += 1;
                    eprintln!("relay_load: unexpected frame: {}", &text[..text.len().min(200)]);
                }
            }
        }
    }
}

/// Phase 1 sender: takes window credits, sends one frame per credit (batched per flush).
async fn saturate(shared: Arc<Shared>, me: usize, mut tx: Tx, until: Instant) -> Tx {
    let n = shared.fps.len();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(me as u64);
    let mut seq = 0u64;
    while Instant::now() < until {
        let got = futures_lite::future::or(async { shared.credits.1.recv().await.is_ok() }, async {
            smol::Timer::at(until).await;
            false
        })
        .await;
        if !got {
            break;
        }
        let mut batch = 1;
        while batch < 16 && shared.credits.1.try_recv().is_ok() {
            batch += 1;
        }
        for _ in 0..batch {
            let to = (me + rng.random_range(1..n)) % n;
            seq += 1;
            if tx.feed(Message::text(frame(&shared, to, seq))).await.is_err() {
                return tx;
            }
            shared.sent.fetch_add(1, Ordering::Relaxed);
        }
        if tx.flush().await.is_err() {
            return tx;
        }
    }
    tx
}

/// Phase 2 sender: one pacer task per load-generator thread owns a group of clients and sends
/// each client's frame when it is due (every `period`, from a random offset): no per-client
/// timers or task wake-ups, so the generator's own overhead stays small. The timestamp is taken
/// when the frame is actually written.
async fn paced(shared: Arc<Shared>, group: Vec<(usize, Tx)>, period: Duration, start: Instant, until: Instant) -> Vec<(usize, Tx)> {
    let n = shared.fps.len();
    let mut group = group;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1_000_000 + group.first().map_or(0, |g| g.0) as u64);
    let mut due: Vec<Instant> = group
        .iter()
        .map(|_| start + Duration::from_nanos(rng.random_range(0..period.as_nanos().max(1) as u64)))
        .collect();
    let mut dead = vec![false; group.len()];
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        for (k, (me, tx)) in group.iter_mut().enumerate() {
            while !dead[k] && due[k] <= now && due[k] < until {
                let to = (*me + rng.random_range(1..n)) % n;
                if tx.send(Message::text(frame(&shared, to, 0))).await.is_err() {
                    dead[k] = true;
                }
                shared.sent.fetch_add(1, Ordering::Relaxed);
                due[k] += period;
            }
        }
        let next = due.iter().copied().min().unwrap_or(until).min(until);
        smol::Timer::at(next).await;
    }
    group
}

struct Paced {
    fraction: f64,
    target: f64,
    got: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
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

async fn wait_drained(shared: &Shared, max: Duration) {
    let deadline = Instant::now() + max;
    while Instant::now() < deadline
        && shared.delivered.load(Ordering::Relaxed) + shared.other.load(Ordering::Relaxed)
            < shared.sent.load(Ordering::Relaxed)
    {
        smol::Timer::after(Duration::from_millis(20)).await;
    }
}

fn run_against(pool: &Pool, threads: usize, server: &ChildServer, ids: &[Arc<peerlink::Identity>]) -> Results {
    let addr = server.addr.clone();
    let ex = pool.ex.clone();
    let ids = ids.to_vec();
    let measure = Duration::from_secs(env_or("BENCH_MEASURE_SECS", 5));
    let window = env_or("BENCH_WINDOW", 4000) as usize;
    let server_pid = server.pid();
    pool.block_on(async move {
        let n = ids.len();
        let t0 = Instant::now();
        let conns = {
            let addr = addr.clone();
            common::bounded(&ex, n, 200, move |i| {
                let (addr, id) = (addr.clone(), ids[i].clone());
                async move { common::connect_registered(&addr, &id, i as u64).await }
            })
            .await
        };
        eprintln!("relay_load[{}]: {n} clients registered in {:.2?}", addr, t0.elapsed());
        let (credit_tx, credit_rx) = async_channel::bounded(window);
        for _ in 0..window {
            credit_tx.try_send(()).unwrap();
        }
        let shared = Arc::new(Shared {
            base: Instant::now(),
            fps: conns.iter().map(|(_, fp)| fp.clone()).collect(),
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            other: AtomicU64::new(0),
            record: AtomicBool::new(false),
            hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()),
            credits: (credit_tx, credit_rx),
            windowed: AtomicBool::new(true),
            stop: AtomicBool::new(false),
        });
        let mut txs = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for (ws, _) in conns {
            let (tx, rx) = ws.split();
            txs.push(tx);
            receivers.push(ex.spawn(receiver(shared.clone(), rx)));
        }

        // Phase 1: saturation, closed loop.
        let warmup = Duration::from_secs(1);
        let start = Instant::now();
        let until = start + warmup + measure + Duration::from_millis(200);
        let tasks: Vec<_> = txs
            .into_iter()
            .enumerate()
            .map(|(i, tx)| ex.spawn(saturate(shared.clone(), i, tx, until)))
            .collect();
        smol::Timer::at(start + warmup).await;
        let (d0, t_a) = (shared.delivered.load(Ordering::Relaxed), Instant::now());
        let (s0, g0) = (common::cpu_secs(server_pid), common::cpu_secs(std::process::id()));
        smol::Timer::at(start + warmup + measure).await;
        let (d1, t_b) = (shared.delivered.load(Ordering::Relaxed), Instant::now());
        let (s1, g1) = (common::cpu_secs(server_pid), common::cpu_secs(std::process::id()));
        let max_rate = (d1 - d0) as f64 / (t_b - t_a).as_secs_f64();
        let secs = (t_b - t_a).as_secs_f64();
        let server_cores = (s1 - s0) / secs;
        let gen_cores = (g1 - g0) / secs;
        let mut txs = Vec::with_capacity(n);
        for t in tasks {
            txs.push(t.await);
        }
        shared.windowed.store(false, Ordering::Relaxed);
        wait_drained(&shared, Duration::from_secs(5)).await;
        let lost1 = shared.sent.load(Ordering::Relaxed) - shared.delivered.load(Ordering::Relaxed) - shared.other.load(Ordering::Relaxed);
        eprintln!("relay_load[{addr}]: phase 1: {max_rate:.0} delivered/s (sent {}, undelivered {lost1}); CPU: server {server_cores:.2} cores ({:.1} us/msg), load generator {gen_cores:.2} cores", shared.sent.load(Ordering::Relaxed), server_cores * 1e6 / max_rate.max(1.0));

        // Phase 2: paced at a fraction of the max rate (0.5 = the headline; more fractions from
        // BENCH_PACED_FRACTIONS, e.g. "0.5,0.25,0.1"), latency recorded after a warm-up.
        let fractions: Vec<f64> = std::env::var("BENCH_PACED_FRACTIONS")
            .unwrap_or_else(|_| "0.5".into())
            .split(',')
            .filter_map(|f| f.trim().parse().ok())
            .collect();
        let mut txs = txs;
        let mut paced_runs = Vec::new();
        let mut lost2 = 0;
        for fraction in fractions {
            let paced_target = max_rate * fraction;
            let period = Duration::from_secs_f64(n as f64 / paced_target.max(1.0));
            let start = Instant::now() + Duration::from_millis(100);
            let until = start + warmup + measure;
            let sent_before = shared.sent.load(Ordering::Relaxed);
            let del_before = shared.delivered.load(Ordering::Relaxed);
            let groups = threads.max(1);
            let mut grouped: Vec<Vec<(usize, Tx)>> = (0..groups).map(|_| Vec::new()).collect();
            for (i, tx) in txs.into_iter().enumerate() {
                grouped[i % groups].push((i, tx));
            }
            let tasks: Vec<_> = grouped
                .into_iter()
                .map(|g| ex.spawn(paced(shared.clone(), g, period, start, until)))
                .collect();
            smol::Timer::at(start + warmup).await;
            shared.hist.lock().unwrap().reset();
            shared.record.store(true, Ordering::Relaxed);
            let (d0, t_a) = (shared.delivered.load(Ordering::Relaxed), Instant::now());
            smol::Timer::at(until).await;
            let (d1, t_b) = (shared.delivered.load(Ordering::Relaxed), Instant::now());
            let mut back: Vec<(usize, Tx)> = Vec::with_capacity(n);
            for t in tasks {
                back.extend(t.await);
            }
            back.sort_by_key(|(i, _)| *i);
            txs = back.into_iter().map(|(_, tx)| tx).collect();
            wait_drained(&shared, Duration::from_secs(5)).await;
            shared.record.store(false, Ordering::Relaxed);
            let paced_rate = (d1 - d0) as f64 / (t_b - t_a).as_secs_f64();
            lost2 += (shared.sent.load(Ordering::Relaxed) - sent_before)
                .saturating_sub(shared.delivered.load(Ordering::Relaxed) - del_before);
            let h = shared.hist.lock().unwrap().clone();
            let us = |ns: u64| ns as f64 / 1000.0;
            let run = Paced {
                fraction,
                target: paced_target,
                got: paced_rate,
                p50_us: us(h.value_at_quantile(0.50)),
                p99_us: us(h.value_at_quantile(0.99)),
                p999_us: us(h.value_at_quantile(0.999)),
                max_us: us(h.max()),
            };
            eprintln!(
                "relay_load[{addr}]: paced x{fraction} @ {:.0}/s (got {:.0}/s): p50 {:.1} us p99 {:.1} us p99.9 {:.1} us max {:.1} us",
                run.target, run.got, run.p50_us, run.p99_us, run.p999_us, run.max_us
            );
            paced_runs.push(run);
        }

        // Tear down: close every client.
        shared.stop.store(true, Ordering::Relaxed);
        for mut tx in txs {
            let _ = tx.close(None).await;
        }
        for r in receivers {
            futures_lite::future::or(r, async {
                smol::Timer::after(Duration::from_millis(500)).await;
            })
            .await;
        }
        let head = paced_runs.first().expect("at least one paced fraction");
        Results {
            max_rate,
            paced_target: head.target,
            paced_rate: head.got,
            p50_us: head.p50_us,
            p99_us: head.p99_us,
            p999_us: head.p999_us,
            max_us: head.max_us,
            paced: paced_runs,
            other: shared.other.load(Ordering::Relaxed),
            lost: lost1 + lost2,
            server_cores,
            gen_cores,
        }
    })
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
    let threads = env_or("BENCH_CLIENT_THREADS", 2) as usize;
    println!("relay_load: {clients} clients, load generator on {threads} threads, RLIMIT_NOFILE {nofile}");
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("relay_load: loadavg at start: {}", l.trim());
    }
    let server_bin = common::peerlink_server_binary();
    let me = std::env::current_exe().unwrap();
    let ids = common::identities(clients);
    let pool = Pool::new(threads);

    // Baseline first, then peerlink-server, each in its own child process.
    let baseline = common::spawn_server("baseline-relay", &me, &["--baseline-server"]);
    let b = run_against(&pool, threads, &baseline, &ids);
    baseline.stop();
    report("baseline", &b);

    let extra = std::env::var("BENCH_SERVER_ARGS").unwrap_or_default();
    let mut args = vec!["--listen", "127.0.0.1:0", "--rate", "1000000", "--burst", "1000000", "--raise-nofile"];
    args.extend(extra.split_whitespace());
    let server = common::spawn_server("peerlink-server", &server_bin, &args);
    let p = run_against(&pool, threads, &server, &ids);
    server.stop();
    report("peerlink", &p);

    pool.shutdown();
    println!(
        "relay_load: RESULT peerlink max delivered {:.0} msg/s (goal >= 100000: {}), baseline {:.0} msg/s, ratio {:.3}",
        p.max_rate,
        if p.max_rate >= 100_000.0 { "MET" } else { "MISSED" },
        b.max_rate,
        p.max_rate / b.max_rate
    );
    println!(
        "relay_load: RESULT peerlink p50 {:.1} us p99 {:.1} us at {:.0}/s (goal p99 < 10 ms: {}), baseline p50 {:.1} us p99 {:.1} us at {:.0}/s, p99 ratio {:.3}",
        p.p50_us,
        p.p99_us,
        p.paced_rate,
        if p.p99_us < 10_000.0 { "MET" } else { "MISSED" },
        b.p50_us,
        b.p99_us,
        b.paced_rate,
        p.p99_us / b.p99_us
    );
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("relay_load: loadavg at end: {}", l.trim());
    }
}
