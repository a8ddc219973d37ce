//! The adapter on real sockets: registration, frames, limits, TLS, shutdown.

mod common;

use std::time::Duration;

use common::*;
use peerlink::protocol::{ClientMessage, ServerMessage};
use peerlink_server::{ServerOptions, TlsConfig, spawn};
use tungstenite::Message;

#[test]
fn register_ping_join() {
    let server = spawn(ServerOptions::local()).unwrap();
    assert!(server.url().starts_with("ws://127.0.0.1:"));
    let mut a = connect_registered(&server.url(), 1);
    send(&mut a, &ClientMessage::Ping { id: 2 });
    assert_eq!(recv(&mut a), ServerMessage::Pong { id: 2 });
    send(&mut a, &ClientMessage::Join { id: 3, namespace: "lobby".into(), app_type: None, app_version: None });
    match recv(&mut a) {
        ServerMessage::Joined { id: 3, namespace, total: 0, .. } => assert_eq!(namespace, "lobby"),
        other => panic!("{other:?}"),
    }
    let mut b = connect_registered(&server.url(), 2);
    send(&mut b, &ClientMessage::Join { id: 3, namespace: "lobby".into(), app_type: None, app_version: None });
    match recv(&mut b) {
        ServerMessage::Joined { total: 1, peers, .. } => assert_eq!(peers[0].fingerprint, identity(1).fingerprint()),
        other => panic!("{other:?}"),
    }
    assert!(matches!(recv(&mut a), ServerMessage::PeerJoined { .. }));
    // A relay goes through, and the core sees both sessions.
    let payload = serde_json::value::RawValue::from_string(r#"{"sdp":"x"}"#.into()).unwrap();
    send(&mut b, &ClientMessage::Relay { id: None, to: identity(1).fingerprint(), payload: &payload });
    match recv(&mut a) {
        ServerMessage::Relay { from, payload } => {
            assert_eq!(from, identity(2).fingerprint());
            assert_eq!(payload.get(), r#"{"sdp":"x"}"#);
        }
        other => panic!("{other:?}"),
    }
    let stats = server.stats();
    assert_eq!((stats.connections, stats.active_sessions, stats.namespaces), (2, 2, 1));
    // WebSocket pings are answered by the adapter.
    a.send(Message::Ping(vec![1, 2, 3].into())).unwrap();
    loop {
        match a.read().unwrap() {
            Message::Pong(p) => {
                assert_eq!(&p[..], &[1, 2, 3]);
                break;
            }
            Message::Text(_) => {}
            other => panic!("{other:?}"),
        }
    }
    // A client leaving is seen by the core.
    a.close(None).unwrap();
    while a.read().is_ok() {}
    for _ in 0..100 {
        if server.stats().active_sessions == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.stats().active_sessions, 1);
    assert_eq!(server.stats().connections, 1);
    server.shutdown();
}

#[test]
fn binary_frame_closes_with_1003() {
    let server = spawn(ServerOptions::local()).unwrap();
    let mut ws = connect_registered(&server.url(), 3);
    ws.send(Message::binary(vec![0u8; 10])).unwrap();
    assert_eq!(close_code(&mut ws), 1003);
    // Before registering too.
    let mut ws = connect(&server.url());
    ws.send(Message::binary(vec![1u8])).unwrap();
    assert!(matches!(recv(&mut ws), ServerMessage::Challenge { .. }));
    assert_eq!(close_code(&mut ws), 1003);
}

#[test]
fn oversized_frames_close_with_1009_and_others_keep_working() {
    let server = spawn(ServerOptions::local()).unwrap();
    let mut other = connect_registered(&server.url(), 4);
    // Above the core's limit (64 KiB): the core closes.
    let mut big = connect_registered(&server.url(), 5);
    big.send(Message::text("x".repeat(100 * 1024))).unwrap();
    assert_eq!(close_code(&mut big), 1009);
    // Above tungstenite's hard limit (4x): the adapter closes.
    let mut huge = connect_registered(&server.url(), 6);
    let _ = huge.send(Message::text("y".repeat(1024 * 1024)));
    assert_eq!(close_code(&mut huge), 1009);
    send(&mut other, &ClientMessage::Ping { id: 9 });
    assert_eq!(recv(&mut other), ServerMessage::Pong { id: 9 });
    let mut fresh = connect_registered(&server.url(), 7);
    send(&mut fresh, &ClientMessage::Ping { id: 10 });
    assert_eq!(recv(&mut fresh), ServerMessage::Pong { id: 10 });
    for _ in 0..100 {
        if server.stats().connections == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.stats().connections, 2);
}

#[test]
fn tls() {
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let tls = TlsConfig::from_pem(cert.pem().as_bytes(), signing_key.serialize_pem().as_bytes()).unwrap();
    assert!(TlsConfig::from_pem(b"nope", b"nope").is_err());
    let mut options = ServerOptions::local();
    options.tls = Some(tls);
    let server = spawn(options).unwrap();
    let url = server.url();
    assert_eq!(url, format!("wss://localhost:{}", server.local_addr().port()));

    let config = tls_client_config(cert.der());
    let stream = std::net::TcpStream::connect(server.local_addr()).unwrap();
    let (mut ws, _) = tungstenite::client_tls_with_config(url.as_str(), stream, None, Some(tungstenite::Connector::Rustls(config))).unwrap();
    set_timeout(&ws);
    register(&mut ws, &identity(8), "tls");
    send(&mut ws, &ClientMessage::Ping { id: 2 });
    assert_eq!(recv(&mut ws), ServerMessage::Pong { id: 2 });

    // A plain-text client is refused by the TLS listener but does not disturb it.
    assert!(tungstenite::connect(format!("ws://{}", server.local_addr())).is_err());
    send(&mut ws, &ClientMessage::Ping { id: 3 });
    assert_eq!(recv(&mut ws), ServerMessage::Pong { id: 3 });

    let closer = std::thread::spawn(move || server.shutdown());
    assert_eq!(close_code(&mut ws), 1001);
    closer.join().unwrap();
}

#[test]
fn shutdown_closes_with_1001() {
    let server = spawn(ServerOptions::local()).unwrap();
    let url = server.url();
    let mut a = connect_registered(&url, 11);
    let mut b = connect_registered(&url, 12);
    let mut unregistered = connect(&url);
    assert!(matches!(recv(&mut unregistered), ServerMessage::Challenge { .. }));
    let started = std::time::Instant::now();
    let closer = std::thread::spawn(move || server.shutdown());
    assert_eq!(close_code(&mut a), 1001);
    assert_eq!(close_code(&mut b), 1001);
    assert_eq!(close_code(&mut unregistered), 1001);
    for ws in [&mut a, &mut b, &mut unregistered] {
        while ws.read().is_ok() {}
    }
    closer.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    // Nobody listens any more.
    assert!(tungstenite::connect(&url).is_err());
}

#[test]
fn drop_shuts_down_and_stats_after_stop() {
    let server = spawn(ServerOptions::local()).unwrap();
    let url = server.url();
    let mut a = connect_registered(&url, 13);
    let closer = std::thread::spawn(move || drop(server));
    assert_eq!(close_code(&mut a), 1001);
    closer.join().unwrap();
}

#[test]
fn many_clients_relay() {
    // A small burst through the whole path: 50 clients each relaying 100 frames to the next.
    let server = spawn(ServerOptions::local()).unwrap();
    let url = server.url();
    let n = 50u64;
    let mut clients: Vec<Ws> = (0..n).map(|i| connect_registered(&url, 100 + i)).collect();
    let payload = serde_json::value::RawValue::from_string(r#"{"n":1}"#.into()).unwrap();
    for round in 0..100 {
        for (i, ws) in clients.iter_mut().enumerate() {
            let to = identity(100 + (i as u64 + 1) % n).fingerprint();
            let id = if round == 99 { Some(7) } else { None };
            ws.write(Message::text(ClientMessage::Relay { id, to, payload: &payload }.encode())).unwrap();
        }
        for ws in clients.iter_mut() {
            ws.flush().unwrap();
        }
    }
    for ws in clients.iter_mut() {
        let (mut relays, mut ok) = (0, false);
        while relays < 100 || !ok {
            match recv(ws) {
                ServerMessage::Relay { .. } => relays += 1,
                ServerMessage::Ok { id: 7 } => ok = true,
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(server.stats().outbound_bytes, 0);
}

#[test]
fn slow_consumer_is_closed_with_4001_and_the_sender_keeps_going() {
    let mut options = ServerOptions::local();
    options.config.outbound_queue_bytes = 64 * 1024;
    options.config.rate_limit = peerlink::server::RateLimit { per_second: 100_000, burst: 100_000 };
    let server = spawn(options).unwrap();
    let url = server.url();
    // The sink registers, then stops reading; a tiny receive buffer makes the server's socket
    // fill up after a few frames.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.local_addr().into()).unwrap();
    let tcp: std::net::TcpStream = socket.into();
    let (mut sink, _) = tungstenite::client(url.as_str(), tungstenite::stream::MaybeTlsStream::Plain(tcp)).unwrap();
    set_timeout(&sink);
    register(&mut sink, &identity(40), "sink");
    let mut sender = connect_registered(&url, 41);
    let big = format!(r#"{{"blob":"{}"}}"#, "z".repeat(60 * 1024));
    let payload = serde_json::value::RawValue::from_string(big).unwrap();
    let to = identity(40).fingerprint();
    // Far more than the socket buffers and the 64 KiB cap hold.
    for _ in 0..200 {
        sender.write(Message::text(ClientMessage::Relay { id: None, to, payload: &payload }.encode())).unwrap();
    }
    sender.flush().unwrap();
    // The sink, reading at last, gets what was written before the cap, then close 4001.
    let mut relays = 0;
    let code = loop {
        match sink.read() {
            Ok(Message::Text(_)) => relays += 1,
            Ok(Message::Close(Some(f))) => {
                let _ = sink.flush();
                break u16::from(f.code);
            }
            Ok(_) => {}
            Err(e) => panic!("no close frame after {relays} relays: {e}"),
        }
    };
    assert_eq!(code, 4001, "after {relays} relays");
    assert!(relays < 200, "the cap did not bite: {relays} relays delivered");
    // The sender is unaffected; nothing stays queued for the closed sink.
    send(&mut sender, &ClientMessage::Ping { id: 5 });
    loop {
        match recv(&mut sender) {
            ServerMessage::Pong { id: 5 } => break,
            // Relays to a parked session are refused once its queue is full.
            ServerMessage::Error { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    let mut stats = server.stats();
    for _ in 0..100 {
        if stats.connections == 1 && stats.outbound_bytes == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        stats = server.stats();
    }
    assert_eq!((stats.connections, stats.outbound_bytes), (1, 0), "{stats:?}");
}

#[test]
fn a_goodbye_and_a_close_in_one_read_end_the_connection_without_waiting_for_the_close_timeout() {
    let server = spawn(ServerOptions::local()).unwrap();
    let mut a = connect_registered(&server.url(), 1);
    // Both frames go out in one write: the server reads them in one turn, and the core closes
    // the connection on the first.
    a.write(Message::text(serde_json::to_string(&serde_json::json!({"type": "bye"})).unwrap())).unwrap();
    a.write(Message::Close(None)).unwrap();
    a.flush().unwrap();
    let start = std::time::Instant::now();
    // The server answers the close and ends the socket. The close timeout is 2 s; before the
    // fix nothing more was read from the socket and it sat until the timeout dropped it.
    while a.read().is_ok() {}
    assert!(start.elapsed() < Duration::from_millis(1500), "the connection waited {:?} for the close timeout", start.elapsed());
    server.shutdown();
}
