//! The link to the other nodes of a cluster: Redis pub/sub (see `docs/CLUSTER.md`).
//!
//! Two threads of their own, so the event loop never blocks on Redis: a *subscriber* holds a
//! connection subscribed to the cluster's broadcast channel and this node's own channel, and
//! hands what arrives (and the link going up or down) to the loop through a bounded channel,
//! waking it with the loop's [`mio::Waker`]; a *publisher* holds a second connection and
//! publishes what the loop queues through another bounded channel. Both reconnect with
//! exponential backoff (100 ms doubling to 5 s).
//!
//! Overflow: the loop queues at most [`OUTBOUND`] messages; past that a message is dropped
//! (counted, and logged once per burst), as a lost message is during a broker outage. The
//! subscriber waits while [`INBOUND`] messages wait for the loop; Redis then buffers for it,
//! up to its `client-output-buffer-limit` for pub/sub, past which Redis drops the connection:
//! the subscriber reconnects and the core's `hello` resynchronises membership.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use peerlink::server::{ClusterTarget, NodeId};
use tracing::{debug, info, warn};

use crate::Control;

/// Most messages queued for publishing.
pub(crate) const OUTBOUND: usize = 65_536;
/// Most received messages waiting for the event loop.
pub(crate) const INBOUND: usize = 65_536;
/// How often the threads look at the stop flag while idle.
const POLL: Duration = Duration::from_millis(250);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the subscriber reports to the event loop.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// Subscribed (first time, or again after a reconnect).
    Up,
    /// The subscription was lost; reconnecting.
    Down,
    /// A message published by a node (possibly this one).
    Message(String),
}

/// Wakes the event loop for link events, once per batch: the first event after the loop
/// began draining wakes it, the rest ride along (one `eventfd` write instead of one per
/// message).
pub(crate) struct Wake {
    control: Arc<Control>,
    pending: AtomicBool,
}

impl Wake {
    fn new(control: Arc<Control>) -> Arc<Wake> {
        Arc::new(Wake { control, pending: AtomicBool::new(false) })
    }

    /// After queueing an event: wakes the loop unless a wake is already on its way.
    fn notify(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            let _ = self.control.waker.wake();
        }
    }

    /// The loop is about to drain: the next event must wake it again.
    fn drained(&self) {
        self.pending.store(false, Ordering::Release);
    }
}

/// The Redis channel names of one cluster.
#[derive(Debug, Clone)]
struct Channels {
    prefix: String,
}

impl Channels {
    fn all(&self) -> String {
        format!("{}:all", self.prefix)
    }

    fn node(&self, node: NodeId) -> String {
        format!("{}:node:{node}", self.prefix)
    }
}

/// A running link; dropping it publishes what is queued and stops both threads.
pub(crate) struct RedisLink {
    outbound: Option<SyncSender<(ClusterTarget, String)>>,
    inbound: Receiver<LinkEvent>,
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    wake: Arc<Wake>,
    threads: Vec<JoinHandle<()>>,
}

impl RedisLink {
    /// Starts the link for node `node` of the cluster named `cluster` (the servers'
    /// `server_id`: nodes of one cluster share it) on the Redis at `url`.
    pub(crate) fn start(
        url: &str,
        cluster: &str,
        node: NodeId,
        control: Arc<Control>,
    ) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let channels = Channels {
            prefix: format!("peerlink:{cluster}"),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let (out_tx, out_rx) = mpsc::sync_channel(OUTBOUND);
        let (in_tx, in_rx) = mpsc::sync_channel(INBOUND);
        // Set by the subscriber whenever it (re)subscribes: the publisher's connection may be
        // one Redis dropped meanwhile (a restart), and the first message after it (the core's
        // `hello`) must not be lost on it.
        let reset = Arc::new(AtomicBool::new(false));
        let wake = Wake::new(control);
        let sub = {
            let (client, channels, stop, reset, wake) = (client.clone(), channels.clone(), stop.clone(), reset.clone(), wake.clone());
            thread::Builder::new()
                .name("peerlink-redis-sub".into())
                .spawn(move || subscriber(client, channels, node, stop, reset, in_tx, wake))
                .map_err(redis_io)?
        };
        let publ = {
            let stop = stop.clone();
            thread::Builder::new()
                .name("peerlink-redis-pub".into())
                .spawn(move || publisher(client, channels, stop, reset, out_rx))
                .map_err(redis_io)?
        };
        Ok(RedisLink {
            outbound: Some(out_tx),
            inbound: in_rx,
            stop,
            dropped,
            wake,
            threads: vec![sub, publ],
        })
    }

