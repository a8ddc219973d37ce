//! The raw-protocol relay load generator of `relay_load` and `cluster_relay`: registered
//! clients over real WebSockets, each relaying to random other clients, a closed-loop
//! saturation phase ([`Load::saturate`]) and a paced latency phase ([`Load::paced`]).
//!
//! The load generator shares the cores with the server(s), so it is built to cost as little as
//! possible: each generator thread owns a share of the clients as non-blocking sockets with
//! synchronous tungstenite, waits on one `polling` (epoll) instance in level mode, and keeps
//! its own latency histogram (no task wake-ups, no cross-thread channels, no shared lock).
//! (An async generator with one task per client cost about 30 us of CPU per message and
//! saturated its core at a third of the rate it could offer.)
//!
//! Saturation: closed loop with a global window of messages in flight; delivered messages/s
//! over a measuring window after a warm-up. Paced: each client sends once per period from a
//! random offset; the payload carries the send time (nanoseconds since a shared `Instant` in
//! this process, taken when the frame is written); the receiver records `now - sent`.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use peerlink::protocol::{self, ClientMessage, ServerMessage};
use polling::{Event, Events, PollMode, Poller};
use rand::{Rng, SeedableRng};
use tungstenite::{Message, WebSocket};

const IDLE: u8 = 0;
const SATURATE: u8 = 1;
const PACED: u8 = 2;

