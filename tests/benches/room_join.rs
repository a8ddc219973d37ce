//! Room join latency (harness = false).
//!
//! **What is measured.** For rooms of 2, 5 and 10 members on 127.0.0.1 (the real signaling
//! server in-process on its own thread; every member a `peerlink_blocking::PollNode` with its
//! own UDP socket): the time from `create_room` on the first member (the joiners call
//! `join_room` as soon as it is created, all at once) to every member's view
//! (`Node::room`) listing every other member with `RoomPath::Direct`, i.e. the full mesh of
//! direct connections up with the room's internal channel open. Median and p95 (nearest rank:
//! with 20 samples, the 19th smallest) over `BENCH_JOIN_REPS` repetitions per size, after
//! `BENCH_JOIN_WARMUP` unreported ones. Every repetition uses fresh nodes (new identities,
//! new sockets, registered before the clock starts) and a fresh room; the server is shared.
//! Also printed: when the last member had `RoomEvent::Joined` (the server's part).
//!
//! **Baseline** (same run, same sizes, fresh nodes too): the same members form the same full
//! mesh without rooms: the first `join`s a namespace (signaling only); once that is answered
//! the others `join` it, all at once, and each calls every peer listed in its `Joined` reply
//! with plain `connect_to_peer` (the same rule as rooms: the newcomer calls those already
//! there). Timed from the first `join` to every member having `ChannelOpen` for the default
//! channel of every other member. Baseline and rooms alternate (baseline first in even
//! repetitions, rooms first in odd ones), so a drifting machine slows both alike.
//!
//! **Threading.** The machine this was written for has 2 cores: the server thread is pinned
//! to CPU 0, all the members of a repetition are polled round-robin by one thread pinned to
//! CPU 1 (BENCH_PIN=0 pins nothing), which sleeps 50 us after a round with no event. So the
//! members' handshakes (DTLS, SCTP) share one core, as they would in one process; more
//! members means more serialized handshake CPU in both configurations alike.
//!
//! Run: `cargo bench -p peerlink-tests --bench room_join` (about 12 s with the defaults).
//! Env: BENCH_JOIN_SIZES (2,5,10), BENCH_JOIN_REPS (20), BENCH_JOIN_WARMUP (2),
//! BENCH_JOIN_TIMEOUT_S (30, per repetition), BENCH_PIN (1).

mod common;

use std::cell::{Cell, RefCell};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use peerlink::{ClientEvent, Fingerprint, NodeEvent, Response, RoomEvent, RoomOptions, RoomPath};
use peerlink_blocking::PollNode;

type Error = common::BenchError;


fn env_u64(name: &str, default: u64) -> Result<u64, Error> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|e| format!("{name}={v:?}: {e}").into()),
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(e) => Err(format!("{name}: {e}").into()),
    }
}

struct Plan {
    sizes: Vec<usize>,
    reps: usize,
    warmup: usize,
    timeout: Duration,
    pin: bool,
}

