//! File-backed and in-memory sources and sinks for [`peerlink::transfer`]: the core asks for
//! bytes and hands them out; this module reads and writes them, so the application only says
//! what to send and where to store what it accepts.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use peerlink::Fingerprint;
use peerlink::transfer::{FileInfo, TransferKind};
use sha2::{Digest, Sha256};

/// Where a sent transfer's bytes come from.
pub(crate) enum Source {
    File(File),
    Memory(Vec<u8>),
    /// The application's own reader: `(offset, len)` to bytes.
    Reader(Box<dyn FnMut(u64, usize) -> io::Result<Vec<u8>> + Send>),
}

impl Source {
    pub(crate) fn read_at(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        match self {
            Source::File(f) => {
                let mut buf = vec![0; len];
                f.seek(SeekFrom::Start(offset))?;
                f.read_exact(&mut buf)?;
                Ok(buf)
            }
            Source::Memory(m) => {
                let start = usize::try_from(offset).map_err(io::Error::other)?;
                m.get(start..start + len).map(<[u8]>::to_vec).ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past the end"))
            }
            Source::Reader(read) => {
                let data = read(offset, len)?;
                if data.len() != len {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("the reader gave {} bytes of {len}", data.len())));
                }
                Ok(data)
            }
        }
    }
}

/// Where a received transfer's bytes go. A file is written as `NAME.part` and renamed to
/// its final name only once the transfer verified; on failure the part file is removed.
pub(crate) enum Sink {
    File { file: File, part: PathBuf, path: PathBuf },
    Memory(Vec<u8>),
    /// The application's own writer: `(offset, bytes)`, in order, each checked already.
    Writer(Box<dyn FnMut(u64, &[u8]) -> io::Result<()> + Send>),
}

impl Sink {
    pub(crate) fn file(path: &Path) -> io::Result<Sink> {
        let mut part = path.as_os_str().to_owned();
        part.push(".part");
        let part = PathBuf::from(part);
        let file = File::create(&part)?;
        Ok(Sink::File { file, part, path: path.to_owned() })
    }

    pub(crate) fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        match self {
            Sink::File { file, .. } => {
                file.seek(SeekFrom::Start(offset))?;
                file.write_all(data)
            }
            Sink::Memory(m) => {
                let start = usize::try_from(offset).map_err(io::Error::other)?;
                if m.len() < start + data.len() {
                    m.resize(start + data.len(), 0);
                }
                m[start..start + data.len()].copy_from_slice(data);
                Ok(())
            }
            Sink::Writer(write) => write(offset, data),
        }
    }

    /// The transfer verified: a file takes its final name. Returns the bytes of a memory sink.
    pub(crate) fn finish(self) -> io::Result<Option<Vec<u8>>> {
        match self {
            Sink::File { file, part, path } => {
                file.sync_all()?;
                drop(file);
                std::fs::rename(part, path)?;
                Ok(None)
            }
            Sink::Memory(m) => Ok(Some(m)),
            Sink::Writer(_) => Ok(None),
        }
    }

    /// The transfer failed: nothing of it stays.
    pub(crate) fn discard(self) {
        if let Sink::File { file, part, .. } = self {
            drop(file);
            let _ = std::fs::remove_file(part);
        }
    }
}

/// Sources and sinks by (peer, transfer id).
#[derive(Default)]
pub(crate) struct Store {
    pub(crate) sources: HashMap<(Fingerprint, u64), Source>,
    pub(crate) sinks: HashMap<(Fingerprint, u64), Sink>,
    /// Memory sinks that completed, for [`crate::PollNode::take_received`].
    pub(crate) received: HashMap<(Fingerprint, u64), Vec<u8>>,
}

/// Hashes `path` (streaming) and describes it: name, size, SHA-256, and an image MIME type
/// when its first bytes say so.
pub(crate) fn describe_file(path: &Path) -> io::Result<(FileInfo, File)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 256 * 1024];
    let mut size = 0u64;
    let mut head = Vec::new();
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if head.len() < 16 {
            head.extend_from_slice(&buf[..n.min(16 - head.len())]);
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file").to_owned();
    let info = FileInfo::new(name, size, hasher.finalize().into());
    let info = match image_mime(&head) {
        Some(mime) => info.typed(mime, TransferKind::Image),
        None => info,
    };
    Ok((info, file))
}

/// The MIME type of an image, from its first bytes (PNG, JPEG, GIF, WebP, BMP).
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
}
