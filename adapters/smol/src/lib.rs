//! # peerlink-smol
//!
//! A thin async adapter that runs the sans-IO [`peerlink::Node`] (the signaling client plus
//! direct WebRTC connections over UDP) over a real WebSocket (`ws://`, or `wss://` with
//! rustls) and UDP sockets on the [smol](https://docs.rs/smol) runtime. [`Node`] is the whole
//! thing; [`Client`] is the signaling client alone (no sockets, calls refused).
//!
//! [`Client::connect`] spawns a *driver task* on smol's global executor. The driver owns the
//! core state machine and the socket; it opens (and re-opens) the connection, feeds frames and
//! timers into the core, and forwards everything the core reports:
//!
//! * every [`ClientEvent`], replies included, goes to the [`Events`] stream;
//! * replies also resolve the future of the command that asked for them, so
//!   `client.join("lobby").await` returns the peer list directly.
//!
//! [`Client`] is a cheap, cloneable handle. The driver ends when every handle *and* the
//! [`Events`] stream are dropped, when [`Client::disconnect`] is called, or when the core stops
//! for good (a fatal error or exhausted reconnects); the stream then ends with `None`.
//!
//! ## Back-pressure
//!
//! The event stream is a bounded channel of [`EVENT_CAPACITY`] events. When it is full the
//! driver *waits* for room before doing anything else, which stops it reading the socket, so a
//! slow consumer back-pressures the server instead of growing memory without bound. The flip
//! side: **keep draining [`Events`]** (or drop it) while you await commands, or a full stream
//! stalls the replies those commands wait for. Dropping [`Events`] is fine: the driver keeps
//! running and simply stops forwarding events.
//!
//! ## Direct connections
//!
//! ```no_run
//! use peerlink::{NodeConfig, NodeEvent};
//! use peerlink_smol::Node;
//!
//! smol::block_on(async {
//!     let (node, mut events) = Node::connect(NodeConfig::new("wss://signal.example.com")).await?;
//!     for peer in node.client().join("lobby").await? {
//!         node.connect_to_peer(peer.fingerprint).await?;
//!     }
//!     while let Some(event) = events.next().await {
//!         match event {
//!             NodeEvent::ChannelOpen { peer, .. } => node.send(peer, None, &"hello").await?,
//!             NodeEvent::Data { peer, data, .. } => println!("{} sent {data:?}", peer.short()),
//!             _ => {}
//!         }
//!     }
//!     Ok::<_, peerlink_smol::Error>(())
//! })?;
//! # Ok::<_, peerlink_smol::Error>(())
//! ```
//!
//! ## Signaling only
//!
//! ```no_run
//! use peerlink_smol::{Client, ClientConfig, ClientEvent};
//!
//! smol::block_on(async {
//!     let config = ClientConfig::new("wss://signal.example.com").alias("alice");
//!     let (client, mut events) = Client::connect(config).await?;
//!     println!("I am {}", client.fingerprint());
//!
//!     let peers = client.join("lobby").await?;
//!     for peer in &peers {
//!         client.relay(peer.fingerprint, &serde_json::json!({ "hello": "there" }))?;
//!     }
//!     while let Some(event) = events.next().await {
//!         match event {
//!             ClientEvent::Relay { from, payload } => println!("{from}: {}", payload.get()),
//!             ClientEvent::PeerJoined { peer, .. } => println!("{} joined", peer.alias),
//!             _ => {}
//!         }
//!     }
//!     client.disconnect().await;
//!     Ok::<_, peerlink_smol::Error>(())
//! })?;
//! # Ok::<_, peerlink_smol::Error>(())
//! ```
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod stream;

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use async_tungstenite::WebSocketStream;
use futures_lite::{AsyncRead, AsyncWrite, FutureExt, StreamExt};
use peerlink::node::{NodeTransmit, PeerView};
use peerlink::transfer::{ChunkSink, ChunkSource, FileInfo, TransferError};
use peerlink::{CallConfig, ChannelOptions, Datagram, IceServer, IssuedTurnCredentials, MediaFrame, NodeConfig, NodeError, NodeEvent, RoomData, RoomEvent, RoomOptions, RoomSummary, RoomView, Source, TrackId, TrackOptions};
use smol::Async;
use rand::TryRngCore;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use serde_json::value::RawValue;
use smol::Timer;
use tracing::debug;
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;

/// The sans-IO core crate, re-exported.
pub use peerlink;
pub use peerlink::client::{MatchResult, RequestError, RequestId, Response, RoomDetails};
pub use peerlink::{ClientConfig, ClientError, ClientEvent, ErrorCode, Fingerprint, Identity, PeerInfo, RawJson};
pub use peerlink::node::UdpBind;

/// Socket buffer size asked for each UDP socket (the OS may cap it): a burst of a send
/// window's worth of datagrams must not overflow the receiver's buffer.
pub const UDP_SOCKET_BUFFER: usize = 2 * 1024 * 1024;

/// Most datagrams the driver reads per wake-up before it looks at its other inputs.
pub const DATAGRAMS_PER_WAKE: usize = 256;

/// How many events the [`Events`] stream buffers before the driver waits for the consumer.
pub const EVENT_CAPACITY: usize = 1024;

/// How long closing a socket may take before it is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Options for [`Client::connect_with`].
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// The identity to register with; `None` generates a fresh one from the OS RNG.
    pub identity: Option<Identity>,
    /// Seed for the core's randomness (signature nonce entropy, reconnect jitter); `None` draws
    /// one from the OS RNG.
    pub seed: Option<u64>,
    /// Extra trust anchors for `wss://`, on top of the Mozilla roots from `webpki-roots`
    /// (for example a self-signed test certificate).
    pub extra_root_certs: Vec<CertificateDer<'static>>,
    /// Where a [`Node`] binds its UDP sockets (a [`Client`] binds none). Default: every
    /// interface.
    pub udp: UdpBind,
}


/// Errors of the adapter.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum Error {
    /// The core client refused the command or stopped (for example the server refused
    /// registration).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The server answered the request with an error, or the request timed out or was cut
    /// off by a disconnect.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The socket could not be opened or failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The WebSocket or TLS layer failed, or the server closed before registration.
    #[error("websocket: {0}")]
    WebSocket(String),
    /// The driver task has ended (after [`Client::disconnect`] or when the client stopped).
    #[error("the client has shut down")]
    Closed,
    /// The node refused a command (a send on a full buffer, an unknown peer or channel, ...).
    #[error(transparent)]
    Node(NodeError),
}

impl From<NodeError> for Error {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Client(e) => Error::Client(e),
            e => Error::Node(e),
        }
    }
}

type Reply = Sender<Result<Response, Error>>;

/// A request for the core: a command that gets a reply.
#[derive(Debug)]
enum Op {
    Join { namespace: String, app_type: Option<String>, app_version: Option<String> },
    Leave { namespace: String },
    Discover { namespace: String, limit: Option<u32> },
    Match { namespace: String, criteria: Option<serde_json::Value>, group_size: u32 },
    CreateRoom { room_id: String, max_size: Option<u32>, metadata: Option<serde_json::Value> },
    JoinRoom { room_id: String },
    LeaveRoom { room_id: String },
    RoomInfo { room_id: String },
    Kick { room_id: String, peer: Fingerprint },
    CloseRoom { room_id: String },
    ListRooms { prefix: Option<String>, limit: Option<u32> },
    Ping,
    TurnCredentials,
}

/// A managed-room command for the driver.
#[derive(Debug)]
enum RoomOp {
    Create { options: RoomOptions },
    Join { options: peerlink::JoinOptions },
    Send { to: Option<Fingerprint>, data: RoomData, via_server: bool },
    Kick { peer: Fingerprint },
    Presence { state: Option<serde_json::Value> },
    Leave,
}

type Done<T> = Sender<Result<T, Error>>;

