//! Media on real sockets (the real server over WebSocket, real UDP on 127.0.0.1, str0m
//! underneath): a video track between two blocking nodes (negotiated, 60 frames at 30 fps
//! intact and in order, a keyframe request, mute, unmute, removal), and a call in a group room
//! of three through the async adapters' `Room` handles (every member's stream, frames to both
//! others, mute, a screen share, ending the call). The call is written once as a macro and run
//! on smol and on tokio.

use peerlink::{Codec, MediaEvent, MediaFrame, NodeEvent};

/// A fake VP8 frame of a few KB: the first byte's low bit clear marks a keyframe.
fn vp8(i: u64, key: bool) -> Vec<u8> {
    let mut data: Vec<u8> = (0..3000 + (i as u32 % 7) * 200).map(|k| (k as u64 * 7 + i * 13) as u8).collect();
    data[0] = if key { 0x10 } else { 0x11 };
    data
}

fn video(i: u64) -> MediaFrame {
    MediaFrame { codec: Codec::Vp8, rtp_time: i * 3000, data: vp8(i, i.is_multiple_of(30)).into() }
}

fn audio(i: u64) -> MediaFrame {
    MediaFrame { codec: Codec::Opus, rtp_time: i * 960, data: vec![0xfc, i as u8, 1, 2, 3].into() }
}

/// The media events in a log.
fn media(log: &[NodeEvent]) -> impl Iterator<Item = &MediaEvent> {
    log.iter().filter_map(|e| match e {
        NodeEvent::Media(m) => Some(m),
        _ => None,
    })
}

/// The frames of `track` from `peer` in a log: RTP time, bytes, keyframe.
fn frames(log: &[NodeEvent], peer: peerlink::Fingerprint, track: &str) -> Vec<(u64, Vec<u8>, bool)> {
    media(log)
        .filter_map(|e| match e {
            MediaEvent::Frame { peer: p, track: t, frame } if *p == peer && t.0 == track => Some((frame.rtp_time, frame.data.to_vec(), frame.keyframe)),
            _ => None,
        })
        .collect()
}

mod blocking {
    use std::time::{Duration, Instant};

    use peerlink::{MediaEvent, NodeConfig, NodeEvent, PeerState, TrackId, TrackKind, TrackOptions};
    use peerlink_blocking::{PollNode, PollOptions, UdpBind};
    use peerlink_tests::{WAIT, client_config, start_server};

    use super::{frames, media, video};

    struct Pair {
        nodes: [PollNode; 2],
        logs: [Vec<NodeEvent>; 2],
    }

    impl Pair {
        fn pump(&mut self) {
            for (n, log) in self.nodes.iter_mut().zip(self.logs.iter_mut()) {
                n.poll(Instant::now()).unwrap();
                while let Some(e) = n.poll_event() {
                    log.push(e);
                }
            }
        }

