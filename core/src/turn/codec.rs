//! The TURN wire format (RFC 8656 over RFC 8489 STUN), the subset a UDP client speaks:
//! Allocate, Refresh, CreatePermission and ChannelBind requests and their responses, Send and
//! Data indications, ChannelData messages, and long-term credentials (MESSAGE-INTEGRITY with
//! HMAC-SHA1 under `MD5(username:realm:password)`) and FINGERPRINT.
//!
//! Pure: transaction ids come from the caller. [`decode`] never panics; anything malformed is a
//! [`StunError`].

use std::net::SocketAddr;

use crate::stun::{self, HEADER_LEN, StunError, TransactionId};

/// MAPPED-ADDRESS (RFC 8489 section 14.1); read only through [`stun::parse_address`] users.
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_USERNAME: u16 = 0x0006;
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_UNKNOWN_ATTRIBUTES: u16 = 0x000A;
const ATTR_CHANNEL_NUMBER: u16 = 0x000C;
const ATTR_LIFETIME: u16 = 0x000D;
const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
const ATTR_DATA: u16 = 0x0013;
const ATTR_REALM: u16 = 0x0014;
const ATTR_NONCE: u16 = 0x0015;
const ATTR_XOR_RELAYED_ADDRESS: u16 = 0x0016;
const ATTR_REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
const ATTR_EVEN_PORT: u16 = 0x0018;
const ATTR_REQUESTED_TRANSPORT: u16 = 0x0019;
const ATTR_DONT_FRAGMENT: u16 = 0x001A;
const ATTR_MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
const ATTR_USERHASH: u16 = 0x001E;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_RESERVATION_TOKEN: u16 = 0x0022;
const ATTR_SOFTWARE: u16 = 0x8022;
const ATTR_FINGERPRINT: u16 = 0x8028;

/// Comprehension-required attributes a TURN server may put in a response that we can skip.
const KNOWN_SKIPPED: [u16; 9] = [
    ATTR_MAPPED_ADDRESS,
    ATTR_UNKNOWN_ATTRIBUTES,
    ATTR_REQUESTED_ADDRESS_FAMILY,
    ATTR_EVEN_PORT,
    ATTR_REQUESTED_TRANSPORT,
    ATTR_DONT_FRAGMENT,
    ATTR_MESSAGE_INTEGRITY_SHA256,
    ATTR_USERHASH,
    ATTR_RESERVATION_TOKEN,
];

/// The FINGERPRINT attribute's XOR constant ("STUN").
const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// REQUESTED-TRANSPORT's protocol number for UDP.
const TRANSPORT_UDP: u8 = 17;

/// The first and last TURN channel numbers (RFC 8656 section 12).
pub const CHANNEL_MIN: u16 = 0x4000;
/// The last valid channel number.
pub const CHANNEL_MAX: u16 = 0x4FFF;
/// The most bytes a Send indication's or ChannelData's DATA may carry: what fits a STUN message
/// length (16 bits) with the other attributes of a Send indication.
pub const MAX_DATA: usize = 65_000;

/// A TURN method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Method {
    /// Allocate (0x003).
    Allocate,
    /// Refresh (0x004).
    Refresh,
    /// Send (0x006), indications only.
    Send,
    /// Data (0x007), indications only.
    Data,
    /// CreatePermission (0x008).
    CreatePermission,
    /// ChannelBind (0x009).
    ChannelBind,
}

impl Method {
    fn code(self) -> u16 {
        match self {
            Method::Allocate => 0x003,
            Method::Refresh => 0x004,
            Method::Send => 0x006,
            Method::Data => 0x007,
            Method::CreatePermission => 0x008,
            Method::ChannelBind => 0x009,
        }
    }

    fn from_code(code: u16) -> Option<Method> {
        Some(match code {
            0x003 => Method::Allocate,
            0x004 => Method::Refresh,
            0x006 => Method::Send,
            0x007 => Method::Data,
            0x008 => Method::CreatePermission,
            0x009 => Method::ChannelBind,
            _ => return None,
        })
    }
}

/// A STUN message class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// A request.
    Request,
    /// An indication (no response).
    Indication,
    /// A success response.
    Success,
    /// An error response.
    Error,
}

