//! The sans-IO signaling client.
//!
//! [`Client`] speaks the signaling protocol; the adapter owns the WebSocket. The adapter opens a
//! socket when [`Client::poll_transmit`] yields [`ClientTransmit::Connect`], reports it with
//! [`Client::handle_connected`], feeds every text frame to [`Client::handle_text`], reports the
//! socket's end with [`Client::handle_disconnected`], and calls [`Client::handle_timeout`] at
//! [`Client::poll_timeout`]. After every call it drains `poll_transmit` and
//! [`Client::poll_event`].
//!
//! The client registers by signing the server's challenge, pings, reconnects with exponential
//! backoff and jitter, resumes its session (or re-joins its namespaces and rooms when the server
//! no longer has it), and queues requests made while it is not registered.
//!
//! # Bounds
//!
//! Requests made while not registered wait in an outbox of `outbox_frames` frames; past it they
//! fail with [`ClientError::OutboxFull`]. Outputs are bounded by the drain contract: if more than
//! [`MAX_PENDING_OUTPUTS`] events or transmits wait undrained, `handle_*` returns
//! [`ClientError::NotDrained`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use serde_json::value::RawValue;
use tracing::{debug, info, warn};

use crate::identity::{Fingerprint, Identity};
use crate::protocol::{
    self, ClientMessage, CloseCode, ErrorCode, PROTOCOL_VERSION, PeerInfo, RawJson, RoomConfig, ServerMessage,
};

/// Most events or transmits that may wait undrained before `handle_*` refuses more input.
pub const MAX_PENDING_OUTPUTS: usize = 65_536;

/// Client configuration. Field names and defaults follow the reference `PeerClient` config.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The signaling server, `ws://` or `wss://`.
    pub url: String,
    /// More servers to try, in turn with `url`, each time the connection is lost or cannot be
    /// made: the other nodes of a signaling cluster, where the session resumes (namespaces,
    /// rooms and frames held for it kept) within the server's resume grace. Default empty.
    pub fallback_urls: Vec<String>,
    /// Display name.
    pub alias: String,
    /// Arbitrary metadata shown to other peers (a JSON object).
    pub meta: Option<serde_json::Value>,
    /// Reconnect after an unexpected disconnect. Default `true`.
    pub auto_reconnect: bool,
    /// First reconnect delay. Default 1 s.
    pub reconnect_delay: Duration,
    /// Longest reconnect delay. Default 30 s.
    pub reconnect_max_delay: Duration,
    /// Give up after this many failed attempts in a row; `None` never gives up. Default `None`.
    pub max_reconnect_attempts: Option<u32>,
    /// Interval between keep-alive pings. Default 25 s.
    pub ping_interval: Duration,
    /// With no frame from the server for `ping_interval + pong_timeout`, the connection is
    /// considered dead and is replaced. Default 10 s.
    pub pong_timeout: Duration,
    /// How long to wait for the socket and the challenge. Default 10 s.
    pub connect_timeout: Duration,
    /// How long a request waits for its reply before failing with
    /// [`RequestError::TimedOut`]. Default 30 s.
    pub request_timeout: Duration,
    /// Frames held while not registered. Default 1,024.
    pub outbox_frames: usize,
    /// Access token (JWT) for servers that require one.
    pub token: Option<String>,
    /// When set, the client refuses servers whose challenge names another `server_id`.
    pub expected_server_id: Option<String>,
}

impl ClientConfig {
    /// Returns a config for `url` with the defaults.
    pub fn new(url: impl Into<String>) -> Self {
        ClientConfig {
            url: url.into(),
            fallback_urls: Vec::new(),
            alias: String::new(),
            meta: None,
            auto_reconnect: true,
            reconnect_delay: Duration::from_secs(1),
            reconnect_max_delay: Duration::from_secs(30),
            max_reconnect_attempts: None,
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            outbox_frames: 1024,
            token: None,
            expected_server_id: None,
        }
    }

    /// Sets the alias.
    pub fn alias(mut self, alias: impl Into<String>) -> Self {
        self.alias = alias.into();
        self
    }

    /// Sets the metadata.
    pub fn meta(mut self, meta: serde_json::Value) -> Self {
        self.meta = Some(meta);
        self
    }

    /// Sets the access token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Adds a server to fail over to (see [`ClientConfig::fallback_urls`]).
    pub fn fallback_url(mut self, url: impl Into<String>) -> Self {
        self.fallback_urls.push(url.into());
        self
    }

    /// The server URL for connection attempt `index`: `url`, then each fallback, in turn.
    pub fn url_for(&self, index: usize) -> &str {
        match index % (1 + self.fallback_urls.len()) {
            0 => &self.url,
            i => &self.fallback_urls[i - 1],
        }
    }
}

/// Identifies a request; its reply arrives as [`ClientEvent::Response`] with the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Errors from the client's commands and its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The outbox of frames waiting for registration is full.
    #[error("outbox full: {0} frames wait for registration")]
    OutboxFull(usize),
    /// A payload could not be serialized to JSON, or a field is out of range.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// More outputs wait than [`MAX_PENDING_OUTPUTS`]: drain `poll_event` and `poll_transmit`.
    #[error("poll_event and poll_transmit must be drained before more input")]
    NotDrained,
    /// The client was disconnected by [`Client::disconnect`] or gave up; call
    /// [`Client::connect`] again.
    #[error("client is not connected")]
    NotConnected,
    /// The server answered a frame without a request id with an error.
    #[error("server error {code}: {message}")]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server's frame could not be decoded; it was skipped.
    #[error("undecodable server frame: {0}")]
    Protocol(String),
    /// The server refused registration; the client will not retry on its own.
    #[error("registration refused ({code}): {message}")]
    RegistrationRefused {
        /// The error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server's challenge named an unexpected `server_id`.
    #[error("server id `{got}` is not the expected `{expected}`")]
    ServerIdMismatch {
        /// The configured id.
        expected: String,
        /// The id the server sent.
        got: String,
    },
    /// The server speaks another protocol version.
    #[error("server speaks protocol version {0}, this client {PROTOCOL_VERSION}")]
    VersionMismatch(u32),
    /// Reconnecting failed `max_reconnect_attempts` times in a row.
    #[error("gave up after {0} reconnect attempts")]
    ReconnectExhausted(u32),
    /// Another connection registered the same identity and replaced this one.
    #[error("replaced by another connection with the same identity")]
    Replaced,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The server answered with an error.
    #[error("{code}: {message}")]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The connection dropped before the reply arrived.
    #[error("disconnected before the reply")]
    Disconnected,
    /// No reply within `request_timeout`.
    #[error("no reply in time")]
    TimedOut,
}

