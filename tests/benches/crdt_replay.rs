//! Replay of a text editing session through document sync (harness = false).
//!
//! **The session.** `BENCH_CRDT_OPS` (100,000) single-character operations from a seeded
//! ChaCha8 RNG: about 88% inserts of one ASCII character at a position near a moving cursor
//! (the cursor moves by -2..=2 around its place, and jumps to a random position 3% of the
//! time), about 12% deletes (backspace: the character before the cursor). The final text is
//! about 76,000 characters.
//!
//! **Measured.** The real signaling server in-process on 127.0.0.1
//! (`peerlink_tests::start_server`), two `peerlink_blocking::PollNode`s with UDP on loopback in a
//! room, both with `sync_crdt` and document `doc` open (B has had A's `SyncStep2`). Node A
//! replays the session, every operation its own yrs transaction through
//! `PollNode::crdt_edit` (which flushes it as one `Update` message and polls A); after each
//! operation the loop polls B once and drains both nodes' events, as an application loop
//! would. Timed: from the first operation to B's text (`get_string` of root text `text`)
//! equal to A's. Also printed: when A had issued the last operation. Bytes: the node has no
//! byte counter for documents, so the figure printed is the yrs v1 updates' size (the payload
//! peerlink sends per operation; its framing, base64 and room envelope come on top).
//!
//! **Baseline** (same run, same operations): two in-memory yrs `Doc`s, no network: each
//! operation is a transaction on doc 1, its v1 update (captured by `observe_update_v1`, as
//! peerlink captures it) decoded and applied to doc 2 at once; timed until both texts are
//! equal; also printed, how much of that went into the transactions on doc 1 (the edit and
//! the encoding of its update). Baseline and network runs alternate order per repetition.
//!
//! **Threading.** The server's threads are pinned to CPU 0, the loop that drives both nodes
//! to CPU 1 (BENCH_PIN=0 pins nothing); it does not sleep while timing.
//!
//! Run: `cargo bench -p peerlink-tests --bench crdt_replay`.
//! Env: BENCH_CRDT_OPS (100000), BENCH_CRDT_REPS (1), BENCH_CRDT_TIMEOUT_S (300), BENCH_PIN.

mod common;

use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peerlink::sync::{CrdtConfig, CrdtEvent, SyncEvent};
use peerlink::yrs::updates::decoder::Decode;
use peerlink::yrs::{Doc, GetString, Text, TextRef, Transact, Update};
use peerlink::{Fingerprint, NodeEvent, RoomEvent, RoomOptions, RoomPath};
use peerlink_blocking::PollNode;
use rand::{Rng, SeedableRng};

type Error = Box<dyn std::error::Error + Send + Sync>;

const DOC: &str = "doc";
const TEXT: &str = "text";

fn env_u64(name: &str, default: u64) -> Result<u64, Error> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|e| format!("{name}={v:?}: {e}").into()),
        Err(_) => Ok(default),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_else(|_| "n/a".into())
}

#[derive(Clone, Copy)]
enum Op {
    Insert(u32, u8),
    Delete(u32),
}

/// The session and the length of its final text.
fn session(n: usize) -> (Vec<Op>, u32) {
    const CHARS: &[u8] = b"etaoin shrdlu cmfwyp vbgkqjxz ETAOIN.,\n";
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x7e47);
    let (mut len, mut cursor) = (0u32, 0u32);
    let mut ops = Vec::with_capacity(n);
    for _ in 0..n {
        if len > 0 && rng.random_range(0..100) < 12 {
            let pos = cursor.saturating_sub(1).min(len - 1);
            ops.push(Op::Delete(pos));
            cursor = pos;
            len -= 1;
        } else {
            if rng.random_range(0..100) < 3 {
                cursor = rng.random_range(0..=len);
            } else {
                cursor = (i64::from(cursor) + rng.random_range(-2..=2)).clamp(0, i64::from(len)) as u32;
            }
            ops.push(Op::Insert(cursor, CHARS[rng.random_range(0..CHARS.len())]));
            cursor += 1;
            len += 1;
        }
    }
    (ops, len)
}

