//! [`Node`]: one local participant. It owns the signaling [`Client`] and a direct connection
//! ([`peer`](crate::peer)) to every peer it talks to, and drains them all, in the shape of
//! str0m's `Rtc` and firezone's `Node`.
//!
//! Inputs: WebSocket texts and socket events for the signaling client
//! ([`Node::handle_text`], [`Node::handle_connected`], [`Node::handle_disconnected`]),
//! datagrams with their source and local destination ([`Node::handle_datagram`]), and time
//! ([`Node::handle_timeout`]). Outputs, drained after every input until `None`:
//! [`Node::poll_transmit`] (texts for the WebSocket, datagrams for the UDP sockets),
//! [`Node::poll_event`], and [`Node::poll_timeout`].
//!
//! Negotiation messages between peers travel inside the signaling server's `relay`; the node
//! consumes them, and hands every other relay to the application as
//! [`ClientEvent::Relay`].
//!
//! # Bounds
//!
//! At most [`NodeConfig::max_peers`] connections (more incoming offers are refused with
//! `busy`, more `connect_to_peer` calls fail with [`NodeError::TooManyPeers`]); at most
//! [`MAX_PENDING_OUTPUTS`] undrained events and transmits (then `handle_*` returns
//! [`NodeError::NotDrained`]); sends are never queued beyond str0m's buffered amount
//! ([`SendError::WouldBlock`]).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use serde_json::value::RawValue;
use str0m::Candidate;
use tracing::{debug, info, trace, warn};

use crate::client::{Client, ClientConfig, ClientError, ClientEvent, ClientTransmit};
use crate::identity::{Fingerprint, Identity};
use crate::peer::media::{MediaError, MediaEvent, MediaFrame, TrackId, TrackInfo, TrackOptions};
use crate::peer::signal::{RejectReason, Signal, SignalError};
use crate::peer::{
    ChannelError, ChannelOptions, Ctx, DEFAULT_CHANNEL, Datagram, INTERNAL_CHANNEL, Payload, Peer, PeerConfig, PeerError,
    PeerOutput, PeerState, SendError, TRANSFER_CHANNEL, crypto,
};
use sha2::{Digest, Sha256};
use crate::transfer::{ChunkSink, ChunkSource, FileInfo, TransferConfig, TransferError, TransferEvent, TransferKind, TransferTransport, Transfers};
use crate::client::{IssuedTurnCredentials, RequestError, RequestId, Response};
use crate::room::keys::RoomKeys;
use crate::room::call::Call;
use crate::turn::{TurnClient, TurnConfig, TurnCredentials, TurnError, TurnEvent};
use crate::room::{self, CallConfig, CallEvent, EncryptionEvent, JoinOptions, Source, Pending, RoomData, RoomError, RoomEvent, RoomOptions, RoomPath, RoomView, Rooms, RoomsConfig, Transport};
use crate::stun::{self, StunMessage, TransactionId};
use crate::sync::host::{SyncEvent, Syncs};
use crate::sync::{CrdtConfig, CrdtSync, StateConfig, StateSync, SyncError};

/// Most events or transmits that may wait undrained before `handle_*` refuses more input.
pub const MAX_PENDING_OUTPUTS: usize = 65_536;
/// Most local addresses (host and server-reflexive candidates together).
pub const MAX_LOCAL_CANDIDATES: usize = 32;
/// Most STUN servers.
pub const MAX_STUN_SERVERS: usize = 8;
/// Most TURN servers (each gets an allocation per local address of its IP family).
pub const MAX_TURN_SERVERS: usize = 4;
/// The first wait before an allocation that failed (no answer, refused, or lost) is tried
/// again; it doubles with each failure in a row, up to [`TURN_RETRY_MAX`]. An allocation
/// refused for its credentials is not retried.
pub const TURN_RETRY_MIN: Duration = Duration::from_secs(5);
/// The longest wait before an allocation is tried again.
pub const TURN_RETRY_MAX: Duration = Duration::from_secs(120);

/// When a node with [`NodeConfig::turn_from_server`] asks for TURN credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TurnAsk {
    /// Not at all (not configured, or the server issues none).
    Never,
    /// As soon as the client is registered.
    OnRegistration,
    /// At this time (a renewal, or a retry).
    At(Instant),
    /// The request is out.
    Pending(RequestId),
}

impl TurnAsk {
    fn at(self) -> Option<Instant> {
        match self {
            TurnAsk::At(t) => Some(t),
            _ => None,
        }
    }
}
/// STUN binding retransmissions: the first after 500 ms, then doubling.
const STUN_ATTEMPTS: u32 = 4;

/// A STUN or TURN server as in the reference `iceServers`: `stun:` URLs give
/// server-reflexive candidates, `turn:` URLs (UDP; with `username` and `credential`) relayed
/// ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceServer {
    /// URLs, e.g. `stun:stun.example.org:3478` or `turn:turn.example.org:3478`
    /// (`?transport=udp` or none; TCP and `turns:` are not spoken and are skipped).
    pub urls: Vec<String>,
    /// User name (TURN).
    pub username: Option<String>,
    /// Credential (TURN).
    pub credential: Option<String>,
}

impl IceServer {
    /// A server at these URLs, without credentials.
    pub fn new(urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        IceServer { urls: urls.into_iter().map(Into::into).collect(), username: None, credential: None }
    }

    /// A TURN server at these URLs with long-term credentials.
    pub fn turn(urls: impl IntoIterator<Item = impl Into<String>>, username: impl Into<String>, credential: impl Into<String>) -> Self {
        IceServer { urls: urls.into_iter().map(Into::into).collect(), username: Some(username.into()), credential: Some(credential.into()) }
    }

    /// Its `turn:` URLs (UDP) with its credentials, for the adapter to resolve and hand to
    /// [`Node::add_turn_server`]. Without both `username` and `credential` every `turn:` URL is
    /// skipped (with a warning), as are TCP and `turns:` ones.
    pub fn turn_servers(&self) -> Vec<TurnServerUrl> {
        let mut out = Vec::new();
        for url in self.urls.iter().filter(|u| u.starts_with("turn:") || u.starts_with("turns:")) {
            let Some((host, port)) = stun::parse_turn_url(url) else {
                warn!(%url, "TURN URL skipped: only turn: over UDP is spoken");
                continue;
            };
            let (Some(username), Some(password)) = (&self.username, &self.credential) else {
                warn!(%url, "TURN URL skipped: it needs a username and a credential");
                continue;
            };
            out.push(TurnServerUrl { host, port, credentials: TurnCredentials { username: username.clone(), password: password.clone() } });
        }
        out
    }
}

/// Which local candidates connections offer (the reference's `iceTransportPolicy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum IceTransportPolicy {
    /// Host, server-reflexive and relayed candidates.
    #[default]
    All,
    /// Relayed candidates only: every connection goes through a TURN server (nothing about
    /// this host's addresses is told to the remote).
    Relay,
}

/// A `turn:` server of [`NodeConfig::ice_servers`], for the adapter to resolve and hand to
/// [`Node::add_turn_server`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnServerUrl {
    /// Its host name or address.
    pub host: String,
    /// Its port (3478 when the URL names none).
    pub port: u16,
    /// The credentials of its [`IceServer`].
    pub credentials: TurnCredentials,
}

/// Where an adapter binds a node's UDP sockets; each socket becomes a host candidate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum UdpBind {
    /// One socket on every local interface address (IPv6 link-local ones excepted: a
    /// candidate cannot carry their scope id).
    #[default]
    AllInterfaces,
    /// One socket on 127.0.0.1 (peers on this machine only; what tests use).
    Loopback,
    /// Exactly these addresses (port 0 picks a free port).
    Addrs(Vec<SocketAddr>),
}

impl UdpBind {
    /// The addresses to bind. `interfaces` lists the machine's interface addresses (the
    /// adapter reads them; only [`UdpBind::AllInterfaces`] calls it).
    pub fn addrs<E>(&self, interfaces: impl FnOnce() -> Result<Vec<std::net::IpAddr>, E>) -> Result<Vec<SocketAddr>, E> {
        use std::net::{IpAddr, Ipv4Addr};
        Ok(match self {
            UdpBind::Loopback => vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)],
            UdpBind::Addrs(addrs) => addrs.clone(),
            UdpBind::AllInterfaces => {
                let mut ips: Vec<IpAddr> = interfaces()?
                    .into_iter()
                    .filter(|ip| match ip {
                        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
                        IpAddr::V4(_) => true,
                    })
                    .collect();
                ips.sort();
                ips.dedup();
                ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect()
            }
        })
    }
}

/// A node's configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeConfig {
    /// The signaling client.
    pub client: ClientConfig,
    /// Every direct connection.
    pub peer: PeerConfig,
    /// STUN and TURN servers. Adapters resolve the `stun:` hosts and call
    /// [`Node::add_stun_server`], and the `turn:` ones for [`Node::add_turn_server`]. Default
    /// none.
    pub ice_servers: Vec<IceServer>,
    /// Which local candidates connections offer. Default [`IceTransportPolicy::All`].
    pub ice_transport_policy: IceTransportPolicy,
    /// Tuning of the TURN allocations.
    pub turn: TurnConfig,
    /// Ask the signaling server for short-lived TURN credentials once registered (its
    /// `--turn-secret` scheme), and again before three quarters of their lifetime have passed:
    /// each answer is a [`NodeEvent::TurnCredentials`], whose servers peerlink's adapters
    /// resolve and add ([`Node::add_turn_server`]; credentials of a server already added are
    /// replaced, for its allocations from then on). Default `false`.
    pub turn_from_server: bool,
    /// Answer offers from peers that were not called (the reference auto-accepts). Default
    /// `true`; when `false` such offers are refused with `refused`.
    pub accept_incoming: bool,
    /// Most simultaneous connections. Default 256.
    pub max_peers: usize,
    /// Managed rooms ([`crate::room`]).
    pub rooms: RoomsConfig,
    /// File, JSON and image transfers ([`crate::transfer`]).
    pub transfers: TransferConfig,
}

impl NodeConfig {
    /// Defaults, with the signaling server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        NodeConfig::with_client(ClientConfig::new(url))
    }

    /// Defaults around a signaling client configuration.
    pub fn with_client(client: ClientConfig) -> Self {
        NodeConfig {
            client,
            peer: PeerConfig::default(),
            ice_servers: Vec::new(),
            ice_transport_policy: IceTransportPolicy::All,
            turn: TurnConfig::default(),
            turn_from_server: false,
            accept_incoming: true,
            max_peers: 256,
            rooms: RoomsConfig::default(),
            transfers: TransferConfig::default(),
        }
    }

    /// The `stun:` servers' hosts and ports, for the adapter to resolve.
    pub fn stun_hosts(&self) -> Vec<(String, u16)> {
        self.ice_servers.iter().flat_map(|s| s.urls.iter()).filter_map(|u| stun::parse_stun_url(u)).collect()
    }

    /// The `turn:` servers (UDP) with their credentials, for the adapter to resolve (see
    /// [`IceServer::turn_servers`]).
    pub fn turn_servers(&self) -> Vec<TurnServerUrl> {
        self.ice_servers.iter().flat_map(IceServer::turn_servers).collect()
    }
}

