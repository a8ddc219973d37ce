//! [`StateSync`]: a replicated key-value map of JSON values, ordered by hybrid logical
//! clocks.
//!
//! # Modes
//!
//! - **Last-writer-wins** ([`StateMode::Lww`]): every write carries a [`Timestamp`]; a
//!   replica keeps, per key, the write with the greatest one. Deletes are writes of a
//!   tombstone. The merge (keep the greater) is commutative, associative and idempotent, so
//!   replicas that have seen the same writes hold the same map, whatever the order, however
//!   often.
//! - **Operational** ([`StateMode::Operational`]): every write also carries a version
//!   vector (per node, how many writes to this key it made), so a replica can tell a write
//!   that follows another from a truly concurrent one. A write that follows replaces what it
//!   saw; concurrent writes are all kept (as "siblings", a multi-value register) and what
//!   reads see is the application's [`MergeFn`] folded over them, in the same order on every
//!   replica (sorted by writer and count). A [`StateEvent::Conflict`] reports each remote
//!   write that arrives concurrent with the local value. The next local write replaces the
//!   siblings with its value (typically the merged one).
//!
//!   Replicas that know the same writes hold the same siblings, so they converge whatever
//!   the merge function does, provided it is **deterministic** (a function of its arguments
//!   only: no clock, no randomness, no local state). For the value not to depend on which
//!   writer's fingerprint sorts first, it should also be **commutative**
//!   (`merge(k, a, b) == merge(k, b, a)`), **associative** and **idempotent**
//!   (`merge(k, a, a) == a`): a join of a semilattice, such as set union with a sorted
//!   result, maximum, or a per-field maximum of an object. A merge that keeps the order of
//!   its inputs, as the reference's `[...new Set([...local, ...remote])]` does, depends on
//!   that order: sort the result. `None` stands for a deleted key, as input and as a result.
//!
//! All members of a room must use the same mode.
//!
//! # Catching up
//!
//! Changes are broadcast in batches (one message per [`StateConfig::batch_delay`], cut at
//! [`StateConfig::max_message_size`]). When a member comes (back), the replica with the
//! smaller fingerprint sends a digest of its map (per 256 buckets of key hashes: how many
//! entries and the xor of their hashes); the other answers with second-level digests of the
//! buckets that differ, then both compare the keys and versions of the leaves that differ
//! and send each other only the entries the other lacks or has older. A member that missed
//! ten changes receives about ten entries; a new member receives every entry once. The
//! same exchange runs every [`StateConfig::anti_entropy_interval`], which repairs anything
//! lost (a message dropped on overflow, for one).
//!
//! # Tombstones
//!
//! A deleted key stays as a tombstone so that the delete wins against older writes still
//! travelling. In operational mode tombstones stay (they carry the key's version vector,
//! which later writes must count on from). In last-writer-wins mode a tombstone is collected once its timestamp is older than
//! [`StateConfig::tombstone_ttl`] (default 24 hours) by this replica's clock, and a
//! tombstone that old arriving for a key this replica does not hold is not stored again.
//! The rule is safe as long as no member stays cut off from the others, while still in the
//! room, for longer than the TTL: such a member could bring back a key deleted meanwhile (as
//! with Cassandra's `gc_grace_seconds`). A replica that leaves the room is dropped with it,
//! so members who come back start empty and cannot bring anything back.
//!
//! # Bounds
//!
//! At most [`StateConfig::max_keys`] keys (tombstones included; a write of a new key beyond
//! is refused with [`SyncError::TooManyKeys`], and a remote entry for a new key is dropped
//! with a [`StateEvent::BadMessage`]); keys up to [`MAX_KEY_LEN`] bytes, values up to
//! [`StateConfig::max_value_size`] bytes of JSON. Messages and events queue until drained;
//! each input adds at most what one message answers (a bounded number of entries).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tracing::{debug, trace};

use super::hlc::{Hlc, HlcError, Timestamp};
use super::wire::{self, BUCKETS, Cell, Message, NodeTable, Prefix, Version};
use super::{SyncError, SyncMessage, SyncWireError};
use crate::identity::Fingerprint;

/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Least time between two digests to the same member (unless it asks again after this).
const DIGEST_SPACING: Duration = Duration::from_secs(1);
/// Least time between starting exchanges with two members: a replica that meets several at
/// once (it joined) catches up from the first before the others compare with it, so that
/// it does not receive everything once per member.
const EXCHANGE_STAGGER: Duration = Duration::from_secs(1);
/// How long the replica with the greater fingerprint waits for the other's digest before it
/// asks for one (the digest may have been dropped by this side's node, before it synced).
const HELLO_DELAY: Duration = Duration::from_secs(1);
/// How long a request for the entries under a prefix stands: the same prefix is not asked
/// of another member meanwhile.
const WANT_HOLD: Duration = Duration::from_secs(5);

/// A merge function for operational mode: `(key, local, remote) -> merged`, `None` meaning
/// deleted. See the [module docs](self) for what it must satisfy.
pub type MergeFn = Arc<dyn Fn(&str, Option<&Value>, Option<&Value>) -> Option<Value> + Send + Sync>;

/// How concurrent writes are resolved.
#[derive(Clone)]
pub enum StateMode {
    /// The write with the greatest hybrid-logical timestamp wins.
    Lww,
    /// Writes carry version vectors; concurrent ones are merged by the function.
    Operational(MergeFn),
}

impl fmt::Debug for StateMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateMode::Lww => f.write_str("Lww"),
            StateMode::Operational(_) => f.write_str("Operational(..)"),
        }
    }
}

