//! File metadata as captured by the client. It is sealed (on encrypted hosts) before it goes
//! into a file-version event, so everything here is invisible to the server.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// What kind of file system object an entry is. The numeric values are part of the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(into = "u8", try_from = "u8")]
pub enum Kind {
    #[default]
    File = 1,
    Dir = 2,
    Symlink = 3,
    Fifo = 4,
    CharDev = 5,
    BlockDev = 6,
}

impl From<Kind> for u8 {
    fn from(k: Kind) -> u8 {
        k as u8
    }
}

impl TryFrom<u8> for Kind {
    type Error = String;
    fn try_from(v: u8) -> Result<Kind, String> {
        Ok(match v {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::CharDev,
            6 => Kind::BlockDev,
            other => return Err(format!("unknown entry kind {other}")),
        })
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// One extended attribute (POSIX ACLs are the `system.posix_acl_*` attributes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    pub name: ByteBuf,
    pub value: ByteBuf,
}

/// Everything Tardis restores about one directory entry besides its data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FileMeta {
    /// The entry's name as raw bytes (file names need not be UTF-8).
    pub name: ByteBuf,
    pub kind: Kind,
    /// Permission bits including set-uid, set-gid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub user: Option<String>,
    pub group: Option<String>,
    /// Length in bytes (for symlinks, of the target).
    pub size: u64,
    pub mtime: Timestamp,
    pub atime: Timestamp,
    pub ctime: Timestamp,
    /// Device and inode on the source machine: hard links share them.
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    /// Device number of character and block devices.
    pub rdev: u64,
    /// Symlink target, raw bytes.
    pub target: Option<ByteBuf>,
    pub xattrs: Vec<Xattr>,
    /// The file had holes; extents not covered by chunks are holes, not zeros to write.
    #[serde(default)]
    pub sparse: bool,
}

impl FileMeta {
    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec(self).expect("metadata serialises to MessagePack without fail")
    }

    pub fn decode(bytes: &[u8]) -> crate::Result<Self> {
        rmp_serde::from_slice(bytes).map_err(|e| crate::Error::malformed("file metadata", e))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn arb_meta() -> impl Strategy<Value = FileMeta> {
        (
            proptest::collection::vec(any::<u8>(), 1..40),
            1u8..=6,
            any::<(u32, u32, u32)>(),
            proptest::option::of("[a-z]{1,8}"),
            any::<(u64, i64, u32, u64, u64)>(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..50)),
            proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 1..20), proptest::collection::vec(any::<u8>(), 0..30)),
                0..3,
            ),
            any::<bool>(),
        )
            .prop_map(
                |(name, kind, (mode, uid, gid), user, (size, sec, nsec, ino, rdev), target, xattrs, sparse)| FileMeta {
                    name: ByteBuf::from(name),
                    kind: Kind::try_from(kind).unwrap(),
                    mode,
                    uid,
                    gid,
                    user: user.clone(),
                    group: user,
                    size,
                    mtime: Timestamp { sec, nsec },
                    atime: Timestamp { sec: sec / 2, nsec: nsec / 2 },
                    ctime: Timestamp { sec: sec / 3, nsec },
                    dev: ino ^ 5,
                    ino,
                    nlink: rdev % 7,
                    rdev,
                    target: target.map(ByteBuf::from),
                    xattrs: xattrs
                        .into_iter()
                        .map(|(n, v)| Xattr { name: ByteBuf::from(n), value: ByteBuf::from(v) })
                        .collect(),
                    sparse,
                },
            )
    }

    proptest! {
        #[test]
        fn round_trip(m in arb_meta()) {
            prop_assert_eq!(FileMeta::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn unknown_kind_is_an_error() {
        let mut m = FileMeta::default().encode();
        // The kind is the second field of the array; 1 (File) is encoded as the fixint 0x01.
        let pos = m.iter().position(|b| *b == 0x01).unwrap();
        m[pos] = 0x09;
        assert!(FileMeta::decode(&m).is_err());
    }
}
