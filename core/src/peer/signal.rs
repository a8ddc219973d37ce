//! The peer negotiation messages that ride inside signaling `relay` payloads (see
//! `docs/PROTOCOL.md`, "Peer negotiation"), and the identity binding of DTLS fingerprints.
//!
//! A relay payload is one of ours when it is a JSON object whose `peerlink` member is
//! [`SIGNAL_VERSION`]; any other payload belongs to the application.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::identity::{Fingerprint, Identity, PublicKey, Signature};

/// The `peerlink` marker (and version) of negotiation payloads.
pub const SIGNAL_VERSION: &str = "rtc/1";
/// Largest SDP accepted in an offer or answer.
pub const MAX_SDP_LEN: usize = 32 * 1024;
/// Largest candidate line accepted.
pub const MAX_CANDIDATE_LEN: usize = 512;
/// Context string of the DTLS fingerprint signature.
const DTLS_CONTEXT: &str = "peerlink-dtls-v1";

/// Identifies one negotiated connection between two peers; chosen by the side that made the
/// first offer, kept across ICE restarts and renegotiations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// A fresh random session id.
    pub fn random(rng: &mut impl RngCore) -> Self {
        let mut b = [0u8; 16];
        rng.fill_bytes(&mut b);
        SessionId(b)
    }

    fn parse(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(SessionId(b))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Which description a signature covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdpKind {
    /// An offer.
    Offer,
    /// An answer.
    Answer,
}

impl SdpKind {
    fn as_str(self) -> &'static str {
        match self {
            SdpKind::Offer => "offer",
            SdpKind::Answer => "answer",
        }
    }
}

/// Why a peer refused a negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RejectReason {
    /// The description's DTLS fingerprint was not signed by the expected identity.
    IdentityMismatch,
    /// The description could not be used (malformed, or refused by the WebRTC stack).
    BadDescription,
    /// The peer does not accept incoming connections.
    Refused,
    /// The peer has too many connections.
    Busy,
}

/// A negotiation message between two peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// A session description offer (the first, an ICE restart, or a renegotiation).
    Offer {
        /// The session.
        session: SessionId,
        /// The SDP.
        sdp: String,
        /// The signer's public key (its SEC1 encoding, base64).
        key: String,
        /// The signature binding the SDP's DTLS fingerprint to the signer's identity.
        sig: String,
    },
    /// The answer to an offer.
    Answer {
        /// The session.
        session: SessionId,
        /// The SDP.
        sdp: String,
        /// The signer's public key (its SEC1 encoding, base64).
        key: String,
        /// The signature binding the SDP's DTLS fingerprint to the signer's identity.
        sig: String,
    },
    /// A trickled ICE candidate (`candidate:...` line).
    Candidate {
        /// The session.
        session: SessionId,
        /// The candidate line.
        candidate: String,
    },
    /// The sender closed the session.
    Bye {
        /// The session.
        session: SessionId,
    },
    /// The sender refused the session.
    Reject {
        /// The session.
        session: SessionId,
        /// Why.
        reason: RejectReason,
    },
}

impl Signal {
    /// The session the message belongs to.
    pub fn session(&self) -> SessionId {
        match self {
            Signal::Offer { session, .. }
            | Signal::Answer { session, .. }
            | Signal::Candidate { session, .. }
            | Signal::Bye { session }
            | Signal::Reject { session, .. } => *session,
        }
    }
}

/// Why a negotiation payload could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignalError {
    /// A `peerlink` payload with another version.
    #[error("unsupported negotiation version `{0}`")]
    Version(String),
    /// Not valid JSON of the expected shape.
    #[error("malformed negotiation message: {0}")]
    Malformed(String),
    /// A field is too long.
    #[error("`{0}` is too long")]
    TooLong(&'static str),
}

#[derive(Serialize, Deserialize)]
struct Wire<'a> {
    peerlink: &'a str,
    t: &'a str,
    sid: &'a str,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    sdp: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    key: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    sig: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none", borrow)]
    candidate: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<RejectReason>,
}

