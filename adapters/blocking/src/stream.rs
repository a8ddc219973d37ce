//! An end-to-end encrypted, reconnecting NDJSON stream over TCP: [`peerlink::e2e::stream`] on
//! std sockets.
//!
//! One side dials ([`EncryptedTcp::connect`], the initiator of the key exchange) and dials
//! again after a drop, on the core's backoff schedule; the other accepts
//! ([`EncryptedTcp::accept`]) a new connection whenever it has none. Whatever sits between
//! them (a proxy, a relay, the network) sees only ciphertext and the frame kinds; messages
//! sent while the connection is down wait (bounded), and after a reconnect the two sides
//! resume the session and every message arrives once, in order.
//!
//! [`StreamIo`] is the part of such an adapter that does not depend on how it waits: the core,
//! the socket, the bytes not written yet and what happens on connect, on loss and on a write
//! that stalls. [`EncryptedTcp`] and the smol and tokio adapters are built on it.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! use peerlink::Identity;
//! use peerlink_blocking::stream::EncryptedTcp;
//! # let (me, server): (Identity, peerlink::Fingerprint) = todo!();
//! let mut stream = EncryptedTcp::connect("127.0.0.1:7000".parse().unwrap(), me, server, Default::default());
//! stream.send(&serde_json::json!({"type": "tool_call", "name": "secretOp"})).ok();
//! while let Some(event) = stream.next_event(std::time::Duration::from_secs(5))? {
//!     println!("{event:?}");
//! }
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::fmt::Display;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use peerlink::e2e::Role;
use peerlink::e2e::stream::{EncryptedStream, StreamConfig, StreamError, StreamEvent};
use peerlink::{Fingerprint, Identity};
use rand::TryRngCore;
use tracing::debug;

/// How long a dial may take before it counts as a failed attempt.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long queued bytes may make no progress (the peer stopped reading) before the
/// connection counts as lost.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes taken from the core ahead of the socket; the rest waits in the core's bounded buffer.
const OUT_AHEAD: usize = 64 * 1024;

/// How long one write on a blocking socket may wait for room (then the loop reads, and
/// tries again).
const BLOCKING_WRITE_WAIT: Duration = Duration::from_millis(50);

/// Writes some of `bytes` to a socket without waiting (or, on a blocking socket, within its
/// write timeout): the number written, or an error of kind [`io::ErrorKind::WouldBlock`]
/// when it takes nothing now.
pub type TryWrite<S> = fn(&S, &[u8]) -> io::Result<usize>;

/// The runtime-independent half of an encrypted stream adapter: the core machine, the
/// current connection (a socket of type `S`), the bytes taken from the core and not written
/// yet, and the deadline after which those count as stalled.
///
/// The adapter waits in its own way (for the socket, a dial, a connection to accept, or
/// [`next_deadline`](Self::next_deadline)) and reports what happened:
/// [`dialed`](Self::dialed), [`accepted`](Self::accepted), [`handle_read`](Self::handle_read),
/// [`handle_written`](Self::handle_written) (for a write it awaited itself),
/// [`flush`](Self::flush) (the socket has room) or [`lost`](Self::lost). Then it drains
/// [`poll_event`](Self::poll_event), which also writes, fires the core's timer and notices a
/// stalled write, and dials where [`take_dial`](Self::take_dial) says (at the start and on
/// [`StreamEvent::Reconnect`], one dial at a time); an acceptor accepts while
/// [`wants_accept`](Self::wants_accept).
///
/// At most 64 KiB are taken from the core ahead of the socket (the rest waits, bounded, in
/// the core); bytes that make no progress for [`WRITE_TIMEOUT`] count as a lost connection,
/// and so do a write or read error and the peer closing. A dial that fails is reported to the
/// core, whose reconnect schedule (initiator only) asks for the next one.
pub struct StreamIo<S> {
    core: EncryptedStream,
    /// Where a dialer dials; `None` for an acceptor.
    addr: Option<SocketAddr>,
    /// A dial is wanted (at the start, on [`StreamEvent::Reconnect`]).
    dial_due: bool,
    /// The adapter's dial is in flight.
    dialing: bool,
    socket: Option<S>,
    try_write: TryWrite<S>,
    /// Lines taken from the core and not written yet.
    out: Vec<u8>,
    /// When `out` counts as stalled: [`WRITE_TIMEOUT`] after it last moved.
    write_deadline: Option<Instant>,
}

