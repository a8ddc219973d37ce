use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde_json::json;
use yrs::types::ToJson;
use yrs::{Array, GetString, Map, Text, Transact};

use super::*;

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

/// Replicas that deliver each other's messages; `links` are the pairs that are up.
struct Net {
    nodes: Vec<CrdtSync>,
    links: BTreeSet<(usize, usize)>,
    events: Vec<Vec<CrdtEvent>>,
    now: Instant,
    delivered: usize,
}

impl Net {
    fn new(n: usize) -> Self {
        Self::with_config(n, CrdtConfig::default())
    }

    fn with_config(n: usize, config: CrdtConfig) -> Self {
        let nodes = (0..n).map(|i| CrdtSync::new(config.clone(), fp(i as u8 + 1), 1000 + i as u64)).collect();
        Net { nodes, links: BTreeSet::new(), events: vec![Vec::new(); n], now: crate::test_epoch(), delivered: 0 }
    }

    fn up(&self, a: usize, b: usize) -> bool {
        self.links.contains(&(a.min(b), a.max(b)))
    }

    /// Brings a link up (both sides see `handle_member_up`).
    fn connect(&mut self, a: usize, b: usize) {
        self.links.insert((a.min(b), a.max(b)));
        let now = self.now;
        self.nodes[a].handle_member_up(now, fp(b as u8 + 1));
        self.nodes[b].handle_member_up(now, fp(a as u8 + 1));
    }

    fn connect_all(&mut self) {
        for a in 0..self.nodes.len() {
            for b in a + 1..self.nodes.len() {
                self.connect(a, b);
            }
        }
    }

    fn disconnect(&mut self, a: usize, b: usize) {
        self.links.remove(&(a.min(b), a.max(b)));
        self.nodes[a].handle_member_down(fp(b as u8 + 1));
        self.nodes[b].handle_member_down(fp(a as u8 + 1));
    }

    /// Flushes everyone and delivers messages until none are left.
    fn pump(&mut self) {
        let now = self.now;
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                self.nodes[i].flush(now);
                while let Some(message) = self.nodes[i].poll_message() {
                    moved = true;
                    for j in 0..self.nodes.len() {
                        let wanted = match message.to {
                            Some(to) => to == fp(j as u8 + 1),
                            None => j != i,
                        };
                        if wanted && self.up(i, j) {
                            self.delivered += 1;
                            self.nodes[j].handle_message(now, fp(i as u8 + 1), &message.bytes);
                        }
                    }
                }
            }
            for i in 0..self.nodes.len() {
                while let Some(event) = self.nodes[i].poll_event() {
                    self.events[i].push(event);
                }
            }
            if !moved {
                break;
            }
        }
    }

    fn take_events(&mut self, i: usize) -> Vec<CrdtEvent> {
        std::mem::take(&mut self.events[i])
    }

    fn json(&self, i: usize, doc: &str) -> yrs::Any {
        let doc = self.nodes[i].doc(doc).expect("open");
        doc.to_json(&doc.transact())
    }

    fn text(&mut self, i: usize, doc: &str) -> String {
        let now = self.now;
        let text = self.nodes[i].get_text(now, doc, DEFAULT_TEXT).unwrap();
        let doc = self.nodes[i].doc(doc).unwrap();
        text.get_string(&doc.transact())
    }
}

fn insert_text(node: &mut CrdtSync, now: Instant, doc: &str, at: u32, s: &str) {
    let text = node.get_text(now, doc, DEFAULT_TEXT).unwrap();
    let doc = node.doc(doc).unwrap();
    let mut txn = doc.transact_mut();
    text.insert(&mut txn, at, s);
}

fn bad_messages(events: &[CrdtEvent]) -> Vec<SyncWireError> {
    events
        .iter()
        .filter_map(|event| match event {
            CrdtEvent::BadMessage { error, .. } => Some(error.clone()),
            _ => None,
        })
        .collect()
}

fn count_updated(events: &[CrdtEvent], name: &str) -> usize {
    events.iter().filter(|event| matches!(event, CrdtEvent::Updated { doc, .. } if doc == name)).count()
}

