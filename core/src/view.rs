//! Reading a set as a tree of named, decrypted entries: what `regenerate`, `ls`, `diff` and
//! the mount are built on. Everything goes through [`Repository`], so the same code reads an
//! embedded repository or a remote one.
//!
//! Paths are absolute byte strings (`/home/ann/a.txt`); the root entry `/` is stored under
//! [`DirId::TOP`], and the children of a directory live under the directory ID derived from
//! its parent's ID and its name.

use crate::api::{Repository, StoredChunk};
use crate::chunkcodec;
use crate::crypto::{Keys, Purpose};
use crate::event::{Extent, FileVersion, MAX_CHAIN};
use crate::ids::{ChunkId, DirId, NameKey, SetId};
use crate::meta::{FileMeta, Kind};
use crate::{Error, Result};
use serde_bytes::ByteBuf;
use std::sync::Arc;

/// Name of the root entry.
pub const ROOT_NAME: &[u8] = b"/";

/// The identity a sealed entry is bound to: directory, name key and first set.
pub fn entry_object(dir: &DirId, name: &NameKey, set: SetId) -> [u8; 40] {
    let mut o = [0u8; 40];
    o[..16].copy_from_slice(&dir.0);
    o[16..32].copy_from_slice(&name.0);
    o[32..].copy_from_slice(&set.to_le_bytes());
    o
}

/// Encodes and seals an entry's metadata for a version first written by `set`.
pub fn seal_meta(keys: &Keys, dir: &DirId, name: &NameKey, set: SetId, meta: &FileMeta) -> Result<ByteBuf> {
    Ok(ByteBuf::from(keys.seal(Purpose::EntryMeta, &entry_object(dir, name, set), &meta.encode())?))
}

/// Opens the metadata of a stored version.
pub fn open_meta(keys: &Keys, v: &FileVersion) -> Result<FileMeta> {
    let plain = keys.open(Purpose::EntryMeta, &entry_object(&v.dir, &v.name, v.set), &v.meta)?;
    let meta = FileMeta::decode(&plain)?;
    if keys.name_key(&v.dir, &meta.name) != v.name {
        return Err(Error::Tampered { what: "entry name does not match its key".into() });
    }
    Ok(meta)
}

/// Splits an absolute path into its components, ignoring empty ones and `.`.
pub fn components(path: &[u8]) -> Vec<&[u8]> {
    path.split(|b| *b == b'/').filter(|c| !c.is_empty() && *c != b".").collect()
}

/// A decrypted directory entry of one set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub version: FileVersion,
    pub meta: FileMeta,
}

impl Node {
    /// The directory ID of this entry's children (directories only).
    pub fn child_dir(&self, keys: &Keys) -> Option<DirId> {
        (self.meta.kind == Kind::Dir).then(|| keys.dir_id(&self.version.dir, &self.meta.name))
    }

    /// Stored file data length (the size a reader sees).
    pub fn size(&self) -> u64 {
        self.meta.size
    }
}

/// One set of one host, read through its keys.
pub struct Tree<'a> {
    repo: &'a dyn Repository,
    keys: &'a Keys,
    set: SetId,
}

impl std::fmt::Debug for Tree<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree").field("set", &self.set).finish()
    }
}

impl<'a> Tree<'a> {
    pub fn new(repo: &'a dyn Repository, keys: &'a Keys, set: SetId) -> Self {
        Tree { repo, keys, set }
    }

    pub fn set(&self) -> SetId {
        self.set
    }

    /// The entry named `name` inside `dir`.
    pub fn lookup(&self, dir: &DirId, name: &[u8]) -> Result<Option<Node>> {
        let key = self.keys.name_key(dir, name);
        match self.repo.lookup(self.set, dir, &key)? {
            Some(v) => Ok(Some(self.node(v)?)),
            None => Ok(None),
        }
    }

    /// The root directory `/`.
    pub fn root(&self) -> Result<Option<Node>> {
        self.lookup(&DirId::TOP, ROOT_NAME)
    }

    /// The entry at an absolute path.
    pub fn resolve(&self, path: &[u8]) -> Result<Option<Node>> {
        let Some(mut node) = self.root()? else { return Ok(None) };
        for name in components(path) {
            let Some(dir) = node.child_dir(self.keys) else { return Ok(None) };
            match self.lookup(&dir, name)? {
                Some(n) => node = n,
                None => return Ok(None),
            }
        }
        Ok(Some(node))
    }

    /// The entries of a directory, sorted by name.
    pub fn children(&self, dir: &Node) -> Result<Vec<Node>> {
        let Some(id) = dir.child_dir(self.keys) else {
            return Err(Error::Invalid(format!("{} is not a directory", String::from_utf8_lossy(&dir.meta.name))));
        };
        self.children_of(&id)
    }

    /// The entries stored under a directory ID, sorted by name.
    pub fn children_of(&self, dir: &DirId) -> Result<Vec<Node>> {
        let mut nodes = self.repo.list(self.set, dir)?.into_iter().map(|v| self.node(v)).collect::<Result<Vec<_>>>()?;
        nodes.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        Ok(nodes)
    }

    fn node(&self, version: FileVersion) -> Result<Node> {
        let meta = open_meta(self.keys, &version)?;
        Ok(Node { version, meta })
    }

    /// Decodes one extent's chunk.
    pub fn read_extent(&self, extent: &Extent) -> Result<Vec<u8>> {
        read_extent(self.repo, self.keys, extent)
    }

