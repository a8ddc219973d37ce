//! Data-channel throughput through a TURN relay (coturn) versus direct (harness = false).
//!
//! **What is measured.** The same transfer as `dc_throughput`'s peerlink series, through the
//! same harness (`common::throughput`): two `PollNode`s (the blocking adapter) on 127.0.0.1,
//! each on its own OS thread, registered with the real signaling server in-process; the
//! sender writes `BENCH_TURN_MIB` MiB as `BENCH_TURN_MSG`-byte binary messages on the default
//! channel, with backpressure (`WouldBlock`, then `BufferedAmountLow`); the figure is bytes /
//! (time of the last byte received - time of the first write), in MB/s (10^6 bytes/s).
//! Connection setup (registration, the TURN allocation, ICE, DTLS, SCTP) is not timed; every
//! run connects two fresh nodes.
//!
//! **The two configurations**, in alternating rounds of the same run (direct, relay, direct,
//! relay, ...), so a machine whose speed drifts slows both alike:
//! - direct: default `NodeConfig` (policy `all`, no ICE servers): host candidates on loopback;
//! - relay: `IceTransportPolicy::Relay` and a `turn:` entry for coturn (long-term credentials):
//!   each node allocates on coturn and offers only its relayed address, so every datagram goes
//!   sender -> coturn (sender's allocation) -> coturn (receiver's allocation) -> receiver, in
//!   TURN channels, and the acknowledgements back the same way.
//!
//! coturn is Debian's `turnserver` started by `peerlink_tests::coturn::Coturn` with
//! `--lt-cred-mech --user=u:p --realm=peerlink --allow-loopback-peers --relay-ip=127.0.0.1` (and
//! the harness's `-n --no-tls --no-dtls --no-cli --listening-ip=127.0.0.1 --log-file=stdout`,
//! stdout discarded): otherwise its defaults (relay threads: one per CPU, no bandwidth limit).
//! Its CPU time (user + system, all threads, from /proc/PID/stat) is read around every run of
//! both configurations (around a direct run it should stay at zero: the control that the
//! relay runs really went through it).
//!
//! **Pinning.** Unless BENCH_PIN=0, the sender thread is pinned to CPU 0 and the receiver to
//! CPU 1, as in `dc_throughput`. coturn is a third process, not pinned: on a 2-core machine
//! its threads share the cores with the two endpoints, so the relay figure is what one machine
//! running both peers and the relay can do, not what a dedicated relay host could.
//!
//! Run: `cargo bench -p peerlink-tests --bench turn_throughput`.
//! Env: BENCH_TURN_MIB (256), BENCH_TURN_MSG (16384), BENCH_TURN_RUNS (5),
//! BENCH_TURN_TIMEOUT_S (120, per run), BENCH_PIN (1).

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

mod common;

use common::measure::{MachineCpu, loadavg};
use common::throughput::{Endpoints, MIB, Plan, Series, fmt1, measure_interleaved, peerlink_endpoints};
use peerlink::{IceServer, IceTransportPolicy, NodeConfig};
use peerlink_tests::coturn::Coturn;

const NAME: &str = "turn_throughput";

/// Per run of one configuration: coturn's CPU seconds over it and the machine's busy CPUs.
type CpuLog = Arc<Mutex<Vec<(f64, f64)>>>;

/// `config`'s endpoints, with coturn's CPU time (and the machine's) read around the sender's
/// whole run (setup included: a few STUN exchanges; the transfer is nearly all of it).
fn endpoints_measuring_coturn<'a>(config: NodeConfig, coturn_pid: u32, log: CpuLog) -> Endpoints<'a> {
    Box::new(move || {
        let (sender, receiver) = peerlink_endpoints(config.clone());
        let log = log.clone();
        let sender: common::throughput::SenderEndpoint = Box::new(move |transfer| {
            let (before, machine_before) = (common::cpu_secs(coturn_pid), MachineCpu::now());
            let report = sender(transfer);
            let (after, machine_after) = (common::cpu_secs(coturn_pid), MachineCpu::now());
            let busy = machine_after.zip(machine_before).map_or(f64::NAN, |(a, b)| a.busy_cpus_since(&b));
            log.lock().expect("lock").push((after - before, busy));
            report
        });
        Ok((sender, receiver))
    })
}

