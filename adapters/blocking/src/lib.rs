//! # peerlink-blocking
//!
//! A std-sockets + [`tungstenite`] adapter for the sans-IO [`peerlink::Node`] (the signaling
//! client plus direct WebRTC connections over UDP) and [`peerlink::Client`]: no threads, no
//! async runtime. It comes in three layers sharing one implementation:
//!
//! * [`PollNode`] is a **non-blocking** driver of a whole node for game loops: call
//!   [`PollNode::poll`] once per frame (WebSocket, UDP sockets and timers, a bounded amount of
//!   work each), then drain [`PollNode::poll_event`]. Peers connect with
//!   [`PollNode::connect_to_peer`] and talk on data channels ([`PollNode::send`],
//!   [`PollNode::create_data_channel`]). `examples/game_loop.rs` is a 60 Hz loop on it.
//! * [`PollClient`] is the same driver for the signaling client alone.
//!   Call [`PollClient::poll`] once per frame; it does a bounded amount of non-blocking work
//!   (progressing the TCP connect, the TLS and WebSocket handshakes, reading at most
//!   [`MAX_FRAMES_PER_POLL`] frames, firing the core's timers and writing its frames), then
//!   drain [`PollClient::poll_event`]. Commands go through [`PollClient::client`]; their replies
//!   arrive later as [`ClientEvent::Response`].
//! * [`Client`] is a **blocking** convenience on top of it: every request waits for its reply
//!   (bounded by the configured `request_timeout`), and [`Client::next_event`] waits for the next
//!   event. Events that arrive while a request waits are kept for [`Client::next_event`], never
//!   lost.
//!
//! ## Caveat: DNS
//!
//! Host names are resolved with [`std::net::ToSocketAddrs`], which **may block** (the OS
//! resolver has no non-blocking interface in std). It happens inside [`PollClient::poll`] when
//! a connection is (re)opened. Use an IP address in the URL, or a host the resolver answers from
//! its cache, where a frame hitch is unacceptable. Everything else in `poll` is non-blocking.
//!
//! ## A game loop with direct connections
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use peerlink::{ClientEvent, NodeConfig, NodeEvent};
//! use peerlink_blocking::{PollNode, PollOptions};
//!
//! # fn main() -> Result<(), peerlink_blocking::Error> {
//! let mut net = PollNode::new(NodeConfig::new("ws://127.0.0.1:8080"), PollOptions::default())?;
//! loop {
//!     net.poll(Instant::now())?;
//!     while let Some(event) = net.poll_event() {
//!         match event {
//!             // Call whoever is in the lobby already.
//!             NodeEvent::Signaling(ClientEvent::PeerList { peers, .. }) => {
//!                 for peer in peers {
//!                     net.connect_to_peer(peer.fingerprint)?;
//!                 }
//!             }
//!             NodeEvent::Signaling(ClientEvent::Registered { .. }) => {
//!                 net.client().join(Instant::now(), "lobby", None, None)?;
//!             }
//!             NodeEvent::ChannelOpen { peer, .. } => net.send(peer, None, &"hello")?,
//!             NodeEvent::Data { peer, data, .. } => println!("{} sent {data:?}", peer.short()),
//!             _ => {}
//!         }
//!     }
//!     std::thread::sleep(Duration::from_millis(16));
//! }
//! # }
//! ```
//!
//! ## A game loop, signaling only
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use peerlink::{ClientConfig, ClientEvent};
//! use peerlink_blocking::{PollClient, PollOptions};
//!
//! # fn main() -> Result<(), peerlink_blocking::Error> {
//! let config = ClientConfig::new("ws://127.0.0.1:8080").alias("player-one");
//! let mut net = PollClient::new(config, PollOptions::default())?;
//! let mut joined = false;
//! loop {
//!     let now = Instant::now();
//!     net.poll(now)?;
//!     while let Some(event) = net.poll_event() {
//!         match event {
//!             ClientEvent::Registered { fingerprint, .. } => println!("I am {fingerprint}"),
//!             ClientEvent::Relay { from, payload } => println!("{from} says {}", payload.get()),
//!             ClientEvent::Response { request, result } => println!("{request:?}: {result:?}"),
//!             _ => {}
//!         }
//!     }
//!     if net.is_registered() && !joined {
//!         // Commands return a RequestId at once; the reply comes as an event.
//!         net.client().join(now, "my-game", None, None)?;
//!         joined = true;
//!     }
//!     // ... update and render the frame ...
//!     std::thread::sleep(Duration::from_millis(16));
//! }
//! # }
//! ```
//!
//! ## Blocking
//!
//! ```no_run
//! use std::time::Duration;
//! use peerlink::ClientConfig;
//!
//! # fn main() -> Result<(), peerlink_blocking::Error> {
//! let mut client = peerlink_blocking::Client::connect(ClientConfig::new("ws://127.0.0.1:8080"))?;
//! let peers = client.join("lobby")?;
//! for peer in &peers {
//!     client.relay(peer.fingerprint, &serde_json::json!({ "hello": "there" }))?;
//! }
//! while let Some(event) = client.next_event(Duration::from_secs(5))? {
//!     println!("{event:?}");
//! }
//! client.disconnect();
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]
#![deny(unsafe_code)]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerlink::client::{
    ClientTransmit, MatchResult, RequestError, RequestId, Response, RoomDetails,
};
use peerlink::node::{NodeTransmit, PeerView};
use peerlink::{
    CallConfig, ChannelOptions, ClientConfig, ClientError, ClientEvent, Datagram, Fingerprint,
    IceServer, Identity, IssuedTurnCredentials, MediaFrame, Node, NodeConfig, NodeError, NodeEvent, PeerInfo, Source,
    TrackId, TrackOptions,
};
use rand::{RngCore, SeedableRng};
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use tracing::{debug, warn};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::{ClientHandshake, Request};
use tungstenite::handshake::{HandshakeError, MidHandshake};
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Message, WebSocket};

pub use peerlink;
pub use peerlink::node::UdpBind;

pub mod files;
pub mod stream;
mod udp;

/// Most events that may wait in a [`PollClient`]'s queue. Past it [`PollClient::poll`] refuses
/// to do more work and returns [`Error::Client`]`(`[`ClientError::NotDrained`]`)` until the
/// queue is drained.
pub const MAX_QUEUED_EVENTS: usize = 65_536;

/// Most WebSocket frames one [`PollNode::poll`] reads, so a flood cannot stall a frame.
pub const MAX_FRAMES_PER_POLL: usize = 256;

/// Most UDP datagrams one [`PollNode::poll`] reads (over all sockets).
pub const MAX_DATAGRAMS_PER_POLL: usize = 1024;

/// How many received datagrams [`PollNode::poll`] hands to the core before it sends what they
/// produced, so acknowledgements leave while the rest of a backlog is still being read.
const DRAIN_EVERY: usize = 8;

/// Most bytes tungstenite may buffer for a socket that does not accept writes; past it the
/// connection is treated as dead and replaced.
const MAX_WRITE_BUFFER: usize = 8 * 1024 * 1024;

/// Largest frame accepted from the server.
const MAX_FRAME: usize = 1024 * 1024;

/// Longest single sleep of a blocking wait, so nothing is ever missed for long.
const MAX_WAIT_STEP: Duration = Duration::from_millis(50);

/// Errors of this adapter.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum Error {
    /// The client core refused a command or its lifecycle failed (registration refused, server
    /// id mismatch, too many undrained events, ...).
    #[error(transparent)]
    Client(ClientError),
    /// A request failed: the server answered with an error, the connection dropped, or no reply
    /// came within `request_timeout`.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// A socket error.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A WebSocket, TLS or URL error.
    #[error("websocket: {0}")]
    WebSocket(String),
    /// Connecting did not finish within `connect_timeout`.
    #[error("timed out")]
    Timeout,
    /// The client is disconnected: [`Client::disconnect`] was called, or the core gave up.
    #[error("client is closed")]
    Closed,
    /// The node refused a command (a send on a full buffer, an unknown peer or channel, ...).
    #[error(transparent)]
    Node(NodeError),
}

impl From<NodeError> for Error {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Client(e) => e.into(),
            NodeError::NotDrained => Error::Client(ClientError::NotDrained),
            e => Error::Node(e),
        }
    }
}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::NotConnected => Error::Closed,
            e => Error::Client(e),
        }
    }
}

