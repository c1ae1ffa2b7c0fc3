//! Warming the kernel's metadata caches ahead of the backup walk.
//!
//! The walk visits entries one at a time, and on a cold cache every directory costs it disk
//! reads (the directory's blocks, then its entries' inodes) that it waits for one after the
//! other, while the disk could serve several at once. When the walk lists a directory, it hands
//! the subdirectories that its exclude patterns keep (including any that `.tardis-skip` or
//! `CACHEDIR.TAG` will skip, which it has not probed yet) to a few threads here, which list them
//! and stat their entries, so those reads are in flight together and the walk mostly finds them
//! cached. The threads read metadata only and keep nothing: a hint that is dropped (queue full)
//! or fails only costs time. Like the walk, they list directories without updating their access
//! times (where permitted), so the walk still records the times the directories had.
//!
//! File data is warmed the same way, but only for files the walk has decided to read: it
//! looks a few entries ahead in each directory, and for a new or changed file asks a thread
//! here to open it and request its first bytes from the disk (`POSIX_FADV_WILLNEED`, which
//! starts the reads without waiting for them). On a cold cache a tree of small files was read
//! one file at a time, waiting for each; a backup reading every file never warms data it will
//! not read, and an incremental one warms only what changed.

use std::ffi::OsStr;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};

/// Threads reading ahead. They mostly wait on the disk, so more than the cores.
const THREADS: usize = 4;
/// Directories waiting at most. A hint past that is dropped; the walk never waits here.
const QUEUE: usize = 1024;

/// Files waiting for their data to be requested at most. The walk looks only a few entries
/// ahead, so this is rarely reached.
const DATA_QUEUE: usize = 256;
/// How much of a file is requested ahead. The first read of a larger file waits for its first
/// MiB at most; the kernel's own read-ahead then keeps up with reading it sequentially.
pub const DATA_AHEAD: u64 = 1 << 20;

/// A directory to read ahead, and the device it must be on (when the walk stays on one).
type Hint = (PathBuf, Option<u64>);

/// The read-ahead threads; dropping it stops them.
#[derive(Debug)]
pub struct Prefetch {
    tx: Option<SyncSender<Hint>>,
    /// Files whose data to request: served by one thread of their own, so that they are not
    /// queued behind directories far ahead of the walk.
    data: Option<SyncSender<(PathBuf, u64)>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Prefetch {
    /// Starts the threads. If none can be started, hints are ignored.
    pub fn start() -> Prefetch {
        let (tx, rx) = mpsc::sync_channel::<Hint>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..THREADS {
            let (rx, stop) = (Arc::clone(&rx), Arc::clone(&stop));
            let spawned = std::thread::Builder::new().name(format!("prefetch-{i}")).spawn(move || loop {
                let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                let Ok((dir, dev)) = next else { return };
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                warm(&dir, dev, &stop);
            });
            if let Ok(t) = spawned {
                threads.push(t);
            }
        }
        let tx = (!threads.is_empty()).then_some(tx);
        let (data, data_rx) = mpsc::sync_channel::<(PathBuf, u64)>(DATA_QUEUE);
        let data_stop = Arc::clone(&stop);
        let spawned = std::thread::Builder::new().name("prefetch-data".into()).spawn(move || {
            for (path, len) in data_rx {
                if data_stop.load(Ordering::Relaxed) {
                    return;
                }
                request_data(&path, len);
            }
        });
        let data = match spawned {
            Ok(t) => {
                threads.push(t);
                Some(data)
            }
            Err(_) => None,
        };
        Prefetch { tx, data, stop, threads }
    }

    /// Tells the data thread that the walk will read the regular file `path` of `len` bytes.
    pub fn data(&self, path: &Path, len: u64) {
        if let Some(tx) = &self.data {
            // Full: the walk will wait for this file's data itself.
            let _ = tx.try_send((path.to_path_buf(), len));
        }
    }

    /// Tells the threads that the walk will visit `dir`; with `dev`, only if `dir` is on it.
    pub fn dir(&self, dir: &Path, dev: Option<u64>) {
        if let Some(tx) = &self.tx {
            // Full: the threads are far enough ahead already.
            let _ = tx.try_send((dir.to_path_buf(), dev));
        }
    }
}

/// Asks the kernel to start reading the first `len` bytes of the regular file `path`, opened
/// as the walk opens it ([`crate::fsmeta::open_chosen`]).
fn request_data(path: &Path, len: u64) {
    let Ok(file) = crate::fsmeta::open_chosen(path) else { return };
    // A FIFO swapped in since the walk saw a file opens (without blocking, as asked) but has no
    // pages to read; the advice is then refused, which costs nothing.
    let len = i64::try_from(len.min(DATA_AHEAD)).unwrap_or(0);
    let _ = posix_fadvise(file.as_raw_fd(), 0, len, PosixFadviseAdvice::POSIX_FADV_WILLNEED);
}

/// Lists `dir` and stats every entry, for the side effect of caching them.
fn warm(dir: &Path, dev: Option<u64>, stop: &AtomicBool) {
    if let Some(dev) = dev {
        // Another file system below the backup (a mount point the walk records but does not
        // enter): not ours to read.
        match fs::symlink_metadata(dir) {
            Ok(md) if md.dev() == dev => {}
            _ => return,
        }
    }
    let Ok(entries) = crate::fsmeta::list_dir(dir) else { return };
    for (name, _) in entries.flatten() {
        // A directory of a million entries would otherwise keep a thread busy long after the
        // walk has ended.
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let _ = fs::symlink_metadata(dir.join(OsStr::from_bytes(&name)));
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // Hints still queued are not worth reading once the walk is over.
        self.stop.store(true, Ordering::Relaxed);
        self.tx = None;
        self.data = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_dropped_when_the_queue_is_full_and_drop_ends_the_threads() {
        let tmp = tempfile::tempdir().unwrap();
        for i in 0..50 {
            fs::create_dir_all(tmp.path().join(format!("d{i}/e"))).unwrap();
        }
        // Data hints for a file, a FIFO (which must not block the thread), a symlink (not
        // followed) and a missing path.
        fs::write(tmp.path().join("f"), vec![7u8; 3 << 20]).unwrap();
        nix::unistd::mkfifo(&tmp.path().join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        std::os::unix::fs::symlink("f", tmp.path().join("link")).unwrap();
        let p = Prefetch::start();
        assert_eq!(p.threads.len(), THREADS + 1);
        for name in ["f", "fifo", "link", "missing"] {
            p.data(&tmp.path().join(name), 3 << 20);
        }
        // Far more hints than the queue holds, some for missing paths or another device: none
        // blocks the caller, and dropping stops the threads with hints still queued.
        for round in 0..(QUEUE / 50 + 10) {
            for i in 0..50 {
                let dev = (round % 3 == 0).then_some(u64::MAX);
                p.dir(&tmp.path().join(format!("d{i}")), dev);
                p.dir(&tmp.path().join(format!("missing{i}")), None);
            }
        }
        drop(p);
    }
}