impl<S> StreamIo<S> {
    /// Creates a dialer of `addr` for the stream to `peer` (the initiator of the key
    /// exchange), disconnected, its first dial due. Seeded from the OS RNG (panics if it
    /// fails). `try_write` writes to the adapter's socket without waiting.
    pub fn dialer(addr: SocketAddr, identity: Identity, peer: Fingerprint, config: StreamConfig, try_write: TryWrite<S>) -> Self {
        Self::new(Some(addr), identity, peer, config, try_write)
    }

    /// Creates an acceptor of the stream from `peer` (the responder), disconnected. It has
    /// no reconnect schedule: it waits for the peer's next connection. Seeded from the OS RNG
    /// (panics if it fails). `try_write` writes to the adapter's socket without waiting.
    pub fn acceptor(identity: Identity, peer: Fingerprint, config: StreamConfig, try_write: TryWrite<S>) -> Self {
        Self::new(None, identity, peer, config, try_write)
    }

    fn new(addr: Option<SocketAddr>, identity: Identity, peer: Fingerprint, config: StreamConfig, try_write: TryWrite<S>) -> Self {
        let role = if addr.is_some() { Role::Initiator } else { Role::Responder };
        let seed = rand::rngs::OsRng.try_next_u64().expect("the OS RNG works");
        StreamIo {
            core: EncryptedStream::new(identity, peer, role, seed, config),
            addr,
            dial_due: addr.is_some(),
            dialing: false,
            socket: None,
            try_write,
            out: Vec::new(),
            write_deadline: None,
        }
    }

    /// Returns the core machine (its state, counters).
    pub fn core(&self) -> &EncryptedStream {
        &self.core
    }

    /// Returns the current connection, if any.
    pub fn socket(&self) -> Option<&S> {
        self.socket.as_ref()
    }

    /// Whether a transport connection is up.
    pub fn is_connected(&self) -> bool {
        self.socket.is_some()
    }

    /// Returns the bytes taken from the core and not written yet (what to write when the
    /// socket has room; report the result with [`handle_written`](Self::handle_written)).
    pub fn unwritten(&self) -> &[u8] {
        &self.out
    }

    /// Returns when [`poll_event`](Self::poll_event) has work to do without any I/O: the
    /// core's next reconnect, or the moment the unwritten bytes count as stalled.
    pub fn next_deadline(&self) -> Option<Instant> {
        [self.core.poll_timeout(), self.write_deadline].into_iter().flatten().min()
    }

    /// Queues `value` in the core and writes what the socket takes; returns its sequence
    /// number.
    pub fn send(&mut self, now: Instant, value: &serde_json::Value) -> Result<u64, StreamError> {
        let seq = self.core.send(value)?;
        self.flush(now);
        Ok(seq)
    }

    /// Takes in a new connection (it replaces any before it): the core starts the exchange
    /// or offers to resume, and the first lines go out.
    fn attach(&mut self, now: Instant, socket: S) {
        self.socket = Some(socket);
        self.out.clear();
        self.write_deadline = None;
        self.core.handle_connected(now);
        self.flush(now);
    }

    /// Returns where to dial when a dial is due (at the start, after
    /// [`StreamEvent::Reconnect`]) and none is in flight; report its result with
    /// [`dialed`](Self::dialed). A dial still in flight when the next is due keeps its time
    /// rather than start over.
    pub fn take_dial(&mut self) -> Option<SocketAddr> {
        let addr = self.addr?;
        if !std::mem::take(&mut self.dial_due) {
            return None;
        }
        if self.dialing {
            debug!(%addr, "still dialing");
            return None;
        }
        debug!(%addr, "dialing");
        self.dialing = true;
        Some(addr)
    }

    /// Whether the stream is an acceptor with no connection, waiting for one.
    pub fn wants_accept(&self) -> bool {
        self.addr.is_none() && self.socket.is_none()
    }

    /// Takes in the result of a dial: attaches the connection, or counts a failed dial (the
    /// first one starts the core's reconnect schedule; while it runs, the next deadline
    /// stands).
    pub fn dialed(&mut self, now: Instant, result: io::Result<S>) {
        self.dialing = false;
        match result {
            Ok(socket) => self.attach(now, socket),
            Err(error) => {
                debug!(%error, "dial failed");
                if self.socket.is_none() {
                    self.core.handle_disconnected(now);
                }
            }
        }
    }