#[derive(Debug)]
enum Command {
    Request(Op, Reply),
    Relay { to: Fingerprint, payload: Box<RawValue> },
    Broadcast { namespace: String, payload: Box<RawValue> },
    Disconnect(Sender<()>),
    ConnectToPeer { peer: Fingerprint, done: Done<()> },
    Send { peer: Fingerprint, channel: Option<String>, binary: bool, data: Vec<u8>, done: Done<()> },
    CreateChannel { peer: Fingerprint, options: ChannelOptions, done: Done<()> },
    RestartIce { peer: Fingerprint, done: Done<()> },
    ClosePeer { peer: Fingerprint, done: Done<()> },
    GetPeer { peer: Fingerprint, done: Sender<Option<PeerView>> },
    BufferedAmount { peer: Fingerprint, channel: Option<String>, done: Sender<Option<usize>> },
    Room { room: String, op: RoomOp, done: Done<()> },
    RoomView { room: String, done: Sender<Option<RoomView>> },
    Core(CoreCall),
}

struct Shared {
    commands: Sender<Command>,
    fingerprint: Fingerprint,
}

/// A handle on a connected client. Cloning is cheap; all clones drive the same connection.
///
/// Commands that expect a reply are `async` and resolve with it; [`Client::relay`] and
/// [`Client::broadcast`] only enqueue a frame.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("fingerprint", &self.shared.fingerprint.short()).finish()
    }
}

/// The stream of everything the client reports, replies included.
///
/// Implements [`futures_lite::Stream`] (that is, `futures_core::Stream`). It ends (`None`) when
/// the driver task ends. See the [crate docs](crate#back-pressure) on back-pressure.
#[derive(Debug)]
pub struct Events {
    rx: Pin<Box<Receiver<ClientEvent>>>,
    /// Keeps the command channel open: the driver ends once handles and stream are all gone.
    _alive: Sender<Command>,
}

impl Events {
    /// Waits for the next event; `None` once the driver task has ended.
    pub async fn next(&mut self) -> Option<ClientEvent> {
        self.rx.recv().await.ok()
    }

    /// Returns the next event if one is buffered, without waiting.
    pub fn try_next(&mut self) -> Option<ClientEvent> {
        self.rx.try_recv().ok()
    }
}

impl futures_lite::Stream for Events {
    type Item = ClientEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClientEvent>> {
        self.rx.as_mut().poll_next(cx)
    }
}

impl Client {
    /// Connects with a fresh identity generated from the OS RNG. Resolves once the client has
    /// registered with the server, or fails with the first fatal error or the socket error of
    /// the first attempt (no reconnecting happens before the first registration succeeds).
    pub async fn connect(config: ClientConfig) -> Result<(Client, Events), Error> {
        Self::connect_with(config, ConnectOptions::default()).await
    }

    /// Connects with the given [`ConnectOptions`]; otherwise like [`Client::connect`].
    pub async fn connect_with(config: ClientConfig, options: ConnectOptions) -> Result<(Client, Events), Error> {
        let mut config = NodeConfig::with_client(config);
        // A plain client has no UDP sockets: it refuses calls from peers.
        config.accept_incoming = false;
        let (shared, rx, alive) = start(config, options, false).await?;
        let events = Events { rx: Box::pin(rx.client()), _alive: alive };
        Ok((Client { shared }, events))
    }

