//! Rooms: create, join, info, a full room refuses, the owner kicks, a non-owner's kick is
//! refused, close.

use peerlink::ClientEvent;
use peerlink::ErrorCode;
use peerlink_blocking::{Client, Error};
use peerlink_tests::*;
use serde_json::json;

fn code(e: Error) -> Option<ErrorCode> {
    match e {
        Error::Request(r) => r.code(),
        other => panic!("expected a server error, got {other:?}"),
    }
}

fn wait_for(c: &mut Client, what: &str, pred: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
    eventually(what, || c.events().find(|e| pred(e)))
}

#[test]
fn room_lifecycle_with_owner_rights_and_size_limit() {
    let server = start_server(Default::default());
    let url = server.url();
    let mut owner = Client::connect(client_config(&url, "owner")).unwrap();
    let mut p1 = Client::connect(client_config(&url, "p1")).unwrap();
    let mut p2 = Client::connect(client_config(&url, "p2")).unwrap();
    let mut p3 = Client::connect(client_config(&url, "p3")).unwrap();

    let room = owner.create_room("den", Some(3), Some(json!({"topic": "rust"}))).unwrap();
    assert_eq!((room.owner, room.max_size), (owner.fingerprint(), 3));
    assert_eq!(code(p1.create_room("den", None, None).unwrap_err()), Some(ErrorCode::RoomExists));

    let (details, peers) = p1.join_room("den").unwrap();
    assert_eq!(details.metadata.unwrap().to_value(), json!({"topic": "rust"}));
    assert_eq!(fingerprints(&peers), vec![owner.fingerprint()]);
    let (_, peers) = p2.join_room("den").unwrap();
    assert_eq!(fingerprints(&peers), vec![owner.fingerprint(), p1.fingerprint()]);
    assert_eq!(code(p3.join_room("den").unwrap_err()), Some(ErrorCode::RoomFull), "a full room refuses");

    let (info, members) = p3.room_info("den").unwrap();
    assert_eq!((info.owner, members), (owner.fingerprint(), 3));

    let fp2 = p2.fingerprint();
    assert_eq!(code(p1.kick("den", fp2).unwrap_err()), Some(ErrorCode::NotRoomOwner), "only the owner kicks");
    owner.kick("den", fp2).unwrap();
    wait_for(&mut p2, "kicked", |e| matches!(e, ClientEvent::Kicked { room_id } if room_id == "den"));
    wait_for(&mut p1, "room_peer_left", |e| {
        matches!(e, ClientEvent::RoomPeerLeft { fingerprint, kicked: true, .. } if *fingerprint == fp2)
    });
    // The kick freed a seat.
    p3.join_room("den").unwrap();

    assert_eq!(code(p1.close_room("den").unwrap_err()), Some(ErrorCode::NotRoomOwner));
    owner.close_room("den").unwrap();
    for c in [&mut p1, &mut p3] {
        wait_for(c, "room_closed", |e| matches!(e, ClientEvent::RoomClosed { room_id } if room_id == "den"));
    }
    assert_eq!(code(p1.room_info("den").unwrap_err()), Some(ErrorCode::RoomNotFound));
    server.shutdown();
}
