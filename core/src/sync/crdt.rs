//! [`CrdtSync`]: yrs (Yjs) documents kept in sync between the members of a room, as a
//! sans-IO machine.
//!
//! The application opens named documents ([`CrdtSync::open`], or [`CrdtSync::get_text`] /
//! [`get_map`](CrdtSync::get_map) / [`get_array`](CrdtSync::get_array) for a root type) and
//! edits them with ordinary yrs transactions (`doc.transact_mut()`) whenever it likes. Every
//! local transaction is captured; [`CrdtSync::flush`] merges what was captured per document
//! into one `Update` message to all members. Remote updates are applied in a transaction whose
//! origin marks them as remote, so they are never captured again (no echo, no broadcast
//! storm): a member learns an edit from its author, or through the handshake.
//!
//! # Handshake
//!
//! On [`handle_member_up`](CrdtSync::handle_member_up) we send that member, for every open
//! document, `SyncStep1` (our state vector); it answers `SyncStep2` (what we lack), and it
//! does the same to us. Opening a document sends `SyncStep1` to every member that is up. So
//! whatever was lost while a member was away is repaired both ways when it comes back.
//!
//! # Awareness
//!
//! Each replica may publish one JSON state per document ([`CrdtSync::set_awareness`]),
//! y-protocols style: it goes out at once and again every
//! [`CrdtConfig::awareness_refresh`]; a remote state not refreshed within
//! [`CrdtConfig::awareness_timeout`] expires ([`CrdtEvent::Awareness`] with `state: None`).
//! Remote states are keyed by the sending member's fingerprint (the transport authenticates
//! it), not by the yrs client id in the message: one state per (document, member). Only the
//! first entry of an awareness message is used (ours carry exactly one), and awareness from a
//! fingerprint that is not a member (no `handle_member_up`) is ignored, so that the states
//! kept are bounded by documents × members.
//!
//! # Wire format
//!
//! y-protocols framing (lib0 varints): `varString doc`, `varUint type`, then for type 0
//! (sync) `varUint subtype` and a `varUint8Array` (0 `SyncStep1`: v1 state vector, 1
//! `SyncStep2`: v1 update, 2 `Update`: v1 update); for type 1 (awareness) a `varUint8Array`
//! holding `varUint count` and per entry `varUint clientID`, `varUint clock`,
//! `varString json` (`"null"` removes the state). Trailing bytes are malformed.
//!
//! # Bounds and overflow
//!
//! - At most [`CrdtConfig::max_docs`] documents; names are 1 to [`MAX_DOC_NAME`] bytes.
//! - An incoming message larger than [`CrdtConfig::max_update_size`] is refused
//!   ([`SyncWireError::TooLarge`]). The limit must exceed the largest document: a
//!   `SyncStep2` carries a whole document to a member that has none of it.
//! - Local updates captured between flushes: once they add up to more than
//!   `max_update_size` bytes (and twice what the last early merge produced), they are merged
//!   early into one update, so the buffer stays about the size of the changes themselves.
//! - At most [`MAX_PENDING`] messages and [`MAX_PENDING`] events wait undrained; beyond that
//!   the oldest is dropped (a dropped message is repaired by the next handshake). A
//!   `SyncStep2` answer replaces one still queued for the same member and document, so a
//!   member repeating `SyncStep1` cannot pile up copies of the document.
//! - Awareness states are at most [`CrdtConfig::max_awareness_size`] bytes of JSON.
//!
//! # Trust
//!
//! Nothing a member sends makes this machine panic: undecodable input becomes
//! [`CrdtEvent::BadMessage`] and nothing of it is applied. yrs 0.28 itself is not hardened
//! against hostile updates (its decoder has a `debug_assert!` on client ids, and integration
//! does unchecked arithmetic that overflows in debug builds), so every yrs decode and apply of
//! member input runs under `catch_unwind` and a panic becomes [`SyncWireError::BadUpdate`].
//! One limitation remains: an update that decodes but that yrs refuses, or panics on, while
//! integrating it may have been applied in part (yrs does not roll back).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tracing::{debug, warn};
use yrs::encoding::write::Write;
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{
    ArrayRef, ClientID, Doc, MapRef, ReadTxn, StateVector, TextRef, Transact, TransactionMut, Update, UpdateEvent,
};

