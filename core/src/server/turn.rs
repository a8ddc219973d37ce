//! Short-lived TURN credentials: the shared-secret scheme of the "TURN REST API"
//! (draft-uberti-behave-turn-rest), which coturn verifies with
//! `--use-auth-secret --static-auth-secret=SECRET`.
//!
//! The user name is `<expiry unix seconds>:<fingerprint>` and the password is
//! base64(HMAC-SHA1(secret, user name)). The TURN server recomputes the password from the user
//! name and its copy of the secret and refuses user names whose expiry has passed, so the
//! signaling server and the TURN server share nothing but the secret.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ring::hmac;

use crate::identity::Fingerprint;

/// Default lifetime of issued credentials: 24 hours, the TURN REST API draft's recommendation.
/// The expiry limits new allocations: coturn checks it when it authenticates an Allocate, and
/// keeps refreshing an allocation made before it (on the key it cached for that session).
pub const DEFAULT_TURN_TTL: Duration = Duration::from_secs(86_400);

/// The TURN shared secret and the servers that know it, for [`ServerConfig::turn`](super::ServerConfig::turn).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TurnSecretConfig {
    /// The secret shared with the TURN servers (coturn's `--static-auth-secret`).
    pub secret: Vec<u8>,
    /// The TURN URLs handed out with the credentials, e.g.
    /// `turn:turn.example.org:3478?transport=udp`.
    pub urls: Vec<String>,
    /// How long issued credentials are valid. Default [`DEFAULT_TURN_TTL`]; zero issues
    /// credentials that expire in the second they are issued (for tests).
    pub ttl: Duration,
}

impl TurnSecretConfig {
    /// A secret and the TURN URLs it is good for, with the default lifetime.
    pub fn new(secret: impl Into<Vec<u8>>, urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        TurnSecretConfig { secret: secret.into(), urls: urls.into_iter().map(Into::into).collect(), ttl: DEFAULT_TURN_TTL }
    }

    /// Sets the lifetime of issued credentials.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
}

impl std::fmt::Debug for TurnSecretConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnSecretConfig").field("urls", &self.urls).field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// Returns the TURN REST API user name and password for `fingerprint`, valid until
/// `expiry_unix_secs` (seconds since the Unix epoch) on TURN servers that share `secret`.
pub fn turn_rest_credentials(secret: &[u8], expiry_unix_secs: u64, fingerprint: &Fingerprint) -> (String, String) {
    let username = format!("{expiry_unix_secs}:{fingerprint}");
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, username.as_bytes());
    let credential = B64.encode(tag.as_ref());
    (username, credential)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SHA-1 written out from FIPS 180-4, independent of ring, for the known answer below.
    fn sha1(data: &[u8]) -> [u8; 20] {
        let mut h: [u32; 5] = [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476, 0xC3D2_E1F0];
        let mut msg = data.to_vec();
        msg.push(0x80);
        while msg.len() % 64 != 56 {
            msg.push(0);
        }
        msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
        for block in msg.chunks(64) {
            let mut w = [0u32; 80];
            for (i, word) in block.chunks(4).enumerate() {
                w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
            }
            for i in 16..80 {
                w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
            }
            let [mut a, mut b, mut c, mut d, mut e] = h;
            for (i, wi) in w.iter().enumerate() {
                let (f, k) = match i {
                    0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                    20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                    40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                    _ => (b ^ c ^ d, 0xCA62_C1D6),
                };
                let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*wi);
                e = d;
                d = c;
                c = b.rotate_left(30);
                b = a;
                a = t;
            }
            for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
                *x = x.wrapping_add(y);
            }
        }
        let mut out = [0u8; 20];
        for (i, x) in h.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
        }
        out
    }

    /// HMAC (RFC 2104) over the SHA-1 above.
    fn hmac_sha1(key: &[u8], data: &[u8]) -> [u8; 20] {
        let mut k = [0u8; 64];
        if key.len() > 64 {
            k[..20].copy_from_slice(&sha1(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).chain(data.iter().copied()).collect();
        let outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).chain(sha1(&inner)).collect();
        sha1(&outer)
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn the_independent_hmac_matches_the_published_vectors() {
        // FIPS 180 "abc" and RFC 2202 test cases 1, 2 and 6 (a key longer than a block).
        assert_eq!(hex(&sha1(b"abc")), "a9993e364706816aba3e25717850c26c9cd0d89d");
        assert_eq!(hex(&hmac_sha1(&[0x0b; 20], b"Hi There")), "b617318655057264e28bc0b6fb378c8ef146be00");
        assert_eq!(hex(&hmac_sha1(b"Jefe", b"what do ya want for nothing?")), "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79");
        assert_eq!(
            hex(&hmac_sha1(&[0xaa; 80], b"Test Using Larger Than Block-Size Key - Hash Key First")),
            "aa4ae5e15272d00e95705637ce8a3b55ed402112"
        );
    }

    #[test]
    fn credentials_follow_the_turn_rest_scheme() {
        let fp = Fingerprint::from_bytes([0xab; 32]);
        let secret = b"north-wind-secret";
        let (username, credential) = turn_rest_credentials(secret, 1_700_086_400, &fp);
        assert_eq!(username, format!("1700086400:{}", "ab".repeat(32)));
        let expected = B64.encode(hmac_sha1(secret, username.as_bytes()));
        assert_eq!(credential, expected);
        // 20 bytes of HMAC-SHA1 are 28 base64 characters.
        assert_eq!(credential.len(), 28);
        // Another secret, expiry or identity gives another password.
        assert_ne!(turn_rest_credentials(b"other", 1_700_086_400, &fp).1, credential);
        assert_ne!(turn_rest_credentials(secret, 1_700_086_401, &fp).1, credential);
        assert_ne!(turn_rest_credentials(secret, 1_700_086_400, &Fingerprint::from_bytes([1; 32])).1, credential);
    }

    #[test]
    fn the_secret_stays_out_of_debug() {
        let config = TurnSecretConfig::new("hunter2-secret", ["turn:127.0.0.1:3478"]);
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("turn:127.0.0.1:3478"));
        assert_eq!(config.ttl, DEFAULT_TURN_TTL);
    }
}
