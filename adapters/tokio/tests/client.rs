//! End-to-end tests of the tokio adapter against a real `peerlink-server`.

use std::time::Duration;

use peerlink_server::{ServerHandle, ServerOptions, TlsConfig};
use peerlink_tokio::{Client, ClientConfig, ClientEvent, ConnectOptions, Error, Events, RequestError};
use rand::TryRngCore;
use serde_json::json;

fn server() -> ServerHandle {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    peerlink_server::spawn(ServerOptions::local()).expect("server starts")
}

/// Fails the test instead of hanging.
async fn timeout<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Waits for the first event matching `pred`, skipping the others.
async fn wait_for(events: &mut Events, what: &str, mut pred: impl FnMut(&ClientEvent) -> bool) -> ClientEvent {
    timeout(what, async {
        loop {
            match events.next().await {
                Some(e) if pred(&e) => return e,
                Some(_) => {}
                None => panic!("event stream ended while waiting for {what}"),
            }
        }
    })
    .await
}

async fn connect(url: &str, alias: &str) -> (Client, Events) {
    timeout("connect", Client::connect(ClientConfig::new(url).alias(alias))).await.expect("connects")
}

#[tokio::test]
async fn two_peers_end_to_end() {
    let server = server();
    let url = server.url();
    let (alice, mut alice_events) = connect(&url, "alice").await;
    let (bob, mut bob_events) = connect(&url, "bob").await;
    assert_ne!(alice.fingerprint(), bob.fingerprint());

    // The stream starts with the lifecycle events.
    let reg = wait_for(&mut alice_events, "registered", |e| matches!(e, ClientEvent::Registered { .. })).await;
    let ClientEvent::Registered { fingerprint, alias } = reg else { unreachable!() };
    assert_eq!(fingerprint, alice.fingerprint());
    assert_eq!(alias, "alice");

    // Join: alice first, so bob sees her in the reply and she sees him join.
    let peers = timeout("join", alice.join("lobby")).await.unwrap();
    assert!(peers.is_empty());
    let peers = timeout("join", bob.join_with("lobby", Some("game"), Some("1.0"))).await.unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].fingerprint, alice.fingerprint());
    assert_eq!(peers[0].alias, "alice");
    let joined = wait_for(&mut alice_events, "peer joined", |e| matches!(e, ClientEvent::PeerJoined { .. })).await;
    let ClientEvent::PeerJoined { namespace, peer } = joined else { unreachable!() };
    assert_eq!(namespace, "lobby");
    assert_eq!(peer.fingerprint, bob.fingerprint());
    assert_eq!(peer.app_type.as_deref(), Some("game"));

    // Discover lists the other members.
    let found = timeout("discover", alice.discover("lobby", None)).await.unwrap();
    assert_eq!(found.iter().map(|p| p.fingerprint).collect::<Vec<_>>(), vec![bob.fingerprint()]);

    // Matchmaking: both ask, both get the same group.
    let (a, b) = timeout("match", async {
        tokio::join!(
            alice.match_peers("lobby", Some(json!({ "mode": "duel" })), 2),
            bob.match_peers("lobby", Some(json!({ "mode": "duel" })), 2),
        )
    })
    .await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.session_id, b.session_id);
    assert_eq!(a.peers, b.peers);
    assert_eq!(a.peers.len(), 2);

    // Relay arrives with the verified sender.
    alice.relay(bob.fingerprint(), &json!({ "kind": "offer", "sdp": "v=0" })).unwrap();
    let relay = wait_for(&mut bob_events, "relay", |e| matches!(e, ClientEvent::Relay { .. })).await;
    let ClientEvent::Relay { from, payload } = relay else { unreachable!() };
    assert_eq!(from, alice.fingerprint());
    assert_eq!(payload.to_value(), json!({ "kind": "offer", "sdp": "v=0" }));

    // Broadcast reaches the other member.
    bob.broadcast("lobby", &json!(["hello", 1])).unwrap();
    let b = wait_for(&mut alice_events, "broadcast", |e| matches!(e, ClientEvent::Broadcast { .. })).await;
    let ClientEvent::Broadcast { from, namespace, payload } = b else { unreachable!() };
    assert_eq!(from, bob.fingerprint());
    assert_eq!(namespace, "lobby");
    assert_eq!(payload.to_value(), json!(["hello", 1]));

    // Rooms.
    let room = timeout("create room", alice.create_room("room-1", Some(4), Some(json!({ "map": "dust" }))))
        .await
        .unwrap();
    assert_eq!(room.room_id, "room-1");
    assert_eq!(room.owner, alice.fingerprint());
    assert_eq!(room.max_size, 4);
    let (room, peers) = timeout("join room", bob.join_room("room-1")).await.unwrap();
    assert_eq!(room.owner, alice.fingerprint());
    assert_eq!(room.metadata.map(|m| m.to_value()), Some(json!({ "map": "dust" })));
    assert_eq!(peers.iter().map(|p| p.fingerprint).collect::<Vec<_>>(), vec![alice.fingerprint()]);
    let (info, members) = timeout("room info", alice.room_info("room-1")).await.unwrap();
    assert_eq!(info.room_id, "room-1");
    assert_eq!(members, 2);
    wait_for(&mut alice_events, "room peer joined", |e| {
        matches!(e, ClientEvent::RoomPeerJoined { room_id, peer } if room_id == "room-1" && peer.fingerprint == bob.fingerprint())
    })
    .await;
    // The room has space left, so it is listed.
    let listed = timeout("list rooms", bob.list_rooms(Some("room-"), None)).await.unwrap();
    assert_eq!(listed.iter().map(|r| r.details.room_id.as_str()).collect::<Vec<_>>(), vec!["room-1"]);

    // A server error comes back as Error::Request.
    let err = timeout("join missing room", bob.join_room("no-such-room")).await.unwrap_err();
    assert!(matches!(err, Error::Request(RequestError::Server { .. })), "{err:?}");

    // Ping measures a round trip.
    let rtt = timeout("ping", alice.ping()).await.unwrap();
    assert!(rtt < Duration::from_secs(5));

    // Replies also appear on the event stream.
    wait_for(&mut alice_events, "pong response", |e| {
        matches!(e, ClientEvent::Response { result: Ok(peerlink_tokio::Response::Pong { .. }), .. })
    })
    .await;

    // Disconnecting: the other peer sees it leave at once; the stream ends.
    timeout("disconnect", bob.disconnect()).await;
    let left = wait_for(&mut alice_events, "peer left", |e| matches!(e, ClientEvent::PeerLeft { .. })).await;
    let ClientEvent::PeerLeft { namespace, fingerprint } = left else { unreachable!() };
    assert_eq!(namespace, "lobby");
    assert_eq!(fingerprint, bob.fingerprint());
    wait_for(&mut bob_events, "disconnected", |e| matches!(e, ClientEvent::Disconnected { will_reconnect: false, .. })).await;
    assert!(timeout("stream end", bob_events.next()).await.is_none());
    assert!(matches!(bob.ping().await, Err(Error::Closed)));
    assert!(matches!(bob.relay(alice.fingerprint(), &1), Err(Error::Closed)));
    bob.disconnect().await; // a second disconnect returns at once

    alice.disconnect().await;
    server.shutdown();
}

