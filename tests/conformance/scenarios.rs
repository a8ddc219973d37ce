//! The scenarios every backend must pass, written once against [`World`].

use peerlink::{ErrorCode, JoinOptions, Payload, RoomData, RoomError, RoomEvent, RoomOptions};

use crate::world::World;

fn texts_from(w: &dyn World, i: usize, from: usize) -> Vec<String> {
    let fp = w.fingerprint(from);
    w.events(i)
        .iter()
        .filter_map(|e| match e {
            RoomEvent::Data { from, data: Payload::Text(t), .. } if *from == fp => Some(t.clone()),
            _ => None,
        })
        .collect()
}

/// Member 0 creates `room` (at most `max` members); members 1.. join; everyone is directly
/// connected to everyone at the end.
pub fn form(w: &mut dyn World, room: &str, max: u32) {
    form_with(w, room, max, false);
}

/// [`form`], the room end-to-end encrypted or not.
fn form_with(w: &mut dyn World, room: &str, max: u32, encrypted: bool) {
    let options = RoomOptions::group(max).metadata(serde_json::json!({ "kind": "conformance" }));
    w.create_room(0, room, if encrypted { options.encrypted() } else { options }).unwrap();
    for i in 1..w.len() {
        let options = if encrypted { JoinOptions::encrypted() } else { JoinOptions::default() };
        w.join_room(i, room, options).unwrap_or_else(|e| panic!("{}: member {i} join: {e:?}", w.backend()));
    }
    let n = w.len();
    let room_id = room.to_owned();
    let mut views = Vec::new();
    for i in 0..n {
        views.push(w.info(i, &room_id).unwrap_or_else(|| panic!("member {i} has no view")));
    }
    for (i, v) in views.iter().enumerate() {
        assert_eq!(v.owner, w.fingerprint(0), "{}: owner seen by {i}", w.backend());
        assert_eq!(v.encrypted, encrypted, "{}: encrypted as asked, seen by {i}", w.backend());
        assert_eq!(v.max_size, max);
        assert_eq!(v.metadata.as_ref().map(|m| m.0.get()), Some(r#"{"kind":"conformance"}"#));
    }
    // Everyone hears of everyone who joined after it.
    w.run_until("members", &mut |ev| {
        (0..n).all(|i| ev[i].iter().filter(|e| matches!(e, RoomEvent::PeerJoined { .. })).count() == n - 1 - i)
    });
}

/// Everyone sends to everyone, then one member to one other: exactly once, in order.
pub fn delivery(w: &mut dyn World) {
    delivery_in(w, "conf-delivery", false);
}

/// [`delivery`] in an end-to-end encrypted room (sends start before the sessions are ready):
/// the same, and nothing refused.
pub fn encrypted_delivery(w: &mut dyn World) {
    delivery_in(w, "conf-encrypted", true);
    for i in 0..w.len() {
        let errors: Vec<&RoomEvent> = w.events(i).iter().filter(|e| matches!(e, RoomEvent::Error { .. })).collect();
        assert!(errors.is_empty(), "{}: member {i}: {errors:?}", w.backend());
    }
}

fn delivery_in(w: &mut dyn World, room: &str, encrypted: bool) {
    form_with(w, room, 8, encrypted);
    let n = w.len();
    for k in 0..20 {
        for i in 0..n {
            w.send(i, room, None, RoomData::Text(format!("{i}:{k}"))).unwrap();
        }
    }
    let to = w.fingerprint(2);
    w.send(1, room, Some(to), RoomData::Json(r#"{"only":2}"#.into())).unwrap();
    w.send(1, room, None, RoomData::Binary(vec![1, 2, 3])).unwrap();
    w.broadcast_via_server(0, room, &serde_json::json!({ "via": "server" })).unwrap();
    w.run_until("delivery", &mut |ev| {
        (0..n).all(|i| {
            let want = 20 * (n - 1) + usize::from(i != 1) + usize::from(i != 0) + usize::from(i == 2);
            ev[i].iter().filter(|e| matches!(e, RoomEvent::Data { .. })).count() >= want
        })
    });
    for i in 0..n {
        for j in (0..n).filter(|j| *j != i) {
            let mut want: Vec<String> = (0..20).map(|k| format!("{j}:{k}")).collect();
            if j == 1 && i == 2 {
                want.push(r#"{"only":2}"#.into());
            }
            if j == 0 {
                want.push(r#"{"via":"server"}"#.into());
            }
            assert_eq!(texts_from(w, i, j), want, "{}: {i} from {j}", w.backend());
        }
        if i != 1 {
            let bins = w.events(i).iter().filter(|e| matches!(e, RoomEvent::Data { data: Payload::Binary(b), .. } if b == &[1, 2, 3])).count();
            assert_eq!(bins, 1, "{}: member {i}", w.backend());
        }
    }
}

/// Presence reaches the others; clearing it is seen too.
pub fn presence(w: &mut dyn World) {
    let room = "conf-presence";
    form(w, room, 8);
    let n = w.len();
    w.set_presence(1, room, Some(&serde_json::json!({ "typing": true }))).unwrap();
    let fp = w.fingerprint(1);
    w.run_until("presence", &mut |ev| {
        (0..n).filter(|i| *i != 1).all(|i| ev[i].iter().any(|e| matches!(e, RoomEvent::Presence { peer, state: Some(_), .. } if *peer == fp)))
    });
    assert_eq!(w.info(0, room).unwrap().members.iter().find(|m| m.info.fingerprint == fp).unwrap().presence, Some(serde_json::json!({ "typing": true })));
    w.set_presence(1, room, None).unwrap();
    w.run_until("presence cleared", &mut |ev| {
        (0..n).filter(|i| *i != 1).all(|i| ev[i].iter().any(|e| matches!(e, RoomEvent::Presence { peer, state: None, .. } if *peer == fp)))
    });
}

/// Refusals: each gets its documented error and nothing else happens.
pub fn refusals(w: &mut dyn World) {
    let room = "conf-refusals";
    let n = w.len() as u32;
    form(w, room, n);
    let (f0, f2) = (w.fingerprint(0), w.fingerprint(2));
    assert_eq!(w.kick(1, room, f0), Err(Some(RoomError::NotOwner)), "{}", w.backend());
    let stranger = peerlink::Fingerprint::from_bytes([7; 32]);
    assert_eq!(w.send(1, room, Some(stranger), RoomData::Text("x".into())), Err(Some(RoomError::NotMember(stranger))));
    assert_eq!(w.send(1, "not-joined", None, RoomData::Text("x".into())), Err(Some(RoomError::NotJoined("not-joined".into()))));
    assert!(matches!(w.send(1, room, None, RoomData::Binary(vec![0; 100_000])), Err(Some(RoomError::MessageTooLarge { .. }))));
    assert!(matches!(w.create_room(2, room, RoomOptions::default()), Err(Some(RoomError::AlreadyJoined(_)))));
    // The room is full: a new room of 2 refuses a third member with the server's `room_full`.
    w.create_room(0, "conf-pair", RoomOptions::direct()).unwrap();
    w.join_room(1, "conf-pair", JoinOptions::default()).unwrap();
    match w.join_room(2, "conf-pair", JoinOptions::default()) {
        Err(Some(RoomError::Request(e))) => assert_eq!(e.code(), Some(ErrorCode::RoomFull), "{}", w.backend()),
        other => panic!("{}: third in a pair: {other:?}", w.backend()),
    }
    // Nobody saw an error event or a message from all that.
    for i in 0..w.len() {
        assert!(w.events(i).iter().all(|e| !matches!(e, RoomEvent::Data { .. })), "{}: {i}", w.backend());
    }
    // The owner kicks member 2; the rest see it leave.
    w.kick(0, room, f2).unwrap();
    let n = n as usize;
    w.run_until("kick", &mut |ev| {
        ev[2].contains(&RoomEvent::Kicked { room: room.into() })
            && (0..n).filter(|i| *i != 2).all(|i| i == 0 || ev[i].iter().any(|e| matches!(e, RoomEvent::PeerLeft { peer, kicked: true, .. } if *peer == f2)))
    });
}

/// Leaving is seen by the rest; the owner leaving closes the room for all.
pub fn leave_and_close(w: &mut dyn World) {
    let room = "conf-leave";
    form(w, room, 8);
    let n = w.len();
    let last = n - 1;
    let fl = w.fingerprint(last);
    w.leave(last, room).unwrap();
    w.run_until("left", &mut |ev| {
        (0..last).all(|i| ev[i].iter().any(|e| matches!(e, RoomEvent::PeerLeft { peer, kicked: false, .. } if *peer == fl)))
    });
    assert!(w.info(last, room).is_none());
    w.leave(0, room).unwrap();
    w.run_until("closed", &mut |ev| (0..last).all(|i| ev[i].contains(&RoomEvent::Closed { room: room.into() })));
    for i in 0..n {
        assert!(w.info(i, room).is_none(), "{}: {i}", w.backend());
    }
}
