//! Two nodes of a cluster in one process, on an in-process `ClusterBus` instead of Redis: the
//! same behaviour as on Redis. Clients of the two nodes relay to each other; one node shuts
//! down (it says `bye` and closes its connections with 1001) and its client, the real
//! `peerlink` client with the other node as its fallback, resumes there without anyone seeing
//! it leave.

mod common;

use std::time::{Duration, Instant};

use common::*;
use peerlink::protocol::{ClientMessage, ServerMessage};
use peerlink::{ClientConfig, ClientEvent};
use peerlink_server::{ClusterBus, ServerOptions, spawn};
use serde_json::json;
use serde_json::value::RawValue;

#[test]
fn a_client_moves_to_the_other_node_of_a_bus_cluster_when_its_node_shuts_down() {
    let bus = ClusterBus::new();
    let node = || spawn(ServerOptions { cluster_bus: Some(bus.clone()), ..ServerOptions::local() }).unwrap();
    let (n0, n1) = (node(), node());
    wait_until("both nodes are on the bus", || bus.nodes() == 2);
    let mut config = ClientConfig::new(n0.url()).alias("mover").fallback_url(n1.url());
    config.reconnect_delay = Duration::from_millis(50);
    let options = peerlink_blocking::PollOptions { identity: Some(identity(5)), seed: Some(1), ..Default::default() };
    let mut mover = peerlink_blocking::Client::connect_with(config, options).unwrap();
    mover.join("ns").unwrap();
    let mut stayer = connect_registered(&n1.url(), 1);
    send(&mut stayer, &ClientMessage::Join { id: 1, namespace: "ns".into(), app_type: None, app_version: None });
    match recv(&mut stayer) {
        ServerMessage::Joined { peers, .. } => assert_eq!(peers.len(), 1, "the mover, on the other node"),
        other => panic!("{other:?}"),
    }
    // Across the bus both ways.
    let payload = RawValue::from_string(r#"{"n":1}"#.into()).unwrap();
    send(&mut stayer, &ClientMessage::Relay { id: Some(2), to: identity(5).fingerprint(), payload: &payload });
    assert_eq!(recv(&mut stayer), ServerMessage::Ok { id: 2 });
    mover.relay(identity(1).fingerprint(), &json!("hi")).unwrap();
    assert!(matches!(recv(&mut stayer), ServerMessage::Relay { .. }));

    // Node 0 shuts down; a relay sent meanwhile is held for the mover and delivered on node 1.
    n0.shutdown();
    let payload = RawValue::from_string(r#"{"n":2}"#.into()).unwrap();
    send(&mut stayer, &ClientMessage::Relay { id: Some(3), to: identity(5).fingerprint(), payload: &payload });
    assert_eq!(recv(&mut stayer), ServerMessage::Ok { id: 3 });
    let (mut resumed, mut got) = (None, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 2 || resumed.is_none() {
        assert!(Instant::now() < deadline, "resumed {resumed:?}, relays {got:?}");
        match mover.next_event(Duration::from_millis(100)).unwrap() {
            Some(ClientEvent::Reconnected { resumed: r }) => resumed = Some(r),
            Some(ClientEvent::Relay { payload, .. }) => got.push(payload.to_value()),
            _ => {}
        }
    }
    assert_eq!(resumed, Some(true));
    assert_eq!(got, vec![json!({"n": 1}), json!({"n": 2})]);
    assert_eq!(mover.discover("ns", None).unwrap().len(), 1, "still in its namespace, with the stayer");
    // The stayer never saw it leave.
    send(&mut stayer, &ClientMessage::Ping { id: 4 });
    loop {
        match recv(&mut stayer) {
            ServerMessage::Pong { id: 4 } => break,
            ServerMessage::PeerLeft { .. } => panic!("the mover never left"),
            _ => {}
        }
    }
    assert_eq!(bus.nodes(), 1);
}
