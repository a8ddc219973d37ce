//! IVF, the container VP8 and VP9 test streams come in (what `ffmpeg -c:v libvpx` writes):
//! read frames out of it to send, and write received frames into it to keep. Bytes in, bytes
//! out: reading and writing the file is the application's.
//!
//! Layout (little-endian): a 32-byte header (`DKIF`, version 0, header length 32, the codec's
//! FourCC, width, height, time base denominator and numerator, frame count, 4 unused bytes),
//! then per frame a 12-byte header (frame length u32, timestamp u64 in time-base units) and
//! the frame.

use super::Codec;

/// Bytes of the file header.
pub const HEADER_LEN: usize = 32;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 12;
/// The largest frame read (a guard against a corrupt length).
pub const MAX_FRAME_LEN: usize = 16 << 20;

/// Why IVF bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IvfError {
    /// Not an IVF file (no `DKIF`), or a header that does not add up.
    #[error("not an IVF file: {0}")]
    BadHeader(&'static str),
    /// A codec IVF files here do not carry (VP8 and VP9 only).
    #[error("unsupported codec {0:?}")]
    UnsupportedCodec([u8; 4]),
    /// A frame runs past the end of the data, or is larger than [`MAX_FRAME_LEN`].
    #[error("frame {index} is cut short or too large")]
    BadFrame {
        /// Its position, from 0.
        index: usize,
    },
}

/// What the file header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IvfHeader {
    /// The codec.
    pub codec: Codec,
    /// Picture width.
    pub width: u16,
    /// Picture height.
    pub height: u16,
    /// Time base: timestamps count `numerator / denominator` seconds (`1/30` for 30 fps).
    pub timebase: (u32, u32),
    /// Frames the header announces (writers do not always fill it in).
    pub frames: u32,
}

impl IvfHeader {
    /// Converts a frame timestamp into the codec's RTP clock (90 kHz).
    pub fn rtp_time(&self, timestamp: u64) -> u64 {
        let (num, den) = (u64::from(self.timebase.0.max(1)), u64::from(self.timebase.1.max(1)));
        timestamp.saturating_mul(num).saturating_mul(u64::from(self.codec.clock_rate())) / den
    }
}

/// One frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IvfFrame<'a> {
    /// Its timestamp, in time-base units.
    pub timestamp: u64,
    /// The encoded frame.
    pub data: &'a [u8],
}

/// Reads IVF bytes: the header, then frames.
#[derive(Debug, Clone)]
pub struct IvfReader<'a> {
    header: IvfHeader,
    rest: &'a [u8],
    index: usize,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl<'a> IvfReader<'a> {
    /// Parses the header of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Result<Self, IvfError> {
        if bytes.len() < HEADER_LEN || &bytes[..4] != b"DKIF" {
            return Err(IvfError::BadHeader("no DKIF signature"));
        }
        let header_len = usize::from(u16_at(bytes, 6));
        if u16_at(bytes, 4) != 0 || header_len < HEADER_LEN || header_len > bytes.len() {
            return Err(IvfError::BadHeader("version or header length"));
        }
        let fourcc: [u8; 4] = bytes[8..12].try_into().expect("4 bytes");
        let codec = match &fourcc {
            b"VP80" => Codec::Vp8,
            b"VP90" => Codec::Vp9,
            _ => return Err(IvfError::UnsupportedCodec(fourcc)),
        };
        let header = IvfHeader {
            codec,
            width: u16_at(bytes, 12),
            height: u16_at(bytes, 14),
            timebase: (u32_at(bytes, 20), u32_at(bytes, 16)),
            frames: u32_at(bytes, 24),
        };
        if header.timebase.0 == 0 || header.timebase.1 == 0 {
            return Err(IvfError::BadHeader("zero time base"));
        }
        Ok(IvfReader { header, rest: &bytes[header_len..], index: 0 })
    }

    /// The file header.
    pub fn header(&self) -> IvfHeader {
        self.header
    }
}

impl<'a> Iterator for IvfReader<'a> {
    type Item = Result<IvfFrame<'a>, IvfError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let index = self.index;
        self.index += 1;
        let bad = || Some(Err(IvfError::BadFrame { index }));
        if self.rest.len() < FRAME_HEADER_LEN {
            self.rest = &[];
            return bad();
        }
        let len = u32_at(self.rest, 0) as usize;
        let timestamp = u64::from_le_bytes(self.rest[4..12].try_into().expect("8 bytes"));
        if len > MAX_FRAME_LEN || self.rest.len() - FRAME_HEADER_LEN < len {
            self.rest = &[];
            return bad();
        }
        let data = &self.rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
        self.rest = &self.rest[FRAME_HEADER_LEN + len..];
        Some(Ok(IvfFrame { timestamp, data }))
    }
}

