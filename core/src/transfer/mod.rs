//! File, JSON and image transfer between two peers (the reference's `FileTransfer`,
//! `JSONTransfer`, `ImageTransfer`): chunked, backpressured, streamed, verified and resumable.
//!
//! [`Transfers`] is a sans-IO state machine over one channel per connection. It never reads
//! or writes files: the sender's side asks for bytes ([`TransferEvent::Read`], answered with
//! [`Transfers::provide`]) and the receiver's side hands them out ([`TransferEvent::Write`]),
//! so a transfer of any size (sizes are `u64`) holds at most
//! [`TransferConfig::read_ahead`] chunks in memory per transfer.
//!
//! Work in progress (issue 5): the protocol and both sides' state machines, tested pairwise in
//! memory, run inside [`Node`](crate::Node) on each connection's pre-negotiated
//! [`TRANSFER_CHANNEL`](crate::peer::TRANSFER_CHANNEL) ([`Node::send_file`](crate::Node::send_file)
//! and friends, events as [`NodeEvent::Transfer`](crate::NodeEvent::Transfer)); file-backed
//! sources and sinks in the adapters, JSON and image helpers, examples and benchmarks come next.
//!
//! # Flow
//!
//! 1. The sender [`offers`](Transfers::offer) (name, size, MIME type, chunk size and count,
//!    SHA-256 of the whole); the receiver gets [`TransferEvent::Offered`] and
//!    [`accepts`](Transfers::accept) or [`rejects`](Transfers::reject).
//! 2. The sender asks for chunks a few at a time, sends them as the channel takes them (a
//!    refused write waits for [`Transfers::handle_writable`]), several transfers to one peer in
//!    turn.
//! 3. The receiver checks every chunk (its CRC-32, its place) and the SHA-256 of the whole,
//!    answers `verified` or `corrupt`, and both sides report the outcome.
//! 4. Either side may cancel. After a connection came back
//!    ([`Transfers::handle_reconnected`]) the receiver says where it stands and the sender goes
//!    on from there.

pub mod wire;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::debug;

use crate::identity::Fingerprint;
use crate::peer::SendError;
pub use wire::{Control, Offer, TransferKind, TransferWireError};

/// How transfers behave. Every field has a default; see each.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TransferConfig {
    /// Bytes per chunk for offers this side makes. Default 16 KiB.
    pub chunk_size: u32,
    /// Largest transfer accepted. Default 1 TiB.
    pub max_size: u64,
    /// Chunks asked for ahead of sending, per transfer (the memory bound: 256 KiB at the
    /// default chunk size). Default 16.
    pub read_ahead: usize,
    /// Least time between two progress events of a transfer. Default 250 ms.
    pub progress_interval: Duration,
    /// Most transfers per peer at once (both directions). Default 64.
    pub max_transfers: usize,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            chunk_size: 16 * 1024,
            max_size: 1 << 40,
            read_ahead: 16,
            progress_interval: Duration::from_millis(250),
            max_transfers: 64,
        }
    }
}

/// What a sender offers: the content's name, size, type and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// The file name (no path).
    pub name: String,
    /// Total bytes.
    pub size: u64,
    /// MIME type.
    pub mime: String,
    /// The kind of content.
    pub kind: TransferKind,
    /// SHA-256 of all of it.
    pub sha256: [u8; 32],
}

impl FileInfo {
    /// A file of `size` bytes hashing to `sha256`, as `application/octet-stream`.
    pub fn new(name: impl Into<String>, size: u64, sha256: [u8; 32]) -> Self {
        FileInfo { name: name.into(), size, mime: "application/octet-stream".into(), kind: TransferKind::File, sha256 }
    }

    /// With this MIME type and kind.
    pub fn typed(mut self, mime: impl Into<String>, kind: TransferKind) -> Self {
        self.mime = mime.into();
        self.kind = kind;
        self
    }
}

/// Which way a transfer goes, seen from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// This side sends.
    Send,
    /// This side receives.
    Receive,
}

/// How far a transfer is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Bytes done (sent, or received and checked).
    pub bytes: u64,
    /// Bytes in all.
    pub total: u64,
    /// `bytes / total` in percent (100 for an empty transfer).
    pub percent: f64,
    /// Bytes per second since the previous progress event.
    pub bytes_per_sec: f64,
    /// Time left at that rate.
    pub eta: Option<Duration>,
}

