//! The `sync/1` state-sync wire format (see `docs/PROTOCOL.md`, "Sync"): binary, LEB128
//! varints, strings as a varint length and UTF-8 bytes.
//!
//! `pub` but `#[doc(hidden)]` only so that the fuzz harness can reach it; applications use
//! [`StateSync`](super::StateSync).

use crate::identity::Fingerprint;

use super::SyncWireError;
use super::hlc::Timestamp;

/// The format version, the first byte of every state message.
pub const VERSION: u8 = 1;
/// Most node fingerprints one message names.
pub const MAX_NODES: usize = 4096;
/// Most entries (or keys, or leaves) one message carries.
pub const MAX_ITEMS: usize = 1 << 20;
/// Largest count of writes in a version vector (2^53: no node makes that many, and
/// counting on past it cannot overflow).
pub const MAX_COUNT: u64 = 1 << 53;
/// Buckets of the top-level digest (the first byte of a key's hash).
pub const BUCKETS: usize = 256;

/// Message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Type {
    /// Entries: changes, or answers.
    Entries = 1,
    /// The top-level digest: (count, xor) per bucket.
    Digest = 2,
    /// Second-level digests of some buckets.
    SubDigest = 3,
    /// Keys and versions of some leaves.
    Summaries = 4,
    /// "Send me every entry under these prefixes."
    WantPrefixes = 5,
    /// "Send me these keys."
    WantKeys = 6,
    /// "Send me your digest."
    Hello = 7,
}

/// A version: the HLC timestamp and, in operational mode, a version vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The write's (or the merge's) timestamp.
    pub ts: Timestamp,
    /// Per node, how many writes to this key it made (operational mode; empty otherwise).
    /// Sorted by node, no duplicates, no zero counts.
    pub vv: Vec<(Fingerprint, u64)>,
}

/// One entry on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireEntry {
    /// The key.
    pub key: String,
    /// Its version.
    pub version: Version,
    /// Its value as JSON text, `None` for a tombstone (last-writer-wins mode).
    pub json: Option<String>,
    /// Operational mode: the concurrent writes it holds (each a value or a tombstone), at
    /// least one; empty in last-writer-wins mode.
    pub siblings: Vec<WireSibling>,
}

/// One of the concurrent writes an operational entry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireSibling {
    /// The writer.
    pub node: Fingerprint,
    /// Its count of writes to the key with this one (the write's "dot").
    pub counter: u64,
    /// The value as JSON text, `None` for a delete.
    pub json: Option<String>,
}

/// A (count, xor) digest of a set of entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cell {
    /// How many entries.
    pub count: u32,
    /// The xor of their hashes.
    pub xor: u64,
}

/// A part of the key-hash space: `depth` 1 is a bucket (`prefix` < 256), depth 2 a leaf
/// (`prefix` = bucket * 256 + sub-bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    /// 1 or 2.
    pub depth: u8,
    /// The prefix bits.
    pub prefix: u16,
}

/// A decoded state message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Entries.
    Entries(Vec<WireEntry>),
    /// Top-level digest.
    Digest(Box<[Cell; BUCKETS]>),
    /// Second-level digests: per bucket, 256 cells.
    SubDigest(Vec<(u8, Box<[Cell; BUCKETS]>)>),
    /// Per leaf (a depth-2 prefix), the keys and versions there.
    Summaries(Vec<(u16, Vec<(String, Version)>)>),
    /// Prefixes whose entries are wanted.
    WantPrefixes(Vec<Prefix>),
    /// Keys wanted.
    WantKeys(Vec<String>),
    /// Asks for a digest.
    Hello,
}

// ---- writing ---------------------------------------------------------------------------

/// Appends `v` as a LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a length-prefixed string.
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// The fingerprints one message refers to, by index.
#[derive(Default)]
pub struct NodeTable {
    nodes: Vec<Fingerprint>,
}

impl NodeTable {
    /// Returns the index of `fp`, adding it.
    pub fn index(&mut self, fp: &Fingerprint) -> u64 {
        // Few writers per message: a linear scan beats hashing.
        match self.nodes.iter().position(|n| n == fp) {
            Some(i) => i as u64,
            None => {
                self.nodes.push(*fp);
                (self.nodes.len() - 1) as u64
            }
        }
    }
}

