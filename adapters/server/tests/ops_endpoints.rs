//! The operations endpoints over real sockets: `/healthz` and `/metrics` on the signaling port
//! next to real WebSocket clients, the counters moving with their traffic, bad HTTP requests
//! refused without disturbing anyone, the separate metrics listener, and the binary's JSON logs.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use peerlink::protocol::{ClientMessage, ErrorCode, ServerMessage};
use peerlink::server::RateLimit;
use peerlink_server::{ServerOptions, spawn};
use serde_json::value::RawValue;
use tungstenite::Message;

/// Scrapes `/metrics`: every sample by its series (`name{labels}`).
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let r = get(addr, "/metrics");
    let body = String::from_utf8(r.body.clone()).unwrap();
    assert_eq!(r.status, 200, "{body}");
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    assert_eq!(r.header("content-length"), Some(body.len().to_string().as_str()));
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap_or_else(|_| panic!("bad sample {l}")))
        })
        .collect()
}

fn health(addr: SocketAddr) -> serde_json::Value {
    let r = get(addr, "/healthz");
    assert_eq!((r.status, r.header("content-type")), (200, Some("application/json")), "{:?}", r.body);
    serde_json::from_slice(&r.body).unwrap()
}

/// How much each series grew from `before` to `after`.
fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> f64 {
    let get = |m: &HashMap<String, f64>| *m.get(series).unwrap_or_else(|| panic!("no {series}"));
    get(after) - get(before)
}

fn relay(from: &mut Ws, to: &peerlink::Fingerprint, id: Option<u64>, n: u32) {
    let payload = RawValue::from_string(n.to_string()).unwrap();
    send(from, &ClientMessage::Relay { id, to: *to, payload: &payload });
}

fn expect_relay(ws: &mut Ws, n: u32) {
    match recv(ws) {
        ServerMessage::Relay { payload, .. } => assert_eq!(payload.to_value(), serde_json::json!(n)),
        other => panic!("expected a relay, got {other:?}"),
    }
}

