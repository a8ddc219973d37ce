//! The full mesh of `multi-peer-signaling.md` on real sockets: three peers (two on the blocking
//! adapter, one on smol) join a namespace through the real server, then A calls B, C calls A
//! and C calls B over real UDP on 127.0.0.1; every pair is connected and carries data both
//! ways.

use std::time::{Duration, Instant};

use peerlink::{ClientEvent, NodeConfig, NodeEvent, Payload, PeerState};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use peerlink_tests::{WAIT, client_config, start_server};

/// A and C (polled here) and the events of B (a smol node running on its own).
struct Mesh {
    a: PollNode,
    c: PollNode,
    b_rx: std::sync::mpsc::Receiver<NodeEvent>,
    la: Vec<NodeEvent>,
    lb: Vec<NodeEvent>,
    lc: Vec<NodeEvent>,
}

impl Mesh {
    /// Polls A and C and collects everyone's events until `done` (fails after `WAIT`).
    fn until(&mut self, what: &str, done: impl Fn(&Mesh) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(Instant::now() < deadline, "{what}: timed out\nA {:#?}\nB {:#?}\nC {:#?}", self.la, self.lb, self.lc);
            for (n, log) in [(&mut self.a, &mut self.la), (&mut self.c, &mut self.lc)] {
                n.poll(Instant::now()).unwrap();
                while let Some(e) = n.poll_event() {
                    log.push(e);
                }
            }
            while let Ok(e) = self.b_rx.try_recv() {
                self.lb.push(e);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn poll_node(url: &str, alias: &str) -> PollNode {
    PollNode::new(NodeConfig::with_client(client_config(url, alias)), PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap()
}

#[test]
fn a_calls_b_c_calls_a_c_calls_b_over_real_udp() {
    let server = start_server(peerlink::ServerConfig::default());
    let url = server.url();
    let a = poll_node(&url, "A");
    let c = poll_node(&url, "C");
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
    let mut mesh = Mesh { a, c, b_rx, la: Vec::new(), lb: Vec::new(), lc: Vec::new() };
    // Phase 1: all join; C's peer list names A and B.
    mesh.until("registered", |m| m.a.is_registered() && m.c.is_registered());
    let peer_list = |log: &[NodeEvent]| log.iter().any(|e| matches!(e, NodeEvent::Signaling(ClientEvent::PeerList { .. })));
    mesh.a.client().join(Instant::now(), "mesh", None, None).unwrap();
    mesh.until("A joined", |m| peer_list(&m.la));
    assert!(smol::block_on(b.client().join("mesh")).unwrap().iter().any(|p| p.fingerprint == fa));
    mesh.c.client().join(Instant::now(), "mesh", None, None).unwrap();
    mesh.until("C joined", |m| peer_list(&m.lc));
    let list: Vec<_> = mesh
        .lc
        .iter()
        .find_map(|e| match e {
            NodeEvent::Signaling(ClientEvent::PeerList { peers, .. }) => Some(peers.iter().map(|p| p.fingerprint).collect()),
            _ => None,
        })
        .unwrap();
    assert_eq!(list, vec![fa, fb]);

    // Phases 2-4: A calls B, C calls A, C calls B.
    mesh.a.connect_to_peer(fb).unwrap();
    mesh.c.connect_to_peer(fa).unwrap();
    mesh.c.connect_to_peer(fb).unwrap();
    let connected = |log: &[NodeEvent], peer| log.iter().any(|e| matches!(e, NodeEvent::ChannelOpen { peer: p, .. } if *p == peer));
    mesh.until("full mesh", |m| {
        connected(&m.la, fb) && connected(&m.la, fc) && connected(&m.lb, fa) && connected(&m.lb, fc) && connected(&m.lc, fa) && connected(&m.lc, fb)
    });
    for (n, other) in [(&mesh.a, fb), (&mesh.a, fc), (&mesh.c, fa), (&mesh.c, fb)] {
        assert_eq!(n.get_peer(&other).unwrap().state, PeerState::Connected);
    }

    // Phase 5: everyone talks to everyone directly.
    for (to, text) in [(fb, "A->B"), (fc, "A->C")] {
        mesh.a.send(to, None, &text).unwrap();
    }
    for (to, text) in [(fa, "C->A"), (fb, "C->B")] {
        mesh.c.send(to, None, &text).unwrap();
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
    mesh.until("data", |m| texts(&m.la).len() == 2 && texts(&m.lb).len() == 2 && texts(&m.lc).len() == 2);
    assert_eq!(texts(&mesh.la), ["B->A", "C->A"]);
    assert_eq!(texts(&mesh.lb), ["A->B", "C->B"]);
    assert_eq!(texts(&mesh.lc), ["A->C", "B->C"]);
    smol::block_on(b.close());
}
