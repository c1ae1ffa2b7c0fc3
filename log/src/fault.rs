//! Fault injection for crash tests: a [`Storage`] that fails at the Nth operation and can then
//! simulate a power cut, losing whatever was not yet made durable.
//!
//! The model follows SQLite's test6.c and RocksDB's FaultInjectionTestFS: bytes appended but not
//! synced may be lost, kept, or torn (partly kept, with garbage after them); synced bytes and
//! created files (whose creation includes a directory fsync) always survive.

use crate::storage::{DirStorage, SegmentFile, Storage};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// What happens to unsynced bytes at the simulated crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unsynced byte is lost.
    DropUnsynced,
    /// Unsynced bytes survive (the OS wrote them back before the crash).
    KeepUnsynced,
    /// A prefix of the unsynced bytes (rounded to 512 B sectors) survives, followed by a sector
    /// of garbage; `seed` picks the length and the garbage.
    Tear { seed: u64 },
}

#[derive(Debug, Default)]
struct State {
    ops: u64,
    fail_at: Option<u64>,
    failed: bool,
    /// Durable length of every segment written through this storage.
    synced: HashMap<u64, u64>,
}

/// Wraps a [`DirStorage`]; every mutating operation counts, and operation number `fail_at`
/// (and every one after it) fails with EIO, as if the machine had stopped there.
#[derive(Debug)]
pub struct FaultStorage {
    inner: Arc<DirStorage>,
    state: Arc<Mutex<State>>,
}

impl FaultStorage {
    pub fn new(inner: DirStorage, fail_at: Option<u64>) -> Self {
        FaultStorage { inner: Arc::new(inner), state: Arc::new(Mutex::new(State { fail_at, ..State::default() })) }
    }

    /// Makes the `n`th mutating operation from now (1: the next one) fail, and every one after
    /// it, on a storage already in use.
    pub fn arm(&self, n: u64) {
        let mut s = self.lock();
        s.fail_at = Some(s.ops + n);
    }

    /// Mutating operations performed so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Whether the injected failure has happened.
    pub fn failed(&self) -> bool {
        self.lock().failed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Simulates the power cut: applies `mode` to every segment's unsynced tail.
    pub fn crash(&self, mode: CrashMode) -> io::Result<()> {
        let synced = self.lock().synced.clone();
        for (seg, durable) in synced {
            let path = self.inner.path(seg);
            let Ok(len) = std::fs::metadata(&path).map(|m| m.len()) else { continue };
            if len <= durable {
                continue;
            }
            let f = OpenOptions::new().write(true).open(&path)?;
            match mode {
                CrashMode::KeepUnsynced => {}
                CrashMode::DropUnsynced => f.set_len(durable)?,
                CrashMode::Tear { seed } => {
                    let unsynced = len - durable;
                    let keep = (splitmix(seed) % (unsynced + 1)) / 512 * 512;
                    f.set_len(durable + keep)?;
                    let mut f = OpenOptions::new().append(true).open(&path)?;
                    let garbage: Vec<u8> = (0..512u64).map(|i| splitmix(seed ^ i) as u8).collect();
                    f.write_all(&garbage)?;
                }
            }
        }
        Ok(())
    }

    fn step(state: &Mutex<State>) -> io::Result<()> {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.ops += 1;
        if s.failed || s.fail_at.is_some_and(|n| s.ops >= n) {
            s.failed = true;
            return Err(io::Error::other("injected I/O failure"));
        }
        Ok(())
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[derive(Debug)]
struct FaultSegment {
    seg: u64,
    inner: Box<dyn SegmentFile>,
    written: u64,
    state: Arc<Mutex<State>>,
}

impl SegmentFile for FaultSegment {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        FaultStorage::step(&self.state)?;
        self.inner.append(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        FaultStorage::step(&self.state)?;
        self.inner.sync()?;
        self.state.lock().unwrap_or_else(|p| p.into_inner()).synced.insert(self.seg, self.written);
        Ok(())
    }
}

impl Storage for FaultStorage {
    fn list(&self) -> io::Result<Vec<u64>> {
        self.inner.list()
    }

    fn create(&self, seg: u64, header: &[u8]) -> io::Result<Box<dyn SegmentFile>> {
        Self::step(&self.state)?;
        let inner = self.inner.create(seg, header)?;
        self.lock().synced.insert(seg, header.len() as u64);
        Ok(Box::new(FaultSegment { seg, inner, written: header.len() as u64, state: self.state.clone() }))
    }

    fn open_append(&self, seg: u64) -> io::Result<Box<dyn SegmentFile>> {
        let len = self.inner.len(seg)?;
        let inner = self.inner.open_append(seg)?;
        self.lock().synced.insert(seg, len);
        Ok(Box::new(FaultSegment { seg, inner, written: len, state: self.state.clone() }))
    }

    fn len(&self, seg: u64) -> io::Result<u64> {
        self.inner.len(seg)
    }

    fn read_at(&self, seg: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_at(seg, offset, buf)
    }

    fn truncate(&self, seg: u64, len: u64) -> io::Result<()> {
        Self::step(&self.state)?;
        self.inner.truncate(seg, len)?;
        self.lock().synced.insert(seg, len);
        Ok(())
    }

    fn remove(&self, seg: u64) -> io::Result<()> {
        Self::step(&self.state)?;
        self.inner.remove(seg)?;
        self.lock().synced.remove(&seg);
        Ok(())
    }

    fn quarantine(&self, seg: u64, offset: u64, bytes: &[u8]) -> io::Result<PathBuf> {
        Self::step(&self.state)?;
        self.inner.quarantine(seg, offset, bytes)
    }

    fn describe(&self, seg: u64) -> PathBuf {
        self.inner.describe(seg)
    }

    fn space(&self) -> io::Result<Option<crate::storage::Space>> {
        self.inner.space()
    }
}
