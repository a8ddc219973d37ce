//! The server's one event loop: a `mio` poll (epoll, edge-triggered) over the listener and
//! every connection, the sans-IO [`Server`] and the route from its transmits to sockets.
//!
//! Per readiness event a connection is read until it would block (or its per-turn budget is
//! spent: then it is revisited next turn, before sleeping), every text frame is handed to the
//! core at once, and every transmit the core produces is encoded straight into its target's
//! tungstenite write buffer. Once the turn's events are handled, each connection written to is
//! flushed with one `write` call. Nothing crosses a thread and nothing is boxed per message.
//!
//! A fresh connection's request head is read first: a WebSocket upgrade is handed to
//! tungstenite with the bytes read so far replayed in front of the socket; any other request
//! gets one response (`/healthz`, `/metrics`, a static file when a directory is served, or an
//! error) and the connection is closed once it is written. Connections from the separate
//! metrics listener, if any, get only `/healthz` and `/metrics`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use peerlink::protocol::CloseCode;
use peerlink::server::{ConnId, Server, ServerError, ServerStats, ServerTransmit, decode_cluster, encode_cluster};
use tracing::{debug, error, info, trace, warn};
use tungstenite::error::Error as WsError;
use tungstenite::handshake::HandshakeError;
use tungstenite::handshake::MidHandshake;
use tungstenite::handshake::server::{NoCallback, ServerHandshake};
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Message, WebSocketConfig};
use tungstenite::{Bytes, Utf8Bytes, WebSocket};

use crate::cluster::{Link, LinkEvent};
use crate::ops::{self, Endpoint};
use crate::static_files::{self, Refusal, Request};
use crate::{CLOSE_TIMEOUT, Control, HANDSHAKE_TIMEOUT, SHUTDOWN_TIMEOUT};

pub(crate) const LISTENER: Token = Token(0);
pub(crate) const WAKER: Token = Token(1);
/// The separate listener for the operations endpoints, if any.
pub(crate) const METRICS_LISTENER: Token = Token(2);
/// Connection ids (and tokens) start here.
const FIRST_CONN: u64 = 3;
/// Most frames read from one connection per turn; the rest waits for the next turn, so one
/// busy client cannot starve the others.
const READ_BUDGET: usize = 64;
/// Most connections accepted per turn.
const ACCEPT_BUDGET: usize = 256;
/// Readiness events taken per `poll`.
const EVENTS: usize = 1024;
/// Most cluster messages handled per turn; the rest waits for the next turn.
const CLUSTER_BUDGET: usize = 1024;

/// A TCP stream that remembers whether its last write would have blocked (so the loop knows to
/// wait for writability) and answers a read that follows a short read with `WouldBlock`
/// without a system call: a short read means the socket was empty, and with edge-triggered
/// readiness any data that arrives later is announced by a new event.
pub(crate) struct Socket {
    tcp: TcpStream,
    drained: bool,
    write_blocked: bool,
}

impl Socket {
    fn new(tcp: TcpStream) -> Self {
        Socket { tcp, drained: false, write_blocked: false }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.drained {
            self.drained = false;
            return Err(ErrorKind::WouldBlock.into());
        }
        let n = self.tcp.read(buf)?;
        // n == 0 is EOF; a zero-length buffer says nothing about the socket.
        self.drained = n > 0 && n < buf.len();
        Ok(n)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.tcp.write(buf) {
            Ok(n) => {
                self.write_blocked = false;
                Ok(n)
            }
            Err(e) => {
                self.write_blocked = e.kind() == ErrorKind::WouldBlock;
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// Plain TCP, or TLS over it.
pub(crate) enum Transport {
    Plain(Socket),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, Socket>>),
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(t) => t.read(buf),
        }
    }
}

/// A connection's byte stream: its transport, and the bytes of it read ahead of tungstenite
/// (a request head looked at to route it), which reads return first.
pub(crate) struct Stream {
    transport: Transport,
    ahead: Vec<u8>,
}

impl Stream {
    fn new(transport: Transport) -> Self {
        Stream { transport, ahead: Vec::new() }
    }

