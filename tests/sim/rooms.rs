//! Managed rooms in the simulator: relay fallback and back, signaling outages, presence, and
//! bad input. Every message must arrive exactly once and in order per sender.

use std::collections::BTreeMap;
use std::time::Duration;

use peerlink::{ClientEvent, Fingerprint, NodeConfig, NodeError, NodeEvent, Payload, RoomData, RoomError, RoomEvent, RoomOptions, RoomPath};
use peerlink_sim::{NodeId, Sim};

use crate::harness::*;

const ROOM: &str = "room";

fn room_config() -> NodeConfig {
    let mut c = config();
    c.peer.connect_timeout = Duration::from_secs(5);
    c.peer.disconnect_timeout = Duration::from_secs(2);
    c
}

fn room_events(sim: &Sim, n: NodeId) -> Vec<RoomEvent> {
    sim.events(n)
        .iter()
        .filter_map(|(_, e)| match e {
            NodeEvent::Room(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

/// The room messages `n` received, per sender, with the path each came by.
fn room_received(sim: &Sim, n: NodeId) -> BTreeMap<Fingerprint, Vec<(String, RoomPath)>> {
    let mut out: BTreeMap<Fingerprint, Vec<(String, RoomPath)>> = BTreeMap::new();
    for e in room_events(sim, n) {
        if let RoomEvent::Data { from, data: Payload::Text(t), path, .. } = e {
            out.entry(from).or_default().push((t, path));
        }
    }
    out
}

/// Whether every member saw everything `sent` (per sender, in order).
fn all_delivered(sim: &Sim, nodes: &[NodeId], sent: &BTreeMap<NodeId, Vec<String>>) -> bool {
    nodes.iter().all(|&n| {
        let got = room_received(sim, n);
        nodes.iter().filter(|&&s| s != n).all(|s| got.get(&sim.fingerprint(*s)).map_or(0, Vec::len) >= sent[s].len())
    })
}

/// Checks exactly once and in order per sender.
fn check_exactly_once(sim: &Sim, nodes: &[NodeId], sent: &BTreeMap<NodeId, Vec<String>>) {
    for &n in nodes {
        let got = room_received(sim, n);
        for &s in nodes.iter().filter(|&&s| s != n) {
            let texts: Vec<&str> = got.get(&sim.fingerprint(s)).map(|v| v.iter().map(|(t, _)| t.as_str()).collect()).unwrap_or_default();
            let want: Vec<&str> = sent[&s].iter().map(String::as_str).collect();
            assert_eq!(texts, want, "seed {}: {} from {}", sim.seed(), sim.name(n), sim.name(s));
        }
    }
}

/// Every member sends one message to the room every `every`, for `duration`.
fn chatter(sim: &mut Sim, nodes: &[NodeId], sent: &mut BTreeMap<NodeId, Vec<String>>, duration: Duration, every: Duration) {
    let end = sim.elapsed() + duration;
    while sim.elapsed() < end {
        for &n in nodes {
            let list = sent.entry(n).or_default();
            let text = format!("{}-{}", sim.name(n), list.len());
            let result = sim.with_node(n, |node, now| node.room_send(now, ROOM, None, RoomData::Text(text.clone())));
            match result {
                Ok(()) => list.push(text),
                Err(NodeError::Room(RoomError::WouldBlock { .. })) => {}
                Err(e) => panic!("send: {e}"),
            }
        }
        sim.run_for(every);
    }
}

#[test]
fn relay_fallback_and_back_delivers_exactly_once_in_order_over_100_seeds() {
    for seed in 0..100 {
        let (mut sim, nodes) = room_world(ROOM, seed, 3, room_config());
        let (a, b) = (nodes[0], nodes[1]);
        // UDP between a and b is blocked from the start: their messages take the relay.
        sim.partition(a, b);
        let mut sent = BTreeMap::new();
        chatter(&mut sim, &nodes, &mut sent, Duration::from_secs(4), Duration::from_millis(100));
        // Unblocked: the next call (or the ICE checks still running) finds the direct path.
        sim.heal(a, b);
        chatter(&mut sim, &nodes, &mut sent, Duration::from_secs(12), Duration::from_millis(100));
        assert!(sim.run_until(Duration::from_secs(5), |sim| connected(sim, a, b)), "seed {seed}: a and b never connected");
        // Blocked again mid-stream: direct -> relay, then healed: relay -> direct.
        sim.partition(a, b);
        chatter(&mut sim, &nodes, &mut sent, Duration::from_secs(6), Duration::from_millis(50));
        sim.heal(a, b);
        chatter(&mut sim, &nodes, &mut sent, Duration::from_secs(10), Duration::from_millis(100));
        assert!(sim.run_until(Duration::from_secs(30), |sim| all_delivered(sim, &nodes, &sent)), "seed {seed}: not everything arrived");
        sim.run_for(Duration::from_secs(2));
        check_exactly_once(&sim, &nodes, &sent);
        // Both paths carried a's messages to b.
        let via: Vec<RoomPath> = room_received(&sim, b)[&sim.fingerprint(a)].iter().map(|(_, p)| *p).collect();
        assert!(via.contains(&RoomPath::Relay) && via.contains(&RoomPath::Direct), "seed {seed}: paths {via:?}");
        let changes: Vec<RoomPath> = room_events(&sim, a)
            .into_iter()
            .filter_map(|e| match e {
                RoomEvent::PathChanged { peer, path, .. } if peer == sim.fingerprint(b) => Some(path),
                _ => None,
            })
            .collect();
        assert!(changes.windows(2).any(|w| w == [RoomPath::Direct, RoomPath::Relay]), "seed {seed}: {changes:?}");
        assert_eq!(changes.last(), Some(&RoomPath::Direct), "seed {seed}: {changes:?}");
    }
}

#[test]
fn a_signaling_outage_loses_nothing() {
    let (mut sim, nodes) = room_world(ROOM, 7, 3, room_config());
    let a = nodes[0];
    // a reaches the others only through the server, which it loses for 10 s while everyone
    // keeps sending.
    for &o in &nodes[1..] {
        sim.partition(a, o);
    }
    let mut sent = BTreeMap::new();
    chatter(&mut sim, &nodes, &mut sent, Duration::from_secs(2), Duration::from_millis(100));
    sim.set_signaling_down(a, true);
    chatter(&mut sim, &nodes, &mut sent, Duration::from_secs(10), Duration::from_millis(100));
    sim.set_signaling_down(a, false);
    chatter(&mut sim, &nodes, &mut sent, Duration::from_secs(3), Duration::from_millis(100));
    assert!(sim.run_until(Duration::from_secs(30), |sim| all_delivered(sim, &nodes, &sent)), "not everything arrived");
    sim.run_for(Duration::from_secs(2));
    check_exactly_once(&sim, &nodes, &sent);
    assert!(
        sim.events(a).iter().any(|(_, e)| matches!(e, NodeEvent::Signaling(ClientEvent::Reconnected { .. }))),
        "a never reconnected"
    );
}

#[test]
fn presence_is_rate_limited_and_expires() {
    let mut config = room_config();
    config.rooms.presence_ttl = Duration::from_secs(3);
    let (mut sim, nodes) = room_world(ROOM, 11, 3, config);
    let (a, b, c) = (nodes[0], nodes[1], nodes[2]);
    sim.run_for(Duration::from_secs(2));
    // 100 updates in one second: b hears about 10 of them (one per 100 ms), the last one last.
    for i in 0..100 {
        let state = serde_json::json!({ "cursor": i });
        sim.with_node(a, |node, now| node.set_presence(now, ROOM, Some(&state))).unwrap();
        sim.run_for(Duration::from_millis(10));
    }
    sim.run_for(Duration::from_secs(1));
    let seen: Vec<serde_json::Value> = room_events(&sim, b)
        .into_iter()
        .filter_map(|e| match e {
            RoomEvent::Presence { peer, state: Some(s), .. } if peer == sim.fingerprint(a) => Some(s),
            _ => None,
        })
        .collect();
    assert!((5..=12).contains(&seen.len()), "{} updates heard: {seen:?}", seen.len());
    assert_eq!(seen.last(), Some(&serde_json::json!({ "cursor": 99 })));
    assert_eq!(sim.node(b).room(ROOM).unwrap().members.iter().find(|m| m.info.fingerprint == sim.fingerprint(a)).unwrap().presence, Some(serde_json::json!({ "cursor": 99 })));
    // Refreshed while a stays: no expiry over several TTLs.
    sim.run_for(Duration::from_secs(10));
    assert!(!room_events(&sim, b).iter().any(|e| matches!(e, RoomEvent::PresenceExpired { .. })));
    // c says it is typing, then vanishes (no network at all): its presence expires at a and
    // b, and once the server gives up on its session, it leaves.
    sim.with_node(c, |node, now| node.set_presence(now, ROOM, Some(&serde_json::json!({ "typing": true })))).unwrap();
    sim.run_for(Duration::from_secs(1));
    assert!(room_events(&sim, a).iter().any(|e| matches!(e, RoomEvent::Presence { peer, state: Some(_), .. } if *peer == sim.fingerprint(c))));
    sim.set_signaling_down(c, true);
    sim.partition(a, c);
    sim.partition(b, c);
    sim.run_for(Duration::from_secs(4));
    for n in [a, b] {
        assert!(room_events(&sim, n).iter().any(|e| matches!(e, RoomEvent::PresenceExpired { peer, .. } if *peer == sim.fingerprint(c))), "{}", sim.name(n));
    }
    sim.run_for(Duration::from_secs(40));
    for n in [a, b] {
        assert!(room_events(&sim, n).iter().any(|e| matches!(e, RoomEvent::PeerLeft { peer, kicked: false, .. } if *peer == sim.fingerprint(c))), "{}", sim.name(n));
    }
}

#[test]
fn bad_room_input_gets_typed_errors_and_affects_nobody_else() {
    let (mut sim, nodes) = room_world(ROOM, 5, 3, room_config());
    let (a, b, c) = (nodes[0], nodes[1], nodes[2]);
    let stranger = sim.add_node("stranger", room_config());
    sim.run_for(Duration::from_secs(3));
    let (fa, fb, fs) = (sim.fingerprint(a), sim.fingerprint(b), sim.fingerprint(stranger));

    // A non-owner's kick, a kick of a stranger, a send to a stranger, an oversized message,
    // a room we are not in: refused at once, nothing sent.
    let r = sim.with_node(b, |node, now| node.kick(now, ROOM, fa));
    assert_eq!(r, Err(NodeError::Room(RoomError::NotOwner)));
    let r = sim.with_node(a, |node, now| node.kick(now, ROOM, fs));
    assert_eq!(r, Err(NodeError::Room(RoomError::NotMember(fs))));
    let r = sim.with_node(a, |node, now| node.room_send(now, ROOM, Some(fs), RoomData::Text("hi".into())));
    assert_eq!(r, Err(NodeError::Room(RoomError::NotMember(fs))));
    let r = sim.with_node(a, |node, now| node.room_send(now, ROOM, None, RoomData::Binary(vec![0; 64 * 1024])));
    assert!(matches!(r, Err(NodeError::Room(RoomError::MessageTooLarge { .. }))), "{r:?}");
    let r = sim.with_node(a, |node, now| node.room_send(now, ROOM, None, RoomData::Json("not json".into())));
    assert!(matches!(r, Err(NodeError::Room(RoomError::Serialize(_)))), "{r:?}");
    // JSON null, as text or serialized (`"j":null` reads as an item without contents).
    let r = sim.with_node(a, |node, now| node.room_send(now, ROOM, None, RoomData::Json(" null ".into())));
    assert!(matches!(r, Err(NodeError::Room(RoomError::Serialize(_)))), "{r:?}");
    let r = sim.with_node(a, |node, now| node.room_send_json(now, ROOM, None, &Option::<u8>::None));
    assert!(matches!(r, Err(NodeError::Room(RoomError::Serialize(_)))), "{r:?}");
    let r = sim.with_node(a, |node, now| node.room_send(now, "elsewhere", None, RoomData::Text("hi".into())));
    assert_eq!(r, Err(NodeError::Room(RoomError::NotJoined("elsewhere".into()))));
    let r = sim.with_node(a, |node, now| node.join_room(now, ROOM));
    assert_eq!(r, Err(NodeError::Room(RoomError::AlreadyJoined(ROOM.into()))));

    // Malformed room batches from b, by relay: a reports them; the room goes on.
    for bad in [
        serde_json::json!({ "peerlink": "room/1" }),
        serde_json::json!({ "peerlink": "room/1", "key": "x", "sig": "y", "to": fa, "body": "{}" }),
    ] {
        sim.with_node(b, |node, _| node.client_mut().relay(fa, &bad)).unwrap();
    }
    // A forged one: b's batch, signed for c, that the server hands to a.
    sim.run_for(Duration::from_secs(1));
    let errors: Vec<RoomError> = room_events(&sim, a)
        .into_iter()
        .filter_map(|e| match e {
            RoomEvent::Error { error, .. } => Some(error),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().all(|e| matches!(e, RoomError::BadMessage { from, .. } if *from == fb)), "{errors:?}");
    assert!(room_events(&sim, c).iter().all(|e| !matches!(e, RoomEvent::Error { .. })));

    let mut sent = BTreeMap::new();
    chatter(&mut sim, &nodes, &mut sent, Duration::from_secs(2), Duration::from_millis(100));
    assert!(sim.run_until(Duration::from_secs(10), |sim| all_delivered(sim, &nodes, &sent)));
    check_exactly_once(&sim, &nodes, &sent);
}

#[test]
fn a_server_that_forges_the_sender_of_a_room_batch_is_caught() {
    let (mut sim, nodes) = room_world(ROOM, 9, 3, room_config());
    let (a, b, c) = (nodes[0], nodes[1], nodes[2]);
    let (fb, fc) = (sim.fingerprint(b), sim.fingerprint(c));
    // Every path is blocked so room messages take the relay; the server then rewrites each
    // relay from b to a as if c had sent it.
    for (x, y) in [(a, b), (a, c), (b, c)] {
        sim.partition(x, y);
    }
    let (fb_hex, fc_hex) = (fb.to_string(), fc.to_string());
    let fa = sim.fingerprint(a);
    sim.set_signaling_filter(move |to, text| {
        if to.0 == 0 && text.contains("room/1") && text.contains(&fb_hex) {
            Some(text.replace(&fb_hex, &fc_hex))
        } else {
            Some(text.to_owned())
        }
    });
    let _ = fa;
    sim.with_node(b, |node, now| node.room_send(now, ROOM, None, RoomData::Text("from b".into()))).unwrap();
    sim.run_for(Duration::from_secs(2));
    let events = room_events(&sim, a);
    assert!(
        events.iter().any(|e| matches!(e, RoomEvent::Error { error: RoomError::BadMessage { from, .. }, .. } if *from == fc)),
        "{events:?}"
    );
    assert!(!events.iter().any(|e| matches!(e, RoomEvent::Data { .. })), "{events:?}");
    // c got its copy, untouched.
    assert!(room_events(&sim, c).iter().any(|e| matches!(e, RoomEvent::Data { from, .. } if *from == fb)));
}

#[test]
fn a_full_room_refuses_and_kick_and_close_reach_everyone() {
    init_tracing();
    let mut sim = Sim::new(3);
    let nodes: Vec<NodeId> = (0..4).map(|i| sim.add_node(format!("n{i}"), room_config())).collect();
    sim.run_for(Duration::from_secs(2));
    sim.with_node(nodes[0], |node, now| node.create_room(now, ROOM, RoomOptions::group(3))).unwrap();
    sim.run_for(Duration::from_millis(200));
    for &n in &nodes[1..] {
        sim.with_node(n, |node, now| node.join_room(now, ROOM)).unwrap();
        sim.run_for(Duration::from_millis(200));
    }
    let last = nodes[3];
    assert!(
        room_events(&sim, last).iter().any(|e| matches!(e, RoomEvent::Error { error: RoomError::Request(r), .. } if r.code() == Some(peerlink::ErrorCode::RoomFull))),
        "{:?}",
        room_events(&sim, last)
    );
    assert!(sim.node(last).room(ROOM).is_none());
    // The owner kicks n1: n1 hears it, n2 sees it leave.
    let f1 = sim.fingerprint(nodes[1]);
    sim.with_node(nodes[0], |node, now| node.kick(now, ROOM, f1)).unwrap();
    sim.run_for(Duration::from_secs(1));
    assert!(room_events(&sim, nodes[1]).contains(&RoomEvent::Kicked { room: ROOM.into() }));
    assert!(room_events(&sim, nodes[2]).iter().any(|e| matches!(e, RoomEvent::PeerLeft { peer, kicked: true, .. } if *peer == f1)));
    // Then closes the room.
    sim.with_node(nodes[0], |node, now| node.leave_room(now, ROOM)).unwrap();
    sim.run_for(Duration::from_secs(1));
    assert!(room_events(&sim, nodes[2]).contains(&RoomEvent::Closed { room: ROOM.into() }));
    assert!(room_events(&sim, nodes[0]).contains(&RoomEvent::Closed { room: ROOM.into() }));
}

#[test]
fn a_lost_session_rejoins_and_the_room_reforms() {
    let (mut sim, nodes) = room_world(ROOM, 13, 3, room_config());
    let (a, b, c) = (nodes[0], nodes[1], nodes[2]);
    let fa = sim.fingerprint(a);
    // a only reaches the others through the server, which it loses for longer than the
    // server keeps its session (30 s): the others see it leave; it comes back, joins again,
    // and the others see it join.
    for &o in &[b, c] {
        sim.partition(a, o);
    }
    let mut sent = BTreeMap::new();
    chatter(&mut sim, &nodes, &mut sent, Duration::from_secs(2), Duration::from_millis(200));
    assert!(sim.run_until(Duration::from_secs(10), |sim| all_delivered(sim, &nodes, &sent)));
    sim.set_signaling_down(a, true);
    // a keeps writing while away; it is all delivered after it is back.
    let mut while_away = Vec::new();
    for k in 0..20 {
        let text = format!("away-{k}");
        sim.with_node(a, |node, now| node.room_send(now, ROOM, None, RoomData::Text(text.clone()))).unwrap();
        while_away.push(text);
        sim.run_for(Duration::from_secs(2));
    }
    for &o in &[b, c] {
        assert!(room_events(&sim, o).iter().any(|e| matches!(e, RoomEvent::PeerLeft { peer, .. } if *peer == fa)), "{} never saw a leave", sim.name(o));
    }
    sim.set_signaling_down(a, false);
    assert!(sim.run_until(Duration::from_secs(20), |sim| [b, c].iter().all(|&o| room_events(sim, o).iter().filter(|e| matches!(e, RoomEvent::PeerJoined { peer, .. } if peer.fingerprint == fa)).count() == 1)), "a did not re-join");
    // After the re-join everyone talks to everyone again.
    let mut after = BTreeMap::new();
    chatter(&mut sim, &nodes, &mut after, Duration::from_secs(3), Duration::from_millis(200));
    assert!(sim.run_until(Duration::from_secs(30), |sim| all_delivered(sim, &nodes, &{
        let mut all = after.clone();
        all.get_mut(&a).unwrap().splice(0..0, while_away.iter().cloned());
        for (n, v) in &sent {
            all.get_mut(n).unwrap().splice(0..0, v.iter().cloned());
        }
        all
    })), "not everything arrived after the re-join");
    sim.run_for(Duration::from_secs(2));
    // What a sent (before, while away, after) reached b and c exactly once, in order.
    for &o in &[b, c] {
        let got: Vec<String> = room_received(&sim, o)[&fa].iter().map(|(t, _)| t.clone()).collect();
        let want: Vec<String> = sent[&a].iter().chain(&while_away).chain(&after[&a]).cloned().collect();
        assert_eq!(got, want, "{} from a", sim.name(o));
    }
    // And a got what the others sent after it was back.
    let got = room_received(&sim, a);
    for &o in &[b, c] {
        // (Texts restart at `-0` for the second round, so compare the tail.)
        let texts: Vec<&String> = got[&sim.fingerprint(o)].iter().map(|(t, _)| t).collect();
        let want: Vec<&String> = sent[&o].iter().chain(&after[&o]).collect();
        assert_eq!(&texts[texts.len() - after[&o].len()..], &want[sent[&o].len()..], "a from {}", sim.name(o));
        assert_eq!(&texts[..sent[&o].len()], &want[..sent[&o].len()], "a from {} before", sim.name(o));
        assert!(texts.len() <= want.len(), "a got more from {} than was sent: {texts:?}", sim.name(o));
    }
}

#[test]
fn a_burst_through_the_relay_is_paced_backpressured_and_complete() {
    let (mut sim, nodes) = room_world(ROOM, 17, 3, room_config());
    let (a, b, c) = (nodes[0], nodes[1], nodes[2]);
    for (x, y) in [(a, b), (a, c), (b, c)] {
        sim.partition(x, y);
    }
    sim.run_for(Duration::from_secs(1));
    // 3,000 messages as fast as a will take them: it refuses with WouldBlock when a member is
    // 512 behind, says Writable when half of that is acknowledged, and the server never has to
    // refuse a frame for its rate limit.
    let mut sent = Vec::new();
    let mut refused = 0;
    while sent.len() < 3000 {
        let text = format!("burst-{}", sent.len());
        match sim.with_node(a, |node, now| node.room_send(now, ROOM, None, RoomData::Text(text.clone()))) {
            Ok(()) => sent.push(text),
            Err(NodeError::Room(RoomError::WouldBlock { .. })) => {
                refused += 1;
                let writable = |sim: &Sim| room_events(sim, a).iter().filter(|e| matches!(e, RoomEvent::Writable { .. })).count();
                let before = writable(&sim);
                assert!(sim.run_until(Duration::from_secs(30), |sim| writable(sim) > before), "no Writable after WouldBlock");
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0, "a burst of 3,000 never met backpressure");
    let done = |sim: &Sim| [b, c].iter().all(|&o| room_received(sim, o).get(&sim.fingerprint(a)).map_or(0, Vec::len) == sent.len());
    assert!(sim.run_until(Duration::from_secs(120), done), "not everything arrived");
    for &o in &[b, c] {
        let got: Vec<String> = room_received(&sim, o)[&sim.fingerprint(a)].iter().map(|(t, _)| t.clone()).collect();
        assert_eq!(got, sent, "{}", sim.name(o));
    }
    let rate_limited = sim.events(a).iter().any(|(_, e)| {
        matches!(e, NodeEvent::Signaling(ClientEvent::Error(peerlink::ClientError::Server { code: peerlink::ErrorCode::RateLimited, .. })))
    });
    assert!(!rate_limited, "the server had to rate-limit a");
}