    /// Returns this client's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.shared.fingerprint
    }

    async fn request(&self, op: Op) -> Result<Response, Error> {
        let (tx, rx) = async_channel::bounded(1);
        self.shared.commands.send(Command::Request(op, tx)).await.map_err(|_| Error::Closed)?;
        rx.recv().await.map_err(|_| Error::Closed)?
    }

    fn enqueue(&self, command: Command) -> Result<(), Error> {
        self.shared.commands.try_send(command).map_err(|_| Error::Closed)
    }

    /// Joins a namespace and returns the other members (up to the server's list limit).
    /// Other members see [`ClientEvent::PeerJoined`]; the client re-joins after reconnecting.
    pub async fn join(&self, namespace: &str) -> Result<Vec<PeerInfo>, Error> {
        self.join_with(namespace, None, None).await
    }

    /// Joins a namespace announcing an application type and version.
    pub async fn join_with(
        &self,
        namespace: &str,
        app_type: Option<&str>,
        app_version: Option<&str>,
    ) -> Result<Vec<PeerInfo>, Error> {
        let op = Op::Join {
            namespace: namespace.into(),
            app_type: app_type.map(Into::into),
            app_version: app_version.map(Into::into),
        };
        match self.request(op).await? {
            Response::Joined { peers, .. } => Ok(peers),
            other => Err(unexpected(other)),
        }
    }

    /// Leaves a namespace.
    pub async fn leave(&self, namespace: &str) -> Result<(), Error> {
        self.expect_ok(Op::Leave { namespace: namespace.into() }).await
    }

    /// Lists up to `limit` members of a namespace without joining it.
    pub async fn discover(&self, namespace: &str, limit: Option<u32>) -> Result<Vec<PeerInfo>, Error> {
        match self.request(Op::Discover { namespace: namespace.into(), limit }).await? {
            Response::Discovered { peers, .. } => Ok(peers),
            other => Err(unexpected(other)),
        }
    }

    /// Asks to be matched into a group of `group_size` peers with equal `criteria`; resolves
    /// once the group is formed (or fails, for example with `match_timeout`).
    pub async fn match_peers(
        &self,
        namespace: &str,
        criteria: Option<serde_json::Value>,
        group_size: u32,
    ) -> Result<MatchResult, Error> {
        match self.request(Op::Match { namespace: namespace.into(), criteria, group_size }).await? {
            Response::Matched(result) => Ok(result),
            other => Err(unexpected(other)),
        }
    }

    /// Sends `payload` to one peer through the server. This only enqueues the frame: failures
    /// the server reports (such as `peer_not_found`), and refusals by the core (such as a full
    /// outbox), arrive as [`ClientEvent::Error`]. Fails at once if `payload` cannot be
    /// serialized or the client has shut down. The command queue to the driver is unbounded;
    /// the core's outbox bound (`outbox_frames`) applies while not registered.
    pub fn relay<T: Serialize + ?Sized>(&self, to: Fingerprint, payload: &T) -> Result<(), Error> {
        let payload = to_raw(payload)?;
        self.enqueue(Command::Relay { to, payload })
    }

    /// Sends `payload` to every other member of `namespace`. Enqueues like [`Client::relay`];
    /// an invalid namespace name fails at once.
    pub fn broadcast<T: Serialize + ?Sized>(&self, namespace: &str, payload: &T) -> Result<(), Error> {
        check_name(namespace)?;
        let payload = to_raw(payload)?;
        self.enqueue(Command::Broadcast { namespace: namespace.into(), payload })
    }

    /// Creates a room owned by this client.
    pub async fn create_room(
        &self,
        room_id: &str,
        max_size: Option<u32>,
        metadata: Option<serde_json::Value>,
    ) -> Result<RoomDetails, Error> {
        match self.request(Op::CreateRoom { room_id: room_id.into(), max_size, metadata }).await? {
            Response::RoomCreated(room) => Ok(room),
            other => Err(unexpected(other)),
        }
    }

    /// Joins a room; returns it and its other members.
    pub async fn join_room(&self, room_id: &str) -> Result<(RoomDetails, Vec<PeerInfo>), Error> {
        match self.request(Op::JoinRoom { room_id: room_id.into() }).await? {
            Response::RoomJoined { room, peers } => Ok((room, peers)),
            other => Err(unexpected(other)),
        }
    }

    /// Leaves a room.
    pub async fn leave_room(&self, room_id: &str) -> Result<(), Error> {
        self.expect_ok(Op::LeaveRoom { room_id: room_id.into() }).await
    }

    /// Returns a room's description and how many members it has.
    pub async fn room_info(&self, room_id: &str) -> Result<(RoomDetails, usize), Error> {
        match self.request(Op::RoomInfo { room_id: room_id.into() }).await? {
            Response::RoomInfo { room, members } => Ok((room, members)),
            other => Err(unexpected(other)),
        }
    }

    /// Lists rooms that have space, by id, optionally only those whose id starts with
    /// `prefix` (at most `limit`, the server's maximum by default).
    pub async fn list_rooms(&self, prefix: Option<&str>, limit: Option<u32>) -> Result<Vec<RoomSummary>, Error> {
        match self.request(Op::ListRooms { prefix: prefix.map(str::to_owned), limit }).await? {
            Response::Rooms(rooms) => Ok(rooms),
            other => Err(unexpected(other)),
        }
    }

    /// Removes `peer` from a room this client owns.
    pub async fn kick(&self, room_id: &str, peer: Fingerprint) -> Result<(), Error> {
        self.expect_ok(Op::Kick { room_id: room_id.into(), peer }).await
    }

    /// Closes a room this client owns.
    pub async fn close_room(&self, room_id: &str) -> Result<(), Error> {
        self.expect_ok(Op::CloseRoom { room_id: room_id.into() }).await
    }

    /// Measures the round trip to the server.
    pub async fn ping(&self) -> Result<Duration, Error> {
        match self.request(Op::Ping).await? {
            Response::Pong { rtt } => Ok(rtt),
            other => Err(unexpected(other)),
        }
    }

    /// Asks the server for short-lived TURN credentials (see
    /// [`peerlink::Client::turn_credentials`]); a server without a TURN secret answers
    /// `turn_unavailable`. Hand them to a node with [`Node::add_turn_servers`].
    pub async fn turn_credentials(&self) -> Result<IssuedTurnCredentials, Error> {
        match self.request(Op::TurnCredentials).await? {
            Response::TurnCredentials(issued) => Ok(issued),
            other => Err(unexpected(other)),
        }
    }

    /// Ends the session cleanly: sends `bye` (peers see this client leave at once), closes the
    /// socket and ends the driver task. Pending requests fail; later commands fail with
    /// [`Error::Closed`]. Returns once the socket is closed (at once if already shut down).
    pub async fn disconnect(&self) {
        let (tx, rx) = async_channel::bounded(1);
        if self.shared.commands.send(Command::Disconnect(tx)).await.is_ok() {
            let _ = rx.recv().await;
        }
    }

    async fn expect_ok(&self, op: Op) -> Result<(), Error> {
        match self.request(op).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

/// Where the driver sends events: a [`Client`] sees signaling events only.
enum Sink {
    Client(Sender<ClientEvent>),
    Node(Sender<NodeEvent>),
}

impl Sink {
    fn is_closed(&self) -> bool {
        match self {
            Sink::Client(s) => s.is_closed(),
            Sink::Node(s) => s.is_closed(),
        }
    }

    async fn send(&self, event: NodeEvent) -> bool {
        match (self, event) {
            (Sink::Client(s), NodeEvent::Signaling(e)) => s.send(e).await.is_ok(),
            (Sink::Client(_), _) => true,
            (Sink::Node(s), e) => s.send(e).await.is_ok(),
        }
    }
}

/// The receiving end of the driver's events, before it is wrapped in a stream type.
enum EventRx {
    Client(Receiver<ClientEvent>),
    Node(Receiver<NodeEvent>),
}

impl EventRx {
    fn client(self) -> Receiver<ClientEvent> {
        match self {
            EventRx::Client(r) => r,
            EventRx::Node(_) => unreachable!("a client driver has a client sink"),
        }
    }

    fn node(self) -> Receiver<NodeEvent> {
        match self {
            EventRx::Node(r) => r,
            EventRx::Client(_) => unreachable!("a node driver has a node sink"),
        }
    }
}

/// Binds the UDP sockets, builds the core and spawns the driver; resolves once registered.
async fn start(config: NodeConfig, options: ConnectOptions, node: bool) -> Result<(Arc<Shared>, EventRx, Sender<Command>), Error> {
    let identity = match options.identity {
        Some(identity) => identity,
        None => {
            // Fail cleanly if the OS RNG is unavailable before relying on it.
            let mut probe = [0u8; 1];
            rand::rngs::OsRng.try_fill_bytes(&mut probe).map_err(|e| io::Error::other(e.to_string()))?;
            Identity::generate(&mut rand::rngs::OsRng.unwrap_err())
        }
    };
    let seed = match options.seed {
        Some(seed) => seed,
        None => rand::rngs::OsRng.try_next_u64().map_err(|e| io::Error::other(e.to_string()))?,
    };
    let tls = if config.client.url.get(..6).is_some_and(|s| s.eq_ignore_ascii_case("wss://")) {
        Some(tls_config(options.extra_root_certs)?)
    } else {
        None
    };
    let connect_timeout = config.client.connect_timeout;
    let fingerprint = identity.fingerprint();
    let now = Instant::now();
    let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let stun_hosts = config.stun_hosts();
    let turn_servers = config.turn_servers();
    let mut core = peerlink::Node::new(config, identity, seed, now, unix_ms)?;
    let mut udp = Vec::new();
    if node {
        for addr in bind_addrs(&options.udp)? {
            let socket = Async::<UdpSocket>::bind(addr)?;
            let buffers = socket2::SockRef::from(socket.get_ref());
            if let Err(e) = buffers.set_recv_buffer_size(UDP_SOCKET_BUFFER).and_then(|()| buffers.set_send_buffer_size(UDP_SOCKET_BUFFER)) {
                debug!(error = %e, "udp socket buffers not resized");
            }
            let local = socket.get_ref().local_addr()?;
            core.add_local_address(now, local)?;
            debug!(%local, "udp socket bound");
            udp.push((socket, local));
        }
        for (host, port) in stun_hosts {
            match smol::net::resolve((host.as_str(), port)).await {
                Ok(addrs) => {
                    for addr in addrs {
                        core.add_stun_server(now, addr)?;
                    }
                }
                Err(e) => tracing::warn!(%host, error = %e, "STUN server not resolved"),
            }
        }
        for turn in turn_servers {
            match smol::net::resolve((turn.host.as_str(), turn.port)).await {
                Ok(addrs) => {
                    for addr in addrs {
                        core.add_turn_server(now, addr, turn.credentials.clone())?;
                    }
                }
                Err(e) => tracing::warn!(host = %turn.host, error = %e, "TURN server not resolved"),
            }
        }
    }
    core.connect(now)?;

    let (cmd_tx, cmd_rx) = async_channel::unbounded();
    let (sink, rx) = if node {
        let (tx, rx) = async_channel::bounded(EVENT_CAPACITY);
        (Sink::Node(tx), EventRx::Node(rx))
    } else {
        let (tx, rx) = async_channel::bounded(EVENT_CAPACITY);
        (Sink::Client(tx), EventRx::Client(rx))
    };
    let (ready_tx, ready_rx) = async_channel::bounded(1);
    let shared = Arc::new(Shared { commands: cmd_tx.clone(), fingerprint });
    let driver = Driver {
        core,
        udp,
        buf: vec![0; 2048],
        tls,
        connect_timeout,
        ws: None,
        commands: cmd_rx,
        events: sink,
        pending: HashMap::new(),
        entering: HashMap::new(),
        ready: Some(ready_tx),
        first_error: None,
        last_socket_error: None,
        finished: false,
    };
    debug!(fingerprint = %fingerprint.short(), "spawning driver");
    smol::spawn(driver.run()).detach();
    match ready_rx.recv().await {
        Ok(Ok(())) => Ok((shared, rx, cmd_tx)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Closed),
    }
}

/// The addresses to bind UDP sockets on.
fn bind_addrs(bind: &UdpBind) -> Result<Vec<SocketAddr>, Error> {
    Ok(bind.addrs(|| if_addrs::get_if_addrs().map(|ifs| ifs.into_iter().map(|i| i.ip()).collect()))?)
}

/// A handle on a running [`peerlink::Node`]: the signaling client and direct connections to
/// peers over UDP. Cloning is cheap; all clones drive the same node. Events arrive on
/// [`NodeEvents`]; signaling commands (`join`, `relay`, rooms) go through [`Node::client`].
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("fingerprint", &self.shared.fingerprint.short()).finish()
    }
}

/// The stream of everything a [`Node`] reports. Same back-pressure as [`Events`].
#[derive(Debug)]
pub struct NodeEvents {
    rx: Pin<Box<Receiver<NodeEvent>>>,
    _alive: Sender<Command>,
}

impl NodeEvents {
    /// Waits for the next event; `None` once the driver task has ended.
    pub async fn next(&mut self) -> Option<NodeEvent> {
        self.rx.recv().await.ok()
    }

    /// Returns the next event if one is buffered, without waiting.
    pub fn try_next(&mut self) -> Option<NodeEvent> {
        self.rx.try_recv().ok()
    }
}