    /// Queues a message for publishing; drops it (counted) when [`OUTBOUND`] are queued.
    pub(crate) fn publish(&self, target: ClusterTarget, text: String) {
        let Some(tx) = &self.outbound else { return };
        match tx.try_send((target, text)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                if self.dropped.fetch_add(1, Ordering::Relaxed) % 1024 == 0 {
                    warn!(
                        dropped = self.dropped.load(Ordering::Relaxed),
                        "cluster publish queue full: message dropped"
                    );
                }
            }
        }
    }

    /// The next event from the subscriber, if one waits. Call [`Link::drained`] before a
    /// round of these.
    pub(crate) fn try_recv(&self) -> Option<LinkEvent> {
        self.inbound.try_recv().ok()
    }

    /// Messages dropped so far because the publish queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for RedisLink {
    fn drop(&mut self) {
        // The publisher sends what is queued (a `bye` among it) once the sender is gone.
        self.outbound.take();
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn redis_io(e: std::io::Error) -> redis::RedisError {
    redis::RedisError::from(e)
}

/// Sleeps `backoff` in steps (so a stop is seen) and doubles it; false when stopped.
fn wait(stop: &AtomicBool, backoff: &mut Duration) -> bool {
    let mut left = *backoff;
    while !left.is_zero() {
        if stop.load(Ordering::Acquire) {
            return false;
        }
        let step = left.min(POLL);
        thread::sleep(step);
        left -= step;
    }
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    !stop.load(Ordering::Acquire)
}

fn subscriber(
    client: redis::Client,
    channels: Channels,
    node: NodeId,
    stop: Arc<AtomicBool>,
    reset: Arc<AtomicBool>,
    tx: SyncSender<LinkEvent>,
    wake: Arc<Wake>,
) {
    let send = |event: LinkEvent| {
        let ok = tx.send(event).is_ok();
        wake.notify();
        ok
    };
    let mut backoff = BACKOFF_MIN;
    let mut up = false;
    while !stop.load(Ordering::Acquire) {
        let result = (|| -> redis::RedisResult<()> {
            let mut con = client.get_connection_with_timeout(BACKOFF_MAX)?;
            let mut pubsub = con.as_pubsub();
            pubsub.subscribe(&[channels.all(), channels.node(node)])?;
            pubsub.set_read_timeout(Some(POLL))?;
            info!(%node, "cluster link up");
            up = true;
            backoff = BACKOFF_MIN;
            // Before the loop hears `Up` (and publishes its `hello`).
            reset.store(true, Ordering::Release);
            if !send(LinkEvent::Up) {
                return Ok(());
            }
            while !stop.load(Ordering::Acquire) {
                match pubsub.get_message() {
                    Ok(msg) => {
                        let Ok(text) = msg.get_payload::<String>() else {
                            continue;
                        };
                        if !send(LinkEvent::Message(text)) {
                            return Ok(());
                        }
                    }
                    Err(e) if e.is_timeout() => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            if up {
                warn!(error = %e, "cluster link down; reconnecting");
                up = false;
                if !send(LinkEvent::Down) {
                    return;
                }
            } else {
                debug!(error = %e, "cluster link: connecting failed");
            }
            if !wait(&stop, &mut backoff) {
                return;
            }
        }
    }
}

/// Most messages sent to Redis in one pipeline (one round trip).
const PIPELINE: usize = 256;

fn publisher(
    client: redis::Client,
    channels: Channels,
    stop: Arc<AtomicBool>,
    reset: Arc<AtomicBool>,
    rx: Receiver<(ClusterTarget, String)>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut con: Option<redis::Connection> = None;
    let mut batch: Vec<(ClusterTarget, String)> = Vec::with_capacity(PIPELINE);
    loop {
        if batch.is_empty() {
            match rx.recv_timeout(POLL) {
                Ok(m) => batch.push(m),
                Err(RecvTimeoutError::Timeout) => continue,
                // The loop is gone and everything queued was published.
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        // Whatever else is queued goes in the same round trip.
        while batch.len() < PIPELINE {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if reset.swap(false, Ordering::AcqRel) && con.is_some() {
            // The subscriber (re)subscribed: start from a fresh connection too.
            debug!("cluster publisher: reconnecting after the link came up");
            con = None;
        }
        if con.is_none() {
            match client.get_connection_with_timeout(BACKOFF_MAX) {
                Ok(c) => {
                    con = Some(c);
                    backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    debug!(error = %e, "cluster publisher: connecting failed");
                    // Stopping with Redis unreachable: what is queued is lost, as in an outage.
                    if !wait(&stop, &mut backoff) {
                        return;
                    }
                    continue;
                }
            }
        }
        let mut pipe = redis::pipe();
        for (target, text) in batch.drain(..) {
            let channel = match target {
                ClusterTarget::All => channels.all(),
                ClusterTarget::Node(n) => channels.node(n),
            };
            pipe.cmd("PUBLISH").arg(channel).arg(text).ignore();
        }
        let c = con.as_mut().expect("connected above");
        if let Err(e) = pipe.query::<()>(c) {
            // At most once: messages whose PUBLISH failed are not retried.
            warn!(error = %e, "cluster publish failed; reconnecting");
            con = None;
        }
    }
}

/// An in-process message bus for the nodes of a cluster that run in one process (tests,
/// examples, a simulation): what [`ServerOptions::redis`](crate::ServerOptions::redis) does
/// over Redis, through memory. Clone it into the [`ServerOptions::cluster_bus`](crate::ServerOptions::cluster_bus)
/// of every node; the nodes must share `config.server_id` like nodes on Redis.
///
/// Delivery is in order per sender and target, as on Redis pub/sub. Each node's inbox holds at
/// most 65,536 messages; a message for a full inbox is dropped and counted (as Redis drops a
/// slow subscriber), and the cluster's resynchronisation repairs what it carried.
#[derive(Clone, Default)]
pub struct ClusterBus {
    inner: Arc<Mutex<BusInner>>,
}

#[derive(Default)]
struct BusInner {
    members: Vec<BusMember>,
    dropped: u64,
}

struct BusMember {
    node: NodeId,
    tx: SyncSender<LinkEvent>,
    wake: Arc<Wake>,
}

impl std::fmt::Debug for ClusterBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock().expect("bus lock");
        f.debug_struct("ClusterBus").field("nodes", &inner.members.len()).field("dropped", &inner.dropped).finish()
    }
}

impl ClusterBus {
    /// A bus with no node on it yet.
    pub fn new() -> Self {
        ClusterBus::default()
    }

    /// How many nodes are on the bus now.
    pub fn nodes(&self) -> usize {
        self.inner.lock().expect("bus lock").members.len()
    }

    /// Messages dropped because a node's inbox was full.
    pub fn dropped(&self) -> u64 {
        self.inner.lock().expect("bus lock").dropped
    }

    /// Puts node `node` on the bus; its link is up at once.
    pub(crate) fn attach(&self, node: NodeId, control: Arc<Control>) -> BusLink {
        let (tx, rx) = mpsc::sync_channel(INBOUND);
        let wake = Wake::new(control);
        let _ = tx.try_send(LinkEvent::Up);
        wake.notify();
        self.inner.lock().expect("bus lock").members.push(BusMember { node, tx, wake: wake.clone() });
        BusLink { bus: self.clone(), node, inbound: rx, wake }
    }

    fn publish(&self, target: ClusterTarget, text: String) {
        let mut inner = self.inner.lock().expect("bus lock");
        let mut dropped = 0;
        for m in inner.members.iter().filter(|m| target == ClusterTarget::All || target == ClusterTarget::Node(m.node)) {
            match m.tx.try_send(LinkEvent::Message(text.clone())) {
                Ok(()) => m.wake.notify(),
                Err(_) => dropped += 1,
            }
        }
        inner.dropped += dropped;
    }
}

/// A node's place on a [`ClusterBus`]; leaving the bus when dropped.
pub(crate) struct BusLink {
    bus: ClusterBus,
    node: NodeId,
    inbound: Receiver<LinkEvent>,
    wake: Arc<Wake>,
}

impl Drop for BusLink {
    fn drop(&mut self) {
        self.bus.inner.lock().expect("bus lock").members.retain(|m| m.node != self.node);
    }
}

/// The link of a clustered node: Redis, or an in-process bus.
pub(crate) enum Link {
    /// Redis pub/sub.
    Redis(RedisLink),
    /// A [`ClusterBus`].
    Bus(BusLink),
}

impl Link {
    /// Queues a message for the other nodes (see [`RedisLink::publish`]).
    pub(crate) fn publish(&self, target: ClusterTarget, text: String) {
        match self {
            Link::Redis(l) => l.publish(target, text),
            Link::Bus(l) => l.bus.publish(target, text),
        }
    }

    /// Messages dropped so far (Redis: this node's full publish queue; a bus: full inboxes of
    /// any node on it).
    pub(crate) fn dropped(&self) -> u64 {
        match self {
            Link::Redis(l) => l.dropped(),
            Link::Bus(l) => l.bus.dropped(),
        }
    }

    /// Before draining with [`Link::try_recv`]: an event queued from now on wakes the loop.
    pub(crate) fn drained(&self) {
        match self {
            Link::Redis(l) => l.wake.drained(),
            Link::Bus(l) => l.wake.drained(),
        }
    }

    /// The next event for the loop, if one waits.
    pub(crate) fn try_recv(&self) -> Option<LinkEvent> {
        match self {
            Link::Redis(l) => l.try_recv(),
            Link::Bus(l) => l.inbound.try_recv().ok(),
        }
    }
}
