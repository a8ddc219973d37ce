//! The `xfer/1` wire format (see `docs/PROTOCOL.md`, "Transfers"): control messages as JSON
//! text and chunks as binary frames, on a connection's transfer channel.

use serde::{Deserialize, Serialize};

/// First byte of a chunk frame.
pub(crate) const CHUNK_MAGIC: u8 = 0xC7;
/// Bytes before a chunk's payload: magic, transfer id (u64), chunk index (u64), CRC-32 (u32).
pub(crate) const CHUNK_HEADER: usize = 1 + 8 + 8 + 4;
/// Longest file name.
pub const MAX_NAME_LEN: usize = 255;
/// Longest MIME type.
pub const MAX_MIME_LEN: usize = 127;
/// Largest chunk.
pub const MAX_CHUNK_SIZE: u32 = 256 * 1024;
/// Smallest chunk.
pub const MIN_CHUNK_SIZE: u32 = 1024;

/// Why a transfer message was refused. The message is dropped; other transfers go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferWireError {
    /// Not JSON of this shape, or a binary frame without the chunk header.
    #[error("malformed transfer message: {0}")]
    Malformed(String),
    /// An offer whose sizes do not add up (chunk size out of range, chunk count not matching
    /// the size, size over the limit) or whose name or type is too long.
    #[error("bad offer: {0}")]
    BadOffer(String),
}

/// What kind of content a transfer carries (the reference's `FileTransfer`, `JSONTransfer`,
/// `ImageTransfer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransferKind {
    /// A file (or any bytes).
    File,
    /// A JSON value, as its UTF-8 text.
    Json,
    /// An image; its MIME type was detected from its first bytes.
    Image,
}

/// What an offer says about a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The transfer id (chosen by the sender, unique per connection).
    pub id: u64,
    /// The file name (no path).
    pub name: String,
    /// Total bytes.
    pub size: u64,
    /// MIME type.
    pub mime: String,
    /// The kind of content.
    pub kind: TransferKind,
    /// Bytes per chunk (every chunk but the last is this long).
    pub chunk: u32,
    /// Number of chunks (`ceil(size / chunk)`).
    pub chunks: u64,
    /// SHA-256 of the whole content, hex.
    pub sha256: String,
}

impl Offer {
    /// Checks that the sizes add up and the fields are within bounds.
    pub fn validate(&self, max_size: u64) -> Result<(), TransferWireError> {
        let bad = |m: String| Err(TransferWireError::BadOffer(m));
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk) {
            return bad(format!("chunk size {} is not in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}", self.chunk));
        }
        if self.size > max_size {
            return bad(format!("size {} is over the limit of {max_size}", self.size));
        }
        if self.chunks != self.size.div_ceil(u64::from(self.chunk)) {
            return bad(format!("{} chunks of {} do not make {} bytes", self.chunks, self.chunk, self.size));
        }
        let path_like = self.name.contains(['/', '\\']) || self.name == "." || self.name == "..";
        if self.name.is_empty() || self.name.len() > MAX_NAME_LEN || path_like || self.name.chars().any(char::is_control) {
            return bad("the name must be 1 to 255 bytes, not `.` or `..`, without a path or control characters".into());
        }
        if self.mime.len() > MAX_MIME_LEN || self.mime.chars().any(char::is_control) {
            return bad("bad MIME type".into());
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad("sha256 must be 64 hex digits".into());
        }
        Ok(())
    }

    /// The length of chunk `index`.
    pub fn chunk_len(&self, index: u64) -> usize {
        let start = index * u64::from(self.chunk);
        (self.size - start).min(u64::from(self.chunk)) as usize
    }
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum Control {
    /// Sender: here is a transfer.
    Offer(Offer),
    /// Receiver: send it, from chunk `from` (0, or where a resumed transfer left off).
    Accept {
        /// The transfer.
        id: u64,
        /// The first chunk the receiver does not hold.
        from: u64,
    },
    /// Receiver: no.
    Reject {
        /// The transfer.
        id: u64,
        /// Why.
        reason: String,
    },
    /// Either side: stop.
    Cancel {
        /// The transfer.
        id: u64,
        /// Why.
        reason: String,
    },
    /// Receiver: every chunk arrived and the SHA-256 matches.
    Verified {
        /// The transfer.
        id: u64,
    },
    /// Receiver: the whole did not verify.
    Corrupt {
        /// The transfer.
        id: u64,
        /// Why.
        reason: String,
    },
}

impl Control {
    /// Encodes as JSON text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("serializes")
    }

    /// Decodes JSON text.
    pub fn decode(text: &str) -> Result<Control, TransferWireError> {
        serde_json::from_str(text).map_err(|e| TransferWireError::Malformed(e.to_string()))
    }
}

/// A chunk frame: `magic, id, index, crc32 (of the payload), payload`, integers big-endian.
pub fn encode_chunk(id: u64, index: u64, payload: &[u8]) -> Vec<u8> {
    chunk_frame(id, index, payload.len(), |buf| {
        buf.copy_from_slice(payload);
        Ok::<(), std::convert::Infallible>(())
    })
    .unwrap_or_else(|never| match never {})
}