impl RequestError {
    /// Returns the server's error code, if the server answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            RequestError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A formed matchmaking group.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchResult {
    /// The namespace.
    pub namespace: String,
    /// The id shared by the group.
    pub session_id: String,
    /// Every member, this client included, in the same order for all.
    pub peers: Vec<PeerInfo>,
}

/// A room's description.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomDetails {
    /// The room id.
    pub room_id: String,
    /// The owner.
    pub owner: Fingerprint,
    /// The most members it admits.
    pub max_size: u32,
    /// Its metadata.
    pub metadata: Option<RawJson>,
}

/// A room that is not full, as [`Client::list_rooms`] lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomSummary {
    /// The room.
    pub details: RoomDetails,
    /// How many members it has (fewer than `details.max_size`).
    pub members: usize,
}

/// Short-lived TURN credentials issued by the signaling server ([`Client::turn_credentials`]),
/// in the TURN REST API scheme: TURN servers that share the signaling server's secret accept
/// them until they expire.
///
/// To use them, hand [`IssuedTurnCredentials::ice_server`] to a node: put it in
/// [`NodeConfig::ice_servers`](crate::NodeConfig::ice_servers) of a node created afterwards, or
/// resolve each of [`IceServer::turn_servers`](crate::IceServer::turn_servers) and call
/// [`Node::add_turn_server`](crate::Node::add_turn_server) on a running one (the adapters'
/// `add_turn_servers` does this). The expiry limits new allocations (an allocation made
/// before it is refreshed as usual): ask again before [`IssuedTurnCredentials::expires_at`] for
/// allocations made later, e.g. from a node created after it.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedTurnCredentials {
    /// The TURN servers that accept them, e.g. `turn:turn.example.org:3478?transport=udp`.
    pub urls: Vec<String>,
    /// The TURN user name, `<expiry unix seconds>:<fingerprint>`.
    pub username: String,
    /// The TURN password.
    pub credential: String,
    /// Their lifetime as issued.
    pub ttl: Duration,
    /// When the reply was handled (the client's `now`).
    pub received_at: Instant,
}

impl IssuedTurnCredentials {
    /// When they expire, on the client's clock: [`received_at`](Self::received_at) plus the
    /// TTL (a little late by the reply's travel time).
    pub fn expires_at(&self) -> Instant {
        self.received_at + self.ttl
    }

    /// The expiry the user name carries, in seconds since the Unix epoch, or `None` when the
    /// server used another user name format.
    pub fn expiry_unix_secs(&self) -> Option<u64> {
        self.username.split_once(':')?.0.parse().ok()
    }

    /// The credentials as an ICE server entry: its URLs with the user name and password.
    pub fn ice_server(&self) -> crate::IceServer {
        crate::IceServer::turn(self.urls.iter().cloned(), self.username.clone(), self.credential.clone())
    }

    /// The user name and password for [`Node::add_turn_server`](crate::Node::add_turn_server).
    pub fn credentials(&self) -> crate::turn::TurnCredentials {
        crate::turn::TurnCredentials { username: self.username.clone(), password: self.credential.clone() }
    }
}

impl std::fmt::Debug for IssuedTurnCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedTurnCredentials")
            .field("urls", &self.urls)
            .field("username", &self.username)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// A successful reply to a request.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Response {
    /// `join`: the other members.
    Joined {
        /// The namespace.
        namespace: String,
        /// Up to the server's list limit of them.
        peers: Vec<PeerInfo>,
        /// How many there are in all.
        total: usize,
    },
    /// `discover`: members of a namespace.
    Discovered {
        /// The namespace.
        namespace: String,
        /// The peers.
        peers: Vec<PeerInfo>,
    },
    /// `match`: the group.
    Matched(MatchResult),
    /// `create_room`.
    RoomCreated(RoomDetails),
    /// `join_room`: the room and its other members.
    RoomJoined {
        /// The room.
        room: RoomDetails,
        /// The other members.
        peers: Vec<PeerInfo>,
    },
    /// `room_info`.
    RoomInfo {
        /// The room.
        room: RoomDetails,
        /// How many members it has.
        members: usize,
    },
    /// `list_rooms`: rooms that are not full, sorted by room id.
    Rooms(Vec<RoomSummary>),
    /// `ping`: the round trip time.
    Pong {
        /// Time from sending the ping to handling the pong.
        rtt: Duration,
    },
    /// `turn_credentials`: short-lived TURN credentials.
    TurnCredentials(IssuedTurnCredentials),
    /// Any request without a richer result (`leave`, `leave_room`, `kick`, `close_room`,
    /// `cancel_match`).
    Ok,
}

