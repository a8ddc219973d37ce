//! `CrdtSync` replicas converge whatever the network does to their messages: delivered in
//! any order, twice, or lost on links that are cut and healed. Five replicas edit five
//! documents (text, map and array roots) at random; once every link is healed and the
//! messages are delivered, every document holds the same content and state vector on every
//! replica, and no replica ever took a duplicate or a reordered message for bad input.
//!
//! The machine is message-level, so it runs on a network of its own, shaped as
//! `state_convergence.rs`: every step, one seeded choice among an edit, a flush, delivering
//! any message in flight (perhaps keeping a copy), cutting or healing links (each side sees
//! the other leave or come back), and moving virtual time to fire the machines' deadlines
//! (awareness refreshes and expiries). Messages are lost only on cut links: `CrdtSync`
//! repairs losses with the handshake when a member comes back, not periodically.

use std::time::{Duration, Instant};

use peerlink::Fingerprint;
use peerlink::sync::{CrdtConfig, CrdtEvent, CrdtSync};
use peerlink::yrs::types::ToJson;
use peerlink::yrs::{Any, Array, ArrayRef, Doc, GetString, Map, MapRef, ReadTxn, StateVector, Text, TextRef, Transact};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const REPLICAS: usize = 5;
const DOCS: usize = 5;
const STEPS: usize = 300;
const SEEDS: u64 = 1000;

fn fp(i: usize) -> Fingerprint {
    let mut b = [0u8; 32];
    b[0] = i as u8 * 37 + 11;
    b[31] = i as u8;
    Fingerprint::from_bytes(b)
}

fn doc_name(d: usize) -> String {
    format!("doc-{d}")
}

/// The roots every replica edits and compares (named on every replica before comparing: a
/// root a replica never named reads differently in `Doc::to_json`).
fn roots(doc: &Doc) -> (TextRef, MapRef, ArrayRef) {
    (doc.get_or_insert_text("text"), doc.get_or_insert_map("map"), doc.get_or_insert_array("list"))
}

/// Replicas on a network that reorders and duplicates messages and cuts links.
struct Net {
    seed: u64,
    rng: ChaCha8Rng,
    base: Instant,
    elapsed: Duration,
    nodes: Vec<CrdtSync>,
    /// Symmetric: whether the link between two replicas is cut.
    cut: Vec<Vec<bool>>,
    /// Messages on their way: (from, to, bytes).
    flight: Vec<(usize, usize, Vec<u8>)>,
    /// Remote updates that changed a document, over all replicas.
    updated: usize,
    duplicates: usize,
}

impl Net {
    fn new(seed: u64) -> Self {
        let base = Instant::now();
        let mut nodes: Vec<CrdtSync> =
            (0..REPLICAS).map(|i| CrdtSync::new(CrdtConfig::default(), fp(i), seed * 100 + i as u64)).collect();
        for node in &mut nodes {
            for d in 0..DOCS {
                node.open(base, &doc_name(d)).expect("open");
            }
        }
        let mut net = Net {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            base,
            elapsed: Duration::ZERO,
            nodes,
            cut: vec![vec![false; REPLICAS]; REPLICAS],
            flight: Vec::new(),
            updated: 0,
            duplicates: 0,
        };
        for i in 0..REPLICAS {
            for j in 0..REPLICAS {
                if i != j {
                    net.nodes[i].handle_member_up(base, fp(j));
                }
            }
            net.drain(i);
        }
        net
    }

    fn now(&self) -> Instant {
        self.base + self.elapsed
    }

    fn index(&self, peer: Fingerprint) -> usize {
        (0..REPLICAS).find(|i| fp(*i) == peer).expect("a replica")
    }

    /// Puts what replica `i` sent on the wire (a broadcast goes to every replica its link to
    /// is up, which are its members), and checks its events.
    fn drain(&mut self, i: usize) {
        while let Some(m) = self.nodes[i].poll_message() {
            let to: Vec<usize> = match m.to {
                Some(peer) => vec![self.index(peer)],
                None => (0..REPLICAS).filter(|j| *j != i).collect(),
            };
            for j in to {
                if !self.cut[i][j] {
                    self.flight.push((i, j, m.bytes.clone()));
                }
            }
        }
        while let Some(e) = self.nodes[i].poll_event() {
            match e {
                CrdtEvent::BadMessage { .. } => panic!("seed {}: replica {i}: {e:?}", self.seed),
                CrdtEvent::Updated { .. } => self.updated += 1,
                _ => {}
            }
        }
    }