/// What the main thread tells the generator threads, and what they count.
struct Shared {
    /// Names this load in log lines.
    label: String,
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
    let spin = super::pinned() && std::env::var("BENCH_SPIN").is_ok_and(|v| v == "1");
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
                                    eprintln!("{}: unexpected frame: {}", shared.label, &text[..text.len().min(200)]);
                                }
                            }
                        }
                    }
                    Ok(Message::Close(frame)) => {
                        if !shared.stop.load(Ordering::Relaxed) {
                            eprintln!("{}: connection closed by server: {frame:?}", shared.label);
                        }
                        shared.closed.fetch_add(1, Ordering::Relaxed);
                        c.dead = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        if !shared.stop.load(Ordering::Relaxed) {
                            eprintln!("{}: read failed: {e}", shared.label);
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

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()
}

/// CPU seconds used so far by each of `pids`, then by this process (the generator) last.
fn cpu_now(pids: &[u32]) -> Vec<f64> {
    pids.iter().copied().chain([std::process::id()]).map(super::cpu_secs).collect()
}

/// Cores used by each of `pids` and the generator between two [`cpu_now`] samples.
fn cores(before: &[f64], after: &[f64], secs: f64) -> (Vec<f64>, f64) {
    let mut cores: Vec<f64> = before.iter().zip(after).map(|(a, b)| (b - a) / secs).collect();
    let generator = cores.pop().unwrap_or(0.0);
    (cores, generator)
}

/// What a saturation phase measured.
pub struct Saturation {
    /// Delivered relays per second over the measuring window.
    pub rate: f64,
    /// Relays sent in the whole phase (warm-up included), and how many of them did not arrive.
    pub sent: u64,
    pub undelivered: u64,
    /// Cores used by each watched process (in the order given) over the measuring window.
    pub cores: Vec<f64>,
    /// Cores used by this process (the load generator).
    pub gen_cores: f64,
}

/// What a paced phase measured.
pub struct Paced {
    /// The rate asked for and the delivered rate over the measuring window.
    pub target: f64,
    pub got: f64,
    /// Relay latency in nanoseconds, over the measuring window.
    pub hist: Histogram<u64>,
    pub undelivered: u64,
    pub cores: Vec<f64>,
    pub gen_cores: f64,
}

/// Microseconds at quantile `q` of a latency histogram in nanoseconds.
pub fn quantile_us(hist: &Histogram<u64>, q: f64) -> f64 {
    hist.value_at_quantile(q) as f64 / 1000.0
}

/// A running load: registered clients and their generator threads, idle between phases.
pub struct Load {
    shared: Arc<Shared>,
    hists: Vec<Arc<Mutex<Histogram<u64>>>>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    /// Registers one client per identity, client `i` on `addrs[i % addrs.len()]`, shared among
    /// `threads` generator threads (registration in parallel), and starts them idle.
    pub fn start(label: &str, addrs: &[String], ids: &[Arc<peerlink::Identity>], threads: usize) -> Load {
        let n = ids.len();
        let threads = threads.clamp(1, n);
        let shared = Arc::new(Shared {
            label: label.to_owned(),
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
        let t0 = Instant::now();
        let hists: Vec<Arc<Mutex<Histogram<u64>>>> = (0..threads).map(|_| Arc::new(Mutex::new(new_hist()))).collect();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (shared, hist, ready) = (shared.clone(), hists[t].clone(), ready_tx.clone());
                let mine: Vec<(usize, String, Arc<peerlink::Identity>)> = ids
                    .iter()
                    .cloned()
                    .enumerate()
                    .filter(|(i, _)| i % threads == t)
                    .map(|(i, id)| (i, addrs[i % addrs.len()].clone(), id))
                    .collect();
                std::thread::spawn(move || {
                    let clients = mine
                        .into_iter()
                        .map(|(idx, addr, id)| Client {
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
        eprintln!("{label}: {n} clients registered on {} server(s) in {:.2?}", addrs.len(), t0.elapsed());
        Load { shared, hists, workers }
    }

    fn counts(&self) -> (u64, u64, u64) {
        let s = &self.shared;
        (s.sent.load(Ordering::Relaxed), s.delivered.load(Ordering::Relaxed), s.other.load(Ordering::Relaxed))
    }

    /// Relays sent since `before` (a [`Load::counts`]) that were neither delivered nor answered.
    fn undelivered_since(&self, before: (u64, u64, u64)) -> u64 {
        let (s, d, o) = self.counts();
        (s - before.0).saturating_sub((d - before.1) + (o - before.2))
    }

    /// Closed loop with `window` relays in flight: delivered relays/s over `measure` after
    /// `warmup`; CPU of `pids` (and of this process) over the same window. Waits (up to 5 s)
    /// for what is in flight before returning.
    pub fn saturate(&self, window: i64, warmup: Duration, measure: Duration, pids: &[u32]) -> Saturation {
        let shared = &self.shared;
        let before = self.counts();
        shared.credits.store(window, Ordering::Relaxed);
        shared.mode.store(SATURATE, Ordering::Relaxed);
        let start = Instant::now();
        sleep_until(start + warmup);
        let (d0, t_a, c0) = (shared.delivered.load(Ordering::Relaxed), Instant::now(), cpu_now(pids));
        sleep_until(start + warmup + measure);
        let (d1, t_b, c1) = (shared.delivered.load(Ordering::Relaxed), Instant::now(), cpu_now(pids));
        shared.mode.store(IDLE, Ordering::Relaxed);
        let secs = (t_b - t_a).as_secs_f64();
        wait_drained(shared, Duration::from_secs(5));
        shared.credits.store(0, Ordering::Relaxed);
        let (cores, gen_cores) = cores(&c0, &c1, secs);
        Saturation {
            rate: (d1 - d0) as f64 / secs,
            sent: self.counts().0 - before.0,
            undelivered: self.undelivered_since(before),
            cores,
            gen_cores,
        }
    }

    /// Paced at `target` relays/s (each client once per period, from a random offset): latency
    /// recorded over `measure` after `warmup`; CPU of `pids` (and of this process) likewise.
    pub fn paced(&self, target: f64, warmup: Duration, measure: Duration, pids: &[u32]) -> Paced {
        let shared = &self.shared;
        let before = self.counts();
        let period = Duration::from_secs_f64(shared.fps.len() as f64 / target.max(1.0));
        let start = Instant::now() + Duration::from_millis(100);
        let until = start + warmup + measure;
        shared.period_ns.store(period.as_nanos() as u64, Ordering::Relaxed);
        shared.start_ns.store((start - shared.base).as_nanos() as u64, Ordering::Relaxed);
        shared.until_ns.store((until - shared.base).as_nanos() as u64, Ordering::Relaxed);
        shared.epoch.fetch_add(1, Ordering::Relaxed);
        shared.mode.store(PACED, Ordering::Relaxed);
        sleep_until(start + warmup);
        for h in &self.hists {
            h.lock().unwrap().reset();
        }
        shared.record.store(true, Ordering::Relaxed);
        let (d0, t_a, c0) = (shared.delivered.load(Ordering::Relaxed), Instant::now(), cpu_now(pids));
        sleep_until(until);
        let (d1, t_b, c1) = (shared.delivered.load(Ordering::Relaxed), Instant::now(), cpu_now(pids));
        let secs = (t_b - t_a).as_secs_f64();
        shared.mode.store(IDLE, Ordering::Relaxed);
        wait_drained(shared, Duration::from_secs(5));
        shared.record.store(false, Ordering::Relaxed);
        let mut hist = new_hist();
        for t in &self.hists {
            hist.add(&*t.lock().unwrap()).unwrap();
        }
        let (cores, gen_cores) = cores(&c0, &c1, secs);
        Paced { target, got: (d1 - d0) as f64 / secs, hist, undelivered: self.undelivered_since(before), cores, gen_cores }
    }

    /// Frames received that were not relays (errors, notices) so far.
    pub fn other(&self) -> u64 {
        self.shared.other.load(Ordering::Relaxed)
    }

    /// Relays sent so far.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Stops the generator threads (each closes its clients); returns how many connections the
    /// server closed during the run.
    pub fn stop(self) -> u64 {
        self.shared.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            let _ = w.join();
        }
        self.shared.closed.load(Ordering::Relaxed)
    }
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
