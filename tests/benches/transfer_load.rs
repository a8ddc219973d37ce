//! File-transfer load benchmark (harness = false): memory during a very large transfer, and
//! fairness between concurrent transfers. Release build, UDP on 127.0.0.1, the real
//! signaling server, the blocking adapter.
//!
//! **Peak memory.** A `BENCH_XFER_GIB` GiB (default 4) transfer between two separate
//! processes (this binary re-invoked as `--role receiver` and `--role sender`), so each side's
//! peak RSS (`VmHWM`) is its own. The sender streams generated content from a
//! [`SourceFn`] (nothing on disk, nothing held), the receiver writes into a [`SinkFn`] that
//! hashes what it gets; the core checks each chunk's CRC-32 and the SHA-256 of the whole, and
//! the receiver's own hash must match the sender's. Goal: at most 64 MiB peak RSS each. The
//! baseline is each process's RSS once connected, before the transfer (printed beside it).
//!
//! **Fairness.** Three transfers of `BENCH_XFER_FAIR_MIB` MiB each (default 256) from one
//! node to another over one connection, at once. When half of all bytes have arrived, the
//! bytes each has delivered are compared: the least must be at least 80% of the most (within
//! 20%). The
//! aggregate rate is compared with one transfer of the same total size measured in the same
//! run (the baseline), as a ratio.
//!
//! Run: `cargo bench -p peerlink-tests --bench transfer_load`.
//! Env: BENCH_XFER_GIB (4), BENCH_XFER_FAIR_MIB (256), BENCH_XFER_SKIP_MEMORY=1,
//! BENCH_XFER_SKIP_FAIRNESS=1.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use peerlink::transfer::{Direction, FileInfo, SinkFn, SourceFn, TransferEvent};
use peerlink::{Fingerprint, NodeEvent};
use peerlink_blocking::PollNode;
use sha2::{Digest, Sha256};

mod common;

type Error = Box<dyn std::error::Error + Send + Sync>;

use peerlink_tests::{generate, generated_sha256 as generated_sha};

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Peak and current resident set of this process, KiB (`VmHWM`, `VmRSS`).
fn rss_kib() -> (u64, u64) {
    let pid = std::process::id();
    (common::vm_hwm(pid) / 1024, common::vm_rss(pid) / 1024)
}

fn node(url: &str) -> Result<PollNode, Error> {
    common::registered_node(url, &peerlink::PeerConfig::default())
}

/// Connects `node` to `target` and waits for the connection.
fn connect(node: &mut PollNode, target: Fingerprint) -> Result<(), Error> {
    node.connect_to_peer(target)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match node.next_event(Duration::from_millis(50))? {
            Some(NodeEvent::ChannelOpen { channel, .. }) if channel == "default" => return Ok(()),
            Some(NodeEvent::PeerError { error, .. }) => return Err(format!("connect: {error}").into()),
            _ => {}
        }
    }
    Err("connection timed out".into())
}

// ---- peak memory: two processes ----------------------------------------------------------

/// `--role receiver URL`: prints `FP <fingerprint>`, accepts one transfer into a hashing sink,
/// prints `DONE bytes secs sha256 baseline_rss_kib peak_rss_kib`.
fn receiver_role(url: &str) -> Result<(), Error> {
    let mut node = node(url)?;
    println!("FP {}", node.fingerprint());
    let hasher = Arc::new(std::sync::Mutex::new(Sha256::new()));
    let bytes = Arc::new(AtomicU64::new(0));
    let mut baseline = 0;
    let mut started = None;
    loop {
        let Some(NodeEvent::Transfer(e)) = node.next_event(Duration::from_millis(100))? else { continue };
        match e {
            TransferEvent::Offered { peer, offer } => {
                baseline = rss_kib().1;
                started = Some(Instant::now());
                let (h, b) = (hasher.clone(), bytes.clone());
                let sink = SinkFn(move |_offset: u64, data: &[u8]| {
                    h.lock().expect("lock").update(data);
                    b.fetch_add(data.len() as u64, Ordering::Relaxed);
                    Ok(())
                });
                node.accept_into(peer, offer.id, sink)?;
            }
            TransferEvent::Completed { .. } => {
                let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
                let sha = std::mem::take(&mut *hasher.lock().expect("lock")).finalize();
                println!("DONE {} {secs} {} {baseline} {}", bytes.load(Ordering::Relaxed), hex(&sha), rss_kib().0);
                return Ok(());
            }
            TransferEvent::Failed { error, .. } => return Err(format!("receiver: {error}").into()),
            _ => {}
        }
    }
}

