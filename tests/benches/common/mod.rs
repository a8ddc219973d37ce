//! Shared pieces of the network benchmarks: child-process servers (the real `peerlink-server`
//! and the bench binary re-invoked as a minimal async-tungstenite baseline), a raw protocol
//! client that registers for real, RLIMIT_NOFILE, VmRSS, and a small multi-threaded executor.
#![allow(dead_code)]

pub mod measure;
pub mod nodes;
pub mod redis;
pub mod relay_gen;
pub mod throughput;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message;
use futures_util::{SinkExt, StreamExt};
use peerlink::identity::{Identity, PublicKey};
use peerlink::protocol::{self, ClientMessage, ServerMessage};
use smol::net::TcpStream;

/// A client WebSocket over smol's TCP stream.
pub type Ws = WebSocketStream<TcpStream>;

/// Raises this process's soft RLIMIT_NOFILE to its hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: plain libc calls on a stack-allocated struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

/// Unless BENCH_PIN=0 (or the machine has fewer than 2 CPUs): server and load generator each
/// get a core of their own (server on CPU 0, the generator on CPU 1), so neither's queueing
/// shows up in the other's figures.
pub fn pinned() -> bool {
    // Decided once: after `pin_generator`, `available_parallelism` (which follows this
    // process's affinity) says 1.
    *PINNED.get_or_init(|| {
        cpus() >= 2 && std::env::var("BENCH_PIN").map_or(true, |v| v != "0")
    })
}