#[test]
fn text_map_and_array_edits_converge() {
    let mut net = Net::new(2);
    net.connect_all();
    let now = net.now;
    for i in 0..2 {
        net.nodes[i].open(now, "notes").unwrap();
    }
    net.pump();

    let text = net.nodes[0].get_text(now, "notes", "body").unwrap();
    let map = net.nodes[0].get_map(now, "notes", "meta").unwrap();
    let array = net.nodes[0].get_array(now, "notes", "list").unwrap();
    {
        let doc = net.nodes[0].doc("notes").unwrap();
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, "hello world");
        map.insert(&mut txn, "title", "greeting");
        map.insert(&mut txn, "n", 3);
        array.push_back(&mut txn, 1);
        array.push_back(&mut txn, "two");
    }
    assert!(net.nodes[0].wants_flush());
    net.pump();
    assert!(!net.nodes[0].wants_flush());

    let text1 = net.nodes[1].get_text(now, "notes", "body").unwrap();
    let map1 = net.nodes[1].get_map(now, "notes", "meta").unwrap();
    {
        let doc = net.nodes[1].doc("notes").unwrap();
        let txn = doc.transact();
        assert_eq!(text1.get_string(&txn), "hello world");
        assert_eq!(map1.get(&txn, "title").map(|v| v.to_string(&txn)), Some("greeting".to_owned()));
    }
    net.nodes[1].get_array(now, "notes", "list").unwrap();
    assert_eq!(net.json(0, "notes"), net.json(1, "notes"));
    assert!(net.take_events(1).contains(&CrdtEvent::Updated { doc: "notes".into(), from: fp(1) }));

    // And back: an edit on 1 reaches 0.
    {
        let doc = net.nodes[1].doc("notes").unwrap();
        let mut txn = doc.transact_mut();
        text1.remove_range(&mut txn, 5, 6);
        map1.remove(&mut txn, "n");
    }
    net.pump();
    {
        let doc = net.nodes[0].doc("notes").unwrap();
        assert_eq!(text.get_string(&doc.transact()), "hello");
    }
    assert_eq!(net.json(0, "notes"), net.json(1, "notes"));
}

#[test]
fn default_names_are_the_reference_ones() {
    assert_eq!((DEFAULT_DOC, DEFAULT_MAP, DEFAULT_TEXT, DEFAULT_ARRAY), ("default", "shared", "text", "array"));
    let mut net = Net::new(2);
    net.connect_all();
    let now = net.now;
    let map = net.nodes[0].get_map(now, DEFAULT_DOC, DEFAULT_MAP).unwrap();
    {
        let doc = net.nodes[0].doc(DEFAULT_DOC).unwrap();
        map.insert(&mut doc.transact_mut(), "k", "v");
    }
    net.nodes[1].open(now, DEFAULT_DOC).unwrap();
    net.pump();
    let map1 = net.nodes[1].get_map(now, DEFAULT_DOC, DEFAULT_MAP).unwrap();
    let doc = net.nodes[1].doc(DEFAULT_DOC).unwrap();
    assert_eq!(
        map1.to_json(&doc.transact()),
        yrs::Any::from(std::collections::HashMap::from([("k".to_owned(), yrs::Any::from("v"))]))
    );
    assert_eq!(net.nodes[1].docs().collect::<Vec<_>>(), vec![DEFAULT_DOC]);
}

#[test]
fn concurrent_edits_on_three_replicas_converge() {
    let mut net = Net::new(3);
    net.connect_all();
    let now = net.now;
    for i in 0..3 {
        net.nodes[i].open(now, "d").unwrap();
    }
    net.pump();
    // Everyone edits before anyone hears of the others.
    for i in 0..3 {
        insert_text(&mut net.nodes[i], now, "d", 0, &format!("<{i}>"));
        let map = net.nodes[i].get_map(now, "d", DEFAULT_MAP).unwrap();
        let doc = net.nodes[i].doc("d").unwrap();
        map.insert(&mut doc.transact_mut(), "winner", i as i64);
    }
    net.pump();
    let text = net.text(0, "d");
    assert_eq!(text.len(), 9);
    for i in 0..3 {
        assert!(text.contains(&format!("<{i}>")));
        assert_eq!(net.text(i, "d"), text);
        assert_eq!(net.json(i, "d"), net.json(0, "d"));
    }
}