impl From<tungstenite::Error> for Error {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Io(e) => Error::Io(e),
            e => Error::WebSocket(e.to_string()),
        }
    }
}

/// Options for [`PollClient::new`] and [`Client::connect_with`].
#[derive(Default)]
pub struct PollOptions {
    /// The identity to register with; a fresh one (from the OS random source) when `None`.
    pub identity: Option<Identity>,
    /// The seed of the core's randomness (signature nonces, reconnect jitter); from the OS
    /// random source when `None`.
    pub seed: Option<u64>,
    /// Certificates trusted for `wss://` in addition to the webpki roots (for self-signed or
    /// private-CA servers).
    pub extra_root_certs: Vec<CertificateDer<'static>>,
    /// Where a [`PollNode`] binds its UDP sockets (a [`PollClient`] binds none). Default: every
    /// interface.
    pub udp: UdpBind,
}


impl std::fmt::Debug for PollOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollOptions")
            .field("identity", &self.identity.as_ref().map(|i| i.fingerprint()))
            .field("seed", &self.seed)
            .field("extra_root_certs", &self.extra_root_certs.len())
            .field("udp", &self.udp)
            .finish()
    }
}

// ---- the socket ---------------------------------------------------------------------------

/// A plain or TLS stream over a non-blocking TCP socket.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// A TCP connect in progress.
struct Connecting {
    request: Request,
    host: String,
    tls: bool,
    /// Addresses not tried yet.
    addrs: VecDeque<SocketAddr>,
    socket: Option<socket2::Socket>,
}

/// The connection's state.
enum Conn {
    None,
    Connecting(Box<Connecting>),
    Handshaking(Box<MidHandshake<ClientHandshake<Stream>>>),
    Open {
        ws: Box<WebSocket<Stream>>,
        flush_pending: bool,
    },
}

/// What a blocking wait should wait for on the socket.
enum Interest {
    Nothing,
    Read { write: bool, cap: Option<Duration> },
    Write,
}

// ---- PollClient ---------------------------------------------------------------------------

/// A non-blocking driver of a [`peerlink::Node`] (the signaling client and every direct
/// connection) for game loops: call [`PollNode::poll`] once per frame, then drain
/// [`PollNode::poll_event`]. See the [crate docs](crate).
pub struct PollNode {
    core: Node,
    udp: Vec<udp::Port>,
    /// Datagrams the core produced this round, sent in batches at the end of a drain.
    outbox: Vec<Datagram>,
    /// Where datagrams are read into.
    recv_buffers: udp::RecvBuffers,
    /// Scratch space for joining a run of datagrams into one GSO send.
    send_buffer: Vec<u8>,
    conn: Conn,
    events: VecDeque<NodeEvent>,
    extra_root_certs: Vec<CertificateDer<'static>>,
    tls: Option<Arc<rustls::ClientConfig>>,
    last_error: Option<Error>,
    /// The last poll stopped reading at [`MAX_FRAMES_PER_POLL`]: frames may wait in buffers
    /// that the OS cannot see, so a blocking wait must not sleep.
    more_to_read: bool,
}

impl std::fmt::Debug for PollNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let conn = match self.conn {
            Conn::None => "none",
            Conn::Connecting(_) => "connecting",
            Conn::Handshaking(_) => "handshaking",
            Conn::Open { .. } => "open",
        };
        f.debug_struct("PollNode")
            .field("fingerprint", &self.core.fingerprint())
            .field("registered", &self.core.client().is_registered())
            .field("udp", &self.local_addrs())
            .field("conn", &conn)
            .field("queued_events", &self.events.len())
            .finish()
    }
}

impl PollNode {
    /// Creates the node, binds its UDP sockets ([`PollOptions::udp`]), resolves the STUN
    /// servers of `config.ice_servers` (this may block: see the [crate docs](crate)) and starts
    /// connecting to the signaling server. The WebSocket is opened by the first
    /// [`PollNode::poll`].
    pub fn new(config: NodeConfig, options: PollOptions) -> Result<PollNode, Error> {
        let bind = options.udp.clone();
        let mut node = PollNode::with_core(config, options)?;
        let now = Instant::now();
        for addr in bind_addrs(&bind)? {
            let socket = UdpSocket::bind(addr)?;
            socket.set_nonblocking(true)?;
            size_buffers(&socket);
            let local = socket.local_addr()?;
            node.core.add_local_address(now, local)?;
            debug!(%local, "udp socket bound");
            node.udp.push(udp::Port::new(socket, local)?);
        }
        for (host, port) in node.core.config().stun_hosts() {
            match (host.as_str(), port).to_socket_addrs() {
                Ok(addrs) => {
                    for addr in addrs {
                        node.core.add_stun_server(now, addr)?;
                    }
                }
                Err(e) => warn!(%host, error = %e, "STUN server not resolved"),
            }
        }
        for turn in node.core.config().turn_servers() {
            match add_turn_url(&mut node.core, now, &turn) {
                Err(Error::Io(e)) => warn!(host = %turn.host, error = %e, "TURN server not resolved"),
                other => {
                    other?;
                }
            }
        }
        node.drain(now)?;
        Ok(node)
    }

    fn with_core(config: NodeConfig, options: PollOptions) -> Result<PollNode, Error> {
        let now = Instant::now();
        let mut os_rng = rand_chacha::ChaCha20Rng::from_os_rng();
        let identity = match options.identity {
            Some(identity) => identity,
            None => Identity::generate(&mut os_rng),
        };
        let seed = options.seed.unwrap_or_else(|| os_rng.next_u64());
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut core = Node::new(config, identity, seed, now, unix_ms)?;
        core.connect(now)?;
        Ok(PollNode {
            core,
            udp: Vec::new(),
            outbox: Vec::new(),
            recv_buffers: udp::RecvBuffers::default(),
            send_buffer: Vec::new(),
            conn: Conn::None,
            events: VecDeque::new(),
            extra_root_certs: options.extra_root_certs,
            tls: None,
            last_error: None,
            more_to_read: false,
        })
    }

