//! Managed rooms (`room/1`) between the browser client and a Rust node: the node creates a
//! managed room, the page joins it with `client.room(id).join(...)` and both exchange room
//! messages, acknowledgements and presence, on the direct path (the `peerlink` channel of the
//! connection the page opens) and by signed relay through the server (the page opens none).
//! When the connection is lost, the member with the smaller fingerprint calls again: the page,
//! when that is its own.
//!
//! Messages are numbered; message `n` is made the same way on both sides (`message` here,
//! `roomMessage` in `examples/browser/test.html`): JSON, text with escapes and non-ASCII, and
//! binary, in turn.

use std::time::{Duration, Instant};

use peerlink::room::wire::{self, Item};
use peerlink::{Fingerprint, Identity, NodeError, NodeEvent, Payload, RoomData, RoomError, RoomEvent, RoomOptions, RoomPath};
use peerlink_tests::chromium::Page;
use rand::SeedableRng;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{Harness, identity_where, keys_query, pattern};

/// Message `n` of `from` (`rust` or `browser`), as the page's `roomMessage` makes it.
fn message(from: &str, n: u32) -> RoomData {
    match n % 3 {
        0 => RoomData::json(&json!({ "n": n, "from": from, "s": "é\"\\q" })).expect("serializes"),
        1 => RoomData::Text(format!("{from} {n} \"é\"\\\n")),
        _ => {
            let mut bytes = n.to_be_bytes().to_vec();
            bytes.extend(pattern((n % 200 + 1) as usize, 7, (n & 0xff) as usize));
            RoomData::Binary(bytes)
        }
    }
}

/// Whether what the node got is message `n` of the browser.
fn is_browser_message(n: u32, got: &Payload) -> bool {
    match (message("browser", n), got) {
        (RoomData::Json(want), Payload::Text(text)) => {
            serde_json::from_str::<Value>(text).ok() == serde_json::from_str::<Value>(&want).ok()
        }
        (RoomData::Text(want), Payload::Text(text)) => want == *text,
        (RoomData::Binary(want), Payload::Binary(bytes)) => want == *bytes,
        _ => false,
    }
}

impl Harness {
    /// The node creates managed room `room`; the page (`mroom=room&{query}`) joins it.
    fn room_with_page(&mut self, room: &str, query: &str) -> (Page, Fingerprint) {
        self.node.create_room(room, RoomOptions::group(4)).expect("create_room");
        self.until_node("the node's room", |h| h.events.iter().any(|e| matches!(e, NodeEvent::Room(RoomEvent::Joined { .. }))));
        let page = self.open(&format!("mroom={room}&{query}"));
        let node = self.node.fingerprint().to_string();
        let r = self.until(&page, "the page to join the managed room", |_, r| r["roomJoined"].as_array().is_some_and(|a| a.iter().any(|p| *p == *node)));
        let browser = self.browser_fp(&r);
        self.until_node("the node to see the page join", |h| {
            h.events.iter().any(|e| matches!(e, NodeEvent::Room(RoomEvent::PeerJoined { peer, .. }) if peer.fingerprint == browser))
        });
        (page, browser)
    }

    /// Waits until the room messages between the node and the page take the direct path, as
    /// both sides see it.
    fn until_direct(&mut self, page: &Page, browser: Fingerprint) {
        self.until_node("the node's path to the page to be direct", |h| {
            h.events.iter().any(|e| matches!(e, NodeEvent::Room(RoomEvent::PathChanged { peer, path: RoomPath::Direct, .. }) if *peer == browser))
        });
        let node = self.node.fingerprint().to_string();
        self.until(page, "the page's path to the node to be direct", |_, r| {
            r["roomPaths"].as_array().is_some_and(|a| a.iter().any(|p| p["peer"] == *node && p["path"] == "direct"))
        });
    }