/// How a [`StateSync`] behaves. Every field has a default; see each.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StateConfig {
    /// Last-writer-wins (the default) or operational.
    pub mode: StateMode,
    /// How far ahead of this replica's wall clock a remote timestamp may be; entries further
    /// ahead are refused with [`StateEvent::ClockSkew`]. Default 60 s.
    pub max_clock_offset: Duration,
    /// Most keys, tombstones included. Default 1,000,000.
    pub max_keys: usize,
    /// Largest value, as JSON bytes. Default 64 KiB.
    pub max_value_size: usize,
    /// Messages are cut at about this many bytes (one entry larger than it goes alone).
    /// Default 64 KiB.
    pub max_message_size: usize,
    /// How long local changes gather before they go out in one message. Default 5 ms.
    pub batch_delay: Duration,
    /// How often the digest exchange runs with every member (`None`: only when members
    /// come). Default 30 s.
    pub anti_entropy_interval: Option<Duration>,
    /// How old a tombstone gets before it is collected. Default 24 hours.
    pub tombstone_ttl: Duration,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            mode: StateMode::Lww,
            max_clock_offset: Duration::from_secs(60),
            max_keys: 1_000_000,
            max_value_size: 64 * 1024,
            max_message_size: 64 * 1024,
            batch_delay: Duration::from_millis(5),
            anti_entropy_interval: Some(Duration::from_secs(30)),
            tombstone_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

impl StateConfig {
    /// Last-writer-wins, defaults otherwise.
    pub fn lww() -> Self {
        Self::default()
    }

    /// Operational mode with `merge`, defaults otherwise.
    pub fn operational(merge: impl Fn(&str, Option<&Value>, Option<&Value>) -> Option<Value> + Send + Sync + 'static) -> Self {
        StateConfig { mode: StateMode::Operational(Arc::new(merge)), ..Self::default() }
    }
}

/// Something that happened to the map.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StateEvent {
    /// A key changed, by a local write or a remote one (`value: None`: deleted).
    Changed {
        /// The key.
        key: String,
        /// Its new value.
        value: Option<Value>,
        /// The node whose write it is (this node's own fingerprint for local writes).
        origin: Fingerprint,
    },
    /// Operational mode: a remote write was concurrent with the local value; they were
    /// merged.
    Conflict {
        /// The key.
        key: String,
        /// The value here before.
        local: Option<Value>,
        /// The remote value, as the sender holds it (the sender's own write, or already its
        /// merge of several).
        remote: Option<Value>,
        /// What the merge function made of them (now the value here).
        merged: Option<Value>,
        /// The member the remote value came from.
        from: Fingerprint,
    },
    /// An entry's timestamp is too far ahead of this replica's clock; it was not applied
    /// (it will be offered again by the next digest exchange, and taken once the clock has
    /// caught up).
    ClockSkew {
        /// The member it came from.
        from: Fingerprint,
        /// The key.
        key: String,
        /// How far ahead.
        error: HlcError,
    },
    /// A member sent something unusable; nothing in it was applied.
    BadMessage {
        /// The sender.
        from: Fingerprint,
        /// What was wrong.
        error: SyncWireError,
    },
}

/// Traffic counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateStats {
    /// Bytes of messages produced.
    pub bytes_sent: u64,
    /// Bytes of messages taken in.
    pub bytes_received: u64,
    /// Entries sent (changes and answers).
    pub entries_sent: u64,
    /// Entries received.
    pub entries_received: u64,
}

/// One of the concurrent writes an operational entry holds.
#[derive(Clone, PartialEq)]
struct Sibling {
    node: Fingerprint,
    counter: u64,
    value: Option<Value>,
    json: Option<Box<str>>,
}

struct Entry {
    /// What reads see: the value, or in operational mode the merge of the siblings.
    value: Option<Value>,
    /// `value` as JSON (last-writer-wins mode; what is sent).
    json: Option<Box<str>>,
    version: Version,
    /// Operational mode: the writes not known to be superseded (at least one), sorted by
    /// (node, counter). Empty in last-writer-wins mode.
    siblings: Vec<Sibling>,
    key_hash: u64,
    hash: u64,
    dirty: bool,
}

struct Member {
    last_digest: Option<Instant>,
    next_anti_entropy: Option<Instant>,
    /// (The replica with the greater fingerprint.) When to ask for a digest unless one
    /// comes first.
    hello_at: Option<Instant>,
}

/// How a remote version relates to the local one.
#[derive(Debug, PartialEq, Eq)]
enum Order {
    RemoteNewer,
    RemoteOlderOrSame,
    Concurrent,
}

/// A replicated key-value map; see the [module docs](self).
pub struct StateSync {
    config: StateConfig,
    me: Fingerprint,
    hlc: Hlc,
    entries: HashMap<Box<str>, Entry>,
    top: Box<[Cell; BUCKETS]>,
    dirty: Vec<Box<str>>,
    members: BTreeMap<Fingerprint, Member>,
    /// Exchanges waiting for their turn ([`EXCHANGE_STAGGER`]).
    staggered: BTreeMap<Fingerprint, Instant>,
    /// When the latest exchange started or is due to.
    last_exchange: Option<Instant>,
    /// Prefixes asked for lately, and when.
    wanted: HashMap<Prefix, Instant>,
    /// Prefixes whose entries were sent whole to a member lately, and when.
    pushed: HashMap<(Fingerprint, Prefix), Instant>,
    messages: VecDeque<SyncMessage>,
    events: VecDeque<StateEvent>,
    flush_at: Option<Instant>,
    gc_at: Option<Instant>,
    /// The latest wall clock passed in.
    unix_ms: u64,
    stats: StateStats,
}

fn key_hash(key: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key.as_bytes())
}

fn entry_hash(key: &str, v: &Version, siblings: &[Sibling], lww: bool) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key.as_bytes());
    if lww {
        h.update(&v.ts.ms.to_le_bytes());
        h.update(&v.ts.counter.to_le_bytes());
        h.update(v.ts.node.as_bytes());
    } else {
        for (fp, n) in &v.vv {
            h.update(fp.as_bytes());
            h.update(&n.to_le_bytes());
        }
        for s in siblings {
            h.update(s.node.as_bytes());
            h.update(&s.counter.to_le_bytes());
        }
    }
    h.digest()
}

