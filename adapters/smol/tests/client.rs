//! End-to-end tests of the smol adapter against a real `peerlink-server`.

use std::time::Duration;

use futures_lite::FutureExt;
use peerlink_server::{ServerHandle, ServerOptions, TlsConfig};
use peerlink_smol::{Client, ClientConfig, ClientEvent, ConnectOptions, Error, Events, RequestError};
use rand::TryRngCore;
use serde_json::json;

fn server() -> ServerHandle {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    peerlink_server::spawn(ServerOptions::local()).expect("server starts")
}

/// Fails the test instead of hanging.
async fn timeout<T>(what: &str, fut: impl Future<Output = T>) -> T {
    fut.or(async {
        smol::Timer::after(Duration::from_secs(10)).await;
        panic!("timed out waiting for {what}")
    })
    .await
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

#[test]
fn two_peers_end_to_end() {
    let server = server();
    let url = server.url();
    smol::block_on(async {
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
        let (a, b) = timeout(
            "match",
            futures_lite::future::zip(
                alice.match_peers("lobby", Some(json!({ "mode": "duel" })), 2),
                bob.match_peers("lobby", Some(json!({ "mode": "duel" })), 2),
            ),
        )
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

        // A server error comes back as Error::Request.
        let err = timeout("join missing room", bob.join_room("no-such-room")).await.unwrap_err();
        assert!(matches!(err, Error::Request(RequestError::Server { .. })), "{err:?}");

        // Ping measures a round trip.
        let rtt = timeout("ping", alice.ping()).await.unwrap();
        assert!(rtt < Duration::from_secs(5));

        // Replies also appear on the event stream.
        wait_for(&mut alice_events, "pong response", |e| {
            matches!(e, ClientEvent::Response { result: Ok(peerlink_smol::Response::Pong { .. }), .. })
        })
        .await;

        // Disconnecting: the other peer sees it leave at once; the stream ends.
        timeout("disconnect", bob.disconnect()).await;
        let left = wait_for(&mut alice_events, "peer left", |e| matches!(e, ClientEvent::PeerLeft { .. })).await;
        let ClientEvent::PeerLeft { namespace, fingerprint } = left else { unreachable!() };
        assert_eq!(namespace, "lobby");
        assert_eq!(fingerprint, bob.fingerprint());
        wait_for(&mut bob_events, "disconnected", |e| {
            matches!(e, ClientEvent::Disconnected { will_reconnect: false, .. })
        })
        .await;
        assert!(timeout("stream end", bob_events.next()).await.is_none());
        assert!(matches!(bob.ping().await, Err(Error::Closed)));
        assert!(matches!(bob.relay(alice.fingerprint(), &1), Err(Error::Closed)));
        bob.disconnect().await; // a second disconnect returns at once

        alice.disconnect().await;
    });
    server.shutdown();
}

#[test]
fn command_errors_come_back() {
    let server = server();
    let url = server.url();
    smol::block_on(async {
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
    });
}

#[test]
fn identity_and_seed_are_used() {
    let server = server();
    let url = server.url();
    smol::block_on(async {
        let (first, _events) = connect(&url, "first").await;
        // Re-using an identity: the fingerprint is the identity's.
        let identity = peerlink::Identity::generate(&mut rand::rngs::OsRng.unwrap_err());
        let fingerprint = identity.fingerprint();
        let options = ConnectOptions { identity: Some(identity), seed: Some(7), ..Default::default() };
        let (client, _events) = timeout("connect", Client::connect_with(ClientConfig::new(&url), options)).await.unwrap();
        assert_eq!(client.fingerprint(), fingerprint);
        assert_ne!(client.fingerprint(), first.fingerprint());
        client.disconnect().await;
    });
}

#[test]
fn first_attempt_failure_is_reported() {
    // Nothing listens on this port once the listener is dropped.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    smol::block_on(async {
        let err = timeout("connect", Client::connect(ClientConfig::new(format!("ws://{addr}")))).await.unwrap_err();
        assert!(matches!(err, Error::Io(_)), "{err:?}");
        let err = timeout("connect", Client::connect(ClientConfig::new("http://example.invalid"))).await.unwrap_err();
        assert!(matches!(err, Error::WebSocket(_)), "{err:?}");
    });
}

#[test]
fn registration_refused_is_fatal() {
    let mut options = ServerOptions::local();
    options.config.server_id = "real".into();
    let server = peerlink_server::spawn(options).unwrap();
    let url = server.url();
    smol::block_on(async {
        let mut config = ClientConfig::new(&url);
        config.expected_server_id = Some("other".into());
        let err = timeout("connect", Client::connect(config)).await.unwrap_err();
        assert!(matches!(err, Error::Client(peerlink::ClientError::ServerIdMismatch { .. })), "{err:?}");
    });
}

#[test]
fn wss_with_extra_root() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let tls = TlsConfig::from_pem(cert.cert.pem().as_bytes(), cert.signing_key.serialize_pem().as_bytes()).unwrap();
    let mut options = ServerOptions::local();
    options.tls = Some(tls);
    let server = peerlink_server::spawn(options).unwrap();
    let url = server.url();
    assert!(url.starts_with("wss://"));
    smol::block_on(async {
        // Without the test root the certificate is refused.
        let err = timeout("connect", Client::connect(ClientConfig::new(&url))).await.unwrap_err();
        assert!(matches!(err, Error::Io(_) | Error::WebSocket(_)), "{err:?}");

        let options = ConnectOptions { extra_root_certs: vec![cert.cert.der().clone()], ..Default::default() };
        let (client, _events) = timeout("connect", Client::connect_with(ClientConfig::new(&url), options)).await.unwrap();
        timeout("ping", client.ping()).await.unwrap();
        assert!(timeout("join", client.join("secure")).await.unwrap().is_empty());
        client.disconnect().await;
    });
}

#[test]
fn reconnects_after_server_restart() {
    let server = server();
    let addr = server.local_addr();
    let url = server.url();
    smol::block_on(async {
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
    });
}

#[test]
fn driver_ends_when_everything_is_dropped() {
    let server = server();
    let url = server.url();
    smol::block_on(async {
        let (watcher, mut watcher_events) = connect(&url, "watcher").await;
        watcher.join("lobby").await.unwrap();
        let (client, events) = connect(&url, "gone").await;
        client.join("lobby").await.unwrap();
        let fingerprint = client.fingerprint();
        drop(client);
        drop(events);
        // The driver says bye: the watcher sees the peer leave at once.
        wait_for(&mut watcher_events, "peer left", |e| {
            matches!(e, ClientEvent::PeerLeft { fingerprint: f, .. } if *f == fingerprint)
        })
        .await;
        watcher.disconnect().await;
    });
}