static PINNED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Turns pinning off for this run whatever BENCH_PIN says (for a bench whose processes are
/// more than two and share the cores); call it before anything asks [`pinned`].
pub fn never_pin() {
    let _ = PINNED.set(false);
}

/// The machine's CPUs, counted before anything was pinned.
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Pins the calling thread to `cpu` (modulo the CPUs) when [`pinned`]: the two ends of a
/// benchmark each get a core of their own, alike in every configuration.
pub fn pin_thread(cpu: usize) {
    if !pinned() {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % cpus(), &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("BENCH_PIN: sched_setaffinity failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// The median of `v` (`None` when empty).
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Pins this process (threads created from now on) to CPU 1 when [`pinned`].
pub fn pin_generator() {
    if !pinned() {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity on our own thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(1, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("BENCH_PIN: sched_setaffinity failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// VmRSS of a process, in bytes.
pub fn vm_rss(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:") * 1024
}

/// VmHWM (peak resident set) of a process, in bytes.
pub fn vm_hwm(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:") * 1024
}

/// A `kB` field of /proc/PID/status.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} line"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("bad {field} value"))
}

/// A blocking-adapter node with UDP on loopback and `peer`'s settings, registered with the
/// signaling server at `url` (up to 10 s).
pub fn registered_node(url: &str, peer: &peerlink::PeerConfig) -> Result<peerlink_blocking::PollNode, BenchError> {
    let mut config = peerlink::NodeConfig::new(url);
    config.peer = peer.clone();
    ready_node(config)
}

/// A blocking-adapter node with UDP on loopback and `config`, registered with its signaling
/// server and, when `config` names TURN servers, holding an allocation (up to 10 s).
pub fn ready_node(config: peerlink::NodeConfig) -> Result<peerlink_blocking::PollNode, BenchError> {
    use peerlink::NodeEvent;
    use peerlink::turn::TurnEvent;
    let mut allocated = config.turn_servers().is_empty();
    let options = peerlink_blocking::PollOptions { udp: peerlink_blocking::UdpBind::Loopback, ..Default::default() };
    let mut node = peerlink_blocking::PollNode::new(config, options)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(node.is_registered() && allocated) {
        if Instant::now() >= deadline {
            return Err(if allocated { "not registered" } else { "no TURN allocation" }.into());
        }
        match node.next_event(Duration::from_millis(20))? {
            Some(NodeEvent::Turn { event: TurnEvent::Allocated { .. }, .. }) => allocated = true,
            Some(NodeEvent::Turn { event: TurnEvent::Failed { error }, server, .. }) => {
                return Err(format!("TURN allocation on {server} failed: {error}").into());
            }
            _ => {}
        }
    }
    Ok(node)
}

/// CPU time (user + system) a process has used so far, in seconds (from /proc/PID/stat).
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

/// A server running as a child process of the bench.
pub struct ChildServer {
    pub name: &'static str,
    pub child: Child,
    pub addr: String,
    pub log: PathBuf,
}

impl ChildServer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM to this child (by PID) and waits for it; SIGKILL after 10 s.
    pub fn stop(mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child by its PID.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    eprintln!("{}: did not exit after SIGTERM; killing pid {pid}", self.name);
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
            }
        }
    }
}

/// A server left running when its `ChildServer` goes (a panic before `stop`) is killed by its
/// PID and reaped.
impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Spawns `program args`, waits for its `listening on ws://ADDR` line and returns it.
/// When [`pinned`], the server runs under `taskset -c 0` (see [`pin_generator`]).
pub fn spawn_server(name: &'static str, program: &std::path::Path, args: &[&str]) -> ChildServer {
    let log = std::env::temp_dir().join(format!("peerlink-bench-{name}-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log).expect("create server log");
    let mut command = if pinned() {
        let mut c = Command::new("taskset");
        c.args(["-c", "0"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .env("RUST_LOG", std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut tx = Some(tx);
        while let Some(Ok(line)) = lines.next() {
            if let Some(addr) = line.trim().strip_prefix("listening on ws://")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(addr.to_owned());
            }
            // Keep draining so the child never blocks on a full pipe.
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => addr,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} did not print `listening on ws://ADDR` (log: {})", log.display());
        }
    };
    ChildServer { name, child, addr, log }
}

/// The `peerlink-server` binary next to this bench (target/release). Runs
/// `cargo build --release -p peerlink-server` first (a no-op when it is up to date) so the
/// binary matches the source; if that build fails an existing binary is used with a warning.
/// BENCH_NO_BUILD=1 skips the build.
pub fn peerlink_server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/release/deps/<bench>-<hash> -> target/release/peerlink-server
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir").to_path_buf();
    let bin = dir.join("peerlink-server");
    if std::env::var_os("BENCH_NO_BUILD").is_none() || !bin.exists() {
        eprintln!("cargo build --release -p peerlink-server ...");
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "--release", "-p", "peerlink-server", "--manifest-path"])
            .arg(&manifest)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(bin.exists(), "cargo build --release -p peerlink-server failed and no binary exists");
            eprintln!("WARNING: building peerlink-server failed; using the existing {}", bin.display());
        }
    }
    assert!(bin.exists(), "{} missing after build", bin.display());
    if let Ok(m) = std::fs::metadata(&bin).and_then(|m| m.modified()) {
        let age = m.elapsed().unwrap_or_default().as_secs();
        println!("using {} (built {age} s ago)", bin.display());
    }
    bin
}

/// A small multi-threaded smol executor.
pub struct Pool {
    pub ex: Arc<smol::Executor<'static>>,
    stop: async_channel::Sender<()>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pool {
    pub fn new(threads: usize) -> Self {
        let ex = Arc::new(smol::Executor::new());
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let threads = (0..threads.max(1))
            .map(|_| {
                let ex = ex.clone();
                let stopped = stopped.clone();
                std::thread::spawn(move || {
                    let _ = smol::block_on(ex.run(stopped.recv()));
                })
            })
            .collect();
        Pool { ex, stop, threads }
    }

    pub fn block_on<T: Send + 'static>(&self, fut: impl std::future::Future<Output = T> + Send + 'static) -> T {
        smol::block_on(self.ex.spawn(fut))
    }

    pub fn shutdown(self) {
        self.stop.close();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Runs `count` jobs `f(i)` with at most `in_flight` at once; returns the results in order.
pub async fn bounded<T, F, Fut>(ex: &Arc<smol::Executor<'static>>, count: usize, in_flight: usize, f: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<Option<T>>>> = Arc::new(Mutex::new((0..count).map(|_| None).collect()));
    let f = Arc::new(f);
    let workers: Vec<_> = (0..in_flight.min(count).max(1))
        .map(|_| {
            let (next, results, f) = (next.clone(), results.clone(), f.clone());
            ex.spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let r = f(i).await;
                    results.lock().unwrap()[i] = Some(r);
                }
            })
        })
        .collect();
    for w in workers {
        w.await;
    }
    let mut results = results.lock().unwrap();
    results.drain(..).map(|r| r.expect("every job ran")).collect()
}

/// Opens a WebSocket to `addr` (with TCP_NODELAY); retries a few times on connect errors.
pub async fn open(addr: &str) -> Ws {
    let mut last = None;
    for attempt in 0..20 {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                match async_tungstenite::client_async(format!("ws://{addr}/"), tcp).await {
                    Ok((ws, _)) => return ws,
                    Err(e) => last = Some(e.to_string()),
                }
            }
            Err(e) => last = Some(e.to_string()),
        }
        smol::Timer::after(Duration::from_millis(50 * (attempt + 1))).await;
    }
    panic!("could not connect to {addr}: {last:?}");
}