fn main() -> ExitCode {
    common::nodes::tracing_from_env();
    let plan = match Plan::from_env(NAME, "BENCH_TURN") {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("{NAME}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let coturn =
        Coturn::start(&["--lt-cred-mech", "--user=u:p", "--realm=peerlink", "--allow-loopback-peers", "--relay-ip=127.0.0.1"]);
    let server = match peerlink_server::spawn(peerlink_server::ServerOptions::local()) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("{NAME}: signaling server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let load_before = loadavg();
    println!(
        "{NAME}: {} MiB per run as {}-byte messages, {} round(s) of direct then relay, UDP on 127.0.0.1, one thread per \
         endpoint (pinned: {}), coturn pid {} on port {} (not pinned), {} CPUs; load average before: {}",
        plan.total_bytes / MIB,
        plan.msg_size,
        plan.runs,
        common::pinned(),
        coturn.pid(),
        coturn.port,
        common::measure::machine_cpus(),
        load_before
    );

    let direct = NodeConfig::new(server.url());
    let mut relay = NodeConfig::new(server.url());
    relay.ice_servers = vec![IceServer::turn([format!("turn:127.0.0.1:{}?transport=udp", coturn.port)], "u", "p")];
    relay.ice_transport_policy = IceTransportPolicy::Relay;

    let (direct_cpu, relay_cpu): (CpuLog, CpuLog) = Default::default();
    let all = measure_interleaved(
        &plan,
        vec![
            ("direct".to_owned(), endpoints_measuring_coturn(direct, coturn.pid(), direct_cpu.clone())),
            ("relay through coturn".to_owned(), endpoints_measuring_coturn(relay, coturn.pid(), relay_cpu.clone())),
        ],
    );
    let load_after = loadavg();

    // coturn's CPU per run; for the relay runs also its median share of one core over the
    // transfer and the MB it relayed per CPU-second (around a direct run it idles: a tick or
    // none, which is the point of reading it there).
    let cpu_line = |series: &Series, log: &CpuLog, relayed: bool| {
        let log = log.lock().expect("lock");
        let per_run: Vec<String> = log
            .iter()
            .map(|(cpu, busy)| format!("{cpu:.2} s (machine: {busy:.2} of {} CPUs busy)", common::measure::machine_cpus()))
            .collect();
        let mut line = format!("{NAME}: {}: coturn CPU per run {}", series.label, per_run.join(", "));
        // Only when every run succeeded do the runs and the readings pair up.
        if relayed && series.failures == 0 {
            let pairs = || series.runs.iter().zip(log.iter().map(|(c, _)| *c));
            let share = common::median(pairs().map(|(r, c)| 100.0 * c / r.elapsed.as_secs_f64()).collect());
            let per_cpu_s = common::median(pairs().filter(|(_, c)| *c > 0.0).map(|(r, c)| r.bytes as f64 / 1e6 / c).collect());
            line += &format!(
                "; median {}% of one core over the transfer, {} MB relayed per coturn CPU-second",
                fmt1(share),
                fmt1(per_cpu_s)
            );
        }
        println!("{line}");
    };
    cpu_line(&all[0], &direct_cpu, false);
    cpu_line(&all[1], &relay_cpu, true);

    if let (Some(direct), Some(relay)) = (all[0].median(), all[1].median()) {
        let paired = all[0].failures == 0 && all[1].failures == 0;
        let rounds: Vec<f64> =
            all[0].runs.iter().zip(&all[1].runs).filter(|_| paired).map(|(d, r)| r.mb_per_s() / d.mb_per_s()).collect();
        let range = |s: &Series| {
            let v: Vec<f64> = s.runs.iter().map(|r| r.mb_per_s()).collect();
            let (lo, hi) = (v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max));
            format!("{lo:.1}-{hi:.1}")
        };
        println!(
            "{NAME}: RESULT relay through coturn median {relay:.1} MB/s ({} MB/s) vs direct median {direct:.1} MB/s ({} MB/s): \
             ratio {:.2}; per round {} (median {}); coturn CPU median {} s per relay run; load average before / after: {} / {}",
            range(&all[1]),
            range(&all[0]),
            relay / direct,
            rounds.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", "),
            common::median(rounds.clone()).map_or("n/a".to_owned(), |r| format!("{r:.2}")),
            common::median(relay_cpu.lock().expect("lock").iter().map(|(c, _)| *c).collect())
                .map_or("n/a".to_owned(), |c| format!("{c:.2}")),
            load_before,
            load_after
        );
    }
    drop(server);
    drop(coturn);
    if all.iter().any(|s| s.failures > 0) { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
