//! Shared state and documents over a managed room on real parts: the real server on
//! 127.0.0.1, real WebSockets, real UDP and str0m underneath. Last-writer-wins and
//! operational key-value state among three members, a late joiner receiving 100,000 keys and
//! a member coming back after its session ended receiving only what changed, a 10 MiB
//! document update cut into fragments, documents and awareness between the smol and tokio
//! adapters, and bad sync input (local refusals, and frames a hostile member puts on the
//! wire) answered with typed errors.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use peerlink::sync::crdt::CrdtEvent;
use peerlink::sync::{CrdtConfig, StateConfig, StateEvent, SyncError, SyncEvent, SyncWireError};
use peerlink::yrs::{GetString, Text, Transact};
use peerlink::{Fingerprint, NodeConfig, NodeError, NodeEvent, RoomData, RoomError, RoomEvent, RoomOptions};
use peerlink_blocking::{PollNode, PollOptions, UdpBind};
use peerlink_tests::{CutProxy, RawClient, WAIT, client_config, identity, start_server};
use serde_json::{Value, json};

const ROOM: &str = "board";

fn poll_node(url: &str, alias: &str) -> PollNode {
    PollNode::new(NodeConfig::with_client(client_config(url, alias)), PollOptions { udp: UdpBind::Loopback, ..Default::default() }).unwrap()
}

/// Two nodes with fixed identities, the first with the smaller fingerprint (the replica that
/// sends the digest when they meet; the other sends `Hello`).
fn ordered_pair(url_a: &str, url_b: &str) -> (PollNode, PollNode) {
    let (mut lo, mut hi) = (identity(11), identity(12));
    if hi.fingerprint() < lo.fingerprint() {
        std::mem::swap(&mut lo, &mut hi);
    }
    let node = |url: &str, alias: &str, id| PollNode::new(NodeConfig::with_client(client_config(url, alias)), PollOptions { udp: UdpBind::Loopback, identity: Some(id), ..Default::default() }).unwrap();
    (node(url_a, "a", lo), node(url_b, "b", hi))
}

/// Blocking nodes polled round-robin, every event kept per node.
struct Mesh {
    nodes: Vec<PollNode>,
    logs: Vec<Vec<NodeEvent>>,
}

impl Mesh {
    fn new(nodes: Vec<PollNode>) -> Mesh {
        Mesh { logs: vec![Vec::new(); nodes.len()], nodes }
    }

    fn round(&mut self) {
        for (n, log) in self.nodes.iter_mut().zip(self.logs.iter_mut()) {
            n.poll(Instant::now()).unwrap();
            while let Some(e) = n.poll_event() {
                log.push(e);
            }
        }
    }

    /// Polls every node until `done`, failing after `limit`.
    fn until_within(&mut self, limit: Duration, what: &str, mut done: impl FnMut(&mut Mesh) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            self.round();
            if done(self) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: timed out; bad sync input seen: {:?}", self.bad_sync_input());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn until(&mut self, what: &str, done: impl FnMut(&mut Mesh) -> bool) {
        self.until_within(WAIT, what, done);
    }

    /// Polls every node for `d`.
    fn run_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.round();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn fp(&self, i: usize) -> Fingerprint {
        self.nodes[i].fingerprint()
    }

    fn room_events(&self, i: usize) -> impl Iterator<Item = &RoomEvent> {
        self.logs[i].iter().filter_map(|e| match e {
            NodeEvent::Room(e) => Some(e),
            _ => None,
        })
    }

    fn state_events(&self, i: usize) -> impl Iterator<Item = &StateEvent> {
        self.logs[i].iter().filter_map(|e| match e {
            NodeEvent::Sync(SyncEvent::State { room, event }) if room == ROOM => Some(event),
            _ => None,
        })
    }

    fn crdt_events(&self, i: usize) -> impl Iterator<Item = &CrdtEvent> {
        self.logs[i].iter().filter_map(|e| match e {
            NodeEvent::Sync(SyncEvent::Crdt { room, event }) if room == ROOM => Some(event),
            _ => None,
        })
    }

    /// Every `BadFrame`, and every state or document `BadMessage`, any node reported.
    fn bad_sync_input(&self) -> Vec<String> {
        self.logs
            .iter()
            .flatten()
            .filter(|e| {
                matches!(
                    e,
                    NodeEvent::Sync(
                        SyncEvent::BadFrame { .. }
                            | SyncEvent::State { event: StateEvent::BadMessage { .. }, .. }
                            | SyncEvent::Crdt { event: CrdtEvent::BadMessage { .. }, .. }
                    )
                )
            })
            .map(|e| format!("{e:?}"))
            .collect()
    }

    fn joined(&self, i: usize) -> bool {
        self.room_events(i).any(|e| matches!(e, RoomEvent::Joined { .. }))
    }

    /// Node 0 creates [`ROOM`] (a group of `size`), the others join it one by one.
    fn form_room(&mut self, size: u32) {
        self.until("registered", |m| m.nodes.iter().all(PollNode::is_registered));
        self.nodes[0].create_room(ROOM, RoomOptions::group(size)).unwrap();
        self.until("created", |m| m.joined(0));
        for i in 1..self.nodes.len() {
            self.nodes[i].join_room(ROOM).unwrap();
            self.until("joined", |m| m.joined(i));
        }
        let n = self.nodes.len();
        self.until("everyone sees everyone", |m| (0..n).all(|i| m.nodes[i].room_info(ROOM).is_some_and(|r| r.members.len() == n - 1)));
    }