fn bucket(key_hash: u64) -> usize {
    (key_hash >> 56) as usize
}

fn leaf(key_hash: u64) -> u16 {
    (key_hash >> 48) as u16
}

fn check_key(key: &str) -> Result<(), SyncError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(SyncError::BadKey { len: key.len(), max: MAX_KEY_LEN });
    }
    Ok(())
}

/// Whether the write `(node, counter)` is among those `vv` counts.
fn covered(node: Fingerprint, counter: u64, vv: &[(Fingerprint, u64)]) -> bool {
    vv.binary_search_by(|(f, _)| f.cmp(&node)).is_ok_and(|i| vv[i].1 >= counter)
}

/// `a` joined with `b`, pointwise maximum.
fn join(a: &[(Fingerprint, u64)], b: &[(Fingerprint, u64)]) -> Vec<(Fingerprint, u64)> {
    let mut out: BTreeMap<Fingerprint, u64> = a.iter().copied().collect();
    for (fp, n) in b {
        let e = out.entry(*fp).or_insert(0);
        *e = (*e).max(*n);
    }
    out.into_iter().collect()
}

/// Whether every count in `a` is at most the one in `b`.
fn dominated(a: &[(Fingerprint, u64)], b: &[(Fingerprint, u64)]) -> bool {
    a.iter().all(|(fp, n)| b.binary_search_by(|(f, _)| f.cmp(fp)).is_ok_and(|i| b[i].1 >= *n))
}

impl StateSync {
    /// Creates an empty map for node `me`.
    pub fn new(config: StateConfig, me: Fingerprint) -> Self {
        let hlc = Hlc::new(me, config.max_clock_offset.as_millis().try_into().unwrap_or(u64::MAX));
        StateSync {
            config,
            me,
            hlc,
            entries: HashMap::new(),
            top: Box::new([Cell::default(); BUCKETS]),
            dirty: Vec::new(),
            members: BTreeMap::new(),
            staggered: BTreeMap::new(),
            last_exchange: None,
            wanted: HashMap::new(),
            pushed: HashMap::new(),
            messages: VecDeque::new(),
            events: VecDeque::new(),
            flush_at: None,
            gc_at: None,
            unix_ms: 0,
            stats: StateStats::default(),
        }
    }

    /// Returns the configuration.
    pub fn config(&self) -> &StateConfig {
        &self.config
    }

    fn lww(&self) -> bool {
        matches!(self.config.mode, StateMode::Lww)
    }

    // ---- reading ------------------------------------------------------------------------

