//! Fixed-size identifiers. They are opaque to the server: every one of them is a keyed hash
//! (or a random value) and reveals nothing about the content or name it stands for.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! byte_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length in bytes.
            pub const LEN: usize = $len;

            /// Builds the identifier from a slice of exactly [`Self::LEN`] bytes.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                bytes.try_into().ok().map(Self)
            }

            /// Lower-case hexadecimal form.
            pub fn to_hex(&self) -> String {
                self.0.iter().map(|b| format!("{b:02x}")).collect()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.to_hex()[..12])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "{} bytes", $len)
                    }
                    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<$name, E> {
                        $name::from_slice(v).ok_or_else(|| E::invalid_length(v.len(), &self))
                    }
                }
                d.deserialize_bytes(V)
            }
        }
    };
}

byte_id!(
    /// Keyed BLAKE3 of a chunk's plaintext: equal content gives equal IDs within one host.
    ChunkId, 32
);
byte_id!(
    /// Identity of a directory across sets: a keyed hash of its parent's ID and its name.
    DirId, 16
);
byte_id!(
    /// Keyed hash of a name within a directory; the index key for a directory entry.
    NameKey, 16
);
byte_id!(
    /// Random identity of a host's repository, fixed when the host is created.
    HostId, 16
);

/// Sequence number of a backup set within its host, starting at 1 and never reused.
pub type SetId = u64;

impl DirId {
    /// The parent of the root directory: the root entry is stored under this ID.
    pub const TOP: DirId = DirId([0; 16]);
}