impl futures_lite::Stream for NodeEvents {
    type Item = NodeEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<NodeEvent>> {
        self.rx.as_mut().poll_next(cx)
    }
}

impl Node {
    /// Binds UDP sockets on every interface, connects to the signaling server and resolves
    /// once registered (see [`Client::connect`]).
    pub async fn connect(config: NodeConfig) -> Result<(Node, NodeEvents), Error> {
        Self::connect_with(config, ConnectOptions::default()).await
    }

    /// Like [`Node::connect`], with an identity, seed, extra TLS roots or UDP binding.
    pub async fn connect_with(config: NodeConfig, options: ConnectOptions) -> Result<(Node, NodeEvents), Error> {
        let (shared, rx, alive) = start(config, options, true).await?;
        Ok((Node { shared }, NodeEvents { rx: Box::pin(rx.node()), _alive: alive }))
    }

    /// Returns this node's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.shared.fingerprint
    }

    /// Returns a signaling handle on the same connection, for `join`, `relay`, rooms and the
    /// rest (their events arrive on [`NodeEvents`] as [`NodeEvent::Signaling`]).
    pub fn client(&self) -> Client {
        Client { shared: self.shared.clone() }
    }

    async fn call<T>(&self, make: impl FnOnce(Sender<Result<T, Error>>) -> Command) -> Result<T, Error> {
        let (tx, rx) = async_channel::bounded(1);
        self.shared.commands.send(make(tx)).await.map_err(|_| Error::Closed)?;
        rx.recv().await.map_err(|_| Error::Closed)?
    }

    /// Starts a direct connection to `peer` (see [`peerlink::Node::connect_to_peer`]);
    /// progress arrives as [`NodeEvent::PeerState`].
    pub async fn connect_to_peer(&self, peer: Fingerprint) -> Result<(), Error> {
        self.call(|done| Command::ConnectToPeer { peer, done }).await
    }

    /// Sends `value` as JSON on `channel` (the default channel when `None`). Fails with
    /// [`peerlink::SendError::WouldBlock`] when the send buffer is full: wait for
    /// [`NodeEvent::BufferedAmountLow`].
    pub async fn send<T: Serialize + ?Sized>(&self, peer: Fingerprint, channel: Option<&str>, value: &T) -> Result<(), Error> {
        let data = serde_json::to_vec(value).map_err(|e| Error::Node(peerlink::SendError::Serialize(e.to_string()).into()))?;
        let channel = channel.map(str::to_owned);
        self.call(|done| Command::Send { peer, channel, binary: false, data, done }).await
    }

    /// Sends a text message on `channel` (the default channel when `None`).
    pub async fn send_text(&self, peer: Fingerprint, channel: Option<&str>, text: &str) -> Result<(), Error> {
        let (channel, data) = (channel.map(str::to_owned), text.as_bytes().to_vec());
        self.call(|done| Command::Send { peer, channel, binary: false, data, done }).await
    }

    /// Sends a binary message on `channel` (the default channel when `None`).
    pub async fn send_binary(&self, peer: Fingerprint, channel: Option<&str>, data: &[u8]) -> Result<(), Error> {
        let (channel, data) = (channel.map(str::to_owned), data.to_vec());
        self.call(|done| Command::Send { peer, channel, binary: true, data, done }).await
    }

    /// Opens a named data channel to `peer`.
    pub async fn create_data_channel(&self, peer: Fingerprint, options: ChannelOptions) -> Result<(), Error> {
        self.call(|done| Command::CreateChannel { peer, options, done }).await
    }

    /// Restarts ICE with `peer`.
    pub async fn restart_ice(&self, peer: Fingerprint) -> Result<(), Error> {
        self.call(|done| Command::RestartIce { peer, done }).await
    }

    /// Closes the connection to `peer`.
    pub async fn close_peer(&self, peer: Fingerprint) -> Result<(), Error> {
        self.call(|done| Command::ClosePeer { peer, done }).await
    }

    /// Returns a view of the connection to `peer`.
    pub async fn get_peer(&self, peer: Fingerprint) -> Option<PeerView> {
        let (tx, rx) = async_channel::bounded(1);
        self.shared.commands.send(Command::GetPeer { peer, done: tx }).await.ok()?;
        rx.recv().await.ok().flatten()
    }

    /// Bytes written on `channel` to `peer` and not yet acknowledged.
    pub async fn buffered_amount(&self, peer: Fingerprint, channel: Option<&str>) -> Option<usize> {
        let (tx, rx) = async_channel::bounded(1);
        let channel = channel.map(str::to_owned);
        self.shared.commands.send(Command::BufferedAmount { peer, channel, done: tx }).await.ok()?;
        rx.recv().await.ok().flatten()
    }

    /// Closes every connection, leaves the signaling server and ends the driver.
    pub async fn close(&self) {
        self.client().disconnect().await;
    }

    /// Creates a managed room owned by this node (see [`peerlink::room`]) and resolves once
    /// the node is in it. The server's refusal (`room_exists`, ...) is
    /// `Error::Node(NodeError::Room(RoomError::Request(..)))`.
    pub async fn create_room(&self, room: &str, options: RoomOptions) -> Result<Room, Error> {
        self.room(room).op(RoomOp::Create { options }).await?;
        Ok(self.room(room))
    }

    /// Joins a managed room, resolves once in it, and connects to every member (progress
    /// as [`RoomEvent::PathChanged`]). `room_full`, `room_not_found`: as for
    /// [`Node::create_room`].
    pub async fn join_room(&self, room: &str) -> Result<Room, Error> {
        self.join_room_with(room, peerlink::JoinOptions::default()).await
    }

    /// Joins a managed room with options, as [`Node::join_room`] does (an end-to-end
    /// encrypted room: [`peerlink::JoinOptions::encrypted`]; messages to a member wait for
    /// [`peerlink::EncryptionEvent::Ready`]).
    pub async fn join_room_with(&self, room: &str, options: peerlink::JoinOptions) -> Result<Room, Error> {
        self.room(room).op(RoomOp::Join { options }).await?;
        Ok(self.room(room))
    }

    /// A handle on the room `id` (no I/O; commands fail with
    /// [`peerlink::RoomError::NotJoined`] unless this node is in it).
    pub fn room(&self, id: &str) -> Room {
        Room { node: self.clone(), id: id.to_owned() }
    }

    /// Lists rooms that have space (see [`Client::list_rooms`]).
    pub async fn list_rooms(&self, prefix: Option<&str>, limit: Option<u32>) -> Result<Vec<RoomSummary>, Error> {
        self.client().list_rooms(prefix, limit).await
    }

    /// Asks the signaling server for short-lived TURN credentials (see
    /// [`Client::turn_credentials`]); pass `issued.ice_server()` to [`Node::add_turn_servers`].
    pub async fn turn_credentials(&self) -> Result<IssuedTurnCredentials, Error> {
        self.client().turn_credentials().await
    }

    /// Resolves the `turn:` URLs of `server` and adds each address with its credentials
    /// ([`peerlink::Node::add_turn_server`]): allocations start from every local socket.
    /// Returns how many addresses were added; a host that does not resolve is an
    /// [`Error::Io`].
    pub async fn add_turn_servers(&self, server: &IceServer) -> Result<usize, Error> {
        let mut resolved = Vec::new();
        for turn in server.turn_servers() {
            for addr in smol::net::resolve((turn.host.as_str(), turn.port)).await? {
                resolved.push((addr, turn.credentials.clone()));
            }
        }
        let n = resolved.len();
        self.core_call(move |node, now| resolved.into_iter().try_for_each(|(addr, credentials)| node.add_turn_server(now, addr, credentials))).await?;
        Ok(n)
    }
}

