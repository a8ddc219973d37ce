//! Renegotiation glare between the browser and a Rust node, round after round: both add a
//! video track at the same moment, so both offer at once. The node is the polite side (its
//! fingerprint is the smaller): it rolls its offer back, answers the browser's, and offers its
//! track again at once, so the browser gets the answer and the new offer back to back. The
//! browser must finish applying the answer before it looks at the offer (its negotiation
//! messages are handled one after the other), or it takes that offer for glare too, drops it,
//! and the node's track is never negotiated. The queue of a peer's messages is bounded: at
//! most 64 wait, one more is dropped and reported.

use std::time::{Duration, Instant};

use peerlink::{MediaEvent, NodeEvent, TrackId, TrackKind, TrackOptions};
use serde_json::{Value, json};

use super::*;

/// Rounds of glare (one more video track each side per round).
const ROUNDS: usize = 3;

/// The node's remote video tracks from `peer` (the browser's camera copies), by id.
fn remote_videos(events: &[NodeEvent], peer: Fingerprint) -> Vec<TrackId> {
    events
        .iter()
        .filter_map(|e| match e {
            NodeEvent::Media(MediaEvent::TrackAdded { peer: p, track }) if *p == peer && !track.local && track.kind == TrackKind::Video => Some(track.id.clone()),
            _ => None,
        })
        .collect()
}

/// Whether the node's track `id` is negotiated and sending to `peer`.
fn node_sending(events: &[NodeEvent], peer: Fingerprint, id: &TrackId) -> bool {
    events.iter().any(|e| matches!(e, NodeEvent::Media(MediaEvent::Sending { peer: p, track, sending: true }) if *p == peer && track == id))
}

/// How many times the page kept its own offer over the node's (glare seen by the browser).
fn page_glares(results: &Value) -> usize {
    results["log"].as_array().map_or(0, |a| a.iter().filter(|l| l.as_str().is_some_and(|l| l.contains("glare: keeping our offer"))).count())
}

/// The frames decoded of each of the page's inbound video streams from `peer`, latest sample.
fn decoded_per_stream(results: &Value, peer: Fingerprint) -> Vec<u64> {
    let samples = results["stats"][peer.to_string()].as_array().cloned().unwrap_or_default();
    samples.last().and_then(|s| s["videoDecoded"].as_array().map(|a| a.iter().map(|n| n.as_u64().unwrap_or(0)).collect())).unwrap_or_default()
}

/// [`ROUNDS`] rounds in which the page and the node each add a video track at the same moment
/// (the page's `addTrack` first, the node's `add_track` right after, before the page's offer
/// can have reached it): after every round all tracks so far are negotiated on both sides,
/// and at the end every track carries frames (the page decodes each of the node's streams, the
/// node gets frames on each of the browser's). The page must have seen glare (else nothing was
/// tested).
#[test]
fn renegotiation_glare_leaves_every_track_negotiated() {
    let mut h = Harness::new("glare");
    let node = h.node.fingerprint();
    // The node is polite: the browser's fingerprint is the larger.
    let identity = identity_where(|fp| fp > node);
    let page = h.open(&format!("role=offer&{}", keys_query(&identity)));
    let r = h.until(&page, "the page to join", |_, r| r["phase"] == "joined" || r["phase"] == "connected");
    let browser = h.browser_fp(&r);
    assert_eq!(browser, identity.fingerprint());
    h.until(&page, "the connection", |h, r| r["phase"] == "connected" && h.channel_open("default"));
    assert_eq!(h.browser.eval(&page, "window.loadCamera()"), Some(Value::Bool(true)), "the fake camera");
    let mut tracks = Vec::new();
    for round in 1..=ROUNDS {
        let t = Instant::now();
        let added = h.browser.eval(&page, &format!("window.addVideo('{node}')"));
        assert!(added.as_ref().is_some_and(Value::is_string), "window.addVideo: {added:?}");
        let id = h.node.add_track(browser, TrackOptions::video().id(format!("glare-{round}")).stream(format!("rust-{round}"))).expect("add_track");
        tracks.push(id);
        let r = h.until(&page, &format!("round {round}: every track negotiated on both sides"), |h, r| {
            tracks.iter().all(|id| node_sending(&h.events, browser, id))
                && remote_videos(&h.events, browser).len() == round
                && page_video_tracks(r, node).len() == round
        });
        eprintln!("  round {round}: both tracks negotiated in {:?} (glare seen by the page {} times so far)", t.elapsed(), page_glares(&r));
    }
    // Frames on every track: the node's pattern on each of its tracks, the camera on the page's.
    let mut clip = Clip::pattern();
    let mut seen = 0;
    let deadline = Instant::now() + STEP;
    let r = loop {
        h.pump_for(Duration::from_millis(100), |h| {
            if h.events[seen..].iter().any(|e| matches!(e, NodeEvent::Media(MediaEvent::KeyframeRequested { .. }))) {
                clip.restart();
            }
            seen = h.events.len();
            clip.send_due(|frame| tracks.iter().all(|id| h.node.write_frame(browser, id, frame.clone()).expect("write_frame")));
        });
        let r = h.results(&page);
        let decoded = decoded_per_stream(&r, node);
        let remote = remote_videos(&h.events, browser);
        let framed = remote.iter().filter(|id| h.events.iter().any(|e| matches!(e, NodeEvent::Media(MediaEvent::Frame { peer, track, .. }) if *peer == browser && track == *id))).count();
        if decoded.len() == ROUNDS && decoded.iter().all(|n| *n >= 20) && framed == ROUNDS {
            eprintln!("  frames decoded per stream of the node: {decoded:?}; the node got frames on {framed} of the browser's tracks");
            break r;
        }
        if Instant::now() >= deadline {
            h.fail(&format!("frames on every track: decoded per stream {decoded:?}, the node got frames on {framed} of {} tracks", remote.len()), Some(&r));
        }
    };
    let glares = page_glares(&r);
    eprintln!("  the page kept its offer over the node's {glares} times in {ROUNDS} rounds");
    assert!(glares > 0, "no glare in {ROUNDS} rounds: the race was not exercised");
    assert_eq!(r["errors"], json!([]), "the page's errors");
    eprintln!("renegotiation_glare_leaves_every_track_negotiated: {:?}", h.started.elapsed());
}