/// `--role sender URL FINGERPRINT SIZE`: hashes the generated content (untimed), connects,
/// streams it, prints `DONE bytes secs sha256 baseline_rss_kib peak_rss_kib`.
fn sender_role(url: &str, target: &str, size: u64) -> Result<(), Error> {
    let target: Fingerprint = target.parse().map_err(|e| format!("fingerprint: {e}"))?;
    let sha = generated_sha(size);
    let mut node = node(url)?;
    connect(&mut node, target)?;
    let baseline = rss_kib().1;
    let started = Instant::now();
    let source = SourceFn(|offset: u64, buf: &mut [u8]| {
        generate(offset, buf);
        Ok(())
    });
    node.send_from(target, FileInfo::new("big.bin", size, sha), source)?;
    loop {
        match node.next_event(Duration::from_millis(100))? {
            Some(NodeEvent::Transfer(TransferEvent::Completed { .. })) => break,
            Some(NodeEvent::Transfer(TransferEvent::Failed { error, .. })) => return Err(format!("sender: {error}").into()),
            _ => {}
        }
    }
    println!("DONE {size} {} {} {baseline} {}", started.elapsed().as_secs_f64(), hex(&sha), rss_kib().0);
    Ok(())
}

struct Done {
    bytes: u64,
    secs: f64,
    sha: String,
    baseline_kib: u64,
    peak_kib: u64,
}

fn parse_done(line: &str) -> Result<Done, Error> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() != 6 || f[0] != "DONE" {
        return Err(format!("unexpected line: {line}").into());
    }
    Ok(Done { bytes: f[1].parse()?, secs: f[2].parse()?, sha: f[3].to_owned(), baseline_kib: f[4].parse()?, peak_kib: f[5].parse()? })
}

fn peak_memory(gib: u64) -> Result<bool, Error> {
    let size = gib << 30;
    let server = peerlink_tests::start_server(peerlink::ServerConfig::default());
    let url = server.url();
    let exe = std::env::current_exe()?;
    let mut receiver = Command::new(&exe).args(["--role", "receiver", &url]).stdout(Stdio::piped()).spawn()?;
    let mut rx = BufReader::new(receiver.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    rx.read_line(&mut line)?;
    let fp = line.strip_prefix("FP ").ok_or_else(|| format!("receiver said {line:?}"))?.trim().to_owned();
    let sender = Command::new(&exe).args(["--role", "sender", &url, &fp, &size.to_string()]).stdout(Stdio::piped()).spawn()?;
    let out = sender.wait_with_output()?;
    if !out.status.success() {
        let _ = receiver.kill();
        return Err(format!("sender failed: {}", out.status).into());
    }
    let sent = parse_done(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or(""))?;
    line.clear();
    rx.read_line(&mut line)?;
    let got = parse_done(&line)?;
    receiver.wait()?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "transfer_load: {gib} GiB in {:.1} s = {:.1} MB/s; sender peak RSS {:.1} MiB (connected: {:.1} MiB), receiver peak RSS {:.1} MiB (connected: {:.1} MiB)",
        got.secs,
        got.bytes as f64 / got.secs / 1e6,
        mib(sent.peak_kib),
        mib(sent.baseline_kib),
        mib(got.peak_kib),
        mib(got.baseline_kib)
    );
    let intact = got.bytes == size && got.sha == sent.sha;
    let small = sent.peak_kib <= 64 * 1024 && got.peak_kib <= 64 * 1024;
    println!(
        "transfer_load: RESULT peak RSS during {gib} GiB: sender {:.1} MiB, receiver {:.1} MiB (goal <= 64 MiB each: {}); content {}",
        mib(sent.peak_kib),
        mib(got.peak_kib),
        if small { "MET" } else { "MISSED" },
        if intact { "identical (SHA-256 matches)" } else { "DIFFERS" }
    );
    Ok(small && intact)
}

// ---- fairness: one process, two threads --------------------------------------------------

