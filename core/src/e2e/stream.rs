//! NDJSON framing and [`EncryptedStream`], an encrypted, resumable channel over any reliable
//! byte stream (TCP, a WebSocket, a data channel).
//!
//! # Framing
//!
//! Every frame is one NDJSON line ([`encode_line`], [`NdjsonDecoder`]):
//!
//! - `{"t":"kx","d":"<base64>"}`: a message of the authenticated exchange
//!   ([`GroupKeyManager`]); only the [`Role::Initiator`] offers.
//! - `{"t":"m","n":N,"d":"<base64>"}`: application message number `N` (from 1, per sending
//!   stream), its JSON sealed by the [`Session`](super::Session) with `N` as associated data.
//! - `{"t":"ack","n":N,"d":"<base64>"}`: every message up to `N` was delivered. `d` seals
//!   nothing with `N` as associated data, so nobody in the middle can forge an ack (and make
//!   the sender drop messages).
//! - `{"t":"resume","session":"<hex>","stream":"<hex>","peer":"<hex>","recv":N,"d":"<base64>"}`:
//!   sent at the start of every connection and after every exchange. `stream` names the
//!   sender's incarnation, `peer` the incarnation of the other side it counts from and
//!   `recv` the last message number it delivered from it; `d` seals nothing with all three as
//!   associated data. `session` is empty when the sender holds no session.
//!
//! # Resume
//!
//! A message stays in the send buffer until acknowledged. On a new connection both sides send
//! `resume`; if both still hold the same session, each drops what the other delivered and
//! seals the rest again under that session (new counters: a nonce is never reused) and
//! reports [`StreamEvent::Resumed`]. Otherwise the initiator runs a fresh exchange, after
//! which the same `resume` step runs under the new session ([`StreamEvent::Established`]).
//! A receiver drops message numbers it delivered already, so across any number of cuts every
//! message is delivered once, in order. A side that restarted has a new incarnation: its
//! peer starts counting its messages afresh, and resends everything unacknowledged.
//!
//! # Reconnecting
//!
//! After [`EncryptedStream::handle_disconnected`], [`EncryptedStream::poll_timeout`] returns
//! when to dial again: the initial delay (1 s) doubles up to the maximum (30 s), each minus up
//! to 20 % of jitter from the seeded RNG. At the deadline [`StreamEvent::Reconnect`] asks the
//! adapter to dial; if it does not connect, the next deadline follows. After
//! [`StreamConfig::max_attempts`] dials [`StreamEvent::GaveUp`] ends the schedule. A first
//! dial that fails (reported with `handle_disconnected` before any connection) starts the
//! schedule too. Only the [`Role::Initiator`] dials: the responder waits for the next
//! connection and has no schedule (it never reports `Reconnect` or `GaveUp`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{E2eError, GroupKeyManager, KeyExchangeEvent, Limits, Role};
use crate::identity::{Fingerprint, Identity};

/// Longest line a decoder accepts by default (1 MiB), without its line ending.
pub const DEFAULT_MAX_LINE: usize = 1 << 20;

/// Why a line could not be decoded or a value encoded. Only that line is lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NdjsonError {
    /// The line is longer than the decoder's limit; it was skipped up to its newline.
    #[error("line longer than {max} bytes")]
    LineTooLong {
        /// The limit.
        max: usize,
    },
    /// The line is not UTF-8.
    #[error("the line is not UTF-8")]
    Utf8,
    /// The line is not one JSON value.
    #[error("the line is not JSON: {0}")]
    Json(String),
    /// The value cannot be written as JSON (a map with non-string keys, say).
    #[error("the value cannot be encoded: {0}")]
    Encode(String),
}

/// Encodes `value` as one NDJSON line: compact JSON (which never holds a raw newline) and `\n`.
pub fn encode_line<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, NdjsonError> {
    let mut line = serde_json::to_vec(value).map_err(|e| NdjsonError::Encode(e.to_string()))?;
    line.push(b'\n');
    Ok(line)
}

/// Splits a byte stream into JSON values, one per line.
///
/// Feed it chunks of any size with [`handle_bytes`](Self::handle_bytes) (a chunk may end
/// inside a line or inside a UTF-8 character) and drain [`poll_message`](Self::poll_message).
/// Lines end with `\n` or `\r\n`; blank lines are skipped. A bad line gives one error and the
/// decoder goes on with the next line. It buffers what it was given and has not returned yet;
/// a partial line longer than `max_line` is dropped as it arrives, so an endless line costs
/// at most `max_line` bytes plus one chunk.
#[derive(Debug, Clone)]
pub struct NdjsonDecoder {
    buf: Vec<u8>,
    /// First byte not returned yet.
    start: usize,
    /// Bytes before this index (from `start`) hold no newline.
    scanned: usize,
    max_line: usize,
    /// Dropping the rest of a line that was too long.
    skipping: bool,
}

impl Default for NdjsonDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl NdjsonDecoder {
    /// Creates a decoder with the default line limit ([`DEFAULT_MAX_LINE`]).
    pub fn new() -> Self {
        Self::with_max_line(DEFAULT_MAX_LINE)
    }

    /// Creates a decoder that refuses lines longer than `max_line` bytes.
    pub fn with_max_line(max_line: usize) -> Self {
        NdjsonDecoder { buf: Vec::new(), start: 0, scanned: 0, max_line, skipping: false }
    }

    /// Takes in the next chunk of the stream.
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next complete line's value or error, or `None` until more bytes come.
    #[must_use]
    pub fn poll_message(&mut self) -> Option<Result<Value, NdjsonError>> {
        loop {
            let Some(i) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') else {
                self.scanned = self.buf.len();
                let partial = self.buf.len() - self.start;
                if self.skipping {
                    self.start = self.buf.len();
                    return None;
                }
                // One byte more for a `\r` that may come before the newline.
                if partial > self.max_line + 1 {
                    self.skipping = true;
                    self.start = self.buf.len();
                    return Some(Err(NdjsonError::LineTooLong { max: self.max_line }));
                }
                return None;
            };
            let end = self.scanned + i;
            let mut line = &self.buf[self.start..end];
            self.start = end + 1;
            self.scanned = self.start;
            if std::mem::take(&mut self.skipping) {
                continue;
            }
            if let Some(rest) = line.strip_suffix(b"\r") {
                line = rest;
            }
            if line.len() > self.max_line {
                return Some(Err(NdjsonError::LineTooLong { max: self.max_line }));
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Ok(text) = std::str::from_utf8(line) else {
                return Some(Err(NdjsonError::Utf8));
            };
            return Some(serde_json::from_str(text).map_err(|e| NdjsonError::Json(e.to_string())));
        }
    }

