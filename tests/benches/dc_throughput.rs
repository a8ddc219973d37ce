//! Data-channel throughput benchmark (harness = false).
//!
//! **What is measured.** One reliable, ordered data channel between two endpoints on
//! 127.0.0.1, each endpoint on its own OS thread with its own UDP socket. The sender writes
//! `BENCH_DC_MIB` MiB as `BENCH_DC_MSG`-byte binary messages, with backpressure; the receiver
//! counts the bytes it gets. The figure is bytes / (time of the last byte received - time of
//! the first write), in MB/s (10^6 bytes/s) and MiB/s. Connection setup (ICE, DTLS, SCTP,
//! DCEP) is not timed. Each thread's CPU time (user + system, from `getrusage(RUSAGE_THREAD)`)
//! over the transfer is printed too, so it shows whether a side is CPU bound, and the summary
//! gives MB per CPU-second of each side, a figure that holds up better than MB/s when other
//! processes share the machine. Each run also prints the UDP datagrams the kernel dropped for
//! a full socket receive buffer meanwhile (system-wide `RcvbufErrors`): every one is a loss
//! the transport had to recover from.
//!
//! **Baseline.** Two raw str0m `Rtc` instances at str0m's default settings (128 KiB SCTP max
//! buffered amount, default MTU), negotiated in-process (the offer and answer travel over a
//! std mpsc channel), each driven by the canonical sans-IO loop from str0m's docs: every
//! mutation is followed by draining `poll_output` to `Output::Timeout`; transmits go out with
//! `send_to`; the thread waits on the socket with `set_read_timeout` until the next str0m
//! timeout (capped, so it notices the end of the run). The sender writes until
//! `Channel::write` returns `Ok(false)`, then waits for `Event::ChannelBufferedAmountLow`
//! (low threshold at half of the max buffered amount, lower only for messages bigger than
//! half of it) before writing more.
//!
//! **File transfer.** A third series moves the same bytes as one `peerlink::transfer` file
//! transfer over the same kind of connection (16 KiB chunks, CRC-32 per chunk, SHA-256 of the
//! whole), compared with peerlink's raw channel in the same rounds (issue 5's goal: at least
//! 0.9x).
//!
//! **Fairness.** The baseline and peerlink run in alternation (run 1 of each, then run 2 of
//! each, ...), so a machine whose speed drifts (a shared VM) slows both alike; the result
//! line gives the ratio of the medians and the ratio within each round. Unless BENCH_PIN=0,
//! the sender thread is pinned to CPU 0 and the receiver to CPU 1 in every configuration.
//!
//! **Reusable part** (in `common::throughput`, shared with `turn_throughput`). [`measure_interleaved`] / [`measure_series`] / [`measure_run`] take a sender and a receiver
//! endpoint as closures, run each on its own thread, and report MB/s. An endpoint connects in
//! whatever way it likes (untimed), then follows the [`Transfer`] it is handed: the sender
//! reports when it made its first write ([`SenderReport`]), the receiver when the last byte
//! arrived ([`ReceiverReport`]). Messages carry a sequence number ([`Transfer::fill`],
//! [`Transfer::check`]) so a receiver can verify order and completeness cheaply.
//!
//! Run: `cargo bench -p peerlink-tests --bench dc_throughput`.
//! Env: BENCH_DC_MIB (256), BENCH_DC_MSG (16384), BENCH_DC_RUNS (5), BENCH_PIN (1), BENCH_DC_TIMEOUT_S (120,
//! per run), BENCH_DC_VARIANTS=1 (after the baseline, also measure tunings: str0m's SCTP max
//! buffered amount 64 KiB / 256 KiB / 1 MiB, its MTU 1400 / 1500, the sockets' SO_RCVBUF, a
//! few combinations; then print a table). The baseline's settings never change.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::throughput::{
    MIB, Plan, ReceiverEndpoint, ReceiverReport, SenderEndpoint, SenderReport, Transfer, cpu_since, env_flag, env_u64, fmt1,
    measure_interleaved, measure_series, peerlink_endpoints, peerlink_sender, thread_cpu_time,
};

use str0m::change::{SdpAnswer, SdpOffer};
use str0m::channel::ChannelId;
use str0m::net::{DatagramRecv, Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};

/// Errors of this bench: anything printable, from any thread.
type Error = Box<dyn std::error::Error + Send + Sync>;