use super::{SyncError, SyncMessage, SyncWireError};
use crate::identity::Fingerprint;

/// The document used when the application names none.
pub const DEFAULT_DOC: &str = "default";
/// The name of the default root map (as the TypeScript reference).
pub const DEFAULT_MAP: &str = "shared";
/// The name of the default root text (as the TypeScript reference).
pub const DEFAULT_TEXT: &str = "text";
/// The name of the default root array (as the TypeScript reference).
pub const DEFAULT_ARRAY: &str = "array";
/// The longest document name, in bytes.
pub const MAX_DOC_NAME: usize = 128;
/// Most messages, and most events, that wait undrained; beyond that the oldest is dropped.
pub const MAX_PENDING: usize = 4096;

/// The transaction origin of remote updates: the capture callback skips them, and an
/// application's own yrs observers can tell a remote change from a local one with
/// [`is_remote`].
pub const REMOTE_ORIGIN: &str = "peerlink-crdt-remote";

/// Whether `txn` applies a member's update (rather than a local edit): for the application's
/// own yrs observers (`observe_update_v1`, a text's `observe`, ...).
pub fn is_remote(txn: &yrs::TransactionMut<'_>) -> bool {
    txn.origin().is_some_and(|origin| origin.as_ref() == REMOTE_ORIGIN.as_bytes())
}
/// The key of our update observer on every document.
const OBSERVER_KEY: &str = "peerlink-crdt";
/// yrs client ids are 53-bit (they must survive a JavaScript number).
const CLIENT_ID_MASK: u64 = (1 << 53) - 1;

const MSG_SYNC: u64 = 0;
const MSG_AWARENESS: u64 = 1;
const SYNC_STEP1: u64 = 0;
const SYNC_STEP2: u64 = 1;
const SYNC_UPDATE: u64 = 2;

/// [`CrdtSync`] configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CrdtConfig {
    /// Most open documents. Default 64.
    pub max_docs: usize,
    /// Largest incoming message, in bytes; larger ones are refused with
    /// [`SyncWireError::TooLarge`]. Also the size at which captured local updates are merged
    /// early. Default 64 MiB.
    pub max_update_size: usize,
    /// A remote awareness state not refreshed for this long expires. Default 30 s.
    pub awareness_timeout: Duration,
    /// Our awareness state goes out again this often while it is set. Default 15 s.
    pub awareness_refresh: Duration,
    /// Largest awareness state, in bytes of JSON (ours and theirs). Default 4 KiB.
    pub max_awareness_size: usize,
    /// How text positions count: bytes of UTF-8 (yrs's default, and ours) or UTF-16 code
    /// units (what Yjs in JavaScript counts; choose it to share positions, such as cursors,
    /// with JavaScript clients). Every replica of a document should use the same.
    pub offset_kind: yrs::OffsetKind,
    /// How often every document's state vector goes to every member again (they answer
    /// with whatever it lacks, usually nothing), which repairs an update lost on the way.
    /// `None`: only when members come. Default 30 s.
    pub resync_interval: Option<Duration>,
}

impl Default for CrdtConfig {
    fn default() -> Self {
        CrdtConfig {
            max_docs: 64,
            max_update_size: 64 * 1024 * 1024,
            awareness_timeout: Duration::from_secs(30),
            awareness_refresh: Duration::from_secs(15),
            max_awareness_size: 4 * 1024,
            offset_kind: yrs::OffsetKind::Bytes,
            resync_interval: Some(Duration::from_secs(30)),
        }
    }
}

/// What happened to the synced documents.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CrdtEvent {
    /// A remote update changed the document (updates that changed nothing are silent).
    Updated {
        /// The document.
        doc: String,
        /// The member whose message carried the update.
        from: Fingerprint,
    },
    /// We applied a member's `SyncStep2` (its answer to our state vector): the document holds
    /// everything that member had when it answered.
    Synced {
        /// The document.
        doc: String,
        /// The member.
        peer: Fingerprint,
    },
    /// A member's awareness state changed, was cleared (`None`) or expired (`None`).
    Awareness {
        /// The document.
        doc: String,
        /// The member.
        peer: Fingerprint,
        /// Its new state.
        state: Option<serde_json::Value>,
    },
    /// A member sent a message that was refused; nothing of it was applied (but see
    /// [`SyncWireError::BadUpdate`]).
    BadMessage {
        /// The member.
        from: Fingerprint,
        /// Why.
        error: SyncWireError,
    },
}

