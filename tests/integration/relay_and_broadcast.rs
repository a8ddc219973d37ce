//! A relay reaches only its target, with a `from` stamped by the server; a broadcast reaches
//! every other member of the namespace and nobody outside it.

use peerlink::ClientEvent;
use peerlink_blocking::Client;
use peerlink_tests::*;
use serde_json::json;

/// Events that arrived up to a ping round trip (the server handles frames in order, so
/// anything addressed to this client before the ping has arrived by the pong).
fn settled(c: &mut Client) -> Vec<ClientEvent> {
    c.ping().unwrap();
    c.events().collect()
}

fn payloads(events: &[ClientEvent]) -> Vec<(String, serde_json::Value)> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Relay { from, payload } => Some((format!("relay from {}", from.short()), payload.to_value())),
            ClientEvent::Broadcast { from, namespace, payload } => {
                Some((format!("broadcast in {namespace} from {}", from.short()), payload.to_value()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn relay_reaches_only_its_target_and_broadcast_only_the_namespace() {
    let server = start_server(Default::default());
    let url = server.url();
    let mut a = Client::connect(client_config(&url, "a")).unwrap();
    let mut b = Client::connect(client_config(&url, "b")).unwrap();
    let mut c = Client::connect(client_config(&url, "c")).unwrap();
    let mut outsider = Client::connect(client_config(&url, "d")).unwrap();
    for cl in [&mut a, &mut b, &mut c] {
        cl.join("team").unwrap();
    }
    outsider.join("elsewhere").unwrap();
    for cl in [&mut a, &mut b, &mut c, &mut outsider] {
        settled(cl);
    }

    a.relay(b.fingerprint(), &json!({"secret": 1})).unwrap();
    let got = eventually("B receives the relay", || {
        b.events().find_map(|e| match e {
            ClientEvent::Relay { from, payload } => Some((from, payload.to_value())),
            _ => None,
        })
    });
    assert_eq!(got, (a.fingerprint(), json!({"secret": 1})), "from is A's verified fingerprint");
    for (name, cl) in [("A", &mut a), ("C", &mut c), ("D", &mut outsider)] {
        assert!(payloads(&settled(cl)).is_empty(), "{name} must not see the relay");
    }

    b.broadcast("team", &json!(["hello", "team"])).unwrap();
    let tag = format!("broadcast in team from {}", b.fingerprint().short());
    for (name, cl) in [("A", &mut a), ("C", &mut c)] {
        let got = eventually("the broadcast", || {
            let p = payloads(&cl.events().collect::<Vec<_>>());
            (!p.is_empty()).then_some(p)
        });
        assert_eq!(got, vec![(tag.clone(), json!(["hello", "team"]))], "{name}");
    }
    assert!(payloads(&settled(&mut b)).is_empty(), "the sender does not get its own broadcast");
    assert!(payloads(&settled(&mut outsider)).is_empty(), "outside the namespace: nothing");

    // A relay to nobody is an error event, not a lost message.
    outsider.relay(peerlink::Fingerprint::from_bytes([9; 32]), &json!(1)).unwrap();
    let err = eventually("peer_not_found", || {
        outsider.events().find_map(|e| match e {
            ClientEvent::Error(peerlink::ClientError::Server { code, .. }) => Some(code),
            _ => None,
        })
    });
    assert_eq!(err, peerlink::ErrorCode::PeerNotFound);
    server.shutdown();
}
