//! Server-core relay throughput, no sockets (harness = false, plain std timing).
//!
//! Registers `CONNS` connections for real (ECDSA signatures over each challenge), then feeds a
//! pre-built set of relay frames (payload ~100 bytes, random target) through
//! `Server::handle_message`, draining `poll_transmit` after each frame and reporting the drained
//! bytes with `handle_sent`. Baseline in the same run: `serde_json` parse of each frame into a
//! `serde_json::Value` plus `to_string` of it. Best of `RUNS` runs of at least `MIN_RUN`.
//!
//! Run: `cargo bench -p peerlink --bench server_core`
//! Env: `SERVER_CORE_RUNS` (default 5), `SERVER_CORE_MIN_MS` (default 1000) — fewer/shorter runs
//! are handy under callgrind.

use std::hint::black_box;
use std::time::{Duration, Instant};

use peerlink::identity::Identity;
use peerlink::protocol::{self, ClientMessage, ServerMessage};
use peerlink::server::{ConnId, RateLimit, Server, ServerConfig, ServerTransmit};
use peerlink::Fingerprint;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde_json::value::RawValue;

const CONNS: u64 = 1_000;
const FRAMES: usize = 100_000;
const GOAL_PER_SEC: f64 = 1_000_000.0;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn drain(server: &mut Server) -> (usize, usize) {
    let (mut frames, mut bytes) = (0, 0);
    while let Some(t) = server.poll_transmit() {
        match t {
            ServerTransmit::Text { conn, text } => {
                frames += 1;
                bytes += text.len();
                server.handle_sent(conn, text.len());
            }
            ServerTransmit::Close { conn, code } => panic!("unexpected close of {conn:?}: {code:?}"),
        }
    }
    (frames, bytes)
}

/// Connects and registers `CONNS` clients for real; returns their fingerprints by conn index.
fn setup(now: Instant) -> (Server, Vec<Fingerprint>) {
    let mut config = ServerConfig::default();
    // Every connection sends ~1,000 frames/s here: lift the per-connection rate limit, which is
    // not what this benchmark measures.
    config.rate_limit = RateLimit { per_second: u32::MAX, burst: u32::MAX };
    config.outbound_queue_bytes = 64 * 1024 * 1024;
    let server_id = config.server_id.clone();
    let mut server = Server::new(config, 1, now, 1_700_000_000_000);
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let mut fps = Vec::with_capacity(CONNS as usize);
    for i in 0..CONNS {
        let conn = ConnId(i);
        server.handle_connect(conn, now).unwrap();
        let Some(ServerTransmit::Text { text, .. }) = server.poll_transmit() else { panic!("no challenge") };
        let ServerMessage::Challenge { nonce, server_id: sid, .. } = protocol::decode_server(&text).unwrap() else {
            panic!("not a challenge: {text}")
        };
        assert_eq!(sid, server_id);
        let id = Identity::generate(&mut rng);
        let alias = format!("bench-{i}");
        let reg = ClientMessage::register(1, &id, &mut rng, &sid, &nonce, &alias, None, None).encode();
        server.handle_message(conn, now, &reg).unwrap();
        let Some(ServerTransmit::Text { text, .. }) = server.poll_transmit() else { panic!("no reply") };
        assert!(text.contains("\"registered\""), "registration failed: {text}");
        drain(&mut server);
        fps.push(id.fingerprint());
    }
    (server, fps)
}

/// Pre-builds `(sender, frame)` pairs: a random sender relaying ~100 bytes to a random other.
fn frames(fps: &[Fingerprint]) -> Vec<(ConnId, String)> {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let n = fps.len() as u64;
    (0..FRAMES)
        .map(|i| {
            let from = rng.random_range(0..n);
            let to = (from + rng.random_range(1..n)) % n;
            // ~100 bytes of payload: a sequence number and some SDP-ish filler.
            let payload = format!(
                r#"{{"seq":{i},"kind":"candidate","candidate":"candidate:1 1 UDP 2122252543 192.168.1.{} 5{:04} typ host"}}"#,
                i % 250,
                i % 10_000
            );
            let payload = RawValue::from_string(payload).unwrap();
            let frame = ClientMessage::Relay { id: None, to: fps[to as usize], payload: &payload }.encode();
            (ConnId(from), frame)
        })
        .collect()
}

/// Runs `pass` over the frame set repeatedly for at least `min`; returns frames per second.
fn measure(min: Duration, frames: usize, mut pass: impl FnMut() -> usize) -> f64 {
    let start = Instant::now();
    let mut done = 0usize;
    let mut check = 0usize;
    while start.elapsed() < min {
        check = check.wrapping_add(pass());
        done += frames;
    }
    let secs = start.elapsed().as_secs_f64();
    black_box(check);
    done as f64 / secs
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let runs = env_or("SERVER_CORE_RUNS", 5);
    let min = Duration::from_millis(env_or("SERVER_CORE_MIN_MS", 1000));
    let t0 = Instant::now();
    let now = Instant::now();
    let (mut server, fps) = setup(now);
    println!("server_core: registered {CONNS} connections (real signatures) in {:.2?}", t0.elapsed());
    let frames = frames(&fps);
    let avg = frames.iter().map(|(_, f)| f.len()).sum::<usize>() / frames.len();
    let payload_avg = {
        let v: serde_json::Value = serde_json::from_str(&frames[0].1).unwrap();
        v["payload"].to_string().len()
    };
    println!("server_core: {FRAMES} pre-built relay frames, avg {avg} bytes (payload ~{payload_avg} bytes)");

    // Sanity: one pass delivers exactly one frame per relay and no errors.
    let (mut delivered, mut bytes) = (0, 0);
    for (conn, text) in &frames {
        server.handle_message(*conn, now, text).unwrap();
        let (f, b) = drain(&mut server);
        delivered += f;
        bytes += b;
    }
    assert_eq!(delivered, FRAMES, "each relay must produce exactly one delivery");
    println!("server_core: sanity pass ok ({delivered} deliveries, {bytes} bytes out)");
    assert_eq!(server.stats().connections, CONNS as usize);

    let mut best_server = 0f64;
    let mut best_base = 0f64;
    for run in 1..=runs {
        let now = Instant::now();
        let server_rate = measure(min, frames.len(), || {
            let mut out = 0;
            for (conn, text) in &frames {
                server.handle_message(*conn, now, text).unwrap();
                out += drain(&mut server).1;
            }
            out
        });
        let base_rate = measure(min, frames.len(), || {
            let mut out = 0;
            for (_, text) in &frames {
                let v: serde_json::Value = serde_json::from_str(text).unwrap();
                out += serde_json::to_string(&v).unwrap().len();
            }
            out
        });
        println!(
            "server_core: run {run}/{runs}: server {:>10.0} relays/s   baseline(serde_json Value parse+to_string) {:>10.0} frames/s",
            server_rate, base_rate
        );
        best_server = best_server.max(server_rate);
        best_base = best_base.max(base_rate);
    }
    assert_eq!(server.stats().connections, CONNS as usize, "no connection may have been closed");
    println!("server_core: BEST server relay handling: {best_server:.0} msgs/s (goal >= {GOAL_PER_SEC:.0}/s: {})",
        if best_server >= GOAL_PER_SEC { "MET" } else { "MISSED" });
    println!("server_core: BEST baseline serde_json Value round trip: {best_base:.0} frames/s");
    println!("server_core: ratio server/baseline = {:.3}", best_server / best_base);
}
