//! An end-to-end encrypted, reconnecting NDJSON stream over TCP: [`peerlink::e2e::stream`] on
//! tokio.
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
//! sit in a `tokio::select!` loop or under a `tokio::time::timeout`.
//!
//! ```no_run
//! # async fn run(me: peerlink::Identity, server: peerlink::Fingerprint) -> std::io::Result<()> {
//! use peerlink::e2e::stream::StreamEvent;
//! use peerlink_tokio::stream::EncryptedTcp;
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

use std::future::{Future, pending};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Instant;

use peerlink::e2e::stream::{EncryptedStream, StreamConfig, StreamError, StreamEvent};
use peerlink::{Fingerprint, Identity};
use peerlink_blocking::stream::{StreamIo, TryWrite};
pub use peerlink_blocking::stream::{DIAL_TIMEOUT, WRITE_TIMEOUT};
use tokio::io::{Interest, Ready};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::sleep_until;

type Dial = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// Writes without waiting (and clears the write readiness when the socket is full).
const TRY_WRITE: TryWrite<TcpStream> = TcpStream::try_write;

/// What ended a wait in [`EncryptedTcp::next_event`].
enum Wake {
    Socket(io::Result<Ready>),
    Timer,
    Accepted(io::Result<(TcpStream, SocketAddr)>),
    Dialed(io::Result<TcpStream>),
}

/// An encrypted stream to one peer over TCP on tokio (see the [module docs](self)).
pub struct EncryptedTcp {
    io: StreamIo<TcpStream>,
    /// An acceptor's listener.
    listener: Option<TcpListener>,
    dialing: Option<Dial>,
    buf: Vec<u8>,
}

impl EncryptedTcp {
    /// Dials `addr` (now, and again after every drop) for a stream to `peer`. A first dial
    /// that fails starts the reconnect schedule, as a drop does ([`StreamEvent::Reconnect`]
    /// on the core's backoff; no [`StreamEvent::Disconnected`], nothing was connected).
    ///
    /// Returns at once: the dial runs inside [`next_event`](Self::next_event), which must be
    /// awaited on a tokio runtime with I/O and time enabled. Panics if the OS RNG fails.
    pub fn connect(addr: SocketAddr, identity: Identity, peer: Fingerprint, config: StreamConfig) -> Self {
        Self::new(StreamIo::dialer(addr, identity, peer, config, TRY_WRITE), None)
    }

    /// Accepts connections from `peer` on `listener` (one at a time, a new one after a drop).
    /// An acceptor has no reconnect schedule: it never reports [`StreamEvent::Reconnect`] or
    /// [`StreamEvent::GaveUp`], and waits for the peer's next connection.
    ///
    /// Does no I/O itself; accepts happen inside [`next_event`](Self::next_event). Panics if
    /// the OS RNG fails.
    pub fn accept(listener: TcpListener, identity: Identity, peer: Fingerprint, config: StreamConfig) -> io::Result<Self> {
        Ok(Self::new(StreamIo::acceptor(identity, peer, config, TRY_WRITE), Some(listener)))
    }

    fn new(io: StreamIo<TcpStream>, listener: Option<TcpListener>) -> Self {
        EncryptedTcp { io, listener, dialing: None, buf: vec![0; 64 * 1024] }
    }

    /// Returns the core machine (its state, counters).
    pub fn core(&self) -> &EncryptedStream {
        self.io.core()
    }

    /// Whether a transport connection is up.
    pub fn is_connected(&self) -> bool {
        self.io.is_connected()
    }

    /// Queues `value` and returns its sequence number. Writes what the socket takes without
    /// waiting; the rest goes out in [`next_event`](Self::next_event) (after the reconnect,
    /// if the connection is down).
    pub fn send(&mut self, value: &serde_json::Value) -> Result<u64, StreamError> {
        self.io.send(Instant::now(), value)
    }

    /// Cuts the transport connection (as a failing network would); the stream reconnects.
    pub fn drop_connection(&mut self) {
        self.io.lost(Instant::now(), &"dropped by the application");
    }

    /// Returns the next event, doing the stream's work until there is one.
    ///
    /// Cancel-safe: dropping the future loses no data, event or dial. Fails only when
    /// accepting fails, or with [`io::ErrorKind::NotConnected`] when nothing can happen any
    /// more (a dialer after [`StreamEvent::GaveUp`]).
    pub async fn next_event(&mut self) -> io::Result<StreamEvent> {
        loop {
            let event = self.io.poll_event(Instant::now());
            if let Some(addr) = self.io.take_dial() {
                self.dialing = Some(dial(addr));
            }
            if let Some(event) = event {
                return Ok(event);
            }
            self.io.check_running()?;
            let wake = self.wait().await;
            let now = Instant::now();
            match wake {
                Wake::Socket(Ok(ready)) => {
                    if ready.is_writable() {
                        self.io.flush(now);
                    }
                    if let Some(socket) = self.io.socket() {
                        let result = socket.try_read(&mut self.buf);
                        self.io.handle_read(now, result, &self.buf);
                    }
                }
                Wake::Socket(Err(e)) => self.io.lost(now, &e),
                Wake::Timer => {}
                Wake::Accepted(result) => self.io.accepted(now, result.inspect(|(socket, _)| nodelay(socket)))?,
                Wake::Dialed(result) => {
                    self.dialing = None;
                    self.io.dialed(now, result.inspect(nodelay));
                }
            }
        }
    }

    /// Waits for the socket, the next deadline, a connection to accept or the dial.
    async fn wait(&mut self) -> Wake {
        let deadline = self.io.next_deadline();
        let interest = if self.io.unwritten().is_empty() { Interest::READABLE } else { Interest::READABLE | Interest::WRITABLE };
        let listener = self.listener.as_ref().filter(|_| self.io.wants_accept());
        tokio::select! {
            r = maybe(self.io.socket().map(|s| s.ready(interest))) => Wake::Socket(r),
            () = maybe(deadline.map(|t| sleep_until(t.into()))) => Wake::Timer,
            r = maybe(listener.map(TcpListener::accept)) => Wake::Accepted(r),
            r = maybe(self.dialing.as_mut()) => Wake::Dialed(r),
        }
    }
}

/// Dials `addr`, for up to [`DIAL_TIMEOUT`].
fn dial(addr: SocketAddr) -> Dial {
    Box::pin(async move {
        tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "dial timed out")))
    })
}

/// Sends small lines at once (no Nagle delay).
fn nodelay(socket: &TcpStream) {
    let _ = socket.set_nodelay(true);
}

/// Awaits `f`, or forever without one (a disabled `select!` branch).
async fn maybe<F: Future>(f: Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => pending().await,
    }
}
