//! End-to-end encryption between peers: ephemeral P-256 ECDH, HKDF-SHA256 and AES-256-GCM.
//!
//! - [`E2e`] is the low-level layer of the reference (`getPublicKeyB64`, `deriveKey`,
//!   `encrypt`, `decrypt`, `hasKey`, `removeKey`, `destroy`): an ephemeral key pair and a
//!   [`Session`] per peer. Its [`E2e::derive_key`] trusts the public key it is given, so the
//!   key must come over an authenticated path.
//! - [`GroupKeyManager`] runs the authenticated exchange ([`exchange`]): each side's ephemeral
//!   key is signed by its identity key together with both fingerprints, both ephemeral keys
//!   and a fresh nonce from the other side, and both sides confirm the derived keys before a
//!   message is sent. A server that swaps keys, replays an old exchange or forwards someone
//!   else's is caught at the handshake.
//!
//! # Key schedule
//!
//! `prk = HKDF-Extract(salt, ECDH(x))`; then, with `context = "peerlink e2e/1" || version ||
//! initiator fingerprint || responder fingerprint || initiator ephemeral key || responder
//! ephemeral key` (keys as 65-byte SEC1 points), `HKDF-Expand(prk, context || label)` gives a
//! traffic secret per direction (`"i2r"`, `"r2i"`), a confirmation key per role and the
//! session id. Each direction's secret gives the AES-256-GCM key of epoch 0 (`"key"`) and the
//! next epoch's secret (`"next"`), which replaces it (and the old one is zeroized): rekeying
//! keeps forward secrecy between epochs.
//!
//! # Messages
//!
//! `version (1) || session id (8) || epoch (4, BE) || counter (8, BE) || ciphertext || tag (16)`.
//! The nonce is `epoch || counter`: a counter per direction and key, never random, never
//! reused. The header is authenticated along with the caller's associated data. The sender
//! moves to the next epoch after [`Limits::messages_per_key`] messages (default 2^24, as TLS
//! 1.3 for AES-GCM, far below NIST SP 800-38D's 2^32 invocations) or
//! [`Limits::bytes_per_key`] bytes. A receiver accepts a message once: a sliding window of
//! [`REPLAY_WINDOW`] counters accepts reordering inside it and refuses replays and anything
//! older; it also decrypts the previous epoch, for messages still in flight at a rekey.

mod aead;
pub mod exchange;
pub mod stream;

use std::collections::BTreeMap;

use aead::AeadKey;
use hkdf::Hkdf;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::identity::Fingerprint;

pub use exchange::{GroupKeyManager, KeyExchangeEvent};

/// The protocol version, in every message and in the key schedule.
pub const VERSION: u8 = 1;
/// The label that starts every key-schedule context and signed message.
pub const LABEL: &[u8] = b"peerlink e2e/1";
/// Counters a receiver remembers behind the newest one.
pub const REPLAY_WINDOW: u64 = 1024;
/// Bytes of header before the ciphertext.
pub const HEADER_LEN: usize = 1 + 8 + 4 + 8;
/// Bytes of authentication tag.
pub const TAG_LEN: usize = 16;
/// Most epochs a receiver moves forward in one step (the sender rekeyed while messages were
/// lost).
const MAX_EPOCH_JUMP: u32 = 4;