#[derive(Deserialize)]
struct Marker<'a> {
    #[serde(borrow)]
    peerlink: Option<std::borrow::Cow<'a, str>>,
}

impl Signal {
    /// Encodes as a relay payload.
    pub fn encode(&self) -> String {
        let sid = self.session().to_string();
        let mut w = Wire { peerlink: SIGNAL_VERSION, t: "", sid: &sid, sdp: None, key: None, sig: None, candidate: None, reason: None };
        match self {
            Signal::Offer { sdp, key, sig, .. } | Signal::Answer { sdp, key, sig, .. } => {
                w.t = if matches!(self, Signal::Offer { .. }) { "offer" } else { "answer" };
                w.sdp = Some(sdp.as_str().into());
                w.key = Some(key.as_str().into());
                w.sig = Some(sig.as_str().into());
            }
            Signal::Candidate { candidate, .. } => {
                w.t = "candidate";
                w.candidate = Some(candidate.as_str().into());
            }
            Signal::Bye { .. } => w.t = "bye",
            Signal::Reject { reason, .. } => {
                w.t = "reject";
                w.reason = Some(*reason);
            }
        }
        serde_json::to_string(&w).expect("negotiation messages always serialize")
    }

    /// Decodes a relay payload: `Ok(None)` when it is not a negotiation message (it belongs to
    /// the application), `Err` when it claims to be one but is unusable.
    pub fn decode(payload: &RawValue) -> Result<Option<Signal>, SignalError> {
        let text = payload.get();
        if !text.trim_start().starts_with('{') {
            return Ok(None);
        }
        let Ok(marker) = serde_json::from_str::<Marker<'_>>(text) else { return Ok(None) };
        match marker.peerlink.as_deref() {
            None => return Ok(None),
            Some(SIGNAL_VERSION) => {}
            Some(other) => return Err(SignalError::Version(other.chars().take(32).collect())),
        }
        let w: Wire<'_> = serde_json::from_str(text).map_err(|e| SignalError::Malformed(e.to_string()))?;
        let session = SessionId::parse(w.sid).ok_or_else(|| SignalError::Malformed("`sid` must be 32 hex digits".into()))?;
        let need = |v: Option<std::borrow::Cow<'_, str>>, name: &'static str, max: usize| -> Result<String, SignalError> {
            let v = v.ok_or_else(|| SignalError::Malformed(format!("missing `{name}`")))?;
            if v.len() > max {
                return Err(SignalError::TooLong(name));
            }
            Ok(v.into_owned())
        };
        Ok(Some(match w.t {
            "offer" | "answer" => {
                let sdp = need(w.sdp, "sdp", MAX_SDP_LEN)?;
                let key = need(w.key, "key", 256)?;
                let sig = need(w.sig, "sig", 256)?;
                if w.t == "offer" {
                    Signal::Offer { session, sdp, key, sig }
                } else {
                    Signal::Answer { session, sdp, key, sig }
                }
            }
            "candidate" => Signal::Candidate { session, candidate: need(w.candidate, "candidate", MAX_CANDIDATE_LEN)? },
            "bye" => Signal::Bye { session },
            "reject" => Signal::Reject {
                session,
                reason: w.reason.ok_or_else(|| SignalError::Malformed("missing `reason`".into()))?,
            },
            other => return Err(SignalError::Malformed(format!("unknown type `{}`", other.chars().take(32).collect::<String>()))),
        }))
    }
}

/// What the DTLS signature covers, byte for byte.
fn dtls_message(kind: SdpKind, session: SessionId, signer: &Fingerprint, recipient: &Fingerprint, dtls_fingerprint: &str) -> Vec<u8> {
    format!("{DTLS_CONTEXT}\n{}\n{session}\n{signer}\n{recipient}\n{dtls_fingerprint}", kind.as_str()).into_bytes()
}