    /// Sends messages `range` of the node to every member, as fast as it takes them (no poll
    /// in between, so no acknowledgement is read: past 512 the node refuses); on `WouldBlock`
    /// polls until `Writable`. Returns how often it was refused and the longest wait.
    fn node_room_send(&mut self, room: &str, range: std::ops::Range<u32>) -> (usize, Duration) {
        let (mut blocked, mut longest) = (0, Duration::ZERO);
        let mut n = range.start;
        while n < range.end {
            match self.node.node().room_send(Instant::now(), room, None, message("rust", n)) {
                Ok(()) => n += 1,
                Err(NodeError::Room(RoomError::WouldBlock { .. })) => {
                    blocked += 1;
                    let (since, seen) = (Instant::now(), self.events.len());
                    self.until_node("Writable after WouldBlock", |h| {
                        h.events[seen..].iter().any(|e| matches!(e, NodeEvent::Room(RoomEvent::Writable { room: r }) if r == room))
                    });
                    longest = longest.max(since.elapsed());
                }
                Err(e) => self.fail(&format!("room send {n}: {e}"), None),
            }
        }
        (blocked, longest)
    }

    /// The room messages the node got from `from`: (data, path).
    fn node_room_data(&self, from: Fingerprint) -> Vec<(&Payload, RoomPath)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                NodeEvent::Room(RoomEvent::Data { from: f, data, path, .. }) if *f == from => Some((data, *path)),
                _ => None,
            })
            .collect()
    }

    fn node_room_errors(&self) -> Vec<String> {
        self.events.iter().filter(|e| matches!(e, NodeEvent::Room(RoomEvent::Error { .. }))).map(|e| format!("{e:?}")).collect()
    }

    /// Has the page send messages `range` (`window.roomSend`).
    fn page_room_send(&mut self, page: &Page, range: std::ops::Range<u32>) {
        let (first, end) = (range.start, range.end);
        let started = self.browser.eval(page, &format!("(window.roomSend({end}, {first}).catch((e) => {{ results.failed = 'roomSend: ' + e; }}), true)"));
        assert_eq!(started, Some(Value::Bool(true)), "window.roomSend");
    }
}

fn page_room_msgs(r: &Value) -> Vec<Value> {
    r["roomMsgs"].as_array().cloned().unwrap_or_default()
}

/// The page got the node's messages `0..count`, each once, in order, intact, from the node, by
/// `path` (any path: `None`).
fn check_page_got(h: &mut Harness, r: &Value, node: Fingerprint, count: usize, path: Option<&str>) {
    let msgs = page_room_msgs(r);
    let kinds = ["j", "x", "b"];
    let bad: Vec<String> = msgs
        .iter()
        .enumerate()
        .filter(|(i, m)| m["n"] != *i || m["ok"] != true || m["k"] != kinds[i % 3] || path.is_some_and(|p| m["path"] != p) || m["from"] != node.to_string())
        .map(|(i, m)| format!("#{i}: {m}"))
        .take(5)
        .collect();
    if msgs.len() != count || !bad.is_empty() {
        h.fail(&format!("the page got {} messages (want {count}); out of order, altered or on another path: {bad:?}", msgs.len()), None);
    }
}

/// The node got the browser's messages `0..count`, each once, in order, intact, by `path`
/// (any path: `None`).
fn check_node_got(h: &mut Harness, browser: Fingerprint, count: usize, path: Option<RoomPath>) {
    let got = h.node_room_data(browser);
    let bad: Vec<String> = got
        .iter()
        .enumerate()
        .filter(|(i, (data, p))| !is_browser_message(*i as u32, data) || path.is_some_and(|path| *p != path))
        .map(|(i, (data, p))| format!("#{i}: {data:?} by {p:?}"))
        .take(5)
        .collect();
    if got.len() != count || !bad.is_empty() {
        h.fail(&format!("the node got {} messages (want {count}); out of order, altered or on another path: {bad:?}", got.len()), None);
    }
}