/// Encodes a version's fields (timestamp, version vector) with node indexes.
pub fn put_version(out: &mut Vec<u8>, nodes: &mut NodeTable, v: &Version) {
    put_varint(out, v.ts.ms);
    put_varint(out, u64::from(v.ts.counter));
    put_varint(out, nodes.index(&v.ts.node));
    put_varint(out, v.vv.len() as u64);
    for (fp, n) in &v.vv {
        put_varint(out, nodes.index(fp));
        put_varint(out, *n);
    }
}

/// Builds a message whose body refers to a node table: `[VERSION, type, nodes, body]`.
pub fn with_nodes(t: Type, nodes: &NodeTable, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4 + nodes.nodes.len() * 32);
    out.push(VERSION);
    out.push(t as u8);
    put_varint(&mut out, nodes.nodes.len() as u64);
    for n in &nodes.nodes {
        out.extend_from_slice(n.as_bytes());
    }
    out.extend_from_slice(body);
    out
}

/// Appends one entry to an `Entries` body: with `siblings` (operational mode) if there are
/// any, else with `json`.
pub fn put_entry<'a>(out: &mut Vec<u8>, nodes: &mut NodeTable, key: &str, version: &Version, json: Option<&str>, siblings: impl ExactSizeIterator<Item = (&'a Fingerprint, u64, Option<&'a str>)>) {
    put_str(out, key);
    put_version(out, nodes, version);
    if siblings.len() > 0 {
        out.push(2);
        put_varint(out, siblings.len() as u64);
        for (node, counter, json) in siblings {
            put_varint(out, nodes.index(node));
            put_varint(out, counter);
            put_value(out, json);
        }
        return;
    }
    put_value(out, json);
}

fn put_value(out: &mut Vec<u8>, json: Option<&str>) {
    match json {
        None => out.push(0),
        Some(j) => {
            out.push(1);
            put_str(out, j);
        }
    }
}

/// Encodes a digest.
pub fn digest(cells: &[Cell; BUCKETS]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + BUCKETS * 12);
    out.push(VERSION);
    out.push(Type::Digest as u8);
    put_cells(&mut out, cells);
    out
}

fn put_cells(out: &mut Vec<u8>, cells: &[Cell; BUCKETS]) {
    for c in cells {
        put_varint(out, u64::from(c.count));
        if c.count > 0 {
            out.extend_from_slice(&c.xor.to_le_bytes());
        }
    }
}

/// Encodes second-level digests.
pub fn sub_digest(parts: &[(u8, Box<[Cell; BUCKETS]>)]) -> Vec<u8> {
    let mut out = vec![VERSION, Type::SubDigest as u8];
    put_varint(&mut out, parts.len() as u64);
    for (b, cells) in parts {
        out.push(*b);
        put_cells(&mut out, cells);
    }
    out
}

/// Encodes a prefix request.
pub fn want_prefixes(prefixes: &[Prefix]) -> Vec<u8> {
    let mut out = vec![VERSION, Type::WantPrefixes as u8];
    put_varint(&mut out, prefixes.len() as u64);
    for p in prefixes {
        out.push(p.depth);
        out.extend_from_slice(&p.prefix.to_le_bytes());
    }
    out
}

/// Encodes a key request.
pub fn want_keys<'a>(keys: impl ExactSizeIterator<Item = &'a str>) -> Vec<u8> {
    let mut out = vec![VERSION, Type::WantKeys as u8];
    put_varint(&mut out, keys.len() as u64);
    for k in keys {
        put_str(&mut out, k);
    }
    out
}

/// Encodes a hello.
pub fn hello() -> Vec<u8> {
    vec![VERSION, Type::Hello as u8]
}

// ---- reading ---------------------------------------------------------------------------

/// A cursor over a message.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn malformed(what: &str) -> SyncWireError {
    SyncWireError::Malformed(what.to_owned())
}