    fn all(&self, i: usize) -> BTreeMap<String, Value> {
        self.nodes[i].state(ROOM).expect("synced").get_all().into_iter().map(|(k, v)| (k.to_owned(), v.clone())).collect()
    }

    fn digest(&self, i: usize) -> u64 {
        self.nodes[i].state(ROOM).expect("synced").digest()
    }

    fn converged(&self) -> bool {
        let d0 = self.digest(0);
        (1..self.nodes.len()).all(|i| self.digest(i) == d0)
    }

    /// Whether node `i` heard `key` change to `value` by `origin`.
    fn heard(&self, i: usize, key: &str, value: Option<Value>, origin: Fingerprint) -> bool {
        self.state_events(i).any(|e| *e == StateEvent::Changed { key: key.into(), value: value.clone(), origin })
    }
}

// ---- last-writer-wins ------------------------------------------------------------------------

#[test]
fn lww_state_reaches_every_member_and_deletes_win() {
    let server = start_server(peerlink::ServerConfig::default());
    let url = server.url();
    let mut m = Mesh::new((0..3).map(|i| poll_node(&url, &format!("m{i}"))).collect());
    m.form_room(3);
    for n in &mut m.nodes {
        n.sync_state(ROOM, StateConfig::lww()).unwrap();
    }
    let fp: Vec<Fingerprint> = (0..3).map(|i| m.fp(i)).collect();

    // Each member writes its own key: everyone holds all three, each heard from its writer.
    m.nodes[0].state_set(ROOM, "color", "red").unwrap();
    m.nodes[1].state_set(ROOM, "size", &3).unwrap();
    m.nodes[2].state_set(ROOM, "shape", &json!({"kind": "circle", "r": 2})).unwrap();
    let want = BTreeMap::from([("color".to_owned(), json!("red")), ("shape".to_owned(), json!({"kind": "circle", "r": 2})), ("size".to_owned(), json!(3))]);
    m.until("three keys everywhere", |m| (0..3).all(|i| m.all(i) == want));
    for i in 0..3 {
        assert!(m.heard(i, "color", Some(json!("red")), fp[0]), "m{i}: color from m0");
        assert!(m.heard(i, "size", Some(json!(3)), fp[1]), "m{i}: size from m1");
        assert!(m.heard(i, "shape", Some(json!({"kind": "circle", "r": 2})), fp[2]), "m{i}: shape from m2");
    }

    // One member deletes another's key, a third overwrites another's: both win everywhere.
    assert!(m.nodes[1].state_delete(ROOM, "color").unwrap(), "color was live on m1");
    m.nodes[2].state_set(ROOM, "size", &4).unwrap();
    m.until("delete and overwrite everywhere", |m| (0..3).all(|i| !m.all(i).contains_key("color") && m.all(i).get("size") == Some(&json!(4))));
    for i in [0, 2] {
        assert!(m.heard(i, "color", None, fp[1]), "m{i} heard m1's delete as m1's");
    }
    for i in [0, 1] {
        assert!(m.heard(i, "size", Some(json!(4)), fp[2]), "m{i} heard m2's overwrite as m2's");
    }
    assert_eq!(m.nodes[0].state(ROOM).unwrap().tombstones(), 1, "the delete is kept as a tombstone");

    // Concurrent writes: m2 writes `race`, then (5 ms later, neither having seen the other)
    // m1 deletes it. The later delete wins on every replica, including m2 which holds the
    // newer write in its own view until the tombstone arrives; m1 never takes m2's older write.
    m.nodes[0].state_set(ROOM, "race", "v0").unwrap();
    m.until("race everywhere", |m| (0..3).all(|i| m.all(i).get("race") == Some(&json!("v0"))));
    m.nodes[2].state_set(ROOM, "race", "v2").unwrap();
    std::thread::sleep(Duration::from_millis(5));
    assert!(m.nodes[1].state_delete(ROOM, "race").unwrap());
    // And the reverse: a set later than a concurrent delete wins.
    m.nodes[0].state_set(ROOM, "race2", "v0").unwrap();
    m.until("race2 everywhere", |m| (0..3).all(|i| m.all(i).get("race2") == Some(&json!("v0"))));
    assert!(m.nodes[0].state_delete(ROOM, "race2").unwrap());
    std::thread::sleep(Duration::from_millis(5));
    m.nodes[1].state_set(ROOM, "race2", "v1").unwrap();
    m.until("converged", |m| m.converged() && (0..3).all(|i| !m.all(i).contains_key("race") && m.all(i).get("race2") == Some(&json!("v1"))));
    assert!(m.heard(2, "race", None, fp[1]), "m2 heard the winning delete");
    assert!(!m.heard(1, "race", Some(json!("v2")), fp[2]), "m1 never applied the older concurrent write");
    assert!(m.heard(0, "race2", Some(json!("v1")), fp[1]), "m0's delete lost to the later set");
    let final_map = m.all(0);
    assert_eq!(final_map.keys().collect::<Vec<_>>(), ["race2", "shape", "size"]);
    for i in 1..3 {
        assert_eq!(m.all(i), final_map, "m{i}");
    }
    assert!(m.bad_sync_input().is_empty(), "{:?}", m.bad_sync_input());
    drop(server);
}