async fn next_text(ws: &mut Ws) -> String {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return t.as_str().to_owned(),
            Some(Ok(Message::Close(c))) => panic!("closed by server: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("websocket error: {e}"),
            None => panic!("connection ended"),
        }
    }
}

/// Connects and registers `identity` for real: challenge -> signed `register` -> `registered`.
/// Returns the socket and the fingerprint the server assigned (as hex).
pub async fn connect_registered(addr: &str, identity: &Identity, seed: u64) -> (Ws, String) {
    use rand::SeedableRng;
    let mut ws = open(addr).await;
    let text = next_text(&mut ws).await;
    let ServerMessage::Challenge { server_id, nonce, .. } = protocol::decode_server(&text).expect("challenge") else {
        panic!("expected a challenge, got {text}");
    };
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let reg = ClientMessage::register(1, identity, &mut rng, &server_id, &nonce, "bench", None, None).encode();
    ws.send(Message::text(reg)).await.expect("send register");
    loop {
        let text = next_text(&mut ws).await;
        match protocol::decode_server(&text) {
            Ok(ServerMessage::Registered { fingerprint, .. }) => {
                assert_eq!(fingerprint, identity.fingerprint());
                return (ws, fingerprint.to_string());
            }
            Ok(ServerMessage::Error { code, message, .. }) => panic!("register failed: {code}: {message}"),
            _ => continue,
        }
    }
}

/// Identities for `n` clients (deterministic).
pub fn identities(n: usize) -> Vec<Arc<Identity>> {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(0xbe9c);
    (0..n).map(|_| Arc::new(Identity::generate(&mut rng))).collect()
}

// ---- baseline servers (the bench binary re-invoked) --------------------------------------------

/// If the arguments ask for a baseline server mode, runs it (until SIGTERM) and returns true.
pub fn maybe_run_baseline_server() -> bool {
    let args: Vec<String> = std::env::args().collect();
    let relay = args.iter().any(|a| a == "--baseline-server");
    let hold = args.iter().any(|a| a == "--hold-server");
    if !relay && !hold {
        return false;
    }
    raise_nofile();
    // Pinned to one core, one thread (more would only time-slice it).
    let threads: usize =
        std::env::var("BENCH_BASELINE_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(if pinned() { 1 } else { 2 });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let listener = smol::net::TcpListener::try_from(listener).expect("async listener");
    let pool = Pool::new(threads);
    println!("listening on ws://{addr}");
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    let routes: Arc<Mutex<HashMap<String, async_channel::Sender<Message>>>> = Arc::default();
    let ex = pool.ex.clone();
    // Runs until the process is killed by SIGTERM (default action: terminate).
    pool.block_on(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let _ = tcp.set_nodelay(true);
            let routes = routes.clone();
            if hold {
                ex.spawn(async move {
                    // Default WebSocketConfig (128 KiB read buffer); BENCH_HOLD_SMALL_BUFFERS=1
                    // uses peerlink-server's 4 KiB read / 8 KiB write buffers (diagnostic).
                    let config = std::env::var_os("BENCH_HOLD_SMALL_BUFFERS").map(|_| {
                        let mut c = async_tungstenite::tungstenite::protocol::WebSocketConfig::default();
                        c.read_buffer_size = 4 * 1024;
                        c.write_buffer_size = 8 * 1024;
                        c
                    });
                    let Ok(mut ws) = async_tungstenite::accept_async_with_config(tcp, config).await else { return };
                    while let Some(Ok(_)) = ws.next().await {}
                })
                .detach();
            } else {
                ex.spawn(baseline_relay_conn(ex.clone(), tcp, routes)).detach();
            }
        }
    });
    true
}