/// Shared state over rooms (see [`peerlink::sync`]): changes, conflicts and document
/// updates arrive on [`NodeEvents`] as [`NodeEvent::Sync`].
impl Node {
    /// Runs `f` on the core node on the driver (a read, or any command) and returns its
    /// result; what it sends goes out right after.
    pub async fn with_core<T: Send + 'static>(&self, f: impl FnOnce(&mut peerlink::Node, Instant) -> Result<T, NodeError> + Send + 'static) -> Result<T, Error> {
        self.core_call(f).await
    }

    /// Starts key-value sync in `room`.
    pub async fn sync_state(&self, room: &str, config: peerlink::sync::StateConfig) -> Result<(), Error> {
        let room = room.to_owned();
        self.core_call(move |node, now| node.sync_state(now, &room, config)).await
    }

    /// Sets `key` in `room`'s state.
    pub async fn state_set<T: Serialize + ?Sized>(&self, room: &str, key: &str, value: &T) -> Result<(), Error> {
        let value = serde_json::to_value(value).map_err(|e| Error::Node(NodeError::Sync(peerlink::sync::SyncError::Serialize(e.to_string()))))?;
        let (room, key) = (room.to_owned(), key.to_owned());
        self.core_call(move |node, now| node.state_set(now, &room, &key, &value)).await
    }

    /// Deletes `key` from `room`'s state; returns whether it was there.
    pub async fn state_delete(&self, room: &str, key: &str) -> Result<bool, Error> {
        let (room, key) = (room.to_owned(), key.to_owned());
        self.core_call(move |node, now| node.state_delete(now, &room, &key)).await
    }

    /// Returns the value of `key` in `room`'s state (`None`: absent, deleted, or not synced).
    pub async fn state_get(&self, room: &str, key: &str) -> Result<Option<serde_json::Value>, Error> {
        let (room, key) = (room.to_owned(), key.to_owned());
        self.core_call(move |node, _| Ok(node.state(&room).and_then(|s| s.get(&key).cloned()))).await
    }

    /// Returns every live entry of `room`'s state (the reference's `getAll`).
    pub async fn state_all(&self, room: &str) -> Result<std::collections::BTreeMap<String, serde_json::Value>, Error> {
        let room = room.to_owned();
        self.core_call(move |node, _| Ok(node.state(&room).map(|s| s.get_all().into_iter().map(|(k, v)| (k.to_owned(), v.clone())).collect()).unwrap_or_default())).await
    }

    /// Starts document sync in `room`.
    pub async fn sync_crdt(&self, room: &str, config: peerlink::sync::CrdtConfig) -> Result<(), Error> {
        let room = room.to_owned();
        self.core_call(move |node, now| node.sync_crdt(now, &room, config)).await
    }

    /// Opens document `doc` of `room` and runs `edit` on it on the driver (reads too); the
    /// changes go out at once.
    pub async fn crdt_edit<R: Send + 'static>(&self, room: &str, doc: &str, edit: impl FnOnce(&peerlink::yrs::Doc) -> R + Send + 'static) -> Result<R, Error> {
        let (room, doc) = (room.to_owned(), doc.to_owned());
        self.core_call(move |node, now| node.crdt_edit(now, &room, &doc, edit)).await
    }

    /// Sets this node's awareness state for document `doc` of `room` (`None` clears it).
    pub async fn set_awareness(&self, room: &str, doc: &str, state: Option<serde_json::Value>) -> Result<(), Error> {
        let (room, doc) = (room.to_owned(), doc.to_owned());
        self.core_call(move |node, now| node.set_awareness(now, &room, &doc, state)).await
    }
}

/// File, JSON and image transfers (see [`peerlink::transfer`]); progress and outcomes arrive
/// on [`NodeEvents`] as [`NodeEvent::Transfer`]. Files are read and written on the driver, one
/// chunk (16 KiB) at a time by position, only as the channel takes them.
impl Node {
    /// Runs `f` on the core node on the driver and returns its result.
    async fn core_call<T: Send + 'static>(&self, f: impl FnOnce(&mut peerlink::Node, Instant) -> Result<T, NodeError> + Send + 'static) -> Result<T, Error> {
        self.call(|done| Command::Core(CoreCall(Box::new(move |node, now| {
            let _ = done.try_send(f(node, now).map_err(Error::from));
        }))))
        .await
    }

    /// Offers the file at `path` to `peer`: it is hashed first (streaming, off the
    /// executor), images get their MIME type from their first bytes. Returns the transfer id.
    pub async fn send_file(&self, peer: Fingerprint, path: impl Into<std::path::PathBuf>) -> Result<u64, Error> {
        let path = path.into();
        let (info, source) = smol::unblock(move || peerlink_blocking::files::describe_file(&path)).await?;
        self.send_from(peer, info, source).await
    }

    /// Offers `info` to `peer`, its bytes read from `source` as the channel takes them.
    /// `info.sha256` must be the hash of all of them: the receiver checks it.
    pub async fn send_from(&self, peer: Fingerprint, info: FileInfo, source: impl ChunkSource + 'static) -> Result<u64, Error> {
        let source: Box<dyn ChunkSource> = Box::new(source);
        self.core_call(move |node, now| node.send_from(now, peer, info, source)).await
    }

    /// Offers bytes from memory as a file named `name` (an image, recognised by its first
    /// bytes, is offered as one: the reference's `ImageTransfer`).
    pub async fn send_bytes(&self, peer: Fingerprint, name: &str, data: Vec<u8>) -> Result<u64, Error> {
        let name = name.to_owned();
        self.core_call(move |node, now| node.send_bytes(now, peer, &name, data)).await
    }

    /// Sends a JSON value, chunked (the reference's `JSONTransfer`); it arrives as
    /// [`TransferEvent::Json`](peerlink::transfer::TransferEvent::Json).
    pub async fn send_json<T: Serialize + ?Sized>(&self, peer: Fingerprint, value: &T) -> Result<u64, Error> {
        let value = serde_json::value::to_raw_value(value).map_err(|e| Error::Node(NodeError::Transfer(TransferError::BadJson(e.to_string()))))?;
        self.core_call(move |node, now| node.send_json(now, peer, &value)).await
    }

    /// Accepts an offered transfer into the file at `path`: written as `PATH.part`, renamed
    /// once verified, removed on failure or cancellation.
    pub async fn accept_to_file(&self, peer: Fingerprint, id: u64, path: impl AsRef<std::path::Path>) -> Result<(), Error> {
        let sink = peerlink_blocking::files::PartFileSink::create(path.as_ref())?;
        self.accept_into(peer, id, sink).await
    }

    /// Accepts an offered transfer into memory; it arrives whole as
    /// [`TransferEvent::Received`](peerlink::transfer::TransferEvent::Received).
    pub async fn accept_to_memory(&self, peer: Fingerprint, id: u64) -> Result<(), Error> {
        self.core_call(move |node, now| node.accept_to_memory(now, peer, id)).await
    }

    /// Accepts an offered transfer into the application's own sink: chunks are written in
    /// order, each checked; the whole is verified before it is committed.
    pub async fn accept_into(&self, peer: Fingerprint, id: u64, sink: impl ChunkSink + 'static) -> Result<(), Error> {
        let sink: Box<dyn ChunkSink> = Box::new(sink);
        self.core_call(move |node, now| node.accept_into(now, peer, id, sink)).await
    }

    /// Declines an offered transfer.
    pub async fn reject_transfer(&self, peer: Fingerprint, id: u64, reason: &str) -> Result<(), Error> {
        let reason = reason.to_owned();
        self.core_call(move |node, now| node.reject_transfer(now, peer, id, &reason)).await
    }

    /// Stops a transfer in either direction (a partial file is removed).
    pub async fn cancel_transfer(&self, peer: Fingerprint, id: u64, reason: &str) -> Result<(), Error> {
        let reason = reason.to_owned();
        self.core_call(move |node, now| node.cancel_transfer(now, peer, id, &reason)).await
    }
}

/// Audio and video tracks on a connection (see [`peerlink::media`]): encoded frames in and
/// out. What happens (tracks negotiated, frames received, mutes, keyframe requests) arrives on
/// [`NodeEvents`] as [`NodeEvent::Media`].
impl Node {
    /// Adds an audio or video track to the connection to `peer`: a renegotiation, after
    /// which [`peerlink::MediaEvent::TrackAdded`] (with `local: true`) says frames may be
    /// written. Returns its id.
    pub async fn add_track(&self, peer: Fingerprint, options: TrackOptions) -> Result<TrackId, Error> {
        self.core_call(move |node, now| node.add_track(now, peer, options)).await
    }

