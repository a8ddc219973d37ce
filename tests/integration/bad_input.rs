//! Bad input, one row each: every row gets its documented error code (or close code for fatal
//! ones), a bystander keeps being served throughout, and the server's holdings return to their
//! baseline afterwards.

use std::time::Duration;

use peerlink::protocol::{ClientMessage, ServerMessage};
use peerlink::server::ServerStats;
use peerlink::{ErrorCode, ServerConfig};
use peerlink_tests::*;

enum Expect {
    /// An error frame with this code (and this request id), connection kept.
    Error(ErrorCode, Option<u64>),
    /// The connection is closed with this code.
    Close(u16),
}

fn holdings(s: ServerStats) -> (usize, usize, usize, usize, usize, usize, usize) {
    (s.connections, s.active_sessions, s.parked_sessions, s.namespaces, s.rooms, s.pending_matches, s.parked_bytes)
}

fn config() -> ServerConfig {
    let mut c = ServerConfig::default();
    c.max_namespaces_per_client = 4;
    c.rate_limit = peerlink::server::RateLimit { per_second: 20, burst: 20 };
    c.flood_close_after = 100;
    c.resume_grace = Duration::from_millis(200);
    c
}

fn check(raw: &mut RawClient, row: &str, registered: bool, expect: Expect) {
    match expect {
        Expect::Error(code, id) => match raw.recv() {
            ServerMessage::Error { code: got, id: got_id, message } => {
                assert_eq!((got, got_id), (code, id), "{row}: {message}");
                // The connection is still served.
                if registered {
                    assert!(raw.sync(u64::MAX).is_empty(), "{row}: nothing else arrives");
                } else {
                    raw.send(r#"{"type":"ping","id":3}"#);
                    assert!(matches!(raw.recv(), ServerMessage::Error { id: Some(3), code: ErrorCode::NotRegistered, .. }));
                }
            }
            other => panic!("{row}: expected {code}, got {other:?}"),
        },
        Expect::Close(code) => assert_eq!(raw.expect_close(), code, "{row}"),
    }
}

#[test]
fn every_bad_input_gets_its_documented_answer_and_nobody_else_is_affected() {
    let server = start_server(config());
    let url = server.url();
    let mut bystander = peerlink_blocking::Client::connect(client_config(&url, "bystander")).unwrap();
    bystander.join("calm").unwrap();
    bystander.ping().unwrap();
    let baseline = eventually("a settled baseline", || {
        let s = server.stats();
        (s.outbound_bytes == 0).then_some(s)
    });

    type Row = (&'static str, bool, Box<dyn Fn(&mut RawClient)>, Expect);
    let rows: Vec<Row> = vec![
        ("request before registering", false, Box::new(|r| r.send(r#"{"type":"join","id":5,"namespace":"x"}"#)), Expect::Error(ErrorCode::NotRegistered, Some(5))),
        ("non-JSON", true, Box::new(|r| r.send("hello there")), Expect::Error(ErrorCode::BadJson, None)),
        ("unknown type", true, Box::new(|r| r.send(r#"{"type":"teleport","id":6}"#)), Expect::Error(ErrorCode::UnknownType, Some(6))),
        ("missing field", true, Box::new(|r| r.send(r#"{"type":"join","id":7}"#)), Expect::Error(ErrorCode::MissingField, Some(7))),
        ("wrong type", true, Box::new(|r| r.send(r#"{"type":"join","id":8,"namespace":42}"#)), Expect::Error(ErrorCode::InvalidField, Some(8))),
        ("oversized frame", true, Box::new(|r| r.send(&format!(r#"{{"type":"ping","id":1,"pad":"{}"}}"#, "x".repeat(70 * 1024)))), Expect::Close(1009)),
        ("binary frame", true, Box::new(|r| r.send_binary(b"\x00\x01binary")), Expect::Close(1003)),
        ("too many namespaces", true, Box::new(|r| {
            for i in 0..4 {
                r.send(&ClientMessage::Join { id: 100 + i, namespace: format!("ns{i}").into(), app_type: None, app_version: None }.encode());
                assert!(matches!(r.recv(), ServerMessage::Joined { .. }));
            }
            r.send(&ClientMessage::Join { id: 200, namespace: "ns4".into(), app_type: None, app_version: None }.encode());
        }), Expect::Error(ErrorCode::TooManyNamespaces, Some(200))),
    ];
    for (i, (row, register, send, expect)) in rows.into_iter().enumerate() {
        let mut raw = RawClient::connect(&url);
        if register {
            assert!(matches!(raw.register(&identity(1000 + i as u64)), ServerMessage::Registered { .. }), "{row}");
        }
        send(&mut raw);
        check(&mut raw, row, register, expect);
        bystander.ping().unwrap_or_else(|e| panic!("bystander not served after {row}: {e}"));
    }

    // Flood above the rate limit: one `rate_limited`, frames dropped, then 1008 if it goes on.
    let mut flood = RawClient::connect(&url);
    flood.register(&identity(2000));
    for i in 0..300u64 {
        if !flood.try_send(&ClientMessage::Ping { id: i }.encode()) {
            break;
        }
    }
    let mut pongs = 0;
    let mut limited = 0;
    loop {
        match flood.recv_or_close() {
            Ok(ServerMessage::Pong { .. }) => pongs += 1,
            Ok(ServerMessage::Error { code: ErrorCode::RateLimited, .. }) => limited += 1,
            Ok(other) => panic!("flood: unexpected {other:?}"),
            Err(code) => {
                assert_eq!(code, 1008, "flooding past the limit closes with policy violation");
                break;
            }
        }
    }
    assert!(pongs <= 21, "at most the burst (plus refill) is served: {pongs}");
    assert_eq!(limited, 1, "one rate_limited error per run of dropped frames");
    bystander.ping().expect("bystander served after the flood");

    // Everything the bad clients held is released (parked sessions expire after the grace).
    eventually("holdings back to the baseline", || {
        (holdings(server.stats()) == holdings(baseline)).then_some(())
    });
    server.shutdown();
}