/// Local updates captured by the observer, waiting for [`CrdtSync::flush`].
#[derive(Debug, Default)]
struct Captured {
    /// v1 updates, oldest first.
    updates: Vec<Vec<u8>>,
    /// Their total size.
    bytes: usize,
    /// Merge early beyond this many bytes.
    merge_at: usize,
    /// A remote transaction changed the document (read and reset around each apply).
    remote_changed: bool,
}

impl Captured {
    fn push(&mut self, update: &[u8], limit: usize) {
        self.updates.push(update.to_vec());
        self.bytes += update.len();
        if self.bytes > self.merge_at.max(limit) && self.updates.len() > 1 {
            // Our own updates always decode; should yrs still refuse, keep them unmerged.
            if let Ok(merged) = yrs::merge_updates_v1(&self.updates) {
                self.bytes = merged.len();
                self.updates = vec![merged];
            }
            self.merge_at = self.bytes.saturating_mul(2);
        }
    }
}

/// Our awareness state for one document.
#[derive(Debug)]
struct LocalAwareness {
    json: String,
    refresh_at: Instant,
}

/// A member's awareness for one document. Kept after the state is cleared or expired (with
/// `state: None`) so that an older message cannot bring it back.
#[derive(Debug)]
struct RemoteAwareness {
    client: u64,
    clock: u64,
    state: Option<serde_json::Value>,
    seen: Instant,
}

struct DocState {
    doc: Doc,
    captured: Arc<Mutex<Captured>>,
    clock: u64,
    local: Option<LocalAwareness>,
    remote: BTreeMap<Fingerprint, RemoteAwareness>,
}

struct Queued {
    message: SyncMessage,
    /// `(doc, member)` of a `SyncStep2` answer, which a newer answer replaces.
    answer: Option<(String, Fingerprint)>,
}

/// A decoded message body.
enum Body<'a> {
    Step1(&'a [u8]),
    Step2(&'a [u8]),
    Update(&'a [u8]),
    /// The first entry (client, clock, json), if any.
    Awareness(Option<(u64, u64, &'a str)>),
}

/// yrs documents synced with the members of a room: see the [module docs](self).
///
/// Drain [`poll_message`](Self::poll_message) and [`poll_event`](Self::poll_event) after
/// every `handle_*`, `open`, `set_awareness` and `flush` call, and call
/// [`handle_timeout`](Self::handle_timeout) at [`poll_timeout`](Self::poll_timeout).
pub struct CrdtSync {
    config: CrdtConfig,
    me: Fingerprint,
    rng: ChaCha20Rng,
    docs: BTreeMap<String, DocState>,
    members: BTreeSet<Fingerprint>,
    messages: VecDeque<Queued>,
    events: VecDeque<CrdtEvent>,
    /// When state vectors go to every member again.
    next_resync: Option<Instant>,
}

impl std::fmt::Debug for CrdtSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrdtSync")
            .field("me", &self.me)
            .field("docs", &self.docs.keys().collect::<Vec<_>>())
            .field("members", &self.members)
            .field("messages", &self.messages.len())
            .field("events", &self.events.len())
            .finish()
    }
}

fn lock(captured: &Mutex<Captured>) -> MutexGuard<'_, Captured> {
    // The callback cannot panic while holding it; a poisoned buffer is still consistent.
    captured.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn malformed(what: impl std::fmt::Display) -> SyncWireError {
    SyncWireError::Malformed(what.to_string())
}

fn bad_update(doc: &str, error: impl std::fmt::Display) -> SyncWireError {
    SyncWireError::BadUpdate { doc: doc.to_owned(), error: error.to_string() }
}

fn encode_sync(doc: &str, subtype: u64, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(doc.len() + payload.len() + 16);
    bytes.write_string(doc);
    bytes.write_var(MSG_SYNC);
    bytes.write_var(subtype);
    bytes.write_buf(payload);
    bytes
}

fn encode_awareness(doc: &str, client: u64, clock: u64, json: &str) -> Vec<u8> {
    let mut inner = Vec::with_capacity(json.len() + 24);
    inner.write_var(1u64);
    inner.write_var(client);
    inner.write_var(clock);
    inner.write_string(json);
    let mut bytes = Vec::with_capacity(doc.len() + inner.len() + 8);
    bytes.write_string(doc);
    bytes.write_var(MSG_AWARENESS);
    bytes.write_buf(&inner);
    bytes
}

/// A lib0 reader whose slices borrow the message, not the reader (yrs's `Cursor` ties them
/// to itself).
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn var(&mut self, what: &str) -> Result<u64, SyncWireError> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let Some((&byte, rest)) = self.bytes.split_first() else {
                return Err(malformed(format!("{what}: cut short")));
            };
            self.bytes = rest;
            let bits = u64::from(byte & 0x7f);
            if i == 9 && bits > 1 {
                break;
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed(format!("{what}: varint overflows 64 bits")))
    }

    fn buf(&mut self, what: &str) -> Result<&'a [u8], SyncWireError> {
        let len = self.var(what)?;
        let len = usize::try_from(len).ok().filter(|len| *len <= self.bytes.len());
        let Some(len) = len else {
            return Err(malformed(format!("{what}: cut short")));
        };
        let (buf, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(buf)
    }

    fn string(&mut self, what: &str) -> Result<&'a str, SyncWireError> {
        std::str::from_utf8(self.buf(what)?).map_err(|_| malformed(format!("{what}: not UTF-8")))
    }
}

