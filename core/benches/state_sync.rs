//! HLC last-writer-wins state sync in core, no sockets (harness = false, plain std timing).
//!
//! - **local set**: `StateSync::set` of `KEYS` distinct keys (small JSON numbers), with the
//!   batch flushed (encoded) every 1,000 sets, as a node would at its batch delay. Baseline in
//!   the same run: inserting the same keys and values into a `HashMap<String, Value>`.
//! - **remote apply**: `StateSync::handle_message` of pre-encoded batches (what the sender's
//!   flushes produced) into a fresh replica. Baseline: `serde_json` parsing of the same
//!   values into a `HashMap`.
//!
//! Best of `RUNS` runs. Run: `cargo bench -p peerlink --bench state_sync`.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use peerlink::Fingerprint;
use peerlink::sync::{StateConfig, StateSync};
use serde_json::{Value, json};

const KEYS: usize = 200_000;
const RUNS: usize = 5;
const MS: u64 = 1_700_000_000_000;

fn fp(b: u8) -> Fingerprint {
    Fingerprint::from_bytes([b; 32])
}

fn best(mut f: impl FnMut() -> Duration) -> Duration {
    (0..RUNS).map(|_| f()).min().expect("runs")
}

fn main() {
    let keys: Vec<String> = (0..KEYS).map(|i| format!("player/{i}/score")).collect();
    let start = Instant::now();

    // Local sets.
    let local = best(|| {
        let mut s = StateSync::new(StateConfig::lww(), fp(1));
        s.handle_member_up(start, fp(2));
        while s.poll_message().is_some() {}
        let t = Instant::now();
        for (i, k) in keys.iter().enumerate() {
            s.set(start, MS + (i / 1000) as u64, k, json!(i)).expect("set");
            if i % 1000 == 999 {
                s.flush();
                while let Some(m) = s.poll_message() {
                    black_box(m);
                }
            }
            while let Some(e) = s.poll_event() {
                black_box(e);
            }
        }
        t.elapsed()
    });
    let local_base = best(|| {
        let mut m: HashMap<String, Value> = HashMap::new();
        let t = Instant::now();
        for (i, k) in keys.iter().enumerate() {
            m.insert(k.clone(), json!(i));
        }
        black_box(&m);
        t.elapsed()
    });

    // What a sender's flushes produce.
    let mut sender = StateSync::new(StateConfig::lww(), fp(1));
    sender.handle_member_up(start, fp(2));
    while sender.poll_message().is_some() {}
    let mut batches = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        sender.set(start, MS + (i / 1000) as u64, k, json!(i)).expect("set");
        if i % 1000 == 999 {
            sender.flush();
            while let Some(m) = sender.poll_message() {
                batches.push(m.bytes);
            }
        }
    }
    sender.flush();
    while let Some(m) = sender.poll_message() {
        batches.push(m.bytes);
    }
    let wire: usize = batches.iter().map(Vec::len).sum();
    let remote = best(|| {
        let mut r = StateSync::new(StateConfig::lww(), fp(2));
        let t = Instant::now();
        for b in &batches {
            r.handle_message(start, MS + 1000, fp(1), b);
            while let Some(e) = r.poll_event() {
                black_box(e);
            }
        }
        assert_eq!(r.len(), KEYS);
        t.elapsed()
    });
    let texts: Vec<String> = (0..KEYS).map(|i| i.to_string()).collect();
    let remote_base = best(|| {
        let mut m: HashMap<String, Value> = HashMap::new();
        let t = Instant::now();
        for (k, v) in keys.iter().zip(&texts) {
            m.insert(k.clone(), serde_json::from_str(v).expect("json"));
        }
        black_box(&m);
        t.elapsed()
    });

    let rate = |d: Duration| KEYS as f64 / d.as_secs_f64();
    println!("state_sync: {KEYS} keys, best of {RUNS}");
    println!(
        "  local set:    {:>10.0}/s   baseline HashMap insert {:>10.0}/s   ratio {:.2}   (goal >= 1,000,000/s)",
        rate(local),
        rate(local_base),
        rate(local) / rate(local_base)
    );
    println!(
        "  remote apply: {:>10.0}/s   baseline JSON parse + insert {:>10.0}/s   ratio {:.2}   (goal >= 500,000/s)",
        rate(remote),
        rate(remote_base),
        rate(remote) / rate(remote_base)
    );
    println!("  wire: {} bytes in {} batches ({:.1} bytes per entry)", wire, batches.len(), wire as f64 / KEYS as f64);
}
