//! The server's side of a signaling cluster: several [`Server`]s, each a *node* with its own
//! [`NodeId`], that share sessions, namespace and room membership, and route relays,
//! broadcasts, room requests and match requests to each other; they watch each other with
//! heartbeats, and a client whose node dies resumes its session on another. The design is in
//! `docs/CLUSTER.md`.
//!
//! The core stays sans-IO: the adapter enables clustering with [`Server::enable_cluster`],
//! reports its broker link with [`Server::handle_cluster_link`], hands every message another
//! node published to [`Server::handle_cluster`] (and a node known to be gone to
//! [`Server::handle_node_gone`]), and after every input drains [`Server::poll_cluster`] as well
//! as [`Server::poll_transmit`]. How messages travel (Redis pub/sub in `peerlink-server`) is
//! the adapter's business: [`encode_cluster`] and [`decode_cluster`] give them a wire form.
//!
//! Membership messages ([`ClusterMessage::SessionUp`], [`ClusterMessage::Joined`],
//! [`ClusterMessage::RoomState`], ...) are always sent to [`ClusterTarget::All`], so one node's
//! changes reach every other node in the order it made them; requests, answers and deliveries
//! ([`ClusterMessage::Relay`], [`ClusterMessage::RelayAck`], [`ClusterMessage::RoomRequest`],
//! [`ClusterMessage::MatchRequest`], [`ClusterMessage::Deliver`], ...) are directed at one node.
//! Nothing is assumed about the order between two nodes' messages, or between the two channels.
//!
//! # Bounds
//!
//! Each node keeps a replica of the sessions of the others, at most
//! [`ClusterConfig::max_remote_sessions`] (a session announced beyond it is not recorded: it is
//! unreachable from this node, and counted in [`Server::cluster_dropped`]), each in at most
//! `max_namespaces_per_client` namespaces (further ones are ignored the same way), and of the
//! rooms of the others within `max_rooms`. Relays forwarded and not yet answered are at most
//! [`ClusterConfig::max_pending_relays`] (past it a relay to another node fails with
//! `unavailable`); frames held for a session of a gone node are bounded like a parked session's
//! queue (`resume_queue_frames`, `resume_queue_bytes`); at most 1,024 departed nodes are
//! remembered. Cluster messages waiting in [`Server::poll_cluster`] count towards
//! [`MAX_PENDING_TRANSMITS`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info};

#[cfg(doc)]
use super::MAX_PENDING_TRANSMITS;
use super::{Member, MatchWaiter, Reply, Room, Server, ServerError, Timer};
use crate::identity::Fingerprint;
use crate::protocol::{self, CloseCode, ErrorCode, PeerInfo, RawJson, ServerMessage};

/// Identifies one server node of a cluster; unique among the live nodes (the adapter draws a
/// random one at every start, so a restarted node is a new node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// How a server takes part in a cluster.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClusterConfig {
    /// This node's id.
    pub node: NodeId,
    /// Most sessions of other nodes this node keeps a replica of. Default 1,000,000.
    pub max_remote_sessions: usize,
    /// How often this node publishes a [`ClusterMessage::Heartbeat`] (and checks the others').
    /// Default 1 s.
    pub heartbeat_interval: Duration,
    /// A node not heard from for this long (while this node's own link is up) is gone: its
    /// sessions wait `resume_grace` for their clients to resume on another node. Default 5 s.
    pub node_timeout: Duration,
    /// A relay forwarded to another node whose answer has not come back after this long
    /// fails with `unavailable`. Default 10 s.
    pub relay_timeout: Duration,
    /// Most relays forwarded to other nodes and not yet answered; past it a relay to another
    /// node fails at once with `unavailable`. Default 65,536.
    pub max_pending_relays: usize,
}

impl ClusterConfig {
    /// A configuration for node `node` with the default bounds and timings.
    pub fn new(node: NodeId) -> Self {
        ClusterConfig {
            node,
            max_remote_sessions: 1_000_000,
            heartbeat_interval: Duration::from_secs(1),
            node_timeout: Duration::from_secs(5),
            relay_timeout: Duration::from_secs(10),
            max_pending_relays: 65_536,
        }
    }
}

/// A namespace a session is in, with what it gave when joining.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamespaceEntry {
    /// The namespace.
    pub namespace: String,
    /// `app_type` of the `join`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_type: Option<String>,
    /// `app_version` of the `join`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_version: Option<String>,
}

/// A room request forwarded to the node holding the room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RoomOp {
    /// `join_room`.
    Join,
    /// `leave_room` (or the member's session ended).
    Leave,
    /// `kick` of `target`.
    Kick {
        /// The member to remove.
        target: Fingerprint,
    },
    /// `close_room`.
    Close,
}

/// A message between the nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClusterMessage {
    /// The sender's link (re)started, or it heard from a node it did not know: every node
    /// that receives it announces its state again ([`ClusterMessage::Resync`] ...
    /// [`ClusterMessage::Synced`]).
    Hello,
    /// The sender's full announcement follows: its sessions and the rooms it holds. A receiver
    /// marks what it knows of the sender as unconfirmed.
    Resync,
    /// The sender's announcement is complete: whatever of the sender's state was not confirmed
    /// generation its [`ClusterMessage::Resync`] is gone.
    Synced,
    /// The sender is alive (published every [`ClusterConfig::heartbeat_interval`]).
    Heartbeat,
    /// The sender is leaving the cluster: its sessions wait `resume_grace` for their clients
    /// to resume on another node, its rooms move to another node.
    Bye,
    /// A session lives on the sender, with these namespaces (the full list: a replica brings
    /// its copy in line with it).
    SessionUp {
        /// The session's fingerprint.
        fingerprint: Fingerprint,
        /// Its alias.
        alias: String,
        /// Its metadata.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        meta: Option<RawJson>,
        /// Every namespace it is in.
        namespaces: Vec<NamespaceEntry>,
        /// How many times the session moved between nodes (1 at its first registration, one
        /// more on each node that adopts it): of two nodes claiming one identity, the higher
        /// generation (then the higher node id) keeps it and the other hands it over. A count
        /// rather than a time, so clock skew between nodes cannot pick the wrong one.
        generation: u64,
    },
    /// A session of the sender ended.
    SessionDown {
        /// The session's fingerprint.
        fingerprint: Fingerprint,
    },
    /// A session of the sender joined a namespace.
    Joined {
        /// The session's fingerprint.
        fingerprint: Fingerprint,
        /// The namespace and its `join` fields.
        entry: NamespaceEntry,
    },
    /// A session of the sender left a namespace.
    Left {
        /// The session's fingerprint.
        fingerprint: Fingerprint,
        /// The namespace.
        namespace: String,
    },
    /// A `relay` from a client of node `origin` to a session of the receiver. The receiver
    /// answers `origin` with a [`ClusterMessage::RelayAck`], or passes it on to the node the
    /// session moved to.
    Relay {
        /// The origin's number for it, echoed in the ack.
        seq: u64,
        /// The node of the sending client (where the ack goes).
        origin: NodeId,
        /// The sending client.
        from: Fingerprint,
        /// The target session.
        to: Fingerprint,
        /// The request id, if the client asked for an `ok`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// The payload, verbatim.
        payload: RawJson,
        /// Times it was passed on (at most 2).
        #[serde(default)]
        hops: u8,
    },
    /// The answer to a [`ClusterMessage::Relay`]: delivered (or refused), with the frame for
    /// the sending client, if any (`ok` when it asked for one, or the error).
    RelayAck {
        /// The relay's `seq`.
        seq: u64,
        /// The frame for the sender.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        /// Not taken: the receiver is leaving the cluster (it said `bye`). The origin treats it
        /// as gone and routes the relay again (its target waits for its client to resume).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        retry: bool,
    },
    /// A `broadcast` from a client of the sender, for the receiver's members of `namespace`.
    Broadcast {
        /// The sending client.
        from: Fingerprint,
        /// The namespace.
        namespace: String,
        /// The payload, verbatim.
        payload: RawJson,
    },
    /// A finished frame for a session of the receiver (a reply to a forwarded request, or a
    /// frame queued for a session that moved).
    Deliver {
        /// The session.
        to: Fingerprint,
        /// The frame's text.
        text: String,
        /// Times it was passed on (at most 2).
        #[serde(default)]
        hops: u8,
    },
    /// A room the sender holds, as it is now (after every change; a receiver keeps a replica
    /// and tells its own members what changed).
    RoomState {
        /// The room.
        room_id: String,
        /// Its owner.
        owner: Fingerprint,
        /// Its size limit.
        max_size: u32,
        /// Its metadata.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        metadata: Option<RawJson>,
        /// Its members, in joining order.
        members: Vec<Fingerprint>,
        /// Members just removed by a `kick` (told `kicked` by their node).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        kicked: Vec<Fingerprint>,
        /// Wall-clock ms of the room's creation.
        created: u64,
        /// The node that created it.
        creator: NodeId,
    },
    /// A room the sender held is gone.
    RoomGone {
        /// The room.
        room_id: String,
        /// Its creation time, as in [`ClusterMessage::RoomState`].
        created: u64,
        /// Its creator node.
        creator: NodeId,
        /// The owner that closed it (members are told `room_closed`); `None` when it expired
        /// empty.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        closed_by: Option<Fingerprint>,
    },
    /// A room request of a client of the sender, for the room's holder. Answered with a
    /// [`ClusterMessage::Deliver`] when `id` is set.
    RoomRequest {
        /// The requesting client.
        from: Fingerprint,
        /// Its request id (`None`: no answer wanted).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// The room.
        room_id: String,
        /// What to do.
        op: RoomOp,
        /// Times it was passed on (at most 2).
        #[serde(default)]
        hops: u8,
    },
    /// A `match` of a client of the sender, for the node holding the queue of `key`.
    MatchRequest {
        /// The requesting client.
        from: Fingerprint,
        /// Its request id.
        id: u64,
        /// The match queue: group size, namespace and canonical criteria.
        key: String,
    },
    /// The client withdrew its request (cancelled, replaced, or its session ended).
    MatchCancel {
        /// The requesting client.
        from: Fingerprint,
        /// The match queue.
        key: String,
    },
    /// A match request of a client of the receiver is over: `text` is its `matched` or error.
    MatchDone {
        /// The requesting client.
        to: Fingerprint,
        /// The match queue.
        key: String,
        /// The frame for the client.
        text: String,
    },
}

