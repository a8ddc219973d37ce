//! STUN binding (RFC 8489), just enough to learn a server-reflexive address: encode a Binding
//! request, decode the response's (XOR-)MAPPED-ADDRESS, and, for simulated networks and tests,
//! answer a request as a STUN server would.
//!
//! Everything here is pure: transaction ids come from the caller, nothing is sent. Decoding
//! never panics; anything that is not a well-formed STUN message of the kinds below is a
//! [`StunError`]. The TURN codec ([`crate::turn::codec`]) reuses the header, attribute and
//! address helpers here.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The magic cookie every RFC 5389+ message carries.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// The length of a STUN header (type, length, cookie, transaction id).
pub(crate) const HEADER_LEN: usize = 20;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_ERROR_CODE: u16 = 0x0009;

/// A STUN transaction id (96 bits), chosen by the requester.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransactionId(pub [u8; 12]);

/// A decoded STUN message of the kinds peerlink uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StunMessage {
    /// A Binding request.
    BindingRequest {
        /// Its transaction.
        transaction: TransactionId,
    },
    /// A Binding success response.
    BindingSuccess {
        /// The transaction it answers.
        transaction: TransactionId,
        /// The requester's address as the server saw it.
        mapped: SocketAddr,
    },
    /// A Binding error response.
    BindingError {
        /// The transaction it answers.
        transaction: TransactionId,
        /// The error code (e.g. 400), 0 if absent.
        code: u16,
    },
}

/// Why a datagram is not a usable STUN message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StunError {
    /// Shorter than a header, wrong leading bits, wrong magic cookie, or a length that does not
    /// match the datagram.
    #[error("not a STUN message")]
    NotStun,
    /// A STUN message of another class or method (ICE checks use Binding with attributes we
    /// do not parse here; they are not errors, just not ours).
    #[error("STUN message type {0:#06x} is not a plain Binding request or response")]
    Unsupported(u16),
    /// A Binding success without a usable (XOR-)MAPPED-ADDRESS.
    #[error("Binding response without a usable mapped address")]
    NoMappedAddress,
    /// An attribute runs past the end of the message.
    #[error("truncated STUN attribute")]
    Truncated,
    /// A TURN attribute we read has a malformed value (wrong length, bad address family,
    /// not UTF-8).
    #[error("malformed STUN attribute {0:#06x}")]
    BadAttribute(u16),
    /// A comprehension-required attribute (type below 0x8000) we do not know: RFC 8489 section
    /// 6.3.4 has the transaction fail rather than the attribute ignored.
    #[error("unknown comprehension-required STUN attribute {0:#06x}")]
    UnknownAttribute(u16),
    /// A FINGERPRINT that does not match the message, or is not its last attribute.
    #[error("STUN FINGERPRINT mismatch")]
    BadFingerprint,
    /// A TURN ChannelData message with a channel number outside 0x4000..=0x4FFF or a length
    /// that does not fit the datagram.
    #[error("malformed TURN ChannelData message")]
    BadChannelData,
}

/// Returns true if `datagram` looks like a STUN message (RFC 7983 demultiplexing: first byte
/// 0..=3, and the magic cookie).
pub fn is_stun(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER_LEN && datagram[0] < 4 && datagram[4..8] == MAGIC_COOKIE.to_be_bytes()
}

/// Returns the transaction id of a STUN message, without decoding the rest.
pub fn transaction_id(datagram: &[u8]) -> Option<TransactionId> {
    is_stun(datagram).then(|| {
        let mut t = [0u8; 12];
        t.copy_from_slice(&datagram[8..20]);
        TransactionId(t)
    })
}

/// Appends a STUN header for a body of `body_len` bytes.
pub(crate) fn header(out: &mut Vec<u8>, kind: u16, body_len: usize, transaction: TransactionId) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(body_len as u16).to_be_bytes());
    out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out.extend_from_slice(&transaction.0);
}

/// Encodes a Binding request with no attributes.
pub fn binding_request(transaction: TransactionId) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    header(&mut out, BINDING_REQUEST, 0, transaction);
    out
}