// ----------------------------------------------------------------------------------------
// Raw str0m endpoints
// ----------------------------------------------------------------------------------------

/// Longest wait on the socket, so a thread notices the stop flag promptly.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// How the two `Rtc`s (and their sockets) are configured. `Str0mConfig::default()` is str0m's
/// defaults on sockets with the OS defaults, untouched.
#[derive(Debug, Clone, Copy, Default)]
struct Str0mConfig {
    /// `RtcConfig::set_sctp_max_buffered_amount`, when set.
    sctp_max_buffered_amount: Option<usize>,
    /// `RtcConfig::set_mtu(mtu..=mtu)`, when set.
    mtu: Option<usize>,
    /// The sockets' SO_RCVBUF, when set (not a str0m setting; Linux caps it at
    /// net.core.rmem_max, then doubles it for bookkeeping overhead).
    udp_rcvbuf: Option<usize>,
}

impl Str0mConfig {
    fn label(&self) -> String {
        // The sizes used here are whole KiB, and whole MiB from 1 MiB on.
        let size = |b: usize| if b >= 1 << 20 { format!("{} MiB", b >> 20) } else { format!("{} KiB", b >> 10) };
        let settings: Vec<String> = [
            self.sctp_max_buffered_amount.map(|b| format!("sctp buffer {}", size(b))),
            self.mtu.map(|m| format!("mtu {m}")),
            self.udp_rcvbuf.map(|b| format!("udp rcvbuf {}", size(b))),
        ]
        .into_iter()
        .flatten()
        .collect();
        if settings.is_empty() {
            "raw str0m (defaults)".to_owned()
        } else {
            format!("raw str0m ({})", settings.join(", "))
        }
    }

    fn rtc_config(&self) -> RtcConfig {
        let mut config = Rtc::builder();
        if let Some(bytes) = self.sctp_max_buffered_amount {
            config = config.set_sctp_max_buffered_amount(bytes);
        }
        if let Some(mtu) = self.mtu {
            config = config.set_mtu(mtu..=mtu);
        }
        config
    }

    /// A (sender, receiver) pair for [`measure_run`]: the sender offers, the receiver answers;
    /// the SDPs travel between the two threads over mpsc channels.
    fn endpoints(self) -> (SenderEndpoint, ReceiverEndpoint) {
        let (offer_tx, offer_rx) = mpsc::channel();
        let (answer_tx, answer_rx) = mpsc::channel();
        (
            Box::new(move |t| run_str0m_sender(self, t, offer_tx, answer_rx)),
            Box::new(move |t| run_str0m_receiver(self, t, offer_rx, answer_tx)),
        )
    }
}

/// One `Rtc` and its UDP socket, driven by str0m's canonical run loop.
struct Str0mPeer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    /// The socket's read timeout in whole milliseconds, to skip redundant setsockopt calls.
    read_timeout_ms: Option<u128>,
    buf: Vec<u8>,
}

