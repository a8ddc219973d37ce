//! Where a transfer's bytes come from and go to, when the application hands them to the
//! core instead of answering [`TransferEvent::Read`](super::TransferEvent::Read) and
//! [`TransferEvent::Write`](super::TransferEvent::Write) itself.
//!
//! The core never opens a file: the adapters implement these traits over files (see
//! `peerlink_blocking::files`), and the core calls them as chunks go out and come in. A source
//! is read one chunk at a time, right into the frame that is sent, only when the channel has
//! room; a sink is written one checked chunk at a time, from the frame that arrived. So a
//! transfer with a source or sink holds at most one chunk in memory.

use std::io;

/// Bytes to send, read at any offset.
pub trait ChunkSource: Send {
    /// Fills all of `buf` with the bytes at `offset`. An error cancels the transfer.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// Where received bytes are stored. Chunks come in order, each checked (CRC-32) already;
/// the whole is checked (SHA-256) before [`commit`](ChunkSink::commit).
pub trait ChunkSink: Send {
    /// Stores `data` at `offset`. An error cancels the transfer.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Every byte arrived and the whole verified: make it final (e.g. rename a part file).
    /// An error fails the transfer on both sides.
    fn commit(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// The transfer failed or was cancelled: drop what was written.
    fn abort(&mut self) {}
}

impl ChunkSource for Vec<u8> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_slice(self, offset, buf)
    }
}

impl ChunkSource for std::sync::Arc<[u8]> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_slice(self, offset, buf)
    }
}

fn read_slice(data: &[u8], offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let start = usize::try_from(offset).map_err(io::Error::other)?;
    let bytes = start.checked_add(buf.len()).and_then(|end| data.get(start..end));
    let bytes = bytes.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the source"))?;
    buf.copy_from_slice(bytes);
    Ok(())
}

/// A [`ChunkSource`] from a function: `read(offset, buf)` fills `buf` (a generated source, a
/// database blob...).
pub struct SourceFn<F>(pub F);

impl<F: FnMut(u64, &mut [u8]) -> io::Result<()> + Send> ChunkSource for SourceFn<F> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (self.0)(offset, buf)
    }
}

/// A [`ChunkSink`] from a function: `write(offset, data)` for every chunk, in order. It
/// neither commits nor aborts: the application learns the outcome from the transfer's
/// `Completed` or `Failed` event.
pub struct SinkFn<F>(pub F);

impl<F: FnMut(u64, &[u8]) -> io::Result<()> + Send> ChunkSink for SinkFn<F> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        (self.0)(offset, data)
    }
}

/// The MIME type of an image, from its first bytes (PNG, JPEG, GIF, WebP, BMP), or `None`.
/// This is how an `ImageTransfer` is told from a plain file.
pub fn image_mime(head: &[u8]) -> Option<&'static str> {
    match head {
        [0x89, b'P', b'N', b'G', ..] => Some("image/png"),
        [0xFF, 0xD8, 0xFF, ..] => Some("image/jpeg"),
        [b'G', b'I', b'F', b'8', ..] => Some("image/gif"),
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'E', b'B', b'P', ..] => Some("image/webp"),
        [b'B', b'M', ..] => Some("image/bmp"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_recognised_by_their_first_bytes() {
        assert_eq!(image_mime(b"\x89PNG\r\n\x1a\n...."), Some("image/png"));
        assert_eq!(image_mime(b"\xFF\xD8\xFF\xE0"), Some("image/jpeg"));
        assert_eq!(image_mime(b"GIF89a"), Some("image/gif"));
        assert_eq!(image_mime(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(image_mime(b"hello"), None);
        assert_eq!(image_mime(b""), None);
    }

    #[test]
    fn memory_sources_refuse_reads_past_the_end() {
        let mut v = vec![1u8, 2, 3];
        let mut buf = [0; 2];
        v.read_at(1, &mut buf).unwrap();
        assert_eq!(buf, [2, 3]);
        assert_eq!(v.read_at(2, &mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(v.read_at(u64::MAX, &mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