// ---- operational -----------------------------------------------------------------------------

/// Set union, sorted: commutative, associative and idempotent.
fn union(_key: &str, a: Option<&Value>, b: Option<&Value>) -> Option<Value> {
    let mut out: Vec<String> = [a, b].into_iter().flatten().flat_map(|v| v.as_array().cloned().unwrap_or_default()).filter_map(|v| v.as_str().map(str::to_owned)).collect();
    out.sort();
    out.dedup();
    Some(json!(out))
}

#[test]
fn operational_conflicts_merge_on_every_replica() {
    let server = start_server(peerlink::ServerConfig::default());
    let url = server.url();
    let mut m = Mesh::new((0..3).map(|i| poll_node(&url, &format!("m{i}"))).collect());
    m.form_room(3);
    for n in &mut m.nodes {
        n.sync_state(ROOM, StateConfig::operational(union)).unwrap();
    }
    let fp: Vec<Fingerprint> = (0..3).map(|i| m.fp(i)).collect();

    // All three write the same key before any has polled for the others' writes.
    for (i, tag) in ["a", "b", "c"].into_iter().enumerate() {
        m.nodes[i].node().state_set(Instant::now(), ROOM, "tags", &json!([tag])).unwrap();
    }
    m.until("the union everywhere", |m| (0..3).all(|i| m.all(i).get("tags") == Some(&json!(["a", "b", "c"]))) && m.converged());
    for i in 0..3 {
        let conflicts: Vec<&StateEvent> = m.state_events(i).filter(|e| matches!(e, StateEvent::Conflict { key, .. } if key == "tags")).collect();
        assert!(!conflicts.is_empty(), "m{i} raised no conflict");
        for c in &conflicts {
            let StateEvent::Conflict { from, local, remote, merged, .. } = c else { unreachable!() };
            assert!(*from != fp[i] && fp.contains(from), "m{i}: conflict from {from:?}");
            // The remote value holds the sender's write (and, when it came through the
            // digest exchange rather than as a change, what the sender had merged already).
            let remote_tag = ["a", "b", "c"][fp.iter().position(|f| f == from).unwrap()];
            assert!(remote.as_ref().and_then(Value::as_array).is_some_and(|a| a.contains(&json!(remote_tag))), "m{i}: remote {remote:?} from the writer of {remote_tag}");
            assert_eq!(*merged, union("tags", local.as_ref(), remote.as_ref()), "m{i}: merged is the union of local and remote");
        }
    }

    // A write that follows the merge replaces it, without a conflict anywhere.
    let before: Vec<usize> = (0..3).map(|i| m.state_events(i).filter(|e| matches!(e, StateEvent::Conflict { .. })).count()).collect();
    m.nodes[1].state_set(ROOM, "tags", &json!(["a", "b", "c", "d"])).unwrap();
    m.until("the follow-up write everywhere", |m| (0..3).all(|i| m.all(i).get("tags") == Some(&json!(["a", "b", "c", "d"]))) && m.converged());
    let after: Vec<usize> = (0..3).map(|i| m.state_events(i).filter(|e| matches!(e, StateEvent::Conflict { .. })).count()).collect();
    assert_eq!(before, after, "a write that saw the merge is not concurrent with it");
    assert!(m.bad_sync_input().is_empty(), "{:?}", m.bad_sync_input());
    drop(server);
}

// ---- a late joiner, and a member that comes back -----------------------------------------------