    /// One random edit of one root of document `d` on replica `i`.
    fn edit(&mut self, i: usize, d: usize) {
        let doc = self.nodes[i].doc(&doc_name(d)).expect("open").clone();
        let (text, map, list) = roots(&doc);
        let rng = &mut self.rng;
        let word = format!("{}{}", ["a", "bc", "def", " "][rng.random_range(0..4)], rng.random_range(0..100));
        let mut txn = doc.transact_mut();
        match rng.random_range(0..7) {
            0 => {
                let at = rng.random_range(0..=text.len(&txn));
                text.insert(&mut txn, at, &word);
            }
            1 => {
                let len = text.len(&txn);
                if len > 0 {
                    let at = rng.random_range(0..len);
                    let n = rng.random_range(1..=(len - at).min(5));
                    text.remove_range(&mut txn, at, n);
                }
            }
            2 => {
                let key = format!("k{}", rng.random_range(0..8));
                if rng.random_bool(0.5) {
                    map.insert(&mut txn, key, word);
                } else {
                    map.insert(&mut txn, key, rng.random_range(0..1000) as i64);
                }
            }
            3 => {
                let key = format!("k{}", rng.random_range(0..8));
                map.remove(&mut txn, &key);
            }
            4 => {
                list.push_back(&mut txn, word);
            }
            5 => {
                let at = rng.random_range(0..=list.len(&txn));
                list.insert(&mut txn, at, rng.random_range(0..1000) as i64);
            }
            _ => {
                let len = list.len(&txn);
                if len > 0 {
                    list.remove(&mut txn, rng.random_range(0..len));
                }
            }
        }
    }

    fn flush(&mut self, i: usize) {
        let now = self.now();
        self.nodes[i].flush(now);
        self.drain(i);
    }

    /// Delivers the message at `k` in flight, keeping a copy there if `duplicate`.
    fn deliver(&mut self, k: usize, duplicate: bool) {
        let (from, to, bytes) = if duplicate { self.flight[k].clone() } else { self.flight.swap_remove(k) };
        self.duplicates += usize::from(duplicate);
        let now = self.now();
        self.nodes[to].handle_message(now, fp(from), &bytes);
        self.drain(to);
    }

    fn deliver_all(&mut self) {
        while !self.flight.is_empty() {
            let k = self.rng.random_range(0..self.flight.len());
            self.deliver(k, false);
        }
    }

    /// Cuts the link: what is on it is lost, and each side sees the other leave.
    fn cut(&mut self, i: usize, j: usize) {
        if self.cut[i][j] {
            return;
        }
        self.cut[i][j] = true;
        self.cut[j][i] = true;
        self.flight.retain(|(a, b, _)| !((*a == i && *b == j) || (*a == j && *b == i)));
        self.nodes[i].handle_member_down(fp(j));
        self.nodes[j].handle_member_down(fp(i));
        self.drain(i);
        self.drain(j);
    }

    /// Restores the link: each side sees the other come back (and starts the handshake).
    fn heal(&mut self, i: usize, j: usize) {
        if !self.cut[i][j] {
            return;
        }
        self.cut[i][j] = false;
        self.cut[j][i] = false;
        let now = self.now();
        self.nodes[i].handle_member_up(now, fp(j));
        self.nodes[j].handle_member_up(now, fp(i));
        self.drain(i);
        self.drain(j);
    }

    fn links(&self) -> Vec<(usize, usize)> {
        (0..REPLICAS).flat_map(|i| (i + 1..REPLICAS).map(move |j| (i, j))).collect()
    }

    /// Moves virtual time forward by `by`, firing every deadline on the way, in order.
    fn advance(&mut self, by: Duration) {
        let until = self.elapsed + by;
        while let Some(t) = self.nodes.iter().filter_map(|n| n.poll_timeout()).min().map(|t| t - self.base) {
            if t > until {
                break;
            }
            self.elapsed = self.elapsed.max(t);
            for i in 0..REPLICAS {
                if self.nodes[i].poll_timeout().is_some_and(|t| t <= self.now()) {
                    let now = self.now();
                    self.nodes[i].handle_timeout(now);
                    self.drain(i);
                }
            }
        }
        self.elapsed = until;
    }