#[test]
fn a_member_offline_during_a_thousand_edits_catches_up_both_ways() {
    let mut net = Net::new(3);
    net.connect_all();
    let now = net.now;
    for i in 0..3 {
        net.nodes[i].open(now, "d").unwrap();
    }
    net.pump();
    net.disconnect(0, 2);
    net.disconnect(1, 2);
    for k in 0..1000u32 {
        insert_text(&mut net.nodes[0], now, "d", k, "a");
        insert_text(&mut net.nodes[2], now, "d", k, "c");
        if k % 50 == 0 {
            net.pump();
        }
    }
    net.pump();
    assert_eq!(net.text(1, "d"), "a".repeat(1000), "1 heard 0 all along");
    assert_eq!(net.text(2, "d"), "c".repeat(1000), "2 heard nobody");

    net.connect(0, 2);
    net.connect(1, 2);
    net.pump();
    let text = net.text(0, "d");
    assert_eq!(text.len(), 2000);
    assert_eq!(text.matches('a').count(), 1000);
    assert_eq!(net.text(1, "d"), text);
    assert_eq!(net.text(2, "d"), text);
    for i in [0, 1] {
        let events = net.take_events(i);
        assert!(events.contains(&CrdtEvent::Synced { doc: "d".into(), peer: fp(3) }));
    }
}

#[test]
fn a_ten_mib_insert_syncs_in_one_update() {
    let mut net = Net::new(2);
    net.connect_all();
    let now = net.now;
    for i in 0..2 {
        net.nodes[i].open(now, "big").unwrap();
    }
    net.pump();
    let big = "x".repeat(10 * 1024 * 1024 + 1);
    insert_text(&mut net.nodes[0], now, "big", 0, &big);
    net.nodes[0].flush(now);
    let message = net.nodes[0].poll_message().expect("one update");
    assert!(net.nodes[0].poll_message().is_none());
    assert!(message.bytes.len() > 10 * 1024 * 1024);
    net.nodes[1].handle_message(now, fp(1), &message.bytes);
    assert_eq!(net.nodes[1].poll_event(), Some(CrdtEvent::Updated { doc: "big".into(), from: fp(1) }));
    assert_eq!(net.text(1, "big").len(), big.len());
}

#[test]
fn an_unknown_document_is_refused_and_not_opened() {
    let mut net = Net::new(2);
    net.connect_all();
    let now = net.now;
    insert_text(&mut net.nodes[0], now, "mine", 0, "secret");
    net.pump();
    let bad = bad_messages(&net.take_events(1));
    assert!(bad.contains(&SyncWireError::UnknownDocument("mine".into())), "{bad:?}");
    assert_eq!(net.nodes[1].docs().count(), 0);
    assert!(net.nodes[1].doc("mine").is_none());

    // Opening it later fetches its state.
    net.nodes[1].open(now, "mine").unwrap();
    net.pump();
    assert_eq!(net.text(1, "mine"), "secret");
    assert!(net.take_events(1).contains(&CrdtEvent::Synced { doc: "mine".into(), peer: fp(1) }));
}

