//! The encrypted NDJSON stream over real TCP on 127.0.0.1, through a proxy that cuts every
//! connection twice mid-stream: the dialer reconnects on its backoff schedule, both sides
//! resume the session, and every message arrives once, in order, both ways. A dialer started
//! before its listener keeps dialing until it is up.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use peerlink::e2e::stream::{StreamConfig, StreamEvent};
use peerlink_blocking::stream::EncryptedTcp;
use peerlink_tests::{CutProxy, identity};
use serde_json::json;

const N: u64 = 300;

fn config() -> StreamConfig {
    let mut c = StreamConfig::default();
    c.initial_backoff = Duration::from_millis(50);
    c.max_backoff = Duration::from_millis(200);
    c
}

#[test]
fn messages_survive_two_cuts_exactly_once_in_order_both_ways() {
    let (a_id, b_id) = (identity(71), identity(72));
    let (a_fp, b_fp) = (a_id.fingerprint(), b_id.fingerprint());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = CutProxy::start(listener.local_addr().unwrap());
    let acceptor = std::thread::spawn(move || {
        let mut b = EncryptedTcp::accept(listener, b_id, a_fp, config()).unwrap();
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while (got.len() as u64) < N {
            assert!(Instant::now() < deadline, "b got {} of {N}", got.len());
            if let Some(StreamEvent::Message(v)) = b.next_event(Duration::from_millis(100)).unwrap() {
                let n = v["n"].as_u64().unwrap();
                b.send(&json!({ "echo": n })).unwrap();
                got.push(n);
            }
        }
        // Let the last echoes go out and be acknowledged.
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until && b.core().unacked().0 > 0 {
            let _ = b.next_event(Duration::from_millis(50)).unwrap();
        }
        got
    });
    let mut a = EncryptedTcp::connect(proxy.addr(), a_id, b_fp, config());
    let mut echoes = Vec::new();
    let mut established = 0;
    let mut resumed = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = 0u64;
    while (echoes.len() as u64) < N {
        assert!(Instant::now() < deadline, "a got {} echoes of {N}", echoes.len());
        if sent < N && a.core().unacked().0 < 64 {
            sent += 1;
            a.send(&json!({ "n": sent, "secret": "plaintext-marker" })).unwrap();
            if sent == N / 3 || sent == 2 * N / 3 {
                proxy.cut();
            }
        }
        match a.next_event(Duration::from_millis(5)).unwrap() {
            Some(StreamEvent::Message(v)) => echoes.push(v["echo"].as_u64().unwrap()),
            Some(StreamEvent::Established { .. }) => established += 1,
            Some(StreamEvent::Resumed { .. }) => resumed += 1,
            Some(StreamEvent::Error(e)) => panic!("stream error: {e}"),
            _ => {}
        }
    }
    let got = acceptor.join().unwrap();
    assert_eq!(got, (1..=N).collect::<Vec<_>>(), "b: exactly once, in order");
    assert_eq!(echoes, (1..=N).collect::<Vec<_>>(), "a: exactly once, in order");
    assert_eq!(established, 1, "one key exchange");
    assert!(resumed >= 1, "the session resumed after the cuts ({resumed})");
}

#[test]
fn a_dialer_started_before_the_listener_connects_once_it_is_up() {
    let (a_id, b_id) = (identity(73), identity(74));
    let (a_fp, b_fp) = (a_id.fingerprint(), b_id.fingerprint());
    // A free port, with nobody listening on it yet: the first dials are refused.
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut a = EncryptedTcp::connect(addr, a_id, b_fp, config());
    assert!(!a.is_connected());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reconnects = 0;
    while reconnects < 2 {
        assert!(Instant::now() < deadline, "the dialer keeps dialing after a refused first dial");
        match a.next_event(Duration::from_millis(100)).unwrap() {
            Some(StreamEvent::Reconnect { .. }) => reconnects += 1,
            Some(StreamEvent::Disconnected) => panic!("nothing was connected: no Disconnected"),
            _ => {}
        }
    }
    assert!(!a.is_connected());
    let listener = TcpListener::bind(addr).unwrap();
    let mut b = EncryptedTcp::accept(listener, b_id, a_fp, config()).unwrap();
    a.send(&json!({ "n": 1 })).unwrap();
    loop {
        assert!(Instant::now() < deadline, "the dialer connects once the listener is up");
        if let Some(StreamEvent::Message(v)) = b.next_event(Duration::from_millis(10)).unwrap() {
            assert_eq!(v, json!({ "n": 1 }));
            break;
        }
        let _ = a.next_event(Duration::from_millis(10)).unwrap();
    }
    assert!(a.is_connected() && b.is_connected());
    // The dialer goes away: the acceptor sees the drop and waits, with no schedule.
    drop(a);
    let mut events = vec![];
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        events.extend(b.next_event(Duration::from_millis(50)).unwrap());
    }
    assert!(events.contains(&StreamEvent::Disconnected), "{events:?}");
    assert!(!events.iter().any(|e| matches!(e, StreamEvent::Reconnect { .. } | StreamEvent::GaveUp)), "an acceptor has no schedule: {events:?}");
}
