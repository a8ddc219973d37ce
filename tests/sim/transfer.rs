//! File transfer between two Nodes in the simulator, with the test playing the application
//! (answering reads from memory, collecting writes): resume after the connection is replaced
//! midway, 64 MiB over a slow lossy path through a 30 s outage, and a corrupted chunk.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use peerlink::transfer::{Direction, FileInfo, TransferError, TransferEvent};
use peerlink::{NodeEvent, PeerError, PeerState};
use peerlink_sim::{LinkConfig, NodeId, Sim};
use rand::RngCore;
use rand_chacha::rand_core::SeedableRng;
use sha2::{Digest, Sha256};

use crate::harness::*;

/// One side's application: answers reads from memory, collects writes and outcomes.
#[derive(Default)]
struct App {
    sources: BTreeMap<u64, Vec<u8>>,
    sinks: BTreeMap<u64, Vec<u8>>,
    /// Bytes handed over for reads (more than the file when some were read again).
    provided: u64,
    /// Hands over the chunk at this offset with its first bit flipped (a bad disk or reader).
    flip_at: Option<u64>,
    completed: Vec<(u64, Direction)>,
    failed: Vec<(u64, Direction, TransferError)>,
    states: Vec<(Duration, PeerState)>,
    errors: Vec<(Duration, PeerError)>,
}

/// Runs the world, acting as both applications, until `done` holds or `max` passes; returns
/// whether `done` held.
fn run_until(sim: &mut Sim, nodes: [NodeId; 2], apps: &mut [App; 2], max: Duration, done: impl Fn(&[App; 2]) -> bool) -> bool {
    let end = sim.elapsed() + max;
    while !done(apps) {
        if sim.elapsed() >= end {
            return false;
        }
        sim.run_for(Duration::from_millis(5));
        for (i, &n) in nodes.iter().enumerate() {
            for (at, e) in sim.take_events(n) {
                let e = match e {
                    NodeEvent::Transfer(e) => e,
                    NodeEvent::PeerState { state, .. } => {
                        apps[i].states.push((at, state));
                        continue;
                    }
                    NodeEvent::PeerError { error, .. } => {
                        apps[i].errors.push((at, error));
                        continue;
                    }
                    _ => continue,
                };
                match e {
                    TransferEvent::Offered { peer, offer } => sim.with_node(n, |node, now| node.accept_transfer(now, peer, offer.id)).unwrap(),
                    TransferEvent::Read { peer, id, offset, len } => {
                        let mut data = apps[i].sources[&id][offset as usize..offset as usize + len].to_vec();
                        if apps[i].flip_at == Some(offset) {
                            data[0] ^= 1;
                        }
                        apps[i].provided += len as u64;
                        sim.with_node(n, |node, now| node.provide_chunk(now, peer, id, offset, data)).unwrap();
                    }
                    TransferEvent::Write { id, offset, data, .. } => {
                        let sink = apps[i].sinks.entry(id).or_default();
                        assert_eq!(sink.len() as u64, offset);
                        sink.extend_from_slice(&data);
                    }
                    TransferEvent::Completed { id, direction, .. } => apps[i].completed.push((id, direction)),
                    TransferEvent::Failed { id, direction, error, .. } => apps[i].failed.push((id, direction, error)),
                    _ => {}
                }
            }
        }
    }
    true
}

/// Runs the world for `d`, acting as both applications.
fn run(sim: &mut Sim, nodes: [NodeId; 2], apps: &mut [App; 2], d: Duration) {
    run_until(sim, nodes, apps, d, |_| false);
}

/// Offers `data` from `a` to `b`; `apps[0]` will serve it. Returns the transfer id.
fn offer(sim: &mut Sim, a: NodeId, b: NodeId, apps: &mut [App; 2], data: Vec<u8>) -> u64 {
    let sha: [u8; 32] = Sha256::digest(&data).into();
    let fb = sim.fingerprint(b);
    let id = sim.with_node(a, |node, now| node.send_file(now, fb, FileInfo::new("big.bin", data.len() as u64, sha))).unwrap();
    apps[0].sources.insert(id, data);
    id
}

/// Whether at least half of transfer `id` reached the receiver.
fn half_arrived(apps: &[App; 2], id: u64) -> bool {
    apps[1].sinks.get(&id).map_or(0, Vec::len) * 2 >= apps[0].sources[&id].len()
}

/// Whether transfer `id` ended on both sides, either way.
fn ended(apps: &[App; 2], id: u64) -> bool {
    apps.iter().all(|app| app.completed.iter().any(|c| c.0 == id) || app.failed.iter().any(|f| f.0 == id))
}

