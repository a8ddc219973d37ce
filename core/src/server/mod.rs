//! The sans-IO signaling server.
//!
//! [`Server`] holds every connection, session, namespace, room and pending match. The adapter
//! owns the sockets: it reports connections, text frames, binary frames, flushed bytes and
//! disconnects through the `handle_*` methods, and after every call drains
//! [`Server::poll_transmit`] (frames to send, connections to close) and re-reads
//! [`Server::poll_timeout`].
//!
//! ```
//! use std::time::Instant;
//! use peerlink::server::{ConnId, Server, ServerConfig, ServerTransmit};
//!
//! let now = Instant::now();
//! let mut server = Server::new(ServerConfig::default(), 42, now, 1_700_000_000_000);
//! server.handle_connect(ConnId(1), now).unwrap();
//! // The first frame on every connection is the challenge.
//! match server.poll_transmit() {
//!     Some(ServerTransmit::Text { conn, text }) => {
//!         assert_eq!(conn, ConnId(1));
//!         assert!(text.contains("\"challenge\""));
//!     }
//!     other => panic!("{other:?}"),
//! }
//! assert!(server.poll_transmit().is_none());
//! ```
//!
//! # Limits and overflow
//!
//! Every collection is bounded by [`ServerConfig`]: connections (`max_connections`; one more is
//! closed with 1013), namespaces and rooms per client (`too_many_*` errors), room size
//! (`room_full`), the outbound bytes queued for one connection (`outbound_queue_bytes`; a slow
//! consumer is closed with 4001 and its session parked), the frames queued for a parked session
//! (`resume_queue_frames`/`resume_queue_bytes`; relays beyond it are refused with `queue_full`,
//! other frames are counted in `missed`), and the transmits waiting to be drained
//! (`MAX_PENDING_TRANSMITS`; past it `handle_*` returns [`ServerError::NotDrained`]).

mod cluster;
mod jwt;
mod metrics;
mod turn;

pub use cluster::{
    ClusterConfig, ClusterDecodeError, ClusterMessage, ClusterStats, ClusterTarget, ClusterTransmit, NamespaceEntry, NodeId, RoomOp,
    decode_cluster,
    encode_cluster,
};
pub use jwt::{AuthConfig, AuthError, AuthKey, sign_hs256};
pub use metrics::{Health, HealthStatus, MessageType, Metrics};
pub use turn::{DEFAULT_TURN_TTL, TurnSecretConfig, turn_rest_credentials};

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde_json::value::RawValue;
use tracing::{debug, info, trace};

use crate::identity::{Fingerprint, PublicKey, Signature};
use crate::protocol::{
    self, ClientMessage, CloseCode, ErrorCode, FrameError, PROTOCOL_VERSION, PeerInfo, RawJson, RoomListing, ServerMessage,
};

/// Most transmits that may wait undrained before `handle_*` refuses more input.
pub const MAX_PENDING_TRANSMITS: usize = 1 << 20;

/// Identifies one connection; chosen by the adapter, unique while the connection lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A token bucket: `per_second` frames sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Frames per second, sustained.
    pub per_second: u32,
    /// Frames that may arrive at once.
    pub burst: u32,
}

/// Server limits and behaviour. Every field has a sane default; see `docs/PROTOCOL.md`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The server's name, part of the context clients sign (so signatures do not replay across
    /// servers). Default `"peerlink"`.
    pub server_id: String,
    /// Largest text frame accepted, in bytes; larger ones close the connection with 1009.
    /// Default 64 KiB.
    pub max_frame_size: usize,
    /// Most simultaneous connections; more are closed with 1013. Default 20,000.
    pub max_connections: usize,
    /// Most namespaces one client may be in (and pending matches it may have). Default 32.
    pub max_namespaces_per_client: usize,
    /// Most rooms one client may be in. Default 16.
    pub max_rooms_per_client: usize,
    /// Most rooms on the server. Default 100,000.
    pub max_rooms: usize,
    /// Per-connection frame rate. Default 200/s, burst 400.
    pub rate_limit: RateLimit,
    /// Dropped (rate-limited) frames in a row after which the connection is closed with 1008.
    /// Default 1,000.
    pub flood_close_after: u32,
    /// A connection with no frame for this long is closed with 4000. Default 60 s.
    pub idle_timeout: Duration,
    /// A connection that has not registered after this long is closed with 4003. Default 10 s.
    pub register_timeout: Duration,
    /// Failed `register` attempts after which the connection is closed with 1008. Default 3.
    pub max_register_failures: u32,
    /// Bytes sent to a connection but not yet reported flushed; beyond it the connection is
    /// closed with 4001. Default 1 MiB.
    pub outbound_queue_bytes: usize,
    /// How long a lost session is kept for its owner to resume. Zero disables resume. Default 30 s.
    pub resume_grace: Duration,
    /// Frames queued for a parked session. Default 256.
    pub resume_queue_frames: usize,
    /// Bytes queued for a parked session. Default 256 KiB.
    pub resume_queue_bytes: usize,
    /// An empty room is removed after this long. Default 60 s.
    pub room_ttl: Duration,
    /// Room size when `create_room` gives none. Default 16.
    pub default_room_size: u32,
    /// Largest room size allowed. Default 256.
    pub max_room_size: u32,
    /// A `match` request that has not formed a group after this long fails with
    /// `match_timeout`. Default 60 s.
    pub match_timeout: Duration,
    /// Most peers listed in a `joined` reply (`total` tells the real count). Default 256.
    pub max_peer_list: usize,
    /// Largest `discover` limit (and the default). Default 100.
    pub max_discover: u32,
    /// Largest `list_rooms` limit (and the default). Default 100.
    pub max_list_rooms: u32,
    /// Access control at registration, off by default.
    pub auth: Option<AuthConfig>,
    /// Short-lived TURN credentials for registered clients (`turn_credentials`), off by
    /// default: without it the request fails with `turn_unavailable`.
    pub turn: Option<TurnSecretConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            server_id: "peerlink".into(),
            max_frame_size: 64 * 1024,
            max_connections: 20_000,
            max_namespaces_per_client: 32,
            max_rooms_per_client: 16,
            max_rooms: 100_000,
            rate_limit: RateLimit { per_second: 200, burst: 400 },
            flood_close_after: 1_000,
            idle_timeout: Duration::from_secs(60),
            register_timeout: Duration::from_secs(10),
            max_register_failures: 3,
            outbound_queue_bytes: 1024 * 1024,
            resume_grace: Duration::from_secs(30),
            resume_queue_frames: 256,
            resume_queue_bytes: 256 * 1024,
            room_ttl: Duration::from_secs(60),
            default_room_size: 16,
            max_room_size: 256,
            match_timeout: Duration::from_secs(60),
            max_peer_list: 256,
            max_discover: 100,
            max_list_rooms: 100,
            auth: None,
            turn: None,
        }
    }
}

/// An output of the server: a frame to send or a connection to close.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerTransmit {
    /// Send `text` as one WebSocket text frame on `conn`. Fan-out shares one allocation.
    Text {
        /// The connection.
        conn: ConnId,
        /// The frame.
        text: Arc<str>,
    },
    /// Send a close frame with `code` and close `conn`. The server has already forgotten it.
    Close {
        /// The connection.
        conn: ConnId,
        /// Why.
        code: CloseCode,
    },
}

