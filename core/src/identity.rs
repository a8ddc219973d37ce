//! Persistent ECDSA P-256 identities and their fingerprints.
//!
//! A peer's identity *is* its key: the [`Fingerprint`] is the SHA-256 hash of the public key, so
//! nobody can hold a fingerprint without the private key behind it, and a signature proves it.
//! The signaling server never assigns fingerprints; it recomputes them from the key a client
//! proves it holds.
//!
//! ```
//! use peerlink::identity::Identity;
//! use rand::SeedableRng;
//!
//! let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
//! let alice = Identity::generate(&mut rng);
//! let keys = alice.export();
//! let restored = Identity::restore(&keys).unwrap();
//! assert_eq!(restored.fingerprint(), alice.fingerprint());
//!
//! let sig = alice.sign(&mut rng, b"hello");
//! assert!(alice.public_key().verify(b"hello", &sig).is_ok());
//! ```

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use p256::ecdsa::signature::hazmat::{PrehashVerifier, RandomizedPrehashSigner};
use p256::ecdsa::{Signature as EcdsaSignature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Errors from restoring or parsing identity material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A field was not valid base64.
    #[error("{field} is not valid base64")]
    Base64 {
        /// Which field.
        field: &'static str,
    },
    /// The public key is not an uncompressed or compressed SEC1 P-256 point.
    #[error("public key is not a valid P-256 point")]
    InvalidPublicKey,
    /// The private key is not a valid PKCS#8 P-256 key.
    #[error("private key is not a valid PKCS#8 P-256 key")]
    InvalidPrivateKey,
    /// The public key does not belong to the private key.
    #[error("public key does not match the private key")]
    KeyMismatch,
    /// The fingerprint is not the hash of the public key.
    #[error("fingerprint {claimed} does not match the key (expected {actual})")]
    FingerprintMismatch {
        /// The fingerprint that was claimed.
        claimed: String,
        /// The fingerprint the key actually has.
        actual: Fingerprint,
    },
    /// A fingerprint string is not 64 lowercase hex digits.
    #[error("fingerprint must be 64 hex digits")]
    InvalidFingerprint,
    /// A signature is malformed (not 64 bytes of r||s).
    #[error("signature is malformed")]
    InvalidSignature,
    /// A signature does not verify.
    #[error("signature does not verify")]
    BadSignature,
}

/// The SHA-256 hash of a peer's SEC1-uncompressed public key; its identity on the wire.
///
/// Displayed and serialized as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Returns the fingerprint of a public key.
    pub fn of(key: &PublicKey) -> Self {
        let point = key.0.to_encoded_point(false);
        Fingerprint(Sha256::digest(point.as_bytes()).into())
    }

    /// Returns the raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Builds a fingerprint from raw bytes (for tests and tools; it proves nothing).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }

    /// Returns the first 8 hex digits, for logs.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_owned()
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lowercase hex digit -> its value; anything else -> 0xff.
const UNHEX: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

impl Fingerprint {
    /// The 64 lowercase hex digits.
    fn hex(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = HEX[(b >> 4) as usize];
            out[2 * i + 1] = HEX[(b & 0xf) as usize];
        }
        out
    }

    /// Appends the 64 lowercase hex digits to `out` (what `Display` prints, without the
    /// formatter).
    pub fn write_hex(&self, out: &mut String) {
        // The buffer holds only ASCII hex digits.
        out.push_str(std::str::from_utf8(&self.hex()).unwrap_or_default());
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The buffer holds only ASCII hex digits.
        f.write_str(std::str::from_utf8(&self.hex()).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.short())
    }
}

impl FromStr for Fingerprint {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(IdentityError::InvalidFingerprint);
        }
        // Every `to` of every relay is parsed here: decode without a branch per digit and
        // check all digits at once.
        let mut out = [0u8; 32];
        let mut bad = 0u8;
        for (byte, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let (hi, lo) = (UNHEX[pair[0] as usize], UNHEX[pair[1] as usize]);
            bad |= hi | lo;
            *byte = (hi << 4) | (lo & 0x0f);
        }
        if bad & 0xf0 != 0 {
            return Err(IdentityError::InvalidFingerprint);
        }
        Ok(Fingerprint(out))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A P-256 public key that verifies identity signatures.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint().short())
    }
}

impl PublicKey {
    /// Parses a base64 SEC1 point (65-byte uncompressed or 33-byte compressed).
    pub fn from_base64(s: &str) -> Result<Self, IdentityError> {
        let raw = B64
            .decode(s)
            .map_err(|_| IdentityError::Base64 { field: "publicKey" })?;
        Self::from_sec1(&raw)
    }