/// Why a transfer failed, or a transfer message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// No such transfer (with that peer).
    #[error("no transfer {0}")]
    Unknown(u64),
    /// The peer offered an id that is in use.
    #[error("transfer id {0} is in use")]
    DuplicateId(u64),
    /// [`TransferConfig::max_transfers`] with that peer already.
    #[error("too many transfers with this peer")]
    TooMany,
    /// The offer (or a message) does not make sense.
    #[error(transparent)]
    Wire(#[from] TransferWireError),
    /// A chunk arrived out of place.
    #[error("chunk {got} arrived where chunk {expected} was due")]
    OutOfOrder {
        /// The chunk due.
        expected: u64,
        /// The one that came.
        got: u64,
    },
    /// A chunk past the end, or of the wrong length.
    #[error("chunk {0} is past the end or of the wrong length")]
    BadChunk(u64),
    /// A chunk's CRC-32 does not match.
    #[error("chunk {0} is corrupt")]
    CorruptChunk(u64),
    /// Every chunk arrived but the SHA-256 of the whole does not match the offer.
    #[error("the content does not match its SHA-256")]
    HashMismatch,
    /// The receiver said no.
    #[error("rejected: {0}")]
    Rejected(String),
    /// Either side cancelled.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The command does not fit the transfer's state (e.g. accepting twice, providing bytes
    /// nobody asked for).
    #[error("not now: {0}")]
    WrongState(&'static str),
}

/// Something that happened; drain with [`Transfers::poll_event`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TransferEvent {
    /// A peer offers a transfer: [`Transfers::accept`] or [`Transfers::reject`] it.
    Offered {
        /// The sender.
        peer: Fingerprint,
        /// What it offers.
        offer: Offer,
    },
    /// Sender: read `len` bytes at `offset` and [`Transfers::provide`] them.
    Read {
        /// The receiver.
        peer: Fingerprint,
        /// The transfer.
        id: u64,
        /// Where.
        offset: u64,
        /// How many.
        len: usize,
    },
    /// Receiver: store `data` at `offset` (already checked).
    Write {
        /// The sender.
        peer: Fingerprint,
        /// The transfer.
        id: u64,
        /// Where.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// How far a transfer is (at most every [`TransferConfig::progress_interval`]).
    Progress {
        /// The other side.
        peer: Fingerprint,
        /// The transfer.
        id: u64,
        /// Which way.
        direction: Direction,
        /// How far.
        progress: Progress,
    },
    /// Done and verified by the receiver.
    Completed {
        /// The other side.
        peer: Fingerprint,
        /// The transfer.
        id: u64,
        /// Which way.
        direction: Direction,
    },
    /// Ended without success; a receiver must not treat what it wrote as complete.
    Failed {
        /// The other side.
        peer: Fingerprint,
        /// The transfer.
        id: u64,
        /// Which way.
        direction: Direction,
        /// Why.
        error: TransferError,
    },
    /// A message from `peer` was unusable and dropped; its transfers go on.
    BadMessage {
        /// The sender.
        peer: Fingerprint,
        /// Why.
        error: TransferError,
    },
}

/// What the transfers need from the connection to a peer.
pub trait TransferTransport {
    /// Sends a control message (JSON text).
    fn send_text(&mut self, peer: Fingerprint, text: &str) -> Result<(), SendError>;
    /// Sends a chunk frame; [`SendError::WouldBlock`] when the channel is full.
    fn send_binary(&mut self, peer: Fingerprint, frame: &[u8]) -> Result<(), SendError>;
}

enum OutState {
    Offered,
    Sending { next_read: u64, next_send: u64, requested: BTreeSet<u64>, ready: BTreeMap<u64, Vec<u8>> },
    /// Every chunk sent; waiting for `verified`.
    Sent,
    /// The connection came back: waiting for the receiver to say where it stands (its
    /// `accept` with `from`). Reads still outstanding are kept.
    Resuming { requested: BTreeSet<u64> },
}

struct Outgoing {
    offer: Offer,
    state: OutState,
    meter: Meter,
}

enum InState {
    Offered,
    Receiving { next: u64, hasher: Box<Sha256> },
}

struct Incoming {
    offer: Offer,
    state: InState,
    meter: Meter,
}

/// Progress bookkeeping.
struct Meter {
    last: Option<(Instant, u64)>,
    done: u64,
}

impl Meter {
    fn new() -> Self {
        Meter { last: None, done: 0 }
    }

    fn tick(&mut self, now: Instant, total: u64, interval: Duration, force: bool) -> Option<Progress> {
        let (at, then) = *self.last.get_or_insert((now, self.done));
        let elapsed = now.saturating_duration_since(at);
        if !force && elapsed < interval {
            return None;
        }
        let rate = if elapsed.is_zero() { 0.0 } else { (self.done - then) as f64 / elapsed.as_secs_f64() };
        self.last = Some((now, self.done));
        let left = total - self.done.min(total);
        Some(Progress {
            bytes: self.done,
            total,
            percent: if total == 0 { 100.0 } else { self.done as f64 * 100.0 / total as f64 },
            bytes_per_sec: rate,
            eta: (rate > 0.0).then(|| Duration::from_secs_f64(left as f64 / rate)),
        })
    }
}

#[derive(Default)]
struct PeerTransfers {
    out: BTreeMap<u64, Outgoing>,
    inc: BTreeMap<u64, Incoming>,
    /// Control messages waiting for the channel.
    control: VecDeque<Control>,
    /// The channel refused a chunk: wait for [`Transfers::handle_writable`].
    blocked: bool,
    /// The transfer served last, for turns.
    last_served: u64,
    /// Transfers this side verified lately, to say so again after a reconnect (the first
    /// `verified` may have been lost with the connection).
    verified: VecDeque<u64>,
}

/// Verified transfer ids remembered per peer.
const RECENTLY_VERIFIED: usize = 64;

/// Every transfer of one node. See the [module docs](self).
pub struct Transfers {
    config: TransferConfig,
    peers: BTreeMap<Fingerprint, PeerTransfers>,
    next_id: u64,
    events: VecDeque<TransferEvent>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Transfers {
    /// No transfers yet.
    pub fn new(config: TransferConfig) -> Self {
        Transfers { config, peers: BTreeMap::new(), next_id: 1, events: VecDeque::new() }
    }

    /// Returns the next event, or `None`.
    pub fn poll_event(&mut self) -> Option<TransferEvent> {
        self.events.pop_front()
    }

    fn count(p: &PeerTransfers) -> usize {
        p.out.len() + p.inc.len()
    }

    // ---- sender --------------------------------------------------------------------------

    /// Offers `file` to `peer`. Returns the transfer id.
    pub fn offer(&mut self, peer: Fingerprint, file: FileInfo) -> Result<u64, TransferError> {
        let id = self.next_id;
        let chunk = self.config.chunk_size;
        let offer = Offer {
            id,
            chunks: file.size.div_ceil(u64::from(chunk)),
            sha256: hex(&file.sha256),
            name: file.name,
            size: file.size,
            mime: file.mime,
            kind: file.kind,
            chunk,
        };
        offer.validate(self.config.max_size)?;
        let p = self.peers.entry(peer).or_default();
        if Self::count(p) >= self.config.max_transfers {
            return Err(TransferError::TooMany);
        }
        self.next_id += 1;
        p.control.push_back(Control::Offer(offer.clone()));
        p.out.insert(id, Outgoing { offer, state: OutState::Offered, meter: Meter::new() });
        Ok(id)
    }

    /// Hands over the bytes a [`TransferEvent::Read`] asked for.
    pub fn provide(&mut self, peer: Fingerprint, id: u64, offset: u64, data: Vec<u8>) -> Result<(), TransferError> {
        let t = self.peers.get_mut(&peer).and_then(|p| p.out.get_mut(&id)).ok_or(TransferError::Unknown(id))?;
        let chunk = u64::from(t.offer.chunk);
        let index = offset / chunk;
        if let OutState::Resuming { requested } = &mut t.state {
            // Asked for before the connection was lost: read again once the receiver says
            // where to go on from.
            return if requested.remove(&index) { Ok(()) } else { Err(TransferError::WrongState("these bytes were not asked for")) };
        }
        let OutState::Sending { requested, ready, next_send, .. } = &mut t.state else {
            return Err(TransferError::WrongState("no read is outstanding"));
        };
        if offset % chunk != 0 || !requested.remove(&index) {
            return Err(TransferError::WrongState("these bytes were not asked for"));
        }
        if data.len() != t.offer.chunk_len(index) {
            return Err(TransferError::BadChunk(index));
        }
        if index >= *next_send && !ready.contains_key(&index) {
            ready.insert(index, data);
        }
        Ok(())
    }

    // ---- receiver -------------------------------------------------------------------------

    /// Accepts an offered transfer; its chunks arrive as [`TransferEvent::Write`].
    pub fn accept(&mut self, peer: Fingerprint, id: u64) -> Result<(), TransferError> {
        let p = self.peers.get_mut(&peer).ok_or(TransferError::Unknown(id))?;
        let t = p.inc.get_mut(&id).ok_or(TransferError::Unknown(id))?;
        if !matches!(t.state, InState::Offered) {
            return Err(TransferError::WrongState("already accepted"));
        }
        t.state = InState::Receiving { next: 0, hasher: Box::new(Sha256::new()) };
        p.control.push_back(Control::Accept { id, from: 0 });
        Ok(())
    }

    /// Refuses an offered transfer.
    pub fn reject(&mut self, peer: Fingerprint, id: u64, reason: &str) -> Result<(), TransferError> {
        let p = self.peers.get_mut(&peer).ok_or(TransferError::Unknown(id))?;
        p.inc.remove(&id).ok_or(TransferError::Unknown(id))?;
        p.control.push_back(Control::Reject { id, reason: reason.to_owned() });
        Ok(())
    }

    /// Stops a transfer in either direction; the other side hears `cancel`.
    pub fn cancel(&mut self, peer: Fingerprint, id: u64, reason: &str) -> Result<(), TransferError> {
        let p = self.peers.get_mut(&peer).ok_or(TransferError::Unknown(id))?;
        let direction = if p.out.remove(&id).is_some() {
            Direction::Send
        } else if p.inc.remove(&id).is_some() {
            Direction::Receive
        } else {
            return Err(TransferError::Unknown(id));
        };
        p.control.push_back(Control::Cancel { id, reason: reason.to_owned() });
        self.events.push_back(TransferEvent::Failed { peer, id, direction, error: TransferError::Cancelled(reason.to_owned()) });
        Ok(())
    }

    // ---- network ----------------------------------------------------------------------------

    /// A control message (text) from `peer` on the transfer channel.
    pub fn handle_text(&mut self, now: Instant, peer: Fingerprint, text: &str) {
        match Control::decode(text) {
            Ok(c) => self.on_control(now, peer, c),
            Err(e) => self.events.push_back(TransferEvent::BadMessage { peer, error: e.into() }),
        }
    }

    fn bad(&mut self, peer: Fingerprint, error: TransferError) {
        debug!(peer = %peer.short(), %error, "bad transfer message");
        self.events.push_back(TransferEvent::BadMessage { peer, error });
    }

    fn on_control(&mut self, now: Instant, peer: Fingerprint, c: Control) {
        let max_transfers = self.config.max_transfers;
        let max_size = self.config.max_size;
        let p = self.peers.entry(peer).or_default();
        match c {
            Control::Offer(offer) => {
                if let Err(e) = offer.validate(max_size) {
                    return self.bad(peer, e.into());
                }
                if let Some(t) = p.inc.get(&offer.id) {
                    // The same offer again (made anew after a reconnect) changes nothing.
                    if t.offer == offer {
                        return;
                    }
                    return self.bad(peer, TransferError::DuplicateId(offer.id));
                }
                if Self::count(p) >= max_transfers {
                    p.control.push_back(Control::Reject { id: offer.id, reason: "too many transfers".into() });
                    return;
                }
                p.inc.insert(offer.id, Incoming { offer: offer.clone(), state: InState::Offered, meter: Meter::new() });
                self.events.push_back(TransferEvent::Offered { peer, offer });
            }
            Control::Accept { id, from } => {
                let Some(t) = p.out.get_mut(&id) else { return self.bad(peer, TransferError::Unknown(id)) };
                if from > t.offer.chunks {
                    return self.bad(peer, TransferError::BadChunk(from));
                }
                // A first accept, or a resume: go on from `from`, keeping what was read ahead.
                // Reads still outstanding stay so (their answers are taken if still useful);
                // what was read ahead is dropped and read again in order.
                let requested = match std::mem::replace(&mut t.state, OutState::Offered) {
                    OutState::Sending { requested, .. } | OutState::Resuming { requested } => requested,
                    _ => BTreeSet::new(),
                };
                let ready = BTreeMap::new();
                t.meter.done = from * u64::from(t.offer.chunk);
                // Reads start over at `from`; chunks already asked for or at hand are skipped.
                t.state = OutState::Sending { next_read: from, next_send: from, requested, ready };
            }
            Control::Reject { id, reason } => {
                if p.out.remove(&id).is_some() {
                    self.events.push_back(TransferEvent::Failed { peer, id, direction: Direction::Send, error: TransferError::Rejected(reason) });
                }
            }
            Control::Cancel { id, reason } => {
                let direction = if p.out.remove(&id).is_some() {
                    Direction::Send
                } else if p.inc.remove(&id).is_some() {
                    Direction::Receive
                } else {
                    return;
                };
                self.events.push_back(TransferEvent::Failed { peer, id, direction, error: TransferError::Cancelled(reason) });
            }
            Control::Verified { id } => {
                if let Some(t) = p.out.remove(&id) {
                    let total = t.offer.size;
                    let mut meter = t.meter;
                    meter.done = total;
                    if let Some(progress) = meter.tick(now, total, Duration::ZERO, true) {
                        self.events.push_back(TransferEvent::Progress { peer, id, direction: Direction::Send, progress });
                    }
                    self.events.push_back(TransferEvent::Completed { peer, id, direction: Direction::Send });
                }
            }
            Control::Corrupt { id, reason } => {
                if p.out.remove(&id).is_some() {
                    debug!(%reason, "receiver found the transfer corrupt");
                    self.events.push_back(TransferEvent::Failed { peer, id, direction: Direction::Send, error: TransferError::HashMismatch });
                }
            }
        }
    }

    /// A chunk frame (binary) from `peer` on the transfer channel.
    pub fn handle_binary(&mut self, now: Instant, peer: Fingerprint, frame: &[u8]) {
        let chunk = match wire::decode_chunk(frame) {
            Ok(c) => c,
            Err(e) => return self.bad(peer, e.into()),
        };
        let interval = self.config.progress_interval;
        let Some(p) = self.peers.get_mut(&peer) else { return self.bad(peer, TransferError::Unknown(chunk.id)) };
        let Some(t) = p.inc.get_mut(&chunk.id) else { return self.bad(peer, TransferError::Unknown(chunk.id)) };
        let id = chunk.id;
        let InState::Receiving { next, hasher } = &mut t.state else {
            return self.bad(peer, TransferError::WrongState("chunk before accept"));
        };
        if chunk.index < *next {
            // Sent again after a resume: already here.
            return;
        }
        let fail = |p: &mut PeerTransfers, events: &mut VecDeque<TransferEvent>, error: TransferError| {
            p.inc.remove(&id);
            p.control.push_back(Control::Corrupt { id, reason: error.to_string() });
            events.push_back(TransferEvent::Failed { peer, id, direction: Direction::Receive, error });
        };
        if chunk.index >= t.offer.chunks || chunk.payload.len() != t.offer.chunk_len(chunk.index) {
            let e = TransferError::BadChunk(chunk.index);
            return fail(p, &mut self.events, e);
        }
        if chunk.index > *next {
            let e = TransferError::OutOfOrder { expected: *next, got: chunk.index };
            return fail(p, &mut self.events, e);
        }
        if !chunk.crc_ok {
            return fail(p, &mut self.events, TransferError::CorruptChunk(chunk.index));
        }
        hasher.update(chunk.payload);
        let offset = chunk.index * u64::from(t.offer.chunk);
        *next += 1;
        t.meter.done += chunk.payload.len() as u64;
        self.events.push_back(TransferEvent::Write { peer, id, offset, data: chunk.payload.to_vec() });
        let last = *next == t.offer.chunks;
        if let Some(progress) = t.meter.tick(now, t.offer.size, interval, last) {
            self.events.push_back(TransferEvent::Progress { peer, id, direction: Direction::Receive, progress });
        }
        if last {
            self.finish_incoming(peer, id);
        }
    }

    fn finish_incoming(&mut self, peer: Fingerprint, id: u64) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let Some(t) = p.inc.remove(&id) else { return };
        let InState::Receiving { hasher, .. } = t.state else { return };
        let got = hex(&hasher.finalize());
        if got == t.offer.sha256 {
            p.control.push_back(Control::Verified { id });
            if p.verified.len() >= RECENTLY_VERIFIED {
                p.verified.pop_front();
            }
            p.verified.push_back(id);
            self.events.push_back(TransferEvent::Completed { peer, id, direction: Direction::Receive });
        } else {
            p.control.push_back(Control::Corrupt { id, reason: "sha256 mismatch".into() });
            self.events.push_back(TransferEvent::Failed { peer, id, direction: Direction::Receive, error: TransferError::HashMismatch });
        }
    }

    /// The channel to `peer` has room again (its buffered amount fell to the low-water mark).
    pub fn handle_writable(&mut self, peer: Fingerprint) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.blocked = false;
        }
    }

    /// The connection to `peer` is up again after a loss (what was in flight is gone): as a
    /// receiver, this side says where each of its transfers stands; as a sender, it waits
    /// for that and goes on from there. Call it on both sides.
    pub fn handle_reconnected(&mut self, peer: Fingerprint) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        p.blocked = false;
        for t in p.out.values_mut() {
            t.state = match std::mem::replace(&mut t.state, OutState::Offered) {
                OutState::Sending { requested, .. } | OutState::Resuming { requested } => OutState::Resuming { requested },
                OutState::Sent => OutState::Resuming { requested: BTreeSet::new() },
                // The offer may have been lost: make it again.
                OutState::Offered => {
                    p.control.push_back(Control::Offer(t.offer.clone()));
                    OutState::Offered
                }
            };
        }
        let again: Vec<Control> = p.verified.iter().map(|id| Control::Verified { id: *id }).collect();
        p.control.extend(again);
        let resume: Vec<Control> = p
            .inc
            .iter()
            .filter_map(|(id, t)| match &t.state {
                InState::Receiving { next, .. } => Some(Control::Accept { id: *id, from: *next }),
                InState::Offered => None,
            })
            .collect();
        p.control.extend(resume);
    }

    /// An empty transfer completes once accepted: there is nothing to send.
    fn zero_length(&mut self, peer: Fingerprint) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let ids: Vec<u64> = p.inc.iter().filter(|(_, t)| t.offer.chunks == 0 && matches!(t.state, InState::Receiving { .. })).map(|(id, _)| *id).collect();
        for id in ids {
            self.finish_incoming(peer, id);
        }
    }

    // ---- output ------------------------------------------------------------------------------

    /// Sends what can go now: control messages, then chunks, one per transfer in turn, until
    /// the channel refuses; asks for more chunks up to the read-ahead. Call after every input.
    pub fn flush(&mut self, now: Instant, t: &mut dyn TransferTransport) {
        let peers: Vec<Fingerprint> = self.peers.keys().copied().collect();
        for peer in peers {
            self.zero_length(peer);
            let (read_ahead, interval) = (self.config.read_ahead, self.config.progress_interval);
            let Some(p) = self.peers.get_mut(&peer) else { continue };
            while let Some(c) = p.control.front() {
                match t.send_text(peer, &c.encode()) {
                    Ok(()) => {
                        p.control.pop_front();
                    }
                    Err(SendError::WouldBlock { .. }) => break,
                    Err(e) => {
                        debug!(peer = %peer.short(), error = %e, "transfer control not sent");
                        break;
                    }
                }
            }
            // Chunks, in turn.
            let mut progressed = true;
            while progressed && !p.blocked {
                progressed = false;
                let ids: Vec<u64> = p.out.range(p.last_served + 1..).chain(p.out.range(..=p.last_served)).map(|(id, _)| *id).collect();
                for id in ids {
                    let out = p.out.get_mut(&id).expect("listed");
                    let OutState::Sending { next_send, ready, .. } = &mut out.state else { continue };
                    let Some(data) = ready.get(next_send) else { continue };
                    let frame = wire::encode_chunk(id, *next_send, data);
                    match t.send_binary(peer, &frame) {
                        Ok(()) => {
                            let len = data.len() as u64;
                            ready.remove(next_send);
                            *next_send += 1;
                            out.meter.done += len;
                            p.last_served = id;
                            progressed = true;
                            if *next_send == out.offer.chunks {
                                out.state = OutState::Sent;
                            }
                            if let Some(progress) = out.meter.tick(now, out.offer.size, interval, false) {
                                self.events.push_back(TransferEvent::Progress { peer, id, direction: Direction::Send, progress });
                            }
                        }
                        Err(SendError::WouldBlock { .. }) => {
                            p.blocked = true;
                            break;
                        }
                        Err(e) => {
                            debug!(peer = %peer.short(), error = %e, "chunk not sent");
                            p.blocked = true;
                            break;
                        }
                    }
                }
            }
            // Reads ahead.
            for (id, out) in &mut p.out {
                let OutState::Sending { next_read, next_send, requested, .. } = &mut out.state else { continue };
                // At most `read_ahead` chunks from the next one to send on.
                while *next_read < out.offer.chunks && *next_read < *next_send + read_ahead as u64 {
                    let index = *next_read;
                    *next_read += 1;
                    if requested.contains(&index) {
                        continue;
                    }
                    requested.insert(index);
                    let offset = index * u64::from(out.offer.chunk);
                    self.events.push_back(TransferEvent::Read { peer, id: *id, offset, len: out.offer.chunk_len(index) });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