/// Signs `dtls_fingerprint` (as the SDP's `a=fingerprint` value, e.g. `sha-256 AB:CD:...`)
/// for `recipient`; returns the `(key, sig)` fields.
pub fn sign_dtls(
    identity: &Identity,
    rng: &mut impl rand::CryptoRng,
    kind: SdpKind,
    session: SessionId,
    recipient: &Fingerprint,
    dtls_fingerprint: &str,
) -> (String, String) {
    let message = dtls_message(kind, session, &identity.fingerprint(), recipient, dtls_fingerprint);
    let sig = identity.sign(rng, &message);
    (identity.public_key().to_base64(), sig.to_base64())
}

/// Why a description's identity binding does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BindingError {
    /// The key is not the expected peer's (its fingerprint differs).
    #[error("the description was signed by {got}, not by the expected peer {expected}")]
    WrongKey {
        /// The peer we meant to reach.
        expected: Fingerprint,
        /// The fingerprint of the key that signed.
        got: Fingerprint,
    },
    /// The key or signature does not decode.
    #[error("malformed key or signature")]
    Malformed,
    /// The signature does not cover this DTLS fingerprint (the description was altered).
    #[error("the DTLS fingerprint in the description is not the one its sender signed")]
    BadSignature,
    /// The description carries no (or more than one distinct) DTLS fingerprint.
    #[error("the description has no single DTLS fingerprint")]
    NoFingerprint,
}

/// Checks that `key` belongs to `expected` and signed `dtls_fingerprint` for us.
pub fn verify_dtls(
    expected: &Fingerprint,
    me: &Fingerprint,
    kind: SdpKind,
    session: SessionId,
    key: &str,
    sig: &str,
    dtls_fingerprint: &str,
) -> Result<(), BindingError> {
    let key = PublicKey::from_base64(key).map_err(|_| BindingError::Malformed)?;
    let got = key.fingerprint();
    if got != *expected {
        return Err(BindingError::WrongKey { expected: *expected, got });
    }
    let sig = Signature::from_base64(sig).map_err(|_| BindingError::Malformed)?;
    key.verify(&dtls_message(kind, session, expected, me, dtls_fingerprint), &sig).map_err(|_| BindingError::BadSignature)
}

/// Returns the DTLS fingerprint an SDP declares, in str0m's canonical form (`sha-256 AB:CD:...`),
/// if every `a=fingerprint:` line in it (session or media level) declares the same one. The
/// WebRTC stack takes one of those lines; requiring them all to agree makes the one that is
/// verified the one that is used.
pub fn sdp_fingerprint(sdp: &str) -> Option<String> {
    let mut found: Option<str0m::config::Fingerprint> = None;
    for line in sdp.lines() {
        if let Some(v) = line.trim_end_matches('\r').strip_prefix("a=fingerprint:") {
            let parsed: str0m::config::Fingerprint = v.trim().parse().ok()?;
            match &found {
                Some(prev) if *prev != parsed => return None,
                _ => found = Some(parsed),
            }
        }
    }
    found.map(|f| f.to_string())
}