/// Sends `sizes.len()` transfers at once from one node to another; returns the bytes each had
/// delivered when half of all had arrived, and the time until all completed.
fn concurrent(url: &str, sizes: &[u64]) -> Result<(Vec<u64>, f64), Error> {
    let (fp_tx, fp_rx) = std::sync::mpsc::channel();
    let url2 = url.to_owned();
    let n = sizes.len();
    let sizes_owned = sizes.to_vec();
    let receiver = std::thread::spawn(move || -> Result<(Vec<u64>, Instant), Error> {
        common::pin_thread(1);
        let mut node = node(&url2)?;
        fp_tx.send(node.fingerprint())?;
        let counters: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let mut ids = Vec::new();
        let total: u64 = sizes_owned.iter().sum();
        let (mut half, mut done) = (None, 0);
        while done < n {
            let snapshot: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
            if half.is_none() && snapshot.iter().sum::<u64>() >= total / 2 {
                half = Some(snapshot);
            }
            let Some(NodeEvent::Transfer(e)) = node.next_event(Duration::from_millis(5))? else { continue };
            match e {
                TransferEvent::Offered { peer, offer } => {
                    let counter = counters[ids.len()].clone();
                    ids.push(offer.id);
                    node.accept_into(peer, offer.id, SinkFn(move |_: u64, d: &[u8]| {
                        counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                        Ok(())
                    }))?;
                }
                TransferEvent::Completed { direction: Direction::Receive, .. } => done += 1,
                TransferEvent::Failed { error, .. } => return Err(format!("receiver: {error}").into()),
                _ => {}
            }
        }
        Ok((half.unwrap_or_default(), Instant::now()))
    });
    common::pin_thread(0);
    let mut node = node(url)?;
    let target = fp_rx.recv_timeout(Duration::from_secs(10))?;
    connect(&mut node, target)?;
    let shas: Vec<[u8; 32]> = sizes.iter().map(|s| generated_sha(*s)).collect();
    let started = Instant::now();
    for (i, (size, sha)) in sizes.iter().zip(shas).enumerate() {
        let source = SourceFn(|offset: u64, buf: &mut [u8]| {
            generate(offset, buf);
            Ok(())
        });
        node.send_from(target, FileInfo::new(format!("t{i}.bin"), *size, sha), source)?;
    }
    let mut completed = 0;
    while completed < n {
        match node.next_event(Duration::from_millis(20))? {
            Some(NodeEvent::Transfer(TransferEvent::Completed { .. })) => completed += 1,
            Some(NodeEvent::Transfer(TransferEvent::Failed { error, .. })) => return Err(format!("sender: {error}").into()),
            _ => {}
        }
        if receiver.is_finished() {
            break;
        }
    }
    let (first, end) = receiver.join().map_err(|_| "receiver panicked")??;
    Ok((first, end.duration_since(started).as_secs_f64()))
}

fn fairness(mib: u64) -> Result<bool, Error> {
    let server = peerlink_tests::start_server(peerlink::ServerConfig::default());
    let url = server.url();
    let size = mib << 20;
    // Baseline first: one transfer of the same total.
    let (_, single_secs) = concurrent(&url, &[3 * size])?;
    let single = (3 * size) as f64 / single_secs / 1e6;
    let (first, secs) = concurrent(&url, &[size, size, size])?;
    let aggregate = (3 * size) as f64 / secs / 1e6;
    let (min, max) = (first.iter().copied().min().unwrap_or(0), first.iter().copied().max().unwrap_or(0));
    let share = if max == 0 { 0.0 } else { min as f64 / max as f64 };
    println!(
        "transfer_load: three concurrent {mib} MiB transfers: aggregate {aggregate:.1} MB/s; bytes each when half of all had arrived: {} MiB",
        first.iter().map(|b| format!("{:.1}", *b as f64 / 1048576.0)).collect::<Vec<_>>().join(" / ")
    );
    println!("transfer_load: one {} MiB transfer (baseline, same run): {single:.1} MB/s", 3 * mib);
    let fair = share >= 0.8;
    println!(
        "transfer_load: RESULT fairness: least/most {share:.3} (goal >= 0.8: {}); aggregate {aggregate:.1} MB/s vs one transfer {single:.1} MB/s: ratio {:.2}",
        if fair { "MET" } else { "MISSED" },
        aggregate / single
    );
    Ok(fair)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("--role") => {
            let role = match (args.get(2).map(String::as_str), args.get(3)) {
                (Some("receiver"), Some(url)) => receiver_role(url),
                (Some("sender"), Some(url)) => match (args.get(4), args.get(5).and_then(|s| s.parse().ok())) {
                    (Some(fp), Some(size)) => sender_role(url, fp, size),
                    _ => Err("--role sender URL FINGERPRINT SIZE".into()),
                },
                _ => Err("--role receiver URL | --role sender URL FINGERPRINT SIZE".into()),
            };
            return match role {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("transfer_load role: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        // `cargo bench` passes `--bench`.
        _ => (|| -> Result<bool, Error> {
            let mut ok = true;
            if std::env::var("BENCH_XFER_SKIP_MEMORY").map_or(true, |v| v != "1") {
                ok &= peak_memory(env_u64("BENCH_XFER_GIB", 4))?;
            }
            if std::env::var("BENCH_XFER_SKIP_FAIRNESS").map_or(true, |v| v != "1") {
                ok &= fairness(env_u64("BENCH_XFER_FAIR_MIB", 256))?;
            }
            Ok(ok)
        })(),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("transfer_load: {e}");
            ExitCode::FAILURE
        }
    }
}
