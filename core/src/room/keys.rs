//! End-to-end encryption for encrypted rooms ([`RoomOptions::encrypted`](super::RoomOptions::encrypted)): one
//! [`GroupKeyManager`] per node, a session with every peer it shares an encrypted room with.
//!
//! - **Key exchange.** When a peer becomes a member of an encrypted room this node is in, the
//!   side with the smaller fingerprint offers (the other offers too if nothing came within
//!   [`RESPONDER_WAIT`]; the exchange settles glare). The four `e2e/1` messages travel as
//!   relay payloads `{"peerlink":"e2e/1","m":"<base64>"}` through the signaling server: they
//!   are signed and confirmed end to end, so the server sees public values only. Lost ones
//!   go again ([`GroupKeyManager::retransmission`]) after 1 s, doubling to 8 s; an initiator
//!   still unconfirmed after [`MAX_RETRIES`] tries starts over.
//! - **Room batches.** A batch carrying an item of an encrypted room is sealed whole under
//!   the session (associated data `"peerlink room/1"`) and sent as `{"z":"<base64>"}` on the
//!   direct path or, signed as usual, through the relay. Items of an encrypted room wait
//!   until the session is confirmed; a plaintext item for an encrypted room is refused.
//!   Every send seals afresh, so the rooms' resends never repeat a counter.
//! - **Transfers.** With a peer that shares an encrypted room, transfer messages are sealed
//!   in a lane of their own ([`Session::fork`] `"xfer/1"`: its own counters and replay
//!   window, so room traffic never pushes chunks out of the window) as binary frames
//!   `0xE2, kind, sealed` (kind 0: a control message, 1: a chunk; associated data
//!   `"peerlink xfer/1"` and the kind). Until the session is confirmed the channel reports
//!   itself full (the transfers wait, then go on by themselves).
//! - **Membership.** Keys follow members: a peer that leaves every encrypted room is
//!   forgotten (its keys zeroized); one that comes back (a new session of its own) starts a
//!   new exchange. A sealed message this side cannot open for want of a session (the peer
//!   restarted, or lost the confirm) starts one too, at most every [`RECOVERY_SPACING`].
//!
//! Bounds: one exchange and two transfer lanes per peer; the relay outbox holds what one
//! flush produced and is emptied by it (what the client refuses is sent again on the
//! retransmission timer).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::e2e::{E2eError, GroupKeyManager, KeyExchangeEvent, Session};
use crate::identity::{Fingerprint, Identity};

/// Marks a relay payload as a key-exchange message.
pub(crate) const TAG: &str = "e2e/1";
/// First byte of a sealed transfer frame (a plaintext chunk starts with `0xC7`, control
/// messages are text).
pub(crate) const SEALED_FRAME: u8 = 0xE2;
/// Sealed transfer frame kinds.
pub(crate) const FRAME_TEXT: u8 = 0;
/// A sealed chunk frame.
pub(crate) const FRAME_BINARY: u8 = 1;
const ROOM_AAD: &[u8] = b"peerlink room/1";
const XFER_LANE: &[u8] = b"xfer/1";
/// How long the larger fingerprint waits for the smaller's offer before offering itself.
pub const RESPONDER_WAIT: Duration = Duration::from_secs(3);
/// Least time between two exchanges started to recover from a message that did not open.
pub const RECOVERY_SPACING: Duration = Duration::from_secs(5);
/// Retransmissions of one exchange message before the exchange starts over.
pub const MAX_RETRIES: u32 = 6;
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(8);

/// What happened to end-to-end encryption with a peer; arrives as
/// [`NodeEvent::Encryption`](crate::NodeEvent::Encryption).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncryptionEvent {
    /// Both sides hold a session: room messages and transfers to `peer` are sealed from now
    /// on (what waited goes now). A new session (after either side restarted) says so again.
    Ready {
        /// The peer.
        peer: Fingerprint,
        /// The session id.
        session: [u8; 8],
    },
    /// Something from `peer` was refused and nothing of it delivered: a key-exchange message
    /// that does not verify (a swapped key, a signature for something else: the server or
    /// someone on the path tampered with it), or a sealed message that does not open.
    Refused {
        /// The sender.
        peer: Fingerprint,
        /// Why.
        error: E2eError,
    },
}

