//! DTLS certificates from the node's seeded RNG, and a DTLS provider whose non-cryptographic
//! randomness (retransmission jitter and the like) is seeded too.
//!
//! str0m would otherwise make its certificate itself, reading the wall clock and the OS random
//! source, and would run dimpl's timers with OS-seeded jitter: both would make a simulated run
//! impossible to repeat. What stays random on purpose is the key material of every DTLS
//! handshake (dimpl draws its ephemeral ECDHE keys from the OS) and SCTP's verification tags
//! and initial TSNs (sctp-proto draws them from `rand::rng()`): they change the bytes of
//! encrypted packets, never their timing, sizes that matter, or what the application sees.

use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use p256::ecdsa::{DerSignature, SigningKey};
use p256::pkcs8::EncodePrivateKey;
use rand::RngCore;
use str0m::config::{CryptoProvider, DtlsCert, DtlsVersion};
use str0m::crypto::dtls::{DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider, ProtocolVersion};
use str0m::crypto::CryptoError;
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::der::Encode;
use x509_cert::der::asn1::UtcTime;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::{Time, Validity};

/// Validity of generated certificates. WebRTC authenticates certificates by fingerprint, not
/// by dates, but some stacks still refuse an expired one.
const CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// Makes a self-signed ECDSA P-256 certificate (DER) and its PKCS#8 key (DER) from `rng`,
/// valid from a day before `unix_ms` for 30 days. Deterministic for a given RNG state and
/// time.
pub(crate) fn generate_certificate(rng: &mut impl RngCore, unix_ms: u64) -> Result<DtlsCert, String> {
    let mut secret = [0u8; 32];
    let key = loop {
        rng.fill_bytes(&mut secret);
        if let Ok(key) = SigningKey::from_slice(&secret) {
            break key;
        }
    };
    let mut serial = [0u8; 16];
    rng.fill_bytes(&mut serial);
    // A positive INTEGER: clear the top bit.
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    let serial = SerialNumber::new(&serial).map_err(|e| e.to_string())?;
    // UTCTime covers 1950..2050; keep the dates inside it.
    let now = Duration::from_millis(unix_ms).max(Duration::from_secs(24 * 3600)).min(Duration::from_secs(2_400_000_000));
    let not_before = UtcTime::from_unix_duration(now - Duration::from_secs(24 * 3600)).map_err(|e| e.to_string())?;
    let not_after = UtcTime::from_unix_duration(now + CERT_VALIDITY).map_err(|e| e.to_string())?;
    let validity = Validity { not_before: Time::UtcTime(not_before), not_after: Time::UtcTime(not_after) };
    let subject: Name = "CN=peerlink".parse().map_err(|e: x509_cert::der::Error| e.to_string())?;
    let spki = SubjectPublicKeyInfoOwned::from_key(*key.verifying_key()).map_err(|e| e.to_string())?;
    // A self-signed leaf, not a CA: its key usage must include digitalSignature, which
    // ECDHE-ECDSA needs (BoringSSL, in Chromium, refuses a certificate with only
    // keyCertSign | cRLSign, the root profile's: KEY_USAGE_BIT_INCORRECT).
    let profile = Profile::Leaf { issuer: subject.clone(), enable_key_agreement: false, enable_key_encipherment: false };
    let builder = CertificateBuilder::new(profile, serial, validity, subject, spki, &key).map_err(|e| e.to_string())?;
    let cert = builder.build::<DerSignature>().map_err(|e| e.to_string())?;
    let certificate = cert.to_der().map_err(|e| e.to_string())?;
    let private_key = key.to_pkcs8_der().map_err(|e| e.to_string())?.as_bytes().to_vec();
    Ok(DtlsCert { certificate, private_key })
}

thread_local! {
    /// The seed for the next DTLS instance made on this thread (set right before an `Rtc` is
    /// built, which is when str0m makes its DTLS instance).
    static NEXT_DTLS_SEED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Sets the seed the next DTLS instance built on this thread uses.
pub(crate) fn seed_next_dtls(seed: u64) {
    NEXT_DTLS_SEED.with(|s| s.set(Some(seed)));
}

/// The crypto provider every peerlink `Rtc` uses: str0m's RustCrypto provider with
/// [`SeededDtls`] in place of its DTLS provider.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let base = str0m::crypto::from_feature_flags();
            Arc::new(CryptoProvider { dtls_provider: &SeededDtls, ..base })
        })
        .clone()
}

/// dimpl (RustCrypto) with its non-cryptographic randomness seeded per instance.
#[derive(Debug)]
pub(crate) struct SeededDtls;

impl DtlsProvider for SeededDtls {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        // peerlink always brings its own (see `generate_certificate`).
        None
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let cert = dimpl::DtlsCertificate { certificate: cert.certificate.clone(), private_key: cert.private_key.clone() };
        // ICE proves return routability before DTLS starts, so server cookies would only cost a
        // round trip.
        let mut builder = dimpl::Config::builder()
            .use_server_cookie(false)
            // The peer's own timers decide when a connection has failed (`connect_timeout`,
            // `failed_timeout`). dimpl's defaults (40 s, 4 retries) would end a DTLS 1.3
            // connection whose last handshake ACK was lost in an outage, even though both
            // sides were connected and the path came back.
            .handshake_timeout(Duration::from_secs(24 * 3600))
            .flight_retries(10);
        if let Some(mtu) = mtu {
            builder = builder.mtu(mtu);
        }
        if let Some(seed) = NEXT_DTLS_SEED.with(Cell::take) {
            builder = builder.dangerously_set_rng_seed(seed);
        }
        let config = Arc::new(builder.build().map_err(|e| CryptoError::Other(format!("dimpl config: {e}")))?);
        let dtls = match dtls_version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, cert, now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, cert, now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, cert, now),
            #[allow(unreachable_patterns)]
            other => return Err(CryptoError::Other(format!("unsupported DTLS version: {other}"))),
        };
        Ok(Box::new(Instance(dtls)))
    }
}

struct Instance(dimpl::Dtls);

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeededDtlsInstance")
    }
}

impl DtlsInstance for Instance {
    fn set_active(&mut self, active: bool) {
        self.0.set_active(active);
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.0.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        self.0.poll_output(buf)
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.0.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<(), DtlsImplError> {
        self.0.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.0.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.0.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.0.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.0.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::pkcs8::DecodePrivateKey;
    use rand::SeedableRng;

    #[test]
    fn certificates_are_deterministic_and_parse() {
        use x509_cert::der::Decode;
        let a = generate_certificate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(1), 1_700_000_000_000).unwrap();
        let b = generate_certificate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(1), 1_700_000_000_000).unwrap();
        let c = generate_certificate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(2), 1_700_000_000_000).unwrap();
        assert_eq!(a.certificate, b.certificate);
        assert_ne!(a.certificate, c.certificate);
        let cert = x509_cert::Certificate::from_der(&a.certificate).unwrap();
        assert_eq!(cert.tbs_certificate.subject.to_string(), "CN=peerlink");
        assert!(p256::SecretKey::from_pkcs8_der(&a.private_key).is_ok());
    }
}
