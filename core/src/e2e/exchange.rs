//! The authenticated key exchange (`e2e/1`) and [`GroupKeyManager`].
//!
//! Three messages, each a few hundred bytes, carried however the application likes (a relay,
//! a room message, a data channel); the server may see them all and learns nothing usable:
//!
//! 1. **Offer** (initiator → responder): `version, 1, nonce_i (32), ephemeral_i (65)`.
//! 2. **Answer** (responder → initiator): `version, 2, nonce_r (32), ephemeral_r (65),
//!    identity key_r (65), signature_r (64), confirm_r (32)`.
//! 3. **Finish** (initiator → responder): `version, 3, identity key_i (65), signature_i (64),
//!    confirm_i (32)`.
//! 4. **Confirm** (responder → initiator): `version, 4, sealed` where `sealed` is an empty
//!    message sealed under the new session (associated data `"peerlink e2e/1 confirm"`):
//!    the responder has installed the session, so what the initiator seals from now on opens
//!    there. Until then the initiator's session is *unconfirmed* ([`GroupKeyManager::is_confirmed`]);
//!    any message from the responder under it confirms it too.
//!
//! `signature_r` is the responder's identity signature over the key-schedule context (both
//! fingerprints, both ephemeral keys, the version), `"responder"`, `nonce_i` and `nonce_r`;
//! `signature_i` the initiator's over the context, `"initiator"`, `nonce_r` and `nonce_i`. So
//! each signature covers a nonce the other side just chose (an old signature is worthless),
//! both ephemeral keys (a swapped key breaks it) and both fingerprints (it is for this pair
//! only); an identity key whose fingerprint is not the expected peer's is refused. The salt
//! of the key schedule is `nonce_i || nonce_r`. `confirm_r` is HMAC-SHA256 under the
//! responder's confirmation key of `"answer"` and the hash of the offer and the answer before
//! it; `confirm_i` under the initiator's of `"finish"` and the hash of everything before it:
//! each side proves it derived the same keys before any message is sent.
//!
//! If both sides offer at once, the offer of the smaller fingerprint wins; the other side
//! drops its own and answers.
//!
//! # Lost and repeated messages
//!
//! The manager keeps no timers; whoever carries the messages sends
//! [`GroupKeyManager::retransmission`] again until the exchange completes. Every step is
//! idempotent: the same offer again gets the same answer (not a new one, which would leave
//! the two sides with different keys), the finish of the installed session again gets a
//! fresh confirm, and an offer that already completed is refused as a replay.

use std::collections::{BTreeMap, VecDeque};

use hmac::{Hmac, Mac};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{Context, E2eError, EphemeralKey, Limits, Role, Session, VERSION, derive};
use crate::identity::{Fingerprint, Identity, PublicKey, Signature};

/// Most exchanges under way at once.
pub const MAX_EXCHANGES: usize = 256;

const OFFER: u8 = 1;
const ANSWER: u8 = 2;
const FINISH: u8 = 3;
const CONFIRM: u8 = 4;
/// Associated data of the confirm message.
const CONFIRM_AAD: &[u8] = b"peerlink e2e/1 confirm";
/// Bytes of a confirm message.
pub const CONFIRM_LEN: usize = 2 + super::HEADER_LEN + super::TAG_LEN;
const OFFER_LEN: usize = 2 + 32 + 65;
const ANSWER_LEN: usize = 2 + 32 + 65 + 65 + 64 + 32;
const FINISH_LEN: usize = 2 + 65 + 64 + 32;

/// What a [`GroupKeyManager`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyExchangeEvent {
    /// A session with `peer` is ready (a new one replaces an older one).
    Established {
        /// The peer.
        peer: Fingerprint,
        /// The session id.
        session: [u8; 8],
    },
    /// Both sides have the session with `peer`: what this side seals now opens there. For
    /// the responder right after [`KeyExchangeEvent::Established`]; for the initiator when
    /// the confirm (or any message under the session) arrives.
    Confirmed {
        /// The peer.
        peer: Fingerprint,
        /// The session id.
        session: [u8; 8],
    },
}

enum Pending {
    /// We offered.
    Offered { key: EphemeralKey, nonce: [u8; 32], offer: Vec<u8> },
    /// We answered; waiting for the finish. `answer` goes again if the same offer does.
    Answered { session: Box<Session>, confirm_initiator: Zeroizing<[u8; 32]>, transcript: Vec<u8>, answer: Vec<u8> },
}