/// Errors from the node's commands and its misuse (never from network input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// More outputs wait than [`MAX_PENDING_OUTPUTS`]: drain `poll_event` and
    /// `poll_transmit`.
    #[error("poll_event and poll_transmit must be drained before more input")]
    NotDrained,
    /// A node does not connect to itself.
    #[error("a node cannot connect to itself")]
    SelfConnect,
    /// [`NodeConfig::max_peers`] connections exist.
    #[error("at most {0} connections")]
    TooManyPeers(usize),
    /// The signaling client refused the command.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Sending failed (nothing was queued).
    #[error(transparent)]
    Send(#[from] SendError),
    /// Creating a channel failed.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The connection could not be started.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// A room command was refused (nothing was sent).
    #[error(transparent)]
    Room(#[from] RoomError),
    /// A transfer command was refused.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// A state or document sync command was refused (nothing changed).
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// A media command was refused (nothing changed).
    #[error(transparent)]
    Media(#[from] MediaError),
    /// The DTLS certificate could not be made.
    #[error("certificate: {0}")]
    Certificate(String),
    /// Too many local addresses or STUN servers, or an address ICE cannot use.
    #[error("invalid address: {0}")]
    InvalidAddress(String),
}

/// An output for the adapter's sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeTransmit {
    /// For the signaling WebSocket (see [`ClientTransmit`]).
    Signaling(ClientTransmit),
    /// A UDP datagram to send from `source` (one of the local addresses).
    Datagram(Datagram),
}

/// Something that happened; drain with [`Node::poll_event`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum NodeEvent {
    /// From the signaling client (every relay that is not a peer negotiation message
    /// included).
    Signaling(ClientEvent),
    /// A peer called: a connection now exists (it was answered).
    Incoming {
        /// The caller.
        peer: Fingerprint,
    },
    /// A connection changed state.
    PeerState {
        /// The peer.
        peer: Fingerprint,
        /// Its new state.
        state: PeerState,
    },
    /// A data channel opened (either side created it).
    ChannelOpen {
        /// The peer.
        peer: Fingerprint,
        /// Its label.
        channel: String,
    },
    /// A data channel closed.
    ChannelClosed {
        /// The peer.
        peer: Fingerprint,
        /// Its label.
        channel: String,
    },
    /// A message arrived.
    Data {
        /// The sender.
        peer: Fingerprint,
        /// The channel's label.
        channel: String,
        /// The message.
        data: Payload,
    },
    /// A channel's buffered amount fell to the low-water mark: sends are accepted again.
    BufferedAmountLow {
        /// The peer.
        peer: Fingerprint,
        /// The channel's label.
        channel: String,
    },
    /// A connection failed or was refused (followed by `PeerState` `Failed` when one existed).
    PeerError {
        /// The peer.
        peer: Fingerprint,
        /// What went wrong.
        error: PeerError,
    },
    /// A negotiation message from a peer could not be used; it was dropped.
    BadSignal {
        /// The sender.
        from: Fingerprint,
        /// Why.
        error: SignalError,
    },
    /// A STUN server told us how it sees one of our addresses (a server-reflexive candidate).
    ReflexiveAddress {
        /// Our local address.
        local: SocketAddr,
        /// The STUN server.
        server: SocketAddr,
        /// The address it saw.
        mapped: SocketAddr,
    },
    /// A STUN server did not answer.
    StunTimeout {
        /// Our local address.
        local: SocketAddr,
        /// The STUN server.
        server: SocketAddr,
    },
    /// Something happened to a TURN allocation: [`TurnEvent::Allocated`] (its relayed
    /// address is now a candidate of every connection), or [`TurnEvent::Failed`] (e.g.
    /// [`TurnError::Unauthorized`] for wrong credentials), among others.
    Turn {
        /// Our local address the allocation is made from.
        local: SocketAddr,
        /// The TURN server.
        server: SocketAddr,
        /// What happened.
        event: TurnEvent,
    },
    /// With [`NodeConfig::turn_from_server`]: the signaling server issued TURN credentials
    /// (add `issued.ice_server()` with [`Node::add_turn_server`] for each resolved address;
    /// peerlink's adapters do it), or could not (`turn_unavailable` when it issues none: not
    /// asked again; a lost connection or timeout: asked again after 30 s).
    TurnCredentials(Result<IssuedTurnCredentials, RequestError>),
    /// Something happened in a managed room.
    Room(RoomEvent),
    /// Something happened to a file, JSON or image transfer.
    Transfer(TransferEvent),
    /// Something happened to a room's shared state or documents.
    Sync(SyncEvent),
    /// Something happened to end-to-end encryption with a member of an encrypted room.
    Encryption(EncryptionEvent),
    /// Something happened to a connection's audio or video tracks.
    Media(MediaEvent),
    /// Something happened in a room's call ([`crate::room::call`]).
    Call(CallEvent),
}

/// What a connection said to the transfers.
enum TransferInput {
    Data(Fingerprint, Payload),
    /// A chunk frame opened in place: the part of the buffer it is.
    Opened(Fingerprint, Vec<u8>, std::ops::Range<usize>),
    Writable(Fingerprint),
    Reconnected(Fingerprint),
    Lost(Fingerprint),
}

/// Input for the rooms, gathered while they are not at hand and handed over in
/// [`Node::flush_rooms`].
enum RoomInput {
    Items { from: Fingerprint, items: Vec<room::wire::Item>, path: RoomPath, sealed: bool },
    Bad { from: Fingerprint, error: room::WireError },
    Direct { peer: Fingerprint, open: bool },
    Lost { peer: Fingerprint },
    DirectWritable { peer: Fingerprint },
    RelayRestored,
    Client(ClientEvent),
}

/// A read-only view of one connection ([`Node::get_peer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// The remote peer.
    pub fingerprint: Fingerprint,
    /// Its state.
    pub state: PeerState,
    /// The session id (hex), shared by both sides.
    pub session: String,
    /// Labels of the open channels.
    pub channels: Vec<String>,
    /// Whether this side made the first offer.
    pub offerer: bool,
    /// The largest message a send accepts.
    pub max_message_size: usize,
    /// Audio and video tracks, both sides', once negotiated.
    pub tracks: Vec<TrackInfo>,
}

struct StunRequest {
    local: SocketAddr,
    server: SocketAddr,
    attempts: u32,
    next: Instant,
    request: Vec<u8>,
}

/// One local participant. See the [module docs](self).
pub struct Node {
    config: NodeConfig,
    client: Client,
    identity: Identity,
    rng: ChaCha20Rng,
    cert: str0m::config::DtlsCert,
    peers: BTreeMap<Fingerprint, Peer>,
    candidates: Vec<Candidate>,
    /// The local UDP addresses (host candidates, also under the relay policy).
    local_addrs: Vec<SocketAddr>,
    stun_servers: Vec<SocketAddr>,
    turn_servers: Vec<(SocketAddr, TurnCredentials)>,
    /// One allocation per TURN server and local address of its family.
    turns: Vec<TurnClient>,
    /// Allocations to make again (local address, server, when, failures in a row so far).
    turn_retries: Vec<(SocketAddr, SocketAddr, Instant, u32)>,
    /// Failures in a row per (local address, server), reset by an allocation.
    turn_failures: BTreeMap<(SocketAddr, SocketAddr), u32>,
    /// With `turn_from_server`: when to ask the signaling server for TURN credentials.
    turn_ask: TurnAsk,
    stun: BTreeMap<TransactionId, StunRequest>,
    transmits: VecDeque<NodeTransmit>,
    events: VecDeque<NodeEvent>,
    now: Instant,
    rooms: Rooms,
    room_inputs: VecDeque<RoomInput>,
    /// A room command or input since the last [`Node::flush_rooms`].
    rooms_dirty: bool,
    transfers: Transfers,
    /// What the connections said to the transfers, applied at the next flush (so that what a
    /// send during a flush drains is not lost: the transfers are out of `self` then).
    transfer_inputs: VecDeque<TransferInput>,
    /// A transfer command or input since the last [`Node::flush_transfers`].
    transfers_dirty: bool,
    /// Peers whose transfer channel was open before: when it opens again, the connection was
    /// replaced and transfers resume.
    transfer_seen: std::collections::BTreeSet<Fingerprint>,
    /// Key-value and document sync per room, over room messages.
    syncs: Syncs,
    /// End-to-end keys with the members of encrypted rooms.
    keys: RoomKeys,
    /// The buffer transfer frames are sealed into (kept: one chunk's worth).
    sealed_frame: Vec<u8>,
    /// Calls, by room.
    calls: BTreeMap<String, Call>,
    /// A call, a member or a connection changed since the calls' tracks were checked.
    calls_dirty: bool,
}

