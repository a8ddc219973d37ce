//! Verification of access tokens (JWT, HS256 or ES256) presented at registration.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde::Deserialize;
use sha2::Sha256;
use std::time::Duration;

use crate::identity::Fingerprint;

/// The key that verifies access tokens.
#[derive(Clone)]
#[non_exhaustive]
pub enum AuthKey {
    /// HMAC-SHA256 with a shared secret (`alg: HS256`).
    Hs256(Vec<u8>),
    /// ECDSA P-256 with SHA-256 (`alg: ES256`).
    Es256(VerifyingKey),
}

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthKey::Hs256(_) => f.write_str("Hs256(..)"),
            AuthKey::Es256(_) => f.write_str("Es256(..)"),
        }
    }
}

impl AuthKey {
    /// Parses an ES256 public key from PEM (`-----BEGIN PUBLIC KEY-----`, SPKI).
    pub fn es256_from_pem(pem: &str) -> Result<Self, AuthError> {
        VerifyingKey::from_public_key_pem(pem)
            .map(AuthKey::Es256)
            .map_err(|_| AuthError::Invalid("not a P-256 SPKI PEM public key"))
    }
}

/// Access control at registration: when set, `register` must carry a valid token.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The verification key; its type fixes the accepted `alg`.
    pub key: AuthKey,
    /// Required `iss` claim, if any.
    pub issuer: Option<String>,
    /// Required `aud` claim (a string, or an array holding it), if any.
    pub audience: Option<String>,
    /// Clock skew tolerated for `exp` and `nbf`.
    pub leeway: Duration,
}

impl AuthConfig {
    /// Builds a config with no issuer or audience check and 30 s of leeway.
    pub fn new(key: AuthKey) -> Self {
        AuthConfig { key, issuer: None, audience: None, leeway: Duration::from_secs(30) }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Malformed, wrong algorithm, bad signature, or a failed claim check.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    /// `exp` is in the past or `nbf` in the future.
    #[error("token expired or not yet valid")]
    Expired,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Claims {
    exp: Option<f64>,
    nbf: Option<f64>,
    iss: Option<String>,
    aud: Option<Audience>,
    /// When present, the token is good only for this fingerprint.
    fp: Option<String>,
}

/// Verifies `token` at wall-clock time `unix_ms` for the identity `fingerprint`.
pub fn verify(config: &AuthConfig, token: &str, unix_ms: u64, fingerprint: &Fingerprint) -> Result<(), AuthError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(AuthError::Invalid("not three dot-separated parts"));
    };
    let decode = |part: &str| B64URL.decode(part).map_err(|_| AuthError::Invalid("bad base64url"));
    let header: Header = serde_json::from_slice(&decode(h)?).map_err(|_| AuthError::Invalid("bad header"))?;
    let sig = decode(s)?;
    let signed = &token[..h.len() + 1 + p.len()];
    match (&config.key, header.alg.as_str()) {
        (AuthKey::Hs256(secret), "HS256") => {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| AuthError::Invalid("bad key"))?;
            mac.update(signed.as_bytes());
            mac.verify_slice(&sig).map_err(|_| AuthError::Invalid("bad signature"))?;
        }
        (AuthKey::Es256(key), "ES256") => {
            let sig = Signature::from_slice(&sig).map_err(|_| AuthError::Invalid("bad signature"))?;
            key.verify(signed.as_bytes(), &sig).map_err(|_| AuthError::Invalid("bad signature"))?;
        }
        _ => return Err(AuthError::Invalid("unexpected alg")),
    }
    let claims: Claims = serde_json::from_slice(&decode(p)?).map_err(|_| AuthError::Invalid("bad claims"))?;
    let now = unix_ms as f64 / 1000.0;
    let leeway = config.leeway.as_secs_f64();
    match claims.exp {
        Some(exp) if now > exp + leeway => return Err(AuthError::Expired),
        None => return Err(AuthError::Invalid("missing exp")),
        _ => {}
    }
    if let Some(nbf) = claims.nbf {
        if now + leeway < nbf {
            return Err(AuthError::Expired);
        }
    }
    if let Some(iss) = &config.issuer {
        if claims.iss.as_deref() != Some(iss) {
            return Err(AuthError::Invalid("wrong issuer"));
        }
    }
    if let Some(aud) = &config.audience {
        let ok = match &claims.aud {
            Some(Audience::One(a)) => a == aud,
            Some(Audience::Many(list)) => list.iter().any(|a| a == aud),
            None => false,
        };
        if !ok {
            return Err(AuthError::Invalid("wrong audience"));
        }
    }
    if let Some(fp) = &claims.fp {
        if *fp != fingerprint.to_string() {
            return Err(AuthError::Invalid("token is bound to another fingerprint"));
        }
    }
    Ok(())
}