/// Both ways: `to_page` messages of the node, then `to_node` of the browser; and after a
/// quiet second, nothing more arrived and nothing is left unacknowledged on either side.
fn exchange(h: &mut Harness, page: &Page, room: &str, browser: Fingerprint, to_page: u32, to_node: u32, path: RoomPath) {
    let node = h.node.fingerprint();
    let page_path = if path == RoomPath::Direct { "direct" } else { "relay" };
    let t = Instant::now();
    let (blocked, longest) = h.node_room_send(room, 0..to_page);
    let r = h.until(page, "the page to get the node's messages", |_, r| page_room_msgs(r).len() >= to_page as usize);
    eprintln!("  node -> page: {to_page} messages in {:?}; WouldBlock {blocked} times, longest wait for Writable {longest:?}", t.elapsed());
    // More than the node may have unacknowledged (512) got through: the page's
    // acknowledgements came back, each `WouldBlock` was followed by `Writable`, soon.
    check_page_got(h, &r, node, to_page as usize, Some(page_path));
    assert_eq!(blocked > 0, to_page > 512, "WouldBlock {blocked} times for {to_page} messages");
    assert!(longest < Duration::from_secs(5), "the node waited {longest:?} for Writable");
    let t = Instant::now();
    h.page_room_send(page, 0..to_node);
    h.until(page, "the node to get the page's messages", |h, _| h.node_room_data(browser).len() >= to_node as usize);
    eprintln!("  page -> node: {to_node} messages in {:?}", t.elapsed());
    check_node_got(h, browser, to_node as usize, Some(path));
    // Quiet: no duplicates turn up, and every message was acknowledged both ways.
    let quiet = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < quiet {
        h.pump();
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = h.results(page);
    check_page_got(h, &r, node, to_page as usize, Some(page_path));
    check_node_got(h, browser, to_node as usize, Some(path));
    let view = h.node.node().room(room).expect("the node's room");
    let member = view.members.iter().find(|m| m.info.fingerprint == browser).expect("the page is a member");
    assert_eq!(member.unacked, 0, "the node's messages the page did not acknowledge");
    let page_unacked = h.browser.eval(page, &format!("window.client.room('{room}').unacked('{node}')"));
    assert_eq!(page_unacked, Some(json!(0)), "the page's messages the node did not acknowledge");
    assert_eq!(r["roomSent"], to_node);
    // Past 512 unacknowledged the page was refused (`would_block`) and told `writable` later.
    let page_blocked = r["roomBlocked"].as_u64().unwrap_or(0);
    assert_eq!(page_blocked > 0, to_node > 512, "the page was refused {page_blocked} times for {to_node} messages");
    let errors = h.node_room_errors();
    assert!(errors.is_empty(), "the node's room errors: {errors:?}");
    assert_eq!(r["errors"], json!([]), "the page's errors");
}

/// The direct path: the page calls the node (`connect`), both sides' messages go on the
/// `peerlink` channel. 1000 messages of the node (more than the 512 it may have unacknowledged:
/// the page's acknowledgements free it) and 200 of the page arrive in order, exactly once.
#[test]
fn room_messages_both_ways_on_the_direct_path() {
    let mut h = Harness::new("rooms-direct");
    let room = "browser-rooms-direct";
    let (page, browser) = h.room_with_page(room, "connect=1");
    h.until_direct(&page, browser);
    exchange(&mut h, &page, room, browser, 1000, 200, RoomPath::Direct);
    assert!(h.node.node().get_peer(&browser).is_some_and(|v| v.state == peerlink::PeerState::Connected));
    // What a node would refuse the page does not send: a JSON `null` (see below), a message
    // over 16 KiB encoded.
    let refused = h.browser.eval(
        &page,
        &format!("[null, 'x'.repeat(16 * 1024)].map((v) => {{ try {{ window.client.room('{room}').send(v); return 'sent'; }} catch (e) {{ return e.code; }} }})"),
    );
    assert_eq!(refused, Some(json!(["serialize", "message_too_large"])));
    eprintln!("room_messages_both_ways_on_the_direct_path: {:?}", h.started.elapsed());
}

/// The path changes under way: the page closes its connection to the node once messages
/// `0..300` of each side were handed over and 100 arrived (the rest perhaps still in flight
/// on it), then each side
/// sends `300..600`. What the closed connection did not deliver goes again by relay (and
/// direct again, should the node call back): every message arrives once, in order, and
/// both sides got messages on both paths.
#[test]
fn room_messages_survive_a_path_change() {
    let mut h = Harness::new("rooms-switch");
    let room = "browser-rooms-switch";
    let (page, browser) = h.room_with_page(room, "connect=1");
    let node = h.node.fingerprint();
    h.until_direct(&page, browser);
    h.node_room_send(room, 0..300);
    h.page_room_send(&page, 0..300);
    // Some have arrived directly (the rest may be on the way when the connection goes).
    h.until(&page, "the first direct messages", |h, r| page_room_msgs(r).len() >= 100 && h.node_room_data(browser).len() >= 100);
    let closed = h.browser.eval(&page, &format!("(window.client.getPeer('{node}').close(), true)"));
    assert_eq!(closed, Some(Value::Bool(true)));
    h.node_room_send(room, 300..600);
    h.page_room_send(&page, 300..600);
    let r = h.until(&page, "both sides to get all 600 messages", |h, r| page_room_msgs(r).len() >= 600 && h.node_room_data(browser).len() >= 600);
    check_page_got(&mut h, &r, node, 600, None);
    check_node_got(&mut h, browser, 600, None);
    let page_paths: std::collections::BTreeSet<String> = page_room_msgs(&r).iter().filter_map(|m| m["path"].as_str().map(str::to_owned)).collect();
    let node_paths: std::collections::HashSet<RoomPath> = h.node_room_data(browser).iter().map(|(_, p)| *p).collect();
    eprintln!("  the page got messages by {page_paths:?}, the node by {node_paths:?}; paths on the page: {}", r["roomPaths"]);
    assert_eq!(page_paths.len(), 2, "{page_paths:?}");
    assert_eq!(node_paths.len(), 2, "{node_paths:?}");
    assert!(h.node_room_errors().is_empty(), "{:?}", h.node_room_errors());
    eprintln!("room_messages_survive_a_path_change: {:?}", h.started.elapsed());
}

/// The relay only, 600 messages each way (more than 512 unacknowledged: both sides are
/// refused once and go on when acknowledgements come): the page opens no connection, so every
/// batch goes through the server,
/// signed by its sender for its recipient and checked by the recipient (a refused batch would
/// show as an error on either side and its messages would never arrive).
#[test]
fn room_messages_both_ways_by_signed_relay() {
    let mut h = Harness::new("rooms-relay");
    let room = "browser-rooms-relay";
    let (page, browser) = h.room_with_page(room, "");
    exchange(&mut h, &page, room, browser, 600, 600, RoomPath::Relay);
    assert!(h.node.node().get_peer(&browser).is_none(), "a connection to the page");
    let r = h.results(&page);
    assert!(r["roomPaths"].as_array().is_none_or(|a| a.iter().all(|p| p["path"] != "direct")), "{}", r["roomPaths"]);
    eprintln!("room_messages_both_ways_by_signed_relay: {:?}", h.started.elapsed());
}

/// Relayed batches the page must refuse, sent through the server from the node's own signaling
/// connection (so `from` is a member): another member's key, a batch signed for someone else,
/// an altered body, a signature that does not verify and one that is not 64 bytes. Each is
/// reported (`bad_room_message`, `bad_signature`) and nothing is delivered; the same batch
/// signed properly is then delivered.
#[test]
fn the_browser_refuses_room_batches_with_bad_signatures() {
    let mut h = Harness::new("rooms-forged");
    let room = "browser-rooms-forged";
    let (page, browser) = h.room_with_page(room, "");
    let node_identity: Identity = h.node.client().identity().clone();
    let other = peerlink_tests::identity(7);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
    // A stream newer than the node's (which it never used: the node sends nothing here).
    let unix_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    let epoch = (unix_ms + 60_000) << 10;
    let body = wire::encode_batch(&[Item::Data { room: room.into(), epoch, seq: 1, data: message("rust", 1) }]);
    let good = wire::encode_relayed(&node_identity, &mut rng, &browser, &body);
    let with = |field: &str, value: Value| -> String {
        let mut v: Value = serde_json::from_str(&good).expect("json");
        v[field] = value;
        v.to_string()
    };
    let zero_sig = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([1u8; 64])
    };
    let forged = [
        ("another member's key", wire::encode_relayed(&other, &mut rng, &browser, &body), "the key is not the sender's"),
        ("signed for someone else", wire::encode_relayed(&node_identity, &mut rng, &other.fingerprint(), &body), "addressed to another peer"),
        ("addressed to someone else", with("to", json!(other.fingerprint().to_string())), "addressed to another peer"),
        ("an altered body", with("body", json!(body.replace("rust 1", "rust 2"))), "signature does not verify"),
        ("a signature that does not verify", with("sig", json!(zero_sig)), "signature does not verify"),
        ("a signature of 3 bytes", with("sig", json!("AAAA")), "malformed signature"),
    ];
    for (i, (what, payload, why)) in forged.iter().enumerate() {
        assert!(wire::is_relayed(payload), "{what}");
        h.node.client().relay(browser, &RawValue::from_string(payload.clone()).expect("json")).expect("relay");
        let r = h.until(&page, &format!("the page to refuse {what}"), |_, r| r["errors"].as_array().is_some_and(|a| a.len() > i));
        let error = &r["errors"][i];
        assert_eq!(error["code"], "bad_room_message", "{what}: {error}");
        assert_eq!(error["reason"], "bad_signature", "{what}: {error}");
        let message = error["message"].as_str().unwrap_or("");
        assert!(message.contains(why) && message.contains(&h.node.fingerprint().to_string()), "{what}: {message}");
        assert_eq!(page_room_msgs(&r), Vec::<Value>::new(), "{what} was delivered");
    }
    // A moment for anything refused to show up anyway.
    let quiet = Instant::now() + Duration::from_millis(500);
    while Instant::now() < quiet {
        h.pump();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(page_room_msgs(&h.results(&page)), Vec::<Value>::new());
    // The same batch, signed by the node for the page: delivered (and it is message 1's text).
    h.node.client().relay(browser, &RawValue::from_string(good).expect("json")).expect("relay");
    let r = h.until(&page, "the page to take the properly signed batch", |_, r| !page_room_msgs(r).is_empty());
    let msgs = page_room_msgs(&r);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(msgs[0]["n"] == 1 && msgs[0]["k"] == "x" && msgs[0]["ok"] == true && msgs[0]["path"] == "relay", "{msgs:?}");
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(forged.len()));
    eprintln!("the_browser_refuses_room_batches_with_bad_signatures: {:?}", h.started.elapsed());
}

