//! File transfer through an end-to-end encrypted room vs the same transfer through a plain
//! room (harness = false). Release build, UDP on 127.0.0.1, the real signaling server
//! (in-process, `peerlink_tests::start_server`), the blocking adapter.
//!
//! **What is measured.** Each run takes two fresh nodes (A and B, each a
//! `peerlink_blocking::PollNode` on a thread of its own: A pinned to CPU 0, B to CPU 1 unless
//! BENCH_PIN=0). A creates a room of two (`RoomOptions::group(2)`, `.encrypted()` in an
//! encrypted run), B joins it (`JoinOptions::encrypted()` in an encrypted run) and calls A,
//! so the transfer goes over their direct data channel. Untimed setup: both wait until their
//! room view shows the other on `RoomPath::Direct` and, in an encrypted run, until their
//! `EncryptionEvent::Ready` for the other came. Then A streams `BENCH_E2E_MIB` MiB of
//! generated content (`peerlink_tests::generate`) from a [`SourceFn`] with `send_from`; B
//! accepts it into a [`SinkFn`] that hashes (SHA-256) and counts what arrives. Between
//! members of an encrypted room the core seals every transfer message (AES-256-GCM in the
//! session's transfer lane); in a plain room it does not. Timed on B: from `accept_into` to
//! `TransferEvent::Completed` (the core checked each chunk's CRC-32 and the SHA-256 of the
//! whole). MB/s is 10^6 bytes per second. Each side's thread CPU time over the transfer is
//! printed too (user + system), which shows the cost of sealing and opening even when the
//! wall-clock rate is limited elsewhere.
//!
//! **Checks** (a failed one ends the bench with a non-zero exit code): B's own hash and byte
//! count equal the sender's (the SHA-256 of the generated content, computed once, untimed);
//! both sides' `Node::room` views say `encrypted` is what the run asked for; in an encrypted
//! run both sides had `EncryptionEvent::Ready` for the other, in a plain run neither had any
//! `NodeEvent::Encryption` at all; no peer error, room error, refused message or failed
//! transfer.
//!
//! **Fairness.** Runs alternate, plain then encrypted (`BENCH_E2E_ROUNDS` pairs), so a
//! machine whose speed drifts slows both alike. The result compares the medians
//! (encrypted / plain) and prints each pair's ratio too. Goal (the issue's): the encrypted
//! transfer reaches at least 0.9x the plain one's throughput. The load average is printed
//! before and after: other processes on the machine (a build) skew every figure.
//!
//! Run: `cargo bench -p peerlink-tests --bench encrypted_transfer`.
//! Env: BENCH_E2E_MIB (256), BENCH_E2E_ROUNDS (3), BENCH_E2E_TIMEOUT_S (120, per run),
//! BENCH_PIN (1).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use peerlink::transfer::{Direction, FileInfo, SinkFn, SourceFn, TransferEvent};
use peerlink::{EncryptionEvent, Fingerprint, JoinOptions, NodeEvent, RoomEvent, RoomOptions, RoomPath};
use peerlink_blocking::PollNode;
use peerlink_tests::{generate, generated_sha256};
use sha2::{Digest, Sha256};

mod common;

type Error = common::BenchError;

/// What both sides of one run share: fingerprints and how far each got.
#[derive(Default)]
struct Shared {
    fingerprints: [OnceLock<Fingerprint>; 2],
    /// A's room exists (B may join).
    created: AtomicBool,
    /// Each side sees the other on the direct path (and, encrypted, had its `Ready`).
    ready: [AtomicBool; 2],
    /// A saw its transfer complete: B may let go.
    done: AtomicBool,
    /// A side failed: the other stops waiting.
    abort: AtomicBool,
}

/// One side of a run: its node and what it saw.
struct Side<'a> {
    node: PollNode,
    me: usize,
    shared: &'a Shared,
    room: &'a str,
    deadline: Instant,
    /// `EncryptionEvent::Ready` for the other side came.
    ready_event: bool,
    /// Any `NodeEvent::Encryption` came.
    any_encryption: bool,
}

