//! Helpers shared by the fuzz targets: an in-memory read-only segment store (so the real segment
//! scanner runs without touching the disk) and a per-process scratch file for the parsers that
//! only take a path.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tardis_core::crypto::{Keys, MasterKey};
use tardis_core::ids::HostId;
use tardis_log::storage::{SegmentFile, Storage};

/// The keys of an unencrypted host and of an encrypted one (with a master key random per
/// process: no input can forge its seals, so the encrypted path checks refusals).
pub fn keys() -> &'static [Keys; 2] {
    static KEYS: OnceLock<[Keys; 2]> = OnceLock::new();
    KEYS.get_or_init(|| {
        let master = MasterKey::generate().expect("a random master key");
        [Keys::unencrypted(HostId([7; 16])), Keys::encrypted(HostId([8; 16]), &master)]
    })
}

/// One segment held in memory; every mutating operation is refused, since the scanner under
/// test must only read.
#[derive(Debug)]
pub struct MemSegment {
    pub seg: u64,
    pub bytes: Vec<u8>,
}

fn read_only() -> io::Error {
    io::Error::other("the fuzz storage is read-only")
}

impl Storage for MemSegment {
    fn list(&self) -> io::Result<Vec<u64>> {
        Ok(vec![self.seg])
    }
    fn create(&self, _seg: u64, _header: &[u8]) -> io::Result<Box<dyn SegmentFile>> {
        Err(read_only())
    }
    fn open_append(&self, _seg: u64) -> io::Result<Box<dyn SegmentFile>> {
        Err(read_only())
    }
    fn len(&self, seg: u64) -> io::Result<u64> {
        if seg != self.seg {
            return Err(io::ErrorKind::NotFound.into());
        }
        Ok(self.bytes.len() as u64)
    }
    fn read_at(&self, seg: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if seg != self.seg {
            return Err(io::ErrorKind::NotFound.into());
        }
        let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let end = start.checked_add(buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        let src = self.bytes.get(start..end).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn truncate(&self, _seg: u64, _len: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn remove(&self, _seg: u64) -> io::Result<()> {
        Err(read_only())
    }
    fn quarantine(&self, _seg: u64, _offset: u64, _bytes: &[u8]) -> io::Result<PathBuf> {
        Err(read_only())
    }
    fn describe(&self, seg: u64) -> PathBuf {
        PathBuf::from(format!("mem:{seg}"))
    }
}

/// Where temporary files go: `/dev/shm` when there is one, since a target that writes a file or
/// fsyncs a repository on every execution runs many times faster on tmpfs.
pub fn temp_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A fresh temporary directory under [`temp_root`].
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("tardis-fuzz-").tempdir_in(temp_root()).expect("creating a temporary directory")
}

/// A scratch directory that lives as long as the fuzzing process (libFuzzer never returns from
/// its loop, so nothing would drop a `TempDir` anyway).
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempdir().keep())
}

/// Writes `bytes` to the scratch file `name` and returns its path.
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    std::fs::write(&path, bytes).expect("writing a scratch file");
    path
}
