//! Fuzz target `xfer`: the `xfer/1` transfer protocol (`peerlink::transfer`) against a
//! reference model. A [`Setup`] and a sequence of [`Step`]s decoded from the fuzzer's bytes
//! drive one [`Transfers`] on a virtual clock. Two remote peers send arbitrary text, control
//! messages with arbitrary fields, consistent offers of generated content, chunk frames
//! (well-formed, with arbitrary ids, indices and payloads, or the right bytes of an offer)
//! and arbitrary binary; the local application offers (answering reads itself or through a
//! source that may fail), accepts (as events or into memory), rejects, cancels, provides
//! arbitrary bytes, serves reads, and the connection becomes writable, reconnects and is
//! flushed through a transport that refuses once its budget is spent. After every step:
//!
//! * nothing panicked and `poll_event` drained;
//! * text that is not a control message is one `BadMessage` with `Wire(Malformed)`, and so is
//!   binary that is not a chunk frame; every control message that decodes satisfies
//!   `decode(encode(c)) == c`, every chunk frame that decodes re-encodes to the same bytes
//!   (with the right CRC) — what the machine itself sends included;
//! * commands succeed or fail exactly as the model says (`Unknown`, `WrongState`, `TooMany`,
//!   `BadOffer`, `TooLarge`), and a control message has exactly the documented outcome;
//! * `Read`: only for an accepted transfer without a source, chunk-aligned, the chunk's
//!   length, within the offered size and the read-ahead window, never for a chunk sent or
//!   answered already, never more than `read_ahead` outstanding per transfer; a correct
//!   answer to an outstanding read is always taken, even after a refused one;
//! * chunk frames sent: in order from where the receiver said, within the offer, each one
//!   provided (or read from the source) and carrying the content, never to a peer whose
//!   channel refused (until `handle_writable`/`handle_reconnected`);
//! * `Write`: only for a live transfer accepted as events, contiguous from 0, within the size;
//! * `Completed` at most once per transfer and nothing after it or `Failed`; a receiver's
//!   only when the bytes written (or handed over from memory) hash to the offer's SHA-256, a
//!   sender's only on its peer's `verified` after every chunk went; `HashMismatch` on receive
//!   only when they do not; progress finite and within the total; after `handle_timeout(now)`
//!   the next deadline is later than now.
//!
//! At the end, with the channel writable and every read answered, every accepted transfer
//! within reach sends its last chunk, every `verified` owed goes out, and once every peer is
//! lost for the reconnect timeout every transfer under way has timed out.
//!
//! This file is also the harness: `tests/sim/fuzz_replay.rs` includes it as a module to
//! replay `fuzz/corpus/xfer/` under `cargo test` (`cfg(test)` tells the two apart). Like
//! `node_inputs`, the steps are decoded by hand (`../bytes.rs`) rather than with `arbitrary`,
//! which the tests crate does not depend on; [`encode_input`] writes them back, for seeds.

#![cfg_attr(not(test), no_main)]
#![allow(dead_code, reason = "the fuzz target and the replay test each use a part")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use peerlink::SendError;
use peerlink::identity::Fingerprint;
use peerlink::transfer::wire::{self, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use peerlink::transfer::{
    Control, Direction, FileInfo, Offer, SourceFn, TransferConfig, TransferError, TransferEvent, TransferKind, TransferTransport, TransferWireError,
    Transfers,
};
use sha2::{Digest, Sha256};

#[path = "../bytes.rs"]
#[allow(clippy::duplicate_mod, reason = "a crate root of its own in the fuzz build; the replay test includes both targets")]
mod bytes;
use bytes::{Reader, Writer};

#[cfg(not(test))]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = xfer(data);
});

/// Most steps taken from one input.
pub const MAX_STEPS: usize = 128;
/// The remote peers; a step's `peer` is taken modulo their number.
const PEERS: [Fingerprint; 2] = [Fingerprint::from_bytes([0xa1; 32]), Fingerprint::from_bytes([0xb2; 32])];
const MAX_TEXT: usize = 2048;
const MAX_FRAME: usize = 4200;
/// Largest consistent offer (its content is generated and hashed whole).
const MAX_REMOTE_SIZE: u64 = 64 * 1024;
const REMOTE_CHUNKS: [u32; 5] = [MIN_CHUNK_SIZE, 1500, 4096, 64 * 1024, MAX_CHUNK_SIZE];
const LOCAL_CHUNKS: [u32; 3] = [MIN_CHUNK_SIZE, 1500, 4096];
const KINDS: [TransferKind; 3] = [TransferKind::File, TransferKind::Json, TransferKind::Image];
const MAX_ADVANCE_MS: u64 = u32::MAX as u64;
const MAX_PROVIDE: u64 = 300_000;
/// Payload bytes one `Chunks` step may send.
const MAX_CHUNKS_BYTES: usize = 1 << 20;
const MAX_EVENTS: usize = 100_000;
/// At the end, accepted transfers with at most this many chunks left must send them all.
const LIVENESS_CHUNKS: u64 = 64;
/// Chunk frames the transport takes per flush at the end.
const LIVENESS_BUDGET: usize = 512;
/// A chunk frame's header: magic, id (u64), index (u64), CRC-32 (u32); see `docs/PROTOCOL.md`.
const HEADER: usize = 1 + 8 + 8 + 4;

// ---- input ------------------------------------------------------------------------------

/// The configuration, from the input's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// `read_ahead` is `1 + read_ahead % 16`.
    pub read_ahead: u8,
    /// `max_transfers` is `1 + max_transfers % 8`.
    pub max_transfers: u8,
    /// Local chunk size: [`LOCAL_CHUNKS`]`[chunk % 3]`.
    pub chunk: u8,
    /// Bit 0: `max_size` is `u64::MAX`; bit 1: no JSON is accepted without asking; bit 2:
    /// `max_memory` is 8 KiB.
    pub flags: u8,
}

/// One input. Peers are `peer % 2`; ids, sizes, offsets and indices are LEB128.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Moves the clock forward (at most [`MAX_ADVANCE_MS`]).
    Advance { ms: u64 },
    /// `handle_text` with these bytes (lossy UTF-8).
    Text { peer: u8, text: Vec<u8> },
    /// `handle_text` with a control message of arbitrary field values.
    Control { peer: u8, control: Control },
    /// An offer that adds up, of content generated from `seed` (a JSON string when `seed` is
    /// even), `size % (MAX_REMOTE_SIZE + 1)` bytes in chunks of `REMOTE_CHUNKS[chunk % 5]`;
    /// `hash % 4`: 1 its SHA-256 in upper case, 2 a wrong one, else the right one.
    Offer { peer: u8, id: u64, size: u64, chunk: u8, kind: u8, seed: u8, hash: u8 },
    /// `handle_binary` with `encode_chunk(id, index, payload)`.
    Chunk { peer: u8, id: u64, index: u64, payload: Vec<u8> },
    /// `count` chunk frames of transfer `id` with the right bytes (zeros if the content is
    /// unknown), from chunk `at - 1`, or from the one due when `at` is 0; `flip` changes the
    /// first byte (the CRC is computed after: only the SHA-256 can tell).
    Chunks { peer: u8, id: u64, at: u64, count: u8, flip: bool },
    /// `handle_binary` with these bytes.
    Frame { peer: u8, bytes: Vec<u8> },
    /// The application offers `size` bytes; names `name % 4` are valid, empty, a path, too
    /// long; `source` 0: reads as events, 1: a source, n: a source failing from chunk n - 2.
    Send { peer: u8, size: u64, name: u8, source: u8 },
    /// `accept`, or `accept_to_memory`.
    Accept { peer: u8, id: u64, memory: bool },
    Reject { peer: u8, id: u64 },
    Cancel { peer: u8, id: u64 },
    /// Answers `count` outstanding reads (all if 0) with the right bytes, from the `skip`-th.
    Serve { count: u8, skip: u8 },
    /// `provide` with arbitrary offset and length: the right bytes if `fill` is 0, else `fill`.
    Provide { peer: u8, id: u64, offset: u64, len: u64, fill: u8 },
    Writable { peer: u8 },
    Reconnected { peer: u8 },
    /// `handle_disconnected(now)`: the connection to the peer is lost.
    Disconnected { peer: u8 },
    /// `flush` through a transport that takes `texts` texts and `chunks` frames, then refuses
    /// with `WouldBlock` (or `ChannelNotOpen` if `error`).
    Flush { texts: u8, chunks: u8, error: bool },
    /// `handle_timeout(now)`.
    Timeout,
}