/// Base64 of raw bytes (for tests and tools that build messages by hand).
pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn round_trips() {
        let session = SessionId([7; 16]);
        let msgs = [
            Signal::Offer { session, sdp: "v=0\r\n".into(), key: "k".into(), sig: "s".into() },
            Signal::Answer { session, sdp: "v=0\r\n".into(), key: "k".into(), sig: "s".into() },
            Signal::Candidate { session, candidate: "candidate:1 1 udp 1 1.2.3.4 5 typ host".into() },
            Signal::Bye { session },
            Signal::Reject { session, reason: RejectReason::IdentityMismatch },
        ];
        for m in msgs {
            assert_eq!(Signal::decode(&raw(&m.encode())).unwrap(), Some(m));
        }
    }

    #[test]
    fn application_payloads_are_not_ours_and_bad_ones_are_typed() {
        assert_eq!(Signal::decode(&raw(r#"{"hello":1}"#)), Ok(None));
        assert_eq!(Signal::decode(&raw("[1,2]")), Ok(None));
        assert_eq!(Signal::decode(&raw("\"text\"")), Ok(None));
        assert_eq!(Signal::decode(&raw(r#"{"peerlink":"rtc/9","t":"bye"}"#)), Err(SignalError::Version("rtc/9".into())));
        assert!(matches!(Signal::decode(&raw(r#"{"peerlink":"rtc/1","t":"bye","sid":"xyz"}"#)), Err(SignalError::Malformed(_))));
        let sid = "00".repeat(16);
        assert!(matches!(
            Signal::decode(&raw(&format!(r#"{{"peerlink":"rtc/1","t":"offer","sid":"{sid}"}}"#))),
            Err(SignalError::Malformed(m)) if m.contains("sdp")
        ));
        assert!(matches!(
            Signal::decode(&raw(&format!(r#"{{"peerlink":"rtc/1","t":"warp","sid":"{sid}"}}"#))),
            Err(SignalError::Malformed(m)) if m.contains("unknown type")
        ));
        let long = "x".repeat(MAX_CANDIDATE_LEN + 1);
        assert_eq!(
            Signal::decode(&raw(&format!(r#"{{"peerlink":"rtc/1","t":"candidate","sid":"{sid}","candidate":"{long}"}}"#))),
            Err(SignalError::TooLong("candidate"))
        );
    }

    #[test]
    fn dtls_binding_verifies_and_catches_tampering() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let alice = Identity::generate(&mut rng);
        let bob = Identity::generate(&mut rng);
        let mallory = Identity::generate(&mut rng);
        let session = SessionId([1; 16]);
        let fp = "sha-256 AA:BB";
        let (key, sig) = sign_dtls(&alice, &mut rng, SdpKind::Offer, session, &bob.fingerprint(), fp);
        let (a, b) = (alice.fingerprint(), bob.fingerprint());
        assert_eq!(verify_dtls(&a, &b, SdpKind::Offer, session, &key, &sig, fp), Ok(()));
        // Swapped DTLS fingerprint, other session, other role, other recipient: refused.
        assert_eq!(verify_dtls(&a, &b, SdpKind::Offer, session, &key, &sig, "sha-256 CC:DD"), Err(BindingError::BadSignature));
        assert_eq!(verify_dtls(&a, &b, SdpKind::Offer, SessionId([2; 16]), &key, &sig, fp), Err(BindingError::BadSignature));
        assert_eq!(verify_dtls(&a, &b, SdpKind::Answer, session, &key, &sig, fp), Err(BindingError::BadSignature));
        assert_eq!(
            verify_dtls(&a, &mallory.fingerprint(), SdpKind::Offer, session, &key, &sig, fp),
            Err(BindingError::BadSignature)
        );
        // Mallory signing her own fingerprint is not Alice.
        let (mkey, msig) = sign_dtls(&mallory, &mut rng, SdpKind::Offer, session, &b, "sha-256 EE:FF");
        assert!(matches!(
            verify_dtls(&a, &b, SdpKind::Offer, session, &mkey, &msig, "sha-256 EE:FF"),
            Err(BindingError::WrongKey { .. })
        ));
        assert_eq!(verify_dtls(&a, &b, SdpKind::Offer, session, "!!", &sig, fp), Err(BindingError::Malformed));
    }

    #[test]
    fn sdp_fingerprint_is_read() {
        let sdp = "v=0\r\na=fingerprint:sha-256 AA:BB\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=fingerprint:sha-256 aa:bb\r\n";
        assert_eq!(sdp_fingerprint(sdp).as_deref(), Some("sha-256 AA:BB"));
        assert_eq!(sdp_fingerprint("v=0\r\n"), None);
        assert_eq!(sdp_fingerprint("a=fingerprint:sha-256 AA\r\na=fingerprint:sha-256 BB\r\n"), None);
        assert_eq!(sdp_fingerprint("a=fingerprint:sha-256 ZZ\r\n"), None);
    }
}