impl<'a> Reader<'a> {
    /// Reads `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Reads a byte.
    pub fn u8(&mut self) -> Result<u8, SyncWireError> {
        let b = *self.buf.get(self.pos).ok_or_else(|| malformed("cut short"))?;
        self.pos += 1;
        Ok(b)
    }

    /// Reads `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], SyncWireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| malformed("cut short"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Reads a varint (at most 64 bits, minimal or not).
    pub fn varint(&mut self) -> Result<u64, SyncWireError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(malformed("varint overflows 64 bits"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(malformed("varint overflows 64 bits"))
    }

    /// Reads a count of at most `max` items, each at least `min_size` bytes (so a count
    /// cannot promise more than the message holds).
    pub fn count(&mut self, max: usize, min_size: usize) -> Result<usize, SyncWireError> {
        let n = self.varint()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n > max as u64 || n.saturating_mul(min_size as u64) > left {
            return Err(malformed("count larger than the message"));
        }
        Ok(n as usize)
    }

    /// Reads a string of at most `max` bytes.
    pub fn str(&mut self, max: usize) -> Result<&'a str, SyncWireError> {
        let n = self.varint()?;
        if n > max as u64 {
            return Err(malformed("string too long"));
        }
        std::str::from_utf8(self.bytes(n as usize)?).map_err(|_| malformed("string not UTF-8"))
    }

    /// Returns how many bytes are left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails unless everything was read.
    pub fn finish(&self) -> Result<(), SyncWireError> {
        if self.pos != self.buf.len() {
            return Err(malformed("trailing bytes"));
        }
        Ok(())
    }

    fn nodes(&mut self) -> Result<Vec<Fingerprint>, SyncWireError> {
        let n = self.count(MAX_NODES, 32)?;
        (0..n).map(|_| Ok(Fingerprint::from_bytes(self.bytes(32)?.try_into().expect("32 bytes")))).collect()
    }

    fn node(&mut self, nodes: &[Fingerprint]) -> Result<Fingerprint, SyncWireError> {
        let i = self.varint()?;
        nodes.get(usize::try_from(i).unwrap_or(usize::MAX)).copied().ok_or_else(|| malformed("node index out of range"))
    }

    fn version(&mut self, nodes: &[Fingerprint]) -> Result<Version, SyncWireError> {
        let ms = self.varint()?;
        let counter = u32::try_from(self.varint()?).map_err(|_| malformed("counter over 32 bits"))?;
        let node = self.node(nodes)?;
        let n = self.count(MAX_NODES, 2)?;
        let mut vv = Vec::with_capacity(n);
        for _ in 0..n {
            let fp = self.node(nodes)?;
            let c = self.varint()?;
            if c == 0 || c > MAX_COUNT || vv.last().is_some_and(|(last, _): &(Fingerprint, u64)| *last >= fp) {
                return Err(malformed("version vector not sorted, or with a zero"));
            }
            vv.push((fp, c));
        }
        Ok(Version { ts: Timestamp { ms, counter, node }, vv })
    }

    fn cells(&mut self) -> Result<Box<[Cell; BUCKETS]>, SyncWireError> {
        let mut cells = Box::new([Cell::default(); BUCKETS]);
        for c in cells.iter_mut() {
            c.count = u32::try_from(self.varint()?).map_err(|_| malformed("count over 32 bits"))?;
            if c.count > 0 {
                c.xor = u64::from_le_bytes(self.bytes(8)?.try_into().expect("8 bytes"));
            }
        }
        Ok(cells)
    }
}