/// Presence both ways: the node's state reaches the page (set, changed, cleared), and the
/// page's reaches the node.
#[test]
fn presence_between_the_node_and_the_browser() {
    let mut h = Harness::new("rooms-presence");
    let room = "browser-rooms-presence";
    let (page, browser) = h.room_with_page(room, "connect=1");
    let node = h.node.fingerprint().to_string();
    let states = [json!({ "status": "busy" }), json!({ "status": "away", "since": 5 }), Value::Null];
    for (i, state) in states.iter().enumerate() {
        let t = Instant::now();
        h.node.room(room).set_presence((!state.is_null()).then_some(state)).expect("set_presence");
        let r = h.until(&page, &format!("the page to see presence {state}"), |_, r| r["roomPresence"].as_array().is_some_and(|a| a.len() > i));
        let seen = &r["roomPresence"][i];
        assert_eq!(seen["from"], *node);
        assert_eq!(seen["state"], *state, "{}", r["roomPresence"]);
        eprintln!("  presence {state} on the page after {:?}", t.elapsed());
    }
    let set = h.browser.eval(&page, "(window.roomSetPresence({ typing: true, text: 'é' }), true)");
    assert_eq!(set, Some(Value::Bool(true)));
    h.until_node("the node to see the page's presence", |h| {
        h.events.iter().any(|e| matches!(e, NodeEvent::Room(RoomEvent::Presence { peer, state: Some(s), .. }) if *peer == browser && *s == json!({ "typing": true, "text": "é" })))
    });
    assert_eq!(h.node.node().room(room).expect("room").members[0].presence, Some(json!({ "typing": true, "text": "é" })));
    let r = h.results(&page);
    assert_eq!(r["roomPresence"].as_array().map(Vec::len), Some(states.len()), "{}", r["roomPresence"]);
    assert!(h.node_room_errors().is_empty(), "{:?}", h.node_room_errors());
    eprintln!("presence_between_the_node_and_the_browser: {:?}", h.started.elapsed());
}