/// The last exchange completed with a peer, to recognise its messages coming again.
struct Completed {
    /// SHA-256 of its offer (a replay is refused).
    offer: [u8; 32],
    /// SHA-256 of its finish (the responder confirms again), if this side responded.
    finish: Option<[u8; 32]>,
}

/// The reference's `GroupKeyManager`: authenticated exchanges and a session per peer.
pub struct GroupKeyManager {
    identity: Identity,
    rng: ChaCha20Rng,
    limits: Limits,
    pending: BTreeMap<Fingerprint, Pending>,
    sessions: BTreeMap<Fingerprint, Session>,
    /// Sessions this side initiated and the responder has not confirmed yet, with the
    /// finish to send again.
    unconfirmed: BTreeMap<Fingerprint, Vec<u8>>,
    completed: BTreeMap<Fingerprint, Completed>,
    events: VecDeque<KeyExchangeEvent>,
}

fn signed(context: &[u8], role: &[u8], first: &[u8; 32], second: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(context.len() + role.len() + 64);
    m.extend_from_slice(context);
    m.extend_from_slice(role);
    m.extend_from_slice(first);
    m.extend_from_slice(second);
    m
}

fn mac(key: &[u8; 32], label: &[u8], transcript: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    m.update(label);
    m.update(&Sha256::digest(transcript));
    m.finalize().into_bytes().into()
}

fn check_mac(key: &[u8; 32], label: &[u8], transcript: &[u8], tag: &[u8]) -> Result<(), E2eError> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
    m.update(label);
    m.update(&Sha256::digest(transcript));
    m.verify_slice(tag).map_err(|_| E2eError::Confirmation)
}

fn identity_key(raw: &[u8], expected: &Fingerprint) -> Result<PublicKey, E2eError> {
    let key = PublicKey::from_sec1(raw).map_err(|_| E2eError::InvalidPoint)?;
    if key.fingerprint() != *expected {
        return Err(E2eError::WrongPeer { expected: *expected });
    }
    Ok(key)
}

/// The confirm message: an empty message sealed under `session`.
fn confirm(session: &mut Session) -> Vec<u8> {
    let mut msg = vec![VERSION, CONFIRM];
    session.encrypt_into(&mut msg, &[], CONFIRM_AAD);
    msg
}

fn header(msg: &[u8], kind: u8, len: usize) -> Result<(), E2eError> {
    if msg.len() < 2 {
        return Err(E2eError::Malformed("cut short"));
    }
    if msg[0] != VERSION {
        return Err(E2eError::Version(msg[0]));
    }
    if msg[1] != kind {
        return Err(E2eError::Malformed("unexpected message kind"));
    }
    if msg.len() != len {
        return Err(E2eError::Malformed("wrong length"));
    }
    Ok(())
}

impl GroupKeyManager {
    /// Creates a manager for `identity` (the reference's `init`); `seed` drives its
    /// ephemeral keys and nonces (adapters seed it from the OS).
    pub fn new(identity: Identity, seed: u64) -> Self {
        GroupKeyManager {
            identity,
            rng: ChaCha20Rng::seed_from_u64(seed),
            limits: Limits::default(),
            pending: BTreeMap::new(),
            sessions: BTreeMap::new(),
            unconfirmed: BTreeMap::new(),
            completed: BTreeMap::new(),
            events: VecDeque::new(),
        }
    }