    /// Takes in the result of accepting: attaches the connection. An error that concerns one
    /// incoming connection (aborted, reset, interrupted) is skipped; any other is the
    /// listener's and is returned.
    pub fn accepted(&mut self, now: Instant, result: io::Result<(S, SocketAddr)>) -> io::Result<()> {
        match result {
            Ok((socket, from)) => {
                debug!(%from, "accepted");
                self.attach(now, socket);
                Ok(())
            }
            Err(e) if is_transient_accept_error(&e) => {
                debug!(error = %e, "accept failed");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Fails with [`io::ErrorKind::NotConnected`] when nothing can happen any more: the
    /// stream, a dialer, has no connection, no dial in flight or due, and no reconnect
    /// scheduled (after [`StreamEvent::GaveUp`]). An acceptor never fails here.
    pub fn check_running(&self) -> io::Result<()> {
        let idle = self.addr.is_some() && !self.dialing && !self.dial_due && self.socket.is_none();
        if idle && self.core.poll_timeout().is_none() {
            return Err(io::Error::new(io::ErrorKind::NotConnected, "the stream gave up reconnecting"));
        }
        Ok(())
    }

    /// Drops the connection, if there is one, as lost because of `error`: the unwritten
    /// bytes go (the core sends again what it must) and the core reports
    /// [`StreamEvent::Disconnected`].
    pub fn lost(&mut self, now: Instant, error: &dyn Display) {
        if self.socket.take().is_some() {
            debug!(%error, "connection lost");
            self.out.clear();
            self.write_deadline = None;
            self.core.handle_disconnected(now);
        }
    }

    /// Takes in the result of a read into `buf` on the connection: bytes for the core, the
    /// peer closing (0 bytes) or an error. [`io::ErrorKind::WouldBlock`],
    /// [`io::ErrorKind::TimedOut`] and [`io::ErrorKind::Interrupted`] mean nothing came.
    pub fn handle_read(&mut self, now: Instant, result: io::Result<usize>, buf: &[u8]) {
        match result {
            Ok(0) => self.lost(now, &"closed by the peer"),
            Ok(n) => self.core.handle_bytes(now, &buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {}
            Err(e) => self.lost(now, &e),
        }
    }

    /// Takes in the result of writing (a prefix of) [`unwritten`](Self::unwritten): those
    /// bytes go and the stall deadline moves on. A write of 0 bytes or an error (other than
    /// [`io::ErrorKind::WouldBlock`], [`io::ErrorKind::Interrupted`]) loses the connection.
    pub fn handle_written(&mut self, now: Instant, result: io::Result<usize>) {
        match result {
            Ok(0) => self.lost(now, &"write returned 0"),
            Ok(n) => {
                self.out.drain(..n);
                self.write_deadline = Some(now + WRITE_TIMEOUT);
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => self.lost(now, &e),
        }
    }

    /// Takes lines from the core (up to 64 KiB ahead of the socket) and writes what the
    /// socket takes without waiting.
    pub fn flush(&mut self, now: Instant) {
        loop {
            if self.out.is_empty() {
                self.write_deadline = None;
            }
            while self.out.len() < OUT_AHEAD {
                let Some(line) = self.core.poll_transmit() else { break };
                if self.out.is_empty() {
                    self.write_deadline = Some(now + WRITE_TIMEOUT);
                }
                self.out.extend_from_slice(&line);
            }
            let Some(socket) = &self.socket else { return };
            if self.out.is_empty() {
                return;
            }
            match (self.try_write)(socket, &self.out) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                result => self.handle_written(now, result),
            }
        }
    }

    /// Does what is due at `now` (the core's timer, writes, the stall check) and returns the
    /// core's next event. On [`StreamEvent::Reconnect`] a dial is due
    /// ([`take_dial`](Self::take_dial)).
    pub fn poll_event(&mut self, now: Instant) -> Option<StreamEvent> {
        if self.core.poll_timeout().is_some_and(|t| t <= now) {
            self.core.handle_timeout(now);
        }
        self.flush(now);
        if self.write_deadline.is_some_and(|t| t <= now) {
            self.lost(now, &"write stalled");
        }
        let event = self.core.poll_event()?;
        if let StreamEvent::Reconnect { .. } = event {
            self.dial_due = true;
        }
        // Taking an event can let the core take in more input, and answer it.
        self.flush(now);
        Some(event)
    }
}

/// Readies a new connection: blocking, no Nagle delay, and writes that wait at most
/// [`BLOCKING_WRITE_WAIT`] for room (the stall deadline does the rest).
fn prepare(socket: TcpStream) -> io::Result<TcpStream> {
    socket.set_nonblocking(false)?;
    socket.set_nodelay(true)?;
    socket.set_write_timeout(Some(BLOCKING_WRITE_WAIT))?;
    Ok(socket)
}

/// Writes on a blocking socket with a write timeout: a timeout that wrote nothing is
/// [`io::ErrorKind::WouldBlock`] (as on Unix; Windows says `TimedOut`).
fn write_within_timeout(mut socket: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    match socket.write(bytes) {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(io::ErrorKind::WouldBlock.into()),
        result => result,
    }
}

/// Whether an error from accepting concerns one incoming connection (skip it and accept the
/// next), not the listener.
fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock)
}

/// An encrypted stream to one peer over TCP (see the [module docs](self)).
pub struct EncryptedTcp {
    io: StreamIo<TcpStream>,
    /// An acceptor's listener.
    listener: Option<TcpListener>,
    events: VecDeque<StreamEvent>,
    buf: Vec<u8>,
}

impl EncryptedTcp {
    /// Dials `addr` (now, and again after every drop) for a stream to `peer`. A first dial
    /// that fails starts the reconnect schedule, as a drop does ([`StreamEvent::Reconnect`]
    /// on the core's backoff; no [`StreamEvent::Disconnected`], nothing was connected).
    ///
    /// The first dial happens here and may block up to [`DIAL_TIMEOUT`]. Panics if the OS RNG
    /// fails.
    pub fn connect(addr: SocketAddr, identity: Identity, peer: Fingerprint, config: StreamConfig) -> Self {
        let mut s = Self::new(StreamIo::dialer(addr, identity, peer, config, write_within_timeout), None);
        s.dial(Instant::now());
        s
    }

    /// Accepts connections from `peer` on `listener` (one at a time, a new one after a drop).
    /// An acceptor has no reconnect schedule: it never reports [`StreamEvent::Reconnect`] or
    /// [`StreamEvent::GaveUp`]. Panics if the OS RNG fails.
    pub fn accept(listener: TcpListener, identity: Identity, peer: Fingerprint, config: StreamConfig) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self::new(StreamIo::acceptor(identity, peer, config, write_within_timeout), Some(listener)))
    }