#[derive(Default)]
struct PeerKeys {
    /// When to look at the exchange again (send its message again, or start one).
    retry: Option<(Instant, Duration)>,
    /// Retransmissions of the current exchange message.
    retries: u32,
    /// When this side last started an exchange.
    started: Option<Instant>,
    /// The transfer lane of the current session and of the one before (for frames still in
    /// flight when it changed).
    xfer: Option<Session>,
    xfer_prev: Option<Session>,
}

#[derive(Serialize, Deserialize)]
struct Relayed<'a> {
    peerlink: &'a str,
    m: &'a str,
}

/// The key-exchange message in a relay payload, if it is one (`Some(Err)`: it says it is,
/// but is malformed).
pub(crate) fn decode_relayed(payload: &str) -> Option<Result<Vec<u8>, E2eError>> {
    if !payload.trim_start().starts_with('{') {
        return None;
    }
    let r: Relayed<'_> = serde_json::from_str(payload).ok().filter(|r: &Relayed<'_>| r.peerlink == TAG)?;
    Some(B64.decode(r.m).map_err(|_| E2eError::Malformed("key exchange message is not base64")))
}

fn encode_relayed(msg: &[u8]) -> String {
    serde_json::to_string(&Relayed { peerlink: TAG, m: &B64.encode(msg) }).expect("serializes")
}

fn frame_aad(kind: u8) -> [u8; 16] {
    let mut aad = [0u8; 16];
    aad[..15].copy_from_slice(b"peerlink xfer/1");
    aad[15] = kind;
    aad
}

/// The node's keys for encrypted rooms. See the [module docs](self).
pub(crate) struct RoomKeys {
    manager: GroupKeyManager,
    me: Fingerprint,
    peers: BTreeMap<Fingerprint, PeerKeys>,
    /// Key-exchange messages for the relay: (to, payload).
    pub(crate) outbox: VecDeque<(Fingerprint, String)>,
    events: VecDeque<EncryptionEvent>,
    /// Peers whose session became usable since the last look.
    pub(crate) ready: VecDeque<Fingerprint>,
}

impl RoomKeys {
    pub(crate) fn new(identity: Identity, seed: u64, limits: crate::e2e::Limits) -> Self {
        RoomKeys {
            me: identity.fingerprint(),
            manager: GroupKeyManager::new(identity, seed).with_limits(limits),
            peers: BTreeMap::new(),
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            ready: VecDeque::new(),
        }
    }

    /// Whether `peer` shares an encrypted room with this node.
    pub(crate) fn needs(&self, peer: &Fingerprint) -> bool {
        self.peers.contains_key(peer)
    }

    /// Whether what this side seals for `peer` now opens there.
    pub(crate) fn is_ready(&self, peer: &Fingerprint) -> bool {
        self.manager.is_confirmed(peer)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub(crate) fn poll_event(&mut self) -> Option<EncryptionEvent> {
        self.events.pop_front()
    }

    /// The peers that share an encrypted room are now `needed`: exchanges start with the
    /// new ones, the gone ones are forgotten.
    pub(crate) fn set_needed(&mut self, now: Instant, needed: &BTreeSet<Fingerprint>) {
        let gone: Vec<Fingerprint> = self.peers.keys().filter(|p| !needed.contains(p)).copied().collect();
        for peer in gone {
            debug!(peer = %peer.short(), "no encrypted room shared any more: keys forgotten");
            self.peers.remove(&peer);
            self.manager.remove_peer(&peer);
        }
        for &peer in needed {
            if peer == self.me || self.peers.contains_key(&peer) {
                continue;
            }
            self.peers.insert(peer, PeerKeys::default());
            self.begin(now, peer);
        }
    }

    /// `peer` started over (a new session of its own): so do the keys with it.
    pub(crate) fn reset(&mut self, now: Instant, peer: Fingerprint) {
        if self.peers.contains_key(&peer) {
            debug!(peer = %peer.short(), "member came back: new key exchange");
            self.manager.remove_peer(&peer);
            self.peers.insert(peer, PeerKeys::default());
            self.begin(now, peer);
        }
    }

    /// The smaller fingerprint offers at once; the larger waits a while for it.
    fn begin(&mut self, now: Instant, peer: Fingerprint) {
        if self.me < peer {
            self.start(now, peer);
        } else if let Some(p) = self.peers.get_mut(&peer) {
            p.retry = Some((now + RESPONDER_WAIT, FIRST_RETRY));
        }
    }

    fn start(&mut self, now: Instant, peer: Fingerprint) {
        match self.manager.exchange_with(peer) {
            Ok(offer) => {
                debug!(peer = %peer.short(), "offering a key exchange");
                self.outbox.push_back((peer, encode_relayed(&offer)));
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.retry = Some((now + FIRST_RETRY, FIRST_RETRY));
                    p.retries = 0;
                    p.started = Some(now);
                }
            }
            Err(error) => warn!(peer = %peer.short(), %error, "key exchange not started"),
        }
    }