    /// Does one bounded round of non-blocking work at `now`: opens the WebSocket when the core
    /// asks (resolving the host name, which may block: see the [crate docs](crate)),
    /// progresses the TCP connect and the TLS/WebSocket handshakes, reads up to
    /// [`MAX_FRAMES_PER_POLL`] frames and [`MAX_DATAGRAMS_PER_POLL`] datagrams, fires the
    /// core's timers that are due, and writes what the core sends. Events are queued for
    /// [`PollNode::poll_event`].
    ///
    /// Socket failures are not errors here: the core hears of them (and reconnects, or reports
    /// them as events); the last WebSocket one is kept in [`PollNode::last_error`]. Errors are
    /// the core's refusals, chiefly [`ClientError::NotDrained`] when more than
    /// [`MAX_QUEUED_EVENTS`] events wait undrained.
    pub fn poll(&mut self, now: Instant) -> Result<(), Error> {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            return Err(Error::Client(ClientError::NotDrained));
        }
        self.drain(now)?;
        self.progress_connect(now)?;
        self.progress_handshake(now)?;
        self.read_frames(now)?;
        self.read_datagrams(now)?;
        if self.core.poll_timeout().is_some_and(|t| t <= now) {
            self.core.handle_timeout(now)?;
        }
        self.drain(now)?;
        self.flush(now)?;
        self.drain(now)
    }

    /// Returns the next queued event.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// Returns when the core next needs [`PollNode::poll`] even if nothing arrives.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.core.poll_timeout()
    }

    /// Waits (blocking) up to `timeout` for the next event, polling as needed.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<NodeEvent>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            self.poll(Instant::now())?;
            if let Some(e) = self.events.pop_front() {
                return Ok(Some(e));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            self.wait(Some(deadline));
        }
    }

    /// Returns the node, for commands (`connect_to_peer`, `send`, `create_data_channel`, ...;
    /// signaling commands through [`Node::client_mut`]). What they send goes out on the next
    /// [`PollNode::poll`].
    pub fn node(&mut self) -> &mut Node {
        &mut self.core
    }

    /// Returns the signaling client, for commands (`join`, `relay`, rooms, ...).
    pub fn client(&mut self) -> &mut peerlink::Client {
        self.core.client_mut()
    }

    /// Returns this node's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.core.fingerprint()
    }

    /// Returns whether the signaling client is registered right now.
    pub fn is_registered(&self) -> bool {
        self.core.client().is_registered()
    }

    /// Returns the addresses of the bound UDP sockets.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.udp.iter().map(|p| p.local).collect()
    }

    /// Asks the signaling server for short-lived TURN credentials (see
    /// [`peerlink::Client::turn_credentials`]) and waits up to `timeout` for them, polling;
    /// other events stay queued in order. Pass `issued.ice_server()` to
    /// [`PollNode::add_turn_servers`]. Errors: the server's refusal (`turn_unavailable` when
    /// it has no TURN secret) as [`Error::Request`], or [`RequestError::TimedOut`].
    pub fn turn_credentials(&mut self, timeout: Duration) -> Result<IssuedTurnCredentials, Error> {
        let deadline = Instant::now() + timeout;
        let id = self.core.client_mut().turn_credentials(Instant::now())?;
        let mut scanned = 0;
        loop {
            self.poll(Instant::now())?;
            let found = self.events.iter().skip(scanned).position(
                |e| matches!(e, NodeEvent::Signaling(ClientEvent::Response { request, .. }) if *request == id),
            );
            if let Some(NodeEvent::Signaling(ClientEvent::Response { result, .. })) = found.and_then(|pos| self.events.remove(scanned + pos)) {
                return match result.map_err(Error::Request)? {
                    Response::TurnCredentials(issued) => Ok(issued),
                    other => Err(unexpected(other)),
                };
            }
            scanned = self.events.len();
            if Instant::now() >= deadline {
                return Err(Error::Request(RequestError::TimedOut));
            }
            self.wait(Some(deadline));
        }
    }

    /// Resolves the `turn:` URLs of `server` and adds each address with its credentials
    /// ([`Node::add_turn_server`]): allocations start from every local socket. Returns how
    /// many addresses were added; a host that does not resolve is an [`Error::Io`].
    pub fn add_turn_servers(&mut self, server: &IceServer) -> Result<usize, Error> {
        let mut added = 0;
        for turn in server.turn_servers() {
            added += add_turn_url(&mut self.core, Instant::now(), &turn)?;
        }
        self.poll(Instant::now())?;
        Ok(added)
    }

    /// Starts a direct connection to `peer` (see [`Node::connect_to_peer`]).
    pub fn connect_to_peer(&mut self, peer: Fingerprint) -> Result<(), Error> {
        let now = Instant::now();
        self.core.connect_to_peer(now, peer)?;
        self.poll(now)
    }

    /// Returns a view of the connection to `peer`.
    pub fn get_peer(&self, peer: &Fingerprint) -> Option<PeerView> {
        self.core.get_peer(peer)
    }

    // ---- shared state --------------------------------------------------------------------

    /// Starts key-value sync in `room` (see [`peerlink::sync::state`]); changes arrive as
    /// [`peerlink::NodeEvent::Sync`].
    pub fn sync_state(&mut self, room: &str, config: peerlink::sync::StateConfig) -> Result<(), Error> {
        let now = Instant::now();
        self.core.sync_state(now, room, config)?;
        self.poll(now)
    }

    /// Returns `room`'s key-value state (`get`, `get_all`, ...), if synced.
    pub fn state(&self, room: &str) -> Option<&peerlink::sync::StateSync> {
        self.core.state(room)
    }

    /// Sets `key` in `room`'s state.
    pub fn state_set<T: Serialize + ?Sized>(&mut self, room: &str, key: &str, value: &T) -> Result<(), Error> {
        let now = Instant::now();
        self.core.state_set(now, room, key, value)?;
        self.poll(now)
    }

    /// Deletes `key` from `room`'s state; returns whether it was there.
    pub fn state_delete(&mut self, room: &str, key: &str) -> Result<bool, Error> {
        let now = Instant::now();
        let live = self.core.state_delete(now, room, key)?;
        self.poll(now)?;
        Ok(live)
    }

    /// Starts document sync in `room` (see [`peerlink::sync::crdt`]).
    pub fn sync_crdt(&mut self, room: &str, config: peerlink::sync::CrdtConfig) -> Result<(), Error> {
        let now = Instant::now();
        self.core.sync_crdt(now, room, config)?;
        self.poll(now)
    }

    /// Returns `room`'s documents (`doc(name)`, awareness), if synced.
    pub fn crdt(&self, room: &str) -> Option<&peerlink::sync::CrdtSync> {
        self.core.crdt(room)
    }

    /// Opens document `doc` of `room` and runs `edit` on it (a yrs transaction inside);
    /// the changes go out at once.
    pub fn crdt_edit<R>(&mut self, room: &str, doc: &str, edit: impl FnOnce(&peerlink::yrs::Doc) -> R) -> Result<R, Error> {
        let now = Instant::now();
        let out = self.core.crdt_edit(now, room, doc, edit)?;
        self.poll(now)?;
        Ok(out)
    }

    /// Sets this node's awareness state for document `doc` of `room` (`None` clears it).
    pub fn set_awareness(&mut self, room: &str, doc: &str, state: Option<serde_json::Value>) -> Result<(), Error> {
        let now = Instant::now();
        self.core.set_awareness(now, room, doc, state)?;
        self.poll(now)
    }

    // ---- transfers ------------------------------------------------------------------------

    /// Offers the file at `path` to `peer` (see [`peerlink::transfer`]): it is hashed first
    /// (streaming), images get their MIME type from their first bytes, and its chunks are read
    /// from disk as the channel takes them. Returns the transfer id; progress and the outcome
    /// arrive as [`NodeEvent::Transfer`].
    pub fn send_file(&mut self, peer: Fingerprint, path: &std::path::Path) -> Result<u64, Error> {
        let (info, source) = files::describe_file(path)?;
        self.send_from(peer, info, source)
    }

    /// Offers bytes from memory as a file named `name` (an image, recognised by its first
    /// bytes, is offered as one).
    pub fn send_bytes(&mut self, peer: Fingerprint, name: &str, data: Vec<u8>) -> Result<u64, Error> {
        let now = Instant::now();
        let id = self.core.send_bytes(now, peer, name, data)?;
        self.poll(now)?;
        Ok(id)
    }

    /// Sends a JSON value, chunked (the reference's `JSONTransfer`); it arrives as
    /// [`TransferEvent::Json`](peerlink::transfer::TransferEvent::Json).
    pub fn send_json<T: Serialize + ?Sized>(&mut self, peer: Fingerprint, value: &T) -> Result<u64, Error> {
        let now = Instant::now();
        let id = self.core.send_json(now, peer, value)?;
        self.poll(now)?;
        Ok(id)
    }

    /// Offers `info` to `peer`, its bytes read from `source` as they are sent (a generated
    /// source, a database blob: see [`peerlink::transfer::SourceFn`]). `info.sha256` must be
    /// the hash of all of them: the receiver checks it.
    pub fn send_from(&mut self, peer: Fingerprint, info: peerlink::transfer::FileInfo, source: impl peerlink::transfer::ChunkSource + 'static) -> Result<u64, Error> {
        let now = Instant::now();
        let id = self.core.send_from(now, peer, info, Box::new(source))?;
        self.poll(now)?;
        Ok(id)
    }

    /// Accepts an offered transfer into the file at `path`: it is written as `PATH.part` and
    /// renamed to `path` once verified; on failure or cancellation the part file is removed.
    pub fn accept_to_file(&mut self, peer: Fingerprint, id: u64, path: &std::path::Path) -> Result<(), Error> {
        let sink = files::PartFileSink::create(path)?;
        self.accept_into(peer, id, sink)
    }

    /// Accepts an offered transfer into memory; it arrives whole as
    /// [`TransferEvent::Received`](peerlink::transfer::TransferEvent::Received).
    pub fn accept_to_memory(&mut self, peer: Fingerprint, id: u64) -> Result<(), Error> {
        let now = Instant::now();
        self.core.accept_to_memory(now, peer, id)?;
        self.poll(now)
    }

    /// Accepts an offered transfer into the application's own sink (a hashing sink, a
    /// database: see [`peerlink::transfer::SinkFn`]): chunks are written to it in order,
    /// each checked; the whole is verified before it is committed and before
    /// [`TransferEvent::Completed`](peerlink::transfer::TransferEvent::Completed). A write
    /// error cancels the transfer.
    pub fn accept_into(&mut self, peer: Fingerprint, id: u64, sink: impl peerlink::transfer::ChunkSink + 'static) -> Result<(), Error> {
        let now = Instant::now();
        self.core.accept_into(now, peer, id, Box::new(sink))?;
        self.poll(now)
    }

    /// Declines an offered transfer.
    pub fn reject_transfer(&mut self, peer: Fingerprint, id: u64, reason: &str) -> Result<(), Error> {
        let now = Instant::now();
        self.core.reject_transfer(now, peer, id, reason)?;
        self.poll(now)
    }

    /// Stops a transfer in either direction (a partial file is removed).
    pub fn cancel_transfer(&mut self, peer: Fingerprint, id: u64, reason: &str) -> Result<(), Error> {
        let now = Instant::now();
        self.core.cancel_transfer(now, peer, id, reason)?;
        self.poll(now)
    }

    // ---- media ----------------------------------------------------------------------------

    /// Adds an audio or video track to the connection to `peer` (see [`peerlink::media`]):
    /// a renegotiation, after which [`peerlink::MediaEvent::TrackAdded`] (with
    /// `local: true`) from [`PollNode::poll_event`] says frames may be written. Returns its
    /// id. Events of media arrive as [`NodeEvent::Media`].
    pub fn add_track(&mut self, peer: Fingerprint, options: TrackOptions) -> Result<TrackId, Error> {
        let now = Instant::now();
        let id = self.core.add_track(now, peer, options)?;
        self.poll(now)?;
        Ok(id)
    }

    /// Mutes (`true`) or unmutes one of this node's tracks on the connection to `peer`: the
    /// remote sees [`peerlink::MediaEvent::Muted`]; frames written while muted are dropped.
    pub fn set_track_muted(&mut self, peer: Fingerprint, track: &TrackId, muted: bool) -> Result<(), Error> {
        let now = Instant::now();
        self.core.set_track_muted(now, peer, track, muted)?;
        self.poll(now)
    }

    /// Removes one of this node's tracks (the remote sees
    /// [`peerlink::MediaEvent::TrackRemoved`]).
    pub fn remove_track(&mut self, peer: Fingerprint, track: &TrackId) -> Result<(), Error> {
        let now = Instant::now();
        self.core.remove_track(now, peer, track)?;
        self.poll(now)
    }

    /// Sends an encoded frame on one of this node's tracks; its packets go out before this
    /// returns. Returns whether it went: `false` while the track is muted or not negotiated
    /// yet, or the connection is not up.
    pub fn write_frame(&mut self, peer: Fingerprint, track: &TrackId, frame: MediaFrame) -> Result<bool, Error> {
        let now = Instant::now();
        let sent = self.core.write_frame(now, peer, track, frame)?;
        self.poll(now)?;
        Ok(sent)
    }

    /// Asks `peer` for a keyframe on one of its tracks (after a loss: a
    /// [`ReceivedFrame`](peerlink::ReceivedFrame) that is not `contiguous`); the sender sees
    /// [`peerlink::MediaEvent::KeyframeRequested`].
    pub fn request_keyframe(&mut self, peer: Fingerprint, track: &TrackId) -> Result<(), Error> {
        let now = Instant::now();
        self.core.request_keyframe(now, peer, track)?;
        self.poll(now)
    }

    /// Returns a view of a room this node is in (see [`Node::room`]).
    pub fn room_info(&self, room: &str) -> Option<peerlink::RoomView> {
        self.core.room(room)
    }

    /// Creates a managed room owned by this node (see [`peerlink::room`]).
    /// [`peerlink::RoomEvent::Joined`] follows from [`PollNode::poll_event`], or
    /// [`peerlink::RoomEvent::Error`] with the server's refusal.
    pub fn create_room(&mut self, room: &str, options: peerlink::RoomOptions) -> Result<(), Error> {
        let now = Instant::now();
        self.core.create_room(now, room, options)?;
        self.poll(now)
    }

    /// Joins a managed room and connects to every member; [`peerlink::RoomEvent::Joined`]
    /// (or `Error`) follows.
    pub fn join_room(&mut self, room: &str) -> Result<(), Error> {
        self.join_room_with(room, peerlink::JoinOptions::default())
    }

    /// Joins a managed room with options (an end-to-end encrypted room:
    /// [`peerlink::JoinOptions::encrypted`]; messages to a member wait for
    /// [`peerlink::EncryptionEvent::Ready`]).
    pub fn join_room_with(&mut self, room: &str, options: peerlink::JoinOptions) -> Result<(), Error> {
        let now = Instant::now();
        self.core.join_room_with(now, room, options)?;
        self.poll(now)
    }

    /// A handle on the room `id`, for commands (they fail with
    /// [`peerlink::RoomError::NotJoined`] unless this node is in it).
    pub fn room(&mut self, id: &str) -> Room<'_> {
        Room { node: self, id: id.to_owned() }
    }

    /// Sends `value` as JSON on `channel` (the default channel when `None`).
    pub fn send<T: Serialize + ?Sized>(&mut self, peer: Fingerprint, channel: Option<&str>, value: &T) -> Result<(), Error> {
        let now = Instant::now();
        self.core.send(now, peer, channel, value)?;
        self.poll(now)
    }

    /// Sends a binary message on `channel` (the default channel when `None`).
    pub fn send_binary(&mut self, peer: Fingerprint, channel: Option<&str>, data: &[u8]) -> Result<(), Error> {
        let now = Instant::now();
        self.core.send_binary(now, peer, channel, data)?;
        self.poll(now)
    }

    /// Opens a named data channel to `peer`.
    pub fn create_data_channel(&mut self, peer: Fingerprint, options: ChannelOptions) -> Result<(), Error> {
        let now = Instant::now();
        self.core.create_data_channel(now, peer, options)?;
        self.poll(now)
    }

    /// Restarts ICE with `peer`.
    pub fn restart_ice(&mut self, peer: Fingerprint) -> Result<(), Error> {
        let now = Instant::now();
        self.core.restart_ice(now, peer)?;
        self.poll(now)
    }

    /// Closes the connection to `peer` (the remote sees it close).
    pub fn close_peer(&mut self, peer: Fingerprint) -> Result<(), Error> {
        let now = Instant::now();
        self.core.close_peer(now, peer)?;
        self.poll(now)
    }

    /// Returns the last socket, TLS or WebSocket error, if any.
    pub fn last_error(&self) -> Option<&Error> {
        self.last_error.as_ref()
    }

    /// Returns how many events wait in the queue.
    pub fn queued_events(&self) -> usize {
        self.events.len()
    }

    /// Reads up to [`MAX_DATAGRAMS_PER_POLL`] datagrams from the UDP sockets into the core,
    /// several per system call (`recvmmsg`, and GRO where the kernel coalesces them).
    fn read_datagrams(&mut self, now: Instant) -> Result<(), Error> {
        let mut budget = MAX_DATAGRAMS_PER_POLL;
        let mut buffers = std::mem::take(&mut self.recv_buffers);
        let result = (0..self.udp.len()).try_for_each(|i| self.read_port(now, i, &mut buffers, &mut budget));
        self.recv_buffers = buffers;
        result?;
        self.more_to_read |= budget == 0;
        Ok(())
    }

    /// Reads datagrams from port `i` until it is empty or `budget` is spent. Every
    /// [`DRAIN_EVERY`] datagrams, sends what they produced (acknowledgements, chiefly) before
    /// reading on: a sender waits on them, and holding them until the whole backlog is read
    /// would make it wait for all of it.
    fn read_port(&mut self, now: Instant, i: usize, buffers: &mut udp::RecvBuffers, budget: &mut usize) -> Result<(), Error> {
        let local = self.udp[i].local;
        while *budget > 0 {
            let received = self.udp[i].recv(buffers);
            if received.is_empty() {
                break;
            }
            for (k, (source, datagram)) in buffers.datagrams(&received).enumerate() {
                self.core.handle_datagram(now, source, local, datagram)?;
                *budget = budget.saturating_sub(1);
                if (k + 1) % DRAIN_EVERY == 0 {
                    self.drain(now)?;
                }
            }
            self.drain(now)?;
        }
        Ok(())
    }

    /// Sends what the core produced: runs of equal-sized datagrams from one socket to one
    /// destination go out in one system call (UDP GSO) where the kernel allows.
    fn flush_datagrams(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let outbox = std::mem::take(&mut self.outbox);
        let mut rest = &outbox[..];
        while let Some(first) = rest.first() {
            let Some(port) = self.udp.iter().find(|p| p.local == first.source) else {
                debug!(source = %first.source, "no socket for a datagram's source");
                rest = &rest[1..];
                continue;
            };
            let n = udp::run_length(rest, port.max_segments());
            port.send(&rest[..n], &mut self.send_buffer);
            rest = &rest[n..];
        }
        // Keep the allocation for the next round.
        let mut outbox = outbox;
        outbox.clear();
        self.outbox = outbox;
    }

    // ---- internals ------------------------------------------------------------------------

    /// Runs the core's outputs until it has none: transmits to the socket, events to the queue.
    fn drain(&mut self, now: Instant) -> Result<(), Error> {
        loop {
            let mut busy = false;
            while let Some(t) = self.core.poll_transmit() {
                busy = true;
                match t {
                    NodeTransmit::Signaling(ClientTransmit::Connect { url }) => {
                        self.close_conn(None);
                        self.start_connect(now, &url)?;
                    }
                    NodeTransmit::Signaling(ClientTransmit::Text(text)) => self.send_text(now, text)?,
                    NodeTransmit::Signaling(ClientTransmit::Close { code }) => self.close_conn(Some(code)),
                    NodeTransmit::Datagram(d) => self.outbox.push(d),
                }
            }
            while let Some(e) = self.core.poll_event() {
                busy = true;
                if let NodeEvent::TurnCredentials(Ok(issued)) = &e {
                    // `turn_from_server`: the servers of the issued credentials are added here
                    // (a host name is resolved in this call).
                    for turn in issued.ice_server().turn_servers() {
                        if let Err(error) = add_turn_url(&mut self.core, now, &turn) {
                            warn!(host = %turn.host, %error, "TURN server not added");
                        }
                    }
                }
                self.events.push_back(e);
            }
            if !busy {
                self.flush_datagrams();
                return Ok(());
            }
        }
    }

    /// The current socket failed: drop it and tell the core.
    fn fail(&mut self, now: Instant, error: Error) -> Result<(), Error> {
        debug!(%error, "connection failed");
        self.conn = Conn::None;
        self.last_error = Some(error);
        self.core.handle_disconnected(now, None)?;
        Ok(())
    }

    /// Closes the current socket (sending a close frame best-effort) without telling the core.
    fn close_conn(&mut self, code: Option<u16>) {
        if let Conn::Open { mut ws, .. } = std::mem::replace(&mut self.conn, Conn::None) {
            if let Some(code) = code {
                let frame = CloseFrame {
                    code: code.into(),
                    reason: "".into(),
                };
                let _ = ws.close(Some(frame));
                let _ = ws.flush();
            }
        }
    }

    fn tls_config(&mut self) -> Result<Arc<rustls::ClientConfig>, Error> {
        if let Some(config) = &self.tls {
            return Ok(config.clone());
        }
        let mut roots =
            rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in &self.extra_root_certs {
            roots
                .add(cert.clone())
                .map_err(|e| Error::WebSocket(format!("extra root certificate: {e}")))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::WebSocket(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let config = Arc::new(config);
        self.tls = Some(config.clone());
        Ok(config)
    }

    /// Starts opening a WebSocket to `url`: resolves it (may block) and starts a non-blocking
    /// TCP connect.
    fn start_connect(&mut self, now: Instant, url: &str) -> Result<(), Error> {
        let request = match url.into_client_request() {
            Ok(r) => r,
            Err(e) => return self.fail(now, e.into()),
        };
        let tls = match tungstenite::client::uri_mode(request.uri()) {
            Ok(tungstenite::stream::Mode::Plain) => false,
            Ok(tungstenite::stream::Mode::Tls) => true,
            Err(e) => return self.fail(now, e.into()),
        };
        let Some(host) = request.uri().host() else {
            return self.fail(now, Error::WebSocket(format!("no host in `{url}`")));
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = request
            .uri()
            .port_u16()
            .unwrap_or(if tls { 443 } else { 80 });
        debug!(%host, port, "resolving");
        let addrs: VecDeque<SocketAddr> = match (host.as_str(), port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => return self.fail(now, Error::Io(e)),
        };
        self.conn = Conn::Connecting(Box::new(Connecting {
            request,
            host,
            tls,
            addrs,
            socket: None,
        }));
        self.next_addr(now)
    }

    /// Starts a connect to the next untried address, or fails when none is left.
    fn next_addr(&mut self, now: Instant) -> Result<(), Error> {
        let Conn::Connecting(c) = &mut self.conn else {
            return Ok(());
        };
        let mut last = None;
        while let Some(addr) = c.addrs.pop_front() {
            match open_socket(addr) {
                Ok(socket) => {
                    c.socket = Some(socket);
                    return Ok(());
                }
                Err(e) => {
                    debug!(%addr, error = %e, "connect failed");
                    last = Some(e);
                }
            }
        }
        let e = last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "host resolved to no address")
        });
        self.fail(now, Error::Io(e))
    }

    /// Checks whether the TCP connect finished; starts the handshakes when it did.
    fn progress_connect(&mut self, now: Instant) -> Result<(), Error> {
        let Conn::Connecting(c) = &mut self.conn else {
            return Ok(());
        };
        let Some(socket) = &c.socket else {
            return Ok(());
        };
        match socket.take_error() {
            Ok(None) => {}
            Ok(Some(e)) | Err(e) => {
                debug!(error = %e, "connect failed");
                c.socket = None;
                if c.addrs.is_empty() {
                    return self.fail(now, Error::Io(e));
                }
                return self.next_addr(now);
            }
        }
        match socket.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()), // still connecting
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return self.fail(now, Error::Io(e)),
        }
        let Conn::Connecting(c) = std::mem::replace(&mut self.conn, Conn::None) else {
            unreachable!()
        };
        let Connecting {
            request,
            host,
            tls,
            socket,
            ..
        } = *c;
        let tcp: TcpStream = socket.expect("checked above").into();
        let _ = tcp.set_nodelay(true);
        debug!(peer = ?tcp.peer_addr().ok(), "tcp connected");
        let stream = if tls {
            let config = match self.tls_config() {
                Ok(c) => c,
                Err(e) => return self.fail(now, e),
            };
            let name = match ServerName::try_from(host) {
                Ok(n) => n,
                Err(e) => return self.fail(now, Error::WebSocket(format!("tls server name: {e}"))),
            };
            match rustls::ClientConnection::new(config, name) {
                Ok(conn) => Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))),
                Err(e) => return self.fail(now, Error::WebSocket(format!("tls: {e}"))),
            }
        } else {
            Stream::Plain(tcp)
        };
        // tungstenite zero-fills its whole read buffer before every read; its 128 KiB default
        // costs more per frame than the frame does (signaling frames are small).
        let config = WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .max_write_buffer_size(MAX_WRITE_BUFFER)
            .max_frame_size(Some(MAX_FRAME));
        let result = tungstenite::client::client_with_config(request, stream, Some(config));
        self.handshake_result(now, result)
    }

    fn progress_handshake(&mut self, now: Instant) -> Result<(), Error> {
        if !matches!(self.conn, Conn::Handshaking(_)) {
            return Ok(());
        }
        let Conn::Handshaking(mid) = std::mem::replace(&mut self.conn, Conn::None) else {
            unreachable!()
        };
        let result = mid.handshake();
        self.handshake_result(now, result)
    }

    fn handshake_result(
        &mut self,
        now: Instant,
        result: Result<
            (WebSocket<Stream>, tungstenite::handshake::client::Response),
            HandshakeError<ClientHandshake<Stream>>,
        >,
    ) -> Result<(), Error> {
        match result {
            Ok((ws, _)) => {
                debug!("websocket open");
                self.conn = Conn::Open {
                    ws: Box::new(ws),
                    flush_pending: false,
                };
                self.core.handle_connected(now)?;
                Ok(())
            }
            Err(HandshakeError::Interrupted(mid)) => {
                self.conn = Conn::Handshaking(Box::new(mid));
                Ok(())
            }
            Err(HandshakeError::Failure(e)) => self.fail(now, e.into()),
        }
    }

    /// Reads up to [`MAX_FRAMES_PER_POLL`] frames into the core.
    fn read_frames(&mut self, now: Instant) -> Result<(), Error> {
        self.more_to_read = false;
        for _ in 0..MAX_FRAMES_PER_POLL {
            let Conn::Open { ws, .. } = &mut self.conn else {
                return Ok(());
            };
            match ws.read() {
                // The time a frame is read, not when this poll began: replies carry timings
                // (a ping's round trip) that the poll's start would shorten.
                Ok(Message::Text(text)) => self.core.handle_text(Instant::now().max(now), text.as_str())?,
                Ok(Message::Close(frame)) => {
                    let code = frame.map(|f| u16::from(f.code));
                    debug!(?code, "server closed the connection");
                    let _ = ws.flush(); // echo the close, best-effort
                    self.conn = Conn::None;
                    self.core.handle_disconnected(now, code)?;
                    return Ok(());
                }
                Ok(Message::Binary(_)) => warn!("binary frame from the server ignored"),
                Ok(_) => {} // ping (answered by tungstenite), pong, raw frame
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(());
                }
                Err(
                    e @ (tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed),
                ) => {
                    return self.fail(now, e.into());
                }
                Err(e) => return self.fail(now, e.into()),
            }
        }
        self.more_to_read = matches!(self.conn, Conn::Open { .. });
        Ok(())
    }

    fn send_text(&mut self, now: Instant, text: String) -> Result<(), Error> {
        let Conn::Open { ws, flush_pending } = &mut self.conn else {
            // The core only sends while registered, which needs an open socket; a frame for a
            // socket that just failed is lost with it (the core resends state on reconnect).
            debug!("frame for a closed socket dropped");
            return Ok(());
        };
        match ws.send(Message::text(text)) {
            Ok(()) => {
                *flush_pending = false;
                Ok(())
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                // tungstenite keeps the frame buffered; the next poll flushes it.
                *flush_pending = true;
                Ok(())
            }
            Err(e) => self.fail(now, e.into()),
        }
    }

    fn flush(&mut self, now: Instant) -> Result<(), Error> {
        let Conn::Open { ws, flush_pending } = &mut self.conn else {
            return Ok(());
        };
        if !*flush_pending {
            return Ok(());
        }
        match ws.flush() {
            Ok(()) => {
                *flush_pending = false;
                Ok(())
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => self.fail(now, e.into()),
        }
    }

    /// Whether nothing can happen any more: no socket, no timer, no queued output.
    fn is_closed(&self) -> bool {
        matches!(self.conn, Conn::None) && self.core.poll_timeout().is_none()
    }

    fn interest(&self) -> (Option<Fd>, Interest) {
        match &self.conn {
            Conn::None => (None, Interest::Nothing),
            Conn::Connecting(c) => match &c.socket {
                Some(s) => (Some(fd_of(s)), Interest::Write),
                None => (None, Interest::Nothing),
            },
            // The handshake may wait for either direction; wake up often while it runs.
            Conn::Handshaking(mid) => (
                Some(fd_of(mid.get_ref().get_ref().tcp())),
                Interest::Read {
                    write: false,
                    cap: Some(Duration::from_millis(2)),
                },
            ),
            Conn::Open { ws, flush_pending } => (
                Some(fd_of(ws.get_ref().tcp())),
                Interest::Read {
                    write: *flush_pending,
                    cap: None,
                },
            ),
        }
    }

    /// Sleeps until the socket is ready, the core's next deadline, or `until`, whichever is
    /// first (and at most [`MAX_WAIT_STEP`]).
    fn wait(&self, until: Option<Instant>) {
        let now = Instant::now();
        let wake = match (self.core.poll_timeout(), until) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(now + MAX_WAIT_STEP),
        };
        let mut timeout = wake.saturating_duration_since(now).min(MAX_WAIT_STEP);
        if timeout.is_zero() || self.more_to_read {
            return;
        }
        let (fd, interest) = self.interest();
        if let Interest::Read { cap: Some(cap), .. } = interest {
            timeout = timeout.min(cap);
        }
        let mut fds: Vec<(Fd, bool, bool)> = self.udp.iter().map(|p| (fd_of(&p.socket), true, false)).collect();
        match (fd, interest) {
            (Some(fd), Interest::Read { write, .. }) => fds.push((fd, true, write)),
            (Some(fd), Interest::Write) => fds.push((fd, false, true)),
            _ => {}
        }
        if fds.is_empty() {
            std::thread::sleep(timeout);
        } else {
            wait_fds(&fds, timeout);
        }
    }
}