#[tokio::test]
async fn command_errors_come_back() {
    let server = server();
    let url = server.url();
    let (alice, events) = connect(&url, "alice").await;
    // Dropping the stream is fine: the driver keeps running and replies still arrive.
    drop(events);
    let err = alice.join("").await.unwrap_err();
    assert!(matches!(err, Error::Client(peerlink::ClientError::InvalidInput(_))), "{err:?}");
    let err = alice.broadcast("", &1).unwrap_err();
    assert!(matches!(err, Error::Client(peerlink::ClientError::InvalidInput(_))), "{err:?}");
    assert!(timeout("join", alice.join("lobby")).await.unwrap().is_empty());
    timeout("leave", alice.leave("lobby")).await.unwrap();
    // Clones share one connection.
    let clone = alice.clone();
    assert_eq!(clone.fingerprint(), alice.fingerprint());
    timeout("ping", clone.ping()).await.unwrap();
    // Closing a room that does not exist is a server error.
    let err = timeout("close room", alice.close_room("nope")).await.unwrap_err();
    assert!(matches!(err, Error::Request(RequestError::Server { .. })), "{err:?}");
}

#[tokio::test]
async fn identity_and_seed_are_used() {
    let server = server();
    let url = server.url();
    let (first, _events) = connect(&url, "first").await;
    // Re-using an identity: the fingerprint is the identity's.
    let identity = peerlink::Identity::generate(&mut rand::rngs::OsRng.unwrap_err());
    let fingerprint = identity.fingerprint();
    let options = ConnectOptions { identity: Some(identity), seed: Some(7), ..Default::default() };
    let (client, _events) = timeout("connect", Client::connect_with(ClientConfig::new(&url), options)).await.unwrap();
    assert_eq!(client.fingerprint(), fingerprint);
    assert_ne!(client.fingerprint(), first.fingerprint());
    client.disconnect().await;
}