    /// Returns how many bytes are buffered (given and not returned yet).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Forgets everything buffered (the connection is gone).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.start = 0;
        self.scanned = 0;
        self.skipping = false;
    }
}

/// Why an [`EncryptedStream`] refused a call or a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The exchange or a sealed frame failed (tampered with, wrong peer, replayed...).
    #[error(transparent)]
    E2e(#[from] E2eError),
    /// A line was not NDJSON.
    #[error(transparent)]
    Ndjson(#[from] NdjsonError),
    /// The send buffer is full; wait for acknowledgements ([`EncryptedStream::unacked`]).
    #[error("send buffer full: {messages} messages, {bytes} bytes unacknowledged")]
    WouldBlock {
        /// Messages in the buffer.
        messages: usize,
        /// Bytes of JSON in the buffer.
        bytes: usize,
    },
    /// The message would not fit a line of the configured length once sealed.
    #[error("a message of {len} bytes does not fit a line of {max} bytes")]
    TooLarge {
        /// The JSON's length.
        len: usize,
        /// The line limit.
        max: usize,
    },
    /// A line that is not a frame of this protocol, or out of place.
    #[error("bad frame: {0}")]
    Frame(&'static str),
    /// The stream gave up reconnecting; connect it again first.
    #[error("the stream gave up reconnecting")]
    Closed,
}

/// What an [`EncryptedStream`] reports.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StreamEvent {
    /// A fresh exchange completed and both sides synchronized: messages flow.
    Established {
        /// The new session's id.
        session: [u8; 8],
    },
    /// Both sides still held the session and picked up where they were.
    Resumed {
        /// The session's id.
        session: [u8; 8],
    },
    /// An application message, in order, once.
    Message(Value),
    /// The transport connection is gone; the reconnect schedule started.
    Disconnected,
    /// The adapter should dial the peer now (attempt number, from 1).
    Reconnect {
        /// Which attempt this is.
        attempt: u32,
    },
    /// Every reconnect attempt was used; the schedule stopped.
    GaveUp,
    /// A frame was refused (nothing from it was delivered); the stream goes on.
    Error(StreamError),
}

/// Settings of an [`EncryptedStream`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamConfig {
    /// Most messages sent and not yet acknowledged (or not yet sent). Default 1024.
    pub max_unacked_messages: usize,
    /// Most bytes of JSON in those messages. Default 8 MiB.
    pub max_unacked_bytes: usize,
    /// Longest line accepted and sent. Default [`DEFAULT_MAX_LINE`]; both sides should agree.
    pub max_line: usize,
    /// First reconnect delay. Default 1 s.
    pub initial_backoff: Duration,
    /// Longest reconnect delay. Default 30 s.
    pub max_backoff: Duration,
    /// Dials before giving up; `None` (default) never gives up.
    pub max_attempts: Option<u32>,
    /// When sessions rekey.
    pub limits: Limits,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            max_unacked_messages: 1024,
            max_unacked_bytes: 8 << 20,
            max_line: DEFAULT_MAX_LINE,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            max_attempts: None,
            limits: Limits::default(),
        }
    }
}

/// Most control frames (exchange, resume) waiting to be sent; a peer that makes more is
/// misbehaving and the surplus is dropped with an [`StreamEvent::Error`].
const MAX_CONTROL: usize = 16;
/// Frames are processed while fewer events than this wait; the rest stays in the decoder
/// until [`EncryptedStream::poll_event`] makes room.
const MAX_EVENTS: usize = 256;
/// Part of each reconnect delay taken off at random.
const JITTER: f64 = 0.2;

#[derive(Serialize, Deserialize)]
#[serde(tag = "t")]
enum Frame {
    #[serde(rename = "kx")]
    Kx { d: String },
    #[serde(rename = "m")]
    Msg { n: u64, d: String },
    #[serde(rename = "ack")]
    Ack { n: u64, d: String },
    #[serde(rename = "resume")]
    Resume { session: String, stream: String, peer: String, recv: u64, d: String },
}