/// Misuse of the server by its adapter (never caused by network input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// `handle_connect` with an id that is already connected.
    #[error("connection {0:?} is already connected")]
    DuplicateConnection(ConnId),
    /// More than [`MAX_PENDING_TRANSMITS`] outputs wait; drain `poll_transmit` first.
    #[error("poll_transmit must be drained before more input")]
    NotDrained,
}

/// Counts of what the server holds; each returns to its baseline when clients leave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Open connections.
    pub connections: usize,
    /// Sessions with a live connection.
    pub active_sessions: usize,
    /// Sessions waiting to be resumed.
    pub parked_sessions: usize,
    /// Non-empty namespaces.
    pub namespaces: usize,
    /// Rooms, empty ones awaiting their TTL included.
    pub rooms: usize,
    /// Pending match requests.
    pub pending_matches: usize,
    /// Bytes sent to connections and not yet reported flushed.
    pub outbound_bytes: usize,
    /// Bytes queued for parked sessions.
    pub parked_bytes: usize,
    /// Timer entries (stale ones included until they fire).
    pub timers: usize,
}

struct Conn {
    nonce: String,
    connected_at: Instant,
    session: Option<Fingerprint>,
    last_rx: Instant,
    tokens: f64,
    bucket_at: Instant,
    dropped_in_row: u32,
    register_failures: u32,
    outbound_bytes: usize,
}

struct Session {
    alias: String,
    meta: Option<RawJson>,
    conn: Option<ConnId>,
    /// Bumped on every park so stale park timers are ignored.
    park_gen: u64,
    namespaces: Vec<String>,
    rooms: Vec<String>,
    matches: Vec<String>,
    /// Of `matches`, those whose queue another node of the cluster holds.
    remote_matches: Vec<cluster::RemoteMatch>,
    /// How many times the session moved between the nodes of a cluster (see
    /// [`ClusterMessage::SessionUp`]): of two placements of one identity the higher wins.
    generation: u64,
    queue: VecDeque<Arc<str>>,
    queue_bytes: usize,
    missed: u64,
}

struct Member {
    app_type: Option<String>,
    app_version: Option<String>,
}

#[derive(Default)]
struct Namespace {
    order: Vec<Fingerprint>,
    members: HashMap<Fingerprint, Member>,
}

struct Room {
    owner: Fingerprint,
    max_size: u32,
    metadata: Option<RawJson>,
    members: Vec<Fingerprint>,
    empty_since: Option<Instant>,
    /// The node that holds the room, when it is another node of the cluster (this node's copy
    /// is then a replica, changed only by that node's `room_state`).
    home: Option<cluster::NodeId>,
    /// Which room this is across the cluster: wall-clock ms of its creation and the creating
    /// node (a creation race between two nodes is settled by it: the earlier room wins).
    stamp: (u64, u64),
    /// A replica not confirmed since its home's latest resynchronisation began.
    stale: bool,
}

struct MatchWaiter {
    fingerprint: Fingerprint,
    id: u64,
    deadline: Instant,
    /// The node of a waiter that is another node's session (its replies go through it).
    node: Option<cluster::NodeId>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Register(ConnId),
    Idle(ConnId),
    Park(Fingerprint, u64),
    RoomTtl(String),
    Match(String),
    /// The cluster's heartbeat and liveness check.
    ClusterTick,
    /// A session of a node that is gone: its resume grace ends.
    Limbo(Fingerprint),
}

/// The signaling server state machine. See the [module docs](self).
pub struct Server {
    config: ServerConfig,
    rng: ChaCha20Rng,
    /// Wall clock anchor: `unix_ms_at_start` was the wall time at `start`.
    start: Instant,
    unix_ms_at_start: u64,
    conns: HashMap<ConnId, Conn>,
    sessions: HashMap<Fingerprint, Session>,
    namespaces: HashMap<String, Namespace>,
    rooms: HashMap<String, Room>,
    /// Ids of the rooms in `rooms` that are not full, in order, so `list_rooms` reads a prefix
    /// range and stops after `limit` instead of scanning every room. Kept in step by
    /// [`Server::sync_open`] wherever a room's members change or a room goes away.
    open_rooms: BTreeSet<String>,
    /// Pending matches keyed by namespace, criteria (canonical JSON) and group size.
    matches: HashMap<String, Vec<MatchWaiter>>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    out: VecDeque<ServerTransmit>,
    parked_bytes: usize,
    /// The time of the input being handled.
    now: Instant,
    /// Counters kept as inputs are handled (the gauges are filled in by [`Server::metrics`]).
    counters: Metrics,
    /// The cluster this server is a node of, if any (see [`Server::enable_cluster`]).
    cluster: Option<cluster::Cluster>,
}

/// What a request handler did: `Ok(Some(frame))` to reply with, `Ok(None)` when it already
/// replied (or will, as `match` does), or an error code and message to reply with.
type Reply = Result<Option<ServerMessage>, (ErrorCode, String)>;

fn err(code: ErrorCode, message: impl Into<String>) -> Reply {
    Err((code, message.into()))
}

fn reply(frame: ServerMessage) -> Reply {
    Ok(Some(frame))
}

impl Server {
    /// Creates a server. `seed` drives every nonce and session id; `now` and `unix_ms` anchor
    /// the wall clock used for token expiry.
    pub fn new(config: ServerConfig, seed: u64, now: Instant, unix_ms: u64) -> Self {
        Server {
            config,
            rng: ChaCha20Rng::seed_from_u64(seed),
            start: now,
            unix_ms_at_start: unix_ms,
            conns: HashMap::new(),
            sessions: HashMap::new(),
            namespaces: HashMap::new(),
            rooms: HashMap::new(),
            open_rooms: BTreeSet::new(),
            matches: HashMap::new(),
            timers: BinaryHeap::new(),
            out: VecDeque::new(),
            parked_bytes: 0,
            now,
            counters: Metrics::default(),
            cluster: None,
        }
    }