/// The queue is bounded: the page answers the node's call but its signature is held, so the
/// offer stays the message being handled; 100 more negotiation messages of the node (candidates
/// of another session, ignored once handled) arrive meanwhile. 63 wait behind the offer (64 in
/// all) and the rest are dropped, each reported as the client's `signal_overflow`. Released, the
/// answer goes, the queue drains and the connection opens.
#[test]
fn at_most_64_negotiation_messages_wait() {
    let mut h = Harness::new("signal-queue");
    let page = h.open("role=answer&hold=1");
    let r = h.until(&page, "the page to join", |_, r| r["phase"] == "joined");
    let browser = h.browser_fp(&r);
    let node = h.node.fingerprint();
    h.node.connect_to_peer(browser).expect("connect_to_peer");
    h.until(&page, "the page's answer to wait for its signature", |_, r| r["signingHeld"] == true);
    const SENT: usize = 100;
    for i in 0..SENT {
        let candidate = json!({ "peerlink": "rtc/1", "t": "candidate", "sid": format!("{i:032x}"), "candidate": format!("candidate:{i} 1 udp 1 192.0.2.1 {} typ host", 10_000 + i) });
        h.node.client().relay(browser, &candidate).expect("relay");
    }
    let overflow = |r: &Value| r["errors"].as_array().map_or(0, |a| a.iter().filter(|e| e["code"] == "signal_overflow").count());
    let r = h.until(&page, "the page to drop what does not fit", |_, r| overflow(r) >= SENT - 63);
    let queued = h.browser.eval(&page, &format!("window.client._signals.get('{node}')?.queued ?? 0"));
    eprintln!("  {} dropped, {queued:?} waiting", overflow(&r));
    assert_eq!(queued, Some(json!(64)), "messages waiting (the offer being handled included)");
    let message = r["errors"].as_array().and_then(|a| a.iter().find(|e| e["code"] == "signal_overflow")).map(|e| e["message"].clone());
    assert!(message.as_ref().and_then(Value::as_str).is_some_and(|m| m.contains(&node.to_string())), "{message:?}");
    assert_eq!(h.browser.eval(&page, "window.releaseSigning()"), Some(Value::Bool(true)));
    h.until(&page, "the connection once the answer went", |h, r| r["phase"] == "connected" && h.channel_open("default"));
    let left = h.browser.eval(&page, &format!("window.client._signals.has('{node}')"));
    assert_eq!(left, Some(Value::Bool(false)), "the queue drained");
    let r = h.results(&page);
    // Exactly those that did not fit were dropped, and nothing else went wrong.
    assert_eq!(overflow(&r), SENT - 63, "{}", r["errors"]);
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(SENT - 63), "{}", r["errors"]);
    eprintln!("at_most_64_negotiation_messages_wait: {:?}", h.started.elapsed());
}