/// Where a cluster message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterTarget {
    /// Every other node.
    All,
    /// One node.
    Node(NodeId),
}

/// An output of a clustered server: a message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterTransmit {
    /// Where it goes.
    pub target: ClusterTarget,
    /// The message.
    pub message: ClusterMessage,
}

/// A cluster message on the wire that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterDecodeError {
    /// Not a cluster envelope.
    #[error("malformed cluster message: {0}")]
    Malformed(#[from] serde_json::Error),
}

#[derive(Serialize)]
struct EnvelopeRef<'a> {
    from: NodeId,
    msg: &'a ClusterMessage,
}

#[derive(Deserialize)]
struct Envelope {
    from: NodeId,
    msg: ClusterMessage,
}

/// Encodes a message from node `from` for the wire (JSON: `{"from":N,"msg":{...}}`).
pub fn encode_cluster(from: NodeId, message: &ClusterMessage) -> String {
    serde_json::to_string(&EnvelopeRef { from, msg: message }).expect("cluster messages serialize")
}

/// Decodes what [`encode_cluster`] wrote: the sending node and the message.
pub fn decode_cluster(text: &str) -> Result<(NodeId, ClusterMessage), ClusterDecodeError> {
    let e: Envelope = serde_json::from_str(text)?;
    Ok((e.from, e.msg))
}

/// A node's view of the cluster, from [`Server::cluster_stats`] (and in `/metrics`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClusterStats {
    /// This node's id.
    pub node: u64,
    /// The link to the other nodes is up.
    pub link_up: bool,
    /// Other nodes heard from within [`ClusterConfig::node_timeout`].
    pub nodes: usize,
    /// Sessions of other nodes in this node's replica (waiting ones included).
    pub remote_sessions: usize,
    /// Of those, sessions of gone nodes waiting for their clients to resume elsewhere.
    pub waiting_sessions: usize,
    /// Relays forwarded to other nodes and not yet answered.
    pub pending_relays: usize,
    /// Messages published.
    pub messages_out: u64,
    /// Messages received from other nodes.
    pub messages_in: u64,
    /// Nodes found gone (silent past the timeout, or said `bye`).
    pub nodes_gone: u64,
    /// Sessions of other nodes that moved here (a client resumed on this node).
    pub sessions_adopted: u64,
    /// Local sessions handed over to another node (their client registered there).
    pub sessions_handed_over: u64,
    /// Forwarded relays that got no answer within [`ClusterConfig::relay_timeout`].
    pub relays_timed_out: u64,
    /// Announcements not recorded because a bound was reached.
    pub dropped: u64,
    /// Messages the adapter's link dropped (its publish queue full), as last reported with
    /// [`Server::handle_cluster_link_drops`].
    pub link_dropped: u64,
}

/// A session of another node, as this node knows it.
pub(super) struct RemoteSession {
    pub(super) node: NodeId,
    pub(super) alias: String,
    pub(super) meta: Option<RawJson>,
    pub(super) namespaces: Vec<String>,
    generation: u64,
    /// Not confirmed generation its node's latest [`ClusterMessage::Resync`].
    stale: bool,
    /// Its node is gone: frames for it wait here until it resumes somewhere.
    waiting: Option<Waiting>,
}

/// Frames for a session whose node is gone, until it resumes or its grace ends.
struct Waiting {
    until: Instant,
    queue: VecDeque<Arc<str>>,
    bytes: usize,
}

/// A relay forwarded to another node, until its ack.
struct PendingRelay {
    from: Fingerprint,
    to: Fingerprint,
    id: Option<u64>,
    payload: RawJson,
    node: NodeId,
    sent: Instant,
}

/// A local session's match request held by another node.
#[derive(Debug, Clone)]
pub(super) struct RemoteMatch {
    pub(super) key: String,
    pub(super) id: u64,
    pub(super) owner: NodeId,
}

/// What a session that moved here brings along.
pub(super) struct Adopted {
    pub(super) namespaces: Vec<String>,
    pub(super) rooms: Vec<String>,
    pub(super) queue: VecDeque<Arc<str>>,
    pub(super) generation: u64,
}

/// A server's cluster state.
pub(super) struct Cluster {
    pub(super) config: ClusterConfig,
    pub(super) link_up: bool,
    pub(super) remote: HashMap<Fingerprint, RemoteSession>,
    pub(super) out: VecDeque<ClusterTransmit>,
    /// Other live nodes: when each was last heard from.
    nodes: HashMap<NodeId, Instant>,
    /// Forwarded relays by `seq` (increasing, so the oldest come first).
    pending: BTreeMap<u64, PendingRelay>,
    next_seq: u64,
    ticking: bool,
    /// This node said `bye` and is draining (see [`Server::leave_cluster`]).
    leaving: bool,
    /// Nodes that said `bye` (the latest [`MAX_DEPARTED`]): what they still send is taken
    /// only as their last deliveries, never as a sign of life.
    departed: VecDeque<NodeId>,
    stats: ClusterStats,
}

/// Most departed nodes remembered.
const MAX_DEPARTED: usize = 1024;

/// Most times a directed message is passed on to where its target moved.
const MAX_HOPS: u8 = 2;

impl Server {
    /// Makes this server node `config.node` of a cluster. Call it once, before any input;
    /// nothing is published until [`Server::handle_cluster_link`] reports the link up.
    pub fn enable_cluster(&mut self, config: ClusterConfig) {
        self.cluster = Some(Cluster {
            stats: ClusterStats { node: config.node.0, ..ClusterStats::default() },
            config,
            link_up: false,
            remote: HashMap::new(),
            out: VecDeque::new(),
            nodes: HashMap::new(),
            pending: BTreeMap::new(),
            next_seq: 0,
            ticking: false,
            leaving: false,
            departed: VecDeque::new(),
        });
    }

    /// This node's id, when clustered.
    pub fn node_id(&self) -> Option<NodeId> {
        self.cluster.as_ref().map(|c| c.config.node)
    }

    /// Cluster announcements not recorded because a bound was reached
    /// ([`ClusterConfig::max_remote_sessions`], `max_rooms`, or a remote session in more than
    /// `max_namespaces_per_client` namespaces); zero when not clustered.
    pub fn cluster_dropped(&self) -> u64 {
        self.cluster.as_ref().map_or(0, |c| c.stats.dropped)
    }