impl Side<'_> {
    fn other(&self) -> Option<Fingerprint> {
        self.shared.fingerprints[1 - self.me].get().copied()
    }

    /// The next event (waiting up to `wait`), after checking it for failures and noting
    /// encryption events.
    fn next(&mut self, wait: Duration) -> Result<Option<NodeEvent>, Error> {
        if self.shared.abort.load(Ordering::Relaxed) {
            return Err("the other side failed".into());
        }
        if Instant::now() >= self.deadline {
            return Err("timed out".into());
        }
        let Some(e) = self.node.next_event(wait)? else { return Ok(None) };
        match &e {
            NodeEvent::PeerError { error, .. } => return Err(format!("peer error: {error}").into()),
            NodeEvent::Room(RoomEvent::Error { error, .. }) => return Err(format!("room: {error}").into()),
            NodeEvent::Transfer(TransferEvent::Failed { error, .. }) => return Err(format!("transfer failed: {error}").into()),
            NodeEvent::Transfer(TransferEvent::BadMessage { error, .. }) => return Err(format!("bad transfer message: {error}").into()),
            NodeEvent::Encryption(EncryptionEvent::Refused { error, .. }) => return Err(format!("encryption refused: {error}").into()),
            NodeEvent::Encryption(EncryptionEvent::Ready { peer, .. }) => {
                self.any_encryption = true;
                self.ready_event |= Some(*peer) == self.other();
            }
            NodeEvent::Encryption(_) => self.any_encryption = true,
            _ => {}
        }
        Ok(Some(e))
    }

    /// Polls until `cond`, `what` naming it in a timeout.
    fn until(&mut self, what: &str, mut cond: impl FnMut(&mut Self) -> bool) -> Result<(), Error> {
        while !cond(self) {
            self.next(Duration::from_millis(5)).map_err(|e| format!("{what}: {e}"))?;
        }
        Ok(())
    }

    /// Waits for the direct path to the other side (and, `encrypted`, its `Ready`), says so,
    /// then checks the room's view.
    fn settle(&mut self, encrypted: bool) -> Result<(), Error> {
        self.until("direct path and keys", |s| {
            let Some(other) = s.other() else { return false };
            let direct = s.node.room_info(s.room).is_some_and(|r| {
                r.members.iter().any(|m| m.info.fingerprint == other && m.path == RoomPath::Direct)
            });
            direct && (s.ready_event || !encrypted)
        })?;
        self.shared.ready[self.me].store(true, Ordering::Relaxed);
        let view = self.node.room_info(self.room).ok_or("not in the room")?;
        if view.encrypted != encrypted {
            return Err(format!("room view says encrypted = {}, the run asked for {encrypted}", view.encrypted).into());
        }
        Ok(())
    }

    /// Checks what encryption events came against what the run asked for.
    fn check_encryption(&self, encrypted: bool) -> Result<(), Error> {
        match (encrypted, self.ready_event, self.any_encryption) {
            (true, false, _) => Err("encrypted room but no EncryptionEvent::Ready for the other side".into()),
            (false, _, true) => Err("plain room but an encryption event came".into()),
            _ => Ok(()),
        }
    }
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    // SAFETY: clock_gettime writes into the timespec on our stack.
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The sender: creates the room, waits for B and the keys, streams the content.
/// Returns its CPU time over the transfer.
fn sender(side: &mut Side<'_>, encrypted: bool, size: u64, sha: [u8; 32]) -> Result<Duration, Error> {
    let options = if encrypted { RoomOptions::group(2).encrypted() } else { RoomOptions::group(2) };
    side.node.create_room(side.room, options)?;
    side.until("room created", |s| s.node.room_info(s.room).is_some())?;
    side.shared.created.store(true, Ordering::Relaxed);
    side.settle(encrypted)?;
    side.until("the receiver's direct path and keys", |s| s.shared.ready[1].load(Ordering::Relaxed))?;
    let target = side.other().ok_or("no receiver fingerprint")?;
    let cpu = thread_cpu();
    let source = SourceFn(|offset: u64, buf: &mut [u8]| {
        generate(offset, buf);
        Ok(())
    });
    side.node.send_from(target, FileInfo::new("bench.bin", size, sha), source)?;
    loop {
        if let Some(NodeEvent::Transfer(TransferEvent::Completed { direction: Direction::Send, .. })) = side.next(Duration::from_millis(5))? {
            let cpu = thread_cpu() - cpu;
            side.shared.done.store(true, Ordering::Relaxed);
            return Ok(cpu);
        }
    }
}

