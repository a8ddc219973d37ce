//! The blocking `Client` against a real `peerlink-server`.

mod common;

use std::time::{Duration, Instant};

use common::{config, server, wait_for};
use peerlink::{ClientEvent, ErrorCode};
use peerlink_blocking::{Client, Error, PollOptions};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(5);

#[test]
fn relay_and_broadcast_arrive_from_the_right_peer() {
    let server = server();
    let mut a = Client::connect(config(&server.url(), "alice")).unwrap();
    let mut b = Client::connect(config(&server.url(), "bob")).unwrap();
    assert_ne!(a.fingerprint(), b.fingerprint());
    assert!(a.is_registered() && b.is_registered());

    let peers = a.join("lobby").unwrap();
    assert!(peers.is_empty(), "{peers:?}");
    let peers = b.join_with("lobby", Some("game"), Some("1.0")).unwrap();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].fingerprint, a.fingerprint());
    assert_eq!(peers[0].alias, "alice");

    // Alice hears Bob join.
    let bob = b.fingerprint();
    let e = wait_for(&mut a, WAIT, |e| {
        matches!(e, ClientEvent::PeerJoined { .. })
    });
    match e {
        ClientEvent::PeerJoined { namespace, peer } => {
            assert_eq!(namespace, "lobby");
            assert_eq!(peer.fingerprint, bob);
            assert_eq!(peer.app_type.as_deref(), Some("game"));
        }
        other => panic!("{other:?}"),
    }

    // Relay a -> b.
    a.relay(bob, &json!({ "offer": "sdp", "n": 1 })).unwrap();
    match wait_for(&mut b, WAIT, |e| matches!(e, ClientEvent::Relay { .. })) {
        ClientEvent::Relay { from, payload } => {
            assert_eq!(from, a.fingerprint());
            assert_eq!(payload.to_value(), json!({ "offer": "sdp", "n": 1 }));
        }
        other => panic!("{other:?}"),
    }

    // Broadcast b -> a (not echoed to b).
    b.broadcast("lobby", &json!(["hi", 2])).unwrap();
    match wait_for(&mut a, WAIT, |e| matches!(e, ClientEvent::Broadcast { .. })) {
        ClientEvent::Broadcast {
            from,
            namespace,
            payload,
        } => {
            assert_eq!(from, bob);
            assert_eq!(namespace, "lobby");
            assert_eq!(payload.to_value(), json!(["hi", 2]));
        }
        other => panic!("{other:?}"),
    }

    let found = a.discover("lobby", Some(10)).unwrap();
    // The requester is not listed.
    assert_eq!(
        found.iter().map(|p| p.fingerprint).collect::<Vec<_>>(),
        vec![bob],
        "{found:?}"
    );

    // Leaving is seen by the other side.
    b.leave("lobby").unwrap();
    let e = wait_for(&mut a, WAIT, |e| matches!(e, ClientEvent::PeerLeft { .. }));
    assert!(matches!(e, ClientEvent::PeerLeft { fingerprint, .. } if fingerprint == bob));

    a.disconnect();
    b.disconnect();
    server.shutdown();
}

#[test]
fn rooms_create_join_info_kick_close() {
    let server = server();
    let mut owner = Client::connect(config(&server.url(), "owner")).unwrap();
    let mut guest = Client::connect(config(&server.url(), "guest")).unwrap();

    let room = owner
        .create_room("arena", Some(4), Some(json!({ "map": "dust" })))
        .unwrap();
    assert_eq!(room.room_id, "arena");
    assert_eq!(room.owner, owner.fingerprint());
    assert_eq!(room.max_size, 4);
    assert_eq!(
        room.metadata.as_ref().map(|m| m.to_value()),
        Some(json!({ "map": "dust" }))
    );

    let (joined, peers) = guest.join_room("arena").unwrap();
    assert_eq!(joined.owner, owner.fingerprint());
    assert_eq!(
        peers.iter().map(|p| p.fingerprint).collect::<Vec<_>>(),
        vec![owner.fingerprint()]
    );

    let (info, members) = owner.room_info("arena").unwrap();
    assert_eq!(info.room_id, "arena");
    assert_eq!(members, 2);

    // Only the owner may kick.
    let err = guest.kick("arena", owner.fingerprint()).unwrap_err();
    assert!(
        matches!(err, Error::Request(ref e) if e.code().is_some()),
        "{err:?}"
    );

    let guest_fp = guest.fingerprint();
    owner.kick("arena", guest_fp).unwrap();
    wait_for(
        &mut guest,
        WAIT,
        |e| matches!(e, ClientEvent::Kicked { room_id } if room_id == "arena"),
    );
    let (_, members) = owner.room_info("arena").unwrap();
    assert_eq!(members, 1);

    // Join again, then the owner closes the room.
    guest.join_room("arena").unwrap();
    owner.close_room("arena").unwrap();
    wait_for(
        &mut guest,
        WAIT,
        |e| matches!(e, ClientEvent::RoomClosed { room_id } if room_id == "arena"),
    );

    // A room that does not exist is a server error carried by the request.
    let err = guest.join_room("nowhere").unwrap_err();
    match err {
        Error::Request(e) => assert_eq!(e.code(), Some(ErrorCode::RoomNotFound), "{e:?}"),
        other => panic!("{other:?}"),
    }
    guest.leave_room("nowhere").ok();
}

