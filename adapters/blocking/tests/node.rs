//! PollNode over real UDP on 127.0.0.1 through the real signaling server: two nodes connect,
//! exchange JSON, text and binary on the default and on named channels, close, and connect
//! again; nothing blocks.

mod common;

use std::time::{Duration, Instant};

use peerlink::{ChannelOptions, NodeConfig, NodeEvent, Payload, PeerState, Reliability};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};

fn node(url: &str, alias: &str) -> PollNode {
    let mut config = NodeConfig::with_client(common::config(url, alias));
    config.peer.connect_timeout = Duration::from_secs(10);
    PollNode::new(config, PollOptions { udp: UdpBind::Loopback, ..Default::default() }).expect("node")
}

/// Polls both nodes (as two game loops would) until `done` holds for the events seen so far.
fn run(a: &mut PollNode, b: &mut PollNode, log: &mut Vec<(char, NodeEvent)>, timeout: Duration, mut done: impl FnMut(&[(char, NodeEvent)]) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        for (name, n) in [('a', &mut *a), ('b', &mut *b)] {
            n.poll(Instant::now()).unwrap();
            while let Some(e) = n.poll_event() {
                log.push((name, e));
            }
        }
        if done(log) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out; events: {log:#?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn data(log: &[(char, NodeEvent)], who: char) -> Vec<(String, Payload)> {
    log.iter()
        .filter_map(|(n, e)| match e {
            NodeEvent::Data { channel, data, .. } if *n == who => Some((channel.clone(), data.clone())),
            _ => None,
        })
        .collect()
}

fn open(log: &[(char, NodeEvent)], who: char, label: &str) -> bool {
    log.iter().any(|(n, e)| *n == who && matches!(e, NodeEvent::ChannelOpen { channel, .. } if channel == label))
}

#[test]
fn two_nodes_over_real_udp() {
    let server = common::server();
    let url = server.url();
    let mut a = node(&url, "a");
    let mut b = node(&url, "b");
    assert_eq!(a.local_addrs().len(), 1);
    assert!(a.local_addrs()[0].ip().is_loopback());
    let mut log = Vec::new();
    run(&mut a, &mut b, &mut log, Duration::from_secs(10), |_| true);
    while !(a.is_registered() && b.is_registered()) {
        run(&mut a, &mut b, &mut log, Duration::from_secs(10), |_| true);
    }
    let (fa, fb) = (a.fingerprint(), b.fingerprint());

    a.connect_to_peer(fb).unwrap();
    run(&mut a, &mut b, &mut log, Duration::from_secs(10), |l| open(l, 'a', "default") && open(l, 'b', "default"));
    assert_eq!(a.get_peer(&fb).unwrap().state, PeerState::Connected);

    a.send(fb, None, &serde_json::json!({"n": 1})).unwrap();
    b.node().send_text(Instant::now(), fa, None, "text").unwrap();
    a.send_binary(fb, None, &[0xde, 0xad]).unwrap();
    a.create_data_channel(fb, ChannelOptions::new("unordered").unordered().reliability(Reliability::MaxRetransmits(3))).unwrap();
    run(&mut a, &mut b, &mut log, Duration::from_secs(10), |l| open(l, 'b', "unordered") && open(l, 'a', "unordered"));
    b.send_binary(fa, Some("unordered"), &[1; 20_000]).unwrap();
    a.send(fb, Some("unordered"), &"on a named channel").unwrap();
    run(&mut a, &mut b, &mut log, Duration::from_secs(10), |l| data(l, 'b').len() == 3 && data(l, 'a').len() == 2);
    assert_eq!(
        data(&log, 'b'),
        [
            ("default".into(), Payload::Text(r#"{"n":1}"#.into())),
            ("default".into(), Payload::Binary(vec![0xde, 0xad])),
            ("unordered".into(), Payload::Text(r#""on a named channel""#.into())),
        ]
    );
    assert_eq!(data(&log, 'a'), [("default".into(), Payload::Text("text".into())), ("unordered".into(), Payload::Binary(vec![1; 20_000]))]);

    // Close, then connect again (from the other side this time).
    a.node().close_peer(Instant::now(), fb).unwrap();
    run(&mut a, &mut b, &mut log, Duration::from_secs(10), |l| {
        l.iter().any(|(n, e)| *n == 'b' && matches!(e, NodeEvent::PeerState { state: PeerState::Closed, .. }))
    });
    assert!(b.get_peer(&fa).is_none() && a.get_peer(&fb).is_none());
    log.clear();
    b.connect_to_peer(fa).unwrap();
    run(&mut a, &mut b, &mut log, Duration::from_secs(10), |l| open(l, 'a', "default") && open(l, 'b', "default"));
    b.send(fa, None, &"again").unwrap();
    run(&mut a, &mut b, &mut log, Duration::from_secs(10), |l| !data(l, 'a').is_empty());
    assert_eq!(data(&log, 'a'), [("default".into(), Payload::Text(r#""again""#.into()))]);
}

#[test]
fn next_event_blocks_until_something_happens() {
    let server = common::server();
    let mut a = node(&server.url(), "solo");
    let first = a.next_event(Duration::from_secs(5)).unwrap();
    assert!(matches!(first, Some(NodeEvent::Signaling(peerlink::ClientEvent::Connected))), "{first:?}");
    // Nothing else is coming once registered: next_event returns None after its timeout.
    while let Some(e) = a.next_event(Duration::from_millis(300)).unwrap() {
        assert!(matches!(e, NodeEvent::Signaling(_)), "{e:?}");
    }
}

#[test]
fn a_burst_right_after_open_arrives_complete_and_in_order() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    let server = common::server();
    let url = server.url();
    let mut a = node(&url, "a");
    let mut b = node(&url, "b");
    let mut log = Vec::new();
    while !(a.is_registered() && b.is_registered()) {
        run(&mut a, &mut b, &mut log, Duration::from_secs(10), |_| true);
    }
    let fb = b.fingerprint();
    a.connect_to_peer(fb).unwrap();
    // Only the sender's side is waited for: the receiver must not lose what comes early.
    run(&mut a, &mut b, &mut log, Duration::from_secs(10), |l| open(l, 'a', "default"));
    let mut sent = 0u32;
    while sent < 200 {
        let mut msg = vec![0u8; 16 * 1024];
        msg[..4].copy_from_slice(&sent.to_le_bytes());
        match a.node().send_binary(Instant::now(), fb, None, &msg) {
            Ok(()) => sent += 1,
            Err(peerlink::NodeError::Send(peerlink::SendError::WouldBlock { .. })) => run(&mut a, &mut b, &mut log, Duration::from_secs(10), |_| true),
            Err(e) => panic!("{e}"),
        }
    }
    run(&mut a, &mut b, &mut log, Duration::from_secs(20), |l| data(l, 'b').len() == 200);
    let got: Vec<u32> = data(&log, 'b')
        .into_iter()
        .map(|(_, d)| match d {
            Payload::Binary(d) => u32::from_le_bytes(d[..4].try_into().unwrap()),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, (0..200).collect::<Vec<_>>());
}
