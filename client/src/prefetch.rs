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

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

/// Threads reading ahead. They mostly wait on the disk, so more than the cores.
const THREADS: usize = 4;
/// Directories waiting at most. A hint past that is dropped; the walk never waits here.
const QUEUE: usize = 1024;

/// A directory to read ahead, and the device it must be on (when the walk stays on one).
type Hint = (PathBuf, Option<u64>);

/// The read-ahead threads; dropping it stops them.
#[derive(Debug)]
pub struct Prefetch {
    tx: Option<SyncSender<Hint>>,
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
        Prefetch { tx: (!threads.is_empty()).then_some(tx), stop, threads }
    }

    /// Tells the threads that the walk will visit `dir`; with `dev`, only if `dir` is on it.
    pub fn dir(&self, dir: &Path, dev: Option<u64>) {
        if let Some(tx) = &self.tx {
            // Full: the threads are far enough ahead already.
            let _ = tx.try_send((dir.to_path_buf(), dev));
        }
    }
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
        let p = Prefetch::start();
        assert_eq!(p.threads.len(), THREADS);
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
