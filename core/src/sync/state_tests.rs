use super::*;
use proptest::prelude::*;
use serde_json::json;

fn fp(b: u8) -> Fingerprint {
    Fingerprint::from_bytes([b; 32])
}

fn t0() -> Instant {
    crate::test_epoch()
}

const MS: u64 = 1_700_000_000_000;

/// Replicas wired by an in-order, lossless network (each message delivered at once).
struct Mesh {
    nodes: Vec<StateSync>,
    events: Vec<Vec<StateEvent>>,
}

impl Mesh {
    fn new(n: u8, config: impl Fn() -> StateConfig) -> Self {
        let mut nodes: Vec<StateSync> = (1..=n).map(|i| StateSync::new(config(), fp(i))).collect();
        for i in 0..nodes.len() {
            for j in 0..nodes.len() {
                if i != j {
                    let peer = fp(j as u8 + 1);
                    nodes[i].members.insert(peer, Member { last_digest: None, next_anti_entropy: None, hello_at: None });
                }
            }
        }
        Mesh { events: (0..n).map(|_| Vec::new()).collect(), nodes }
    }

    /// Delivers everything until quiet, in rounds (every replica flushes, then everything
    /// sent is delivered); returns the bytes carried.
    fn run(&mut self) -> u64 {
        let mut bytes = 0;
        loop {
            let mut sent = Vec::new();
            for i in 0..self.nodes.len() {
                self.nodes[i].flush();
                while let Some(m) = self.nodes[i].poll_message() {
                    sent.push((i, m));
                }
            }
            if sent.is_empty() {
                return bytes;
            }
            for (i, m) in sent {
                let from = fp(i as u8 + 1);
                for j in 0..self.nodes.len() {
                    if j != i && m.to.is_none_or(|to| to == fp(j as u8 + 1)) {
                        bytes += m.bytes.len() as u64;
                        self.nodes[j].handle_message(t0(), MS, from, &m.bytes);
                    }
                }
            }
            for i in 0..self.nodes.len() {
                while let Some(e) = self.nodes[i].poll_event() {
                    self.events[i].push(e);
                }
            }
        }
    }

    fn up(&mut self, i: usize, j: usize) {
        self.nodes[i].handle_member_up(t0(), fp(j as u8 + 1));
        self.nodes[j].handle_member_up(t0(), fp(i as u8 + 1));
    }
}

#[test]
fn set_get_delete_and_events() {
    let mut s = StateSync::new(StateConfig::lww(), fp(1));
    s.set(t0(), MS, "score", json!(100)).unwrap();
    assert_eq!(s.get("score"), Some(&json!(100)));
    assert_eq!(s.get_all().into_iter().collect::<Vec<_>>(), vec![("score", &json!(100))]);
    assert!(s.delete(t0(), MS, "score").unwrap());
    assert!(!s.delete(t0(), MS, "score").unwrap());
    assert_eq!(s.get("score"), None);
    assert_eq!(s.tombstones(), 1);
    let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert_eq!(events, vec![
        StateEvent::Changed { key: "score".into(), value: Some(json!(100)), origin: fp(1) },
        StateEvent::Changed { key: "score".into(), value: None, origin: fp(1) },
    ]);
}

#[test]
fn bad_local_writes_are_refused_and_change_nothing() {
    let mut config = StateConfig::lww();
    config.max_value_size = 10;
    config.max_keys = 1;
    let mut s = StateSync::new(config, fp(1));
    assert_eq!(s.set(t0(), MS, "", json!(1)), Err(SyncError::BadKey { len: 0, max: MAX_KEY_LEN }));
    assert!(matches!(s.set(t0(), MS, &"k".repeat(MAX_KEY_LEN + 1), json!(1)), Err(SyncError::BadKey { .. })));
    assert_eq!(s.set(t0(), MS, "a", json!("0123456789")), Err(SyncError::ValueTooLarge { size: 12, max: 10 }));
    s.set(t0(), MS, "a", json!(1)).unwrap();
    assert_eq!(s.set(t0(), MS, "b", json!(1)), Err(SyncError::TooManyKeys(1)));
    assert_eq!(s.get_all().len(), 1);
}

