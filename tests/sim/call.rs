//! A call in a group room of three (the reference's `GroupMedia`) in the simulator: every
//! member's stream reaches every other, one frame sent goes to all, mute, screen share,
//! ending the call and leaving the room.

use std::time::Duration;

use peerlink::{CallConfig, CallEvent, Codec, MediaEvent, MediaFrame, NodeEvent, Source, TrackId};
use peerlink_sim::{NodeId, Sim};

use crate::harness::*;

const ROOM: &str = "conf";

fn calls(sim: &Sim, n: NodeId) -> Vec<CallEvent> {
    sim.events(n)
        .iter()
        .filter_map(|(_, e)| match e {
            NodeEvent::Call(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}


fn streams(sim: &Sim, n: NodeId) -> usize {
    calls(sim, n).iter().filter(|e| matches!(e, CallEvent::RemoteStream { .. })).count()
}

fn frames_from(sim: &Sim, n: NodeId, from: NodeId, track: &str) -> usize {
    let fp = sim.fingerprint(from);
    media(sim, n).iter().filter(|e| matches!(e, MediaEvent::Frame { peer, track: t, .. } if *peer == fp && t.0 == track)).count()
}

#[test]
fn a_group_call_of_three() {
    let (mut sim, n) = room_world(ROOM, 701, 3, config());
    assert!(sim.run_until(Duration::from_secs(10), |sim| n.iter().all(|&a| n.iter().all(|&b| a == b || connected(sim, a, b)))), "mesh");
    for &x in &n {
        sim.with_node(x, |node, now| node.start_call(now, ROOM, CallConfig::audio_video())).unwrap();
    }
    let own = |sim: &Sim, x: NodeId| media(sim, x).iter().filter(|e| matches!(e, MediaEvent::TrackAdded { track, .. } if track.local)).count();
    assert!(sim.run_until(Duration::from_secs(10), |sim| n.iter().all(|&x| streams(sim, x) == 2 && own(sim, x) == 4)), "every member's stream reaches the others");
    for &x in &n {
        assert!(matches!(calls(&sim, x).first(), Some(CallEvent::LocalStream { sources, .. }) if sources == &[Source::Audio, Source::Video]));
    }
    // One frame each, to everyone.
    for round in 0..30u64 {
        for &x in &n {
            let video = MediaFrame { codec: Codec::Vp8, rtp_time: round * 3000, data: vec![if round == 0 { 0x10 } else { 0x11 }, round as u8, 7, 7].into() };
            assert_eq!(sim.with_node(x, |node, now| node.send_call_frame(now, ROOM, Source::Video, video)).unwrap(), 2, "to both others");
            let audio = MediaFrame { codec: Codec::Opus, rtp_time: round * 960, data: vec![0xfc, round as u8].into() };
            assert_eq!(sim.with_node(x, |node, now| node.send_call_frame(now, ROOM, Source::Audio, audio)).unwrap(), 2);
        }
        sim.run_for(Duration::from_millis(33));
    }
    sim.run_for(Duration::from_millis(300));
    for &x in &n {
        for &y in n.iter().filter(|&&y| y != x) {
            assert_eq!(frames_from(&sim, x, y, "video"), 30, "{} from {}", sim.name(x), sim.name(y));
            assert_eq!(frames_from(&sim, x, y, "audio"), 30);
        }
    }
    // Mute n0's audio: both others see it; its audio frames go nowhere.
    sim.with_node(n[0], |node, now| node.set_call_muted(now, ROOM, Source::Audio, true)).unwrap();
    let f0 = sim.fingerprint(n[0]);
    let muted = |sim: &Sim, x: NodeId, on: bool| {
        media(sim, x).iter().any(|e| matches!(e, MediaEvent::Muted { peer, track, muted } if *peer == f0 && track == &TrackId::from("audio") && *muted == on))
    };
    assert!(sim.run_until(Duration::from_secs(5), |sim| muted(sim, n[1], true) && muted(sim, n[2], true)));
    sim.run_for(Duration::from_millis(200));
    let audio = MediaFrame { codec: Codec::Opus, rtp_time: 99_000, data: vec![0xfc, 1].into() };
    assert_eq!(sim.with_node(n[0], |node, now| node.send_call_frame(now, ROOM, Source::Audio, audio)).unwrap(), 0, "muted");
    sim.with_node(n[0], |node, now| node.set_call_muted(now, ROOM, Source::Audio, false)).unwrap();
    assert!(sim.run_until(Duration::from_secs(5), |sim| muted(sim, n[1], false) && muted(sim, n[2], false)));

    // n1 shares its screen: one more video track at both others.
    sim.with_node(n[1], |node, now| node.set_screen_share(now, ROOM, true)).unwrap();
    let f1 = sim.fingerprint(n[1]);
    let screen = |sim: &Sim, x: NodeId| media(sim, x).iter().any(|e| matches!(e, MediaEvent::TrackAdded { peer, track, .. } if *peer == f1 && track.id.0 == "screen" && track.stream == "screen"));
    assert!(sim.run_until(Duration::from_secs(5), |sim| screen(sim, n[0]) && screen(sim, n[2])));
    sim.run_for(Duration::from_millis(200));
    let shot = MediaFrame { codec: Codec::Vp8, rtp_time: 0, data: vec![0x10, 1, 2, 3].into() };
    assert_eq!(sim.with_node(n[1], |node, now| node.send_call_frame(now, ROOM, Source::Screen, shot)).unwrap(), 2);

    // n2 ends its call: its stream is gone at both others; it hears theirs no more.
    sim.with_node(n[2], |node, now| node.end_call(now, ROOM)).unwrap();
    let f2 = sim.fingerprint(n[2]);
    let removed = |sim: &Sim, x: NodeId, who| calls(sim, x).iter().any(|e| matches!(e, CallEvent::RemoteStreamRemoved { peer, .. } if *peer == who));
    assert!(sim.run_until(Duration::from_secs(5), |sim| removed(sim, n[0], f2) && removed(sim, n[1], f2)));
    assert!(sim.with_node(n[2], |node, now| node.send_call_frame(now, ROOM, Source::Audio, MediaFrame { codec: Codec::Opus, rtp_time: 0, data: vec![1].into() })).is_err());
    // n1 leaves the room: n0 loses its stream.
    sim.with_node(n[1], |node, now| node.leave_room(now, ROOM)).unwrap();
    assert!(sim.run_until(Duration::from_secs(10), |sim| removed(sim, n[0], f1)));
}
