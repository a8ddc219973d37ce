//! The server's side of a signaling cluster: several [`Server`]s, each a *node* with its own
//! [`NodeId`], that share session locations and namespace membership and route relays and
//! broadcasts to each other. The design is in `docs/CLUSTER.md`.
//!
//! The core stays sans-IO: the adapter enables clustering with [`Server::enable_cluster`],
//! reports its broker link with [`Server::handle_cluster_link`], hands every message another
//! node published to [`Server::handle_cluster`] (and a node known to be gone to
//! [`Server::handle_node_gone`]), and after every input drains [`Server::poll_cluster`] as well
//! as [`Server::poll_transmit`]. How messages travel (Redis pub/sub in `peerlink-server`) is
//! the adapter's business: [`encode_cluster`] and [`decode_cluster`] give them a wire form.
//!
//! Membership messages ([`ClusterMessage::SessionUp`], [`ClusterMessage::Joined`], ...) are
//! always sent to [`ClusterTarget::All`], so one node's changes reach every other node in the
//! order it made them; only replies and deliveries ([`ClusterMessage::Relay`],
//! [`ClusterMessage::Deliver`], [`ClusterMessage::Broadcast`]) are directed at one node.
//!
//! # Bounds
//!
//! Each node keeps a replica of the sessions of the others, at most
//! [`ClusterConfig::max_remote_sessions`] (a session announced beyond it is not recorded: it is
//! unreachable from this node, and counted in [`Server::cluster_dropped`]), each in at most
//! `max_namespaces_per_client` namespaces (further ones are ignored the same way). Cluster
//! messages waiting in [`Server::poll_cluster`] count towards [`MAX_PENDING_TRANSMITS`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tracing::debug;

#[cfg(doc)]
use super::MAX_PENDING_TRANSMITS;
use super::{Member, Server, ServerError};
use crate::identity::Fingerprint;
use crate::protocol::{self, ErrorCode, PeerInfo, RawJson, ServerMessage};

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
}

