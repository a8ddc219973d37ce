//! Server-reflexive candidates from a real STUN server: coturn (`turnserver --stun-only`) on
//! 127.0.0.1, which `.ci/run` installs. A node configured with its `stun:` URL learns how the
//! server sees its socket; a node pointed at a silent port reports the timeout.

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use peerlink::{IceServer, NodeConfig, NodeEvent};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use peerlink_tests::{WAIT, client_config, start_server};

/// coturn as a STUN server on a free port of 127.0.0.1; killed on drop.
struct Coturn {
    child: Child,
    port: u16,
}

impl Coturn {
    fn start() -> Coturn {
        // A free port: bind, read it, release it (coturn binds it next).
        let port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("turnserver")
            .args(["-n", "--stun-only", "--no-tls", "--no-dtls", "--no-cli", "--listening-ip=127.0.0.1", "--log-file=stdout"])
            .arg(format!("--listening-port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("coturn's `turnserver` is installed (.ci/run installs the `coturn` package)");
        let coturn = Coturn { child, port };
        // Ready when it answers a binding request.
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let request = peerlink::stun::binding_request(peerlink::stun::TransactionId([9; 12]));
        for _ in 0..50 {
            probe.send_to(&request, ("127.0.0.1", port)).unwrap();
            let mut buf = [0u8; 512];
            if let Ok((n, _)) = probe.recv_from(&mut buf)
                && peerlink::stun::decode(&buf[..n]).is_ok()
            {
                return coturn;
            }
        }
        panic!("coturn did not answer on port {port}");
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(url: &str, stun: &str) -> PollNode {
    let mut config = NodeConfig::with_client(client_config(url, "stun"));
    config.ice_servers = vec![IceServer::new([stun])];
    PollNode::new(config, PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap()
}

#[test]
fn a_real_stun_server_reports_the_reflexive_address() {
    let coturn = Coturn::start();
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