/// What the receiver saw of the transfer.
struct Received {
    secs: f64,
    cpu: Duration,
    bytes: u64,
    sha: [u8; 32],
}

/// The receiver: joins the room, waits for A and the keys, takes the transfer into a hashing
/// sink.
fn receiver(side: &mut Side<'_>, encrypted: bool) -> Result<Received, Error> {
    side.until("room to join", |s| s.shared.created.load(Ordering::Relaxed))?;
    let options = if encrypted { JoinOptions::encrypted() } else { JoinOptions::default() };
    side.node.node().join_room_with(Instant::now(), side.room, options)?;
    side.settle(encrypted)?;
    let hasher = Arc::new(Mutex::new(Sha256::new()));
    let bytes = Arc::new(AtomicU64::new(0));
    let mut started = None;
    let (secs, cpu) = loop {
        let Some(NodeEvent::Transfer(e)) = side.next(Duration::from_millis(5))? else { continue };
        match e {
            TransferEvent::Offered { peer, offer } if started.is_none() => {
                let (h, b) = (hasher.clone(), bytes.clone());
                let sink = SinkFn(move |_offset: u64, data: &[u8]| {
                    h.lock().expect("lock").update(data);
                    b.fetch_add(data.len() as u64, Ordering::Relaxed);
                    Ok(())
                });
                started = Some((Instant::now(), thread_cpu()));
                side.node.accept_into(peer, offer.id, sink)?;
            }
            TransferEvent::Offered { .. } => return Err("a second offer".into()),
            TransferEvent::Completed { direction: Direction::Receive, .. } => {
                let (t, c) = started.ok_or("completed before it was offered")?;
                break (t.elapsed().as_secs_f64(), thread_cpu() - c);
            }
            _ => {}
        }
    };
    // Keep polling until the sender heard of the completion.
    side.until("the sender's completion", |s| s.shared.done.load(Ordering::Relaxed))?;
    let sha = std::mem::take(&mut *hasher.lock().expect("lock")).finalize().into();
    Ok(Received { secs, cpu, bytes: bytes.load(Ordering::Relaxed), sha })
}

/// Runs `body` on side `me` of a run (its own thread: a fresh node, pinned to CPU `me`),
/// then checks the encryption events it saw.
fn side<T>(url: &str, shared: &Shared, room: &str, me: usize, encrypted: bool, timeout: Duration, body: impl FnOnce(&mut Side<'_>) -> Result<T, Error>) -> Result<T, Error> {
    common::pin_thread(me);
    let run = || {
        let node = common::registered_node(url, &peerlink::PeerConfig::default())?;
        shared.fingerprints[me].set(node.fingerprint()).map_err(|_| "fingerprint set twice")?;
        let mut side = Side { node, me, shared, room, deadline: Instant::now() + timeout, ready_event: false, any_encryption: false };
        let out = body(&mut side)?;
        side.check_encryption(encrypted)?;
        Ok(out)
    };
    let result = run();
    if result.is_err() {
        shared.abort.store(true, Ordering::Relaxed);
    }
    result.map_err(|e: Error| format!("{}: {e}", ["sender", "receiver"][me]).into())
}

/// One run's figures.
struct Run {
    mb_s: f64,
    secs: f64,
    sender_cpu: Duration,
    receiver_cpu: Duration,
}

fn run(url: &str, encrypted: bool, index: usize, size: u64, sha: [u8; 32], timeout: Duration) -> Result<Run, Error> {
    let shared = Shared::default();
    let room = format!("e2e-xfer-{}-{index}", std::process::id());
    let (sent, got) = std::thread::scope(|scope| {
        let a = scope.spawn(|| side(url, &shared, &room, 0, encrypted, timeout, |s| sender(s, encrypted, size, sha)));
        let b = scope.spawn(|| side(url, &shared, &room, 1, encrypted, timeout, |s| receiver(s, encrypted)));
        (a.join(), b.join())
    });
    let sender_cpu = sent.map_err(|_| "sender panicked")??;
    let got = got.map_err(|_| "receiver panicked")??;
    if got.bytes != size || got.sha != sha {
        return Err(format!("content differs: received {} of {size} bytes, SHA-256 {}", got.bytes, if got.sha == sha { "matches" } else { "DIFFERS" }).into());
    }
    Ok(Run { mb_s: size as f64 / got.secs / 1e6, secs: got.secs, sender_cpu, receiver_cpu: got.cpu })
}

fn env_u64(name: &str, default: u64) -> Result<u64, Error> {
    std::env::var(name).map_or(Ok(default), |v| v.trim().parse().map_err(|e| format!("{name}={v:?}: {e}").into()))
}

fn load_average() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split(' ').take(3).collect::<Vec<_>>().join(" ")
}