impl ClusterConfig {
    /// A configuration for node `node` with the default bounds.
    pub fn new(node: NodeId) -> Self {
        ClusterConfig {
            node,
            max_remote_sessions: 1_000_000,
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

/// A message between the nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClusterMessage {
    /// The sender's link (re)started: every node announces its sessions again.
    Hello,
    /// The sender is leaving the cluster: forget its sessions.
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
    /// A `relay` from a client of the sender to a session of the receiver. The receiver
    /// answers with a [`ClusterMessage::Deliver`] of the `ok` (when `id` is set) or the error.
    Relay {
        /// The sending client.
        from: Fingerprint,
        /// The target session.
        to: Fingerprint,
        /// The request id, if the client asked for an `ok`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// The payload, verbatim.
        payload: RawJson,
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
    /// A finished frame for a session of the receiver (a reply to a forwarded request).
    Deliver {
        /// The session.
        to: Fingerprint,
        /// The frame's text.
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

/// A session of another node, as this node knows it.
pub(super) struct RemoteSession {
    pub(super) node: NodeId,
    pub(super) alias: String,
    pub(super) meta: Option<RawJson>,
    pub(super) namespaces: Vec<String>,
}

/// A server's cluster state.
pub(super) struct Cluster {
    pub(super) config: ClusterConfig,
    pub(super) link_up: bool,
    pub(super) remote: HashMap<Fingerprint, RemoteSession>,
    pub(super) out: std::collections::VecDeque<ClusterTransmit>,
    pub(super) dropped: u64,
}

impl Server {
    /// Makes this server node `config.node` of a cluster. Call it once, before any input;
    /// nothing is published until [`Server::handle_cluster_link`] reports the link up.
    pub fn enable_cluster(&mut self, config: ClusterConfig) {
        self.cluster = Some(Cluster {
            config,
            link_up: false,
            remote: HashMap::new(),
            out: std::collections::VecDeque::new(),
            dropped: 0,
        });
    }

    /// This node's id, when clustered.
    pub fn node_id(&self) -> Option<NodeId> {
        self.cluster.as_ref().map(|c| c.config.node)
    }

    /// Cluster announcements not recorded because a bound was reached
    /// ([`ClusterConfig::max_remote_sessions`], or a remote session in more than
    /// `max_namespaces_per_client` namespaces); zero when not clustered.
    pub fn cluster_dropped(&self) -> u64 {
        self.cluster.as_ref().map_or(0, |c| c.dropped)
    }

    /// Sessions of other nodes this node knows of; zero when not clustered.
    pub fn remote_sessions(&self) -> usize {
        self.cluster.as_ref().map_or(0, |c| c.remote.len())
    }

    /// Returns the next cluster message to publish, or `None`. Drain after every input, like
    /// [`Server::poll_transmit`]. Always `None` when not clustered.
    #[must_use]
    pub fn poll_cluster(&mut self) -> Option<ClusterTransmit> {
        self.cluster.as_mut()?.out.pop_front()
    }

    /// Reports the state of the adapter's link to the other nodes. When it comes up (first or
    /// again) this node asks every node to announce its sessions ([`ClusterMessage::Hello`])
    /// and announces its own; while it is down [`Server::health`] is degraded and a relay to a
    /// session of another node fails with `unavailable`. Does nothing when not clustered.
    pub fn handle_cluster_link(&mut self, now: Instant, up: bool) -> Result<(), ServerError> {
        self.begin(now)?;
        let Some(c) = self.cluster.as_mut() else {
            return Ok(());
        };
        let was = std::mem::replace(&mut c.link_up, up);
        if up && !was {
            self.publish(ClusterTarget::All, ClusterMessage::Hello);
            self.announce_all();
        }
        Ok(())
    }

    /// Reports a message node `from` published. Messages from this node itself are ignored
    /// (a broker may echo them). Does nothing when not clustered.
    pub fn handle_cluster(
        &mut self,
        now: Instant,
        from: NodeId,
        message: ClusterMessage,
    ) -> Result<(), ServerError> {
        self.begin(now)?;
        let Some(c) = self.cluster.as_ref() else {
            return Ok(());
        };
        if from == c.config.node {
            return Ok(());
        }
        match message {
            ClusterMessage::Hello => self.announce_all(),
            ClusterMessage::Bye => self.forget_node(from),
            ClusterMessage::SessionUp {
                fingerprint,
                alias,
                meta,
                namespaces,
            } => self.remote_up(from, fingerprint, alias, meta, namespaces),
            ClusterMessage::SessionDown { fingerprint } => {
                if self.remote_of(&fingerprint) == Some(from) {
                    self.remote_down(fingerprint);
                }
            }
            ClusterMessage::Joined { fingerprint, entry } => {
                if self.remote_of(&fingerprint) == Some(from) {
                    self.remote_join(fingerprint, entry);
                }
            }
            ClusterMessage::Left {
                fingerprint,
                namespace,
            } => {
                if self.remote_of(&fingerprint) == Some(from) {
                    self.remote_leave(fingerprint, &namespace);
                }
            }
            ClusterMessage::Relay {
                from: sender,
                to,
                id,
                payload,
            } => self.remote_relay(from, sender, to, id, &payload),
            ClusterMessage::Broadcast {
                from: sender,
                namespace,
                payload,
            } => {
                let Some(ns) = self.namespaces.get(&namespace) else {
                    return Ok(());
                };
                let local: Vec<Fingerprint> = ns
                    .order
                    .iter()
                    .copied()
                    .filter(|f| *f != sender && self.sessions.contains_key(f))
                    .collect();
                // Counted in `broadcast_deliveries` by the sender's node.
                let text: Arc<str> =
                    protocol::encode_broadcast(&sender, &namespace, &payload.0).into();
                for fp in local {
                    self.send_to_session(&fp, text.clone());
                }
            }
            ClusterMessage::Deliver { to, text } => self.send_to_session(&to, text.into()),
        }
        Ok(())
    }

    /// Reports that node `node` is gone (its link to the broker ended without a
    /// [`ClusterMessage::Bye`]): its sessions leave their namespaces, with `peer_left` to the
    /// members here. Does nothing when not clustered.
    pub fn handle_node_gone(&mut self, now: Instant, node: NodeId) -> Result<(), ServerError> {
        self.begin(now)?;
        self.forget_node(node);
        Ok(())
    }

    /// Leaves the cluster: publishes [`ClusterMessage::Bye`] so the other nodes forget this
    /// node's sessions at once (rather than when they notice it is gone). Call it on shutdown.
    pub fn leave_cluster(&mut self, now: Instant) -> Result<(), ServerError> {
        self.begin(now)?;
        if self.cluster.as_ref().is_some_and(|c| c.link_up) {
            self.publish(ClusterTarget::All, ClusterMessage::Bye);
        }
        Ok(())
    }

    // ---- hooks called by the request handlers ----------------------------------------------

    /// Queues a message for the cluster, if clustered and linked.
    pub(super) fn publish(&mut self, target: ClusterTarget, message: ClusterMessage) {
        if let Some(c) = self.cluster.as_mut().filter(|c| c.link_up) {
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
        };
        self.publish(ClusterTarget::All, message);
    }

    fn announce_all(&mut self) {
        let local: Vec<Fingerprint> = self.sessions.keys().copied().collect();
        for fp in local {
            self.announce(fp);
        }
    }

    // ---- the replica of the other nodes' sessions -----------------------------------------

    fn remote_up(
        &mut self,
        node: NodeId,
        fp: Fingerprint,
        alias: String,
        meta: Option<RawJson>,
        namespaces: Vec<NamespaceEntry>,
    ) {
        if self.sessions.contains_key(&fp) {
            // The same identity is live here too: the local session wins (see docs/CLUSTER.md).
            debug!(fingerprint = %fp.short(), %node, "remote session shadowed by a local one");
            return;
        }
        let max_ns = self.config.max_namespaces_per_client;
        let c = self.cluster.as_mut().expect("clustered");
        if let Some(old) = c.remote.get(&fp).filter(|r| r.node != node).map(|r| r.node) {
            // The identity moved to another node: forget the old placement first.
            debug!(fingerprint = %fp.short(), from = %old, to = %node, "remote session moved");
            self.remote_down(fp);
        }
        let c = self.cluster.as_mut().expect("clustered");
        if !c.remote.contains_key(&fp) && c.remote.len() >= c.config.max_remote_sessions {
            c.dropped += 1;
            return;
        }
        let r = c.remote.entry(fp).or_insert_with(|| RemoteSession {
            node,
            alias: String::new(),
            meta: None,
            namespaces: Vec::new(),
        });
        r.alias = alias;
        r.meta = meta;
        let stale: Vec<String> = r
            .namespaces
            .iter()
            .filter(|ns| !namespaces.iter().any(|e| e.namespace == **ns))
            .cloned()
            .collect();
        for ns in stale {
            self.remote_leave(fp, &ns);
        }
        if namespaces.len() > max_ns {
            self.cluster.as_mut().expect("clustered").dropped += (namespaces.len() - max_ns) as u64;
        }
        for entry in namespaces.into_iter().take(max_ns) {
            self.remote_join(fp, entry);
        }
    }

    /// Forgets `fp` as a session of another node (it registered here).
    pub(super) fn forget_remote(&mut self, fp: Fingerprint) {
        if self.remote_of(&fp).is_some() {
            self.remote_down(fp);
        }
    }

    fn remote_down(&mut self, fp: Fingerprint) {
        let Some(r) = self.cluster.as_mut().and_then(|c| c.remote.remove(&fp)) else {
            return;
        };
        for ns in r.namespaces {
            self.remove_from_namespace(fp, &ns);
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
            c.dropped += 1;
            return;
        }
        r.namespaces.push(entry.namespace.clone());
        let member = Member {
            app_type: entry.app_type,
            app_version: entry.app_version,
        };
        let info = self.remote_peer_info(&fp, Some(&member));
        let ns = self.namespaces.entry(entry.namespace.clone()).or_default();
        ns.order.push(fp);
        ns.members.insert(fp, member);
        let local: Vec<Fingerprint> = ns
            .order
            .iter()
            .copied()
            .filter(|f| self.sessions.contains_key(f))
            .collect();
        let notice: Arc<str> = ServerMessage::PeerJoined {
            namespace: entry.namespace,
            peer: info,
        }
        .encode()
        .into();
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

    fn forget_node(&mut self, node: NodeId) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let gone: Vec<Fingerprint> = c
            .remote
            .iter()
            .filter(|(_, r)| r.node == node)
            .map(|(fp, _)| *fp)
            .collect();
        if !gone.is_empty() {
            debug!(%node, sessions = gone.len(), "node left the cluster");
        }
        for fp in gone {
            self.remote_down(fp);
        }
    }

    /// A relay forwarded by `node` for a session here.
    fn remote_relay(
        &mut self,
        node: NodeId,
        from: Fingerprint,
        to: Fingerprint,
        id: Option<u64>,
        payload: &RawJson,
    ) {
        let answer = match self.sessions.get(&to) {
            None => Err((ErrorCode::PeerNotFound, format!("no peer {}", to.short()))),
            Some(target) => {
                let text: Arc<str> = protocol::encode_relay(&from, &payload.0).into();
                if target.conn.is_none() && !self.can_queue(&to, text.len()) {
                    Err((
                        ErrorCode::QueueFull,
                        format!("peer {} is reconnecting and its queue is full", to.short()),
                    ))
                } else {
                    self.send_to_session(&to, text);
                    self.counters.relays += 1;
                    Ok(())
                }
            }
        };
        let frame = match answer {
            Ok(()) => id.map(|id| ServerMessage::Ok { id }),
            Err((code, message)) => {
                self.counters.count_error(code);
                Some(ServerMessage::Error { id, code, message })
            }
        };
        if let Some(frame) = frame {
            self.publish(
                ClusterTarget::Node(node),
                ClusterMessage::Deliver {
                    to: from,
                    text: frame.encode(),
                },
            );
        }
    }

    /// Forwards a local client's relay to the node holding `to`. `Err` when the link is down.
    pub(super) fn forward_relay(
        &mut self,
        node: NodeId,
        from: Fingerprint,
        to: Fingerprint,
        id: Option<u64>,
        payload: &serde_json::value::RawValue,
    ) -> Result<(), (ErrorCode, String)> {
        if self.cluster_link_down() {
            return Err((
                ErrorCode::Unavailable,
                format!(
                    "peer {} is on another node and the cluster link is down",
                    to.short()
                ),
            ));
        }
        self.publish(
            ClusterTarget::Node(node),
            ClusterMessage::Relay {
                from,
                to,
                id,
                payload: RawJson::from(payload),
            },
        );
        Ok(())
    }

    /// Forwards a local client's broadcast to every node with members in `namespace`.
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
        let mut nodes: Vec<NodeId> = members
            .iter()
            .filter_map(|f| c.remote.get(f).map(|r| r.node))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        for node in nodes {
            let message = ClusterMessage::Broadcast {
                from,
                namespace: namespace.to_owned(),
                payload: RawJson::from(payload),
            };
            self.publish(ClusterTarget::Node(node), message);
        }
    }

    /// Publishes a local session's namespace join.
    pub(super) fn publish_join(&mut self, fp: Fingerprint, namespace: &str) {
        if self.cluster.is_none() {
            return;
        }
        let m = self
            .namespaces
            .get(namespace)
            .and_then(|n| n.members.get(&fp));
        let entry = NamespaceEntry {
            namespace: namespace.to_owned(),
            app_type: m.and_then(|m| m.app_type.clone()),
            app_version: m.and_then(|m| m.app_version.clone()),
        };
        self.publish(
            ClusterTarget::All,
            ClusterMessage::Joined {
                fingerprint: fp,
                entry,
            },
        );
    }
}