/// Signs an HS256 token with `claims` (a JSON object): for tests, tools and token issuers.
pub fn sign_hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    let header = B64URL.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = B64URL.encode(claims.to_string());
    let signed = format!("{header}.{payload}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(signed.as_bytes());
    format!("{signed}.{}", B64URL.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;
    use serde_json::json;

    const NOW_MS: u64 = 1_800_000_000_000;

    fn fp() -> Fingerprint {
        Fingerprint::from_bytes([1; 32])
    }

    #[test]
    fn hs256_accepts_good_and_refuses_bad_tokens() {
        let cfg = AuthConfig::new(AuthKey::Hs256(b"secret".to_vec()));
        let good = sign_hs256(b"secret", &json!({"exp": 1_800_000_100}));
        assert_eq!(verify(&cfg, &good, NOW_MS, &fp()), Ok(()));
        let wrong_key = sign_hs256(b"other", &json!({"exp": 1_800_000_100}));
        assert_eq!(verify(&cfg, &wrong_key, NOW_MS, &fp()), Err(AuthError::Invalid("bad signature")));
        let expired = sign_hs256(b"secret", &json!({"exp": 1_799_999_000}));
        assert_eq!(verify(&cfg, &expired, NOW_MS, &fp()), Err(AuthError::Expired));
        let no_exp = sign_hs256(b"secret", &json!({}));
        assert_eq!(verify(&cfg, &no_exp, NOW_MS, &fp()), Err(AuthError::Invalid("missing exp")));
        let other_fp = sign_hs256(b"secret", &json!({"exp": 1_800_000_100, "fp": "ab"}));
        assert!(matches!(verify(&cfg, &other_fp, NOW_MS, &fp()), Err(AuthError::Invalid(_))));
        assert!(matches!(verify(&cfg, "a.b", NOW_MS, &fp()), Err(AuthError::Invalid(_))));
        // alg confusion: an ES256 server refuses HS256 tokens.
        let es = AuthConfig::new(AuthKey::Es256(*SigningKey::from_bytes(&[3u8; 32].into()).unwrap().verifying_key()));
        assert_eq!(verify(&es, &good, NOW_MS, &fp()), Err(AuthError::Invalid("unexpected alg")));
    }

    #[test]
    fn es256_and_claims() {
        let sk = SigningKey::from_bytes(&[5u8; 32].into()).unwrap();
        let mut cfg = AuthConfig::new(AuthKey::Es256(*sk.verifying_key()));
        cfg.issuer = Some("me".into());
        cfg.audience = Some("peerlink".into());
        let make = |claims: serde_json::Value| {
            let h = B64URL.encode(br#"{"alg":"ES256"}"#);
            let p = B64URL.encode(claims.to_string());
            let sig: Signature = sk.sign(format!("{h}.{p}").as_bytes());
            format!("{h}.{p}.{}", B64URL.encode(sig.to_bytes()))
        };
        let ok = make(json!({"exp": 1_800_000_100, "iss": "me", "aud": ["x", "peerlink"], "fp": fp().to_string()}));
        assert_eq!(verify(&cfg, &ok, NOW_MS, &fp()), Ok(()));
        let bad_iss = make(json!({"exp": 1_800_000_100, "iss": "you", "aud": "peerlink"}));
        assert_eq!(verify(&cfg, &bad_iss, NOW_MS, &fp()), Err(AuthError::Invalid("wrong issuer")));
        let future = make(json!({"exp": 1_800_000_100, "nbf": 1_800_000_090, "iss": "me", "aud": "peerlink"}));
        assert_eq!(verify(&cfg, &future, NOW_MS, &fp()), Err(AuthError::Expired));
    }
}
