//! End-to-end encrypted rooms in the simulator: every link forced through the relay while an
//! instrumented server records every text it sends; a server that swaps the key-exchange
//! keys; a member that did not join encrypted.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use base64::Engine as _;
use peerlink::e2e::{E2eError, EphemeralKey};
use peerlink::transfer::TransferEvent;
use peerlink::{EncryptionEvent, JoinOptions, NodeConfig, NodeError, NodeEvent, Payload, RoomData, RoomError, RoomEvent, RoomOptions, RoomPath, StateConfig};
use peerlink_sim::{NodeId, Sim};
use rand::SeedableRng;
use serde_json::{Value, json};

use crate::harness::*;

const ROOM: &str = "vault";
const MARKER: &str = "PLAINTEXT-MARKER";

fn room_config() -> NodeConfig {
    let mut c = config();
    c.peer.connect_timeout = Duration::from_secs(5);
    c
}

/// `n` nodes with no UDP path between any two (every room message goes through the
/// relay); the first creates the room, the rest join it, encrypted or not.
fn relay_only_world(seed: u64, encrypted: &[bool]) -> (Sim, Vec<NodeId>) {
    room_world_with(seed, encrypted, false)
}

/// As [`relay_only_world`], with direct paths (`udp`) or without.
fn room_world_with(seed: u64, encrypted: &[bool], udp: bool) -> (Sim, Vec<NodeId>) {
    room_world_config(seed, encrypted, udp, room_config())
}

fn room_world_config(seed: u64, encrypted: &[bool], udp: bool, config: NodeConfig) -> (Sim, Vec<NodeId>) {
    init_tracing();
    let mut sim = Sim::new(seed);
    let nodes: Vec<NodeId> = (0..encrypted.len()).map(|i| sim.add_node(format!("n{i}"), config.clone())).collect();
    for (i, &a) in nodes.iter().enumerate() {
        for &b in &nodes[i + 1..] {
            if !udp {
                sim.partition(a, b);
            }
        }
    }
    assert!(sim.run_until(Duration::from_secs(5), |sim| nodes.iter().all(|n| sim.node(*n).client().is_registered())));
    let options = if encrypted[0] { RoomOptions::group(8).encrypted() } else { RoomOptions::group(8) };
    sim.with_node(nodes[0], |node, now| node.create_room(now, ROOM, options)).unwrap();
    assert!(sim.run_until(Duration::from_secs(2), |sim| joined(sim, nodes[0])));
    for (&n, &e) in nodes[1..].iter().zip(&encrypted[1..]) {
        let options = if e { JoinOptions::encrypted() } else { JoinOptions::default() };
        sim.with_node(n, |node, now| node.join_room_with(now, ROOM, options)).unwrap();
        assert!(sim.run_until(Duration::from_secs(2), |sim| joined(sim, n)));
    }
    (sim, nodes)
}

/// Records every text the server sends (what it relays included).
fn instrument(sim: &mut Sim) -> Rc<RefCell<Vec<String>>> {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let log = seen.clone();
    sim.set_signaling_filter(move |_, text| {
        log.borrow_mut().push(text.to_owned());
        Some(text.to_owned())
    });
    seen
}

fn room_texts(sim: &Sim, n: NodeId) -> BTreeMap<String, Vec<(String, RoomPath)>> {
    let mut out: BTreeMap<String, Vec<(String, RoomPath)>> = BTreeMap::new();
    for (_, e) in sim.events(n) {
        if let NodeEvent::Room(RoomEvent::Data { from, data: Payload::Text(t), path, .. }) = e {
            out.entry(from.short()).or_default().push((t.clone(), *path));
        }
    }
    out
}

fn ready(sim: &Sim, a: NodeId, b: NodeId) -> bool {
    let fb = sim.fingerprint(b);
    sim.events(a).iter().any(|(_, e)| matches!(e, NodeEvent::Encryption(EncryptionEvent::Ready { peer, .. }) if *peer == fb))
}

