//! Network relay benchmark (harness = false): `CLIENTS` registered raw-protocol clients over
//! real WebSockets on 127.0.0.1, each relaying to random other clients, against
//!   * the real `peerlink-server` binary (a child process), and
//!   * a baseline: a minimal async-tungstenite relay (this bench binary re-invoked with
//!     `--baseline-server`: fingerprint -> connection HashMap, frames forwarded verbatim, only
//!     `to` extracted with serde_json, no rate limits).
//!
//! The load generator shares the 2 cores with the server, so it is built to cost as little as
//! possible: each generator thread owns a share of the clients as non-blocking sockets with
//! synchronous tungstenite, waits on one `polling` (epoll) instance in level mode, and keeps
//! its own latency histogram (no task wake-ups, no cross-thread channels, no shared lock).
//! (An async generator with one task per client cost about 30 us of CPU per message and
//! saturated its core at a third of the rate it could offer.)
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

use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ChildServer;
use hdrhistogram::Histogram;
use peerlink::protocol::{self, ClientMessage, ServerMessage};
use polling::{Event, Events, PollMode, Poller};
use rand::{Rng, SeedableRng};
use tungstenite::{Message, WebSocket};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

const IDLE: u8 = 0;
const SATURATE: u8 = 1;
const PACED: u8 = 2;

/// What the main thread tells the generator threads, and what they count.
struct Shared {
    base: Instant,
    fps: Vec<String>,
    mode: AtomicU8,
    /// Bumped whenever a paced phase starts, so threads pick new offsets.
    epoch: AtomicU64,
    /// Paced phase: period and first/last send times, in ns since `base`.
    period_ns: AtomicU64,
    start_ns: AtomicU64,
    until_ns: AtomicU64,
    /// Saturation: window credits (one per message allowed in flight).
    credits: AtomicI64,
    sent: AtomicU64,
    delivered: AtomicU64,
    other: AtomicU64,
    closed: AtomicU64,
    record: AtomicBool,
    stop: AtomicBool,
}

impl Shared {
    fn ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

const PAD: &str = "candidate:1 1 UDP 2122252543 192.168.1.77 50000 typ host generation 0";

fn frame(shared: &Shared, to: usize, seq: u64) -> String {
    let t = shared.ns();
    format!(r#"{{"type":"relay","to":"{}","payload":{{"t":{t},"n":{seq},"c":"{PAD}"}}}}"#, shared.fps[to])
}

fn sent_time(text: &str) -> Option<u64> {
    let i = text.find("\"t\":")? + 4;
    let digits = text[i..].bytes().take_while(u8::is_ascii_digit).count();
    text[i..i + digits].parse().ok()
}

/// One client: a registered WebSocket on a non-blocking socket.
/// A TCP stream that, once non-blocking, answers the read after a short read with
/// `WouldBlock` without a system call: the socket was empty, and (level-triggered) epoll reports
/// any data that arrives later. Saves one `recv` per received frame.
struct Sock {
    tcp: TcpStream,
    nonblocking: bool,
    drained: bool,
}

impl std::io::Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.drained {
            self.drained = false;
            return Err(ErrorKind::WouldBlock.into());
        }
        let n = std::io::Read::read(&mut self.tcp, buf)?;
        self.drained = self.nonblocking && n > 0 && n < buf.len();
        Ok(n)
    }
}

impl std::io::Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::Write::write(&mut self.tcp, buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(&mut self.tcp)
    }
}

struct Client {
    idx: usize,
    ws: WebSocket<Sock>,
    /// Unflushed bytes are buffered in tungstenite; we wait for writability.
    blocked: bool,
    dirty: bool,
    dead: bool,
}

