//! The data-channel throughput harness of `dc_throughput` and `turn_throughput`: settings from
//! the environment ([`Plan`]), a sender and a receiver endpoint each on its own thread
//! ([`measure_run`]), configurations measured in alternating rounds ([`measure_interleaved`]),
//! and peerlink's own endpoints ([`peerlink_endpoints`]: two `PollNode`s, the default channel,
//! backpressure through `WouldBlock` and `BufferedAmountLow`). See dc_throughput.rs for what
//! is measured and how.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::BenchError as Error;

pub const MIB: u64 = 1024 * 1024;

// ----------------------------------------------------------------------------------------
// Settings
// ----------------------------------------------------------------------------------------

/// What every run transfers, and how often, from the environment.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The bench's name, first on every line it prints.
    pub name: &'static str,
    /// Prefix of its environment variables (`BENCH_DC`: `BENCH_DC_MIB`, ...).
    pub env: &'static str,
    /// Bytes to transfer per run.
    pub total_bytes: u64,
    /// Size of each message (the last one may be shorter).
    pub msg_size: usize,
    /// Runs per configuration.
    pub runs: usize,
    /// Give up a run (setup included) after this long.
    pub timeout: Duration,
}

impl Plan {
    /// `{env}_MIB` (256), `{env}_MSG` (16384), `{env}_RUNS` (5), `{env}_TIMEOUT_S` (120).
    pub fn from_env(name: &'static str, env: &'static str) -> Result<Self, Error> {
        let mib = env_u64(&format!("{env}_MIB"), 256)?;
        let msg_size = env_u64(&format!("{env}_MSG"), 16_384)?;
        let runs = env_u64(&format!("{env}_RUNS"), 5)?;
        let timeout_s = env_u64(&format!("{env}_TIMEOUT_S"), 120)?;
        if mib == 0 || msg_size == 0 || runs == 0 || timeout_s == 0 {
            return Err(format!("{env}_MIB, {env}_MSG, {env}_RUNS and {env}_TIMEOUT_S must be > 0").into());
        }
        Ok(Self {
            name,
            env,
            total_bytes: mib * MIB,
            msg_size: usize::try_from(msg_size)?,
            runs: usize::try_from(runs)?,
            timeout: Duration::from_secs(timeout_s),
        })
    }
}

pub use super::measure::env_u64;

/// Whether `name` is set to 1.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

// ----------------------------------------------------------------------------------------
// Reusable measuring part
// ----------------------------------------------------------------------------------------

/// What both endpoints of one run share: the data to move and when to give up.
#[derive(Debug, Clone)]
pub struct Transfer {
    /// Bytes to transfer.
    pub total_bytes: u64,
    /// Size of each message (the last one may be shorter).
    pub msg_size: usize,
    /// Set by the harness once either endpoint returned.
    stop: Arc<AtomicBool>,
    /// The run fails when it is not done by then.
    pub deadline: Instant,
    /// The plan's environment prefix, for the timeout's message.
    env: &'static str,
}

impl Transfer {
    /// Number of messages the sender writes.
    pub fn message_count(&self) -> u64 {
        self.total_bytes.div_ceil(self.msg_size as u64)
    }

    /// Length of message number `seq` (0-based).
    pub fn message_len(&self, seq: u64) -> usize {
        let offset = seq * self.msg_size as u64;
        // At most `msg_size`, so the cast back cannot truncate.
        self.total_bytes.saturating_sub(offset).min(self.msg_size as u64) as usize
    }

