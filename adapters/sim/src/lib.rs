//! # peerlink-sim
//!
//! A deterministic world for peerlink: the real signaling [`Server`] core and real
//! [`Node`]s (str0m ICE, DTLS and SCTP included) on a virtual network with a virtual clock, in
//! one thread. Links have latency, jitter, loss, duplication, reordering and an MTU; pairs of
//! nodes can be partitioned and healed; the signaling path has its own latency and can be cut.
//! Everything random (the network's choices, every node's seed, the server's seed, str0m's
//! thread-local generator) comes from one seed, so **the same seed gives the same run**: the
//! same events at the same virtual instants. [`Sim::trace_hash`] summarizes a run to compare.
//!
//! Use it to test your own application logic against bad networks in milliseconds of wall time.
//!
//! ```
//! use std::time::Duration;
//! use peerlink::{NodeConfig, NodeEvent, PeerState};
//! use peerlink_sim::{LinkConfig, Sim};
//!
//! let mut sim = Sim::new(7);
//! sim.set_default_link(LinkConfig::new(Duration::from_millis(25)).loss(0.05));
//! let alice = sim.add_node("alice", NodeConfig::new("sim://server"));
//! let bob = sim.add_node("bob", NodeConfig::new("sim://server"));
//! sim.run_for(Duration::from_millis(500)); // both register
//!
//! let bob_fp = sim.fingerprint(bob);
//! sim.with_node(alice, |node, now| node.connect_to_peer(now, bob_fp)).unwrap();
//! let open = |sim: &Sim, node| sim.events(node).iter().any(|(_, e)| matches!(e, NodeEvent::ChannelOpen { .. }));
//! let up = sim.run_until(Duration::from_secs(10), |sim| open(sim, alice) && open(sim, bob));
//! assert!(up);
//! sim.with_node(alice, |node, now| node.send_text(now, bob_fp, None, "hello")).unwrap();
//! sim.run_for(Duration::from_secs(1));
//! assert!(sim.events(bob).iter().any(|(_, e)| matches!(e, NodeEvent::Data { .. })));
//! assert_eq!(sim.node(alice).get_peer(&bob_fp).unwrap().state, PeerState::Connected);
//! ```
//!
//! ## What is and is not deterministic
//!
//! Every event, its order and its virtual time are. The bytes of encrypted packets are not:
//! DTLS draws its ephemeral keys from the OS random source inside dimpl, and SCTP its
//! verification tags inside sctp-proto. Those change what is inside packets, never when they
//! are sent or what the application sees, so the trace (events and their times) repeats.
//! `Sim::new` seeds the thread-local `fastrand` generator that str0m uses for ICE internals; a
//! simulation owns its thread while it runs.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use peerlink::client::ClientTransmit;
use peerlink::identity::{Fingerprint, Identity};
use peerlink::node::{Node, NodeConfig, NodeEvent, NodeTransmit};
use peerlink::server::{ConnId, Server, ServerConfig, ServerTransmit};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tracing::trace;

/// Port every node's UDP socket has.
pub const NODE_PORT: u16 = 5000;
/// Wall-clock milliseconds the simulation starts at (certificates are dated from it).
pub const START_UNIX_MS: u64 = 1_750_000_000_000;
/// Most deliveries in flight; beyond it new datagrams are dropped (a full network queue).
pub const MAX_IN_FLIGHT: usize = 1 << 20;

/// Identifies a node in a [`Sim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub usize);

/// How a UDP link between two nodes behaves (each direction draws independently).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// One-way delay.
    pub latency: Duration,
    /// Extra delay, uniform in `0..jitter`, per datagram (reorders datagrams when it exceeds
    /// their spacing).
    pub jitter: Duration,
    /// Probability a datagram is lost.
    pub loss: f64,
    /// Probability a datagram arrives twice.
    pub duplicate: f64,
    /// Probability a datagram is held back by `reorder_delay` (arriving after later ones).
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_delay: Duration,
    /// Datagrams larger than this are dropped.
    pub mtu: usize,
}

impl LinkConfig {
    /// A clean link with this one-way latency and a 1500-byte MTU.
    pub fn new(latency: Duration) -> Self {
        LinkConfig { latency, jitter: Duration::ZERO, loss: 0.0, duplicate: 0.0, reorder: 0.0, reorder_delay: Duration::ZERO, mtu: 1500 }
    }

