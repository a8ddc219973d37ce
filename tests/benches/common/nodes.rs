//! Driving several `PollNode`s round-robin from one thread: fresh registered nodes, a room
//! with its direct mesh up, and the events that mean a bench went wrong.

use std::time::{Duration, Instant};

use peerlink::{ClientEvent, NodeConfig, NodeEvent, RoomEvent, RoomOptions, RoomPath};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};

use super::BenchError;

/// Tracing to stderr, filtered by RUST_LOG, when it is set.
pub fn tracing_from_env() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// The real signaling server in-process on 127.0.0.1 (port 0). When [`super::pinned`], its
/// thread is pinned to CPU 0 and the calling thread to CPU 1 (threads it starts inherit
/// that).
pub fn local_server() -> std::io::Result<peerlink_server::ServerHandle> {
    // The server's thread inherits CPU 0.
    super::pin_thread(0);
    let server = peerlink_server::spawn(peerlink_server::ServerOptions::local());
    super::pin_thread(1);
    server
}

/// Sleep after a round of all nodes in which no event came.
pub const IDLE_SLEEP: Duration = Duration::from_micros(50);

/// Fails on events that mean something went wrong (`i`: the node's index).
pub fn failure(i: usize, e: &NodeEvent) -> Result<(), BenchError> {
    match e {
        NodeEvent::PeerError { error, .. } => Err(format!("node {i}: {error}").into()),
        NodeEvent::Room(RoomEvent::Error { error, .. }) => Err(format!("node {i}: room: {error}").into()),
        NodeEvent::Signaling(ClientEvent::Error(error)) => Err(format!("node {i}: signaling: {error}").into()),
        NodeEvent::Signaling(ClientEvent::Response { result: Err(error), .. }) => {
            Err(format!("node {i}: request refused: {error}").into())
        }
        _ => Ok(()),
    }
}

/// A handler of one node's event: the node, its index, the event.
pub trait OnEvent: FnMut(&mut PollNode, usize, NodeEvent) -> Result<(), BenchError> {}
impl<F: FnMut(&mut PollNode, usize, NodeEvent) -> Result<(), BenchError>> OnEvent for F {}

/// Polls every node once and hands their events to `on`; returns whether there was any.
pub fn pump_nodes(nodes: &mut [PollNode], on: &mut impl OnEvent) -> Result<bool, BenchError> {
    let mut any = false;
    for (i, n) in nodes.iter_mut().enumerate() {
        n.poll(Instant::now())?;
        while let Some(e) = n.poll_event() {
            any = true;
            on(n, i, e)?;
        }
    }
    Ok(any)
}

/// Pumps until `done` (checked before every round; [`IDLE_SLEEP`] after a quiet one);
/// returns when it became true, or an error naming `what` at `deadline`.
pub fn until_nodes(
    nodes: &mut [PollNode],
    what: &str,
    deadline: Instant,
    mut on: impl OnEvent,
    mut done: impl FnMut(&mut [PollNode]) -> bool,
) -> Result<Instant, BenchError> {
    loop {
        let now = Instant::now();
        if done(nodes) {
            return Ok(now);
        }
        if now >= deadline {
            return Err(format!("{what}: timed out").into());
        }
        if !pump_nodes(nodes, &mut on)? {
            std::thread::sleep(IDLE_SLEEP);
        }
    }
}

/// `n` fresh nodes (new identities, UDP on 127.0.0.1), registered with the server at `url`.
pub fn fresh_nodes(url: &str, n: usize, deadline: Instant) -> Result<Vec<PollNode>, BenchError> {
    let options = || PollOptions { udp: UdpBind::Loopback, ..Default::default() };
    let mut nodes = (0..n).map(|_| PollNode::new(NodeConfig::new(url), options())).collect::<Result<Vec<_>, _>>()?;
    until_nodes(&mut nodes, "registration", deadline, |_: &mut PollNode, i, e| failure(i, &e), |ns| {
        ns.iter().all(PollNode::is_registered)
    })?;
    Ok(nodes)
}

/// Node 0 creates `room` (a group of all the nodes), the others join it at once; returns
/// when every node's view lists every other with `RoomPath::Direct`. Events other than
/// failures are dropped.
pub fn direct_room(nodes: &mut [PollNode], room: &str, deadline: Instant) -> Result<(), BenchError> {
    let n = nodes.len();
    nodes[0].node().create_room(Instant::now(), room, RoomOptions::group(n as u32))?;
    let check = |_: &mut PollNode, i: usize, e: NodeEvent| failure(i, &e);
    until_nodes(nodes, "room created", deadline, check, |ns| ns[0].node().room(room).is_some())?;
    let now = Instant::now();
    for node in &mut nodes[1..] {
        node.node().join_room(now, room)?;
    }
    until_nodes(nodes, "every member direct", deadline, check, |ns| {
        ns.iter_mut().all(|node| {
            node.node().room(room).is_some_and(|r| r.members.len() == n - 1 && r.members.iter().all(|m| m.path == RoomPath::Direct))
        })
    })?;
    Ok(())
}

/// Closes the nodes (best effort: the server drops their sessions at once).
pub fn close_nodes(nodes: Vec<PollNode>) {
    let now = Instant::now();
    for mut n in nodes {
        let _ = n.node().close(now);
        let _ = n.poll(now);
    }
}