    /// Mutes (`true`) or unmutes one of this node's tracks on the connection to `peer`: the
    /// remote sees [`peerlink::MediaEvent::Muted`]; frames written while muted are dropped.
    pub async fn set_track_muted(&self, peer: Fingerprint, track: &TrackId, muted: bool) -> Result<(), Error> {
        let track = track.clone();
        self.core_call(move |node, now| node.set_track_muted(now, peer, &track, muted)).await
    }

    /// Removes one of this node's tracks (the remote sees
    /// [`peerlink::MediaEvent::TrackRemoved`]).
    pub async fn remove_track(&self, peer: Fingerprint, track: &TrackId) -> Result<(), Error> {
        let track = track.clone();
        self.core_call(move |node, now| node.remove_track(now, peer, &track)).await
    }

    /// Sends an encoded frame on one of this node's tracks. Returns whether it went: `false`
    /// while the track is muted or not negotiated yet, or the connection is not up.
    pub async fn write_frame(&self, peer: Fingerprint, track: &TrackId, frame: MediaFrame) -> Result<bool, Error> {
        let track = track.clone();
        self.core_call(move |node, now| node.write_frame(now, peer, &track, frame)).await
    }

    /// Asks `peer` for a keyframe on one of its tracks (after a loss: a
    /// [`ReceivedFrame`](peerlink::ReceivedFrame) that is not `contiguous`); the sender sees
    /// [`peerlink::MediaEvent::KeyframeRequested`].
    pub async fn request_keyframe(&self, peer: Fingerprint, track: &TrackId) -> Result<(), Error> {
        let track = track.clone();
        self.core_call(move |node, now| node.request_keyframe(now, peer, &track)).await
    }
}

/// A call on the core node, run on the driver.
type CallOnNode = dyn FnOnce(&mut peerlink::Node, Instant) + Send;

/// A [`CallOnNode`] in a command.
struct CoreCall(Box<CallOnNode>);

impl std::fmt::Debug for CoreCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CoreCall")
    }
}

/// A handle on a managed room of a [`Node`] (the reference's `DirectRoom` / `GroupRoom`).
/// Cheap to clone. Its events arrive on [`NodeEvents`] as [`NodeEvent::Room`].
#[derive(Clone, Debug)]
pub struct Room {
    node: Node,
    id: String,
}

impl Room {
    /// The room id.
    pub fn id(&self) -> &str {
        &self.id
    }

    async fn op(&self, op: RoomOp) -> Result<(), Error> {
        let room = self.id.clone();
        self.node.call(|done| Command::Room { room, op, done }).await
    }

    /// Sends `value` as JSON to every member: directly where the connection is up, through
    /// the server otherwise; once and in order either way. Fails with
    /// [`peerlink::RoomError::WouldBlock`] when a member is too far behind: wait for
    /// [`RoomEvent::Writable`].
    pub async fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        self.send_data(None, json(value)?).await
    }

    /// Sends `value` as JSON to one member.
    pub async fn send_to<T: Serialize + ?Sized>(&self, peer: Fingerprint, value: &T) -> Result<(), Error> {
        self.send_data(Some(peer), json(value)?).await
    }

    /// Sends text, bytes or JSON to every member (`to: None`) or to one.
    pub async fn send_data(&self, to: Option<Fingerprint>, data: RoomData) -> Result<(), Error> {
        self.op(RoomOp::Send { to, data, via_server: false }).await
    }

    /// Sends `value` as JSON to every member through the signaling server even where a
    /// direct path is up.
    pub async fn broadcast_via_server<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        self.op(RoomOp::Send { to: None, data: json(value)?, via_server: true }).await
    }

    /// Removes `peer` (owner only: [`peerlink::RoomError::NotOwner`] otherwise).
    pub async fn kick(&self, peer: Fingerprint) -> Result<(), Error> {
        self.op(RoomOp::Kick { peer }).await
    }

    /// Sets this node's presence state (`None` clears it); see
    /// [`peerlink::Node::set_presence`].
    pub async fn set_presence(&self, state: Option<&serde_json::Value>) -> Result<(), Error> {
        self.op(RoomOp::Presence { state: state.cloned() }).await
    }

    /// The room as this node sees it (members, paths, presence); `None` when not in it.
    pub async fn info(&self) -> Option<RoomView> {
        let (tx, rx) = async_channel::bounded(1);
        self.node.shared.commands.send(Command::RoomView { room: self.id.clone(), done: tx }).await.ok()?;
        rx.recv().await.ok().flatten()
    }

    /// Leaves the room (the owner closes it for everyone).
    pub async fn leave(&self) -> Result<(), Error> {
        self.op(RoomOp::Leave).await
    }

    /// Runs `f` on the core node on the driver with this room's id.
    async fn core_call<T: Send + 'static>(&self, f: impl FnOnce(&mut peerlink::Node, Instant, &str) -> Result<T, NodeError> + Send + 'static) -> Result<T, Error> {
        let room = self.id.clone();
        self.node.core_call(move |node, now| f(node, now, &room)).await
    }
}

/// Calls (see [`peerlink::room::call`]): this node's audio, video and screen go to every
/// member. What happens arrives on [`NodeEvents`] as [`NodeEvent::Call`] (members' streams)
/// and [`NodeEvent::Media`] (their frames, mutes, keyframe requests).
impl Room {
    /// Starts a call in the room: `config`'s sources go to every member, now and later
    /// ([`peerlink::CallEvent::LocalStream`]; each member's media arrives as
    /// [`peerlink::CallEvent::RemoteStream`]). Starting again changes what is sent.
    pub async fn start_call(&self, config: CallConfig) -> Result<(), Error> {
        self.core_call(move |node, now, room| node.start_call(now, room, config)).await
    }

    /// Mutes (`true`) or unmutes one source of the call for every member.
    pub async fn set_call_muted(&self, source: Source, muted: bool) -> Result<(), Error> {
        self.core_call(move |node, now, room| node.set_call_muted(now, room, source, muted)).await
    }

    /// Starts (`true`) or stops sharing a screen in the call: one more video track,
    /// [`Source::Screen`].
    pub async fn set_screen_share(&self, on: bool) -> Result<(), Error> {
        self.core_call(move |node, now, room| node.set_screen_share(now, room, on)).await
    }

    /// Sends an encoded frame of `source` to every member of the call (encoded once).
    /// Returns to how many it went (members whose connection is up and whose track is
    /// negotiated and not muted).
    pub async fn send_call_frame(&self, source: Source, frame: MediaFrame) -> Result<usize, Error> {
        self.core_call(move |node, now, room| node.send_call_frame(now, room, source, frame)).await
    }

    /// Ends the call (its tracks are removed from every member's connection); the room
    /// stays. Leaving the room ends it too.
    pub async fn end_call(&self) -> Result<(), Error> {
        self.core_call(move |node, now, room| node.end_call(now, room)).await
    }
}

fn json<T: Serialize + ?Sized>(value: &T) -> Result<RoomData, Error> {
    RoomData::json(value).map_err(|e| Error::Node(peerlink::RoomError::Serialize(e.to_string()).into()))
}

fn unexpected(response: Response) -> Error {
    Error::WebSocket(format!("unexpected reply {response:?}"))
}

fn to_raw<T: Serialize + ?Sized>(value: &T) -> Result<Box<RawValue>, Error> {
    serde_json::value::to_raw_value(value).map_err(|e| Error::Client(ClientError::InvalidInput(e.to_string())))
}

/// The core's name rule, checked here so a fire-and-forget broadcast fails synchronously.
fn check_name(name: &str) -> Result<(), Error> {
    if !peerlink::protocol::is_valid_name(name) {
        return Err(Error::Client(ClientError::InvalidInput(format!(
            "names must be 1 to {} bytes without control characters",
            peerlink::protocol::MAX_NAME_LEN
        ))));
    }
    Ok(())
}