impl Str0mPeer {
    /// Binds 127.0.0.1:0 (with SO_RCVBUF `udp_rcvbuf`, when set) and builds an `Rtc` with a
    /// host candidate for that address.
    fn new(config: RtcConfig, udp_rcvbuf: Option<usize>) -> Result<Self, Error> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        if let Some(bytes) = udp_rcvbuf {
            socket2::SockRef::from(&socket).set_recv_buffer_size(bytes)?;
        }
        let local = socket.local_addr()?;
        let mut rtc = config.build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp")?);
        Ok(Self { rtc, socket, local, read_timeout_ms: None, buf: vec![0; 65_536] })
    }

    /// Drains `poll_output` until `Output::Timeout` (returned): transmits are sent, events
    /// handed to `on_event` (which may mutate the `Rtc`; the drain continues after it).
    fn drain(&mut self, mut on_event: impl FnMut(&mut Rtc, Event) -> Result<(), Error>) -> Result<Instant, Error> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(at) => return Ok(at),
                Output::Transmit(t) => {
                    self.socket
                        .send_to(&t.contents, t.destination)
                        .map_err(|e| format!("send_to {}: {e}", t.destination))?;
                }
                Output::Event(Event::IceConnectionStateChange(IceConnectionState::Disconnected)) => {
                    return Err("ICE disconnected".into());
                }
                Output::Event(event) => on_event(&mut self.rtc, event)?,
            }
        }
    }

    /// Waits for one datagram until `deadline` (at most [`MAX_WAIT`]) and feeds it to the
    /// `Rtc`, or feeds `Input::Timeout` when the wait ran out. One mutation: drain afterwards.
    fn wait_and_feed(&mut self, deadline: Instant) -> Result<(), Error> {
        let now = Instant::now();
        if deadline <= now {
            return Ok(self.rtc.handle_input(Input::Timeout(now))?);
        }
        // Round up to whole milliseconds (never zero: a zero read timeout is an error).
        let wait_ms = (deadline - now).min(MAX_WAIT).as_micros().div_ceil(1000).max(1);
        if self.read_timeout_ms != Some(wait_ms) {
            self.socket.set_read_timeout(Some(Duration::from_millis(wait_ms as u64)))?;
            self.read_timeout_ms = Some(wait_ms);
        }
        match self.socket.recv_from(&mut self.buf) {
            Ok((n, source)) => {
                // Datagrams str0m cannot demultiplex are dropped, as a real socket loop would.
                if let Ok(contents) = DatagramRecv::try_from(&self.buf[..n]) {
                    let receive = Receive { proto: Protocol::Udp, source, destination: self.local, contents };
                    self.rtc.handle_input(Input::Receive(Instant::now(), receive))?;
                }
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Ok(self.rtc.handle_input(Input::Timeout(Instant::now()))?)
            }
            Err(e) => Err(format!("recv_from: {e}").into()),
        }
    }
}

/// Sender side of the raw str0m baseline: offers one data channel, then writes the transfer
/// with backpressure until the harness says stop.
fn run_str0m_sender(
    config: Str0mConfig,
    transfer: Transfer,
    offer_tx: mpsc::Sender<String>,
    answer_rx: mpsc::Receiver<String>,
) -> Result<SenderReport, Error> {
    let rtc_config = config.rtc_config();
    let max_buffered = rtc_config.sctp_max_buffered_amount();
    let msg_size = transfer.msg_size;
    if msg_size > max_buffered {
        return Err(format!("{msg_size}-byte messages never fit the {max_buffered}-byte SCTP buffer").into());
    }

    let mut peer = Str0mPeer::new(rtc_config, config.udp_rcvbuf)?;
    let mut sdp = peer.rtc.sdp_api();
    sdp.add_channel("bench".to_owned());
    let (offer, pending) = sdp.apply().ok_or("SdpApi::apply made no offer")?;
    offer_tx.send(offer.to_sdp_string()).map_err(|_| "receiver gone before the offer")?;
    let answer = answer_rx
        .recv_timeout(transfer.deadline.saturating_duration_since(Instant::now()))
        .map_err(|e| format!("waiting for the answer: {e}"))?;
    peer.rtc.sdp_api().accept_answer(pending, SdpAnswer::from_sdp_string(&answer)?)?;

    let mut state = SenderState {
        // Half the buffer, but low enough that a refused write leaves the buffered amount
        // above it, so the `ChannelBufferedAmountLow` we then wait for is sure to come.
        low_threshold: (max_buffered / 2).min(max_buffered - msg_size),
        channel: None,
        blocked: false,
    };
    let mut msg = vec![0xA5; msg_size];
    let mut seq = 0;
    let (mut first_write, mut cpu_start) = (None, None);
    let mut next_timeout = peer.drain(|rtc, e| state.on_event(rtc, e))?;
    while !transfer.should_stop()? {
        // Write while the channel is open, not blocked, and there is data left.
        let writable = state.channel.filter(|_| !state.blocked && seq < transfer.message_count());
        if let Some(id) = writable {
            let data = transfer.fill(seq, &mut msg);
            let accepted = peer.rtc.channel(id).ok_or("channel gone")?.write(true, data)?;
            if accepted {
                if first_write.is_none() {
                    first_write = Some(Instant::now());
                    cpu_start = thread_cpu_time();
                }
                seq += 1;
            } else {
                state.blocked = true;
            }
        } else {
            peer.wait_and_feed(next_timeout)?;
        }
        next_timeout = peer.drain(|rtc, e| state.on_event(rtc, e))?;
    }
    let first_write = first_write.ok_or("stopped before the first write")?;
    Ok(SenderReport { first_write, cpu: cpu_since(cpu_start) })
}

