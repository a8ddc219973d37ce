//! Audio and video tracks between two nodes in the simulator: adding a track renegotiates,
//! frames arrive intact and in order, mute and unmute reach the other side, keyframe requests
//! reach the sender, removal ends the remote track, and both sides adding tracks at once
//! (renegotiation glare) ends with both tracks.

use std::time::Duration;

use peerlink::{Codec, MediaEvent, MediaFrame, TrackId, TrackOptions};
use peerlink_sim::{NodeId, Sim};

use crate::harness::*;


fn track_added(sim: &Sim, n: NodeId, local: bool, id: &TrackId) -> bool {
    media(sim, n).iter().any(|e| matches!(e, MediaEvent::TrackAdded { track, .. } if track.local == local && &track.id == id))
}

fn frames(sim: &Sim, n: NodeId, id: &TrackId) -> Vec<(u64, Vec<u8>, bool)> {
    media(sim, n)
        .into_iter()
        .filter_map(|e| match e {
            MediaEvent::Frame { track, frame, .. } if &track == id => Some((frame.rtp_time, frame.data.to_vec(), frame.keyframe)),
            _ => None,
        })
        .collect()
}

/// A fake VP8 frame: the first byte's low bit clear marks a keyframe.
fn vp8(i: u64, key: bool) -> Vec<u8> {
    let mut data: Vec<u8> = (0..3000u32).map(|k| (k as u64 * 7 + i) as u8).collect();
    data[0] = if key { 0x10 } else { 0x11 };
    data
}

/// Writes `count` frames at 30 fps from `from`; returns what went.
fn stream(sim: &mut Sim, from: NodeId, to: NodeId, id: &TrackId, first: u64, count: u64) -> Vec<(u64, Vec<u8>)> {
    let peer = sim.fingerprint(to);
    let mut sent = Vec::new();
    for i in first..first + count {
        let data = vp8(i, i % 30 == 0);
        let frame = MediaFrame { codec: Codec::Vp8, rtp_time: i * 3000, data: data.clone().into() };
        if sim.with_node(from, |n, now| n.write_frame(now, peer, id, frame)).unwrap() {
            sent.push((i * 3000, data));
        }
        sim.run_for(Duration::from_millis(33));
    }
    sent
}