/// Something that happened; drain with [`Client::poll_event`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The WebSocket opened.
    Connected,
    /// The WebSocket closed or was found dead.
    Disconnected {
        /// The close code, if the server sent one.
        code: Option<u16>,
        /// Whether the client will reconnect on its own.
        will_reconnect: bool,
    },
    /// The client registered (first time).
    Registered {
        /// Its fingerprint, as the server derived it.
        fingerprint: Fingerprint,
        /// Its alias.
        alias: String,
    },
    /// A reconnect attempt is scheduled.
    Reconnecting {
        /// Attempt number, from 1.
        attempt: u32,
        /// Delay before it.
        delay: Duration,
    },
    /// The client registered again after a disconnect.
    Reconnected {
        /// Whether the server resumed the old session (namespaces, rooms and queued frames
        /// intact); otherwise the client re-joins them, and [`ClientEvent::PeerList`] and
        /// [`ClientEvent::RoomRejoined`] follow.
        resumed: bool,
    },
    /// A peer joined a namespace this client is in.
    PeerJoined {
        /// The namespace.
        namespace: String,
        /// The peer.
        peer: PeerInfo,
    },
    /// A peer left a namespace this client is in.
    PeerLeft {
        /// The namespace.
        namespace: String,
        /// The peer.
        fingerprint: Fingerprint,
    },
    /// A namespace's peer list (after every join, including automatic re-joins).
    PeerList {
        /// The namespace.
        namespace: String,
        /// The other members.
        peers: Vec<PeerInfo>,
    },
    /// A matchmaking group formed.
    Matched(MatchResult),
    /// A relayed payload.
    Relay {
        /// The verified sender.
        from: Fingerprint,
        /// The payload.
        payload: RawJson,
    },
    /// A namespace broadcast.
    Broadcast {
        /// The verified sender.
        from: Fingerprint,
        /// The namespace.
        namespace: String,
        /// The payload.
        payload: RawJson,
    },
    /// A room was created by this client.
    RoomCreated(RoomDetails),
    /// A peer joined a room this client is in.
    RoomPeerJoined {
        /// The room.
        room_id: String,
        /// The peer.
        peer: PeerInfo,
    },
    /// A peer left (or was kicked from) a room this client is in.
    RoomPeerLeft {
        /// The room.
        room_id: String,
        /// The peer.
        fingerprint: Fingerprint,
        /// Whether it was kicked.
        kicked: bool,
    },
    /// A room this client was in was closed by its owner.
    RoomClosed {
        /// The room.
        room_id: String,
    },
    /// This client was kicked from a room.
    Kicked {
        /// The room.
        room_id: String,
    },
    /// A room was re-joined automatically after a reconnect that did not resume the session.
    /// Members may have come and gone meanwhile: `peers` is the room as it is now, so a layer
    /// above can re-form it (connect to new members, drop those no longer listed).
    RoomRejoined {
        /// The room.
        room: RoomDetails,
        /// The current other members.
        peers: Vec<PeerInfo>,
    },
    /// The reply to a request.
    Response {
        /// The request.
        request: RequestId,
        /// Its outcome.
        result: Result<Response, RequestError>,
    },
    /// An error not tied to a request.
    Error(ClientError),
}

/// An output for the adapter's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientTransmit {
    /// Open a WebSocket to `url` (dropping any current one), then call
    /// [`Client::handle_connected`] or [`Client::handle_disconnected`].
    Connect {
        /// The server URL.
        url: String,
    },
    /// Send one text frame on the current socket.
    Text(String),
    /// Close the current socket with this code. Do not report it as disconnected: the client
    /// already knows.
    Close {
        /// The close code.
        code: u16,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Not started, or stopped by `disconnect` or a fatal error.
    Idle,
    /// A `Connect` was emitted; waiting for the socket and the challenge.
    Connecting { deadline: Instant },
    /// `register` sent.
    Registering { deadline: Instant },
    /// Registered and serving.
    Registered,
    /// Waiting to reconnect.
    Backoff { until: Instant },
}

#[derive(Debug, Clone)]
enum Pending {
    User { sent_at: Instant },
    /// An automatic re-join after reconnecting; its result is a `PeerList` event.
    Rejoin,
    /// An automatic re-join of this room after reconnecting; its result is a `RoomRejoined`
    /// event.
    RoomRejoin(String),
}

#[derive(Debug, Clone)]
struct JoinParams {
    app_type: Option<String>,
    app_version: Option<String>,
}

/// The signaling client state machine. See the [module docs](self).
pub struct Client {
    config: ClientConfig,
    identity: Identity,
    rng: ChaCha20Rng,
    state: State,
    /// Failed attempts since the last registration.
    attempt: u32,
    /// Which server of [`ClientConfig::url_for`] the next connection goes to.
    url_index: usize,
    ever_registered: bool,
    next_id: u64,
    pending: HashMap<u64, (Pending, Instant)>,
    outbox: VecDeque<(u64, String)>,
    namespaces: BTreeMap<String, JoinParams>,
    rooms: BTreeMap<String, ()>,
    last_rx: Instant,
    next_ping: Option<Instant>,
    transmits: VecDeque<ClientTransmit>,
    events: VecDeque<ClientEvent>,
    fingerprint: Option<Fingerprint>,
    meta_json: Option<Box<RawValue>>,
}