/// The sender's channel state, updated by events during drains.
struct SenderState {
    low_threshold: usize,
    /// Set once the channel is open.
    channel: Option<ChannelId>,
    /// A write was refused; cleared by `ChannelBufferedAmountLow`.
    blocked: bool,
}

impl SenderState {
    fn on_event(&mut self, rtc: &mut Rtc, event: Event) -> Result<(), Error> {
        match event {
            Event::ChannelOpen(id, _) => {
                let mut channel = rtc.channel(id).ok_or("channel gone at open")?;
                channel.set_buffered_amount_low_threshold(self.low_threshold);
                self.channel = Some(id);
            }
            Event::ChannelBufferedAmountLow(_) => self.blocked = false,
            Event::ChannelClose(_) => return Err("channel closed".into()),
            _ => {}
        }
        Ok(())
    }
}

/// Receiver side of the raw str0m baseline: answers, then counts (and checks) the messages
/// until all bytes arrived.
fn run_str0m_receiver(
    config: Str0mConfig,
    transfer: Transfer,
    offer_rx: mpsc::Receiver<String>,
    answer_tx: mpsc::Sender<String>,
) -> Result<ReceiverReport, Error> {
    let mut peer = Str0mPeer::new(config.rtc_config(), config.udp_rcvbuf)?;
    let offer = offer_rx
        .recv_timeout(transfer.deadline.saturating_duration_since(Instant::now()))
        .map_err(|e| format!("waiting for the offer: {e}"))?;
    let answer = peer.rtc.sdp_api().accept_offer(SdpOffer::from_sdp_string(&offer)?)?;
    answer_tx.send(answer.to_sdp_string()).map_err(|_| "sender gone before the answer")?;

    let mut state = ReceiverState { transfer: &transfer, bytes: 0, seq: 0, cpu_start: None, last_byte: None };
    let mut next_timeout = peer.drain(|rtc, e| state.on_event(rtc, e))?;
    loop {
        if let Some(last_byte) = state.last_byte {
            return Ok(ReceiverReport { last_byte, bytes: state.bytes, cpu: cpu_since(state.cpu_start) });
        }
        if transfer.should_stop()? {
            return Err(format!("stopped after {} bytes", state.bytes).into());
        }
        peer.wait_and_feed(next_timeout)?;
        next_timeout = peer.drain(|rtc, e| state.on_event(rtc, e))?;
    }
}

/// The receiver's progress, updated by events during drains.
struct ReceiverState<'t> {
    transfer: &'t Transfer,
    bytes: u64,
    /// Sequence number of the next message.
    seq: u64,
    cpu_start: Option<Duration>,
    last_byte: Option<Instant>,
}

impl ReceiverState<'_> {
    fn on_event(&mut self, _: &mut Rtc, event: Event) -> Result<(), Error> {
        match event {
            Event::ChannelOpen(..) => self.cpu_start = thread_cpu_time(),
            Event::ChannelData(data) => {
                self.transfer.check(self.seq, &data.data)?;
                self.seq += 1;
                self.bytes += data.data.len() as u64;
                if self.bytes == self.transfer.total_bytes {
                    self.last_byte = Some(Instant::now());
                }
            }
            Event::ChannelClose(_) => return Err("channel closed".into()),
            _ => {}
        }
        Ok(())
    }
}

// ----------------------------------------------------------------------------------------
// peerlink endpoints (the raw channel's are common::throughput::peerlink_endpoints)
// ----------------------------------------------------------------------------------------