#[test]
fn changes_reach_every_member_in_one_batch() {
    let mut m = Mesh::new(3, StateConfig::lww);
    for i in 0..50 {
        m.nodes[0].set(t0(), MS, &format!("k{i}"), json!(i)).unwrap();
    }
    m.nodes[0].flush();
    assert_eq!(m.nodes[0].messages.len(), 1, "50 small sets go in one message");
    m.run();
    for n in &m.nodes {
        assert_eq!(n.get("k49"), Some(&json!(49)));
        assert_eq!(n.digest(), m.nodes[0].digest());
    }
    assert!(m.events[1].contains(&StateEvent::Changed { key: "k7".into(), value: Some(json!(7)), origin: fp(1) }));
}

#[test]
fn later_write_wins_whatever_the_order() {
    let mut a = StateSync::new(StateConfig::lww(), fp(1));
    let mut b = StateSync::new(StateConfig::lww(), fp(2));
    a.set(t0(), MS, "k", json!("a")).unwrap();
    b.set(t0(), MS + 1, "k", json!("b")).unwrap();
    a.flush();
    b.flush();
    // No members: nothing was sent; run the exchange by hand.
    let mut m = Mesh { nodes: vec![a, b], events: vec![vec![], vec![]] };
    m.up(0, 1);
    m.run();
    assert_eq!(m.nodes[0].get("k"), Some(&json!("b")));
    assert_eq!(m.nodes[1].get("k"), Some(&json!("b")));
}

#[test]
fn same_millisecond_ties_break_by_fingerprint() {
    let mut m = Mesh::new(2, StateConfig::lww);
    m.nodes[0].set(t0(), MS, "k", json!("low")).unwrap();
    m.nodes[1].set(t0(), MS, "k", json!("high")).unwrap();
    m.run();
    assert_eq!(m.nodes[0].get("k"), Some(&json!("high")));
    assert_eq!(m.nodes[1].get("k"), Some(&json!("high")));
}

#[test]
fn far_future_entry_is_refused_with_an_event() {
    let mut a = StateSync::new(StateConfig::lww(), fp(1));
    let mut b = StateSync::new(StateConfig::lww(), fp(2));
    b.members.insert(fp(1), Member { last_digest: None, next_anti_entropy: None, hello_at: None });
    a.members.insert(fp(2), Member { last_digest: None, next_anti_entropy: None, hello_at: None });
    a.set(t0(), MS + 61_000, "j", json!(1)).unwrap();
    a.flush();
    let msg = a.poll_message().unwrap();
    b.handle_message(t0(), MS, fp(1), &msg.bytes);
    assert_eq!(b.get_all().len(), 0);
    let ev = b.poll_event().unwrap();
    assert!(matches!(ev, StateEvent::ClockSkew { key, error: HlcError::TooFarAhead { .. }, .. } if key == "j"));
    assert!(b.clock().last().ms < MS + 61_000, "the clock did not move");
    // Once the clock caught up, the exchange brings it.
    b.handle_message(t0(), MS + 1_000, fp(1), &msg.bytes);
    assert_eq!(b.get("j"), Some(&json!(1)));
}

