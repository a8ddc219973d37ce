//! File, JSON and image transfer between two peers (the reference's `FileTransfer`,
//! `JSONTransfer`, `ImageTransfer`): chunked, backpressured, streamed, verified and resumable.
//!
//! [`Transfers`] is a sans-IO state machine over one channel per connection. It never reads
//! or writes files: the sender's side asks for bytes ([`TransferEvent::Read`], answered with
//! [`Transfers::provide`]) and the receiver's side hands them out ([`TransferEvent::Write`]),
//! so a transfer of any size (sizes are `u64`) holds at most
//! [`TransferConfig::read_ahead`] chunks in memory per transfer.
//!
//! Or the application hands over a [`ChunkSource`] ([`Transfers::offer_from`]) and a
//! [`ChunkSink`] ([`Transfers::accept_into`], [`Transfers::accept_to_memory`]): then chunks are
//! read straight into the frames that go out, only when the channel has room, and written
//! straight from the frames that come in (one chunk in memory per transfer, no events per
//! chunk). The adapters implement them over files.
//!
//! [`Transfers`] runs inside [`Node`](crate::Node) on each connection's pre-negotiated
//! [`TRANSFER_CHANNEL`](crate::peer::TRANSFER_CHANNEL) ([`Node::send_file`](crate::Node::send_file)
//! and friends, events as [`NodeEvent::Transfer`](crate::NodeEvent::Transfer)).
//!
//! **JSON** ([`TransferKind::Json`], the reference's `JSONTransfer`): a serialized value, sent
//! from memory; up to [`TransferConfig::auto_accept_json`] bytes it is accepted without asking
//! and arrives parsed as [`TransferEvent::Json`]. **Images** ([`TransferKind::Image`], the
//! reference's `ImageTransfer`): files whose first bytes say they are images
//! ([`image_mime`]); they are offered like files, with their MIME type.
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

mod io;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::debug;

use crate::identity::Fingerprint;
use crate::peer::SendError;
pub use io::{ChunkSink, ChunkSource, SinkFn, SourceFn, image_mime};
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
    /// Largest transfer received into memory ([`Transfers::accept_to_memory`], JSON).
    /// Default 256 MiB.
    pub max_memory: u64,
    /// JSON transfers up to this size are accepted without asking and arrive as
    /// [`TransferEvent::Json`]; bigger ones are offered like files. 0 asks for every one.
    /// Default 16 MiB.
    pub auto_accept_json: u64,
    /// How long transfers under way (accepted, not finished) with a peer wait for its lost
    /// connection to come back ([`Transfers::handle_disconnected`] until
    /// [`Transfers::handle_reconnected`]) before they fail with [`TransferError::TimedOut`].
    /// A slow or stalled but connected peer is not timed out. Default 120 s.
    pub reconnect_timeout: Duration,
}