fn label(encrypted: bool) -> &'static str {
    if encrypted { "encrypted" } else { "plain" }
}

fn bench() -> Result<bool, Error> {
    let mib = env_u64("BENCH_E2E_MIB", 256)?;
    let rounds = env_u64("BENCH_E2E_ROUNDS", 3)?.max(1) as usize;
    let timeout = Duration::from_secs(env_u64("BENCH_E2E_TIMEOUT_S", 120)?);
    let size = mib << 20;
    let server = peerlink_tests::start_server(peerlink::ServerConfig::default());
    let url = server.url();
    println!(
        "encrypted_transfer: {mib} MiB per run, {rounds} pairs of runs (plain, encrypted), fresh nodes each run, UDP on 127.0.0.1, pinned: {}; load average at start: {}",
        common::pinned(),
        load_average()
    );
    let sha = generated_sha256(size);
    let mut figures: [Vec<f64>; 2] = Default::default();
    for round in 0..rounds {
        for encrypted in [false, true] {
            let r = run(&url, encrypted, 2 * round + encrypted as usize, size, sha, timeout)
                .map_err(|e| format!("round {} {}: {e}", round + 1, label(encrypted)))?;
            println!(
                "encrypted_transfer: round {} {:>9}: {mib} MiB in {:.2} s = {:.1} MB/s (CPU: sender {:.2} s, receiver {:.2} s); content identical, encryption {}",
                round + 1,
                label(encrypted),
                r.secs,
                r.mb_s,
                r.sender_cpu.as_secs_f64(),
                r.receiver_cpu.as_secs_f64(),
                if encrypted { "on (room encrypted, Ready on both sides)" } else { "off (no encryption event)" }
            );
            figures[encrypted as usize].push(r.mb_s);
        }
    }
    let pairs: Vec<String> = figures[0].iter().zip(&figures[1]).map(|(p, e)| format!("{:.3}", e / p)).collect();
    let plain = common::median(figures[0].clone()).ok_or("no plain runs")?;
    let encrypted = common::median(figures[1].clone()).ok_or("no encrypted runs")?;
    let ratio = encrypted / plain;
    let pass = ratio >= 0.9;
    println!("encrypted_transfer: load average at end: {}", load_average());
    println!("encrypted_transfer: ratio per pair (encrypted / plain): {}", pairs.join(" "));
    println!(
        "encrypted_transfer: RESULT {mib} MiB file transfer: encrypted room median {encrypted:.1} MB/s, plain room median {plain:.1} MB/s: ratio {ratio:.3} (goal >= 0.9: {})",
        if pass { "PASS" } else { "FAIL" }
    );
    Ok(pass)
}

fn main() -> ExitCode {
    match bench() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("encrypted_transfer: {e}");
            ExitCode::FAILURE
        }
    }
}
