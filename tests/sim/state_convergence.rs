//! `StateSync` replicas converge whatever the network does to their messages: delivered in
//! any order, twice, or never, across partitions that come and go, with clocks a couple of
//! seconds apart. Last-writer-wins replicas end on exactly the writes with the greatest
//! timestamps; operational replicas with a join for a merge end on the same map and report
//! the conflicts they merged.
//!
//! The machines are message-level, so this runs them on a network of its own (no sockets,
//! no room transport, which would hide the faults): every step, one seeded choice among a
//! write, delivering any message in flight (perhaps keeping a copy), cutting or healing
//! links, and moving virtual time to fire the machines' deadlines.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use peerlink::Fingerprint;
use peerlink::sync::{StateConfig, StateEvent, StateSync, Timestamp};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

/// Wall-clock milliseconds at virtual time zero.
const BASE_MS: u64 = 1_700_000_000_000;
const KEYS: u32 = 40;
const ANTI_ENTROPY: Duration = Duration::from_secs(2);

fn fp(i: usize) -> Fingerprint {
    let mut b = [0u8; 32];
    b[0] = i as u8 * 37 + 11;
    b[31] = i as u8;
    Fingerprint::from_bytes(b)
}

fn config(mut c: StateConfig) -> StateConfig {
    c.anti_entropy_interval = Some(ANTI_ENTROPY);
    c.batch_delay = Duration::from_millis(5);
    c
}

/// What a writer does to a key, given its current value here.
enum Write {
    Set(Value),
    Delete,
}

/// Replicas on a network that reorders, duplicates and drops messages and cuts links.
struct Net {
    rng: ChaCha8Rng,
    base: Instant,
    elapsed: Duration,
    /// Per replica, how far its wall clock is off, in ms.
    skew: Vec<i64>,
    nodes: Vec<StateSync>,
    /// Symmetric: whether the link between two replicas is cut.
    cut: Vec<Vec<bool>>,
    /// Messages on their way: (from, to, bytes).
    flight: Vec<(usize, usize, Vec<u8>)>,
    /// Every local write that happened: key, its timestamp, the value (`None`: deleted).
    writes: Vec<(String, Timestamp, Option<Value>)>,
    conflicts: usize,
}