/// Why an E2E operation failed. Nothing was decrypted or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum E2eError {
    /// No session with that peer (no key derived, or removed).
    #[error("no key for {0}")]
    NoKey(Fingerprint),
    /// Not a message or handshake message of this protocol.
    #[error("malformed: {0}")]
    Malformed(&'static str),
    /// A version this side does not speak.
    #[error("unknown version {0}")]
    Version(u8),
    /// The message does not authenticate: tampered with, or sealed with another key (another
    /// peer's, another session's with the same id, or for other associated data).
    #[error("the message does not authenticate")]
    Decrypt,
    /// The message was accepted before.
    #[error("message {counter} was received before")]
    Replay {
        /// Its counter.
        counter: u64,
    },
    /// The message is older than the replay window remembers.
    #[error("message {counter} is older than the replay window")]
    TooOld {
        /// Its counter.
        counter: u64,
    },
    /// The message was sealed with a key that is gone: an earlier epoch, or an earlier
    /// session with this peer.
    #[error("message from an old key (session {session}, epoch {epoch})")]
    OldKey {
        /// The session id it names (hex).
        session: String,
        /// Its epoch.
        epoch: u32,
    },
    /// The message belongs to no session this side has had with the peer (it was sealed for
    /// or by someone else).
    #[error("the message is from another session")]
    WrongSession,
    /// [`E2e::derive_key`] with a peer key already used with this key pair: the keys would
    /// repeat.
    #[error("this peer key was used with this key pair before")]
    KeyReused,
    /// A public key is not a valid P-256 point.
    #[error("invalid public key")]
    InvalidPoint,
    /// A handshake signature does not verify, or signs something else.
    #[error("bad signature: {0}")]
    BadSignature(&'static str),
    /// A handshake message carries an identity key that is not the expected peer's.
    #[error("the identity key is not {expected}'s")]
    WrongPeer {
        /// Who it should have been.
        expected: Fingerprint,
    },
    /// Key confirmation failed: the two sides derived different keys.
    #[error("key confirmation failed")]
    Confirmation,
    /// A handshake message that does not fit the exchange under way.
    #[error("unexpected handshake message: {0}")]
    Unexpected(&'static str),
    /// More handshakes under way than allowed.
    #[error("too many key exchanges under way")]
    TooManyExchanges,
}

/// When a sender moves to a new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Messages per key. Default 2^24.
    pub messages_per_key: u64,
    /// Bytes of plaintext per key. Default 2^36 (64 GiB).
    pub bytes_per_key: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { messages_per_key: 1 << 24, bytes_per_key: 1 << 36 }
    }
}

impl Limits {
    /// Custom limits (tests lower them to force rekeying).
    pub fn new(messages_per_key: u64, bytes_per_key: u64) -> Self {
        Limits { messages_per_key: messages_per_key.max(1), bytes_per_key: bytes_per_key.max(1) }
    }
}

/// Which side of an exchange this is; it decides which direction secret is whose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Made the first move.
    Initiator,
    /// Answered.
    Responder,
}

/// Everything the key schedule binds.
pub struct Context<'a> {
    /// The initiator's fingerprint.
    pub initiator: &'a Fingerprint,
    /// The responder's fingerprint.
    pub responder: &'a Fingerprint,
    /// The initiator's ephemeral public key (65-byte SEC1).
    pub initiator_key: &'a [u8; 65],
    /// The responder's ephemeral public key (65-byte SEC1).
    pub responder_key: &'a [u8; 65],
}

impl Context<'_> {
    /// The bytes every derivation and signature starts with.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(LABEL.len() + 1 + 64 + 130);
        b.extend_from_slice(LABEL);
        b.push(VERSION);
        b.extend_from_slice(self.initiator.as_bytes());
        b.extend_from_slice(self.responder.as_bytes());
        b.extend_from_slice(self.initiator_key);
        b.extend_from_slice(self.responder_key);
        b
    }
}

/// Keys that come out of one exchange, before use.
pub struct Derived {
    /// The session, ready for messages.
    pub session: Session,
    /// The initiator's key-confirmation key.
    pub confirm_initiator: Zeroizing<[u8; 32]>,
    /// The responder's key-confirmation key.
    pub confirm_responder: Zeroizing<[u8; 32]>,
}

fn expand(prk: &Hkdf<Sha256>, context: &[u8], label: &[u8], out: &mut [u8]) {
    let mut info = Zeroizing::new(Vec::with_capacity(context.len() + label.len()));
    info.extend_from_slice(context);
    info.extend_from_slice(label);
    prk.expand(&info, out).expect("HKDF-SHA256 expands 32 bytes");
}

/// Runs the key schedule on an ECDH shared secret (see the module docs).
pub fn derive(shared: &[u8], salt: &[u8], context: &Context<'_>, role: Role, limits: Limits) -> Derived {
    let prk = Hkdf::<Sha256>::new(Some(salt), shared);
    let ctx = context.bytes();
    let mut i2r = Zeroizing::new([0u8; 32]);
    let mut r2i = Zeroizing::new([0u8; 32]);
    let mut ci = Zeroizing::new([0u8; 32]);
    let mut cr = Zeroizing::new([0u8; 32]);
    let mut id = [0u8; 8];
    expand(&prk, &ctx, b"i2r", &mut i2r[..]);
    expand(&prk, &ctx, b"r2i", &mut r2i[..]);
    expand(&prk, &ctx, b"confirm initiator", &mut ci[..]);
    expand(&prk, &ctx, b"confirm responder", &mut cr[..]);
    expand(&prk, &ctx, b"session id", &mut id);
    let (send, recv) = match role {
        Role::Initiator => (i2r, r2i),
        Role::Responder => (r2i, i2r),
    };
    Derived { session: Session::new(id, send, recv, limits), confirm_initiator: ci, confirm_responder: cr }
}