impl Client {
    /// Creates a client. `seed` drives the signature nonces' extra entropy and the reconnect
    /// jitter. Call [`Client::connect`] to start.
    pub fn new(config: ClientConfig, identity: Identity, seed: u64, now: Instant) -> Result<Self, ClientError> {
        let meta_json = match &config.meta {
            Some(v @ serde_json::Value::Object(_)) => Some(
                serde_json::value::to_raw_value(v).map_err(|e| ClientError::InvalidInput(e.to_string()))?,
            ),
            Some(_) => return Err(ClientError::InvalidInput("meta must be a JSON object".into())),
            None => None,
        };
        if meta_json.as_ref().is_some_and(|m| m.get().len() > protocol::MAX_META_LEN) {
            return Err(ClientError::InvalidInput(format!("meta is larger than {} bytes", protocol::MAX_META_LEN)));
        }
        if config.alias.len() > protocol::MAX_ALIAS_LEN {
            return Err(ClientError::InvalidInput(format!("alias is longer than {} bytes", protocol::MAX_ALIAS_LEN)));
        }
        Ok(Client {
            config,
            identity,
            rng: ChaCha20Rng::seed_from_u64(seed),
            state: State::Idle,
            attempt: 0,
            url_index: 0,
            ever_registered: false,
            next_id: 1,
            pending: HashMap::new(),
            outbox: VecDeque::new(),
            namespaces: BTreeMap::new(),
            rooms: BTreeMap::new(),
            last_rx: now,
            next_ping: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            fingerprint: None,
            meta_json,
        })
    }