    /// Sets the jitter.
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets the loss probability.
    pub fn loss(mut self, loss: f64) -> Self {
        self.loss = loss;
        self
    }

    /// Sets the duplication probability.
    pub fn duplicate(mut self, p: f64) -> Self {
        self.duplicate = p;
        self
    }

    /// Holds back a fraction `p` of datagrams by `delay`.
    pub fn reorder(mut self, p: f64, delay: Duration) -> Self {
        self.reorder = p;
        self.reorder_delay = delay;
        self
    }

    /// Sets the MTU.
    pub fn mtu(mut self, mtu: usize) -> Self {
        self.mtu = mtu;
        self
    }
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig::new(Duration::from_millis(5))
    }
}

/// Rewrites (or drops, with `None`) a text the server sends to a node: a stand-in for a
/// malicious or broken signaling server. Arguments: the receiving node and the text.
pub type SignalingFilter = Box<dyn FnMut(NodeId, &str) -> Option<String>>;

enum Delivery {
    /// The WebSocket to the server opened.
    Connected { node: NodeId, conn: ConnId },
    /// A text from a node to the server.
    ToServer { conn: ConnId, text: String },
    /// The node closed its WebSocket.
    ClientClosed { conn: ConnId },
    /// A text from the server to a node.
    ToNode { node: NodeId, conn: ConnId, text: String },
    /// The server (or the network) closed a node's WebSocket.
    ServerClosed { node: NodeId, conn: ConnId, code: Option<u16> },
    /// A UDP datagram.
    Datagram { to: NodeId, source: SocketAddr, destination: SocketAddr, contents: Vec<u8> },
}

struct Scheduled {
    at: Instant,
    seq: u64,
    delivery: Delivery,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct SimNode {
    name: String,
    node: Node,
    addr: SocketAddr,
    /// The WebSocket the node has open (or is opening), if any.
    conn: Option<ConnId>,
    /// Events so far, with the virtual time since the start.
    events: Vec<(Duration, NodeEvent)>,
    /// Signaling cut: frames in both directions are lost and connects fail.
    signaling_down: bool,
    /// Behind a full-cone NAT: the address others see (and reach it at) instead of `addr`.
    public: Option<SocketAddr>,
}

/// Counts of what the network did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Datagrams sent by nodes.
    pub sent: u64,
    /// Datagrams delivered (duplicates included).
    pub delivered: u64,
    /// Lost to random loss.
    pub lost: u64,
    /// Dropped by a partition.
    pub partitioned: u64,
    /// Dropped for exceeding the MTU.
    pub too_big: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Signaling frames delivered (both directions).
    pub signaling_frames: u64,
}

/// A simulated world. See the [crate docs](crate).
pub struct Sim {
    seed: u64,
    rng: ChaCha20Rng,
    start: Instant,
    now: Instant,
    server: Server,
    nodes: Vec<SimNode>,
    conns: BTreeMap<ConnId, NodeId>,
    next_conn: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    default_link: LinkConfig,
    links: BTreeMap<(NodeId, NodeId), LinkConfig>,
    partitions: BTreeSet<(NodeId, NodeId)>,
    signaling_latency: Duration,
    filter: Option<SignalingFilter>,
    stun_servers: BTreeSet<SocketAddr>,
    hasher: DefaultHasher,
    stats: NetStats,
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    if a <= b { (a, b) } else { (b, a) }
}

impl Sim {
    /// A world with a signaling server (default configuration) and no nodes.
    pub fn new(seed: u64) -> Self {
        Sim::with_server(seed, ServerConfig::default())
    }

    /// A world whose signaling server has `config`.
    pub fn with_server(seed: u64, config: ServerConfig) -> Self {
        fastrand::seed(seed);
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let start = Instant::now();
        let server = Server::new(config, rng.next_u64(), start, START_UNIX_MS);
        Sim {
            seed,
            rng,
            start,
            now: start,
            server,
            nodes: Vec::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            queue: BinaryHeap::new(),
            seq: 0,
            default_link: LinkConfig::default(),
            links: BTreeMap::new(),
            partitions: BTreeSet::new(),
            signaling_latency: Duration::from_millis(10),
            filter: None,
            stun_servers: BTreeSet::new(),
            hasher: DefaultHasher::new(),
            stats: NetStats::default(),
        }
    }