/// Socket buffer size asked for each UDP socket (the OS may cap it, e.g. Linux at
/// `net.core.rmem_max`): a burst of a send window's worth of datagrams must not overflow the
/// receiver's buffer, or the transport spends its time recovering losses.
pub const UDP_SOCKET_BUFFER: usize = 2 * 1024 * 1024;

/// Asks for [`UDP_SOCKET_BUFFER`]-byte receive and send buffers (best effort).
fn size_buffers(socket: &UdpSocket) {
    let s = socket2::SockRef::from(socket);
    if let Err(e) = s.set_recv_buffer_size(UDP_SOCKET_BUFFER).and_then(|()| s.set_send_buffer_size(UDP_SOCKET_BUFFER)) {
        debug!(error = %e, "udp socket buffers not resized");
    }
}

/// The addresses to bind UDP sockets on.
fn bind_addrs(bind: &UdpBind) -> Result<Vec<SocketAddr>, Error> {
    Ok(bind.addrs(|| if_addrs::get_if_addrs().map(|ifs| ifs.into_iter().map(|i| i.ip()).collect()))?)
}

impl Drop for PollNode {
    /// Ends the session cleanly (best-effort): connections are closed and peers see this
    /// client leave at once.
    fn drop(&mut self) {
        let now = Instant::now();
        if self.core.close(now).is_ok() {
            let _ = self.drain(now);
        }
    }
}

