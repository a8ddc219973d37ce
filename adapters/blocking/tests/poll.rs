//! `PollClient` driven by a fixed-step game loop (no threads) against a real server.

mod common;

use std::time::{Duration, Instant};

use common::{config, server};
use peerlink::client::Response;
use peerlink::{ClientEvent, Identity};
use peerlink_blocking::{Client, PollClient, PollOptions};
use rand::SeedableRng;
use serde_json::json;

#[test]
fn game_loop_registers_joins_and_receives_a_relay() {
    let server = server();
    let mut sender = Client::connect(config(&server.url(), "sender")).unwrap();
    sender.join("game").unwrap();

    let identity = Identity::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(11));
    let expected_fp = identity.fingerprint();
    let options = PollOptions {
        identity: Some(identity),
        seed: Some(5),
        ..Default::default()
    };
    let created = Instant::now();
    let mut net = PollClient::new(config(&server.url(), "looper"), options).unwrap();
    // new() does no blocking I/O.
    assert!(created.elapsed() < Duration::from_millis(500));
    assert_eq!(net.fingerprint(), expected_fp);
    assert!(!net.is_registered());
    assert!(net.poll_timeout().is_some());

    let mut frames = 0u32;
    let mut registered_at = None;
    let mut join = None;
    let mut joined = false;
    let mut relayed = false;
    let mut received = None;
    let start = Instant::now();
    while received.is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "stuck after {frames} frames"
        );
        frames += 1;
        let frame_start = Instant::now();
        net.poll(frame_start).unwrap();
        // poll never blocks for long (no DNS here: an IP address).
        assert!(
            frame_start.elapsed() < Duration::from_millis(200),
            "{:?}",
            frame_start.elapsed()
        );
        while let Some(event) = net.poll_event() {
            match event {
                ClientEvent::Registered { fingerprint, .. } => {
                    assert_eq!(fingerprint, expected_fp);
                    registered_at = Some(frames);
                }
                ClientEvent::Response { request, result } => {
                    assert_eq!(Some(request), join);
                    match result.unwrap() {
                        Response::Joined {
                            namespace, peers, ..
                        } => {
                            assert_eq!(namespace, "game");
                            assert_eq!(peers.len(), 1);
                            assert_eq!(peers[0].fingerprint, sender.fingerprint());
                            joined = true;
                        }
                        other => panic!("{other:?}"),
                    }
                }
                ClientEvent::Relay { from, payload } => received = Some((from, payload)),
                _ => {}
            }
        }
        if net.is_registered() && join.is_none() {
            join = Some(
                net.client()
                    .join(Instant::now(), "game", None, None)
                    .unwrap(),
            );
        }
        if joined && !relayed {
            // The other side is a blocking client on the same thread.
            sender
                .relay(net.fingerprint(), &json!({ "move": "e4" }))
                .unwrap();
            relayed = true;
        }
        std::thread::sleep(Duration::from_millis(16));
    }
    let (from, payload) = received.unwrap();
    assert_eq!(from, sender.fingerprint());
    assert_eq!(payload.to_value(), json!({ "move": "e4" }));
    assert!(registered_at.is_some());
    assert!(net.last_error().is_none(), "{:?}", net.last_error());

    // The sender sees the loop client leave when it is dropped.
    drop(net);
    common::wait_for(&mut sender, Duration::from_secs(5), |e| {
        matches!(e, ClientEvent::PeerLeft { .. })
    });
}

#[test]
fn game_loop_survives_a_server_restart_without_blocking() {
    // The server goes away: the poll client reports Disconnected and keeps reconnecting, while
    // every poll stays short.
    let server = server();
    let url = server.url();
    let mut cfg = config(&url, "looper");
    cfg.reconnect_delay = Duration::from_millis(50);
    cfg.reconnect_max_delay = Duration::from_millis(100);
    let mut net = PollClient::new(cfg, PollOptions::default()).unwrap();
    let start = Instant::now();
    while !net.is_registered() {
        assert!(start.elapsed() < Duration::from_secs(5));
        net.poll(Instant::now()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    server.shutdown();
    let mut saw_disconnect = false;
    let mut saw_reconnecting = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        let t = Instant::now();
        net.poll(t).unwrap();
        assert!(t.elapsed() < Duration::from_millis(200));
        while let Some(e) = net.poll_event() {
            match e {
                ClientEvent::Disconnected {
                    code,
                    will_reconnect,
                } => {
                    assert!(will_reconnect);
                    // The first one carries the server's close code (1001 going away).
                    if !saw_disconnect {
                        assert_eq!(code, Some(1001));
                    }
                    saw_disconnect = true;
                }
                ClientEvent::Reconnecting { .. } => saw_reconnecting += 1,
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(16));
    }
    assert!(saw_disconnect);
    assert!(saw_reconnecting >= 2, "{saw_reconnecting}");
    assert!(!net.is_registered());
}