#[test]
fn malformed_messages_are_refused_and_change_nothing() {
    let mut net = Net::new(2);
    net.connect_all();
    let now = net.now;
    insert_text(&mut net.nodes[0], now, "d", 0, "hello");
    net.nodes[1].open(now, "d").unwrap();
    net.pump();
    net.take_events(1);
    let before = net.json(1, "d");
    let sv_before = net.nodes[1].doc("d").unwrap().transact().state_vector();

    // A genuine update to cut up.
    insert_text(&mut net.nodes[0], now, "d", 5, " world");
    net.nodes[0].flush(now);
    let good = net.nodes[0].poll_message().unwrap().bytes;

    let mut bad_type = Vec::new();
    bad_type.write_string("d");
    bad_type.write_var(7u64);
    let mut bad_subtype = Vec::new();
    bad_subtype.write_string("d");
    bad_subtype.write_var(0u64);
    bad_subtype.write_var(9u64);
    bad_subtype.write_buf([0u8]);
    let mut trailing = good.clone();
    trailing.push(0);
    let truncated = good[..good.len() - 3].to_vec();
    let garbage_update = encode_sync("d", SYNC_UPDATE, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    let garbage_sv = encode_sync("d", SYNC_STEP1, &[0x05, 0x01]);
    let bad_awareness = encode_awareness("d", 1, 1, "{not json");
    let mut not_utf8 = Vec::new();
    not_utf8.write_buf([0xffu8, 0xfe]);

    type Case = (&'static str, Vec<u8>, fn(&SyncWireError) -> bool);
    let cases: Vec<Case> = vec![
        ("empty", vec![], |e| matches!(e, SyncWireError::Malformed(_))),
        ("bad type", bad_type, |e| matches!(e, SyncWireError::Malformed(_))),
        ("bad subtype", bad_subtype, |e| matches!(e, SyncWireError::Malformed(_))),
        ("truncated", truncated, |e| matches!(e, SyncWireError::Malformed(_))),
        ("trailing garbage", trailing, |e| matches!(e, SyncWireError::Malformed(_))),
        ("not utf-8 name", not_utf8, |e| matches!(e, SyncWireError::Malformed(_))),
        ("undecodable update", garbage_update, |e| matches!(e, SyncWireError::BadUpdate { .. })),
        ("undecodable state vector", garbage_sv, |e| matches!(e, SyncWireError::BadUpdate { .. })),
        ("bad awareness json", bad_awareness, |e| matches!(e, SyncWireError::Malformed(_))),
    ];
    for (what, bytes, expected) in cases {
        net.nodes[1].handle_message(now, fp(1), &bytes);
        match net.nodes[1].poll_event() {
            Some(CrdtEvent::BadMessage { from, error }) => {
                assert_eq!(from, fp(1));
                assert!(expected(&error), "{what}: {error:?}");
            }
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(net.nodes[1].poll_event(), None, "{what}");
        assert_eq!(net.nodes[1].poll_message(), None, "{what}");
        assert_eq!(net.json(1, "d"), before, "{what}");
        assert_eq!(net.nodes[1].doc("d").unwrap().transact().state_vector(), sv_before, "{what}");
    }

    // The genuine one still applies.
    net.nodes[1].handle_message(now, fp(1), &good);
    assert_eq!(net.text(1, "d"), "hello world");
}

#[test]
fn a_message_over_the_limit_is_too_large() {
    let config = CrdtConfig { max_update_size: 1024, ..CrdtConfig::default() };
    let mut node = CrdtSync::new(config, fp(1), 1);
    let now = crate::test_epoch();
    node.open(now, "d").unwrap();
    let bytes = encode_sync("d", SYNC_UPDATE, &[0u8; 2000]);
    node.handle_message(now, fp(2), &bytes);
    assert_eq!(
        node.poll_event(),
        Some(CrdtEvent::BadMessage { from: fp(2), error: SyncWireError::TooLarge { size: bytes.len(), max: 1024 } })
    );
}

const FUZZ_ROUNDS: usize = 5000;

fn mutate(rng: &mut ChaCha20Rng, bytes: &mut Vec<u8>) {
    for _ in 0..1 + rng.next_u64() % 4 {
        if bytes.is_empty() {
            bytes.push(rng.next_u64() as u8);
        }
        let at = rng.next_u64() as usize % bytes.len();
        match rng.next_u64() % 4 {
            0 => bytes[at] = rng.next_u64() as u8,
            1 => bytes[at] ^= 1 << (rng.next_u64() % 8),
            2 => bytes.truncate(at),
            _ => bytes.insert(at, rng.next_u64() as u8),
        }
    }
}

#[test]
fn random_garbage_never_panics() {
    let mut net = Net::new(2);
    net.connect_all();
    let now = net.now;
    insert_text(&mut net.nodes[0], now, "d", 0, "hello");
    {
        let map = net.nodes[0].get_map(now, "d", DEFAULT_MAP).unwrap();
        let array = net.nodes[0].get_array(now, "d", DEFAULT_ARRAY).unwrap();
        let text = net.nodes[0].get_text(now, "d", DEFAULT_TEXT).unwrap();
        let doc = net.nodes[0].doc("d").unwrap();
        let mut txn = doc.transact_mut();
        map.insert(&mut txn, "k", 1.5);
        array.push_back(&mut txn, "x");
        array.push_back(&mut txn, true);
        text.remove_range(&mut txn, 1, 2);
    }
    let (sv, state) = {
        let doc = net.nodes[0].doc("d").unwrap();
        let txn = doc.transact();
        (txn.state_vector().encode_v1(), txn.encode_state_as_update_v1(&StateVector::default()))
    };
    let payloads = [(SYNC_STEP1, sv), (SYNC_STEP2, state.clone()), (SYNC_UPDATE, state)];
    net.nodes[0].set_awareness(now, "d", Some(json!({"name": "a"}))).unwrap();
    let mut frames: Vec<Vec<u8>> = std::iter::from_fn(|| net.nodes[0].poll_message()).map(|m| m.bytes).collect();
    frames.extend(payloads.iter().map(|(subtype, payload)| encode_sync("d", *subtype, payload)));

    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let (mut refused, mut accepted) = (0, 0);
    for round in 0..FUZZ_ROUNDS {
        if round % 500 == 0 {
            // A fresh replica now and then, so that garbage meets an empty document too.
            net.nodes[1] = CrdtSync::new(CrdtConfig::default(), fp(2), round as u64);
            net.nodes[1].handle_member_up(now, fp(1));
            net.nodes[1].open(now, "d").unwrap();
        }
        let bytes = if rng.next_u64() % 4 == 0 {
            let mut frame = frames[rng.next_u64() as usize % frames.len()].clone();
            mutate(&mut rng, &mut frame);
            frame
        } else {
            // Keep the framing valid so that yrs gets to chew on the payload.
            let (subtype, payload) = &payloads[rng.next_u64() as usize % payloads.len()];
            let mut payload = payload.clone();
            mutate(&mut rng, &mut payload);
            encode_sync("d", *subtype, &payload)
        };
        net.nodes[1].handle_message(now, fp(1), &bytes);
        let mut bad = false;
        while let Some(event) = net.nodes[1].poll_event() {
            bad |= matches!(event, CrdtEvent::BadMessage { .. });
        }
        if bad {
            refused += 1
        } else {
            accepted += 1
        }
        while net.nodes[1].poll_message().is_some() {}
    }
    assert!(refused > FUZZ_ROUNDS / 10 && accepted > FUZZ_ROUNDS / 10, "refused {refused}, accepted {accepted}");
}

#[test]
fn the_same_seed_gives_the_same_client_ids() {
    let now = crate::test_epoch();
    let ids = |seed| {
        let mut node = CrdtSync::new(CrdtConfig::default(), fp(1), seed);
        ["a", "b", "c"]
            .iter()
            .map(|name| {
                let doc = node.open(now, name).unwrap();
                (doc.client_id().get(), doc.guid().to_string())
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(42), ids(42));
    assert_ne!(ids(42), ids(43));
    for (id, _) in ids(42) {
        assert!(id != 0 && id < 1 << 53);
    }
}

#[test]
fn awareness_is_set_received_and_cleared() {
    let mut net = Net::with_config(3, CrdtConfig { resync_interval: None, ..CrdtConfig::default() });
    net.connect_all();
    let now = net.now;
    for i in 0..3 {
        net.nodes[i].open(now, "d").unwrap();
    }
    net.pump();
    for i in 0..3 {
        net.take_events(i);
    }
    net.nodes[0].set_awareness(now, "d", Some(json!({"cursor": 3}))).unwrap();
    net.pump();
    for i in [1, 2] {
        assert_eq!(net.nodes[i].awareness("d"), vec![(fp(1), json!({"cursor": 3}))]);
        assert_eq!(
            net.take_events(i),
            vec![CrdtEvent::Awareness { doc: "d".into(), peer: fp(1), state: Some(json!({"cursor": 3})) }]
        );
    }
    assert!(net.nodes[0].awareness("d").is_empty(), "our own state is not listed");

    // A change, then the same state again (a refresh-like resend) is silent.
    net.nodes[0].set_awareness(now, "d", Some(json!({"cursor": 4}))).unwrap();
    net.nodes[0].set_awareness(now, "d", Some(json!({"cursor": 4}))).unwrap();
    net.pump();
    for i in [1, 2] {
        assert_eq!(
            net.take_events(i),
            vec![CrdtEvent::Awareness { doc: "d".into(), peer: fp(1), state: Some(json!({"cursor": 4})) }]
        );
    }

    // A member that comes later gets it on member_up.
    net.disconnect(0, 2);
    assert_eq!(net.take_events(2), vec![]);
    net.pump();
    assert_eq!(net.take_events(2), vec![CrdtEvent::Awareness { doc: "d".into(), peer: fp(1), state: None }]);
    assert!(net.nodes[2].awareness("d").is_empty());
    net.connect(0, 2);
    net.pump();
    assert_eq!(net.nodes[2].awareness("d"), vec![(fp(1), json!({"cursor": 4}))]);

    net.nodes[0].set_awareness(now, "d", None).unwrap();
    net.pump();
    for i in [1, 2] {
        assert!(net.nodes[i].awareness("d").is_empty());
        assert!(net.take_events(i).contains(&CrdtEvent::Awareness { doc: "d".into(), peer: fp(1), state: None }));
    }
    assert_eq!(net.nodes[0].poll_timeout(), None, "nothing to refresh or expire");

    // Too large a state is refused.
    let big = json!({"x": "y".repeat(5000)});
    assert!(matches!(net.nodes[0].set_awareness(now, "d", Some(big)), Err(SyncError::ValueTooLarge { .. })));
}

#[test]
fn a_stale_awareness_message_does_not_win() {
    let mut net = Net::new(2);
    net.connect_all();
    let now = net.now;
    net.nodes[1].open(now, "d").unwrap();
    net.nodes[0].open(now, "d").unwrap();
    net.pump();
    net.nodes[0].set_awareness(now, "d", Some(json!(1))).unwrap();
    let first = net.nodes[0].poll_message().expect("awareness message").bytes;
    assert!(matches!(decode(&first), Ok((_, Body::Awareness(Some(_))))));
    net.nodes[0].set_awareness(now, "d", Some(json!(2))).unwrap();
    net.pump();
    assert_eq!(net.nodes[1].awareness("d"), vec![(fp(1), json!(2))]);
    net.nodes[1].handle_message(now, fp(1), &first);
    assert_eq!(net.nodes[1].awareness("d"), vec![(fp(1), json!(2))]);
}

#[test]
fn awareness_refreshes_and_expires_after_the_timeout() {
    let mut net = Net::with_config(2, CrdtConfig { resync_interval: None, ..CrdtConfig::default() });
    net.connect_all();
    let start = net.now;
    for i in 0..2 {
        net.nodes[i].open(start, "d").unwrap();
    }
    net.nodes[0].set_awareness(start, "d", Some(json!("here"))).unwrap();
    net.pump();
    net.take_events(1);
    let config = CrdtConfig::default();
    assert_eq!(net.nodes[0].poll_timeout(), Some(start + config.awareness_refresh));
    assert_eq!(net.nodes[1].poll_timeout(), Some(start + config.awareness_timeout));

    // The refresh keeps it alive past the first timeout, silently.
    net.now = start + config.awareness_refresh;
    let now = net.now;
    net.nodes[0].handle_timeout(now);
    net.pump();
    assert!(net.take_events(1).is_empty());
    assert_eq!(net.nodes[1].poll_timeout(), Some(now + config.awareness_timeout));

    // Then 0 stops refreshing (it is gone without a member_down): 1 expires it.
    let deadline = net.nodes[1].poll_timeout().unwrap();
    net.nodes[1].handle_timeout(deadline - Duration::from_millis(1));
    assert!(net.nodes[1].poll_event().is_none(), "not yet");
    net.nodes[1].handle_timeout(deadline);
    assert_eq!(net.nodes[1].poll_event(), Some(CrdtEvent::Awareness { doc: "d".into(), peer: fp(1), state: None }));
    assert!(net.nodes[1].awareness("d").is_empty());
    assert_eq!(net.nodes[1].poll_timeout(), None);
}

#[test]
fn poll_timeout_moves_forward_after_handle_timeout() {
    let mut net = Net::new(2);
    net.connect_all();
    let mut now = net.now;
    for i in 0..2 {
        net.nodes[i].open(now, "d").unwrap();
        net.nodes[i].set_awareness(now, "d", Some(json!(i))).unwrap();
    }
    net.pump();
    // Spurious calls change nothing.
    let deadline = net.nodes[0].poll_timeout().unwrap();
    net.nodes[0].handle_timeout(now);
    assert_eq!(net.nodes[0].poll_timeout(), Some(deadline));
    assert!(net.nodes[0].poll_message().is_none());
    for _ in 0..10 {
        for i in 0..2 {
            let deadline = net.nodes[i].poll_timeout().expect("a deadline");
            assert!(deadline >= now);
            now = now.max(deadline);
            net.now = now;
            net.nodes[i].handle_timeout(now);
            let next = net.nodes[i].poll_timeout().expect("still a deadline");
            assert!(next > now, "{next:?} <= {now:?}");
        }
        net.pump();
    }
}

#[test]
fn updated_is_reported_only_for_changes() {
    let mut net = Net::new(2);
    net.connect_all();
    let now = net.now;
    for i in 0..2 {
        net.nodes[i].open(now, "d").unwrap();
    }
    net.pump();
    insert_text(&mut net.nodes[0], now, "d", 0, "abc");
    net.nodes[0].flush(now);
    let update = net.nodes[0].poll_message().unwrap().bytes;
    net.nodes[1].handle_message(now, fp(1), &update);
    assert_eq!(net.nodes[1].poll_event(), Some(CrdtEvent::Updated { doc: "d".into(), from: fp(1) }));
    net.nodes[1].handle_message(now, fp(1), &update);
    assert_eq!(net.nodes[1].poll_event(), None, "a duplicate changes nothing");
    assert!(!net.nodes[1].wants_flush(), "remote updates are not echoed");
    assert_eq!(net.nodes[1].poll_message(), None);

    // A delete leaves the state vector alone but changes the document.
    {
        let text = net.nodes[0].get_text(now, "d", DEFAULT_TEXT).unwrap();
        let doc = net.nodes[0].doc("d").unwrap();
        text.remove_range(&mut doc.transact_mut(), 0, 1);
    }
    net.nodes[0].flush(now);
    let delete = net.nodes[0].poll_message().unwrap().bytes;
    net.nodes[1].handle_message(now, fp(1), &delete);
    assert_eq!(net.nodes[1].poll_event(), Some(CrdtEvent::Updated { doc: "d".into(), from: fp(1) }));
    assert_eq!(net.text(1, "d"), "bc");

    // A handshake between replicas that agree: Synced, no Updated.
    net.connect(0, 1);
    net.pump();
    let events = net.take_events(1);
    assert_eq!(count_updated(&events, "d"), 0, "{events:?}");
    assert!(events.contains(&CrdtEvent::Synced { doc: "d".into(), peer: fp(1) }));
}

#[test]
fn captured_updates_merge_early_beyond_the_limit() {
    let config = CrdtConfig { max_update_size: 4096, ..CrdtConfig::default() };
    let mut net = Net::with_config(2, config);
    net.connect_all();
    let now = net.now;
    for i in 0..2 {
        net.nodes[i].open(now, "d").unwrap();
    }
    net.pump();
    for k in 0..2000u32 {
        insert_text(&mut net.nodes[0], now, "d", k, "z");
    }
    {
        let captured = lock(&net.nodes[0].docs["d"].captured);
        // Merged whenever the buffer doubles past the limit: far fewer than 2000 remain.
        assert!(captured.updates.len() < 1000, "merged early: {} updates", captured.updates.len());
        assert_eq!(captured.bytes, captured.updates.iter().map(Vec::len).sum::<usize>());
    }
    net.nodes[0].flush(now);
    let messages: Vec<_> = std::iter::from_fn(|| net.nodes[0].poll_message()).collect();
    assert_eq!(messages.len(), 1);
    // Over 4 KiB: a replica with the same limit refuses it, one with room takes it.
    net.nodes[1].handle_message(now, fp(1), &messages[0].bytes);
    assert!(matches!(
        net.nodes[1].poll_event(),
        Some(CrdtEvent::BadMessage { error: SyncWireError::TooLarge { .. }, .. })
    ));
    let mut roomy = CrdtSync::new(CrdtConfig::default(), fp(2), 9);
    insert_text(&mut roomy, now, "d", 0, "");
    roomy.handle_message(now, fp(1), &messages[0].bytes);
    let text = roomy.get_text(now, "d", DEFAULT_TEXT).unwrap();
    assert_eq!(text.get_string(&roomy.doc("d").unwrap().transact()), "z".repeat(2000));
}

#[test]
fn repeated_step1_keeps_one_answer_queued() {
    let mut node = CrdtSync::new(CrdtConfig::default(), fp(1), 1);
    let now = crate::test_epoch();
    insert_text(&mut node, now, "d", 0, "hello");
    let step1 = encode_sync("d", SYNC_STEP1, &StateVector::default().encode_v1());
    for _ in 0..100 {
        node.handle_message(now, fp(2), &step1);
    }
    node.handle_message(now, fp(3), &step1);
    let messages: Vec<_> = std::iter::from_fn(|| node.poll_message()).collect();
    assert_eq!(messages.iter().map(|m| m.to).collect::<Vec<_>>(), vec![Some(fp(2)), Some(fp(3))]);
    assert!(matches!(decode(&messages[0].bytes), Ok(("d", Body::Step2(_)))));
}

#[test]
fn open_refuses_bad_names_and_too_many_docs() {
    let config = CrdtConfig { max_docs: 2, ..CrdtConfig::default() };
    let mut node = CrdtSync::new(config, fp(1), 1);
    let now = crate::test_epoch();
    assert_eq!(node.open(now, "").err(), Some(SyncError::BadDocName { len: 0, max: MAX_DOC_NAME }));
    let long = "n".repeat(MAX_DOC_NAME + 1);
    assert_eq!(node.open(now, &long).err(), Some(SyncError::BadDocName { len: MAX_DOC_NAME + 1, max: MAX_DOC_NAME }));
    node.open(now, &"n".repeat(MAX_DOC_NAME)).unwrap();
    node.open(now, "b").unwrap();
    node.open(now, "b").unwrap();
    assert_eq!(node.open(now, "c").err(), Some(SyncError::TooManyDocs(2)));
    assert_eq!(node.docs().count(), 2);
    assert!(node.poll_message().is_none(), "no members, nothing to say");
}

#[test]
fn crdt_sync_is_send() {
    fn send<T: Send>() {}
    send::<CrdtSync>();
}

#[test]
fn a_handshake_for_a_document_not_open_here_is_not_an_error() {
    let mut net = Net::new(2);
    net.connect_all();
    let now = net.now;
    net.nodes[0].open(now, "only-here").unwrap();
    net.pump();
    assert!(bad_messages(&net.take_events(1)).is_empty());
    assert!(net.nodes[1].doc("only-here").is_none());
}

#[test]
fn applications_can_tell_remote_changes_and_read_their_own_awareness() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut net = Net::new(2);
    net.connect_all();
    let now = net.now;
    net.nodes[0].open(now, "d").unwrap();
    net.nodes[1].open(now, "d").unwrap();
    net.pump();
    let (local, remote) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (l, r) = (local.clone(), remote.clone());
    net.nodes[1]
        .doc("d")
        .unwrap()
        .observe_update_v1("app", move |txn, _| {
            if crate::sync::crdt::is_remote(txn) { &r } else { &l }.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
    insert_text(&mut net.nodes[0], now, "d", 0, "from 0");
    net.pump();
    insert_text(&mut net.nodes[1], now, "d", 0, "from 1");
    assert_eq!((local.load(Ordering::SeqCst), remote.load(Ordering::SeqCst)), (1, 1));
    assert_eq!(net.nodes[1].local_awareness("d"), None);
    net.nodes[1].set_awareness(now, "d", Some(serde_json::json!({"cursor": 3}))).unwrap();
    assert_eq!(net.nodes[1].local_awareness("d"), Some(serde_json::json!({"cursor": 3})));
}

#[test]
fn a_lost_update_is_repaired_by_the_periodic_resync() {
    let mut net = Net::new(2);
    net.connect_all();
    let now = net.now;
    net.nodes[0].open(now, "d").unwrap();
    net.nodes[1].open(now, "d").unwrap();
    net.pump();
    insert_text(&mut net.nodes[0], now, "d", 0, "lost on the way");
    net.nodes[0].flush(now);
    while net.nodes[0].poll_message().is_some() {}
    net.pump();
    assert_eq!(net.text(1, "d"), "");
    // The resync is due 30 s after the members met.
    let due = net.nodes[1].poll_timeout().unwrap();
    assert!(due <= now + Duration::from_secs(30));
    for i in 0..2 {
        let t = net.nodes[i].poll_timeout().unwrap();
        net.nodes[i].handle_timeout(t);
    }
    net.pump();
    assert_eq!(net.text(1, "d"), "lost on the way");
    assert!(net.nodes[1].poll_timeout().unwrap() > due, "the deadline moved on");
}