/// Decodes a state message. `max_key` bounds keys, `max_json` values.
pub fn decode(buf: &[u8], max_key: usize, max_json: usize) -> Result<Message, SyncWireError> {
    let mut r = Reader::new(buf);
    if r.u8()? != VERSION {
        return Err(malformed("unknown version"));
    }
    let t = r.u8()?;
    let msg = match t {
        1 => {
            let nodes = r.nodes()?;
            let n = r.count(MAX_ITEMS, 5)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let key = r.str(max_key)?.to_owned();
                let version = r.version(&nodes)?;
                let (json, siblings) = match r.u8()? {
                    0 => (None, Vec::new()),
                    1 => (Some(r.str(max_json)?.to_owned()), Vec::new()),
                    2 => {
                        let k = r.count(MAX_NODES, 3)?;
                        if k == 0 {
                            return Err(malformed("an entry with no siblings"));
                        }
                        let mut siblings: Vec<WireSibling> = Vec::with_capacity(k);
                        for _ in 0..k {
                            let node = r.node(&nodes)?;
                            let counter = r.varint()?;
                            let json = match r.u8()? {
                                0 => None,
                                1 => Some(r.str(max_json)?.to_owned()),
                                _ => return Err(malformed("unknown value tag")),
                            };
                            if counter == 0 || counter > MAX_COUNT || siblings.last().is_some_and(|l| (l.node, l.counter) >= (node, counter)) {
                                return Err(malformed("siblings not sorted, or a zero counter"));
                            }
                            siblings.push(WireSibling { node, counter, json });
                        }
                        (None, siblings)
                    }
                    _ => return Err(malformed("unknown value tag")),
                };
                entries.push(WireEntry { key, version, json, siblings });
            }
            Message::Entries(entries)
        }
        2 => Message::Digest(r.cells()?),
        3 => {
            let n = r.count(BUCKETS, BUCKETS + 1)?;
            let mut parts = Vec::with_capacity(n);
            for _ in 0..n {
                let b = r.u8()?;
                parts.push((b, r.cells()?));
            }
            Message::SubDigest(parts)
        }
        4 => {
            let nodes = r.nodes()?;
            let n = r.count(BUCKETS * BUCKETS, 3)?;
            let mut leaves = Vec::with_capacity(n);
            for _ in 0..n {
                let leaf = u16::from_le_bytes(r.bytes(2)?.try_into().expect("2 bytes"));
                let k = r.count(MAX_ITEMS, 5)?;
                let mut items = Vec::with_capacity(k);
                for _ in 0..k {
                    let key = r.str(max_key)?.to_owned();
                    items.push((key, r.version(&nodes)?));
                }
                leaves.push((leaf, items));
            }
            Message::Summaries(leaves)
        }
        5 => {
            let n = r.count(BUCKETS * BUCKETS, 3)?;
            let mut prefixes = Vec::with_capacity(n);
            for _ in 0..n {
                let depth = r.u8()?;
                let prefix = u16::from_le_bytes(r.bytes(2)?.try_into().expect("2 bytes"));
                if !(depth == 1 && prefix < 256 || depth == 2) {
                    return Err(malformed("bad prefix"));
                }
                prefixes.push(Prefix { depth, prefix });
            }
            Message::WantPrefixes(prefixes)
        }
        6 => {
            let n = r.count(MAX_ITEMS, 1)?;
            let keys = (0..n).map(|_| r.str(max_key).map(str::to_owned)).collect::<Result<_, _>>()?;
            Message::WantKeys(keys)
        }
        7 => Message::Hello,
        _ => return Err(malformed("unknown message type")),
    };
    r.finish()?;
    Ok(msg)
}

/// Starts a `Summaries` body: nothing (leaves are appended with [`put_leaf`]).
pub fn put_leaf<'a>(out: &mut Vec<u8>, nodes: &mut NodeTable, leaf: u16, items: impl ExactSizeIterator<Item = (&'a str, &'a Version)>) {
    out.extend_from_slice(&leaf.to_le_bytes());
    put_varint(out, items.len() as u64);
    for (k, v) in items {
        put_str(out, k);
        put_version(out, nodes, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_and_refuse_overflow() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut r = Reader::new(&out);
            assert_eq!(r.varint().unwrap(), v);
            r.finish().unwrap();
        }
        let over = [0xff; 10];
        assert!(Reader::new(&over).varint().is_err());
        let mut eleven = vec![0x80; 10];
        eleven.push(0);
        assert!(Reader::new(&eleven).varint().is_err());
    }

    #[test]
    fn counts_cannot_promise_more_than_the_message() {
        let mut body = vec![VERSION, Type::WantKeys as u8];
        put_varint(&mut body, 1_000_000);
        assert!(matches!(decode(&body, 64, 64), Err(SyncWireError::Malformed(_))));
    }
}