#[test]
fn a_late_joiner_receives_100000_keys_and_a_returning_member_only_the_changes() {
    const KEYS: usize = 100_000;
    let mut config = peerlink::ServerConfig::default();
    // B's session ends 1 s after its signaling connection is cut (below).
    config.resume_grace = Duration::from_secs(1);
    let server = start_server(config);
    let proxy = CutProxy::start(server.local_addr());
    let (a, b) = ordered_pair(&server.url(), &proxy.url());
    let mut m = Mesh::new(vec![a, b]);
    m.until("registered", |m| m.nodes.iter().all(PollNode::is_registered));
    m.nodes[0].create_room(ROOM, RoomOptions::group(4)).unwrap();
    m.until("created", |m| m.joined(0));
    m.nodes[0].sync_state(ROOM, StateConfig::lww()).unwrap();

    // A writes 100,000 keys in batches of 5,000, polling between.
    let started = Instant::now();
    for batch in 0..KEYS / 5_000 {
        let node = m.nodes[0].node();
        for i in batch * 5_000..(batch + 1) * 5_000 {
            node.state_set(Instant::now(), ROOM, &format!("key-{i:06}"), &json!({ "n": i })).unwrap();
        }
        m.round();
    }
    assert_eq!(m.nodes[0].state(ROOM).unwrap().len(), KEYS);
    eprintln!("sync: A wrote {KEYS} keys in {:?}", started.elapsed());

    // B starts syncing, then joins: it receives every key, about once. (Starting to sync
    // just *after* joining can stall until the anti-entropy round, 30 s later: see
    // `a_member_that_starts_syncing_just_after_joining_gets_the_state_at_once`.)
    let joined_at = Instant::now();
    m.nodes[1].sync_state(ROOM, StateConfig::lww()).unwrap();
    m.nodes[1].join_room(ROOM).unwrap();
    m.until("B joined", |m| m.joined(1));
    m.until_within(Duration::from_secs(20), "B holds A's 100,000 keys", |m| m.digest(1) == m.digest(0));
    let took = joined_at.elapsed();
    assert_eq!(m.nodes[1].state(ROOM).unwrap().len(), KEYS);
    assert_eq!(m.nodes[1].state(ROOM).unwrap().get("key-099999"), Some(&json!({ "n": 99_999 })));
    let (sa, sb) = (m.nodes[0].state(ROOM).unwrap().stats(), m.nodes[1].state(ROOM).unwrap().stats());
    eprintln!(
        "sync: late join of {KEYS} keys in {took:?}: B received {} entries in {} bytes; A sent {} entries in {} bytes",
        sb.entries_received, sb.bytes_received, sa.entries_sent, sa.bytes_sent
    );
    assert!(sb.entries_received >= KEYS as u64 && sb.entries_received < KEYS as u64 * 11 / 10, "each key about once: {sb:?}");
    let full_bytes = sb.bytes_received;

    // B's signaling connection is cut and stays refused until the server ends B's session:
    // A sees B leave and drops its stream and sync state for B. B's node keeps running (its
    // room and its 100,000 keys stay). A changes 10 things meanwhile.
    proxy.refuse(true);
    proxy.cut();
    let fb = m.fp(1);
    m.until("A sees B's session end", |m| m.room_events(0).any(|e| matches!(e, RoomEvent::PeerLeft { peer, .. } if *peer == fb)));
    let before = m.nodes[1].state(ROOM).unwrap().stats();
    for i in 0..7 {
        m.nodes[0].state_set(ROOM, &format!("key-{:06}", i * 10_007), &json!({ "n": -1 })).unwrap();
    }
    assert!(m.nodes[0].state_delete(ROOM, "key-050000").unwrap());
    assert!(m.nodes[0].state_delete(ROOM, "key-050001").unwrap());
    m.nodes[0].state_set(ROOM, "key-new", "while B was away").unwrap();
    m.run_for(Duration::from_millis(300));
    assert!(m.nodes[1].state(ROOM).unwrap().get("key-new").is_none(), "B was really cut off");
    assert_ne!(m.digest(1), m.digest(0));

    // B comes back: a fresh session, the room joined again on its own, and the digest
    // exchange brings it the ten changes and little else.
    proxy.refuse(false);
    m.until_within(Duration::from_secs(20), "B caught up", |m| m.digest(1) == m.digest(0));
    let joins = m.room_events(0).filter(|e| matches!(e, RoomEvent::PeerJoined { peer, .. } if peer.fingerprint == fb)).count();
    assert_eq!(joins, 2, "A saw B join, leave and come back as a new member");
    let s = m.nodes[1].state(ROOM).unwrap();
    assert_eq!((s.len(), s.get("key-new"), s.get("key-050000"), s.get("key-010007")), (KEYS - 1, Some(&json!("while B was away")), None, Some(&json!({ "n": -1 }))));
    let after = s.stats();
    let (entries, bytes) = (after.entries_received - before.entries_received, after.bytes_received - before.bytes_received);
    eprintln!("sync: B came back after missing 10 changes: it received {entries} entries in {bytes} bytes (the full join took {full_bytes})");
    assert!((10..=40).contains(&entries), "about the ten changes: {entries} entries");
    assert!(bytes * 50 < full_bytes, "a small fraction of the full state: {bytes} bytes");

    // And once caught up, 10 further changes on A reach B as 10 entries.
    let before = m.nodes[1].state(ROOM).unwrap().stats();
    for i in 0..10 {
        m.nodes[0].state_set(ROOM, &format!("key-{:06}", 20 + i), "live").unwrap();
    }
    m.until("the live changes", |m| m.digest(1) == m.digest(0));
    let after = m.nodes[1].state(ROOM).unwrap().stats();
    let (entries, bytes) = (after.entries_received - before.entries_received, after.bytes_received - before.bytes_received);
    eprintln!("sync: 10 live changes reached B as {entries} entries in {bytes} bytes");
    assert_eq!(entries, 10);
    assert!(bytes < 4_096, "{bytes} bytes");
    assert!(m.bad_sync_input().is_empty(), "{:?}", m.bad_sync_input());
    drop(m);
    drop(proxy);
    drop(server);
}

