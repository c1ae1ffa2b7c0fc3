//! The data path of a read: which chunks a byte range touches ([`assemble`]), and a bounded LRU
//! cache of decoded chunks ([`ChunkCache`]).
//!
//! The kernel reads a file in pieces of at most 128 KiB–1 MiB while chunks are 256 KiB–4 MiB,
//! so without the cache a sequential read would fetch, decrypt and decompress every chunk
//! several times. The cache also collapses concurrent misses: when two readers (or a reader and
//! the prefetcher) want the same chunk, one decodes it and the other waits for that result.
//! Failures are not cached, so a chunk that failed to read is tried again on the next read.

use crate::error::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tardis_core::event::Extent;
use tardis_core::ids::ChunkId;

/// Decoded chunk bytes, shared between the cache and the readers copying out of it.
pub type ChunkData = Arc<Vec<u8>>;

type Shared = Result<ChunkData, Arc<tardis_core::Error>>;

/// A bounded cache of decoded chunks, keyed by chunk ID (equal IDs are equal plaintexts).
#[derive(Debug)]
pub struct ChunkCache {
    capacity: usize,
    inner: Mutex<Lru>,
    /// Chunks decoded so far (misses that loaded successfully); for tests and statistics.
    decoded: AtomicU64,
}

#[derive(Debug, Default)]
struct Lru {
    /// Chunk → (data, last-use tick).
    map: HashMap<ChunkId, (ChunkData, u64)>,
    /// Last-use tick → chunk: the first entry is the least recently used.
    order: BTreeMap<u64, ChunkId>,
    tick: u64,
    bytes: usize,
    /// Chunks being loaded right now; latecomers wait on the same cell.
    loading: HashMap<ChunkId, Arc<OnceLock<Shared>>>,
}

impl Lru {
    fn touch(&mut self, id: &ChunkId) -> Option<ChunkData> {
        self.tick += 1;
        let tick = self.tick;
        let (data, last) = self.map.get_mut(id)?;
        self.order.remove(last);
        *last = tick;
        self.order.insert(tick, *id);
        Some(data.clone())
    }

    fn insert(&mut self, id: ChunkId, data: ChunkData, capacity: usize) {
        if self.map.contains_key(&id) {
            return;
        }
        self.tick += 1;
        self.bytes += data.len();
        self.order.insert(self.tick, id);
        self.map.insert(id, (data, self.tick));
        // Evict the least recently used, but never the chunk just inserted: a chunk larger
        // than the whole cache is still served once.
        while self.bytes > capacity && self.map.len() > 1 {
            let Some((_, old)) = self.order.pop_first() else { break };
            if let Some((d, _)) = self.map.remove(&old) {
                self.bytes -= d.len();
            }
        }
    }
}