#[tokio::test]
async fn first_attempt_failure_is_reported() {
    // Nothing listens on this port once the listener is dropped.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let err = timeout("connect", Client::connect(ClientConfig::new(format!("ws://{addr}")))).await.unwrap_err();
    assert!(matches!(err, Error::Io(_)), "{err:?}");
    let err = timeout("connect", Client::connect(ClientConfig::new("http://example.invalid"))).await.unwrap_err();
    assert!(matches!(err, Error::WebSocket(_)), "{err:?}");
}

#[tokio::test]
async fn registration_refused_is_fatal() {
    let mut options = ServerOptions::local();
    options.config.server_id = "real".into();
    let server = peerlink_server::spawn(options).unwrap();
    let url = server.url();
    let mut config = ClientConfig::new(&url);
    config.expected_server_id = Some("other".into());
    let err = timeout("connect", Client::connect(config)).await.unwrap_err();
    assert!(matches!(err, Error::Client(peerlink::ClientError::ServerIdMismatch { .. })), "{err:?}");
}

#[tokio::test]
async fn wss_with_extra_root() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let tls = TlsConfig::from_pem(cert.cert.pem().as_bytes(), cert.signing_key.serialize_pem().as_bytes()).unwrap();
    let mut options = ServerOptions::local();
    options.tls = Some(tls);
    let server = peerlink_server::spawn(options).unwrap();
    let url = server.url();
    assert!(url.starts_with("wss://"));
    // Without the test root the certificate is refused.
    let err = timeout("connect", Client::connect(ClientConfig::new(&url))).await.unwrap_err();
    assert!(matches!(err, Error::Io(_) | Error::WebSocket(_)), "{err:?}");

    let options = ConnectOptions { extra_root_certs: vec![cert.cert.der().clone()], ..Default::default() };
    let (client, _events) = timeout("connect", Client::connect_with(ClientConfig::new(&url), options)).await.unwrap();
    timeout("ping", client.ping()).await.unwrap();
    assert!(timeout("join", client.join("secure")).await.unwrap().is_empty());
    client.disconnect().await;
}

#[tokio::test]
async fn reconnects_after_server_restart() {
    let server = server();
    let addr = server.local_addr();
    let url = server.url();
    let mut config = ClientConfig::new(&url);
    config.reconnect_delay = Duration::from_millis(50);
    config.reconnect_max_delay = Duration::from_millis(200);
    let (client, mut events) = timeout("connect", Client::connect(config)).await.unwrap();
    client.join("lobby").await.unwrap();
    server.shutdown();
    wait_for(&mut events, "disconnected", |e| matches!(e, ClientEvent::Disconnected { will_reconnect: true, .. })).await;
    let mut options = ServerOptions::local();
    options.addr = addr;
    let server = peerlink_server::spawn(options).expect("rebinds the same port");
    wait_for(&mut events, "reconnected", |e| matches!(e, ClientEvent::Reconnected { .. })).await;
    // The namespace was re-joined: a new peer sees the old one.
    let (other, _other_events) = connect(&url, "other").await;
    let peers = timeout("join", other.join("lobby")).await.unwrap();
    assert_eq!(peers.iter().map(|p| p.fingerprint).collect::<Vec<_>>(), vec![client.fingerprint()]);
    client.disconnect().await;
    other.disconnect().await;
    server.shutdown();
}