#[test]
fn a_video_track_renegotiates_streams_mutes_and_goes() {
    let (mut sim, n) = world(601, 2);
    let (a, b) = (n[0], n[1]);
    connect(&mut sim, a, b, Duration::from_secs(10));
    let fb = sim.fingerprint(b);
    let id = sim.with_node(a, |node, now| node.add_track(now, fb, TrackOptions::video().id("cam").stream("alice"))).unwrap();
    assert_eq!(id, TrackId::from("cam"));
    assert!(sim.run_until(Duration::from_secs(5), |sim| track_added(sim, a, true, &id) && track_added(sim, b, false, &id)), "negotiated");
    let remote = media(&sim, b).into_iter().find_map(|e| match e {
        MediaEvent::TrackAdded { track, .. } => Some(track),
        _ => None,
    });
    assert_eq!(remote.map(|t| (t.stream, t.kind)), Some(("alice".to_owned(), peerlink::TrackKind::Video)));

    let sent = stream(&mut sim, a, b, &id, 0, 60);
    sim.run_for(Duration::from_millis(300));
    assert_eq!(sent.len(), 60, "every frame went");
    let got = frames(&sim, b, &id);
    assert_eq!(got.iter().map(|(t, d, _)| (*t, d.clone())).collect::<Vec<_>>(), sent, "intact and in order");
    assert!(got[0].2 && got[30].2 && !got[1].2, "keyframes recognised");

    // Keyframe request from the receiver reaches the sender.
    let fa = sim.fingerprint(a);
    sim.with_node(b, |node, now| node.request_keyframe(now, fa, &id)).unwrap();
    assert!(sim.run_until(Duration::from_secs(2), |sim| media(sim, a).iter().any(|e| matches!(e, MediaEvent::KeyframeRequested { track, .. } if track == &id))));

    // Mute: the receiver hears of it; frames written meanwhile are dropped.
    sim.with_node(a, |node, now| node.set_track_muted(now, fb, &id, true)).unwrap();
    assert!(sim.run_until(Duration::from_secs(5), |sim| media(sim, b).iter().any(|e| matches!(e, MediaEvent::Muted { muted: true, .. }))));
    let before = frames(&sim, b, &id).len();
    let muted_sent = stream(&mut sim, a, b, &id, 60, 10);
    assert!(muted_sent.is_empty(), "nothing goes while muted");
    assert_eq!(frames(&sim, b, &id).len(), before);
    sim.with_node(a, |node, now| node.set_track_muted(now, fb, &id, false)).unwrap();
    assert!(sim.run_until(Duration::from_secs(5), |sim| media(sim, b).iter().any(|e| matches!(e, MediaEvent::Muted { muted: false, .. }))));
    // The sender sends again once the answer is back (a round trip after the receiver knew):
    // it hears so.
    let sending = |sim: &Sim, on: bool| media(sim, a).iter().filter(|e| matches!(e, MediaEvent::Sending { sending, .. } if *sending == on)).count();
    assert!(sim.run_until(Duration::from_secs(5), |sim| sending(sim, true) == 2 && sending(sim, false) == 1), "sending, muted, sending again");
    let sent = stream(&mut sim, a, b, &id, 70, 30);
    sim.run_for(Duration::from_millis(300));
    assert_eq!(sent.len(), 30, "flows again after unmuting");
    assert!(frames(&sim, b, &id).len() >= before + 25);

    // Removed: the receiver's track ends.
    sim.with_node(a, |node, now| node.remove_track(now, fb, &id)).unwrap();
    assert!(sim.run_until(Duration::from_secs(5), |sim| media(sim, b).iter().any(|e| matches!(e, MediaEvent::TrackRemoved { track, .. } if track == &id))));
    assert!(sim.with_node(a, |node, now| node.write_frame(now, fb, &id, MediaFrame { codec: Codec::Vp8, rtp_time: 0, data: vec![1].into() })).is_err());
}

#[test]
fn both_sides_adding_tracks_at_once_end_with_both() {
    for seed in [602, 603, 604] {
        let (mut sim, n) = world(seed, 2);
        let (a, b) = (n[0], n[1]);
        connect(&mut sim, a, b, Duration::from_secs(10));
        let (fa, fb) = (sim.fingerprint(a), sim.fingerprint(b));
        // In the same instant: both offers cross.
        let ta = sim.with_node(a, |node, now| node.add_track(now, fb, TrackOptions::audio().id("a-mic"))).unwrap();
        let tb = sim.with_node(b, |node, now| node.add_track(now, fa, TrackOptions::video().id("b-cam"))).unwrap();
        assert!(
            sim.run_until(Duration::from_secs(10), |sim| track_added(sim, b, false, &ta) && track_added(sim, a, false, &tb) && track_added(sim, a, true, &ta) && track_added(sim, b, true, &tb)),
            "seed {seed}: both tracks negotiated: a {:?} / b {:?}",
            media(&sim, a),
            media(&sim, b)
        );
        // Audio both ways works after the glare.
        for i in 0..20u64 {
            let frame = MediaFrame { codec: Codec::Opus, rtp_time: i * 960, data: vec![0xfc, i as u8, 1, 2, 3].into() };
            assert!(sim.with_node(a, |node, now| node.write_frame(now, fb, &ta, frame)).unwrap());
            sim.run_for(Duration::from_millis(20));
        }
        sim.run_for(Duration::from_millis(200));
        assert_eq!(frames(&sim, b, &ta).len(), 20, "seed {seed}");
        // A video frame on an audio track is refused.
        let wrong = MediaFrame { codec: Codec::Vp8, rtp_time: 0, data: vec![0x10].into() };
        assert!(sim.with_node(a, |node, now| node.write_frame(now, fb, &ta, wrong)).is_err());
    }
}