/// The STUN message type of `method` in `class` (RFC 8489 section 5: the class bits sit at 4
/// and 8; TURN's methods all fit the low four bits).
fn message_type(method: Method, class: Class) -> u16 {
    let class_bits = match class {
        Class::Request => 0x0000,
        Class::Indication => 0x0010,
        Class::Success => 0x0100,
        Class::Error => 0x0110,
    };
    method.code() | class_bits
}

fn split_type(kind: u16) -> (u16, Class) {
    let method = (kind & 0x000F) | ((kind & 0x00E0) >> 1) | ((kind & 0x3E00) >> 2);
    let class = match ((kind >> 4) & 1) | ((kind >> 7) & 2) {
        0 => Class::Request,
        1 => Class::Indication,
        2 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

/// A long-term credential key: `MD5(username ":" realm ":" password)` (RFC 8489 section 9.2.2).
///
/// The password is used as given: callers with non-ASCII passwords must apply OpaqueString
/// (SASLprep) themselves.
#[derive(Clone, PartialEq, Eq)]
pub struct LongTermKey([u8; 16]);

impl LongTermKey {
    /// Derives the key.
    pub fn new(username: &str, realm: &str, password: &str) -> LongTermKey {
        use md5::Digest;
        let mut md5 = md5::Md5::new();
        md5.update(username.as_bytes());
        md5.update(b":");
        md5.update(realm.as_bytes());
        md5.update(b":");
        md5.update(password.as_bytes());
        LongTermKey(md5.finalize().into())
    }

    fn hmac(&self, message: &[u8]) -> ring::hmac::Tag {
        ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &self.0), message)
    }
}

impl std::fmt::Debug for LongTermKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LongTermKey(..)")
    }
}

/// Builds one STUN/TURN message: attributes in call order, then optionally MESSAGE-INTEGRITY
/// and FINGERPRINT in [`Encoder::finish`].
#[derive(Debug)]
pub struct Encoder {
    buf: Vec<u8>,
    transaction: TransactionId,
}

impl Encoder {
    /// Starts a message of `method` and `class`.
    pub fn new(method: Method, class: Class, transaction: TransactionId) -> Encoder {
        let mut buf = Vec::with_capacity(128);
        stun::header(&mut buf, message_type(method, class), 0, transaction);
        Encoder { buf, transaction }
    }

    fn attribute(&mut self, typ: u16, value: &[u8]) -> &mut Encoder {
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf.extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        let padded = (value.len() + 3) & !3;
        self.buf.resize(self.buf.len() + padded - value.len(), 0);
        self
    }

    /// Adds USERNAME.
    pub fn username(&mut self, username: &str) -> &mut Encoder {
        self.attribute(ATTR_USERNAME, username.as_bytes())
    }

    /// Adds REALM.
    pub fn realm(&mut self, realm: &str) -> &mut Encoder {
        self.attribute(ATTR_REALM, realm.as_bytes())
    }

    /// Adds NONCE.
    pub fn nonce(&mut self, nonce: &str) -> &mut Encoder {
        self.attribute(ATTR_NONCE, nonce.as_bytes())
    }

    /// Adds SOFTWARE.
    pub fn software(&mut self, software: &str) -> &mut Encoder {
        self.attribute(ATTR_SOFTWARE, software.as_bytes())
    }

    /// Adds LIFETIME, in seconds.
    pub fn lifetime(&mut self, seconds: u32) -> &mut Encoder {
        self.attribute(ATTR_LIFETIME, &seconds.to_be_bytes())
    }

    /// Adds REQUESTED-TRANSPORT for UDP.
    pub fn requested_transport_udp(&mut self) -> &mut Encoder {
        self.attribute(ATTR_REQUESTED_TRANSPORT, &[TRANSPORT_UDP, 0, 0, 0])
    }

    /// Adds CHANNEL-NUMBER.
    pub fn channel_number(&mut self, channel: u16) -> &mut Encoder {
        let [a, b] = channel.to_be_bytes();
        self.attribute(ATTR_CHANNEL_NUMBER, &[a, b, 0, 0])
    }

    /// Adds DATA.
    pub fn data(&mut self, data: &[u8]) -> &mut Encoder {
        self.attribute(ATTR_DATA, data)
    }

    /// Adds ERROR-CODE with a reason phrase.
    pub fn error_code(&mut self, code: u16, reason: &str) -> &mut Encoder {
        let mut value = vec![0, 0, ((code / 100) & 0x07) as u8, (code % 100) as u8];
        value.extend_from_slice(reason.as_bytes());
        self.attribute(ATTR_ERROR_CODE, &value)
    }