/// Opens a non-blocking TCP socket and starts connecting it to `addr`.
fn open_socket(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => Ok(socket),
        Err(e) if in_progress(&e) => Ok(socket),
        Err(e) => Err(e),
    }
}

fn in_progress(e: &io::Error) -> bool {
    #[cfg(unix)]
    if e.raw_os_error() == Some(libc::EINPROGRESS) {
        return true;
    }
    e.kind() == io::ErrorKind::WouldBlock
}

#[cfg(unix)]
type Fd = std::os::fd::RawFd;
#[cfg(not(unix))]
type Fd = ();

#[cfg(unix)]
fn fd_of<T: std::os::fd::AsRawFd>(s: &T) -> Fd {
    s.as_raw_fd()
}
#[cfg(not(unix))]
fn fd_of<T>(_: &T) -> Fd {}

/// Waits until one of `fds` is readable (`.1`) or writable (`.2`), or `timeout` passes.
#[cfg(unix)]
#[allow(unsafe_code)]
fn wait_fds(fds: &[(Fd, bool, bool)], timeout: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, read, write)| {
            let mut events = 0;
            if read {
                events |= libc::POLLIN;
            }
            if write {
                events |= libc::POLLOUT;
            }
            libc::pollfd { fd, events, revents: 0 }
        })
        .collect();
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds that lives across the call; every
    // fd belongs to a socket the caller keeps open for the whole call. A stale or invalid fd
    // only yields POLLNVAL.
    let _ = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
}