fn apply_op(doc: &Doc, text: &TextRef, op: Op) {
    let mut txn = doc.transact_mut();
    match op {
        Op::Insert(pos, c) => text.insert(&mut txn, pos, std::str::from_utf8(&[c]).expect("ascii")),
        Op::Delete(pos) => text.remove_range(&mut txn, pos, 1),
    }
}

// ---- baseline --------------------------------------------------------------------------

struct BaseResult {
    time: Duration,
    /// Of which in the transactions on doc 1 (the edit and its update's encoding).
    local: Duration,
    bytes: u64,
    text: String,
}

fn run_baseline(ops: &[Op], final_len: u32) -> Result<BaseResult, Error> {
    let d1 = Doc::with_client_id(1);
    let d2 = Doc::with_client_id(2);
    let (t1, t2) = (d1.get_or_insert_text(TEXT), d2.get_or_insert_text(TEXT));
    let captured: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let sink = captured.clone();
    d1.observe_update_v1("bench", move |_: &peerlink::yrs::TransactionMut, e: &peerlink::yrs::UpdateEvent| {
        sink.lock().expect("lock").push(e.update.clone())
    })
    .map_err(|e| format!("observe: {e}"))?;
    let mut bytes = 0u64;
    let mut local = Duration::ZERO;
    let start = Instant::now();
    for &op in ops {
        let t = Instant::now();
        apply_op(&d1, &t1, op);
        local += t.elapsed();
        let updates = std::mem::take(&mut *captured.lock().expect("lock"));
        for u in updates {
            bytes += u.len() as u64;
            let update = Update::decode_v1(&u).map_err(|e| format!("decode: {e}"))?;
            d2.transact_mut().apply_update(update).map_err(|e| format!("apply: {e}"))?;
        }
    }
    let a = t1.get_string(&d1.transact());
    let b = t2.get_string(&d2.transact());
    let time = start.elapsed();
    if a != b || a.len() != final_len as usize {
        return Err(format!("baseline: texts differ ({} vs {} chars, expected {final_len})", a.len(), b.len()).into());
    }
    Ok(BaseResult { time, local, bytes, text: a })
}

// ---- over the network ------------------------------------------------------------------

fn check_event(who: &str, e: &NodeEvent) -> Result<(), Error> {
    match e {
        NodeEvent::PeerError { error, .. } => Err(format!("{who}: {error}").into()),
        NodeEvent::Room(RoomEvent::Error { error, .. }) => Err(format!("{who}: room: {error}").into()),
        NodeEvent::Sync(SyncEvent::BadFrame { error, .. }) => Err(format!("{who}: bad sync frame: {error}").into()),
        _ => Ok(()),
    }
}

/// Pumps both nodes (busy) until `done` (see `common::until_pair`).
fn until(
    nodes: &mut [&mut PollNode; 2],
    what: &str,
    deadline: Instant,
    mut on: impl FnMut(usize, NodeEvent),
    done: impl FnMut(&mut [&mut PollNode; 2]) -> bool,
) -> Result<Instant, Error> {
    common::until_pair(
        nodes,
        what,
        deadline,
        check_event,
        |i, e| {
            on(i, e);
            Ok(())
        },
        done,
    )
}

struct NetResult {
    time: Duration,
    issued: Duration,
    /// Events B had: `Updated` ones.
    b_updates: u64,
    /// The most poll calls on B in a row that found B's text still short, after A was done.
    tail_polls: u64,
}

fn text_of(node: &mut PollNode, room: &str) -> Option<(u32, TextRef)> {
    let doc = node.node().crdt(room)?.doc(DOC)?;
    let text = doc.get_or_insert_text(TEXT);
    let len = text.len(&doc.transact());
    Some((len, text))
}

