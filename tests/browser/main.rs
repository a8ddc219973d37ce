//! The browser client (`examples/browser/peerlink.js`) in a real headless Chromium, against the
//! real signaling server (which serves the page) and a real Rust node, over real UDP on
//! 127.0.0.1:
//!
//! - data channels with the browser as the offerer and as the answerer: JSON text and binary
//!   both ways on the pre-negotiated `default` channel, an in-band channel the browser opens,
//!   application relays and a room;
//! - identities: keys exported by a Rust identity register the browser under the same
//!   fingerprint, and the browser's exported keys restore in Rust;
//! - identity-bound DTLS both ways: a browser that signs the wrong DTLS fingerprint or signs
//!   with a key that is not its identity is refused by the node
//!   (`PeerError::IdentityMismatch`), and a browser that receives a description whose DTLS
//!   fingerprint was altered on the way, or that expects another signer, refuses it.
//!
//! - media: Chromium's fake camera and microphone reach the node (the browser adds its tracks
//!   to an open connection: a signed renegotiation it offers) at a steady rate; the node's VP8
//!   pattern is decoded by Chromium; the node's mute and unmute fire `mute` and `unmute` on the
//!   browser's remote track; a group call of the browser and two nodes (a managed room with a
//!   call, which the browser joins as a server room, calling each member); the `media`
//!   example run as a child process against the demo page's call (`media_example.rs`): the
//!   page decodes its pattern and the example records the page's camera as IVF;
//!   renegotiation glare (`negotiation.rs`): the browser and a polite node add a video track
//!   at the same moment, round after round, and every track is negotiated and carries frames
//!   (the node's new offer right after its answer is not dropped as glare); at most 64 of a
//!   peer's negotiation messages wait, the rest are dropped and reported.
//! - managed rooms (`room/1`, `rooms.rs`): a node's managed room the browser joins; messages
//!   both ways (JSON, text, binary; more than the node's 512 unacknowledged) in order, once, on
//!   the direct `peerlink` channel, by signed relay, and across a path change (the connection
//!   closed mid-stream); the browser, the smaller fingerprint, calling the node back after
//!   the node closed their connection (the path direct again); relayed batches with bad
//!   signatures refused and reported by the browser; a node's sync frames acknowledged, not
//!   delivered; presence both ways.
//!
//! The page is `examples/browser/test.html`; its scenario comes from the query string and its
//! results are read from `window.results` (see `peerlink_tests::chromium`). Chromium must be
//! at `/usr/bin/chromium` (the tests fail, not skip, without it). The tests take turns: one
//! browser at a time.
//!
//! The node's DTLS certificate is a self-signed leaf with the `digitalSignature` key usage:
//! Chromium's BoringSSL refuses one without it for ECDHE-ECDSA (`KEY_USAGE_BIT_INCORRECT`),
//! which these tests found (the node used to make a CA-profile certificate).

mod interop;
mod media_example;
mod negotiation;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use peerlink::peer::signal::BindingError;
use peerlink::media::ivf::IvfReader;
use peerlink::{CallConfig, ChannelOptions, ClientEvent, Codec, Fingerprint, MediaEvent, MediaFrame, NodeConfig, NodeError, NodeEvent, Payload, PeerError, PeerState, RoomEvent, RoomOptions, SendError, Source, TrackId, TrackKind, TrackOptions};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use peerlink_server::{ServerHandle, ServerOptions};
use peerlink_tests::chromium::{Chromium, Page};
use peerlink_tests::client_config;
use serde_json::{Value, json};

mod rooms;

/// How long a whole scenario step may take (browser start-up on a loaded 2-core machine
/// included).
pub(crate) const STEP: Duration = Duration::from_secs(30);
/// Size of the binary messages (above 64 KiB: the SCTP max-message-size both sides announce
/// is what makes it pass).
const BIG: usize = 200_000;

/// One browser at a time: Chromium is heavy on a small machine.
pub(crate) static ONE_BROWSER: Mutex<()> = Mutex::new(());

pub(crate) fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/browser")
}

fn pattern(n: usize, mul: usize, add: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * mul + add) & 0xff) as u8).collect()
}

/// The server, the Rust node (polled here) and the browser.
struct Harness {
    _turn: MutexGuard<'static, ()>,
    server: ServerHandle,
    node: PollNode,
    /// Every event of the node, in order.
    events: Vec<NodeEvent>,
    /// When each of `events` was polled.
    times: Vec<Instant>,
    /// More Rust nodes (a group call), polled with the first, and their events.
    others: Vec<(PollNode, Vec<NodeEvent>)>,
    browser: Chromium,
    /// The pages opened, for failure reports.
    pages: Vec<Page>,
    ns: String,
    started: Instant,
}

impl Harness {
    fn new(name: &str) -> Harness {
        let turn = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
        // RUST_LOG=peerlink=debug shows the node's side of a failure.
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
        let started = Instant::now();
        let mut options = ServerOptions::local();
        options.serve_dir = Some(examples_dir());
        let server = peerlink_server::spawn(options).expect("the server starts");
        let config = NodeConfig::with_client(client_config(&server.url(), "rust"));
        let node = PollNode::new(config, PollOptions { udp: UdpBind::Loopback, ..Default::default() }).expect("the node starts");
        let browser = Chromium::launch();
        let mut h = Harness { _turn: turn, server, node, events: Vec::new(), times: Vec::new(), others: Vec::new(), browser, pages: Vec::new(), ns: format!("browser-{name}"), started };
        h.until_node("the node registers", |h| h.node.is_registered());
        let ns = h.ns.clone();
        h.node.client().join(Instant::now(), &ns, None, None).expect("join");
        h.until_node("the node joins", |h| h.events.iter().any(|e| matches!(e, NodeEvent::Signaling(ClientEvent::PeerList { .. }))));
        eprintln!("[{name}] server, node and browser up in {:?}", h.started.elapsed());
        h
    }

