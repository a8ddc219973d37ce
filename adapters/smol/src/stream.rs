//! An end-to-end encrypted, reconnecting NDJSON stream over TCP: [`peerlink::e2e::stream`] on
//! smol.
//!
//! One side dials ([`EncryptedTcp::connect`], the initiator of the key exchange) and dials
//! again after a drop, on the core's backoff schedule; the other accepts
//! ([`EncryptedTcp::accept`]) a new connection whenever it has none. Whatever sits between
//! them sees only ciphertext and the frame kinds; messages sent while the connection is down
//! wait (bounded), and after a reconnect the two sides resume the session and every message
//! arrives once, in order.
//!
//! There is no background task: [`EncryptedTcp::next_event`] does all the work (reads,
//! writes, timers, accepts, dials) while it is awaited, so keep awaiting it. It is
//! cancel-safe: every byte, event and pending dial lives in the [`EncryptedTcp`], so it can
//! race a timer or another future (`FutureExt::or`) and be dropped.
//!
//! ```no_run
//! # async fn run(me: peerlink::Identity, server: peerlink::Fingerprint) -> std::io::Result<()> {
//! use peerlink::e2e::stream::StreamEvent;
//! use peerlink_smol::stream::EncryptedTcp;
//!
//! let mut stream = EncryptedTcp::connect("127.0.0.1:7000".parse().unwrap(), me, server, Default::default());
//! stream.send(&serde_json::json!({"type": "tool_call", "name": "secretOp"})).ok();
//! loop {
//!     match stream.next_event().await? {
//!         StreamEvent::Message(value) => println!("{value}"),
//!         StreamEvent::GaveUp => break,
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```

use std::fmt::Display;
use std::future::{Future, pending};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_lite::future::Boxed;
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use peerlink::e2e::Role;
use peerlink::e2e::stream::{EncryptedStream, StreamConfig, StreamError, StreamEvent};
use peerlink::{Fingerprint, Identity};
use rand::TryRngCore;
use smol::Timer;
use smol::net::{TcpListener, TcpStream};
use tracing::debug;

/// How long a dial may take before it counts as a failed attempt.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long queued bytes may make no progress (the peer stopped reading) before the
/// connection counts as lost.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes taken from the core ahead of the socket; the rest waits in the core's bounded buffer.
const OUT_AHEAD: usize = 64 * 1024;

enum Side {
    Dial(SocketAddr),
    Accept(TcpListener),
}

/// What ended a wait in [`EncryptedTcp::next_event`].
enum Wake {
    Wrote(io::Result<usize>),
    Read(io::Result<usize>),
    Timer,
    Accepted(io::Result<(TcpStream, SocketAddr)>),
    Dialed(io::Result<TcpStream>),
}

/// An encrypted stream to one peer over TCP on smol (see the [module docs](self)).
pub struct EncryptedTcp {
    core: EncryptedStream,
    side: Side,
    socket: Option<TcpStream>,
    dialing: Option<Boxed<io::Result<TcpStream>>>,
    /// Lines taken from the core and not written yet.
    out: Vec<u8>,
    /// When `out` counts as stalled: [`WRITE_TIMEOUT`] after it last moved.
    write_deadline: Option<Instant>,
    /// Whether the core's reconnect schedule ever started (see `dial_failed`).
    scheduled: bool,
    buf: Vec<u8>,
}

impl EncryptedTcp {
    /// Dials `addr` (now, and again after every drop) for a stream to `peer`. A first dial
    /// that fails counts as a drop: [`StreamEvent::Disconnected`], then the reconnect schedule.
    ///
    /// Returns at once: the dial runs inside [`next_event`](Self::next_event). Panics if the
    /// OS RNG fails.
    pub fn connect(addr: SocketAddr, identity: Identity, peer: Fingerprint, config: StreamConfig) -> Self {
        let mut s = Self::new(Side::Dial(addr), identity, peer, Role::Initiator, config);
        s.start_dial();
        s
    }

    /// Accepts connections from `peer` on `listener` (one at a time, a new one after a drop).
    ///
    /// While disconnected, the core still reports [`StreamEvent::Reconnect`] on its schedule;
    /// an acceptor has nothing to dial and waits for the peer.
    /// Does no I/O itself; accepts happen inside [`next_event`](Self::next_event). Panics if
    /// the OS RNG fails.
    pub fn accept(listener: TcpListener, identity: Identity, peer: Fingerprint, config: StreamConfig) -> io::Result<Self> {
        Ok(Self::new(Side::Accept(listener), identity, peer, Role::Responder, config))
    }

    fn new(side: Side, identity: Identity, peer: Fingerprint, role: Role, config: StreamConfig) -> Self {
        let seed = rand::rngs::OsRng.try_next_u64().expect("the OS RNG works");
        EncryptedTcp {
            core: EncryptedStream::new(identity, peer, role, seed, config),
            side,
            socket: None,
            dialing: None,
            out: Vec::new(),
            write_deadline: None,
            scheduled: false,
            buf: vec![0; 64 * 1024],
        }
    }

    /// Returns the core machine (its state, counters).
    pub fn core(&self) -> &EncryptedStream {
        &self.core
    }

    /// Whether a transport connection is up.
    pub fn is_connected(&self) -> bool {
        self.socket.is_some()
    }

    /// Queues `value` and returns its sequence number. Writes what the socket takes without
    /// waiting; the rest goes out in [`next_event`](Self::next_event) (after the reconnect,
    /// if the connection is down).
    pub fn send(&mut self, value: &serde_json::Value) -> Result<u64, StreamError> {
        let seq = self.core.send(value)?;
        self.flush(Instant::now());
        Ok(seq)
    }

    /// Cuts the transport connection (as a failing network would); the stream reconnects.
    pub fn drop_connection(&mut self) {
        if let Some(socket) = &self.socket {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
        self.lost(Instant::now(), &"dropped by the application");
    }

    /// Returns the next event, doing the stream's work until there is one.
    ///
    /// Cancel-safe: dropping the future loses no data, event or dial. Fails only when
    /// accepting fails, or with [`io::ErrorKind::NotConnected`] when nothing can happen any
    /// more (a dialer after [`StreamEvent::GaveUp`]).
    pub async fn next_event(&mut self) -> io::Result<StreamEvent> {
        loop {
            let now = Instant::now();
            if self.core.poll_timeout().is_some_and(|t| t <= now) {
                self.core.handle_timeout(now);
            }
            self.flush(now);
            if self.write_deadline.is_some_and(|t| t <= now) {
                self.lost(now, &"write stalled");
            }
            if let Some(event) = self.core.poll_event() {
                if let StreamEvent::Reconnect { .. } = event {
                    self.start_dial();
                }
                self.flush(now);
                return Ok(event);
            }
            let idle = self.socket.is_none() && self.dialing.is_none() && matches!(self.side, Side::Dial(_));
            if idle && self.core.poll_timeout().is_none() {
                return Err(io::Error::new(io::ErrorKind::NotConnected, "the stream gave up reconnecting"));
            }
            let wake = self.wait().await;
            let now = Instant::now();
            match wake {
                Wake::Wrote(Ok(0)) => self.lost(now, &"write returned 0"),
                Wake::Wrote(Ok(n)) => {
                    self.out.drain(..n);
                    self.write_deadline = Some(now + WRITE_TIMEOUT);
                }
                Wake::Read(Ok(0)) => self.lost(now, &"closed by the peer"),
                Wake::Read(Ok(n)) => self.core.handle_bytes(now, &self.buf[..n]),
                Wake::Wrote(Err(e)) | Wake::Read(Err(e)) => self.lost(now, &e),
                Wake::Timer => {}
                Wake::Accepted(Ok((socket, from))) => {
                    debug!(%from, "accepted");
                    self.attach(now, socket);
                }
                Wake::Accepted(Err(e)) if is_transient(&e) => debug!(error = %e, "accept failed"),
                Wake::Accepted(Err(e)) => return Err(e),
                Wake::Dialed(result) => {
                    self.dialing = None;
                    match result {
                        Ok(socket) => self.attach(now, socket),
                        Err(e) => self.dial_failed(now, &e),
                    }
                }
            }
        }
    }

    /// Waits for the socket, the next deadline, a connection to accept or the dial.
    async fn wait(&mut self) -> Wake {
        let deadline = [self.core.poll_timeout(), self.write_deadline].into_iter().flatten().min();
        let EncryptedTcp { side, socket, dialing, out, buf, .. } = self;
        let listener = match (&*side, &*socket) {
            (Side::Accept(listener), None) => Some(listener),
            _ => None,
        };
        // A smol socket reads and writes through `&mut`; clones share it (one file descriptor).
        let write = socket.as_ref().filter(|_| !out.is_empty()).map(|s| {
            let mut s = s.clone();
            async move { Wake::Wrote(s.write(out).await) }
        });
        let read = socket.as_ref().map(|s| {
            let mut s = s.clone();
            async move { Wake::Read(s.read(buf).await) }
        });
        let timer = async move {
            deadline.map_or_else(Timer::never, Timer::at).await;
            Wake::Timer
        };
        let accept = listener.map(|l| async move { Wake::Accepted(l.accept().await) });
        let dial = dialing.as_mut().map(|d| async move { Wake::Dialed(d.await) });
        maybe(write).or(maybe(read)).or(timer).or(maybe(accept)).or(maybe(dial)).await
    }

    fn start_dial(&mut self) {
        let Side::Dial(addr) = self.side else { return };
        if self.dialing.is_some() {
            // A slow dial keeps its time (up to DIAL_TIMEOUT) rather than start over.
            debug!(%addr, "still dialing");
            return;
        }
        debug!(%addr, "dialing");
        let timeout = async {
            Timer::after(DIAL_TIMEOUT).await;
            Err(io::Error::new(io::ErrorKind::TimedOut, "dial timed out"))
        };
        self.dialing = Some(TcpStream::connect(addr).or(timeout).boxed());
    }

    fn dial_failed(&mut self, now: Instant, error: &dyn Display) {
        debug!(%error, "dial failed");
        if !self.scheduled {
            // The core starts its schedule only when a connection drops, so a first dial that
            // fails would never be retried: count it as a connection that dropped at once.
            self.scheduled = true;
            self.core.handle_connected(now);
            self.core.handle_disconnected(now);
        }
    }

    fn attach(&mut self, now: Instant, socket: TcpStream) {
        let _ = socket.set_nodelay(true);
        self.socket = Some(socket);
        self.scheduled = true;
        self.out.clear();
        self.write_deadline = None;
        self.core.handle_connected(now);
        self.flush(now);
    }

    fn lost(&mut self, now: Instant, error: &dyn Display) {
        if self.socket.take().is_some() {
            debug!(%error, "connection lost");
            self.out.clear();
            self.write_deadline = None;
            self.core.handle_disconnected(now);
        }
    }

    /// Takes lines from the core (up to [`OUT_AHEAD`] bytes ahead) and writes what the socket
    /// takes without waiting.
    fn flush(&mut self, now: Instant) {
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
            // A plain non-blocking system call (the socket is registered non-blocking).
            match socket2::SockRef::from(socket).send(&self.out) {
                Ok(0) => return self.lost(now, &"write returned 0"),
                Ok(n) => {
                    self.out.drain(..n);
                    self.write_deadline = Some(now + WRITE_TIMEOUT);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.lost(now, &e),
            }
        }
    }
}

/// Awaits `f`, or forever without one.
async fn maybe<F: Future>(f: Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => pending().await,
    }
}

/// Accept errors that concern one incoming connection, not the listener.
fn is_transient(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock)
}