/// One epoch's key in one direction.
struct EpochKey {
    epoch: u32,
    /// The secret this epoch's key came from (and the next epoch's secret will).
    secret: Zeroizing<[u8; 32]>,
    cipher: AeadKey,
}

impl EpochKey {
    fn new(epoch: u32, secret: Zeroizing<[u8; 32]>) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        let hk = Hkdf::<Sha256>::from_prk(&secret[..]).expect("a 32-byte PRK");
        hk.expand(b"peerlink e2e/1 key", &mut key[..]).expect("32 bytes");
        EpochKey { epoch, cipher: AeadKey::new(&key), secret }
    }

    fn next(&self) -> EpochKey {
        let mut secret = Zeroizing::new([0u8; 32]);
        let hk = Hkdf::<Sha256>::from_prk(&self.secret[..]).expect("a 32-byte PRK");
        hk.expand(b"peerlink e2e/1 next", &mut secret[..]).expect("32 bytes");
        EpochKey::new(self.epoch + 1, secret)
    }
}

/// Which counters of one epoch were received.
#[derive(Debug, Clone, Default)]
struct Window {
    /// One more than the highest counter accepted (0: none yet).
    top: u64,
    /// Bit `i` set: counter `top - 1 - i` was accepted.
    bits: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl Window {
    fn check(&self, counter: u64) -> Result<(), E2eError> {
        if counter >= self.top {
            return Ok(());
        }
        let behind = self.top - 1 - counter;
        if behind >= REPLAY_WINDOW {
            return Err(E2eError::TooOld { counter });
        }
        if self.bits[(behind / 64) as usize] & (1 << (behind % 64)) != 0 {
            return Err(E2eError::Replay { counter });
        }
        Ok(())
    }

    fn mark(&mut self, counter: u64) {
        if counter >= self.top {
            let shift = counter + 1 - self.top;
            self.shift(shift);
            self.top = counter + 1;
        }
        let behind = self.top - 1 - counter;
        self.bits[(behind / 64) as usize] |= 1 << (behind % 64);
    }

    fn shift(&mut self, n: u64) {
        if n >= REPLAY_WINDOW {
            self.bits = Default::default();
            return;
        }
        let (words, bits) = ((n / 64) as usize, (n % 64) as u32);
        let len = self.bits.len();
        for i in (0..len).rev() {
            let src = i.checked_sub(words);
            let hi = src.map_or(0, |s| self.bits[s]);
            let lo = src.and_then(|s| s.checked_sub(1)).map_or(0, |s| self.bits[s]);
            self.bits[i] = if bits == 0 { hi } else { (hi << bits) | (lo >> (64 - bits)) };
        }
    }
}

/// Keys and counters for messages with one peer, both ways. Zeroized when dropped.
pub struct Session {
    id: [u8; 8],
    limits: Limits,
    send: EpochKey,
    sent_messages: u64,
    sent_bytes: u64,
    recv: EpochKey,
    recv_window: Window,
    /// The previous receiving epoch, for messages sealed before a rekey and still in flight.
    prev: Option<(EpochKey, Window)>,
    /// Ids of the sessions with this peer that this one replaced (the latest few).
    retired: Vec<[u8; 8]>,
}

impl Session {
    fn new(id: [u8; 8], send: Zeroizing<[u8; 32]>, recv: Zeroizing<[u8; 32]>, limits: Limits) -> Self {
        Session {
            id,
            limits,
            send: EpochKey::new(0, send),
            sent_messages: 0,
            sent_bytes: 0,
            recv: EpochKey::new(0, recv),
            recv_window: Window::default(),
            prev: None,
            retired: Vec::new(),
        }
    }