fn string_of(node: &mut PollNode, room: &str) -> Option<String> {
    let doc = node.node().crdt(room)?.doc(DOC)?;
    let text = doc.get_or_insert_text(TEXT);
    let s = text.get_string(&doc.transact());
    Some(s)
}

fn run_net(url: &str, ops: &[Op], final_len: u32, expected: &str, rep: usize, timeout: Duration) -> Result<NetResult, Error> {
    let deadline = Instant::now() + timeout;
    let peer = peerlink::PeerConfig::default();
    let mut a = common::registered_node(url, &peer)?;
    let mut b = common::registered_node(url, &peer)?;
    let room = format!("replay-{rep}-{}", std::process::id());
    let (fa, fb) = (a.fingerprint(), b.fingerprint());
    let mut nodes = [&mut a, &mut b];
    nodes[0].create_room(&room, RoomOptions::group(2))?;
    until(&mut nodes, "room created", deadline, |_, _| {}, |ns| ns[0].node().room(&room).is_some())?;
    nodes[1].join_room(&room)?;
    let direct = |n: &mut PollNode, peer: Fingerprint| n.node().room(&room).is_some_and(|r| r.members.iter().any(|m| m.info.fingerprint == peer && m.path == RoomPath::Direct));
    until(&mut nodes, "B joined, direct", deadline, |_, _| {}, |ns| direct(ns[1], fa) && direct(ns[0], fb))?;
    for n in nodes.iter_mut() {
        n.sync_crdt(&room, CrdtConfig::default())?;
    }
    let text_a = nodes[0].crdt_edit(&room, DOC, |d| d.get_or_insert_text(TEXT))?;
    nodes[1].crdt_edit(&room, DOC, |d| {
        d.get_or_insert_text(TEXT);
    })?;
    let synced = Cell::new(false);
    until(&mut nodes, "B synced", deadline, |i, e| {
        if let (1, NodeEvent::Sync(SyncEvent::Crdt { event: CrdtEvent::Synced { peer, .. }, .. })) = (i, &e)
            && *peer == fa
        {
            synced.set(true);
        }
    }, |_| synced.get())?;

    let updates = Cell::new(0u64);
    let mut on = |i: usize, e: NodeEvent| {
        if let (1, NodeEvent::Sync(SyncEvent::Crdt { event: CrdtEvent::Updated { .. }, .. })) = (i, &e) {
            updates.set(updates.get() + 1);
        }
    };
    let start = Instant::now();
    for &op in ops {
        nodes[0].crdt_edit(&room, DOC, |d| apply_op(d, &text_a, op))?;
        while let Some(e) = nodes[0].poll_event() {
            check_event("A", &e)?;
            on(0, e);
        }
        nodes[1].poll(Instant::now())?;
        while let Some(e) = nodes[1].poll_event() {
            check_event("B", &e)?;
            on(1, e);
        }
        if Instant::now() >= deadline {
            return Err("replay: timed out (BENCH_CRDT_TIMEOUT_S)".into());
        }
    }
    let issued = start.elapsed();
    let tail = Cell::new(0u64);
    let end = until(&mut nodes, "B equal to A", deadline, &mut on, |ns| {
        let Some((len, _)) = text_of(ns[1], &room) else { return false };
        if len != final_len {
            tail.set(tail.get() + 1);
            return false;
        }
        string_of(ns[1], &room) == string_of(ns[0], &room)
    })?;
    let time = end - start;
    if string_of(nodes[0], &room).as_deref() != Some(expected) {
        return Err("A's text differs from the baseline's".into());
    }
    let now = Instant::now();
    for n in nodes.iter_mut() {
        let _ = n.node().close(now);
        let _ = n.poll(now);
    }
    Ok(NetResult { time, issued, b_updates: updates.get(), tail_polls: tail.get() })
}