#[test]
fn a_file_survives_a_replaced_connection_without_resending_what_arrived() {
    let (mut sim, nodes) = world(21, 2);
    let (a, b) = (nodes[0], nodes[1]);
    connect(&mut sim, a, b, Duration::from_secs(5));
    let data: Vec<u8> = (0..4_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let mut apps = [App::default(), App::default()];
    let id = offer(&mut sim, a, b, &mut apps, data.clone());
    // Until about half arrived, then the connection is closed and made anew.
    assert!(run_until(&mut sim, [a, b], &mut apps, Duration::from_secs(10), |apps| half_arrived(apps, id)), "half never arrived");
    let fb = sim.fingerprint(b);
    sim.with_node(a, |node, now| node.close_peer(now, fb)).unwrap();
    run(&mut sim, [a, b], &mut apps, Duration::from_millis(200));
    assert!(apps[1].states.iter().any(|s| s.1 == PeerState::Closed), "the connection did not close: {:?}", apps[1].states);
    connect(&mut sim, a, b, Duration::from_secs(10));
    run(&mut sim, [a, b], &mut apps, Duration::from_secs(20));
    assert!(apps[1].failed.is_empty() && apps[0].failed.is_empty(), "{:?} / {:?}", apps[0].failed, apps[1].failed);
    assert!(apps[1].sinks[&id] == data, "received {} of {} bytes", apps[1].sinks[&id].len(), data.len());
    assert_eq!(apps[1].completed, [(id, Direction::Receive)]);
    assert_eq!(apps[0].completed, [(id, Direction::Send)]);
    // What arrived before the cut was not read (nor sent) again: at most a read-ahead window
    // plus what was in flight.
    let again = apps[0].provided - data.len() as u64;
    eprintln!("read again after the cut: {again} bytes");
    assert!(again <= 512 * 1024, "{again} bytes read twice");
}

/// What one run of the outage scenario measured.
#[derive(Debug)]
#[allow(dead_code)] // Read through `Debug`, in the test's output.
struct OutageRun {
    seed: u64,
    /// Virtual time from the offer to both sides' `Completed`.
    sim_time: Duration,
    /// Virtual time from the heal to `Connected` again (both sides).
    reconnected: Duration,
    /// Virtual time from the heal to the next bytes at the receiver.
    resumed: Duration,
    /// Bytes the sender's application handed over more than once.
    read_again: u64,
    /// Datagrams sent (both ways, every kind), and lost to the 10%.
    datagrams: u64,
    lost: u64,
    wall: Duration,
}

/// `size` bytes from one node to another over 100 ms each way with 10% loss each way, and a
/// 30 s partition once half arrived; default configuration.
///
/// What the library does on its own: both sides find the peer silent after
/// `disconnect_timeout` (5 s) and go `Disconnected`; the offerer restarts ICE with backoff
/// (1, 2, 4, 8, 16 s) and the first restart after the heal reconnects, 7-9 s after it. The
/// 30 s stay under `failed_timeout` (60 s), so the session (DTLS, SCTP, the transfer channel)
/// is kept: SCTP retransmits what the partition ate once its backed-off retransmission timer
/// fires, the transfer layer sees no reconnect (`handle_reconnected` is not called), and the
/// application neither reconnects nor reads anything twice. Under 10% loss and a 200 ms round
/// trip SCTP moves about 15 KB/s, so 64 MiB take about 75 minutes of virtual time.
fn through_an_outage(seed: u64, size: usize) -> OutageRun {
    let wall = Instant::now();
    let (mut sim, nodes) = world(seed, 2);
    let (a, b) = (nodes[0], nodes[1]);
    sim.set_link(a, b, LinkConfig::new(Duration::from_millis(100)).loss(0.10));
    connect(&mut sim, a, b, Duration::from_secs(60));
    let mut data = vec![0; size];
    rand_chacha::ChaCha20Rng::seed_from_u64(seed).fill_bytes(&mut data);
    let sha: [u8; 32] = Sha256::digest(&data).into();
    let mut apps = [App::default(), App::default()];
    let id = offer(&mut sim, a, b, &mut apps, data);
    let start = sim.elapsed();
    let nodes = [a, b];
    let max = Duration::from_secs(3 * 3600);
    let why = |apps: &[App; 2]| {
        let got = apps[1].sinks.get(&id).map_or(0, Vec::len);
        format!("seed {seed}: {got} of {size} bytes; failed {:?} / {:?}; states {:?} / {:?}; errors {:?} / {:?}", apps[0].failed, apps[1].failed, apps[0].states, apps[1].states, apps[0].errors, apps[1].errors)
    };
    assert!(run_until(&mut sim, nodes, &mut apps, max, |apps| half_arrived(apps, id) || ended(apps, id)), "half never arrived: {}", why(&apps));
    assert!(!ended(&apps, id), "ended before the outage: {}", why(&apps));
    sim.partition(a, b);
    let cut = sim.elapsed();
    run(&mut sim, nodes, &mut apps, Duration::from_secs(30));
    sim.heal(a, b);
    let healed = sim.elapsed();
    let before = apps[1].sinks[&id].len();
    run_until(&mut sim, nodes, &mut apps, max, |apps| apps[1].sinks[&id].len() > before || ended(apps, id));
    let resumed = sim.elapsed() - healed;
    assert!(run_until(&mut sim, nodes, &mut apps, max, |apps| ended(apps, id)), "stalled: {}", why(&apps));
    assert!(apps[0].failed.is_empty() && apps[1].failed.is_empty(), "failed: {}", why(&apps));
    assert_eq!(apps[1].completed, [(id, Direction::Receive)], "seed {seed}");
    assert_eq!(apps[0].completed, [(id, Direction::Send)], "seed {seed}");
    let sink = &apps[1].sinks[&id];
    assert!(sink.len() == size && <[u8; 32]>::from(Sha256::digest(sink)) == sha && *sink == apps[0].sources[&id], "seed {seed}: the sink differs");
    // Disconnected during the outage, connected again after it, and nothing else: no
    // failure, no new connection (see the doc above).
    let mut reconnected = healed;
    for app in &apps {
        let after: Vec<PeerState> = app.states.iter().filter(|s| s.0 > cut).map(|s| s.1).collect();
        assert_eq!(after, [PeerState::Disconnected, PeerState::Connected], "{}", why(&apps));
        reconnected = reconnected.max(app.states.last().expect("states").0);
    }
    let read_again = apps[0].provided - size as u64;
    assert_eq!(read_again, 0, "seed {seed}: the same session goes on, nothing is read twice");
    let stats = sim.net_stats();
    assert!(stats.lost > 0 && stats.partitioned > 0, "seed {seed}: the link lost nothing: the test tests nothing");
    OutageRun {
        seed,
        sim_time: sim.elapsed() - start,
        reconnected: reconnected - healed,
        resumed,
        read_again,
        datagrams: stats.sent,
        lost: stats.lost,
        wall: wall.elapsed(),
    }
}

/// Runs `f` for every seed on two threads; a panic fails that seed only. Each world is
/// single-threaded and deterministic: `Sim::new` seeds str0m's thread-local `fastrand` on the
/// thread that runs it.
fn on_two_threads<T: Send>(seeds: std::ops::Range<u64>, f: impl Fn(u64) -> T + Sync) -> Vec<Result<T, u64>> {
    let next = AtomicU64::new(seeds.start);
    let out = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= seeds.end {
                        break;
                    }
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(seed)));
                    out.lock().unwrap().push(r.map_err(|_| seed));
                }
            });
        }
    });
    out.into_inner().unwrap()
}

