//! JSON, text and binary on the default channel and on named channels (ordered, unordered,
//! partially reliable); close; connect again; bad sends get typed errors.

use std::time::Duration;

use peerlink::peer::SendError;
use peerlink::{ChannelOptions, NodeError, NodeEvent, PeerState, Reliability};

use crate::harness::*;

#[test]
fn every_kind_of_message_on_every_kind_of_channel() {
    let (mut sim, n) = world(11, 2);
    let (a, b) = (n[0], n[1]);
    let (a_fp, b_fp) = (sim.fingerprint(a), sim.fingerprint(b));
    connect(&mut sim, a, b, Duration::from_secs(5));

    sim.with_node(a, |n, now| n.send(now, b_fp, None, &serde_json::json!({"hello": [1, 2]}))).unwrap();
    sim.with_node(a, |n, now| n.send_text(now, b_fp, None, "plain")).unwrap();
    sim.with_node(a, |n, now| n.send_binary(now, b_fp, None, &[9; 1000])).unwrap();

    sim.with_node(a, |n, now| n.create_data_channel(now, b_fp, ChannelOptions::new("ordered"))).unwrap();
    sim.with_node(a, |n, now| n.create_data_channel(now, b_fp, ChannelOptions::new("fast").unordered().reliability(Reliability::MaxRetransmits(0)))).unwrap();
    sim.with_node(b, |n, now| {
        n.create_data_channel(now, a_fp, ChannelOptions::new("timed").unordered().reliability(Reliability::MaxLifetime(Duration::from_millis(500))))
    })
    .unwrap();
    // A label is unique per connection.
    assert!(matches!(
        sim.with_node(a, |n, now| n.create_data_channel(now, b_fp, ChannelOptions::new("ordered"))),
        Err(NodeError::Channel(peerlink::peer::ChannelError::Exists(_)))
    ));
    let open = |sim: &peerlink_sim::Sim, node, label: &str| sim.node(node).get_peer(&sim.fingerprint(if node == a { b } else { a })).is_some_and(|p| p.channels.iter().any(|c| c == label));
    assert!(sim.run_until(Duration::from_secs(2), |sim| ["ordered", "fast", "timed"].iter().all(|l| open(sim, a, l) && open(sim, b, l))));

    for (label, from, to) in [("ordered", a, b_fp), ("fast", a, b_fp), ("timed", b, a_fp)] {
        for i in 0..5 {
            sim.with_node(from, |n, now| n.send_text(now, to, Some(label), &format!("{label}-{i}"))).unwrap();
        }
    }
    sim.run_for(Duration::from_secs(1));
    let got_b = received(&sim, b, a);
    assert_eq!(&got_b[..3], &[r#"{"hello":[1,2]}"#.to_string(), "plain".into(), "bin:1000".into()]);
    let ordered: Vec<_> = got_b.iter().filter(|m| m.starts_with("ordered-")).cloned().collect();
    assert_eq!(ordered, (0..5).map(|i| format!("ordered-{i}")).collect::<Vec<_>>());
    // Unordered channels on a clean link still deliver everything (in some order).
    assert_eq!(got_b.iter().filter(|m| m.starts_with("fast-")).count(), 5);
    assert_eq!(received(&sim, a, b).iter().filter(|m| m.starts_with("timed-")).count(), 5);
    // Channel names come with the data.
    assert!(sim.events(b).iter().any(|(_, e)| matches!(e, NodeEvent::Data { channel, .. } if channel == "fast")));

    // Typed refusals: unknown channel, unknown peer, too large.
    assert!(matches!(sim.with_node(a, |n, now| n.send_text(now, b_fp, Some("nope"), "x")), Err(NodeError::Send(SendError::UnknownChannel(_)))));
    let nobody = peerlink::Fingerprint::from_bytes([7; 32]);
    assert!(matches!(sim.with_node(a, |n, now| n.send_text(now, nobody, None, "x")), Err(NodeError::Send(SendError::UnknownPeer(_)))));
    let max = sim.node(a).get_peer(&b_fp).unwrap().max_message_size;
    let big = vec![0u8; max + 1];
    assert!(matches!(
        sim.with_node(a, |n, now| n.send_binary(now, b_fp, None, &big)),
        Err(NodeError::Send(SendError::MessageTooLarge { size, max: m })) if size == max + 1 && m == max
    ));
    // The largest allowed message goes through.
    let biggest = vec![1u8; max];
    sim.with_node(a, |n, now| n.send_binary(now, b_fp, None, &biggest)).unwrap();
    sim.run_for(Duration::from_secs(1));
    assert!(received(&sim, b, a).contains(&format!("bin:{max}")));

    // Close: both sides see Closed; sending then fails; connecting again works.
    sim.with_node(a, |n, now| n.close_peer(now, b_fp)).unwrap();
    assert!(sim.run_until(Duration::from_secs(2), |sim| state(sim, b, a).is_none()));
    assert_eq!(states(&sim, a, b).last().map(|s| s.1), Some(PeerState::Closed));
    assert_eq!(states(&sim, b, a).last().map(|s| s.1), Some(PeerState::Closed));
    assert!(sim.events(b).iter().any(|(_, e)| matches!(e, NodeEvent::ChannelClosed { channel, .. } if channel == "ordered")));
    assert!(matches!(sim.with_node(a, |n, now| n.send_text(now, b_fp, None, "x")), Err(NodeError::Send(SendError::UnknownPeer(_)))));

    connect(&mut sim, a, b, Duration::from_secs(5));
    sim.with_node(b, |n, now| n.send_text(now, a_fp, None, "again")).unwrap();
    sim.run_for(Duration::from_millis(500));
    assert_eq!(received(&sim, a, b).last().map(String::as_str), Some("again"));
}