/// Encodes a Binding success response carrying `mapped` as XOR-MAPPED-ADDRESS (what a STUN
/// server sends back).
pub fn binding_success(transaction: TransactionId, mapped: SocketAddr) -> Vec<u8> {
    let value_len = match mapped {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + 4 + value_len);
    header(&mut out, BINDING_SUCCESS, 4 + value_len, transaction);
    push_xor_address(&mut out, ATTR_XOR_MAPPED_ADDRESS, mapped, transaction);
    out
}

/// Appends an XOR-encoded address attribute of type `typ` (XOR-MAPPED-ADDRESS and TURN's
/// XOR-PEER-ADDRESS and XOR-RELAYED-ADDRESS share this layout, RFC 8489 section 14.2): 12
/// bytes for IPv4, 24 for IPv6, never padded.
pub(crate) fn push_xor_address(out: &mut Vec<u8>, typ: u16, addr: SocketAddr, transaction: TransactionId) {
    let value_len: u16 = match addr {
        SocketAddr::V4(_) => 8,
        SocketAddr::V6(_) => 20,
    };
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&value_len.to_be_bytes());
    out.push(0);
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(0x01);
            out.extend_from_slice(&port.to_be_bytes());
            out.extend_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
        }
        IpAddr::V6(ip) => {
            out.push(0x02);
            out.extend_from_slice(&port.to_be_bytes());
            let mask = xor_mask_v6(transaction);
            out.extend(ip.octets().iter().zip(mask).map(|(a, m)| a ^ m));
        }
    }
}

fn xor_mask_v6(transaction: TransactionId) -> [u8; 16] {
    let mut mask = [0u8; 16];
    mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    mask[4..].copy_from_slice(&transaction.0);
    mask
}

/// Decodes a Binding request or response.
pub fn decode(datagram: &[u8]) -> Result<StunMessage, StunError> {
    let (kind, transaction, body) = split_message(datagram)?;
    match kind {
        BINDING_REQUEST => Ok(StunMessage::BindingRequest { transaction }),
        BINDING_SUCCESS => {
            let mut xor = None;
            let mut plain = None;
            for attr in attributes(body) {
                let (typ, value) = attr?;
                // Only the first occurrence of an attribute counts (RFC 8489 section 14).
                match typ {
                    ATTR_XOR_MAPPED_ADDRESS if xor.is_none() => xor = Some(parse_address(value, Some(transaction))),
                    ATTR_MAPPED_ADDRESS if plain.is_none() => plain = Some(parse_address(value, None)),
                    _ => {}
                }
            }
            let mapped = xor.flatten().or(plain.flatten()).ok_or(StunError::NoMappedAddress)?;
            Ok(StunMessage::BindingSuccess { transaction, mapped })
        }
        BINDING_ERROR => {
            let mut code = 0;
            for attr in attributes(body) {
                let (typ, value) = attr?;
                // Class 3 to 6 and number 0 to 99 (RFC 8489 section 14.8); anything else, or a
                // second ERROR-CODE, is ignored.
                if typ == ATTR_ERROR_CODE && code == 0 {
                    code = parse_error_code(value).map_or(0, |(code, _)| code);
                }
            }
            Ok(StunMessage::BindingError { transaction, code })
        }
        other => Err(StunError::Unsupported(other)),
    }
}

/// Checks a STUN header (cookie, leading bits, a length that is a multiple of 4 and matches the
/// datagram) and returns the message type, the transaction and the attribute bytes.
pub(crate) fn split_message(datagram: &[u8]) -> Result<(u16, TransactionId, &[u8]), StunError> {
    if !is_stun(datagram) {
        return Err(StunError::NotStun);
    }
    let kind = u16::from_be_bytes([datagram[0], datagram[1]]);
    let len = u16::from_be_bytes([datagram[2], datagram[3]]) as usize;
    if len % 4 != 0 || HEADER_LEN + len != datagram.len() {
        return Err(StunError::NotStun);
    }
    let transaction = transaction_id(datagram).ok_or(StunError::NotStun)?;
    Ok((kind, transaction, &datagram[HEADER_LEN..]))
}