#[test]
fn bad_media_commands_get_typed_errors_and_change_nothing() {
    use peerlink::{MediaError, NodeError, SendError};
    let (mut sim, n) = world(605, 3);
    let (a, b, c) = (n[0], n[1], n[2]);
    connect(&mut sim, a, b, Duration::from_secs(10));
    let (fb, fc) = (sim.fingerprint(b), sim.fingerprint(c));
    let err = |r: Result<TrackId, NodeError>| r.unwrap_err();
    // No connection to c.
    assert_eq!(err(sim.with_node(a, |node, now| node.add_track(now, fc, TrackOptions::audio()))), NodeError::Send(SendError::UnknownPeer(fc)));
    // Ids that are not msid tokens.
    for bad in ["", "has space", "é", &"x".repeat(65)] {
        assert_eq!(err(sim.with_node(a, |node, now| node.add_track(now, fb, TrackOptions::audio().id(bad)))), NodeError::Media(MediaError::InvalidId(bad.to_owned())));
    }
    assert_eq!(err(sim.with_node(a, |node, now| node.add_track(now, fb, TrackOptions::audio().stream("a/b")))), NodeError::Media(MediaError::InvalidId("a/b".into())));
    let mic = sim.with_node(a, |node, now| node.add_track(now, fb, TrackOptions::audio().id("mic"))).unwrap();
    assert_eq!(err(sim.with_node(a, |node, now| node.add_track(now, fb, TrackOptions::video().id("mic")))), NodeError::Media(MediaError::DuplicateTrack(mic.clone())));
    // Unknown tracks, and asking for a keyframe on one's own.
    let ghost = TrackId::from("ghost");
    assert_eq!(sim.with_node(a, |node, now| node.set_track_muted(now, fb, &ghost, true)), Err(NodeError::Media(MediaError::UnknownTrack(ghost.clone()))));
    assert_eq!(sim.with_node(a, |node, now| node.remove_track(now, fb, &ghost)), Err(NodeError::Media(MediaError::UnknownTrack(ghost.clone()))));
    assert_eq!(sim.with_node(a, |node, now| node.request_keyframe(now, fb, &mic)), Err(NodeError::Media(MediaError::UnknownTrack(mic.clone()))));
    // Video on an audio track; no call in the room.
    let wrong = MediaFrame { codec: Codec::H264, rtp_time: 0, data: vec![0, 0, 1].into() };
    assert_eq!(sim.with_node(a, |node, now| node.write_frame(now, fb, &mic, wrong)), Err(NodeError::Media(MediaError::CodecNotNegotiated(Codec::H264))));
    assert_eq!(sim.with_node(a, |node, now| node.end_call(now, "nowhere")), Err(NodeError::Media(MediaError::NoCall("nowhere".into()))));
    // At most MAX_TRACKS.
    for i in 1..peerlink::media::MAX_TRACKS {
        sim.with_node(a, |node, now| node.add_track(now, fb, TrackOptions::audio().id(format!("t{i}")))).unwrap();
    }
    assert_eq!(err(sim.with_node(a, |node, now| node.add_track(now, fb, TrackOptions::audio()))), NodeError::Media(MediaError::TooManyTracks));
    // All that negotiated once they settle: the remote sees MAX_TRACKS tracks.
    let remote = |sim: &Sim| media(sim, b).iter().filter(|e| matches!(e, MediaEvent::TrackAdded { track, .. } if !track.local)).count();
    assert!(sim.run_until(Duration::from_secs(10), |sim| remote(sim) == peerlink::media::MAX_TRACKS), "{}", remote(&sim));
}