    /// A key-exchange message from `from` (through the relay).
    pub(crate) fn handle_message(&mut self, now: Instant, from: Fingerprint, msg: Result<Vec<u8>, E2eError>) {
        if !self.peers.contains_key(&from) {
            // Not (yet) in an encrypted room here: its join notice may still be on the way;
            // it sends again.
            debug!(from = %from.short(), "key exchange from a peer with no encrypted room in common: ignored");
            return;
        }
        let result = msg.and_then(|m| self.manager.handle_incoming_key_exchange(from, &m));
        match result {
            Ok(reply) => {
                if let Some(reply) = reply {
                    self.outbox.push_back((from, encode_relayed(&reply)));
                }
                if self.manager.retransmission(&from).is_some() {
                    // We initiated and now wait for the confirm.
                    if let Some(p) = self.peers.get_mut(&from) {
                        p.retry = Some((now + FIRST_RETRY, FIRST_RETRY));
                        p.retries = 0;
                    }
                }
            }
            // Duplicates and crossed messages: the exchange under way goes on.
            Err(E2eError::Unexpected(what)) => debug!(from = %from.short(), what, "key exchange message not for the exchange under way"),
            Err(error) => {
                warn!(from = %from.short(), %error, "key exchange message refused");
                self.events.push_back(EncryptionEvent::Refused { peer: from, error });
            }
        }
        self.pump();
    }