        fn pump_for(&mut self, d: Duration) {
            let until = Instant::now() + d;
            while Instant::now() < until {
                self.pump();
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        fn until(&mut self, what: &str, done: impl Fn(&Pair) -> bool) {
            let deadline = Instant::now() + WAIT;
            while !done(self) {
                assert!(Instant::now() < deadline, "{what}: timed out\na: {:?}\nb: {:?}", media(&self.logs[0]).collect::<Vec<_>>(), media(&self.logs[1]).collect::<Vec<_>>());
                self.pump();
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        fn has(&self, i: usize, f: impl Fn(&MediaEvent) -> bool) -> bool {
            media(&self.logs[i]).any(f)
        }
    }

    fn poll_node(url: &str, alias: &str) -> PollNode {
        PollNode::new(NodeConfig::with_client(client_config(url, alias)), PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap()
    }

    #[test]
    fn a_video_track_streams_intact_asks_for_a_keyframe_mutes_and_goes() {
        let server = start_server(peerlink::ServerConfig::default());
        let url = server.url();
        let mut p = Pair { nodes: [poll_node(&url, "a"), poll_node(&url, "b")], logs: Default::default() };
        p.until("registered", |p| p.nodes.iter().all(PollNode::is_registered));
        let (fa, fb) = (p.nodes[0].fingerprint(), p.nodes[1].fingerprint());
        p.nodes[0].connect_to_peer(fb).unwrap();
        p.until("connected", |p| p.nodes[0].get_peer(&fb).is_some_and(|v| v.state == PeerState::Connected) && p.nodes[1].get_peer(&fa).is_some_and(|v| v.state == PeerState::Connected));

        let id = p.nodes[0].add_track(fb, TrackOptions::video().id("cam").stream("alice")).unwrap();
        assert_eq!(id, TrackId::from("cam"));
        p.until("negotiated", |p| {
            p.has(0, |e| matches!(e, MediaEvent::TrackAdded { peer, track } if *peer == fb && track.local && track.id == id))
                && p.has(1, |e| matches!(e, MediaEvent::TrackAdded { peer, track } if *peer == fa && !track.local && track.id == id && track.stream == "alice" && track.kind == TrackKind::Video))
        });
        assert!(p.nodes[0].get_peer(&fb).unwrap().tracks.iter().any(|t| t.id == id && t.local));

        // 60 frames at ~30 fps.
        let mut sent = Vec::new();
        for i in 0..60 {
            let frame = video(i);
            let want = (frame.rtp_time, frame.data.to_vec());
            assert!(p.nodes[0].write_frame(fb, &id, frame).unwrap(), "frame {i} went");
            sent.push(want);
            p.pump_for(Duration::from_millis(33));
        }
        p.until("every frame", |p| frames(&p.logs[1], fa, "cam").len() >= 60);
        let got = frames(&p.logs[1], fa, "cam");
        assert_eq!(got.len(), 60);
        assert!(got.iter().map(|(t, d, _)| (*t, d.clone())).eq(sent.iter().cloned()), "intact and in order");
        assert!(got[0].2 && got[30].2 && !got[1].2, "keyframes recognised");

        // The receiver asks for a keyframe; the sender hears it.
        p.nodes[1].request_keyframe(fa, &id).unwrap();
        p.until("keyframe requested", |p| p.has(0, |e| matches!(e, MediaEvent::KeyframeRequested { peer, track } if *peer == fb && track == &id)));

        // Muted, then unmuted: the receiver hears both; nothing goes while muted.
        p.nodes[0].set_track_muted(fb, &id, true).unwrap();
        let muted = |p: &Pair, on: bool| p.has(1, |e| matches!(e, MediaEvent::Muted { peer, track, muted } if *peer == fa && track == &id && *muted == on));
        p.until("muted", |p| muted(p, true));
        p.pump_for(Duration::from_millis(100));
        assert!(!p.nodes[0].write_frame(fb, &id, video(60)).unwrap(), "nothing goes while muted");
        p.nodes[0].set_track_muted(fb, &id, false).unwrap();
        p.until("unmuted", |p| muted(p, false));
        // It sends again once the answer is back.
        let mut again = false;
        for i in 61..200 {
            if p.nodes[0].write_frame(fb, &id, video(i)).unwrap() {
                again = true;
                break;
            }
            p.pump_for(Duration::from_millis(10));
        }
        assert!(again, "frames go again after unmuting");

        // Removed: the receiver's track ends; writing on it is refused.
        p.nodes[0].remove_track(fb, &id).unwrap();
        p.until("removed", |p| p.has(1, |e| matches!(e, MediaEvent::TrackRemoved { peer, track } if *peer == fa && track == &id)));
        assert!(p.nodes[0].write_frame(fb, &id, video(0)).is_err());
        drop(server);
    }
}

macro_rules! group_call {
    ($adapter:ident, $run:path, $sleep:path) => {
        use std::time::{Duration, Instant};

        use peerlink::{CallConfig, CallEvent, Fingerprint, MediaEvent, NodeConfig, NodeEvent, RoomOptions, Source};
        use peerlink_tests::{WAIT, client_config, start_server};
        use $adapter::{ConnectOptions, Node, NodeEvents, Room};

        use super::super::{audio, frames, media, video};

        const ROOM: &str = "conf";

        struct Call {
            fps: Vec<Fingerprint>,
            rooms: Vec<Room>,
            events: Vec<NodeEvents>,
            logs: Vec<Vec<NodeEvent>>,
        }

        impl Call {
            /// Drains every node's events until `done`, failing after [`WAIT`].
            async fn until(&mut self, what: &str, done: impl Fn(&Call) -> bool) {
                let deadline = Instant::now() + WAIT;
                loop {
                    for (events, log) in self.events.iter_mut().zip(self.logs.iter_mut()) {
                        while let Some(e) = events.try_next() {
                            log.push(e);
                        }
                    }
                    if done(self) {
                        return;
                    }
                    assert!(Instant::now() < deadline, "{what}: timed out\n{:#?}", self.logs.iter().map(|l| l.iter().filter(|e| matches!(e, NodeEvent::Call(_))).collect::<Vec<_>>()).collect::<Vec<_>>());
                    $sleep(Duration::from_millis(5)).await;
                }
            }

            fn calls(&self, i: usize) -> impl Iterator<Item = &CallEvent> {
                self.logs[i].iter().filter_map(|e| match e {
                    NodeEvent::Call(c) => Some(c),
                    _ => None,
                })
            }

            fn streams(&self, i: usize) -> usize {
                self.calls(i).filter(|e| matches!(e, CallEvent::RemoteStream { room, .. } if room == ROOM)).count()
            }

            /// This node's own tracks negotiated (over all its connections).
            fn own(&self, i: usize, id: &str) -> usize {
                media(&self.logs[i]).filter(|e| matches!(e, MediaEvent::TrackAdded { track, .. } if track.local && track.id.0 == id)).count()
            }

            /// Whether node `i` saw `from`'s track `id` muted (`on`) or unmuted.
            fn muted(&self, i: usize, from: usize, id: &str, on: bool) -> bool {
                let f = self.fps[from];
                media(&self.logs[i]).any(|e| matches!(e, MediaEvent::Muted { peer, track, muted } if *peer == f && track.0 == id && *muted == on))
            }

            /// Whether node `i` saw `from`'s track `id` added.
            fn remote_track(&self, i: usize, from: usize, id: &str) -> bool {
                let f = self.fps[from];
                media(&self.logs[i]).any(|e| matches!(e, MediaEvent::TrackAdded { peer, track } if *peer == f && !track.local && track.id.0 == id))
            }

            fn removed(&self, i: usize, from: usize) -> bool {
                let f = self.fps[from];
                self.calls(i).any(|e| matches!(e, CallEvent::RemoteStreamRemoved { peer, .. } if *peer == f))
            }
        }

        #[test]
        fn a_group_call_of_three_reaches_everyone() {
            let server = start_server(peerlink::ServerConfig::default());
            let url = server.url();
            $run(async move {
                let options = || ConnectOptions { udp: $adapter::UdpBind::Loopback, ..Default::default() };
                let mut nodes = Vec::new();
                let mut events = Vec::new();
                for name in ["n0", "n1", "n2"] {
                    let (node, ev) = Node::connect_with(NodeConfig::with_client(client_config(&url, name)), options()).await.unwrap();
                    nodes.push(node);
                    events.push(ev);
                }
                let mut rooms = vec![nodes[0].create_room(ROOM, RoomOptions::group(3)).await.unwrap()];
                for node in &nodes[1..] {
                    rooms.push(node.join_room(ROOM).await.unwrap());
                }
                let fps = nodes.iter().map(Node::fingerprint).collect();
                let mut c = Call { fps, rooms, events, logs: vec![Vec::new(); 3] };

                // Everyone starts a call: every member's stream reaches both others.
                for room in &c.rooms {
                    room.start_call(CallConfig::audio_video()).await.unwrap();
                }
                c.until("every stream", |c| (0..3).all(|i| c.streams(i) == 2 && c.own(i, "audio") == 2 && c.own(i, "video") == 2)).await;
                for i in 0..3 {
                    assert!(matches!(c.calls(i).next(), Some(CallEvent::LocalStream { sources, .. }) if sources == &[Source::Audio, Source::Video]));
                }

                // One frame of each source per round, to both others.
                for round in 0..30 {
                    for room in &c.rooms {
                        assert_eq!(room.send_call_frame(Source::Video, video(round)).await.unwrap(), 2, "video to both others");
                        assert_eq!(room.send_call_frame(Source::Audio, audio(round)).await.unwrap(), 2, "audio to both others");
                    }
                    c.until("a round", |_| true).await;
                    $sleep(Duration::from_millis(33)).await;
                }
                let all = |c: &Call| (0..3).all(|i| (0..3).filter(|&j| j != i).all(|j| frames(&c.logs[i], c.fps[j], "video").len() >= 30 && frames(&c.logs[i], c.fps[j], "audio").len() >= 30));
                c.until("every frame", all).await;
                for i in 0..3 {
                    for j in (0..3).filter(|&j| j != i) {
                        let got: Vec<_> = frames(&c.logs[i], c.fps[j], "video").into_iter().map(|(t, d, _)| (t, d)).collect();
                        let want: Vec<_> = (0..30).map(video).map(|f| (f.rtp_time, f.data.to_vec())).collect();
                        assert!(got == want, "n{i}: video from n{j} intact and in order");
                        assert_eq!(frames(&c.logs[i], c.fps[j], "audio").len(), 30, "n{i}: audio from n{j}");
                    }
                }

                // n0 mutes its audio and unmutes it: both others see each.
                c.rooms[0].set_call_muted(Source::Audio, true).await.unwrap();
                c.until("muted", |c| c.muted(1, 0, "audio", true) && c.muted(2, 0, "audio", true)).await;
                c.rooms[0].set_call_muted(Source::Audio, false).await.unwrap();
                c.until("unmuted", |c| c.muted(1, 0, "audio", false) && c.muted(2, 0, "audio", false)).await;

                // n1 shares its screen: one more track at both others, and a frame on it.
                c.rooms[1].set_screen_share(true).await.unwrap();
                c.until("screen", |c| c.remote_track(0, 1, "screen") && c.remote_track(2, 1, "screen") && c.own(1, "screen") == 2).await;
                assert_eq!(c.rooms[1].send_call_frame(Source::Screen, video(0)).await.unwrap(), 2);
                c.until("screen frame", |c| [0, 2].iter().all(|&i| frames(&c.logs[i], c.fps[1], "screen").len() == 1)).await;

                // n2 ends its call: its stream is gone at both others.
                c.rooms[2].end_call().await.unwrap();
                c.until("call ended", |c| c.removed(0, 2) && c.removed(1, 2)).await;
                assert!(c.rooms[2].send_call_frame(Source::Audio, audio(0)).await.is_err(), "no call any more");
                for node in &nodes {
                    node.close().await;
                }
            });
            drop(server);
        }
    };
}

mod group_call {
    mod smol {
        async fn sleep(d: std::time::Duration) {
            smol::Timer::after(d).await;
        }
        group_call!(peerlink_smol, peerlink_tests::run_async, sleep);
    }

    mod tokio {
        /// Runs the test body on a tokio runtime, failing it after `WAIT * 3`.
        fn run<T>(f: impl std::future::Future<Output = T>) -> T {
            let runtime = ::tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(async { ::tokio::time::timeout(peerlink_tests::WAIT * 3, f).await.expect("test timed out") })
        }
        group_call!(peerlink_tokio, run, ::tokio::time::sleep);
    }
}