enum Link {
    Down,
    /// `ready`: the peer's `resume` came, messages flow. `fresh`: the session came from an
    /// exchange on this connection.
    Up { ready: bool, fresh: bool },
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Result<Vec<u8>, StreamError> {
    base64::engine::general_purpose::STANDARD.decode(s).map_err(|_| StreamError::Frame("bad base64"))
}

fn hex8(s: &str) -> Option<[u8; 8]> {
    if s.len() != 16 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 8];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn msg_aad(n: u64) -> Vec<u8> {
    [&b"peerlink stream/1 m"[..], &n.to_be_bytes()].concat()
}

fn ack_aad(n: u64) -> Vec<u8> {
    [&b"peerlink stream/1 ack"[..], &n.to_be_bytes()].concat()
}

fn resume_aad(stream: &[u8; 8], peer: Option<&[u8; 8]>, recv: u64) -> Vec<u8> {
    [&b"peerlink stream/1 resume"[..], stream, peer.unwrap_or(&[0; 8]), &recv.to_be_bytes()].concat()
}

fn line(frame: &Frame) -> Vec<u8> {
    encode_line(frame).expect("frames are plain JSON")
}

/// An encrypted, resumable channel with one peer over a reliable byte stream (sans-IO).
///
/// Inputs: [`handle_connected`](Self::handle_connected), [`handle_bytes`](Self::handle_bytes),
/// [`handle_disconnected`](Self::handle_disconnected), [`handle_timeout`](Self::handle_timeout),
/// [`send`](Self::send). After each, drain [`poll_transmit`](Self::poll_transmit) (write the
/// bytes to the transport) and [`poll_event`](Self::poll_event), then arm a timer for
/// [`poll_timeout`](Self::poll_timeout). See the [module docs](self) for the protocol.
pub struct EncryptedStream {
    peer: Fingerprint,
    role: Role,
    config: StreamConfig,
    keys: GroupKeyManager,
    rng: ChaCha20Rng,
    /// This incarnation's id.
    id: [u8; 8],
    decoder: NdjsonDecoder,
    link: Link,
    /// Exchange and resume frames, at most [`MAX_CONTROL`].
    control: VecDeque<Vec<u8>>,
    ack_due: bool,
    /// Number of the next message `send` takes (the first is 1).
    next_seq: u64,
    /// Messages not acknowledged yet, oldest first, as JSON.
    unacked: VecDeque<(u64, Vec<u8>)>,
    unacked_bytes: usize,
    /// Number of the next message to transmit on this connection.
    next_send: u64,
    /// The peer incarnation `delivered` counts from.
    peer_stream: Option<[u8; 8]>,
    /// The last message number delivered from the peer.
    delivered: u64,
    events: VecDeque<StreamEvent>,
    attempt: u32,
    deadline: Option<Instant>,
    gave_up: bool,
}

impl EncryptedStream {
    /// Creates the stream between `identity` and `peer`. One side must be the
    /// [`Role::Initiator`] (it runs the exchanges), the other the [`Role::Responder`]. `seed`
    /// drives ephemeral keys, nonces, the incarnation id and the jitter: adapters seed it from
    /// the OS (a restarted side must not reuse a seed).
    pub fn new(identity: Identity, peer: Fingerprint, role: Role, seed: u64, config: StreamConfig) -> Self {
        let keys = GroupKeyManager::new(identity, seed).with_limits(config.limits);
        let mut rng = ChaCha20Rng::seed_from_u64(!seed);
        let mut id = [0u8; 8];
        rng.fill_bytes(&mut id);
        EncryptedStream {
            peer,
            role,
            decoder: NdjsonDecoder::with_max_line(config.max_line),
            config,
            keys,
            rng,
            id,
            link: Link::Down,
            control: VecDeque::new(),
            ack_due: false,
            next_seq: 1,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            next_send: 1,
            peer_stream: None,
            delivered: 0,
            events: VecDeque::new(),
            attempt: 0,
            deadline: None,
            gave_up: false,
        }
    }

    /// Takes in a new transport connection to the peer: starts the exchange (initiator
    /// without a session) or offers to resume. Replaces any connection before it.
    pub fn handle_connected(&mut self, _now: Instant) {
        self.link = Link::Up { ready: false, fresh: false };
        self.deadline = None;
        self.attempt = 0;
        self.gave_up = false;
        self.decoder.reset();
        self.control.clear();
        self.ack_due = false;
        if !self.keys.has_session(&self.peer) && self.role == Role::Initiator {
            self.offer();
        } else {
            let frame = self.resume_frame();
            self.push_control(frame);
        }
    }

    /// Takes in bytes read from the transport (any chunking). Ignored while disconnected.
    pub fn handle_bytes(&mut self, _now: Instant, bytes: &[u8]) {
        if matches!(self.link, Link::Down) {
            return;
        }
        self.decoder.handle_bytes(bytes);
        self.process();
    }

    /// Takes in the loss of the transport connection, or a dial that failed: reports
    /// [`StreamEvent::Disconnected`] (for a connection that was up) and starts the reconnect
    /// schedule (initiator only). While the schedule runs, a failed dial changes nothing: the
    /// next deadline stands.
    pub fn handle_disconnected(&mut self, now: Instant) {
        if matches!(self.link, Link::Down) {
            // A dial failed. The first one (no schedule yet) starts it.
            if self.deadline.is_none() && !self.gave_up && self.role == Role::Initiator {
                self.attempt = 0;
                self.deadline = Some(now + self.backoff(0));
            }
            return;
        }
        self.link = Link::Down;
        self.decoder.reset();
        self.control.clear();
        self.ack_due = false;
        self.events.push_back(StreamEvent::Disconnected);
        self.attempt = 0;
        self.deadline = (self.role == Role::Initiator).then(|| now + self.backoff(0));
    }

    /// Returns when [`handle_timeout`](Self::handle_timeout) is due (the next reconnect), or
    /// `None`.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// Takes in a timer firing at `now`: at the deadline, reports
    /// [`StreamEvent::Reconnect`] and sets the next, longer, deadline (or reports
    /// [`StreamEvent::GaveUp`]). Before the deadline it does nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.deadline else { return };
        if now < deadline {
            return;
        }
        if self.config.max_attempts.is_some_and(|max| self.attempt >= max) {
            self.deadline = None;
            self.gave_up = true;
            self.events.push_back(StreamEvent::GaveUp);
            return;
        }
        self.attempt += 1;
        self.events.push_back(StreamEvent::Reconnect { attempt: self.attempt });
        self.deadline = Some(now + self.backoff(self.attempt));
    }