    /// The seed this world was made from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The virtual time now.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// The link used between nodes without one of their own.
    pub fn set_default_link(&mut self, link: LinkConfig) {
        self.default_link = link;
    }

    /// Sets the link between `a` and `b` (both directions).
    pub fn set_link(&mut self, a: NodeId, b: NodeId, link: LinkConfig) {
        self.links.insert(pair(a, b), link);
    }

    /// The link between `a` and `b`.
    pub fn link(&self, a: NodeId, b: NodeId) -> LinkConfig {
        self.links.get(&pair(a, b)).copied().unwrap_or(self.default_link)
    }

    /// One-way latency between a node and the signaling server. Default 10 ms.
    pub fn set_signaling_latency(&mut self, latency: Duration) {
        self.signaling_latency = latency;
    }

    /// Drops every datagram between `a` and `b` until [`Sim::heal`].
    pub fn partition(&mut self, a: NodeId, b: NodeId) {
        self.partitions.insert(pair(a, b));
    }

    /// Undoes [`Sim::partition`].
    pub fn heal(&mut self, a: NodeId, b: NodeId) {
        self.partitions.remove(&pair(a, b));
    }

    /// Cuts (`true`) or restores a node's signaling connection. While cut, its WebSocket is
    /// closed as by a network failure and reconnect attempts fail.
    pub fn set_signaling_down(&mut self, node: NodeId, down: bool) {
        self.nodes[node.0].signaling_down = down;
        if down {
            if let Some(conn) = self.nodes[node.0].conn.take() {
                self.conns.remove(&conn);
                let _ = self.server.handle_disconnect(conn, self.now);
                self.drain_server();
                let _ = self.nodes[node.0].node.handle_disconnected(self.now, None);
                self.drain_node(node);
            }
        }
    }

    /// Installs a filter on every text the server sends (a malicious server).
    pub fn set_signaling_filter(&mut self, filter: impl FnMut(NodeId, &str) -> Option<String> + 'static) {
        self.filter = Some(Box::new(filter));
    }

    /// Delivers a raw datagram to a node at the current time, as if `source` had sent it (for
    /// testing what a node does with junk from the network).
    pub fn inject_datagram(&mut self, to: NodeId, source: SocketAddr, contents: &[u8]) {
        let destination = self.nodes[to.0].addr;
        self.deliver(Delivery::Datagram { to, source, destination, contents: contents.to_vec() });
    }

    /// Answers STUN binding requests sent to `addr` (with the requester's address).
    pub fn add_stun_server(&mut self, addr: SocketAddr) {
        self.stun_servers.insert(addr);
    }

    /// Adds a node with an identity from the world's seed, at address `10.0.x.y:5000`; it
    /// starts connecting to the signaling server at once.
    pub fn add_node(&mut self, name: impl Into<String>, config: NodeConfig) -> NodeId {
        let identity = Identity::generate(&mut self.rng);
        self.add_node_with_identity(name, config, identity)
    }

    /// Adds a node behind a full-cone NAT with this public IP: its datagrams leave with the
    /// source `public_ip:5000`, only datagrams to that address reach it, and its own (host)
    /// address is unreachable from other nodes. A STUN server tells it its public address.
    pub fn add_node_behind_nat(&mut self, name: impl Into<String>, config: NodeConfig, public_ip: IpAddr) -> NodeId {
        let identity = Identity::generate(&mut self.rng);
        self.add(name.into(), config, identity, Some(SocketAddr::new(public_ip, NODE_PORT)))
    }

    /// Adds a node with the given identity.
    pub fn add_node_with_identity(&mut self, name: impl Into<String>, config: NodeConfig, identity: Identity) -> NodeId {
        self.add(name.into(), config, identity, None)
    }

