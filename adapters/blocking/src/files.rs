//! File-backed [`ChunkSource`] and [`ChunkSink`] for [`peerlink::transfer`], shared by every
//! adapter (the core never opens a file). Reads and writes are positional (`pread` /
//! `pwrite` on Unix), one chunk each, when the core asks.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use peerlink::transfer::{ChunkSink, ChunkSource, FileInfo, TransferKind, image_mime};
use sha2::{Digest, Sha256};

/// A file to send, read at offsets.
pub struct FileSource(pub File);

impl ChunkSource for FileSource {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_exact_at(&self.0, offset, buf)
    }
}

/// Where a received file goes: written as `PATH.part`, renamed to `PATH` only once the
/// transfer verified; removed when it fails or is cancelled. An existing `PATH` is replaced
/// only on success.
pub struct PartFileSink {
    file: Option<File>,
    part: PathBuf,
    path: PathBuf,
}

impl PartFileSink {
    /// Creates `path` + `.part`. It must not exist yet (`AlreadyExists` otherwise: a part file
    /// left over, another transfer into the same place, or a link planted there), so a
    /// receiver never writes through a symlink or into another transfer's file.
    pub fn create(path: &Path) -> io::Result<PartFileSink> {
        let mut part = path.as_os_str().to_owned();
        part.push(".part");
        let part = PathBuf::from(part);
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&part)?;
        Ok(PartFileSink { file: Some(file), part, path: path.to_owned() })
    }

    /// The part file being written.
    pub fn part_path(&self) -> &Path {
        &self.part
    }
}

impl ChunkSink for PartFileSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let file = self.file.as_ref().ok_or_else(|| io::Error::other("the sink is closed"))?;
        write_all_at(file, offset, data)
    }

    fn commit(&mut self) -> io::Result<()> {
        let file = self.file.take().ok_or_else(|| io::Error::other("the sink is closed"))?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.part, &self.path)
    }

    fn abort(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

impl Drop for PartFileSink {
    /// A sink dropped before it committed (its node went away) leaves no part file.
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(unix)]
fn write_all_at(file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, data, offset)
}

#[cfg(not(unix))]
fn read_exact_at(mut file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

#[cfg(not(unix))]
fn write_all_at(mut file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(data)
}

/// Hashes the file at `path` (streaming, 256 KiB at a time) and describes it: its name, size
/// and SHA-256, and an image MIME type ([`TransferKind::Image`]) when its first bytes say so.
/// Returns the open file to send from.
pub fn describe_file(path: &Path) -> io::Result<(FileInfo, FileSource)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 256 * 1024];
    let mut size = 0u64;
    let mut head = Vec::new();
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if head.len() < 16 {
            head.extend_from_slice(&buf[..n.min(16 - head.len())]);
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let name = path.file_name().and_then(|n| n.to_str()).filter(|n| !n.is_empty()).unwrap_or("file").to_owned();
    let info = FileInfo::new(name, size, hasher.finalize().into());
    let info = match image_mime(&head) {
        Some(mime) => info.typed(mime, TransferKind::Image),
        None => info,
    };
    Ok((info, FileSource(file)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("peerlink-files-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_part_file_becomes_the_file_only_on_commit() {
        let dir = temp("commit");
        let path = dir.join("out.bin");
        let mut sink = PartFileSink::create(&path).unwrap();
        sink.write_at(0, b"hello ").unwrap();
        sink.write_at(6, b"world").unwrap();
        assert!(!path.exists() && sink.part_path().exists());
        sink.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
        assert!(!dir.join("out.bin.part").exists());
        drop(sink);
        assert!(path.exists(), "dropping a committed sink keeps the file");

        let path = dir.join("gone.bin");
        let mut sink = PartFileSink::create(&path).unwrap();
        sink.write_at(0, b"partial").unwrap();
        sink.abort();
        assert!(!path.exists() && !dir.join("gone.bin.part").exists());
        let sink = PartFileSink::create(&path).unwrap();
        assert_eq!(PartFileSink::create(&path).err().map(|e| e.kind()), Some(io::ErrorKind::AlreadyExists), "one transfer per place");
        drop(sink);
        assert!(!dir.join("gone.bin.part").exists(), "dropped uncommitted: removed");
        #[cfg(unix)]
        {
            // A link planted at the part file's place is not followed.
            let target = dir.join("precious");
            std::fs::write(&target, b"keep").unwrap();
            std::os::unix::fs::symlink(&target, dir.join("trap.bin.part")).unwrap();
            assert_eq!(PartFileSink::create(&dir.join("trap.bin")).err().map(|e| e.kind()), Some(io::ErrorKind::AlreadyExists));
            assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn files_are_described_and_read_at_offsets() {
        let dir = temp("describe");
        let path = dir.join("pic.png");
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        bytes.extend((0..300_000u32).map(|i| i as u8));
        std::fs::write(&path, &bytes).unwrap();
        let (info, mut source) = describe_file(&path).unwrap();
        assert_eq!((info.name.as_str(), info.size, info.mime.as_str(), info.kind), ("pic.png", bytes.len() as u64, "image/png", TransferKind::Image));
        assert_eq!(info.sha256, <[u8; 32]>::from(Sha256::digest(&bytes)));
        let mut buf = [0; 5];
        source.read_at(262_144, &mut buf).unwrap();
        assert_eq!(buf, bytes[262_144..262_149]);
        assert_eq!(source.read_at(bytes.len() as u64 - 2, &mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert!(describe_file(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