/// Parses a message, checking only its framing (not the yrs payloads).
fn decode(bytes: &[u8]) -> Result<(&str, Body<'_>), SyncWireError> {
    let mut reader = Reader { bytes };
    let doc = reader.string("document name")?;
    if doc.is_empty() || doc.len() > MAX_DOC_NAME {
        return Err(malformed(format!("document names are 1 to {MAX_DOC_NAME} bytes, this one is {}", doc.len())));
    }
    let body = match reader.var("message type")? {
        MSG_SYNC => {
            let subtype = reader.var("sync subtype")?;
            let payload = reader.buf("sync payload")?;
            match subtype {
                SYNC_STEP1 => Body::Step1(payload),
                SYNC_STEP2 => Body::Step2(payload),
                SYNC_UPDATE => Body::Update(payload),
                other => return Err(malformed(format!("unknown sync subtype {other}"))),
            }
        }
        MSG_AWARENESS => Body::Awareness(decode_awareness(reader.buf("awareness payload")?)?),
        other => return Err(malformed(format!("unknown message type {other}"))),
    };
    if !reader.bytes.is_empty() {
        return Err(malformed("trailing bytes"));
    }
    Ok((doc, body))
}

/// Parses a y-protocols awareness update, keeping its first entry. Every entry is parsed
/// (each takes at least three bytes, so the loop is bounded by the message size).
fn decode_awareness(payload: &[u8]) -> Result<Option<(u64, u64, &str)>, SyncWireError> {
    let mut reader = Reader { bytes: payload };
    let count = reader.var("awareness count")?;
    let mut first = None;
    for _ in 0..count {
        let client = reader.var("awareness client")?;
        let clock = reader.var("awareness clock")?;
        let json = reader.string("awareness state")?;
        first.get_or_insert((client, clock, json));
    }
    if !reader.bytes.is_empty() {
        return Err(malformed("trailing bytes in awareness update"));
    }
    Ok(first)
}

impl CrdtSync {
    /// Creates a machine with no documents and no members. `me` is our own fingerprint;
    /// `seed` picks the yrs client ids and document guids (same seed, same ids).
    pub fn new(config: CrdtConfig, me: Fingerprint, seed: u64) -> Self {
        CrdtSync {
            config,
            me,
            rng: ChaCha20Rng::seed_from_u64(seed),
            docs: BTreeMap::new(),
            members: BTreeSet::new(),
            messages: VecDeque::new(),
            events: VecDeque::new(),
            next_resync: None,
        }
    }

    /// Returns the configuration.
    pub fn config(&self) -> &CrdtConfig {
        &self.config
    }

    /// Returns a document, creating it if it is not open yet.
    ///
    /// Creating one sends `SyncStep1` to every member that is up, which fetches the
    /// document's state from them. Fails with [`SyncError::BadDocName`] or
    /// [`SyncError::TooManyDocs`].
    #[doc(alias = "getDoc")]
    pub fn open(&mut self, _now: Instant, doc: &str) -> Result<&Doc, SyncError> {
        if !self.docs.contains_key(doc) {
            self.create(doc)?;
        }
        Ok(&self.docs[doc].doc)
    }