impl Default for TransferConfig {
    fn default() -> Self {
        TransferConfig {
            chunk_size: 16 * 1024,
            max_size: 1 << 40,
            read_ahead: 16,
            progress_interval: Duration::from_millis(250),
            max_transfers: 64,
            max_memory: 256 << 20,
            auto_accept_json: 16 << 20,
            reconnect_timeout: Duration::from_secs(120),
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
    /// A peer that shares an encrypted room sent a plaintext transfer message: refused (see
    /// [`crate::room`], "Encrypted rooms").
    #[error("plaintext transfer message from a member of an encrypted room")]
    Unencrypted,
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
    /// Reading the source or writing the sink failed; the transfer was cancelled.
    #[error("storage: {0}")]
    Storage(String),
    /// Too big to receive into memory ([`TransferConfig::max_memory`]).
    #[error("{size} bytes is over the in-memory limit of {limit}")]
    TooLarge {
        /// The offered size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A JSON transfer arrived intact but is not JSON.
    #[error("not JSON: {0}")]
    BadJson(String),
    /// The connection to the peer stayed lost for [`TransferConfig::reconnect_timeout`].
    #[error("the peer did not come back within {0:?}")]
    TimedOut(Duration),
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
    /// Receiver: the content of a transfer accepted into memory, verified. `Completed`
    /// follows.
    Received {
        /// The sender.
        peer: Fingerprint,
        /// The transfer.
        id: u64,
        /// All of it.
        data: Vec<u8>,
    },
    /// Receiver: a JSON transfer (the reference's `JSONTransfer`), verified and parsed.
    /// `Completed` follows.
    Json {
        /// The sender.
        peer: Fingerprint,
        /// The transfer.
        id: u64,
        /// The value.
        value: serde_json::Value,
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
    /// `ready` holds encoded chunk frames by index.
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
    /// Where the bytes come from; `None`: from [`TransferEvent::Read`] answers.
    source: Option<Box<dyn ChunkSource>>,
}

enum InState {
    Offered,
    Receiving { next: u64, hasher: Box<Sha256> },
}

struct Incoming {
    offer: Offer,
    state: InState,
    meter: Meter,
    sink: Sink,
}

/// Where a receiver's bytes go.
enum Sink {
    /// Out as [`TransferEvent::Write`].
    Events,
    /// Into the application's sink.
    Custom(Box<dyn ChunkSink>),
    /// Into memory, out as [`TransferEvent::Received`] (or [`TransferEvent::Json`]).
    Memory { data: Vec<u8>, json: bool },
}

impl Sink {
    fn abort(&mut self) {
        if let Sink::Custom(s) = self {
            s.abort();
        }
    }
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
        // `done` goes back when a receiver resumes from a chunk before the last one sent.
        let rate = if elapsed.is_zero() { 0.0 } else { self.done.saturating_sub(then) as f64 / elapsed.as_secs_f64() };
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
    /// Since when the connection to the peer is lost, if it is.
    down_since: Option<Instant>,
}

impl PeerTransfers {
    /// Whether a transfer is under way: accepted and not finished.
    fn under_way(&self) -> bool {
        self.out.values().any(|t| !matches!(t.state, OutState::Offered)) || self.inc.values().any(|t| matches!(t.state, InState::Receiving { .. }))
    }
}

impl PeerTransfers {
    /// Sends the control messages waiting, in order, until the channel refuses one.
    fn send_controls(&mut self, peer: Fingerprint, t: &mut dyn TransferTransport) {
        while let Some(c) = self.control.front() {
            match t.send_text(peer, &c.encode()) {
                Ok(()) => {
                    self.control.pop_front();
                }
                Err(SendError::WouldBlock { .. }) => break,
                Err(e) => {
                    debug!(peer = %peer.short(), error = %e, "transfer control not sent");
                    break;
                }
            }
        }
    }
}

/// Verified transfer ids remembered per peer.
const RECENTLY_VERIFIED: usize = 64;

/// Every transfer of one node. See the [module docs](self).
pub struct Transfers {
    config: TransferConfig,
    peers: BTreeMap<Fingerprint, PeerTransfers>,
    next_id: u64,
    events: VecDeque<TransferEvent>,
    /// The buffer of the frame sent last, to read the next one into (the channel copies what
    /// it is given: one allocation serves every chunk).
    spare: Vec<u8>,
    /// A flush stopped at its budget with chunks still ready to go.
    more: Option<Instant>,
    /// [`Transfers::flush`]'s lists, kept for their allocations.
    scratch_peers: Vec<Fingerprint>,
    scratch_ids: Vec<u64>,
}

/// Most chunks one [`Transfers::flush`] sends (bounded work per call, smoltcp style): the
/// connection's packets go out, and its acknowledgements come in, between bursts.
const CHUNKS_PER_FLUSH: usize = 2;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Transfers {
    /// No transfers yet; this side's transfer ids count from 1.
    pub fn new(config: TransferConfig) -> Self {
        Transfers { config, peers: BTreeMap::new(), next_id: 1, events: VecDeque::new(), spare: Vec::new(), more: None, scratch_peers: Vec::new(), scratch_ids: Vec::new() }
    }

    /// This side's transfer ids count from `first` (a random start, so that two peers'
    /// ids rarely meet; when they would, the next free one is taken).
    pub fn with_first_id(mut self, first: u64) -> Self {
        self.next_id = first.max(1);
        self
    }

    /// Returns the next event, or `None`.
    pub fn poll_event(&mut self) -> Option<TransferEvent> {
        self.events.pop_front()
    }

    fn count(p: &PeerTransfers) -> usize {
        p.out.len() + p.inc.len()
    }

    // ---- sender --------------------------------------------------------------------------

    /// Offers `file` to `peer`; its bytes are asked for with [`TransferEvent::Read`]. Returns
    /// the transfer id.
    pub fn offer(&mut self, peer: Fingerprint, file: FileInfo) -> Result<u64, TransferError> {
        self.offer_inner(peer, file, None)
    }

    /// Offers `file` to `peer`, its bytes read from `source` as the channel takes them (no
    /// [`TransferEvent::Read`]). Returns the transfer id.
    pub fn offer_from(&mut self, peer: Fingerprint, file: FileInfo, source: Box<dyn ChunkSource>) -> Result<u64, TransferError> {
        self.offer_inner(peer, file, Some(source))
    }

    fn offer_inner(&mut self, peer: Fingerprint, file: FileInfo, source: Option<Box<dyn ChunkSource>>) -> Result<u64, TransferError> {
        // An id no transfer with this peer has, either way: every message names one transfer.
        let mut id = self.next_id;
        if let Some(p) = self.peers.get(&peer) {
            while p.out.contains_key(&id) || p.inc.contains_key(&id) {
                id = id.wrapping_add(1).max(1);
            }
        }
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
        self.next_id = id.wrapping_add(1).max(1);
        p.control.push_back(Control::Offer(offer.clone()));
        p.out.insert(id, Outgoing { offer, state: OutState::Offered, meter: Meter::new(), source });
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
        if offset % chunk != 0 || !requested.contains(&index) {
            return Err(TransferError::WrongState("these bytes were not asked for"));
        }
        // Refused bytes leave the read outstanding: the right ones are still taken.
        if data.len() != t.offer.chunk_len(index) {
            return Err(TransferError::BadChunk(index));
        }
        requested.remove(&index);
        if index >= *next_send && !ready.contains_key(&index) {
            ready.insert(index, wire::encode_chunk(id, index, &data));
        }
        Ok(())
    }

    // ---- receiver -------------------------------------------------------------------------

    /// Accepts an offered transfer; its chunks arrive as [`TransferEvent::Write`].
    pub fn accept(&mut self, peer: Fingerprint, id: u64) -> Result<(), TransferError> {
        self.accept_inner(peer, id, Sink::Events)
    }

    /// Accepts an offered transfer into `sink`: chunks are written to it as they arrive,
    /// committed once the whole verified, aborted on failure.
    pub fn accept_into(&mut self, peer: Fingerprint, id: u64, sink: Box<dyn ChunkSink>) -> Result<(), TransferError> {
        self.accept_inner(peer, id, Sink::Custom(sink))
    }

    /// Accepts an offered transfer into memory (at most [`TransferConfig::max_memory`]
    /// bytes); it arrives whole as [`TransferEvent::Received`] (or [`TransferEvent::Json`]
    /// for JSON).
    pub fn accept_to_memory(&mut self, peer: Fingerprint, id: u64) -> Result<(), TransferError> {
        let limit = self.config.max_memory;
        let t = self.peers.get(&peer).and_then(|p| p.inc.get(&id)).ok_or(TransferError::Unknown(id))?;
        if t.offer.size > limit {
            return Err(TransferError::TooLarge { size: t.offer.size, limit });
        }
        let json = t.offer.kind == TransferKind::Json;
        self.accept_inner(peer, id, Sink::Memory { data: Vec::new(), json })
    }

    fn accept_inner(&mut self, peer: Fingerprint, id: u64, sink: Sink) -> Result<(), TransferError> {
        let p = self.peers.get_mut(&peer).ok_or(TransferError::Unknown(id))?;
        let t = p.inc.get_mut(&id).ok_or(TransferError::Unknown(id))?;
        if !matches!(t.state, InState::Offered) {
            return Err(TransferError::WrongState("already accepted"));
        }
        t.state = InState::Receiving { next: 0, hasher: Box::new(Sha256::new()) };
        t.sink = sink;
        p.control.push_back(Control::Accept { id, from: 0 });
        Ok(())
    }

    /// Refuses an offered transfer.
    pub fn reject(&mut self, peer: Fingerprint, id: u64, reason: &str) -> Result<(), TransferError> {
        let p = self.peers.get_mut(&peer).ok_or(TransferError::Unknown(id))?;
        match p.inc.get(&id) {
            None => return Err(TransferError::Unknown(id)),
            Some(t) if !matches!(t.state, InState::Offered) => return Err(TransferError::WrongState("accepted already: cancel it")),
            Some(_) => {}
        }
        p.inc.remove(&id);
        p.control.push_back(Control::Reject { id, reason: reason.to_owned() });
        Ok(())
    }

    /// Stops a transfer in either direction; the other side hears `cancel`.
    pub fn cancel(&mut self, peer: Fingerprint, id: u64, reason: &str) -> Result<(), TransferError> {
        let p = self.peers.get_mut(&peer).ok_or(TransferError::Unknown(id))?;
        if !p.out.contains_key(&id) && !p.inc.contains_key(&id) {
            return Err(TransferError::Unknown(id));
        }
        self.end(peer, id, None, TransferError::Cancelled(reason.to_owned()), Some(Control::Cancel { id, reason: reason.to_owned() }));
        Ok(())
    }

    /// Ends transfer `id` with `peer` as failed: aborts its sink, tells the peer `tell` and
    /// reports `error`. Ids are the sender's, so one transfer each way may have `id`:
    /// `direction` says which; `None` (a cancel, which names only the id) the sending one
    /// if there is one.
    fn end(&mut self, peer: Fingerprint, id: u64, direction: Option<Direction>, error: TransferError, tell: Option<Control>) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        let direction = direction.unwrap_or(if p.out.contains_key(&id) { Direction::Send } else { Direction::Receive });
        let found = match direction {
            Direction::Send => p.out.remove(&id).is_some(),
            Direction::Receive => p.inc.remove(&id).map(|mut t| t.sink.abort()).is_some(),
        };
        if !found {
            return;
        }
        debug!(peer = %peer.short(), id, %error, "transfer failed");
        p.control.extend(tell);
        self.events.push_back(TransferEvent::Failed { peer, id, direction, error });
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
        let auto_json = self.config.auto_accept_json.min(self.config.max_memory);
        let read_ahead = self.config.read_ahead as u64;
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
                if p.out.contains_key(&offer.id) {
                    // This side's own transfer to the peer has that id: refused, so that every
                    // message names one transfer.
                    p.control.push_back(Control::Reject { id: offer.id, reason: "transfer id in use".into() });
                    return self.bad(peer, TransferError::DuplicateId(offer.id));
                }
                if Self::count(p) >= max_transfers {
                    p.control.push_back(Control::Reject { id: offer.id, reason: "too many transfers".into() });
                    return;
                }
                let id = offer.id;
                let json = offer.kind == TransferKind::Json && offer.size <= auto_json;
                p.inc.insert(id, Incoming { offer: offer.clone(), state: InState::Offered, meter: Meter::new(), sink: Sink::Events });
                if json {
                    // A JSON value is taken as it comes (the reference's JSONTransfer).
                    let accepted = self.accept_inner(peer, id, Sink::Memory { data: Vec::new(), json: true });
                    debug_assert!(accepted.is_ok());
                } else {
                    self.events.push_back(TransferEvent::Offered { peer, offer });
                }
            }
            Control::Accept { id, from } => {
                let Some(t) = p.out.get_mut(&id) else { return self.bad(peer, TransferError::Unknown(id)) };
                if from > t.offer.chunks {
                    return self.bad(peer, TransferError::BadChunk(from));
                }
                // A first accept, or a resume: go on from `from`. Reads still outstanding
                // within the read-ahead from there stay so (their answers are taken); others
                // are dropped, or accepts from here and there would have this side read and
                // hold more than `read_ahead` chunks. What was read ahead is dropped and read
                // again in order.
                let mut requested = match std::mem::replace(&mut t.state, OutState::Offered) {
                    OutState::Sending { requested, .. } | OutState::Resuming { requested } => requested,
                    _ => BTreeSet::new(),
                };
                requested.retain(|i| (from..from.saturating_add(read_ahead)).contains(i));
                t.meter.done = from * u64::from(t.offer.chunk);
                t.state = OutState::Sending { next_read: from, next_send: from, requested, ready: BTreeMap::new() };
                if from == t.offer.chunks {
                    t.state = OutState::Sent;
                }
            }
            Control::Reject { id, reason } => match p.out.get(&id) {
                Some(t) if matches!(t.state, OutState::Offered) => self.end(peer, id, Some(Direction::Send), TransferError::Rejected(reason), None),
                Some(_) => self.bad(peer, TransferError::WrongState("reject after accept")),
                // Crossed with this side's cancel.
                None => {}
            },
            Control::Cancel { id, reason } => self.end(peer, id, None, TransferError::Cancelled(reason), None),
            Control::Verified { id } => {
                let Some(t) = p.out.get_mut(&id) else { return };
                if !matches!(t.state, OutState::Sent | OutState::Resuming { .. }) {
                    return self.bad(peer, TransferError::WrongState("verified before every chunk was sent"));
                }
                let t = p.out.remove(&id).expect("present");
                let total = t.offer.size;
                let mut meter = t.meter;
                meter.done = total;
                if let Some(progress) = meter.tick(now, total, Duration::ZERO, true) {
                    self.events.push_back(TransferEvent::Progress { peer, id, direction: Direction::Send, progress });
                }
                self.events.push_back(TransferEvent::Completed { peer, id, direction: Direction::Send });
            }
            Control::Corrupt { id, reason } => {
                if p.out.contains_key(&id) {
                    debug!(%reason, "receiver found the transfer corrupt");
                    self.end(peer, id, Some(Direction::Send), TransferError::HashMismatch, None);
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
        let id = chunk.id;
        let Some(t) = self.peers.get_mut(&peer).and_then(|p| p.inc.get_mut(&id)) else { return self.bad(peer, TransferError::Unknown(id)) };
        let InState::Receiving { next, hasher } = &mut t.state else {
            return self.bad(peer, TransferError::WrongState("chunk before accept"));
        };
        if chunk.index < *next {
            // Sent again after a resume: already here.
            return;
        }
        let error = if chunk.index >= t.offer.chunks || chunk.payload.len() != t.offer.chunk_len(chunk.index) {
            Some(TransferError::BadChunk(chunk.index))
        } else if chunk.index > *next {
            Some(TransferError::OutOfOrder { expected: *next, got: chunk.index })
        } else if !chunk.crc_ok {
            Some(TransferError::CorruptChunk(chunk.index))
        } else {
            None
        };
        if let Some(error) = error {
            let reason = error.to_string();
            return self.end(peer, id, Some(Direction::Receive), error, Some(Control::Corrupt { id, reason }));
        }
        let offset = chunk.index * u64::from(t.offer.chunk);
        let stored = match &mut t.sink {
            Sink::Events => {
                self.events.push_back(TransferEvent::Write { peer, id, offset, data: chunk.payload.to_vec() });
                Ok(())
            }
            Sink::Custom(sink) => sink.write_at(offset, chunk.payload),
            Sink::Memory { data, .. } => {
                data.extend_from_slice(chunk.payload);
                Ok(())
            }
        };
        if let Err(e) = stored {
            let reason = format!("the receiver could not store it: {e}");
            return self.end(peer, id, Some(Direction::Receive), TransferError::Storage(e.to_string()), Some(Control::Cancel { id, reason }));
        }
        hasher.update(chunk.payload);
        *next += 1;
        t.meter.done += chunk.payload.len() as u64;
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
        let Some(t) = p.inc.get_mut(&id) else { return };
        let InState::Receiving { hasher, .. } = &mut t.state else { return };
        let got = hex(&std::mem::take(hasher.as_mut()).finalize());
        // `validate` takes hex digits in either case.
        if !got.eq_ignore_ascii_case(&t.offer.sha256) {
            return self.end(peer, id, Some(Direction::Receive), TransferError::HashMismatch, Some(Control::Corrupt { id, reason: "sha256 mismatch".into() }));
        }
        let mut t = p.inc.remove(&id).expect("present");
        let outcome = match &mut t.sink {
            Sink::Events => Ok(None),
            Sink::Custom(sink) => sink.commit().map(|()| None).map_err(|e| TransferError::Storage(e.to_string())),
            Sink::Memory { data, json: false } => Ok(Some(TransferEvent::Received { peer, id, data: std::mem::take(data) })),
            Sink::Memory { data, json: true } => match serde_json::from_slice(data) {
                Ok(value) => Ok(Some(TransferEvent::Json { peer, id, value })),
                Err(e) => Err(TransferError::BadJson(e.to_string())),
            },
        };
        match outcome {
            Ok(event) => {
                p.control.push_back(Control::Verified { id });
                if p.verified.len() >= RECENTLY_VERIFIED {
                    p.verified.pop_front();
                }
                p.verified.push_back(id);
                self.events.extend(event);
                self.events.push_back(TransferEvent::Completed { peer, id, direction: Direction::Receive });
            }
            Err(error) => {
                // Put it back so `end` aborts the sink and reports it.
                p.inc.insert(id, t);
                let reason = error.to_string();
                self.end(peer, id, Some(Direction::Receive), error, Some(Control::Cancel { id, reason }));
            }
        }
    }

    /// The channel to `peer` has room again (its buffered amount fell to the low-water mark).
    /// Also when its channel opens: the peer is connected.
    pub fn handle_writable(&mut self, peer: Fingerprint) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.blocked = false;
            p.down_since = None;
        }
    }

    /// The connection to `peer` is up again after a loss (what was in flight is gone): as a
    /// receiver, this side says where each of its transfers stands; as a sender, it waits
    /// for that and goes on from there. Call it on both sides.
    pub fn handle_reconnected(&mut self, peer: Fingerprint) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        p.blocked = false;
        p.down_since = None;
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

    // ---- time --------------------------------------------------------------------------------

    /// The connection to `peer` is lost (closed or failed): its transfers under way wait
    /// [`TransferConfig::reconnect_timeout`] for [`Transfers::handle_reconnected`].
    pub fn handle_disconnected(&mut self, now: Instant, peer: Fingerprint) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.down_since.get_or_insert(now);
        }
    }