impl ChunkCache {
    /// A cache holding at most `capacity` bytes of decoded chunks (plus one chunk, see above).
    pub fn new(capacity: usize) -> ChunkCache {
        ChunkCache { capacity, inner: Mutex::new(Lru::default()), decoded: AtomicU64::new(0) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // The cache holds no invariant that a panicking reader could break halfway.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `id` is cached or being loaded (the prefetcher skips those).
    pub fn contains(&self, id: &ChunkId) -> bool {
        let inner = self.lock();
        inner.map.contains_key(id) || inner.loading.contains_key(id)
    }

    /// Number of chunks decoded (cache misses that loaded).
    pub fn decoded(&self) -> u64 {
        self.decoded.load(Ordering::Relaxed)
    }

    /// The chunk `id`, from the cache or from `load` (called at most once at a time per chunk).
    pub fn get(&self, id: &ChunkId, load: impl FnOnce() -> tardis_core::Result<Vec<u8>>) -> Result<ChunkData> {
        let cell = {
            let mut inner = self.lock();
            if let Some(data) = inner.touch(id) {
                return Ok(data);
            }
            inner.loading.entry(*id).or_default().clone()
        };
        // `get_or_init` runs `load` in exactly one thread; the others block until it is done.
        let result = cell
            .get_or_init(|| {
                let r = load().map(Arc::new).map_err(Arc::new);
                if r.is_ok() {
                    self.decoded.fetch_add(1, Ordering::Relaxed);
                }
                r
            })
            .clone();
        let mut inner = self.lock();
        if inner.loading.get(id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inner.loading.remove(id);
            if let Ok(data) = &result {
                inner.insert(*id, data.clone(), self.capacity);
            }
        }
        result.map_err(Error::Chunk)
    }
}

/// The cache also holds the bases of delta chains as they are decoded, so reading another
/// version of a file built on the same bases decodes only its own deltas.
impl tardis_core::view::PlainCache for ChunkCache {
    fn get(&self, id: &ChunkId) -> Option<ChunkData> {
        self.lock().touch(id)
    }

    fn put(&self, id: &ChunkId, plain: ChunkData) {
        self.lock().insert(*id, plain, self.capacity);
    }
}

/// The index range of `extents` (sorted by offset, not overlapping) that overlaps
/// `[offset, end)`.
pub fn touched(extents: &[Extent], offset: u64, end: u64) -> std::ops::Range<usize> {
    let first = extents.partition_point(|e| e.offset + u64::from(e.len) <= offset);
    let last = first + extents[first..].partition_point(|e| e.offset < end);
    first..last
}

/// Reads up to `len` bytes at `offset` of a file of `size` bytes made of `extents`, fetching
/// each touched extent's chunk with `fetch`. Gaps between extents are holes and read as zeros;
/// a failed fetch fails the whole read (never zeros in place of data).
pub fn assemble(
    extents: &[Extent],
    size: u64,
    offset: u64,
    len: usize,
    mut fetch: impl FnMut(&Extent) -> Result<ChunkData>,
) -> Result<Vec<u8>> {
    if offset >= size {
        return Ok(Vec::new());
    }
    let end = size.min(offset.saturating_add(len as u64));
    let mut out = vec![0u8; (end - offset) as usize];
    for e in &extents[touched(extents, offset, end)] {
        let data = fetch(e)?;
        let from = offset.max(e.offset);
        let to = end.min(e.offset + u64::from(e.len));
        let src = &data[(from - e.offset) as usize..(to - e.offset) as usize];
        out[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    fn id(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn ext(offset: u64, len: u32, n: u8) -> Extent {
        Extent { offset, len, id: id(n) }
    }

    /// Chunk `n` is `len` bytes of the value `n`.
    fn fake(e: &Extent) -> Result<ChunkData> {
        Ok(Arc::new(vec![e.id.0[0]; e.len as usize]))
    }

    #[test]
    fn ranges_map_to_extents_and_holes_read_as_zeros() {
        // [0,4) chunk 1, hole [4,8), [8,12) chunk 2, hole to the size 16.
        let extents = [ext(0, 4, 1), ext(8, 4, 2)];
        assert_eq!(assemble(&extents, 16, 0, 16, fake).unwrap(), [1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0]);
        assert_eq!(assemble(&extents, 16, 3, 6, fake).unwrap(), [1, 0, 0, 0, 0, 2]);
        assert_eq!(assemble(&extents, 16, 12, 100, fake).unwrap(), [0, 0, 0, 0]);
        assert!(assemble(&extents, 16, 16, 10, fake).unwrap().is_empty());
        assert_eq!(touched(&extents, 4, 8), 1..1, "a read inside a hole fetches nothing");
        assert_eq!(touched(&extents, 2, 9), 0..2);
        assert_eq!(touched(&extents, 12, 16), 2..2);
    }

    #[test]
    fn a_failed_chunk_fails_the_read() {
        let extents = [ext(0, 4, 1), ext(4, 4, 2)];
        let r = assemble(&extents, 8, 0, 8, |e| {
            if e.id == id(2) {
                Err(Error::Chunk(Arc::new(tardis_core::Error::Tampered { what: "chunk".into() })))
            } else {
                fake(e)
            }
        });
        assert_eq!(r.unwrap_err().errno(), libc::EIO);
    }

    #[test]
    fn sequential_small_reads_decode_a_chunk_once() {
        let cache = ChunkCache::new(1 << 20);
        let extents = [ext(0, 1 << 16, 7)];
        let mut loads = 0;
        for off in (0..1u64 << 16).step_by(4096) {
            let data = assemble(&extents, 1 << 16, off, 4096, |e| {
                cache.get(&e.id, || {
                    loads += 1;
                    Ok(vec![7; e.len as usize])
                })
            })
            .unwrap();
            assert_eq!(data, vec![7; 4096]);
        }
        assert_eq!(loads, 1);
        assert_eq!(cache.decoded(), 1);
    }

    #[test]
    fn least_recently_used_chunks_are_evicted_within_the_bound() {
        let cache = ChunkCache::new(250);
        let load = |n: u8| cache.get(&id(n), || Ok(vec![n; 100])).unwrap();
        load(1);
        load(2);
        load(1); // 1 is now more recent than 2
        load(3); // 300 bytes > 250: evicts 2
        assert!(cache.contains(&id(1)) && cache.contains(&id(3)));
        assert!(!cache.contains(&id(2)));
        assert!(cache.lock().bytes <= 250);
        // An oversized chunk is served, and becomes the only one held.
        let big = cache.get(&id(9), || Ok(vec![9; 1000])).unwrap();
        assert_eq!(big.len(), 1000);
        assert_eq!(cache.lock().map.len(), 1);
    }

    #[test]
    fn failures_are_not_cached() {
        let cache = ChunkCache::new(1000);
        let e = cache.get(&id(1), || Err(tardis_core::Error::NotFound("chunk".into()))).unwrap_err();
        assert!(matches!(e, Error::Chunk(_)));
        assert_eq!(cache.get(&id(1), || Ok(vec![1])).unwrap().as_slice(), [1]);
    }

    #[test]
    fn concurrent_misses_load_once() {
        let cache = ChunkCache::new(1 << 20);
        let loads = AtomicU64::new(0);
        let start = Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    start.wait();
                    let d = cache
                        .get(&id(5), || {
                            loads.fetch_add(1, Ordering::SeqCst);
                            // Not synchronisation: the count is 1 for any interleaving (a
                            // latecomer finds the chunk loading or cached). The pause only makes
                            // the waiting path the likely one.
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(vec![5; 10])
                        })
                        .unwrap();
                    assert_eq!(d.as_slice(), [5; 10]);
                });
            }
        });
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }
}