    fn create(&mut self, name: &str) -> Result<(), SyncError> {
        if name.is_empty() || name.len() > MAX_DOC_NAME {
            return Err(SyncError::BadDocName { len: name.len(), max: MAX_DOC_NAME });
        }
        if self.docs.len() >= self.config.max_docs {
            return Err(SyncError::TooManyDocs(self.config.max_docs));
        }
        let client = match self.rng.next_u64() & CLIENT_ID_MASK {
            0 => 1,
            id => id,
        };
        let guid = yrs::uuid_v4_from(self.rng.next_u64() as u128 | ((self.rng.next_u64() as u128) << 64));
        let doc = Doc::with_options(yrs::Options {
            cleanup_formatting: true,
            offset_kind: self.config.offset_kind,
            ..yrs::Options::with_guid_and_client_id(guid, ClientID::new(client))
        });
        let captured = Arc::new(Mutex::new(Captured::default()));
        let sink = Arc::clone(&captured);
        let limit = self.config.max_update_size;
        doc.observe_update_v1(OBSERVER_KEY, move |txn: &TransactionMut, event: &UpdateEvent| {
            let remote = is_remote(txn);
            let mut captured = lock(&sink);
            if remote {
                captured.remote_changed = true;
            } else {
                captured.push(&event.update, limit);
            }
        })
        .expect("a document nobody else holds yet has no transaction open");
        let state_vector = doc.transact().state_vector().encode_v1();
        debug!(doc = name, client, "crdt document opened");
        self.docs.insert(name.to_owned(), DocState { doc, captured, clock: 0, local: None, remote: BTreeMap::new() });
        if !self.members.is_empty() {
            self.send(None, encode_sync(name, SYNC_STEP1, &state_vector), None);
        }
        Ok(())
    }

    /// Returns an open document.
    pub fn doc(&self, doc: &str) -> Option<&Doc> {
        self.docs.get(doc).map(|state| &state.doc)
    }

    /// Returns the names of the open documents, in order.
    pub fn docs(&self) -> impl Iterator<Item = &str> {
        self.docs.keys().map(String::as_str)
    }

    /// Returns the root text `name` of a document, opening the document if needed.
    ///
    /// # Panics
    ///
    /// As `yrs::Doc::get_or_insert_text`, if the application holds a transaction on the
    /// document (through a clone of it) during the call.
    pub fn get_text(&mut self, now: Instant, doc: &str, name: &str) -> Result<TextRef, SyncError> {
        Ok(self.open(now, doc)?.get_or_insert_text(name))
    }

    /// Returns the root map `name` of a document, opening the document if needed.
    ///
    /// # Panics
    ///
    /// As [`get_text`](Self::get_text).
    pub fn get_map(&mut self, now: Instant, doc: &str, name: &str) -> Result<MapRef, SyncError> {
        Ok(self.open(now, doc)?.get_or_insert_map(name))
    }

    /// Returns the root array `name` of a document, opening the document if needed.
    ///
    /// # Panics
    ///
    /// As [`get_text`](Self::get_text).
    pub fn get_array(&mut self, now: Instant, doc: &str, name: &str) -> Result<ArrayRef, SyncError> {
        Ok(self.open(now, doc)?.get_or_insert_array(name))
    }

    /// Handles a member joining or coming back: for every open document it is sent
    /// `SyncStep1`, and our awareness state if one is set. Calling it again repeats the
    /// handshake.
    pub fn handle_member_up(&mut self, now: Instant, peer: Fingerprint) {
        if peer == self.me {
            return;
        }
        self.members.insert(peer);
        if self.next_resync.is_none() {
            self.next_resync = self.config.resync_interval.map(|i| now + i.max(Duration::from_millis(1)));
        }
        let mut out = Vec::new();
        for (name, state) in &self.docs {
            let state_vector = state.doc.transact().state_vector().encode_v1();
            out.push(encode_sync(name, SYNC_STEP1, &state_vector));
            if let Some(local) = &state.local {
                out.push(encode_awareness(name, state.doc.client_id().get(), state.clock, &local.json));
            }
        }
        for bytes in out {
            self.send(Some(peer), bytes, None);
        }
    }