    /// Queues `value` for the peer and returns its message number. Messages are sent once
    /// the channel is ready and kept until acknowledged, across reconnects.
    ///
    /// Fails with [`StreamError::WouldBlock`] when the buffer holds
    /// [`StreamConfig::max_unacked_messages`] messages or would pass
    /// [`StreamConfig::max_unacked_bytes`], [`StreamError::TooLarge`] when the message cannot
    /// fit a line, and [`StreamError::Closed`] after [`StreamEvent::GaveUp`].
    pub fn send(&mut self, value: &Value) -> Result<u64, StreamError> {
        if self.gave_up {
            return Err(StreamError::Closed);
        }
        let plain = serde_json::to_vec(value).map_err(|e| NdjsonError::Encode(e.to_string()))?;
        // `{"t":"m","n":<20 digits>,"d":"<base64 of header, JSON, tag>"}`.
        let sealed = super::HEADER_LEN + plain.len() + super::TAG_LEN;
        if 40 + sealed.div_ceil(3) * 4 > self.config.max_line {
            return Err(StreamError::TooLarge { len: plain.len(), max: self.config.max_line });
        }
        if self.unacked.len() >= self.config.max_unacked_messages || self.unacked_bytes + plain.len() > self.config.max_unacked_bytes {
            return Err(StreamError::WouldBlock { messages: self.unacked.len(), bytes: self.unacked_bytes });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked_bytes += plain.len();
        self.unacked.push_back((seq, plain));
        Ok(seq)
    }

    /// Returns the next line to write to the transport, or `None`.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        let Link::Up { ready, .. } = self.link else { return None };
        if let Some(frame) = self.control.pop_front() {
            return Some(frame);
        }
        if !ready || !self.keys.has_session(&self.peer) {
            return None;
        }
        if std::mem::take(&mut self.ack_due) {
            let n = self.delivered;
            let d = self.keys.encrypt_for_peer(&self.peer, b"", &ack_aad(n)).expect("a session");
            return Some(line(&Frame::Ack { n, d: b64(&d) }));
        }
        let first = self.unacked.front()?.0;
        let (n, plain) = self.unacked.get((self.next_send - first) as usize)?;
        let d = self.keys.encrypt_for_peer(&self.peer, plain, &msg_aad(*n)).expect("a session");
        self.next_send += 1;
        Some(line(&Frame::Msg { n: *n, d: b64(&d) }))
    }

    /// Returns the next event, or `None`.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<StreamEvent> {
        let event = self.events.pop_front();
        if self.events.len() < MAX_EVENTS / 2 && !matches!(self.link, Link::Down) {
            self.process();
        }
        event
    }

    /// Returns how many messages and bytes of JSON wait for acknowledgement (sent or not).
    pub fn unacked(&self) -> (usize, usize) {
        (self.unacked.len(), self.unacked_bytes)
    }

    /// Whether messages flow on the current connection.
    pub fn is_ready(&self) -> bool {
        matches!(self.link, Link::Up { ready: true, .. })
    }

    /// Returns the id of the session with the peer, if any.
    pub fn session_id(&self) -> Option<[u8; 8]> {
        self.keys.session(&self.peer).map(|s| s.id())
    }

    /// Forgets the session (its keys are zeroized), keeping the messages: the next connection
    /// runs a fresh exchange, as after losing the session in a restart.
    pub fn forget_session(&mut self) {
        self.keys.remove_peer(&self.peer);
    }

    fn backoff(&mut self, attempt: u32) -> Duration {
        let base = self.config.initial_backoff.saturating_mul(1 << attempt.min(20)).min(self.config.max_backoff);
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(1.0 - JITTER * u)
    }

    fn push_control(&mut self, frame: Vec<u8>) {
        if self.control.len() >= MAX_CONTROL {
            self.events.push_back(StreamEvent::Error(StreamError::Frame("too many control frames; one dropped")));
            return;
        }
        self.control.push_back(frame);
    }

    fn offer(&mut self) {
        match self.keys.exchange_with(self.peer) {
            Ok(offer) => self.push_control(line(&Frame::Kx { d: b64(&offer) })),
            Err(e) => self.events.push_back(StreamEvent::Error(e.into())),
        }
    }

    fn resume_frame(&mut self) -> Vec<u8> {
        let stream = hex(&self.id);
        let Some(session) = self.session_id() else {
            return line(&Frame::Resume { session: String::new(), stream, peer: String::new(), recv: 0, d: String::new() });
        };
        let aad = resume_aad(&self.id, self.peer_stream.as_ref(), self.delivered);
        let d = self.keys.encrypt_for_peer(&self.peer, b"", &aad).expect("a session");
        line(&Frame::Resume {
            session: hex(&session),
            stream,
            peer: self.peer_stream.map_or(String::new(), |p| hex(&p)),
            recv: self.delivered,
            d: b64(&d),
        })
    }

    fn process(&mut self) {
        while self.events.len() < MAX_EVENTS {
            match self.decoder.poll_message() {
                None => break,
                Some(Err(e)) => self.events.push_back(StreamEvent::Error(e.into())),
                Some(Ok(value)) => {
                    if let Err(e) = self.handle_frame(value) {
                        self.events.push_back(StreamEvent::Error(e));
                    }
                }
            }
        }
    }

    fn handle_frame(&mut self, value: Value) -> Result<(), StreamError> {
        let frame: Frame = serde_json::from_value(value).map_err(|_| StreamError::Frame("not a frame of this protocol"))?;
        match frame {
            Frame::Kx { d } => self.on_kx(&unb64(&d)?),
            Frame::Resume { session, stream, peer, recv, d } => self.on_resume(&session, &stream, &peer, recv, &d),
            Frame::Msg { n, d } => self.on_message(n, &unb64(&d)?),
            Frame::Ack { n, d } => self.on_ack(n, &unb64(&d)?),
        }
    }

    fn on_kx(&mut self, msg: &[u8]) -> Result<(), StreamError> {
        let reply = self.keys.handle_incoming_key_exchange(self.peer, msg)?;
        if let Some(reply) = reply {
            self.push_control(line(&Frame::Kx { d: b64(&reply) }));
        }
        while let Some(KeyExchangeEvent::Established { .. }) = self.keys.poll_event() {
            // Messages wait for the peer's `resume` under the new session.
            self.link = Link::Up { ready: false, fresh: true };
            let frame = self.resume_frame();
            self.push_control(frame);
        }
        Ok(())
    }

    fn on_resume(&mut self, session: &str, stream: &str, peer: &str, recv: u64, d: &str) -> Result<(), StreamError> {
        let Link::Up { fresh, .. } = self.link else { return Ok(()) };
        let ours = self.session_id();
        if session.is_empty() || hex8(session) != ours || ours.is_none() {
            // Not the session we hold: the initiator runs a fresh exchange.
            if self.role == Role::Initiator && !self.keys.is_exchanging(&self.peer) {
                self.offer();
            }
            return Ok(());
        }
        let stream = hex8(stream).ok_or(StreamError::Frame("bad stream id"))?;
        let of = if peer.is_empty() { None } else { Some(hex8(peer).ok_or(StreamError::Frame("bad stream id"))?) };
        let sealed = unb64(d)?;
        self.keys.decrypt_from_peer(&self.peer, &sealed, &resume_aad(&stream, of.as_ref(), recv))?;
        if self.peer_stream != Some(stream) {
            // A new incarnation of the peer numbers its messages afresh.
            self.peer_stream = Some(stream);
            self.delivered = 0;
        }
        // What the peer delivered from an earlier incarnation of this side does not count.
        let recv = if of == Some(self.id) { recv } else { 0 };
        if recv >= self.next_seq {
            return Err(StreamError::Frame("resume acknowledges messages never sent"));
        }
        self.trim(recv);
        self.next_send = self.unacked.front().map_or(self.next_seq, |m| m.0);
        self.link = Link::Up { ready: true, fresh };
        let session = ours.expect("checked above");
        self.events.push_back(if fresh { StreamEvent::Established { session } } else { StreamEvent::Resumed { session } });
        Ok(())
    }

    fn on_message(&mut self, n: u64, sealed: &[u8]) -> Result<(), StreamError> {
        if !self.is_ready() {
            return Err(StreamError::Frame("a message before resume"));
        }
        let plain = self.keys.decrypt_from_peer(&self.peer, sealed, &msg_aad(n))?;
        let value = serde_json::from_slice(&plain).map_err(|e| NdjsonError::Json(e.to_string()))?;
        if n <= self.delivered {
            // Sent again after a resume: delivered already.
            return Ok(());
        }
        self.delivered = n;
        self.ack_due = true;
        self.events.push_back(StreamEvent::Message(value));
        Ok(())
    }

    fn on_ack(&mut self, n: u64, sealed: &[u8]) -> Result<(), StreamError> {
        self.keys.decrypt_from_peer(&self.peer, sealed, &ack_aad(n))?;
        if n >= self.next_send {
            return Err(StreamError::Frame("ack for a message not sent"));
        }
        self.trim(n);
        Ok(())
    }

    fn trim(&mut self, upto: u64) {
        while self.unacked.front().is_some_and(|m| m.0 <= upto) {
            let (_, plain) = self.unacked.pop_front().expect("checked");
            self.unacked_bytes -= plain.len();
        }
    }
}