// About 7 s of wall time per seed in a debug build on an idle core; 20 seeds took 123-177 s
// on two threads of a 2-core machine busy with other builds. Under DTLS 1.3 (dimpl 0.7.6),
// seeds 1, 5, 16 and 17 lost their connection 2047 s in (a lost ACK of the client's last
// handshake flight is never repaired): the reason DTLS 1.2 is the default.
#[test]
fn sixty_four_mib_over_a_lossy_200ms_round_trip_survive_a_30s_outage_over_20_seeds() {
    let wall = Instant::now();
    let mut runs = on_two_threads(0..20, |seed| through_an_outage(seed, 64 << 20));
    runs.sort_by_key(|r| *r.as_ref().map(|r| &r.seed).unwrap_or_else(|seed| seed));
    for r in &runs {
        eprintln!("{r:?}");
    }
    eprintln!("20 seeds in {:?}", wall.elapsed());
    let failed: Vec<u64> = runs.iter().filter_map(|r| r.as_ref().err().copied()).collect();
    assert!(failed.is_empty(), "failed seeds: {failed:?}");
}

/// Seed 68 (4 MiB, so about 5 minutes of virtual time): the peers reconnect 7 s after the
/// heal, but SCTP's backed-off retransmission timer (RTO doubling up to 60 s) moves nothing for
/// the next 90 s. The transfers' timeout once counted idle time and failed the transfer here;
/// it now counts only time without a connection.
#[test]
fn a_peer_back_from_an_outage_does_not_time_the_transfer_out() {
    through_an_outage(68, 4 << 20);
}

#[test]
fn a_chunk_corrupted_by_the_sending_application_fails_both_sides() {
    // The sender's CRC-32 covers the bytes it was given, so only the SHA-256 of the whole
    // catches a bad read. A chunk corrupted after its CRC was computed (impossible on the wire
    // under DTLS) is `CorruptChunk`: `a_corrupt_chunk_and_a_wrong_hash_are_detected` in
    // core/src/transfer/tests.rs covers that.
    let (mut sim, nodes) = world(22, 2);
    let (a, b) = (nodes[0], nodes[1]);
    connect(&mut sim, a, b, Duration::from_secs(5));
    let mut apps = [App::default(), App::default()];
    apps[0].flip_at = Some(5 * 16 * 1024);
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let id = offer(&mut sim, a, b, &mut apps, data);
    assert!(run_until(&mut sim, [a, b], &mut apps, Duration::from_secs(20), |apps| ended(apps, id)), "the transfer never ended");
    // Some more time: no late `Completed` on either side.
    run(&mut sim, [a, b], &mut apps, Duration::from_secs(2));
    assert_eq!(apps[1].failed, [(id, Direction::Receive, TransferError::HashMismatch)]);
    assert_eq!(apps[0].failed, [(id, Direction::Send, TransferError::HashMismatch)]);
    assert!(apps[1].completed.is_empty() && apps[0].completed.is_empty(), "{:?} / {:?}", apps[0].completed, apps[1].completed);
}