    /// Reads up to `len` bytes at `offset` of a file, fetching only the chunks that overlap
    /// the range. Holes read as zeros.
    pub fn read_at(&self, node: &Node, offset: u64, len: usize) -> Result<Vec<u8>> {
        let size = node.size();
        if offset >= size {
            return Ok(Vec::new());
        }
        let end = size.min(offset.saturating_add(len as u64));
        let mut out = vec![0u8; (end - offset) as usize];
        let extents = &node.version.extents;
        // Extents are sorted by offset: skip to the first one that ends after `offset`.
        let first = extents.partition_point(|e| e.offset + u64::from(e.len) <= offset);
        for e in &extents[first..] {
            if e.offset >= end {
                break;
            }
            let data = read_extent(self.repo, self.keys, e)?;
            let from = offset.max(e.offset);
            let to = end.min(e.offset + u64::from(e.len));
            out[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - e.offset) as usize..(to - e.offset) as usize]);
        }
        Ok(out)
    }
}

/// Reads and decodes one extent's chunk, checking its length against the extent.
pub fn read_extent(repo: &dyn Repository, keys: &Keys, e: &Extent) -> Result<Vec<u8>> {
    read_extent_cached(repo, keys, e, &NoCache)
}

/// [`read_extent`], with the bases of delta chains taken from and kept in `cache`.
pub fn read_extent_cached(repo: &dyn Repository, keys: &Keys, e: &Extent, cache: &dyn PlainCache) -> Result<Vec<u8>> {
    let chunk = read_chunk_cached(repo, keys, &e.id, cache)?;
    if chunk.plain.len() != e.len as usize {
        return Err(Error::malformed(
            "extent",
            format!("chunk {} holds {} bytes, extent says {}", e.id, chunk.plain.len(), e.len),
        ));
    }
    Ok(chunk.plain)
}

/// A decoded chunk and the length of the delta chain it was stored as (0 = in full).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plain {
    pub plain: Vec<u8>,
    pub depth: u8,
    /// The stored and the plaintext bytes of the chunk stored in full at the bottom of the
    /// chain (the chunk itself at depth 0): how well this content compresses. `None` when the
    /// chain ended at a cached base.
    pub full_sizes: Option<(u64, u64)>,
}

/// Decoded plaintexts a reader keeps (the mount's chunk cache): a delta chain is read only down
/// to the first base found here, and the bases decoded on the way are offered to it. Versions
/// of one file share their bases, so browsing a file's history decodes each base once.
pub trait PlainCache: Sync {
    fn get(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>>;
    fn put(&self, id: &ChunkId, plain: Arc<Vec<u8>>);
}

/// Keeps nothing.
#[derive(Debug)]
pub struct NoCache;

impl PlainCache for NoCache {
    fn get(&self, _id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        None
    }
    fn put(&self, _id: &ChunkId, _plain: Arc<Vec<u8>>) {}
}

/// Reads and decodes a chunk. A delta chunk is read by reading its chain down to the full chunk
/// at its end and applying the deltas upwards; every link is checked against its ID and its
/// recorded depth, and no chain longer than [`MAX_CHAIN`] is followed, whatever the repository
/// claims.
pub fn read_chunk(repo: &dyn Repository, keys: &Keys, id: &ChunkId) -> Result<Plain> {
    read_chunk_cached(repo, keys, id, &NoCache)
}

/// [`read_chunk`], stopping the chain at the first base `cache` holds (its plaintext was checked
/// against its ID when it was decoded) and offering it the bases decoded on the way.
pub fn read_chunk_cached(repo: &dyn Repository, keys: &Keys, id: &ChunkId, cache: &dyn PlainCache) -> Result<Plain> {
    let mut chain = Vec::new();
    let mut next = *id;
    // A cached base the chain stops at, and its depth.
    let mut bottom: Option<(Arc<Vec<u8>>, usize)> = None;
    loop {
        let stored = repo.read_chunk(&next)?;
        if stored.meta.id != next {
            return Err(Error::Tampered { what: format!("the repository returned another chunk for {next}") });
        }
        let delta = stored.meta.delta;
        chain.push(stored);
        let Some(d) = delta else { break };
        if chain.len() > usize::from(MAX_CHAIN) || d.depth == 0 {
            return Err(Error::malformed("chunk", format!("delta chain of {id} is longer than {MAX_CHAIN} or broken")));
        }
        if let Some(plain) = cache.get(&d.base) {
            bottom = Some((plain, usize::from(d.depth) - 1));
            break;
        }
        next = d.base;
    }
    let full_sizes = match bottom {
        Some(_) => None,
        None => chain.last().map(|c| (c.body.len() as u64, u64::from(c.meta.plain_len))),
    };
    let (mut base, mut depth) = match bottom {
        Some((plain, depth)) => (Some(plain), depth + 1),
        None => (None, 0),
    };
    let decode = |link: &StoredChunk, base: Option<&Arc<Vec<u8>>>, depth: usize| {
        let recorded = link.meta.delta.map_or(0, |d| usize::from(d.depth));
        if recorded != depth {
            return Err(Error::malformed(
                "chunk",
                format!("chunk {} says it is a delta of depth {recorded}, its chain is {depth}", link.meta.id),
            ));
        }
        let m = &link.meta;
        chunkcodec::decode(keys, &m.id, m.plain_len, m.encoding, &link.body, base.map(|b| &b[..]))
    };
    // `chain` runs from the chunk asked for down to the first base: decode it backwards.
    let (top, below) = chain.split_first().expect("a chain holds at least one chunk");
    for link in below.iter().rev() {
        let plain = Arc::new(decode(link, base.as_ref(), depth)?);
        cache.put(&link.meta.id, plain.clone());
        base = Some(plain);
        depth += 1;
    }
    Ok(Plain { plain: decode(top, base.as_ref(), depth)?, depth: depth as u8, full_sizes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_ignore_empty_and_dot() {
        assert_eq!(components(b"/a//b/./c/"), vec![&b"a"[..], b"b", b"c"]);
        assert!(components(b"/").is_empty());
    }
}