impl Plan {
    fn from_env() -> Result<Self, Error> {
        let sizes = std::env::var("BENCH_JOIN_SIZES").unwrap_or_else(|_| "2,5,10".into());
        let sizes = sizes
            .split(',')
            .map(|s| s.trim().parse::<usize>().map_err(|e| format!("BENCH_JOIN_SIZES: {s:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let plan = Plan {
            sizes,
            reps: env_u64("BENCH_JOIN_REPS", 20)? as usize,
            warmup: env_u64("BENCH_JOIN_WARMUP", 2)? as usize,
            timeout: Duration::from_secs(env_u64("BENCH_JOIN_TIMEOUT_S", 30)?),
            pin: common::pinned(),
        };
        if plan.sizes.iter().any(|&n| n < 2) || plan.reps == 0 {
            return Err("sizes must be >= 2 and BENCH_JOIN_REPS > 0".into());
        }
        Ok(plan)
    }
}


use common::nodes::{failure as check_event, fresh_nodes, until_nodes as until};

fn close(mut nodes: Vec<PollNode>) {
    let now = Instant::now();
    for n in &mut nodes {
        let _ = n.node().close(now);
        let _ = n.poll(now);
    }
}

/// One timing of a room: (to the full direct mesh, to the last `Joined`).
fn time_room(nodes: &mut [PollNode], room: &str, deadline: Instant) -> Result<(Duration, Duration), Error> {
    let n = nodes.len();
    let joined = RefCell::new(vec![false; n]);
    let last_joined = Cell::new(None);
    let on = |_: &mut PollNode, i: usize, e: NodeEvent| -> Result<(), Error> {
        check_event(i, &e)?;
        if matches!(e, NodeEvent::Room(RoomEvent::Joined { .. })) {
            let mut joined = joined.borrow_mut();
            joined[i] = true;
            if joined.iter().all(|j| *j) {
                last_joined.set(Some(Instant::now()));
            }
        }
        Ok(())
    };
    let start = Instant::now();
    nodes[0].node().create_room(start, room, RoomOptions::group(n as u32))?;
    until(nodes, "room created", deadline, on, |ns| ns[0].node().room(room).is_some())?;
    let now = Instant::now();
    for node in &mut nodes[1..] {
        node.node().join_room(now, room)?;
    }
    let end = until(nodes, "full direct mesh", deadline, on, |ns| {
        ns.iter_mut().all(|node| {
            node.node().room(room).is_some_and(|r| r.members.len() == n - 1 && r.members.iter().all(|m| m.path == RoomPath::Direct))
        })
    })?;
    let last_joined = last_joined.get().ok_or("the mesh was complete before everyone had Joined")?;
    Ok((end - start, last_joined - start))
}

/// One timing of the baseline: namespace join, then `connect_to_peer` to everyone listed;
/// (to every default channel open, to the last join answered).
fn time_mesh(nodes: &mut [PollNode], namespace: &str, deadline: Instant) -> Result<(Duration, Duration), Error> {
    let n = nodes.len();
    let fps: Vec<Fingerprint> = nodes.iter().map(PollNode::fingerprint).collect();
    let open = RefCell::new(vec![vec![false; n]; n]);
    let opened = Cell::new(0);
    let answered = RefCell::new(vec![false; n]);
    let last_answered = Cell::new(None);
    let on = |node: &mut PollNode, i: usize, e: NodeEvent| -> Result<(), Error> {
        check_event(i, &e)?;
        match e {
            NodeEvent::Signaling(ClientEvent::Response { result: Ok(Response::Joined { peers, total, .. }), .. }) => {
                if peers.len() != total {
                    return Err(format!("member {i}: the Joined reply lists {} of {total} peers", peers.len()).into());
                }
                let now = Instant::now();
                for p in peers {
                    node.node().connect_to_peer(now, p.fingerprint)?;
                }
                let mut answered = answered.borrow_mut();
                answered[i] = true;
                if answered.iter().all(|a| *a) {
                    last_answered.set(Some(Instant::now()));
                }
            }
            NodeEvent::ChannelOpen { peer, channel } if channel == "default" => {
                let j = fps.iter().position(|f| *f == peer).ok_or("a channel to a stranger")?;
                if !std::mem::replace(&mut open.borrow_mut()[i][j], true) {
                    opened.set(opened.get() + 1);
                }
            }
            _ => {}
        }
        Ok(())
    };
    let start = Instant::now();
    nodes[0].client().join(start, namespace, None, None)?;
    until(nodes, "namespace joined", deadline, on, |_| answered.borrow()[0])?;
    let now = Instant::now();
    for node in &mut nodes[1..] {
        node.client().join(now, namespace, None, None)?;
    }
    let end = until(nodes, "full mesh of default channels", deadline, on, |_| opened.get() == n * (n - 1))?;
    let last_answered = last_answered.get().ok_or("the mesh was complete before every join was answered")?;
    Ok((end - start, last_answered - start))
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg has them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[derive(Default)]
struct Samples {
    total: Vec<Duration>,
    /// Rooms: to the last `Joined`; baseline: to the last namespace join answered.
    signaling: Vec<Duration>,
}

impl Samples {
    fn summary(&mut self) -> (Duration, Duration, Duration) {
        self.total.sort();
        self.signaling.sort();
        (pct(&self.total, 0.5), pct(&self.total, 0.95), pct(&self.signaling, 0.5))
    }
}

fn main() -> ExitCode {
    let wall = Instant::now();
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let plan = match Plan::from_env() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("room_join: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The server's thread inherits CPU 0; the members' thread (this one) then moves to CPU 1.
    common::pin_thread(0);
    let server = match peerlink_server::spawn(peerlink_server::ServerOptions::local()) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("room_join: signaling server: {e}");
            return ExitCode::FAILURE;
        }
    };
    common::pin_thread(1);
    let url = server.url();
    println!(
        "room_join: sizes {:?}, {} timed repetitions each (+{} warm-up), fresh nodes every repetition, UDP on 127.0.0.1, real server \
         in-process{}",
        plan.sizes,
        plan.reps,
        plan.warmup,
        if plan.pin { " (pinned to CPU 0), all members polled by one thread pinned to CPU 1" } else { ", nothing pinned" }
    );
    println!("room_join: load average at start: {} (other processes on the machine skew every figure)", loadavg());
    let mut failed = false;
    let mut uid = 0u64;
    for &n in &plan.sizes {
        let (mut rooms, mut mesh) = (Samples::default(), Samples::default());
        for rep in 0..plan.warmup + plan.reps {
            let timed = rep >= plan.warmup;
            let order: [bool; 2] = if rep % 2 == 0 { [false, true] } else { [true, false] };
            for is_room in order {
                uid += 1;
                let deadline = Instant::now() + plan.timeout;
                let result = fresh_nodes(&url, n, deadline).and_then(|mut nodes| {
                    let r = if is_room {
                        time_room(&mut nodes, &format!("join-{uid}"), deadline)
                    } else {
                        time_mesh(&mut nodes, &format!("mesh-{uid}"), deadline)
                    };
                    close(nodes);
                    r
                });
                let label = if is_room { "rooms" } else { "baseline" };
                match result {
                    Ok((total, signaling)) if timed => {
                        let s = if is_room { &mut rooms } else { &mut mesh };
                        s.total.push(total);
                        s.signaling.push(signaling);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("room_join: n={n} {label} repetition {rep}: FAILED: {e}");
                        failed = true;
                    }
                }
            }
        }
        if rooms.total.is_empty() || mesh.total.is_empty() {
            println!("room_join: RESULT n={n}: n/a (failures)");
            continue;
        }
        let (r50, r95, rj) = rooms.summary();
        let (b50, b95, bj) = mesh.summary();
        let list = |v: &[Duration]| v.iter().map(|d| format!("{:.1}", ms(*d))).collect::<Vec<_>>().join(" ");
        println!("room_join: n={n} rooms, sorted (ms): {}", list(&rooms.total));
        println!("room_join: n={n} baseline, sorted (ms): {}", list(&mesh.total));
        println!(
            "room_join: RESULT n={n}: rooms (create_room/join_room -> every view all Direct) median {:.1} ms, p95 {:.1} ms \
             (everyone Joined after median {:.1} ms); baseline (namespace join + connect_to_peer -> every default channel open) \
             median {:.1} ms, p95 {:.1} ms (joins answered after median {:.1} ms); ratio of medians {:.2} ({} + {} samples)",
            ms(r50),
            ms(r95),
            ms(rj),
            ms(b50),
            ms(b95),
            ms(bj),
            r50.as_secs_f64() / b50.as_secs_f64(),
            rooms.total.len(),
            mesh.total.len()
        );
    }
    println!("room_join: load average at the end: {}", loadavg());
    println!("room_join: wall time {:.1} s", wall.elapsed().as_secs_f64());
    drop(server);
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