/// Without poll(2): sleep in short steps (the caller polls in between).
#[cfg(not(unix))]
fn wait_fds(_: &[(Fd, bool, bool)], timeout: Duration) {
    std::thread::sleep(timeout.min(Duration::from_millis(1)));
}

// ---- PollClient ---------------------------------------------------------------------------

/// A non-blocking driver of the signaling client alone, for game loops: call
/// [`PollClient::poll`] once per frame, then drain [`PollClient::poll_event`]. Commands go
/// through [`PollClient::client`]; their replies arrive later as [`ClientEvent::Response`].
///
/// It is a [`PollNode`] without UDP sockets that refuses incoming connections: use a
/// [`PollNode`] for direct connections.
#[derive(Debug)]
pub struct PollClient {
    inner: PollNode,
    events: VecDeque<ClientEvent>,
}

impl PollClient {
    /// Creates the client and starts connecting (the core's `connect(now)`). Does no I/O: the
    /// socket is opened by the first [`PollClient::poll`].
    pub fn new(config: ClientConfig, options: PollOptions) -> Result<PollClient, Error> {
        let mut config = NodeConfig::with_client(config);
        config.accept_incoming = false;
        Ok(PollClient { inner: PollNode::with_core(config, options)?, events: VecDeque::new() })
    }