/// A decoded input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    pub setup: Setup,
    pub steps: Vec<Step>,
}

fn text(r: &mut Reader<'_>) -> String {
    String::from_utf8_lossy(&r.blob(MAX_TEXT)).into_owned()
}

fn kind_index(kind: TransferKind) -> u8 {
    KINDS.iter().position(|k| *k == kind).expect("known kind") as u8
}

fn decode_control(r: &mut Reader<'_>) -> Control {
    match r.u8() % 6 {
        0 => Control::Offer(Offer {
            id: r.var(),
            name: text(r),
            size: r.var(),
            mime: text(r),
            kind: KINDS[usize::from(r.u8() % 3)],
            chunk: r.var() as u32,
            chunks: r.var(),
            sha256: text(r),
        }),
        1 => Control::Accept { id: r.var(), from: r.var() },
        2 => Control::Reject { id: r.var(), reason: text(r) },
        3 => Control::Cancel { id: r.var(), reason: text(r) },
        4 => Control::Verified { id: r.var() },
        _ => Control::Corrupt { id: r.var(), reason: text(r) },
    }
}

fn encode_control(c: &Control, w: &mut Writer) {
    match c {
        Control::Offer(o) => {
            w.u8(0);
            w.var(o.id);
            w.blob(o.name.as_bytes());
            w.var(o.size);
            w.blob(o.mime.as_bytes());
            w.u8(kind_index(o.kind));
            w.var(u64::from(o.chunk));
            w.var(o.chunks);
            w.blob(o.sha256.as_bytes());
        }
        Control::Accept { id, from } => {
            w.u8(1);
            w.var(*id);
            w.var(*from);
        }
        Control::Reject { id, reason } => {
            w.u8(2);
            w.var(*id);
            w.blob(reason.as_bytes());
        }
        Control::Cancel { id, reason } => {
            w.u8(3);
            w.var(*id);
            w.blob(reason.as_bytes());
        }
        Control::Verified { id } => {
            w.u8(4);
            w.var(*id);
        }
        Control::Corrupt { id, reason } => {
            w.u8(5);
            w.var(*id);
            w.blob(reason.as_bytes());
        }
    }
}

impl Step {
    fn decode(r: &mut Reader<'_>) -> Step {
        match r.u8() % 17 {
            0 => Step::Advance { ms: r.var() },
            1 => Step::Text { peer: r.u8(), text: r.blob(MAX_TEXT) },
            2 => Step::Control { peer: r.u8(), control: decode_control(r) },
            3 => Step::Offer { peer: r.u8(), id: r.var(), size: r.var(), chunk: r.u8(), kind: r.u8(), seed: r.u8(), hash: r.u8() },
            4 => Step::Chunk { peer: r.u8(), id: r.var(), index: r.var(), payload: r.blob(MAX_FRAME) },
            5 => Step::Chunks { peer: r.u8(), id: r.var(), at: r.var(), count: r.u8(), flip: r.bool() },
            6 => Step::Frame { peer: r.u8(), bytes: r.blob(MAX_FRAME) },
            7 => Step::Send { peer: r.u8(), size: r.var(), name: r.u8(), source: r.u8() },
            8 => Step::Accept { peer: r.u8(), id: r.var(), memory: r.bool() },
            9 => Step::Reject { peer: r.u8(), id: r.var() },
            10 => Step::Cancel { peer: r.u8(), id: r.var() },
            11 => Step::Serve { count: r.u8(), skip: r.u8() },
            12 => Step::Provide { peer: r.u8(), id: r.var(), offset: r.var(), len: r.var(), fill: r.u8() },
            13 => Step::Writable { peer: r.u8() },
            14 => Step::Reconnected { peer: r.u8() },
            15 => Step::Flush { texts: r.u8(), chunks: r.u8(), error: r.bool() },
            17 => Step::Disconnected { peer: r.u8() },
            _ => Step::Timeout,
        }
    }

    fn encode(&self, w: &mut Writer) {
        match self {
            Step::Advance { ms } => {
                w.u8(0);
                w.var(*ms);
            }
            Step::Text { peer, text } => {
                w.u8(1);
                w.u8(*peer);
                w.blob(text);
            }
            Step::Control { peer, control } => {
                w.u8(2);
                w.u8(*peer);
                encode_control(control, w);
            }
            Step::Offer { peer, id, size, chunk, kind, seed, hash } => {
                w.u8(3);
                w.u8(*peer);
                w.var(*id);
                w.var(*size);
                w.u8(*chunk);
                w.u8(*kind);
                w.u8(*seed);
                w.u8(*hash);
            }
            Step::Chunk { peer, id, index, payload } => {
                w.u8(4);
                w.u8(*peer);
                w.var(*id);
                w.var(*index);
                w.blob(payload);
            }
            Step::Chunks { peer, id, at, count, flip } => {
                w.u8(5);
                w.u8(*peer);
                w.var(*id);
                w.var(*at);
                w.u8(*count);
                w.bool(*flip);
            }
            Step::Frame { peer, bytes } => {
                w.u8(6);
                w.u8(*peer);
                w.blob(bytes);
            }
            Step::Send { peer, size, name, source } => {
                w.u8(7);
                w.u8(*peer);
                w.var(*size);
                w.u8(*name);
                w.u8(*source);
            }
            Step::Accept { peer, id, memory } => {
                w.u8(8);
                w.u8(*peer);
                w.var(*id);
                w.bool(*memory);
            }
            Step::Reject { peer, id } => {
                w.u8(9);
                w.u8(*peer);
                w.var(*id);
            }
            Step::Cancel { peer, id } => {
                w.u8(10);
                w.u8(*peer);
                w.var(*id);
            }
            Step::Serve { count, skip } => {
                w.u8(11);
                w.u8(*count);
                w.u8(*skip);
            }
            Step::Provide { peer, id, offset, len, fill } => {
                w.u8(12);
                w.u8(*peer);
                w.var(*id);
                w.var(*offset);
                w.var(*len);
                w.u8(*fill);
            }
            Step::Writable { peer } => {
                w.u8(13);
                w.u8(*peer);
            }
            Step::Reconnected { peer } => {
                w.u8(14);
                w.u8(*peer);
            }
            Step::Flush { texts, chunks, error } => {
                w.u8(15);
                w.u8(*texts);
                w.u8(*chunks);
                w.bool(*error);
            }
            Step::Timeout => w.u8(16),
            Step::Disconnected { peer } => {
                w.u8(17);
                w.u8(*peer);
            }
        }
    }
}

