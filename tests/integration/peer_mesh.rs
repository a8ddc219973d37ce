//! The full mesh of `multi-peer-signaling.md` on real sockets: three peers (two on the blocking
//! adapter, one on smol) join a namespace through the real server, then A calls B, C calls A
//! and C calls B over real UDP on 127.0.0.1; every pair is connected and carries data both
//! ways.

use std::time::{Duration, Instant};

use peerlink::{ClientEvent, NodeConfig, NodeEvent, Payload, PeerState};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use peerlink_tests::{WAIT, client_config, start_server};

fn poll_node(url: &str, alias: &str) -> PollNode {
    PollNode::new(NodeConfig::with_client(client_config(url, alias)), PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap()
}

#[test]
fn a_calls_b_c_calls_a_c_calls_b_over_real_udp() {
    let server = start_server(peerlink::ServerConfig::default());
    let url = server.url();
    let mut a = poll_node(&url, "A");
    let mut c = poll_node(&url, "C");
    // B runs on smol's executor; its events are collected by a task.
    let (b, mut b_events) = smol::block_on(peerlink_smol::Node::connect_with(
        NodeConfig::with_client(client_config(&url, "B")),
        peerlink_smol::ConnectOptions { udp: peerlink_smol::UdpBind::Loopback, ..Default::default() },
    ))
    .unwrap();
    let (b_tx, b_rx) = std::sync::mpsc::channel();
    smol::spawn(async move {
        while let Some(e) = b_events.next().await {
            if b_tx.send(e).is_err() {
                break;
            }
        }
    })
    .detach();
    let (fa, fb, fc) = (a.fingerprint(), b.fingerprint(), c.fingerprint());
    let mut log_a = Vec::new();
    let mut log_c = Vec::new();
    let mut log_b = Vec::new();
    let mut pump = |a: &mut PollNode, c: &mut PollNode, log_a: &mut Vec<NodeEvent>, log_c: &mut Vec<NodeEvent>, log_b: &mut Vec<NodeEvent>| {
        for (n, log) in [(&mut *a, &mut *log_a), (&mut *c, &mut *log_c)] {
            n.poll(Instant::now()).unwrap();
            while let Some(e) = n.poll_event() {
                log.push(e);
            }
        }
        while let Ok(e) = b_rx.try_recv() {
            log_b.push(e);
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let until = |what: &str, mut done: Box<dyn FnMut(&[NodeEvent], &[NodeEvent], &[NodeEvent]) -> bool + '_>,
                 a: &mut PollNode, c: &mut PollNode, la: &mut Vec<NodeEvent>, lc: &mut Vec<NodeEvent>, lb: &mut Vec<NodeEvent>,
                 pump: &mut dyn FnMut(&mut PollNode, &mut PollNode, &mut Vec<NodeEvent>, &mut Vec<NodeEvent>, &mut Vec<NodeEvent>)| {
        let deadline = Instant::now() + WAIT;
        while !done(la, lb, lc) {
            assert!(Instant::now() < deadline, "{what}: timed out\nA {la:#?}\nB {lb:#?}\nC {lc:#?}");
            pump(a, c, la, lc, lb);
        }
    };

    // Phase 1: all join; C's peer list names A and B.
    until("registered", Box::new(|_, _, _| true), &mut a, &mut c, &mut log_a, &mut log_c, &mut log_b, &mut pump);
    while !(a.is_registered() && c.is_registered()) {
        pump(&mut a, &mut c, &mut log_a, &mut log_c, &mut log_b);
    }
    a.client().join(Instant::now(), "mesh", None, None).unwrap();
    until("A joined", Box::new(|la, _, _| la.iter().any(|e| matches!(e, NodeEvent::Signaling(ClientEvent::PeerList { .. })))), &mut a, &mut c, &mut log_a, &mut log_c, &mut log_b, &mut pump);
    assert!(smol::block_on(b.client().join("mesh")).unwrap().iter().any(|p| p.fingerprint == fa));
    c.client().join(Instant::now(), "mesh", None, None).unwrap();
    until("C joined", Box::new(|_, _, lc| lc.iter().any(|e| matches!(e, NodeEvent::Signaling(ClientEvent::PeerList { .. })))), &mut a, &mut c, &mut log_a, &mut log_c, &mut log_b, &mut pump);
    let list: Vec<_> = log_c
        .iter()
        .find_map(|e| match e {
            NodeEvent::Signaling(ClientEvent::PeerList { peers, .. }) => Some(peers.iter().map(|p| p.fingerprint).collect()),
            _ => None,
        })
        .unwrap();
    assert_eq!(list, vec![fa, fb]);

    // Phases 2-4: A calls B, C calls A, C calls B.
    a.connect_to_peer(fb).unwrap();
    c.connect_to_peer(fa).unwrap();
    c.connect_to_peer(fb).unwrap();
    let connected = |log: &[NodeEvent], peer| log.iter().any(|e| matches!(e, NodeEvent::ChannelOpen { peer: p, .. } if *p == peer));
    until(
        "full mesh",
        Box::new(move |la, lb, lc| connected(la, fb) && connected(la, fc) && connected(lb, fa) && connected(lb, fc) && connected(lc, fa) && connected(lc, fb)),
        &mut a, &mut c, &mut log_a, &mut log_c, &mut log_b, &mut pump,
    );
    for (n, other) in [(&a, fb), (&a, fc), (&c, fa), (&c, fb)] {
        assert_eq!(n.get_peer(&other).unwrap().state, PeerState::Connected);
    }

    // Phase 5: everyone talks to everyone directly.
    for (to, text) in [(fb, "A->B"), (fc, "A->C")] {
        a.send(to, None, &text).unwrap();
    }
    for (to, text) in [(fa, "C->A"), (fb, "C->B")] {
        c.send(to, None, &text).unwrap();
    }
    smol::block_on(async {
        b.send(fa, None, &"B->A").await.unwrap();
        b.send(fc, None, &"B->C").await.unwrap();
    });
    let texts = |log: &[NodeEvent]| -> Vec<String> {
        let mut t: Vec<String> = log
            .iter()
            .filter_map(|e| match e {
                NodeEvent::Data { data: Payload::Text(t), .. } => Some(t.trim_matches('"').to_string()),
                _ => None,
            })
            .collect();
        t.sort();
        t
    };
    until("data", Box::new(|la, lb, lc| texts(la).len() == 2 && texts(lb).len() == 2 && texts(lc).len() == 2), &mut a, &mut c, &mut log_a, &mut log_c, &mut log_b, &mut pump);
    assert_eq!(texts(&log_a), ["B->A", "C->A"]);
    assert_eq!(texts(&log_b), ["A->B", "C->B"]);
    assert_eq!(texts(&log_c), ["A->C", "B->C"]);
    smol::block_on(b.close());
}