    /// Does one bounded round of non-blocking work at `now` (see [`PollNode::poll`]).
    pub fn poll(&mut self, now: Instant) -> Result<(), Error> {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            return Err(Error::Client(ClientError::NotDrained));
        }
        let result = self.inner.poll(now);
        self.pump();
        result
    }

    fn pump(&mut self) {
        while let Some(e) = self.inner.events.pop_front() {
            if let NodeEvent::Signaling(e) = e {
                self.events.push_back(e);
            }
        }
    }

    /// Returns the next queued event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Returns when the core next needs [`PollClient::poll`] even if no frame arrives (a ping,
    /// a request or connect timeout, a reconnect). `None` when the client is idle.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.inner.poll_timeout()
    }

    /// Returns the core state machine, for commands (`join`, `relay`, `create_room`, ...). Their
    /// frames are written by the next [`PollClient::poll`]; replies arrive as
    /// [`ClientEvent::Response`].
    pub fn client(&mut self) -> &mut peerlink::Client {
        self.inner.client()
    }

    /// Returns this client's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.inner.fingerprint()
    }

    /// Returns whether the client is registered right now.
    pub fn is_registered(&self) -> bool {
        self.inner.is_registered()
    }

    /// Returns the last socket, TLS or WebSocket error (the cause of the last
    /// [`ClientEvent::Disconnected`] with no close code), if any.
    pub fn last_error(&self) -> Option<&Error> {
        self.inner.last_error()
    }

    /// Returns how many events wait in the queue.
    pub fn queued_events(&self) -> usize {
        self.events.len() + self.inner.events.len()
    }

    fn drain(&mut self, now: Instant) -> Result<(), Error> {
        let result = self.inner.drain(now);
        self.pump();
        result
    }

    fn wait(&self, until: Option<Instant>) {
        if self.events.is_empty() {
            self.inner.wait(until);
        }
    }

    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

/// A managed room of a [`PollNode`], borrowed for commands (the same names as the room
/// handles of `peerlink-smol` and `peerlink-tokio`, without `async`). What a command sends goes
/// out before it returns; events arrive from [`PollNode::poll_event`] as
/// [`NodeEvent::Room`], and for a call ([`Room::start_call`]) as [`NodeEvent::Call`] and
/// [`NodeEvent::Media`].
#[derive(Debug)]
pub struct Room<'a> {
    node: &'a mut PollNode,
    id: String,
}

impl Room<'_> {
    /// The room id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn run<T>(&mut self, f: impl FnOnce(&mut Node, Instant, &str) -> Result<T, peerlink::NodeError>) -> Result<T, Error> {
        let now = Instant::now();
        let out = f(&mut self.node.core, now, &self.id)?;
        self.node.poll(now)?;
        Ok(out)
    }

    /// Sends `value` as JSON to every member, directly where the connection is up and
    /// through the server otherwise; once and in order either way. Fails with
    /// [`peerlink::RoomError::WouldBlock`] when a member is too far behind: wait for
    /// [`peerlink::RoomEvent::Writable`].
    pub fn send<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.run(|n, now, id| n.room_send_json(now, id, None, value))
    }

    /// Sends `value` as JSON to one member.
    pub fn send_to<T: Serialize + ?Sized>(&mut self, peer: Fingerprint, value: &T) -> Result<(), Error> {
        self.run(|n, now, id| n.room_send_json(now, id, Some(peer), value))
    }

    /// Sends text, bytes or JSON to every member (`to: None`) or to one.
    pub fn send_data(&mut self, to: Option<Fingerprint>, data: peerlink::RoomData) -> Result<(), Error> {
        self.run(|n, now, id| n.room_send(now, id, to, data))
    }

    /// Sends `value` as JSON to every member through the signaling server even where a
    /// direct path is up.
    pub fn broadcast_via_server<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        let data = peerlink::RoomData::json(value).map_err(|e| peerlink::NodeError::Room(peerlink::RoomError::Serialize(e.to_string())))?;
        self.run(|n, now, id| n.room_broadcast_via_server(now, id, data))
    }

    /// Removes `peer` (owner only: [`peerlink::RoomError::NotOwner`] otherwise).
    pub fn kick(&mut self, peer: Fingerprint) -> Result<(), Error> {
        self.run(|n, now, id| n.kick(now, id, peer))
    }

    /// Sets this node's presence state (`None` clears it); see [`Node::set_presence`].
    pub fn set_presence(&mut self, state: Option<&serde_json::Value>) -> Result<(), Error> {
        self.run(|n, now, id| n.set_presence(now, id, state))
    }

    /// The room as this node sees it (members, paths, presence); `None` when not in it.
    pub fn info(&self) -> Option<peerlink::RoomView> {
        self.node.core.room(&self.id)
    }

    /// Leaves the room (the owner closes it for everyone).
    pub fn leave(&mut self) -> Result<(), Error> {
        self.run(|n, now, id| n.leave_room(now, id))
    }

    // ---- calls (see peerlink::room::call) --------------------------------------------------

    /// Starts a call in the room: `config`'s sources go to every member, now and later
    /// ([`peerlink::CallEvent::LocalStream`]; each member's media arrives as
    /// [`peerlink::CallEvent::RemoteStream`]). Starting again changes what is sent.
    pub fn start_call(&mut self, config: CallConfig) -> Result<(), Error> {
        self.run(|n, now, id| n.start_call(now, id, config))
    }

    /// Mutes (`true`) or unmutes one source of the call for every member.
    pub fn set_call_muted(&mut self, source: Source, muted: bool) -> Result<(), Error> {
        self.run(|n, now, id| n.set_call_muted(now, id, source, muted))
    }

    /// Starts (`true`) or stops sharing a screen in the call: one more video track,
    /// [`Source::Screen`].
    pub fn set_screen_share(&mut self, on: bool) -> Result<(), Error> {
        self.run(|n, now, id| n.set_screen_share(now, id, on))
    }

    /// Sends an encoded frame of `source` to every member of the call (encoded once).
    /// Returns to how many it went (members whose connection is up and whose track is
    /// negotiated and not muted).
    pub fn send_call_frame(&mut self, source: Source, frame: MediaFrame) -> Result<usize, Error> {
        self.run(|n, now, id| n.send_call_frame(now, id, source, frame))
    }

    /// Ends the call (its tracks are removed from every member's connection); the room
    /// stays. Leaving the room ends it too.
    pub fn end_call(&mut self) -> Result<(), Error> {
        self.run(|n, now, id| n.end_call(now, id))
    }
}

// ---- blocking Client ----------------------------------------------------------------------

/// A blocking signaling client: every request waits for its reply. Built on [`PollClient`]; no
/// threads. Events that arrive meanwhile are queued for [`Client::next_event`] and
/// [`Client::events`].
#[derive(Debug)]
pub struct Client {
    inner: PollClient,
}

impl Client {
    /// Connects with a fresh identity and blocks until registered. Fails on the first fatal
    /// error, when the first attempt fails, or after `connect_timeout`.
    pub fn connect(config: ClientConfig) -> Result<Client, Error> {
        Self::connect_with(config, PollOptions::default())
    }

    /// Like [`Client::connect`], with an identity, seed or extra TLS roots.
    ///
    /// The `Connected` and `Registered` events stay queued for [`Client::next_event`].
    pub fn connect_with(config: ClientConfig, options: PollOptions) -> Result<Client, Error> {
        let deadline = Instant::now() + config.connect_timeout + Duration::from_millis(100);
        let mut inner = PollClient::new(config, options)?;
        let mut scanned = 0;
        loop {
            inner.poll(Instant::now())?;
            for event in inner.events.iter().skip(scanned) {
                match event {
                    ClientEvent::Registered { .. } | ClientEvent::Reconnected { .. } => {
                        return Ok(Client { inner });
                    }
                    ClientEvent::Error(e) => return Err(Error::Client(e.clone())),
                    ClientEvent::Disconnected { code, .. } => {
                        return Err(match (inner.inner.last_error.take(), code) {
                            (Some(e), _) => e,
                            (None, Some(code)) => {
                                Error::WebSocket(format!("server closed the connection ({code})"))
                            }
                            (None, None) => Error::Timeout,
                        });
                    }
                    _ => {}
                }
            }
            scanned = inner.events.len();
            if Instant::now() >= deadline {
                return Err(Error::Timeout);
            }
            inner.wait(Some(deadline));
        }
    }