    fn xor_address(&mut self, typ: u16, addr: SocketAddr) -> &mut Encoder {
        stun::push_xor_address(&mut self.buf, typ, addr, self.transaction);
        self
    }

    /// Adds XOR-PEER-ADDRESS.
    pub fn xor_peer_address(&mut self, addr: SocketAddr) -> &mut Encoder {
        self.xor_address(ATTR_XOR_PEER_ADDRESS, addr)
    }

    /// Adds XOR-RELAYED-ADDRESS.
    pub fn xor_relayed_address(&mut self, addr: SocketAddr) -> &mut Encoder {
        self.xor_address(ATTR_XOR_RELAYED_ADDRESS, addr)
    }

    /// Adds XOR-MAPPED-ADDRESS.
    pub fn xor_mapped_address(&mut self, addr: SocketAddr) -> &mut Encoder {
        self.xor_address(ATTR_XOR_MAPPED_ADDRESS, addr)
    }

    fn set_length(&mut self, extra: usize) {
        let len = (self.buf.len() - HEADER_LEN + extra) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    /// Ends the message: MESSAGE-INTEGRITY under `key` if given, then FINGERPRINT if asked
    /// (RFC 8489 sections 14.5 and 14.7: each covers the message before it, with the length
    /// field already counting it).
    pub fn finish(&mut self, key: Option<&LongTermKey>, fingerprint: bool) -> Vec<u8> {
        if let Some(key) = key {
            self.set_length(24);
            let tag = key.hmac(&self.buf);
            self.attribute(ATTR_MESSAGE_INTEGRITY, tag.as_ref());
        }
        if fingerprint {
            let crc = fingerprint_of(&self.buf);
            self.attribute(ATTR_FINGERPRINT, &crc.to_be_bytes());
        }
        self.set_length(0);
        std::mem::take(&mut self.buf)
    }
}

/// A decoded TURN message: its type and the attributes a client reads (first occurrence of
/// each; the rest skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    /// The method.
    pub method: Method,
    /// The class.
    pub class: Class,
    /// The transaction.
    pub transaction: TransactionId,
    /// XOR-MAPPED-ADDRESS.
    pub xor_mapped: Option<SocketAddr>,
    /// XOR-RELAYED-ADDRESS.
    pub xor_relayed: Option<SocketAddr>,
    /// XOR-PEER-ADDRESS.
    pub xor_peer: Option<SocketAddr>,
    /// LIFETIME, in seconds.
    pub lifetime: Option<u32>,
    /// ERROR-CODE: the code and its reason phrase.
    pub error: Option<(u16, String)>,
    /// USERNAME.
    pub username: Option<&'a str>,
    /// REALM.
    pub realm: Option<&'a str>,
    /// NONCE.
    pub nonce: Option<&'a str>,
    /// SOFTWARE.
    pub software: Option<&'a str>,
    /// DATA.
    pub data: Option<&'a [u8]>,
    /// CHANNEL-NUMBER.
    pub channel: Option<u16>,
    /// Where MESSAGE-INTEGRITY starts, if present (what [`Message::verify`] needs).
    integrity_at: Option<usize>,
    raw: &'a [u8],
}

impl Message<'_> {
    /// Returns true if the message carries MESSAGE-INTEGRITY.
    pub fn has_integrity(&self) -> bool {
        self.integrity_at.is_some()
    }

    /// Returns true if the message carries a MESSAGE-INTEGRITY that checks under `key`.
    pub fn verify(&self, key: &LongTermKey) -> bool {
        let Some(at) = self.integrity_at else { return false };
        // The HMAC covers the message up to the attribute, with the length field counting up to
        // and including it.
        let mut covered = self.raw[..at].to_vec();
        covered[2..4].copy_from_slice(&((at + 24 - HEADER_LEN) as u16).to_be_bytes());
        let mac = &self.raw[at + 4..at + 24];
        ring::hmac::verify(&ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &key.0), &covered, mac).is_ok()
    }
}

/// The FINGERPRINT value for a message whose bytes before the attribute are `prefix`: a CRC-32
/// with the length field counting the attribute, XORed with "STUN" (RFC 8489 section 14.7).
fn fingerprint_of(prefix: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&prefix[..2]);
    crc.update(&((prefix.len() + 8 - HEADER_LEN) as u16).to_be_bytes());
    crc.update(&prefix[4..]);
    crc.finalize() ^ FINGERPRINT_XOR
}