/// Reads an ERROR-CODE value: the code (class 3 to 6, number 0 to 99, RFC 8489 section 14.8)
/// and the reason phrase (lossy UTF-8); `None` if out of range or too short.
pub(crate) fn parse_error_code(value: &[u8]) -> Option<(u16, String)> {
    if value.len() < 4 {
        return None;
    }
    let (class, number) = (u16::from(value[2] & 0x07), u16::from(value[3]));
    ((3..=6).contains(&class) && number < 100).then(|| (class * 100 + number, String::from_utf8_lossy(&value[4..]).into_owned()))
}

/// Iterates `(type, value)` over a message body, padding skipped.
pub(crate) fn attributes(mut body: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), StunError>> {
    std::iter::from_fn(move || {
        if body.is_empty() {
            return None;
        }
        if body.len() < 4 {
            body = &[];
            return Some(Err(StunError::Truncated));
        }
        let typ = u16::from_be_bytes([body[0], body[1]]);
        let len = u16::from_be_bytes([body[2], body[3]]) as usize;
        let padded = (len + 3) & !3;
        if body.len() < 4 + padded {
            body = &[];
            return Some(Err(StunError::Truncated));
        }
        let value = &body[4..4 + len];
        body = &body[4 + padded..];
        Some(Ok((typ, value)))
    })
}