impl Net {
    fn new(seed: u64, n: usize, config: impl Fn() -> StateConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let skew = (0..n).map(|_| rng.random_range(-2000..=2000)).collect();
        let nodes = (0..n).map(|i| StateSync::new(config(), fp(i))).collect();
        let mut net = Net {
            rng,
            base: Instant::now(),
            elapsed: Duration::ZERO,
            skew,
            nodes,
            cut: vec![vec![false; n]; n],
            flight: Vec::new(),
            writes: Vec::new(),
            conflicts: 0,
        };
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    let (now, peer) = (net.now(), fp(j));
                    net.nodes[i].handle_member_up(now, peer);
                }
            }
            net.drain(i);
        }
        net
    }

    fn now(&self) -> Instant {
        self.base + self.elapsed
    }

    fn unix_ms(&self, i: usize) -> u64 {
        (BASE_MS as i64 + self.elapsed.as_millis() as i64 + self.skew[i]) as u64
    }

    fn index(&self, peer: Fingerprint) -> usize {
        (0..self.nodes.len()).find(|i| fp(*i) == peer).expect("a replica")
    }

    /// Puts what replica `i` sent on the wire (a broadcast goes to its members), and counts
    /// its conflicts.
    fn drain(&mut self, i: usize) {
        while let Some(m) = self.nodes[i].poll_message() {
            let to: Vec<usize> = match m.to {
                Some(peer) => vec![self.index(peer)],
                None => self.nodes[i].members().map(|p| self.index(*p)).collect(),
            };
            for j in to {
                if !self.cut[i][j] {
                    self.flight.push((i, j, m.bytes.clone()));
                }
            }
        }
        while let Some(e) = self.nodes[i].poll_event() {
            match e {
                StateEvent::Conflict { .. } => self.conflicts += 1,
                StateEvent::ClockSkew { .. } | StateEvent::BadMessage { .. } => {
                    panic!("replica {i}: {e:?}")
                }
                _ => {}
            }
        }
    }

    fn write(&mut self, i: usize, key: &str, w: Write) {
        let (now, ms) = (self.now(), self.unix_ms(i));
        let value = match w {
            Write::Set(v) => {
                self.nodes[i].set(now, ms, key, v.clone()).expect("set");
                Some(v)
            }
            Write::Delete => {
                if !self.nodes[i].delete(now, ms, key).expect("delete") {
                    return; // not live here: nothing written
                }
                None
            }
        };
        let ts = self.nodes[i].timestamp(key).expect("just written");
        self.writes.push((key.to_owned(), ts, value));
        self.drain(i);
    }

    /// Delivers the message at `k` in flight, keeping a copy there if `duplicate`.
    fn deliver(&mut self, k: usize, duplicate: bool) {
        let (from, to, bytes) = if duplicate { self.flight[k].clone() } else { self.flight.swap_remove(k) };
        let (now, ms) = (self.now(), self.unix_ms(to));
        self.nodes[to].handle_message(now, ms, fp(from), &bytes);
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
    }

    /// Restores the link: each side sees the other come back.
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
        let n = self.nodes.len();
        (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).collect()
    }

    /// Moves virtual time forward by `by`, firing every deadline on the way, in order.
    fn advance(&mut self, by: Duration) {
        let until = self.elapsed + by;
        loop {
            let next = self.nodes.iter().filter_map(|n| n.poll_timeout()).min().map(|t| t - self.base);
            match next {
                Some(t) if t <= until => {
                    self.elapsed = self.elapsed.max(t);
                    for i in 0..self.nodes.len() {
                        if self.nodes[i].poll_timeout().is_some_and(|t| t <= self.now()) {
                            let (now, ms) = (self.now(), self.unix_ms(i));
                            self.nodes[i].handle_timeout(now, ms);
                            self.drain(i);
                        }
                    }
                }
                _ => break,
            }
        }
        self.elapsed = until;
    }

    /// Runs `steps` random steps, each replica's writes chosen by `writer`.
    fn chaos(&mut self, steps: usize, writer: impl Fn(&mut ChaCha8Rng, Option<&Value>) -> Write) {
        let n = self.nodes.len();
        for _ in 0..steps {
            match self.rng.random_range(0..100) {
                0..30 => {
                    let i = self.rng.random_range(0..n);
                    let key = format!("k{}", self.rng.random_range(0..KEYS));
                    let w = writer(&mut self.rng, self.nodes[i].get(&key));
                    self.write(i, &key, w);
                }
                30..70 if !self.flight.is_empty() => {
                    let k = self.rng.random_range(0..self.flight.len());
                    match self.rng.random_range(0..100) {
                        0..3 => drop(self.flight.swap_remove(k)),
                        3..15 => self.deliver(k, true),
                        _ => self.deliver(k, false),
                    }
                }
                70..74 => {
                    for (i, j) in self.links() {
                        if self.rng.random_bool(0.3) {
                            self.cut(i, j);
                        }
                    }
                }
                74..80 => {
                    for (i, j) in self.links() {
                        if self.rng.random_bool(0.5) {
                            self.heal(i, j);
                        }
                    }
                }
                _ => {
                    let ms = self.rng.random_range(1..300);
                    self.advance(Duration::from_millis(ms));
                }
            }
        }
    }

    /// Heals every link, stops writing, and lets a few anti-entropy rounds run.
    fn settle(&mut self) {
        for (i, j) in self.links() {
            self.heal(i, j);
        }
        for _ in 0..3 {
            self.deliver_all();
            self.advance(ANTI_ENTROPY + Duration::from_millis(1));
        }
        self.deliver_all();
    }

    fn maps(&self) -> Vec<BTreeMap<&str, &Value>> {
        self.nodes.iter().map(|n| n.get_all()).collect()
    }

    fn assert_converged(&self, seed: u64) {
        let maps = self.maps();
        for (i, n) in self.nodes.iter().enumerate().skip(1) {
            assert_eq!(maps[i], maps[0], "seed {seed}: replica {i} holds another map than replica 0");
            assert_eq!(n.digest(), self.nodes[0].digest(), "seed {seed}: replica {i} has another digest than replica 0");
        }
    }

    /// Per key, the write with the greatest timestamp; deleted keys absent.
    fn expected_lww(&self) -> BTreeMap<&str, &Value> {
        let mut last: BTreeMap<&str, (Timestamp, Option<&Value>)> = BTreeMap::new();
        for (k, ts, v) in &self.writes {
            let e = last.entry(k).or_insert((*ts, v.as_ref()));
            if *ts > e.0 {
                *e = (*ts, v.as_ref());
            }
        }
        last.into_iter().filter_map(|(k, (_, v))| v.map(|v| (k, v))).collect()
    }
}