    fn socket_mut(&mut self) -> &mut Socket {
        match &mut self.transport {
            Transport::Plain(s) => s,
            Transport::Tls(t) => &mut t.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.ahead.is_empty() {
            let n = buf.len().min(self.ahead.len());
            buf[..n].copy_from_slice(&self.ahead[..n]);
            self.ahead.drain(..n);
            return Ok(n);
        }
        self.transport.read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.transport {
            Transport::Plain(s) => s.write(buf),
            Transport::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.transport {
            Transport::Plain(s) => s.flush(),
            Transport::Tls(t) => t.flush(),
        }
    }
}

/// A static file response being written; the connection closes once it is out.
pub(crate) struct HttpReply {
    stream: Stream,
    out: Vec<u8>,
    written: usize,
}

type Handshake = MidHandshake<ServerHandshake<Stream, NoCallback>>;

enum State {
    /// Accepted; TLS (if any) and the WebSocket handshake not started (with a static
    /// directory: the request head is being read into the stream's read-ahead).
    Fresh(Stream),
    /// Answering a plain HTTP request (static files).
    Http(Box<HttpReply>),
    /// In the TLS or WebSocket handshake.
    Handshake(Handshake),
    /// Serving: the core knows this connection.
    Open(WebSocket<Stream>),
    /// Our close frame is queued (or the peer's close answered); waiting for the close
    /// handshake to finish. The core has forgotten the connection.
    Closing(WebSocket<Stream>),
    /// Closed with 1009 after a frame above tungstenite's limit: tungstenite reads no more,
    /// so what the peer still sends is discarded raw until it closes.
    Draining(WebSocket<Stream>),
    /// Placeholder while a state is being replaced.
    Gone,
}

struct Conn {
    peer: SocketAddr,
    /// Accepted on the metrics listener: plain HTTP for the operations endpoints only.
    ops_only: bool,
    state: State,
    /// Handshake or close deadline (`None` while open).
    deadline: Option<Instant>,
    /// Bytes of core text written into tungstenite since its buffer was last fully flushed.
    unsent: usize,
    /// In the loop's `dirty` list (to be flushed this turn).
    dirty: bool,
    /// Waiting for a writable event: the last flush would have blocked.
    write_blocked: bool,
}

/// What happened to a connection during a step.
enum Step {
    Keep,
    /// Remove it (socket closed, or the close handshake done, or it failed).
    Drop,
}

/// The listening sockets, registered with the poll as [`LISTENER`] and [`METRICS_LISTENER`].
pub(crate) struct Listeners {
    /// Signaling (WebSocket), the operations endpoints and static files.
    pub(crate) main: TcpListener,
    /// Plain HTTP for `/metrics` and `/healthz` only.
    pub(crate) metrics: Option<TcpListener>,
}

pub(crate) struct EventLoop {
    poll: Poll,
    /// The listeners; `None` once shutdown began.
    listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    /// There is a metrics listener: the signaling port does not answer `/metrics`.
    metrics_private: bool,
    tls: Option<Arc<rustls::ServerConfig>>,
    ws_config: WebSocketConfig,
    server: Server,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    /// Connections written to this turn, to flush.
    dirty: Vec<u64>,
    /// Connections with input left over from their budget (or the listener, as id 0).
    again: Vec<u64>,
    /// Handshake and close deadlines (stale entries are skipped).
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    control: Arc<Control>,
    stats_rx: mpsc::Receiver<mpsc::SyncSender<ServerStats>>,
    /// Set once shutdown began: when everything must be gone.
    shutdown_by: Option<Instant>,
    /// The directory whose files plain HTTP requests get (canonical), if any.
    serve_dir: Option<PathBuf>,
    /// The link to the other nodes of a cluster, if clustered.
    cluster: Option<Link>,
    /// The cluster link has messages left over from this turn's budget.
    cluster_again: bool,
}

fn close_frame(code: CloseCode) -> CloseFrame {
    CloseFrame { code: code.code().into(), reason: Utf8Bytes::from_static(code.reason()) }
}

/// Lets `Bytes` share an `Arc<str>` without copying it.
struct SharedText(Arc<str>);

impl AsRef<[u8]> for SharedText {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

fn text_message(text: Arc<str>) -> Message {
    let bytes = Bytes::from_owner(SharedText(text));
    // Cannot fail: the bytes come from a `str`. (Checking costs a scan, not a copy.)
    Message::Text(Utf8Bytes::try_from(bytes).expect("str is UTF-8"))
}

fn would_block(e: &WsError) -> bool {
    matches!(e, WsError::Io(io) if io.kind() == ErrorKind::WouldBlock)
}

fn log_refused(result: Result<(), ServerError>) {
    if let Err(e) = result {
        error!(error = %e, "peerlink server refused an input");
    }
}

impl EventLoop {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        poll: Poll,
        listeners: Listeners,
        tls: Option<Arc<rustls::ServerConfig>>,
        ws_config: WebSocketConfig,
        server: Server,
        control: Arc<Control>,
        stats_rx: mpsc::Receiver<mpsc::SyncSender<ServerStats>>,
        serve_dir: Option<PathBuf>,
        cluster: Option<Link>,
    ) -> Self {
        EventLoop {
            poll,
            listener: Some(listeners.main),
            metrics_private: listeners.metrics.is_some(),
            metrics_listener: listeners.metrics,
            tls,
            ws_config,
            server,
            conns: HashMap::new(),
            next_id: FIRST_CONN,
            dirty: Vec::new(),
            again: Vec::new(),
            deadlines: BinaryHeap::new(),
            control,
            stats_rx,
            shutdown_by: None,
            serve_dir,
            cluster,
            cluster_again: false,
        }
    }

    /// Runs until shutdown completes.
    pub(crate) fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let timeout = self.timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER | METRICS_LISTENER => self.accept(now, event.token()),
                    WAKER => {}
                    Token(key) => {
                        let id = key as u64;
                        if event.is_writable() {
                            self.on_writable(id, now);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(id, now);
                        }
                    }
                }
            }
            // Input left over from last turn's budgets.
            for id in std::mem::take(&mut self.again) {
                if id == LISTENER.0 as u64 || id == METRICS_LISTENER.0 as u64 {
                    self.accept(now, Token(id as usize));
                } else {
                    self.on_readable(id, now);
                }
            }
            self.timers(now);
            self.control(now);
            self.cluster_io(now);
            self.flush_dirty(now);
            if let Some(by) = self.shutdown_by {
                // A cluster node also waits (within the same deadline) to hand what it queued
                // for parked sessions over to the nodes their clients resume on.
                if self.conns.is_empty() && !self.server.handing_over() {
                    break;
                }
                if now >= by {
                    warn!(left = self.conns.len(), "shutdown timed out: dropping the rest");
                    break;
                }
            }
        }
        Ok(())
    }

    /// How long to sleep: until the earliest deadline, not at all when input is left over.
    fn timeout(&self, now: Instant) -> Option<Duration> {
        if !self.again.is_empty() || self.cluster_again {
            return Some(Duration::ZERO);
        }
        let mut at = self.server.poll_timeout();
        if let Some(Reverse((t, _))) = self.deadlines.peek() {
            at = Some(at.map_or(*t, |a| a.min(*t)));
        }
        if let Some(by) = self.shutdown_by {
            at = Some(at.map_or(by, |a| a.min(by)));
        }
        // mio rounds a sub-millisecond wait up, so a deadline a hair away does not spin.
        at.map(|at| at.saturating_duration_since(now))
    }

    /// Accepts from the listener `which` ([`LISTENER`] or [`METRICS_LISTENER`]).
    fn accept(&mut self, now: Instant, which: Token) {
        let ops_only = which == METRICS_LISTENER;
        let listener = if ops_only { &self.metrics_listener } else { &self.listener };
        let Some(listener) = listener else { return };
        for _ in 0..ACCEPT_BUDGET {
            let (tcp, peer) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // Out of file descriptors and the like: try again next turn rather than
                    // spin (the connection waits in the backlog).
                    warn!(error = %e, "accept failed");
                    self.again.push(which.0 as u64);
                    return;
                }
            };
            let id = self.next_id;
            self.next_id += 1;
            if let Err(e) = tcp.set_nodelay(true) {
                debug!(id, error = %e, "set_nodelay failed");
            }
            let mut tcp = tcp;
            if let Err(e) = self.poll.registry().register(&mut tcp, Token(id as usize), Interest::READABLE | Interest::WRITABLE) {
                warn!(id, error = %e, "registering a connection failed");
                continue;
            }
            let socket = Socket::new(tcp);
            let stream = match &self.tls {
                // The metrics listener speaks plain HTTP.
                _ if ops_only => Stream::new(Transport::Plain(socket)),
                None => Stream::new(Transport::Plain(socket)),
                Some(config) => match rustls::ServerConnection::new(config.clone()) {
                    Ok(tls) => Stream::new(Transport::Tls(Box::new(rustls::StreamOwned::new(tls, socket)))),
                    Err(e) => {
                        warn!(id, error = %e, "TLS session setup failed");
                        continue;
                    }
                },
            };
            let deadline = now + HANDSHAKE_TIMEOUT;
            self.deadlines.push(Reverse((deadline, id)));
            self.conns.insert(
                id,
                Conn { peer, ops_only, state: State::Fresh(stream), deadline: Some(deadline), unsent: 0, dirty: false, write_blocked: false },
            );
            trace!(id, %peer, ops_only, "accepted");
        }
        self.again.push(which.0 as u64);
    }

    fn on_writable(&mut self, id: u64, now: Instant) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        match conn.state {
            State::Fresh(_) | State::Handshake(_) => self.on_readable(id, now),
            State::Http(_) => {
                if let Step::Drop = self.write_http(id) {
                    self.remove(id);
                }
            }
            State::Open(_) | State::Closing(_) | State::Draining(_) => {
                if conn.write_blocked {
                    self.flush(id, now);
                }
            }
            State::Gone => {}
        }
    }

    fn on_readable(&mut self, id: u64, now: Instant) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let step = match std::mem::replace(&mut conn.state, State::Gone) {
            State::Fresh(stream) => self.read_head(id, now, stream),
            State::Http(reply) => {
                // Nothing more is read from a plain HTTP client; the response goes on.
                conn.state = State::Http(reply);
                self.write_http(id)
            }
            State::Handshake(mid) => {
                let result = mid.handshake();
                self.handshake_step(id, now, result)
            }
            State::Open(ws) => {
                conn.state = State::Open(ws);
                self.read_open(id, now)
            }
            State::Closing(mut ws) => {
                let step = Self::read_closing(&mut ws);
                conn.state = State::Closing(ws);
                step
            }
            State::Draining(mut ws) => {
                let step = Self::read_raw(ws.get_mut());
                conn.state = State::Draining(ws);
                step
            }
            State::Gone => Step::Drop,
        };
        if let Step::Drop = step {
            self.remove(id);
        }
    }

    /// Reads a fresh connection's request head: a WebSocket upgrade goes on to the handshake,
    /// with what was read replayed; any other request is answered.
    fn read_head(&mut self, id: u64, now: Instant, mut stream: Stream) -> Step {
        let mut buf = [0u8; 4096];
        let end = loop {
            if let Some(end) = static_files::head_end(&stream.ahead) {
                break Some(end).filter(|&end| end <= static_files::MAX_HEAD);
            }
            if stream.ahead.len() > static_files::MAX_HEAD {
                break None;
            }
            match stream.transport.read(&mut buf) {
                Ok(0) => return Step::Drop,
                Ok(n) => stream.ahead.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if let Some(conn) = self.conns.get_mut(&id) {
                        conn.state = State::Fresh(stream);
                    }
                    return Step::Keep;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(id, error = %e, "reading a request failed");
                    return Step::Drop;
                }
            }
        };
        let ops_only = self.conns.get(&id).is_some_and(|c| c.ops_only);
        let out = match end {
            None => static_files::refusal(Refusal::HeadTooLarge),
            Some(end) => match static_files::parse(&stream.ahead[..end]) {
                Request::Upgrade if !ops_only => {
                    let result = tungstenite::accept_with_config(stream, Some(self.ws_config));
                    return self.handshake_step(id, now, result);
                }
                // No signaling on the metrics listener.
                Request::Upgrade => static_files::refusal(Refusal::NotFound),
                Request::Malformed => static_files::refusal(Refusal::BadRequest),
                Request::Http { method, target } => {
                    // `/metrics` on the signaling port only when there is no metrics listener.
                    let metrics_here = ops_only || !self.metrics_private;
                    let out = match ops::endpoint(target, metrics_here) {
                        Some(Endpoint::Health) => ops::health(method, &self.server.health(now)),
                        Some(Endpoint::Metrics) => ops::metrics(method, &self.server.metrics(now)),
                        None => match self.serve_dir.as_deref() {
                            Some(root) if !ops_only => static_files::respond(root, method, target),
                            _ => static_files::refusal(Refusal::NotFound),
                        },
                    };
                    debug!(id, method, target, status = %String::from_utf8_lossy(&out[9..12]), "http");
                    out
                }
            },
        };
        stream.ahead = Vec::new();
        let Some(conn) = self.conns.get_mut(&id) else { return Step::Drop };
        conn.state = State::Http(Box::new(HttpReply { stream, out, written: 0 }));
        Self::set_deadline(&mut self.deadlines, conn, id, now + HANDSHAKE_TIMEOUT);
        self.write_http(id)
    }

    /// Writes what is left of a static file response; done: the connection goes.
    fn write_http(&mut self, id: u64) -> Step {
        let Some(conn) = self.conns.get_mut(&id) else { return Step::Drop };
        let State::Http(reply) = &mut conn.state else { return Step::Keep };
        while reply.written < reply.out.len() {
            match reply.stream.write(&reply.out[reply.written..]) {
                Ok(0) => return Step::Drop,
                Ok(n) => reply.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Keep,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Step::Drop,
            }
        }
        match reply.stream.flush() {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Keep,
            Err(_) => return Step::Drop,
        }
        if let Transport::Tls(tls) = &mut reply.stream.transport {
            // Everything written is in the socket only once rustls has nothing left to send.
            tls.conn.send_close_notify();
            while tls.conn.wants_write() {
                match tls.conn.write_tls(&mut tls.sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Keep,
                    Err(_) => return Step::Drop,
                }
            }
        }
        // Half-close: the client reads to the end of the response, then closes its side.
        let _ = reply.stream.socket_mut().tcp.shutdown(Shutdown::Write);
        Step::Drop
    }

    fn handshake_step(&mut self, id: u64, now: Instant, result: Result<WebSocket<Stream>, HandshakeError<ServerHandshake<Stream, NoCallback>>>) -> Step {
        let Some(conn) = self.conns.get_mut(&id) else { return Step::Drop };
        match result {
            Ok(ws) => {
                conn.state = State::Open(ws);
                conn.deadline = None;
                debug!(id, peer = %conn.peer, "connected");
                log_refused(self.server.handle_connect(ConnId(id), now));
                self.drain(now);
                // The client may have sent frames right behind its handshake.
                self.read_open(id, now)
            }
            Err(HandshakeError::Interrupted(mid)) => {
                conn.state = State::Handshake(mid);
                Step::Keep
            }
            Err(HandshakeError::Failure(e)) => {
                debug!(id, peer = %conn.peer, error = %e, "handshake failed");
                Step::Drop
            }
        }
    }

    /// Reads frames from an open connection and hands them to the core.
    fn read_open(&mut self, id: u64, now: Instant) -> Step {
        for _ in 0..READ_BUDGET {
            let Some(conn) = self.conns.get_mut(&id) else { return Step::Keep };
            let State::Open(ws) = &mut conn.state else {
                // The core closed it while handling an earlier frame. What the peer sent
                // after (its close frame, EOF) may already be buffered and no readiness event
                // will come for it: read it as a closing connection next turn.
                self.again.push(id);
                return Step::Keep;
            };
            let result = ws.read();
            if matches!(result, Ok(Message::Ping(_) | Message::Close(_))) {
                // tungstenite queued a pong or a close reply.
                Self::mark_dirty(&mut self.dirty, conn, id);
            }
            match result {
                Ok(Message::Text(text)) => {
                    log_refused(self.server.handle_message(ConnId(id), now, &text));
                    self.drain(now);
                }
                Ok(Message::Binary(data)) => {
                    log_refused(self.server.handle_binary(ConnId(id), now, &data));
                    self.drain(now);
                }
                Ok(Message::Close(_)) => {
                    // tungstenite queued the reply; once it is flushed the socket closes.
                    trace!(id, "peer closed");
                    self.begin_close(id, now, None);
                    self.disconnect(id, now);
                    return Step::Keep;
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Err(e) if would_block(&e) => return Step::Keep,
                Err(WsError::Capacity(e)) => {
                    debug!(id, error = %e, "frame above the hard limit: closing with 1009");
                    self.disconnect(id, now);
                    if let Some(conn) = self.conns.get_mut(&id) {
                        if let State::Open(mut ws) = std::mem::replace(&mut conn.state, State::Gone) {
                            let _ = ws.close(Some(close_frame(CloseCode::MessageTooBig)));
                            conn.state = State::Draining(ws);
                            Self::set_deadline(&mut self.deadlines, conn, id, now + CLOSE_TIMEOUT);
                            Self::mark_dirty(&mut self.dirty, conn, id);
                        }
                    }
                    return Step::Keep;
                }
                Err(e) => {
                    debug!(id, error = %e, "read failed");
                    self.disconnect(id, now);
                    return Step::Drop;
                }
            }
        }
        self.again.push(id);
        Step::Keep
    }

    /// Reads (and discards) until the peer completes the close handshake.
    fn read_closing(ws: &mut WebSocket<Stream>) -> Step {
        loop {
            match ws.read() {
                Ok(_) => {}
                Err(e) if would_block(&e) => return Step::Keep,
                // ConnectionClosed: the handshake is complete; anything else: it failed.
                Err(_) => return Step::Drop,
            }
        }
    }

    /// Discards raw input until EOF.
    fn read_raw(stream: &mut Stream) -> Step {
        let mut buf = [0u8; 4096];
        loop {
            match stream.socket_mut().read(&mut buf) {
                Ok(0) => return Step::Drop,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Step::Keep,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Step::Drop,
            }
        }
    }

    /// Reports a lost connection to the core (once: only while it is open to the core).
    fn disconnect(&mut self, id: u64, now: Instant) {
        log_refused(self.server.handle_disconnect(ConnId(id), now));
        self.drain(now);
    }

    /// Moves an open connection to `Closing`, queueing `code` as its close frame (`None`: the
    /// peer closed first and tungstenite has queued the reply).
    fn begin_close(&mut self, id: u64, now: Instant, code: Option<CloseCode>) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        match std::mem::replace(&mut conn.state, State::Gone) {
            State::Open(mut ws) => {
                if let Some(code) = code {
                    debug!(id, code = code.code(), "closing");
                    // Errors (would block, already closing) leave the frame queued or moot.
                    let _ = ws.close(Some(close_frame(code)));
                }
                conn.state = State::Closing(ws);
                Self::set_deadline(&mut self.deadlines, conn, id, now + CLOSE_TIMEOUT);
                Self::mark_dirty(&mut self.dirty, conn, id);
            }
            handshaking @ (State::Fresh(_) | State::Handshake(_) | State::Http(_)) => {
                // Nothing to say before the handshake: just go.
                conn.state = handshaking;
                self.remove(id);
            }
            closing => conn.state = closing,
        }
    }

    fn set_deadline(deadlines: &mut BinaryHeap<Reverse<(Instant, u64)>>, conn: &mut Conn, id: u64, at: Instant) {
        conn.deadline = Some(at);
        deadlines.push(Reverse((at, id)));
    }

    fn mark_dirty(dirty: &mut Vec<u64>, conn: &mut Conn, id: u64) {
        if !conn.dirty {
            conn.dirty = true;
            dirty.push(id);
        }
    }

    /// Routes every transmit the core has ready.
    fn drain(&mut self, now: Instant) {
        while let Some(t) = self.server.poll_transmit() {
            match t {
                ServerTransmit::Text { conn, text } => {
                    let Some(c) = self.conns.get_mut(&conn.0) else { continue };
                    let State::Open(ws) = &mut c.state else { continue };
                    let len = text.len();
                    match ws.write(text_message(text)) {
                        Ok(()) => {}
                        // Buffered; the flush below waits for writability.
                        Err(e) if would_block(&e) => {}
                        Err(e) => {
                            // The socket failed under us; the next read reports it.
                            debug!(id = conn.0, error = %e, "write failed");
                        }
                    }
                    c.unsent += len;
                    Self::mark_dirty(&mut self.dirty, c, conn.0);
                }
                ServerTransmit::Close { conn, code } => self.begin_close(conn.0, now, Some(code)),
            }
        }
    }

    /// Flushes every connection written to this turn.
    fn flush_dirty(&mut self, now: Instant) {
        // Flushing can report failures to the core, whose notices dirty more connections.
        while !self.dirty.is_empty() {
            for id in std::mem::take(&mut self.dirty) {
                if let Some(conn) = self.conns.get_mut(&id) {
                    conn.dirty = false;
                    self.flush(id, now);
                }
            }
        }
    }

    fn flush(&mut self, id: u64, now: Instant) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let (ws, open) = match &mut conn.state {
            State::Open(ws) => (ws, true),
            State::Closing(ws) | State::Draining(ws) => (ws, false),
            _ => return,
        };
        match ws.flush() {
            Ok(()) => {
                conn.write_blocked = false;
                if open && conn.unsent > 0 {
                    self.server.handle_sent(ConnId(id), conn.unsent);
                    conn.unsent = 0;
                }
            }
            Err(e) if would_block(&e) => {
                conn.write_blocked = true;
            }
            Err(WsError::ConnectionClosed) if !open => {
                // Our close frame is out and the peer's was read: the server closes first.
                self.remove(id);
            }
            Err(e) => {
                debug!(id, error = %e, "flush failed");
                if open {
                    self.disconnect(id, now);
                }
                self.remove(id);
            }
        }
    }

    fn timers(&mut self, now: Instant) {
        if self.server.poll_timeout().is_some_and(|at| at <= now) {
            log_refused(self.server.handle_timeout(now));
            self.drain(now);
        }
        while let Some(Reverse((at, id))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(conn) = self.conns.get(&id) else { continue };
            if conn.deadline != Some(at) {
                continue;
            }
            debug!(id, peer = %conn.peer, "handshake or close timed out");
            self.remove(id);
        }
    }

    /// Handles the handle's requests: stats, shutdown.
    fn control(&mut self, now: Instant) {
        while let Ok(reply) = self.stats_rx.try_recv() {
            let _ = reply.try_send(self.server.stats());
        }
        if self.shutdown_by.is_none() && self.control.stop.load(Ordering::Acquire) {
            info!(connections = self.conns.len(), "shutting down: closing every connection (1001)");
            log_refused(self.server.leave_cluster(now));
            self.shutdown_by = Some(now + SHUTDOWN_TIMEOUT);
            for mut listener in [self.listener.take(), self.metrics_listener.take()].into_iter().flatten() {
                let _ = self.poll.registry().deregister(&mut listener);
            }
            let ids: Vec<u64> = self.conns.keys().copied().collect();
            for id in ids {
                self.begin_close(id, now, Some(CloseCode::GoingAway));
            }
        }
    }

    /// Hands the core what the cluster link received (up to [`CLUSTER_BUDGET`]) and publishes
    /// what the core has for the other nodes.
    fn cluster_io(&mut self, now: Instant) {
        let Some(link) = &self.cluster else { return };
        link.drained();
        let events: Vec<LinkEvent> = (0..CLUSTER_BUDGET).map_while(|_| link.try_recv()).collect();
        let handled = events.len();
        for event in events {
            match event {
                LinkEvent::Up => log_refused(self.server.handle_cluster_link(now, true)),
                LinkEvent::Down => log_refused(self.server.handle_cluster_link(now, false)),
                LinkEvent::Message(text) => match decode_cluster(&text) {
                    Ok((from, message)) => log_refused(self.server.handle_cluster(now, from, message)),
                    Err(e) => warn!(error = %e, "undecodable cluster message dropped"),
                },
            }
            self.drain(now);
        }
        self.cluster_again = handled == CLUSTER_BUDGET;
        let Some(link) = &self.cluster else { return };
        self.server.handle_cluster_link_drops(link.dropped());
        let Some(node) = self.server.node_id() else { return };
        while let Some(t) = self.server.poll_cluster() {
            link.publish(t.target, encode_cluster(node, &t.message));
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(conn) = self.conns.remove(&id) {
            let mut state = conn.state;
            let socket = match &mut state {
                State::Fresh(s) => Some(s.socket_mut()),
                State::Http(reply) => Some(reply.stream.socket_mut()),
                State::Handshake(mid) => Some(mid.get_mut().get_mut().socket_mut()),
                State::Open(ws) | State::Closing(ws) | State::Draining(ws) => Some(ws.get_mut().socket_mut()),
                State::Gone => None,
            };
            if let Some(socket) = socket {
                let _ = self.poll.registry().deregister(&mut socket.tcp);
                let _ = socket.tcp.shutdown(Shutdown::Both);
            }
            trace!(id, "connection ended");
        }
    }
}
