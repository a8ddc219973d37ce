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
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use peerlink::e2e::Role;
use peerlink::e2e::stream::{EncryptedStream, StreamConfig, StreamError, StreamEvent};
use peerlink::{Fingerprint, Identity};
use rand::{RngCore, SeedableRng};
use tracing::debug;

enum Side {
    Dial(SocketAddr),
    Accept(TcpListener),
}

/// An encrypted stream to one peer over TCP (see the [module docs](self)).
pub struct EncryptedTcp {
    core: EncryptedStream,
    side: Side,
    socket: Option<TcpStream>,
    events: VecDeque<StreamEvent>,
    buf: Vec<u8>,
}

impl EncryptedTcp {
    /// Dials `addr` (now, and again after every drop) for a stream to `peer`.
    pub fn connect(addr: SocketAddr, identity: Identity, peer: Fingerprint, config: StreamConfig) -> Self {
        let mut s = Self::new(Side::Dial(addr), identity, peer, Role::Initiator, config);
        s.dial(Instant::now());
        s
    }

    /// Accepts connections from `peer` on `listener` (one at a time, a new one after a drop).
    pub fn accept(listener: TcpListener, identity: Identity, peer: Fingerprint, config: StreamConfig) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self::new(Side::Accept(listener), identity, peer, Role::Responder, config))
    }

    fn new(side: Side, identity: Identity, peer: Fingerprint, role: Role, config: StreamConfig) -> Self {
        let seed = rand_chacha::ChaCha20Rng::from_os_rng().next_u64();
        EncryptedTcp { core: EncryptedStream::new(identity, peer, role, seed, config), side, socket: None, events: VecDeque::new(), buf: vec![0; 64 * 1024] }
    }

    /// Returns the core machine (its state, counters).
    pub fn core(&self) -> &EncryptedStream {
        &self.core
    }

    /// Whether a transport connection is up.
    pub fn is_connected(&self) -> bool {
        self.socket.is_some()
    }

    /// Queues `value` (sent at once if connected, after the reconnect otherwise); returns its
    /// sequence number.
    pub fn send(&mut self, value: &serde_json::Value) -> Result<u64, StreamError> {
        let seq = self.core.send(value)?;
        self.flush(Instant::now());
        Ok(seq)
    }

    /// Cuts the transport connection (as a failing network would); the stream reconnects.
    pub fn drop_connection(&mut self) {
        if let Some(s) = self.socket.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
            self.core.handle_disconnected(Instant::now());
        }
    }

    fn dial(&mut self, now: Instant) {
        let Side::Dial(addr) = &self.side else { return };
        match TcpStream::connect_timeout(addr, Duration::from_secs(5)) {
            Ok(s) => self.attach(now, s),
            Err(e) => {
                debug!(%addr, error = %e, "dial failed");
                self.core.handle_disconnected(now);
            }
        }
    }

    fn attach(&mut self, now: Instant, socket: TcpStream) {
        let _ = socket.set_nodelay(true);
        self.socket = Some(socket);
        self.core.handle_connected(now);
        self.flush(now);
    }

    fn lost(&mut self, now: Instant) {
        if self.socket.take().is_some() {
            self.core.handle_disconnected(now);
        }
    }

    /// Writes what the core has for the wire; moves its events out.
    fn flush(&mut self, now: Instant) {
        while let Some(bytes) = self.core.poll_transmit() {
            let ok = self.socket.as_mut().is_some_and(|s| s.write_all(&bytes).is_ok());
            if !ok {
                // Not connected (the core keeps what it must send again), or the write failed.
                self.lost(now);
            }
        }
        while let Some(e) = self.core.poll_event() {
            if let StreamEvent::Reconnect { .. } = e {
                self.dial(now);
            }
            self.events.push_back(e);
        }
    }

    /// Runs the stream for up to `max`: reads, writes, timers, reconnects. Returns early when
    /// an event is there.
    pub fn poll(&mut self, max: Duration) -> io::Result<()> {
        let deadline = Instant::now() + max;
        loop {
            let now = Instant::now();
            if self.core.poll_timeout().is_some_and(|t| t <= now) {
                self.core.handle_timeout(now);
            }
            self.flush(now);
            if self.socket.is_none() {
                if let Side::Accept(listener) = &self.side {
                    match listener.accept() {
                        Ok((s, from)) => {
                            debug!(%from, "accepted");
                            s.set_nonblocking(false)?;
                            self.attach(now, s);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            if !self.events.is_empty() || now >= deadline {
                return Ok(());
            }
            let wait = self.core.poll_timeout().map_or(deadline, |t| t.min(deadline)).saturating_duration_since(now).max(Duration::from_millis(1));
            match &mut self.socket {
                Some(s) => {
                    s.set_read_timeout(Some(wait.min(Duration::from_millis(50))))?;
                    match s.read(&mut self.buf) {
                        Ok(0) => self.lost(Instant::now()),
                        Ok(n) => self.core.handle_bytes(Instant::now(), &self.buf[..n]),
                        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                        Err(_) => self.lost(Instant::now()),
                    }
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
