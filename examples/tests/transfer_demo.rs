//! The `transfer` example's demo, as the README runs it but smaller: a server, a receiver
//! that accepts and a sender in one process, over UDP on loopback; the file arrives
//! byte-identical.

use peerlink_examples::file_transfer::{Ui, demo, safe_file_name};

#[test]
fn demo_sends_a_file_that_arrives_byte_identical() {
    let report = demo(1 << 20, &Ui::no_bars()).expect("the demo");
    assert_eq!(report.size, 1 << 20);
    assert_eq!(report.sha256.len(), 64);
    assert!(report.bytes_per_sec() > 0.0);
}

#[test]
fn names_that_leave_the_directory_are_refused() {
    for name in ["../x", "/etc/passwd", "a/b", "", ".", ".."] {
        assert_eq!(safe_file_name(name), None, "{name:?} passed");
    }
}

/// A peer that offers `..` (which the protocol's own check lets through: it has no
/// separator) is refused by the receiver, and nothing is written anywhere.
#[test]
fn a_hostile_name_is_refused_and_nothing_is_written() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use peerlink::transfer::{TransferError, TransferEvent};
    use peerlink::{ClientConfig, ClientEvent, NodeConfig, NodeEvent};
    use peerlink_blocking::{PollNode, PollOptions, UdpBind};
    use peerlink_examples::file_transfer::{Answer, Net, ReceiveOptions, receive};

    let server = peerlink_server::spawn(peerlink_server::ServerOptions::local()).unwrap();
    let base = std::env::temp_dir().join(format!("peerlink-hostile-{}", std::process::id()));
    let out = base.join("out");
    let deadline = Instant::now() + Duration::from_secs(30);
    let net = Net { server: server.url(), namespace: "hostile".into(), udp: UdpBind::Loopback, stun: Vec::new() };
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let options = ReceiveOptions { net, out: out.clone(), answer: Answer::Yes, limit: None, deadline: Some(deadline) };
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || receive(&options, &Ui::no_bars(), &stop))
    };

    let config = NodeConfig::with_client(ClientConfig::new(server.url()).alias("mallory"));
    let mut mallory = PollNode::new(config, PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap();
    // `..`, paths and control characters never leave a peer (the core refuses such offers on
    // both ends); a name the protocol allows but this receiver does not (over 240 bytes) must
    // be refused by the receiver's own check.
    let hostile = "a".repeat(250);
    let mut outcome = None;
    while outcome.is_none() {
        assert!(Instant::now() < deadline, "no answer to the offer");
        let Some(event) = mallory.next_event(Duration::from_millis(50)).unwrap() else { continue };
        match event {
            NodeEvent::Signaling(ClientEvent::Registered { .. }) => {
                mallory.client().join(Instant::now(), "hostile", None, None).unwrap();
            }
            NodeEvent::Signaling(ClientEvent::PeerList { peers, .. }) if !peers.is_empty() => {
                let victim = peers[0].fingerprint;
                mallory.send_bytes(victim, &hostile, b"pwned".to_vec()).unwrap();
                mallory.connect_to_peer(victim).unwrap();
            }
            NodeEvent::Signaling(ClientEvent::PeerJoined { peer, .. }) => {
                mallory.send_bytes(peer.fingerprint, &hostile, b"pwned".to_vec()).unwrap();
                mallory.connect_to_peer(peer.fingerprint).unwrap();
            }
            NodeEvent::Transfer(TransferEvent::Failed { error, .. }) => outcome = Some(Err(error)),
            NodeEvent::Transfer(TransferEvent::Completed { .. }) => outcome = Some(Ok(())),
            _ => {}
        }
    }
    stop.store(true, Ordering::Relaxed);
    let received = receiver.join().unwrap().unwrap();
    assert_eq!(outcome, Some(Err(TransferError::Rejected("unsafe file name".into()))));
    assert!(received.is_empty());
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "something was written into the output directory");
    let beside: Vec<_> = std::fs::read_dir(&base).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(beside, ["out"], "something was written beside the output directory");
    let _ = std::fs::remove_dir_all(&base);
}