fn text(typ: u16, value: &[u8]) -> Result<&str, StunError> {
    std::str::from_utf8(value).map_err(|_| StunError::BadAttribute(typ))
}

fn xor_address(typ: u16, value: &[u8], transaction: TransactionId) -> Result<SocketAddr, StunError> {
    stun::parse_address(value, Some(transaction)).ok_or(StunError::BadAttribute(typ))
}

/// Decodes a TURN message (not a Binding: [`stun::decode`] reads those).
///
/// FINGERPRINT, if present, must be last and must match. Attributes after MESSAGE-INTEGRITY
/// other than FINGERPRINT are ignored (RFC 8489 section 14.5); an unknown
/// comprehension-required attribute is [`StunError::UnknownAttribute`].
pub fn decode(datagram: &[u8]) -> Result<Message<'_>, StunError> {
    let (kind, transaction, body) = stun::split_message(datagram)?;
    let (method_code, class) = split_type(kind);
    let method = Method::from_code(method_code).ok_or(StunError::Unsupported(kind))?;
    let mut m = Message {
        method,
        class,
        transaction,
        xor_mapped: None,
        xor_relayed: None,
        xor_peer: None,
        lifetime: None,
        error: None,
        username: None,
        realm: None,
        nonce: None,
        software: None,
        data: None,
        channel: None,
        integrity_at: None,
        raw: datagram,
    };
    let mut offset = HEADER_LEN;
    let mut fingerprint_seen = false;
    for attr in stun::attributes(body) {
        let (typ, value) = attr?;
        let at = offset;
        offset += 4 + ((value.len() + 3) & !3);
        if fingerprint_seen {
            return Err(StunError::BadFingerprint);
        }
        if typ == ATTR_FINGERPRINT {
            fingerprint_seen = true;
            if value != fingerprint_of(&datagram[..at]).to_be_bytes() {
                return Err(StunError::BadFingerprint);
            }
            continue;
        }
        if m.integrity_at.is_some() {
            continue;
        }
        match typ {
            ATTR_MESSAGE_INTEGRITY => {
                if value.len() != 20 {
                    return Err(StunError::BadAttribute(typ));
                }
                m.integrity_at = Some(at);
            }
            ATTR_XOR_MAPPED_ADDRESS if m.xor_mapped.is_none() => m.xor_mapped = Some(xor_address(typ, value, transaction)?),
            ATTR_XOR_RELAYED_ADDRESS if m.xor_relayed.is_none() => m.xor_relayed = Some(xor_address(typ, value, transaction)?),
            ATTR_XOR_PEER_ADDRESS if m.xor_peer.is_none() => m.xor_peer = Some(xor_address(typ, value, transaction)?),
            ATTR_LIFETIME if m.lifetime.is_none() => {
                let bytes: [u8; 4] = value.try_into().map_err(|_| StunError::BadAttribute(typ))?;
                m.lifetime = Some(u32::from_be_bytes(bytes));
            }
            ATTR_ERROR_CODE if m.error.is_none() => m.error = Some(stun::parse_error_code(value).ok_or(StunError::BadAttribute(typ))?),
            ATTR_USERNAME if m.username.is_none() => m.username = Some(text(typ, value)?),
            ATTR_REALM if m.realm.is_none() => m.realm = Some(text(typ, value)?),
            ATTR_NONCE if m.nonce.is_none() => m.nonce = Some(text(typ, value)?),
            ATTR_SOFTWARE if m.software.is_none() => m.software = Some(text(typ, value)?),
            ATTR_DATA if m.data.is_none() => m.data = Some(value),
            ATTR_CHANNEL_NUMBER if m.channel.is_none() => {
                if value.len() != 4 {
                    return Err(StunError::BadAttribute(typ));
                }
                m.channel = Some(u16::from_be_bytes([value[0], value[1]]));
            }
            ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_RELAYED_ADDRESS | ATTR_XOR_PEER_ADDRESS | ATTR_LIFETIME | ATTR_ERROR_CODE
            | ATTR_USERNAME | ATTR_REALM | ATTR_NONCE | ATTR_SOFTWARE | ATTR_DATA | ATTR_CHANNEL_NUMBER => {}
            t if t < 0x8000 && !KNOWN_SKIPPED.contains(&t) => return Err(StunError::UnknownAttribute(t)),
            _ => {}
        }
    }
    Ok(m)
}