    /// Stamps message `seq` into `buf` (at least [`Self::message_len`] long) and returns the
    /// message: the sequence number, little endian, in its first (up to) 8 bytes.
    pub fn fill<'b>(&self, seq: u64, buf: &'b mut [u8]) -> &'b [u8] {
        let msg = &mut buf[..self.message_len(seq)];
        let stamp = seq.to_le_bytes();
        let n = msg.len().min(stamp.len());
        msg[..n].copy_from_slice(&stamp[..n]);
        msg
    }

    /// Checks that `data` is message `seq` as stamped by [`Self::fill`].
    pub fn check(&self, seq: u64, data: &[u8]) -> Result<(), Error> {
        let want = self.message_len(seq);
        if seq >= self.message_count() || data.len() != want {
            return Err(format!("message {seq}: {} bytes, expected {want}", data.len()).into());
        }
        let stamp = seq.to_le_bytes();
        let n = want.min(stamp.len());
        if data[..n] != stamp[..n] {
            let got = u64::from_le_bytes(data[..8.min(data.len())].try_into().unwrap_or([0; 8]));
            return Err(format!("message {seq}: wrong sequence stamp {got} (reordered or lost data)").into());
        }
        Ok(())
    }

    /// `Ok(true)` once the harness says stop; an error once the run is past its deadline.
    pub fn should_stop(&self) -> Result<bool, Error> {
        if self.stop.load(Ordering::Acquire) {
            Ok(true)
        } else if Instant::now() >= self.deadline {
            Err(format!("timed out ({}_TIMEOUT_S)", self.env).into())
        } else {
            Ok(false)
        }
    }
}

/// A sender endpoint: run on its own thread, it connects to its receiver (untimed), then
/// sends the [`Transfer`] and keeps its connection serviced until [`Transfer::should_stop`]
/// says stop (which happens once the receiver has everything). Returning earlier stops the
/// receiver too.
pub type SenderEndpoint = Box<dyn FnOnce(Transfer) -> Result<SenderReport, Error> + Send>;

/// A receiver endpoint: run on its own thread, it connects to its sender (untimed), then
/// receives until all [`Transfer::total_bytes`] arrived and returns; it gives up with an error
/// when [`Transfer::should_stop`] says stop (the sender returned) or fails (deadline).
pub type ReceiverEndpoint = Box<dyn FnOnce(Transfer) -> Result<ReceiverReport, Error> + Send>;

/// What a sender endpoint reports when it stops.
#[derive(Debug)]
pub struct SenderReport {
    /// When the first message was handed to the stack.
    pub first_write: Instant,
    /// CPU time this thread used from the first write until it stopped.
    pub cpu: Option<Duration>,
}

/// What a receiver endpoint reports when all bytes arrived.
#[derive(Debug)]
pub struct ReceiverReport {
    /// When the last byte arrived.
    pub last_byte: Instant,
    /// Bytes received (must equal [`Transfer::total_bytes`]).
    pub bytes: u64,
    /// CPU time this thread used from the channel opening until the last byte.
    pub cpu: Option<Duration>,
}

/// The outcome of one run.
#[derive(Debug, Clone, Copy)]
pub struct RunStats {
    pub bytes: u64,
    pub elapsed: Duration,
    pub sender_cpu: Option<Duration>,
    pub receiver_cpu: Option<Duration>,
    /// UDP datagrams the kernel dropped for a full socket receive buffer during the run,
    /// system-wide (Linux `RcvbufErrors`): each is a loss the transport had to recover from.
    pub udp_rcvbuf_drops: Option<u64>,
}

impl RunStats {
    /// Throughput in MB/s (10^6 bytes per second).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64()
    }

    /// Throughput in MiB/s.
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / MIB as f64 / self.elapsed.as_secs_f64()
    }

    /// MB moved per CPU-second of one side (its `cpu`): the throughput that side could reach
    /// with a core to itself. Unlike MB/s, this barely moves when other processes compete
    /// for the CPUs.
    pub fn mb_per_cpu_s(&self, cpu: Option<Duration>) -> Option<f64> {
        cpu.filter(|c| !c.is_zero()).map(|c| self.bytes as f64 / 1e6 / c.as_secs_f64())
    }
}

impl fmt::Display for RunStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "{} MiB in {secs:.2} s = {:.1} MB/s ({:.1} MiB/s)",
            self.bytes / MIB,
            self.mb_per_s(),
            self.mib_per_s()
        )?;
        let cpu = |c: Option<Duration>| {
            c.map_or("n/a".to_owned(), |c| format!("{:.2} s ({:.0}%)", c.as_secs_f64(), 100.0 * c.as_secs_f64() / secs))
        };
        write!(f, "; cpu sender {}, receiver {}", cpu(self.sender_cpu), cpu(self.receiver_cpu))?;
        if let Some(drops) = self.udp_rcvbuf_drops {
            write!(f, "; udp rcvbuf drops {drops}")?;
        }
        Ok(())
    }
}