/// The same bytes as a file transfer (`peerlink::transfer`) on top of the same connection:
/// the core reads each chunk from a generated source straight into its frame (16 KiB chunks,
/// the same content as the channel runs' messages) and writes each arriving chunk to a sink
/// that checks its stamp; the core checks CRC-32 per chunk and the SHA-256 of the whole
/// (hashed untimed beforehand by the sender).
fn transfer_endpoints(config: peerlink::NodeConfig) -> (SenderEndpoint, ReceiverEndpoint) {
    use peerlink::NodeEvent;
    use peerlink::transfer::{FileInfo, SinkFn, SourceFn, TransferEvent};
    use sha2::Digest;
    let (fp_tx, fp_rx) = mpsc::channel();
    let config2 = config.clone();
    let receiver: ReceiverEndpoint = Box::new(move |transfer: Transfer| {
        let mut node = common::ready_node(config2)?;
        fp_tx.send(node.fingerprint()).map_err(|_| "sender gone")?;
        let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failed: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let mut cpu_start = None;
        loop {
            let bytes_now = bytes.load(Ordering::Relaxed);
            if let Some(e) = failed.lock().expect("lock").take() {
                return Err(e.into());
            }
            if transfer.should_stop()? {
                return Err(format!("stopped after {bytes_now} bytes").into());
            }
            let Some(event) = node.next_event(Duration::from_millis(5))? else { continue };
            let NodeEvent::Transfer(event) = event else { continue };
            match event {
                TransferEvent::Offered { peer, offer } => {
                    cpu_start = thread_cpu_time();
                    let (b, f) = (bytes.clone(), failed.clone());
                    // Chunks do not line up with messages: the core's SHA-256 of the whole
                    // checks the content; the sink checks the count and the order.
                    let next = std::sync::atomic::AtomicU64::new(0);
                    let sink = SinkFn(move |offset: u64, data: &[u8]| {
                        if next.swap(offset + data.len() as u64, Ordering::Relaxed) != offset {
                            *f.lock().expect("lock") = Some(format!("chunk at {offset} out of order"));
                        }
                        b.fetch_add(data.len() as u64, Ordering::Relaxed);
                        Ok(())
                    });
                    node.accept_into(peer, offer.id, sink)?;
                }
                TransferEvent::Completed { .. } if bytes_now == transfer.total_bytes => {
                    return Ok(ReceiverReport { last_byte: Instant::now(), bytes: bytes_now, cpu: cpu_since(cpu_start) });
                }
                TransferEvent::Failed { error, .. } => return Err(format!("receiver: {error}").into()),
                _ => {}
            }
        }
    });
    let sender: SenderEndpoint = Box::new(move |transfer: Transfer| {
        let (mut node, target) = peerlink_sender(&config, &fp_rx)?;
        let mut msg = vec![0xA5; transfer.msg_size];
        let mut hasher = sha2::Sha256::new();
        for seq in 0..transfer.message_count() {
            hasher.update(transfer.fill(seq, &mut msg));
        }
        let info = FileInfo::new("bench.bin", transfer.total_bytes, hasher.finalize().into());
        // The adapter reads through this as chunks go (no round trip through the event queue).
        let first_write = Arc::new(std::sync::Mutex::new(None));
        let (fw, t) = (first_write.clone(), transfer.clone());
        let mut cpu_start = None;
        let cpu_mark = Arc::new(std::sync::Mutex::new(None));
        let cm = cpu_mark.clone();
        let source = SourceFn(move |offset: u64, buf: &mut [u8]| {
            let mut fw = fw.lock().expect("lock");
            if fw.is_none() {
                *fw = Some(Instant::now());
                *cm.lock().expect("lock") = thread_cpu_time();
            }
            // The generated content (the channel runs' messages, back to back), written straight
            // into the outgoing frame; chunks need not line up with messages.
            buf.fill(0xA5);
            let msg = t.msg_size as u64;
            let mut start = offset.div_ceil(msg) * msg;
            // A stamp cut by the chunk's start.
            if !offset.is_multiple_of(msg) && offset % msg < 8 {
                let stamp = (offset / msg).to_le_bytes();
                let from = (offset % msg) as usize;
                let n = (8 - from).min(buf.len());
                buf[..n].copy_from_slice(&stamp[from..from + n]);
            }
            while start < offset + buf.len() as u64 {
                let at = (start - offset) as usize;
                let stamp = (start / msg).to_le_bytes();
                let n = 8.min(buf.len() - at);
                buf[at..at + n].copy_from_slice(&stamp[..n]);
                start += msg;
            }
            Ok(())
        });
        node.send_from(target, info, source)?;
        while !transfer.should_stop()? {
            if cpu_start.is_none() {
                cpu_start = *cpu_mark.lock().expect("lock");
            }
            if let Some(NodeEvent::Transfer(TransferEvent::Failed { error, .. })) = node.next_event(Duration::from_millis(5))? {
                return Err(format!("sender: {error}").into());
            }
        }
        let first_write = *first_write.lock().expect("lock");
        let first_write = first_write.ok_or("stopped before the first read")?;
        Ok(SenderReport { first_write, cpu: cpu_since(cpu_start) })
    });
    (sender, receiver)
}