/// Decodes the setup and up to [`MAX_STEPS`] steps from `data`.
pub fn decode_input(data: &[u8]) -> Input {
    let mut r = Reader(data);
    let setup = Setup { read_ahead: r.u8(), max_transfers: r.u8(), chunk: r.u8(), flags: r.u8() };
    let mut steps = Vec::new();
    while steps.len() < MAX_STEPS && !r.is_empty() {
        steps.push(Step::decode(&mut r));
    }
    Input { setup, steps }
}

/// Encodes an input as [`decode_input`] reads it (for hand-written seeds).
pub fn encode_input(input: &Input) -> Vec<u8> {
    let s = input.setup;
    let mut w = Writer(vec![s.read_ahead, s.max_transfers, s.chunk, s.flags]);
    for step in &input.steps {
        step.encode(&mut w);
    }
    w.0
}

impl Setup {
    fn config(&self) -> TransferConfig {
        let mut c = TransferConfig::default();
        c.read_ahead = 1 + usize::from(self.read_ahead % 16);
        c.max_transfers = 1 + usize::from(self.max_transfers % 8);
        c.chunk_size = LOCAL_CHUNKS[usize::from(self.chunk % 3)];
        if self.flags & 1 != 0 {
            c.max_size = u64::MAX;
        }
        if self.flags & 2 != 0 {
            c.auto_accept_json = 0;
        }
        if self.flags & 4 != 0 {
            c.max_memory = 8 * 1024;
        }
        c
    }
}

// ---- content ------------------------------------------------------------------------------

/// Generated content, readable at any offset: position-dependent bytes from `seed`, or a JSON
/// string (`"aaa…"`) `size` bytes long.
#[derive(Debug, Clone, Copy)]
struct Content {
    seed: u8,
    json: bool,
    size: u64,
}

impl Content {
    fn byte(&self, i: u64) -> u8 {
        if self.json {
            if i == 0 || i.checked_add(1) == Some(self.size) { b'"' } else { b'a' + (i % 26) as u8 }
        } else {
            (i as u8).wrapping_mul(31) ^ (i >> 8) as u8 ^ self.seed
        }
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        (0..len as u64).map(|i| self.byte(offset.wrapping_add(i))).collect()
    }
}

