//! Byte layout of segments and records (see `docs/FORMAT.md`, "Segments"). Pure functions, so
//! they can be fuzzed and property-tested without files.
//!
//! All integers are little-endian. CRCs are CRC-32C (Castagnoli).

use std::fmt;

/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TARDSEG\0";
/// Segment format version written by this build.
pub const SEGMENT_VERSION: u32 = 1;
/// Length of the segment header.
pub const SEGMENT_HEADER_LEN: usize = 32;

/// First bytes of every record; lets a scanner tell record starts from payload bytes.
pub const RECORD_MAGIC: [u8; 4] = *b"TRec";
/// Length of a record header.
pub const RECORD_HEADER_LEN: usize = 24;
/// Largest record meta (event payload) accepted.
pub const MAX_META: u32 = 64 << 20;
/// Largest record body (stored chunk) accepted.
pub const MAX_BODY: u32 = 8 << 20;
/// Length of a batch-commit record's meta.
pub const COMMIT_META_LEN: usize = 16;

/// Why bytes are not a valid segment header or record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    Short,
    BadMagic,
    Version(u32),
    BadCrc,
    TooLarge { what: &'static str, len: u32 },
    BadCommit,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Short => f.write_str("truncated"),
            FrameError::BadMagic => f.write_str("bad magic"),
            FrameError::Version(v) => write!(f, "unsupported version {v}"),
            FrameError::BadCrc => f.write_str("checksum mismatch"),
            FrameError::TooLarge { what, len } => write!(f, "{what} length {len} exceeds the maximum"),
            FrameError::BadCommit => f.write_str("malformed batch commit"),
        }
    }
}

/// The fixed header at the start of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub segment: u64,
    /// Sequence number of the first batch committed in this segment.
    pub first_seq: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.segment.to_le_bytes());
        b[24..32].copy_from_slice(&self.first_seq.to_le_bytes());
        let crc = segment_header_crc(&b);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, FrameError> {
        if b.len() < SEGMENT_HEADER_LEN {
            return Err(FrameError::Short);
        }
        if b[..8] != SEGMENT_MAGIC {
            return Err(FrameError::BadMagic);
        }
        let version = u32_at(b, 8);
        if version != SEGMENT_VERSION {
            return Err(FrameError::Version(version));
        }
        if u32_at(b, 12) != segment_header_crc(b) {
            return Err(FrameError::BadCrc);
        }
        Ok(SegmentHeader { segment: u64_at(b, 16), first_seq: u64_at(b, 24) })
    }
}

fn segment_header_crc(b: &[u8]) -> u32 {
    let c = crc32c::crc32c(&b[..12]);
    crc32c::crc32c_append(c, &b[16..SEGMENT_HEADER_LEN])
}

/// The fixed header in front of every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: u8,
    pub version: u8,
    pub meta_len: u32,
    pub body_len: u32,
    pub body_crc: u32,
    pub head_crc: u32,
}

impl RecordHeader {
    /// Total length of the record including its header.
    pub fn total_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.meta_len) + u64::from(self.body_len)
    }

    /// Parses and bounds-checks a header; the CRC is checked by [`RecordHeader::check`] once
    /// the meta has been read.
    pub fn decode(b: &[u8]) -> Result<Self, FrameError> {
        if b.len() < RECORD_HEADER_LEN {
            return Err(FrameError::Short);
        }
        if b[..4] != RECORD_MAGIC {
            return Err(FrameError::BadMagic);
        }
        let h = RecordHeader {
            kind: b[4],
            version: b[5],
            meta_len: u32_at(b, 8),
            body_len: u32_at(b, 12),
            body_crc: u32_at(b, 16),
            head_crc: u32_at(b, 20),
        };
        if h.meta_len > MAX_META {
            return Err(FrameError::TooLarge { what: "meta", len: h.meta_len });
        }
        if h.body_len > MAX_BODY {
            return Err(FrameError::TooLarge { what: "body", len: h.body_len });
        }
        Ok(h)
    }

    /// Checks the header CRC, which covers the header's first 20 bytes and the meta.
    pub fn check(&self, header: &[u8], meta: &[u8]) -> Result<(), FrameError> {
        if head_crc(header, meta) != self.head_crc {
            return Err(FrameError::BadCrc);
        }
        Ok(())
    }

    /// Checks the body CRC.
    pub fn check_body(&self, body: &[u8]) -> Result<(), FrameError> {
        if crc32c::crc32c(body) != self.body_crc {
            return Err(FrameError::BadCrc);
        }
        Ok(())
    }
}