    /// Returns this client's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.inner.fingerprint()
    }

    /// Returns whether the client is registered right now (it reconnects on its own).
    pub fn is_registered(&self) -> bool {
        self.inner.is_registered()
    }

    /// Returns the underlying [`PollClient`] (for commands without a blocking wrapper, such as
    /// [`peerlink::Client::cancel_match`] with its reply read from the event queue).
    pub fn poll_client(&mut self) -> &mut PollClient {
        &mut self.inner
    }

    /// Joins a namespace and returns its other members.
    pub fn join(&mut self, namespace: &str) -> Result<Vec<PeerInfo>, Error> {
        self.join_with(namespace, None, None)
    }

    /// Joins a namespace with an application type and version, and returns its other members.
    pub fn join_with(
        &mut self,
        namespace: &str,
        app_type: Option<&str>,
        app_version: Option<&str>,
    ) -> Result<Vec<PeerInfo>, Error> {
        match self.request(|c, now| c.join(now, namespace, app_type, app_version))? {
            Response::Joined { peers, .. } => Ok(peers),
            other => Err(unexpected(other)),
        }
    }

    /// Leaves a namespace.
    pub fn leave(&mut self, namespace: &str) -> Result<(), Error> {
        self.request_ok(|c, now| c.leave(now, namespace))
    }

    /// Lists up to `limit` members of a namespace without joining it.
    pub fn discover(
        &mut self,
        namespace: &str,
        limit: Option<u32>,
    ) -> Result<Vec<PeerInfo>, Error> {
        match self.request(|c, now| c.discover(now, namespace, limit))? {
            Response::Discovered { peers, .. } => Ok(peers),
            other => Err(unexpected(other)),
        }
    }

    /// Waits to be matched into a group of `group_size` with peers whose `criteria` are equal.
    /// Blocks until the group forms, the server's match timeout, or `request_timeout`.
    pub fn match_peers(
        &mut self,
        namespace: &str,
        criteria: Option<serde_json::Value>,
        group_size: u32,
    ) -> Result<MatchResult, Error> {
        match self.request(|c, now| c.match_peers(now, namespace, criteria.as_ref(), group_size))? {
            Response::Matched(m) => Ok(m),
            other => Err(unexpected(other)),
        }
    }

    /// Sends `payload` to one peer through the server. Does not wait: failures (such as
    /// `peer_not_found`) arrive as [`ClientEvent::Error`].
    pub fn relay<T: Serialize + ?Sized>(
        &mut self,
        to: Fingerprint,
        payload: &T,
    ) -> Result<(), Error> {
        self.inner.client().relay(to, payload)?;
        self.inner.poll(Instant::now())
    }

    /// Sends `payload` to every other member of `namespace`. Does not wait.
    pub fn broadcast<T: Serialize + ?Sized>(
        &mut self,
        namespace: &str,
        payload: &T,
    ) -> Result<(), Error> {
        self.inner.client().broadcast(namespace, payload)?;
        self.inner.poll(Instant::now())
    }

    /// Creates a room owned by this client.
    pub fn create_room(
        &mut self,
        room_id: &str,
        max_size: Option<u32>,
        metadata: Option<serde_json::Value>,
    ) -> Result<RoomDetails, Error> {
        match self.request(|c, now| c.create_room(now, room_id, max_size, metadata.as_ref()))? {
            Response::RoomCreated(room) => Ok(room),
            other => Err(unexpected(other)),
        }
    }

    /// Joins a room; returns it and its other members.
    pub fn join_room(&mut self, room_id: &str) -> Result<(RoomDetails, Vec<PeerInfo>), Error> {
        match self.request(|c, now| c.join_room(now, room_id))? {
            Response::RoomJoined { room, peers } => Ok((room, peers)),
            other => Err(unexpected(other)),
        }
    }

    /// Leaves a room.
    pub fn leave_room(&mut self, room_id: &str) -> Result<(), Error> {
        self.request_ok(|c, now| c.leave_room(now, room_id))
    }

    /// Returns a room's details and how many members it has.
    pub fn room_info(&mut self, room_id: &str) -> Result<(RoomDetails, usize), Error> {
        match self.request(|c, now| c.room_info(now, room_id))? {
            Response::RoomInfo { room, members } => Ok((room, members)),
            other => Err(unexpected(other)),
        }
    }

    /// Removes a member from a room this client owns.
    pub fn kick(&mut self, room_id: &str, peer: Fingerprint) -> Result<(), Error> {
        self.request_ok(|c, now| c.kick(now, room_id, peer))
    }

    /// Closes a room this client owns.
    pub fn close_room(&mut self, room_id: &str) -> Result<(), Error> {
        self.request_ok(|c, now| c.close_room(now, room_id))
    }

    /// Measures the round trip to the server.
    pub fn ping(&mut self) -> Result<Duration, Error> {
        match self.request(|c, now| c.ping(now))? {
            Response::Pong { rtt } => Ok(rtt),
            other => Err(unexpected(other)),
        }
    }

    /// Asks the server for short-lived TURN credentials (see
    /// [`peerlink::Client::turn_credentials`]); a server without a TURN secret answers
    /// `turn_unavailable`. Hand `issued.ice_server()` to a node
    /// ([`PollNode::add_turn_servers`], or `NodeConfig::ice_servers` of a new one).
    pub fn turn_credentials(&mut self) -> Result<IssuedTurnCredentials, Error> {
        match self.request(|c, now| c.turn_credentials(now))? {
            Response::TurnCredentials(issued) => Ok(issued),
            other => Err(unexpected(other)),
        }
    }

    /// Waits up to `timeout` for the next event. Returns `Ok(None)` when none came in time, and
    /// [`Error::Closed`] once the client is disconnected and every event has been taken.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<ClientEvent>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.inner.events.pop_front() {
                return Ok(Some(e));
            }
            self.inner.poll(Instant::now())?;
            if let Some(e) = self.inner.events.pop_front() {
                return Ok(Some(e));
            }
            if self.inner.is_closed() {
                return Err(Error::Closed);
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            self.inner.wait(Some(deadline));
        }
    }

    /// Polls once without blocking, then yields every queued event.
    pub fn events(&mut self) -> impl Iterator<Item = ClientEvent> + '_ {
        if let Err(error) = self.inner.poll(Instant::now()) {
            warn!(%error, "poll failed");
        }
        std::iter::from_fn(move || self.inner.events.pop_front())
    }

    /// Ends the session cleanly: sends `bye` and a close frame (best-effort), fails pending
    /// requests and stops reconnecting. Queued events stay readable.
    pub fn disconnect(&mut self) {
        let now = Instant::now();
        if let Err(error) = self.inner.client().disconnect(now) {
            warn!(%error, "disconnect");
        }
        if let Err(error) = self.inner.drain(now) {
            warn!(%error, "disconnect");
        }
    }

    // ---- internals ------------------------------------------------------------------------

    fn request_ok(
        &mut self,
        command: impl FnOnce(&mut peerlink::Client, Instant) -> Result<RequestId, ClientError>,
    ) -> Result<(), Error> {
        match self.request(command)? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Issues a command and blocks until its reply. Other events stay queued.
    fn request(
        &mut self,
        command: impl FnOnce(&mut peerlink::Client, Instant) -> Result<RequestId, ClientError>,
    ) -> Result<Response, Error> {
        let id = command(self.inner.client(), Instant::now())?;
        let mut scanned = 0;
        loop {
            self.inner.poll(Instant::now())?;
            let found =
                self.inner.events.iter().skip(scanned).position(
                    |e| matches!(e, ClientEvent::Response { request, .. } if *request == id),
                );
            if let Some(pos) = found {
                if let Some(ClientEvent::Response { result, .. }) =
                    self.inner.events.remove(scanned + pos)
                {
                    return result.map_err(Error::Request);
                }
            }
            scanned = self.inner.events.len();
            if self.inner.is_closed() {
                // The core answers every request, even on disconnect; this is a safety net.
                return Err(Error::Closed);
            }
            self.inner.wait(None);
        }
    }
}

fn unexpected(response: Response) -> Error {
    Error::Client(ClientError::Protocol(format!(
        "unexpected reply {response:?}"
    )))
}

/// Resolves a `turn:` server's host and hands every address to the node; the number added.
fn add_turn_url(core: &mut Node, now: Instant, turn: &peerlink::TurnServerUrl) -> Result<usize, Error> {
    let mut added = 0;
    for addr in (turn.host.as_str(), turn.port).to_socket_addrs()? {
        core.add_turn_server(now, addr, turn.credentials.clone())?;
        added += 1;
    }
    Ok(added)
}
