//! AES-256-GCM for [`Session`](super::Session): ring's implementation (AES-NI and carry-less
//! multiplication where the CPU has them: several GB/s per core), with its key schedule wiped
//! when the key is dropped.
//!
//! ring does not wipe its keys. The key lives here in a `Box<MaybeUninit<_>>`: a
//! `MaybeUninit` may hold any bytes, zeros included, so overwriting it in `drop` is sound
//! whatever the key's layout, and ring's key has no destructor to skip (checked when this
//! compiles). This is the only `unsafe` in the core.

use std::mem::MaybeUninit;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

// Dropping the key without running a destructor loses nothing.
const _: () = assert!(!std::mem::needs_drop::<LessSafeKey>());

/// An AES-256-GCM key, wiped when dropped.
pub(crate) struct AeadKey(Box<MaybeUninit<LessSafeKey>>);

impl AeadKey {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key"));
        AeadKey(Box::new(MaybeUninit::new(key)))
    }

    fn key(&self) -> &LessSafeKey {
        // SAFETY: initialised in `new`; only `drop` overwrites it.
        #[allow(unsafe_code)]
        unsafe {
            self.0.assume_init_ref()
        }
    }

    /// Encrypts `data` in place; returns the tag.
    pub(crate) fn seal(&self, nonce: [u8; 12], aad: &[u8], data: &mut [u8]) -> [u8; 16] {
        let tag = self.key().seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), data).expect("AES-GCM seals any message under 64 GiB");
        let mut out = [0u8; 16];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Decrypts `data` (ciphertext then tag) in place; returns the plaintext's length (it
    /// starts at 0), or `Err` if it does not authenticate (the buffer is then garbage).
    pub(crate) fn open(&self, nonce: [u8; 12], aad: &[u8], data: &mut [u8]) -> Result<usize, ()> {
        self.key().open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), data).map(|p| p.len()).map_err(|_| ())
    }
}

impl Drop for AeadKey {
    fn drop(&mut self) {
        // SAFETY: the box gives exclusive access to the `MaybeUninit`'s bytes, any bytes
        // (zeros too) are a valid `MaybeUninit`, and it is not read afterwards.
        #[allow(unsafe_code)]
        unsafe {
            zeroize::zeroize_flat_type(&mut *self.0 as *mut MaybeUninit<LessSafeKey>);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn seal(key: &AeadKey, nonce: [u8; 12], aad: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut out = msg.to_vec();
        let tag = key.seal(nonce, aad, &mut out);
        out.extend_from_slice(&tag);
        out
    }

    #[test]
    fn aes_256_gcm_matches_the_gcm_spec_test_cases() {
        // McGrew and Viega, "The Galois/Counter Mode of Operation", test cases 13, 14 and 16.
        let zero = AeadKey::new(&[0u8; 32]);
        assert_eq!(seal(&zero, [0; 12], &[], &[]), unhex("530f8afbc74536b9a963b4f1c4cb738b"));
        assert_eq!(seal(&zero, [0; 12], &[], &[0; 16]), unhex("cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"));
        let key: [u8; 32] = unhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308").try_into().unwrap();
        let c = AeadKey::new(&key);
        let p = unhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39");
        let aad = unhex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let iv: [u8; 12] = unhex("cafebabefacedbaddecaf888").try_into().unwrap();
        let t16 = unhex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f66276fc6ece0f4e1768cddf8853bb2d551b");
        assert_eq!(seal(&c, iv, &aad, &p), t16);
        // And opens it again, in place; a flipped bit anywhere (or other associated data)
        // does not authenticate.
        let mut buf = t16.clone();
        let n = c.open(iv, &aad, &mut buf).unwrap();
        assert_eq!(&buf[..n], &p[..]);
        for i in [0, 30, t16.len() - 1] {
            let mut bad = t16.clone();
            bad[i] ^= 1;
            assert_eq!(c.open(iv, &aad, &mut bad), Err(()));
        }
        let mut buf = t16.clone();
        assert_eq!(c.open(iv, b"other", &mut buf), Err(()));
    }
}