    /// Returns the value of `key`, or `None` if it is absent or deleted.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.get(key).and_then(|e| e.value.as_ref())
    }

    /// Returns every live entry, sorted by key (the reference's `getAll`).
    #[doc(alias = "getAll")]
    pub fn get_all(&self) -> BTreeMap<&str, &Value> {
        self.entries.iter().filter_map(|(k, e)| e.value.as_ref().map(|v| (&**k, v))).collect()
    }

    /// Returns the number of live keys.
    pub fn len(&self) -> usize {
        self.entries.values().filter(|e| e.value.is_some()).count()
    }

    /// Whether no key is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the number of tombstones held.
    pub fn tombstones(&self) -> usize {
        self.entries.values().filter(|e| e.value.is_none()).count()
    }

    /// Returns the timestamp of the write that `key` holds (tombstones included).
    pub fn timestamp(&self, key: &str) -> Option<Timestamp> {
        self.entries.get(key).map(|e| e.version.ts)
    }

    /// Returns the hybrid logical clock.
    pub fn clock(&self) -> &Hlc {
        &self.hlc
    }

    /// Returns the traffic counters.
    pub fn stats(&self) -> StateStats {
        self.stats
    }

    /// Returns a digest of the whole map (equal on replicas holding the same entries).
    pub fn digest(&self) -> u64 {
        self.top.iter().fold(0u64, |acc, c| acc.rotate_left(5) ^ c.xor ^ u64::from(c.count))
    }

    // ---- writing ------------------------------------------------------------------------

    /// Sets `key` to `value`. `unix_ms` is the wall clock.
    pub fn set(&mut self, now: Instant, unix_ms: u64, key: &str, value: Value) -> Result<(), SyncError> {
        check_key(key)?;
        let json = serde_json::to_string(&value).map_err(|e| SyncError::Serialize(e.to_string()))?;
        if json.len() > self.config.max_value_size {
            return Err(SyncError::ValueTooLarge { size: json.len(), max: self.config.max_value_size });
        }
        self.write_local(now, unix_ms, key, Some(value), Some(json.into_boxed_str()))
    }

    /// Sets several keys at once (one batch).
    pub fn set_many<'a>(&mut self, now: Instant, unix_ms: u64, pairs: impl IntoIterator<Item = (&'a str, Value)>) -> Result<(), SyncError> {
        for (k, v) in pairs {
            self.set(now, unix_ms, k, v)?;
        }
        Ok(())
    }

    /// Deletes `key` (a tombstone). Returns whether it was live.
    pub fn delete(&mut self, now: Instant, unix_ms: u64, key: &str) -> Result<bool, SyncError> {
        check_key(key)?;
        if self.get(key).is_none() {
            return Ok(false);
        }
        self.write_local(now, unix_ms, key, None, None)?;
        Ok(true)
    }

    fn write_local(&mut self, now: Instant, unix_ms: u64, key: &str, value: Option<Value>, json: Option<Box<str>>) -> Result<(), SyncError> {
        self.unix_ms = self.unix_ms.max(unix_ms);
        let existing = self.entries.get(key);
        if existing.is_none() && self.entries.len() >= self.config.max_keys {
            return Err(SyncError::TooManyKeys(self.config.max_keys));
        }
        let ts = self.hlc.now(unix_ms);
        let (vv, siblings) = match (&self.config.mode, existing) {
            (StateMode::Lww, _) => (Vec::new(), Vec::new()),
            (StateMode::Operational(_), e) => {
                // A local write supersedes every write this replica knows of for the key.
                let mut vv = e.map(|e| e.version.vv.clone()).unwrap_or_default();
                let counter = match vv.binary_search_by(|(f, _)| f.cmp(&self.me)) {
                    Ok(i) => {
                        // Counts are at most 2^53 on the wire: a member cannot push ours to
                        // overflow.
                        vv[i].1 = (vv[i].1 + 1).min(wire::MAX_COUNT);
                        vv[i].1
                    }
                    Err(i) => {
                        vv.insert(i, (self.me, 1));
                        1
                    }
                };
                (vv, vec![Sibling { node: self.me, counter, value: value.clone(), json: json.clone() }])
            }
        };
        let event = StateEvent::Changed { key: key.to_owned(), value: value.clone(), origin: self.me };
        self.store(key, value, json, Version { ts, vv }, siblings, true);
        self.events.push_back(event);
        if self.flush_at.is_none() {
            self.flush_at = Some(now + self.config.batch_delay);
        }
        Ok(())
    }

    /// Puts an entry in the map and the digest.
    fn store(&mut self, key: &str, value: Option<Value>, json: Option<Box<str>>, version: Version, siblings: Vec<Sibling>, local: bool) {
        let lww = self.lww();
        let hash = entry_hash(key, &version, &siblings, lww);
        match self.entries.get_mut(key) {
            Some(e) => {
                let cell = &mut self.top[bucket(e.key_hash)];
                cell.xor ^= e.hash ^ hash;
                e.hash = hash;
                e.value = value;
                e.json = json;
                e.version = version;
                e.siblings = siblings;
                if local && !e.dirty {
                    e.dirty = true;
                    self.dirty.push(key.into());
                }
            }
            None => {
                let kh = key_hash(key);
                let cell = &mut self.top[bucket(kh)];
                cell.xor ^= hash;
                cell.count += 1;
                let k: Box<str> = key.into();
                if local {
                    self.dirty.push(k.clone());
                }
                self.entries.insert(k, Entry { value, json, version, siblings, key_hash: kh, hash, dirty: local });
            }
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(e) = self.entries.remove(key) {
            let cell = &mut self.top[bucket(e.key_hash)];
            cell.xor ^= e.hash;
            cell.count -= 1;
        }
    }

    // ---- members ------------------------------------------------------------------------

    /// A member joined, or came back: start the digest exchange with it.
    pub fn handle_member_up(&mut self, now: Instant, peer: Fingerprint) {
        if peer == self.me {
            return;
        }
        let next = self.config.anti_entropy_interval.map(|i| now + i);
        self.members.insert(peer, Member { last_digest: None, next_anti_entropy: next, hello_at: None });
        self.pushed.retain(|(p, _), _| *p != peer);
        self.start_exchange(now, peer);
    }

    /// This replica starts syncing while `peer` is already a member (rather than both
    /// meeting now): a digest it sent before was dropped, so if `peer` is the one to send
    /// digests, ask it for one at once.
    pub fn handle_member_present(&mut self, now: Instant, peer: Fingerprint) {
        self.handle_member_up(now, peer);
        if let Some(m) = self.members.get_mut(&peer) {
            if m.hello_at.take().is_some() {
                self.send(Some(peer), wire::hello());
            }
        }
    }

    /// A member left (or its connection is gone for good).
    pub fn handle_member_down(&mut self, peer: Fingerprint) {
        self.members.remove(&peer);
        self.staggered.remove(&peer);
        self.pushed.retain(|(p, _), _| *p != peer);
    }

    /// Something sent to `peer` was dropped: run the exchange with it again.
    pub fn handle_resync(&mut self, now: Instant, peer: Fingerprint) {
        if let Some(m) = self.members.get_mut(&peer) {
            m.last_digest = None;
            self.start_exchange(now, peer);
        }
    }

    /// Returns the members.
    pub fn members(&self) -> impl Iterator<Item = &Fingerprint> {
        self.members.keys()
    }

    fn start_exchange(&mut self, now: Instant, peer: Fingerprint) {
        let due = match self.last_exchange {
            Some(t) if now < t + EXCHANGE_STAGGER => t + EXCHANGE_STAGGER,
            _ => now,
        };
        self.last_exchange = Some(due);
        if due > now {
            trace!(peer = %peer.short(), "exchange staggered");
            self.staggered.insert(peer, due);
            return;
        }
        self.staggered.remove(&peer);
        if self.me < peer {
            self.send_digest(now, peer);
        } else {
            self.schedule_hello(now, peer);
        }
    }

    fn schedule_hello(&mut self, now: Instant, peer: Fingerprint) {
        if let Some(m) = self.members.get_mut(&peer) {
            m.hello_at = Some(now + HELLO_DELAY);
        }
    }

    fn send_digest(&mut self, now: Instant, peer: Fingerprint) {
        if let Some(m) = self.members.get_mut(&peer) {
            if m.last_digest.is_some_and(|t| now < t + DIGEST_SPACING) {
                trace!(peer = %peer.short(), "digest sent lately: skipped");
                return;
            }
            m.last_digest = Some(now);
        }
        let msg = wire::digest(&self.top);
        self.send(Some(peer), msg);
    }

    fn send(&mut self, to: Option<Fingerprint>, bytes: Vec<u8>) {
        let copies = match to {
            Some(_) => 1,
            None => self.members.len() as u64,
        };
        self.stats.bytes_sent += bytes.len() as u64 * copies;
        self.messages.push_back(SyncMessage { to, bytes });
    }

    // ---- output -------------------------------------------------------------------------

    /// Returns the next message to send, or `None`. Drain after every input.
    #[must_use]
    pub fn poll_message(&mut self) -> Option<SyncMessage> {
        self.messages.pop_front()
    }

    /// Returns the next event, or `None`. Drain after every input.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<StateEvent> {
        self.events.pop_front()
    }

    /// Returns when [`StateSync::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let ae = self.members.iter().filter(|(fp, _)| self.me < **fp).filter_map(|(_, m)| m.next_anti_entropy);
        let hellos = self.members.values().filter_map(|m| m.hello_at);
        self.flush_at.into_iter().chain(self.gc_at).chain(ae).chain(hellos).chain(self.staggered.values().copied()).min()
    }

    /// Sends what is due: the batch of local changes, digests to members, and collects old
    /// tombstones. A call before anything is due does nothing.
    pub fn handle_timeout(&mut self, now: Instant, unix_ms: u64) {
        self.unix_ms = self.unix_ms.max(unix_ms);
        if self.flush_at.is_some_and(|t| now >= t) {
            self.flush();
        }
        let hellos: Vec<Fingerprint> = self.members.iter().filter(|(_, m)| m.hello_at.is_some_and(|t| now >= t)).map(|(p, _)| *p).collect();
        for peer in hellos {
            self.members.get_mut(&peer).expect("member").hello_at = None;
            self.send(Some(peer), wire::hello());
        }
        let due: Vec<Fingerprint> = self.staggered.iter().filter(|(_, t)| now >= **t).map(|(p, _)| *p).collect();
        for peer in due {
            self.staggered.remove(&peer);
            if self.members.contains_key(&peer) {
                self.last_exchange = Some(now);
                if self.me < peer {
                    self.send_digest(now, peer);
                } else {
                    self.schedule_hello(now, peer);
                }
            }
        }
        if let Some(interval) = self.config.anti_entropy_interval {
            let due: Vec<Fingerprint> =
                self.members.iter().filter(|(fp, m)| self.me < **fp && m.next_anti_entropy.is_some_and(|t| now >= t)).map(|(fp, _)| *fp).collect();
            for peer in due {
                self.members.get_mut(&peer).expect("member").next_anti_entropy = Some(now + interval);
                self.send_digest(now, peer);
            }
        }
        let gc_every = (self.config.tombstone_ttl / 8).clamp(Duration::from_secs(1), Duration::from_secs(60));
        match self.gc_at {
            None => self.gc_at = Some(now + gc_every),
            Some(t) if now >= t => {
                self.collect_tombstones();
                self.gc_at = Some(now + gc_every);
            }
            Some(_) => {}
        }
    }

    /// Sends the local changes gathered so far now, without waiting for the batch delay.
    pub fn flush(&mut self) {
        self.flush_at = None;
        if self.dirty.is_empty() {
            return;
        }
        let keys = std::mem::take(&mut self.dirty);
        let mut batch = Batch::new(self.config.max_message_size);
        for k in &keys {
            let Some(e) = self.entries.get_mut(k) else { continue };
            e.dirty = false;
            let e = &self.entries[k];
            if let Some(msg) = batch.push(k, e) {
                self.stats.entries_sent += msg.1 * self.members.len() as u64;
                self.send(None, msg.0);
            }
        }
        if let Some(msg) = batch.finish() {
            self.stats.entries_sent += msg.1 * self.members.len() as u64;
            self.send(None, msg.0);
        }
        self.dirty = keys;
        self.dirty.clear();
    }

    fn horizon(&self) -> u64 {
        let ttl: u64 = self.config.tombstone_ttl.as_millis().try_into().unwrap_or(u64::MAX);
        self.unix_ms.max(self.hlc.last().ms).saturating_sub(ttl)
    }

    fn collect_tombstones(&mut self) {
        let horizon = self.horizon();
        if !self.lww() {
            // An operational tombstone carries the key's version vector: dropping it would let
            // a new write start counting again, below what other replicas hold, and lose to
            // the old delete. Operational tombstones stay.
            return;
        }
        let old: Vec<Box<str>> = self.entries.iter().filter(|(_, e)| e.value.is_none() && e.version.ts.ms < horizon).map(|(k, _)| k.clone()).collect();
        if !old.is_empty() {
            debug!(count = old.len(), "tombstones collected");
        }
        for k in old {
            self.remove(&k);
        }
    }

    // ---- input --------------------------------------------------------------------------

    /// Takes in a message from member `from`. Never fails: an unusable message becomes a
    /// [`StateEvent::BadMessage`] and changes nothing.
    pub fn handle_message(&mut self, now: Instant, unix_ms: u64, from: Fingerprint, bytes: &[u8]) {
        self.unix_ms = self.unix_ms.max(unix_ms);
        self.stats.bytes_received += bytes.len() as u64;
        let msg = match wire::decode(bytes, MAX_KEY_LEN, self.config.max_value_size) {
            Ok(m) => m,
            Err(error) => {
                debug!(from = %from.short(), %error, "bad state message");
                self.events.push_back(StateEvent::BadMessage { from, error });
                return;
            }
        };
        match msg {
            Message::Entries(entries) => self.on_entries(unix_ms, from, entries),
            Message::Digest(cells) => {
                if let Some(m) = self.members.get_mut(&from) {
                    m.hello_at = None;
                }
                self.on_digest(now, from, &cells)
            }
            Message::SubDigest(parts) => self.on_sub_digest(now, from, &parts),
            Message::Summaries(leaves) => self.on_summaries(from, leaves),
            Message::WantPrefixes(prefixes) => {
                let entries = self.collect(|kh| prefixes.iter().any(|p| matches(p, kh)));
                self.send_entries(from, &entries);
            }
            Message::WantKeys(keys) => {
                let keys: Vec<Box<str>> = keys.into_iter().filter_map(|k| self.entries.get_key_value(k.as_str()).map(|(k, _)| k.clone())).collect();
                self.send_entries(from, &keys);
            }
            Message::Hello => {
                if let Some(m) = self.members.get_mut(&from) {
                    // Always answered: a digest sent before may have been dropped by a
                    // member that was not syncing yet (the `pushed` and `wanted` holds keep
                    // a second round from sending the same entries again).
                    m.last_digest = None;
                    self.send_digest(now, from);
                }
            }
        }
    }

    fn on_entries(&mut self, unix_ms: u64, from: Fingerprint, entries: Vec<wire::WireEntry>) {
        // Check everything first: a message is applied whole or not at all.
        let lww = self.lww();
        let parse = |key: &str, j: &str| serde_json::from_str::<Value>(j).map_err(|err| SyncWireError::Malformed(format!("value of {key:?} is not JSON: {err}")));
        let mut parsed = Vec::with_capacity(entries.len());
        for e in entries {
            if let Err(error) = check_key(&e.key) {
                return self.bad(from, error.into());
            }
            if !lww && (e.version.vv.is_empty() || e.siblings.is_empty()) {
                return self.bad(from, SyncWireError::Malformed("operational entry without a version vector or siblings".into()));
            }
            if lww && !e.siblings.is_empty() {
                return self.bad(from, SyncWireError::Malformed("siblings in last-writer-wins mode".into()));
            }
            let value = match &e.json {
                None => None,
                Some(j) => match parse(&e.key, j) {
                    Ok(v) => Some(v),
                    Err(error) => return self.bad(from, error),
                },
            };
            let mut siblings = Vec::with_capacity(e.siblings.len());
            for sib in &e.siblings {
                // A sibling the version vector does not cover is not a write it knows.
                if !covered(sib.node, sib.counter, &e.version.vv) {
                    return self.bad(from, SyncWireError::Malformed("a sibling outside the version vector".into()));
                }
                let value = match &sib.json {
                    None => None,
                    Some(j) => match parse(&e.key, j) {
                        Ok(v) => Some(v),
                        Err(error) => return self.bad(from, error),
                    },
                };
                siblings.push(Sibling { node: sib.node, counter: sib.counter, value, json: sib.json.as_deref().map(Into::into) });
            }
            parsed.push((e.key, e.version, e.json, value, siblings));
        }
        self.stats.entries_received += parsed.len() as u64;
        let horizon = self.horizon();
        for (key, mut version, json, value, siblings) in parsed {
            if let Err(error) = self.hlc.observe(unix_ms, &version.ts) {
                self.events.push_back(StateEvent::ClockSkew { from, key, error });
                continue;
            }
            if lww {
                version.vv.clear();
                self.apply_lww(from, key, version, json.map(String::into_boxed_str), value, horizon);
            } else {
                self.apply_operational(from, key, version, siblings, horizon);
            }
        }
    }

    fn bad(&mut self, from: Fingerprint, error: SyncWireError) {
        debug!(from = %from.short(), %error, "bad state message");
        self.events.push_back(StateEvent::BadMessage { from, error });
    }

    fn order(&self, local: &Version, remote: &Version) -> Order {
        if self.lww() {
            return if remote.ts > local.ts { Order::RemoteNewer } else { Order::RemoteOlderOrSame };
        }
        match (dominated(&remote.vv, &local.vv), dominated(&local.vv, &remote.vv)) {
            (true, _) => Order::RemoteOlderOrSame,
            (false, true) => Order::RemoteNewer,
            (false, false) => Order::Concurrent,
        }
    }

    fn apply_lww(&mut self, from: Fingerprint, key: String, version: Version, json: Option<Box<str>>, value: Option<Value>, horizon: u64) {
        let changed = match self.entries.get(key.as_str()) {
            None => {
                if value.is_none() && version.ts.ms < horizon {
                    // A tombstone this old was (or would have been) collected here.
                    return;
                }
                if self.entries.len() >= self.config.max_keys {
                    return self.bad(from, SyncWireError::BadEntry(SyncError::TooManyKeys(self.config.max_keys)));
                }
                value.is_some()
            }
            Some(local) if version.ts > local.version.ts => local.value != value,
            Some(_) => return,
        };
        let origin = version.ts.node;
        self.store(&key, value.clone(), json, version, Vec::new(), false);
        if changed {
            self.events.push_back(StateEvent::Changed { key, value, origin });
        }
    }

    /// Operational mode: joins the remote entry into the local one. The siblings kept are
    /// the local ones the remote version vector does not cover (the remote side has not seen
    /// them) or that it still holds, and the same the other way round; what reads see is
    /// the merge of them all. Replicas that know the same writes hold the same siblings.
    fn apply_operational(&mut self, from: Fingerprint, key: String, version: Version, remote: Vec<Sibling>, horizon: u64) {
        let StateMode::Operational(merge) = self.config.mode.clone() else { unreachable!("operational mode") };
        let fold = |sibs: &[Sibling]| -> Option<Value> {
            let mut it = sibs.iter();
            let first = it.next().and_then(|s| s.value.clone());
            it.fold(first, |acc, s| merge(&key, acc.as_ref(), s.value.as_ref()))
        };
        let Some(local) = self.entries.get(key.as_str()) else {
            let value = fold(&remote);
            if value.is_none() && version.ts.ms < horizon {
                return;
            }
            if self.entries.len() >= self.config.max_keys {
                return self.bad(from, SyncWireError::BadEntry(SyncError::TooManyKeys(self.config.max_keys)));
            }
            let origin = version.ts.node;
            self.store(&key, value.clone(), None, version, remote, false);
            if value.is_some() {
                self.events.push_back(StateEvent::Changed { key, value, origin });
            }
            return;
        };
        if dominated(&version.vv, &local.version.vv) {
            return;
        }
        let mut siblings: Vec<Sibling> = local
            .siblings
            .iter()
            .filter(|s| !covered(s.node, s.counter, &version.vv) || remote.iter().any(|r| (r.node, r.counter) == (s.node, s.counter)))
            .cloned()
            .collect();
        for r in &remote {
            let known_here = covered(r.node, r.counter, &local.version.vv);
            let held_here = local.siblings.iter().any(|s| (s.node, s.counter) == (r.node, r.counter));
            if (!known_here || held_here) && !siblings.iter().any(|s| (s.node, s.counter) == (r.node, r.counter)) {
                siblings.push(r.clone());
            }
        }
        siblings.sort_by_key(|s| (s.node, s.counter));
        let before = local.value.clone();
        let concurrent = siblings.len() > 1 && siblings != local.siblings;
        let merged = fold(&siblings);
        let vv = join(&local.version.vv, &version.vv);
        let ts = local.version.ts.max(version.ts);
        let origin = version.ts.node;
        self.store(&key, merged.clone(), None, Version { ts, vv }, siblings, false);
        let remote_value = fold(&remote);
        // The sender may hold what this replica holds already (its merge of the same
        // writes): not a conflict worth telling.
        if concurrent && remote_value != before {
            self.events.push_back(StateEvent::Conflict { key: key.clone(), local: before.clone(), remote: remote_value, merged: merged.clone(), from });
        }
        if before != merged {
            self.events.push_back(StateEvent::Changed { key, value: merged, origin });
        }
    }

    /// Keys whose hash `pick` accepts.
    fn collect(&self, pick: impl Fn(u64) -> bool) -> Vec<Box<str>> {
        self.entries.iter().filter(|(_, e)| pick(e.key_hash)).map(|(k, _)| k.clone()).collect()
    }

    fn send_entries(&mut self, to: Fingerprint, keys: &[Box<str>]) {
        let mut batch = Batch::new(self.config.max_message_size);
        let mut out = Vec::new();
        for k in keys {
            let Some(e) = self.entries.get(k) else { continue };
            if let Some(msg) = batch.push(k, e) {
                out.push(msg);
            }
        }
        out.extend(batch.finish());
        for (bytes, n) in out {
            self.stats.entries_sent += n;
            self.send(Some(to), bytes);
        }
    }

    /// Whether the entries under `p` should go to `peer`: not if they went lately.
    fn push(&mut self, now: Instant, peer: Fingerprint, p: Prefix) -> bool {
        if self.pushed.len() > 4 * BUCKETS * BUCKETS {
            self.pushed.retain(|_, t| now < *t + WANT_HOLD);
        }
        match self.pushed.get(&(peer, p)) {
            Some(t) if now < *t + WANT_HOLD => false,
            _ => {
                self.pushed.insert((peer, p), now);
                true
            }
        }
    }

    /// Adds `p` to `want` unless it was asked for lately (of anyone).
    fn want(&mut self, now: Instant, want: &mut Vec<Prefix>, p: Prefix) {
        if self.wanted.len() > 4 * BUCKETS * BUCKETS {
            self.wanted.retain(|_, t| now < *t + WANT_HOLD);
        }
        match self.wanted.get(&p) {
            Some(t) if now < *t + WANT_HOLD => {}
            _ => {
                self.wanted.insert(p, now);
                want.push(p);
            }
        }
    }

    fn on_digest(&mut self, now: Instant, from: Fingerprint, theirs: &[Cell; BUCKETS]) {
        let mut send_buckets = HashSet::new();
        let mut want = Vec::new();
        let mut dig = Vec::new();
        let top = self.top.clone();
        for (b, (mine, theirs)) in top.iter().zip(theirs.iter()).enumerate() {
            if mine == theirs {
                continue;
            }
            if theirs.count == 0 {
                if self.push(now, from, Prefix { depth: 1, prefix: b as u16 }) {
                    send_buckets.insert(b);
                }
            } else if mine.count == 0 {
                self.want(now, &mut want, Prefix { depth: 1, prefix: b as u16 });
            } else {
                dig.push(b);
            }
        }
        trace!(from = %from.short(), send = send_buckets.len(), want = want.len(), deeper = dig.len(), "digest compared");
        if !send_buckets.is_empty() {
            let keys = self.collect(|kh| send_buckets.contains(&bucket(kh)));
            self.send_entries(from, &keys);
        }
        if !want.is_empty() {
            self.send(Some(from), wire::want_prefixes(&want));
        }
        if !dig.is_empty() {
            let subs = self.sub_cells(&dig);
            // About 2.3 KB per bucket: cut to the message size.
            let per = (self.config.max_message_size / 2400).max(1);
            for chunk in subs.chunks(per) {
                self.send(Some(from), wire::sub_digest(chunk));
            }
        }
    }

    /// Second-level cells of `buckets`, in one pass over the map.
    fn sub_cells(&self, buckets: &[usize]) -> Vec<(u8, Box<[Cell; BUCKETS]>)> {
        let mut slot = [usize::MAX; BUCKETS];
        for (i, b) in buckets.iter().enumerate() {
            slot[*b] = i;
        }
        let mut out: Vec<(u8, Box<[Cell; BUCKETS]>)> = buckets.iter().map(|b| (*b as u8, Box::new([Cell::default(); BUCKETS]))).collect();
        for e in self.entries.values() {
            let i = slot[bucket(e.key_hash)];
            if i != usize::MAX {
                let c = &mut out[i].1[(leaf(e.key_hash) & 0xff) as usize];
                c.count += 1;
                c.xor ^= e.hash;
            }
        }
        out
    }

    fn on_sub_digest(&mut self, now: Instant, from: Fingerprint, parts: &[(u8, Box<[Cell; BUCKETS]>)]) {
        let buckets: Vec<usize> = parts.iter().map(|(b, _)| *b as usize).collect();
        let mine = self.sub_cells(&buckets);
        let mut send_leaves = HashSet::new();
        let mut want = Vec::new();
        let mut summarize = HashSet::new();
        for ((b, theirs), (_, mine)) in parts.iter().zip(mine.iter()) {
            for s in 0..BUCKETS {
                let (m, t) = (mine[s], theirs[s]);
                if m == t {
                    continue;
                }
                let leaf = (u16::from(*b) << 8) | s as u16;
                if t.count == 0 {
                    if self.push(now, from, Prefix { depth: 2, prefix: leaf }) {
                        send_leaves.insert(leaf);
                    }
                } else if m.count == 0 {
                    self.want(now, &mut want, Prefix { depth: 2, prefix: leaf });
                } else {
                    summarize.insert(leaf);
                }
            }
        }
        if !send_leaves.is_empty() {
            let keys = self.collect(|kh| send_leaves.contains(&leaf(kh)));
            self.send_entries(from, &keys);
        }
        if !want.is_empty() {
            self.send(Some(from), wire::want_prefixes(&want));
        }
        if !summarize.is_empty() {
            let mut by_leaf: BTreeMap<u16, Vec<(&str, &Version)>> = BTreeMap::new();
            for (k, e) in &self.entries {
                let l = leaf(e.key_hash);
                if summarize.contains(&l) {
                    by_leaf.entry(l).or_default().push((k, &e.version));
                }
            }
            let mut msgs = Vec::new();
            let (mut nodes, mut body, mut leaves) = (NodeTable::default(), Vec::new(), 0u64);
            for (l, items) in by_leaf {
                wire::put_leaf(&mut body, &mut nodes, l, items.into_iter());
                leaves += 1;
                if body.len() >= self.config.max_message_size {
                    msgs.push(summaries(&nodes, leaves, &body));
                    (nodes, body, leaves) = (NodeTable::default(), Vec::new(), 0);
                }
            }
            if leaves > 0 {
                msgs.push(summaries(&nodes, leaves, &body));
            }
            for m in msgs {
                self.send(Some(from), m);
            }
        }
    }

    fn on_summaries(&mut self, from: Fingerprint, leaves: Vec<(u16, Vec<(String, Version)>)>) {
        let lww = self.lww();
        let mut theirs: HashMap<u16, HashMap<String, Version>> = HashMap::new();
        for (l, items) in leaves {
            theirs.entry(l).or_default().extend(items);
        }
        let mut send = Vec::new();
        let mut want = Vec::new();
        for (k, e) in &self.entries {
            let Some(their_leaf) = theirs.get(&leaf(e.key_hash)) else { continue };
            match their_leaf.get(&**k) {
                None => send.push(k.clone()),
                Some(v) => {
                    let mut v = v.clone();
                    if lww {
                        v.vv.clear();
                    }
                    match self.order(&e.version, &v) {
                        Order::RemoteNewer => want.push(k.to_string()),
                        Order::Concurrent => {
                            send.push(k.clone());
                            want.push(k.to_string());
                        }
                        Order::RemoteOlderOrSame => {
                            if self.order(&v, &e.version) == Order::RemoteNewer {
                                send.push(k.clone());
                            }
                        }
                    }
                }
            }
        }
        for items in theirs.values() {
            for k in items.keys() {
                if !self.entries.contains_key(k.as_str()) {
                    want.push(k.clone());
                }
            }
        }
        self.send_entries(from, &send);
        if !want.is_empty() {
            // Cut so that one request stays near the message size.
            let mut chunk = Vec::new();
            let mut size = 0;
            for k in &want {
                size += k.len() + 2;
                chunk.push(k.as_str());
                if size >= self.config.max_message_size {
                    self.send(Some(from), wire::want_keys(chunk.drain(..)));
                    size = 0;
                }
            }
            if !chunk.is_empty() {
                self.send(Some(from), wire::want_keys(chunk.into_iter()));
            }
        }
    }
}