impl Node {
    /// Creates a node. `seed` drives every random choice (session ids, ICE credentials, the
    /// DTLS certificate, retransmission jitter); `unix_ms` (wall clock) dates the certificate.
    /// Call [`Node::connect`] to reach the signaling server.
    pub fn new(config: NodeConfig, identity: Identity, seed: u64, now: Instant, unix_ms: u64) -> Result<Self, NodeError> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let client = Client::new(config.client.clone(), identity.clone(), rng.next_u64(), now)?;
        let cert = crypto::generate_certificate(&mut rng, unix_ms).map_err(NodeError::Certificate)?;
        // Transfer ids start at random (below 2^62, room to count up), so two peers' rarely meet.
        let first_transfer_id = rng.next_u64() >> 2;
        let rooms = Rooms::new(config.rooms.clone(), identity.fingerprint(), now, unix_ms);
        let config_transfers = config.transfers.clone();
        // Derived, not drawn: drawing would move every later random choice.
        let sync_seed = first_transfer_id.rotate_left(17) ^ 0x5359_4e43;
        let fragment = config.rooms.max_message_size.min(room::MAX_ROOM_MESSAGE);
        let syncs = Syncs::new(identity.fingerprint(), sync_seed, now, unix_ms, fragment);
        let keys = RoomKeys::new(identity.clone(), sync_seed.rotate_left(29) ^ 0x4532_4531, config.rooms.e2e_limits);
        let turn_ask = if config.turn_from_server { TurnAsk::OnRegistration } else { TurnAsk::Never };
        Ok(Node {
            config,
            client,
            identity,
            rng,
            cert,
            peers: BTreeMap::new(),
            candidates: Vec::new(),
            local_addrs: Vec::new(),
            stun_servers: Vec::new(),
            turn_servers: Vec::new(),
            turns: Vec::new(),
            turn_retries: Vec::new(),
            turn_failures: BTreeMap::new(),
            turn_ask,
            stun: BTreeMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            now,
            rooms,
            room_inputs: VecDeque::new(),
            rooms_dirty: false,
            transfers: Transfers::new(config_transfers).with_first_id(first_transfer_id),
            transfer_inputs: VecDeque::new(),
            transfers_dirty: false,
            transfer_seen: std::collections::BTreeSet::new(),
            syncs,
            keys,
            sealed_frame: Vec::new(),
            calls: BTreeMap::new(),
            calls_dirty: false,
        })
    }

    /// Returns this node's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint()
    }

    /// Returns the configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Returns the signaling client (for its state).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Returns the signaling client for commands (`join`, `relay`, rooms, ...). What they
    /// produce comes out of this node's `poll_transmit` and `poll_event`.
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    // ---- outputs ------------------------------------------------------------------------

    /// Returns the next output for the sockets, or `None`. Drain after every input.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<NodeTransmit> {
        if let Some(t) = self.client.poll_transmit() {
            return Some(NodeTransmit::Signaling(t));
        }
        self.transmits.pop_front()
    }

    /// Returns the next event, or `None`. Drain after every input.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.pump_client();
        self.events.pop_front()
    }

    /// Returns when [`Node::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let peers = self.peers.values().filter_map(Peer::timeout);
        let stun = self.stun.values().map(|r| r.next);
        // A room deadline already past (it waits on input, e.g. the relay coming back) must
        // not make the loop spin: it counts from now on.
        let rooms = self.rooms.poll_timeout().map(|t| t.max(self.now));
        // Transfers that stopped at their flush budget go on at once.
        let transfers = self.transfers.poll_timeout().map(|t| t.max(self.now)).into_iter().chain(self.transfers.wants_flush().then_some(self.now)).min();
        let syncs = self.syncs.poll_timeout(self.now);
        let keys = self.keys.poll_timeout().map(|t| t.max(self.now));
        let turns = self.turns.iter().filter_map(TurnClient::poll_timeout).chain(self.turn_retries.iter().map(|r| r.2)).chain(self.turn_ask.at()).map(|t| t.max(self.now));
        self.client.poll_timeout().into_iter().chain(peers).chain(stun).chain(rooms).chain(transfers).chain(syncs).chain(keys).chain(turns).min()
    }

    fn begin(&mut self, now: Instant) -> Result<(), NodeError> {
        if self.events.len() + self.transmits.len() > MAX_PENDING_OUTPUTS {
            return Err(NodeError::NotDrained);
        }
        self.now = self.now.max(now);
        Ok(())
    }

    // ---- signaling inputs ---------------------------------------------------------------

    /// Starts connecting to the signaling server.
    pub fn connect(&mut self, now: Instant) -> Result<(), NodeError> {
        self.begin(now)?;
        self.client.connect(now)?;
        Ok(())
    }

    /// Reports that the signaling WebSocket opened.
    pub fn handle_connected(&mut self, now: Instant) -> Result<(), NodeError> {
        self.begin(now)?;
        self.client.handle_connected(now)?;
        self.pump_client();
        self.flush_layers();
        Ok(())
    }

    /// Reports that the signaling WebSocket closed (with the server's close code, if any).
    pub fn handle_disconnected(&mut self, now: Instant, code: Option<u16>) -> Result<(), NodeError> {
        self.begin(now)?;
        self.client.handle_disconnected(now, code)?;
        self.pump_client();
        self.flush_layers();
        Ok(())
    }

    /// Reports a text frame from the signaling server.
    pub fn handle_text(&mut self, now: Instant, text: &str) -> Result<(), NodeError> {
        self.begin(now)?;
        self.client.handle_text(now, text)?;
        self.pump_client();
        self.flush_layers();
        Ok(())
    }

    /// Moves the client's events out, consuming peer negotiation messages, room batches and
    /// the events of managed rooms.
    fn pump_client(&mut self) {
        while let Some(event) = self.client.poll_event() {
            match &event {
                ClientEvent::Reconnected { .. } => {
                    self.rooms_dirty = true;
                    self.room_inputs.push_back(RoomInput::RelayRestored);
                    if self.turn_ask == TurnAsk::OnRegistration {
                        self.ask_turn_credentials();
                    }
                }
                ClientEvent::Registered { .. } => {
                    self.rooms_dirty = true;
                    if self.turn_ask == TurnAsk::OnRegistration {
                        self.ask_turn_credentials();
                    }
                }
                ClientEvent::Response { request, result } if self.turn_ask == TurnAsk::Pending(*request) => {
                    self.turn_credentials_answered(result.clone());
                    continue;
                }
                _ => {}
            }
            if self.is_room_event(&event) {
                self.rooms_dirty = true;
                self.room_inputs.push_back(RoomInput::Client(event));
                continue;
            }
            match event {
                ClientEvent::Relay { from, payload } if room::wire::is_relayed(payload.0.get()) => {
                    self.rooms_dirty = true;
                    let me = self.fingerprint();
                    let input = match room::wire::open_relayed(payload.0.get(), &from, &me) {
                        Ok((body, _key)) => self.room_body(from, &body, RoomPath::Relay),
                        Err(error) => Some(RoomInput::Bad { from, error }),
                    };
                    self.room_inputs.extend(input);
                }
                ClientEvent::Relay { from, payload } if room::keys::decode_relayed(payload.0.get()).is_some() => {
                    let msg = room::keys::decode_relayed(payload.0.get()).expect("checked");
                    self.keys.handle_message(self.now, from, msg);
                    self.rooms_dirty = true;
                }
                ClientEvent::Relay { from, payload } => match Signal::decode(&payload.0) {
                    Ok(Some(signal)) => self.on_signal(from, signal),
                    Ok(None) => self.events.push_back(NodeEvent::Signaling(ClientEvent::Relay { from, payload })),
                    Err(error) => {
                        debug!(from = %from.short(), %error, "bad negotiation message");
                        self.events.push_back(NodeEvent::BadSignal { from, error });
                    }
                },
                other => self.events.push_back(NodeEvent::Signaling(other)),
            }
        }
    }

    /// Asks the signaling server for TURN credentials now, or once registered again.
    fn ask_turn_credentials(&mut self) {
        if !self.client.is_registered() {
            self.turn_ask = TurnAsk::OnRegistration;
            return;
        }
        match self.client.turn_credentials(self.now) {
            Ok(id) => {
                debug!("asking the signaling server for TURN credentials");
                self.turn_ask = TurnAsk::Pending(id);
            }
            Err(error) => {
                warn!(%error, "TURN credentials not requested; asking again once registered");
                self.turn_ask = TurnAsk::OnRegistration;
            }
        }
    }

    fn turn_credentials_answered(&mut self, result: Result<Response, RequestError>) {
        let result = match result {
            Ok(Response::TurnCredentials(issued)) => {
                // Renew at three quarters of their lifetime (at least 10 s on).
                let renew = (issued.ttl * 3 / 4).max(Duration::from_secs(10));
                self.turn_ask = TurnAsk::At(self.now + renew);
                info!(ttl = ?issued.ttl, urls = issued.urls.len(), "TURN credentials issued by the signaling server");
                Ok(issued)
            }
            Ok(other) => {
                warn!(?other, "unexpected answer to a TURN credentials request");
                self.turn_ask = TurnAsk::OnRegistration;
                return;
            }
            Err(error) => {
                if error.code() == Some(crate::protocol::ErrorCode::TurnUnavailable) {
                    warn!("the signaling server issues no TURN credentials; not asking again");
                    self.turn_ask = TurnAsk::Never;
                } else {
                    debug!(%error, "TURN credentials request failed; asking again in 30 s");
                    self.turn_ask = TurnAsk::At(self.now + Duration::from_secs(30));
                }
                Err(error)
            }
        };
        self.events.push_back(NodeEvent::TurnCredentials(result));
    }

    // ---- datagrams ----------------------------------------------------------------------

    /// Reports a UDP datagram from `source` received on the local address `destination`.
    /// Datagrams nobody wants (stray, malformed) are dropped.
    pub fn handle_datagram(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, contents: &[u8]) -> Result<(), NodeError> {
        self.begin(now)?;
        let now = self.now;
        if let Some(tid) = stun::transaction_id(contents) {
            if self.stun.get(&tid).is_some_and(|r| r.server == source && r.local == destination) {
                self.on_stun_response(tid, contents);
                return Ok(());
            }
        }
        if let Some(i) = self.turns.iter().position(|t| t.local() == destination && t.is_from_server(source)) {
            // The TURN server: its answers, or a peer's data through the relay, which is the
            // peer's datagram to our relayed address.
            let relayed = self.turns[i].handle_datagram(now, source, contents).and_then(|(peer, data)| Some((peer, self.turns[i].relayed()?, data)));
            self.pump_turns();
            if let Some((peer, relayed, data)) = relayed {
                self.peer_datagram(now, peer, relayed, data);
            }
            return Ok(());
        }
        self.peer_datagram(now, source, destination, contents);
        Ok(())
    }

    /// A datagram for one of the connections.
    fn peer_datagram(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, contents: &[u8]) {
        let Some(input) = Peer::parse_datagram(now, source, destination, contents) else {
            trace!(%source, len = contents.len(), "undecodable datagram dropped");
            return;
        };
        let Some(fp) = self.peers.iter().find(|(_, p)| p.accepts(&input)).map(|(fp, _)| *fp) else {
            trace!(%source, "datagram for no connection dropped");
            return;
        };
        self.with_peer(fp, |peer, ctx| peer.handle_input(input, ctx));
        if self.rooms_dirty || self.transfers_dirty {
            self.flush_layers();
        }
    }

    // ---- time ---------------------------------------------------------------------------

    /// Advances every timer to `now`. Calling it early does nothing.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), NodeError> {
        self.begin(now)?;
        let now = self.now;
        self.client.handle_timeout(now)?;
        self.pump_client();
        let due: Vec<Fingerprint> = self.peers.iter().filter(|(_, p)| p.timeout().is_some_and(|t| t <= now)).map(|(f, _)| *f).collect();
        for fp in due {
            self.with_peer(fp, |peer, ctx| peer.handle_timeout(ctx));
        }
        self.stun_timers(now);
        for t in &mut self.turns {
            if t.poll_timeout().is_some_and(|at| at <= now) {
                t.handle_timeout(now);
            }
        }
        if self.turn_ask.at().is_some_and(|at| at <= now) {
            self.ask_turn_credentials();
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.turn_retries).into_iter().partition(|r| r.2 <= now);
        self.turn_retries = later;
        for (local, server, _, _) in due {
            if let Some((_, credentials)) = self.turn_servers.iter().find(|(s, _)| *s == server).cloned() {
                info!(%local, %server, "allocating on the TURN server again");
                self.start_turn(local, server, credentials);
            }
        }
        self.pump_turns();
        self.rooms_dirty = true;
        if self.transfers.poll_timeout().is_some_and(|t| t <= now) {
            self.transfers.handle_timeout(now);
            self.transfers_dirty = true;
        }
        if self.transfers.wants_flush() {
            self.transfers_dirty = true;
        }
        if self.syncs.poll_timeout(now).is_some_and(|t| t <= now) {
            self.syncs.handle_timeout(now);
        }
        self.keys.handle_timeout(now);
        self.flush_layers();
        Ok(())
    }

    // ---- local addresses and STUN -------------------------------------------------------

    /// Adds a local UDP address (a bound socket) as a host candidate; STUN servers are asked
    /// how they see it. Live connections learn it by trickle.
    pub fn add_local_address(&mut self, now: Instant, addr: SocketAddr) -> Result<(), NodeError> {
        self.begin(now)?;
        let candidate = Candidate::host(addr, "udp").map_err(|e| NodeError::InvalidAddress(e.to_string()))?;
        self.add_candidate(candidate)?;
        if !self.local_addrs.contains(&addr) {
            self.local_addrs.push(addr);
        }
        for server in self.stun_servers.clone() {
            self.start_stun(addr, server);
        }
        for (server, credentials) in self.turn_servers.clone() {
            self.start_turn(addr, server, credentials);
        }
        self.pump_turns();
        Ok(())
    }

    /// Adds a TURN server (resolved address) with its long-term credentials: an allocation is
    /// made from every local address of its IP family, and each relayed address becomes a
    /// candidate of every connection ([`NodeEvent::Turn`] tells how it goes). Connections
    /// then reach peers through it when nothing more direct works, or always under
    /// [`IceTransportPolicy::Relay`]. Errors: more than [`MAX_TURN_SERVERS`]
    /// ([`NodeError::InvalidAddress`]). Adding the same server again replaces its credentials,
    /// for the allocations made from then on (a retry, say).
    pub fn add_turn_server(&mut self, now: Instant, server: SocketAddr, credentials: TurnCredentials) -> Result<(), NodeError> {
        self.begin(now)?;
        if let Some(known) = self.turn_servers.iter_mut().find(|(s, _)| *s == server) {
            // New credentials (renewed, say) for allocations made from now on.
            known.1 = credentials;
            return Ok(());
        }
        if self.turn_servers.len() >= MAX_TURN_SERVERS {
            return Err(NodeError::InvalidAddress(format!("at most {MAX_TURN_SERVERS} TURN servers")));
        }
        self.turn_servers.push((server, credentials.clone()));
        for local in self.local_addrs.clone() {
            self.start_turn(local, server, credentials.clone());
        }
        self.pump_turns();
        Ok(())
    }

    fn start_turn(&mut self, local: SocketAddr, server: SocketAddr, credentials: TurnCredentials) {
        if local.is_ipv4() != server.is_ipv4() || self.turns.iter().any(|t| t.local() == local && t.server() == server) {
            return;
        }
        info!(%local, %server, "allocating on a TURN server");
        let seed = self.rng.next_u64();
        self.turns.push(TurnClient::new(server, local, credentials, self.config.turn.clone(), seed, self.now));
    }

    /// Drains the TURN clients: their datagrams to the sockets, their events to the
    /// application (an allocation's relayed address becomes a candidate).
    fn pump_turns(&mut self) {
        let mut relayed = Vec::new();
        let mut failed = Vec::new();
        for t in &mut self.turns {
            while let Some(d) = t.poll_transmit() {
                self.transmits.push_back(NodeTransmit::Datagram(d));
            }
            while let Some(event) = t.poll_event() {
                match &event {
                    TurnEvent::Allocated { relayed: addr, .. } => {
                        info!(server = %t.server(), relayed = %addr, "TURN allocation");
                        relayed.push((*addr, t.local()));
                        self.turn_failures.remove(&(t.local(), t.server()));
                    }
                    TurnEvent::Failed { error } => {
                        warn!(server = %t.server(), %error, "TURN allocation failed");
                        failed.push((t.local(), t.server(), error.clone()));
                    }
                    _ => debug!(server = %t.server(), ?event, "TURN"),
                }
                self.events.push_back(NodeEvent::Turn { local: t.local(), server: t.server(), event });
            }
        }
        for (local, server, error) in failed {
            self.turns.retain(|t| !(t.local() == local && t.server() == server));
            if matches!(error, TurnError::Unauthorized) {
                // Wrong credentials stay wrong: add the server again with others.
                self.turn_servers.retain(|(s, _)| *s != server);
                continue;
            }
            // Timeouts, refusals (quota, capacity) and lost allocations: try again later,
            // 5 s doubling to 2 min.
            let failures = self.turn_failures.entry((local, server)).or_insert(0);
            *failures += 1;
            let delay = (TURN_RETRY_MIN * 2u32.saturating_pow(failures.saturating_sub(1).min(10))).min(TURN_RETRY_MAX);
            debug!(%local, %server, ?delay, failures = *failures, "TURN allocation retry scheduled");
            self.turn_retries.push((local, server, self.now + delay, *failures));
        }
        for (addr, local) in relayed {
            match Candidate::relayed(addr, local, "udp") {
                Ok(c) => {
                    if let Err(e) = self.add_candidate(c) {
                        warn!(error = %e, "relayed candidate not added");
                    }
                }
                Err(e) => debug!(error = %e, "unusable relayed address"),
            }
        }
    }

    /// Adds a STUN server (resolved address); every local address is checked against it.
    pub fn add_stun_server(&mut self, now: Instant, server: SocketAddr) -> Result<(), NodeError> {
        self.begin(now)?;
        if self.stun_servers.contains(&server) {
            return Ok(());
        }
        if self.stun_servers.len() >= MAX_STUN_SERVERS {
            return Err(NodeError::InvalidAddress(format!("at most {MAX_STUN_SERVERS} STUN servers")));
        }
        self.stun_servers.push(server);
        let hosts: Vec<SocketAddr> =
            self.candidates.iter().filter(|c| c.kind() == str0m::CandidateKind::Host).map(|c| c.addr()).collect();
        for local in hosts {
            if local.is_ipv4() == server.is_ipv4() {
                self.start_stun(local, server);
            }
        }
        Ok(())
    }

    /// The local candidates (host and server-reflexive) as SDP candidate lines.
    pub fn local_candidates(&self) -> Vec<String> {
        self.candidates.iter().map(|c| c.to_sdp_string()).collect()
    }

    fn add_candidate(&mut self, candidate: Candidate) -> Result<(), NodeError> {
        if self.candidates.iter().any(|c| c.addr() == candidate.addr() && c.kind() == candidate.kind()) {
            return Ok(());
        }
        if self.config.ice_transport_policy == IceTransportPolicy::Relay && candidate.kind() != str0m::CandidateKind::Relayed {
            // Known to this node (its sockets), never told to a remote.
            return Ok(());
        }
        if self.candidates.len() >= MAX_LOCAL_CANDIDATES {
            return Err(NodeError::InvalidAddress(format!("at most {MAX_LOCAL_CANDIDATES} local candidates")));
        }
        self.candidates.push(candidate.clone());
        let live: Vec<Fingerprint> = self.peers.keys().copied().collect();
        for fp in live {
            let c = candidate.clone();
            self.with_peer(fp, move |peer, ctx| peer.add_local_candidate(c, ctx));
        }
        Ok(())
    }

    fn start_stun(&mut self, local: SocketAddr, server: SocketAddr) {
        if local.is_ipv4() != server.is_ipv4() {
            return;
        }
        let mut t = [0u8; 12];
        self.rng.fill_bytes(&mut t);
        let tid = TransactionId(t);
        let request = stun::binding_request(tid);
        self.transmits.push_back(NodeTransmit::Datagram(Datagram { source: local, destination: server, contents: request.clone() }));
        self.stun.insert(tid, StunRequest { local, server, attempts: 1, next: self.now + Duration::from_millis(500), request });
    }

    fn stun_timers(&mut self, now: Instant) {
        let due: Vec<TransactionId> = self.stun.iter().filter(|(_, r)| r.next <= now).map(|(t, _)| *t).collect();
        for tid in due {
            let Some(r) = self.stun.get_mut(&tid) else { continue };
            if r.attempts >= STUN_ATTEMPTS {
                let (local, server) = (r.local, r.server);
                self.stun.remove(&tid);
                info!(%local, %server, "STUN server did not answer");
                self.events.push_back(NodeEvent::StunTimeout { local, server });
                continue;
            }
            r.attempts += 1;
            r.next = now + Duration::from_millis(500 << (r.attempts - 1));
            self.transmits.push_back(NodeTransmit::Datagram(Datagram { source: r.local, destination: r.server, contents: r.request.clone() }));
        }
    }

    fn on_stun_response(&mut self, tid: TransactionId, contents: &[u8]) {
        let Some(req) = self.stun.remove(&tid) else { return };
        match stun::decode(contents) {
            Ok(StunMessage::BindingSuccess { mapped, .. }) => {
                info!(local = %req.local, server = %req.server, %mapped, "server-reflexive address");
                self.events.push_back(NodeEvent::ReflexiveAddress { local: req.local, server: req.server, mapped });
                if mapped != req.local {
                    match Candidate::server_reflexive(mapped, req.local, "udp") {
                        Ok(c) => {
                            if let Err(e) = self.add_candidate(c) {
                                warn!(error = %e, "server-reflexive candidate not added");
                            }
                        }
                        Err(e) => debug!(error = %e, "unusable server-reflexive address"),
                    }
                }
            }
            Ok(other) => {
                debug!(?other, "STUN server refused the binding");
                self.events.push_back(NodeEvent::StunTimeout { local: req.local, server: req.server });
            }
            Err(e) => {
                // Not a valid answer: keep waiting for one.
                debug!(error = %e, "bad STUN response");
                self.stun.insert(tid, req);
            }
        }
    }

    // ---- peers --------------------------------------------------------------------------

    /// Runs `f` on the connection to `fp` with a context, then routes what it produced: its
    /// negotiation messages to the relay, its outputs to events; a connection that ended is
    /// removed.
    fn with_peer(&mut self, fp: Fingerprint, f: impl FnOnce(&mut Peer, &mut Ctx<'_, ChaCha20Rng>)) {
        if !self.peers.contains_key(&fp) {
            return;
        }
        let (terminal, signals, outputs) = self.in_ctx(Some(fp), |peer, ctx| {
            let peer = peer.expect("checked above");
            f(peer, ctx);
            peer.is_terminal()
        });
        self.route(fp, signals, outputs);
        if terminal {
            self.peers.remove(&fp);
        }
    }

    /// Runs `f` with a context (and the connection to `fp`, if given and present); datagrams
    /// it produces are queued; its negotiation messages and outputs are returned for routing.
    fn in_ctx<T>(
        &mut self,
        fp: Option<Fingerprint>,
        f: impl FnOnce(Option<&mut Peer>, &mut Ctx<'_, ChaCha20Rng>) -> T,
    ) -> (T, VecDeque<Signal>, VecDeque<PeerOutput>) {
        let Node { peers, identity, rng, config, cert, candidates, transmits, turns, now, .. } = self;
        let peer = fp.and_then(|fp| peers.get_mut(&fp));
        let mut datagrams = VecDeque::new();
        let mut signals = VecDeque::new();
        let mut outputs = VecDeque::new();
        let mut ctx = Ctx {
            identity,
            rng,
            config: &config.peer,
            cert,
            candidates,
            now: *now,
            datagrams: &mut datagrams,
            signals: &mut signals,
            outputs: &mut outputs,
        };
        let result = f(peer, &mut ctx);
        for d in datagrams {
            match turns.iter_mut().find(|t| t.relayed() == Some(d.source)) {
                Some(turn) => relay_through(turn, *now, d, transmits),
                None => transmits.push_back(NodeTransmit::Datagram(d)),
            }
        }
        (result, signals, outputs)
    }

    fn route(&mut self, fp: Fingerprint, signals: VecDeque<Signal>, outputs: VecDeque<PeerOutput>) {
        for signal in signals {
            self.send_signal(fp, &signal);
        }
        for output in outputs {
            if matches!(output, PeerOutput::State(_)) {
                self.calls_dirty = true;
            }
            let output = match self.room_output(fp, output) {
                Some(output) => output,
                None => continue,
            };
            if let PeerOutput::Media(event) = &output {
                self.call_media_event(fp, event);
            }
            self.events.push_back(match output {
                PeerOutput::State(state) => NodeEvent::PeerState { peer: fp, state },
                PeerOutput::ChannelOpen(channel) => NodeEvent::ChannelOpen { peer: fp, channel },
                PeerOutput::ChannelClosed(channel) => NodeEvent::ChannelClosed { peer: fp, channel },
                PeerOutput::Data { channel, data } => NodeEvent::Data { peer: fp, channel, data },
                PeerOutput::BufferedAmountLow(channel) => NodeEvent::BufferedAmountLow { peer: fp, channel },
                PeerOutput::Error(error) => NodeEvent::PeerError { peer: fp, error },
                PeerOutput::Media(event) => NodeEvent::Media(event),
            });
        }
    }

    /// Takes what the rooms need from a connection's output: everything on the internal
    /// channel (consumed), and state changes (also passed on).
    fn room_output(&mut self, fp: Fingerprint, output: PeerOutput) -> Option<PeerOutput> {
        let output = match self.transfer_output(fp, output)? {
            PeerOutput::Data { channel, data } if channel == INTERNAL_CHANNEL => {
                let input = match data {
                    Payload::Text(text) => self.room_body(fp, &text, RoomPath::Direct),
                    Payload::Binary(_) => Some(RoomInput::Bad { from: fp, error: room::WireError::Malformed("binary on the room channel".into()) }),
                };
                self.rooms_dirty = true;
                self.room_inputs.extend(input);
                return None;
            }
            other => other,
        };
        let input = match &output {
            PeerOutput::ChannelOpen(c) if c == INTERNAL_CHANNEL => {
                let up = self.peers.get(&fp).is_some_and(|p| p.state() == PeerState::Connected);
                up.then_some(RoomInput::Direct { peer: fp, open: true })
            }
            PeerOutput::ChannelClosed(c) if c == INTERNAL_CHANNEL => Some(RoomInput::Direct { peer: fp, open: false }),
            PeerOutput::BufferedAmountLow(c) if c == INTERNAL_CHANNEL => Some(RoomInput::DirectWritable { peer: fp }),
            PeerOutput::State(PeerState::Connected) => {
                let open = self.peers.get(&fp).is_some_and(|p| p.channel_open(INTERNAL_CHANNEL));
                open.then_some(RoomInput::Direct { peer: fp, open: true })
            }
            PeerOutput::State(PeerState::Disconnected) => Some(RoomInput::Direct { peer: fp, open: false }),
            PeerOutput::State(PeerState::Failed | PeerState::Closed) => Some(RoomInput::Lost { peer: fp }),
            _ => None,
        };
        let internal = matches!(&output,
            PeerOutput::ChannelOpen(c) | PeerOutput::ChannelClosed(c) | PeerOutput::BufferedAmountLow(c)
            if c == INTERNAL_CHANNEL);
        if internal {
            // Room traffic may move now (acknowledged data, or room in the window).
            self.rooms_dirty = true;
        }
        if let Some(input) = input {
            self.rooms_dirty = true;
            self.room_inputs.push_back(input);
        }
        (!internal).then_some(output)
    }

    /// A room batch body from `from` as room input: plaintext items, or a sealed batch
    /// opened (`None`: it did not open; the keys said why).
    fn room_body(&mut self, from: Fingerprint, body: &str, path: RoomPath) -> Option<RoomInput> {
        match room::wire::decode_body(body) {
            Ok(room::wire::Body::Items(items)) => Some(RoomInput::Items { from, items, path, sealed: false }),
            Ok(room::wire::Body::Sealed(sealed)) => {
                let plain = self.keys.open_batch(self.now, from, &sealed).ok()?;
                Some(match room::wire::decode_batch(&plain) {
                    Ok(items) => RoomInput::Items { from, items, path, sealed: true },
                    Err(error) => RoomInput::Bad { from, error },
                })
            }
            Err(error) => Some(RoomInput::Bad { from, error }),
        }
    }

    /// A transfer message from `peer` as the transfers take it: sealed ones opened (in
    /// place); plaintext from a peer that shares an encrypted room refused.
    fn transfer_input(&mut self, peer: Fingerprint, data: Payload) -> Option<TransferInput> {
        match data {
            Payload::Binary(mut frame) if frame.first() == Some(&room::keys::SEALED_FRAME) => match self.keys.open_frame(self.now, peer, &mut frame) {
                Ok((room::keys::FRAME_TEXT, range)) => match std::str::from_utf8(&frame[range]) {
                    Ok(text) => Some(TransferInput::Data(peer, Payload::Text(text.to_owned()))),
                    Err(_) => {
                        self.events.push_back(NodeEvent::Transfer(TransferEvent::BadMessage {
                            peer,
                            error: TransferError::Wire(crate::transfer::TransferWireError::Malformed("a sealed control message is not UTF-8".into())),
                        }));
                        None
                    }
                },
                Ok((_, range)) => Some(TransferInput::Opened(peer, frame, range)),
                Err(_) => None,
            },
            _ if self.keys.needs(&peer) => {
                warn!(peer = %peer.short(), "plaintext transfer message from a member of an encrypted room refused");
                self.events.push_back(NodeEvent::Transfer(TransferEvent::BadMessage { peer, error: TransferError::Unencrypted }));
                None
            }
            data => Some(TransferInput::Data(peer, data)),
        }
    }

    /// Takes everything on the transfer channel to the transfers (queued for the next flush).
    fn transfer_output(&mut self, fp: Fingerprint, output: PeerOutput) -> Option<PeerOutput> {
        match output {
            PeerOutput::Data { channel, data } if channel == TRANSFER_CHANNEL => {
                if let Some(input) = self.transfer_input(fp, data) {
                    self.transfer_inputs.push_back(input);
                    self.transfers_dirty = true;
                }
                None
            }
            PeerOutput::BufferedAmountLow(channel) if channel == TRANSFER_CHANNEL => {
                self.transfer_inputs.push_back(TransferInput::Writable(fp));
                self.transfers_dirty = true;
                None
            }
            PeerOutput::ChannelOpen(channel) if channel == TRANSFER_CHANNEL => {
                if !self.transfer_seen.insert(fp) {
                    // A new connection replaced one that had transfers going.
                    self.transfer_inputs.push_back(TransferInput::Reconnected(fp));
                }
                self.transfer_inputs.push_back(TransferInput::Writable(fp));
                self.transfers_dirty = true;
                None
            }
            PeerOutput::ChannelClosed(channel) if channel == TRANSFER_CHANNEL => {
                self.transfer_inputs.push_back(TransferInput::Lost(fp));
                self.transfers_dirty = true;
                None
            }
            PeerOutput::State(state @ (PeerState::Failed | PeerState::Closed)) => {
                // The connection is gone (its channels may not say so one by one).
                self.transfer_inputs.push_back(TransferInput::Lost(fp));
                self.transfers_dirty = true;
                Some(PeerOutput::State(state))
            }
            other => Some(other),
        }
    }

    /// After an input: the layers over the connections (rooms, transfers) act on what it
    /// changed.
    fn flush_layers(&mut self) {
        self.flush_rooms();
        self.flush_calls();
        self.flush_keys();
        self.flush_syncs();
        self.flush_transfers();
    }

    /// Keeps the end-to-end keys in step with the encrypted rooms' members, relays their
    /// exchange messages and moves their events out; a session that became ready lets the
    /// rooms and transfers waiting for it go on.
    fn flush_keys(&mut self) {
        let now = self.now;
        if !self.keys.is_empty() || self.rooms.any_encrypted() {
            let needed = self.rooms.encrypted_peers();
            self.keys.set_needed(now, &needed);
            for peer in std::mem::take(&mut self.rooms.restarted) {
                self.keys.reset(now, peer);
            }
        } else {
            self.rooms.restarted.clear();
        }
        while let Some((to, payload)) = self.keys.outbox.pop_front() {
            let Ok(payload) = RawValue::from_string(payload) else { continue };
            if let Err(e) = self.client.relay(to, &payload) {
                // Sent again on the exchange's timer.
                debug!(to = %to.short(), error = %e, "key exchange message not sent");
            }
        }
        while let Some(e) = self.keys.poll_event() {
            self.events.push_back(NodeEvent::Encryption(e));
        }
        let mut ready = false;
        while let Some(peer) = self.keys.ready.pop_front() {
            ready = true;
            self.transfer_inputs.push_back(TransferInput::Writable(peer));
            self.transfers_dirty = true;
        }
        if ready {
            self.rooms_dirty = true;
            self.flush_rooms();
        }
    }

    /// Hands received sync frames to the rooms' sync machines and their messages to the
    /// rooms; again (a few rounds) while that made the rooms deliver more.
    fn flush_syncs(&mut self) {
        if self.syncs.is_empty() {
            self.rooms.sync_inbox.clear();
            return;
        }
        for _ in 0..4 {
            let now = self.now;
            while let Some(frame) = self.rooms.sync_inbox.pop_front() {
                self.syncs.handle_frame(now, frame);
            }
            let sent = self.syncs.pump(now, &mut self.rooms);
            while let Some(e) = self.syncs.poll_event() {
                self.events.push_back(NodeEvent::Sync(e));
            }
            if !sent && self.rooms.sync_inbox.is_empty() {
                break;
            }
            self.rooms_dirty = true;
            self.flush_rooms();
        }
    }

    /// Applies what the connections said to the transfers, lets them send what they can and
    /// moves their events out; again while their sends drained more input (a few rounds).
    fn flush_transfers(&mut self) {
        if !self.transfers_dirty {
            return;
        }
        let now = self.now;
        let mut transfers = std::mem::replace(&mut self.transfers, Transfers::new(TransferConfig::default()));
        for _ in 0..8 {
            self.transfers_dirty = false;
            while let Some(input) = self.transfer_inputs.pop_front() {
                match input {
                    TransferInput::Data(fp, Payload::Text(t)) => transfers.handle_text(now, fp, &t),
                    TransferInput::Data(fp, Payload::Binary(b)) => transfers.handle_binary(now, fp, &b),
                    TransferInput::Opened(fp, b, range) => transfers.handle_binary(now, fp, &b[range]),
                    TransferInput::Writable(fp) => transfers.handle_writable(fp),
                    TransferInput::Reconnected(fp) => transfers.handle_reconnected(fp),
                    TransferInput::Lost(fp) => transfers.handle_disconnected(now, fp),
                }
            }
            transfers.flush(now, self);
            while let Some(e) = transfers.poll_event() {
                self.events.push_back(NodeEvent::Transfer(e));
            }
            if self.transfer_inputs.is_empty() {
                break;
            }
        }
        self.transfers = transfers;
    }

    fn is_room_event(&self, event: &ClientEvent) -> bool {
        match event {
            ClientEvent::RoomPeerJoined { room_id, .. }
            | ClientEvent::RoomPeerLeft { room_id, .. }
            | ClientEvent::RoomClosed { room_id }
            | ClientEvent::Kicked { room_id } => self.rooms.manages(room_id),
            ClientEvent::RoomRejoined { room, .. } => self.rooms.manages(&room.room_id),
            ClientEvent::Response { request, .. } => self.rooms.pending.contains_key(request),
            _ => false,
        }
    }

    /// Hands gathered input to the rooms, lets them send, and moves their events out; again
    /// while sending produced more input.
    fn flush_rooms(&mut self) {
        if !self.rooms_dirty && self.room_inputs.is_empty() {
            return;
        }
        let mut rooms = std::mem::take(&mut self.rooms);
        for _ in 0..8 {
            self.rooms_dirty = false;
            let now = self.now;
            while let Some(input) = self.room_inputs.pop_front() {
                match input {
                    RoomInput::Items { from, items, path, sealed } => rooms.handle_items(now, from, items, path, sealed),
                    RoomInput::Bad { from, error } => rooms.bad_input(from, error),
                    RoomInput::Direct { peer, open } => rooms.direct_changed(peer, open),
                    RoomInput::Lost { peer } => rooms.connection_lost(now, peer),
                    RoomInput::RelayRestored => rooms.relay_restored(),
                    RoomInput::DirectWritable { peer } => rooms.direct_writable(peer),
                    RoomInput::Client(event) => self.room_client_event(&mut rooms, event),
                }
            }
            // Sync frames that waited for room go out at once (one more pass, a few at most).
            for _ in 0..4 {
                rooms.flush(now, self);
                let mut again = false;
                while let Some(e) = rooms.poll_event() {
                    self.syncs.on_room_event(now, &e);
                    self.call_room_event(&e);
                    if let RoomEvent::Writable { room } = &e {
                        again |= self.syncs.writable(room, &mut rooms);
                    }
                    self.events.push_back(NodeEvent::Room(e));
                }
                if !again {
                    break;
                }
            }
            if self.room_inputs.is_empty() {
                break;
            }
        }
        self.rooms = rooms;
    }

    fn room_client_event(&mut self, rooms: &mut Rooms, event: ClientEvent) {
        let now = self.now;
        match event {
            ClientEvent::RoomPeerJoined { room_id, peer } => rooms.on_peer_joined(now, &room_id, peer),
            ClientEvent::RoomPeerLeft { room_id, fingerprint, kicked } => rooms.on_peer_left(&room_id, fingerprint, kicked),
            ClientEvent::RoomClosed { room_id } => rooms.remove(&room_id.clone(), Some(RoomEvent::Closed { room: room_id }), self),
            ClientEvent::Kicked { room_id } => rooms.remove(&room_id.clone(), Some(RoomEvent::Kicked { room: room_id }), self),
            ClientEvent::RoomRejoined { room, peers } => rooms.on_rejoined(now, room, peers),
            ClientEvent::Response { request, result } => match (rooms.pending.remove(&request), result) {
                (Some(Pending::Enter(_)), Ok(Response::RoomCreated(details))) => rooms.on_entered(now, details, Vec::new(), self),
                (Some(Pending::Enter(_)), Ok(Response::RoomJoined { room, peers })) => rooms.on_entered(now, room, peers, self),
                (Some(Pending::Enter(id)), Err(error)) => rooms.on_enter_failed(&id, error),
                (Some(Pending::Kick(room)), Err(error)) => {
                    self.events.push_back(NodeEvent::Room(RoomEvent::Error { room, error: RoomError::Request(error) }))
                }
                (_, result) => trace!(?result, "room request answered"),
            },
            other => self.events.push_back(NodeEvent::Signaling(other)),
        }
    }

    fn send_signal(&mut self, to: Fingerprint, signal: &Signal) {
        let Ok(payload) = RawValue::from_string(signal.encode()) else { return };
        if let Err(e) = self.client.relay(to, &payload) {
            // The outbox is full or the client gave up: the connection will time out.
            warn!(to = %to.short(), error = %e, "negotiation message not sent");
            self.events.push_back(NodeEvent::Signaling(ClientEvent::Error(e)));
        }
    }

    fn on_signal(&mut self, from: Fingerprint, signal: Signal) {
        if from == self.fingerprint() {
            return;
        }
        let existing = self.peers.get(&from).filter(|p| !p.is_terminal());
        match signal {
            Signal::Offer { session, sdp, key, sig } => {
                if let Some(peer) = existing {
                    if peer.session() == session {
                        let signal = Signal::Offer { session, sdp, key, sig };
                        self.with_peer(from, |peer, ctx| peer.handle_signal(signal, ctx));
                        return;
                    }
                    if peer.has_pending_offer() && peer.never_connected() && !peer.is_polite() {
                        // Glare: both called. The impolite side's offer wins; the polite side
                        // answers it, so this one is dropped.
                        debug!(from = %from.short(), "glare: keeping our offer");
                        return;
                    }
                    // Glare on the polite side, or the remote started over: answer the new
                    // session in place of ours.
                    debug!(from = %from.short(), %session, "replacing the connection with the remote's new session");
                    self.drop_peer_quietly(from);
                } else if !self.config.accept_incoming && !self.rooms.is_member(&from) {
                    self.send_signal(from, &Signal::Reject { session, reason: RejectReason::Refused });
                    return;
                } else if self.live_peers() >= self.config.max_peers {
                    self.send_signal(from, &Signal::Reject { session, reason: RejectReason::Busy });
                    return;
                }
                self.peers.remove(&from);
                let result = self.in_ctx(None, |_, ctx| Peer::answer(from, session, &sdp, &key, &sig, ctx));
                match result {
                    (Ok(peer), signals, outputs) => {
                        self.peers.insert(from, peer);
                        self.events.push_back(NodeEvent::Incoming { peer: from });
                        self.events.push_back(NodeEvent::PeerState { peer: from, state: PeerState::Connecting });
                        self.route(from, signals, outputs);
                    }
                    (Err(error), _, _) => {
                        let reason = match error {
                            PeerError::IdentityMismatch(_) => RejectReason::IdentityMismatch,
                            _ => RejectReason::BadDescription,
                        };
                        warn!(from = %from.short(), %error, "refusing an offer");
                        self.send_signal(from, &Signal::Reject { session, reason });
                        self.events.push_back(NodeEvent::PeerError { peer: from, error });
                    }
                }
            }
            other => {
                if existing.is_some() {
                    self.with_peer(from, |peer, ctx| peer.handle_signal(other, ctx));
                }
            }
        }
    }

    /// Ends a connection that is being replaced (its remote started a new session); its
    /// channels close and, if it was ever up, it closes, as far as the application sees.
    fn drop_peer_quietly(&mut self, fp: Fingerprint) {
        self.with_peer(fp, |peer, ctx| peer.abandon(ctx));
        self.peers.remove(&fp);
    }

    fn live_peers(&self) -> usize {
        self.peers.values().filter(|p| !p.is_terminal()).count()
    }

    /// Starts a direct connection to `peer` (an offer through the signaling relay). Does
    /// nothing if a live connection exists. Progress arrives as [`NodeEvent::PeerState`].
    pub fn connect_to_peer(&mut self, now: Instant, peer: Fingerprint) -> Result<(), NodeError> {
        self.begin(now)?;
        if peer == self.fingerprint() {
            return Err(NodeError::SelfConnect);
        }
        if self.peers.get(&peer).is_some_and(|p| !p.is_terminal()) {
            return Ok(());
        }
        if self.live_peers() >= self.config.max_peers {
            return Err(NodeError::TooManyPeers(self.config.max_peers));
        }
        let (new, signals, outputs) = self.in_ctx(None, |_, ctx| Peer::offer(peer, ctx));
        let new = new?;
        self.peers.insert(peer, new);
        self.events.push_back(NodeEvent::PeerState { peer, state: PeerState::Connecting });
        self.route(peer, signals, outputs);
        Ok(())
    }

    /// Returns a view of the connection to `peer`.
    pub fn get_peer(&self, peer: &Fingerprint) -> Option<PeerView> {
        let p = self.peers.get(peer)?;
        Some(PeerView {
            fingerprint: *peer,
            state: p.state(),
            session: p.session().to_string(),
            channels: p.open_channels().map(str::to_owned).collect(),
            offerer: p.is_offerer(),
            max_message_size: p.max_message_size(),
            tracks: p.tracks(),
        })
    }

    /// Returns the peers this node has connections to (in any state).
    pub fn peers(&self) -> impl Iterator<Item = Fingerprint> + '_ {
        self.peers.keys().copied()
    }

    fn send_raw(&mut self, now: Instant, peer: Fingerprint, channel: Option<&str>, binary: bool, data: &[u8]) -> Result<(), NodeError> {
        self.begin(now)?;
        if !self.peers.contains_key(&peer) {
            return Err(SendError::UnknownPeer(peer).into());
        }
        let label = channel.unwrap_or(DEFAULT_CHANNEL);
        let mut result = Ok(());
        self.with_peer(peer, |p, ctx| result = p.send(label, binary, data, ctx));
        Ok(result?)
    }

    /// Sends `value` as JSON text on `channel` (the default channel when `None`).
    pub fn send<T: Serialize + ?Sized>(&mut self, now: Instant, peer: Fingerprint, channel: Option<&str>, value: &T) -> Result<(), NodeError> {
        let text = serde_json::to_string(value).map_err(|e| SendError::Serialize(e.to_string()))?;
        self.send_raw(now, peer, channel, false, text.as_bytes())
    }

    /// Sends a text message on `channel` (the default channel when `None`).
    pub fn send_text(&mut self, now: Instant, peer: Fingerprint, channel: Option<&str>, text: &str) -> Result<(), NodeError> {
        self.send_raw(now, peer, channel, false, text.as_bytes())
    }

    /// Sends a binary message on `channel` (the default channel when `None`).
    pub fn send_binary(&mut self, now: Instant, peer: Fingerprint, channel: Option<&str>, data: &[u8]) -> Result<(), NodeError> {
        self.send_raw(now, peer, channel, true, data)
    }

    /// Opens a named channel to `peer`; [`NodeEvent::ChannelOpen`] follows on both sides.
    pub fn create_data_channel(&mut self, now: Instant, peer: Fingerprint, options: ChannelOptions) -> Result<(), NodeError> {
        self.begin(now)?;
        if !self.peers.contains_key(&peer) {
            return Err(ChannelError::UnknownPeer(peer).into());
        }
        let mut result = Ok(());
        self.with_peer(peer, |p, ctx| result = p.create_channel(&options, ctx));
        Ok(result?)
    }

    /// Bytes written on `channel` to `peer` and not yet acknowledged.
    pub fn buffered_amount(&mut self, peer: &Fingerprint, channel: Option<&str>) -> Option<usize> {
        self.peers.get_mut(peer)?.buffered_amount(channel.unwrap_or(DEFAULT_CHANNEL))
    }

    /// Restarts ICE with `peer` (new credentials, the same DTLS session and channels).
    pub fn restart_ice(&mut self, now: Instant, peer: Fingerprint) -> Result<(), NodeError> {
        self.begin(now)?;
        if !self.peers.contains_key(&peer) {
            return Err(SendError::UnknownPeer(peer).into());
        }
        self.with_peer(peer, |p, ctx| p.restart_ice(ctx));
        Ok(())
    }

    // ---- media --------------------------------------------------------------------------

    /// Runs a media command on the connection to `peer`.
    fn media_command<T>(&mut self, now: Instant, peer: Fingerprint, f: impl FnOnce(&mut Peer, &mut Ctx<'_, ChaCha20Rng>) -> Result<T, MediaError>) -> Result<T, NodeError> {
        self.begin(now)?;
        if self.peers.get(&peer).is_none_or(|p| p.is_terminal()) {
            return Err(SendError::UnknownPeer(peer).into());
        }
        let mut result = None;
        self.with_peer(peer, |p, ctx| result = Some(f(p, ctx)));
        Ok(result.expect("the peer exists")?)
    }

    /// Adds an audio or video track to the connection to `peer` (see [`crate::peer::media`]):
    /// a renegotiation, after which [`MediaEvent::TrackAdded`] (with `local: true`) says
    /// frames may be written. Returns its id.
    pub fn add_track(&mut self, now: Instant, peer: Fingerprint, options: TrackOptions) -> Result<TrackId, NodeError> {
        self.media_command(now, peer, |p, ctx| p.add_track(options, ctx))
    }

    /// Mutes (`true`) or unmutes one of this side's tracks: the remote sees it
    /// ([`MediaEvent::Muted`]); frames written while muted are dropped.
    pub fn set_track_muted(&mut self, now: Instant, peer: Fingerprint, track: &TrackId, muted: bool) -> Result<(), NodeError> {
        self.media_command(now, peer, |p, ctx| p.set_track_muted(track, muted, ctx))
    }

    /// Removes one of this side's tracks (the remote sees [`MediaEvent::TrackRemoved`]).
    pub fn remove_track(&mut self, now: Instant, peer: Fingerprint, track: &TrackId) -> Result<(), NodeError> {
        self.media_command(now, peer, |p, ctx| p.remove_track(track, ctx))
    }

    /// Sends an encoded frame on one of this side's tracks. Returns whether it went:
    /// `false` while the track is muted or not negotiated yet, or the connection is not up.
    pub fn write_frame(&mut self, now: Instant, peer: Fingerprint, track: &TrackId, frame: MediaFrame) -> Result<bool, NodeError> {
        self.media_command(now, peer, |p, ctx| p.write_frame(track, frame, ctx))
    }

    /// Asks `peer` for a keyframe on one of its tracks (after a loss:
    /// [`ReceivedFrame::contiguous`](crate::peer::media::ReceivedFrame) is `false`).
    pub fn request_keyframe(&mut self, now: Instant, peer: Fingerprint, track: &TrackId) -> Result<(), NodeError> {
        self.media_command(now, peer, |p, ctx| p.request_keyframe(track, ctx))
    }

    /// Closes the connection to `peer` (the remote sees `Closed` too).
    pub fn close_peer(&mut self, now: Instant, peer: Fingerprint) -> Result<(), NodeError> {
        self.begin(now)?;
        self.with_peer(peer, |p, ctx| p.close(ctx));
        Ok(())
    }

    /// Closes every connection and disconnects from the signaling server.
    pub fn close(&mut self, now: Instant) -> Result<(), NodeError> {
        self.begin(now)?;
        let all: Vec<Fingerprint> = self.peers.keys().copied().collect();
        for fp in all {
            self.with_peer(fp, |p, ctx| p.close(ctx));
        }
        for t in &mut self.turns {
            t.close(now);
        }
        self.pump_turns();
        self.client.disconnect(now)?;
        self.pump_client();
        Ok(())
    }
}

/// Sends a connection's datagram from our relayed address `turn.relayed()`: through a
/// channel, once bound, else in a Send indication. A peer address without a permission gets
/// one asked for and this datagram is dropped (ICE sends its checks again; the permission is
/// there by then); its channel is asked for once the permission holds.
fn relay_through(turn: &mut TurnClient, now: Instant, d: Datagram, transmits: &mut VecDeque<NodeTransmit>) {
    let peer = d.destination;
    let result = if !turn.has_permission(now, peer.ip()) {
        turn.create_permission(now, peer.ip())
    } else {
        if turn.channel(now, peer).is_none() {
            if let Err(e) = turn.bind_channel(now, peer) {
                trace!(%peer, error = %e, "no TURN channel");
            }
        }
        turn.send_to(now, peer, &d.contents)
    };
    if let Err(e) = result {
        trace!(%peer, error = %e, "datagram not relayed");
    }
    while let Some(t) = turn.poll_transmit() {
        transmits.push_back(NodeTransmit::Datagram(t));
    }
}

/// Managed rooms (see [`crate::room`]). Events arrive as [`NodeEvent::Room`].
impl Node {
    /// Creates a room owned by this node and enters it ([`RoomEvent::Joined`] follows, or
    /// [`RoomEvent::Error`] with the server's refusal, e.g. `room_exists`).
    pub fn create_room(&mut self, now: Instant, room: &str, options: RoomOptions) -> Result<(), NodeError> {
        self.begin(now)?;
        self.rooms.check_joined(room).err().ok_or_else(|| RoomError::AlreadyJoined(room.to_owned()))?;
        let request = self.client.create_room(now, room, options.max_size, options.metadata.as_ref())?;
        self.enter(room, request, options.encrypted)
    }

    /// Joins a room and connects to every member ([`RoomEvent::Joined`] follows, or
    /// [`RoomEvent::Error`] with the server's refusal: `room_not_found`, `room_full`).
    pub fn join_room(&mut self, now: Instant, room: &str) -> Result<(), NodeError> {
        self.join_room_with(now, room, JoinOptions::default())
    }

    /// Joins a room as [`Node::join_room`] does, with options (an encrypted room:
    /// [`JoinOptions::encrypted`]).
    pub fn join_room_with(&mut self, now: Instant, room: &str, options: JoinOptions) -> Result<(), NodeError> {
        self.begin(now)?;
        self.rooms.check_joined(room).err().ok_or_else(|| RoomError::AlreadyJoined(room.to_owned()))?;
        let request = self.client.join_room(now, room)?;
        self.enter(room, request, options.encrypted)
    }

    fn enter(&mut self, room: &str, request: RequestId, encrypted: bool) -> Result<(), NodeError> {
        self.rooms.entering(self.now, room, request, encrypted)?;
        self.rooms_dirty = true;
        self.flush_rooms();
        Ok(())
    }

    /// Leaves a room (the owner closes it for everyone instead, as the reference's `close`).
    /// Messages not yet acknowledged are dropped. [`RoomEvent::Closed`] follows.
    pub fn leave_room(&mut self, now: Instant, room: &str) -> Result<(), NodeError> {
        self.begin(now)?;
        if self.rooms.is_owner(room)? {
            self.client.close_room(now, room)?;
        } else {
            self.client.leave_room(now, room)?;
        }
        let mut rooms = std::mem::take(&mut self.rooms);
        rooms.remove(room, Some(RoomEvent::Closed { room: room.to_owned() }), self);
        self.rooms = rooms;
        self.rooms_dirty = true;
        self.flush_rooms();
        Ok(())
    }

    /// Removes `peer` from a room this node owns ([`RoomError::NotOwner`] otherwise,
    /// [`RoomError::NotMember`] for a stranger; nothing is sent then).
    pub fn kick(&mut self, now: Instant, room: &str, peer: Fingerprint) -> Result<(), NodeError> {
        self.begin(now)?;
        self.rooms.check_kick(room, &peer)?;
        let request = self.client.kick(now, room, peer)?;
        self.rooms.pending.insert(request, Pending::Kick(room.to_owned()));
        Ok(())
    }

    /// Sends `data` to every member of `room` (`to: None`) or to one, on the direct path when
    /// it is up and through the relay otherwise; delivered once and in order either way.
    pub fn room_send(&mut self, now: Instant, room: &str, to: Option<Fingerprint>, data: RoomData) -> Result<(), NodeError> {
        self.room_send_via(now, room, to, data, false)
    }

    /// Sends `value` as JSON (see [`Node::room_send`]).
    pub fn room_send_json<T: Serialize + ?Sized>(&mut self, now: Instant, room: &str, to: Option<Fingerprint>, value: &T) -> Result<(), NodeError> {
        let data = RoomData::json(value).map_err(|e| RoomError::Serialize(e.to_string()))?;
        self.room_send_via(now, room, to, data, false)
    }

    /// Sends `data` to every member through the signaling server even where a direct path
    /// is up (the reference's `broadcastViaServer`), in order with the rest of the stream.
    pub fn room_broadcast_via_server(&mut self, now: Instant, room: &str, data: RoomData) -> Result<(), NodeError> {
        self.room_send_via(now, room, None, data, true)
    }

    fn room_send_via(&mut self, now: Instant, room: &str, to: Option<Fingerprint>, data: RoomData, relay: bool) -> Result<(), NodeError> {
        self.begin(now)?;
        if matches!(data, RoomData::Sync(_)) {
            return Err(RoomError::Serialize("sync frames are the sync layer's: use the state and document methods".into()).into());
        }
        self.rooms.send(room, to, data, relay)?;
        self.rooms_dirty = true;
        self.flush_rooms();
        Ok(())
    }

    /// Sets this node's presence state in `room` (cursor, typing, status; `None` clears it).
    /// Members hear of it at most every [`RoomsConfig::presence_interval`] (the latest
    /// state wins) and forget it after [`RoomsConfig::presence_ttl`] without a refresh, which
    /// this node sends on its own while it stays.
    pub fn set_presence(&mut self, now: Instant, room: &str, state: Option<&serde_json::Value>) -> Result<(), NodeError> {
        self.begin(now)?;
        self.rooms.set_presence(room, state)?;
        self.rooms_dirty = true;
        self.flush_rooms();
        Ok(())
    }

    /// Returns a view of a room this node is in.
    pub fn room(&self, room: &str) -> Option<RoomView> {
        self.rooms.view(room)
    }

    /// Returns the rooms this node is in.
    pub fn rooms(&self) -> impl Iterator<Item = &str> {
        self.rooms.ids()
    }
}

/// File, JSON and image transfers (see [`crate::transfer`]). Events arrive as
/// [`NodeEvent::Transfer`]. The bytes come from a [`ChunkSource`] and go to a [`ChunkSink`]
/// (or memory), or the application reads and writes them itself
/// ([`TransferEvent::Read`] / [`Node::provide_chunk`], [`TransferEvent::Write`]).
impl Node {
    /// Offers `file` to `peer` (connected or not yet: the offer goes when the connection is
    /// up); its bytes are asked for with [`TransferEvent::Read`]. Returns the transfer id.
    pub fn send_file(&mut self, now: Instant, peer: Fingerprint, file: FileInfo) -> Result<u64, NodeError> {
        self.transfer_command(now, |t| t.offer(peer, file))
    }

    /// Offers `file` to `peer`, its bytes read from `source` as the channel takes them.
    /// `file.sha256` must be the hash of all of them: the receiver checks it.
    pub fn send_from(&mut self, now: Instant, peer: Fingerprint, file: FileInfo, source: Box<dyn ChunkSource>) -> Result<u64, NodeError> {
        self.transfer_command(now, |t| t.offer_from(peer, file, source))
    }

    /// Offers bytes from memory as a file named `name`; images are recognised by their first
    /// bytes ([`crate::transfer::image_mime`]) and offered as [`TransferKind::Image`] (the
    /// reference's `ImageTransfer`).
    pub fn send_bytes(&mut self, now: Instant, peer: Fingerprint, name: &str, data: Vec<u8>) -> Result<u64, NodeError> {
        let info = FileInfo::new(name, data.len() as u64, Sha256::digest(&data).into());
        let info = match crate::transfer::image_mime(&data) {
            Some(mime) => info.typed(mime, TransferKind::Image),
            None => info,
        };
        self.send_from(now, peer, info, Box::new(data))
    }

    /// Sends a JSON value (the reference's `JSONTransfer`), chunked like a file: any size,
    /// with backpressure. Up to the receiver's
    /// [`TransferConfig::auto_accept_json`](crate::transfer::TransferConfig::auto_accept_json)
    /// it is taken without asking and arrives as [`TransferEvent::Json`].
    pub fn send_json<T: serde::Serialize + ?Sized>(&mut self, now: Instant, peer: Fingerprint, value: &T) -> Result<u64, NodeError> {
        let data = serde_json::to_vec(value).map_err(|e| NodeError::Transfer(TransferError::BadJson(e.to_string())))?;
        let info = FileInfo::new("value.json", data.len() as u64, Sha256::digest(&data).into()).typed("application/json", TransferKind::Json);
        self.send_from(now, peer, info, Box::new(data))
    }

    /// Accepts an offered transfer into `sink`: written as chunks arrive, committed once the
    /// whole verified, aborted on failure.
    pub fn accept_into(&mut self, now: Instant, peer: Fingerprint, id: u64, sink: Box<dyn ChunkSink>) -> Result<(), NodeError> {
        self.transfer_command(now, |t| t.accept_into(peer, id, sink))
    }

    /// Accepts an offered transfer into memory; it arrives whole as
    /// [`TransferEvent::Received`].
    pub fn accept_to_memory(&mut self, now: Instant, peer: Fingerprint, id: u64) -> Result<(), NodeError> {
        self.transfer_command(now, |t| t.accept_to_memory(peer, id))
    }

    /// Hands over the bytes a [`TransferEvent::Read`] asked for.
    pub fn provide_chunk(&mut self, now: Instant, peer: Fingerprint, id: u64, offset: u64, data: Vec<u8>) -> Result<(), NodeError> {
        self.transfer_command(now, |t| t.provide(peer, id, offset, data))
    }

    /// Accepts an offered transfer; its bytes arrive as [`TransferEvent::Write`].
    pub fn accept_transfer(&mut self, now: Instant, peer: Fingerprint, id: u64) -> Result<(), NodeError> {
        self.transfer_command(now, |t| t.accept(peer, id))
    }

    /// Declines an offered transfer.
    pub fn reject_transfer(&mut self, now: Instant, peer: Fingerprint, id: u64, reason: &str) -> Result<(), NodeError> {
        self.transfer_command(now, |t| t.reject(peer, id, reason))
    }

    /// Stops a transfer in either direction.
    pub fn cancel_transfer(&mut self, now: Instant, peer: Fingerprint, id: u64, reason: &str) -> Result<(), NodeError> {
        self.transfer_command(now, |t| t.cancel(peer, id, reason))
    }

    /// Runs a transfer command, then lets the transfers act on it.
    fn transfer_command<T>(&mut self, now: Instant, f: impl FnOnce(&mut Transfers) -> Result<T, TransferError>) -> Result<T, NodeError> {
        self.begin(now)?;
        let result = f(&mut self.transfers)?;
        self.transfers_dirty = true;
        self.flush_transfers();
        Ok(result)
    }
}

impl Node {
    /// Sends a transfer message to a peer that shares an encrypted room: sealed, as a binary
    /// frame; the channel counts as full until the session is ready (the transfers wait for
    /// the writable notice that follows [`EncryptionEvent::Ready`]).
    fn send_sealed_transfer(&mut self, peer: Fingerprint, kind: u8, payload: &[u8]) -> Result<(), SendError> {
        if !self.keys.is_ready(&peer) {
            return Err(SendError::WouldBlock { buffered: 0 });
        }
        // Chunks are held to the send window: one it would refuse is not sealed for nothing.
        // (One refused all the same spends a counter: a gap the replay window skips.)
        let windowed = kind == room::keys::FRAME_BINARY;
        if windowed {
            let p = self.peers.get_mut(&peer).ok_or(SendError::UnknownPeer(peer))?;
            p.check_window(TRANSFER_CHANNEL, payload.len() + RoomKeys::FRAME_OVERHEAD)?;
        }
        let mut frame = std::mem::take(&mut self.sealed_frame);
        if !self.keys.seal_frame_into(&peer, kind, payload, &mut frame) {
            self.sealed_frame = frame;
            return Err(SendError::WouldBlock { buffered: 0 });
        }
        let mut result = Err(SendError::UnknownPeer(peer));
        self.with_peer(peer, |p, ctx| result = p.send_with(TRANSFER_CHANNEL, true, &frame, windowed, ctx));
        self.sealed_frame = frame;
        result
    }
}

impl TransferTransport for Node {
    fn send_text(&mut self, peer: Fingerprint, text: &str) -> Result<(), SendError> {
        if !self.peers.get(&peer).is_some_and(|p| p.channel_open(TRANSFER_CHANNEL)) {
            return Err(SendError::ChannelNotOpen(TRANSFER_CHANNEL.into()));
        }
        if self.keys.needs(&peer) {
            return self.send_sealed_transfer(peer, room::keys::FRAME_TEXT, text.as_bytes());
        }
        let mut result = Err(SendError::UnknownPeer(peer));
        self.with_peer(peer, |p, ctx| result = p.send_with(TRANSFER_CHANNEL, false, text.as_bytes(), false, ctx));
        result
    }

    fn send_binary(&mut self, peer: Fingerprint, frame: &[u8]) -> Result<(), SendError> {
        if !self.peers.get(&peer).is_some_and(|p| p.channel_open(TRANSFER_CHANNEL)) {
            return Err(SendError::ChannelNotOpen(TRANSFER_CHANNEL.into()));
        }
        if self.keys.needs(&peer) {
            return self.send_sealed_transfer(peer, room::keys::FRAME_BINARY, frame);
        }
        let mut result = Err(SendError::UnknownPeer(peer));
        self.with_peer(peer, |p, ctx| result = p.send(TRANSFER_CHANNEL, true, frame, ctx));
        result
    }
}

impl Transport for Node {
    fn direct_open(&self, peer: &Fingerprint) -> bool {
        self.peers.get(peer).is_some_and(|p| p.state() == PeerState::Connected && p.channel_open(INTERNAL_CHANNEL))
    }

    fn sealed_ready(&self, peer: &Fingerprint) -> bool {
        self.keys.is_ready(peer)
    }

    fn send_direct(&mut self, peer: Fingerprint, text: &str, control: bool, seal: bool) -> Result<(), SendError> {
        let sealed;
        let text = if seal {
            // The rooms only seal for a peer whose session is ready; should it not be, the
            // batch stays unsent (not `WouldBlock`: nothing would say when to try again).
            sealed = self.keys.seal_batch(&peer, text).ok_or_else(|| SendError::ChannelNotOpen(INTERNAL_CHANNEL.into()))?;
            &sealed
        } else {
            text
        };
        let mut result = Err(SendError::UnknownPeer(peer));
        self.with_peer(peer, |p, ctx| result = p.send_with(INTERNAL_CHANNEL, false, text.as_bytes(), !control, ctx));
        result
    }

    fn relay_ready(&self) -> bool {
        self.client.is_registered()
    }

    fn send_relay(&mut self, to: Fingerprint, body: &str, seal: bool) -> bool {
        let sealed;
        let body = if seal {
            match self.keys.seal_batch(&to, body) {
                Some(s) => {
                    sealed = s;
                    &sealed
                }
                None => return false,
            }
        } else {
            body
        };
        let payload = room::wire::encode_relayed(&self.identity, &mut self.rng, &to, body);
        let Ok(payload) = RawValue::from_string(payload) else { return false };
        match self.client.relay(to, &payload) {
            Ok(()) => true,
            Err(e) => {
                debug!(to = %to.short(), error = %e, "room relay not sent");
                false
            }
        }
    }

    fn has_connection(&self, peer: &Fingerprint) -> bool {
        self.peers.get(peer).is_some_and(|p| !p.is_terminal())
    }

    fn connect(&mut self, peer: Fingerprint) {
        if let Err(e) = self.connect_to_peer(self.now, peer) {
            debug!(peer = %peer.short(), error = %e, "room member not called");
        }
    }

    fn close_peer(&mut self, peer: Fingerprint) {
        self.with_peer(peer, |p, ctx| p.close(ctx));
    }
}

/// Calls on rooms (see [`crate::room::call`]): the reference's `DirectMedia` and
/// `GroupMedia`. Events arrive as [`NodeEvent::Call`] and [`NodeEvent::Media`].
impl Node {
    /// Starts a call in `room` (joined): `config`'s sources go to every member, now and
    /// later ([`CallEvent::LocalStream`]). Starting again changes what is sent.
    pub fn start_call(&mut self, now: Instant, room: &str, config: CallConfig) -> Result<(), NodeError> {
        self.begin(now)?;
        self.rooms.check_joined(room)?;
        let call = self.calls.entry(room.to_owned()).or_insert_with(|| Call::new(config));
        call.config = config;
        let sources = call.sources();
        self.events.push_back(NodeEvent::Call(CallEvent::LocalStream { room: room.to_owned(), sources }));
        self.calls_dirty = true;
        self.flush_calls();
        Ok(())
    }

    fn call_mut(&mut self, room: &str) -> Result<&mut Call, NodeError> {
        self.calls.get_mut(room).ok_or_else(|| MediaError::NoCall(room.to_owned()).into())
    }

    /// Mutes (`true`) or unmutes one source of the call in `room` for every member (the
    /// reference's `muteAudio`, `unmuteVideo`, ...).
    pub fn set_call_muted(&mut self, now: Instant, room: &str, source: Source, muted: bool) -> Result<(), NodeError> {
        self.begin(now)?;
        let call = self.call_mut(room)?;
        if muted {
            call.muted.insert(source);
        } else {
            call.muted.remove(&source);
        }
        self.calls_dirty = true;
        self.flush_calls();
        Ok(())
    }

    /// Starts (`true`) or stops sharing a screen in the call in `room`: one more video
    /// track, [`Source::Screen`].
    pub fn set_screen_share(&mut self, now: Instant, room: &str, on: bool) -> Result<(), NodeError> {
        self.begin(now)?;
        self.call_mut(room)?.screen = on;
        self.calls_dirty = true;
        self.flush_calls();
        Ok(())
    }

    /// Sends an encoded frame of `source` to every member of the call in `room` (encoded
    /// once). Returns to how many it went (members whose connection is up and whose track
    /// is negotiated and not muted).
    pub fn send_call_frame(&mut self, now: Instant, room: &str, source: Source, frame: MediaFrame) -> Result<usize, NodeError> {
        self.begin(now)?;
        let call = self.calls.get(room).ok_or_else(|| MediaError::NoCall(room.to_owned()))?;
        if !call.sources().contains(&source) {
            return Err(MediaError::UnknownTrack(source.track_id()).into());
        }
        let track = source.track_id();
        let mut sent = 0;
        for peer in self.members_of(room) {
            if !self.peers.get(&peer).is_some_and(|p| p.state() == PeerState::Connected) {
                continue;
            }
            let mut result = Ok(false);
            let frame = frame.clone();
            self.with_peer(peer, |p, ctx| result = p.write_frame(&track, frame, ctx));
            match result {
                Ok(true) => sent += 1,
                Ok(false) | Err(MediaError::UnknownTrack(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(sent)
    }

    /// Ends the call in `room` (the reference's `close`): its tracks are removed from every
    /// member's connection (unless another call with that member uses them); the room
    /// stays. Leaving the room ends it too.
    pub fn end_call(&mut self, now: Instant, room: &str) -> Result<(), NodeError> {
        self.begin(now)?;
        let call = self.calls.remove(room).ok_or_else(|| MediaError::NoCall(room.to_owned()))?;
        for peer in call.remote.into_keys() {
            self.events.push_back(NodeEvent::Call(CallEvent::RemoteStreamRemoved { room: room.to_owned(), peer }));
        }
        self.calls_dirty = true;
        self.flush_calls();
        Ok(())
    }

    /// Brings every member connection's call tracks in line with the calls: adds what is
    /// missing (once the connection is up), mutes and unmutes, removes what no call wants.
    fn flush_calls(&mut self) {
        if !std::mem::take(&mut self.calls_dirty) {
            return;
        }
        let mut wanted: BTreeMap<Fingerprint, BTreeMap<Source, bool>> = BTreeMap::new();
        for (room, call) in &self.calls {
            for peer in self.rooms.view(room).map(|v| v.members.into_iter().map(|m| m.info.fingerprint).collect::<Vec<_>>()).unwrap_or_default() {
                let want = wanted.entry(peer).or_default();
                for source in call.sources() {
                    // Sent unmuted if any call with that member wants it so.
                    let muted = call.muted.contains(&source);
                    want.entry(source).and_modify(|m| *m &= muted).or_insert(muted);
                }
            }
        }
        let peers: Vec<Fingerprint> = self.peers.iter().filter(|(_, p)| p.state() == PeerState::Connected).map(|(fp, _)| *fp).collect();
        for peer in peers {
            let want = wanted.remove(&peer).unwrap_or_default();
            // Every change to this connection's call tracks in one offer.
            self.with_peer(peer, |p, ctx| {
                p.change_tracks(ctx, |media, random| {
                    for source in [Source::Audio, Source::Video, Source::Screen] {
                        let id = source.track_id();
                        let result = match (want.get(&source), media.has_local(&id)) {
                            (Some(&muted), true) => media.set_muted(&id, muted),
                            (Some(&muted), false) => media.add(source.options(muted), random).map(drop),
                            (None, true) => media.remove(&id),
                            (None, false) => Ok(()),
                        };
                        if let Err(e) = result {
                            warn!(?source, error = %e, "call track not set up");
                        }
                    }
                })
            });
        }
    }

    /// A member's tracks came or went: its stream in each call it is in.
    fn call_media_event(&mut self, peer: Fingerprint, event: &MediaEvent) {
        if self.calls.is_empty() {
            return;
        }
        let rooms: Vec<String> = self.calls.keys().filter(|r| self.rooms.view(r).is_some_and(|v| v.members.iter().any(|m| m.info.fingerprint == peer))).cloned().collect();
        for room in rooms {
            let call = self.calls.get_mut(&room).expect("listed");
            match event {
                MediaEvent::TrackAdded { track, .. } if !track.local => {
                    let tracks = call.remote.entry(peer).or_default();
                    let first = tracks.is_empty();
                    tracks.push(track.clone());
                    if first {
                        let tracks = tracks.clone();
                        self.events.push_back(NodeEvent::Call(CallEvent::RemoteStream { room, peer, tracks }));
                    }
                }
                MediaEvent::TrackRemoved { track, .. } => {
                    if let Some(tracks) = call.remote.get_mut(&peer) {
                        tracks.retain(|t| &t.id != track);
                        if tracks.is_empty() {
                            call.remote.remove(&peer);
                            self.events.push_back(NodeEvent::Call(CallEvent::RemoteStreamRemoved { room, peer }));
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Membership changed: calls follow (members that left lose their stream; a room left
    /// ends its call).
    fn call_room_event(&mut self, event: &RoomEvent) {
        if self.calls.is_empty() {
            return;
        }
        match event {
            RoomEvent::PeerLeft { room, peer, .. } if self.calls.get_mut(room).is_some_and(|c| c.remote.remove(peer).is_some()) => {
                self.events.push_back(NodeEvent::Call(CallEvent::RemoteStreamRemoved { room: room.clone(), peer: *peer }));
            }
            RoomEvent::Closed { room } | RoomEvent::Kicked { room } => {
                if let Some(call) = self.calls.remove(room) {
                    for peer in call.remote.into_keys() {
                        self.events.push_back(NodeEvent::Call(CallEvent::RemoteStreamRemoved { room: room.clone(), peer }));
                    }
                }
            }
            _ => {}
        }
        self.calls_dirty = true;
    }
}

/// Shared state over rooms (see [`crate::sync`]): a key-value map ordered by hybrid logical
/// clocks, and yrs documents. Events arrive as [`NodeEvent::Sync`]. Wall-clock time for the
/// clocks is the `unix_ms` given to [`Node::new`] plus the time since, so it never steps
/// back.
impl Node {
    fn members_of(&self, room: &str) -> Vec<Fingerprint> {
        self.rooms.view(room).map(|v| v.members.iter().map(|m| m.info.fingerprint).collect()).unwrap_or_default()
    }

    /// Starts key-value sync in `room` (the reference's `new StateSync(..).start()`). The
    /// room may be joined before or after; every member (and every later one) takes part
    /// in the digest exchange. Starting twice keeps the first.
    pub fn sync_state(&mut self, now: Instant, room: &str, config: StateConfig) -> Result<(), NodeError> {
        self.begin(now)?;
        let members = self.members_of(room);
        if !self.syncs.start_state(self.now, room, config, &members) {
            debug!(%room, "state sync already started");
        }
        self.flush_syncs();
        Ok(())
    }

    /// Returns the key-value state of `room` (`get`, `get_all`, ...), if synced.
    pub fn state(&self, room: &str) -> Option<&StateSync> {
        self.syncs.state(room)
    }

    fn state_mut(&mut self, room: &str) -> Result<&mut StateSync, NodeError> {
        self.syncs.state_mut(room).ok_or_else(|| SyncError::NotSynced(room.to_owned()).into())
    }

    /// Sets `key` to `value` in `room`'s state; members hear of it within
    /// [`StateConfig::batch_delay`].
    pub fn state_set<T: Serialize + ?Sized>(&mut self, now: Instant, room: &str, key: &str, value: &T) -> Result<(), NodeError> {
        self.begin(now)?;
        let value = serde_json::to_value(value).map_err(|e| SyncError::Serialize(e.to_string()))?;
        let (now, unix_ms) = (self.now, self.syncs.unix_ms(self.now));
        self.state_mut(room)?.set(now, unix_ms, key, value)?;
        self.flush_syncs();
        Ok(())
    }

    /// Deletes `key` from `room`'s state. Returns whether it was there.
    pub fn state_delete(&mut self, now: Instant, room: &str, key: &str) -> Result<bool, NodeError> {
        self.begin(now)?;
        let (now, unix_ms) = (self.now, self.syncs.unix_ms(self.now));
        let live = self.state_mut(room)?.delete(now, unix_ms, key)?;
        self.flush_syncs();
        Ok(live)
    }

    /// Starts document sync in `room` (the reference's `new CRDTSync(..).start()`); open
    /// documents with [`Node::crdt_edit`] or through [`Node::crdt_mut`].
    pub fn sync_crdt(&mut self, now: Instant, room: &str, config: CrdtConfig) -> Result<(), NodeError> {
        self.begin(now)?;
        let members = self.members_of(room);
        if !self.syncs.start_crdt(self.now, room, config, &members) {
            debug!(%room, "document sync already started");
        }
        self.flush_syncs();
        Ok(())
    }

    /// Returns `room`'s documents, if synced.
    pub fn crdt(&self, room: &str) -> Option<&CrdtSync> {
        self.syncs.crdt(room)
    }

    /// Returns `room`'s documents for opening and editing. Edits made through yrs
    /// transactions are sent at the node's next turn: [`Node::poll_timeout`] returns the
    /// current time while some wait, so the adapter's next `handle_timeout` sends them.
    pub fn crdt_mut(&mut self, room: &str) -> Option<&mut CrdtSync> {
        self.syncs.crdt_mut(room)
    }

    /// Opens document `doc` of `room` (creating it) and runs `edit` on it; the changes go
    /// out at once.
    pub fn crdt_edit<R>(&mut self, now: Instant, room: &str, doc: &str, edit: impl FnOnce(&yrs::Doc) -> R) -> Result<R, NodeError> {
        self.begin(now)?;
        let now = self.now;
        let crdt = self.syncs.crdt_mut(room).ok_or_else(|| SyncError::NotSynced(room.to_owned()))?;
        let out = edit(crdt.open(now, doc)?);
        crdt.flush(now);
        self.flush_syncs();
        Ok(out)
    }

    /// Sets this node's awareness state (cursor, selection, name) for document `doc` of
    /// `room`; `None` clears it.
    pub fn set_awareness(&mut self, now: Instant, room: &str, doc: &str, state: Option<serde_json::Value>) -> Result<(), NodeError> {
        self.begin(now)?;
        let now = self.now;
        let crdt = self.syncs.crdt_mut(room).ok_or_else(|| SyncError::NotSynced(room.to_owned()))?;
        crdt.set_awareness(now, doc, state)?;
        self.flush_syncs();
        Ok(())
    }

    /// Stops state and document sync in `room` and drops them (the reference's
    /// `destroy`). Leaving the room does this too. Returns whether anything was synced.
    #[doc(alias = "destroy")]
    pub fn stop_sync(&mut self, room: &str) -> bool {
        self.syncs.stop(room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_bind_addresses() {
        let none = || -> Result<Vec<std::net::IpAddr>, ()> { panic!("only AllInterfaces reads the interfaces") };
        assert_eq!(UdpBind::Loopback.addrs(none), Ok(vec!["127.0.0.1:0".parse().unwrap()]));
        let given: Vec<SocketAddr> = vec!["10.0.0.1:5000".parse().unwrap()];
        assert_eq!(UdpBind::Addrs(given.clone()).addrs(none), Ok(given));
        let ips = ["192.0.2.7", "127.0.0.1", "fe80::1", "2001:db8::1", "192.0.2.7"].map(|s| s.parse().unwrap()).to_vec();
        let got = UdpBind::AllInterfaces.addrs(|| Ok::<_, ()>(ips)).unwrap();
        let want: Vec<SocketAddr> = ["127.0.0.1:0", "192.0.2.7:0", "[2001:db8::1]:0"].map(|s| s.parse().unwrap()).to_vec();
        assert_eq!(got, want, "link-local dropped, duplicates merged, sorted");
        assert_eq!(UdpBind::AllInterfaces.addrs(|| Err("no interfaces")), Err("no interfaces"));
    }
}