// ----------------------------------------------------------------------------------------
// The simulator at 50 ms RTT
// ----------------------------------------------------------------------------------------

/// Moves `mib` MiB as 16 KiB messages between two nodes of the simulator on a clean link with
/// a 50 ms round trip (no bandwidth limit: what limits is the window and SCTP's congestion
/// control); returns virtual MB/s.
fn sim_throughput(peer: peerlink::PeerConfig, mib: u64) -> Result<f64, Error> {
    use peerlink::{NodeError, NodeEvent, SendError};
    let mut sim = peerlink_sim::Sim::new(9);
    sim.set_default_link(peerlink_sim::LinkConfig::new(Duration::from_millis(25)));
    let mut config = peerlink::NodeConfig::new("sim://server");
    config.peer = peer;
    let a = sim.add_node("a", config.clone());
    let b = sim.add_node("b", config);
    sim.run_for(Duration::from_millis(200));
    let fb = sim.fingerprint(b);
    sim.with_node(a, |n, now| n.connect_to_peer(now, fb))?;
    let open = |sim: &peerlink_sim::Sim| sim.events(a).iter().any(|(_, e)| matches!(e, NodeEvent::ChannelOpen { .. }));
    if !sim.run_until(Duration::from_secs(10), open) {
        return Err("simulated connection did not open".into());
    }
    let total = mib * MIB;
    let msg = vec![1u8; 16 * 1024];
    let (mut sent, mut received) = (0u64, 0u64);
    let start = sim.elapsed();
    while received < total {
        while sent < total {
            match sim.with_node(a, |n, now| n.send_binary(now, fb, None, &msg)) {
                Ok(()) => sent += msg.len() as u64,
                Err(NodeError::Send(SendError::WouldBlock { .. })) => break,
                Err(e) => return Err(e.into()),
            }
        }
        sim.run_for(Duration::from_millis(5));
        for (_, e) in sim.take_events(b) {
            if let NodeEvent::Data { data: peerlink::Payload::Binary(d), .. } = e {
                received += d.len() as u64;
            }
        }
        sim.take_events(a);
        if sim.elapsed() - start > Duration::from_secs(600) {
            return Err(format!("only {received} bytes in 600 virtual seconds").into());
        }
    }
    Ok(total as f64 / 1e6 / (sim.elapsed() - start).as_secs_f64())
}

// ----------------------------------------------------------------------------------------
// Main
// ----------------------------------------------------------------------------------------

fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).try_init();
    }
    let plan = match Plan::from_env("dc_throughput", "BENCH_DC") {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("dc_throughput: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "dc_throughput: {} MiB per run as {}-byte messages, {} run(s) per configuration, UDP on 127.0.0.1, one thread per endpoint",
        plan.total_bytes / MIB,
        plan.msg_size,
        plan.runs
    );

    let str0m_series = |config: Str0mConfig| measure_series(&config.label(), &plan, || Ok(config.endpoints()));
    let server = match peerlink_server::spawn(peerlink_server::ServerOptions::local()) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("dc_throughput: signaling server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let url = server.url();
    let mut peer = peerlink::PeerConfig::default();
    if let Ok(v) = std::env::var("BENCH_DC_PEER") {
        for opt in v.split(',') {
            match opt {
                "nosnap" => peer.snap = false,
                "dtls12" => peer.dtls_version = peerlink::peer::DtlsVersion::Dtls12,
                w if w.starts_with("win=") => peer.min_send_window = w[4..].parse::<usize>().unwrap_or(64) * 1024,
                _ => {}
            }
        }
    }
    let mut node_config = peerlink::NodeConfig::new(url);
    node_config.peer = peer;
    let baseline = Str0mConfig::default();
    let mut all = measure_interleaved(
        &plan,
        vec![
            (baseline.label(), Box::new(|| Ok(baseline.endpoints()))),
            ("peerlink (defaults)".to_owned(), Box::new(|| Ok(peerlink_endpoints(node_config.clone())))),
            ("peerlink file transfer".to_owned(), Box::new(|| Ok(transfer_endpoints(node_config.clone())))),
        ],
    );
    if let (Some(base), Some(ours)) = (all[0].median(), all[1].median()) {
        // Each round ran both back to back: the ratio within a round is the fairest one on
        // a machine whose speed drifts.
        // (Only when no run failed, so that runs pair up.)
        let paired = all[0].failures == 0 && all[1].failures == 0;
        let rounds: Vec<f64> = all[0]
            .runs
            .iter()
            .zip(&all[1].runs)
            .filter(|_| paired)
            .map(|(b, o)| o.mb_per_s() / b.mb_per_s())
            .collect();
        let per_round = common::median(rounds.clone());
        println!(
            "dc_throughput: RESULT peerlink median {ours:.1} MB/s vs raw str0m (defaults) {base:.1} MB/s: ratio {:.2}; \
             per round {} (median {}) (goal >= 1.5: {})",
            ours / base,
            rounds.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(", "),
            per_round.map_or("n/a".to_owned(), |r| format!("{r:.2}")),
            if ours / base >= 1.5 { "MET" } else { "MISSED" }
        );
    }
    if let (Some(channel), Some(file)) = (all[1].median(), all[2].median()) {
        let paired = all[1].failures == 0 && all[2].failures == 0;
        let rounds: Vec<String> = all[1].runs.iter().zip(&all[2].runs).filter(|_| paired).map(|(c, f)| format!("{:.2}", f.mb_per_s() / c.mb_per_s())).collect();
        println!(
            "dc_throughput: RESULT file transfer median {file:.1} MB/s vs peerlink's raw channel {channel:.1} MB/s: ratio {:.2}; per round {} (goal >= 0.9: {})",
            file / channel,
            rounds.join(", "),
            if file / channel >= 0.9 { "MET" } else { "MISSED" }
        );
    }
    // A long path, in the simulator: the adaptive window against a fixed one the size of
    // str0m's default buffer (128 KiB).
    let sim_mib = env_u64("BENCH_DC_SIM_MIB", 32).unwrap_or(32);
    let mut fixed = peerlink::PeerConfig::default();
    fixed.min_send_window = 128 * 1024;
    fixed.max_buffered_amount = 128 * 1024;
    match (sim_throughput(peerlink::PeerConfig::default(), sim_mib), sim_throughput(fixed, sim_mib)) {
        (Ok(adaptive), Ok(fixed)) => println!(
            "dc_throughput: RESULT simulator, 50 ms RTT, {sim_mib} MiB: adaptive window {adaptive:.1} MB/s, fixed 128 KiB window {fixed:.1} MB/s (virtual time): ratio {:.1}",
            adaptive / fixed
        ),
        (a, f) => eprintln!("dc_throughput: simulator run failed: {:?} / {:?}", a.err(), f.err()),
    }

    if env_flag("BENCH_DC_VARIANTS") {
        const KIB: usize = 1024;
        let mtu_max = str0m::DATAGRAM_MTU_TARGET_MAX;
        let config =
            |sctp_max_buffered_amount, mtu, udp_rcvbuf| Str0mConfig { sctp_max_buffered_amount, mtu, udp_rcvbuf };
        let variants = [
            config(Some(64 * KIB), None, None),
            config(Some(256 * KIB), None, None),
            config(Some(1024 * KIB), None, None),
            config(None, Some(1400), None),
            config(None, Some(mtu_max), None),
            config(None, None, Some(1024 * KIB)),
            config(Some(1024 * KIB), None, Some(4096 * KIB)),
            config(Some(64 * KIB), Some(mtu_max), None),
            config(None, Some(mtu_max), Some(1024 * KIB)),
        ];
        for config in variants {
            all.push(str0m_series(config));
        }

        println!(
            "dc_throughput: summary over {} run(s) each (MB/s; and MB per CPU-second of each side, medians)",
            plan.runs
        );
        let width = all.iter().map(|s| s.label.len()).max().unwrap_or(0);
        println!(
            "dc_throughput:   {:<width$} {:>8} {:>8} {:>15} {:>15}",
            "configuration", "median", "best", "sender MB/cpu", "receiver MB/cpu"
        );
        for s in &all {
            println!(
                "dc_throughput:   {:<width$} {:>8} {:>8} {:>15} {:>15}",
                s.label,
                fmt1(s.median()),
                fmt1(s.best()),
                fmt1(s.sender_mb_per_cpu_s()),
                fmt1(s.receiver_mb_per_cpu_s())
            );
        }
    }

    if all.iter().any(|s| s.failures > 0) { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