/// A chunk frame of a `len`-byte payload that `fill` writes in place (read straight from a
/// source into the frame that is sent: no copy in between).
pub fn chunk_frame<E>(id: u64, index: u64, len: usize, fill: impl FnOnce(&mut [u8]) -> Result<(), E>) -> Result<Vec<u8>, E> {
    chunk_frame_in(Vec::new(), id, index, len, fill)
}

/// [`chunk_frame`] in the buffer `out` (its old contents are overwritten, its allocation
/// reused).
pub fn chunk_frame_in<E>(mut out: Vec<u8>, id: u64, index: u64, len: usize, fill: impl FnOnce(&mut [u8]) -> Result<(), E>) -> Result<Vec<u8>, E> {
    out.resize(CHUNK_HEADER + len, 0);
    fill(&mut out[CHUNK_HEADER..])?;
    let crc = crc32fast::hash(&out[CHUNK_HEADER..]);
    out[0] = CHUNK_MAGIC;
    out[1..9].copy_from_slice(&id.to_be_bytes());
    out[9..17].copy_from_slice(&index.to_be_bytes());
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    Ok(out)
}

/// A decoded chunk frame, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// The transfer.
    pub id: u64,
    /// The chunk index.
    pub index: u64,
    /// Whether the payload matches its CRC-32.
    pub crc_ok: bool,
    /// The payload.
    pub payload: &'a [u8],
}

/// Decodes a chunk frame.
pub fn decode_chunk(frame: &[u8]) -> Result<Chunk<'_>, TransferWireError> {
    if frame.len() < CHUNK_HEADER || frame[0] != CHUNK_MAGIC {
        return Err(TransferWireError::Malformed("not a chunk frame".into()));
    }
    let id = u64::from_be_bytes(frame[1..9].try_into().expect("8 bytes"));
    let index = u64::from_be_bytes(frame[9..17].try_into().expect("8 bytes"));
    let crc = u32::from_be_bytes(frame[17..21].try_into().expect("4 bytes"));
    let payload = &frame[CHUNK_HEADER..];
    Ok(Chunk { id, index, crc_ok: crc32fast::hash(payload) == crc, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer() -> Offer {
        Offer {
            id: 7,
            name: "a.bin".into(),
            size: 40_000,
            mime: "application/octet-stream".into(),
            kind: TransferKind::File,
            chunk: 16_384,
            chunks: 3,
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn control_round_trips() {
        for c in [
            Control::Offer(offer()),
            Control::Accept { id: 7, from: 2 },
            Control::Reject { id: 7, reason: "no".into() },
            Control::Cancel { id: 7, reason: "user".into() },
            Control::Verified { id: 7 },
            Control::Corrupt { id: 7, reason: "sha256".into() },
        ] {
            assert_eq!(Control::decode(&c.encode()).unwrap(), c);
        }
        assert!(matches!(Control::decode("{}"), Err(TransferWireError::Malformed(_))));
        assert!(matches!(Control::decode(r#"{"t":"accept","id":1}"#), Err(TransferWireError::Malformed(_))));
    }

    #[test]
    fn offers_must_add_up() {
        assert_eq!(offer().validate(u64::MAX), Ok(()));
        assert_eq!(offer().chunk_len(2), 40_000 - 2 * 16_384);
        let bad = |f: fn(&mut Offer)| {
            let mut o = offer();
            f(&mut o);
            o.validate(1 << 40)
        };
        for f in [
            (|o: &mut Offer| o.chunks = 4) as fn(&mut Offer),
            |o| o.chunk = 100,
            |o| o.chunk = MAX_CHUNK_SIZE + 1,
            |o| {
                o.size = u64::MAX;
                o.chunks = u64::MAX.div_ceil(16_384)
            },
            |o| o.name = "../etc/passwd".into(),
            |o| o.name = "..".into(),
            |o| o.name = ".".into(),
            |o| o.name = "a\u{1b}[2Jb".into(),
            |o| o.name = "C:\\\\x".into(),
            |o| o.name = String::new(),
            |o| o.sha256 = "xyz".into(),
            |o| o.mime = "a\nb".into(),
        ] {
            assert!(matches!(bad(f), Err(TransferWireError::BadOffer(_))));
        }
        let mut empty = offer();
        empty.size = 0;
        empty.chunks = 0;
        assert_eq!(empty.validate(1), Ok(()), "a 0-byte file has no chunks");
    }

    #[test]
    fn chunks_round_trip_and_detect_corruption() {
        let frame = encode_chunk(7, 3, b"hello");
        let c = decode_chunk(&frame).unwrap();
        assert_eq!((c.id, c.index, c.crc_ok, c.payload), (7, 3, true, &b"hello"[..]));
        let mut bad = frame.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(!decode_chunk(&bad).unwrap().crc_ok);
        assert!(decode_chunk(&frame[..10]).is_err());
        assert!(decode_chunk(b"\x00rest-of-a-frame-long-enough").is_err());
    }
}
