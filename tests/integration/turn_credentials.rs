//! Short-lived TURN credentials from the signaling server (the TURN REST API scheme) against a
//! real coturn that shares the server's secret (`--use-auth-secret --static-auth-secret`).
//!
//! - Two relay-only nodes ask the server for credentials, allocate on coturn with them, connect
//!   through it and exchange data.
//! - Credentials whose expiry has passed (the server issues them with a TTL of zero) are refused
//!   by coturn: `TurnEvent::Failed { error: Unauthorized }`.
//! - A tampered password, or a user name whose expiry was pushed out, is refused the same way.
//! - A server without a TURN secret answers `turn_unavailable`.
//! - Nodes with `turn_from_server` (blocking and smol) get credentials on registering, allocate
//!   and connect without asking, and ask again before three quarters of the TTL; against a
//!   server without a secret they are told `turn_unavailable` once.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use peerlink::server::TurnSecretConfig;
use peerlink::turn::{TurnError, TurnEvent};
use peerlink::{ErrorCode, IceServer, IceTransportPolicy, NodeConfig, NodeEvent, PeerState, ServerConfig};
use peerlink_blocking::{Error, PollNode, PollOptions, UdpBind};
use peerlink_server::ServerHandle;
use peerlink_tests::coturn::Coturn;
use peerlink_tests::relay_nodes::{allocated, channel_open, run, texts};
use peerlink_tests::{WAIT, client_config, start_server};

const SECRET: &str = "peerlink-test-secret";

fn coturn() -> Coturn {
    let secret = format!("--static-auth-secret={SECRET}");
    Coturn::start(&["--use-auth-secret", &secret, "--realm=peerlink", "--allow-loopback-peers", "--relay-ip=127.0.0.1"])
}

/// The signaling server with the coturn's secret and URL, issuing credentials valid `ttl`.
fn server(coturn: &Coturn, ttl: Duration) -> ServerHandle {
    let mut config = ServerConfig::default();
    config.turn = Some(TurnSecretConfig::new(SECRET, [format!("turn:127.0.0.1:{}?transport=udp", coturn.port)]).ttl(ttl));
    start_server(config)
}

