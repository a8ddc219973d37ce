//! Connections through a real TURN server: coturn on 127.0.0.1 (which `.ci/run` installs),
//! long-term credentials from a `turn:` entry of `ice_servers`, the `relay` transport policy.
//!
//! - Two nodes that may only use relayed candidates allocate on coturn, connect through it
//!   (ICE, DTLS and SCTP inside TURN channels) and exchange data both ways.
//! - The same two nodes without a TURN server cannot connect at all: the policy really keeps
//!   their host addresses out (the control that makes the first test mean something).
//! - Wrong credentials are a typed event: `TurnEvent::Failed { error: Unauthorized }`.

use std::time::{Duration, Instant};

use peerlink::turn::{TurnError, TurnEvent};
use peerlink::{IceServer, IceTransportPolicy, NodeConfig, NodeEvent, PeerError, PeerState};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use peerlink_tests::coturn::Coturn;
use peerlink_tests::relay_nodes::{allocated, channel_open, run, texts};
use peerlink_tests::{WAIT, client_config, start_server};

fn coturn() -> Coturn {
    Coturn::start(&["--lt-cred-mech", "--user=u:p", "--realm=peerlink", "--allow-loopback-peers", "--relay-ip=127.0.0.1"])
}

fn node(url: &str, alias: &str, turn: Option<(u16, &str)>) -> PollNode {
    let mut config = NodeConfig::with_client(client_config(url, alias));
    if let Some((port, password)) = turn {
        config.ice_servers = vec![IceServer::turn([format!("turn:127.0.0.1:{port}?transport=udp")], "u", password)];
    }
    config.ice_transport_policy = IceTransportPolicy::Relay;
    config.peer.connect_timeout = Duration::from_secs(4);
    PollNode::new(config, PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap()
}

#[test]
fn two_relay_only_nodes_connect_through_coturn() {
    let coturn = coturn();
    let server = start_server(peerlink::ServerConfig::default());
    let mut a = node(&server.url(), "a", Some((coturn.port, "p")));
    let mut b = node(&server.url(), "b", Some((coturn.port, "p")));
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    run(&mut a, &mut b, &mut ea, &mut eb, WAIT, "both allocations", |ea, eb| allocated(ea) && allocated(eb));
    // Only the relayed candidate is offered: nothing about the host's sockets.
    for n in [&mut a, &mut b] {
        let candidates = n.node().local_candidates();
        assert_eq!(candidates.len(), 1, "{candidates:?}");
        assert!(candidates[0].contains("typ relay"), "{candidates:?}");
    }
    let (fa, fb) = (a.fingerprint(), b.fingerprint());
    a.connect_to_peer(fb).unwrap();
    run(&mut a, &mut b, &mut ea, &mut eb, WAIT, "the connection through coturn", |ea, eb| channel_open(ea) && channel_open(eb));
    for i in 0..20 {
        a.send(fb, None, &format!("a{i}")).unwrap();
        b.send(fa, None, &format!("b{i}")).unwrap();
    }
    run(&mut a, &mut b, &mut ea, &mut eb, WAIT, "40 messages", |ea, eb| texts(ea).len() == 20 && texts(eb).len() == 20);
    assert_eq!(texts(&eb), (0..20).map(|i| format!("\"a{i}\"")).collect::<Vec<_>>());
    assert_eq!(texts(&ea), (0..20).map(|i| format!("\"b{i}\"")).collect::<Vec<_>>());
    // The relayed path used TURN channels (bound once permissions held): B's view of A.
    let bound = ea.iter().chain(&eb).filter(|e| matches!(e, NodeEvent::Turn { event: TurnEvent::ChannelBound { .. }, .. })).count();
    assert!(bound >= 2, "each side bound a channel to the other's relayed address");
    assert_eq!(a.get_peer(&fb).map(|p| p.state), Some(PeerState::Connected));
}

#[test]
fn relay_only_without_a_turn_server_cannot_connect() {
    let server = start_server(peerlink::ServerConfig::default());
    let mut a = node(&server.url(), "a", None);
    let mut b = node(&server.url(), "b", None);
    assert!(a.node().local_candidates().is_empty());
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    run(&mut a, &mut b, &mut ea, &mut eb, WAIT, "registration", |_, _| true);
    while !(a.is_registered() && b.is_registered()) {
        a.poll(Instant::now()).unwrap();
        b.poll(Instant::now()).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    a.connect_to_peer(b.fingerprint()).unwrap();
    let failed = |e: &[NodeEvent]| e.iter().any(|e| matches!(e, NodeEvent::PeerError { error: PeerError::ConnectTimeout, .. }));
    run(&mut a, &mut b, &mut ea, &mut eb, WAIT, "the connect timeout", |ea, _| failed(ea));
    assert!(!channel_open(&ea) && !channel_open(&eb));
}

#[test]
fn wrong_turn_credentials_are_a_typed_event() {
    let coturn = coturn();
    let server = start_server(peerlink::ServerConfig::default());
    let mut a = node(&server.url(), "a", Some((coturn.port, "wrong")));
    let deadline = Instant::now() + WAIT;
    let (local, turn_server, event) = loop {
        assert!(Instant::now() < deadline, "no TURN outcome");
        if let Some(NodeEvent::Turn { local, server, event }) = a.next_event(Duration::from_millis(100)).unwrap() {
            break (local, server, event);
        }
    };
    assert_eq!(event, TurnEvent::Failed { error: TurnError::Unauthorized });
    assert_eq!((local, turn_server), (a.local_addrs()[0], coturn.addr()));
    assert!(a.node().local_candidates().is_empty(), "no relayed candidate");
}

/// coturn grants 10 s allocations: each node refreshes its allocation before it expires, and
/// the connection through it carries a message each way every second well past the first
/// lifetime.
#[test]
fn a_short_allocation_is_refreshed_under_a_live_connection() {
    let coturn = Coturn::start(&["--lt-cred-mech", "--user=u:p", "--realm=peerlink", "--allow-loopback-peers", "--relay-ip=127.0.0.1", "--max-allocate-lifetime=10"]);
    let server = start_server(peerlink::ServerConfig::default());
    let mut a = node(&server.url(), "a", Some((coturn.port, "p")));
    let mut b = node(&server.url(), "b", Some((coturn.port, "p")));
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    run(&mut a, &mut b, &mut ea, &mut eb, WAIT, "both allocations", |ea, eb| allocated(ea) && allocated(eb));
    let lifetime = ea.iter().find_map(|e| match e {
        NodeEvent::Turn { event: TurnEvent::Allocated { lifetime, .. }, .. } => Some(*lifetime),
        _ => None,
    });
    assert_eq!(lifetime, Some(Duration::from_secs(10)), "coturn grants its maximum");
    let allocated_at = Instant::now();
    let (fa, fb) = (a.fingerprint(), b.fingerprint());
    a.connect_to_peer(fb).unwrap();
    run(&mut a, &mut b, &mut ea, &mut eb, WAIT, "the connection through coturn", |ea, eb| channel_open(ea) && channel_open(eb));
    let mut sent = 0;
    while allocated_at.elapsed() < Duration::from_secs(14) {
        a.send(fb, None, &format!("a{sent}")).unwrap();
        b.send(fa, None, &format!("b{sent}")).unwrap();
        sent += 1;
        let n = sent;
        run(&mut a, &mut b, &mut ea, &mut eb, WAIT, "this second's messages", |ea, eb| texts(ea).len() == n && texts(eb).len() == n);
        let pause = Instant::now() + Duration::from_secs(1);
        run(&mut a, &mut b, &mut ea, &mut eb, WAIT, "a second", |_, _| Instant::now() >= pause);
    }
    let refreshed = |events: &[NodeEvent]| events.iter().any(|e| matches!(e, NodeEvent::Turn { event: TurnEvent::Refreshed { .. }, .. }));
    assert!(refreshed(&ea) && refreshed(&eb), "both allocations refreshed");
    let failed = ea.iter().chain(&eb).filter(|e| matches!(e, NodeEvent::Turn { event: TurnEvent::Failed { .. }, .. } | NodeEvent::PeerState { state: PeerState::Disconnected | PeerState::Failed, .. })).count();
    assert_eq!(failed, 0, "nothing failed or disconnected");
    assert_eq!(texts(&eb), (0..sent).map(|i| format!("\"a{i}\"")).collect::<Vec<_>>());
    assert!(sent >= 10, "{sent} seconds of messages");
}

/// A UDP forwarder on 127.0.0.1 in front of coturn that drops everything until opened: the TURN
/// server is unreachable, then reachable, with no stale allocation left behind on coturn (it
/// never saw the first requests).
struct UdpGate {
    addr: std::net::SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpGate {
    fn start(upstream: std::net::SocketAddr) -> UdpGate {
        use std::sync::atomic::Ordering;
        let front = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        front.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
        back.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
        let addr = front.local_addr().unwrap();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (open, stop) = (open.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut client = None;
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Acquire) {
                    if let Ok((n, from)) = front.recv_from(&mut buf) {
                        client = Some(from);
                        if open.load(Ordering::Acquire) {
                            let _ = back.send_to(&buf[..n], upstream);
                        }
                    }
                    if let (Ok((n, _)), Some(c)) = (back.recv_from(&mut buf), client) {
                        let _ = front.send_to(&buf[..n], c);
                    }
                }
            })
        };
        UdpGate { addr, open, stop, thread: Some(thread) }
    }
}