fn error_code(ws: &mut Ws) -> ErrorCode {
    match recv(ws) {
        ServerMessage::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn endpoints_share_the_signaling_port_and_follow_real_traffic() {
    let mut options = ServerOptions::local();
    // A burst of 10 and a slow refill: the flooding client below is limited for sure.
    options.config.rate_limit = RateLimit { per_second: 1, burst: 10 };
    options.config.server_id = "ops-test".into();
    let server = spawn(options).unwrap();
    let addr = server.local_addr();
    let url = server.url();

    let h = health(addr);
    assert_eq!((h["status"].as_str(), h["connections"].as_u64(), h["sessions"].as_u64()), (Some("ok"), Some(0), Some(0)));
    assert!(h["uptime_seconds"].as_f64().unwrap() >= 0.0);
    let before = scrape(addr);
    assert_eq!(before["peerlink_connections_open"], 0.0);
    assert!(before.contains_key(&format!(
        "peerlink_info{{server_id=\"ops-test\",version=\"{}\",protocol=\"1\"}}",
        env!("CARGO_PKG_VERSION")
    )));

    // Three real clients: a relays to b (with and without an id), c sends bad frames and floods.
    let mut a = connect_registered(&url, 1);
    let mut b = connect_registered(&url, 2);
    let mut c = connect_registered(&url, 3);
    let fb = identity(2).fingerprint();
    relay(&mut a, &fb, Some(5), 1);
    assert_eq!(recv(&mut a), ServerMessage::Ok { id: 5 });
    expect_relay(&mut b, 1);
    relay(&mut a, &fb, None, 2);
    expect_relay(&mut b, 2);
    c.send(Message::text("this is not json")).unwrap();
    assert_eq!(error_code(&mut c), ErrorCode::BadJson);
    c.send(Message::text(r#"{"type":"teleport","id":4}"#)).unwrap();
    assert_eq!(error_code(&mut c), ErrorCode::UnknownType);
    // c has used 3 of its 10 tokens: of 12 pings, 7 pass and 5 are dropped (one refill during
    // the test would make it 8 and 4), the first drop answered with rate_limited.
    for i in 0..12 {
        send(&mut c, &ClientMessage::Ping { id: 100 + i });
    }
    let mut pongs = 0;
    loop {
        match recv(&mut c) {
            ServerMessage::Pong { .. } => pongs += 1,
            ServerMessage::Error { code: ErrorCode::RateLimited, .. } => break,
            other => panic!("{other:?}"),
        }
    }
    assert!((7..=8).contains(&pongs), "{pongs} pongs");

    let after = scrape(addr);
    assert_eq!(after["peerlink_connections_open"], 3.0);
    assert_eq!(after["peerlink_sessions_registered"], 3.0);
    for (series, grew) in [
        ("peerlink_connections_accepted_total", 3.0),
        ("peerlink_registrations_total", 3.0),
        ("peerlink_relays_total", 2.0),
        ("peerlink_messages_received_total{type=\"register\"}", 3.0),
        ("peerlink_messages_received_total{type=\"relay\"}", 2.0),
        ("peerlink_messages_received_total{type=\"unknown\"}", 1.0),
        ("peerlink_messages_received_total{type=\"invalid\"}", 1.0),
        ("peerlink_errors_sent_total{code=\"bad_json\"}", 1.0),
        ("peerlink_errors_sent_total{code=\"unknown_type\"}", 1.0),
        ("peerlink_errors_sent_total{code=\"rate_limited\"}", 1.0),
        ("peerlink_closes_total{code=\"1008\"}", 0.0),
    ] {
        assert_eq!(delta(&before, &after, series), grew, "{series}");
    }
    let pings = delta(&before, &after, "peerlink_messages_received_total{type=\"ping\"}");
    let limited = delta(&before, &after, "peerlink_rate_limited_frames_total");
    assert_eq!(pings, pongs as f64);
    assert_eq!(pings + limited, 12.0);
    assert!(after["peerlink_uptime_seconds"] >= before["peerlink_uptime_seconds"]);
    let h = health(addr);
    assert_eq!((h["connections"].as_u64(), h["sessions"].as_u64()), (Some(3), Some(3)));

    // Bad requests to the endpoints: each gets a clear 4xx and nothing else changes.
    for (request, status) in [
        (&b"GET /metrics\r\n\r\n"[..], 400),
        (b"GET /healthz HTTP/1.1 extra\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        (b"DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"GET /metricz HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    ] {
        let r = raw_request(addr, request);
        assert_eq!(r.status, status, "{:?}: {:?}", String::from_utf8_lossy(request), String::from_utf8_lossy(&r.body));
        if status == 405 {
            assert_eq!(r.header("allow"), Some("GET, HEAD"));
        }
    }
    let huge = format!("GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(10_000));
    assert_eq!(raw_request(addr, huge.as_bytes()).status, 431);
    // A request that never completes its head does not hold anything up either.
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled.write_all(b"GET /metr").unwrap();
    // HEAD: the headers alone.
    let r = raw_request(addr, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((r.status, r.body.as_slice()), (200, &b""[..]));
    assert!(r.header("content-length").unwrap().parse::<usize>().unwrap() > 10);

    // The WebSocket clients still work, and the HTTP requests were not counted as connections.
    relay(&mut b, &identity(1).fingerprint(), Some(6), 3);
    assert_eq!(recv(&mut b), ServerMessage::Ok { id: 6 });
    expect_relay(&mut a, 3);
    std::thread::sleep(Duration::from_millis(1100)); // a token for c
    send(&mut c, &ClientMessage::Ping { id: 7 });
    assert_eq!(recv(&mut c), ServerMessage::Pong { id: 7 });
    let last = scrape(addr);
    assert_eq!(last["peerlink_connections_open"], 3.0);
    assert_eq!(delta(&after, &last, "peerlink_connections_accepted_total"), 0.0);
    assert_eq!(delta(&after, &last, "peerlink_relays_total"), 1.0);
    assert_eq!(delta(&after, &last, "peerlink_disconnects_total"), 0.0);
    assert_eq!(server.stats().connections, 3);
    drop(stalled);

    // A client that goes away is counted.
    a.close(None).unwrap();
    let _ = a.flush();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while scrape(addr)["peerlink_connections_open"] != 2.0 {
        assert!(std::time::Instant::now() < deadline, "the closed client is still counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(delta(&last, &scrape(addr), "peerlink_disconnects_total"), 1.0);
}

#[test]
fn a_separate_metrics_listener_keeps_metrics_private() {
    let mut options = ServerOptions::local();
    options.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    let server = spawn(options).unwrap();
    let addr = server.local_addr();
    let ops = server.metrics_addr().expect("a metrics listener");
    assert_ne!(ops.port(), addr.port());
    assert_ne!(ops.port(), 0);

    // The signaling port: /healthz for load balancers, no /metrics.
    assert_eq!(get(addr, "/metrics").status, 404);
    assert_eq!(health(addr)["status"], "ok");
    // The metrics listener: both, nothing else, and no WebSocket.
    let before = scrape(ops);
    assert_eq!(health(ops)["connections"], 0);
    assert_eq!(get(ops, "/").status, 404);
    assert_eq!(get(ops, "/index.html").status, 404);
    assert_eq!(raw_request(ops, b"PUT /metrics HTTP/1.1\r\n\r\n").status, 405);
    assert!(tungstenite::connect(format!("ws://{ops}")).is_err(), "no signaling on the metrics listener");

    let mut a = connect_registered(&server.url(), 1);
    let mut b = connect_registered(&server.url(), 2);
    relay(&mut a, &identity(2).fingerprint(), None, 9);
    expect_relay(&mut b, 9);
    let after = scrape(ops);
    assert_eq!(delta(&before, &after, "peerlink_registrations_total"), 2.0);
    assert_eq!(delta(&before, &after, "peerlink_relays_total"), 1.0);
    assert_eq!(after["peerlink_connections_open"], 2.0);
    assert_eq!(health(ops)["sessions"], 2);
    server.shutdown();
    assert!(TcpStream::connect(ops).is_err(), "the metrics listener closes on shutdown");
}

#[test]
fn the_binary_logs_json_and_serves_metrics_where_asked() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_peerlink-server"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("bad line {line:?}")).to_owned();
    // Every log line is one JSON object; the metrics address is in one of them.
    let mut logs = BufReader::new(child.stderr.take().unwrap());
    let mut metrics_url = None;
    let mut seen = Vec::new();
    while metrics_url.is_none() {
        let mut log = String::new();
        if logs.read_line(&mut log).unwrap() == 0 {
            break;
        }
        let v: serde_json::Value = serde_json::from_str(&log).unwrap_or_else(|e| panic!("not JSON ({e}): {log}"));
        assert!(v["timestamp"].is_string() && v["level"] == "INFO", "{log}");
        if v["message"] == "operations endpoints on a separate listener" {
            metrics_url = v["metrics"].as_str().map(str::to_owned);
        }
        seen.push(log);
    }
    let metrics_url = metrics_url.unwrap_or_else(|| panic!("no metrics address logged: {seen:?}"));
    let ops: SocketAddr = metrics_url.strip_prefix("http://").and_then(|r| r.strip_suffix("/metrics")).unwrap().parse().unwrap();
    let signaling: SocketAddr = url.strip_prefix("ws://").unwrap().parse().unwrap();
    let mut a = connect_registered(&url, 1);
    let m = scrape(ops);
    let h = health(signaling);
    let on_signaling = get(signaling, "/metrics").status;
    send(&mut a, &ClientMessage::Ping { id: 1 });
    let pong = recv(&mut a);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(m["peerlink_registrations_total"], 1.0);
    assert_eq!(h["connections"], 1);
    assert_eq!(on_signaling, 404);
    assert_eq!(pong, ServerMessage::Pong { id: 1 });
}