    /// Sessions of other nodes this node knows of; zero when not clustered.
    pub fn remote_sessions(&self) -> usize {
        self.cluster.as_ref().map_or(0, |c| c.remote.len())
    }

    /// Reports how many cluster messages the adapter's link has dropped so far (a full
    /// publish queue; lost like messages in an outage, and repaired the same way). Only
    /// counted, for [`Server::cluster_stats`] and `/metrics`.
    pub fn handle_cluster_link_drops(&mut self, total: u64) {
        if let Some(c) = self.cluster.as_mut() {
            c.stats.link_dropped = total;
        }
    }

    /// This node's view of the cluster; `None` when not clustered.
    pub fn cluster_stats(&self) -> Option<ClusterStats> {
        let c = self.cluster.as_ref()?;
        let mut stats = c.stats.clone();
        stats.link_up = c.link_up;
        stats.nodes = c.nodes.len();
        stats.remote_sessions = c.remote.len();
        stats.waiting_sessions = c.remote.values().filter(|r| r.waiting.is_some()).count();
        stats.pending_relays = c.pending.len();
        Some(stats)
    }

    /// Returns the next cluster message to publish, or `None`. Drain after every input, like
    /// [`Server::poll_transmit`]. Always `None` when not clustered.
    #[must_use]
    pub fn poll_cluster(&mut self) -> Option<ClusterTransmit> {
        self.cluster.as_mut()?.out.pop_front()
    }

    /// Reports the state of the adapter's link to the other nodes. When it comes up (first or
    /// again) this node asks every node to announce its state ([`ClusterMessage::Hello`]) and
    /// announces its own; while it is down [`Server::health`] is degraded, requests that need
    /// another node fail with `unavailable`, and no node is declared gone. Does nothing when
    /// not clustered.
    pub fn handle_cluster_link(&mut self, now: Instant, up: bool) -> Result<(), ServerError> {
        self.begin(now)?;
        let Some(c) = self.cluster.as_mut() else {
            return Ok(());
        };
        let was = std::mem::replace(&mut c.link_up, up);
        if up && !was {
            // What was not heard while the link was down says nothing about the other nodes.
            for last in c.nodes.values_mut() {
                *last = now;
            }
            let start_ticking = !std::mem::replace(&mut c.ticking, true);
            let tick = now + c.config.heartbeat_interval;
            info!(node = %c.config.node, "cluster link up");
            self.publish(ClusterTarget::All, ClusterMessage::Hello);
            self.announce_all();
            if start_ticking {
                self.schedule(tick, Timer::ClusterTick);
            }
        } else if was && !up {
            info!(node = %c.config.node, "cluster link down");
        }
        Ok(())
    }

    /// Reports a message node `from` published. Messages from this node itself are ignored
    /// (a broker may echo them). Does nothing when not clustered.
    pub fn handle_cluster(&mut self, now: Instant, from: NodeId, message: ClusterMessage) -> Result<(), ServerError> {
        self.begin(now)?;
        let Some(c) = self.cluster.as_mut() else {
            return Ok(());
        };
        if from == c.config.node {
            return Ok(());
        }
        c.stats.messages_in += 1;
        if c.departed.contains(&from) {
            // A node draining after its `bye`: only its last deliveries count.
            match message {
                ClusterMessage::Deliver { to, text, hops } => self.deliver(to, text.into(), hops),
                ClusterMessage::RelayAck { seq, text, retry } => self.relay_acked(from, seq, text, retry, now),
                _ => {}
            }
            return Ok(());
        }
        let known = c.nodes.insert(from, now).is_some();
        if !known {
            if !matches!(message, ClusterMessage::Hello | ClusterMessage::Resync | ClusterMessage::Bye) {
                // A node this one did not know (or had found gone) that is not introducing
                // itself: ask it for its state.
                debug!(%from, "heard from an unknown node: asking it to announce");
                self.publish(ClusterTarget::Node(from), ClusterMessage::Hello);
            }
            // Some match queues now belong to it.
            self.rebalance_matches(now);
        }
        match message {
            ClusterMessage::Hello => {
                if !self.cluster.as_ref().is_some_and(|c| c.leaving) {
                    self.announce_all();
                }
            }
            ClusterMessage::Resync => self.mark_stale(from),
            ClusterMessage::Synced => self.sweep_stale(from, now),
            ClusterMessage::Heartbeat => {}
            ClusterMessage::Bye => {
                info!(node = %from, "node left the cluster");
                self.depart(now, from);
            }
            ClusterMessage::SessionUp { fingerprint, alias, meta, namespaces, generation } => {
                self.remote_up(from, fingerprint, alias, meta, namespaces, generation);
            }
            ClusterMessage::SessionDown { fingerprint } => {
                if self.remote_of(&fingerprint) == Some(from) {
                    self.remote_down(fingerprint, now);
                }
            }
            ClusterMessage::Joined { fingerprint, entry } => {
                if self.remote_of(&fingerprint) == Some(from) {
                    self.remote_join(fingerprint, entry);
                }
            }
            ClusterMessage::Left { fingerprint, namespace } => {
                if self.remote_of(&fingerprint) == Some(from) {
                    self.remote_leave(fingerprint, &namespace);
                }
            }
            ClusterMessage::Relay { seq, origin, from: sender, to, id, payload, hops } => {
                self.remote_relay(seq, origin, sender, to, id, payload, hops);
            }
            ClusterMessage::RelayAck { seq, text, retry } => self.relay_acked(from, seq, text, retry, now),
            ClusterMessage::Broadcast { from: sender, namespace, payload } => {
                let Some(ns) = self.namespaces.get(&namespace) else {
                    return Ok(());
                };
                let local: Vec<Fingerprint> =
                    ns.order.iter().copied().filter(|f| *f != sender && self.sessions.contains_key(f)).collect();
                // Counted in `broadcast_deliveries` by the sender's node.
                let text: Arc<str> = protocol::encode_broadcast(&sender, &namespace, &payload.0).into();
                for fp in local {
                    self.send_to_session(&fp, text.clone());
                }
            }
            ClusterMessage::Deliver { to, text, hops } => self.deliver(to, text.into(), hops),
            ClusterMessage::RoomState { room_id, owner, max_size, metadata, members, kicked, created, creator } => {
                let state = RoomStateRef { owner, max_size, metadata, members, kicked, stamp: (created, creator.0) };
                self.room_state(from, room_id, state);
            }
            ClusterMessage::RoomGone { room_id, created, creator, closed_by } => {
                if self.rooms.get(&room_id).is_some_and(|r| r.home == Some(from) && r.stamp == (created, creator.0)) {
                    self.drop_room_copy(&room_id, closed_by.map_or(Notice::Nothing, |f| Notice::Closed(Some(f))));
                }
            }
            ClusterMessage::RoomRequest { from: requester, id, room_id, op, hops } => {
                self.room_request(from, requester, id, room_id, op, hops, now);
            }
            ClusterMessage::MatchRequest { from: requester, id, key } => {
                let deadline = now + self.config.match_timeout;
                self.enqueue_waiter(MatchWaiter { fingerprint: requester, id, deadline, node: Some(from) }, key);
            }
            ClusterMessage::MatchCancel { from: requester, key } => {
                if self.matches.get(&key).is_some_and(|q| q.iter().any(|w| w.fingerprint == requester && w.node == Some(from))) {
                    self.remove_waiter(requester, &key, None);
                }
            }
            ClusterMessage::MatchDone { to, key, text } => {
                if let Some(s) = self.sessions.get_mut(&to) {
                    s.matches.retain(|k| *k != key);
                    s.remote_matches.retain(|m| m.key != key);
                }
                // Passed on if the session moved to another node meanwhile.
                self.deliver(to, text.into(), 0);
            }
        }
        Ok(())
    }

    /// Reports that node `node` is gone (the adapter learned it another way than the
    /// heartbeats, which the core watches itself): its sessions wait `resume_grace` for their
    /// clients to resume on another node, its rooms and match queues move to other nodes.
    /// Does nothing when not clustered.
    pub fn handle_node_gone(&mut self, now: Instant, node: NodeId) -> Result<(), ServerError> {
        self.begin(now)?;
        self.node_gone(now, node);
        Ok(())
    }