    fn new(io: StreamIo<TcpStream>, listener: Option<TcpListener>) -> Self {
        EncryptedTcp { io, listener, events: VecDeque::new(), buf: vec![0; 64 * 1024] }
    }

    /// Returns the core machine (its state, counters).
    pub fn core(&self) -> &EncryptedStream {
        self.io.core()
    }

    /// Whether a transport connection is up.
    pub fn is_connected(&self) -> bool {
        self.io.is_connected()
    }

    /// Queues `value` and returns its sequence number. Writes what the socket takes within a
    /// short wait; the rest goes out in [`poll`](Self::poll) (after the reconnect, if the
    /// connection is down).
    pub fn send(&mut self, value: &serde_json::Value) -> Result<u64, StreamError> {
        self.io.send(Instant::now(), value)
    }

    /// Cuts the transport connection (as a failing network would); the stream reconnects.
    pub fn drop_connection(&mut self) {
        if let Some(socket) = self.io.socket() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        self.io.lost(Instant::now(), &"dropped by the application");
    }

    /// Dials, if a dial is due (the dial blocks).
    fn dial(&mut self, now: Instant) {
        if let Some(addr) = self.io.take_dial() {
            let result = TcpStream::connect_timeout(&addr, DIAL_TIMEOUT).and_then(prepare);
            self.io.dialed(now, result);
        }
    }

    /// Moves the core's events out, dialing on [`StreamEvent::Reconnect`].
    fn pump(&mut self, now: Instant) {
        while let Some(event) = self.io.poll_event(now) {
            self.dial(now);
            self.events.push_back(event);
        }
    }

    /// Runs the stream for up to `max`: reads, writes, timers, reconnects. Returns early when
    /// an event is there.
    pub fn poll(&mut self, max: Duration) -> io::Result<()> {
        let deadline = Instant::now() + max;
        loop {
            let now = Instant::now();
            self.pump(now);
            if let Some(listener) = self.listener.as_ref().filter(|_| self.io.wants_accept()) {
                match listener.accept() {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    result => self.io.accepted(now, result.and_then(|(socket, from)| Ok((prepare(socket)?, from))))?,
                }
            }
            if !self.events.is_empty() || now >= deadline {
                return Ok(());
            }
            let mut wait = self.io.next_deadline().map_or(deadline, |t| t.min(deadline)).saturating_duration_since(now);
            if !self.io.unwritten().is_empty() {
                // Come back soon to write the rest.
                wait = wait.min(Duration::from_millis(5));
            }
            let wait = wait.max(Duration::from_millis(1));
            match self.io.socket() {
                Some(mut socket) => {
                    socket.set_read_timeout(Some(wait.min(Duration::from_millis(50))))?;
                    let result = socket.read(&mut self.buf);
                    self.io.handle_read(Instant::now(), result, &self.buf);
                }
                None => std::thread::sleep(wait.min(Duration::from_millis(5))),
            }
        }
    }

