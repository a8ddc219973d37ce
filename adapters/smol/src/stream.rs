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

use std::future::{Future, pending};
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use futures_lite::future::Boxed;
use futures_lite::{AsyncReadExt, AsyncWriteExt, FutureExt};
use peerlink::e2e::stream::{EncryptedStream, StreamConfig, StreamError, StreamEvent};
use peerlink::{Fingerprint, Identity};
use peerlink_blocking::stream::{StreamIo, TryWrite};
pub use peerlink_blocking::stream::{DIAL_TIMEOUT, WRITE_TIMEOUT};
use smol::Timer;
use smol::net::{TcpListener, TcpStream};

/// Writes without waiting: a plain non-blocking system call (the socket is registered
/// non-blocking).
const TRY_WRITE: TryWrite<TcpStream> = |socket, bytes| socket2::SockRef::from(socket).send(bytes);

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
    io: StreamIo<TcpStream>,
    /// An acceptor's listener.
    listener: Option<TcpListener>,
    dialing: Option<Boxed<io::Result<TcpStream>>>,
    buf: Vec<u8>,
}

impl EncryptedTcp {
    /// Dials `addr` (now, and again after every drop) for a stream to `peer`. A first dial
    /// that fails starts the reconnect schedule, as a drop does ([`StreamEvent::Reconnect`]
    /// on the core's backoff; no [`StreamEvent::Disconnected`], nothing was connected).
    ///
    /// Returns at once: the dial runs inside [`next_event`](Self::next_event). Panics if the
    /// OS RNG fails.
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
        if let Some(socket) = self.io.socket() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
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
                Wake::Wrote(result) => self.io.handle_written(now, result),
                Wake::Read(result) => self.io.handle_read(now, result, &self.buf),
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
        let EncryptedTcp { io, listener, dialing, buf } = self;
        let deadline = io.next_deadline();
        let (socket, out) = (io.socket(), io.unwritten());
        let listener = listener.as_ref().filter(|_| io.wants_accept());
        // A smol socket reads and writes through `&mut`; clones share it (one file descriptor).
        let write = socket.filter(|_| !out.is_empty()).map(|s| {
            let mut s = s.clone();
            async move { Wake::Wrote(s.write(out).await) }
        });
        let read = socket.map(|s| {
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
}

/// Dials `addr`, for up to [`DIAL_TIMEOUT`].
fn dial(addr: SocketAddr) -> Boxed<io::Result<TcpStream>> {
    let timeout = async {
        Timer::after(DIAL_TIMEOUT).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, "dial timed out"))
    };
    TcpStream::connect(addr).or(timeout).boxed()
}

/// Sends small lines at once (no Nagle delay).
fn nodelay(socket: &TcpStream) {
    let _ = socket.set_nodelay(true);
}

/// Awaits `f`, or forever without one.
async fn maybe<F: Future>(f: Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => pending().await,
    }
}