/// Runs one transfer: `sender` and `receiver` each on their own OS thread. Both get the same
/// [`Transfer`]; once either returns (or panics) the transfer's stop flag is set, which the
/// other watches ([`Transfer::should_stop`]): the receiver returning ends the sender's loop, a
/// failing sender ends the receiver's.
pub fn measure_run(plan: &Plan, sender: SenderEndpoint, receiver: ReceiverEndpoint) -> Result<RunStats, Error> {
    let drops_before = udp_rcvbuf_errors();
    let transfer = Transfer {
        total_bytes: plan.total_bytes,
        msg_size: plan.msg_size,
        stop: Arc::new(AtomicBool::new(false)),
        deadline: Instant::now() + plan.timeout,
        env: plan.env,
    };
    let spawn = |name: &str| thread::Builder::new().name(name.to_owned());

    /// Sets the stop flag when dropped: when its thread's endpoint returns or unwinds.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let t = transfer.clone();
    let receiver = spawn("dc-receiver").spawn(move || {
        let _stop = StopOnDrop(t.stop.clone());
        super::pin_thread(1);
        receiver(t)
    })?;
    let t = transfer.clone();
    let sender = spawn("dc-sender").spawn(move || {
        let _stop = StopOnDrop(t.stop.clone());
        super::pin_thread(0);
        sender(t)
    })?;

    fn joined<T>(name: &str, r: thread::Result<Result<T, Error>>) -> Result<T, Error> {
        r.unwrap_or_else(|_| Err("thread panicked".into())).map_err(|e| format!("{name}: {e}").into())
    }
    let (sent, received) = match (joined("sender", sender.join()), joined("receiver", receiver.join())) {
        (Ok(sent), Ok(received)) => (sent, received),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => return Err(e),
        // The first failure usually makes the other side fail too: show both.
        (Err(s), Err(r)) => return Err(format!("{s}; {r}").into()),
    };

    if received.bytes != transfer.total_bytes {
        return Err(format!("receiver got {} bytes, expected {}", received.bytes, transfer.total_bytes).into());
    }
    Ok(RunStats {
        bytes: received.bytes,
        elapsed: received.last_byte.saturating_duration_since(sent.first_write),
        sender_cpu: sent.cpu,
        receiver_cpu: received.cpu,
        udp_rcvbuf_drops: udp_rcvbuf_errors().zip(drops_before).map(|(after, before)| after.saturating_sub(before)),
    })
}

/// The runs of one configuration.
#[derive(Debug)]
pub struct Series {
    pub label: String,
    pub runs: Vec<RunStats>,
    pub failures: usize,
}

impl Series {
    /// Median MB/s over the successful runs.
    pub fn median(&self) -> Option<f64> {
        super::median(self.runs.iter().map(RunStats::mb_per_s).collect())
    }

    /// Best MB/s over the successful runs.
    pub fn best(&self) -> Option<f64> {
        self.runs.iter().map(RunStats::mb_per_s).max_by(f64::total_cmp)
    }

    /// Median [`RunStats::mb_per_cpu_s`] of the sender.
    pub fn sender_mb_per_cpu_s(&self) -> Option<f64> {
        super::median(self.runs.iter().filter_map(|r| r.mb_per_cpu_s(r.sender_cpu)).collect())
    }

    /// Median [`RunStats::mb_per_cpu_s`] of the receiver.
    pub fn receiver_mb_per_cpu_s(&self) -> Option<f64> {
        super::median(self.runs.iter().filter_map(|r| r.mb_per_cpu_s(r.receiver_cpu)).collect())
    }
}


/// Formats an optional figure with one decimal.
pub fn fmt1(v: Option<f64>) -> String {
    v.map_or("n/a".to_owned(), |v| format!("{v:.1}"))
}