    /// Leaves the cluster: publishes [`ClusterMessage::Bye`] so the other nodes act at once
    /// (rather than when its heartbeats stop) and starts draining. Call it on shutdown, before
    /// closing the connections.
    ///
    /// While draining, relays forwarded to this node are sent back to be held by their origin
    /// (the other nodes keep this node's sessions for their clients to resume elsewhere), and
    /// when a client resumes on another node, what this node queued for its parked session is
    /// handed over there. Keep handling inputs until [`Server::handing_over`] is false (or a
    /// deadline passes) so nothing queued here is lost.
    pub fn leave_cluster(&mut self, now: Instant) -> Result<(), ServerError> {
        self.begin(now)?;
        let Some(c) = self.cluster.as_mut() else { return Ok(()) };
        c.leaving = true;
        if c.link_up {
            self.publish(ClusterTarget::All, ClusterMessage::Bye);
        }
        Ok(())
    }

    /// A node leaving the cluster still holds frames queued for parked sessions, to hand over
    /// to the nodes their clients resume on. Always false when not clustered or not leaving.
    pub fn handing_over(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.leaving && c.link_up)
            && self.sessions.values().any(|s| s.conn.is_none() && !s.queue.is_empty())
    }

    /// The answer to a relay this node forwarded.
    fn relay_acked(&mut self, from: NodeId, seq: u64, text: Option<String>, retry: bool, now: Instant) {
        let Some(p) = self.cluster.as_mut().and_then(|c| c.pending.remove(&seq)) else { return };
        if retry {
            // The node is leaving (its `bye` may still be on its way): its sessions wait for
            // their clients elsewhere.
            if !self.cluster.as_ref().is_some_and(|c| c.departed.contains(&from)) {
                self.depart(now, from);
            }
            let reply = self.route_relay(p.from, p.to, p.id, &p.payload, now);
            self.answer(p.from, p.id, reply);
            return;
        }
        if let Some(text) = text {
            // Passed on if the sender moved to another node meanwhile.
            self.deliver(p.from, text.into(), 0);
        }
    }

    // ---- hooks called by the request handlers ----------------------------------------------

    /// Queues a message for the cluster, if clustered and linked.
    pub(super) fn publish(&mut self, target: ClusterTarget, message: ClusterMessage) {
        if let Some(c) = self.cluster.as_mut().filter(|c| c.link_up) {
            c.stats.messages_out += 1;
            c.out.push_back(ClusterTransmit { target, message });
        }
    }

    /// Cluster messages waiting to be drained.
    pub(super) fn cluster_pending(&self) -> usize {
        self.cluster.as_ref().map_or(0, |c| c.out.len())
    }

    /// The node holding the session `fp` of another node, if known.
    pub(super) fn remote_of(&self, fp: &Fingerprint) -> Option<NodeId> {
        self.cluster.as_ref()?.remote.get(fp).map(|r| r.node)
    }

    /// A remote session's peer info (for lists and notices).
    pub(super) fn remote_peer_info(&self, fp: &Fingerprint, member: Option<&Member>) -> PeerInfo {
        let r = self.cluster.as_ref().and_then(|c| c.remote.get(fp));
        PeerInfo {
            fingerprint: *fp,
            alias: r.map(|r| r.alias.clone()).unwrap_or_default(),
            meta: r.and_then(|r| r.meta.clone()),
            app_type: member.and_then(|m| m.app_type.clone()),
            app_version: member.and_then(|m| m.app_version.clone()),
        }
    }

    /// The cluster is configured but its link is down.
    pub(super) fn cluster_link_down(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| !c.link_up)
    }

    /// Announces a local session (after it registers or resumes).
    pub(super) fn announce(&mut self, fp: Fingerprint) {
        if self.cluster.is_none() {
            return;
        }
        let Some(s) = self.sessions.get(&fp) else {
            return;
        };
        let namespaces = s
            .namespaces
            .iter()
            .map(|ns| {
                let m = self.namespaces.get(ns).and_then(|n| n.members.get(&fp));
                NamespaceEntry {
                    namespace: ns.clone(),
                    app_type: m.and_then(|m| m.app_type.clone()),
                    app_version: m.and_then(|m| m.app_version.clone()),
                }
            })
            .collect();
        let message = ClusterMessage::SessionUp {
            fingerprint: fp,
            alias: s.alias.clone(),
            meta: s.meta.clone(),
            namespaces,
            generation: s.generation,
        };
        self.publish(ClusterTarget::All, message);
    }

    /// Announces everything this node holds: its sessions and its rooms, between
    /// [`ClusterMessage::Resync`] and [`ClusterMessage::Synced`].
    fn announce_all(&mut self) {
        self.publish(ClusterTarget::All, ClusterMessage::Resync);
        // Sorted, here and wherever a map's entries become outputs: the same inputs give the
        // same outputs in the same order.
        let mut local: Vec<Fingerprint> = self.sessions.keys().copied().collect();
        local.sort_unstable();
        for fp in local {
            self.announce(fp);
        }
        let mut held: Vec<String> = self.rooms.iter().filter(|(_, r)| r.home.is_none()).map(|(id, _)| id.clone()).collect();
        held.sort_unstable();
        for room_id in held {
            self.publish_room(&room_id, None);
        }
        self.publish(ClusterTarget::All, ClusterMessage::Synced);
    }

    /// The cluster's timer: heartbeat, gone nodes, unanswered relays.
    pub(super) fn cluster_tick(&mut self, now: Instant) {
        let Some(c) = self.cluster.as_mut() else { return };
        let next = now + c.config.heartbeat_interval;
        let mut gone = Vec::new();
        if c.link_up {
            let timeout = c.config.node_timeout;
            gone = c.nodes.iter().filter(|(_, last)| **last + timeout <= now).map(|(n, _)| *n).collect();
            gone.sort_unstable();
        }
        let mut expired = Vec::new();
        while let Some(entry) = c.pending.first_entry() {
            if entry.get().sent + c.config.relay_timeout > now {
                break;
            }
            expired.push(entry.remove());
        }
        c.stats.relays_timed_out += expired.len() as u64;
        if !self.cluster.as_ref().is_some_and(|c| c.leaving) {
            self.publish(ClusterTarget::All, ClusterMessage::Heartbeat);
        }
        for node in gone {
            info!(%node, "node silent past the timeout: gone");
            self.node_gone(now, node);
        }
        for p in expired {
            if let Some(id) = p.id {
                self.counters.count_error(ErrorCode::Unavailable);
                let message = format!("no answer from the node of peer {}", p.to.short());
                let frame = ServerMessage::Error { id: Some(id), code: ErrorCode::Unavailable, message };
                self.deliver(p.from, frame.encode().into(), 0);
            }
        }
        self.schedule(next, Timer::ClusterTick);
    }

    // ---- node liveness ---------------------------------------------------------------------

    fn node_gone(&mut self, now: Instant, node: NodeId) {
        let grace = self.config.resume_grace;
        let Some(c) = self.cluster.as_mut() else { return };
        if c.nodes.remove(&node).is_none() && !c.remote.values().any(|r| r.node == node) {
            return;
        }
        c.stats.nodes_gone += 1;
        // Its sessions wait for their clients to resume elsewhere.
        let mut down = Vec::new();
        let mut waiting = Vec::new();
        for (fp, r) in c.remote.iter_mut().filter(|(_, r)| r.node == node && r.waiting.is_none()) {
            if grace.is_zero() {
                down.push(*fp);
            } else {
                r.waiting = Some(Waiting { until: now + grace, queue: VecDeque::new(), bytes: 0 });
                waiting.push(*fp);
            }
        }
        down.sort_unstable();
        waiting.sort_unstable();
        debug!(%node, sessions = down.len() + waiting.len(), "node gone");
        for fp in waiting {
            self.schedule(now + grace, Timer::Limbo(fp));
        }
        for fp in down {
            self.remote_down(fp, now);
        }
        // Relays it did not answer go where their targets are now.
        let c = self.cluster.as_mut().expect("clustered");
        // Sent to it, or sent elsewhere and passed on to it (the target moved there).
        let seqs: Vec<u64> = c
            .pending
            .iter()
            .filter(|(_, p)| p.node == node || c.remote.get(&p.to).is_some_and(|r| r.node == node))
            .map(|(s, _)| *s)
            .collect();
        let unanswered: Vec<PendingRelay> = seqs.iter().filter_map(|s| c.pending.remove(s)).collect();
        for p in unanswered {
            let reply = self.route_relay(p.from, p.to, p.id, &p.payload, now);
            self.answer(p.from, p.id, reply);
        }
        // Its waiters leave this node's match queues; this node's requests it held move.
        for queue in self.matches.values_mut() {
            queue.retain(|w| w.node != Some(node));
        }
        self.matches.retain(|_, q| !q.is_empty());
        let mut moved: Vec<(Fingerprint, RemoteMatch)> = self
            .sessions
            .iter_mut()
            .flat_map(|(fp, s)| {
                let (gone, kept): (Vec<RemoteMatch>, Vec<RemoteMatch>) =
                    std::mem::take(&mut s.remote_matches).into_iter().partition(|m| m.owner == node);
                s.remote_matches = kept;
                gone.into_iter().map(|m| (*fp, m))
            })
            .collect();
        moved.sort_unstable_by(|a, b| (a.0, &a.1.key).cmp(&(b.0, &b.1.key)));
        for (fp, m) in moved {
            self.place_match(fp, m.id, m.key, now);
        }
        // Its rooms move to the live node with the smallest id.
        let adopter = self.live_nodes().into_iter().min().expect("this node is live");
        let me = self.node_id().expect("clustered");
        let mut held: Vec<String> = self.rooms.iter().filter(|(_, r)| r.home == Some(node)).map(|(id, _)| id.clone()).collect();
        held.sort_unstable();
        for room_id in held {
            let room = self.rooms.get_mut(&room_id).expect("listed");
            if adopter == me {
                room.home = None;
                self.prune_room(&room_id, now);
                let room = self.rooms.get_mut(&room_id).expect("listed");
                if room.members.is_empty() {
                    room.empty_since = Some(now);
                    self.schedule(now + self.config.room_ttl, Timer::RoomTtl(room_id.clone()));
                }
                debug!(%room_id, "room taken over from a gone node");
                self.publish_room(&room_id, None);
            } else {
                room.home = Some(adopter);
            }
        }
    }

    /// Node `node` left the cluster (`bye`, or it sent a relay back): gone now, and what it
    /// still sends is taken only as its last deliveries.
    fn depart(&mut self, now: Instant, node: NodeId) {
        let Some(c) = self.cluster.as_mut() else { return };
        if c.departed.len() >= MAX_DEPARTED {
            c.departed.pop_front();
        }
        c.departed.push_back(node);
        self.node_gone(now, node);
    }

    /// Removes from a room this node holds the members that are sessions nowhere (their
    /// `leave` was lost with a node that died, say), telling the rest.
    fn prune_room(&mut self, room_id: &str, now: Instant) {
        let Some(room) = self.rooms.get(room_id).filter(|r| r.home.is_none()) else { return };
        let ghosts: Vec<Fingerprint> =
            room.members.iter().copied().filter(|f| !self.sessions.contains_key(f) && self.remote_of(f).is_none()).collect();
        for fp in ghosts {
            debug!(fingerprint = %fp.short(), %room_id, "member that is no session any more removed");
            self.remove_from_room(fp, room_id, false, now);
        }
    }

    /// Whether `fp` is a session anywhere this node knows of (here, or on another node).
    pub(super) fn is_known_session(&self, fp: &Fingerprint) -> bool {
        self.sessions.contains_key(fp) || self.remote_of(fp).is_some()
    }

    /// This node and the other nodes heard from.
    fn live_nodes(&self) -> Vec<NodeId> {
        let Some(c) = self.cluster.as_ref() else { return Vec::new() };
        let mut nodes: Vec<NodeId> = c.nodes.keys().copied().collect();
        nodes.push(c.config.node);
        nodes
    }

    /// A waiting session's grace ended without it resuming anywhere.
    pub(super) fn limbo_expired(&mut self, fp: Fingerprint, now: Instant) {
        let due = self
            .cluster
            .as_ref()
            .and_then(|c| c.remote.get(&fp))
            .and_then(|r| r.waiting.as_ref())
            .is_some_and(|w| w.until <= now);
        if due {
            debug!(fingerprint = %fp.short(), "session of a gone node not resumed in time");
            self.remote_down(fp, now);
        }
    }

    fn mark_stale(&mut self, node: NodeId) {
        if let Some(c) = self.cluster.as_mut() {
            for r in c.remote.values_mut().filter(|r| r.node == node) {
                r.stale = true;
            }
        }
        for room in self.rooms.values_mut().filter(|r| r.home == Some(node)) {
            room.stale = true;
        }
    }

    /// The end of `node`'s announcement: what it did not confirm is gone.
    fn sweep_stale(&mut self, node: NodeId, now: Instant) {
        let Some(c) = self.cluster.as_ref() else { return };
        let mut sessions: Vec<Fingerprint> =
            c.remote.iter().filter(|(_, r)| r.node == node && r.stale).map(|(fp, _)| *fp).collect();
        sessions.sort_unstable();
        let mut rooms: Vec<String> =
            self.rooms.iter().filter(|(_, r)| r.home == Some(node) && r.stale).map(|(id, _)| id.clone()).collect();
        rooms.sort_unstable();
        if !sessions.is_empty() || !rooms.is_empty() {
            debug!(%node, sessions = sessions.len(), rooms = rooms.len(), "gone while unheard");
        }
        // Not dropped at once: the session may have moved to another node whose announcement
        // is still on its way (two publishers, no order between them). It waits like a session
        // of a gone node, for `node_timeout`.
        let wait = self.cluster.as_ref().map_or(Duration::ZERO, |c| c.config.node_timeout);
        for fp in sessions {
            let c = self.cluster.as_mut().expect("clustered");
            if let Some(r) = c.remote.get_mut(&fp).filter(|r| r.waiting.is_none()) {
                r.waiting = Some(Waiting { until: now + wait, queue: VecDeque::new(), bytes: 0 });
                self.schedule(now + wait, Timer::Limbo(fp));
            }
        }
        for room_id in rooms {
            self.drop_room_copy(&room_id, Notice::Closed(None));
        }
    }

    // ---- the replica of the other nodes' sessions -----------------------------------------

    #[allow(clippy::too_many_arguments)]
    fn remote_up(
        &mut self,
        node: NodeId,
        fp: Fingerprint,
        alias: String,
        meta: Option<RawJson>,
        namespaces: Vec<NamespaceEntry>,
        generation: u64,
    ) {
        let me = self.node_id().expect("clustered");
        if let Some(local) = self.sessions.get(&fp) {
            if (local.generation, me) >= (generation, node) {
                // This node's placement is the newer: the other node gives way when it hears.
                debug!(fingerprint = %fp.short(), %node, "remote placement older than the local session");
                self.announce(fp);
                return;
            }
            self.hand_over(fp, node);
        }
        let max_ns = self.config.max_namespaces_per_client;
        let c = self.cluster.as_mut().expect("clustered");
        if let Some(r) = c.remote.get(&fp) {
            if r.node != node && r.waiting.is_none() && (r.generation, r.node) > (generation, node) {
                debug!(fingerprint = %fp.short(), %node, "stale announcement ignored");
                return;
            }
        } else if c.remote.len() >= c.config.max_remote_sessions {
            c.stats.dropped += 1;
            return;
        }
        let r = c.remote.entry(fp).or_insert_with(|| RemoteSession {
            node,
            alias: String::new(),
            meta: None,
            namespaces: Vec::new(),
            generation,
            stale: false,
            waiting: None,
        });
        if r.node != node {
            debug!(fingerprint = %fp.short(), from = %r.node, to = %node, "session moved");
        }
        r.node = node;
        r.alias = alias;
        r.meta = meta;
        r.generation = generation;
        r.stale = false;
        let waited = r.waiting.take();
        let stale: Vec<String> =
            r.namespaces.iter().filter(|ns| !namespaces.iter().any(|e| e.namespace == **ns)).cloned().collect();
        if let Some(w) = waited {
            // It resumed on `node`: what waited for it goes there.
            self.parked_bytes -= w.bytes;
            for text in w.queue {
                self.publish(ClusterTarget::Node(node), ClusterMessage::Deliver { to: fp, text: text.to_string(), hops: 0 });
            }
        }
        for ns in stale {
            self.remote_leave(fp, &ns);
        }
        if namespaces.len() > max_ns {
            self.cluster.as_mut().expect("clustered").stats.dropped += (namespaces.len() - max_ns) as u64;
        }
        for entry in namespaces.into_iter().take(max_ns) {
            self.remote_join(fp, entry);
        }
    }

    /// A local session registered again on node `to`: it becomes that node's session, keeping
    /// its namespaces and rooms; its connection here is closed (`replaced`) and what was queued
    /// for it goes there.
    fn hand_over(&mut self, fp: Fingerprint, to: NodeId) {
        let Some(s) = self.sessions.remove(&fp) else { return };
        debug!(fingerprint = %fp.short(), node = %to, "session handed over");
        if let Some(conn) = s.conn {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.session = None;
            }
            self.close(conn, CloseCode::Replaced);
        }
        self.parked_bytes -= s.queue_bytes;
        for text in s.queue {
            self.publish(ClusterTarget::Node(to), ClusterMessage::Deliver { to: fp, text: text.to_string(), hops: 0 });
        }
        // Pending match requests end here (the new node knows nothing of them): withdrawn, and
        // the client told `match_cancelled` there, so it can ask again.
        for key in &s.matches {
            let id = match s.remote_matches.iter().find(|m| m.key == *key) {
                Some(m) => {
                    self.publish(ClusterTarget::Node(m.owner), ClusterMessage::MatchCancel { from: fp, key: key.clone() });
                    Some(m.id)
                }
                None => {
                    let id = self.matches.get(key).and_then(|q| q.iter().find(|w| w.fingerprint == fp)).map(|w| w.id);
                    self.remove_waiter(fp, key, None);
                    id
                }
            };
            if let Some(id) = id {
                self.counters.count_error(ErrorCode::MatchCancelled);
                let text = super::match_error(id, ErrorCode::MatchCancelled).encode();
                self.publish(ClusterTarget::Node(to), ClusterMessage::Deliver { to: fp, text, hops: 0 });
            }
        }
        let c = self.cluster.as_mut().expect("clustered");
        c.stats.sessions_handed_over += 1;
        c.remote.insert(
            fp,
            RemoteSession {
                node: to,
                alias: s.alias,
                meta: s.meta,
                namespaces: s.namespaces,
                generation: 0,
                stale: false,
                waiting: None,
            },
        );
    }

    /// `fp`, a session of another node, registered here: takes it out of the replica without
    /// telling anyone it left, and returns what it brings along. `None` if it was not known.
    pub(super) fn adopt_remote(&mut self, fp: Fingerprint) -> Option<Adopted> {
        let c = self.cluster.as_mut()?;
        let r = c.remote.remove(&fp)?;
        c.stats.sessions_adopted += 1;
        debug!(fingerprint = %fp.short(), from = %r.node, "session moved here");
        let queue = match r.waiting {
            Some(w) => {
                self.parked_bytes -= w.bytes;
                w.queue
            }
            None => VecDeque::new(),
        };
        let mut rooms: Vec<String> = self.rooms.iter().filter(|(_, room)| room.members.contains(&fp)).map(|(id, _)| id.clone()).collect();
        rooms.sort_unstable();
        Some(Adopted { namespaces: r.namespaces, rooms, queue, generation: r.generation })
    }

    /// A remote session ended: it leaves its namespaces, and the rooms this node holds.
    fn remote_down(&mut self, fp: Fingerprint, now: Instant) {
        let Some(r) = self.cluster.as_mut().and_then(|c| c.remote.remove(&fp)) else {
            return;
        };
        if let Some(w) = r.waiting {
            self.parked_bytes -= w.bytes;
            self.counters.resume_queue_drops += w.queue.len() as u64;
        }
        for ns in r.namespaces {
            self.remove_from_namespace(fp, &ns);
        }
        let mut held: Vec<String> = self
            .rooms
            .iter()
            .filter(|(_, room)| room.home.is_none() && room.members.contains(&fp))
            .map(|(id, _)| id.clone())
            .collect();
        held.sort_unstable();
        for room_id in held {
            self.remove_from_room(fp, &room_id, false, now);
        }
    }

    fn remote_join(&mut self, fp: Fingerprint, entry: NamespaceEntry) {
        let max_ns = self.config.max_namespaces_per_client;
        let c = self.cluster.as_mut().expect("clustered");
        let Some(r) = c.remote.get_mut(&fp) else {
            return;
        };
        if r.namespaces.contains(&entry.namespace) {
            return;
        }
        if r.namespaces.len() >= max_ns {
            c.stats.dropped += 1;
            return;
        }
        r.namespaces.push(entry.namespace.clone());
        if self.namespaces.get(&entry.namespace).is_some_and(|ns| ns.members.contains_key(&fp)) {
            // Already listed (the session moved here and back): nothing changed for members.
            return;
        }
        let member = Member { app_type: entry.app_type, app_version: entry.app_version };
        let info = self.remote_peer_info(&fp, Some(&member));
        let ns = self.namespaces.entry(entry.namespace.clone()).or_default();
        ns.order.push(fp);
        ns.members.insert(fp, member);
        let local: Vec<Fingerprint> = ns.order.iter().copied().filter(|f| self.sessions.contains_key(f)).collect();
        let notice: Arc<str> = ServerMessage::PeerJoined { namespace: entry.namespace, peer: info }.encode().into();
        for other in local {
            self.send_to_session(&other, notice.clone());
        }
    }

    fn remote_leave(&mut self, fp: Fingerprint, namespace: &str) {
        if let Some(r) = self.cluster.as_mut().and_then(|c| c.remote.get_mut(&fp)) {
            r.namespaces.retain(|n| n != namespace);
        }
        self.remove_from_namespace(fp, namespace);
    }

    // ---- relays, broadcasts, deliveries ----------------------------------------------------

    /// Routes a local client's relay to `to`, a session of another node: forwarded to its
    /// node (which answers), or queued while its node is gone.
    pub(super) fn route_relay(
        &mut self,
        from: Fingerprint,
        to: Fingerprint,
        id: Option<u64>,
        payload: &RawJson,
        now: Instant,
    ) -> Reply {
        if let Some(reply) = self.relay_local(from, id, to, &payload.0) {
            // It resumed here meanwhile.
            return reply;
        }
        let Some(c) = self.cluster.as_mut() else {
            return Err((ErrorCode::PeerNotFound, format!("no peer {}", to.short())));
        };
        let Some(r) = c.remote.get_mut(&to) else {
            return Err((ErrorCode::PeerNotFound, format!("no peer {}", to.short())));
        };
        if r.waiting.is_some() {
            let text: Arc<str> = protocol::encode_relay(&from, &payload.0).into();
            if !self.wait_for(to, text) {
                return Err((ErrorCode::QueueFull, format!("peer {} is reconnecting and its queue is full", to.short())));
            }
            self.counters.relays += 1;
            return Ok(id.map(|id| ServerMessage::Ok { id }));
        }
        let node = r.node;
        if !c.link_up {
            return Err((
                ErrorCode::Unavailable,
                format!("peer {} is on another node and the cluster link is down", to.short()),
            ));
        }
        if c.pending.len() >= c.config.max_pending_relays {
            return Err((ErrorCode::Unavailable, "too many relays waiting for other nodes to answer".to_owned()));
        }
        let seq = c.next_seq;
        c.next_seq += 1;
        let origin = c.config.node;
        c.pending.insert(seq, PendingRelay { from, to, id, payload: payload.clone(), node, sent: now });
        self.publish(
            ClusterTarget::Node(node),
            ClusterMessage::Relay { seq, origin, from, to, id, payload: payload.clone(), hops: 0 },
        );
        Ok(None)
    }

    /// Queues a frame for a session whose node is gone. `false` if its queue is full.
    fn wait_for(&mut self, fp: Fingerprint, text: Arc<str>) -> bool {
        let (frames, bytes) = (self.config.resume_queue_frames, self.config.resume_queue_bytes);
        let Some(w) = self.cluster.as_mut().and_then(|c| c.remote.get_mut(&fp)).and_then(|r| r.waiting.as_mut()) else {
            return false;
        };
        if w.queue.len() >= frames || w.bytes + text.len() > bytes {
            return false;
        }
        w.bytes += text.len();
        self.parked_bytes += text.len();
        w.queue.push_back(text);
        true
    }

    /// Sends a request's answer (as [`Reply`]) to local session `to`.
    fn answer(&mut self, to: Fingerprint, id: Option<u64>, reply: Reply) {
        let frame = match reply {
            Ok(frame) => frame,
            Err((code, message)) => {
                self.counters.count_error(code);
                Some(ServerMessage::Error { id, code, message })
            }
        };
        if let Some(frame) = frame {
            self.deliver(to, frame.encode().into(), 0);
        }
    }

    /// A relay forwarded for a session here (or one that moved on from here).
    #[allow(clippy::too_many_arguments)]
    fn remote_relay(
        &mut self,
        seq: u64,
        origin: NodeId,
        from: Fingerprint,
        to: Fingerprint,
        id: Option<u64>,
        payload: RawJson,
        hops: u8,
    ) {
        let moved_to = self.remote_of(&to).filter(|_| !self.sessions.contains_key(&to));
        let waiting = self.cluster.as_ref().and_then(|c| c.remote.get(&to)).is_some_and(|r| r.waiting.is_some());
        if let Some(node) = moved_to.filter(|_| !waiting && hops < MAX_HOPS) {
            // The session moved on: pass it there, the answer still goes to the origin.
            let hops = hops + 1;
            self.publish(ClusterTarget::Node(node), ClusterMessage::Relay { seq, origin, from, to, id, payload, hops });
            return;
        }
        if self.cluster.as_ref().is_some_and(|c| c.leaving) && self.sessions.contains_key(&to) {
            // Draining: the origin holds it until the session resumes on another node.
            self.publish(ClusterTarget::Node(origin), ClusterMessage::RelayAck { seq, text: None, retry: true });
            return;
        }
        let answer = if let Some(reply) = self.relay_local(from, id, to, &payload.0) {
            reply
        } else if waiting {
            let text: Arc<str> = protocol::encode_relay(&from, &payload.0).into();
            if self.wait_for(to, text) {
                self.counters.relays += 1;
                Ok(id.map(|id| ServerMessage::Ok { id }))
            } else {
                Err((ErrorCode::QueueFull, format!("peer {} is reconnecting and its queue is full", to.short())))
            }
        } else {
            Err((ErrorCode::PeerNotFound, format!("no peer {}", to.short())))
        };
        let text = match answer {
            Ok(frame) => frame.map(|f| f.encode()),
            Err((code, message)) => {
                self.counters.count_error(code);
                Some(ServerMessage::Error { id, code, message }.encode())
            }
        };
        self.publish(ClusterTarget::Node(origin), ClusterMessage::RelayAck { seq, text, retry: false });
    }

    /// A frame for `to`: sent to the local session, held while its node is gone, or passed on
    /// to the node it moved to.
    fn deliver(&mut self, to: Fingerprint, text: Arc<str>, hops: u8) {
        if self.sessions.contains_key(&to) {
            self.send_to_session(&to, text);
            return;
        }
        let Some(r) = self.cluster.as_ref().and_then(|c| c.remote.get(&to)) else { return };
        if r.waiting.is_some() {
            if !self.wait_for(to, text) {
                self.counters.resume_queue_drops += 1;
            }
        } else if hops < MAX_HOPS {
            let node = r.node;
            self.publish(ClusterTarget::Node(node), ClusterMessage::Deliver { to, text: text.to_string(), hops: hops + 1 });
        }
    }

    /// Forwards a local client's broadcast to every node with members in `namespace` (and
    /// holds a copy for members whose node is gone).
    pub(super) fn forward_broadcast(
        &mut self,
        from: Fingerprint,
        namespace: &str,
        members: &[Fingerprint],
        payload: &serde_json::value::RawValue,
    ) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let mut nodes = Vec::new();
        let mut waiting = Vec::new();
        for f in members {
            match c.remote.get(f) {
                Some(r) if r.waiting.is_some() => waiting.push(*f),
                Some(r) => nodes.push(r.node),
                None => {}
            }
        }
        nodes.sort_unstable();
        nodes.dedup();
        for node in nodes {
            let message =
                ClusterMessage::Broadcast { from, namespace: namespace.to_owned(), payload: RawJson::from(payload) };
            self.publish(ClusterTarget::Node(node), message);
        }
        if !waiting.is_empty() {
            let text: Arc<str> = protocol::encode_broadcast(&from, namespace, payload).into();
            for fp in waiting {
                if !self.wait_for(fp, text.clone()) {
                    self.counters.resume_queue_drops += 1;
                }
            }
        }
    }

    /// Publishes a local session's namespace join.
    pub(super) fn publish_join(&mut self, fp: Fingerprint, namespace: &str) {
        if self.cluster.is_none() {
            return;
        }
        let m = self.namespaces.get(namespace).and_then(|n| n.members.get(&fp));
        let entry = NamespaceEntry {
            namespace: namespace.to_owned(),
            app_type: m.and_then(|m| m.app_type.clone()),
            app_version: m.and_then(|m| m.app_version.clone()),
        };
        self.publish(ClusterTarget::All, ClusterMessage::Joined { fingerprint: fp, entry });
    }

    // ---- rooms -----------------------------------------------------------------------------

    /// Publishes the state of a room this node holds (after a change).
    pub(super) fn publish_room(&mut self, room_id: &str, kicked: Option<Fingerprint>) {
        if self.cluster.is_none() {
            return;
        }
        let Some(room) = self.rooms.get(room_id).filter(|r| r.home.is_none()) else { return };
        let message = ClusterMessage::RoomState {
            room_id: room_id.to_owned(),
            owner: room.owner,
            max_size: room.max_size,
            metadata: room.metadata.clone(),
            members: room.members.clone(),
            kicked: kicked.into_iter().collect(),
            created: room.stamp.0,
            creator: NodeId(room.stamp.1),
        };
        self.publish(ClusterTarget::All, message);
    }

    /// Publishes that a room this node held is gone.
    pub(super) fn publish_room_gone(&mut self, room_id: &str, stamp: (u64, u64), closed_by: Option<Fingerprint>) {
        if self.cluster.is_none() {
            return;
        }
        let message =
            ClusterMessage::RoomGone { room_id: room_id.to_owned(), created: stamp.0, creator: NodeId(stamp.1), closed_by };
        self.publish(ClusterTarget::All, message);
    }

    /// Sends a local client's room request to the node holding the room.
    pub(super) fn forward_room_op(
        &mut self,
        home: NodeId,
        from: Fingerprint,
        id: Option<u64>,
        room_id: &str,
        op: RoomOp,
    ) -> Result<(), (ErrorCode, String)> {
        if self.cluster_link_down() {
            return Err((
                ErrorCode::Unavailable,
                format!("room `{room_id}` is held by another node and the cluster link is down"),
            ));
        }
        let message = ClusterMessage::RoomRequest { from, id, room_id: room_id.to_owned(), op, hops: 0 };
        self.publish(ClusterTarget::Node(home), message);
        Ok(())
    }

    /// A room request from a client of node `node`.
    #[allow(clippy::too_many_arguments)]
    fn room_request(
        &mut self,
        node: NodeId,
        from: Fingerprint,
        id: Option<u64>,
        room_id: String,
        op: RoomOp,
        hops: u8,
        now: Instant,
    ) {
        if let Some(home) = self.rooms.get(&room_id).and_then(|r| r.home) {
            // The room moved on (its node was gone): pass the request to its holder, or answer
            // here once it has been passed on enough (the nodes' views differ for now).
            if hops < MAX_HOPS {
                let message = ClusterMessage::RoomRequest { from, id, room_id, op, hops: hops + 1 };
                self.publish(ClusterTarget::Node(home), message);
                return;
            }
            let message = format!("room `{room_id}` is moving between nodes; try again");
            self.answer_remote(node, from, id, Err((ErrorCode::Unavailable, message)));
            return;
        }
        if !self.is_known_session(&from) {
            // Its session ended (its `session_down` overtook this request): nobody to add.
            debug!(fingerprint = %from.short(), %room_id, "room request of an ended session dropped");
            return;
        }
        let rid = id.unwrap_or(0);
        let reply = match op {
            RoomOp::Join => self.join_room(from, rid, &room_id),
            RoomOp::Leave => self.leave_room(from, rid, &room_id, now),
            RoomOp::Kick { target } => self.kick(from, rid, &room_id, target, now),
            RoomOp::Close => self.close_room(from, rid, &room_id),
        };
        self.answer_remote(node, from, id, reply);
    }

    /// Sends the answer to a request of `from`, a client of `node`, when it has an id.
    fn answer_remote(&mut self, node: NodeId, from: Fingerprint, id: Option<u64>, reply: Reply) {
        let Some(id) = id else { return };
        let frame = match reply {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err((code, message)) => {
                self.counters.count_error(code);
                ServerMessage::Error { id: Some(id), code, message }
            }
        };
        self.publish(ClusterTarget::Node(node), ClusterMessage::Deliver { to: from, text: frame.encode(), hops: 0 });
    }

    /// A room another node holds, as it is now: the replica follows it and this node's
    /// members are told what changed.
    fn room_state(&mut self, home: NodeId, room_id: String, state: RoomStateRef) {
        let me = self.node_id().expect("clustered");
        let mut old: Option<Vec<Fingerprint>> = None;
        match self.rooms.get(&room_id) {
            Some(r) if r.stamp != state.stamp => {
                if r.stamp < state.stamp {
                    // Two rooms of one id were created at once: the earlier stays, and its
                    // holder makes sure the other node hears of it.
                    if r.home.is_none() {
                        self.publish_room(&room_id, None);
                    }
                    return;
                }
                debug!(%room_id, "room id created on two nodes at once: the earlier room wins");
                self.drop_room_copy(&room_id, Notice::Closed(None));
            }
            Some(r) if r.home.is_none() => {
                // Two nodes both took over this room: the smaller node id keeps it.
                if me < home {
                    self.publish_room(&room_id, None);
                    return;
                }
                old = Some(r.members.clone());
            }
            Some(r) => {
                let holder = r.home.expect("a replica");
                if holder != home && self.cluster.as_ref().is_some_and(|c| c.nodes.contains_key(&holder)) {
                    // The recorded holder is alive: this is an older holder's late state.
                    debug!(%room_id, %home, %holder, "room state from a node that no longer holds the room ignored");
                    return;
                }
                old = Some(r.members.clone());
            }
            None => {
                if self.rooms.len() >= self.config.max_rooms {
                    self.cluster.as_mut().expect("clustered").stats.dropped += 1;
                    return;
                }
            }
        }
        let room = self.rooms.entry(room_id.clone()).or_insert_with(|| Room {
            owner: state.owner,
            max_size: state.max_size,
            metadata: None,
            members: Vec::new(),
            empty_since: None,
            home: Some(home),
            stamp: state.stamp,
            stale: false,
        });
        room.owner = state.owner;
        room.max_size = state.max_size;
        room.metadata = state.metadata;
        room.home = Some(home);
        room.stamp = state.stamp;
        room.stale = false;
        room.empty_since = None;
        let previous = std::mem::replace(&mut room.members, state.members.clone());
        self.sync_open(&room_id);
        let added: Vec<Fingerprint> = state.members.iter().copied().filter(|f| !previous.contains(f)).collect();
        let removed: Vec<Fingerprint> = previous.iter().copied().filter(|f| !state.members.contains(f)).collect();
        for fp in &added {
            if let Some(s) = self.sessions.get_mut(fp) {
                if !s.rooms.contains(&room_id) {
                    s.rooms.push(room_id.clone());
                }
            }
        }
        for fp in &removed {
            if let Some(s) = self.sessions.get_mut(fp) {
                s.rooms.retain(|r| *r != room_id);
            }
        }
        if old.is_none() {
            // A room new to this node: its local members learnt of it from their replies.
            return;
        }
        let local: Vec<Fingerprint> = state.members.iter().copied().filter(|f| self.sessions.contains_key(f)).collect();
        for fp in added {
            let notice: Arc<str> =
                ServerMessage::RoomPeerJoined { room_id: room_id.clone(), peer: self.peer_info(&fp, None) }.encode().into();
            for other in local.iter().filter(|f| **f != fp) {
                self.send_to_session(other, notice.clone());
            }
        }
        for fp in removed {
            let kicked = state.kicked.contains(&fp);
            if kicked && self.sessions.contains_key(&fp) {
                let frame = ServerMessage::Kicked { room_id: room_id.clone() };
                self.send_to_session(&fp, frame.encode().into());
            }
            let notice: Arc<str> =
                ServerMessage::RoomPeerLeft { room_id: room_id.clone(), fingerprint: fp, kicked }.encode().into();
            for other in &local {
                self.send_to_session(other, notice.clone());
            }
        }
    }

    /// Forgets this node's copy of a room, telling its local members as `notice` says.
    fn drop_room_copy(&mut self, room_id: &str, notice: Notice) {
        let Some(room) = self.rooms.remove(room_id) else { return };
        self.sync_open(room_id);
        let text: Option<Arc<str>> = match notice {
            Notice::Closed(_) => Some(ServerMessage::RoomClosed { room_id: room_id.to_owned() }.encode().into()),
            Notice::Nothing => None,
        };
        for member in room.members {
            let Some(s) = self.sessions.get_mut(&member) else { continue };
            s.rooms.retain(|r| r != room_id);
            if let Some(text) = &text {
                if notice != Notice::Closed(Some(member)) {
                    self.send_to_session(&member, text.clone());
                }
            }
        }
    }

    // ---- matches ---------------------------------------------------------------------------

    /// The node holding the match queue of `key`, when it is not this one: rendezvous hashing
    /// over the live nodes, so every node agrees while they agree on who is live.
    pub(super) fn match_owner(&self, key: &str) -> Option<NodeId> {
        let me = self.node_id()?;
        let owner = self.live_nodes().into_iter().max_by_key(|n| (rendezvous(key, *n), *n))?;
        (owner != me).then_some(owner)
    }

    /// Sends local session `me`'s match request to the node holding its queue.
    pub(super) fn place_remote_match(&mut self, me: Fingerprint, id: u64, key: String, owner: NodeId) {
        let s = self.sessions.get_mut(&me).expect("registered");
        if !s.matches.contains(&key) {
            s.matches.push(key.clone());
        }
        s.remote_matches.push(RemoteMatch { key: key.clone(), id, owner });
        self.publish(ClusterTarget::Node(owner), ClusterMessage::MatchRequest { from: me, id, key });
    }

    /// After a node joined: match queues whose key now hashes to another node move there. This
    /// node's own clients' waiters are placed there; other nodes' waiters are dropped here (their
    /// nodes place them again, seeing the same change); and this node's clients' requests held
    /// elsewhere follow their key to its new holder.
    fn rebalance_matches(&mut self, now: Instant) {
        let mut keys: Vec<String> = self.matches.keys().filter(|k| self.match_owner(k).is_some()).cloned().collect();
        keys.sort_unstable();
        let mut moved = Vec::new();
        for key in keys {
            for w in self.matches.remove(&key).unwrap_or_default() {
                if w.node.is_none() {
                    moved.push((w.fingerprint, w.id, key.clone()));
                }
            }
        }
        let mut elsewhere: Vec<(Fingerprint, RemoteMatch)> = Vec::new();
        for (fp, s) in &self.sessions {
            for m in &s.remote_matches {
                if self.match_owner(&m.key) != Some(m.owner) {
                    elsewhere.push((*fp, m.clone()));
                }
            }
        }
        elsewhere.sort_unstable_by(|a, b| (a.0, &a.1.key).cmp(&(b.0, &b.1.key)));
        for (fp, m) in elsewhere {
            self.publish(ClusterTarget::Node(m.owner), ClusterMessage::MatchCancel { from: fp, key: m.key.clone() });
            if let Some(s) = self.sessions.get_mut(&fp) {
                s.remote_matches.retain(|r| r.key != m.key);
            }
            moved.push((fp, m.id, m.key));
        }
        if !moved.is_empty() {
            debug!(requests = moved.len(), "match requests follow their queues to a new node");
        }
        for (fp, id, key) in moved {
            self.place_match(fp, id, key, now);
        }
    }

    /// Places local session `me`'s match request again (its holder is gone).
    fn place_match(&mut self, me: Fingerprint, id: u64, key: String, now: Instant) {
        match self.match_owner(&key) {
            Some(owner) => self.place_remote_match(me, id, key, owner),
            None => {
                let waiter = MatchWaiter { fingerprint: me, id, deadline: now + self.config.match_timeout, node: None };
                self.enqueue_waiter(waiter, key);
            }
        }
    }
}

/// A room's state from [`ClusterMessage::RoomState`].
struct RoomStateRef {
    owner: Fingerprint,
    max_size: u32,
    metadata: Option<RawJson>,
    members: Vec<Fingerprint>,
    kicked: Vec<Fingerprint>,
    stamp: (u64, u64),
}

/// What the local members of a room that goes away are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Notice {
    /// Nothing (it expired empty).
    Nothing,
    /// `room_closed`, except for this member (the owner that closed it), if any.
    Closed(Option<Fingerprint>),
}

/// The rendezvous weight of `node` for `key` (FNV-1a, then a SplitMix64 finish).
fn rendezvous(key: &str, node: NodeId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.as_bytes().iter().chain(node.0.to_le_bytes().iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
