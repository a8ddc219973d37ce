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
//! The page is `examples/browser/test.html`; its scenario comes from the query string and its
//! results are read from `window.results` (see `peerlink_tests::chromium`). Chromium must be
//! at `/usr/bin/chromium` (the tests fail, not skip, without it). The tests take turns: one
//! browser at a time.
//!
//! The node's DTLS certificate is a self-signed leaf with the `digitalSignature` key usage:
//! Chromium's BoringSSL refuses one without it for ECDHE-ECDSA (`KEY_USAGE_BIT_INCORRECT`),
//! which these tests found (the node used to make a CA-profile certificate).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use peerlink::peer::signal::BindingError;
use peerlink::{ChannelOptions, ClientEvent, NodeConfig, NodeError, NodeEvent, Payload, PeerError, PeerState, SendError};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use peerlink_server::{ServerHandle, ServerOptions};
use peerlink_tests::chromium::{Chromium, Page};
use peerlink_tests::client_config;
use serde_json::{Value, json};

/// How long a whole scenario step may take (browser start-up on a loaded 2-core machine
/// included).
const STEP: Duration = Duration::from_secs(30);
/// Size of the binary messages (above 64 KiB: the SCTP max-message-size both sides announce
/// is what makes it pass).
const BIG: usize = 200_000;

/// One browser at a time: Chromium is heavy on a small machine.
static ONE_BROWSER: Mutex<()> = Mutex::new(());

fn examples_dir() -> PathBuf {
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
        let mut h = Harness { _turn: turn, server, node, events: Vec::new(), browser, pages: Vec::new(), ns: format!("browser-{name}"), started };
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
                other => format!("{other:?}"),
            })
            .collect();
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

#[test]
fn identity_keys_move_between_rust_and_the_browser() {
    let mut h = Harness::new("keys");
    // Keys exported in Rust: the browser registers with them, under the same fingerprint.
    let rust_identity = peerlink_tests::identity(42);
    let keys = serde_json::to_vec(&rust_identity.export()).expect("keys serialize");
    let hex: String = keys.iter().map(|b| format!("{b:02x}")).collect();
    let page = h.open(&format!("role=answer&keys={hex}"));
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