fn lww_value(rng: &mut ChaCha8Rng, _: Option<&Value>) -> Write {
    match rng.random_range(0..10) {
        0..2 => Write::Delete,
        2..5 => Write::Set(json!(rng.random_range(0..1000))),
        5..8 => Write::Set(json!(format!("v{}", rng.random_range(0..1000)))),
        _ => Write::Set(json!({"n": rng.random_range(0..1000), "tags": ["x", "y"]})),
    }
}

fn lww_converges(seed: u64) {
    let mut net = Net::new(seed, 5, || config(StateConfig::lww()));
    net.chaos(300, lww_value);
    net.settle();
    net.assert_converged(seed);
    assert_eq!(net.maps()[0], net.expected_lww(), "seed {seed}: the map is not, per key, the write with the greatest timestamp");
}

#[test]
fn lww_replicas_converge_on_the_latest_writes_under_reordering_duplication_and_partitions() {
    let start = Instant::now();
    for seed in 0..500 {
        lww_converges(seed);
    }
    eprintln!("500 LWW seeds in {:?}", start.elapsed());
}

/// Set union of arrays of strings, sorted; a deleted side counts as empty.
fn union(_: &str, a: Option<&Value>, b: Option<&Value>) -> Option<Value> {
    let set: BTreeSet<&str> = [a, b].into_iter().flatten().flat_map(|v| v.as_array().into_iter().flatten()).filter_map(Value::as_str).collect();
    Some(json!(set))
}

/// Adds one or two tags to what the key holds here (half the time), replaces it with one
/// tag, or deletes it: writes that shrink the value must converge too.
fn op_write(rng: &mut ChaCha8Rng, current: Option<&Value>) -> Write {
    match rng.random_range(0..10) {
        0 => return Write::Delete,
        1..5 => return Write::Set(json!([format!("r{}", rng.random_range(0..12))])),
        _ => {}
    }
    let mut tags = [rng.random_range(0..12), rng.random_range(0..12)].map(|t| format!("t{t}")).to_vec();
    tags.truncate(rng.random_range(1..=2));
    let added = json!(tags);
    Write::Set(union("", current, Some(&added)).expect("union is never deleted"))
}

#[test]
fn operational_replicas_with_a_union_merge_converge_and_report_conflicts() {
    let start = Instant::now();
    let mut conflicts = 0;
    for seed in 0..100 {
        let mut net = Net::new(seed, 3, || config(StateConfig::operational(union)));
        net.chaos(300, op_write);
        net.settle();
        net.assert_converged(seed);
        conflicts += net.conflicts;
    }
    eprintln!("100 operational seeds in {:?}, {conflicts} conflicts merged", start.elapsed());
    assert!(conflicts > 0, "no concurrent writes were ever merged");
}

/// Three replicas, every message delivered once and in order from each sender; only the
/// interleaving of two senders differs. Replica 1 sets `["y"]` then replaces it with
/// `["z"]`; replica 0 sets `["x"]` meanwhile. Replica 0 sees `["y"]` (concurrent with its
/// own), then `["z"]`, which supersedes `["y"]`; replica 2 sees `["y"]`, `["z"]`, then
/// `["x"]`. Both must hold the merge of the writes not superseded, `x` and `z`, and `y` must
/// not come back (a regression: when one merged value per key was kept, replica 0 held
/// `["x","y","z"]` with the same version vector, and anti-entropy never repaired it).
#[test]
fn operational_replacing_writes_converge_whatever_the_interleaving() {
    let mut net = Net::new(0, 3, || config(StateConfig::operational(union)));
    net.deliver_all();
    net.write(1, "k", Write::Set(json!(["y"])));
    net.advance(Duration::from_millis(10));
    net.write(1, "k", Write::Set(json!(["z"])));
    net.write(0, "k", Write::Set(json!(["x"])));
    net.advance(Duration::from_millis(10));
    for (from, to) in [(1, 0), (1, 0), (0, 1), (1, 2), (1, 2), (0, 2)] {
        let k = net.flight.iter().position(|(a, b, _)| (*a, *b) == (from, to)).expect("a message on the link");
        net.deliver(k, false);
    }
    assert_eq!(net.nodes[0].get("k"), Some(&json!(["x", "z"])));
    assert_eq!(net.nodes[2].get("k"), Some(&json!(["x", "z"])));
    net.settle();
    net.assert_converged(0);
}