    /// Remembers the ids of `old` (which this session replaces), so that its messages are
    /// told apart from strangers'.
    pub(crate) fn retire(&mut self, old: Session) {
        self.retired = old.retired;
        self.retired.push(old.id);
        if self.retired.len() > 8 {
            self.retired.remove(0);
        }
    }

    /// Returns the session id (both sides have the same).
    pub fn id(&self) -> [u8; 8] {
        self.id
    }

    /// Returns the epoch messages are sealed in now.
    pub fn send_epoch(&self) -> u32 {
        self.send.epoch
    }

    /// Seals `plaintext` with `aad` (authenticated, not sent).
    pub fn encrypt(&mut self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        self.encrypt_into(&mut out, plaintext, aad);
        out
    }

    /// Seals `plaintext` with `aad` and appends the message to `out` (what is in `out`
    /// already stays, unauthenticated: a frame header, say). Encrypts in place: the
    /// plaintext is copied once, into `out`.
    pub fn encrypt_into(&mut self, out: &mut Vec<u8>, plaintext: &[u8], aad: &[u8]) {
        if self.sent_messages >= self.limits.messages_per_key || self.sent_bytes.saturating_add(plaintext.len() as u64) > self.limits.bytes_per_key {
            self.send = self.send.next();
            self.sent_messages = 0;
            self.sent_bytes = 0;
        }
        let counter = self.sent_messages;
        self.sent_messages += 1;
        self.sent_bytes += plaintext.len() as u64;
        out.reserve(HEADER_LEN + plaintext.len() + TAG_LEN);
        let start = out.len();
        out.push(VERSION);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.send.epoch.to_be_bytes());
        out.extend_from_slice(&counter.to_be_bytes());
        let nonce = nonce(self.send.epoch, counter);
        let mut aad_arr = [0u8; HEADER_LEN + 64];
        let aad_buf: Vec<u8>;
        let full_aad: &[u8] = if aad.len() <= 64 {
            aad_arr[..HEADER_LEN].copy_from_slice(&out[start..]);
            aad_arr[HEADER_LEN..HEADER_LEN + aad.len()].copy_from_slice(aad);
            &aad_arr[..HEADER_LEN + aad.len()]
        } else {
            aad_buf = [&out[start..], aad].concat();
            &aad_buf
        };
        let body = out.len();
        out.extend_from_slice(plaintext);
        let tag = self.send.cipher.seal(nonce, full_aad, &mut out[body..]);
        out.extend_from_slice(&tag);
    }

    /// An independent session for another stream of messages with the same peer: its own
    /// keys (derived from this session's current ones and `lane`), counters and replay
    /// window, and the same id. Messages of one lane never open in another. Both sides must
    /// fork at the same point, before either seals anything under this session (a session
    /// that rekeyed forks from its current epoch).
    pub fn fork(&self, lane: &[u8]) -> Session {
        let branch = |key: &EpochKey| {
            let mut secret = Zeroizing::new([0u8; 32]);
            let hk = Hkdf::<Sha256>::from_prk(&key.secret[..]).expect("a 32-byte PRK");
            hk.expand_multi_info(&[b"peerlink e2e/1 lane ", lane], &mut secret[..]).expect("32 bytes");
            secret
        };
        Session::new(self.id, branch(&self.send), branch(&self.recv), self.limits)
    }

    /// Opens a message sealed by the peer with the same `aad`; each is accepted once.
    pub fn decrypt(&mut self, message: &[u8], aad: &[u8]) -> Result<Vec<u8>, E2eError> {
        let header = Header::parse(message)?;
        let mut body = message[HEADER_LEN..].to_vec();
        let len = self.open(&header, &mut body, aad)?;
        body.truncate(len);
        Ok(body)
    }

    /// Opens a message in place: returns where in `message` the plaintext is. On an error
    /// other than a refusal before decryption (replay, old key, wrong session, malformed),
    /// `message` holds garbage.
    pub fn decrypt_in_place(&mut self, message: &mut [u8], aad: &[u8]) -> Result<std::ops::Range<usize>, E2eError> {
        let header = Header::parse(message)?;
        let len = self.open(&header, &mut message[HEADER_LEN..], aad)?;
        Ok(HEADER_LEN..HEADER_LEN + len)
    }