/// Returns true if `datagram` starts like a ChannelData message (RFC 7983: first byte 64..=79).
pub fn is_channel_data(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| (0x40..=0x4F).contains(b))
}

/// Encodes a ChannelData message. Over UDP the padding to a multiple of four bytes is optional
/// (RFC 8656 section 12.5); `pad` adds it (TCP needs it).
pub fn encode_channel_data(channel: u16, data: &[u8], pad: bool) -> Vec<u8> {
    let padded = if pad { (data.len() + 3) & !3 } else { data.len() };
    let mut out = Vec::with_capacity(4 + padded);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(4 + padded, 0);
    out
}

/// Decodes a ChannelData message: the channel and its data. Up to three bytes of padding after
/// the data are allowed (and ignored); a datagram shorter than the length field claims, a
/// channel number outside 0x4000..=0x4FFF, or more trailing bytes than padding is
/// [`StunError::BadChannelData`].
pub fn decode_channel_data(datagram: &[u8]) -> Result<(u16, &[u8]), StunError> {
    if datagram.len() < 4 {
        return Err(StunError::BadChannelData);
    }
    let channel = u16::from_be_bytes([datagram[0], datagram[1]]);
    let len = u16::from_be_bytes([datagram[2], datagram[3]]) as usize;
    let rest = &datagram[4..];
    if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&channel) || rest.len() < len || rest.len() > ((len + 3) & !3) {
        return Err(StunError::BadChannelData);
    }
    Ok((channel, &rest[..len]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits.chunks(2).map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap()).collect()
    }

    const TID: TransactionId = TransactionId([7; 12]);

    /// RFC 5769 section 2.4, "Sample Request with Long-Term Authentication".
    const LONG_TERM_REQUEST: &str = "
        00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
        00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
        00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
        00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
        00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66";
    const LT_USERNAME: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
    /// The vector's password after SASLprep ("The<U+00AD>M<U+00AA>tr<U+2168>").
    const LT_PASSWORD: &str = "TheMatrIX";
    const LT_REALM: &str = "example.org";
    const LT_NONCE: &str = "f//499k954d6OL34oL9FSTvy64sA";

    /// The vector is a Binding request, which is not a TURN method: re-type it as an Allocate
    /// request would change the HMAC, so the integrity check runs on the raw bytes through the
    /// same code path `Message::verify` uses.
    fn verify_raw(raw: &[u8], key: &LongTermKey) -> bool {
        let mut retyped = raw.to_vec();
        retyped[0..2].copy_from_slice(&0x0003u16.to_be_bytes());
        let m = decode(&retyped).unwrap();
        // Put the original type back under the decoded view.
        Message { raw, ..m }.verify(key)
    }

    #[test]
    fn long_term_integrity_matches_rfc5769() {
        let raw = hex(LONG_TERM_REQUEST);
        let key = LongTermKey::new(LT_USERNAME, LT_REALM, LT_PASSWORD);
        assert!(verify_raw(&raw, &key));
        assert!(!verify_raw(&raw, &LongTermKey::new(LT_USERNAME, LT_REALM, "TheMatrIx")));
        // And the encoder produces the vector byte for byte.
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&raw[8..20]);
        let mut e = Encoder::new(Method::Allocate, Class::Request, TransactionId(tid));
        e.username(LT_USERNAME).nonce(LT_NONCE).realm(LT_REALM);
        e.buf[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
        assert_eq!(e.finish(Some(&key), false), raw);
    }

    #[test]
    fn fingerprint_matches_rfc5769() {
        // Section 2.2, the IPv4 response: its FINGERPRINT (c0 7d 4c 96) checks; one flipped bit
        // in the SOFTWARE value does not.
        let raw = hex(
            "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220
             002000080001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7
             80280004c07d4c96",
        );
        let at = raw.len() - 8;
        assert_eq!(fingerprint_of(&raw[..at]).to_be_bytes(), raw[at + 4..]);
        let mut flipped = raw.clone();
        flipped[30] ^= 1;
        assert_ne!(fingerprint_of(&flipped[..at]).to_be_bytes(), raw[at + 4..]);
        // Our encoder's fingerprint, verified by our decoder, and a flipped bit refused.
        let mut e = Encoder::new(Method::Allocate, Class::Success, TID);
        e.software("test vector ");
        let msg = e.finish(None, true);
        assert!(decode(&msg).is_ok());
        let mut flipped = msg.clone();
        flipped[25] ^= 1;
        assert_eq!(decode(&flipped), Err(StunError::BadFingerprint));
    }

    #[test]
    fn messages_round_trip() {
        let key = LongTermKey::new("u", "r", "p");
        let peer: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let relayed: SocketAddr = "198.51.100.4:50000".parse().unwrap();
        let mapped: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let mut e = Encoder::new(Method::Allocate, Class::Success, TID);
        e.xor_relayed_address(relayed).xor_mapped_address(mapped).lifetime(600).software("coturn");
        let bytes = e.finish(Some(&key), true);
        let m = decode(&bytes).unwrap();
        assert_eq!((m.method, m.class, m.transaction), (Method::Allocate, Class::Success, TID));
        assert_eq!((m.xor_relayed, m.xor_mapped, m.lifetime, m.software), (Some(relayed), Some(mapped), Some(600), Some("coturn")));
        assert!(m.verify(&key));
        assert!(!m.verify(&LongTermKey::new("u", "r", "q")));

        let mut e = Encoder::new(Method::Send, Class::Indication, TID);
        e.xor_peer_address(peer).data(b"hello");
        let bytes = e.finish(None, false);
        let m = decode(&bytes).unwrap();
        assert_eq!((m.method, m.class, m.xor_peer, m.data), (Method::Send, Class::Indication, Some(peer), Some(&b"hello"[..])));
        assert!(!m.has_integrity());

        let mut e = Encoder::new(Method::ChannelBind, Class::Request, TID);
        e.channel_number(0x4001).xor_peer_address(peer).username("u").realm("r").nonce("n");
        let bytes = e.finish(Some(&key), true);
        let m = decode(&bytes).unwrap();
        assert_eq!((m.channel, m.username, m.realm, m.nonce), (Some(0x4001), Some("u"), Some("r"), Some("n")));

        let mut e = Encoder::new(Method::Refresh, Class::Error, TID);
        e.error_code(438, "Stale Nonce").nonce("fresh");
        let bytes = e.finish(None, false);
        let m = decode(&bytes).unwrap();
        assert_eq!((m.class, m.error, m.nonce), (Class::Error, Some((438, "Stale Nonce".into())), Some("fresh")));

        for (method, class) in [(Method::CreatePermission, Class::Success), (Method::Data, Class::Indication), (Method::Refresh, Class::Request)] {
            let bytes = Encoder::new(method, class, TID).finish(None, true);
            let m = decode(&bytes).unwrap();
            assert_eq!((m.method, m.class), (method, class));
        }
    }

    #[test]
    fn attributes_after_integrity_are_ignored() {
        let key = LongTermKey::new("u", "r", "p");
        let mut e = Encoder::new(Method::Refresh, Class::Success, TID);
        e.lifetime(100);
        let mut bytes = e.finish(Some(&key), false);
        // Append a LIFETIME after MESSAGE-INTEGRITY: not covered, so not read.
        bytes.extend_from_slice(&[0x00, 0x0D, 0, 4, 0, 0, 0, 1]);
        let len = (bytes.len() - HEADER_LEN) as u16;
        bytes[2..4].copy_from_slice(&len.to_be_bytes());
        let m = decode(&bytes).unwrap();
        assert_eq!(m.lifetime, Some(100));
    }

    #[test]
    fn malformed_messages_are_typed_errors() {
        assert_eq!(decode(&[]), Err(StunError::NotStun));
        // A Binding is not a TURN method.
        assert_eq!(decode(&stun::binding_request(TID)), Err(StunError::Unsupported(0x0001)));
        // LIFETIME of 3 bytes.
        let mut e = Encoder::new(Method::Refresh, Class::Success, TID);
        e.attribute(ATTR_LIFETIME, &[0, 0, 1]);
        assert_eq!(decode(&e.finish(None, false)), Err(StunError::BadAttribute(ATTR_LIFETIME)));
        // An address with family 7.
        let mut e = Encoder::new(Method::Allocate, Class::Success, TID);
        e.attribute(ATTR_XOR_RELAYED_ADDRESS, &[0, 7, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decode(&e.finish(None, false)), Err(StunError::BadAttribute(ATTR_XOR_RELAYED_ADDRESS)));
        // A REALM that is not UTF-8.
        let mut e = Encoder::new(Method::Allocate, Class::Error, TID);
        e.attribute(ATTR_REALM, &[0xff, 0xfe]);
        assert_eq!(decode(&e.finish(None, false)), Err(StunError::BadAttribute(ATTR_REALM)));
        // An unknown comprehension-required attribute; an unknown optional one is fine.
        let mut e = Encoder::new(Method::Allocate, Class::Success, TID);
        e.attribute(0x0077, &[1]);
        assert_eq!(decode(&e.finish(None, false)), Err(StunError::UnknownAttribute(0x0077)));
        let mut e = Encoder::new(Method::Allocate, Class::Success, TID);
        e.attribute(0x8077, &[1]);
        assert!(decode(&e.finish(None, false)).is_ok());
        // A short MESSAGE-INTEGRITY.
        let mut e = Encoder::new(Method::Allocate, Class::Success, TID);
        e.attribute(ATTR_MESSAGE_INTEGRITY, &[0; 19]);
        assert_eq!(decode(&e.finish(None, false)), Err(StunError::BadAttribute(ATTR_MESSAGE_INTEGRITY)));
        // Anything after FINGERPRINT.
        let mut e = Encoder::new(Method::Allocate, Class::Success, TID);
        let mut bytes = e.finish(None, true);
        bytes.extend_from_slice(&[0x80, 0x22, 0, 0]);
        let len = (bytes.len() - HEADER_LEN) as u16;
        bytes[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode(&bytes), Err(StunError::BadFingerprint));
        // Every truncation of a valid message fails cleanly.
        let mut e = Encoder::new(Method::Allocate, Class::Success, TID);
        e.xor_relayed_address("1.2.3.4:5".parse().unwrap()).lifetime(1).realm("abc");
        let full = e.finish(Some(&LongTermKey::new("a", "b", "c")), true);
        for n in 0..full.len() {
            assert!(decode(&full[..n]).is_err(), "{n}");
        }
    }

    #[test]
    fn channel_data_framing_and_padding() {
        let unpadded = encode_channel_data(0x4000, b"abcde", false);
        assert_eq!(unpadded, [0x40, 0x00, 0, 5, b'a', b'b', b'c', b'd', b'e']);
        let padded = encode_channel_data(0x4fff, b"abcde", true);
        assert_eq!(padded.len(), 12);
        assert_eq!(&padded[9..], [0, 0, 0]);
        assert!(is_channel_data(&unpadded) && is_channel_data(&padded));
        assert!(!is_channel_data(&stun::binding_request(TID)));
        assert_eq!(decode_channel_data(&unpadded), Ok((0x4000, &b"abcde"[..])));
        assert_eq!(decode_channel_data(&padded), Ok((0x4fff, &b"abcde"[..])));
        assert_eq!(decode_channel_data(&encode_channel_data(0x4001, b"", false)), Ok((0x4001, &b""[..])));
        // Shorter than claimed, more than padding, a channel out of range, no header.
        assert_eq!(decode_channel_data(&unpadded[..8]), Err(StunError::BadChannelData));
        let mut long = padded.clone();
        long.extend_from_slice(&[0; 4]);
        assert_eq!(decode_channel_data(&long), Err(StunError::BadChannelData));
        assert_eq!(decode_channel_data(&encode_channel_data(0x5000, b"x", false)), Err(StunError::BadChannelData));
        assert_eq!(decode_channel_data(&[0x40, 0]), Err(StunError::BadChannelData));
    }

    #[test]
    fn message_types_split_back() {
        for method in [Method::Allocate, Method::Refresh, Method::Send, Method::Data, Method::CreatePermission, Method::ChannelBind] {
            for class in [Class::Request, Class::Indication, Class::Success, Class::Error] {
                assert_eq!(split_type(message_type(method, class)), (method.code(), class));
            }
        }
        assert_eq!(message_type(Method::Allocate, Class::Error), 0x0113);
        assert_eq!(message_type(Method::Send, Class::Indication), 0x0016);
        assert_eq!(message_type(Method::ChannelBind, Class::Success), 0x0109);
    }
}