#[test]
fn malformed_messages_get_typed_errors_and_change_nothing() {
    let mut b = StateSync::new(StateConfig::lww(), fp(2));
    b.set(t0(), MS, "keep", json!(1)).unwrap();
    while b.poll_event().is_some() {}
    let digest = b.digest();
    // A valid message to mutate.
    let mut a = StateSync::new(StateConfig::lww(), fp(1));
    a.members.insert(fp(2), Member { last_digest: None, next_anti_entropy: None, hello_at: None });
    a.set(t0(), MS, "x", json!({"a": 1})).unwrap();
    a.flush();
    let good = a.poll_message().unwrap().bytes;
    let mut bad_json = good.clone();
    let n = bad_json.len();
    bad_json[n - 2] = b'{'; // inside the value's JSON
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("unknown version", vec![9, 1]),
        ("unknown type", vec![1, 99]),
        ("cut short", good[..good.len() - 3].to_vec()),
        ("trailing bytes", [good.clone(), vec![0]].concat()),
        ("value not JSON", bad_json),
        ("huge count", vec![1, 6, 0xff, 0xff, 0xff, 0x7f]),
        ("node index out of range", vec![1, 1, 0, 1, 1, b'k', 1, 0, 5, 0, 0]),
    ];
    for (what, bytes) in cases {
        b.handle_message(t0(), MS, fp(1), &bytes);
        match b.poll_event() {
            Some(StateEvent::BadMessage { from, error: SyncWireError::Malformed(_) }) => assert_eq!(from, fp(1), "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(b.digest(), digest, "{what}: state unchanged");
        assert_eq!(b.get("x"), None);
    }
    b.handle_message(t0(), MS, fp(1), &good);
    assert_eq!(b.get("x"), Some(&json!({"a": 1})));
}

#[test]
fn late_joiner_gets_every_key_once() {
    let mut m = Mesh::new(2, StateConfig::lww);
    m.nodes[0].members.clear();
    m.nodes[1].members.clear();
    for i in 0..5000 {
        m.nodes[0].set(t0(), MS, &format!("key-{i}"), json!(i)).unwrap();
    }
    m.nodes[0].flush();
    while m.nodes[0].poll_message().is_some() {}
    m.up(0, 1);
    m.run();
    assert_eq!(m.nodes[1].get_all().len(), 5000);
    assert_eq!(m.nodes[1].digest(), m.nodes[0].digest());
    assert_eq!(m.nodes[1].stats().entries_received, 5000, "each key once");
}

#[test]
fn member_that_missed_ten_changes_receives_about_ten() {
    let mut m = Mesh::new(2, StateConfig::lww);
    for i in 0..20_000 {
        m.nodes[0].set(t0(), MS, &format!("key-{i}"), json!(i)).unwrap();
    }
    m.run();
    assert_eq!(m.nodes[1].digest(), m.nodes[0].digest());
    // Node 1 goes away; ten changes happen; it comes back.
    m.nodes[0].handle_member_down(fp(2));
    m.nodes[1].handle_member_down(fp(1));
    for i in 0..10 {
        m.nodes[0].set(t0(), MS + 10, &format!("key-{}", i * 997), json!("new")).unwrap();
    }
    m.nodes[0].flush();
    let before = m.nodes[1].stats().entries_received;
    m.up(0, 1);
    let bytes = m.run();
    assert_eq!(m.nodes[1].digest(), m.nodes[0].digest());
    let got = m.nodes[1].stats().entries_received - before;
    assert_eq!(got, 10);
    assert!(bytes < 64 * 1024, "{bytes} bytes for ten changes");
}

#[test]
fn operational_concurrent_writes_merge_and_conflict_everywhere() {
    let union = |_: &str, a: Option<&Value>, b: Option<&Value>| {
        let mut set: std::collections::BTreeSet<String> = Default::default();
        for v in [a, b].into_iter().flatten() {
            for x in v.as_array().into_iter().flatten() {
                set.insert(x.as_str().unwrap_or_default().to_owned());
            }
        }
        Some(json!(set))
    };
    let mut m = Mesh::new(3, || StateConfig::operational(union));
    m.nodes[0].set(t0(), MS, "tags", json!(["a"])).unwrap();
    m.nodes[1].set(t0(), MS, "tags", json!(["b"])).unwrap();
    m.nodes[2].set(t0(), MS, "tags", json!(["c"])).unwrap();
    m.run();
    for (i, n) in m.nodes.iter().enumerate() {
        assert_eq!(n.get("tags"), Some(&json!(["a", "b", "c"])), "replica {i}");
        assert!(m.events[i].iter().any(|e| matches!(e, StateEvent::Conflict { key, .. } if key == "tags")), "replica {i} saw a conflict");
    }
    // A write that follows the merge replaces it without a conflict.
    let conflicts = m.events.iter().map(|e| e.iter().filter(|e| matches!(e, StateEvent::Conflict { .. })).count()).collect::<Vec<_>>();
    m.nodes[1].set(t0(), MS + 5, "tags", json!(["z"])).unwrap();
    m.run();
    for (i, n) in m.nodes.iter().enumerate() {
        assert_eq!(n.get("tags"), Some(&json!(["z"])));
        assert_eq!(m.events[i].iter().filter(|e| matches!(e, StateEvent::Conflict { .. })).count(), conflicts[i]);
    }
}

#[test]
fn old_tombstones_are_collected_and_not_taken_back() {
    let mut config = StateConfig::lww();
    config.tombstone_ttl = Duration::from_secs(10);
    let mut a = StateSync::new(config.clone(), fp(1));
    a.set(t0(), MS, "k", json!(1)).unwrap();
    a.delete(t0(), MS + 1, "k").unwrap();
    a.handle_timeout(t0(), MS + 2);
    assert_eq!(a.tombstones(), 1);
    let later = t0() + Duration::from_secs(20);
    a.handle_timeout(later, MS + 20_000);
    assert_eq!(a.tombstones(), 0);
    // An old tombstone for a key it does not hold is not stored again.
    let mut b = StateSync::new(config, fp(2));
    b.members.insert(fp(1), Member { last_digest: None, next_anti_entropy: None, hello_at: None });
    b.set(t0(), MS, "k", json!(1)).unwrap();
    b.delete(t0(), MS + 1, "k").unwrap();
    b.flush();
    let tomb = b.messages.pop_back().unwrap().bytes;
    a.handle_message(later, MS + 20_000, fp(2), &tomb);
    assert_eq!(a.tombstones(), 0);
}

#[test]
fn spurious_timeout_does_nothing_and_deadline_moves_forward() {
    let mut a = StateSync::new(StateConfig::lww(), fp(1));
    a.handle_member_up(t0(), fp(2));
    while a.poll_message().is_some() {}
    a.handle_timeout(t0(), MS);
    let next = a.poll_timeout().unwrap();
    assert!(next > t0());
    a.handle_timeout(t0(), MS);
    assert!(a.poll_message().is_none());
    assert_eq!(a.poll_timeout(), Some(next));
    a.handle_timeout(next, MS + 1);
    assert!(a.poll_timeout().unwrap() > next);
}

// ---- properties ----------------------------------------------------------------------

/// A write: which replica, which key, a value or a delete, how far the wall clock moved.
fn writes() -> impl Strategy<Value = Vec<(usize, u8, Option<u8>, u64)>> {
    proptest::collection::vec((0usize..3, 0u8..6, proptest::option::of(0u8..50), 0u64..3), 1..40)
}

/// Makes three replicas' writes and returns each as one `Entries` message of its state.
fn states(ws: &[(usize, u8, Option<u8>, u64)]) -> Vec<Vec<u8>> {
    let mut nodes: Vec<StateSync> = (1..=3).map(|i| StateSync::new(StateConfig::lww(), fp(i))).collect();
    let mut ms = MS;
    for (i, k, v, dt) in ws {
        ms += dt;
        let key = format!("k{k}");
        match v {
            Some(v) => nodes[*i].set(t0(), ms, &key, json!(v)).unwrap(),
            None => {
                let _ = nodes[*i].set(t0(), ms, &key, json!(0));
                nodes[*i].delete(t0(), ms, &key).unwrap();
            }
        }
    }
    nodes.iter().map(dump).collect()
}

fn dump(s: &StateSync) -> Vec<u8> {
    let mut batch = Batch::new(usize::MAX);
    for (k, e) in &s.entries {
        let _ = batch.push(k, e);
    }
    batch.finish().map(|m| m.0).unwrap_or_else(|| wire::with_nodes(wire::Type::Entries, &NodeTable::default(), &[0]))
}

fn merged(msgs: &[&Vec<u8>]) -> StateSync {
    let mut s = StateSync::new(StateConfig::lww(), fp(9));
    for m in msgs {
        s.handle_message(t0(), MS + 1000, fp(8), m);
    }
    s
}

fn snapshot(s: &StateSync) -> (u64, Vec<(String, Value)>) {
    (s.digest(), s.get_all().into_iter().map(|(k, v)| (k.to_owned(), v.clone())).collect())
}

proptest! {
    /// Merging replica states is commutative, associative and idempotent.
    #[test]
    fn lww_merge_is_commutative_associative_idempotent(ws in writes()) {
        let st = states(&ws);
        let (a, b, c) = (&st[0], &st[1], &st[2]);
        // Commutative.
        prop_assert_eq!(snapshot(&merged(&[a, b])), snapshot(&merged(&[b, a])));
        // Associative: (a ∪ b) ∪ c == a ∪ (b ∪ c).
        let ab = dump(&merged(&[a, b]));
        let bc = dump(&merged(&[b, c]));
        prop_assert_eq!(snapshot(&merged(&[&ab, c])), snapshot(&merged(&[a, &bc])));
        // Idempotent: a ∪ a == a, and a second delivery changes nothing.
        prop_assert_eq!(snapshot(&merged(&[a, a])), snapshot(&merged(&[a])));
        prop_assert_eq!(snapshot(&merged(&[a, b, c, a, b])), snapshot(&merged(&[c, b, a])));
    }
}

#[test]
fn a_replica_meeting_two_members_at_once_receives_each_key_about_once() {
    for joiner_fp in [1u8, 3, 5] {
        // Fingerprints decide who starts each exchange: the joiner is first, between, last.
        let mut nodes: Vec<StateSync> = [2u8, 4, joiner_fp].iter().map(|b| StateSync::new(StateConfig::lww(), fp(*b))).collect();
        let fps = [fp(2), fp(4), fp(joiner_fp)];
        let mut m = Mesh { nodes: Vec::new(), events: vec![vec![]; 3] };
        for i in 0..3000 {
            nodes[0].set(t0(), MS, &format!("key-{i}"), json!(i)).unwrap();
        }
        nodes[0].flush();
        while nodes[0].poll_message().is_some() {}
        m.nodes = nodes;
        // Mesh addresses node i as fp(i + 1): map by hand instead.
        let deliver = |m: &mut Mesh, now: Instant| loop {
            let mut sent = Vec::new();
            for i in 0..3 {
                m.nodes[i].handle_timeout(now, MS);
                while let Some(msg) = m.nodes[i].poll_message() {
                    sent.push((i, msg));
                }
            }
            if sent.is_empty() {
                break;
            }
            for (i, msg) in sent {
                for j in 0..3 {
                    if j != i && msg.to.is_none_or(|to| to == fps[j]) {
                        m.nodes[j].handle_message(now, MS, fps[i], &msg.bytes);
                    }
                }
            }
        };
        m.nodes[0].handle_member_up(t0(), fps[1]);
        m.nodes[1].handle_member_up(t0(), fps[0]);
        deliver(&mut m, t0());
        assert_eq!(m.nodes[1].digest(), m.nodes[0].digest());
        // Later, the joiner meets both at once.
        let t1 = t0() + Duration::from_secs(60);
        for (a, b) in [(0, 2), (1, 2)] {
            m.nodes[a].handle_member_up(t1, fps[b]);
            m.nodes[b].handle_member_up(t1, fps[a]);
        }
        for s in 0..8 {
            deliver(&mut m, t1 + Duration::from_millis(500 * s));
        }
        assert_eq!(m.nodes[2].digest(), m.nodes[0].digest(), "joiner {joiner_fp}");
        let got = m.nodes[2].stats().entries_received;
        assert!((3000..3100).contains(&got), "joiner {joiner_fp}: {got} entries for 3000 keys");
    }
}

#[test]
fn meeting_runs_one_exchange_and_a_dropped_digest_is_asked_for_again() {
    let kinds = |msgs: &[SyncMessage]| msgs.iter().map(|m| m.bytes[1]).collect::<Vec<u8>>();
    // Both sides see each other at once: one digest, no hello.
    let (mut a, mut b) = (StateSync::new(StateConfig::lww(), fp(1)), StateSync::new(StateConfig::lww(), fp(2)));
    a.set(t0(), MS, "k", json!(1)).unwrap();
    a.flush();
    while a.poll_message().is_some() {}
    a.handle_member_up(t0(), fp(2));
    b.handle_member_up(t0(), fp(1));
    let from_a: Vec<SyncMessage> = std::iter::from_fn(|| a.poll_message()).collect();
    assert_eq!(kinds(&from_a), vec![wire::Type::Digest as u8]);
    assert!(b.poll_message().is_none(), "the greater side waits for the digest");
    for m in &from_a {
        b.handle_message(t0(), MS, fp(1), &m.bytes);
    }
    let later = t0() + Duration::from_secs(2);
    b.handle_timeout(later, MS + 2000);
    let from_b: Vec<u8> = kinds(&std::iter::from_fn(|| b.poll_message()).collect::<Vec<_>>());
    assert!(!from_b.contains(&(wire::Type::Hello as u8)), "{from_b:?}");

    // The digest is lost (the other side was not syncing yet): the greater side asks.
    let (mut a, mut b) = (StateSync::new(StateConfig::lww(), fp(1)), StateSync::new(StateConfig::lww(), fp(2)));
    a.set(t0(), MS, "k", json!(1)).unwrap();
    a.flush();
    while a.poll_message().is_some() {}
    a.handle_member_up(t0(), fp(2));
    while a.poll_message().is_some() {}
    b.handle_member_up(t0() + Duration::from_millis(300), fp(1));
    assert!(b.poll_message().is_none());
    b.handle_timeout(t0() + Duration::from_millis(1300), MS + 1300);
    let hello = b.poll_message().expect("hello");
    assert_eq!(hello.bytes, wire::hello());
    a.handle_message(t0() + Duration::from_millis(1301), MS + 1301, fp(2), &hello.bytes);
    let mut m = Mesh { nodes: vec![a, b], events: vec![vec![], vec![]] };
    m.run();
    assert_eq!(m.nodes[1].get("k"), Some(&json!(1)));

    // Starting to sync while the member is there already: the hello goes at once.
    let mut c = StateSync::new(StateConfig::lww(), fp(3));
    c.handle_member_present(t0(), fp(1));
    assert_eq!(c.poll_message().map(|m| m.bytes), Some(wire::hello()));
}

#[test]
fn operational_tombstones_stay_so_later_writes_count_on() {
    let mut config = StateConfig::operational(|_, a, b| a.or(b).cloned());
    config.tombstone_ttl = Duration::from_secs(10);
    let mut a = StateSync::new(config, fp(1));
    a.set(t0(), MS, "k", json!(1)).unwrap();
    a.delete(t0(), MS + 1, "k").unwrap();
    a.handle_timeout(t0(), MS + 2);
    a.handle_timeout(t0() + Duration::from_secs(20), MS + 20_000);
    assert_eq!(a.tombstones(), 1, "kept");
    a.set(t0() + Duration::from_secs(20), MS + 20_000, "k", json!(2)).unwrap();
    assert_eq!(a.entries["k"].version.vv, vec![(fp(1), 3)], "the next write counts on from the delete");
}

#[test]
fn version_vector_counts_beyond_2_pow_53_are_refused() {
    let mut nodes = NodeTable::default();
    let v = Version { ts: Timestamp { ms: MS, counter: 0, node: fp(2) }, vv: vec![(fp(2), wire::MAX_COUNT + 1)] };
    let mut body = Vec::new();
    wire::put_varint(&mut body, 1);
    wire::put_entry(&mut body, &mut nodes, "k", &v, None, [(&fp(2), 1u64, Some("1"))].into_iter());
    let msg = wire::with_nodes(wire::Type::Entries, &nodes, &body);
    assert!(matches!(wire::decode(&msg, 64, 64), Err(SyncWireError::Malformed(_))));
}