fn main() -> std::process::ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).try_init();
    }
    let (n, reps, timeout) = match (env_u64("BENCH_CRDT_OPS", 100_000), env_u64("BENCH_CRDT_REPS", 1), env_u64("BENCH_CRDT_TIMEOUT_S", 300)) {
        (Ok(n), Ok(r), Ok(t)) => (n as usize, r.max(1) as usize, Duration::from_secs(t)),
        (n, r, t) => {
            eprintln!("crdt_replay: {:?} {:?} {:?}", n.err(), r.err(), t.err());
            return std::process::ExitCode::FAILURE;
        }
    };
    let (ops, final_len) = session(n);
    let inserts = ops.iter().filter(|o| matches!(o, Op::Insert(..))).count();
    common::pin_thread(0);
    let server = peerlink_tests::start_server(peerlink::ServerConfig::default());
    common::pin_thread(1);
    let url = server.url();
    println!(
        "crdt_replay: {n} ops ({inserts} inserts, {} deletes; final text {final_len} chars), one crdt_edit (yrs transaction) per op, \
         {reps} repetition(s), UDP on 127.0.0.1{}; load average at start: {}",
        n - inserts,
        if common::pinned() { ", server on CPU 0, both nodes polled by one thread on CPU 1" } else { ", nothing pinned" },
        loadavg()
    );
    let mut failed = false;
    let (mut net_ms, mut base_ms) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        let mut base = None;
        let mut net = None;
        for which in if rep % 2 == 0 { [0, 1] } else { [1, 0] } {
            if which == 0 {
                match run_baseline(&ops, final_len) {
                    Ok(b) => base = Some(b),
                    Err(e) => {
                        eprintln!("crdt_replay: rep {rep}: baseline FAILED: {e}");
                        failed = true;
                    }
                }
            } else {
                let expected = match &base {
                    Some(b) => b.text.clone(),
                    None => match run_baseline(&ops, final_len) {
                        Ok(b) => b.text,
                        Err(_) => continue,
                    },
                };
                match run_net(&url, &ops, final_len, &expected, rep, timeout) {
                    Ok(r) => net = Some(r),
                    Err(e) => {
                        eprintln!("crdt_replay: rep {rep}: network FAILED: {e}");
                        failed = true;
                    }
                }
            }
        }
        if let (Some(b), Some(r)) = (base, net) {
            println!(
                "crdt_replay: rep {rep}: peerlink {:.0} ms to B equal (A issued the last op at {:.0} ms: {:.1} us/op; B had {} Updated events; \
                 {} polls of B after A was done); baseline in-memory yrs pair {:.0} ms ({:.1} us/op; {:.0} ms of it in the edits on doc 1), {} bytes of updates ({:.1} per op); \
                 ratio {:.1}",
                r.time.as_secs_f64() * 1e3,
                r.issued.as_secs_f64() * 1e3,
                r.issued.as_secs_f64() * 1e6 / n as f64,
                r.b_updates,
                r.tail_polls,
                b.time.as_secs_f64() * 1e3,
                b.time.as_secs_f64() * 1e6 / n as f64,
                b.local.as_secs_f64() * 1e3,
                b.bytes,
                b.bytes as f64 / n as f64,
                r.time.as_secs_f64() / b.time.as_secs_f64()
            );
            net_ms.push(r.time.as_secs_f64() * 1e3);
            base_ms.push(b.time.as_secs_f64() * 1e3);
        }
    }
    if let (Some(net), Some(base)) = (common::median(net_ms.clone()), common::median(base_ms)) {
        println!(
            "crdt_replay: RESULT {n} ops: peerlink (2 nodes, loopback) median {net:.0} ms vs in-memory yrs pair {base:.0} ms: ratio {:.1} ({} rep(s))",
            net / base,
            net_ms.len()
        );
    }
    drop(server);
    if failed { std::process::ExitCode::FAILURE } else { std::process::ExitCode::SUCCESS }
}