    /// Opens `body` (ciphertext and tag) under `header` in place; returns the plaintext's
    /// length.
    fn open(&mut self, header: &Header, body: &mut [u8], aad: &[u8]) -> Result<usize, E2eError> {
        let Header { id, epoch, counter, bytes } = *header;
        let old = || E2eError::OldKey { session: hex(&id), epoch };
        if id != self.id {
            return Err(if self.retired.contains(&id) { old() } else { E2eError::WrongSession });
        }
        let mut aad_arr = [0u8; HEADER_LEN + 64];
        let aad_buf: Vec<u8>;
        let full_aad: &[u8] = if aad.len() <= 64 {
            aad_arr[..HEADER_LEN].copy_from_slice(&bytes);
            aad_arr[HEADER_LEN..HEADER_LEN + aad.len()].copy_from_slice(aad);
            &aad_arr[..HEADER_LEN + aad.len()]
        } else {
            aad_buf = [&bytes[..], aad].concat();
            &aad_buf
        };
        let nonce = nonce(epoch, counter);
        // The current epoch, the previous one, or one a little ahead (the sender rekeyed).
        if epoch == self.recv.epoch {
            self.recv_window.check(counter)?;
            let len = self.recv.cipher.open(nonce, full_aad, body).map_err(|()| E2eError::Decrypt)?;
            self.recv_window.mark(counter);
            return Ok(len);
        }
        if let Some((key, window)) = &mut self.prev {
            if key.epoch == epoch {
                window.check(counter)?;
                let len = key.cipher.open(nonce, full_aad, body).map_err(|()| E2eError::Decrypt)?;
                window.mark(counter);
                return Ok(len);
            }
        }
        if epoch > self.recv.epoch && epoch - self.recv.epoch <= MAX_EPOCH_JUMP {
            let mut key = self.recv.next();
            let mut skipped: Option<EpochKey> = None;
            while key.epoch < epoch {
                let next = key.next();
                skipped = Some(std::mem::replace(&mut key, next));
            }
            let len = key.cipher.open(nonce, full_aad, body).map_err(|()| E2eError::Decrypt)?;
            // Authentic: move on. The epoch just before this one stays for stragglers: the
            // current one with its window, or (after a jump) a skipped one, never received.
            let mut window = Window::default();
            window.mark(counter);
            let previous = std::mem::replace(&mut self.recv, key);
            let previous_window = std::mem::replace(&mut self.recv_window, window);
            self.prev = Some(match skipped {
                Some(k) => (k, Window::default()),
                None => (previous, previous_window),
            });
            return Ok(len);
        }
        Err(old())
    }
}

/// A message's header.
#[derive(Clone, Copy)]
struct Header {
    id: [u8; 8],
    epoch: u32,
    counter: u64,
    bytes: [u8; HEADER_LEN],
}

impl Header {
    fn parse(message: &[u8]) -> Result<Header, E2eError> {
        if message.len() < HEADER_LEN + TAG_LEN {
            return Err(E2eError::Malformed("shorter than a header and a tag"));
        }
        if message[0] != VERSION {
            return Err(E2eError::Version(message[0]));
        }
        Ok(Header {
            id: message[1..9].try_into().expect("8 bytes"),
            epoch: u32::from_be_bytes(message[9..13].try_into().expect("4 bytes")),
            counter: u64::from_be_bytes(message[13..21].try_into().expect("8 bytes")),
            bytes: message[..HEADER_LEN].try_into().expect("a header"),
        })
    }
}

fn nonce(epoch: u32, counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&epoch.to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An ephemeral P-256 key pair. The secret is zeroized when dropped.
pub struct EphemeralKey {
    secret: p256::SecretKey,
    public: [u8; 65],
}

impl EphemeralKey {
    /// Makes a key pair from `rng`.
    pub fn generate<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let secret = p256::SecretKey::random(&mut crate::identity::RngShim(rng));
        let mut public = [0u8; 65];
        public.copy_from_slice(secret.public_key().to_encoded_point(false).as_bytes());
        EphemeralKey { secret, public }
    }

    /// Returns the public key, a 65-byte SEC1 point.
    pub fn public(&self) -> &[u8; 65] {
        &self.public
    }

    /// ECDH with a peer's public key (a SEC1 point; the identity and points off the curve
    /// are refused).
    pub fn agree(&self, peer: &[u8]) -> Result<Zeroizing<[u8; 32]>, E2eError> {
        let public = p256::PublicKey::from_sec1_bytes(peer).map_err(|_| E2eError::InvalidPoint)?;
        let shared = p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), public.as_affine());
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(shared.raw_secret_bytes());
        Ok(out)
    }
}

