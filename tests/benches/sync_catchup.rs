//! State-sync catch-up of a late joiner, and of a member that missed a few changes
//! (harness = false).
//!
//! **Section 1: late joiner over the network.** The real signaling server in-process on
//! 127.0.0.1 (`peerlink_tests::start_server`), two `peerlink_blocking::PollNode`s with UDP on
//! loopback. Node A creates a room, starts `sync_state` (`StateConfig::lww()`) and sets
//! `BENCH_SYNC_KEYS` (100,000) keys `item/{i}` to a small JSON object, alone in the room
//! (nothing is sent). Node B then joins; once B's view lists A with `RoomPath::Direct` (the
//! connection is up) and 1.1 s more have passed (so that the digest A sent B on `PeerJoined`,
//! which B dropped since it was not syncing yet, does not hold back A's next digest: A sends
//! one digest per member per second at most), B calls `sync_state`. Timed: from that call to
//! B's `state(room).digest()` equal to A's with B holding every key. Bytes: the sync
//! messages (before fragmenting, base64 and room framing; the node exposes no room-level
//! byte counter) as `StateStats` counts them: A's `bytes_sent` delta and B's
//! `bytes_received`, and the other way (B's requests).
//!
//! **Baseline** (same run, same connection): the same entries as one JSON object
//! (`{"item/0": {...}, ...}`) sent from A to B with `send_json` (a chunked transfer on its own
//! data channel, auto-accepted, arriving parsed as `TransferEvent::Json`). A tiny `send_json`
//! first opens the transfer channel (untimed). Timed: from the `send_json` call (it
//! serializes) to B's `TransferEvent::Json` holding an object of every key. Bytes: the JSON
//! text (the transfer's payload; chunk headers not counted). Even repetitions time the
//! transfer before B's `sync_state`, odd ones after.
//!
//! **Section 2: ten missed changes, in core** (no sockets: a pair of `StateSync`s whose
//! messages are handed over directly, on a virtual clock). Both hold the same keys (synced the
//! same way: A sets them alone, then `handle_member_up` on both and messages pumped until the
//! digests agree; that first exchange is reported too). Then `handle_member_down` on both (a
//! partition; what A sends meanwhile is dropped), 10 sets on A (5 changed keys, 5 new ones),
//! 10 virtual seconds later `handle_member_up` on both, messages pumped until the digests
//! agree. Reported: entries and bytes each way, messages, and CPU wall time of the pump.
//!
//! **Threading.** The server's threads are pinned to CPU 0 and both nodes are polled
//! round-robin by the main thread, pinned to CPU 1 (BENCH_PIN=0 pins nothing), busy (no
//! sleep) while timing. A's encoding and B's decoding therefore share one core, in both the
//! sync and the baseline runs.
//!
//! Run: `cargo bench -p peerlink-tests --bench sync_catchup`.
//! Env: BENCH_SYNC_KEYS (100000), BENCH_SYNC_REPS (3), BENCH_SYNC_TIMEOUT_S (120), BENCH_PIN.

mod common;

use std::cell::Cell;
use std::time::{Duration, Instant};

use peerlink::sync::{StateConfig, StateSync, SyncEvent};
use peerlink::transfer::TransferEvent;
use peerlink::{Fingerprint, NodeEvent, RoomEvent, RoomOptions, RoomPath};
use peerlink_blocking::PollNode;
use serde_json::{Value, json};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn env_u64(name: &str, default: u64) -> Result<u64, Error> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|e| format!("{name}={v:?}: {e}").into()),
        Err(_) => Ok(default),
    }
}

fn key(i: usize) -> String {
    format!("item/{i}")
}

fn value(i: usize) -> Value {
    json!({ "id": i, "name": format!("item {i}"), "qty": i % 97, "done": i.is_multiple_of(3) })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_else(|_| "n/a".into())
}

/// Fails on events that mean something went wrong.
fn check_event(who: &str, e: &NodeEvent) -> Result<(), Error> {
    match e {
        NodeEvent::PeerError { error, .. } => Err(format!("{who}: {error}").into()),
        NodeEvent::Room(RoomEvent::Error { error, .. }) => Err(format!("{who}: room: {error}").into()),
        NodeEvent::Sync(SyncEvent::BadFrame { error, .. }) => Err(format!("{who}: bad sync frame: {error}").into()),
        NodeEvent::Transfer(TransferEvent::Failed { error, .. }) => Err(format!("{who}: transfer failed: {error}").into()),
        _ => Ok(()),
    }
}