    fn chaos(&mut self, steps: usize) {
        for _ in 0..steps {
            match self.rng.random_range(0..100) {
                0..30 => {
                    let (i, d) = (self.rng.random_range(0..REPLICAS), self.rng.random_range(0..DOCS));
                    self.edit(i, d);
                    if self.rng.random_bool(0.5) {
                        self.flush(i);
                    }
                }
                30..35 => {
                    let i = self.rng.random_range(0..REPLICAS);
                    self.flush(i);
                }
                35..37 => {
                    let (i, d) = (self.rng.random_range(0..REPLICAS), self.rng.random_range(0..DOCS));
                    let state = self.rng.random_bool(0.7).then(|| serde_json::json!({"cursor": self.rng.random_range(0..100)}));
                    let now = self.now();
                    self.nodes[i].set_awareness(now, &doc_name(d), state).expect("awareness");
                    self.drain(i);
                }
                37..75 if !self.flight.is_empty() => {
                    let k = self.rng.random_range(0..self.flight.len());
                    let duplicate = self.rng.random_range(0..100) < 15;
                    self.deliver(k, duplicate);
                }
                75..79 => {
                    for (i, j) in self.links() {
                        if self.rng.random_bool(0.3) {
                            self.cut(i, j);
                        }
                    }
                }
                79..85 => {
                    for (i, j) in self.links() {
                        if self.rng.random_bool(0.5) {
                            self.heal(i, j);
                        }
                    }
                }
                85..88 => {
                    let s = self.rng.random_range(10..40);
                    self.advance(Duration::from_secs(s));
                }
                _ => {
                    let ms = self.rng.random_range(1..300);
                    self.advance(Duration::from_millis(ms));
                }
            }
        }
    }

    /// Heals every link, flushes every replica and delivers until nothing is in flight.
    fn settle(&mut self) {
        for (i, j) in self.links() {
            self.heal(i, j);
        }
        loop {
            for i in 0..REPLICAS {
                self.flush(i);
            }
            if self.flight.is_empty() {
                break;
            }
            self.deliver_all();
        }
        assert!(!self.nodes.iter().any(CrdtSync::wants_flush), "seed {}: captured updates left", self.seed);
    }

    /// What replica `i` holds of document `d`: text, map and array (as JSON
    /// values), state vector (compared as values: their encodings follow hash-map order).
    fn content(&self, i: usize, d: usize) -> (String, Any, Any, StateVector) {
        let doc = self.nodes[i].doc(&doc_name(d)).expect("open");
        let (text, map, list) = roots(doc);
        let txn = doc.transact();
        (text.get_string(&txn), map.to_json(&txn), list.to_json(&txn), txn.state_vector())
    }

    fn assert_converged(&self) {
        for d in 0..DOCS {
            let first = self.content(0, d);
            for i in 1..REPLICAS {
                let other = self.content(i, d);
                assert_eq!(other.0, first.0, "seed {}: doc-{d}: replica {i}'s text differs from replica 0's", self.seed);
                assert_eq!(other.1, first.1, "seed {}: doc-{d}: replica {i}'s map differs from replica 0's", self.seed);
                assert_eq!(other.2, first.2, "seed {}: doc-{d}: replica {i}'s array differs from replica 0's", self.seed);
                assert_eq!(other.3, first.3, "seed {}: doc-{d}: replica {i}'s state vector differs from replica 0's", self.seed);
            }
        }
    }
}

#[test]
fn crdt_replicas_converge_under_reordering_duplication_and_partitions() {
    let start = Instant::now();
    let (mut updated, mut duplicates, mut edited) = (0, 0, 0);
    for seed in 0..SEEDS {
        let mut net = Net::new(seed);
        net.chaos(STEPS);
        net.settle();
        net.assert_converged();
        updated += net.updated;
        duplicates += net.duplicates;
        edited += (0..DOCS).filter(|d| net.content(0, *d).3 != StateVector::default()).count();
    }
    eprintln!("{SEEDS} CRDT seeds in {:?}: {updated} remote updates applied, {duplicates} duplicates delivered", start.elapsed());
    assert!(updated > 0 && duplicates > 0 && edited > 0, "nothing was exercised");
}