    /// Moves the manager's events on: a new session gets its transfer lane; a confirmed one
    /// is ready.
    fn pump(&mut self) {
        while let Some(e) = self.manager.poll_event() {
            match e {
                KeyExchangeEvent::Established { peer, .. } => {
                    let lane = self.manager.session(&peer).map(|s| s.fork(XFER_LANE));
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.xfer_prev = p.xfer.take();
                        p.xfer = lane;
                    }
                }
                KeyExchangeEvent::Confirmed { peer, session } => {
                    debug!(peer = %peer.short(), "end-to-end session ready");
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.retry = None;
                        p.retries = 0;
                    }
                    self.ready.push_back(peer);
                    self.events.push_back(EncryptionEvent::Ready { peer, session });
                }
            }
        }
    }

    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.peers.values().filter_map(|p| p.retry.map(|(at, _)| at)).min()
    }

    /// Sends exchange messages again that are due, starts exchanges that are overdue.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<Fingerprint> = self.peers.iter().filter(|(_, p)| p.retry.is_some_and(|(at, _)| at <= now)).map(|(f, _)| *f).collect();
        for peer in due {
            let Some(p) = self.peers.get_mut(&peer) else { continue };
            let backoff = p.retry.map_or(FIRST_RETRY, |(_, b)| b);
            match self.manager.retransmission(&peer) {
                Some(_) if p.retries >= MAX_RETRIES => {
                    debug!(peer = %peer.short(), "key exchange did not complete: starting over");
                    self.start(now, peer);
                }
                Some(msg) => {
                    p.retries += 1;
                    p.retry = Some((now + backoff, (backoff * 2).min(MAX_RETRY)));
                    self.outbox.push_back((peer, encode_relayed(&msg)));
                }
                None if self.manager.is_confirmed(&peer) => p.retry = None,
                None if self.manager.is_exchanging(&peer) => {
                    // We answered; the initiator sends again if our answer was lost.
                    p.retry = Some((now + backoff, (backoff * 2).min(MAX_RETRY)));
                }
                None => self.start(now, peer),
            }
        }
    }

    /// Seals a room batch body for `peer`: `{"z":"<base64>"}`.
    pub(crate) fn seal_batch(&mut self, peer: &Fingerprint, body: &str) -> Option<String> {
        if !self.manager.is_confirmed(peer) {
            return None;
        }
        let sealed = self.manager.encrypt_for_peer(peer, body.as_bytes(), ROOM_AAD).ok()?;
        Some(super::wire::encode_sealed(&sealed))
    }

    /// Opens a sealed room batch from `peer`. A message that names no session this side has
    /// starts an exchange (spaced by [`RECOVERY_SPACING`]).
    pub(crate) fn open_batch(&mut self, now: Instant, peer: Fingerprint, sealed: &[u8]) -> Result<String, E2eError> {
        let result = self.manager.decrypt_from_peer(&peer, sealed, ROOM_AAD);
        self.after_open(now, peer, result.as_ref().err());
        let plain = result?;
        String::from_utf8(plain).map_err(|_| E2eError::Malformed("a sealed batch is not UTF-8"))
    }

    fn after_open(&mut self, now: Instant, peer: Fingerprint, error: Option<&E2eError>) {
        self.pump();
        let Some(error) = error else { return };
        match error {
            E2eError::NoKey(_) | E2eError::WrongSession => {
                let Some(p) = self.peers.get(&peer) else { return };
                let spaced = p.started.is_none_or(|at| now >= at + RECOVERY_SPACING);
                if spaced && !self.manager.is_exchanging(&peer) {
                    debug!(peer = %peer.short(), %error, "a sealed message from a session we do not have: new key exchange");
                    self.start(now, peer);
                }
            }
            E2eError::Replay { .. } | E2eError::TooOld { .. } | E2eError::OldKey { .. } => {
                // Sent again, or overtaken: the rooms' sequence numbers deliver it once.
                debug!(peer = %peer.short(), %error, "sealed message dropped");
            }
            other => {
                warn!(peer = %peer.short(), error = %other, "sealed message refused");
                self.events.push_back(EncryptionEvent::Refused { peer, error: other.clone() });
            }
        }
    }

    /// Bytes a sealed frame adds to its message.
    pub(crate) const FRAME_OVERHEAD: usize = 2 + crate::e2e::HEADER_LEN + crate::e2e::TAG_LEN;

    /// Seals a transfer message for `peer` into `frame` (emptied first); false while the
    /// session is not confirmed.
    pub(crate) fn seal_frame_into(&mut self, peer: &Fingerprint, kind: u8, payload: &[u8], frame: &mut Vec<u8>) -> bool {
        frame.clear();
        if !self.manager.is_confirmed(peer) {
            return false;
        }
        let Some(lane) = self.peers.get_mut(peer).and_then(|p| p.xfer.as_mut()) else { return false };
        frame.extend_from_slice(&[SEALED_FRAME, kind]);
        lane.encrypt_into(frame, payload, &frame_aad(kind));
        true
    }

    /// Opens a sealed transfer frame from `peer` in place: its kind and where in `frame` the
    /// contents are.
    pub(crate) fn open_frame(&mut self, now: Instant, peer: Fingerprint, frame: &mut [u8]) -> Result<(u8, std::ops::Range<usize>), E2eError> {
        let result = self.open_frame_inner(peer, frame);
        if let Err(error) = &result {
            self.after_open(now, peer, Some(error));
        }
        result
    }

    fn open_frame_inner(&mut self, peer: Fingerprint, frame: &mut [u8]) -> Result<(u8, std::ops::Range<usize>), E2eError> {
        let kind = match frame {
            [SEALED_FRAME, kind, ..] => *kind,
            [SEALED_FRAME] => return Err(E2eError::Malformed("a sealed frame without a kind")),
            _ => return Err(E2eError::Malformed("not a sealed frame")),
        };
        if kind > FRAME_BINARY {
            return Err(E2eError::Malformed("unknown sealed frame kind"));
        }
        let sealed = &mut frame[2..];
        let p = self.peers.get_mut(&peer).ok_or(E2eError::NoKey(peer))?;
        let id = sealed.get(1..9).map(|id| <[u8; 8]>::try_from(id).expect("8 bytes"));
        let lane = match (&mut p.xfer, &mut p.xfer_prev) {
            (_, Some(prev)) if id == Some(prev.id()) => prev,
            (Some(cur), _) => cur,
            (None, _) => return Err(E2eError::NoKey(peer)),
        };
        let range = lane.decrypt_in_place(sealed, &frame_aad(kind))?;
        Ok((kind, range.start + 2..range.end + 2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_payloads_are_recognised_and_bad_ones_refused() {
        let payload = encode_relayed(&[1, 4, 9]);
        assert_eq!(decode_relayed(&payload), Some(Ok(vec![1, 4, 9])));
        assert_eq!(decode_relayed(r#"{"peerlink":"e2e/1","m":"!!"}"#), Some(Err(E2eError::Malformed("key exchange message is not base64"))));
        // Not ours: the application's, or another layer's.
        for other in [r#"{"peerlink":"room/1","m":"AAAA"}"#, r#"["e2e/1","AAAA"]"#, r#"{"m":"AAAA"}"#, "7", "not json"] {
            assert_eq!(decode_relayed(other), None, "{other}");
        }
    }

    #[test]
    fn sealed_frames_refuse_what_is_not_theirs() {
        let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(3);
        let (a, b) = (Identity::generate(&mut rng), Identity::generate(&mut rng));
        let (fa, fb) = (a.fingerprint(), b.fingerprint());
        let mut ka = RoomKeys::new(a, 1, Default::default());
        let mut kb = RoomKeys::new(b, 2, Default::default());
        let now = crate::test_epoch();
        let needed = |p: Fingerprint| [p].into_iter().collect::<BTreeSet<_>>();
        ka.set_needed(now, &needed(fb));
        kb.set_needed(now, &needed(fa));
        // Relay the exchange both ways until neither has anything to say.
        for _ in 0..8 {
            let (to_b, to_a): (Vec<_>, Vec<_>) = (ka.outbox.drain(..).collect(), kb.outbox.drain(..).collect());
            for (_, p) in to_b {
                kb.handle_message(now, fa, decode_relayed(&p).unwrap());
            }
            for (_, p) in to_a {
                ka.handle_message(now, fb, decode_relayed(&p).unwrap());
            }
            // The larger fingerprint offers after a while if the smaller did not.
            ka.handle_timeout(now + RESPONDER_WAIT);
            kb.handle_timeout(now + RESPONDER_WAIT);
        }
        assert!(ka.is_ready(&fb) && kb.is_ready(&fa));
        assert_eq!(ka.ready.len(), 1);
        let seal = |k: &mut RoomKeys, kind: u8, payload: &[u8]| {
            let mut frame = vec![9; 3];
            assert!(k.seal_frame_into(&fb, kind, payload, &mut frame));
            assert_eq!(frame.len(), payload.len() + RoomKeys::FRAME_OVERHEAD);
            frame
        };
        let frame = seal(&mut ka, FRAME_BINARY, b"chunk");
        let mut buf = frame.clone();
        let (kind, range) = kb.open_frame(now, fa, &mut buf).unwrap();
        assert_eq!((kind, &buf[range]), (FRAME_BINARY, &b"chunk"[..]));
        assert!(matches!(kb.open_frame(now, fa, &mut frame.clone()), Err(E2eError::Replay { .. })), "once");
        // The kind is authenticated; junk and strangers are refused.
        let mut flipped = seal(&mut ka, FRAME_BINARY, b"chunk");
        flipped[1] = FRAME_TEXT;
        assert_eq!(kb.open_frame(now, fa, &mut flipped), Err(E2eError::Decrypt));
        assert!(matches!(kb.open_frame(now, fa, &mut [SEALED_FRAME]), Err(E2eError::Malformed(_))));
        assert!(matches!(kb.open_frame(now, fa, &mut [SEALED_FRAME, 9, 0, 0]), Err(E2eError::Malformed(_))));
        assert!(matches!(kb.open_frame(now, fa, &mut [0xC7, 1, 2]), Err(E2eError::Malformed(_))));
        let stranger = Fingerprint::from_bytes([7; 32]);
        assert_eq!(kb.open_frame(now, stranger, &mut frame.clone()), Err(E2eError::NoKey(stranger)));
        // A room batch does not open as a frame, nor a frame as a batch: separate lanes.
        let body = ka.seal_batch(&fb, r#"{"m":[]}"#).unwrap();
        let Ok(super::super::wire::Body::Sealed(sealed)) = super::super::wire::decode_body(&body) else { panic!("sealed") };
        assert_eq!(kb.open_batch(now, fa, &sealed).unwrap(), r#"{"m":[]}"#);
        assert!(kb.open_batch(now, fa, &frame[2..]).is_err());
        // Refusals that mean tampering are reported; the rest are quiet.
        let events: Vec<_> = std::iter::from_fn(|| kb.poll_event()).collect();
        assert!(events.iter().any(|e| matches!(e, EncryptionEvent::Refused { error: E2eError::Decrypt, .. })), "{events:?}");
        assert!(!events.iter().any(|e| matches!(e, EncryptionEvent::Refused { error: E2eError::Replay { .. }, .. })));
        // A peer that shares no encrypted room any more is forgotten.
        ka.set_needed(now, &BTreeSet::new());
        assert!(!ka.is_ready(&fb) && !ka.seal_frame_into(&fb, FRAME_TEXT, b"{}", &mut Vec::new()));
    }
}