    /// Handles a member leaving: its awareness states are dropped
    /// ([`CrdtEvent::Awareness`] with `state: None` where it had one).
    pub fn handle_member_down(&mut self, peer: Fingerprint) {
        self.members.remove(&peer);
        let mut cleared = Vec::new();
        for (name, state) in &mut self.docs {
            if let Some(RemoteAwareness { state: Some(_), .. }) = state.remote.remove(&peer) {
                cleared.push(name.clone());
            }
        }
        for doc in cleared {
            self.event(CrdtEvent::Awareness { doc, peer, state: None });
        }
    }

    /// Handles a message from a member. Whatever is wrong with it becomes
    /// [`CrdtEvent::BadMessage`], and then nothing of it was applied (but see
    /// [`SyncWireError::BadUpdate`]).
    pub fn handle_message(&mut self, now: Instant, from: Fingerprint, bytes: &[u8]) {
        if let Err(error) = self.try_message(now, from, bytes) {
            debug!(from = %from.short(), %error, "bad crdt message");
            self.event(CrdtEvent::BadMessage { from, error });
        }
    }

    fn try_message(&mut self, now: Instant, from: Fingerprint, bytes: &[u8]) -> Result<(), SyncWireError> {
        if bytes.len() > self.config.max_update_size {
            return Err(SyncWireError::TooLarge { size: bytes.len(), max: self.config.max_update_size });
        }
        let (name, body) = decode(bytes)?;
        let Some(state) = self.docs.get_mut(name) else {
            if matches!(body, Body::Step1(_)) {
                // A member has a document this replica has not opened: nothing to answer
                // (opening it later runs the handshake). Not an error.
                debug!(from = %from.short(), doc = name, "handshake for a document not open here: ignored");
                return Ok(());
            }
            return Err(SyncWireError::UnknownDocument(name.to_owned()));
        };
        match body {
            Body::Step1(payload) => {
                let their = guarded(name, || StateVector::decode_v1(payload))?;
                let txn = state.doc.try_transact().map_err(|e| bad_update(name, e))?;
                // Not `encode_state_as_update_v1`: that one also re-encodes the pending
                // (not yet integrable) updates members sent, and panics (an `unwrap` in yrs
                // 0.28) when those do not merge, so garbage from one member would break every
                // later handshake. Pending updates are not ours to forward anyway.
                let answer = txn.encode_diff_v1(&their);
                drop(txn);
                self.send(Some(from), encode_sync(name, SYNC_STEP2, &answer), Some((name.to_owned(), from)));
            }
            Body::Step2(payload) => {
                let changed = apply(state, name, payload)?;
                if changed {
                    self.event(CrdtEvent::Updated { doc: name.to_owned(), from });
                }
                self.event(CrdtEvent::Synced { doc: name.to_owned(), peer: from });
            }
            Body::Update(payload) => {
                if apply(state, name, payload)? {
                    self.event(CrdtEvent::Updated { doc: name.to_owned(), from });
                }
            }
            Body::Awareness(None) => {}
            Body::Awareness(Some((client, clock, json))) => {
                if json.len() > self.config.max_awareness_size {
                    return Err(SyncWireError::TooLarge { size: json.len(), max: self.config.max_awareness_size });
                }
                let value: serde_json::Value =
                    serde_json::from_str(json).map_err(|e| malformed(format!("awareness state: {e}")))?;
                if !self.members.contains(&from) {
                    debug!(from = %from.short(), "awareness from a non-member ignored");
                    return Ok(());
                }
                let value = (!value.is_null()).then_some(value);
                let previous = match state.remote.get(&from) {
                    Some(known) if known.client == client && clock <= known.clock => return Ok(()),
                    Some(known) => known.state.clone(),
                    None => None,
                };
                let changed = previous != value;
                state.remote.insert(from, RemoteAwareness { client, clock, state: value.clone(), seen: now });
                if changed {
                    self.event(CrdtEvent::Awareness { doc: name.to_owned(), peer: from, state: value });
                }
            }
        }
        Ok(())
    }