/// The minimal relay: a fake challenge, `register` answered with the key's fingerprint (no
/// signature check), then every frame's `to` is extracted with serde_json, looked up in a
/// HashMap, and the frame forwarded verbatim. No rate limits, no other parsing.
async fn baseline_relay_conn(
    ex: Arc<smol::Executor<'static>>,
    tcp: TcpStream, routes: Arc<Mutex<HashMap<String, async_channel::Sender<Message>>>>) {
    // The same 4 KiB read buffer as peerlink-server: tungstenite zero-fills its whole read
    // buffer before every read, and the default (128 KiB) makes that the biggest cost per frame.
    let mut config = async_tungstenite::tungstenite::protocol::WebSocketConfig::default();
    config.read_buffer_size = 4 * 1024;
    let Ok(ws) = async_tungstenite::accept_async_with_config(tcp, Some(config)).await else { return };
    let (mut tx, mut rx) = ws.split();
    let challenge = r#"{"type":"challenge","version":1,"server_id":"baseline","nonce":"AAAA"}"#;
    if tx.send(Message::text(challenge)).await.is_err() {
        return;
    }
    // Registration: derive the fingerprint from the public key.
    let fp = loop {
        match rx.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = match serde_json::from_str(t.as_str()) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                let Some(key) = v["public_key"].as_str().and_then(|k| PublicKey::from_base64(k).ok()) else {
                    continue;
                };
                break key.fingerprint().to_string();
            }
            Some(Ok(_)) => continue,
            _ => return,
        }
    };
    let reply = format!(r#"{{"type":"registered","id":1,"fingerprint":"{fp}","alias":"bench"}}"#);
    if tx.send(Message::text(reply)).await.is_err() {
        return;
    }
    let (out_tx, out_rx) = async_channel::unbounded::<Message>();
    routes.lock().unwrap().insert(fp.clone(), out_tx);
    // Writer: batch whatever is queued, flush once.
    let writer = ex.spawn(async move {
        while let Ok(msg) = out_rx.recv().await {
            if tx.feed(msg).await.is_err() {
                return;
            }
            while let Ok(msg) = out_rx.try_recv() {
                if tx.feed(msg).await.is_err() {
                    return;
                }
            }
            if tx.flush().await.is_err() {
                return;
            }
        }
    });
    #[derive(serde::Deserialize)]
    struct To<'a> {
        // Borrowed: extracting `to` allocates nothing; other fields are skipped (IgnoredAny).
        #[serde(borrow)]
        to: Option<&'a str>,
    }
    while let Some(Ok(msg)) = rx.next().await {
        let Message::Text(t) = &msg else { continue };
        let Ok(To { to: Some(to) }) = serde_json::from_str::<To>(t.as_str()) else { continue };
        let target = routes.lock().unwrap().get(to).cloned();
        if let Some(target) = target {
            let _ = target.try_send(msg);
        }
    }
    routes.lock().unwrap().remove(&fp);
    writer.cancel().await;
}

/// A bench's error.
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;
/// Checks one event of a pair's node ("A" or "B"); an error ends the bench.
pub type CheckEvent = fn(&str, &peerlink::NodeEvent) -> Result<(), BenchError>;

/// Polls both nodes of a pair once; each event is checked by `check` (with "A" or "B") and
/// handed to `on`. Returns whether any event came.
pub fn pump_pair(
    nodes: &mut [&mut peerlink_blocking::PollNode; 2],
    check: CheckEvent,
    on: &mut impl FnMut(usize, peerlink::NodeEvent) -> Result<(), BenchError>,
) -> Result<bool, BenchError> {
    let mut any = false;
    for (i, n) in nodes.iter_mut().enumerate() {
        n.poll(Instant::now())?;
        while let Some(e) = n.poll_event() {
            any = true;
            check(if i == 0 { "A" } else { "B" }, &e)?;
            on(i, e)?;
        }
    }
    Ok(any)
}

/// Pumps a pair (busy, as a game loop would) until `done`; returns the time it became true,
/// or an error naming `what` at `deadline`.
pub fn until_pair(
    nodes: &mut [&mut peerlink_blocking::PollNode; 2],
    what: &str,
    deadline: Instant,
    check: CheckEvent,
    mut on: impl FnMut(usize, peerlink::NodeEvent) -> Result<(), BenchError>,
    mut done: impl FnMut(&mut [&mut peerlink_blocking::PollNode; 2]) -> bool,
) -> Result<Instant, BenchError> {
    loop {
        let now = Instant::now();
        if done(nodes) {
            return Ok(now);
        }
        if now >= deadline {
            return Err(format!("{what}: timed out").into());
        }
        pump_pair(nodes, check, &mut on)?;
    }
}