/// Regression: when the member with the smaller fingerprint (A) sees B join, it sends B its
/// digest at once. If B has not started state sync yet, B's node drops that frame. B then
/// starts syncing and sends `Hello`, which A must answer even though it sent a digest less than
/// a second before (it used to skip it, and B waited for the anti-entropy digest, 30 s).
#[test]
fn a_member_that_starts_syncing_just_after_joining_gets_the_state_at_once() {
    let server = start_server(peerlink::ServerConfig::default());
    let (a, b) = ordered_pair(&server.url(), &server.url());
    let mut m = Mesh::new(vec![a, b]);
    m.until("registered", |m| m.nodes.iter().all(PollNode::is_registered));
    m.nodes[0].create_room(ROOM, RoomOptions::group(4)).unwrap();
    m.until("created", |m| m.joined(0));
    m.nodes[0].sync_state(ROOM, StateConfig::lww()).unwrap();
    m.nodes[0].state_set(ROOM, "hello", "late joiner").unwrap();
    m.nodes[1].join_room(ROOM).unwrap();
    m.until("B joined", |m| m.joined(1));
    // B starts syncing a moment after joining (A's digest has arrived and was dropped).
    m.run_for(Duration::from_millis(200));
    m.nodes[1].sync_state(ROOM, StateConfig::lww()).unwrap();
    m.until("B holds A's key", |m| m.nodes[1].state(ROOM).unwrap().get("hello").is_some());
    drop(server);
}

// ---- a large document update -----------------------------------------------------------------

fn text_of(node: &mut PollNode, doc: &str) -> String {
    node.crdt_edit(ROOM, doc, |d| d.get_or_insert_text("text").get_string(&d.transact())).unwrap()
}