    /// Publishes our awareness state for a document (`None` or JSON `null` clears it),
    /// opening the document if needed. It goes to every member now and again every
    /// [`CrdtConfig::awareness_refresh`] while set. Fails with
    /// [`SyncError::ValueTooLarge`] beyond [`CrdtConfig::max_awareness_size`], or as
    /// [`open`](Self::open).
    pub fn set_awareness(
        &mut self,
        now: Instant,
        doc: &str,
        state: Option<serde_json::Value>,
    ) -> Result<(), SyncError> {
        let json = match state.filter(|value| !value.is_null()) {
            Some(value) => {
                let json = serde_json::to_string(&value).map_err(|e| SyncError::Serialize(e.to_string()))?;
                if json.len() > self.config.max_awareness_size {
                    return Err(SyncError::ValueTooLarge { size: json.len(), max: self.config.max_awareness_size });
                }
                Some(json)
            }
            None => None,
        };
        self.open(now, doc)?;
        let refresh = self.refresh();
        let Some(entry) = self.docs.get_mut(doc) else { return Ok(()) };
        if json.is_none() && entry.local.is_none() {
            return Ok(());
        }
        entry.clock += 1;
        let bytes = encode_awareness(doc, entry.doc.client_id().get(), entry.clock, json.as_deref().unwrap_or("null"));
        entry.local = json.map(|json| LocalAwareness { json, refresh_at: now + refresh });
        if !self.members.is_empty() {
            self.send(None, bytes, None);
        }
        Ok(())
    }

    /// Returns this replica's own awareness state for a document, as last set.
    pub fn local_awareness(&self, doc: &str) -> Option<serde_json::Value> {
        serde_json::from_str(&self.docs.get(doc)?.local.as_ref()?.json).ok()
    }

    /// Returns the members' live awareness states for a document.
    pub fn awareness(&self, doc: &str) -> Vec<(Fingerprint, serde_json::Value)> {
        let Some(state) = self.docs.get(doc) else { return Vec::new() };
        state.remote.iter().filter_map(|(peer, remote)| Some((*peer, remote.state.clone()?))).collect()
    }

    /// Sends the local updates captured since the last flush: per document, one `Update`
    /// message (the captured updates merged) to every member.
    pub fn flush(&mut self, _now: Instant) {
        let mut out = Vec::new();
        for (name, state) in &self.docs {
            let updates = {
                let mut captured = lock(&state.captured);
                captured.bytes = 0;
                captured.merge_at = 0;
                std::mem::take(&mut captured.updates)
            };
            if updates.is_empty() || self.members.is_empty() {
                // Nobody to tell: members that come up get it through the handshake.
                continue;
            }
            if updates.len() == 1 {
                out.push(encode_sync(name, SYNC_UPDATE, &updates[0]));
                continue;
            }
            match yrs::merge_updates_v1(&updates) {
                Ok(merged) => out.push(encode_sync(name, SYNC_UPDATE, &merged)),
                Err(error) => {
                    warn!(doc = %name, %error, "local updates did not merge; sending them one by one");
                    out.extend(updates.iter().map(|update| encode_sync(name, SYNC_UPDATE, update)));
                }
            }
        }
        for bytes in out {
            self.send(None, bytes, None);
        }
    }

    /// Tells whether local updates wait for [`flush`](Self::flush).
    pub fn wants_flush(&self) -> bool {
        self.docs.values().any(|state| !lock(&state.captured).updates.is_empty())
    }

    /// Returns the next message to send.
    #[must_use]
    pub fn poll_message(&mut self) -> Option<SyncMessage> {
        self.messages.pop_front().map(|queued| queued.message)
    }