    /// Parses a SEC1 point (65-byte uncompressed or 33-byte compressed).
    pub fn from_sec1(raw: &[u8]) -> Result<Self, IdentityError> {
        VerifyingKey::from_sec1_bytes(raw)
            .map(PublicKey)
            .map_err(|_| IdentityError::InvalidPublicKey)
    }

    /// Returns the 65-byte uncompressed SEC1 point.
    pub fn to_sec1(&self) -> [u8; 65] {
        let point = self.0.to_encoded_point(false);
        let mut out = [0u8; 65];
        out.copy_from_slice(point.as_bytes());
        out
    }

    /// Returns the key as base64 of its 65-byte uncompressed SEC1 point (WebCrypto's `raw`).
    pub fn to_base64(&self) -> String {
        B64.encode(self.0.to_encoded_point(false).as_bytes())
    }

    /// Returns this key's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(self)
    }

    /// Verifies a signature made by [`Identity::sign`] over `message`.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), IdentityError> {
        let digest = Sha256::digest(message);
        self.0
            .verify_prehash(&digest, &signature.0)
            .map_err(|_| IdentityError::BadSignature)
    }
}

/// An ECDSA P-256 / SHA-256 signature, 64 bytes `r || s` (WebCrypto's format).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Signature(EcdsaSignature);

impl Signature {
    /// Parses a base64 `r || s` signature.
    pub fn from_base64(s: &str) -> Result<Self, IdentityError> {
        let raw = B64
            .decode(s)
            .map_err(|_| IdentityError::Base64 { field: "signature" })?;
        EcdsaSignature::from_slice(&raw)
            .map(Signature)
            .map_err(|_| IdentityError::InvalidSignature)
    }

    /// Parses a 64-byte `r || s` signature.
    pub fn from_bytes(raw: &[u8]) -> Result<Self, IdentityError> {
        EcdsaSignature::from_slice(raw).map(Signature).map_err(|_| IdentityError::InvalidSignature)
    }

    /// Returns the 64 bytes `r || s`.
    pub fn to_bytes(&self) -> [u8; 64] {
        self.0.to_bytes().into()
    }

    /// Returns the signature as base64 of `r || s`.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0.to_bytes())
    }
}

/// Exported identity keys, as stored by applications (`{publicKey, privateKey, fingerprint}`).
///
/// `publicKey` is base64 of the uncompressed SEC1 point, `privateKey` is base64 of PKCS#8 DER,
/// `fingerprint` is 64 hex digits. Treat the whole as a secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityKeys {
    /// Base64 of the 65-byte uncompressed SEC1 public key.
    pub public_key: String,
    /// Base64 of the PKCS#8 DER private key.
    pub private_key: String,
    /// Hex SHA-256 of the public key.
    pub fingerprint: String,
}

impl fmt::Debug for IdentityKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityKeys")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// A local identity: an ECDSA P-256 signing key and the fingerprint derived from it.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
    public: PublicKey,
    fingerprint: Fingerprint,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.fingerprint.short())
    }
}

impl Identity {
    /// Generates a new identity from the caller's RNG.
    pub fn generate<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        loop {
            let mut bytes = [0u8; 32];
            rng.fill_bytes(&mut bytes);
            // Fewer than 1 in 2^32 byte strings are not a valid scalar; draw again.
            if let Ok(key) = SigningKey::from_bytes(&bytes.into()) {
                return Self::from_signing_key(key);
            }
        }
    }

    fn from_signing_key(key: SigningKey) -> Self {
        let public = PublicKey(*key.verifying_key());
        Identity {
            fingerprint: public.fingerprint(),
            public,
            key,
        }
    }

    /// Restores an identity from exported keys, checking that all three parts agree.
    pub fn restore(keys: &IdentityKeys) -> Result<Self, IdentityError> {
        let der = B64
            .decode(&keys.private_key)
            .map_err(|_| IdentityError::Base64 { field: "privateKey" })?;
        let key = SigningKey::from_pkcs8_der(&der).map_err(|_| IdentityError::InvalidPrivateKey)?;
        let identity = Self::from_signing_key(key);
        let public = PublicKey::from_base64(&keys.public_key)?;
        if public != identity.public {
            return Err(IdentityError::KeyMismatch);
        }
        if keys.fingerprint != identity.fingerprint.to_string() {
            return Err(IdentityError::FingerprintMismatch {
                claimed: keys.fingerprint.clone(),
                actual: identity.fingerprint,
            });
        }
        Ok(identity)
    }

    /// Exports the keys for storage.
    pub fn export(&self) -> IdentityKeys {
        let der = self
            .key
            .to_pkcs8_der()
            .expect("PKCS#8 encoding of a valid P-256 key cannot fail");
        IdentityKeys {
            public_key: self.public.to_base64(),
            private_key: B64.encode(der.as_bytes()),
            fingerprint: self.fingerprint.to_string(),
        }
    }

    /// Returns the fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Returns the public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// Signs `message` (hashed with SHA-256), mixing the caller's randomness into the nonce.
    pub fn sign<R: rand::CryptoRng + ?Sized>(&self, rng: &mut R, message: &[u8]) -> Signature {
        let digest = Sha256::digest(message);
        let mut shim = RngShim(rng);
        let sig: EcdsaSignature = self
            .key
            .sign_prehash_with_rng(&mut shim, &digest)
            .expect("signing a 32-byte prehash cannot fail");
        Signature(sig.normalize_s().unwrap_or(sig))
    }
}

