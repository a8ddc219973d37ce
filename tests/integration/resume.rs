//! A cut TCP connection mid-session: the client reconnects with backoff, resumes its session
//! (namespaces and rooms intact, nobody saw it leave), and a relay sent during the gap arrives.

use std::time::Duration;

use peerlink::ClientEvent;
use peerlink_tests::*;
use serde_json::json;

/// Sets up the peer that stays connected: in the namespace and the room, relaying during the gap.
fn stayer(url: &str) -> peerlink_blocking::Client {
    let mut y = peerlink_blocking::Client::connect(client_config(url, "stayer")).unwrap();
    y.join("ns").unwrap();
    y.create_room("room", None, None).unwrap();
    y
}

/// Cuts the proxy, waits for the server to park the session, relays during the gap, reopens.
fn cut_and_relay(server: &ServerHandle, proxy: &CutProxy, y: &mut peerlink_blocking::Client, target: peerlink::Fingerprint) {
    proxy.refuse(true);
    proxy.cut();
    eventually("the server parks the session", || (server.stats().parked_sessions == 1).then_some(()));
    y.relay(target, &json!({"during": "gap"})).unwrap();
    y.ping().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    proxy.refuse(false);
}

fn assert_stayer_saw_no_leave(y: &mut peerlink_blocking::Client) {
    y.ping().unwrap();
    for e in y.events() {
        assert!(
            !matches!(e, ClientEvent::PeerLeft { .. } | ClientEvent::RoomPeerLeft { .. }),
            "a resumed session never left: {e:?}"
        );
    }
}

#[test]
fn smol_client_resumes_after_a_cut_and_gets_the_gap_relay() {
    let server = start_server(Default::default());
    let proxy = CutProxy::start(server.local_addr());
    let mut y = stayer(&server.url());
    let proxy_url = proxy.url();
    let (x, mut events) = smol::block_on(async {
        let (x, events) = peerlink_smol::Client::connect(client_config(&proxy_url, "mover")).await.unwrap();
        x.join("ns").await.unwrap();
        x.join_room("room").await.unwrap();
        (x, events)
    });
    let fx = x.fingerprint();
    cut_and_relay(&server, &proxy, &mut y, fx);

    let x = run_async(async move {
        let (mut reconnecting, mut resumed, mut relay) = (0, None, None);
        while let Some(e) = events.next().await {
            match e {
                ClientEvent::Reconnecting { .. } => reconnecting += 1,
                ClientEvent::Reconnected { resumed: r } => resumed = Some(r),
                ClientEvent::Relay { payload, .. } => {
                    relay = Some(payload.to_value());
                    break;
                }
                _ => {}
            }
        }
        assert!(reconnecting >= 1, "reconnected with backoff");
        assert_eq!(resumed, Some(true), "the server resumed the session");
        assert_eq!(relay, Some(json!({"during": "gap"})));
        // Still in the namespace and the room, without re-joining.
        let (_, members) = x.room_info("room").await.unwrap();
        assert_eq!(members, 2);
        let peers = x.discover("ns", None).await.unwrap();
        assert_eq!(peers.len(), 1, "the stayer is still there too");
        x
    });
    assert_stayer_saw_no_leave(&mut y);
    smol::block_on(x.disconnect());
    eventually("the mover left cleanly at the end", || y.discover("ns", None).unwrap().is_empty().then_some(()));
    server.shutdown();
}

#[test]
fn blocking_client_resumes_after_a_cut_and_gets_the_gap_relay() {
    let server = start_server(Default::default());
    let proxy = CutProxy::start(server.local_addr());
    let mut y = stayer(&server.url());
    let mut x = peerlink_blocking::Client::connect(client_config(&proxy.url(), "mover")).unwrap();
    x.join("ns").unwrap();
    x.join_room("room").unwrap();
    cut_and_relay(&server, &proxy, &mut y, x.fingerprint());

    let (mut resumed, mut relay) = (None, None);
    while relay.is_none() {
        match x.next_event(WAIT).unwrap().expect("events while reconnecting") {
            ClientEvent::Reconnected { resumed: r } => resumed = Some(r),
            ClientEvent::Relay { payload, .. } => relay = Some(payload.to_value()),
            _ => {}
        }
    }
    assert_eq!(resumed, Some(true));
    assert_eq!(relay, Some(json!({"during": "gap"})));
    let peers = y.discover("ns", None).unwrap();
    assert_eq!(fingerprints(&peers), vec![x.fingerprint()], "still in the namespace");
    assert_stayer_saw_no_leave(&mut y);
    x.disconnect();
    server.shutdown();
}