/// The reference's low-level `E2E`: one ephemeral key pair, one [`Session`] per peer.
///
/// [`E2e::derive_key`] binds both fingerprints and both public keys; it does not
/// authenticate the peer's key. Use [`GroupKeyManager`] unless the key came over a path that
/// does.
pub struct E2e {
    me: Fingerprint,
    key: EphemeralKey,
    limits: Limits,
    sessions: BTreeMap<Fingerprint, Session>,
    /// Peer keys each session was derived from (kept until `destroy`).
    used: BTreeMap<Fingerprint, Vec<[u8; 65]>>,
}

impl E2e {
    /// Makes a key pair (the reference's `init`) for node `me`.
    pub fn new<R: rand::CryptoRng + ?Sized>(me: Fingerprint, rng: &mut R) -> Self {
        E2e { me, key: EphemeralKey::generate(rng), limits: Limits::default(), sessions: BTreeMap::new(), used: BTreeMap::new() }
    }

    /// Sets when senders rekey (for sessions derived from now on).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Returns the public key to give the peer (65-byte SEC1).
    pub fn public_key(&self) -> &[u8; 65] {
        self.key.public()
    }

    /// Returns the public key as base64 (the reference's `getPublicKeyB64`).
    pub fn public_key_base64(&self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(self.key.public())
    }

    /// Derives the session with `peer` from its public key. Roles follow the fingerprints
    /// (the smaller is the initiator), so both sides derive the same keys. Deriving again
    /// with the key of the current session does nothing; with a key this `E2e` used before
    /// for that peer it fails with [`E2eError::KeyReused`] (the keys, and so the nonces, would
    /// repeat): make a new `E2e` for a fresh session.
    pub fn derive_key(&mut self, peer: Fingerprint, peer_public: &[u8]) -> Result<(), E2eError> {
        let shared = self.key.agree(peer_public)?;
        let theirs: [u8; 65] = peer_public.try_into().map_err(|_| E2eError::InvalidPoint)?;
        let (role, context) = if self.me < peer {
            (Role::Initiator, Context { initiator: &self.me, responder: &peer, initiator_key: self.key.public(), responder_key: &theirs })
        } else {
            (Role::Responder, Context { initiator: &peer, responder: &self.me, initiator_key: &theirs, responder_key: self.key.public() })
        };
        // The key pair lives as long as this `E2e`, and the schedule has no fresh input here:
        // the same peer key would give the same keys again, counters from 0 (nonce reuse).
        let used = self.used.entry(peer).or_default();
        if used.last() == Some(&theirs) && self.sessions.contains_key(&peer) {
            return Ok(());
        }
        if used.contains(&theirs) {
            return Err(E2eError::KeyReused);
        }
        used.push(theirs);
        let derived = derive(&shared[..], b"", &context, role, self.limits);
        let mut session = derived.session;
        if let Some(old) = self.sessions.remove(&peer) {
            session.retire(old);
        }
        self.sessions.insert(peer, session);
        Ok(())
    }

    /// Seals a message for `peer`.
    pub fn encrypt(&mut self, peer: &Fingerprint, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, E2eError> {
        Ok(self.sessions.get_mut(peer).ok_or(E2eError::NoKey(*peer))?.encrypt(plaintext, aad))
    }

    /// Opens a message from `peer`.
    pub fn decrypt(&mut self, peer: &Fingerprint, message: &[u8], aad: &[u8]) -> Result<Vec<u8>, E2eError> {
        self.sessions.get_mut(peer).ok_or(E2eError::NoKey(*peer))?.decrypt(message, aad)
    }

    /// Whether a session with `peer` exists.
    pub fn has_key(&self, peer: &Fingerprint) -> bool {
        self.sessions.contains_key(peer)
    }

    /// Forgets the session with `peer` (its keys are zeroized).
    pub fn remove_key(&mut self, peer: &Fingerprint) -> bool {
        self.sessions.remove(peer).is_some()
    }

    /// Forgets every session (the reference's `destroy`); the key pair goes when this is
    /// dropped.
    pub fn destroy(&mut self) {
        self.sessions.clear();
    }
}

#[cfg(test)]
mod tests;