/// What the application sends as transfer `id`.
fn local_content(id: u64, size: u64) -> Content {
    Content { seed: id as u8, json: false, size }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex digits are hex digits in either case.
fn same_hash(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn local_name(sel: u8) -> String {
    match sel % 4 {
        0 => "f.bin".into(),
        1 => String::new(),
        2 => "dir/f.bin".into(),
        _ => "n".repeat(256),
    }
}

fn peer_index(peer: &Fingerprint) -> usize {
    PEERS.iter().position(|p| p == peer).unwrap_or_else(|| panic!("event for a peer that never spoke: {peer}"))
}

fn check_control_round_trip(c: &Control) {
    let text = c.encode();
    let back = Control::decode(&text).unwrap_or_else(|e| panic!("{c:?} encoded as {text:?} does not decode: {e}"));
    assert_eq!(&back, c, "{text:?} does not decode to what encoded it");
}

fn check_chunk_round_trip(frame: &[u8], c: &wire::Chunk<'_>) {
    let again = wire::encode_chunk(c.id, c.index, c.payload);
    if c.crc_ok {
        assert_eq!(again, frame, "chunk frame does not re-encode to its bytes");
    } else {
        // Only the CRC differs: re-encoding computes the right one.
        assert_eq!(again.len(), frame.len(), "chunk frame re-encodes to another length");
        assert_eq!(again[..HEADER - 4], frame[..HEADER - 4], "chunk header does not re-encode");
        assert_eq!(again[HEADER..], frame[HEADER..], "chunk payload does not re-encode");
        assert_ne!(again[HEADER - 4..HEADER], frame[HEADER - 4..HEADER], "a frame with a bad CRC-32 re-encodes with the same CRC-32");
    }
}

// ---- the transport --------------------------------------------------------------------------

/// Takes `texts` texts and `chunks` frames, then refuses.
struct Wire {
    texts: usize,
    chunks: usize,
    error: bool,
    sent_texts: Vec<(Fingerprint, String)>,
    sent_frames: Vec<(Fingerprint, Vec<u8>)>,
    /// Every `send_binary`, taken or not.
    attempts: Vec<Fingerprint>,
    refused: Vec<Fingerprint>,
}

impl Wire {
    fn new(texts: usize, chunks: usize, error: bool) -> Self {
        Wire { texts, chunks, error, sent_texts: Vec::new(), sent_frames: Vec::new(), attempts: Vec::new(), refused: Vec::new() }
    }

    fn refusal(&self) -> SendError {
        if self.error { SendError::ChannelNotOpen("peerlink-transfer".into()) } else { SendError::WouldBlock { buffered: 1 << 20 } }
    }
}

impl TransferTransport for Wire {
    fn send_text(&mut self, peer: Fingerprint, text: &str) -> Result<(), SendError> {
        if self.texts == 0 {
            return Err(self.refusal());
        }
        self.texts -= 1;
        self.sent_texts.push((peer, text.to_owned()));
        Ok(())
    }

    fn send_binary(&mut self, peer: Fingerprint, frame: &[u8]) -> Result<(), SendError> {
        self.attempts.push(peer);
        if self.chunks == 0 {
            self.refused.push(peer);
            return Err(self.refusal());
        }
        self.chunks -= 1;
        self.sent_frames.push((peer, frame.to_vec()));
        Ok(())
    }
}

// ---- the model ------------------------------------------------------------------------------

/// Where a sent transfer stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not accepted yet.
    Offered,
    /// Accepted; this chunk goes next.
    Sending(u64),
    /// Every chunk sent; waiting for `verified`.
    Sent,
    /// Reconnected: waiting for the receiver's `accept`.
    Resuming,
}

struct Out {
    offer: Offer,
    phase: Phase,
    /// Chunks asked for with `Read` and not answered.
    reads: BTreeSet<u64>,
    /// Chunks answered since the last accept and not sent yet.
    answered: BTreeSet<u64>,
    /// Has a source: no reads.
    source: bool,
    /// Bytes other than the content were provided: frames need not carry the content.
    tainted: bool,
}

impl Out {
    /// An answer to the read of chunk `index` was taken: held until sent if it is still due.
    fn took(&mut self, index: u64) {
        self.reads.remove(&index);
        if matches!(self.phase, Phase::Sending(next) if index >= next) {
            self.answered.insert(index);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InSink {
    Events,
    Memory { json: bool },
}

struct In {
    offer: Offer,
    /// `None` until accepted.
    sink: Option<InSink>,
    /// Bytes handed out as `Write` (all of them, in order).
    written: u64,
    hasher: Sha256,
    /// The content came as `Received` or `Json`.
    handed_over: bool,
}

impl In {
    fn new(offer: Offer, sink: Option<InSink>) -> Self {
        In { offer, sink, written: 0, hasher: Sha256::new(), handed_over: false }
    }
}

/// What caused the events being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Text(usize),
    Binary(usize),
    Command,
    Flush,
    Timeout,
}

/// What one [`xfer`] run reached, so tests can check that seeds get somewhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub offered: usize,
    pub accepts: usize,
    pub resumes: usize,
    pub reads: usize,
    pub writes: usize,
    pub chunks_sent: usize,
    pub completed_send: usize,
    pub completed_receive: usize,
    pub handed_over: usize,
    pub failed: usize,
    pub timed_out: usize,
    pub bad_messages: usize,
    pub refusals: usize,
}

struct Harness {
    t: Transfers,
    config: TransferConfig,
    now: Instant,
    out: BTreeMap<(usize, u64), Out>,
    inc: BTreeMap<(usize, u64), In>,
    /// The content of the consistent offers each peer made, by id.
    remote: BTreeMap<(usize, u64), (Offer, Content)>,
    /// The channel refused a chunk and was not declared writable since.
    blocked: [bool; PEERS.len()],
    next_id: u64,
    completed_receive: BTreeSet<(usize, u64)>,
    verified_sent: BTreeSet<(usize, u64)>,
    summary: Summary,
}

/// The virtual clock's origin. The only clock read: `Transfers` measures differences, so the
/// runs do not depend on it.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

impl Harness {
    fn new(setup: Setup) -> Self {
        let config = setup.config();
        Harness {
            t: Transfers::new(config.clone()),
            config,
            now: base(),
            out: BTreeMap::new(),
            inc: BTreeMap::new(),
            remote: BTreeMap::new(),
            blocked: [false; PEERS.len()],
            next_id: 1,
            completed_receive: BTreeSet::new(),
            verified_sent: BTreeSet::new(),
            summary: Summary::default(),
        }
    }

    fn count(&self, p: usize) -> usize {
        self.out.keys().chain(self.inc.keys()).filter(|(q, _)| *q == p).count()
    }

    fn step(&mut self, step: &Step) {
        let peer = |p: &u8| usize::from(*p) % PEERS.len();
        match step {
            Step::Advance { ms } => self.now += Duration::from_millis((*ms).min(MAX_ADVANCE_MS)),
            Step::Text { peer: p, text } => self.text(peer(p), &String::from_utf8_lossy(text)),
            Step::Control { peer: p, control } => self.text(peer(p), &control.encode()),
            Step::Offer { peer: p, id, size, chunk, kind, seed, hash } => self.remote_offer(peer(p), *id, *size, *chunk, *kind, *seed, *hash),
            Step::Chunk { peer: p, id, index, payload } => self.binary(peer(p), &wire::encode_chunk(*id, *index, payload)),
            Step::Chunks { peer: p, id, at, count, flip } => self.chunks(peer(p), *id, *at, *count, *flip),
            Step::Frame { peer: p, bytes } => self.binary(peer(p), bytes),
            Step::Send { peer: p, size, name, source } => self.send(peer(p), *size, *name, *source),
            Step::Accept { peer: p, id, memory } => self.accept(peer(p), *id, *memory),
            Step::Reject { peer: p, id } => self.reject(peer(p), *id),
            Step::Cancel { peer: p, id } => self.cancel(peer(p), *id),
            Step::Serve { count, skip } => {
                self.serve(usize::from(*count), usize::from(*skip));
            }
            Step::Provide { peer: p, id, offset, len, fill } => self.provide(peer(p), *id, *offset, *len, *fill),
            Step::Writable { peer: p } => {
                self.t.handle_writable(PEERS[peer(p)]);
                self.blocked[peer(p)] = false;
                let events = self.drain(Cause::Command);
                assert!(events.is_empty(), "handle_writable: {events:?}");
            }
            Step::Reconnected { peer: p } => self.reconnected(peer(p)),
            Step::Flush { texts, chunks, error } => self.flush(usize::from(*texts), usize::from(*chunks), *error),
            Step::Timeout => self.timeout(),
            Step::Disconnected { peer: p } => {
                self.t.handle_disconnected(self.now, PEERS[peer(p)]);
                let events = self.drain(Cause::Command);
                assert!(events.is_empty(), "disconnected: {events:?}");
            }
        }
    }

    /// Drains `poll_event` (it must terminate) and checks every event.
    fn drain(&mut self, cause: Cause) -> Vec<TransferEvent> {
        let mut events = Vec::new();
        while let Some(e) = self.t.poll_event() {
            assert!(events.len() < MAX_EVENTS, "poll_event does not drain");
            events.push(e);
        }
        for e in &events {
            self.check_event(e, cause);
        }
        events
    }

    fn check_event(&mut self, e: &TransferEvent, cause: Cause) {
        let read_ahead = self.config.read_ahead;
        match e {
            TransferEvent::Offered { peer, offer } => {
                let p = peer_index(peer);
                assert_eq!(cause, Cause::Text(p), "offer {} reported outside a message from its peer", offer.id);
                assert_eq!(offer.validate(self.config.max_size), Ok(()), "an invalid offer was reported: {offer:?}");
                let fresh = self.inc.insert((p, offer.id), In::new(offer.clone(), None)).is_none();
                assert!(fresh, "offer {} reported while a transfer with that id is under way", offer.id);
                self.summary.offered += 1;
            }
            TransferEvent::Read { peer, id, offset, len } => {
                let p = peer_index(peer);
                assert_eq!(cause, Cause::Flush, "read of {id} outside flush");
                let out = self.out.get_mut(&(p, *id)).unwrap_or_else(|| panic!("read for transfer {id}, which is not under way"));
                assert!(!out.source, "read for transfer {id}, which has a source");
                let Phase::Sending(next_send) = out.phase else { panic!("read for transfer {id} while {:?}", out.phase) };
                let chunk = u64::from(out.offer.chunk);
                assert_eq!(offset % chunk, 0, "read of {id} at {offset}, not a multiple of the chunk size {chunk}");
                let index = offset / chunk;
                assert!(index < out.offer.chunks, "read of chunk {index} of {id}, which has {} chunks", out.offer.chunks);
                assert_eq!(*len, out.offer.chunk_len(index), "read of {len} bytes for chunk {index} of {id}");
                let end = offset.checked_add(*len as u64);
                assert!(end.is_some_and(|end| end <= out.offer.size), "read of {id} past its size {}", out.offer.size);
                assert!(index < next_send + read_ahead as u64, "read of chunk {index} of {id} beyond the read-ahead from chunk {next_send}");
                assert!(index >= next_send, "read of chunk {index} of {id}, sent already (next: {next_send})");
                assert!(!out.answered.contains(&index), "read of chunk {index} of {id}, answered already");
                assert!(out.reads.insert(index), "chunk {index} of {id} asked for while a read of it is outstanding");
                let outstanding = out.reads.len();
                assert!(outstanding <= read_ahead, "{outstanding} reads of {id} outstanding, read-ahead {read_ahead}");
                self.summary.reads += 1;
            }
            TransferEvent::Write { peer, id, offset, data } => {
                let p = peer_index(peer);
                assert_eq!(cause, Cause::Binary(p), "write of {id} not on a chunk from its peer");
                let t = self.inc.get_mut(&(p, *id)).unwrap_or_else(|| panic!("write for transfer {id}, which is not under way"));
                assert_eq!(t.sink, Some(InSink::Events), "write for transfer {id}, not accepted as events");
                assert_eq!(*offset, t.written, "write of {id} at {offset} after {} bytes: not contiguous", t.written);
                let end = t.written.checked_add(data.len() as u64);
                assert!(end.is_some_and(|end| end <= t.offer.size), "write of {id} past its size {}", t.offer.size);
                t.hasher.update(data);
                t.written += data.len() as u64;
                self.summary.writes += 1;
            }
            TransferEvent::Progress { peer, id, direction, progress } => {
                let p = peer_index(peer);
                let total = match direction {
                    Direction::Send => self.out.get(&(p, *id)).map(|t| t.offer.size),
                    Direction::Receive => self.inc.get(&(p, *id)).map(|t| t.offer.size),
                };
                let total = total.unwrap_or_else(|| panic!("progress of {id} ({direction:?}), which is not under way"));
                assert_eq!(progress.total, total, "progress of {id}: wrong total");
                assert!(progress.bytes <= total, "progress of {id}: {} of {total} bytes", progress.bytes);
                assert!((0.0..=100.0).contains(&progress.percent), "progress of {id}: {}%", progress.percent);
                assert!(progress.bytes_per_sec.is_finite() && progress.bytes_per_sec >= 0.0, "progress of {id}: {} B/s", progress.bytes_per_sec);
            }
            TransferEvent::Received { peer, id, data } => {
                let p = peer_index(peer);
                let t = self.inc.get_mut(&(p, *id)).unwrap_or_else(|| panic!("content of {id}, which is not under way"));
                assert_eq!(t.sink, Some(InSink::Memory { json: false }), "content of {id}, not accepted into memory");
                assert!(!t.handed_over, "content of {id} handed over twice");
                assert_eq!(data.len() as u64, t.offer.size, "content of {id}: wrong length");
                let got = hex(&Sha256::digest(data));
                assert!(same_hash(&got, &t.offer.sha256), "content of {id} hashes to {got}, the offer says {}", t.offer.sha256);
                t.handed_over = true;
                self.summary.handed_over += 1;
            }
            TransferEvent::Json { peer, id, .. } => {
                let p = peer_index(peer);
                let t = self.inc.get_mut(&(p, *id)).unwrap_or_else(|| panic!("JSON of {id}, which is not under way"));
                assert_eq!(t.sink, Some(InSink::Memory { json: true }), "JSON of {id}, not received as JSON");
                assert!(!t.handed_over, "JSON of {id} handed over twice");
                t.handed_over = true;
                self.summary.handed_over += 1;
            }
            TransferEvent::Completed { peer, id, direction: Direction::Send } => {
                let p = peer_index(peer);
                assert_eq!(cause, Cause::Text(p), "sending {id} completed, not on its peer's `verified`");
                let t = self.out.remove(&(p, *id)).unwrap_or_else(|| panic!("sending {id} completed but not under way"));
                assert!(matches!(t.phase, Phase::Sent | Phase::Resuming), "sending {id} completed while {:?}", t.phase);
                self.summary.completed_send += 1;
            }
            TransferEvent::Completed { peer, id, direction: Direction::Receive } => {
                let p = peer_index(peer);
                assert!(cause == Cause::Binary(p) || cause == Cause::Flush, "receiving {id} completed on {cause:?}");
                let t = self.inc.remove(&(p, *id)).unwrap_or_else(|| panic!("receiving {id} completed but not under way"));
                match t.sink {
                    Some(InSink::Events) => {
                        assert_eq!(t.written, t.offer.size, "receiving {id} completed with {} of {} bytes written", t.written, t.offer.size);
                        let got = hex(&t.hasher.finalize());
                        assert!(same_hash(&got, &t.offer.sha256), "receiving {id} completed; its bytes hash to {got}, the offer says {}", t.offer.sha256);
                    }
                    Some(InSink::Memory { .. }) => assert!(t.handed_over, "receiving {id} into memory completed without its content"),
                    None => panic!("receiving {id} completed without being accepted"),
                }
                self.completed_receive.insert((p, *id));
                self.summary.completed_receive += 1;
            }
            TransferEvent::Failed { peer, id, direction, error } => {
                let p = peer_index(peer);
                let timed_out = matches!(error, TransferError::TimedOut(_));
                assert_eq!(timed_out, cause == Cause::Timeout, "{id} failed with {error:?} on {cause:?}");
                match direction {
                    Direction::Send => {
                        let t = self.out.remove(&(p, *id)).unwrap_or_else(|| panic!("sending {id} failed ({error}) but not under way"));
                        match error {
                            TransferError::Rejected(_) => {
                                assert_eq!(cause, Cause::Text(p), "sending {id} rejected on {cause:?}");
                                assert_eq!(t.phase, Phase::Offered, "sending {id} rejected after it was accepted");
                            }
                            TransferError::Storage(_) => assert!(t.source && cause == Cause::Flush, "sending {id}: {error} on {cause:?}"),
                            TransferError::HashMismatch => assert_eq!(cause, Cause::Text(p), "sending {id}: {error} on {cause:?}"),
                            TransferError::Cancelled(_) | TransferError::TimedOut(_) => {}
                            e => panic!("sending {id} failed with {e:?}"),
                        }
                    }
                    Direction::Receive => {
                        let t = self.inc.remove(&(p, *id)).unwrap_or_else(|| panic!("receiving {id} failed ({error}) but not under way"));
                        match error {
                            TransferError::HashMismatch => {
                                assert!(cause == Cause::Binary(p) || cause == Cause::Flush, "receiving {id}: {error} on {cause:?}");
                                if t.sink == Some(InSink::Events) {
                                    assert_eq!(t.written, t.offer.size, "receiving {id}: {error} before every byte was written");
                                    let got = hex(&t.hasher.finalize());
                                    assert!(!same_hash(&got, &t.offer.sha256), "receiving {id}: {error}, but its bytes hash to {got} as offered ({})", t.offer.sha256);
                                }
                            }
                            TransferError::OutOfOrder { expected, .. } => {
                                assert_eq!(cause, Cause::Binary(p), "receiving {id}: {error} on {cause:?}");
                                if t.sink == Some(InSink::Events) {
                                    let due = expected.checked_mul(u64::from(t.offer.chunk));
                                    assert_eq!(due, Some(t.written), "receiving {id}: {error} after {} bytes", t.written);
                                }
                            }
                            TransferError::BadChunk(_) | TransferError::CorruptChunk(_) => {
                                assert_eq!(cause, Cause::Binary(p), "receiving {id}: {error} on {cause:?}");
                            }
                            TransferError::BadJson(_) => assert_eq!(t.sink, Some(InSink::Memory { json: true }), "receiving {id}: {error}"),
                            TransferError::Cancelled(_) | TransferError::TimedOut(_) => {}
                            e => panic!("receiving {id} failed with {e:?}"),
                        }
                    }
                }
                self.summary.failed += 1;
                self.summary.timed_out += usize::from(timed_out);
            }
            TransferEvent::BadMessage { peer, .. } => {
                let p = peer_index(peer);
                assert!(cause == Cause::Text(p) || cause == Cause::Binary(p), "bad message from {p} on {cause:?}: {e:?}");
                self.summary.bad_messages += 1;
            }
            other => panic!("an event the model does not know: {other:?}"),
        }
    }

    // ---- from the peer ----------------------------------------------------------------------

    fn text(&mut self, p: usize, text: &str) {
        let decoded = Control::decode(text);
        if let Ok(c) = &decoded {
            check_control_round_trip(c);
        }
        // What the model holds before, to know what the message must do.
        let out = decoded.as_ref().ok().and_then(|c| self.out.get(&(p, control_id(c)))).map(|t| (t.phase, t.offer.chunks));
        let inc = decoded.as_ref().ok().and_then(|c| self.inc.get(&(p, control_id(c)))).map(|t| t.offer.clone());
        let count = self.count(p);
        self.t.handle_text(self.now, PEERS[p], text);
        let events = self.drain(Cause::Text(p));
        let bad = |f: &dyn Fn(&TransferError) -> bool| matches!(&events[..], [TransferEvent::BadMessage { error, .. }] if f(error));
        let failed = |d: Direction| matches!(&events[..], [TransferEvent::Failed { direction, .. }] if *direction == d);
        let Ok(c) = decoded else {
            assert!(bad(&|e| matches!(e, TransferError::Wire(TransferWireError::Malformed(_)))), "undecodable text {text:?}: {events:?}");
            return;
        };
        match c {
            Control::Offer(offer) => {
                let auto_json = self.config.auto_accept_json.min(self.config.max_memory);
                if offer.validate(self.config.max_size).is_err() {
                    assert!(bad(&|e| matches!(e, TransferError::Wire(TransferWireError::BadOffer(_)))), "invalid offer {offer:?}: {events:?}");
                } else if let Some(live) = inc {
                    let same = live == offer;
                    let duplicate = bad(&|e| *e == TransferError::DuplicateId(offer.id));
                    assert!(if same { events.is_empty() } else { duplicate }, "offer of {} again (same: {same}): {events:?}", offer.id);
                } else if out.is_some() {
                    // The id of this side's own transfer to the peer: refused (and rejected).
                    assert!(bad(&|e| *e == TransferError::DuplicateId(offer.id)), "offer reusing this side's id {}: {events:?}", offer.id);
                } else if count >= self.config.max_transfers {
                    assert!(events.is_empty(), "offer over max_transfers: {events:?}");
                } else if offer.kind == TransferKind::Json && offer.size <= auto_json {
                    assert!(events.is_empty(), "JSON offer taken without asking: {events:?}");
                    self.inc.insert((p, offer.id), In::new(offer, Some(InSink::Memory { json: true })));
                    self.summary.accepts += 1;
                } else {
                    assert!(matches!(&events[..], [TransferEvent::Offered { .. }]), "offer {offer:?}: {events:?}");
                }
            }
            Control::Accept { id, from } => match out {
                None => assert!(bad(&|e| *e == TransferError::Unknown(id)), "accept of unknown {id}: {events:?}"),
                Some((_, chunks)) if from > chunks => assert!(bad(&|e| *e == TransferError::BadChunk(from)), "accept of {id} from {from} of {chunks}: {events:?}"),
                Some((_, chunks)) => {
                    assert!(events.is_empty(), "accept of {id}: {events:?}");
                    // Outstanding reads outside the read-ahead from `from` are dropped.
                    let read_ahead = self.config.read_ahead as u64;
                    let t = self.out.get_mut(&(p, id)).expect("under way");
                    t.phase = if from == chunks { Phase::Sent } else { Phase::Sending(from) };
                    t.reads.retain(|i| from < chunks && (from..from + read_ahead).contains(i));
                    t.answered.clear();
                    self.summary.accepts += 1;
                    self.summary.resumes += usize::from(from > 0);
                }
            },
            Control::Reject { id, .. } => match out {
                Some((Phase::Offered, _)) => assert!(failed(Direction::Send), "reject of {id}: {events:?}"),
                Some(_) => assert!(bad(&|e| matches!(e, TransferError::WrongState(_))), "reject of {id} after accept: {events:?}"),
                // It crossed with this side's cancel.
                None => assert!(events.is_empty(), "reject of unknown {id}: {events:?}"),
            },
            Control::Cancel { id, .. } => match (out, inc) {
                (Some(_), _) => assert!(failed(Direction::Send), "cancel of sending {id}: {events:?}"),
                (None, Some(_)) => assert!(failed(Direction::Receive), "cancel of receiving {id}: {events:?}"),
                (None, None) => assert!(events.is_empty(), "cancel of unknown {id}: {events:?}"),
            },
            Control::Verified { id } => match out {
                Some((Phase::Sent | Phase::Resuming, _)) => {
                    assert!(matches!(events.last(), Some(TransferEvent::Completed { .. })), "verified {id}: {events:?}")
                }
                Some(_) => assert!(bad(&|e| matches!(e, TransferError::WrongState(_))), "verified {id} too early: {events:?}"),
                None => assert!(events.is_empty(), "verified unknown {id}: {events:?}"),
            },
            Control::Corrupt { id, .. } => match out {
                Some(_) => assert!(failed(Direction::Send), "corrupt {id}: {events:?}"),
                None => assert!(events.is_empty(), "corrupt unknown {id}: {events:?}"),
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn remote_offer(&mut self, p: usize, id: u64, size: u64, chunk: u8, kind: u8, seed: u8, hash: u8) {
        let size = size % (MAX_REMOTE_SIZE + 1);
        let chunk = REMOTE_CHUNKS[usize::from(chunk % 5)];
        let content = Content { seed, json: seed.is_multiple_of(2), size };
        let mut sha256 = hex(&Sha256::digest(content.bytes(0, size as usize)));
        match hash % 4 {
            1 => sha256 = sha256.to_uppercase(),
            2 => sha256.replace_range(..1, if sha256.starts_with('0') { "1" } else { "0" }),
            _ => {}
        }
        let kind = KINDS[usize::from(kind % 3)];
        let name = "remote.bin".to_owned();
        let mime = "application/octet-stream".to_owned();
        let offer = Offer { id, name, size, mime, kind, chunk, chunks: size.div_ceil(u64::from(chunk)), sha256 };
        self.remote.insert((p, id), (offer.clone(), content));
        self.text(p, &Control::Offer(offer).encode());
    }

    fn binary(&mut self, p: usize, frame: &[u8]) {
        let decoded = wire::decode_chunk(frame);
        if let Ok(c) = &decoded {
            check_chunk_round_trip(frame, c);
        }
        // A chunk that is exactly the one due must be taken.
        let due = decoded.as_ref().ok().and_then(|c| {
            let t = self.inc.get(&(p, c.id))?;
            let next = t.written / u64::from(t.offer.chunk);
            let fits = c.index == next && c.index < t.offer.chunks && c.payload.len() == t.offer.chunk_len(c.index);
            (t.sink == Some(InSink::Events) && fits && c.crc_ok).then_some((c.id, t.written + c.payload.len() as u64))
        });
        let known = decoded.as_ref().ok().map(|c| self.inc.get(&(p, c.id)).map(|t| t.sink.is_some()));
        self.t.handle_binary(self.now, PEERS[p], frame);
        let events = self.drain(Cause::Binary(p));
        let bad = |f: &dyn Fn(&TransferError) -> bool| matches!(&events[..], [TransferEvent::BadMessage { error, .. }] if f(error));
        match known {
            None => assert!(bad(&|e| matches!(e, TransferError::Wire(TransferWireError::Malformed(_)))), "not a chunk frame: {events:?}"),
            Some(None) => assert!(bad(&|e| matches!(e, TransferError::Unknown(_))), "chunk of an unknown transfer: {events:?}"),
            Some(Some(false)) => assert!(bad(&|e| matches!(e, TransferError::WrongState(_))), "chunk before accept: {events:?}"),
            Some(Some(true)) => {}
        }
        if let Some((id, written)) = due {
            let now_written = self.inc.get(&(p, id)).map_or(written, |t| t.written);
            assert_eq!(now_written, written, "the chunk due of {id} was not taken: {events:?}");
        }
    }

    fn chunks(&mut self, p: usize, id: u64, at: u64, count: u8, flip: bool) {
        let live = self.inc.get(&(p, id)).map(|t| (t.offer.clone(), t.written));
        let remote = self.remote.get(&(p, id)).cloned();
        let (offer, content, start) = match (live, remote) {
            (Some((offer, written)), remote) => {
                let content = remote.filter(|(o, _)| *o == offer).map(|(_, c)| c);
                let due = written / u64::from(offer.chunk);
                (offer, content, due)
            }
            (None, Some((offer, content))) => (offer, Some(content), 0),
            (None, None) => return,
        };
        let start = if at == 0 { start } else { at - 1 };
        let mut bytes = 0;
        for k in 0..u64::from(count) {
            let index = start.saturating_add(k);
            let len = if index < offer.chunks { offer.chunk_len(index) } else { 1 };
            let offset = index.saturating_mul(u64::from(offer.chunk));
            let mut payload = content.map_or_else(|| vec![0; len], |c| c.bytes(offset, len));
            if let (true, Some(b)) = (flip, payload.first_mut()) {
                *b ^= 1;
            }
            self.binary(p, &wire::encode_chunk(id, index, &payload));
            bytes += len;
            if index >= offer.chunks || bytes > MAX_CHUNKS_BYTES {
                break;
            }
        }
    }

    // ---- the application --------------------------------------------------------------------

    fn send(&mut self, p: usize, size: u64, name: u8, source: u8) {
        let name = local_name(name);
        let file = FileInfo::new(name.clone(), size, [0x5a; 32]);
        let valid_name = !name.is_empty() && name.len() <= wire::MAX_NAME_LEN && !name.contains(['/', '\\', '\0']);
        // The next id no transfer with the peer has, either way (counting on from it only if
        // the offer is made).
        let mut id = self.next_id;
        while self.out.contains_key(&(p, id)) || self.inc.contains_key(&(p, id)) {
            id += 1;
        }
        let result = if source == 0 {
            self.t.offer(PEERS[p], file)
        } else {
            let content = local_content(id, size);
            let chunk = u64::from(self.config.chunk_size);
            let fail_from = (source >= 2).then(|| u64::from(source - 2) * chunk);
            let read = move |offset: u64, buf: &mut [u8]| {
                if fail_from.is_some_and(|f| offset >= f) {
                    return Err(std::io::Error::other("fuzz: unreadable"));
                }
                buf.copy_from_slice(&content.bytes(offset, buf.len()));
                Ok(())
            };
            self.t.offer_from(PEERS[p], file, Box::new(SourceFn(read)))
        };
        if !valid_name || size > self.config.max_size {
            assert!(matches!(result, Err(TransferError::Wire(TransferWireError::BadOffer(_)))), "offer of {name:?}, {size} bytes: {result:?}");
        } else if self.count(p) >= self.config.max_transfers {
            assert_eq!(result, Err(TransferError::TooMany), "offer over max_transfers");
        } else {
            assert_eq!(result, Ok(id), "offer of {size} bytes");
            let chunk = self.config.chunk_size;
            let offer = Offer {
                id,
                name,
                size,
                mime: "application/octet-stream".into(),
                kind: TransferKind::File,
                chunk,
                chunks: size.div_ceil(u64::from(chunk)),
                sha256: "5a".repeat(32),
            };
            let out = Out { offer, phase: Phase::Offered, reads: BTreeSet::new(), answered: BTreeSet::new(), source: source != 0, tainted: false };
            self.out.insert((p, id), out);
            self.next_id = id + 1;
        }
        let events = self.drain(Cause::Command);
        assert!(events.is_empty(), "offer: {events:?}");
    }

    fn accept(&mut self, p: usize, id: u64, memory: bool) {
        let expected = match self.inc.get(&(p, id)) {
            None => Err(TransferError::Unknown(id)),
            Some(t) if memory && t.offer.size > self.config.max_memory => Err(TransferError::TooLarge { size: t.offer.size, limit: self.config.max_memory }),
            Some(t) if t.sink.is_some() => Err(TransferError::WrongState("accepted")),
            Some(_) => Ok(()),
        };
        let result = if memory { self.t.accept_to_memory(PEERS[p], id) } else { self.t.accept(PEERS[p], id) };
        let as_expected = match (&expected, &result) {
            (Err(TransferError::WrongState(_)), Err(TransferError::WrongState(_))) => true,
            _ => expected == result,
        };
        assert!(as_expected, "accept of {id} (into memory: {memory}): {result:?}, expected {expected:?}");
        if result.is_ok() {
            let t = self.inc.get_mut(&(p, id)).expect("under way");
            let json = t.offer.kind == TransferKind::Json;
            t.sink = Some(if memory { InSink::Memory { json } } else { InSink::Events });
            self.summary.accepts += 1;
        }
        let events = self.drain(Cause::Command);
        assert!(events.is_empty(), "accept: {events:?}");
    }

    fn reject(&mut self, p: usize, id: u64) {
        let result = self.t.reject(PEERS[p], id, "fuzz");
        match self.inc.get(&(p, id)).map(|t| t.sink.is_some()) {
            None => assert_eq!(result, Err(TransferError::Unknown(id)), "reject of unknown {id}"),
            Some(true) => assert!(matches!(result, Err(TransferError::WrongState(_))), "reject of accepted {id}: {result:?}"),
            Some(false) => {
                assert_eq!(result, Ok(()), "reject of offered {id}");
                self.inc.remove(&(p, id));
            }
        }
        let events = self.drain(Cause::Command);
        assert!(events.is_empty(), "reject: {events:?}");
    }

    fn cancel(&mut self, p: usize, id: u64) {
        let direction = if self.out.contains_key(&(p, id)) {
            Some(Direction::Send)
        } else {
            self.inc.contains_key(&(p, id)).then_some(Direction::Receive)
        };
        let result = self.t.cancel(PEERS[p], id, "fuzz");
        let events = self.drain(Cause::Command);
        match direction {
            None => {
                assert_eq!(result, Err(TransferError::Unknown(id)), "cancel of unknown {id}");
                assert!(events.is_empty(), "cancel of unknown {id}: {events:?}");
            }
            Some(d) => {
                assert_eq!(result, Ok(()), "cancel of {id}");
                let cancelled = matches!(&events[..], [TransferEvent::Failed { direction, error: TransferError::Cancelled(_), .. }] if *direction == d);
                assert!(cancelled, "cancel of {id} ({d:?}): {events:?}");
            }
        }
    }

    /// Answers reads with the right bytes: they must be taken. Returns how many.
    fn serve(&mut self, count: usize, skip: usize) -> usize {
        let pending: Vec<(usize, u64, u64)> = self.out.iter().flat_map(|(&(p, id), t)| t.reads.iter().map(move |&i| (p, id, i))).collect();
        if pending.is_empty() {
            return 0;
        }
        let n = if count == 0 { pending.len() } else { count.min(pending.len()) };
        for k in 0..n {
            let (p, id, index) = pending[(skip + k) % pending.len()];
            let t = &self.out[&(p, id)];
            let offset = index * u64::from(t.offer.chunk);
            let data = local_content(id, t.offer.size).bytes(offset, t.offer.chunk_len(index));
            let result = self.t.provide(PEERS[p], id, offset, data);
            assert_eq!(result, Ok(()), "the answer to the read of chunk {index} of {id} was refused");
            self.out.get_mut(&(p, id)).expect("under way").took(index);
            let events = self.drain(Cause::Command);
            assert!(events.is_empty(), "provide: {events:?}");
        }
        n
    }

    fn provide(&mut self, p: usize, id: u64, offset: u64, len: u64, fill: u8) {
        let len = len.min(MAX_PROVIDE) as usize;
        let (data, right) = match self.out.get(&(p, id)) {
            Some(t) if fill == 0 => (local_content(id, t.offer.size).bytes(offset, len), true),
            _ => (vec![fill; len], false),
        };
        // A chunk-aligned answer of the right length to an outstanding read must be taken.
        let fits = self.out.get(&(p, id)).is_some_and(|t| {
            let chunk = u64::from(t.offer.chunk);
            let index = offset / chunk;
            offset.is_multiple_of(chunk) && t.reads.contains(&index) && len == t.offer.chunk_len(index)
        });
        let result = self.t.provide(PEERS[p], id, offset, data);
        if fits {
            assert_eq!(result, Ok(()), "a fitting answer to the read at {offset} of {id} was refused");
        }
        if result.is_ok() {
            let t = self.out.get_mut(&(p, id)).unwrap_or_else(|| panic!("provide for {id}, not under way, was taken"));
            let index = offset / u64::from(t.offer.chunk);
            assert!(t.reads.contains(&index), "provide at {offset} of {id} was taken, but no read of chunk {index} is outstanding");
            t.took(index);
            t.tainted |= !right;
        }
        let events = self.drain(Cause::Command);
        assert!(events.is_empty(), "provide: {events:?}");
    }

    fn reconnected(&mut self, p: usize) {
        self.t.handle_reconnected(PEERS[p]);
        self.blocked[p] = false;
        for ((_, _), t) in self.out.range_mut((p, 0)..=(p, u64::MAX)) {
            if t.phase != Phase::Offered {
                t.phase = Phase::Resuming;
            }
            // What was read ahead is dropped.
            t.answered.clear();
        }
        let events = self.drain(Cause::Command);
        assert!(events.is_empty(), "handle_reconnected: {events:?}");
    }

    fn flush(&mut self, texts: usize, chunks: usize, error: bool) {
        let mut wire = Wire::new(texts, chunks, error);
        // A flush sends a bounded number of chunks and says when it has more; a Node flushes
        // again at once, as here.
        self.t.flush(self.now, &mut wire);
        for _ in 0..100_000 {
            if !self.t.wants_flush() {
                break;
            }
            self.t.flush(self.now, &mut wire);
        }
        assert!(!self.t.wants_flush(), "flush keeps wanting more");
        for peer in &wire.attempts {
            let p = peer_index(peer);
            assert!(!self.blocked[p], "a chunk to {p} after the channel refused one, before it was writable again");
        }
        for (peer, text) in &wire.sent_texts {
            let p = peer_index(peer);
            let c = Control::decode(text).unwrap_or_else(|e| panic!("sent an undecodable control message {text:?}: {e}"));
            check_control_round_trip(&c);
            assert_eq!(&c.encode(), text, "a control message sent is not in its canonical encoding");
            match c {
                Control::Verified { id } => {
                    self.verified_sent.insert((p, id));
                }
                Control::Offer(offer) => {
                    if let Some(t) = self.out.get(&(p, offer.id)) {
                        assert_eq!(t.offer, offer, "offered something else than asked");
                    }
                }
                _ => {}
            }
        }
        for (peer, frame) in &wire.sent_frames {
            self.sent_chunk(peer_index(peer), frame);
        }
        for peer in &wire.refused {
            self.blocked[peer_index(peer)] = true;
            self.summary.refusals += 1;
        }
        self.drain(Cause::Flush);
    }

    fn sent_chunk(&mut self, p: usize, frame: &[u8]) {
        let c = wire::decode_chunk(frame).unwrap_or_else(|e| panic!("sent an undecodable chunk frame: {e}"));
        assert!(c.crc_ok, "sent a chunk frame with a bad CRC-32");
        check_chunk_round_trip(frame, &c);
        let t = self.out.get_mut(&(p, c.id)).unwrap_or_else(|| panic!("sent a chunk of {}, which is not under way", c.id));
        assert_eq!(t.phase, Phase::Sending(c.index), "sent chunk {} of {}", c.index, c.id);
        assert!(c.index < t.offer.chunks, "sent chunk {} of {}, which has {}", c.index, c.id, t.offer.chunks);
        assert_eq!(c.payload.len(), t.offer.chunk_len(c.index), "sent chunk {} of {}: wrong length", c.index, c.id);
        if !t.tainted {
            let offset = c.index * u64::from(t.offer.chunk);
            let content = local_content(c.id, t.offer.size).bytes(offset, c.payload.len());
            assert!(c.payload == content, "sent chunk {} of {}: not the content", c.index, c.id);
        }
        assert!(t.answered.remove(&c.index) || t.source, "sent chunk {} of {}, which was not provided", c.index, c.id);
        let next = c.index + 1;
        t.phase = if next == t.offer.chunks { Phase::Sent } else { Phase::Sending(next) };
        if next == t.offer.chunks {
            t.reads.clear();
            t.answered.clear();
        }
        self.summary.chunks_sent += 1;
    }

    fn timeout(&mut self) {
        let deadline = self.t.poll_timeout();
        self.t.handle_timeout(self.now);
        let events = self.drain(Cause::Timeout);
        if deadline.is_some_and(|d| d <= self.now) {
            assert!(!events.is_empty(), "handle_timeout at its deadline did nothing");
        }
        if let Some(next) = self.t.poll_timeout() {
            assert!(next > self.now, "after handle_timeout(now) the deadline is {:?} before now", self.now - next);
        }
    }

    // ---- the end ---------------------------------------------------------------------------

    /// The channel stays writable and every read is answered: whatever was accepted goes on.
    fn teardown(&mut self) {
        let reach: Vec<(usize, u64)> = self
            .out
            .iter()
            .filter(|(_, t)| matches!(t.phase, Phase::Sending(next) if t.offer.chunks - next <= LIVENESS_CHUNKS))
            .map(|(k, _)| *k)
            .collect();
        let rounds = LIVENESS_CHUNKS as usize / self.config.read_ahead + 8;
        for _ in 0..rounds {
            for (p, peer) in PEERS.iter().enumerate() {
                self.t.handle_writable(*peer);
                self.blocked[p] = false;
            }
            let before = (self.summary.chunks_sent, self.summary.reads);
            self.flush(usize::MAX, LIVENESS_BUDGET, false);
            let served = self.serve(0, 0);
            if served == 0 && (self.summary.chunks_sent, self.summary.reads) == before {
                break;
            }
        }
        for key in reach {
            if let Some(t) = self.out.get(&key) {
                assert_eq!(t.phase, Phase::Sent, "transfer {} stalled at {:?} of {} chunks", key.1, t.phase, t.offer.chunks);
            }
        }
        for key in &self.completed_receive {
            assert!(self.verified_sent.contains(key), "transfer {} verified here, but `verified` never went out", key.1);
        }
        // Every transfer under way times out once its peer is gone for long enough.
        for peer in PEERS {
            self.t.handle_disconnected(self.now, peer);
        }
        self.now += self.config.reconnect_timeout + Duration::from_secs(1);
        self.timeout();
        for ((_, id), t) in &self.out {
            assert_eq!(t.phase, Phase::Offered, "sending {id} ({:?}) did not time out", t.phase);
        }
        for ((_, id), t) in &self.inc {
            assert!(t.written == 0, "receiving {id} ({} bytes written) did not time out", t.written);
        }
    }
}

/// The id a control message is about.
fn control_id(c: &Control) -> u64 {
    match c {
        Control::Offer(o) => o.id,
        Control::Accept { id, .. } | Control::Reject { id, .. } | Control::Cancel { id, .. } | Control::Verified { id } | Control::Corrupt { id, .. } => *id,
    }
}

/// Runs the input decoded from `data`, checking the model after every step and at the end.
pub fn xfer(data: &[u8]) -> Summary {
    let input = decode_input(data);
    let mut h = Harness::new(input.setup);
    for step in &input.steps {
        h.step(step);
    }
    h.teardown();
    h.summary
}
