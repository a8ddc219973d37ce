//! Server-reflexive candidates from a real STUN server: coturn (`turnserver --stun-only`) on
//! 127.0.0.1, which `.ci/run` installs. A node configured with its `stun:` URL learns how the
//! server sees its socket; a node pointed at a silent port reports the timeout.

use std::net::UdpSocket;
use std::time::Duration;

use peerlink::{IceServer, NodeConfig, NodeEvent};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use peerlink_tests::coturn::Coturn;
use peerlink_tests::{WAIT, client_config, start_server};

fn node(url: &str, stun: &str) -> PollNode {
    let mut config = NodeConfig::with_client(client_config(url, "stun"));
    config.ice_servers = vec![IceServer::new([stun])];
    PollNode::new(config, PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap()
}

#[test]
fn a_real_stun_server_reports_the_reflexive_address() {
    let coturn = Coturn::start(&["--stun-only"]);
    let server = start_server(peerlink::ServerConfig::default());
    let mut n = node(&server.url(), &format!("stun:127.0.0.1:{}", coturn.port));
    let local = n.local_addrs()[0];
    let deadline = std::time::Instant::now() + WAIT;
    let mapped = loop {
        assert!(std::time::Instant::now() < deadline, "no STUN answer");
        if let Some(NodeEvent::ReflexiveAddress { local: l, server, mapped }) = n.next_event(Duration::from_millis(100)).unwrap() {
            assert_eq!(l, local);
            assert_eq!(server.port(), coturn.port);
            break mapped;
        }
    };
    // On loopback the server sees the socket itself: the same address, so no new candidate.
    assert_eq!(mapped, local);
    assert_eq!(n.node().local_candidates().len(), 1);
}

#[test]
fn a_silent_stun_server_times_out() {
    let server = start_server(peerlink::ServerConfig::default());
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut n = node(&server.url(), &format!("stun:{}", silent.local_addr().unwrap()));
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        assert!(std::time::Instant::now() < deadline, "no timeout reported");
        if let Some(NodeEvent::StunTimeout { server, .. }) = n.next_event(Duration::from_millis(100)).unwrap() {
            assert_eq!(server, silent.local_addr().unwrap());
            break;
        }
    }
    // The requests did reach the silent socket, retransmitted.
    silent.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    let mut seen = 0;
    while silent.recv_from(&mut buf).is_ok() {
        seen += 1;
    }
    assert_eq!(seen, 4, "a request and three retransmissions");
}