    /// Returns the configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Returns the identity's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint()
    }

    /// Returns the identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Returns whether the client is registered right now.
    pub fn is_registered(&self) -> bool {
        self.state == State::Registered
    }

    /// Returns the namespaces this client is in (or will re-join after reconnecting).
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces.keys().map(String::as_str)
    }

    /// Returns the rooms this client is in (or will re-join after reconnecting).
    pub fn rooms(&self) -> impl Iterator<Item = &str> {
        self.rooms.keys().map(String::as_str)
    }

    /// Returns the next output for the socket.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<ClientTransmit> {
        self.transmits.pop_front()
    }

    /// Returns the next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Returns when [`Client::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next = match self.state {
            State::Idle => None,
            State::Connecting { deadline } | State::Registering { deadline } => Some(deadline),
            State::Backoff { until } => Some(until),
            State::Registered => {
                let dead = self.last_rx + self.config.ping_interval + self.config.pong_timeout;
                Some(self.next_ping.map_or(dead, |p| p.min(dead)))
            }
        };
        for (_, deadline) in self.pending.values() {
            next = Some(next.map_or(*deadline, |n: Instant| n.min(*deadline)));
        }
        next
    }

    fn begin(&self) -> Result<(), ClientError> {
        if self.events.len() > MAX_PENDING_OUTPUTS || self.transmits.len() > MAX_PENDING_OUTPUTS {
            return Err(ClientError::NotDrained);
        }
        Ok(())
    }

    /// Starts connecting (a no-op when already connecting or connected).
    pub fn connect(&mut self, now: Instant) -> Result<(), ClientError> {
        self.begin()?;
        if self.state == State::Idle {
            self.attempt = 0;
            self.open(now);
        }
        Ok(())
    }

    /// Ends the session cleanly: sends `bye` (peers see this client leave at once), closes the
    /// socket, fails pending requests and stops reconnecting.
    pub fn disconnect(&mut self, now: Instant) -> Result<(), ClientError> {
        self.begin()?;
        let _ = now;
        match self.state {
            State::Idle => return Ok(()),
            State::Registered => self.transmits.push_back(ClientTransmit::Text(ClientMessage::Bye.encode())),
            _ => {}
        }
        if !matches!(self.state, State::Backoff { .. }) {
            self.transmits.push_back(ClientTransmit::Close { code: CloseCode::Normal.code() });
        }
        self.state = State::Idle;
        self.fail_pending(true);
        self.namespaces.clear();
        self.rooms.clear();
        self.events.push_back(ClientEvent::Disconnected { code: Some(CloseCode::Normal.code()), will_reconnect: false });
        Ok(())
    }

    /// Reports that the socket opened.
    pub fn handle_connected(&mut self, now: Instant) -> Result<(), ClientError> {
        self.begin()?;
        if matches!(self.state, State::Connecting { .. }) {
            self.last_rx = now;
            self.events.push_back(ClientEvent::Connected);
        }
        Ok(())
    }

    /// Reports that the socket closed or failed (or could not be opened). `code` is the
    /// server's close code, if it sent one.
    pub fn handle_disconnected(&mut self, now: Instant, code: Option<u16>) -> Result<(), ClientError> {
        self.begin()?;
        if matches!(self.state, State::Idle | State::Backoff { .. }) {
            return Ok(());
        }
        debug!(?code, "socket closed");
        if code == Some(CloseCode::Replaced.code()) {
            self.events.push_back(ClientEvent::Error(ClientError::Replaced));
            self.stop(code);
            return Ok(());
        }
        self.lost(now, code);
        Ok(())
    }

    /// Handles a text frame from the server.
    pub fn handle_text(&mut self, now: Instant, text: &str) -> Result<(), ClientError> {
        self.begin()?;
        if matches!(self.state, State::Idle | State::Backoff { .. }) {
            return Ok(());
        }
        self.last_rx = now;
        let msg = match protocol::decode_server(text) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "undecodable server frame");
                self.events.push_back(ClientEvent::Error(ClientError::Protocol(e.to_string())));
                return Ok(());
            }
        };
        self.dispatch(now, msg);
        Ok(())
    }

    /// Handles expired timers: pings, dead connections, reconnect backoff, request timeouts.
    /// Calling it early does nothing.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ClientError> {
        self.begin()?;
        let expired: Vec<u64> = self.pending.iter().filter(|(_, (_, d))| *d <= now).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some((Pending::User { .. }, _)) = self.pending.remove(&id) {
                // A request still waiting in the outbox is withdrawn, not sent late.
                self.outbox.retain(|(queued, _)| *queued != id);
                self.respond(id, Err(RequestError::TimedOut));
            }
        }
        match self.state {
            State::Connecting { deadline } | State::Registering { deadline } if deadline <= now => {
                debug!("connect timed out");
                self.transmits.push_back(ClientTransmit::Close { code: CloseCode::GoingAway.code() });
                self.lost(now, None);
            }
            State::Backoff { until } if until <= now => self.open(now),
            State::Registered => {
                if self.last_rx + self.config.ping_interval + self.config.pong_timeout <= now {
                    debug!("no frame from the server in time: connection is dead");
                    self.transmits.push_back(ClientTransmit::Close { code: CloseCode::GoingAway.code() });
                    self.lost(now, None);
                } else if self.next_ping.is_some_and(|p| p <= now) {
                    // Keep-alive: the pong is not awaited; any frame from the server keeps us alive.
                    let id = self.alloc_id();
                    self.transmits.push_back(ClientTransmit::Text(ClientMessage::Ping { id }.encode()));
                    self.next_ping = Some(now + self.config.ping_interval);
                }
            }
            _ => {}
        }
        Ok(())
    }

    // ---- commands -------------------------------------------------------------------------

    /// Joins a namespace. The reply is [`Response::Joined`]; a [`ClientEvent::PeerList`]
    /// follows. The client re-joins it after reconnecting.
    pub fn join(
        &mut self,
        now: Instant,
        namespace: &str,
        app_type: Option<&str>,
        app_version: Option<&str>,
    ) -> Result<RequestId, ClientError> {
        check_name(namespace)?;
        self.request(now, |id| ClientMessage::Join {
            id,
            namespace: namespace.into(),
            app_type: app_type.map(Into::into),
            app_version: app_version.map(Into::into),
        })
        .inspect(|_| {
            self.namespaces.insert(
                namespace.to_owned(),
                JoinParams { app_type: app_type.map(Into::into), app_version: app_version.map(Into::into) },
            );
        })
    }

    /// Leaves a namespace. The reply is [`Response::Ok`].
    pub fn leave(&mut self, now: Instant, namespace: &str) -> Result<RequestId, ClientError> {
        check_name(namespace)?;
        self.namespaces.remove(namespace);
        self.request(now, |id| ClientMessage::Leave { id, namespace: namespace.into() })
    }

    /// Lists up to `limit` members of a namespace without joining it. The reply is
    /// [`Response::Discovered`].
    pub fn discover(&mut self, now: Instant, namespace: &str, limit: Option<u32>) -> Result<RequestId, ClientError> {
        check_name(namespace)?;
        self.request(now, |id| ClientMessage::Discover { id, namespace: namespace.into(), limit })
    }

    /// Asks to be matched into a group of `group_size` with peers whose `criteria` are equal.
    /// The reply is [`Response::Matched`] once the group is full (and a [`ClientEvent::Matched`]).
    pub fn match_peers(
        &mut self,
        now: Instant,
        namespace: &str,
        criteria: Option<&serde_json::Value>,
        group_size: u32,
    ) -> Result<RequestId, ClientError> {
        check_name(namespace)?;
        let criteria = criteria.map(to_raw).transpose()?;
        self.request(now, |id| ClientMessage::Match {
            id,
            namespace: namespace.into(),
            criteria: criteria.as_deref(),
            group_size,
        })
    }

    /// Withdraws a pending match request in `namespace`. The reply is [`Response::Ok`]; the
    /// match request itself fails with `match_cancelled`.
    pub fn cancel_match(&mut self, now: Instant, namespace: &str) -> Result<RequestId, ClientError> {
        self.request(now, |id| ClientMessage::CancelMatch { id, namespace: namespace.into() })
    }

    /// Sends `payload` to one peer through the server. Failures (such as `peer_not_found`)
    /// arrive as [`ClientEvent::Error`].
    pub fn relay<T: Serialize + ?Sized>(&mut self, to: Fingerprint, payload: &T) -> Result<(), ClientError> {
        let payload = to_raw(payload)?;
        self.send_frame(0, ClientMessage::Relay { id: None, to, payload: &payload }.encode())
    }

    /// Sends `payload` to every other member of `namespace`.
    pub fn broadcast<T: Serialize + ?Sized>(&mut self, namespace: &str, payload: &T) -> Result<(), ClientError> {
        check_name(namespace)?;
        let payload = to_raw(payload)?;
        self.send_frame(0, ClientMessage::Broadcast { id: None, namespace: namespace.into(), payload: &payload }.encode())
    }

    /// Creates a room owned by this client. The reply is [`Response::RoomCreated`].
    pub fn create_room(
        &mut self,
        now: Instant,
        room_id: &str,
        max_size: Option<u32>,
        metadata: Option<&serde_json::Value>,
    ) -> Result<RequestId, ClientError> {
        check_name(room_id)?;
        let metadata = metadata.map(to_raw).transpose()?;
        self.request(now, |id| ClientMessage::CreateRoom {
            id,
            room_id: room_id.into(),
            config: RoomConfig { max_size, metadata: metadata.as_deref() },
        })
    }

    /// Joins a room. The reply is [`Response::RoomJoined`].
    pub fn join_room(&mut self, now: Instant, room_id: &str) -> Result<RequestId, ClientError> {
        check_name(room_id)?;
        self.request(now, |id| ClientMessage::JoinRoom { id, room_id: room_id.into() })
    }

    /// Leaves a room. The reply is [`Response::Ok`].
    pub fn leave_room(&mut self, now: Instant, room_id: &str) -> Result<RequestId, ClientError> {
        check_name(room_id)?;
        self.rooms.remove(room_id);
        self.request(now, |id| ClientMessage::LeaveRoom { id, room_id: room_id.into() })
    }

    /// Asks for a room's metadata and size. The reply is [`Response::RoomInfo`].
    pub fn room_info(&mut self, now: Instant, room_id: &str) -> Result<RequestId, ClientError> {
        check_name(room_id)?;
        self.request(now, |id| ClientMessage::RoomInfo { id, room_id: room_id.into() })
    }

    /// Lists rooms that are not full, sorted by room id, optionally only those whose id starts
    /// with `prefix`. At most `limit` are listed; the server clamps `limit` to its maximum (100
    /// by default), which is also what it uses without one. The reply is [`Response::Rooms`].
    pub fn list_rooms(
        &mut self,
        now: Instant,
        prefix: Option<&str>,
        limit: Option<u32>,
    ) -> Result<RequestId, ClientError> {
        if prefix.is_some_and(|p| !protocol::is_valid_prefix(p)) {
            return Err(ClientError::InvalidInput(format!(
                "a room prefix must be at most {} bytes without control characters",
                protocol::MAX_NAME_LEN
            )));
        }
        self.request(now, |id| ClientMessage::ListRooms { id, prefix: prefix.map(Into::into), limit })
    }

    /// Removes a member from a room this client owns. The reply is [`Response::Ok`].
    pub fn kick(&mut self, now: Instant, room_id: &str, peer: Fingerprint) -> Result<RequestId, ClientError> {
        check_name(room_id)?;
        self.request(now, |id| ClientMessage::Kick { id, room_id: room_id.into(), fingerprint: peer })
    }

    /// Closes a room this client owns. The reply is [`Response::Ok`].
    pub fn close_room(&mut self, now: Instant, room_id: &str) -> Result<RequestId, ClientError> {
        check_name(room_id)?;
        self.request(now, |id| ClientMessage::CloseRoom { id, room_id: room_id.into() })
    }

    /// Measures the round trip to the server. The reply is [`Response::Pong`].
    pub fn ping(&mut self, now: Instant) -> Result<RequestId, ClientError> {
        self.request(now, |id| ClientMessage::Ping { id })
    }

    /// Asks the server for short-lived TURN credentials. The reply is
    /// [`Response::TurnCredentials`]; a server without a TURN secret answers with
    /// [`ErrorCode::TurnUnavailable`]. Made before registration, it waits in the outbox like
    /// every request (the server answers only registered clients).
    pub fn turn_credentials(&mut self, now: Instant) -> Result<RequestId, ClientError> {
        self.request(now, |id| ClientMessage::TurnCredentials { id })
    }

    // ---- internals ------------------------------------------------------------------------

    fn alloc_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn request<'a>(&mut self, now: Instant, build: impl FnOnce(u64) -> ClientMessage<'a>) -> Result<RequestId, ClientError> {
        if self.state == State::Idle {
            return Err(ClientError::NotConnected);
        }
        let id = self.next_id;
        let frame = build(id).encode();
        self.send_frame(id, frame)?;
        self.next_id += 1;
        self.pending.insert(id, (Pending::User { sent_at: now }, now + self.config.request_timeout));
        Ok(RequestId(id))
    }

    /// Sends a frame now, or holds it in the outbox until registration.
    fn send_frame(&mut self, id: u64, frame: String) -> Result<(), ClientError> {
        match self.state {
            State::Idle => Err(ClientError::NotConnected),
            State::Registered => {
                self.transmits.push_back(ClientTransmit::Text(frame));
                Ok(())
            }
            _ if self.outbox.len() >= self.config.outbox_frames => Err(ClientError::OutboxFull(self.outbox.len())),
            _ => {
                self.outbox.push_back((id, frame));
                Ok(())
            }
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Connecting { deadline: now + self.config.connect_timeout };
        let url = self.config.url_for(self.url_index).to_owned();
        self.transmits.push_back(ClientTransmit::Connect { url });
    }

    /// The connection is gone: fail in-flight requests, then reconnect or stop.
    fn lost(&mut self, now: Instant, code: Option<u16>) {
        let was_registered = self.state == State::Registered;
        self.next_ping = None;
        self.fail_pending(false);
        if !self.config.auto_reconnect {
            self.stop(code);
            return;
        }
        if !was_registered {
            self.attempt += 1;
        }
        if !self.config.fallback_urls.is_empty() {
            // The next attempt goes to the next server in turn.
            self.url_index = (self.url_index + 1) % (1 + self.config.fallback_urls.len());
            debug!(url = self.config.url_for(self.url_index), "failing over");
        }
        if let Some(max) = self.config.max_reconnect_attempts {
            if self.attempt >= max {
                self.events.push_back(ClientEvent::Error(ClientError::ReconnectExhausted(self.attempt)));
                self.stop(code);
                return;
            }
        }
        let delay = self.backoff(self.attempt);
        self.state = State::Backoff { until: now + delay };
        self.events.push_back(ClientEvent::Disconnected { code, will_reconnect: true });
        self.events.push_back(ClientEvent::Reconnecting { attempt: self.attempt + 1, delay });
        info!(attempt = self.attempt + 1, ?delay, "reconnecting");
    }

    /// Exponential backoff with equal jitter: half the step fixed, half random.
    fn backoff(&mut self, failures: u32) -> Duration {
        let base = self.config.reconnect_delay.as_secs_f64();
        let step = (base * 2f64.powi(failures.min(30) as i32)).min(self.config.reconnect_max_delay.as_secs_f64());
        Duration::from_secs_f64(step / 2.0 + self.rng.random::<f64>() * step / 2.0)
    }

    fn stop(&mut self, code: Option<u16>) {
        self.state = State::Idle;
        self.fail_pending(true);
        self.events.push_back(ClientEvent::Disconnected { code, will_reconnect: false });
    }

    /// Fails requests that were sent and cannot be answered now; with `all`, also the outbox.
    fn fail_pending(&mut self, all: bool) {
        let waiting: std::collections::HashSet<u64> = self.outbox.iter().map(|(id, _)| *id).collect();
        let mut ids: Vec<u64> = self.pending.keys().copied().filter(|id| all || !waiting.contains(id)).collect();
        ids.sort_unstable();
        for id in ids {
            if let Some((Pending::User { .. }, _)) = self.pending.remove(&id) {
                self.respond(id, Err(RequestError::Disconnected));
            }
        }
        if all {
            self.outbox.clear();
        }
    }

    fn respond(&mut self, id: u64, result: Result<Response, RequestError>) {
        self.events.push_back(ClientEvent::Response { request: RequestId(id), result });
    }

    fn dispatch(&mut self, now: Instant, msg: ServerMessage) {
        match msg {
            ServerMessage::Challenge { version, server_id, nonce, .. } => self.on_challenge(now, version, server_id, nonce),
            ServerMessage::Registered { id: _, fingerprint, alias, resumed, namespaces, rooms, missed } => {
                self.on_registered(now, fingerprint, alias, resumed, namespaces, rooms, missed)
            }
            ServerMessage::Joined { id, namespace, peers, total } => {
                self.events.push_back(ClientEvent::PeerList { namespace: namespace.clone(), peers: peers.clone() });
                self.complete(id, Response::Joined { namespace, peers, total });
            }
            ServerMessage::Discovered { id, namespace, peers } => self.complete(id, Response::Discovered { namespace, peers }),
            ServerMessage::Matched { id, namespace, session_id, peers } => {
                let result = MatchResult { namespace, session_id, peers };
                self.events.push_back(ClientEvent::Matched(result.clone()));
                self.complete(id, Response::Matched(result));
            }
            ServerMessage::PeerJoined { namespace, peer } => self.events.push_back(ClientEvent::PeerJoined { namespace, peer }),
            ServerMessage::PeerLeft { namespace, fingerprint } => {
                self.events.push_back(ClientEvent::PeerLeft { namespace, fingerprint })
            }
            ServerMessage::Relay { from, payload } => self.events.push_back(ClientEvent::Relay { from, payload }),
            ServerMessage::Broadcast { from, namespace, payload } => {
                self.events.push_back(ClientEvent::Broadcast { from, namespace, payload })
            }
            ServerMessage::Ok { id } => self.complete(id, Response::Ok),
            ServerMessage::RoomCreated { id, room_id, owner, max_size, metadata } => {
                self.rooms.insert(room_id.clone(), ());
                let room = RoomDetails { room_id, owner, max_size, metadata };
                self.events.push_back(ClientEvent::RoomCreated(room.clone()));
                self.complete(id, Response::RoomCreated(room));
            }
            ServerMessage::RoomJoined { id, room_id, owner, max_size, metadata, peers } => {
                self.rooms.insert(room_id.clone(), ());
                self.complete(id, Response::RoomJoined { room: RoomDetails { room_id, owner, max_size, metadata }, peers });
            }
            ServerMessage::RoomInfo { id, room_id, owner, max_size, metadata, members } => {
                self.complete(id, Response::RoomInfo { room: RoomDetails { room_id, owner, max_size, metadata }, members })
            }
            ServerMessage::Rooms { id, rooms } => {
                let rooms = rooms
                    .into_iter()
                    .map(|r| {
                        let details =
                            RoomDetails { room_id: r.room_id, owner: r.owner, max_size: r.max_size, metadata: r.metadata };
                        RoomSummary { details, members: r.members }
                    })
                    .collect();
                self.complete(id, Response::Rooms(rooms));
            }
            ServerMessage::RoomPeerJoined { room_id, peer } => self.events.push_back(ClientEvent::RoomPeerJoined { room_id, peer }),
            ServerMessage::RoomPeerLeft { room_id, fingerprint, kicked } => {
                self.events.push_back(ClientEvent::RoomPeerLeft { room_id, fingerprint, kicked })
            }
            ServerMessage::RoomClosed { room_id } => {
                self.rooms.remove(&room_id);
                self.events.push_back(ClientEvent::RoomClosed { room_id });
            }
            ServerMessage::Kicked { room_id } => {
                self.rooms.remove(&room_id);
                self.events.push_back(ClientEvent::Kicked { room_id });
            }
            ServerMessage::Pong { id } => {
                if let Some((Pending::User { sent_at }, _)) = self.pending.get(&id) {
                    let rtt = now.saturating_duration_since(*sent_at);
                    self.complete(id, Response::Pong { rtt });
                }
            }
            ServerMessage::TurnCredentials { id, username, credential, ttl, urls } => {
                let issued = IssuedTurnCredentials { urls, username, credential, ttl: Duration::from_secs(ttl), received_at: now };
                self.complete(id, Response::TurnCredentials(issued));
            }
            ServerMessage::Error { id, code, message } => self.on_error(id, code, message),
        }
    }

    fn on_challenge(&mut self, now: Instant, version: u32, server_id: String, nonce: String) {
        if !matches!(self.state, State::Connecting { .. }) {
            return;
        }
        if version != PROTOCOL_VERSION {
            self.fatal(ClientError::VersionMismatch(version));
            return;
        }
        if let Some(expected) = &self.config.expected_server_id {
            if *expected != server_id {
                let e = ClientError::ServerIdMismatch { expected: expected.clone(), got: server_id };
                self.fatal(e);
                return;
            }
        }
        let id = self.alloc_id();
        let frame = ClientMessage::register(
            id,
            &self.identity,
            &mut self.rng,
            &server_id,
            &nonce,
            &self.config.alias,
            self.meta_json.as_deref(),
            self.config.token.as_deref(),
        )
        .encode();
        self.transmits.push_back(ClientTransmit::Text(frame));
        self.state = State::Registering { deadline: now + self.config.connect_timeout };
    }

    #[allow(clippy::too_many_arguments)]
    fn on_registered(
        &mut self,
        now: Instant,
        fingerprint: Fingerprint,
        alias: String,
        resumed: bool,
        server_namespaces: Vec<String>,
        server_rooms: Vec<String>,
        missed: u64,
    ) {
        if !matches!(self.state, State::Registering { .. }) {
            return;
        }
        if fingerprint != self.identity.fingerprint() {
            // The server must derive the same fingerprint from our key; anything else is a lie.
            self.fatal(ClientError::Protocol(format!("server assigned fingerprint {fingerprint}, not ours")));
            return;
        }
        self.state = State::Registered;
        self.attempt = 0;
        self.fingerprint = Some(fingerprint);
        self.next_ping = Some(now + self.config.ping_interval);
        let reconnect = self.ever_registered;
        self.ever_registered = true;
        info!(fingerprint = %fingerprint.short(), resumed, "registered");
        if reconnect {
            self.events.push_back(ClientEvent::Reconnected { resumed });
        } else {
            self.events.push_back(ClientEvent::Registered { fingerprint, alias });
        }
        // Re-join what the server lost; re-join everything to refresh peer lists if frames were
        // missed while away. A `join` still waiting in the outbox is sent below: not twice.
        let queued_joins: Vec<String> = self
            .outbox
            .iter()
            .filter_map(|(_, frame)| match protocol::decode_client(frame) {
                Ok(ClientMessage::Join { namespace, .. }) => Some(namespace.into_owned()),
                _ => None,
            })
            .collect();
        let namespaces: Vec<(String, JoinParams)> = self
            .namespaces
            .iter()
            .filter(|(ns, _)| !queued_joins.contains(ns))
            .filter(|(ns, _)| missed > 0 || !server_namespaces.contains(ns))
            .map(|(ns, p)| (ns.clone(), p.clone()))
            .collect();
        for (ns, params) in namespaces {
            let id = self.alloc_id();
            let frame = ClientMessage::Join {
                id,
                namespace: ns.as_str().into(),
                app_type: params.app_type.as_deref().map(Into::into),
                app_version: params.app_version.as_deref().map(Into::into),
            }
            .encode();
            self.pending.insert(id, (Pending::Rejoin, now + self.config.request_timeout));
            self.transmits.push_back(ClientTransmit::Text(frame));
        }
        let rooms: Vec<String> = self.rooms.keys().filter(|r| !server_rooms.contains(r)).cloned().collect();
        for room in rooms {
            let id = self.alloc_id();
            let frame = ClientMessage::JoinRoom { id, room_id: room.as_str().into() }.encode();
            self.pending.insert(id, (Pending::RoomRejoin(room), now + self.config.request_timeout));
            self.transmits.push_back(ClientTransmit::Text(frame));
        }
        while let Some((_, frame)) = self.outbox.pop_front() {
            self.transmits.push_back(ClientTransmit::Text(frame));
        }
    }

    fn on_error(&mut self, id: Option<u64>, code: ErrorCode, message: String) {
        if let State::Registering { .. } = self.state {
            if matches!(
                code,
                ErrorCode::BadSignature
                    | ErrorCode::AuthRequired
                    | ErrorCode::AuthInvalid
                    | ErrorCode::AuthExpired
                    | ErrorCode::UnsupportedVersion
            ) {
                self.fatal(ClientError::RegistrationRefused { code, message });
                return;
            }
        }
        match id.and_then(|id| self.pending.remove(&id).map(|p| (id, p))) {
            Some((id, (Pending::User { .. }, _))) => self.respond(id, Err(RequestError::Server { code, message })),
            Some((_, (Pending::RoomRejoin(room_id), _))) => {
                // The client is no longer in the room either way.
                self.rooms.remove(&room_id);
                if code == ErrorCode::RoomNotFound {
                    // Closed (or expired) while this client was away and its session was lost.
                    self.events.push_back(ClientEvent::RoomClosed { room_id });
                } else {
                    warn!(%code, %room_id, "room could not be re-joined after reconnecting");
                    self.events.push_back(ClientEvent::Error(ClientError::Server { code, message }));
                }
            }
            Some((_, (Pending::Rejoin, _))) | None => {
                self.events.push_back(ClientEvent::Error(ClientError::Server { code, message }));
            }
        }
    }

    fn complete(&mut self, id: u64, response: Response) {
        match self.pending.remove(&id) {
            Some((Pending::User { .. }, _)) => self.respond(id, Ok(response)),
            Some((Pending::RoomRejoin(_), _)) => {
                if let Response::RoomJoined { room, peers } = response {
                    debug!(room = %room.room_id, "room re-joined");
                    self.events.push_back(ClientEvent::RoomRejoined { room, peers });
                }
            }
            Some((Pending::Rejoin, _)) | None => {}
        }
    }

    /// A failure that reconnecting cannot fix: close and stop.
    fn fatal(&mut self, error: ClientError) {
        warn!(%error, "giving up on the server");
        self.transmits.push_back(ClientTransmit::Close { code: CloseCode::PolicyViolation.code() });
        self.events.push_back(ClientEvent::Error(error));
        self.stop(None);
    }
}

fn check_name(name: &str) -> Result<(), ClientError> {
    if !protocol::is_valid_name(name) {
        return Err(ClientError::InvalidInput(format!(
            "names must be 1 to {} bytes without control characters",
            protocol::MAX_NAME_LEN
        )));
    }
    Ok(())
}

fn to_raw<T: Serialize + ?Sized>(value: &T) -> Result<Box<RawValue>, ClientError> {
    serde_json::value::to_raw_value(value).map_err(|e| ClientError::InvalidInput(e.to_string()))
}

#[cfg(test)]
mod tests;