    /// Returns the next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<CrdtEvent> {
        self.events.pop_front()
    }

    /// Returns when [`handle_timeout`](Self::handle_timeout) is due next (an awareness
    /// refresh or expiry), if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timeout = self.config.awareness_timeout;
        self.docs
            .values()
            .flat_map(|state| {
                let refresh = state.local.as_ref().map(|local| local.refresh_at);
                let expiries = state
                    .remote
                    .values()
                    .filter(|remote| remote.state.is_some())
                    .map(move |remote| remote.seen + timeout);
                refresh.into_iter().chain(expiries)
            })
            .chain(self.next_resync.filter(|_| !self.members.is_empty() && !self.docs.is_empty()))
            .min()
    }

    /// Handles the timer: sends our due awareness refreshes and expires remote states not
    /// refreshed within [`CrdtConfig::awareness_timeout`]. Does nothing when nothing is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let refresh = self.refresh();
        let timeout = self.config.awareness_timeout;
        let mut out = Vec::new();
        let mut expired = Vec::new();
        for (name, state) in &mut self.docs {
            if let Some(local) = state.local.as_mut().filter(|local| local.refresh_at <= now) {
                state.clock += 1;
                local.refresh_at = now + refresh;
                out.push(encode_awareness(name, state.doc.client_id().get(), state.clock, &local.json));
            }
            for (peer, remote) in &mut state.remote {
                if remote.state.is_some() && remote.seen + timeout <= now {
                    remote.state = None;
                    expired.push((name.clone(), *peer));
                }
            }
        }
        if !self.members.is_empty() {
            for bytes in out {
                self.send(None, bytes, None);
            }
        }
        for (doc, peer) in expired {
            self.event(CrdtEvent::Awareness { doc, peer, state: None });
        }
        if let (Some(at), Some(interval)) = (self.next_resync, self.config.resync_interval) {
            if at <= now {
                self.next_resync = Some(now + interval.max(Duration::from_millis(1)));
                let vectors: Vec<Vec<u8>> = self.docs.iter().map(|(name, state)| encode_sync(name, SYNC_STEP1, &state.doc.transact().state_vector().encode_v1())).collect();
                let members: Vec<Fingerprint> = self.members.iter().copied().collect();
                for peer in members {
                    for bytes in &vectors {
                        self.send(Some(peer), bytes.clone(), None);
                    }
                }
            }
        }
    }

    /// The refresh interval, at least 1 ms so that deadlines always move forward.
    fn refresh(&self) -> Duration {
        self.config.awareness_refresh.max(Duration::from_millis(1))
    }

    fn send(&mut self, to: Option<Fingerprint>, bytes: Vec<u8>, answer: Option<(String, Fingerprint)>) {
        if answer.is_some() {
            self.messages.retain(|queued| queued.answer != answer);
        }
        if self.messages.len() >= MAX_PENDING {
            warn!("crdt message queue full: dropping the oldest message");
            self.messages.pop_front();
        }
        self.messages.push_back(Queued { message: SyncMessage { to, bytes }, answer });
    }

    fn event(&mut self, event: CrdtEvent) {
        if self.events.len() >= MAX_PENDING {
            warn!("crdt event queue full: dropping the oldest event");
            self.events.pop_front();
        }
        self.events.push_back(event);
    }
}

/// Runs a yrs decoder on member input. The decoders are pure, and yrs 0.28 can panic in
/// them (a `debug_assert!` on client ids wider than 53 bits), so a panic is caught and
/// becomes [`SyncWireError::BadUpdate`] like any decoding error.
fn guarded<T, E: std::fmt::Display>(
    doc: &str,
    decode: impl FnOnce() -> Result<T, E> + std::panic::UnwindSafe,
) -> Result<T, SyncWireError> {
    match std::panic::catch_unwind(decode) {
        Ok(result) => result.map_err(|e| bad_update(doc, e)),
        Err(_) => Err(bad_update(doc, "the decoder panicked")),
    }
}

/// Applies a remote v1 update to a document; tells whether it changed anything.
fn apply(state: &DocState, name: &str, payload: &[u8]) -> Result<bool, SyncWireError> {
    let update = guarded(name, || Update::decode_v1(payload))?;
    lock(&state.captured).remote_changed = false;
    let mut txn = state.doc.try_transact_mut_with(REMOTE_ORIGIN).map_err(|e| bad_update(name, e))?;
    // yrs 0.28 can panic integrating a hostile update that decoded fine (arithmetic
    // overflow, checked in debug builds); a member must not be able to bring us down, so the
    // panic is caught. The document may then hold part of the update (see the module docs).
    let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let result = txn.apply_update(update);
        // Committing runs the observer, which notes whether the document changed.
        drop(txn);
        result
    }));
    match applied {
        Ok(result) => result.map_err(|e| bad_update(name, e))?,
        Err(_) => return Err(bad_update(name, "yrs panicked applying it")),
    }
    let mut captured = lock(&state.captured);
    Ok(std::mem::take(&mut captured.remote_changed))
}

#[cfg(test)]
#[path = "crdt_tests.rs"]
mod tests;