#[test]
fn ping_measures_a_round_trip() {
    let server = server();
    let mut a = Client::connect(config(&server.url(), "pinger")).unwrap();
    for _ in 0..3 {
        let rtt = a.ping().unwrap();
        assert!(rtt < Duration::from_secs(2), "{rtt:?}");
    }
}

#[test]
fn events_survive_requests_and_next_event_times_out() {
    let server = server();
    let mut a = Client::connect(config(&server.url(), "a")).unwrap();
    let mut b = Client::connect(config(&server.url(), "b")).unwrap();
    // The connect events stay queued.
    let first: Vec<ClientEvent> = a.events().collect();
    assert!(
        first
            .iter()
            .any(|e| matches!(e, ClientEvent::Registered { .. })),
        "{first:?}"
    );

    a.join("ns").unwrap();
    b.join("ns").unwrap();
    for i in 0..20 {
        b.relay(a.fingerprint(), &json!({ "i": i })).unwrap();
    }
    // Requests made while relays arrive do not lose them.
    a.ping().unwrap();
    a.discover("ns", None).unwrap();
    let mut got = Vec::new();
    while got.len() < 20 {
        match a.next_event(WAIT).unwrap() {
            Some(ClientEvent::Relay { payload, .. }) => {
                got.push(payload.to_value()["i"].as_i64().unwrap())
            }
            Some(_) => {}
            None => panic!("only {got:?}"),
        }
    }
    assert_eq!(got, (0..20).collect::<Vec<_>>());

    // Nothing more: next_event waits about its timeout and returns None.
    let start = Instant::now();
    let mut extra = Vec::new();
    while let Some(e) = a.next_event(Duration::from_millis(200)).unwrap() {
        extra.push(e);
        assert!(start.elapsed() < WAIT, "{extra:?}");
    }
    assert!(start.elapsed() >= Duration::from_millis(190));

    // After disconnect: the Disconnected event, then Closed.
    a.disconnect();
    let mut saw_disconnected = false;
    loop {
        match a.next_event(WAIT) {
            Ok(Some(ClientEvent::Disconnected {
                will_reconnect: false,
                ..
            })) => saw_disconnected = true,
            Ok(Some(_)) => {}
            Ok(None) => panic!("expected Closed"),
            Err(Error::Closed) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(saw_disconnected);
    assert!(matches!(a.ping(), Err(Error::Closed)));
    // b sees a leave at once (bye).
    wait_for(&mut b, WAIT, |e| matches!(e, ClientEvent::PeerLeft { .. }));
}

#[test]
fn connect_fails_fast_on_a_refused_port() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let start = Instant::now();
    let err = Client::connect(config(&format!("ws://127.0.0.1:{port}"), "x")).unwrap_err();
    assert!(
        matches!(err, Error::Io(ref e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "{err:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn connect_times_out_when_the_server_never_answers() {
    // Accepted by the kernel's backlog, never answered.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(&format!("ws://{}", listener.local_addr().unwrap()), "x");
    cfg.connect_timeout = Duration::from_millis(300);
    let start = Instant::now();
    let err = Client::connect(cfg).unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn bad_urls_fail() {
    let err = Client::connect(config("http://127.0.0.1:1", "x")).unwrap_err();
    assert!(matches!(err, Error::WebSocket(_)), "{err:?}");
    let err = Client::connect(config("ws://no-such-host.invalid:80", "x")).unwrap_err();
    assert!(matches!(err, Error::Io(_)), "{err:?}");
}

#[test]
fn wss_with_an_extra_root() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let tls = peerlink_server::TlsConfig::from_pem(
        cert.cert.pem().as_bytes(),
        cert.signing_key.serialize_pem().as_bytes(),
    )
    .unwrap();
    let mut options = peerlink_server::ServerOptions::local();
    options.tls = Some(tls);
    let server = peerlink_server::spawn(options).unwrap();
    let url = server.url();
    assert!(url.starts_with("wss://"), "{url}");

    // Untrusted without the extra root.
    let err = Client::connect(config(&url, "x")).unwrap_err();
    assert!(matches!(err, Error::Io(_) | Error::WebSocket(_)), "{err:?}");

    let options = PollOptions {
        extra_root_certs: vec![cert.cert.der().clone()],
        ..Default::default()
    };
    let mut a = Client::connect_with(config(&url, "tls-a"), options).unwrap();
    let options = PollOptions {
        extra_root_certs: vec![cert.cert.der().clone()],
        seed: Some(7),
        ..Default::default()
    };
    let mut b = Client::connect_with(config(&url, "tls-b"), options).unwrap();
    a.join("secure").unwrap();
    b.join("secure").unwrap();
    a.relay(b.fingerprint(), "over tls").unwrap();
    match wait_for(&mut b, WAIT, |e| matches!(e, ClientEvent::Relay { .. })) {
        ClientEvent::Relay { from, payload } => {
            assert_eq!(from, a.fingerprint());
            assert_eq!(payload.get(), "\"over tls\"");
        }
        other => panic!("{other:?}"),
    }
    a.ping().unwrap();
}

#[test]
fn requests_time_out_with_request_timeout() {
    let server = server();
    let mut cfg = config(&server.url(), "lonely");
    cfg.request_timeout = Duration::from_millis(300);
    let mut a = Client::connect(cfg).unwrap();
    // A group of two with nobody else: the server holds the request; the client gives up.
    let start = Instant::now();
    let err = a.match_peers("mm", None, 2).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Request(peerlink::client::RequestError::TimedOut)
        ),
        "{err:?}"
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // Still usable afterwards.
    a.ping().unwrap();
}

#[test]
fn match_peers_forms_a_group_with_a_poll_client() {
    let server = server();
    let mut a =
        peerlink_blocking::PollClient::new(config(&server.url(), "a"), PollOptions::default())
            .unwrap();
    let mut b = Client::connect(config(&server.url(), "b")).unwrap();
    let deadline = Instant::now() + WAIT;
    while !a.is_registered() {
        assert!(Instant::now() < deadline);
        a.poll(Instant::now()).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let criteria = json!({ "mode": "duel" });
    let request = a
        .client()
        .match_peers(Instant::now(), "mm", Some(&criteria), 2)
        .unwrap();
    a.poll(Instant::now()).unwrap(); // sends it
    std::thread::sleep(Duration::from_millis(50)); // let the server queue it first
    let group = b.match_peers("mm", Some(criteria), 2).unwrap();
    assert_eq!(group.peers.len(), 2);
    let mut fps: Vec<_> = group.peers.iter().map(|p| p.fingerprint).collect();
    fps.sort();
    let mut want = vec![a.fingerprint(), b.fingerprint()];
    want.sort();
    assert_eq!(fps, want);
    loop {
        assert!(Instant::now() < deadline, "a never matched");
        a.poll(Instant::now()).unwrap();
        if let Some(ClientEvent::Response { request: r, result }) =
            std::iter::from_fn(|| a.poll_event())
                .find(|e| matches!(e, ClientEvent::Response { .. }))
        {
            assert_eq!(r, request);
            match result.unwrap() {
                peerlink::client::Response::Matched(m) => {
                    assert_eq!(m.session_id, group.session_id)
                }
                other => panic!("{other:?}"),
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn many_relays_across_polls_arrive_in_order() {
    // More frames than one poll reads (256), with payloads big enough to need several reads.
    let server = server();
    let mut a = Client::connect(config(&server.url(), "a")).unwrap();
    let mut b = Client::connect(config(&server.url(), "b")).unwrap();
    a.join("bulk").unwrap();
    b.join("bulk").unwrap();
    let filler = "x".repeat(1000);
    for i in 0..350 {
        b.relay(a.fingerprint(), &json!({ "i": i, "f": filler }))
            .unwrap();
    }
    b.ping().unwrap(); // everything before it was written
    let mut next = 0;
    while next < 350 {
        match a.next_event(WAIT).unwrap() {
            Some(ClientEvent::Relay { from, payload }) => {
                assert_eq!(from, b.fingerprint());
                assert_eq!(payload.to_value()["i"], json!(next));
                next += 1;
            }
            Some(_) => {}
            None => panic!("stopped at {next}"),
        }
    }
}