    /// Opens the test page with `query` (the namespace is added).
    fn open(&mut self, query: &str) -> Page {
        let url = format!("{}/test.html?ns={}&{query}", self.server.http_url(), self.ns);
        let page = self.browser.open(&url);
        self.pages.push(page.clone());
        page
    }

    fn pump(&mut self) {
        if let Err(e) = self.node.poll(Instant::now()) {
            panic!("node poll failed: {e}");
        }
        while let Some(e) = self.node.poll_event() {
            self.events.push(e);
            self.times.push(Instant::now());
        }
        for (node, events) in &mut self.others {
            if let Err(e) = node.poll(Instant::now()) {
                panic!("node poll failed: {e}");
            }
            events.extend(std::iter::from_fn(|| node.poll_event()));
        }
    }

    /// Polls the node until `done` holds; fails after [`STEP`].
    fn until_node(&mut self, what: &str, done: impl Fn(&Harness) -> bool) {
        let deadline = Instant::now() + STEP;
        while !done(self) {
            if Instant::now() >= deadline {
                self.fail(&format!("timed out waiting for {what}"), None);
            }
            self.pump();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Polls the node and the page until `done(self, results)` holds; fails after [`STEP`].
    fn until(&mut self, page: &Page, what: &str, done: impl Fn(&Harness, &Value) -> bool) -> Value {
        let deadline = Instant::now() + STEP;
        loop {
            self.pump();
            let results = self.results(page);
            if results.get("failed").is_some_and(|f| !f.is_null()) {
                self.fail(&format!("the page failed while waiting for {what}"), Some(&results));
            }
            if done(self, &results) {
                return results;
            }
            if Instant::now() >= deadline {
                self.fail(&format!("timed out waiting for {what}"), Some(&results));
            }
            let pause = Instant::now() + Duration::from_millis(40);
            while Instant::now() < pause {
                self.pump();
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    fn results(&mut self, page: &Page) -> Value {
        self.browser.eval(page, "window.results ? JSON.stringify(window.results) : null").and_then(|v| v.as_str().and_then(|s| serde_json::from_str(s).ok())).unwrap_or(Value::Null)
    }

    fn fail(&mut self, message: &str, results: Option<&Value>) -> ! {
        let events: Vec<String> = self
            .events
            .iter()
            .map(|e| match e {
                NodeEvent::Data { peer, channel, data: Payload::Binary(b) } => format!("Data {{ peer: {}, channel: {channel}, binary: {} bytes }}", peer.short(), b.len()),
                NodeEvent::Media(MediaEvent::Frame { peer, track, frame }) => {
                    format!("Frame {{ peer: {}, track: {track}, {:?}, {} bytes, keyframe: {} }}", peer.short(), frame.codec, frame.data.len(), frame.keyframe)
                }
                NodeEvent::Media(MediaEvent::KeyframeRequested { peer, track }) => format!("KeyframeRequested {{ peer: {}, track: {track} }}", peer.short()),
                other => format!("{other:?}"),
            })
            .collect();
        // Frames and keyframe requests: the first few of each kind, then a count.
        let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
        let mut events: Vec<String> = events
            .into_iter()
            .filter(|e| {
                let kind = if e.starts_with("Frame") { e.split(',').take(3).collect::<String>() } else if e.starts_with("KeyframeRequested") { e.clone() } else { return true };
                let n = seen.entry(kind).or_default();
                *n += 1;
                *n <= 3
            })
            .collect();
        events.extend(seen.into_iter().filter(|(_, n)| *n > 3).map(|(k, n)| format!("... {n} in all of: {k}")));
        let results = match results {
            Some(r) => serde_json::to_string_pretty(r).unwrap_or_default(),
            None => {
                let pages = self.pages.clone();
                let all: Vec<String> = pages.iter().map(|p| serde_json::to_string_pretty(&self.results(p)).unwrap_or_default()).collect();
                all.join("\n")
            }
        };
        self.browser.fail(&format!(
            "{message} (after {:?})\n--- node events ---\n{}\n--- window.results ---\n{results}",
            self.started.elapsed(),
            events.join("\n")
        ))
    }

    fn browser_fp(&mut self, results: &Value) -> peerlink::Fingerprint {
        match results["fingerprint"].as_str().and_then(|s| s.parse().ok()) {
            Some(fp) => fp,
            None => self.fail("the page has no fingerprint", Some(results)),
        }
    }

    /// Sends on the node, retrying while the send window is full.
    fn node_send(&mut self, peer: peerlink::Fingerprint, channel: Option<&str>, binary: bool, data: &[u8]) {
        let deadline = Instant::now() + STEP;
        loop {
            let now = Instant::now();
            let result = if binary {
                self.node.node().send_binary(now, peer, channel, data)
            } else {
                self.node.node().send_text(now, peer, channel, std::str::from_utf8(data).expect("text"))
            };
            match result {
                Ok(()) => return,
                Err(NodeError::Send(SendError::WouldBlock { .. })) if now < deadline => self.pump(),
                Err(e) => self.fail(&format!("the node could not send: {e}"), None),
            }
        }
    }

    fn node_texts(&self, channel: &str) -> Vec<Value> {
        self.events
            .iter()
            .filter_map(|e| match e {
                NodeEvent::Data { channel: c, data: Payload::Text(t), .. } if c == channel => serde_json::from_str(t).ok(),
                _ => None,
            })
            .collect()
    }

    fn node_binaries(&self, channel: &str) -> Vec<&[u8]> {
        self.events
            .iter()
            .filter_map(|e| match e {
                NodeEvent::Data { channel: c, data: Payload::Binary(b), .. } if c == channel => Some(b.as_slice()),
                _ => None,
            })
            .collect()
    }

    fn channel_open(&self, channel: &str) -> bool {
        self.events.iter().any(|e| matches!(e, NodeEvent::ChannelOpen { channel: c, .. } if c == channel))
    }

    fn identity_errors(&self, peer: peerlink::Fingerprint) -> Vec<&BindingError> {
        self.events
            .iter()
            .filter_map(|e| match e {
                NodeEvent::PeerError { peer: p, error: PeerError::IdentityMismatch(b) } if *p == peer => Some(b),
                _ => None,
            })
            .collect()
    }
}

fn page_received(results: &Value) -> Vec<Value> {
    results["received"].as_array().cloned().unwrap_or_default()
}

/// The page got the node's JSON text and its binary message, intact, on `default`.
fn page_has_node_messages(results: &Value) -> bool {
    let received = page_received(results);
    let text = received.iter().any(|r| r["channel"] == "default" && r["binary"] == false && r["value"]["from"] == "rust" && r["value"]["n"] == 2);
    let binary = received.iter().any(|r| r["channel"] == "default" && r["binary"] == true && r["length"] == BIG && r["ok"] == true);
    text && binary
}

/// The exchange both ways once the default channel is open: JSON text and a 200 kB binary
/// message each way, an in-band `chat` channel from the browser (the node answers on it and
/// the page echoes), and a relay ping through the server.
fn exchange(h: &mut Harness, page: &Page, browser: peerlink::Fingerprint) {
    let t = Instant::now();
    h.until_node("the default channel to open on the node", |h| {
        h.events.iter().any(|e| matches!(e, NodeEvent::ChannelOpen { peer, channel } if *peer == browser && channel == "default"))
    });
    eprintln!("  default channel open on the node after {:?}", t.elapsed());
    let json = json!({ "from": "rust", "text": "hello from rust", "n": 2, "list": [1, 2, 3] }).to_string();
    h.node_send(browser, None, false, json.as_bytes());
    h.node_send(browser, None, true, &pattern(BIG, 7, 3));
    h.until(page, "the page to get the node's JSON and binary", |_, r| page_has_node_messages(r));
    h.until_node("the node to get the browser's JSON, binary and chat channel", |h| {
        let texts = h.node_texts("default");
        let binaries = h.node_binaries("default");
        texts.iter().any(|v| v["from"] == "browser" && v["nested"]["ok"] == true)
            && binaries.iter().any(|b| b.len() == BIG)
            && h.channel_open("chat")
            && h.node_texts("chat").iter().any(|v| v["chat"] == "hi on chat")
    });
    let binary = h.node_binaries("default").into_iter().find(|b| b.len() == BIG).expect("checked").to_vec();
    assert!(binary == pattern(BIG, 13, 5), "the browser's binary message arrived altered");
    // The node answers on the browser's in-band channel; the page echoes.
    h.node_send(browser, Some("chat"), false, br#"{"echo":"over chat"}"#);
    h.until_node("the echo on chat", |h| h.node_texts("chat").iter().any(|v| v["echo"] == "over chat" && v["from"] == "browser"));
    // A channel the node opens in band (an odd SCTP stream: the node is the DTLS server); the
    // page echoes on it too.
    h.node.node().create_data_channel(Instant::now(), browser, ChannelOptions::new("from-rust")).expect("create_data_channel");
    h.until_node("the node's in-band channel to open", |h| h.channel_open("from-rust"));
    h.node_send(browser, Some("from-rust"), false, br#"{"echo":"over from-rust"}"#);
    h.until_node("the echo on from-rust", |h| h.node_texts("from-rust").iter().any(|v| v["echo"] == "over from-rust" && v["from"] == "browser"));
    // An application relay through the server, and its answer.
    h.node.client().relay(browser, &serde_json::value::RawValue::from_string(r#"{"ping":7}"#.into()).unwrap()).expect("relay");
    h.until_node("the relayed pong", |h| {
        h.events.iter().any(|e| matches!(e, NodeEvent::Signaling(ClientEvent::Relay { payload, .. }) if payload.get().contains("\"pong\":7")))
    });
    let view = h.node.node().get_peer(&browser).expect("a connection");
    assert_eq!(view.state, PeerState::Connected);
    for label in ["default", "chat", "from-rust"] {
        assert!(view.channels.iter().any(|c| c == label), "{label} is not open: {:?}", view.channels);
    }
    assert!(view.max_message_size >= BIG, "the browser's max-message-size: {}", view.max_message_size);
    eprintln!("  exchange done after {:?}", t.elapsed());
}

#[test]
fn browser_offers_to_a_rust_node() {
    let mut h = Harness::new("offer");
    let page = h.open(&format!("role=offer&big={BIG}&chat=1&room=browser-room-offer"));
    let results = h.until(&page, "the page to register and join", |_, r| r["phase"] == "joined" || r["phase"] == "connected");
    let browser = h.browser_fp(&results);
    // A room the page created: the node joins it with its signaling client.
    assert_eq!(results["room"]["room_id"], "browser-room-offer");
    h.node.client().join_room(Instant::now(), "browser-room-offer").expect("join_room");
    h.until(&page, "the page to see the node join its room", |h, r| {
        r["roomPeers"].as_array().is_some_and(|a| a.iter().any(|p| p.as_str() == Some(&h.node.fingerprint().to_string())))
    });
    h.until_node("the browser's call", |h| h.events.iter().any(|e| matches!(e, NodeEvent::Incoming { peer } if *peer == browser)));
    exchange(&mut h, &page, browser);
    assert!(!h.node.node().get_peer(&browser).unwrap().offerer);
    eprintln!("browser_offers_to_a_rust_node: {:?}", h.started.elapsed());
}

#[test]
fn rust_node_offers_to_the_browser() {
    let mut h = Harness::new("answer");
    let page = h.open(&format!("role=answer&big={BIG}&chat=1"));
    let results = h.until(&page, "the page to register and join", |_, r| r["phase"] == "joined");
    let browser = h.browser_fp(&results);
    h.node.connect_to_peer(browser).expect("connect_to_peer");
    exchange(&mut h, &page, browser);
    assert!(h.node.node().get_peer(&browser).unwrap().offerer);
    let results = h.results(&page);
    assert_eq!(results["peer"], h.node.fingerprint().to_string());
    eprintln!("rust_node_offers_to_the_browser: {:?}", h.started.elapsed());
}

/// The page's errors, as (code, reason, remote).
fn page_errors(results: &Value) -> Vec<(String, String, bool)> {
    results["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| (e["code"].as_str().unwrap_or("").to_string(), e["reason"].as_str().unwrap_or("").to_string(), e["remote"] == true))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_node_refuses_a_browser_whose_dtls_binding_is_wrong() {
    let mut h = Harness::new("tampered-browser");
    // Two browsers call the node: one signs a DTLS fingerprint that is not its own, the other
    // signs with a key that is not its registered identity.
    let signs_wrong = h.open("role=offer&tamper=sign");
    let r = h.until(&signs_wrong, "the first page to join", |_, r| r["phase"] == "joined");
    let fp_sign = h.browser_fp(&r);
    let r = h.until(&signs_wrong, "the node to refuse the first page", |h, r| {
        !h.identity_errors(fp_sign).is_empty() && page_errors(r).iter().any(|(code, reason, remote)| code == "identity_mismatch" && reason == "identity_mismatch" && *remote)
    });
    assert_eq!(h.identity_errors(fp_sign), [&BindingError::BadSignature]);
    assert!(r["phase"] != "connected" && page_received(&r).is_empty());

    let other_key = h.open("role=offer&tamper=key");
    let r = h.until(&other_key, "the second page to join", |_, r| r["phase"] == "joined");
    let fp_key = h.browser_fp(&r);
    let r = h.until(&other_key, "the node to refuse the second page", |h, r| {
        !h.identity_errors(fp_key).is_empty() && page_errors(r).iter().any(|(code, _, remote)| code == "identity_mismatch" && *remote)
    });
    assert!(matches!(h.identity_errors(fp_key)[..], [BindingError::WrongKey { expected, got }] if *expected == fp_key && *got != fp_key));
    assert!(r["phase"] != "connected");
    // Neither got a connection: no channel ever opened on the node, and none is up.
    assert!(!h.events.iter().any(|e| matches!(e, NodeEvent::ChannelOpen { .. } | NodeEvent::Incoming { .. })), "{:?}", h.events);
    for fp in [fp_sign, fp_key] {
        assert!(h.node.node().get_peer(&fp).is_none_or(|v| v.state != PeerState::Connected));
    }
    eprintln!("the_node_refuses_a_browser_whose_dtls_binding_is_wrong: {:?}", h.started.elapsed());
}

#[test]
fn the_browser_refuses_a_description_altered_on_the_way() {
    let mut h = Harness::new("tampered-node");
    // The node calls two browsers: the first sees the offer's DTLS fingerprint altered (as a
    // signaling server in the middle would), the second expects another signer.
    let altered = h.open("role=answer&tamper=rx-fingerprint");
    let r = h.until(&altered, "the first page to join", |_, r| r["phase"] == "joined");
    let fp_altered = h.browser_fp(&r);
    h.node.connect_to_peer(fp_altered).expect("connect_to_peer");
    let r = h.until(&altered, "the first page to refuse the offer", |h, r| {
        !h.identity_errors(fp_altered).is_empty() && page_errors(r).iter().any(|(code, reason, remote)| code == "identity_mismatch" && reason == "bad_signature" && !*remote)
    });
    assert!(r["phase"] != "connected" && page_received(&r).is_empty());

    let wrong_signer = h.open("role=answer&tamper=expect");
    let r = h.until(&wrong_signer, "the second page to join", |_, r| r["phase"] == "joined");
    let fp_expect = h.browser_fp(&r);
    h.node.connect_to_peer(fp_expect).expect("connect_to_peer");
    let r = h.until(&wrong_signer, "the second page to refuse the offer", |h, r| {
        !h.identity_errors(fp_expect).is_empty() && page_errors(r).iter().any(|(code, reason, _)| code == "identity_mismatch" && reason == "wrong_key")
    });
    assert!(r["phase"] != "connected");
    // The node hears `reject` / `identity_mismatch` and fails both connections.
    for fp in [fp_altered, fp_expect] {
        assert_eq!(h.identity_errors(fp), [&BindingError::BadSignature]);
        assert!(h.events.iter().any(|e| matches!(e, NodeEvent::PeerState { peer, state: PeerState::Failed } if *peer == fp)));
        assert!(h.node.node().get_peer(&fp).is_none_or(|v| v.state == PeerState::Failed));
    }
    assert!(!h.events.iter().any(|e| matches!(e, NodeEvent::ChannelOpen { .. })), "{:?}", h.events);
    eprintln!("the_browser_refuses_a_description_altered_on_the_way: {:?}", h.started.elapsed());
}

/// The page's `keys` query parameter: `identity`'s exported keys (hex of their JSON), which
/// the page registers with.
fn keys_query(identity: &peerlink::Identity) -> String {
    let keys = serde_json::to_vec(&identity.export()).expect("keys serialize");
    let hex: String = keys.iter().map(|b| format!("{b:02x}")).collect();
    format!("keys={hex}")
}

/// The first of the test identities whose fingerprint satisfies `wanted` (to give the page the
/// smaller or the larger fingerprint than a node's: the polite side, the side that calls back).
fn identity_where(wanted: impl Fn(Fingerprint) -> bool) -> peerlink::Identity {
    (1000..).map(peerlink_tests::identity).find(|i| wanted(i.fingerprint())).expect("an identity")
}

#[test]
fn identity_keys_move_between_rust_and_the_browser() {
    let mut h = Harness::new("keys");
    // Keys exported in Rust: the browser registers with them, under the same fingerprint.
    let rust_identity = peerlink_tests::identity(42);
    let page = h.open(&format!("role=answer&{}", keys_query(&rust_identity)));
    let r = h.until(&page, "the page to register with the Rust keys and join", |_, r| r["phase"] == "joined");
    assert_eq!(h.browser_fp(&r), rust_identity.fingerprint());
    h.until_node("the node to see the browser join", |h| {
        h.events.iter().any(|e| matches!(e, NodeEvent::Signaling(ClientEvent::PeerJoined { peer, .. }) if peer.fingerprint == rust_identity.fingerprint()))
    });
    // Keys generated and exported by the browser (WebCrypto PKCS#8) restore in Rust.
    let fresh = h.open("role=answer");
    let r = h.until(&fresh, "the second page to register", |_, r| r["phase"] == "joined");
    let exported: peerlink::IdentityKeys = serde_json::from_value(r["exported"].clone()).expect("exported keys");
    let restored = peerlink::Identity::restore(&exported).expect("the browser's keys restore in Rust");
    assert_eq!(restored.fingerprint(), h.browser_fp(&r));
    eprintln!("identity_keys_move_between_rust_and_the_browser: {:?}", h.started.elapsed());
}

// ---- media ----------------------------------------------------------------------------------

/// How long the media streams are watched.
const MEDIA_WATCH: Duration = Duration::from_secs(10);
/// The window frame rates are checked over.
const RATE_WINDOW: Duration = Duration::from_secs(2);
/// The fewest video frames per second the node must get from the fake camera in every window
/// (measured at the node: 19.5 to 20 fps from Chromium's fake camera, in every window).
const MIN_VIDEO_FPS: f64 = 10.0;
/// The fewest audio frames per second (Opus packets of 20 ms: 50/s, as measured).
const MIN_AUDIO_FPS: f64 = 30.0;

impl Harness {
    /// The remote tracks the node got from `peer` (kind, id, stream).
    fn remote_tracks(&self, peer: Fingerprint) -> Vec<(TrackKind, String, String)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                NodeEvent::Media(MediaEvent::TrackAdded { peer: p, track }) if *p == peer && !track.local => Some((track.kind, track.id.0.clone(), track.stream.clone())),
                _ => None,
            })
            .collect()
    }

    /// When each frame of `peer`'s track `track` was polled, with its codec.
    fn frame_times(&self, peer: Fingerprint, track: &str) -> Vec<(Instant, Codec, bool)> {
        self.events
            .iter()
            .zip(&self.times)
            .filter_map(|(e, t)| match e {
                NodeEvent::Media(MediaEvent::Frame { peer: p, track: id, frame }) if *p == peer && id.0 == track => Some((*t, frame.codec, frame.keyframe)),
                _ => None,
            })
            .collect()
    }

    /// Pumps the node for `how_long` (and sends what `each` sends meanwhile).
    fn pump_for(&mut self, how_long: Duration, mut each: impl FnMut(&mut Harness)) {
        let end = Instant::now() + how_long;
        while Instant::now() < end {
            self.pump();
            each(self);
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// A harness whose page (`role=offer&{query}`) called the node: the default channel is open.
fn page_calls_the_node(name: &str, query: &str) -> (Harness, Page, Fingerprint) {
    let mut h = Harness::new(name);
    let page = h.open(&format!("role=offer&{query}"));
    let r = h.until(&page, "the page to join", |_, r| r["phase"] == "joined" || r["phase"] == "connected");
    let browser = h.browser_fp(&r);
    h.until_node("the default channel to open on the node", |h| h.channel_open("default"));
    (h, page, browser)
}

/// Frames per second of `times` in each [`RATE_WINDOW`] from `start` to `end`.
fn rates(times: &[Instant], start: Instant, end: Instant) -> Vec<f64> {
    let mut out = Vec::new();
    let mut from = start;
    while from + RATE_WINDOW <= end {
        let to = from + RATE_WINDOW;
        let n = times.iter().filter(|t| **t >= from && **t < to).count();
        out.push(n as f64 / RATE_WINDOW.as_secs_f64());
        from = to;
    }
    out
}

/// Chromium's fake camera and microphone reach the Rust node: the browser adds both tracks to
/// an open connection (a renegotiation the browser offers, signed like the first offer), the
/// node reports a remote video and audio track in one stream, and frames keep arriving on both
/// at a steady rate for [`MEDIA_WATCH`].
#[test]
fn browser_camera_reaches_the_rust_node() {
    let (mut h, page, browser) = page_calls_the_node("camera", "media=send");
    let r = h.until(&page, "the page to add its camera", |_, r| !r["media"].is_null());
    let added = Instant::now();
    h.until_node("the browser's audio and video tracks", |h| {
        let tracks = h.remote_tracks(browser);
        tracks.iter().any(|t| t.0 == TrackKind::Video) && tracks.iter().any(|t| t.0 == TrackKind::Audio)
    });
    let tracks = h.remote_tracks(browser);
    eprintln!("  tracks {tracks:?} after {:?} (page: {})", added.elapsed(), r["media"]);
    // One stream (the page adds both with the camera's MediaStream).
    assert_eq!(tracks.len(), 2, "{tracks:?}");
    assert_eq!(tracks[0].2, tracks[1].2, "{tracks:?}");
    let video = tracks.iter().find(|t| t.0 == TrackKind::Video).expect("checked").1.clone();
    let audio = tracks.iter().find(|t| t.0 == TrackKind::Audio).expect("checked").1.clone();
    h.until_node("the first video frame", |h| !h.frame_times(browser, &video).is_empty());
    let first = h.frame_times(browser, &video)[0].0;
    let open = h.events.iter().zip(&h.times).find(|(e, _)| matches!(e, NodeEvent::ChannelOpen { channel, .. } if channel == "default")).map(|(_, t)| *t).expect("checked");
    eprintln!("  first video frame {:?} after the tracks were added, {:?} after the connection opened", first.duration_since(added), first.duration_since(open));
    let start = Instant::now();
    h.pump_for(MEDIA_WATCH, |_| {});
    let end = Instant::now();
    let video_frames = h.frame_times(browser, &video);
    let audio_frames = h.frame_times(browser, &audio);
    let codecs: std::collections::BTreeSet<_> = video_frames.iter().map(|f| format!("{:?}", f.1)).chain(audio_frames.iter().map(|f| format!("{:?}", f.1))).collect();
    let keyframes = video_frames.iter().filter(|f| f.2).count();
    let video_rates = rates(&video_frames.iter().map(|f| f.0).collect::<Vec<_>>(), start, end);
    let audio_rates = rates(&audio_frames.iter().map(|f| f.0).collect::<Vec<_>>(), start, end);
    eprintln!("  video fps per {RATE_WINDOW:?}: {video_rates:?}; audio fps: {audio_rates:?}; codecs {codecs:?}; {keyframes} keyframes");
    assert_eq!(video_rates.len(), 5);
    for (i, (v, a)) in video_rates.iter().zip(&audio_rates).enumerate() {
        if *v < MIN_VIDEO_FPS || *a < MIN_AUDIO_FPS {
            h.fail(&format!("window {i}: {v} video fps (at least {MIN_VIDEO_FPS}), {a} audio fps (at least {MIN_AUDIO_FPS}): {video_rates:?} {audio_rates:?}"), None);
        }
    }
    assert!(video_frames[0].2, "the first video frame is not a keyframe");
    assert!(h.node.node().get_peer(&browser).is_some_and(|v| v.state == PeerState::Connected));
    eprintln!("browser_camera_reaches_the_rust_node: {:?}", h.started.elapsed());
}

/// The committed VP8 test pattern (3 s of ffmpeg's `testsrc`, 320×240, 30 fps, a keyframe
/// every second), sent in real time and looping, as `examples/media` does.
struct Clip {
    codec: Codec,
    /// (when from the loop's start, RTP time, frame)
    frames: Vec<(Duration, u64, std::sync::Arc<[u8]>)>,
    /// One loop, in RTP time and in time.
    length_rtp: u64,
    length: Duration,
    next: usize,
    loops: u64,
    started: Option<Instant>,
    sent: usize,
}

impl Clip {
    fn pattern() -> Clip {
        let bytes = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/media/pattern.ivf")).expect("pattern.ivf");
        let reader = IvfReader::new(&bytes).expect("an IVF file");
        let header = reader.header();
        let clock = u64::from(header.codec.clock_rate());
        let frames: Vec<_> = reader
            .map(|f| {
                let f = f.expect("an IVF frame");
                let rtp = header.rtp_time(f.timestamp);
                (Duration::from_micros(rtp * 1_000_000 / clock), rtp, f.data.to_vec().into())
            })
            .collect();
        assert!(frames.len() > 1, "the clip has frames");
        let step_rtp = frames[1].1 - frames[0].1;
        let length_rtp = frames.last().expect("frames").1 + step_rtp;
        Clip { codec: header.codec, frames, length_rtp, length: Duration::from_micros(length_rtp * 1_000_000 / clock), next: 0, loops: 0, started: None, sent: 0 }
    }

    /// Starts over from the first frame (a keyframe), now.
    fn restart(&mut self) {
        self.next = 0;
        self.started = Some(Instant::now());
    }

    /// Writes the frames that are due with `write` (which says whether the frame went).
    fn send_due(&mut self, mut write: impl FnMut(MediaFrame) -> bool) {
        let mut started = *self.started.get_or_insert_with(Instant::now);
        while let Some((at, rtp, data)) = self.frames.get(self.next) {
            if started + *at > Instant::now() {
                break;
            }
            let frame = MediaFrame { codec: self.codec, rtp_time: rtp + self.loops * self.length_rtp, data: data.clone() };
            if write(frame) {
                self.sent += 1;
            }
            self.next += 1;
            if self.next == self.frames.len() {
                self.next = 0;
                self.loops += 1;
                started += self.length;
                self.started = Some(started);
            }
        }
    }
}

/// The node's video track to the browser, streaming the pattern: set up once the browser's
/// call is up; the clip starts over on each keyframe request.
struct VideoOut {
    peer: Fingerprint,
    track: TrackId,
    clip: Clip,
    /// Events already looked at for keyframe requests.
    seen: usize,
    keyframe_requests: usize,
}

impl VideoOut {
    fn start(h: &mut Harness, peer: Fingerprint) -> VideoOut {
        let track = h.node.add_track(peer, TrackOptions::video().id("pattern").stream("rust")).expect("add_track");
        let t = Instant::now();
        h.until_node("the node's track to be sending", |h| {
            h.events.iter().any(|e| matches!(e, NodeEvent::Media(MediaEvent::Sending { peer: p, track: id, sending: true }) if *p == peer && id.0 == "pattern"))
        });
        eprintln!("  the node's video track negotiated in {:?}", t.elapsed());
        VideoOut { peer, track, clip: Clip::pattern(), seen: 0, keyframe_requests: 0 }
    }

    /// Sends what is due (and starts over after a keyframe request).
    fn turn(&mut self, h: &mut Harness) {
        for e in &h.events[self.seen..] {
            if matches!(e, NodeEvent::Media(MediaEvent::KeyframeRequested { peer, track }) if *peer == self.peer && *track == self.track) {
                self.keyframe_requests += 1;
                self.clip.restart();
            }
        }
        self.seen = h.events.len();
        let (peer, track) = (self.peer, &self.track);
        self.clip.send_due(|frame| h.node.write_frame(peer, track, frame).expect("write_frame"));
    }

    /// Pumps the node and sends for `how_long`.
    fn run(&mut self, h: &mut Harness, how_long: Duration) {
        h.pump_for(how_long, |h| self.turn(h));
    }

    /// Sends while waiting for the page (see [`Harness::until`]).
    fn until(&mut self, h: &mut Harness, page: &Page, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + STEP;
        loop {
            self.run(h, Duration::from_millis(100));
            let results = h.results(page);
            if done(&results) {
                return results;
            }
            if Instant::now() >= deadline || results.get("failed").is_some_and(|f| !f.is_null()) {
                h.fail(&format!("timed out waiting for {what}"), Some(&results));
            }
        }
    }
}

/// The page's framesDecoded samples for `peer`: (ms since the page loaded, frames decoded).
fn decoded(results: &Value, peer: Fingerprint) -> Vec<(f64, u64)> {
    results["stats"][peer.to_string()]
        .as_array()
        .map(|a| a.iter().map(|s| (s["at"].as_f64().unwrap_or(0.0), s["framesDecoded"].as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

fn last_decoded(results: &Value, peer: Fingerprint) -> u64 {
    decoded(results, peer).last().map_or(0, |s| s.1)
}

/// The page's remote video tracks from `peer`.
fn page_video_tracks(results: &Value, peer: Fingerprint) -> Vec<Value> {
    results["tracks"].as_array().map(|a| a.iter().filter(|t| t["kind"] == "video" && t["peer"] == peer.to_string()).cloned().collect()).unwrap_or_default()
}

/// The Rust node streams the VP8 pattern to the browser in real time: the page plays the
/// remote track in a `<video>` and Chromium decodes its frames, steadily.
#[test]
fn rust_vp8_is_decoded_by_the_browser() {
    let (mut h, page, browser) = page_calls_the_node("vp8", "");
    let node = h.node.fingerprint();
    let mut out = VideoOut::start(&mut h, browser);
    let t = Instant::now();
    let r = out.until(&mut h, &page, "the page to get the node's video track", |r| !page_video_tracks(r, node).is_empty());
    let track = page_video_tracks(&r, node).remove(0);
    assert_eq!(track["stream"], "rust", "the stream id (msid) of the node's track: {track}");
    let r = out.until(&mut h, &page, "the first decoded frame", |r| last_decoded(r, node) > 0);
    eprintln!("  first frame decoded {:?} after the track was negotiated ({} sent)", t.elapsed(), out.clip.sent);
    let first = last_decoded(&r, node);
    let mut samples = vec![first];
    for _ in 0..4 {
        out.run(&mut h, Duration::from_secs(1));
        samples.push(last_decoded(&h.results(&page), node));
    }
    eprintln!("  framesDecoded each second: {samples:?} ({} frames sent, {} keyframe requests)", out.clip.sent, out.keyframe_requests);
    for pair in samples.windows(2) {
        // 30 fps sent: at least 10 decoded in every second.
        assert!(pair[1] >= pair[0] + 10, "framesDecoded stalled: {samples:?}");
    }
    eprintln!("rust_vp8_is_decoded_by_the_browser: {:?}", h.started.elapsed());
}

/// The mute and unmute events of the page's first video track from `peer`, in order, and its
/// `muted` now.
fn page_mute_events(results: &Value, peer: Fingerprint) -> (Vec<String>, bool) {
    let track = page_video_tracks(results, peer).into_iter().next().unwrap_or(Value::Null);
    let events = track["events"].as_array().map(|a| a.iter().filter_map(|e| e["type"].as_str().filter(|t| *t != "track").map(str::to_owned)).collect()).unwrap_or_default();
    (events, track["muted"] == true)
}

/// The node mutes its video track (direction `inactive`, a renegotiation the node offers): the
/// browser's remote track (unmuted by its first packets) fires `mute` and is `muted`, and no frames are decoded; unmuting
/// (`sendonly` again) fires `unmute` and frames are decoded again.
#[test]
fn rust_mute_is_seen_by_the_browser() {
    let (mut h, page, browser) = page_calls_the_node("mute", "");
    let node = h.node.fingerprint();
    let mut out = VideoOut::start(&mut h, browser);
    out.until(&mut h, &page, "the first decoded frame", |r| last_decoded(r, node) > 0);
    let r = h.results(&page);
    // A remote track starts muted and fires `unmute` with its first packets.
    let unmute = || "unmute".to_owned();
    let mute = || "mute".to_owned();
    assert_eq!(page_mute_events(&r, node), (vec![unmute()], false), "before muting");
    let track = out.track.clone();
    let t = Instant::now();
    h.node.set_track_muted(browser, &track, true).expect("mute");
    let r = out.until(&mut h, &page, "the page to see the track muted", |r| page_mute_events(r, node) == (vec![unmute(), mute()], true));
    eprintln!("  muted on the page {:?} after set_track_muted", t.elapsed());
    assert!(h.events.iter().any(|e| matches!(e, NodeEvent::Media(MediaEvent::Sending { track: id, sending: false, .. }) if *id == track)));
    // Nothing is decoded while muted (a frame in flight may still be): Chromium drops the
    // receive stream while the m-line is inactive (no inbound-rtp: framesDecoded reads 0) and
    // makes it again, same SSRC, on unmute (the counter starts over).
    let before = last_decoded(&r, node);
    out.run(&mut h, Duration::from_secs(1));
    let after = last_decoded(&h.results(&page), node);
    assert!(after <= before + 2, "frames decoded while muted: {before} then {after}");
    let t = Instant::now();
    h.node.set_track_muted(browser, &track, false).expect("unmute");
    let r = out.until(&mut h, &page, "the page to see the track unmuted", |r| page_mute_events(r, node) == (vec![unmute(), mute(), unmute()], false));
    eprintln!("  unmuted on the page {:?} after set_track_muted", t.elapsed());
    let resumed = last_decoded(&r, node);
    out.until(&mut h, &page, "frames decoded after unmuting", |r| last_decoded(r, node) >= resumed + 15);
    let r = h.results(&page);
    let ssrcs: std::collections::BTreeSet<String> = r["stats"][node.to_string()].as_array().into_iter().flatten().map(|s| s["videoSsrcs"].to_string()).collect();
    eprintln!("  decoded: {before} when muted, {after} a second later, {resumed} at the unmute; {} keyframe requests; inbound video SSRCs over time: {ssrcs:?}", out.keyframe_requests);
    eprintln!("rust_mute_is_seen_by_the_browser: {:?}", h.started.elapsed());
}

/// Whether `events` have a frame of a remote video track from `peer`.
fn has_video_frame_from(events: &[NodeEvent], peer: Fingerprint) -> bool {
    let videos: Vec<&TrackId> = events
        .iter()
        .filter_map(|e| match e {
            NodeEvent::Media(MediaEvent::TrackAdded { peer: p, track }) if *p == peer && !track.local && track.kind == TrackKind::Video => Some(&track.id),
            _ => None,
        })
        .collect();
    events.iter().any(|e| matches!(e, NodeEvent::Media(MediaEvent::Frame { peer: p, track, .. }) if *p == peer && videos.contains(&track)))
}

/// A group call of the browser and two Rust nodes: the nodes are in a managed room with a
/// video call; the page joins the server room, calls both members and adds its camera to
/// each connection. The nodes' call layer adds their video track to the connection with the
/// browser (a room member): the page decodes both nodes' pattern, and both nodes get the
/// browser's camera.
#[test]
fn group_call_of_the_browser_and_two_rust_nodes() {
    let mut h = Harness::new("group");
    let room = "browser-call";
    h.node.create_room(room, RoomOptions::group(4)).expect("create_room");
    h.until_node("the room", |h| h.events.iter().any(|e| matches!(e, NodeEvent::Room(RoomEvent::Joined { .. }))));
    h.node.room(room).start_call(CallConfig::video_only()).expect("start_call");
    let config = NodeConfig::with_client(client_config(&h.server.url(), "rust-2"));
    let second = PollNode::new(config, PollOptions { udp: UdpBind::Loopback, ..Default::default() }).expect("the second node starts");
    h.others.push((second, Vec::new()));
    h.until_node("the second node registers", |h| h.others[0].0.is_registered());
    h.others[0].0.join_room(room).expect("join_room");
    h.until_node("the second node joins", |h| h.others[0].1.iter().any(|e| matches!(e, NodeEvent::Room(RoomEvent::Joined { .. }))));
    h.others[0].0.room(room).start_call(CallConfig::video_only()).expect("start_call");
    let nodes = [h.node.fingerprint(), h.others[0].0.fingerprint()];
    let page = h.open(&format!("call={room}&media=send"));
    let r = h.until(&page, "the page to join", |_, r| r["phase"] == "joined" || r["phase"] == "connected");
    let browser = h.browser_fp(&r);
    let joined = Instant::now();
    let mut clips = [Clip::pattern(), Clip::pattern()];
    let deadline = Instant::now() + STEP;
    let mut first_frame: [Option<Duration>; 2] = [None, None];
    let mut seen = [0, 0];
    loop {
        h.pump_for(Duration::from_millis(20), |h| {
            let [first, second] = &mut clips;
            // A keyframe request (the browser's decoder starting): the clip starts over.
            for (i, (clip, events)) in [(&mut *first, &h.events), (&mut *second, &h.others[0].1)].into_iter().enumerate() {
                if events[seen[i]..].iter().any(|e| matches!(e, NodeEvent::Media(MediaEvent::KeyframeRequested { .. }))) {
                    clip.restart();
                }
                seen[i] = events.len();
            }
            first.send_due(|frame| h.node.room(room).send_call_frame(Source::Video, frame).expect("send_call_frame") > 0);
            second.send_due(|frame| h.others[0].0.room(room).send_call_frame(Source::Video, frame).expect("send_call_frame") > 0);
        });
        let r = h.results(&page);
        for (i, fp) in nodes.iter().enumerate() {
            if first_frame[i].is_none() && last_decoded(&r, *fp) > 0 {
                first_frame[i] = Some(joined.elapsed());
            }
        }
        let decoded_both = nodes.iter().all(|fp| last_decoded(&r, *fp) >= 30);
        let received_both = has_video_frame_from(&h.events, browser) && has_video_frame_from(&h.others[0].1, browser);
        if decoded_both && received_both {
            eprintln!("  decoded {:?} frames of the nodes; first decoded {first_frame:?} after the page joined", nodes.map(|fp| last_decoded(&r, fp)));
            break;
        }
        if Instant::now() >= deadline || r.get("failed").is_some_and(|f| !f.is_null()) {
            let others: Vec<String> = h.others[0].1.iter().filter(|e| !matches!(e, NodeEvent::Media(MediaEvent::Frame { .. }))).map(|e| format!("{e:?}")).collect();
            h.fail(&format!("the group call: decoded {decoded_both}, received {received_both}; the second node's events:\n{}", others.join("\n")), Some(&r));
        }
    }
    eprintln!("group_call_of_the_browser_and_two_rust_nodes: {:?}", h.started.elapsed());
}