/// Lets a `rand 0.9` RNG drive the `rand_core 0.6` traits that the ECDSA crates use.
pub(crate) struct RngShim<'a, R: ?Sized>(pub(crate) &'a mut R);

impl<R: rand::CryptoRng + ?Sized> rand_core_06::RngCore for RngShim<'_, R> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core_06::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

impl<R: rand::CryptoRng + ?Sized> rand_core_06::CryptoRng for RngShim<'_, R> {}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand_chacha::ChaCha20Rng {
        rand_chacha::ChaCha20Rng::seed_from_u64(1)
    }

    #[test]
    fn export_restore_roundtrip() {
        let id = Identity::generate(&mut rng());
        let keys = id.export();
        assert_eq!(keys.fingerprint.len(), 64);
        let back = Identity::restore(&keys).unwrap();
        assert_eq!(back.fingerprint(), id.fingerprint());
        let json = serde_json::to_string(&keys).unwrap();
        assert!(json.contains("\"publicKey\"") && json.contains("\"privateKey\""));
    }

    #[test]
    fn restore_rejects_a_fingerprint_that_is_not_the_keys() {
        let mut r = rng();
        let id = Identity::generate(&mut r);
        let other = Identity::generate(&mut r);
        let mut keys = id.export();
        keys.fingerprint = other.fingerprint().to_string();
        assert!(matches!(
            Identity::restore(&keys),
            Err(IdentityError::FingerprintMismatch { .. })
        ));
        let mut keys = id.export();
        keys.public_key = other.public_key().to_base64();
        assert_eq!(Identity::restore(&keys).unwrap_err(), IdentityError::KeyMismatch);
        let mut keys = id.export();
        keys.private_key = "!!".into();
        assert_eq!(
            Identity::restore(&keys).unwrap_err(),
            IdentityError::Base64 { field: "privateKey" }
        );
    }

    #[test]
    fn signatures_verify_only_with_their_key_and_message() {
        let mut r = rng();
        let a = Identity::generate(&mut r);
        let b = Identity::generate(&mut r);
        let sig = a.sign(&mut r, b"msg");
        let sig = Signature::from_base64(&sig.to_base64()).unwrap();
        assert!(a.public_key().verify(b"msg", &sig).is_ok());
        assert_eq!(a.public_key().verify(b"msh", &sig), Err(IdentityError::BadSignature));
        assert_eq!(b.public_key().verify(b"msg", &sig), Err(IdentityError::BadSignature));
    }

    #[test]
    fn same_seed_same_identity() {
        let a = Identity::generate(&mut rng());
        let b = Identity::generate(&mut rng());
        assert_eq!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn fingerprint_parse_rejects_non_hex() {
        let fp = Identity::generate(&mut rng()).fingerprint();
        assert_eq!(fp.to_string().parse::<Fingerprint>().unwrap(), fp);
        assert!("xyz".parse::<Fingerprint>().is_err());
        assert!("G".repeat(64).parse::<Fingerprint>().is_err());
        assert!(fp.to_string().to_uppercase().parse::<Fingerprint>().is_err());
        // One bad digit anywhere is enough; the neighbours of the hex ranges included.
        let good = fp.to_string();
        for i in 0..64 {
            for bad in ['/', ':', '@', 'G', '`', 'g', ' '] {
                let mut s = good.clone();
                s.replace_range(i..i + 1, &bad.to_string());
                assert!(s.parse::<Fingerprint>().is_err(), "{s}");
            }
        }
        // 64 bytes, but not 64 digits.
        assert!(format!("\u{e9}{}", &good[2..]).parse::<Fingerprint>().is_err());
    }
}