fn hex(b: &[u8]) -> String {
    super::hex(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn identity(seed: u64) -> Identity {
        Identity::generate(&mut ChaCha20Rng::seed_from_u64(seed))
    }

    type Middle = Box<dyn FnMut(bool, Vec<u8>) -> Vec<u8>>;

    /// Two streams over an in-memory pipe that can be cut; `middle` rewrites each line in
    /// flight (`true`: from `a`).
    struct Pair {
        a: EncryptedStream,
        b: EncryptedStream,
        a_id: Identity,
        b_id: Identity,
        now: Instant,
        chunk: usize,
        a_events: Vec<StreamEvent>,
        b_events: Vec<StreamEvent>,
        middle: Option<Middle>,
    }

    impl Pair {
        fn new(config: StreamConfig) -> Pair {
            let (a_id, b_id) = (identity(1), identity(2));
            let a = EncryptedStream::new(a_id.clone(), b_id.fingerprint(), Role::Initiator, 10, config.clone());
            let b = EncryptedStream::new(b_id.clone(), a_id.fingerprint(), Role::Responder, 20, config);
            Pair { a, b, a_id, b_id, now: crate::test_epoch(), chunk: 7, a_events: vec![], b_events: vec![], middle: None }
        }

        fn connect(&mut self) {
            self.a.handle_connected(self.now);
            self.b.handle_connected(self.now);
        }

        fn cut(&mut self) {
            self.a.handle_disconnected(self.now);
            self.b.handle_disconnected(self.now);
            self.drain();
        }

        /// Waits for the reconnect deadline of both sides and connects again.
        fn reconnect(&mut self) {
            let t = self.a.poll_timeout().max(self.b.poll_timeout()).expect("a deadline");
            self.now = t;
            self.a.handle_timeout(t);
            self.b.handle_timeout(t);
            self.drain();
            assert!(matches!(self.a_events.last(), Some(StreamEvent::Reconnect { attempt: 1 })));
            self.connect();
        }

        fn drain(&mut self) {
            while let Some(e) = self.a.poll_event() {
                self.a_events.push(e);
            }
            while let Some(e) = self.b.poll_event() {
                self.b_events.push(e);
            }
        }

        /// Moves up to `limit` lines each way, in chunks of `chunk` bytes.
        fn step(&mut self, limit: usize) -> usize {
            let mut moved = 0;
            for from_a in [true, false] {
                for _ in 0..limit {
                    let line = if from_a { self.a.poll_transmit() } else { self.b.poll_transmit() };
                    let Some(mut line) = line else { break };
                    if let Some(m) = &mut self.middle {
                        line = m(from_a, line);
                    }
                    let to = if from_a { &mut self.b } else { &mut self.a };
                    for piece in line.chunks(self.chunk) {
                        to.handle_bytes(self.now, piece);
                    }
                    moved += 1;
                }
            }
            self.drain();
            moved
        }

        fn run(&mut self) {
            while self.step(usize::MAX) > 0 {}
        }
    }

    fn messages(events: &[StreamEvent]) -> Vec<Value> {
        events.iter().filter_map(|e| if let StreamEvent::Message(v) = e { Some(v.clone()) } else { None }).collect()
    }

    fn errors(events: &[StreamEvent]) -> Vec<StreamError> {
        events.iter().filter_map(|e| if let StreamEvent::Error(x) = e { Some(x.clone()) } else { None }).collect()
    }

    fn count(events: &[StreamEvent], f: fn(&StreamEvent) -> bool) -> usize {
        events.iter().filter(|e| f(e)).count()
    }

    fn decode_all(d: &mut NdjsonDecoder) -> Vec<Result<Value, NdjsonError>> {
        std::iter::from_fn(|| d.poll_message()).collect()
    }

    #[test]
    fn ndjson_lines_split_anywhere_decode_whole_even_inside_a_utf8_character() {
        let mut bytes = encode_line(&json!({"k": "é€😀", "n": [1, 2]})).unwrap();
        bytes.extend(encode_line(&json!("two")).unwrap());
        let mut d = NdjsonDecoder::new();
        let mut out = vec![];
        for b in &bytes {
            d.handle_bytes(std::slice::from_ref(b));
            out.extend(decode_all(&mut d));
        }
        assert_eq!(out, vec![Ok(json!({"k": "é€😀", "n": [1, 2]})), Ok(json!("two"))]);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn ndjson_skips_blank_lines_and_accepts_crlf() {
        let mut d = NdjsonDecoder::new();
        d.handle_bytes(b"\n\r\n  \n{\"a\":1}\r\n\n[2]\n");
        assert_eq!(decode_all(&mut d), vec![Ok(json!({"a": 1})), Ok(json!([2]))]);
    }

    #[test]
    fn ndjson_bad_line_is_one_error_and_the_next_line_decodes() {
        let mut d = NdjsonDecoder::new();
        d.handle_bytes(b"{\"a\":\n\xff\xfe\n{\"b\":2}\n");
        let out = decode_all(&mut d);
        assert!(matches!(out[0], Err(NdjsonError::Json(_))));
        assert_eq!(out[1], Err(NdjsonError::Utf8));
        assert_eq!(out[2], Ok(json!({"b": 2})));
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn ndjson_oversize_line_is_skipped_to_its_newline() {
        // Complete in one chunk.
        let mut d = NdjsonDecoder::with_max_line(16);
        d.handle_bytes(format!("\"{}\"\n[1]\n", "x".repeat(40)).as_bytes());
        assert_eq!(decode_all(&mut d), vec![Err(NdjsonError::LineTooLong { max: 16 }), Ok(json!([1]))]);
        // Arriving in pieces: refused before its end comes, one error, then the next line.
        let mut d = NdjsonDecoder::with_max_line(16);
        let mut out = vec![];
        for _ in 0..100 {
            d.handle_bytes(b"xxxxxxxxxx");
            out.extend(decode_all(&mut d));
            assert!(d.buffered() <= 16 + 1 + 10);
        }
        d.handle_bytes(b"xx\n{\"ok\":true}\n");
        out.extend(decode_all(&mut d));
        assert_eq!(out, vec![Err(NdjsonError::LineTooLong { max: 16 }), Ok(json!({"ok": true}))]);
        // Exactly the limit, with CRLF, is fine.
        let mut d = NdjsonDecoder::with_max_line(16);
        d.handle_bytes(format!("\"{}\"\r\n", "y".repeat(14)).as_bytes());
        assert_eq!(decode_all(&mut d), vec![Ok(json!("y".repeat(14)))]);
    }

    #[test]
    fn messages_both_ways_arrive_in_order_and_are_acknowledged() {
        let mut p = Pair::new(StreamConfig::default());
        p.connect();
        p.run();
        assert_eq!(count(&p.a_events, |e| matches!(e, StreamEvent::Established { .. })), 1);
        assert_eq!(count(&p.b_events, |e| matches!(e, StreamEvent::Established { .. })), 1);
        assert_eq!(p.a.session_id(), p.b.session_id());
        for i in 0..20 {
            assert_eq!(p.a.send(&json!({"from": "a", "i": i})).unwrap(), i + 1);
            p.b.send(&json!({"from": "b", "i": i})).unwrap();
            if i % 3 == 0 {
                p.step(2);
            }
        }
        p.run();
        assert_eq!(messages(&p.b_events), (0..20).map(|i| json!({"from": "a", "i": i})).collect::<Vec<_>>());
        assert_eq!(messages(&p.a_events), (0..20).map(|i| json!({"from": "b", "i": i})).collect::<Vec<_>>());
        assert_eq!(p.a.unacked(), (0, 0));
        assert_eq!(p.b.unacked(), (0, 0));
        assert!(errors(&p.a_events).is_empty() && errors(&p.b_events).is_empty());
    }

    #[test]
    fn messages_sent_before_the_exchange_wait_for_it() {
        let mut p = Pair::new(StreamConfig::default());
        p.a.send(&json!(1)).unwrap();
        p.b.send(&json!(2)).unwrap();
        assert_eq!(p.a.poll_transmit(), None);
        p.connect();
        p.run();
        assert_eq!(messages(&p.b_events), vec![json!(1)]);
        assert_eq!(messages(&p.a_events), vec![json!(2)]);
    }

    /// Rewrites the sealed part of `m` frames.
    fn tamper_messages(from_a: bool, line: Vec<u8>) -> Vec<u8> {
        let mut v: Value = serde_json::from_slice(&line).unwrap();
        if from_a && v["t"] == "m" {
            let mut d = unb64(v["d"].as_str().unwrap()).unwrap();
            let last = d.len() - 1;
            d[last] ^= 1;
            v["d"] = json!(b64(&d));
        }
        encode_line(&v).unwrap()
    }

    #[test]
    fn tampered_message_is_an_error_and_nothing_is_delivered() {
        let mut p = Pair::new(StreamConfig::default());
        p.connect();
        p.run();
        p.middle = Some(Box::new(tamper_messages));
        p.a.send(&json!({"secret": 1})).unwrap();
        p.run();
        assert!(messages(&p.b_events).is_empty());
        assert_eq!(errors(&p.b_events), vec![StreamError::E2e(E2eError::Decrypt)]);
        // A frame with another message number under the same seal does not open either.
        p.middle = Some(Box::new(|from_a, line| {
            let mut v: Value = serde_json::from_slice(&line).unwrap();
            if from_a && v["t"] == "m" {
                v["n"] = json!(v["n"].as_u64().unwrap() + 5);
            }
            encode_line(&v).unwrap()
        }));
        p.a.send(&json!({"secret": 2})).unwrap();
        p.run();
        assert!(messages(&p.b_events).is_empty());
        assert_eq!(errors(&p.b_events).len(), 2);
    }

    #[test]
    fn cuts_with_messages_in_flight_resume_and_deliver_each_message_once_in_order() {
        let mut p = Pair::new(StreamConfig::default());
        p.connect();
        p.run();
        let session = p.a.session_id();
        let mut sent = 0;
        for round in 0..6 {
            for _ in 0..7 {
                p.a.send(&json!(sent)).unwrap();
                p.b.send(&json!(-sent)).unwrap();
                sent += 1;
            }
            // Some lines (messages, acks) get through, the rest is lost with the connection.
            p.step(round % 3 + 1);
            p.cut();
            // Sent while disconnected: kept for later.
            p.a.send(&json!(sent)).unwrap();
            p.b.send(&json!(-sent)).unwrap();
            sent += 1;
            p.reconnect();
            p.step(1 + round % 2);
            if round % 2 == 1 {
                p.cut();
                p.reconnect();
            }
        }
        p.run();
        assert_eq!(messages(&p.b_events), (0..sent).map(|i| json!(i)).collect::<Vec<_>>());
        assert_eq!(messages(&p.a_events), (0..sent).map(|i| json!(-i)).collect::<Vec<_>>());
        assert_eq!(p.a.session_id(), session, "every reconnect resumed the same session");
        assert_eq!(count(&p.a_events, |e| matches!(e, StreamEvent::Established { .. })), 1);
        assert_eq!(count(&p.a_events, |e| matches!(e, StreamEvent::Resumed { .. })), 9);
        assert_eq!(count(&p.b_events, |e| matches!(e, StreamEvent::Disconnected)), 9);
        assert!(errors(&p.a_events).is_empty() && errors(&p.b_events).is_empty(), "{:?} {:?}", p.a_events, p.b_events);
        assert_eq!(p.a.unacked(), (0, 0));
        assert_eq!(p.b.unacked(), (0, 0));
    }

    #[test]
    fn a_side_that_lost_its_session_runs_a_new_exchange_and_nothing_is_lost() {
        for forgetful in [false, true] {
            let mut p = Pair::new(StreamConfig::default());
            p.connect();
            p.run();
            let first = p.a.session_id().unwrap();
            for i in 0..10 {
                p.a.send(&json!(i)).unwrap();
                p.b.send(&json!(-i)).unwrap();
            }
            p.step(3);
            p.cut();
            if forgetful { p.a.forget_session() } else { p.b.forget_session() }
            p.reconnect();
            p.run();
            let second = p.a.session_id().unwrap();
            assert_ne!(first, second);
            assert_eq!(p.b.session_id(), Some(second));
            assert_eq!(count(&p.b_events, |e| matches!(e, StreamEvent::Established { .. })), 2);
            assert_eq!(messages(&p.b_events), (0..10).map(|i| json!(i)).collect::<Vec<_>>());
            assert_eq!(messages(&p.a_events), (0..10).map(|i| json!(-i)).collect::<Vec<_>>());
            assert_eq!(p.a.unacked(), (0, 0));
        }
    }

    #[test]
    fn a_restarted_peer_gets_every_unacknowledged_message_and_is_counted_afresh() {
        let mut p = Pair::new(StreamConfig::default());
        p.connect();
        p.run();
        for i in 0..3 {
            p.b.send(&json!(-i)).unwrap();
        }
        p.run();
        for i in 0..5 {
            p.a.send(&json!(i)).unwrap();
        }
        p.cut();
        // b restarts: same identity, no session, no stream state, another seed.
        p.b = EncryptedStream::new(p.b_id.clone(), p.a_id.fingerprint(), Role::Responder, 21, StreamConfig::default());
        p.b_events.clear();
        p.reconnect();
        p.b.send(&json!("new b")).unwrap();
        p.run();
        assert_eq!(messages(&p.b_events), (0..5).map(|i| json!(i)).collect::<Vec<_>>());
        // Its message 1 is not taken for the old incarnation's message 1.
        assert_eq!(messages(&p.a_events), vec![json!(0), json!(-1), json!(-2), json!("new b")]);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps_at_the_maximum() {
        let mut p = Pair::new(StreamConfig::default());
        p.connect();
        p.run();
        let t0 = p.now;
        p.a.handle_disconnected(t0);
        let mut now = t0;
        let mut delays = vec![];
        for attempt in 0..10u32 {
            let deadline = p.a.poll_timeout().unwrap();
            let delay = deadline - now;
            let base = Duration::from_secs((1u64 << attempt).min(30));
            assert!(delay <= base && delay >= base.mul_f64(0.8), "attempt {attempt}: {delay:?}");
            delays.push(delay);
            // A spurious timer does nothing.
            p.a.handle_timeout(deadline - Duration::from_millis(1));
            assert_eq!(p.a.poll_timeout(), Some(deadline));
            now = deadline;
            p.a.handle_timeout(now);
            assert!(p.a.poll_timeout().unwrap() > now, "the deadline moves forward");
        }
        assert!(delays.windows(2).take(4).all(|w| w[1] > w[0]), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(30)));
        let reconnects: Vec<_> = std::iter::from_fn(|| p.a.poll_event()).filter_map(|e| if let StreamEvent::Reconnect { attempt } = e { Some(attempt) } else { None }).collect();
        assert_eq!(reconnects, (1..=10).collect::<Vec<_>>());
        // Connecting clears the schedule; a second disconnect starts again at 1 s.
        p.a.handle_connected(now);
        assert_eq!(p.a.poll_timeout(), None);
        p.a.handle_disconnected(now);
        assert!(p.a.poll_timeout().unwrap() - now <= Duration::from_secs(1));
        // Disconnected twice: the schedule is not restarted.
        let deadline = p.a.poll_timeout();
        p.a.handle_disconnected(now + Duration::from_millis(500));
        assert_eq!(p.a.poll_timeout(), deadline);
        // The responder waits for the next connection: no schedule, no reconnect events.
        assert_eq!(p.b.poll_timeout(), None);
        p.b.handle_disconnected(now);
        assert_eq!(p.b.poll_timeout(), None);
        assert!(std::iter::from_fn(|| p.b.poll_event()).all(|e| !matches!(e, StreamEvent::Reconnect { .. } | StreamEvent::GaveUp)));
    }

    #[test]
    fn a_first_dial_that_fails_starts_the_schedule() {
        let config = StreamConfig { max_attempts: Some(2), ..Default::default() };
        let mut a = EncryptedStream::new(identity(1), identity(2).fingerprint(), Role::Initiator, 5, config);
        let t0 = crate::test_epoch();
        assert_eq!(a.poll_timeout(), None);
        a.handle_disconnected(t0);
        let first = a.poll_timeout().expect("a failed first dial schedules the next");
        assert!(first > t0 && first - t0 <= Duration::from_secs(1));
        assert_eq!(a.poll_event(), None, "nothing was connected: no Disconnected");
        let mut events = vec![];
        while let Some(t) = a.poll_timeout() {
            a.handle_timeout(t);
            // Each dial fails too: the schedule goes on, not restarted.
            a.handle_disconnected(t);
            assert!(a.poll_timeout().is_none_or(|n| n > t));
            events.extend(std::iter::from_fn(|| a.poll_event()));
        }
        assert_eq!(events, vec![StreamEvent::Reconnect { attempt: 1 }, StreamEvent::Reconnect { attempt: 2 }, StreamEvent::GaveUp]);
        // After giving up, a failed dial does not start it again.
        a.handle_disconnected(t0 + Duration::from_secs(100));
        assert_eq!(a.poll_timeout(), None);
    }

    #[test]
    fn after_max_attempts_the_stream_gives_up() {
        let config = StreamConfig { max_attempts: Some(3), ..Default::default() };
        let mut p = Pair::new(config);
        p.connect();
        p.run();
        p.a.handle_disconnected(p.now);
        let mut events = vec![];
        while let Some(t) = p.a.poll_timeout() {
            p.a.handle_timeout(t);
            events.extend(std::iter::from_fn(|| p.a.poll_event()));
        }
        assert_eq!(
            events,
            vec![StreamEvent::Disconnected, StreamEvent::Reconnect { attempt: 1 }, StreamEvent::Reconnect { attempt: 2 }, StreamEvent::Reconnect { attempt: 3 }, StreamEvent::GaveUp]
        );
        assert_eq!(p.a.send(&json!(1)), Err(StreamError::Closed));
    }

    /// Replaces the ephemeral key in the offer with another valid one.
    fn swap_offer_key(from_a: bool, line: Vec<u8>) -> Vec<u8> {
        let mut v: Value = serde_json::from_slice(&line).unwrap();
        if from_a && v["t"] == "kx" {
            let mut d = unb64(v["d"].as_str().unwrap()).unwrap();
            if d[1] == 1 {
                let mut other = GroupKeyManager::new(identity(99), 99);
                let offer = other.exchange_with(Fingerprint::from_bytes([7; 32])).unwrap();
                d[34..99].copy_from_slice(&offer[34..99]);
                v["d"] = json!(b64(&d));
            }
        }
        encode_line(&v).unwrap()
    }

    #[test]
    fn a_middle_that_swaps_key_exchange_lines_is_caught() {
        // Another key in the offer: the responder's signature covers the wrong key.
        let mut p = Pair::new(StreamConfig::default());
        p.middle = Some(Box::new(swap_offer_key));
        p.a.send(&json!("secret")).unwrap();
        p.connect();
        p.run();
        assert!(matches!(errors(&p.a_events)[..], [StreamError::E2e(E2eError::BadSignature(_))]), "{:?}", p.a_events);
        assert!(p.a_events.iter().chain(&p.b_events).all(|e| !matches!(e, StreamEvent::Established { .. } | StreamEvent::Message(_))));
        assert!(!p.a.is_ready() && !p.b.is_ready());

        // The middle answers a's offer with an impostor's answer in place of b's.
        let mut p = Pair::new(StreamConfig::default());
        let a_fp = p.a_id.fingerprint();
        let mut impostor = GroupKeyManager::new(identity(66), 66);
        let mut fake = None;
        p.middle = Some(Box::new(move |from_a, line| {
            let v: Value = serde_json::from_slice(&line).unwrap();
            if v["t"] != "kx" {
                return line;
            }
            let d = unb64(v["d"].as_str().unwrap()).unwrap();
            if from_a && d[1] == 1 {
                fake = impostor.handle_incoming_key_exchange(a_fp, &d).unwrap();
            }
            if !from_a && d[1] == 2 {
                return encode_line(&json!({"t": "kx", "d": b64(fake.as_ref().unwrap())})).unwrap();
            }
            line
        }));
        p.a.send(&json!("secret")).unwrap();
        p.b.send(&json!("secret")).unwrap();
        p.connect();
        p.run();
        assert_eq!(errors(&p.a_events), vec![StreamError::E2e(E2eError::WrongPeer { expected: p.b_id.fingerprint() })]);
        assert!(p.a_events.iter().chain(&p.b_events).all(|e| !matches!(e, StreamEvent::Established { .. } | StreamEvent::Message(_))));
        assert!(!p.a.is_ready() && !p.b.is_ready());
    }

    #[test]
    fn sending_beyond_the_buffer_would_block_until_acknowledged() {
        let config = StreamConfig { max_unacked_messages: 3, max_unacked_bytes: 100, ..Default::default() };
        let mut p = Pair::new(config);
        for i in 0..3 {
            p.a.send(&json!(i)).unwrap();
        }
        assert_eq!(p.a.send(&json!(3)), Err(StreamError::WouldBlock { messages: 3, bytes: 3 }));
        p.connect();
        p.run();
        assert_eq!(messages(&p.b_events).len(), 3);
        assert_eq!(p.a.unacked(), (0, 0));
        assert_eq!(p.a.send(&json!("x".repeat(120))), Err(StreamError::WouldBlock { messages: 0, bytes: 0 }));
        assert_eq!(p.a.send(&json!(3)), Ok(4));
        let small = StreamConfig { max_line: 64, ..Default::default() };
        let mut s = EncryptedStream::new(identity(1), identity(2).fingerprint(), Role::Initiator, 1, small);
        assert!(matches!(s.send(&json!("y".repeat(64))), Err(StreamError::TooLarge { .. })));
    }
}