/// Sync frames (`y` items: the node syncs a key-value state in the room) are acknowledged by
/// the page but not delivered: the messages sent around them arrive in order, and nothing of
/// the node's stream is left unacknowledged (it would be resent forever otherwise).
#[test]
fn sync_frames_are_acknowledged_not_delivered() {
    let mut h = Harness::new("rooms-sync");
    let room = "browser-rooms-sync";
    let (page, browser) = h.room_with_page(room, "connect=1");
    let node = h.node.fingerprint();
    h.until_direct(&page, browser);
    h.node.sync_state(room, peerlink::sync::StateConfig::default()).expect("sync_state");
    h.node_room_send(room, 0..10);
    for k in 0..5 {
        h.node.state_set(room, &format!("key-{k}"), &json!({ "k": k })).expect("state_set");
        h.pump_for(Duration::from_millis(20), |_| {});
    }
    h.node_room_send(room, 10..20);
    let r = h.until(&page, "the messages around the sync frames and the frames", |_, r| {
        page_room_msgs(r).len() >= 20 && r["roomSyncIgnored"].as_u64().is_some_and(|n| n > 0)
    });
    check_page_got(&mut h, &r, node, 20, Some("direct"));
    h.pump_for(Duration::from_millis(1500), |_| {});
    let r = h.results(&page);
    check_page_got(&mut h, &r, node, 20, Some("direct"));
    let view = h.node.node().room(room).expect("the node's room");
    assert_eq!(view.members[0].unacked, 0, "the node's messages (sync frames included) the page did not acknowledge");
    assert_eq!(r["errors"], json!([]));
    eprintln!("  {} sync frames passed over by the page", r["roomSyncIgnored"]);
    eprintln!("sync_frames_are_acknowledged_not_delivered: {:?}", h.started.elapsed());
}