    /// Returns the configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Returns counts of what the server holds.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            connections: self.conns.len(),
            active_sessions: self.sessions.values().filter(|s| s.conn.is_some()).count(),
            parked_sessions: self.sessions.values().filter(|s| s.conn.is_none()).count(),
            namespaces: self.namespaces.len(),
            rooms: self.rooms.len(),
            pending_matches: self.matches.values().map(Vec::len).sum(),
            outbound_bytes: self.conns.values().map(|c| c.outbound_bytes).sum(),
            parked_bytes: self.parked_bytes,
            timers: self.timers.len(),
        }
    }

    /// Returns a snapshot of the server's counters and gauges at `now` (which only sets the
    /// uptime); see [`Metrics::to_prometheus`]. Costs a pass over the sessions, like
    /// [`Server::stats`]: meant for a scrape every few seconds, not per frame.
    pub fn metrics(&self, now: Instant) -> Metrics {
        let mut m = self.counters.clone();
        m.server_id.clone_from(&self.config.server_id);
        m.uptime = now.saturating_duration_since(self.start);
        m.stats = self.stats();
        m.cluster = self.cluster_stats();
        m
    }

    /// Returns the server's health at `now`. A single server has no dependency that can fail,
    /// so this is always [`HealthStatus::Ok`]; a clustered server whose link to the other nodes
    /// is down (see [`Server::handle_cluster_link`]) is [`HealthStatus::Degraded`].
    pub fn health(&self, now: Instant) -> Health {
        let mut reasons = Vec::new();
        if self.cluster_link_down() {
            reasons.push("cluster link down".to_owned());
        }
        let active = self.sessions.values().filter(|s| s.conn.is_some()).count();
        Health::new(reasons, now.saturating_duration_since(self.start), self.conns.len(), active)
    }

    /// Returns the next output, or `None` when there is nothing to send. Drain after every input.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<ServerTransmit> {
        self.out.pop_front()
    }

    /// Returns when [`Server::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Starts handling an input at `now`: refuses it if outputs were not drained.
    fn begin(&mut self, now: Instant) -> Result<(), ServerError> {
        if self.out.len() + self.cluster_pending() > MAX_PENDING_TRANSMITS {
            return Err(ServerError::NotDrained);
        }
        self.now = self.now.max(now);
        Ok(())
    }

    /// Reports a new connection. The server answers with a `challenge`, or closes it with 1013
    /// when it is full.
    pub fn handle_connect(&mut self, conn: ConnId, now: Instant) -> Result<(), ServerError> {
        self.begin(now)?;
        if self.conns.contains_key(&conn) {
            return Err(ServerError::DuplicateConnection(conn));
        }
        if self.conns.len() >= self.config.max_connections {
            debug!(?conn, "refusing connection: server full");
            self.counters.count_close(CloseCode::TryAgainLater);
            self.out.push_back(ServerTransmit::Close { conn, code: CloseCode::TryAgainLater });
            return Ok(());
        }
        self.counters.connections_accepted += 1;
        let mut nonce = [0u8; 32];
        self.rng.fill_bytes(&mut nonce);
        let nonce = B64.encode(nonce);
        let rate = self.config.rate_limit;
        self.conns.insert(
            conn,
            Conn {
                nonce: nonce.clone(),
                connected_at: now,
                session: None,
                last_rx: now,
                tokens: rate.burst as f64,
                bucket_at: now,
                dropped_in_row: 0,
                register_failures: 0,
                outbound_bytes: 0,
            },
        );
        self.schedule(now + self.config.register_timeout, Timer::Register(conn));
        self.schedule(now + self.config.idle_timeout, Timer::Idle(conn));
        let challenge = ServerMessage::Challenge {
            version: PROTOCOL_VERSION,
            server_id: self.config.server_id.clone(),
            nonce,
            auth_required: self.config.auth.is_some(),
        };
        self.send(conn, challenge.encode().into());
        trace!(?conn, "connected");
        Ok(())
    }

    /// Reports a binary frame. The protocol is text only: the connection is closed with 1003.
    pub fn handle_binary(&mut self, conn: ConnId, now: Instant, data: &[u8]) -> Result<(), ServerError> {
        self.begin(now)?;
        let _ = (now, data);
        if self.conns.contains_key(&conn) {
            debug!(?conn, "binary frame: closing");
            self.close(conn, CloseCode::UnsupportedData);
        }
        Ok(())
    }

    /// Reports that `bytes` of text sent to `conn` have been written to its socket.
    pub fn handle_sent(&mut self, conn: ConnId, bytes: usize) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.outbound_bytes = c.outbound_bytes.saturating_sub(bytes);
        }
    }

    /// Reports that a connection ended (closed by the client, reset, or failed). A registered
    /// session is parked for `resume_grace`; frames for it are queued until it resumes.
    pub fn handle_disconnect(&mut self, conn: ConnId, now: Instant) -> Result<(), ServerError> {
        self.begin(now)?;
        if self.conns.contains_key(&conn) {
            trace!(?conn, "disconnected");
            self.counters.disconnects += 1;
            self.drop_conn(conn, now, true);
        }
        Ok(())
    }

    /// Processes expired timers. Calling it early does nothing.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), ServerError> {
        self.begin(now)?;
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, timer))) = self.timers.pop() else { break };
            self.fire(timer, now);
        }
        Ok(())
    }

    /// Reports a text frame from `conn`.
    pub fn handle_message(&mut self, conn: ConnId, now: Instant, text: &str) -> Result<(), ServerError> {
        self.begin(now)?;
        let Some(c) = self.conns.get_mut(&conn) else {
            return Ok(());
        };
        c.last_rx = now;
        if text.len() > self.config.max_frame_size {
            debug!(?conn, len = text.len(), "oversized frame: closing");
            self.close(conn, CloseCode::MessageTooBig);
            return Ok(());
        }
        // Token bucket, refilled lazily.
        let rate = self.config.rate_limit;
        let elapsed = now.saturating_duration_since(c.bucket_at).as_secs_f64();
        c.tokens = (c.tokens + elapsed * rate.per_second as f64).min(rate.burst as f64);
        c.bucket_at = now;
        if c.tokens < 1.0 {
            self.counters.rate_limited_frames += 1;
            c.dropped_in_row += 1;
            let dropped = c.dropped_in_row;
            if dropped > self.config.flood_close_after {
                debug!(?conn, "flooding: closing");
                self.close(conn, CloseCode::PolicyViolation);
            } else if dropped == 1 {
                let id = protocol::decode_client(text).ok().and_then(|m| m.id());
                self.send_error(conn, id, ErrorCode::RateLimited, "rate limit exceeded; frame dropped");
            }
            return Ok(());
        }
        c.tokens -= 1.0;
        c.dropped_in_row = 0;
        let registered = c.session;
        let msg = match protocol::decode_client(text) {
            Ok(msg) => {
                self.counters.count_message(MessageType::of(&msg));
                msg
            }
            Err(FrameError { code, message, id }) => {
                let kind = if code == ErrorCode::UnknownType { MessageType::Unknown } else { MessageType::Invalid };
                self.counters.count_message(kind);
                self.send_error(conn, id, code, &message);
                return Ok(());
            }
        };
        let Some(me) = registered else {
            match msg {
                ClientMessage::Register { id, version, public_key, alias, meta, signature, token } => {
                    self.register(conn, now, id, version, &public_key, alias, meta, &signature, token)
                }
                ClientMessage::Bye => self.close(conn, CloseCode::Normal),
                other => self.send_error(conn, other.id(), ErrorCode::NotRegistered, "register first"),
            }
            return Ok(());
        };
        let (id, reply) = match msg {
            ClientMessage::Register { id, .. } => (Some(id), err(ErrorCode::AlreadyRegistered, "already registered")),
            ClientMessage::Join { id, namespace, app_type, app_version } => {
                (Some(id), self.join(me, id, namespace, app_type, app_version))
            }
            ClientMessage::Leave { id, namespace } => (Some(id), self.leave(me, id, &namespace)),
            ClientMessage::Discover { id, namespace, limit } => (Some(id), self.discover(me, id, &namespace, limit)),
            ClientMessage::Match { id, namespace, criteria, group_size } => {
                (Some(id), self.enqueue_match(me, id, namespace, criteria, group_size, now))
            }
            ClientMessage::CancelMatch { id, namespace } => (Some(id), self.cancel_match(me, id, &namespace)),
            ClientMessage::Relay { id, to, payload } => (id, self.relay(me, id, to, payload)),
            ClientMessage::Broadcast { id, namespace, payload } => (id, self.broadcast(me, id, &namespace, payload)),
            ClientMessage::CreateRoom { id, room_id, config } => {
                (Some(id), self.create_room(me, id, room_id, config.max_size, config.metadata))
            }
            ClientMessage::JoinRoom { id, room_id } => (Some(id), self.join_room(me, id, &room_id)),
            ClientMessage::LeaveRoom { id, room_id } => (Some(id), self.leave_room(me, id, &room_id, now)),
            ClientMessage::RoomInfo { id, room_id } => (Some(id), self.room_info(id, &room_id)),
            ClientMessage::ListRooms { id, prefix, limit } => {
                (Some(id), self.list_rooms(id, prefix.as_deref().unwrap_or(""), limit))
            }
            ClientMessage::Kick { id, room_id, fingerprint } => {
                (Some(id), self.kick(me, id, &room_id, fingerprint, now))
            }
            ClientMessage::CloseRoom { id, room_id } => (Some(id), self.close_room(me, id, &room_id)),
            ClientMessage::Ping { id } => (Some(id), reply(ServerMessage::Pong { id })),
            ClientMessage::TurnCredentials { id } => (Some(id), self.turn_credentials(me, id, now)),
            ClientMessage::Bye => {
                self.end_session(me, now);
                self.close(conn, CloseCode::Normal);
                return Ok(());
            }
        };
        match reply {
            Ok(Some(frame)) => self.send(conn, frame.encode().into()),
            Ok(None) => {}
            // Fire-and-forget relays and broadcasts get no `ok`, but do get their errors.
            Err((code, message)) => self.send_error(conn, id, code, &message),
        }
        Ok(())
    }

    // ---- registration -------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn register(
        &mut self,
        conn: ConnId,
        now: Instant,
        id: u64,
        version: u32,
        public_key: &str,
        alias: Cow<'_, str>,
        meta: Option<&RawValue>,
        signature: &str,
        token: Option<Cow<'_, str>>,
    ) {
        let result = self.verify_registration(conn, now, version, public_key, signature, token.as_deref());
        let fingerprint = match result {
            Ok(fp) => fp,
            Err((code, message)) => {
                self.send_error(conn, Some(id), code, &message);
                let Some(c) = self.conns.get_mut(&conn) else { return };
                c.register_failures += 1;
                if c.register_failures >= self.config.max_register_failures {
                    self.close(conn, CloseCode::PolicyViolation);
                }
                return;
            }
        };
        let mut resumed = false;
        let mut queued = VecDeque::new();
        let mut missed = 0;
        // Known as a session of another node until now: the identity moved here, keeping its
        // namespaces, rooms and what was queued for it while it was between nodes.
        let adopted = if self.sessions.contains_key(&fingerprint) { None } else { self.adopt_remote(fingerprint) };
        match self.sessions.entry(fingerprint) {
            Entry::Occupied(mut e) => {
                let s = e.get_mut();
                resumed = true;
                let old = s.conn.replace(conn);
                s.park_gen += 1;
                s.alias = alias.into_owned();
                s.meta = meta.map(RawJson::from);
                queued = std::mem::take(&mut s.queue);
                self.parked_bytes -= s.queue_bytes;
                s.queue_bytes = 0;
                missed = std::mem::take(&mut s.missed);
                if let Some(old) = old {
                    // The identity moved to a newer connection: close the old one quietly.
                    if let Some(c) = self.conns.get_mut(&old) {
                        c.session = None;
                    }
                    self.close(old, CloseCode::Replaced);
                }
            }
            Entry::Vacant(e) => {
                let (namespaces, rooms, generation) = match adopted {
                    Some(a) => {
                        resumed = true;
                        queued = a.queue;
                        (a.namespaces, a.rooms, a.generation + 1)
                    }
                    None => (Vec::new(), Vec::new(), 1),
                };
                e.insert(Session {
                    alias: alias.into_owned(),
                    meta: meta.map(RawJson::from),
                    conn: Some(conn),
                    park_gen: 0,
                    namespaces,
                    rooms,
                    matches: Vec::new(),
                    remote_matches: Vec::new(),
                    generation,
                    queue: VecDeque::new(),
                    queue_bytes: 0,
                    missed: 0,
                });
            }
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.session = Some(fingerprint);
        }
        self.counters.registrations += 1;
        if resumed {
            self.counters.sessions_resumed += 1;
        }
        let s = &self.sessions[&fingerprint];
        info!(fingerprint = %fingerprint.short(), resumed, ?conn, "registered");
        let reply = ServerMessage::Registered {
            id,
            fingerprint,
            alias: s.alias.clone(),
            resumed,
            namespaces: s.namespaces.clone(),
            rooms: s.rooms.clone(),
            missed,
        };
        self.send(conn, reply.encode().into());
        self.announce(fingerprint);
        // Through the session, not the connection: if the flush overflows the outbound queue
        // and parks the session again, the rest waits in its queue instead of being dropped.
        for text in queued {
            self.send_to_session(&fingerprint, text);
        }
    }

    fn verify_registration(
        &self,
        conn: ConnId,
        now: Instant,
        version: u32,
        public_key: &str,
        signature: &str,
        token: Option<&str>,
    ) -> Result<Fingerprint, (ErrorCode, String)> {
        if version != PROTOCOL_VERSION {
            return Err((
                ErrorCode::UnsupportedVersion,
                format!("server speaks version {PROTOCOL_VERSION}, client sent {version}"),
            ));
        }
        let key = PublicKey::from_base64(public_key)
            .map_err(|e| (ErrorCode::InvalidField, format!("`public_key`: {e}")))?;
        let sig =
            Signature::from_base64(signature).map_err(|e| (ErrorCode::InvalidField, format!("`signature`: {e}")))?;
        let nonce = &self.conns[&conn].nonce;
        key.verify(&protocol::register_context(&self.config.server_id, nonce), &sig)
            .map_err(|_| (ErrorCode::BadSignature, "signature does not verify for this connection's challenge".into()))?;
        let fingerprint = key.fingerprint();
        if let Some(auth) = &self.config.auth {
            let Some(token) = token else {
                return Err((ErrorCode::AuthRequired, "this server requires a token".into()));
            };
            let unix_ms = self.unix_ms(now);
            jwt::verify(auth, token, unix_ms, &fingerprint).map_err(|e| match e {
                AuthError::Expired => (ErrorCode::AuthExpired, e.to_string()),
                _ => (ErrorCode::AuthInvalid, e.to_string()),
            })?;
        }
        Ok(fingerprint)
    }

    fn unix_ms(&self, now: Instant) -> u64 {
        self.unix_ms_at_start + now.saturating_duration_since(self.start).as_millis() as u64
    }

    fn peer_info(&self, fp: &Fingerprint, member: Option<&Member>) -> PeerInfo {
        let Some(s) = self.sessions.get(fp) else {
            // Namespaces also list the sessions of other nodes of a cluster.
            return self.remote_peer_info(fp, member);
        };
        PeerInfo {
            fingerprint: *fp,
            alias: s.alias.clone(),
            meta: s.meta.clone(),
            app_type: member.and_then(|m| m.app_type.clone()),
            app_version: member.and_then(|m| m.app_version.clone()),
        }
    }

    // ---- namespaces ---------------------------------------------------------------------

    fn join(
        &mut self,
        me: Fingerprint,
        id: u64,
        namespace: Cow<'_, str>,
        app_type: Option<Cow<'_, str>>,
        app_version: Option<Cow<'_, str>>,
    ) -> Reply {
        let already = self.namespaces.get(namespace.as_ref()).is_some_and(|ns| ns.members.contains_key(&me));
        if !already {
            let s = &self.sessions[&me];
            if s.namespaces.len() >= self.config.max_namespaces_per_client {
                return err(
                    ErrorCode::TooManyNamespaces,
                    format!("at most {} namespaces per client", self.config.max_namespaces_per_client),
                );
            }
            let member = Member {
                app_type: app_type.map(Cow::into_owned),
                app_version: app_version.map(Cow::into_owned),
            };
            let info = self.peer_info(&me, Some(&member));
            let ns = self.namespaces.entry(namespace.to_string()).or_default();
            ns.order.push(me);
            ns.members.insert(me, member);
            self.sessions.get_mut(&me).expect("registered").namespaces.push(namespace.to_string());
            self.publish_join(me, &namespace);
            let notice: Arc<str> =
                ServerMessage::PeerJoined { namespace: namespace.to_string(), peer: info }.encode().into();
            let others: Vec<Fingerprint> = self.namespaces[namespace.as_ref()].order.iter().copied().filter(|f| *f != me).collect();
            // The joiner's reply goes out before the notices, as in the reference exchange.
            let reply = self.joined_reply(me, id, &namespace);
            self.send_to_session(&me, reply.encode().into());
            for other in others {
                self.send_to_session(&other, notice.clone());
            }
            return Ok(None);
        }
        reply(self.joined_reply(me, id, &namespace))
    }

    fn joined_reply(&self, me: Fingerprint, id: u64, namespace: &str) -> ServerMessage {
        let ns = &self.namespaces[namespace];
        let others = ns.order.iter().filter(|f| **f != me);
        ServerMessage::Joined {
            id,
            namespace: namespace.to_owned(),
            peers: others
                .clone()
                .take(self.config.max_peer_list)
                .map(|f| self.peer_info(f, ns.members.get(f)))
                .collect(),
            total: ns.order.len() - 1,
        }
    }

    fn leave(&mut self, me: Fingerprint, id: u64, namespace: &str) -> Reply {
        if !self.remove_from_namespace(me, namespace) {
            return err(ErrorCode::NotInNamespace, format!("not in namespace `{namespace}`"));
        }
        let s = self.sessions.get_mut(&me).expect("registered");
        s.namespaces.retain(|n| n != namespace);
        self.publish(ClusterTarget::All, ClusterMessage::Left { fingerprint: me, namespace: namespace.to_owned() });
        reply(ServerMessage::Ok { id })
    }

    /// Removes `me` from a namespace and tells the others. Returns whether it was a member.
    fn remove_from_namespace(&mut self, me: Fingerprint, namespace: &str) -> bool {
        let Some(ns) = self.namespaces.get_mut(namespace) else { return false };
        if ns.members.remove(&me).is_none() {
            return false;
        }
        ns.order.retain(|f| *f != me);
        let others = ns.order.clone();
        if others.is_empty() {
            self.namespaces.remove(namespace);
        }
        let notice: Arc<str> =
            ServerMessage::PeerLeft { namespace: namespace.to_owned(), fingerprint: me }.encode().into();
        for other in others {
            self.send_to_session(&other, notice.clone());
        }
        true
    }

    fn discover(&self, me: Fingerprint, id: u64, namespace: &str, limit: Option<u32>) -> Reply {
        let limit = limit.unwrap_or(self.config.max_discover).min(self.config.max_discover) as usize;
        let peers = match self.namespaces.get(namespace) {
            Some(ns) => ns
                .order
                .iter()
                .filter(|f| **f != me)
                .take(limit)
                .map(|f| self.peer_info(f, ns.members.get(f)))
                .collect(),
            None => Vec::new(),
        };
        reply(ServerMessage::Discovered { id, namespace: namespace.to_owned(), peers })
    }

    // ---- matchmaking --------------------------------------------------------------------

    fn match_key(namespace: &str, criteria: Option<&RawValue>, group_size: u32) -> Result<String, (ErrorCode, String)> {
        // Criteria compare by value: parse and re-serialize with sorted keys.
        let canonical = match criteria {
            Some(raw) => serde_json::from_str::<serde_json::Value>(raw.get())
                .map(|v| v.to_string())
                .map_err(|e| (ErrorCode::InvalidField, format!("`criteria`: {e}")))?,
            None => "{}".to_owned(),
        };
        Ok(format!("{group_size}\n{namespace}\n{canonical}"))
    }

    fn enqueue_match(
        &mut self,
        me: Fingerprint,
        id: u64,
        namespace: Cow<'_, str>,
        criteria: Option<&RawValue>,
        group_size: u32,
        now: Instant,
    ) -> Reply {
        let key = Self::match_key(&namespace, criteria, group_size)?;
        // One pending match per namespace: a new request replaces the old one.
        let previous = self.sessions[&me].matches.iter().find(|k| key_namespace(k) == namespace).cloned();
        if let Some(prev) = previous {
            self.withdraw_match(me, &prev, Some(ErrorCode::MatchCancelled));
        } else if self.sessions[&me].matches.len() >= self.config.max_namespaces_per_client {
            return err(
                ErrorCode::TooManyNamespaces,
                format!("at most {} pending matches per client", self.config.max_namespaces_per_client),
            );
        }
        if let Some(owner) = self.match_owner(&key) {
            // Another node of the cluster holds this queue.
            if self.cluster_link_down() {
                return err(ErrorCode::Unavailable, "this match queue is held by another node and the cluster link is down");
            }
            self.place_remote_match(me, id, key, owner);
            return Ok(None);
        }
        let waiter = MatchWaiter { fingerprint: me, id, deadline: now + self.config.match_timeout, node: None };
        self.enqueue_waiter(waiter, key);
        Ok(None)
    }

    /// Adds a waiter to the queue under `key`, held by this node, and forms the group once the
    /// queue holds `group_size` waiters. A waiter already in the queue is replaced.
    fn enqueue_waiter(&mut self, waiter: MatchWaiter, key: String) {
        let group_size = key_group_size(&key);
        let (me, deadline, local) = (waiter.fingerprint, waiter.deadline, waiter.node.is_none());
        let queue = self.matches.entry(key.clone()).or_default();
        queue.retain(|w| w.fingerprint != me);
        queue.push(waiter);
        if queue.len() < group_size {
            if local {
                let s = self.sessions.get_mut(&me).expect("registered");
                if !s.matches.contains(&key) {
                    s.matches.push(key.clone());
                }
            }
            self.schedule(deadline, Timer::Match(key));
            return;
        }
        let group = self.matches.remove(&key).unwrap_or_default();
        let mut sid = [0u8; 16];
        self.rng.fill_bytes(&mut sid);
        let session_id: String = sid.iter().map(|b| format!("{b:02x}")).collect();
        let peers: Vec<PeerInfo> = group.iter().map(|w| self.peer_info(&w.fingerprint, None)).collect();
        let namespace = key_namespace(&key).to_owned();
        debug!(%namespace, size = group.len(), "match formed");
        for w in &group {
            let frame = ServerMessage::Matched {
                id: w.id,
                namespace: namespace.clone(),
                session_id: session_id.clone(),
                peers: peers.clone(),
            };
            self.finish_match(w, &key, frame.encode().into());
        }
    }

    /// Tells a waiter its match is over (formed, timed out or cancelled), through its node.
    fn finish_match(&mut self, w: &MatchWaiter, key: &str, text: Arc<str>) {
        match w.node {
            None => {
                if let Some(s) = self.sessions.get_mut(&w.fingerprint) {
                    s.matches.retain(|k| k != key);
                }
                self.send_to_session(&w.fingerprint, text);
            }
            Some(node) => self.publish(
                ClusterTarget::Node(node),
                ClusterMessage::MatchDone { to: w.fingerprint, key: key.to_owned(), text: text.to_string() },
            ),
        }
    }

    fn cancel_match(&mut self, me: Fingerprint, id: u64, namespace: &str) -> Reply {
        let key = self.sessions[&me].matches.iter().find(|k| key_namespace(k) == namespace).cloned();
        match key {
            Some(key) => {
                self.withdraw_match(me, &key, Some(ErrorCode::MatchCancelled));
                reply(ServerMessage::Ok { id })
            }
            None => err(ErrorCode::InvalidField, format!("no pending match in `{namespace}`")),
        }
    }

    /// Withdraws local session `me`'s request under `key` (from this node's queue, or from the
    /// node holding it), answering the request with `reply` if given.
    fn withdraw_match(&mut self, me: Fingerprint, key: &str, reply: Option<ErrorCode>) {
        let mut remote = None;
        if let Some(s) = self.sessions.get_mut(&me) {
            s.matches.retain(|k| k != key);
            if let Some(pos) = s.remote_matches.iter().position(|m| m.key == key) {
                remote = Some(s.remote_matches.remove(pos));
            }
        }
        match remote {
            Some(m) => {
                self.publish(ClusterTarget::Node(m.owner), ClusterMessage::MatchCancel { from: me, key: key.to_owned() });
                if let Some(code) = reply {
                    let frame = match_error(m.id, code);
                    self.counters.count_error(code);
                    self.send_to_session(&me, frame.encode().into());
                }
            }
            None => self.remove_waiter(me, key, reply),
        }
    }

    /// Removes `fp`'s waiter from this node's queue under `key`, answering it with `reply`.
    fn remove_waiter(&mut self, fp: Fingerprint, key: &str, reply: Option<ErrorCode>) {
        let Some(queue) = self.matches.get_mut(key) else { return };
        let Some(pos) = queue.iter().position(|w| w.fingerprint == fp) else { return };
        let waiter = queue.remove(pos);
        if queue.is_empty() {
            self.matches.remove(key);
        }
        if let Some(code) = reply {
            self.counters.count_error(code);
            self.finish_match(&waiter, key, match_error(waiter.id, code).encode().into());
        }
    }

    // ---- messaging ----------------------------------------------------------------------

    fn relay(&mut self, me: Fingerprint, id: Option<u64>, to: Fingerprint, payload: &RawValue) -> Reply {
        if let Some(reply) = self.relay_local(me, id, to, payload) {
            return reply;
        }
        if self.remote_of(&to).is_some() {
            // A session of another node of the cluster, which answers (`ok` or an error).
            return self.route_relay(me, to, id, &RawJson::from(payload), self.now);
        }
        err(ErrorCode::PeerNotFound, format!("no peer {}", to.short()))
    }

    /// A relay to a session of this node; `None` when `to` has no session here.
    fn relay_local(&mut self, me: Fingerprint, id: Option<u64>, to: Fingerprint, payload: &RawValue) -> Option<Reply> {
        let target = self.sessions.get(&to)?;
        let text: Arc<str> = protocol::encode_relay(&me, payload).into();
        if target.conn.is_none() && !self.can_queue(&to, text.len()) {
            return Some(err(ErrorCode::QueueFull, format!("peer {} is reconnecting and its queue is full", to.short())));
        }
        self.send_to_session(&to, text);
        self.counters.relays += 1;
        Some(Ok(id.map(|id| ServerMessage::Ok { id })))
    }

    fn broadcast(&mut self, me: Fingerprint, id: Option<u64>, namespace: &str, payload: &RawValue) -> Reply {
        let Some(ns) = self.namespaces.get(namespace).filter(|ns| ns.members.contains_key(&me)) else {
            return err(ErrorCode::NotInNamespace, format!("not in namespace `{namespace}`"));
        };
        let others: Vec<Fingerprint> = ns.order.iter().copied().filter(|f| *f != me).collect();
        let text: Arc<str> = protocol::encode_broadcast(&me, namespace, payload).into();
        self.counters.broadcasts += 1;
        self.counters.broadcast_deliveries += others.len() as u64;
        self.forward_broadcast(me, namespace, &others, payload);
        for other in others {
            self.send_to_session(&other, text.clone());
        }
        Ok(id.map(|id| ServerMessage::Ok { id }))
    }

    // ---- rooms --------------------------------------------------------------------------

    fn create_room(
        &mut self,
        me: Fingerprint,
        id: u64,
        room_id: Cow<'_, str>,
        max_size: Option<u32>,
        metadata: Option<&RawValue>,
    ) -> Reply {
        if self.rooms.contains_key(room_id.as_ref()) {
            return err(ErrorCode::RoomExists, format!("room `{room_id}` exists"));
        }
        let max_size = max_size.unwrap_or(self.config.default_room_size);
        if !(1..=self.config.max_room_size).contains(&max_size) {
            return err(ErrorCode::InvalidField, format!("`config.max_size` must be 1 to {}", self.config.max_room_size));
        }
        if self.sessions[&me].rooms.len() >= self.config.max_rooms_per_client {
            return err(ErrorCode::TooManyRooms, format!("at most {} rooms per client", self.config.max_rooms_per_client));
        }
        if self.rooms.len() >= self.config.max_rooms {
            return err(ErrorCode::Unavailable, "the server holds as many rooms as it allows");
        }
        let metadata = metadata.map(RawJson::from);
        let stamp = (self.unix_ms(self.now), self.node_id().map_or(0, |n| n.0));
        self.rooms.insert(
            room_id.to_string(),
            Room {
                owner: me,
                max_size,
                metadata: metadata.clone(),
                members: vec![me],
                empty_since: None,
                home: None,
                stamp,
                stale: false,
            },
        );
        self.sessions.get_mut(&me).expect("registered").rooms.push(room_id.to_string());
        self.sync_open(&room_id);
        self.publish_room(&room_id, None);
        reply(ServerMessage::RoomCreated { id, room_id: room_id.into_owned(), owner: me, max_size, metadata })
    }

    fn join_room(&mut self, me: Fingerprint, id: u64, room_id: &str) -> Reply {
        let Some(room) = self.rooms.get(room_id) else {
            return err(ErrorCode::RoomNotFound, format!("no room `{room_id}`"));
        };
        if !room.members.contains(&me) {
            if room.members.len() >= room.max_size as usize {
                return err(ErrorCode::RoomFull, format!("room `{room_id}` is full ({})", room.max_size));
            }
            // The requester's own bound (a request forwarded by its node was checked there).
            if self.sessions.get(&me).is_some_and(|s| s.rooms.len() >= self.config.max_rooms_per_client) {
                return err(ErrorCode::TooManyRooms, format!("at most {} rooms per client", self.config.max_rooms_per_client));
            }
            if let Some(home) = room.home {
                // Held by another node of the cluster, which adds the member and answers.
                self.forward_room_op(home, me, Some(id), room_id, cluster::RoomOp::Join)?;
                return Ok(None);
            }
            let notice: Arc<str> =
                ServerMessage::RoomPeerJoined { room_id: room_id.to_owned(), peer: self.peer_info(&me, None) }
                    .encode()
                    .into();
            let others = room.members.clone();
            let room = self.rooms.get_mut(room_id).expect("checked above");
            room.members.push(me);
            room.empty_since = None;
            if let Some(s) = self.sessions.get_mut(&me) {
                s.rooms.push(room_id.to_owned());
            }
            self.sync_open(room_id);
            self.publish_room(room_id, None);
            for other in others {
                self.send_to_session(&other, notice.clone());
            }
        }
        reply(self.room_joined(me, id, room_id))
    }

    /// The `room_joined` reply for member `me`.
    fn room_joined(&self, me: Fingerprint, id: u64, room_id: &str) -> ServerMessage {
        let room = &self.rooms[room_id];
        ServerMessage::RoomJoined {
            id,
            room_id: room_id.to_owned(),
            owner: room.owner,
            max_size: room.max_size,
            metadata: room.metadata.clone(),
            peers: room.members.iter().filter(|f| **f != me).map(|f| self.peer_info(f, None)).collect(),
        }
    }

    fn leave_room(&mut self, me: Fingerprint, id: u64, room_id: &str, now: Instant) -> Reply {
        if let Some(home) = self.rooms.get(room_id).filter(|r| r.members.contains(&me)).and_then(|r| r.home) {
            self.forward_room_op(home, me, Some(id), room_id, cluster::RoomOp::Leave)?;
            return Ok(None);
        }
        if !self.remove_from_room(me, room_id, false, now) {
            return err(ErrorCode::NotInRoom, format!("not in room `{room_id}`"));
        }
        reply(ServerMessage::Ok { id })
    }

    /// Removes `who` from a room held by this node and tells the rest. Returns whether it was
    /// a member.
    fn remove_from_room(&mut self, who: Fingerprint, room_id: &str, kicked: bool, now: Instant) -> bool {
        let Some(room) = self.rooms.get_mut(room_id).filter(|r| r.home.is_none()) else { return false };
        let Some(pos) = room.members.iter().position(|f| *f == who) else { return false };
        room.members.remove(pos);
        let others = room.members.clone();
        if others.is_empty() {
            room.empty_since = Some(now);
            self.schedule(now + self.config.room_ttl, Timer::RoomTtl(room_id.to_owned()));
        }
        if let Some(s) = self.sessions.get_mut(&who) {
            s.rooms.retain(|r| r != room_id);
        }
        self.sync_open(room_id);
        self.publish_room(room_id, kicked.then_some(who));
        let notice: Arc<str> =
            ServerMessage::RoomPeerLeft { room_id: room_id.to_owned(), fingerprint: who, kicked }.encode().into();
        for other in others {
            self.send_to_session(&other, notice.clone());
        }
        true
    }

    fn room_info(&self, id: u64, room_id: &str) -> Reply {
        let Some(room) = self.rooms.get(room_id) else {
            return err(ErrorCode::RoomNotFound, format!("no room `{room_id}`"));
        };
        reply(ServerMessage::RoomInfo {
            id,
            room_id: room_id.to_owned(),
            owner: room.owner,
            max_size: room.max_size,
            metadata: room.metadata.clone(),
            members: room.members.len(),
        })
    }

    fn list_rooms(&self, id: u64, prefix: &str, limit: Option<u32>) -> Reply {
        let limit = limit.unwrap_or(self.config.max_list_rooms).min(self.config.max_list_rooms) as usize;
        // The ids starting with `prefix` are one contiguous range of the ordered set, and every
        // id in it is open: the work is one lookup plus `limit` rooms, however many rooms exist.
        let rooms = self
            .open_rooms
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|room_id| room_id.starts_with(prefix))
            .take(limit)
            .map(|room_id| {
                let room = &self.rooms[room_id];
                RoomListing {
                    room_id: room_id.clone(),
                    owner: room.owner,
                    max_size: room.max_size,
                    metadata: room.metadata.clone(),
                    members: room.members.len(),
                }
            })
            .collect();
        reply(ServerMessage::Rooms { id, rooms })
    }

    /// Brings `open_rooms` in line with the room: listed while it exists and is not full.
    fn sync_open(&mut self, room_id: &str) {
        let open = self.rooms.get(room_id).is_some_and(|r| r.members.len() < r.max_size as usize);
        if !open {
            self.open_rooms.remove(room_id);
        } else if !self.open_rooms.contains(room_id) {
            self.open_rooms.insert(room_id.to_owned());
        }
    }

    fn kick(&mut self, me: Fingerprint, id: u64, room_id: &str, target: Fingerprint, now: Instant) -> Reply {
        let Some(room) = self.rooms.get(room_id) else {
            return err(ErrorCode::RoomNotFound, format!("no room `{room_id}`"));
        };
        if room.owner != me {
            return err(ErrorCode::NotRoomOwner, "only the room's owner may kick");
        }
        if target == me {
            return err(ErrorCode::InvalidField, "the owner cannot kick itself; use leave_room or close_room");
        }
        if let Some(home) = room.home {
            self.forward_room_op(home, me, Some(id), room_id, cluster::RoomOp::Kick { target })?;
            return Ok(None);
        }
        if !self.remove_from_room(target, room_id, true, now) {
            return err(ErrorCode::NotInRoom, format!("{} is not in room `{room_id}`", target.short()));
        }
        let frame = ServerMessage::Kicked { room_id: room_id.to_owned() };
        self.send_to_session(&target, frame.encode().into());
        reply(ServerMessage::Ok { id })
    }

    fn close_room(&mut self, me: Fingerprint, id: u64, room_id: &str) -> Reply {
        let Some(room) = self.rooms.get(room_id) else {
            return err(ErrorCode::RoomNotFound, format!("no room `{room_id}`"));
        };
        if room.owner != me {
            return err(ErrorCode::NotRoomOwner, "only the room's owner may close it");
        }
        if let Some(home) = room.home {
            self.forward_room_op(home, me, Some(id), room_id, cluster::RoomOp::Close)?;
            return Ok(None);
        }
        let room = self.rooms.remove(room_id).expect("checked above");
        self.sync_open(room_id);
        self.publish_room_gone(room_id, room.stamp, Some(me));
        let notice: Arc<str> = ServerMessage::RoomClosed { room_id: room_id.to_owned() }.encode().into();
        for member in room.members {
            if let Some(s) = self.sessions.get_mut(&member) {
                s.rooms.retain(|r| r != room_id);
            }
            if member != me {
                self.send_to_session(&member, notice.clone());
            }
        }
        reply(ServerMessage::Ok { id })
    }

    // ---- TURN credentials ---------------------------------------------------------------

    /// Issues TURN REST API credentials for `me`, valid `ttl` from now (wall clock).
    fn turn_credentials(&self, me: Fingerprint, id: u64, now: Instant) -> Reply {
        let Some(turn) = &self.config.turn else {
            return err(ErrorCode::TurnUnavailable, "this server issues no TURN credentials");
        };
        let ttl = turn.ttl.as_secs();
        let expiry = (self.unix_ms(now) / 1000).saturating_add(ttl);
        let (username, credential) = turn::turn_rest_credentials(&turn.secret, expiry, &me);
        debug!(fingerprint = %me.short(), expiry, "TURN credentials issued");
        reply(ServerMessage::TurnCredentials { id, username, credential, ttl, urls: turn.urls.clone() })
    }

    // ---- sessions, connections, timers ----------------------------------------------------

    fn schedule(&mut self, at: Instant, timer: Timer) {
        self.timers.push(Reverse((at, timer)));
    }

    fn fire(&mut self, timer: Timer, now: Instant) {
        match timer {
            Timer::Register(conn) => {
                // The id may belong to a newer connection than the one that set this timer.
                let due = |c: &Conn| c.connected_at + self.config.register_timeout <= now;
                if self.conns.get(&conn).is_some_and(|c| c.session.is_none() && due(c)) {
                    debug!(?conn, "registration timeout");
                    self.close(conn, CloseCode::RegisterTimeout);
                }
            }
            Timer::Idle(conn) => {
                let Some(c) = self.conns.get(&conn) else { return };
                let due = c.last_rx + self.config.idle_timeout;
                if due <= now {
                    debug!(?conn, "idle timeout");
                    self.close(conn, CloseCode::IdleTimeout);
                } else {
                    self.schedule(due, Timer::Idle(conn));
                }
            }
            Timer::Park(fp, generation) => {
                if self.sessions.get(&fp).is_some_and(|s| s.conn.is_none() && s.park_gen == generation) {
                    debug!(fingerprint = %fp.short(), "resume grace expired");
                    self.end_session(fp, now);
                }
            }
            Timer::RoomTtl(room_id) => {
                let expired = self.rooms.get(&room_id).filter(|r| r.home.is_none()).and_then(|r| r.empty_since).is_some_and(|t| t + self.config.room_ttl <= now);
                if expired {
                    debug!(%room_id, "empty room removed");
                    if let Some(room) = self.rooms.remove(&room_id) {
                        self.publish_room_gone(&room_id, room.stamp, None);
                    }
                    self.sync_open(&room_id);
                }
            }
            Timer::Match(key) => {
                let expired: Vec<Fingerprint> = self
                    .matches
                    .get(&key)
                    .map(|q| q.iter().filter(|w| w.deadline <= now).map(|w| w.fingerprint).collect())
                    .unwrap_or_default();
                for fp in expired {
                    self.remove_waiter(fp, &key, Some(ErrorCode::MatchTimeout));
                }
            }
            Timer::ClusterTick => self.cluster_tick(now),
            Timer::Limbo(fp) => self.limbo_expired(fp, now),
        }
    }

    /// Closes `conn`: sends the close frame and forgets the connection, parking its session.
    fn close(&mut self, conn: ConnId, code: CloseCode) {
        if self.conns.contains_key(&conn) {
            self.counters.count_close(code);
            self.out.push_back(ServerTransmit::Close { conn, code });
            // Closing is immediate for the state machine; `now` only matters for parking.
            self.drop_conn(conn, self.now, code != CloseCode::Normal);
        }
    }

    /// Forgets a connection; its session is parked (or ended when `park` is false or resume
    /// is disabled).
    fn drop_conn(&mut self, conn: ConnId, now: Instant, park: bool) {
        let Some(c) = self.conns.remove(&conn) else { return };
        let Some(fp) = c.session else { return };
        let Some(s) = self.sessions.get_mut(&fp) else { return };
        if s.conn != Some(conn) {
            return;
        }
        if !park || self.config.resume_grace.is_zero() {
            self.end_session(fp, now);
            return;
        }
        s.conn = None;
        s.park_gen += 1;
        let generation = s.park_gen;
        debug!(fingerprint = %fp.short(), "session parked");
        self.schedule(now + self.config.resume_grace, Timer::Park(fp, generation));
    }

    /// Ends a session: leaves every namespace and room (telling the members) and drops its
    /// pending matches and queue.
    fn end_session(&mut self, fp: Fingerprint, now: Instant) {
        let Some(s) = self.sessions.get_mut(&fp) else { return };
        let namespaces = std::mem::take(&mut s.namespaces);
        let rooms = std::mem::take(&mut s.rooms);
        let matches = std::mem::take(&mut s.matches);
        for ns in namespaces {
            self.remove_from_namespace(fp, &ns);
        }
        for room in rooms {
            match self.rooms.get(&room).and_then(|r| r.home) {
                // Held by another node: it removes the member (and tells every node).
                Some(home) => {
                    let _ = self.forward_room_op(home, fp, None, &room, cluster::RoomOp::Leave);
                }
                None => {
                    self.remove_from_room(fp, &room, false, now);
                }
            }
        }
        for key in matches {
            self.withdraw_match(fp, &key, None);
        }
        if let Some(s) = self.sessions.remove(&fp) {
            self.publish(ClusterTarget::All, ClusterMessage::SessionDown { fingerprint: fp });
            self.parked_bytes -= s.queue_bytes;
            if let Some(conn) = s.conn {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.session = None;
                }
            }
        }
        debug!(fingerprint = %fp.short(), "session ended");
    }

    fn can_queue(&self, fp: &Fingerprint, len: usize) -> bool {
        self.sessions.get(fp).is_some_and(|s| {
            s.queue.len() < self.config.resume_queue_frames && s.queue_bytes + len <= self.config.resume_queue_bytes
        })
    }

    /// Delivers a frame to a session: sent on its connection, or queued while it is parked.
    fn send_to_session(&mut self, fp: &Fingerprint, text: Arc<str>) {
        let Some(s) = self.sessions.get_mut(fp) else { return };
        match s.conn {
            Some(conn) => self.send(conn, text),
            None => {
                if s.queue.len() < self.config.resume_queue_frames
                    && s.queue_bytes + text.len() <= self.config.resume_queue_bytes
                {
                    s.queue_bytes += text.len();
                    self.parked_bytes += text.len();
                    s.queue.push_back(text);
                } else {
                    s.missed += 1;
                    self.counters.resume_queue_drops += 1;
                }
            }
        }
    }

    /// Queues a frame for a connection, closing it as a slow consumer if its queue is full.
    fn send(&mut self, conn: ConnId, text: Arc<str>) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if c.outbound_bytes + text.len() > self.config.outbound_queue_bytes {
            debug!(?conn, queued = c.outbound_bytes, "slow consumer: closing");
            let session = c.session;
            self.close(conn, CloseCode::SlowConsumer);
            // The frame that did not fit waits in the parked session's queue.
            if let Some(fp) = session {
                self.send_to_session(&fp, text);
            }
            return;
        }
        c.outbound_bytes += text.len();
        self.out.push_back(ServerTransmit::Text { conn, text });
    }

    fn send_error(&mut self, conn: ConnId, id: Option<u64>, code: ErrorCode, message: &str) {
        self.counters.count_error(code);
        let frame = ServerMessage::Error { id, code, message: message.to_owned() };
        self.send(conn, frame.encode().into());
    }
}

fn key_namespace(key: &str) -> &str {
    key.split('\n').nth(1).unwrap_or("")
}

/// The group size a match key was made for (see [`Server::match_key`]).
fn key_group_size(key: &str) -> usize {
    key.split('\n').next().and_then(|n| n.parse().ok()).unwrap_or(usize::MAX)
}

/// The error frame ending a match request.
fn match_error(id: u64, code: ErrorCode) -> ServerMessage {
    let message = match code {
        ErrorCode::MatchTimeout => "no match formed in time",
        _ => "match request cancelled",
    };
    ServerMessage::Error { id: Some(id), code, message: message.into() }
}

#[cfg(test)]
mod tests;