/// Pumps both nodes (busy) until `done` (see `common::until_pair`).
fn until(
    nodes: &mut [&mut PollNode; 2],
    what: &str,
    deadline: Instant,
    on: impl FnMut(usize, NodeEvent) -> Result<(), Error>,
    done: impl FnMut(&mut [&mut PollNode; 2]) -> bool,
) -> Result<Instant, Error> {
    common::until_pair(nodes, what, deadline, check_event, on, done)
}

fn ignore(_: usize, _: NodeEvent) -> Result<(), Error> {
    Ok(())
}

struct NetResult {
    sync: Duration,
    a_sent: u64,
    b_received: u64,
    b_sent: u64,
    a_received: u64,
    entries_sent: u64,
    json: Duration,
    json_bytes: usize,
    /// Whether A's fingerprint sorts first (it sends the digest).
    a_first: bool,
}

fn run_net(url: &str, keys: usize, rep: usize, timeout: Duration) -> Result<NetResult, Error> {
    let deadline = Instant::now() + timeout;
    let peer = peerlink::PeerConfig::default();
    let mut a = common::registered_node(url, &peer)?;
    let mut b = common::registered_node(url, &peer)?;
    let room = format!("catchup-{rep}-{}", std::process::id());
    let (fa, fb) = (a.fingerprint(), b.fingerprint());
    let mut nodes = [&mut a, &mut b];

    nodes[0].create_room(&room, RoomOptions::group(2))?;
    until(&mut nodes, "room created", deadline, ignore, |ns| ns[0].node().room(&room).is_some())?;
    nodes[0].sync_state(&room, StateConfig::lww())?;
    let t = Instant::now();
    for i in 0..keys {
        nodes[0].node().state_set(Instant::now(), &room, &key(i), &value(i))?;
        if i % 1000 == 999 {
            nodes[0].poll(Instant::now())?;
            while nodes[0].poll_event().is_some() {}
        }
    }
    // Settle: the batch goes (to nobody), events drained.
    let settle = Instant::now() + Duration::from_millis(100);
    until(&mut nodes, "settle", deadline, ignore, |_| Instant::now() >= settle)?;
    let a_state = nodes[0].state(&room).ok_or("A not synced")?;
    if a_state.len() != keys {
        return Err(format!("A holds {} keys, not {keys}", a_state.len()).into());
    }
    let digest = a_state.digest();
    eprintln!("sync_catchup: rep {rep}: A set {keys} keys in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);

    nodes[1].join_room(&room)?;
    let direct = |n: &mut PollNode, peer: Fingerprint| n.node().room(&room).is_some_and(|r| r.members.iter().any(|m| m.info.fingerprint == peer && m.path == RoomPath::Direct));
    until(&mut nodes, "B joined, direct", deadline, ignore, |ns| direct(ns[1], fa) && direct(ns[0], fb))?;
    let quiet = Instant::now() + Duration::from_millis(1100);
    until(&mut nodes, "quiet", deadline, ignore, |_| Instant::now() >= quiet)?;

    // The baseline's payload, built before any timing (as an application would hold it).
    let object: serde_json::Map<String, Value> = (0..keys).map(|i| (key(i), value(i))).collect();
    let object = Value::Object(object);
    let json_bytes = serde_json::to_vec(&object)?.len();
    // Open the transfer channel (untimed).
    nodes[0].send_json(fb, &json!({ "warm": true }))?;
    let warm = Cell::new(false);
    until(&mut nodes, "warm-up transfer", deadline, |i, e| {
        if i == 1 && matches!(e, NodeEvent::Transfer(TransferEvent::Json { .. })) {
            warm.set(true);
        }
        Ok(())
    }, |_| warm.get())?;

    let time_json = |nodes: &mut [&mut PollNode; 2]| -> Result<Duration, Error> {
        let start = Instant::now();
        nodes[0].send_json(fb, &object)?;
        let got: Cell<Option<usize>> = Cell::new(None);
        let end = until(nodes, "JSON transfer", deadline, |i, e| {
            if let (1, NodeEvent::Transfer(TransferEvent::Json { value, .. })) = (i, e) {
                got.set(Some(value.as_object().map_or(0, |o| o.len())));
            }
            Ok(())
        }, |_| got.get().is_some())?;
        let got = got.get();
        if got != Some(keys) {
            return Err(format!("the JSON transfer arrived with {got:?} keys").into());
        }
        Ok(end - start)
    };

    let json_first = rep.is_multiple_of(2);
    let mut json = if json_first { Some(time_json(&mut nodes)?) } else { None };

    let a0 = nodes[0].state(&room).ok_or("A not synced")?.stats();
    let start = Instant::now();
    nodes[1].sync_state(&room, StateConfig::lww())?;
    let end = until(&mut nodes, "B caught up", deadline, ignore, |ns| {
        ns[1].state(&room).is_some_and(|s| s.digest() == digest && s.len() == keys)
    })?;
    let sync = end - start;
    // Let the last answers land before reading the counters (nothing more should move).
    let a1 = nodes[0].state(&room).ok_or("A not synced")?.stats();
    let b1 = nodes[1].state(&room).ok_or("B not synced")?.stats();

    if json.is_none() {
        json = Some(time_json(&mut nodes)?);
    }
    let now = Instant::now();
    for n in nodes.iter_mut() {
        let _ = n.node().close(now);
        let _ = n.poll(now);
    }
    Ok(NetResult {
        sync,
        a_sent: a1.bytes_sent - a0.bytes_sent,
        a_received: a1.bytes_received - a0.bytes_received,
        b_received: b1.bytes_received,
        b_sent: b1.bytes_sent,
        entries_sent: a1.entries_sent - a0.entries_sent,
        json: json.expect("timed"),
        json_bytes,
        a_first: fa < fb,
    })
}

// ---- section 2: core ---------------------------------------------------------------------

fn fp(b: u8) -> Fingerprint {
    Fingerprint::from_bytes([b; 32])
}

#[derive(Default, Debug)]
struct Exchange {
    messages: [u64; 2],
    bytes: [u64; 2],
    entries: [u64; 2],
    wall: Duration,
}

/// Hands messages between the two replicas until none is left.
fn exchange(pair: &mut [StateSync; 2], now: Instant, unix_ms: u64) -> Exchange {
    let before: Vec<_> = pair.iter().map(StateSync::stats).collect();
    let mut x = Exchange::default();
    let from = [fp(1), fp(2)];
    let t = Instant::now();
    loop {
        let mut any = false;
        for i in 0..2 {
            pair[i].handle_timeout(now, unix_ms);
            while let Some(m) = pair[i].poll_message() {
                any = true;
                x.messages[i] += 1;
                pair[1 - i].handle_message(now, unix_ms, from[i], &m.bytes);
            }
            while pair[i].poll_event().is_some() {}
        }
        if !any {
            break;
        }
    }
    x.wall = t.elapsed();
    for i in 0..2 {
        let s = pair[i].stats();
        x.bytes[i] = s.bytes_sent - before[i].bytes_sent;
        x.entries[i] = s.entries_sent - before[i].entries_sent;
    }
    x
}

fn run_core(keys: usize) -> Result<(Exchange, Exchange), Error> {
    const MS: u64 = 1_700_000_000_000;
    let t0 = Instant::now();
    let mut pair = [StateSync::new(StateConfig::lww(), fp(1)), StateSync::new(StateConfig::lww(), fp(2))];
    for i in 0..keys {
        pair[0].set(t0, MS, &key(i), value(i))?;
    }
    pair[0].flush();
    while pair[0].poll_message().is_some() {}
    while pair[0].poll_event().is_some() {}
    let now = t0 + Duration::from_secs(1);
    pair[0].handle_member_up(now, fp(2));
    pair[1].handle_member_up(now, fp(1));
    let full = exchange(&mut pair, now, MS + 1000);
    if pair[1].len() != keys || pair[0].digest() != pair[1].digest() {
        return Err(format!("core: first exchange left B with {} keys", pair[1].len()).into());
    }
    // Partition; ten changes on A, lost.
    pair[0].handle_member_down(fp(2));
    pair[1].handle_member_down(fp(1));
    let now = now + Duration::from_secs(1);
    for j in 0..10 {
        let k = if j < 5 { key(j * 1000) } else { key(keys + j) };
        pair[0].set(now, MS + 2000, &k, json!({ "id": j, "changed": true }))?;
    }
    pair[0].flush();
    while pair[0].poll_message().is_some() {}
    while pair[0].poll_event().is_some() {}
    // Back together, well past every hold (digest spacing, exchange stagger, want hold).
    let now = now + Duration::from_secs(10);
    pair[0].handle_member_up(now, fp(2));
    pair[1].handle_member_up(now, fp(1));
    let ten = exchange(&mut pair, now, MS + 12_000);
    if pair[0].digest() != pair[1].digest() || pair[1].len() != keys + 5 {
        return Err(format!("core: after the partition B holds {} keys, digests differ: {}", pair[1].len(), pair[0].digest() != pair[1].digest()).into());
    }
    Ok((full, ten))
}

fn main() -> std::process::ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).try_init();
    }
    let (keys, reps, timeout) = match (env_u64("BENCH_SYNC_KEYS", 100_000), env_u64("BENCH_SYNC_REPS", 3), env_u64("BENCH_SYNC_TIMEOUT_S", 120)) {
        (Ok(k), Ok(r), Ok(t)) => (k as usize, r.max(1) as usize, Duration::from_secs(t)),
        (k, r, t) => {
            eprintln!("sync_catchup: {:?} {:?} {:?}", k.err(), r.err(), t.err());
            return std::process::ExitCode::FAILURE;
        }
    };
    common::pin_thread(0);
    let server = peerlink_tests::start_server(peerlink::ServerConfig::default());
    common::pin_thread(1);
    let url = server.url();
    println!(
        "sync_catchup: {keys} keys, {reps} repetition(s), UDP on 127.0.0.1, real server in-process{}; load average at start: {}",
        if common::pinned() { " (pinned to CPU 0), both nodes polled by one thread pinned to CPU 1" } else { ", nothing pinned" },
        loadavg()
    );
    let mut failed = false;
    let mut net = Vec::new();
    for rep in 0..reps {
        match run_net(&url, keys, rep, timeout) {
            Ok(r) => {
                println!(
                    "sync_catchup: rep {rep}: state sync {:.0} ms, A->B {} bytes ({} entries), B->A {} bytes (A received {}; B received {}); \
                     JSON transfer ({}) {:.0} ms, {} bytes; digest sender {}",
                    r.sync.as_secs_f64() * 1e3,
                    r.a_sent,
                    r.entries_sent,
                    r.b_sent,
                    r.a_received,
                    r.b_received,
                    if rep % 2 == 0 { "before the sync" } else { "after the sync" },
                    r.json.as_secs_f64() * 1e3,
                    r.json_bytes,
                    if r.a_first { "A" } else { "B" },
                );
                net.push(r);
            }
            Err(e) => {
                eprintln!("sync_catchup: rep {rep}: FAILED: {e}");
                failed = true;
            }
        }
    }
    if !net.is_empty() {
        let med = |f: &dyn Fn(&NetResult) -> f64| common::median(net.iter().map(f).collect()).unwrap_or(f64::NAN);
        let sync_ms = med(&|r| r.sync.as_secs_f64() * 1e3);
        let json_ms = med(&|r| r.json.as_secs_f64() * 1e3);
        let sync_bytes = med(&|r| r.a_sent as f64);
        let back_bytes = med(&|r| r.b_sent as f64);
        let json_bytes = med(&|r| r.json_bytes as f64);
        let ratios: Vec<f64> = net.iter().map(|r| r.sync.as_secs_f64() / r.json.as_secs_f64()).collect();
        println!("sync_catchup: late joiner, {keys} keys, medians of {} repetition(s):", net.len());
        println!("sync_catchup:   {:<34} {:>10} {:>14} {:>14}", "", "time (ms)", "A->B bytes", "B->A bytes");
        println!("sync_catchup:   {:<34} {:>10.0} {:>14.0} {:>14.0}", "state sync (digest catch-up)", sync_ms, sync_bytes, back_bytes);
        println!("sync_catchup:   {:<34} {:>10.0} {:>14.0} {:>14}", "baseline: one JSON send_json", json_ms, json_bytes, "-");
        println!(
            "sync_catchup: RESULT late joiner: state sync {sync_ms:.0} ms vs JSON transfer {json_ms:.0} ms: time ratio {:.2} (per rep {}); \
             bytes ratio {:.2} (A->B sync messages / JSON payload)",
            sync_ms / json_ms,
            ratios.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", "),
            sync_bytes / json_bytes,
        );
    }
    match run_core(keys) {
        Ok((full, ten)) => {
            let row = |name: &str, x: &Exchange| {
                println!(
                    "sync_catchup:   {:<28} {:>9} {:>9} {:>12} {:>12} {:>10} {:>10.1}",
                    name, x.entries[0], x.entries[1], x.bytes[0], x.bytes[1], x.messages[0] + x.messages[1], x.wall.as_secs_f64() * 1e3
                );
            };
            println!("sync_catchup: core (StateSync pair, no sockets), {keys} keys:");
            println!(
                "sync_catchup:   {:<28} {:>9} {:>9} {:>12} {:>12} {:>10} {:>10}",
                "exchange", "ent A->B", "ent B->A", "bytes A->B", "bytes B->A", "messages", "wall ms"
            );
            row("first sync (empty B)", &full);
            row("after 10 missed changes", &ten);
            println!(
                "sync_catchup: RESULT core: 10 missed changes repaired with {} entries and {} bytes (both ways), vs {} bytes for the full catch-up",
                ten.entries[0] + ten.entries[1],
                ten.bytes[0] + ten.bytes[1],
                full.bytes[0] + full.bytes[1]
            );
        }
        Err(e) => {
            eprintln!("sync_catchup: core: FAILED: {e}");
            failed = true;
        }
    }
    drop(server);
    if failed { std::process::ExitCode::FAILURE } else { std::process::ExitCode::SUCCESS }
}