#[test]
fn a_ten_mib_document_update_reaches_the_other_member() {
    let server = start_server(peerlink::ServerConfig::default());
    let url = server.url();
    let mut m = Mesh::new(vec![poll_node(&url, "a"), poll_node(&url, "b")]);
    // Both open the document before joining (a handshake for a document not open yet is
    // refused as `UnknownDocument`); joining runs the handshake.
    m.until("registered", |m| m.nodes.iter().all(PollNode::is_registered));
    for n in &mut m.nodes {
        n.sync_crdt(ROOM, CrdtConfig::default()).unwrap();
        n.crdt_edit(ROOM, "big", |d| {
            d.get_or_insert_text("text");
        })
        .unwrap();
    }
    m.form_room(2);
    let (fa, fb) = (m.fp(0), m.fp(1));
    m.until("the documents' handshake", |m| {
        m.crdt_events(0).any(|e| matches!(e, CrdtEvent::Synced { peer, .. } if *peer == fb)) && m.crdt_events(1).any(|e| matches!(e, CrdtEvent::Synced { peer, .. } if *peer == fa))
    });

    let mut content = String::with_capacity(10 << 20);
    let mut i = 0u64;
    while content.len() < 10 << 20 {
        content.push_str(&format!("line {i:08} {:016x}\n", i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        i += 1;
    }
    content.truncate(10 << 20);
    let started = Instant::now();
    m.nodes[0]
        .crdt_edit(ROOM, "big", |d| {
            let t = d.get_or_insert_text("text");
            let mut txn = d.transact_mut();
            t.insert(&mut txn, 0, &content);
        })
        .unwrap();
    let want = content.len() as u32;
    m.until_within(Duration::from_secs(40), "B holds the 10 MiB", |m| {
        let doc = m.nodes[1].node().crdt(ROOM).and_then(|c| c.doc("big")).expect("open");
        let len = doc.get_or_insert_text("text").len(&doc.transact());
        len == want
    });
    eprintln!("sync: a 10 MiB document update reached B in {:?}", started.elapsed());
    assert!(text_of(&mut m.nodes[1], "big") == content, "B's text differs from A's");
    assert!(m.crdt_events(1).any(|e| *e == CrdtEvent::Updated { doc: "big".into(), from: fa }));
    // A few more rounds: nothing bad arrives late (the tail of the fragments, acks).
    m.run_for(Duration::from_millis(200));
    assert!(m.bad_sync_input().is_empty(), "{:?}", m.bad_sync_input());
    // And a small edit after it still goes through.
    m.nodes[1]
        .crdt_edit(ROOM, "big", |d| {
            let t = d.get_or_insert_text("text");
            let mut txn = d.transact_mut();
            t.insert(&mut txn, 0, "B was here\n");
        })
        .unwrap();
    m.until("B's edit at A", |m| {
        let doc = m.nodes[0].node().crdt(ROOM).and_then(|c| c.doc("big")).expect("open");
        doc.get_or_insert_text("text").len(&doc.transact()) == want + 11
    });
    assert!(text_of(&mut m.nodes[0], "big").starts_with("B was here\nline 00000000 "));
    drop(server);
}

// ---- documents and awareness between the async adapters ------------------------------------------

#[test]
fn document_edits_and_awareness_sync_both_ways() {
    let server = start_server(peerlink::ServerConfig::default());
    let url = server.url();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        tokio::time::timeout(WAIT * 3, async {
            let (t, mut et) = peerlink_tokio::Node::connect_with(
                NodeConfig::with_client(client_config(&url, "tokio")),
                peerlink_tokio::ConnectOptions { udp: peerlink_tokio::UdpBind::Loopback, ..Default::default() },
            )
            .await
            .unwrap();
            let (s, mut es) = peerlink_smol::Node::connect_with(
                NodeConfig::with_client(client_config(&url, "smol")),
                peerlink_smol::ConnectOptions { udp: peerlink_smol::UdpBind::Loopback, ..Default::default() },
            )
            .await
            .unwrap();
            let (ft, fs) = (t.fingerprint(), s.fingerprint());
            // Both start syncing and open the document before they meet (a handshake for a
            // document not open yet is refused as `UnknownDocument`); joining runs it.
            let read = |d: &peerlink::yrs::Doc| d.get_or_insert_text("text").get_string(&d.transact());
            t.sync_crdt(ROOM, CrdtConfig::default()).await.unwrap();
            s.sync_crdt(ROOM, CrdtConfig::default()).await.unwrap();
            t.crdt_edit(ROOM, "notes", read).await.unwrap();
            s.crdt_edit(ROOM, "notes", read).await.unwrap();
            t.create_room(ROOM, RoomOptions::group(2)).await.unwrap();
            s.join_room(ROOM).await.unwrap();

            let append = |line: &'static str| {
                move |d: &peerlink::yrs::Doc| {
                    let text = d.get_or_insert_text("text");
                    let mut txn = d.transact_mut();
                    let end = text.len(&txn);
                    text.insert(&mut txn, end, line);
                }
            };
            t.crdt_edit(ROOM, "notes", append("tokio was here\n")).await.unwrap();
            s.crdt_edit(ROOM, "notes", append("smol was here\n")).await.unwrap();
            s.set_awareness(ROOM, "notes", Some(json!({"user": "smol", "cursor": 3}))).await.unwrap();
            t.set_awareness(ROOM, "notes", Some(json!({"user": "tokio", "cursor": 7}))).await.unwrap();

            let (mut lt, mut ls): (Vec<NodeEvent>, Vec<NodeEvent>) = (Vec::new(), Vec::new());
            let crdt = |log: &[NodeEvent], want: &CrdtEvent| log.iter().any(|e| matches!(e, NodeEvent::Sync(SyncEvent::Crdt { room, event }) if room == ROOM && event == want));
            loop {
                while let Some(e) = et.try_next() {
                    lt.push(e);
                }
                while let Some(e) = es.try_next() {
                    ls.push(e);
                }
                let (tt, ts) = (t.crdt_edit(ROOM, "notes", read).await.unwrap(), s.crdt_edit(ROOM, "notes", read).await.unwrap());
                let aware_t = crdt(&lt, &CrdtEvent::Awareness { doc: "notes".into(), peer: fs, state: Some(json!({"user": "smol", "cursor": 3})) });
                let aware_s = crdt(&ls, &CrdtEvent::Awareness { doc: "notes".into(), peer: ft, state: Some(json!({"user": "tokio", "cursor": 7})) });
                if tt == ts && tt.contains("tokio was here\n") && tt.contains("smol was here\n") && aware_t && aware_s {
                    assert_eq!(tt.len(), "tokio was here\nsmol was here\n".len());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(crdt(&lt, &CrdtEvent::Updated { doc: "notes".into(), from: fs }), "tokio heard smol's edit");
            assert!(crdt(&ls, &CrdtEvent::Updated { doc: "notes".into(), from: ft }), "smol heard tokio's edit");
            let states = t.with_core(|node, _| Ok(node.crdt(ROOM).map(|c| c.awareness("notes")).unwrap_or_default())).await.unwrap();
            assert_eq!(states, vec![(fs, json!({"user": "smol", "cursor": 3}))]);

            // Clearing awareness reaches the other side as `None`.
            s.set_awareness(ROOM, "notes", None).await.unwrap();
            let cleared = CrdtEvent::Awareness { doc: "notes".into(), peer: fs, state: None };
            while !crdt(&lt, &cleared) {
                match et.next().await {
                    Some(e) => lt.push(e),
                    None => panic!("tokio's driver ended"),
                }
            }
            for log in [&lt, &ls] {
                assert!(!log.iter().any(|e| matches!(e, NodeEvent::Sync(SyncEvent::BadFrame { .. } | SyncEvent::Crdt { event: CrdtEvent::BadMessage { .. }, .. }))), "{log:?}");
            }
            t.close().await;
            s.close().await;
        })
        .await
        .expect("timed out");
    });
    drop(server);
}

// ---- bad input ---------------------------------------------------------------------------------

fn node_error(e: peerlink_blocking::Error) -> NodeError {
    match e {
        peerlink_blocking::Error::Node(e) => e,
        other => panic!("expected a node error, got {other:?}"),
    }
}

/// A raw participant: registered over a raw WebSocket, a member of [`ROOM`], sending room
/// batches (signed relays) with whatever sync frames it likes.
struct Hostile {
    raw: RawClient,
    identity: peerlink::Identity,
    rng: rand_chacha::ChaCha20Rng,
    seq: u64,
}

impl Hostile {
    fn send(&mut self, to: Fingerprint, frames: &[Vec<u8>]) {
        use peerlink::room::wire::{Item, encode_batch, encode_relayed};
        let items: Vec<Item> = frames
            .iter()
            .map(|f| {
                self.seq += 1;
                Item::Data { room: ROOM.into(), epoch: 1, seq: self.seq, data: RoomData::Sync(f.clone()) }
            })
            .collect();
        let payload = encode_relayed(&self.identity, &mut self.rng, &to, &encode_batch(&items));
        self.raw.send(&format!(r#"{{"type":"relay","to":"{to}","payload":{payload}}}"#));
    }
}

/// A state `Entries` message with one entry per `(key, json)`, written by `node` at `ms`.
fn entries(node: Fingerprint, ms: u64, items: &[(&str, &str)]) -> Vec<u8> {
    use peerlink::sync::Timestamp;
    use peerlink::sync::wire::{NodeTable, Type, Version, put_entry, put_varint, with_nodes};
    let mut nodes = NodeTable::default();
    let mut body = Vec::new();
    put_varint(&mut body, items.len() as u64);
    for (i, (key, value)) in items.iter().enumerate() {
        let version = Version { ts: Timestamp { ms, counter: i as u32, node }, vv: Vec::new() };
        put_entry(&mut body, &mut nodes, key, &version, Some(value), std::iter::empty());
    }
    with_nodes(Type::Entries, &nodes, &body)
}

fn whole(kind: u8, msg: &[u8]) -> Vec<u8> {
    let mut f = vec![kind, 0];
    f.extend_from_slice(msg);
    f
}

fn fragment(kind: u8, id: u64, total: u64, offset: u64, piece: &[u8]) -> Vec<u8> {
    use peerlink::sync::wire::put_varint;
    let mut f = vec![kind, 1];
    put_varint(&mut f, id);
    put_varint(&mut f, total);
    put_varint(&mut f, offset);
    f.extend_from_slice(piece);
    f
}

#[test]
fn bad_sync_input_gets_typed_errors() {
    use peerlink::sync::{KIND_CRDT, KIND_STATE};
    let server = start_server(peerlink::ServerConfig::default());
    let url = server.url();
    let mut m = Mesh::new(vec![poll_node(&url, "victim")]);
    m.until("registered", |m| m.nodes[0].is_registered());
    m.nodes[0].create_room(ROOM, RoomOptions::group(4)).unwrap();
    m.until("created", |m| m.joined(0));

    // Local refusals, typed, nothing changed.
    let n = &mut m.nodes[0];
    let e = node_error(n.state_set(ROOM, "k", &1).unwrap_err());
    assert_eq!(e, NodeError::Sync(SyncError::NotSynced(ROOM.into())));
    let e = node_error(n.crdt_edit(ROOM, "doc", |_| ()).unwrap_err());
    assert_eq!(e, NodeError::Sync(SyncError::NotSynced(ROOM.into())));
    n.sync_state(ROOM, StateConfig::lww()).unwrap();
    n.sync_crdt(ROOM, CrdtConfig::default()).unwrap();
    let e = node_error(n.state_set(ROOM, &"k".repeat(1025), &1).unwrap_err());
    assert_eq!(e, NodeError::Sync(SyncError::BadKey { len: 1025, max: 1024 }));
    let e = node_error(n.state_set(ROOM, "", &1).unwrap_err());
    assert_eq!(e, NodeError::Sync(SyncError::BadKey { len: 0, max: 1024 }));
    let e = node_error(n.state_set(ROOM, "big", &"x".repeat(64 * 1024)).unwrap_err());
    assert_eq!(e, NodeError::Sync(SyncError::ValueTooLarge { size: 64 * 1024 + 2, max: 64 * 1024 }));
    let e = node_error(n.state_delete(ROOM, &"k".repeat(2000)).unwrap_err());
    assert_eq!(e, NodeError::Sync(SyncError::BadKey { len: 2000, max: 1024 }));
    let e = node_error(n.crdt_edit(ROOM, "", |_| ()).unwrap_err());
    assert_eq!(e, NodeError::Sync(SyncError::BadDocName { len: 0, max: 128 }));
    let e = node_error(n.crdt_edit(ROOM, &"d".repeat(129), |_| ()).unwrap_err());
    assert_eq!(e, NodeError::Sync(SyncError::BadDocName { len: 129, max: 128 }));
    let e = node_error(n.set_awareness(ROOM, "doc", Some(json!("x".repeat(5000)))).unwrap_err());
    assert!(matches!(e, NodeError::Sync(SyncError::ValueTooLarge { max: 4096, .. })), "{e:?}");
    let e = n.node().room_send(Instant::now(), ROOM, None, RoomData::Sync(vec![KIND_STATE, 0, 1, 7])).unwrap_err();
    assert!(matches!(e, NodeError::Room(RoomError::Serialize(_))), "{e:?}");
    let s = n.state(ROOM).unwrap();
    assert_eq!((s.len(), s.tombstones(), s.stats().bytes_sent), (0, 0, 0), "nothing changed");
    assert_eq!(n.node().crdt(ROOM).unwrap().docs().count(), 0, "no document was opened");
    m.round();
    assert_eq!(m.state_events(0).count(), 0, "no state event for refused writes");

    // A hostile member: a raw client joins the room and sends sync frames by signed relay.
    let id = identity(4242);
    let mut raw = RawClient::connect(&url);
    assert!(matches!(raw.register(&id), peerlink::protocol::ServerMessage::Registered { .. }));
    raw.send(&format!(r#"{{"type":"join_room","id":2,"room_id":"{ROOM}"}}"#));
    raw.sync(3);
    let hostile_fp = id.fingerprint();
    m.until("the victim sees the raw member", |m| m.room_events(0).any(|e| matches!(e, RoomEvent::PeerJoined { peer, .. } if peer.fingerprint == hostile_fp)));
    let victim = m.fp(0);
    let mut h = Hostile { raw, identity: id, rng: rand::SeedableRng::seed_from_u64(9), seq: 0 };
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;

    let good_and_bad = entries(hostile_fp, now_ms, &[("fine", "1"), (&"k".repeat(1025), "2")]);
    let not_json = entries(hostile_fp, now_ms, &[("fine2", "{not json")]);
    let mut crdt_unknown_doc = Vec::new();
    peerlink::sync::wire::put_str(&mut crdt_unknown_doc, "nobody-opened-this");
    // An update (sync step 2: an empty v1 update); a handshake for it would be ignored quietly.
    crdt_unknown_doc.extend_from_slice(&[0, 2, 2, 0, 0]);
    let frames = vec![
        /* 1 */ vec![KIND_STATE, 7, 1, 2, 3],                             // unknown flag
        /* 2 */ whole(9, b"whatever"),                                    // unknown kind
        /* 3 */ fragment(KIND_STATE, 0, 1 << 40, 0, b"piece"),            // total over the limit
        /* 4 */ fragment(KIND_CRDT, 5, 100, 50, &[0; 50]),                // never started
        /* 5 */ fragment(KIND_CRDT, 6, 100, 0, &[0; 40]),                 // started...
        /* 6 */ fragment(KIND_CRDT, 6, 100, 60, &[0; 40]),                // ...and a gap
        /* 7 */ vec![KIND_STATE],                                         // cut short
        /* 8 */ whole(KIND_STATE, &[1, 99]),                              // unknown state type
        /* 9 */ whole(KIND_STATE, &good_and_bad),                         // one bad entry spoils the message
        /* 10 */ whole(KIND_STATE, &not_json),                            // a value that is not JSON
        /* 11 */ whole(KIND_CRDT, &crdt_unknown_doc),                     // a document not open here
        /* 12 */ whole(KIND_STATE, &entries(hostile_fp, now_ms, &[("probe", "\"ok\"")])), // a good one, last
    ];
    h.send(victim, &frames);
    m.until("the probe arrives", |m| m.nodes[0].state(ROOM).unwrap().get("probe").is_some());
    h.raw.sync(4);

    let frame_errors: Vec<&SyncWireError> = m.logs[0]
        .iter()
        .filter_map(|e| match e {
            NodeEvent::Sync(SyncEvent::BadFrame { room, from, error }) if room == ROOM => {
                assert_eq!(*from, hostile_fp);
                Some(error)
            }
            _ => None,
        })
        .collect();
    assert_eq!(frame_errors.len(), 6, "{frame_errors:#?}");
    assert_eq!(*frame_errors[0], SyncWireError::Malformed("unknown frame flag".into()));
    assert_eq!(*frame_errors[1], SyncWireError::Malformed("unknown sync kind 9".into()));
    assert!(matches!(frame_errors[2], SyncWireError::TooLarge { size, .. } if *size == 1 << 40), "{:?}", frame_errors[2]);
    assert_eq!(*frame_errors[3], SyncWireError::Malformed("fragment of a message never started".into()));
    assert_eq!(*frame_errors[4], SyncWireError::Malformed("fragment out of sequence".into()));
    assert!(matches!(frame_errors[5], SyncWireError::Malformed(_)), "cut short: {:?}", frame_errors[5]);

    let state_bad: Vec<&SyncWireError> = m
        .state_events(0)
        .filter_map(|e| match e {
            StateEvent::BadMessage { from, error } if *from == hostile_fp => Some(error),
            _ => None,
        })
        .collect();
    assert_eq!(state_bad.len(), 3, "{state_bad:#?}");
    assert!(matches!(state_bad[0], SyncWireError::Malformed(_)), "unknown type: {:?}", state_bad[0]);
    assert!(matches!(state_bad[1], SyncWireError::Malformed(_) | SyncWireError::BadEntry(SyncError::BadKey { .. })), "long key: {:?}", state_bad[1]);
    assert!(matches!(state_bad[2], SyncWireError::Malformed(_)), "not JSON: {:?}", state_bad[2]);
    let crdt_bad: Vec<&CrdtEvent> = m.crdt_events(0).filter(|e| matches!(e, CrdtEvent::BadMessage { .. })).collect();
    assert_eq!(crdt_bad, vec![&CrdtEvent::BadMessage { from: hostile_fp, error: SyncWireError::UnknownDocument("nobody-opened-this".into()) }]);

    // Nothing of the bad messages was applied; the good one was, as the hostile member's.
    let s = m.nodes[0].state(ROOM).unwrap();
    assert_eq!(m.all(0), BTreeMap::from([("probe".to_owned(), json!("ok"))]), "only the probe: {:?}", s.get_all());
    assert!(m.heard(0, "probe", Some(json!("ok")), hostile_fp));
    assert_eq!(m.state_events(0).filter(|e| matches!(e, StateEvent::Changed { .. })).count(), 1);
    // The node still works: its own writes are taken.
    m.nodes[0].state_set(ROOM, "after", &true).unwrap();
    assert_eq!(m.nodes[0].state(ROOM).unwrap().get("after"), Some(&json!(true)));
    drop(h);
    drop(server);
}