    /// Returns the next event, waiting up to `max` for one.
    pub fn next_event(&mut self, max: Duration) -> io::Result<Option<StreamEvent>> {
        if self.events.is_empty() {
            self.poll(max)?;
        }
        Ok(self.events.pop_front())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn identity(seed: u64) -> Identity {
        Identity::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed))
    }

    fn config() -> StreamConfig {
        let mut c = StreamConfig::default();
        c.initial_backoff = Duration::from_millis(50);
        c.max_backoff = Duration::from_millis(200);
        c.max_attempts = Some(2);
        c
    }

    /// A socket whose peer never reads.
    struct Full;

    fn full(_: &Full, _: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn events(io: &mut StreamIo<Full>, now: Instant) -> Vec<StreamEvent> {
        std::iter::from_fn(|| io.poll_event(now)).collect()
    }

    #[test]
    fn a_failed_first_dial_is_retried_on_the_schedule_until_it_gives_up() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut io = StreamIo::dialer(addr, identity(1), identity(2).fingerprint(), config(), full);
        let t0 = Instant::now();
        assert_eq!(io.take_dial(), Some(addr), "the first dial is due at once");
        assert_eq!(io.take_dial(), None, "one dial at a time");
        io.check_running().unwrap();
        io.dialed(t0, Err(io::ErrorKind::ConnectionRefused.into()));
        io.check_running().unwrap();
        let mut seen = vec![];
        let mut dials = 0;
        while let Some(t) = io.next_deadline() {
            seen.extend(events(&mut io, t));
            if let Some(a) = io.take_dial() {
                assert_eq!(a, addr);
                dials += 1;
                io.dialed(t, Err(io::ErrorKind::ConnectionRefused.into()));
            }
        }
        assert_eq!(seen, vec![StreamEvent::Reconnect { attempt: 1 }, StreamEvent::Reconnect { attempt: 2 }, StreamEvent::GaveUp]);
        assert_eq!(dials, 2);
        assert_eq!(io.check_running().unwrap_err().kind(), io::ErrorKind::NotConnected);
    }

    #[test]
    fn a_write_that_makes_no_progress_loses_the_connection() {
        let mut io = StreamIo::dialer("127.0.0.1:9".parse().unwrap(), identity(3), identity(4).fingerprint(), config(), full);
        let t0 = Instant::now();
        assert!(io.take_dial().is_some());
        io.dialed(t0, Ok(Full));
        assert!(io.is_connected());
        assert!(!io.unwritten().is_empty(), "the key exchange offer waits for the socket");
        assert_eq!(io.next_deadline(), Some(t0 + WRITE_TIMEOUT));
        assert_eq!(events(&mut io, t0 + WRITE_TIMEOUT / 2), vec![]);
        assert!(io.is_connected());
        assert_eq!(events(&mut io, t0 + WRITE_TIMEOUT), vec![StreamEvent::Disconnected]);
        assert!(!io.is_connected() && io.unwritten().is_empty());
        // The dialer's schedule runs: the next dial comes on Reconnect.
        assert!(io.core().poll_timeout().is_some());
    }

    #[test]
    fn an_acceptor_accepts_and_never_dials() {
        let mut io = StreamIo::acceptor(identity(5), identity(6).fingerprint(), config(), full);
        let t0 = Instant::now();
        assert!(io.wants_accept());
        assert_eq!(io.take_dial(), None);
        io.check_running().unwrap();
        io.accepted(t0, Err(io::ErrorKind::ConnectionAborted.into())).unwrap();
        assert!(io.wants_accept());
        io.accepted(t0, Ok((Full, "127.0.0.1:1".parse().unwrap()))).unwrap();
        assert!(io.is_connected() && !io.wants_accept());
        io.handle_read(t0, Ok(0), &[]);
        assert_eq!(events(&mut io, t0), vec![StreamEvent::Disconnected]);
        assert!(io.wants_accept());
        assert_eq!(io.next_deadline(), None, "no schedule, nothing to dial");
        io.check_running().unwrap();
        let refused = io.accepted(t0, Err(io::ErrorKind::InvalidInput.into()));
        assert_eq!(refused.unwrap_err().kind(), io::ErrorKind::InvalidInput, "the listener's own error");
    }
}