    /// Sets when senders rekey (for sessions made from now on).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Returns this side's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint()
    }

    /// Starts an exchange with `peer`: returns the offer to send it. A session already
    /// there keeps working until the new one replaces it.
    pub fn exchange_with(&mut self, peer: Fingerprint) -> Result<Vec<u8>, E2eError> {
        if !self.pending.contains_key(&peer) && self.pending.len() >= MAX_EXCHANGES {
            return Err(E2eError::TooManyExchanges);
        }
        let key = EphemeralKey::generate(&mut self.rng);
        let mut nonce = [0u8; 32];
        self.rng.fill_bytes(&mut nonce);
        let mut offer = Vec::with_capacity(OFFER_LEN);
        offer.extend_from_slice(&[VERSION, OFFER]);
        offer.extend_from_slice(&nonce);
        offer.extend_from_slice(key.public());
        self.pending.insert(peer, Pending::Offered { key, nonce, offer: offer.clone() });
        Ok(offer)
    }

    /// Takes in an exchange message from `peer`; returns the reply to send it, if any.
    /// A message that fails leaves every exchange and session as it was.
    pub fn handle_incoming_key_exchange(&mut self, peer: Fingerprint, msg: &[u8]) -> Result<Option<Vec<u8>>, E2eError> {
        match msg.get(1) {
            Some(&OFFER) => self.on_offer(peer, msg).map(Some),
            Some(&ANSWER) => self.on_answer(peer, msg).map(Some),
            Some(&FINISH) => self.on_finish(peer, msg).map(Some),
            Some(&CONFIRM) => self.on_confirm(peer, msg).map(|()| None),
            _ if msg.first().is_some_and(|v| *v != VERSION) => Err(E2eError::Version(msg[0])),
            _ => Err(E2eError::Malformed("not a key exchange message")),
        }
    }

    fn on_offer(&mut self, peer: Fingerprint, offer: &[u8]) -> Result<Vec<u8>, E2eError> {
        header(offer, OFFER, OFFER_LEN)?;
        if let Some(Pending::Answered { transcript, answer, .. }) = self.pending.get(&peer) {
            if transcript[..OFFER_LEN] == *offer {
                // Our answer was lost (or the offer came twice): the same answer again.
                return Ok(answer.clone());
            }
        }
        if self.completed.get(&peer).is_some_and(|c| c.offer == <[u8; 32]>::from(Sha256::digest(offer))) {
            return Err(E2eError::Unexpected("a replayed offer"));
        }
        let me = self.identity.fingerprint();
        if matches!(self.pending.get(&peer), Some(Pending::Offered { .. })) && me < peer {
            return Err(E2eError::Unexpected("both offered: ours wins, theirs is dropped"));
        }
        if !self.pending.contains_key(&peer) && self.pending.len() >= MAX_EXCHANGES {
            return Err(E2eError::TooManyExchanges);
        }
        let nonce_i: [u8; 32] = offer[2..34].try_into().expect("32 bytes");
        let eph_i: [u8; 65] = offer[34..99].try_into().expect("65 bytes");
        let key = EphemeralKey::generate(&mut self.rng);
        let shared = key.agree(&eph_i)?;
        let mut nonce_r = [0u8; 32];
        self.rng.fill_bytes(&mut nonce_r);
        let context = Context { initiator: &peer, responder: &me, initiator_key: &eph_i, responder_key: key.public() };
        let ctx = context.bytes();
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(&nonce_i);
        salt[32..].copy_from_slice(&nonce_r);
        let derived = derive(&shared[..], &salt, &context, Role::Responder, self.limits);
        let signature = self.identity.sign(&mut self.rng, &signed(&ctx, b"responder", &nonce_i, &nonce_r));
        let mut answer = Vec::with_capacity(ANSWER_LEN);
        answer.extend_from_slice(&[VERSION, ANSWER]);
        answer.extend_from_slice(&nonce_r);
        answer.extend_from_slice(key.public());
        answer.extend_from_slice(&self.identity.public_key().to_sec1());
        answer.extend_from_slice(&signature.to_bytes());
        let mut transcript = offer.to_vec();
        transcript.extend_from_slice(&answer);
        answer.extend_from_slice(&mac(&derived.confirm_responder, b"answer", &transcript));
        transcript.extend_from_slice(&answer[ANSWER_LEN - 32..]);
        let pending = Pending::Answered { session: Box::new(derived.session), confirm_initiator: derived.confirm_initiator, transcript, answer: answer.clone() };
        self.pending.insert(peer, pending);
        Ok(answer)
    }

    fn on_answer(&mut self, peer: Fingerprint, answer: &[u8]) -> Result<Vec<u8>, E2eError> {
        header(answer, ANSWER, ANSWER_LEN)?;
        let Some(Pending::Offered { key, nonce: nonce_i, offer }) = self.pending.get(&peer) else {
            return Err(E2eError::Unexpected("an answer to no offer"));
        };
        let me = self.identity.fingerprint();
        let nonce_r: [u8; 32] = answer[2..34].try_into().expect("32 bytes");
        let eph_r: [u8; 65] = answer[34..99].try_into().expect("65 bytes");
        let their_identity = identity_key(&answer[99..164], &peer)?;
        let signature = Signature::from_bytes(&answer[164..228]).map_err(|_| E2eError::BadSignature("not a signature"))?;
        let shared = key.agree(&eph_r)?;
        let context = Context { initiator: &me, responder: &peer, initiator_key: key.public(), responder_key: &eph_r };
        let ctx = context.bytes();
        their_identity
            .verify(&signed(&ctx, b"responder", nonce_i, &nonce_r), &signature)
            .map_err(|_| E2eError::BadSignature("the responder's signature does not cover this exchange"))?;
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(nonce_i);
        salt[32..].copy_from_slice(&nonce_r);
        let derived = derive(&shared[..], &salt, &context, Role::Initiator, self.limits);
        let mut transcript = offer.clone();
        transcript.extend_from_slice(&answer[..ANSWER_LEN - 32]);
        check_mac(&derived.confirm_responder, b"answer", &transcript, &answer[ANSWER_LEN - 32..])?;
        transcript.extend_from_slice(&answer[ANSWER_LEN - 32..]);
        let signature = self.identity.sign(&mut self.rng, &signed(&ctx, b"initiator", &nonce_r, nonce_i));
        let mut finish = Vec::with_capacity(FINISH_LEN);
        finish.extend_from_slice(&[VERSION, FINISH]);
        finish.extend_from_slice(&self.identity.public_key().to_sec1());
        finish.extend_from_slice(&signature.to_bytes());
        transcript.extend_from_slice(&finish);
        finish.extend_from_slice(&mac(&derived.confirm_initiator, b"finish", &transcript));
        let offer_hash = Sha256::digest(offer).into();
        self.pending.remove(&peer);
        self.install(peer, derived.session);
        self.completed.insert(peer, Completed { offer: offer_hash, finish: None });
        self.unconfirmed.insert(peer, finish.clone());
        Ok(finish)
    }

    fn on_finish(&mut self, peer: Fingerprint, finish: &[u8]) -> Result<Vec<u8>, E2eError> {
        header(finish, FINISH, FINISH_LEN)?;
        let Some(Pending::Answered { confirm_initiator, transcript, .. }) = self.pending.get(&peer) else {
            let again = self.completed.get(&peer).and_then(|c| c.finish).is_some_and(|h| h == <[u8; 32]>::from(Sha256::digest(finish)));
            if let (true, Some(session)) = (again, self.sessions.get_mut(&peer)) {
                // Our confirm was lost: the initiator sent its finish again.
                return Ok(confirm(session));
            }
            return Err(E2eError::Unexpected("a finish to no answer"));
        };
        let their_identity = identity_key(&finish[2..67], &peer)?;
        let signature = Signature::from_bytes(&finish[67..131]).map_err(|_| E2eError::BadSignature("not a signature"))?;
        // The context and nonces are in the transcript: offer = [v, 1, nonce_i, eph_i],
        // answer = [v, 2, nonce_r, eph_r, ...].
        let nonce_i: [u8; 32] = transcript[2..34].try_into().expect("32 bytes");
        let eph_i: [u8; 65] = transcript[34..99].try_into().expect("65 bytes");
        let nonce_r: [u8; 32] = transcript[OFFER_LEN + 2..OFFER_LEN + 34].try_into().expect("32 bytes");
        let eph_r: [u8; 65] = transcript[OFFER_LEN + 34..OFFER_LEN + 99].try_into().expect("65 bytes");
        let me = self.identity.fingerprint();
        let ctx = Context { initiator: &peer, responder: &me, initiator_key: &eph_i, responder_key: &eph_r }.bytes();
        their_identity
            .verify(&signed(&ctx, b"initiator", &nonce_r, &nonce_i), &signature)
            .map_err(|_| E2eError::BadSignature("the initiator's signature does not cover this exchange"))?;
        let mut t = transcript.clone();
        t.extend_from_slice(&finish[..FINISH_LEN - 32]);
        check_mac(confirm_initiator, b"finish", &t, &finish[FINISH_LEN - 32..])?;
        let offer_hash = Sha256::digest(&transcript[..OFFER_LEN]).into();
        let Some(Pending::Answered { mut session, .. }) = self.pending.remove(&peer) else { unreachable!("checked above") };
        let reply = confirm(&mut session);
        let id = session.id();
        self.install(peer, *session);
        self.unconfirmed.remove(&peer);
        self.completed.insert(peer, Completed { offer: offer_hash, finish: Some(Sha256::digest(finish).into()) });
        self.events.push_back(KeyExchangeEvent::Confirmed { peer, session: id });
        Ok(reply)
    }

    fn on_confirm(&mut self, peer: Fingerprint, msg: &[u8]) -> Result<(), E2eError> {
        header(msg, CONFIRM, CONFIRM_LEN)?;
        let session = self.sessions.get_mut(&peer).ok_or(E2eError::Unexpected("a confirm to no session"))?;
        session.decrypt(&msg[2..], CONFIRM_AAD)?;
        self.confirmed(peer);
        Ok(())
    }

    /// The responder has the session this side initiated.
    fn confirmed(&mut self, peer: Fingerprint) {
        if self.unconfirmed.remove(&peer).is_some() {
            let session = self.sessions[&peer].id();
            self.events.push_back(KeyExchangeEvent::Confirmed { peer, session });
        }
    }

    fn install(&mut self, peer: Fingerprint, mut session: Session) {
        let id = session.id();
        if let Some(old) = self.sessions.remove(&peer) {
            session.retire(old);
        }
        self.sessions.insert(peer, session);
        self.events.push_back(KeyExchangeEvent::Established { peer, session: id });
    }

    /// Returns the next event, or `None`.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<KeyExchangeEvent> {
        self.events.pop_front()
    }

    /// Whether a session with `peer` is ready.
    pub fn has_session(&self, peer: &Fingerprint) -> bool {
        self.sessions.contains_key(peer)
    }

    /// Whether an exchange with `peer` is under way.
    pub fn is_exchanging(&self, peer: &Fingerprint) -> bool {
        self.pending.contains_key(peer)
    }

    /// Whether `peer` has the current session too: always for a session this side
    /// answered; for one it initiated, once the peer's confirm (or any message under it)
    /// arrived. Seal only under a confirmed session what must open at once.
    pub fn is_confirmed(&self, peer: &Fingerprint) -> bool {
        self.sessions.contains_key(peer) && !self.unconfirmed.contains_key(peer)
    }

    /// The message to send `peer` again while the exchange is not complete: the offer until
    /// the answer arrives, then the finish until the confirm does. `None` otherwise (a
    /// responder waits: a repeated offer or finish gets its reply again).
    pub fn retransmission(&self, peer: &Fingerprint) -> Option<Vec<u8>> {
        match self.pending.get(peer) {
            Some(Pending::Offered { offer, .. }) => Some(offer.clone()),
            Some(Pending::Answered { .. }) => None,
            None => self.unconfirmed.get(peer).cloned(),
        }
    }

    /// Seals `data` for `peer` (`aad` is authenticated, not sent).
    pub fn encrypt_for_peer(&mut self, peer: &Fingerprint, data: &[u8], aad: &[u8]) -> Result<Vec<u8>, E2eError> {
        Ok(self.sessions.get_mut(peer).ok_or(E2eError::NoKey(*peer))?.encrypt(data, aad))
    }

    /// Opens a message from `peer` (one under an unconfirmed session confirms it).
    pub fn decrypt_from_peer(&mut self, peer: &Fingerprint, message: &[u8], aad: &[u8]) -> Result<Vec<u8>, E2eError> {
        let plain = self.sessions.get_mut(peer).ok_or(E2eError::NoKey(*peer))?.decrypt(message, aad)?;
        self.confirmed(*peer);
        Ok(plain)
    }

    /// Forgets `peer` (it left): its session and any exchange with it; keys are zeroized.
    pub fn remove_peer(&mut self, peer: &Fingerprint) {
        self.sessions.remove(peer);
        self.pending.remove(peer);
        self.unconfirmed.remove(peer);
        self.completed.remove(peer);
    }

    /// Forgets every session and exchange (the reference's `destroy`).
    pub fn destroy(&mut self) {
        self.sessions.clear();
        self.pending.clear();
        self.unconfirmed.clear();
        self.completed.clear();
    }

    /// Returns the session with `peer`, for its id and epoch.
    pub fn session(&self, peer: &Fingerprint) -> Option<&Session> {
        self.sessions.get(peer)
    }
}