fn tls_config(extra: Vec<CertificateDer<'static>>) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        roots.add(cert).map_err(|e| Error::WebSocket(format!("invalid root certificate: {e}")))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::WebSocket(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A byte stream the WebSocket runs over: plain TCP or TLS.
trait Transport: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for T {}

type Ws = WebSocketStream<Box<dyn Transport>>;

fn ws_error(e: tungstenite::Error) -> Error {
    match e {
        tungstenite::Error::Io(e) => Error::Io(e),
        e => Error::WebSocket(e.to_string()),
    }
}

/// Opens TCP (with `TCP_NODELAY`), TLS for `wss://`, then the WebSocket handshake.
async fn open(url: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Ws, Error> {
    let uri: tungstenite::http::Uri = url.parse().map_err(|e| Error::WebSocket(format!("bad url `{url}`: {e}")))?;
    let secure = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("wss") => true,
        Some(s) if s.eq_ignore_ascii_case("ws") => false,
        _ => return Err(Error::WebSocket(format!("url `{url}` is not ws:// or wss://"))),
    };
    let host = uri.host().ok_or_else(|| Error::WebSocket(format!("url `{url}` has no host")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = smol::net::TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let stream: Box<dyn Transport> = if secure {
        let config = tls.ok_or_else(|| Error::WebSocket("no TLS configuration".into()))?;
        let name = ServerName::try_from(host.clone()).map_err(|e| Error::WebSocket(format!("bad server name: {e}")))?;
        let tls = futures_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    // tungstenite zero-fills its whole read buffer before every read; its 128 KiB default
    // costs more per frame than the frame does (signaling frames are small).
    let config = tungstenite::protocol::WebSocketConfig::default().read_buffer_size(8 * 1024);
    let (ws, _response) = async_tungstenite::client_async_with_config(url, stream, Some(config)).await.map_err(ws_error)?;
    Ok(ws)
}

/// What woke the driver.
enum Wake {
    Frame(Option<Result<Message, tungstenite::Error>>),
    Command(Option<Command>),
    Timer,
    Udp,
}

/// The task that owns the core client and the socket.
struct Driver {
    core: peerlink::Node,
    /// UDP sockets and their local addresses.
    udp: Vec<(Async<UdpSocket>, SocketAddr)>,
    buf: Vec<u8>,
    tls: Option<Arc<rustls::ClientConfig>>,
    connect_timeout: Duration,
    ws: Option<Ws>,
    commands: Receiver<Command>,
    events: Sink,
    pending: HashMap<RequestId, Reply>,
    /// `create_room` / `join_room` calls waiting for the room to say `Joined`.
    entering: HashMap<String, Done<()>>,
    /// Resolves `connect` once registered (or failed).
    ready: Option<Sender<Result<(), Error>>>,
    /// The first core error before registration.
    first_error: Option<ClientError>,
    /// The most recent socket failure.
    last_socket_error: Option<Error>,
    /// The core stopped for good; the driver exits.
    finished: bool,
}

impl Driver {
    async fn run(mut self) {
        debug!("driver started");
        loop {
            self.drain_transmits().await;
            self.drain_events().await;
            if self.finished {
                break;
            }
            let deadline = self.core.poll_timeout();
            let wake = {
                let ws = &mut self.ws;
                let commands = &self.commands;
                let udp = &self.udp;
                let datagram = async {
                    if udp.is_empty() {
                        return std::future::pending().await;
                    }
                    std::future::poll_fn(|cx| {
                        for (socket, _) in udp {
                            if socket.poll_readable(cx).is_ready() {
                                return Poll::Ready(Wake::Udp);
                            }
                        }
                        Poll::Pending
                    })
                    .await
                };
                let frame = async {
                    match ws {
                        Some(ws) => Wake::Frame(ws.next().await),
                        None => std::future::pending().await,
                    }
                };
                let command = async { Wake::Command(commands.recv().await.ok()) };
                let timer = async {
                    match deadline {
                        Some(at) => {
                            Timer::at(at).await;
                            Wake::Timer
                        }
                        None => std::future::pending().await,
                    }
                };
                frame.race(datagram).race(command).race(timer).await
            };
            match wake {
                Wake::Frame(frame) => self.on_frame(frame),
                Wake::Command(Some(command)) => self.on_command(command).await,
                Wake::Command(None) => {
                    debug!("all handles and the event stream dropped: disconnecting");
                    self.shutdown().await;
                    break;
                }
                Wake::Timer => check(self.core.handle_timeout(Instant::now())),
                Wake::Udp => self.read_datagrams(),
            }
        }
        // Whoever still waits for a reply learns that the driver is gone.
        self.pending.clear();
        debug!("driver ended");
    }

    async fn drain_transmits(&mut self) {
        while let Some(transmit) = self.core.poll_transmit() {
            let transmit = match transmit {
                NodeTransmit::Signaling(t) => t,
                NodeTransmit::Datagram(d) => {
                    self.send_datagram(d);
                    continue;
                }
            };
            match transmit {
                peerlink::ClientTransmit::Connect { url } => {
                    self.ws = None;
                    debug!(%url, "connecting");
                    let timeout = self.connect_timeout;
                    let attempt = open(&url, self.tls.as_ref()).or(async {
                        Timer::after(timeout).await;
                        Err(Error::Io(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))
                    });
                    match attempt.await {
                        Ok(ws) => {
                            debug!("socket open");
                            self.ws = Some(ws);
                            check(self.core.handle_connected(Instant::now()));
                        }
                        Err(e) => {
                            debug!(error = %e, "connect failed");
                            self.last_socket_error = Some(e);
                            check(self.core.handle_disconnected(Instant::now(), None));
                        }
                    }
                }
                peerlink::ClientTransmit::Text(text) => {
                    let Some(ws) = self.ws.as_mut() else {
                        debug!("no socket: frame dropped");
                        continue;
                    };
                    if let Err(e) = ws.send(Message::text(text)).await {
                        debug!(error = %e, "send failed");
                        self.ws = None;
                        self.last_socket_error = Some(ws_error(e));
                        check(self.core.handle_disconnected(Instant::now(), None));
                    }
                }
                peerlink::ClientTransmit::Close { code } => {
                    if let Some(mut ws) = self.ws.take() {
                        debug!(code, "closing socket");
                        let frame = CloseFrame { code: code.into(), reason: "".into() };
                        let _ = ws
                            .close(Some(frame))
                            .or(async {
                                Timer::after(CLOSE_TIMEOUT).await;
                                Ok(())
                            })
                            .await;
                    }
                }
            }
        }
    }

    /// Reads what the UDP sockets hold (up to [`DATAGRAMS_PER_WAKE`]) into the core.
    fn read_datagrams(&mut self) {
        let now = Instant::now();
        let mut budget = DATAGRAMS_PER_WAKE;
        for (socket, local) in &self.udp {
            while budget > 0 {
                match socket.get_ref().recv_from(&mut self.buf) {
                    Ok((n, source)) => {
                        budget -= 1;
                        check(self.core.handle_datagram(now, source, *local, &self.buf[..n]));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::trace!(%local, error = %e, "udp recv");
                        break;
                    }
                }
            }
        }
    }

    /// Sends a datagram from the socket bound to its source (dropped, as UDP may, if the
    /// socket's buffer is full).
    fn send_datagram(&self, d: Datagram) {
        let Some((socket, _)) = self.udp.iter().find(|(_, local)| *local == d.source) else {
            debug!(source = %d.source, "no socket for a datagram's source");
            return;
        };
        if let Err(e) = socket.get_ref().send_to(&d.contents, d.destination) {
            tracing::trace!(destination = %d.destination, error = %e, "udp send");
        }
    }

    async fn drain_events(&mut self) {
        while let Some(event) = self.core.poll_event() {
            if let NodeEvent::TurnCredentials(Ok(issued)) = &event {
                // `turn_from_server`: the servers of the issued credentials are added here.
                for turn in issued.ice_server().turn_servers() {
                    match smol::net::resolve((turn.host.as_str(), turn.port)).await {
                        Ok(addrs) => {
                            for addr in addrs {
                                if let Err(e) = self.core.add_turn_server(Instant::now(), addr, turn.credentials.clone()) {
                                    tracing::warn!(%addr, error = %e, "TURN server not added");
                                }
                            }
                        }
                        Err(e) => tracing::warn!(host = %turn.host, error = %e, "TURN server not resolved"),
                    }
                }
            }
            match &event {
                NodeEvent::Room(RoomEvent::Joined { room, .. }) => {
                    if let Some(done) = self.entering.remove(room) {
                        let _ = done.try_send(Ok(()));
                    }
                }
                NodeEvent::Room(RoomEvent::Error { room, error }) => {
                    if let Some(done) = self.entering.remove(room) {
                        let _ = done.try_send(Err(Error::Node(NodeError::Room(error.clone()))));
                    }
                }
                _ => {}
            }
            let NodeEvent::Signaling(signal) = &event else {
                if !self.events.is_closed() && !self.events.send(event).await {
                    debug!("event stream dropped: events are no longer forwarded");
                }
                continue;
            };
            match signal {
                ClientEvent::Response { request, result } => {
                    if let Some(reply) = self.pending.remove(request) {
                        let _ = reply.try_send(result.clone().map_err(Error::Request));
                    }
                }
                ClientEvent::Registered { .. } => {
                    if let Some(ready) = self.ready.take() {
                        let _ = ready.try_send(Ok(()));
                    }
                }
                ClientEvent::Error(e) if self.ready.is_some() && self.first_error.is_none() => {
                    self.first_error = Some(e.clone());
                }
                ClientEvent::Disconnected { code, will_reconnect } => {
                    if let Some(ready) = self.ready.take() {
                        // The first attempt failed: `connect` reports it and nobody holds a handle.
                        let error = match (self.first_error.take(), self.last_socket_error.take()) {
                            (Some(e), _) => Error::Client(e),
                            (None, Some(e)) => e,
                            (None, None) => Error::WebSocket(match code {
                                Some(code) => format!("closed by the server before registration (code {code})"),
                                None => "closed before registration".into(),
                            }),
                        };
                        let _ = ready.try_send(Err(error));
                        self.shutdown().await;
                        self.finished = true;
                        return;
                    }
                    if !will_reconnect {
                        self.finished = true;
                    }
                }
                _ => {}
            }
            if !self.events.is_closed() && !self.events.send(event).await {
                debug!("event stream dropped: events are no longer forwarded");
            }
        }
    }

    fn on_frame(&mut self, frame: Option<Result<Message, tungstenite::Error>>) {
        let now = Instant::now();
        match frame {
            Some(Ok(Message::Text(text))) => check(self.core.handle_text(now, text.as_str())),
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|f| u16::from(f.code));
                debug!(?code, "server closed the socket");
                self.ws = None;
                check(self.core.handle_disconnected(now, code));
            }
            Some(Ok(Message::Binary(_))) => debug!("binary frame ignored"),
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                debug!(error = %e, "socket failed");
                self.ws = None;
                self.last_socket_error = Some(ws_error(e));
                check(self.core.handle_disconnected(now, None));
            }
            None => {
                debug!("socket ended");
                self.ws = None;
                self.last_socket_error = Some(Error::Io(io::ErrorKind::UnexpectedEof.into()));
                check(self.core.handle_disconnected(now, None));
            }
        }
    }

    async fn on_command(&mut self, command: Command) {
        let now = Instant::now();
        let node = &mut self.core;
        match command {
            Command::Core(CoreCall(call)) => call(node, now),
            Command::ConnectToPeer { peer, done } => {
                let _ = done.try_send(node.connect_to_peer(now, peer).map_err(Error::from));
            }
            Command::Send { peer, channel, binary, data, done } => {
                let result = if binary {
                    node.send_binary(now, peer, channel.as_deref(), &data)
                } else {
                    match std::str::from_utf8(&data) {
                        Ok(text) => node.send_text(now, peer, channel.as_deref(), text),
                        Err(e) => Err(NodeError::Send(peerlink::SendError::Serialize(e.to_string()))),
                    }
                };
                let _ = done.try_send(result.map_err(Error::from));
            }
            Command::CreateChannel { peer, options, done } => {
                let _ = done.try_send(node.create_data_channel(now, peer, options).map_err(Error::from));
            }
            Command::RestartIce { peer, done } => {
                let _ = done.try_send(node.restart_ice(now, peer).map_err(Error::from));
            }
            Command::ClosePeer { peer, done } => {
                let _ = done.try_send(node.close_peer(now, peer).map_err(Error::from));
            }
            Command::GetPeer { peer, done } => {
                let _ = done.try_send(node.get_peer(&peer));
            }
            Command::BufferedAmount { peer, channel, done } => {
                let _ = done.try_send(node.buffered_amount(&peer, channel.as_deref()));
            }
            Command::RoomView { room, done } => {
                let _ = done.try_send(node.room(&room));
            }
            Command::Room { room, op, done } => {
                let entering = matches!(op, RoomOp::Create { .. } | RoomOp::Join { .. });
                let result = match op {
                    RoomOp::Create { options } => node.create_room(now, &room, options),
                    RoomOp::Join { options } => node.join_room_with(now, &room, options),
                    RoomOp::Send { to, data, via_server: false } => node.room_send(now, &room, to, data),
                    RoomOp::Send { data, via_server: true, .. } => node.room_broadcast_via_server(now, &room, data),
                    RoomOp::Kick { peer } => node.kick(now, &room, peer),
                    RoomOp::Presence { state } => node.set_presence(now, &room, state.as_ref()),
                    RoomOp::Leave => node.leave_room(now, &room),
                };
                match result {
                    // Answered when the room says `Joined` (or refuses): see `drain_events`.
                    Ok(()) if entering => {
                        self.entering.insert(room, done);
                    }
                    result => {
                        let _ = done.try_send(result.map_err(Error::from));
                    }
                }
            }
            Command::Request(op, reply) => {
                let core = node.client_mut();
                let result = match &op {
                    Op::Join { namespace, app_type, app_version } => {
                        core.join(now, namespace, app_type.as_deref(), app_version.as_deref())
                    }
                    Op::Leave { namespace } => core.leave(now, namespace),
                    Op::Discover { namespace, limit } => core.discover(now, namespace, *limit),
                    Op::Match { namespace, criteria, group_size } => {
                        core.match_peers(now, namespace, criteria.as_ref(), *group_size)
                    }
                    Op::CreateRoom { room_id, max_size, metadata } => {
                        core.create_room(now, room_id, *max_size, metadata.as_ref())
                    }
                    Op::JoinRoom { room_id } => core.join_room(now, room_id),
                    Op::LeaveRoom { room_id } => core.leave_room(now, room_id),
                    Op::RoomInfo { room_id } => core.room_info(now, room_id),
                    Op::Kick { room_id, peer } => core.kick(now, room_id, *peer),
                    Op::CloseRoom { room_id } => core.close_room(now, room_id),
                    Op::ListRooms { prefix, limit } => core.list_rooms(now, prefix.as_deref(), *limit),
                    Op::Ping => core.ping(now),
                    Op::TurnCredentials => core.turn_credentials(now),
                };
                match result {
                    Ok(id) => {
                        debug!(?op, ?id, "request sent");
                        self.pending.insert(id, reply);
                    }
                    Err(e) => {
                        debug!(?op, error = %e, "request refused");
                        let _ = reply.try_send(Err(Error::Client(e)));
                    }
                }
            }
            Command::Relay { to, payload } => {
                if let Err(e) = node.client_mut().relay(to, &*payload) {
                    self.refused(e).await;
                }
            }
            Command::Broadcast { namespace, payload } => {
                if let Err(e) = node.client_mut().broadcast(&namespace, &*payload) {
                    self.refused(e).await;
                }
            }
            Command::Disconnect(done) => {
                debug!("disconnect requested");
                self.shutdown().await;
                let _ = done.try_send(());
                self.finished = true;
            }
        }
    }

    /// A fire-and-forget command the core refused: report it on the event stream.
    async fn refused(&mut self, error: ClientError) {
        debug!(%error, "command refused");
        if !self.events.is_closed() {
            let _ = self.events.send(NodeEvent::Signaling(ClientEvent::Error(error))).await;
        }
    }

    /// Says `bye`, closes the socket and fails pending requests.
    async fn shutdown(&mut self) {
        check(self.core.close(Instant::now()));
        self.drain_transmits().await;
        self.ws = None;
    }
}

fn check<E: std::fmt::Display>(result: Result<(), E>) {
    if let Err(e) = result {
        // Only `NotDrained`, which cannot happen: the driver drains after every input.
        debug!(error = %e, "core refused input");
    }
}
