//! What other WebRTC clients do that peerlink's own browser client does not: a plain
//! `RTCPeerConnection.addTrack`, which offers a `sendrecv` m-line, or reuses the transceiver
//! the node's own track made (its direction goes from `recvonly` to `sendrecv`). The node
//! answers sending only where it has a track that sends (no track the browser would show but
//! never gets), and receives on either kind of m-line.

use super::*;

/// Adds the fake camera's video to the page's connection with a plain `pc.addTrack` (the
/// page's `negotiationneeded` handler offers it, signed); returns the browser's track id.
fn plain_add_track(h: &mut Harness, page: &Page) -> String {
    let js = "(async () => {
        const stream = await navigator.mediaDevices.getUserMedia({ video: true });
        const track = stream.getVideoTracks()[0];
        const peer = [...window.client.peers.values()][0];
        peer.pc.addTrack(track, stream);
        return JSON.stringify({ track: track.id, transceivers: peer.pc.getTransceivers().map((t) => [t.mid, t.direction]) });
    })()";
    match h.browser.eval(page, js).and_then(|v| v.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok())) {
        Some(v) => {
            eprintln!("  plain addTrack: {v}");
            v["track"].as_str().unwrap_or_default().to_owned()
        }
        None => h.fail("pc.addTrack failed in the page", None),
    }
}

/// The page's transceivers as `(mid, currentDirection)`.
fn page_directions(h: &mut Harness, page: &Page) -> Vec<(String, String)> {
    let js = "JSON.stringify([...window.client.peers.values()][0].pc.getTransceivers().map((t) => [t.mid, t.currentDirection]))";
    let v: Value = h.browser.eval(page, js).and_then(|v| v.as_str().and_then(|s| serde_json::from_str(s).ok())).unwrap_or(Value::Null);
    v.as_array().into_iter().flatten().map(|p| (p[0].as_str().unwrap_or("").to_owned(), p[1].as_str().unwrap_or("").to_owned())).collect()
}

/// The number of video frames the node got from `peer` on track `id`.
fn frames_of(h: &Harness, peer: Fingerprint, id: &str) -> usize {
    h.events.iter().filter(|e| matches!(e, NodeEvent::Media(MediaEvent::Frame { peer: p, track, .. }) if *p == peer && track.0 == id)).count()
}

/// A `sendrecv` m-line from the browser: the node receives the camera under the browser's
/// track id, and answers `recvonly`, so the browser gets no track of its own echoed back.
#[test]
fn a_plain_add_track_is_received_and_not_echoed() {
    let (mut h, page, browser) = page_calls_the_node("plain-add", "");
    let node = h.node.fingerprint();
    let id = plain_add_track(&mut h, &page);
    h.until_node("the browser's video track on the node", |h| h.remote_tracks(browser).iter().any(|t| t.0 == TrackKind::Video));
    let tracks = h.remote_tracks(browser);
    assert_eq!(tracks.len(), 1, "one remote track: {tracks:?}");
    assert_eq!(tracks[0].1, id, "named by the browser's msid track id");
    h.until_node("30 frames of the camera", |h| frames_of(h, browser, &id) >= 30);
    // Give the page time to fire a `track` it should not.
    h.pump_for(Duration::from_secs(1), |_| {});
    let r = h.results(&page);
    assert!(page_video_tracks(&r, node).is_empty(), "the page shows a video track the node never sends: {}", r["tracks"]);
    let directions = page_directions(&mut h, &page);
    assert!(directions.iter().any(|(_, d)| d == "sendonly"), "the camera's m-line is answered recvonly: {directions:?}");
    assert!(!directions.iter().any(|(_, d)| d == "sendrecv"), "nothing is sendrecv: {directions:?}");
    // The node's answer names only the codecs it speaks, whatever Chromium offered.
    let answer = h.browser.eval(&page, "[...window.client.peers.values()][0].pc.currentRemoteDescription.sdp").and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    let codecs: std::collections::BTreeSet<&str> = answer.lines().filter_map(|l| l.strip_prefix("a=rtpmap:")).filter_map(|l| l.split([' ', '/']).nth(1)).collect();
    assert!(codecs.contains("VP8"), "VP8 in the answer: {codecs:?}");
    for other in &codecs {
        assert!(["VP8", "VP9", "H264", "opus", "rtx"].contains(other), "the answer names {other}: {codecs:?}");
    }
    eprintln!("  codecs in the node's answer: {codecs:?}");
    eprintln!("a_plain_add_track_is_received_and_not_echoed: {:?}", h.started.elapsed());
}

/// The node streams its pattern; the browser's plain `addTrack` of its camera reuses the
/// transceiver the node's track made (`sendrecv` now): the node receives the camera on its own
/// m-line and keeps sending there, and the browser keeps decoding the pattern.
#[test]
fn the_browser_sends_on_the_nodes_own_m_line() {
    let (mut h, page, browser) = page_calls_the_node("shared-mline", "");
    let node = h.node.fingerprint();
    let mut out = VideoOut::start(&mut h, browser);
    out.until(&mut h, &page, "the first decoded frame", |r| last_decoded(r, node) > 0);
    plain_add_track(&mut h, &page);
    // A reused transceiver's msid track id is the one Chromium gave its sender when the
    // node's offer made it, not the camera track's id.
    let deadline = Instant::now() + STEP;
    let id = loop {
        if let Some(t) = h.remote_tracks(browser).into_iter().next() {
            break t.1;
        }
        if Instant::now() >= deadline {
            h.fail("timed out waiting for the browser's track on the node's m-line", None);
        }
        out.run(&mut h, Duration::from_millis(20));
    };
    while frames_of(&h, browser, &id) < 30 {
        if Instant::now() >= deadline {
            h.fail("timed out waiting for 30 frames of the camera on the node's m-line", None);
        }
        out.run(&mut h, Duration::from_millis(20));
    }
    let directions = page_directions(&mut h, &page);
    assert_eq!(directions.iter().filter(|(_, d)| d == "sendrecv").count(), 1, "the node's m-line now goes both ways: {directions:?}");
    let tracks = h.remote_tracks(browser);
    assert_eq!(tracks.len(), 1, "one remote track: {tracks:?}");
    assert_eq!(tracks[0].0, TrackKind::Video);
    // The pattern still plays: at least 10 frames decoded in each of two seconds.
    let mut samples = vec![last_decoded(&h.results(&page), node)];
    for _ in 0..2 {
        out.run(&mut h, Duration::from_secs(1));
        samples.push(last_decoded(&h.results(&page), node));
    }
    assert!(samples.windows(2).all(|p| p[1] >= p[0] + 10), "framesDecoded of the node's pattern: {samples:?}");
    let r = h.results(&page);
    assert_eq!(page_video_tracks(&r, node).len(), 1, "the page has the node's one video track: {}", r["tracks"]);
    eprintln!("  camera frames on the node: {}; pattern decoded each second: {samples:?}", frames_of(&h, browser, &id));
    // The node mutes its track: its m-line still receives the camera.
    let before = frames_of(&h, browser, &id);
    h.node.set_track_muted(browser, &out.track, true).expect("mute");
    out.run(&mut h, Duration::from_secs(2));
    let after = frames_of(&h, browser, &id);
    assert!(after >= before + 20, "the camera kept arriving after the node muted its side: {before} then {after}");
    let directions = page_directions(&mut h, &page);
    assert!(directions.iter().any(|(_, d)| d == "sendonly"), "muted, the node's m-line only receives: {directions:?}");
    eprintln!("the_browser_sends_on_the_nodes_own_m_line: {:?}", h.started.elapsed());
}