/// Connects and registers `identity` for real (blocking), then makes the socket non-blocking.
fn connect_registered(addr: &str, identity: &peerlink::Identity, seed: u64) -> WebSocket<Sock> {
    let mut last = None;
    for attempt in 0..20u64 {
        match TcpStream::connect(addr) {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                // tungstenite zero-fills its whole read buffer before every read: the default
                // 128 KiB made that 40% of the generator's CPU.
                let mut config = tungstenite::protocol::WebSocketConfig::default();
                config.read_buffer_size = 4 * 1024;
                let sock = Sock { tcp, nonblocking: false, drained: false };
                match tungstenite::client::client_with_config(format!("ws://{addr}/"), sock, Some(config)) {
                    Ok((mut ws, _)) => {
                        register(&mut ws, identity, seed);
                        ws.get_ref().tcp.set_nonblocking(true).expect("set_nonblocking");
                        ws.get_mut().nonblocking = true;
                        return ws;
                    }
                    Err(e) => last = Some(e.to_string()),
                }
            }
            Err(e) => last = Some(e.to_string()),
        }
        std::thread::sleep(Duration::from_millis(50 * (attempt + 1)));
    }
    panic!("could not connect to {addr}: {last:?}");
}

fn next_text(ws: &mut WebSocket<Sock>) -> String {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return t.as_str().to_owned(),
            Ok(Message::Close(c)) => panic!("closed by server: {c:?}"),
            Ok(_) => continue,
            Err(e) => panic!("websocket error: {e}"),
        }
    }
}

fn register(ws: &mut WebSocket<Sock>, identity: &peerlink::Identity, seed: u64) {
    let text = next_text(ws);
    let Ok(ServerMessage::Challenge { server_id, nonce, .. }) = protocol::decode_server(&text) else {
        panic!("expected a challenge, got {text}");
    };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let reg = ClientMessage::register(1, identity, &mut rng, &server_id, &nonce, "bench", None, None).encode();
    ws.send(Message::text(reg)).expect("send register");
    loop {
        let text = next_text(ws);
        match protocol::decode_server(&text) {
            Ok(ServerMessage::Registered { fingerprint, .. }) => {
                assert_eq!(fingerprint, identity.fingerprint());
                return;
            }
            Ok(ServerMessage::Error { code, message, .. }) => panic!("register failed: {code}: {message}"),
            _ => continue,
        }
    }
}