#[tokio::test]
async fn driver_ends_when_everything_is_dropped() {
    let server = server();
    let url = server.url();
    let (watcher, mut watcher_events) = connect(&url, "watcher").await;
    watcher.join("lobby").await.unwrap();
    let (client, events) = connect(&url, "gone").await;
    client.join("lobby").await.unwrap();
    let fingerprint = client.fingerprint();
    drop(client);
    drop(events);
    // The driver says bye: the watcher sees the peer leave at once.
    wait_for(&mut watcher_events, "peer left", |e| matches!(e, ClientEvent::PeerLeft { fingerprint: f, .. } if *f == fingerprint)).await;
    watcher.disconnect().await;
}

#[tokio::test]
async fn events_are_a_futures_stream() {
    use futures_util::StreamExt;

    let server = server();
    let url = server.url();
    let (client, events) = connect(&url, "streamer").await;
    // Through the `Stream` trait: the lifecycle events come first.
    let mut events = events.boxed();
    let first = timeout("first event", events.next()).await.unwrap();
    assert!(matches!(first, ClientEvent::Connected), "{first:?}");
    let second = timeout("second event", events.next()).await.unwrap();
    assert!(matches!(second, ClientEvent::Registered { .. }), "{second:?}");
    client.disconnect().await;
    // The stream ends with the driver.
    let rest: Vec<ClientEvent> = timeout("stream end", events.collect()).await;
    assert!(matches!(rest.last(), Some(ClientEvent::Disconnected { will_reconnect: false, .. })), "{rest:?}");
}

#[tokio::test]
async fn a_full_stream_holds_the_driver_back_and_loses_nothing() {
    let mut options = ServerOptions::local();
    options.config.rate_limit = peerlink::server::RateLimit { per_second: 100_000, burst: 100_000 };
    let server = peerlink_server::spawn(options).unwrap();
    let url = server.url();
    let (alice, _alice_events) = connect(&url, "alice").await;
    let (bob, mut bob_events) = connect(&url, "bob").await;
    let total = peerlink_tokio::EVENT_CAPACITY + 100;
    for n in 0..total {
        alice.relay(bob.fingerprint(), &json!({ "n": n })).unwrap();
    }
    // The server forwards in order: after alice's pong every relay is on its way to bob.
    timeout("ping", alice.ping()).await.unwrap();
    // Bob reads nothing: his stream fills up and his driver waits, so his requests stall.
    timeout("a stalled request", async {
        while tokio::time::timeout(Duration::from_millis(300), bob.ping()).await.is_ok() {}
    })
    .await;
    let mut buffered = Vec::new();
    while let Some(e) = bob_events.try_next() {
        buffered.push(e);
    }
    assert_eq!(buffered.len(), peerlink_tokio::EVENT_CAPACITY);
    // Draining lets it go on; every relay arrives, in order.
    let mut relays: Vec<serde_json::Value> = buffered
        .into_iter()
        .filter_map(|e| match e {
            ClientEvent::Relay { payload, .. } => Some(payload.to_value()),
            _ => None,
        })
        .collect();
    while relays.len() < total {
        if let ClientEvent::Relay { payload, .. } = timeout("relays", bob_events.next()).await.expect("stream open") {
            relays.push(payload.to_value());
        }
    }
    assert_eq!(relays, (0..total).map(|n| json!({ "n": n })).collect::<Vec<_>>());
    timeout("ping after draining", bob.ping()).await.unwrap();
    alice.disconnect().await;
    bob.disconnect().await;
}