/// Makes a fresh (sender, receiver) pair for one run of a configuration.
pub type Endpoints<'a> = Box<dyn FnMut() -> Result<(SenderEndpoint, ReceiverEndpoint), Error> + 'a>;

/// Runs `plan.runs` rounds; each round runs every configuration once, in turn, so all of
/// them see the same conditions (a busy neighbour on a shared machine slows each alike,
/// instead of whichever series happened to run then). Prints every run and then a summary
/// line per configuration. `configs` are (label, endpoints); see [`measure_run`].
pub fn measure_interleaved(plan: &Plan, configs: Vec<(String, Endpoints<'_>)>) -> Vec<Series> {
    let (labels, mut makers): (Vec<String>, Vec<Endpoints<'_>>) = configs.into_iter().unzip();
    let mut all: Vec<Series> =
        labels.iter().map(|label| Series { label: label.clone(), runs: Vec::new(), failures: 0 }).collect();
    for run in 1..=plan.runs {
        for (series, endpoints) in all.iter_mut().zip(makers.iter_mut()) {
            let label = &series.label;
            match endpoints().and_then(|(sender, receiver)| measure_run(plan, sender, receiver)) {
                Ok(stats) => {
                    println!("{}: {label}: run {run}/{}: {stats}", plan.name, plan.runs);
                    series.runs.push(stats);
                }
                Err(e) => {
                    eprintln!("{}: {label}: run {run}/{} FAILED: {e}", plan.name, plan.runs);
                    series.failures += 1;
                }
            }
        }
    }
    for series in &all {
        print_summary(plan.name, series);
    }
    all
}

/// Runs `plan.runs` transfers of one configuration, printing each run and a summary line.
pub fn measure_series(label: &str, plan: &Plan, endpoints: impl FnMut() -> Result<(SenderEndpoint, ReceiverEndpoint), Error>) -> Series {
    let mut all = measure_interleaved(plan, vec![(label.to_owned(), Box::new(endpoints))]);
    all.pop().expect("one series")
}

fn print_summary(name: &str, series: &Series) {
    let label = &series.label;
    match (series.median(), series.best()) {
        (Some(median), Some(best)) => {
            let mib = |mb: f64| mb * 1e6 / MIB as f64;
            println!(
                "{name}: {label} median {median:.1} MB/s ({:.1} MiB/s), best {best:.1} MB/s ({:.1} MiB/s) \
                 over {} runs; MB per CPU-second: sender {}, receiver {}",
                mib(median),
                mib(best),
                series.runs.len(),
                fmt1(series.sender_mb_per_cpu_s()),
                fmt1(series.receiver_mb_per_cpu_s()),
            );
        }
        _ => eprintln!("{name}: {label}: no successful run"),
    }
}


/// The system-wide count of UDP datagrams dropped for a full receive buffer
/// (`RcvbufErrors` in /proc/net/snmp), where available.
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    // Two "Udp:" lines: the field names, then the values.
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// CPU time (user + system) the calling thread has used so far.
#[cfg(target_os = "linux")]
pub fn thread_cpu_time() -> Option<Duration> {
    // SAFETY: `rusage` is a plain C struct for which all-zero bytes are a valid value, and
    // getrusage only writes into the struct we pass it, which lives on our stack.
    let (rc, usage) = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let rc = libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        (rc, usage)
    };
    if rc != 0 {
        return None;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Some(tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// CPU time of the calling thread: not available off Linux.
#[cfg(not(target_os = "linux"))]
pub fn thread_cpu_time() -> Option<Duration> {
    None
}

/// CPU time used since `start` (a [`thread_cpu_time`] reading on the same thread).
pub fn cpu_since(start: Option<Duration>) -> Option<Duration> {
    Some(thread_cpu_time()?.saturating_sub(start?))
}

// ----------------------------------------------------------------------------------------
// peerlink endpoints
// ----------------------------------------------------------------------------------------

/// A sending `PollNode` ([`super::ready_node`] with `config`) connected to the receiver whose
/// fingerprint arrives on `fp_rx`, its default channel open (setup, untimed).
pub fn peerlink_sender(config: &peerlink::NodeConfig, fp_rx: &mpsc::Receiver<peerlink::Fingerprint>) -> Result<(peerlink_blocking::PollNode, peerlink::Fingerprint), Error> {
    use peerlink::NodeEvent;
    let mut node = super::ready_node(config.clone())?;
    let target = fp_rx.recv_timeout(Duration::from_secs(10)).map_err(|e| format!("receiver fingerprint: {e}"))?;
    node.connect_to_peer(target)?;
    loop {
        match node.next_event(Duration::from_secs(10))? {
            Some(NodeEvent::ChannelOpen { channel, .. }) if channel == "default" => return Ok((node, target)),
            Some(NodeEvent::PeerError { error, .. }) => return Err(format!("sender: {error}").into()),
            Some(_) => {}
            None => return Err("connection timed out".into()),
        }
    }
}

/// peerlink's sender and receiver: two `PollNode`s (the blocking adapter, one thread each,
/// both with `config`: its signaling server, settings, ICE servers and policy), negotiating
/// through the signaling server (untimed), then the transfer on the default channel.
pub fn peerlink_endpoints(config: peerlink::NodeConfig) -> (SenderEndpoint, ReceiverEndpoint) {
    use peerlink::{NodeEvent, Payload};
    let (fp_tx, fp_rx) = mpsc::channel();
    let config2 = config.clone();
    let receiver: ReceiverEndpoint = Box::new(move |transfer: Transfer| {
        let mut node = super::ready_node(config2)?;
        fp_tx.send(node.fingerprint()).map_err(|_| "sender gone")?;
        let (mut bytes, mut seq, mut cpu_start) = (0u64, 0u64, None);
        loop {
            if transfer.should_stop()? {
                return Err(format!("stopped after {bytes} bytes").into());
            }
            // Blocks (briefly) only when nothing is queued.
            let Some(event) = node.next_event(Duration::from_millis(5))? else { continue };
            match event {
                NodeEvent::ChannelOpen { .. } if cpu_start.is_none() => cpu_start = thread_cpu_time(),
                NodeEvent::Data { data: Payload::Binary(data), .. } => {
                    transfer.check(seq, &data)?;
                    seq += 1;
                    bytes += data.len() as u64;
                    if bytes == transfer.total_bytes {
                        return Ok(ReceiverReport { last_byte: Instant::now(), bytes, cpu: cpu_since(cpu_start) });
                    }
                }
                NodeEvent::PeerError { error, .. } => return Err(format!("receiver: {error}").into()),
                _ => {}
            }
        }
    });
    let sender: SenderEndpoint = Box::new(move |transfer: Transfer| {
        let (mut node, target) = peerlink_sender(&config, &fp_rx)?;
        let mut msg = vec![0xA5; transfer.msg_size];
        let mut seq = 0;
        let (mut first_write, mut cpu_start) = (None, None);
        let mut blocked = false;
        while !transfer.should_stop()? {
            if !blocked && seq < transfer.message_count() {
                let now = Instant::now();
                let data = transfer.fill(seq, &mut msg);
                match node.node().send_binary(now, target, None, data) {
                    Ok(()) => {
                        if first_write.is_none() {
                            first_write = Some(now);
                            cpu_start = thread_cpu_time();
                        }
                        seq += 1;
                        // Let the node do its I/O now and then, as an application would.
                        if seq % 8 == 0 {
                            node.poll(Instant::now())?;
                        }
                        continue;
                    }
                    Err(peerlink::NodeError::Send(peerlink::SendError::WouldBlock { .. })) => blocked = true,
                    Err(e) => return Err(e.into()),
                }
            }
            // Blocked or done: wait for the buffer to drain (or the receiver to finish).
            match node.next_event(Duration::from_millis(5))? {
                Some(NodeEvent::BufferedAmountLow { .. }) => blocked = false,
                Some(NodeEvent::PeerError { error, .. }) => return Err(format!("sender: {error}").into()),
                _ => {}
            }
        }
        let first_write = first_write.ok_or("stopped before the first write")?;
        Ok(SenderReport { first_write, cpu: cpu_since(cpu_start) })
    });
    (sender, receiver)
}
