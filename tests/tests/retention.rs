//! Retention over a simulated year, through the same library calls `tardis --local --purge`
//! makes (backup, then purge by schedule), with a clock the test moves one hour per backup.
//! The binaries take the same clock from `TARDIS_NOW` (tests/tests/purge.rs).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use tardis_client::backup::{self, BackupOptions, NoProgress};
use tardis_client::purge::{self, PurgeOptions, Selection};
use tardis_client::session::{self, IfMissing};
use tardis_core::api::Repository;
use tardis_core::view::Tree;
use tardis_log::storage::{DirStorage, SegmentFile, Storage};
use tardis_log::{Repo, RepoOptions};

const HOUR: i64 = 3_600_000_000_000;
const DAY: i64 = 24 * HOUR;

/// Segment storage that skips fsync: the test runs 26,000 commits and checks retention, not
/// durability (the crash tests in `log/tests/engine.rs` check that).
#[derive(Debug)]
struct NoSync(DirStorage);

#[derive(Debug)]
struct NoSyncFile(Box<dyn SegmentFile>, Vec<u8>);

impl SegmentFile for NoSyncFile {
    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.1.extend_from_slice(data);
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        // Writes reach the file (readers need them), but without the fsync.
        let r = self.0.append(&self.1);
        self.1.clear();
        r
    }
}

impl Storage for NoSync {
    fn list(&self) -> io::Result<Vec<u64>> {
        self.0.list()
    }
    fn create(&self, seg: u64, header: &[u8]) -> io::Result<Box<dyn SegmentFile>> {
        Ok(Box::new(NoSyncFile(self.0.create(seg, header)?, Vec::new())))
    }
    fn open_append(&self, seg: u64) -> io::Result<Box<dyn SegmentFile>> {
        Ok(Box::new(NoSyncFile(self.0.open_append(seg)?, Vec::new())))
    }
    fn len(&self, seg: u64) -> io::Result<u64> {
        self.0.len(seg)
    }
    fn read_at(&self, seg: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(seg, offset, buf)
    }
    fn truncate(&self, seg: u64, len: u64) -> io::Result<()> {
        self.0.truncate(seg, len)
    }
    fn remove(&self, seg: u64) -> io::Result<()> {
        self.0.remove(seg)
    }
    fn quarantine(&self, seg: u64, offset: u64, bytes: &[u8]) -> io::Result<PathBuf> {
        self.0.quarantine(seg, offset, bytes)
    }
    fn describe(&self, seg: u64) -> PathBuf {
        self.0.describe(seg)
    }
}

fn open(base: &Path, clock: &Arc<AtomicI64>) -> Repo {
    let dir = base.join("h");
    let storage = NoSync(DirStorage::new(&dir.join("segments"), &dir.join("quarantine")).unwrap());
    let opts = RepoOptions { storage: Some(Arc::new(storage)), clock: Some(clock.clone()), ..RepoOptions::default() };
    Repo::open(base, "h", opts).unwrap()
}

#[test]
fn a_year_of_hourly_backups_keeps_exactly_what_the_schedule_promises() {
    // Set names follow local time; pin it so the expected counts hold on any machine.
    std::env::set_var("TZ", "UTC");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let start = 1_767_225_600 * 1_000_000_000i64; // 2026-01-01 00:00:00 UTC, a Thursday
    let clock = Arc::new(AtomicI64::new(start));
    let repo = open(work.path(), &clock);
    let keys = session::open_keys(&repo, "h", None, IfMissing::Create).unwrap();

    let hours = 365 * 24;
    let mut made: BTreeMap<String, (u32, i64)> = BTreeMap::new();
    for h in 0..hours {
        let now = start + h as i64 * HOUR;
        clock.store(now, Ordering::SeqCst);
        fs::write(src.join("clock"), format!("hour {h}")).unwrap();
        let opts = BackupOptions { now: Some(now), ..BackupOptions::default() };
        let stats = backup::backup(&repo, &keys, std::slice::from_ref(&src), &opts, &NoProgress).unwrap();
        made.insert(stats.set_name.clone(), (stats.priority, now));
        let req = PurgeOptions { selection: Selection::Schedule { now }, max_priority: None, dry_run: false };
        purge::purge(&repo, &req).unwrap();
    }
    let now = start + (hours as i64 - 1) * HOUR; // 2026-12-31 23:00 UTC

    // The promise, stated directly: monthly sets forever, weekly 26 weeks, daily 30 days,
    // hourly one day, each counted from when the set finished (a set exactly that old stays).
    let promised = |prio: u32, finished: i64| match prio {
        40 => true,
        30 => now - finished <= 182 * DAY,
        20 => now - finished <= 30 * DAY,
        10 => now - finished <= DAY,
        other => panic!("unexpected priority {other}"),
    };
    let expected: BTreeMap<&str, u32> =
        made.iter().filter(|(_, (p, f))| promised(*p, *f)).map(|(n, (p, _))| (n.as_str(), *p)).collect();
    let live: BTreeMap<String, u32> =
        repo.sets().unwrap().into_iter().filter(|s| s.is_live()).map(|s| (s.name, s.priority)).collect();
    let live_ref: BTreeMap<&str, u32> = live.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    assert_eq!(live_ref, expected);

    let count = |p: u32| live.values().filter(|q| **q == p).count();
    // 12 months; the 26 Sundays from 5 July to 27 December; the 30 days from 2 December (the
    // daily set of 1 December ran at 01:00, after its monthly one, and is 30 days 22 hours
    // old); the 24 hours from 30 December 23:00, less 31 December 00:00 (a daily set).
    assert_eq!((count(40), count(30), count(20), count(10)), (12, 26, 30, 24));
    assert_eq!(made.len(), hours);
    assert_eq!(repo.sets().unwrap().len(), hours, "purged sets stay in the log as events");
    // Every kept set still reads back the hour it was made in, though the sets between them
    // (whose rows they see) were purged.
    let path = src.join("clock");
    for s in repo.sets().unwrap().into_iter().filter(|s| s.is_live()) {
        let tree = Tree::new(&repo, &keys, s.id);
        let node = tree.resolve(path.as_os_str().as_encoded_bytes()).unwrap().expect("clock file in every set");
        let data = tree.read_at(&node, 0, 64).unwrap();
        let hour = (s.finished.unwrap() - start) / HOUR;
        assert_eq!(String::from_utf8(data).unwrap(), format!("hour {hour}"), "set {}", s.name);
    }
}