fn head_crc(header: &[u8], meta: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[..20]), meta)
}

/// Appends one framed record to `out`; returns its header CRC (which the batch commit chains).
pub fn encode_record(out: &mut Vec<u8>, kind: u8, version: u8, meta: &[u8], body: &[u8]) -> u32 {
    let start = out.len();
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&[kind, version, 0, 0]);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    let crc = head_crc(&out[start..start + 20], meta);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(body);
    crc
}

/// The meta of a batch-commit record: which batch, how many records it closes, and a CRC
/// chained over those records' header CRCs (so a commit cannot vouch for other records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub seq: u64,
    pub count: u32,
    pub batch_crc: u32,
}

impl Commit {
    pub fn encode(&self) -> [u8; COMMIT_META_LEN] {
        let mut b = [0u8; COMMIT_META_LEN];
        b[..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..12].copy_from_slice(&self.count.to_le_bytes());
        b[12..16].copy_from_slice(&self.batch_crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, FrameError> {
        if b.len() != COMMIT_META_LEN {
            return Err(FrameError::BadCommit);
        }
        Ok(Commit { seq: u64_at(b, 0), count: u32_at(b, 8), batch_crc: u32_at(b, 12) })
    }

    /// Folds one record's header CRC into a running batch CRC.
    pub fn chain(batch_crc: u32, record_crc: u32) -> u32 {
        crc32c::crc32c_append(batch_crc, &record_crc.to_le_bytes())
    }
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

/// A record parsed out of an in-memory buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed<'a> {
    pub header: RecordHeader,
    pub meta: &'a [u8],
    pub body: &'a [u8],
}

/// Parses the record at the start of `buf`, checking both CRCs.
pub fn parse_record(buf: &[u8]) -> Result<Parsed<'_>, FrameError> {
    let header = RecordHeader::decode(buf)?;
    let total = usize::try_from(header.total_len()).map_err(|_| FrameError::Short)?;
    if buf.len() < total {
        return Err(FrameError::Short);
    }
    let meta_end = RECORD_HEADER_LEN + header.meta_len as usize;
    let meta = &buf[RECORD_HEADER_LEN..meta_end];
    header.check(buf, meta)?;
    let body = &buf[meta_end..total];
    header.check_body(body)?;
    Ok(Parsed { header, meta, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn record_round_trip(kind in any::<u8>(), version in any::<u8>(),
                             meta in proptest::collection::vec(any::<u8>(), 0..300),
                             body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = Vec::new();
            let crc = encode_record(&mut buf, kind, version, &meta, &body);
            let p = parse_record(&buf).unwrap();
            prop_assert_eq!(p.header.kind, kind);
            prop_assert_eq!(p.header.version, version);
            prop_assert_eq!(p.header.head_crc, crc);
            prop_assert_eq!(p.meta, &meta[..]);
            prop_assert_eq!(p.body, &body[..]);
            prop_assert_eq!(p.header.total_len() as usize, buf.len());
        }

        #[test]
        fn any_single_flip_is_detected(meta in proptest::collection::vec(any::<u8>(), 1..100),
                                       body in proptest::collection::vec(any::<u8>(), 0..100),
                                       at in any::<proptest::sample::Index>(), bit in 0u8..8) {
            let mut buf = Vec::new();
            encode_record(&mut buf, 30, 1, &meta, &body);
            let i = at.index(buf.len());
            buf[i] ^= 1 << bit;
            prop_assert!(parse_record(&buf).is_err());
        }

        #[test]
        fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_record(&buf);
            let _ = SegmentHeader::decode(&buf);
            let _ = Commit::decode(&buf);
        }

        #[test]
        fn segment_header_round_trip(segment in any::<u64>(), first_seq in any::<u64>()) {
            let h = SegmentHeader { segment, first_seq };
            prop_assert_eq!(SegmentHeader::decode(&h.encode()).unwrap(), h);
        }
    }

    #[test]
    fn oversized_lengths_are_refused_before_reading() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 30, 1, b"m", b"b");
        buf[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(RecordHeader::decode(&buf), Err(FrameError::TooLarge { what: "body", len: u32::MAX }));
        let mut h = SegmentHeader { segment: 3, first_seq: 9 }.encode();
        h[8] = 2;
        assert_eq!(SegmentHeader::decode(&h), Err(FrameError::Version(2)));
    }
}