/// A relay-only node without TURN servers of its own.
fn node(url: &str, alias: &str) -> PollNode {
    let mut config = NodeConfig::with_client(client_config(url, alias));
    config.ice_transport_policy = IceTransportPolicy::Relay;
    config.peer.connect_timeout = Duration::from_secs(4);
    PollNode::new(config, PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap()
}

/// Waits for the node's first TURN event.
fn first_turn_event(n: &mut PollNode) -> TurnEvent {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no TURN outcome");
        if let Some(NodeEvent::Turn { event, .. }) = n.next_event(Duration::from_millis(100)).unwrap() {
            return event;
        }
    }
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn relay_only_nodes_connect_through_coturn_with_server_issued_credentials() {
    let coturn = coturn();
    let server = server(&coturn, Duration::from_secs(600));
    let mut a = node(&server.url(), "a");
    let mut b = node(&server.url(), "b");
    for n in [&mut a, &mut b] {
        let issued = n.turn_credentials(WAIT).unwrap();
        assert_eq!(issued.urls, [format!("turn:127.0.0.1:{}?transport=udp", coturn.port)]);
        assert_eq!(issued.ttl, Duration::from_secs(600));
        let expiry = issued.expiry_unix_secs().unwrap();
        assert!(expiry.abs_diff(unix_secs() + 600) <= 2, "expiry {expiry} is 600 s from now");
        assert!(issued.username.ends_with(&format!(":{}", n.fingerprint())));
        assert_eq!(n.add_turn_servers(&issued.ice_server()).unwrap(), 1);
    }
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    run(&mut a, &mut b, &mut ea, &mut eb, WAIT, "both allocations", |ea, eb| allocated(ea) && allocated(eb));
    for n in [&mut a, &mut b] {
        let candidates = n.node().local_candidates();
        assert!(candidates.len() == 1 && candidates[0].contains("typ relay"), "{candidates:?}");
    }
    let (fa, fb) = (a.fingerprint(), b.fingerprint());
    a.connect_to_peer(fb).unwrap();
    run(&mut a, &mut b, &mut ea, &mut eb, WAIT, "the connection through coturn", |ea, eb| channel_open(ea) && channel_open(eb));
    for i in 0..10 {
        a.send(fb, None, &format!("a{i}")).unwrap();
        b.send(fa, None, &format!("b{i}")).unwrap();
    }
    run(&mut a, &mut b, &mut ea, &mut eb, WAIT, "20 messages", |ea, eb| texts(ea).len() == 10 && texts(eb).len() == 10);
    assert_eq!(texts(&eb), (0..10).map(|i| format!("\"a{i}\"")).collect::<Vec<_>>());
    assert_eq!(texts(&ea), (0..10).map(|i| format!("\"b{i}\"")).collect::<Vec<_>>());
    assert_eq!(a.get_peer(&fb).map(|p| p.state), Some(PeerState::Connected));
}

#[test]
fn expired_server_issued_credentials_are_refused_by_coturn() {
    let coturn = coturn();
    let server = server(&coturn, Duration::ZERO);
    let mut a = node(&server.url(), "a");
    let issued = a.turn_credentials(WAIT).unwrap();
    let expiry = issued.expiry_unix_secs().unwrap();
    assert!(expiry <= unix_secs(), "a TTL of zero expires at once");
    // coturn refuses a user name whose expiry is before its clock's second.
    while unix_secs() <= expiry {
        std::thread::sleep(Duration::from_millis(50));
    }
    a.add_turn_servers(&issued.ice_server()).unwrap();
    assert_eq!(first_turn_event(&mut a), TurnEvent::Failed { error: TurnError::Unauthorized });
    assert!(a.node().local_candidates().is_empty(), "no relayed candidate");
}

#[test]
fn tampered_credentials_are_refused_by_coturn() {
    let coturn = coturn();
    let server = server(&coturn, Duration::from_secs(600));
    let mut a = node(&server.url(), "a");
    let issued = a.turn_credentials(WAIT).unwrap();
    let expiry = issued.expiry_unix_secs().unwrap();
    let (_, fingerprint) = issued.username.split_once(':').unwrap();
    // The password of another secret; then the real password under a later expiry.
    let mut forged = issued.credential.clone().into_bytes();
    forged[0] = if forged[0] == b'A' { b'B' } else { b'A' };
    let tampered = [
        IceServer::turn(issued.urls.clone(), issued.username.clone(), String::from_utf8(forged).unwrap()),
        IceServer::turn(issued.urls.clone(), format!("{}:{fingerprint}", expiry + 86_400), issued.credential.clone()),
    ];
    for (i, server_entry) in tampered.iter().enumerate() {
        let mut n = if i == 0 { node(&server.url(), "b") } else { node(&server.url(), "c") };
        n.add_turn_servers(server_entry).unwrap();
        assert_eq!(first_turn_event(&mut n), TurnEvent::Failed { error: TurnError::Unauthorized }, "tampering {i}");
    }
    // The untampered ones work on the same coturn.
    a.add_turn_servers(&issued.ice_server()).unwrap();
    assert!(matches!(first_turn_event(&mut a), TurnEvent::Allocated { .. }));
}

#[test]
fn a_server_without_a_turn_secret_answers_turn_unavailable() {
    let server = start_server(ServerConfig::default());
    let mut a = node(&server.url(), "a");
    match a.turn_credentials(WAIT) {
        Err(Error::Request(e)) => assert_eq!(e.code(), Some(ErrorCode::TurnUnavailable)),
        other => panic!("{other:?}"),
    }
}

/// Waits for the node's next `TurnCredentials` event.
fn next_issued(n: &mut PollNode, within: Duration) -> Result<peerlink::IssuedTurnCredentials, peerlink::client::RequestError> {
    let deadline = Instant::now() + within;
    loop {
        assert!(Instant::now() < deadline, "no TurnCredentials event");
        if let Some(NodeEvent::TurnCredentials(result)) = n.next_event(Duration::from_millis(50)).unwrap() {
            return result;
        }
    }
}

fn auto_node(url: &str, alias: &str) -> PollNode {
    let mut config = NodeConfig::with_client(client_config(url, alias));
    config.ice_transport_policy = IceTransportPolicy::Relay;
    config.turn_from_server = true;
    PollNode::new(config, PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap()
}

#[test]
fn nodes_with_turn_from_server_get_credentials_allocate_connect_and_renew() {
    let coturn = coturn();
    // 12 s credentials: asked again 10 s on (three quarters, but not under 10 s).
    let server = server(&coturn, Duration::from_secs(12));
    let mut a = auto_node(&server.url(), "a");
    let first = next_issued(&mut a, WAIT).unwrap();
    let first_at = Instant::now();
    assert_eq!(first.ttl, Duration::from_secs(12));
    // The other node on smol: the same, through that adapter's driver.
    let url = server.url();
    let (b, mut b_events) = smol::block_on(async move {
        let mut config = NodeConfig::with_client(client_config(&url, "b"));
        config.ice_transport_policy = IceTransportPolicy::Relay;
        config.turn_from_server = true;
        peerlink_smol::Node::connect_with(config, peerlink_smol::ConnectOptions { udp: UdpBind::Loopback, ..Default::default() }).await
    })
    .unwrap();
    let mut ea = Vec::new();
    let deadline = Instant::now() + WAIT;
    // Both allocate with what the server issued (nobody called add_turn_servers) and connect.
    while !allocated(&ea) {
        assert!(Instant::now() < deadline, "a never allocated: {ea:?}");
        ea.extend(a.next_event(Duration::from_millis(20)).unwrap());
    }
    let b_allocated = smol::block_on(async {
        let mut seen = Vec::new();
        while let Some(e) = futures_lite::future::or(async { b_events.next().await }, async {
            smol::Timer::after(WAIT).await;
            None
        })
        .await
        {
            let done = matches!(e, NodeEvent::Turn { event: TurnEvent::Allocated { .. }, .. });
            seen.push(e);
            if done {
                return seen;
            }
        }
        panic!("b never allocated: {seen:?}");
    });
    assert!(b_allocated.iter().any(|e| matches!(e, NodeEvent::TurnCredentials(Ok(_)))), "{b_allocated:?}");
    let fb = b.fingerprint();
    a.connect_to_peer(fb).unwrap();
    let deadline = Instant::now() + WAIT;
    while !channel_open(&ea) {
        assert!(Instant::now() < deadline, "no connection through coturn: {ea:?}");
        ea.extend(a.next_event(Duration::from_millis(20)).unwrap());
    }
    // Renewed before the first ones expire: a new user name with a later expiry.
    let second = loop {
        match a.next_event(Duration::from_millis(50)).unwrap() {
            Some(NodeEvent::TurnCredentials(result)) => break result.unwrap(),
            Some(_) | None => assert!(first_at.elapsed() < Duration::from_secs(20), "not renewed"),
        }
    };
    let waited = first_at.elapsed();
    assert!(waited >= Duration::from_secs(9) && waited < Duration::from_secs(12), "renewed after {waited:?}");
    assert!(second.expiry_unix_secs().unwrap() > first.expiry_unix_secs().unwrap());
    assert_eq!(a.get_peer(&fb).map(|p| p.state), Some(PeerState::Connected));
    smol::block_on(b.close());
}

#[test]
fn turn_from_server_against_a_server_without_a_secret_is_told_once() {
    let server = start_server(ServerConfig::default());
    let mut a = auto_node(&server.url(), "a");
    let e = next_issued(&mut a, WAIT).unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TurnUnavailable));
    // Not asked again (the answer will not change): nothing more within 2 s.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Some(NodeEvent::TurnCredentials(r)) = a.next_event(Duration::from_millis(50)).unwrap() {
            panic!("asked again: {r:?}");
        }
    }
}