/// Every member sends `count` texts carrying the marker, as the room takes them.
fn chatter(sim: &mut Sim, nodes: &[NodeId], count: usize) -> BTreeMap<NodeId, Vec<String>> {
    let mut sent: BTreeMap<NodeId, Vec<String>> = BTreeMap::new();
    for round in 0..count * 20 {
        for &n in nodes {
            let list = sent.entry(n).or_default();
            if list.len() >= count {
                continue;
            }
            let text = json!({ "from": sim.name(n), "n": list.len(), "secret": MARKER }).to_string();
            match sim.with_node(n, |node, now| node.room_send(now, ROOM, None, RoomData::Json(text.clone()))) {
                Ok(()) => list.push(text),
                Err(NodeError::Room(RoomError::WouldBlock { .. })) => {}
                Err(e) => panic!("round {round}: send: {e}"),
            }
        }
        sim.run_for(Duration::from_millis(20));
        if sent.values().all(|l| l.len() >= count) {
            break;
        }
    }
    sent
}

#[test]
fn every_link_through_the_relay_and_the_server_relays_ciphertext_only() {
    for seed in [1, 2, 3] {
        let (mut sim, n) = relay_only_world(9100 + seed, &[true, true, true]);
        let seen = instrument(&mut sim);
        // Before the sessions are ready, sends are queued, not sent in the clear.
        let early = json!({ "early": MARKER }).to_string();
        sim.with_node(n[2], |node, now| node.room_send(now, ROOM, None, RoomData::Json(early.clone()))).unwrap();
        assert!(sim.run_until(Duration::from_secs(10), |sim| n.iter().all(|&a| n.iter().all(|&b| a == b || ready(sim, a, b)))), "seed {seed}: sessions");
        // Shared state and presence ride the same sealed batches.
        for &x in &n {
            sim.with_node(x, |node, now| node.sync_state(now, ROOM, StateConfig::default())).unwrap();
        }
        sim.with_node(n[0], |node, now| node.state_set(now, ROOM, "note", &json!({ "text": MARKER }))).unwrap();
        sim.with_node(n[1], |node, now| node.set_presence(now, ROOM, Some(&json!({ "typing": MARKER })))).unwrap();
        let sent = chatter(&mut sim, &n, 150);
        let delivered = |sim: &Sim| {
            n.iter().all(|&r| {
                let got = room_texts(sim, r);
                n.iter().filter(|&&s| s != r).all(|&s| got.get(&sim.fingerprint(s).short()).map_or(0, Vec::len) >= sent[&s].len() + usize::from(s == n[2]))
            })
        };
        assert!(sim.run_until(Duration::from_secs(60), delivered), "seed {seed}: not everything arrived");
        sim.run_for(Duration::from_secs(1));
        for &r in &n {
            let got = room_texts(&sim, r);
            for &s in n.iter().filter(|&&s| s != r) {
                let texts: Vec<&str> = got[&sim.fingerprint(s).short()].iter().map(|(t, _)| t.as_str()).collect();
                let mut want: Vec<&str> = sent[&s].iter().map(String::as_str).collect();
                if s == n[2] {
                    want.insert(0, &early);
                }
                assert_eq!(texts, want, "seed {seed}: {} from {}: once, in order", sim.name(r), sim.name(s));
                assert!(got[&sim.fingerprint(s).short()].iter().all(|(_, p)| *p == RoomPath::Relay));
            }
            assert_eq!(sim.node(r).state(ROOM).and_then(|s| s.get("note").cloned()), Some(json!({ "text": MARKER })), "seed {seed}: state");
            assert!(sim.node(r).room(ROOM).unwrap().encrypted);
        }
        let presence = sim.node(n[0]).room(ROOM).unwrap().members.iter().find(|m| m.info.fingerprint == sim.fingerprint(n[1])).and_then(|m| m.presence.clone());
        assert_eq!(presence, Some(json!({ "typing": MARKER })), "seed {seed}: presence");
        let seen = seen.borrow();
        let relays = seen.iter().filter(|t| t.contains(r#""type":"relay""#)).count();
        assert!(relays > 3 * 150, "seed {seed}: the server relayed the room ({relays} relays)");
        let leaks: Vec<&String> = seen.iter().filter(|t| t.contains(MARKER) || t.contains("typing") || t.contains("\"note\"")).collect();
        assert!(leaks.is_empty(), "seed {seed}: the server saw plaintext: {:?}", &leaks[..leaks.len().min(2)]);
        // Nothing was refused on the way.
        for &r in &n {
            let bad: Vec<_> = sim.events(r).iter().filter(|(_, e)| matches!(e, NodeEvent::Encryption(EncryptionEvent::Refused { .. }) | NodeEvent::Room(RoomEvent::Error { .. }))).collect();
            assert!(bad.is_empty(), "seed {seed}: {}: {bad:?}", sim.name(r));
        }
    }
}

#[test]
fn the_instrument_sees_plaintext_in_a_room_that_is_not_encrypted() {
    // The control for the test above: the same room unencrypted shows the marker to the server.
    let (mut sim, n) = relay_only_world(9200, &[false, false]);
    let seen = instrument(&mut sim);
    let sent = chatter(&mut sim, &n, 5);
    assert!(sim.run_until(Duration::from_secs(10), |sim| room_texts(sim, n[1]).values().map(Vec::len).sum::<usize>() >= sent[&n[0]].len()));
    assert!(seen.borrow().iter().any(|t| t.contains(MARKER)), "a plaintext room goes through the server in the clear");
}

/// Replaces the ephemeral key in every key-exchange offer or answer the server relays.
fn swap_exchange_keys(text: &str, mallory: &EphemeralKey) -> Option<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut frame: Value = serde_json::from_str(text).ok()?;
    if frame["type"] == "relay" && frame["payload"]["peerlink"] == "e2e/1" {
        let mut msg = b64.decode(frame["payload"]["m"].as_str().unwrap_or_default()).unwrap_or_default();
        if msg.len() > 99 && matches!(msg[1], 1 | 2) {
            msg[34..99].copy_from_slice(mallory.public());
            frame["payload"]["m"] = Value::String(b64.encode(&msg));
        }
    }
    Some(frame.to_string())
}

#[test]
fn a_server_swapping_exchange_keys_is_caught_and_nothing_is_delivered() {
    let (mut sim, n) = relay_only_world(9300, &[true, true]);
    let mallory = EphemeralKey::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(66));
    let seen = Rc::new(RefCell::new(Vec::new()));
    let log = seen.clone();
    sim.set_signaling_filter(move |_, text| {
        log.borrow_mut().push(text.to_owned());
        swap_exchange_keys(text, &mallory)
    });
    // The filter is in place before the exchange can complete: start one now.
    sim.with_node(n[0], |node, now| node.room_send(now, ROOM, None, RoomData::Text(MARKER.into()))).unwrap();
    sim.with_node(n[1], |node, now| node.room_send(now, ROOM, None, RoomData::Text(MARKER.into()))).unwrap();
    sim.run_for(Duration::from_secs(20));
    let refused = |x: NodeId| {
        sim.events(x)
            .iter()
            .filter_map(|(_, e)| match e {
                NodeEvent::Encryption(EncryptionEvent::Refused { error, .. }) => Some(error.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let all: Vec<E2eError> = refused(n[0]).into_iter().chain(refused(n[1])).collect();
    assert!(all.iter().any(|e| matches!(e, E2eError::BadSignature(_))), "the swap is detected: {all:?}");
    for &x in &n {
        assert!(!sim.events(x).iter().any(|(_, e)| matches!(e, NodeEvent::Encryption(EncryptionEvent::Ready { .. }))), "{}: no session", sim.name(x));
        assert!(room_texts(&sim, x).is_empty(), "{}: nothing delivered", sim.name(x));
    }
    assert!(!seen.borrow().iter().any(|t| t.contains(MARKER)), "and nothing sent in the clear");
}

#[test]
fn a_member_that_did_not_join_encrypted_is_refused_not_delivered() {
    let (mut sim, n) = relay_only_world(9400, &[true, false]);
    sim.with_node(n[1], |node, now| node.room_send(now, ROOM, None, RoomData::Text("clear".into()))).unwrap();
    sim.with_node(n[1], |node, now| node.room_send(now, ROOM, None, RoomData::Text("clear again".into()))).unwrap();
    sim.run_for(Duration::from_secs(5));
    let fb = sim.fingerprint(n[1]);
    let errors: Vec<&RoomEvent> = sim
        .events(n[0])
        .iter()
        .filter_map(|(_, e)| match e {
            NodeEvent::Room(r @ RoomEvent::Error { error: RoomError::Unencrypted { from }, .. }) if *from == fb => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 1, "said once, however often it is sent again");
    assert!(room_texts(&sim, n[0]).is_empty(), "plaintext is not delivered in an encrypted room");
    // The encrypted member's messages wait for a session that never comes (bounded by the
    // room's unacknowledged limit), rather than going out in the clear.
    sim.with_node(n[0], |node, now| node.room_send(now, ROOM, None, RoomData::Text(MARKER.into()))).unwrap();
    sim.run_for(Duration::from_secs(3));
    assert!(room_texts(&sim, n[1]).is_empty());
    assert_eq!(sim.node(n[0]).room(ROOM).unwrap().members[0].unacked, 1);
}

fn transfer_events(sim: &Sim, n: NodeId) -> Vec<TransferEvent> {
    sim.events(n)
        .iter()
        .filter_map(|(_, e)| match e {
            NodeEvent::Transfer(t) => Some(t.clone()),
            _ => None,
        })
        .collect()
}

/// Accepts every offer `n` got into memory.
fn accept_offers(sim: &mut Sim, n: NodeId, done: &mut Vec<u64>) {
    for t in transfer_events(sim, n) {
        if let TransferEvent::Offered { peer, offer, .. } = t
            && !done.contains(&offer.id)
        {
            done.push(offer.id);
            sim.with_node(n, |node, now| node.accept_to_memory(now, peer, offer.id)).unwrap();
        }
    }
}

#[test]
fn a_file_offered_before_the_session_is_ready_waits_then_arrives_sealed() {
    let (mut sim, n) = room_world_with(9500, &[true, true], true);
    let fb = sim.fingerprint(n[1]);
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
    let id = sim.with_node(n[0], |node, now| node.send_bytes(now, fb, "early.bin", data.clone())).unwrap();
    let mut accepted = Vec::new();
    let arrived = |sim: &Sim| transfer_events(sim, n[1]).iter().any(|t| matches!(t, TransferEvent::Received { id: i, .. } if *i == id));
    for _ in 0..600 {
        accept_offers(&mut sim, n[1], &mut accepted);
        if arrived(&sim) {
            break;
        }
        sim.run_for(Duration::from_millis(50));
    }
    assert!(arrived(&sim), "the transfer completed");
    let got = transfer_events(&sim, n[1]).into_iter().find_map(|t| match t {
        TransferEvent::Received { id: i, data, .. } if i == id => Some(data),
        _ => None,
    });
    assert!(got.as_deref() == Some(&data[..]));
    // The offer went after the session was ready (nothing of it in the clear).
    let ready_at = sim.events(n[0]).iter().find(|(_, e)| matches!(e, NodeEvent::Encryption(EncryptionEvent::Ready { .. }))).map(|(t, _)| *t).unwrap();
    let offered_at = sim.events(n[1]).iter().find(|(_, e)| matches!(e, NodeEvent::Transfer(TransferEvent::Offered { .. }))).map(|(t, _)| *t).unwrap();
    assert!(offered_at >= ready_at, "offered at {offered_at:?}, ready at {ready_at:?}");
}

#[test]
fn plaintext_transfers_from_a_member_of_an_encrypted_room_are_refused() {
    // n1 joined without encryption; n0 treats it as a member of its encrypted room.
    let (mut sim, n) = room_world_with(9600, &[true, false], true);
    assert!(sim.run_until(Duration::from_secs(10), |sim| connected(sim, n[0], n[1])));
    let fa = sim.fingerprint(n[0]);
    sim.with_node(n[1], |node, now| node.send_bytes(now, fa, "clear.bin", vec![7; 50_000])).unwrap();
    sim.run_for(Duration::from_secs(3));
    let events = transfer_events(&sim, n[0]);
    assert!(
        events.iter().any(|t| matches!(t, TransferEvent::BadMessage { error: peerlink::transfer::TransferError::Unencrypted, .. })),
        "refused with a typed error: {events:?}"
    );
    assert!(!events.iter().any(|t| matches!(t, TransferEvent::Offered { .. })), "the offer never reached the application");
}

#[test]
fn a_member_that_comes_back_gets_new_keys_and_the_room_goes_on() {
    let (mut sim, n) = relay_only_world(9700, &[true, true]);
    assert!(sim.run_until(Duration::from_secs(10), |sim| ready(sim, n[0], n[1]) && ready(sim, n[1], n[0])));
    let first = sim.node(n[0]).room(ROOM).unwrap().members.len();
    assert_eq!(first, 1);
    // n1's signaling connection drops long enough for the server to end its session: it
    // comes back as a new member, and both sides run a new exchange.
    sim.set_signaling_down(n[1], true);
    sim.run_for(Duration::from_secs(90));
    sim.set_signaling_down(n[1], false);
    let readies = |sim: &Sim, x: NodeId| sim.events(x).iter().filter(|(_, e)| matches!(e, NodeEvent::Encryption(EncryptionEvent::Ready { .. }))).count();
    assert!(sim.run_until(Duration::from_secs(60), |sim| readies(sim, n[0]) >= 2 && readies(sim, n[1]) >= 2), "a new exchange: {} / {}", readies(&sim, n[0]), readies(&sim, n[1]));
    sim.with_node(n[1], |node, now| node.room_send(now, ROOM, None, RoomData::Text("back".into()))).unwrap();
    assert!(sim.run_until(Duration::from_secs(20), |sim| room_texts(sim, n[0]).values().flatten().any(|(t, _)| t == "back")));
}

#[test]
fn sessions_rekey_across_the_limit_and_the_room_and_a_transfer_lose_nothing() {
    // A key lasts 16 messages (or 64 KiB): hundreds of rekeys in both lanes.
    let mut config = room_config();
    config.rooms.e2e_limits = peerlink::e2e::Limits::new(16, 64 * 1024);
    let (mut sim, n) = room_world_config(9800, &[true, true], true, config);
    assert!(sim.run_until(Duration::from_secs(10), |sim| ready(sim, n[0], n[1]) && ready(sim, n[1], n[0])));
    let sent = chatter(&mut sim, &n, 400);
    let fb = sim.fingerprint(n[1]);
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 5) as u8).collect();
    let id = sim.with_node(n[0], |node, now| node.send_bytes(now, fb, "big.bin", data.clone())).unwrap();
    let mut accepted = Vec::new();
    let done = |sim: &Sim| {
        let texts = |r: NodeId, s: NodeId| room_texts(sim, r).get(&sim.fingerprint(s).short()).map_or(0, Vec::len);
        texts(n[0], n[1]) >= sent[&n[1]].len()
            && texts(n[1], n[0]) >= sent[&n[0]].len()
            && transfer_events(sim, n[1]).iter().any(|t| matches!(t, TransferEvent::Received { id: i, .. } if *i == id))
    };
    for _ in 0..1200 {
        accept_offers(&mut sim, n[1], &mut accepted);
        if done(&sim) {
            break;
        }
        sim.run_for(Duration::from_millis(50));
    }
    assert!(done(&sim), "everything arrived across the rekeys");
    for (r, s) in [(n[0], n[1]), (n[1], n[0])] {
        let got: Vec<String> = room_texts(&sim, r)[&sim.fingerprint(s).short()].iter().map(|(t, _)| t.clone()).collect();
        assert_eq!(got, sent[&s], "once, in order");
    }
    let got = transfer_events(&sim, n[1]).into_iter().find_map(|t| match t {
        TransferEvent::Received { id: i, data, .. } if i == id => Some(data),
        _ => None,
    });
    assert!(got.as_deref() == Some(&data[..]), "the file is intact");
    for &x in &n {
        let refused: Vec<_> = sim.events(x).iter().filter(|(_, e)| matches!(e, NodeEvent::Encryption(EncryptionEvent::Refused { .. }))).collect();
        assert!(refused.is_empty(), "{refused:?}");
    }
}