/// Writes IVF bytes (a recording of received frames).
#[derive(Debug, Clone)]
pub struct IvfWriter {
    bytes: Vec<u8>,
    frames: u32,
}

impl IvfWriter {
    /// Starts a file for `codec` (VP8 or VP9) frames of `width` × `height`, timestamps in
    /// `timebase` (numerator, denominator) seconds.
    pub fn new(codec: Codec, width: u16, height: u16, timebase: (u32, u32)) -> Result<Self, IvfError> {
        let fourcc = match codec {
            Codec::Vp8 => *b"VP80",
            Codec::Vp9 => *b"VP90",
            _ => return Err(IvfError::UnsupportedCodec(*b"????")),
        };
        if timebase.0 == 0 || timebase.1 == 0 {
            return Err(IvfError::BadHeader("zero time base"));
        }
        let mut bytes = Vec::with_capacity(HEADER_LEN);
        bytes.extend_from_slice(b"DKIF");
        bytes.extend_from_slice(&0u16.to_le_bytes());
        bytes.extend_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        bytes.extend_from_slice(&fourcc);
        bytes.extend_from_slice(&width.to_le_bytes());
        bytes.extend_from_slice(&height.to_le_bytes());
        bytes.extend_from_slice(&timebase.1.to_le_bytes());
        bytes.extend_from_slice(&timebase.0.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        Ok(IvfWriter { bytes, frames: 0 })
    }

    /// Appends a frame.
    pub fn push(&mut self, timestamp: u64, data: &[u8]) {
        self.bytes.extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(&timestamp.to_le_bytes());
        self.bytes.extend_from_slice(data);
        self.frames += 1;
        self.bytes[24..28].copy_from_slice(&self.frames.to_le_bytes());
    }

    /// The file so far.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The file.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_reads_back() {
        let mut w = IvfWriter::new(Codec::Vp8, 320, 240, (1, 30)).unwrap();
        w.push(0, &[0x10, 1, 2]);
        w.push(1, &[0x11]);
        let bytes = w.into_bytes();
        let r = IvfReader::new(&bytes).unwrap();
        assert_eq!(r.header(), IvfHeader { codec: Codec::Vp8, width: 320, height: 240, timebase: (1, 30), frames: 2 });
        assert_eq!(r.header().rtp_time(30), 90_000, "one second of 30 fps is 90,000 ticks");
        let frames: Vec<_> = r.collect::<Result<_, _>>().unwrap();
        assert_eq!(frames, [IvfFrame { timestamp: 0, data: &[0x10, 1, 2] }, IvfFrame { timestamp: 1, data: &[0x11] }]);
    }

    #[test]
    fn bad_bytes_get_typed_errors() {
        assert_eq!(IvfReader::new(b"RIFF").unwrap_err(), IvfError::BadHeader("no DKIF signature"));
        let mut w = IvfWriter::new(Codec::Vp9, 1, 1, (1, 1000)).unwrap();
        w.push(5, &[1, 2, 3, 4]);
        let mut bytes = w.into_bytes();
        // A cut frame: an error, then the end.
        bytes.truncate(bytes.len() - 1);
        let mut r = IvfReader::new(&bytes).unwrap();
        assert_eq!(r.next(), Some(Err(IvfError::BadFrame { index: 0 })));
        assert_eq!(r.next(), None);
        let mut h264 = bytes.clone();
        h264[8..12].copy_from_slice(b"H264");
        assert_eq!(IvfReader::new(&h264).unwrap_err(), IvfError::UnsupportedCodec(*b"H264"));
        let mut zero = bytes.clone();
        zero[16..20].copy_from_slice(&[0; 4]);
        assert!(matches!(IvfReader::new(&zero), Err(IvfError::BadHeader(_))));
        let mut huge = bytes;
        huge[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(IvfReader::new(&huge).unwrap().next(), Some(Err(IvfError::BadFrame { index: 0 })));
        assert!(IvfWriter::new(Codec::Opus, 1, 1, (1, 1)).is_err());
    }
}