/// The browser calls back: its fingerprint is the smaller, so when the node closes the
/// connection (both still in the room) the page calls the node again after 2 s (PROTOCOL.md,
/// "Paths"), the room path goes back to direct on both sides, and messages take it. The node,
/// the larger fingerprint, does not call: the new connection is the page's.
#[test]
fn the_browser_calls_a_member_back_after_a_lost_connection() {
    let mut h = Harness::new("rooms-redial");
    let room = "browser-rooms-redial";
    let node = h.node.fingerprint();
    let identity = identity_where(|fp| fp < node);
    let (page, browser) = h.room_with_page(room, &format!("connect=1&{}", keys_query(&identity)));
    assert_eq!(browser, identity.fingerprint());
    h.until_direct(&page, browser);
    let calls = |h: &Harness| h.events.iter().filter(|e| matches!(e, NodeEvent::Incoming { peer } if *peer == browser)).count();
    assert_eq!(calls(&h), 1, "the page's first call");
    let paths_before = h.results(&page)["roomPaths"].as_array().map_or(0, Vec::len);
    let closed = Instant::now();
    h.node.close_peer(browser).expect("close_peer");
    // The page sees the path go to the relay, then calls again.
    let node_str = node.to_string();
    h.until(&page, "the page's path to the node to go to the relay", |_, r| {
        r["roomPaths"].as_array().is_some_and(|a| a[paths_before..].iter().any(|p| p["peer"] == *node_str && p["path"] == "relay"))
    });
    h.until_node("the page to call the node again", |h| calls(h) == 2);
    let called = closed.elapsed();
    eprintln!("  the page called again {called:?} after the node closed the connection");
    assert!(called >= Duration::from_millis(1900), "called again after {called:?}, before the 2 s backoff");
    let seen = h.events.len();
    h.until_node("the node's path to the page to be direct again", |h| {
        h.events[seen..].iter().any(|e| matches!(e, NodeEvent::Room(RoomEvent::PathChanged { peer, path: RoomPath::Direct, .. }) if *peer == browser))
    });
    h.until(&page, "the page's path to the node to be direct again", |_, r| {
        r["roomPaths"].as_array().is_some_and(|a| a.last().is_some_and(|p| p["peer"] == *node_str && p["path"] == "direct") && a.len() >= paths_before + 2)
    });
    eprintln!("  direct again {:?} after the close", closed.elapsed());
    let view = h.node.node().get_peer(&browser).expect("the new connection");
    assert!(view.state == peerlink::PeerState::Connected && !view.offerer, "the new connection is the page's call: {view:?}");
    exchange(&mut h, &page, room, browser, 50, 50, RoomPath::Direct);
    eprintln!("the_browser_calls_a_member_back_after_a_lost_connection: {:?}", h.started.elapsed());
}

/// Why the page refuses to send a JSON `null`: `"j":null` reads as no contents at all (a
/// `null` field counts as absent), so a node drops the whole batch as malformed.
#[test]
fn a_json_null_is_no_room_message() {
    let null = r#"{"m":[{"t":"d","r":"r","e":1,"s":1,"j":null}]}"#;
    assert!(matches!(wire::decode_batch(null), Err(wire::WireError::Malformed(_))), "{:?}", wire::decode_batch(null));
    assert!(wire::decode_batch(r#"{"m":[{"t":"d","r":"r","e":1,"s":1,"j":0}]}"#).is_ok());
}