/// One generator thread: owns `clients`, drives reads, saturating sends and paced sends.
fn generator(shared: Arc<Shared>, mut clients: Vec<Client>, hist: Arc<Mutex<Histogram<u64>>>, thread: u64) {
    let n = shared.fps.len();
    let poller = Poller::new().expect("poller");
    for (k, c) in clients.iter().enumerate() {
        // SAFETY: every socket is deleted from the poller before it is dropped (below).
        unsafe { poller.add_with_mode(&c.ws.get_ref().tcp, Event::readable(k), PollMode::Level) }.expect("poller add");
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed + thread);
    let mut events = Events::new();
    let mut seq = 0u64;
    // Paced schedule: clients in order of their offset; `cursor` walks round after round.
    let mut epoch = 0;
    let mut order: Vec<(u64, usize)> = Vec::new();
    let mut cursor = 0usize;
    let mut round = 0u64;
    let mut dirty: Vec<usize> = Vec::new();
    let mut shown = 0;
    let spin = common::pinned() && std::env::var("BENCH_SPIN").is_ok_and(|v| v == "1");
    while !shared.stop.load(Ordering::Relaxed) {
        let mode = shared.mode.load(Ordering::Relaxed);
        if mode == PACED {
            let e = shared.epoch.load(Ordering::Relaxed);
            if e != epoch {
                // A new paced phase: fresh random offsets within the period.
                epoch = e;
                let period = shared.period_ns.load(Ordering::Relaxed).max(1);
                order = (0..clients.len()).map(|k| (rng.random_range(0..period), k)).collect();
                order.sort_unstable();
                cursor = 0;
                round = 0;
            }
        }
        let now = shared.ns();
        let timeout = match mode {
            SATURATE if shared.credits.load(Ordering::Relaxed) > 0 => Duration::ZERO,
            SATURATE => Duration::from_micros(200),
            PACED if !order.is_empty() => {
                let period = shared.period_ns.load(Ordering::Relaxed);
                let due = shared.start_ns.load(Ordering::Relaxed) + order[cursor].0 + round * period;
                // Sends are grouped into ticks of at least 100 us: cheaper than one wake per send.
                Duration::from_nanos(due.saturating_sub(now).max(100_000))
            }
            _ => Duration::from_millis(5),
        };
        // BENCH_SPIN=1: pinned to a core of its own, the generator busy-polls, so the server's
        // sends find it running instead of having to wake it (a cross-CPU wake-up is costly in
        // a VM).
        let timeout = if spin { Duration::ZERO } else { timeout };
        events.clear();
        match poller.wait(&mut events, Some(timeout)) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("poll: {e}"),
        }
        for ev in events.iter() {
            let c = &mut clients[ev.key];
            if ev.writable && c.blocked {
                match c.ws.flush() {
                    Ok(()) => {
                        c.blocked = false;
                        let _ = poller.modify_with_mode(&c.ws.get_ref().tcp, Event::readable(ev.key), PollMode::Level);
                    }
                    Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => c.dead = true,
                }
            }
            if !ev.readable || c.dead {
                continue;
            }
            loop {
                match c.ws.read() {
                    Ok(Message::Text(text)) => {
                        let text = text.as_str();
                        match sent_time(text) {
                            Some(t) if text.contains("\"relay\"") => {
                                shared.delivered.fetch_add(1, Ordering::Relaxed);
                                if mode == SATURATE {
                                    shared.credits.fetch_add(1, Ordering::Relaxed);
                                }
                                if shared.record.load(Ordering::Relaxed) {
                                    let _ = hist.lock().unwrap().record(shared.ns().saturating_sub(t).max(1));
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
                    Ok(Message::Close(frame)) => {
                        if !shared.stop.load(Ordering::Relaxed) {
                            eprintln!("relay_load: connection closed by server: {frame:?}");
                        }
                        shared.closed.fetch_add(1, Ordering::Relaxed);
                        c.dead = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        if !shared.stop.load(Ordering::Relaxed) {
                            eprintln!("relay_load: read failed: {e}");
                        }
                        c.dead = true;
                        break;
                    }
                }
            }
        }
        let write = |c: &mut Client, text: String, dirty: &mut Vec<usize>, k: usize| {
            if c.dead {
                return false;
            }
            match c.ws.write(Message::text(text)) {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {
                    c.dead = true;
                    return false;
                }
            }
            if !c.dirty {
                c.dirty = true;
                dirty.push(k);
            }
            true
        };
        match mode {
            SATURATE => {
                // Take up to 64 credits; they become bursts of up to 16 frames from random local
                // clients (one flush per burst), to random targets.
                let mut take = 0;
                let mut have = shared.credits.load(Ordering::Relaxed);
                while have > 0 {
                    let want = have.min(64);
                    match shared.credits.compare_exchange_weak(have, have - want, Ordering::Relaxed, Ordering::Relaxed) {
                        Ok(_) => {
                            take = want;
                            break;
                        }
                        Err(now) => have = now,
                    }
                }
                let mut burst = 0;
                let mut k = 0;
                for _ in 0..take {
                    if burst == 0 {
                        k = rng.random_range(0..clients.len());
                        burst = 16;
                    }
                    burst -= 1;
                    let me = clients[k].idx;
                    let to = (me + rng.random_range(1..n)) % n;
                    seq += 1;
                    if write(&mut clients[k], frame(&shared, to, seq), &mut dirty, k) {
                        shared.sent.fetch_add(1, Ordering::Relaxed);
                    } else {
                        // A dead client's credit goes back.
                        shared.credits.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            PACED => {
                let period = shared.period_ns.load(Ordering::Relaxed).max(1);
                let start = shared.start_ns.load(Ordering::Relaxed);
                let until = shared.until_ns.load(Ordering::Relaxed);
                loop {
                    let (offset, k) = order[cursor];
                    let due = start + offset + round * period;
                    if due > shared.ns() || due >= until {
                        break;
                    }
                    let me = clients[k].idx;
                    let to = (me + rng.random_range(1..n)) % n;
                    if write(&mut clients[k], frame(&shared, to, 0), &mut dirty, k) {
                        shared.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    cursor += 1;
                    if cursor == order.len() {
                        cursor = 0;
                        round += 1;
                    }
                }
            }
            _ => {}
        }
        for k in dirty.drain(..) {
            let c = &mut clients[k];
            c.dirty = false;
            if c.dead || c.blocked {
                continue;
            }
            match c.ws.flush() {
                Ok(()) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => {
                    c.blocked = true;
                    let _ = poller.modify_with_mode(&c.ws.get_ref().tcp, Event::all(k), PollMode::Level);
                }
                Err(_) => c.dead = true,
            }
        }
    }
    // Tear down: a close frame for each (best effort), then drop the sockets.
    for c in &mut clients {
        let _ = poller.delete(&c.ws.get_ref().tcp);
        let _ = c.ws.get_ref().tcp.set_nonblocking(false);
        c.ws.get_mut().nonblocking = false;
        let _ = c.ws.get_ref().tcp.set_write_timeout(Some(Duration::from_millis(200)));
        let _ = c.ws.close(None);
        let _ = c.ws.flush();
    }
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

fn wait_drained(shared: &Shared, max: Duration) {
    let deadline = Instant::now() + max;
    while Instant::now() < deadline
        && shared.delivered.load(Ordering::Relaxed) + shared.other.load(Ordering::Relaxed)
            < shared.sent.load(Ordering::Relaxed)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

fn run_against(threads: usize, server: &ChildServer, ids: &[Arc<peerlink::Identity>]) -> Results {
    let addr = server.addr.clone();
    let measure = Duration::from_secs(env_or("BENCH_MEASURE_SECS", 5));
    let window = env_or("BENCH_WINDOW", 4000) as i64;
    let server_pid = server.pid();
    let n = ids.len();
    let threads = threads.clamp(1, n);
    let shared = Arc::new(Shared {
        base: Instant::now(),
        fps: ids.iter().map(|id| id.fingerprint().to_string()).collect(),
        mode: AtomicU8::new(IDLE),
        epoch: AtomicU64::new(0),
        period_ns: AtomicU64::new(1),
        start_ns: AtomicU64::new(0),
        until_ns: AtomicU64::new(0),
        credits: AtomicI64::new(0),
        sent: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        other: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        record: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });

    // Register every client for real (each thread its share, in parallel), then start the
    // event loops.
    let t0 = Instant::now();
    let hists: Vec<Arc<Mutex<Histogram<u64>>>> =
        (0..threads).map(|_| Arc::new(Mutex::new(Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()))).collect();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (shared, hist, addr, ready) = (shared.clone(), hists[t].clone(), addr.clone(), ready_tx.clone());
            let mine: Vec<(usize, Arc<peerlink::Identity>)> =
                ids.iter().cloned().enumerate().filter(|(i, _)| i % threads == t).collect();
            std::thread::spawn(move || {
                let clients = mine
                    .into_iter()
                    .map(|(idx, id)| Client {
                        idx,
                        ws: connect_registered(&addr, &id, idx as u64),
                        blocked: false,
                        dirty: false,
                        dead: false,
                    })
                    .collect();
                let _ = ready.send(());
                generator(shared, clients, hist, t as u64);
            })
        })
        .collect();
    for _ in 0..threads {
        ready_rx.recv().expect("a generator thread failed to register its clients");
    }
    eprintln!("relay_load[{addr}]: {n} clients registered in {:.2?}", t0.elapsed());

    // Phase 1: saturation, closed loop.
    let warmup = Duration::from_secs(1);
    shared.credits.store(window, Ordering::Relaxed);
    shared.mode.store(SATURATE, Ordering::Relaxed);
    let start = Instant::now();
    sleep_until(start + warmup);
    let (d0, t_a) = (shared.delivered.load(Ordering::Relaxed), Instant::now());
    let (s0, g0) = (common::cpu_secs(server_pid), common::cpu_secs(std::process::id()));
    sleep_until(start + warmup + measure);
    let (d1, t_b) = (shared.delivered.load(Ordering::Relaxed), Instant::now());
    let (s1, g1) = (common::cpu_secs(server_pid), common::cpu_secs(std::process::id()));
    shared.mode.store(IDLE, Ordering::Relaxed);
    let max_rate = (d1 - d0) as f64 / (t_b - t_a).as_secs_f64();
    let secs = (t_b - t_a).as_secs_f64();
    let server_cores = (s1 - s0) / secs;
    let gen_cores = (g1 - g0) / secs;
    wait_drained(&shared, Duration::from_secs(5));
    let lost1 = shared.sent.load(Ordering::Relaxed) - shared.delivered.load(Ordering::Relaxed) - shared.other.load(Ordering::Relaxed);
    eprintln!(
        "relay_load[{addr}]: phase 1: {max_rate:.0} delivered/s (sent {}, undelivered {lost1}); CPU: server {server_cores:.2} cores ({:.1} us/msg), load generator {gen_cores:.2} cores",
        shared.sent.load(Ordering::Relaxed),
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
        let period = Duration::from_secs_f64(n as f64 / paced_target.max(1.0));
        let start = Instant::now() + Duration::from_millis(100);
        let until = start + warmup + measure;
        let sent_before = shared.sent.load(Ordering::Relaxed);
        let del_before = shared.delivered.load(Ordering::Relaxed);
        shared.period_ns.store(period.as_nanos() as u64, Ordering::Relaxed);
        shared.start_ns.store((start - shared.base).as_nanos() as u64, Ordering::Relaxed);
        shared.until_ns.store((until - shared.base).as_nanos() as u64, Ordering::Relaxed);
        shared.epoch.fetch_add(1, Ordering::Relaxed);
        shared.mode.store(PACED, Ordering::Relaxed);
        sleep_until(start + warmup);
        for h in &hists {
            h.lock().unwrap().reset();
        }
        shared.record.store(true, Ordering::Relaxed);
        let (d0, t_a) = (shared.delivered.load(Ordering::Relaxed), Instant::now());
        let (s0, g0) = (common::cpu_secs(server_pid), common::cpu_secs(std::process::id()));
        sleep_until(until);
        let (d1, t_b) = (shared.delivered.load(Ordering::Relaxed), Instant::now());
        let (s1, g1) = (common::cpu_secs(server_pid), common::cpu_secs(std::process::id()));
        let secs = (t_b - t_a).as_secs_f64();
        shared.mode.store(IDLE, Ordering::Relaxed);
        wait_drained(&shared, Duration::from_secs(5));
        shared.record.store(false, Ordering::Relaxed);
        let paced_rate = (d1 - d0) as f64 / secs;
        lost2 += (shared.sent.load(Ordering::Relaxed) - sent_before)
            .saturating_sub(shared.delivered.load(Ordering::Relaxed) - del_before);
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        for t in &hists {
            h.add(&*t.lock().unwrap()).unwrap();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        let run = Paced {
            fraction,
            target: paced_target,
            got: paced_rate,
            p50_us: us(h.value_at_quantile(0.50)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            server_cores: (s1 - s0) / secs,
            gen_cores: (g1 - g0) / secs,
        };
        eprintln!(
            "relay_load[{addr}]: paced x{fraction:.2} @ {:.0}/s (got {:.0}/s): p50 {:.1} us p99 {:.1} us p99.9 {:.1} us max {:.1} us; CPU: server {:.2} cores, load generator {:.2} cores",
            run.target, run.got, run.p50_us, run.p99_us, run.p999_us, run.max_us, run.server_cores, run.gen_cores
        );
        paced_runs.push(run);
    }

    // Tear down: every generator thread closes its clients.
    shared.stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let closed = shared.closed.load(Ordering::Relaxed);
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
        other: shared.other.load(Ordering::Relaxed),
        lost: lost1 + lost2,
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