fn matches(p: &Prefix, kh: u64) -> bool {
    match p.depth {
        1 => bucket(kh) == usize::from(p.prefix),
        _ => leaf(kh) == p.prefix,
    }
}

fn summaries(nodes: &NodeTable, leaves: u64, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(body.len() + 10);
    wire::put_varint(&mut b, leaves);
    b.extend_from_slice(body);
    wire::with_nodes(wire::Type::Summaries, nodes, &b)
}

/// Builds `Entries` messages of about `max` bytes.
struct Batch {
    max: usize,
    nodes: NodeTable,
    body: Vec<u8>,
    count: u64,
}

impl Batch {
    fn new(max: usize) -> Self {
        Batch { max, nodes: NodeTable::default(), body: Vec::new(), count: 0 }
    }

    /// Adds an entry; returns a full message (and its entry count) when one is ready.
    fn push(&mut self, key: &str, e: &Entry) -> Option<(Vec<u8>, u64)> {
        let siblings = e.siblings.iter().map(|s| (&s.node, s.counter, s.json.as_deref()));
        wire::put_entry(&mut self.body, &mut self.nodes, key, &e.version, e.json.as_deref(), siblings);
        self.count += 1;
        (self.body.len() >= self.max || self.count >= wire::MAX_ITEMS as u64).then(|| self.take())
    }

    fn take(&mut self) -> (Vec<u8>, u64) {
        let mut b = Vec::with_capacity(self.body.len() + 10);
        wire::put_varint(&mut b, self.count);
        b.extend_from_slice(&self.body);
        let msg = wire::with_nodes(wire::Type::Entries, &self.nodes, &b);
        let n = self.count;
        *self = Batch::new(self.max);
        (msg, n)
    }

    fn finish(mut self) -> Option<(Vec<u8>, u64)> {
        (self.count > 0).then(|| self.take())
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