    fn add(&mut self, name: String, config: NodeConfig, identity: Identity, public: Option<SocketAddr>) -> NodeId {
        let id = NodeId(self.nodes.len());
        let n = id.0 as u32 + 1;
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, (n >> 8) as u8, n as u8)), NODE_PORT);
        let seed = self.rng.next_u64();
        let node = Node::new(config, identity, seed, self.now, START_UNIX_MS + self.elapsed().as_millis() as u64)
            .expect("a node's certificate is made from its seed");
        self.nodes.push(SimNode { name, node, addr, conn: None, events: Vec::new(), signaling_down: false, public });
        let now = self.now;
        let sim_node = &mut self.nodes[id.0].node;
        sim_node.add_local_address(now, addr).expect("a node's first address is valid");
        for stun in self.stun_servers.clone() {
            let _ = self.nodes[id.0].node.add_stun_server(now, stun);
        }
        let _ = self.nodes[id.0].node.connect(now);
        self.drain_node(id);
        id
    }

    /// A node's name.
    pub fn name(&self, node: NodeId) -> &str {
        &self.nodes[node.0].name
    }

    /// A node's fingerprint.
    pub fn fingerprint(&self, node: NodeId) -> Fingerprint {
        self.nodes[node.0].node.fingerprint()
    }

    /// A node's UDP address.
    pub fn addr(&self, node: NodeId) -> SocketAddr {
        self.nodes[node.0].addr
    }

    /// The node.
    pub fn node(&self, node: NodeId) -> &Node {
        &self.nodes[node.0].node
    }

    /// Runs `f` on a node at the current virtual time, then drains it.
    pub fn with_node<T>(&mut self, node: NodeId, f: impl FnOnce(&mut Node, Instant) -> T) -> T {
        let now = self.now;
        let out = f(&mut self.nodes[node.0].node, now);
        self.drain_node(node);
        out
    }

    /// The server core.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Every event a node has had so far, with its virtual time since the start.
    pub fn events(&self, node: NodeId) -> &[(Duration, NodeEvent)] {
        &self.nodes[node.0].events
    }

    /// Takes a node's events so far.
    pub fn take_events(&mut self, node: NodeId) -> Vec<(Duration, NodeEvent)> {
        std::mem::take(&mut self.nodes[node.0].events)
    }

    /// Counts of what the network did.
    pub fn net_stats(&self) -> NetStats {
        self.stats
    }

    /// A hash of every event of every node so far, with its node and virtual time. Two runs
    /// from the same seed and the same commands have the same hash.
    pub fn trace_hash(&self) -> u64 {
        self.hasher.finish()
    }

    // ---- running ------------------------------------------------------------------------

    /// The next instant something happens, if anything will.
    fn next_instant(&self) -> Option<Instant> {
        let queued = self.queue.peek().map(|Reverse(s)| s.at);
        let nodes = self.nodes.iter().filter_map(|n| n.node.poll_timeout());
        let server = self.server.poll_timeout();
        queued.into_iter().chain(nodes).chain(server).min()
    }

    /// Advances to the next instant something happens (not past `limit`); returns false when
    /// nothing happens before `limit` (the clock is then at `limit`).
    pub fn step(&mut self, limit: Instant) -> bool {
        let Some(at) = self.next_instant().filter(|at| *at <= limit) else {
            self.now = self.now.max(limit);
            return false;
        };
        self.now = self.now.max(at);
        let now = self.now;
        while self.queue.peek().is_some_and(|Reverse(s)| s.at <= now) {
            let Reverse(s) = self.queue.pop().expect("peeked");
            self.deliver(s.delivery);
        }
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            let _ = self.server.handle_timeout(now);
            self.drain_server();
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].node.poll_timeout().is_some_and(|t| t <= now) {
                if let Err(e) = self.nodes[i].node.handle_timeout(now) {
                    panic!("node {} refused a timeout: {e}", self.nodes[i].name);
                }
                self.drain_node(NodeId(i));
            }
        }
        true
    }

    /// Runs for `duration` of virtual time.
    pub fn run_for(&mut self, duration: Duration) {
        let limit = self.now + duration;
        while self.step(limit) {}
    }

    /// Runs until `done` returns true (checked after every step) or `max` virtual time
    /// passes; returns whether `done` held.
    pub fn run_until(&mut self, max: Duration, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let limit = self.now + max;
        loop {
            if done(self) {
                return true;
            }
            if !self.step(limit) {
                return done(self);
            }
        }
    }

    // ---- plumbing -----------------------------------------------------------------------

    fn schedule(&mut self, at: Instant, delivery: Delivery) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled { at, seq: self.seq, delivery }));
    }

    fn deliver(&mut self, delivery: Delivery) {
        let now = self.now;
        match delivery {
            Delivery::Connected { node, conn } => {
                if self.nodes[node.0].conn != Some(conn) {
                    return;
                }
                let _ = self.server.handle_connect(conn, now);
                let _ = self.nodes[node.0].node.handle_connected(now);
                self.drain_node(node);
                self.drain_server();
            }
            Delivery::ToServer { conn, text } => {
                if self.conns.contains_key(&conn) {
                    self.stats.signaling_frames += 1;
                    let _ = self.server.handle_message(conn, now, &text);
                    self.drain_server();
                }
            }
            Delivery::ClientClosed { conn } => {
                let _ = self.server.handle_disconnect(conn, now);
                self.drain_server();
            }
            Delivery::ToNode { node, conn, text } => {
                if self.nodes[node.0].conn != Some(conn) {
                    return;
                }
                let text = match self.filter.as_mut() {
                    Some(f) => match f(node, &text) {
                        Some(t) => t,
                        None => return,
                    },
                    None => text,
                };
                self.stats.signaling_frames += 1;
                if let Err(e) = self.nodes[node.0].node.handle_text(now, &text) {
                    panic!("node {} refused a text: {e}", self.nodes[node.0].name);
                }
                self.drain_node(node);
            }
            Delivery::ServerClosed { node, conn, code } => {
                if self.nodes[node.0].conn != Some(conn) {
                    return;
                }
                self.nodes[node.0].conn = None;
                let _ = self.nodes[node.0].node.handle_disconnected(now, code);
                self.drain_node(node);
            }
            Delivery::Datagram { to, source, destination, contents } => {
                self.stats.delivered += 1;
                if let Err(e) = self.nodes[to.0].node.handle_datagram(now, source, destination, &contents) {
                    panic!("node {} refused a datagram: {e}", self.nodes[to.0].name);
                }
                self.drain_node(to);
            }
        }
    }

    /// Drains a node's outputs into the network and its event log.
    fn drain_node(&mut self, id: NodeId) {
        loop {
            let mut busy = false;
            while let Some(t) = self.nodes[id.0].node.poll_transmit() {
                busy = true;
                match t {
                    NodeTransmit::Signaling(t) => self.signaling_out(id, t),
                    NodeTransmit::Datagram(d) => self.route(id, d.source, d.destination, d.contents),
                }
            }
            while let Some(e) = self.nodes[id.0].node.poll_event() {
                busy = true;
                let at = self.now - self.start;
                trace!(node = %self.nodes[id.0].name, ?at, event = ?e, "event");
                (at.as_nanos(), id.0).hash(&mut self.hasher);
                hash_event(&e, &mut self.hasher);
                self.nodes[id.0].events.push((at, e));
            }
            if !busy {
                break;
            }
        }
    }

    fn signaling_out(&mut self, id: NodeId, t: ClientTransmit) {
        let at = self.now + self.signaling_latency;
        match t {
            ClientTransmit::Connect { .. } => {
                if let Some(old) = self.nodes[id.0].conn.take() {
                    self.conns.remove(&old);
                    self.schedule(at, Delivery::ClientClosed { conn: old });
                }
                if self.nodes[id.0].signaling_down {
                    let conn = ConnId(0);
                    // The connect fails after the latency.
                    self.nodes[id.0].conn = Some(conn);
                    self.schedule(at, Delivery::ServerClosed { node: id, conn, code: None });
                    return;
                }
                let conn = ConnId(self.next_conn);
                self.next_conn += 1;
                self.nodes[id.0].conn = Some(conn);
                self.conns.insert(conn, id);
                self.schedule(at + self.signaling_latency, Delivery::Connected { node: id, conn });
            }
            ClientTransmit::Text(text) => {
                if let Some(conn) = self.nodes[id.0].conn.filter(|c| self.conns.contains_key(c)) {
                    self.schedule(at, Delivery::ToServer { conn, text });
                }
            }
            ClientTransmit::Close { .. } => {
                if let Some(conn) = self.nodes[id.0].conn.take() {
                    self.conns.remove(&conn);
                    self.schedule(at, Delivery::ClientClosed { conn });
                }
            }
        }
    }

    fn drain_server(&mut self) {
        while let Some(t) = self.server.poll_transmit() {
            let at = self.now + self.signaling_latency;
            match t {
                ServerTransmit::Text { conn, text } => {
                    if let Some(node) = self.conns.get(&conn).copied() {
                        self.schedule(at, Delivery::ToNode { node, conn, text: text.to_string() });
                    }
                }
                ServerTransmit::Close { conn, code } => {
                    if let Some(node) = self.conns.remove(&conn) {
                        self.schedule(at, Delivery::ServerClosed { node, conn, code: Some(code.code()) });
                    }
                }
            }
        }
    }

    /// The node reachable at `addr`: its public address when behind a NAT, else its own.
    fn node_at(&self, addr: SocketAddr) -> Option<NodeId> {
        self.nodes.iter().position(|n| n.public.unwrap_or(n.addr) == addr).map(NodeId)
    }

    /// Sends a datagram across the virtual network.
    fn route(&mut self, from: NodeId, source: SocketAddr, destination: SocketAddr, contents: Vec<u8>) {
        self.stats.sent += 1;
        // Through the sender's NAT, if any.
        let source = match self.nodes[from.0].public {
            Some(public) if source == self.nodes[from.0].addr => public,
            _ => source,
        };
        if self.stun_servers.contains(&destination) {
            if let Ok(peerlink::stun::StunMessage::BindingRequest { transaction }) = peerlink::stun::decode(&contents) {
                let reply = peerlink::stun::binding_success(transaction, source);
                let at = self.now + self.default_link.latency * 2;
                let local = self.nodes[from.0].addr;
                self.schedule(at, Delivery::Datagram { to: from, source: destination, destination: local, contents: reply });
            }
            return;
        }
        let Some(to) = self.node_at(destination) else { return };
        if self.partitions.contains(&pair(from, to)) {
            self.stats.partitioned += 1;
            return;
        }
        let link = self.link(from, to);
        if contents.len() > link.mtu {
            self.stats.too_big += 1;
            return;
        }
        if self.queue.len() >= MAX_IN_FLIGHT || (link.loss > 0.0 && self.rng.random_bool(link.loss.clamp(0.0, 1.0))) {
            self.stats.lost += 1;
            return;
        }
        let copies = if link.duplicate > 0.0 && self.rng.random_bool(link.duplicate.clamp(0.0, 1.0)) { 2 } else { 1 };
        for copy in 0..copies {
            let mut delay = link.latency;
            if !link.jitter.is_zero() {
                delay += Duration::from_nanos(self.rng.random_range(0..link.jitter.as_nanos() as u64));
            }
            if link.reorder > 0.0 && self.rng.random_bool(link.reorder.clamp(0.0, 1.0)) {
                delay += link.reorder_delay;
            }
            if copy == 1 {
                self.stats.duplicated += 1;
            }
            let at = self.now + delay;
            // Through the receiver's NAT: delivered to its own address.
            let destination = self.nodes[to.0].addr;
            self.schedule(at, Delivery::Datagram { to, source, destination, contents: contents.clone() });
        }
    }
}

/// Feeds `e` to the trace hash: bulk bytes (messages, transfer chunks) as bytes, everything
/// else by its `Debug` text (formatting a 16 KiB payload as a list of numbers cost more than
/// the rest of the simulation).
fn hash_event(e: &NodeEvent, hasher: &mut impl Hasher) {
    use peerlink::transfer::TransferEvent;
    match e {
        NodeEvent::Data { peer, channel, data: peerlink::Payload::Binary(b) } => (0u8, peer.to_string(), channel, b).hash(hasher),
        NodeEvent::Transfer(TransferEvent::Write { peer, id, offset, data }) => (1u8, peer.to_string(), id, offset, data).hash(hasher),
        NodeEvent::Transfer(TransferEvent::Received { peer, id, data }) => (2u8, peer.to_string(), id, data).hash(hasher),
        e => format!("{e:?}").hash(hasher),
    }
}