impl Drop for UdpGate {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TURN server that does not answer at first: the allocation fails with a timeout (a typed
/// event), the node tries again after `TURN_RETRY_MIN`, and once the server answers the
/// allocation is made and its relayed candidate offered.
#[test]
fn an_allocation_that_timed_out_is_tried_again_and_made() {
    let coturn = coturn();
    let gate = UdpGate::start(coturn.addr());
    let server = start_server(peerlink::ServerConfig::default());
    let mut config = NodeConfig::with_client(client_config(&server.url(), "a"));
    config.ice_servers = vec![IceServer::turn([format!("turn:{}?transport=udp", gate.addr)], "u", "p")];
    config.ice_transport_policy = IceTransportPolicy::Relay;
    // Give up on an unanswered request after about a second.
    config.turn.rto = Duration::from_millis(100);
    config.turn.max_transmits = 3;
    config.turn.last_wait = 4;
    let mut a = PollNode::new(config, PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap();
    let mut events = Vec::new();
    let deadline = Instant::now() + WAIT;
    let failed_at = loop {
        assert!(Instant::now() < deadline, "no TURN outcome: {events:?}");
        if let Some(e) = a.next_event(Duration::from_millis(50)).unwrap() {
            let failed = matches!(&e, NodeEvent::Turn { event: TurnEvent::Failed { error: TurnError::Timeout { request: "Allocate" } }, .. });
            events.push(e);
            if failed {
                break Instant::now();
            }
        }
    };
    assert!(a.node().local_candidates().is_empty());
    gate.open.store(true, std::sync::atomic::Ordering::Release);
    let deadline = Instant::now() + WAIT;
    let relayed = loop {
        assert!(Instant::now() < deadline, "not allocated after the retry: {events:?}");
        if let Some(e) = a.next_event(Duration::from_millis(50)).unwrap() {
            if let NodeEvent::Turn { event: TurnEvent::Allocated { relayed, .. }, .. } = &e {
                break *relayed;
            }
            events.push(e);
        }
    };
    assert!(failed_at.elapsed() >= peerlink::TURN_RETRY_MIN - Duration::from_millis(50), "not before the retry delay");
    let candidates = a.node().local_candidates();
    assert!(candidates.len() == 1 && candidates[0].contains(&relayed.port().to_string()), "{candidates:?}");
}