/// Reads a (XOR-)MAPPED-ADDRESS-style value; `xor` carries the transaction for the XOR forms.
pub(crate) fn parse_address(value: &[u8], xor: Option<TransactionId>) -> Option<SocketAddr> {
    if value.len() < 4 {
        return None;
    }
    let family = value[1];
    let mut port = u16::from_be_bytes([value[2], value[3]]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match family {
        0x01 if value.len() == 8 => {
            let mut ip = u32::from_be_bytes([value[4], value[5], value[6], value[7]]);
            if xor.is_some() {
                ip ^= MAGIC_COOKIE;
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        0x02 if value.len() == 20 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&value[4..20]);
            if let Some(t) = xor {
                for (o, m) in octets.iter_mut().zip(xor_mask_v6(t)) {
                    *o ^= m;
                }
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        _ => None,
    }
}

/// A `stun:` URL's host and port (default 3478), as the reference `iceServers` give them.
///
/// `stuns:` (STUN over TLS) and `turn:`/`turns:` are not STUN binding servers and return
/// `None`; so does anything unparseable.
pub fn parse_stun_url(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("stun:")?;
    parse_host_port(rest.split('?').next().unwrap_or(rest))
}

/// The host and port of a `turn:` URL over UDP (RFC 7065: `turn:host[:port][?transport=udp]`,
/// port 3478 by default). `None` for anything else: `turns:`, `?transport=tcp`, malformed.
pub fn parse_turn_url(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("turn:")?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !(query.is_empty() || query.eq_ignore_ascii_case("transport=udp")) {
        return None;
    }
    parse_host_port(rest)
}

/// `[v6]:port`, `host:port` or `host` (port 3478).
fn parse_host_port(rest: &str) -> Option<(String, u16)> {
    if rest.is_empty() {
        return None;
    }
    // [v6]:port, host:port, or host.
    if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 3478,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host.to_string(), port.parse().ok()?)),
        Some(_) => None,
        None => Some((rest.to_string(), 3478)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TID: TransactionId = TransactionId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);

    #[test]
    fn request_round_trips() {
        let req = binding_request(TID);
        assert_eq!(req.len(), 20);
        assert!(is_stun(&req));
        assert_eq!(decode(&req), Ok(StunMessage::BindingRequest { transaction: TID }));
    }

    #[test]
    fn success_round_trips_v4_and_v6() {
        for mapped in ["203.0.113.9:40000".parse().unwrap(), "[2001:db8::7]:1234".parse().unwrap()] {
            let resp = binding_success(TID, mapped);
            assert_eq!(decode(&resp), Ok(StunMessage::BindingSuccess { transaction: TID, mapped }));
        }
    }

    #[test]
    fn decodes_a_known_response() {
        // RFC 5769 2.2 (IPv4 response), with the SOFTWARE, MESSAGE-INTEGRITY and FINGERPRINT
        // attributes it carries (which we skip).
        let hex = "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220\
                   002000080001a147e112a643000800149ba6a2c1b5ba50ec49e9e8f66e1b88b7c7fdfd8e\
                   8028000400c9eae0";
        let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        match decode(&bytes) {
            Ok(StunMessage::BindingSuccess { mapped, .. }) => assert_eq!(mapped, "192.0.2.1:32853".parse().unwrap()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        assert_eq!(decode(&[]), Err(StunError::NotStun));
        assert_eq!(decode(&[0u8; 19]), Err(StunError::NotStun));
        let mut req = binding_request(TID);
        req[4] ^= 1;
        assert_eq!(decode(&req), Err(StunError::NotStun), "wrong cookie");
        let mut req = binding_request(TID);
        req[3] = 4;
        assert_eq!(decode(&req), Err(StunError::NotStun), "length past the end");
        // A success whose attribute claims more than there is.
        let mut resp = binding_success(TID, "1.2.3.4:5".parse().unwrap());
        resp[22..24].copy_from_slice(&64u16.to_be_bytes());
        assert_eq!(decode(&resp), Err(StunError::Truncated));
        // A success without an address.
        let mut empty = Vec::new();
        header(&mut empty, BINDING_SUCCESS, 0, TID);
        assert_eq!(decode(&empty), Err(StunError::NoMappedAddress));
        // Other methods (an Allocate request) are not ours.
        let mut alloc = Vec::new();
        header(&mut alloc, 0x0003, 0, TID);
        assert_eq!(decode(&alloc), Err(StunError::Unsupported(0x0003)));
        // DTLS and RTP are not STUN.
        assert!(!is_stun(&[22, 254, 253, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    }

    #[test]
    fn only_the_first_address_attribute_counts() {
        let good = binding_success(TID, "1.2.3.4:5".parse().unwrap());
        // Append a second, malformed XOR-MAPPED-ADDRESS: the first still wins.
        let mut twice = good.clone();
        twice.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
        twice.extend_from_slice(&4u16.to_be_bytes());
        twice.extend_from_slice(&[0, 9, 9, 9]);
        let len = (twice.len() - HEADER_LEN) as u16;
        twice[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(decode(&twice), decode(&good));
    }

    #[test]
    fn error_codes_out_of_range_are_ignored() {
        let mut err = Vec::new();
        header(&mut err, BINDING_ERROR, 8, TID);
        err.extend_from_slice(&ATTR_ERROR_CODE.to_be_bytes());
        err.extend_from_slice(&4u16.to_be_bytes());
        err.extend_from_slice(&[0, 0, 9, 55]);
        assert_eq!(decode(&err), Ok(StunMessage::BindingError { transaction: TID, code: 0 }));
    }

    #[test]
    fn error_code_is_read() {
        let mut err = Vec::new();
        header(&mut err, BINDING_ERROR, 8, TID);
        err.extend_from_slice(&ATTR_ERROR_CODE.to_be_bytes());
        err.extend_from_slice(&4u16.to_be_bytes());
        err.extend_from_slice(&[0, 0, 4, 20]);
        assert_eq!(decode(&err), Ok(StunMessage::BindingError { transaction: TID, code: 420 }));
    }

    #[test]
    fn stun_urls() {
        assert_eq!(parse_stun_url("stun:stun.l.google.com:19302"), Some(("stun.l.google.com".into(), 19302)));
        assert_eq!(parse_stun_url("stun:example.org"), Some(("example.org".into(), 3478)));
        assert_eq!(parse_stun_url("stun:[::1]:3479"), Some(("::1".into(), 3479)));
        assert_eq!(parse_stun_url("stun:[::1]"), Some(("::1".into(), 3478)));
        assert_eq!(parse_stun_url("stun:127.0.0.1:3478?transport=udp"), Some(("127.0.0.1".into(), 3478)));
        assert_eq!(parse_stun_url("turn:example.org"), None);
        assert_eq!(parse_stun_url("stun:"), None);
        assert_eq!(parse_stun_url("stun:host:notaport"), None);
    }
}