    /// When transfers with a peer whose connection is lost would time out, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let wait = self.config.reconnect_timeout;
        self.peers.values().filter(|p| p.under_way()).filter_map(|p| p.down_since).min().map(|at| at + wait)
    }

    /// Whether the last [`Transfers::flush`] stopped at its budget with chunks still ready to
    /// go: flush again soon (a [`Node`](crate::Node) does so at once, from `handle_timeout`).
    pub fn wants_flush(&self) -> bool {
        self.more.is_some()
    }

    /// Fails the transfers under way with peers whose connection stayed lost for
    /// [`TransferConfig::reconnect_timeout`]. Calling it early does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        let wait = self.config.reconnect_timeout;
        let mut due = Vec::new();
        for (peer, p) in &mut self.peers {
            if p.down_since.is_none_or(|at| now < at + wait) {
                continue;
            }
            p.down_since = None;
            due.extend(p.out.iter().filter(|(_, t)| !matches!(t.state, OutState::Offered)).map(|(id, _)| (*peer, *id, Direction::Send)));
            due.extend(p.inc.iter().filter(|(_, t)| matches!(t.state, InState::Receiving { .. })).map(|(id, _)| (*peer, *id, Direction::Receive)));
        }
        for (peer, id, direction) in due {
            // Said in case the peer comes back after all.
            let reason = format!("the connection did not come back within {wait:?}");
            self.end(peer, id, Some(direction), TransferError::TimedOut(wait), Some(Control::Cancel { id, reason }));
        }
    }

    // ---- output ------------------------------------------------------------------------------

    /// Sends what can go now: control messages, then chunks, one per transfer in turn, until
    /// the channel refuses; asks for more chunks up to the read-ahead (transfers without a
    /// source). Call after every input.
    pub fn flush(&mut self, now: Instant, t: &mut dyn TransferTransport) {
        // Scratch lists kept between flushes (a flush runs every couple of chunks).
        let mut peers = std::mem::take(&mut self.scratch_peers);
        let mut ids = std::mem::take(&mut self.scratch_ids);
        peers.clear();
        peers.extend(self.peers.keys().copied());
        self.more = None;
        for &peer in &peers {
            self.zero_length(peer);
            let (read_ahead, interval) = (self.config.read_ahead, self.config.progress_interval);
            let Some(p) = self.peers.get_mut(&peer) else { continue };
            p.send_controls(peer, t);
            // Chunks, in turn.
            let mut unreadable = Vec::new();
            let mut progressed = true;
            let mut budget = CHUNKS_PER_FLUSH;
            while progressed && !p.blocked {
                if budget == 0 {
                    self.more = Some(now);
                    break;
                }
                progressed = false;
                ids.clear();
                ids.extend(p.out.range(p.last_served + 1..).chain(p.out.range(..=p.last_served)).map(|(id, _)| *id));
                for &id in &ids {
                    let out = p.out.get_mut(&id).expect("listed");
                    let OutState::Sending { next_send, ready, .. } = &mut out.state else { continue };
                    let index = *next_send;
                    if let std::collections::btree_map::Entry::Vacant(slot) = ready.entry(index) {
                        // Read from the source straight into the frame, now that it can go.
                        let Some(source) = out.source.as_mut() else { continue };
                        let offset = index * u64::from(out.offer.chunk);
                        let buf = std::mem::take(&mut self.spare);
                        match wire::chunk_frame_in(buf, id, index, out.offer.chunk_len(index), |buf| source.read_at(offset, buf)) {
                            Ok(frame) => {
                                slot.insert(frame);
                            }
                            Err(e) => {
                                unreadable.push((id, e));
                                continue;
                            }
                        }
                    }
                    match t.send_binary(peer, &ready[&index]) {
                        Ok(()) => {
                            let len = out.offer.chunk_len(index) as u64;
                            if let Some(frame) = ready.remove(&index) {
                                self.spare = frame;
                            }
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
                            budget -= 1;
                            if budget == 0 {
                                break;
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
                for (id, _) in &unreadable {
                    p.out.remove(id);
                }
            }
            // Reads ahead, for transfers the application serves.
            for (id, out) in &mut p.out {
                let OutState::Sending { next_read, next_send, requested, ready } = &mut out.state else { continue };
                if out.source.is_some() {
                    continue;
                }
                // Reads kept over an accept may have been answered and sent since: not again.
                *next_read = (*next_read).max(*next_send);
                // At most `read_ahead` chunks from the next one to send on.
                while *next_read < out.offer.chunks && *next_read < *next_send + read_ahead as u64 {
                    let index = *next_read;
                    *next_read += 1;
                    if requested.contains(&index) || ready.contains_key(&index) {
                        continue;
                    }
                    requested.insert(index);
                    let offset = index * u64::from(out.offer.chunk);
                    self.events.push_back(TransferEvent::Read { peer, id: *id, offset, len: out.offer.chunk_len(index) });
                }
            }
            if !unreadable.is_empty() {
                for (id, e) in unreadable {
                    let reason = format!("the sender could not read it: {e}");
                    p.control.push_back(Control::Cancel { id, reason });
                    self.events.push_back(TransferEvent::Failed { peer, id, direction: Direction::Send, error: TransferError::Storage(e.to_string()) });
                }
                p.send_controls(peer, t);
            }
        }
        self.scratch_peers = peers;
        self.scratch_ids = ids;
    }
}

#[cfg(test)]
mod tests;
