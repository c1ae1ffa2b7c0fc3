//! Segment bytes from a damaged or hostile disk: the segment header, record framing, batch
//! commits, and the real scanner that recovery and `verify` use, run over the whole input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tardis_fuzz::MemSegment;
use tardis_log::frame::{self, Commit, RecordHeader, SegmentHeader, SEGMENT_HEADER_LEN};
use tardis_log::segments;

fuzz_target!(|data: &[u8]| {
    // Every field of the 32-byte header is covered by its CRC, so a header that decodes
    // re-encodes to exactly the bytes it came from.
    if let Ok(h) = SegmentHeader::decode(data) {
        assert_eq!(&h.encode()[..], &data[..SEGMENT_HEADER_LEN]);
    }
    if let Ok(c) = Commit::decode(data) {
        assert_eq!(&c.encode()[..], data);
    }
    if let Ok(h) = RecordHeader::decode(data) {
        assert!(h.meta_len <= frame::MAX_META && h.body_len <= frame::MAX_BODY);
    }

    // Walk the input as a run of records; each one that parses re-encodes to a record that
    // parses to the same kind, version, meta and body.
    let mut rest = data;
    while let Ok(p) = frame::parse_record(rest) {
        let mut again = Vec::new();
        let crc = frame::encode_record(&mut again, p.header.kind, p.header.version, p.meta, p.body);
        let q = frame::parse_record(&again).expect("a re-encoded record parses");
        assert_eq!(
            (q.header.kind, q.header.version, q.meta, q.body),
            (p.header.kind, p.header.version, p.meta, p.body)
        );
        assert_eq!(q.header.head_crc, crc);
        let total = p.header.total_len() as usize;
        assert!(total <= rest.len());
        rest = &rest[total..];
    }

    // The scanner over the whole input as segment 1 (header, then records from offset 32).
    if data.len() < SEGMENT_HEADER_LEN {
        return;
    }
    let storage = MemSegment { seg: 1, bytes: data.to_vec() };
    let len = data.len() as u64;
    let _ = segments::read_segment_header(&storage, 1, len);
    let mut batches = Vec::new();
    let scanned = segments::scan_segment(&storage, 1, SEGMENT_HEADER_LEN as u64, len, None, true, &mut |b| {
        batches.push(b);
        Ok(())
    });
    if let Ok(out) = scanned {
        assert!(out.committed_end <= len);
        // Batches come in order, inside the segment, with rising sequence numbers.
        let mut end = SEGMENT_HEADER_LEN as u64;
        let mut seq = None;
        for b in &batches {
            assert!(b.end.segment == 1 && b.end.offset > end && b.end.offset <= out.committed_end);
            assert!(seq.is_none_or(|s| b.seq > s));
            end = b.end.offset;
            seq = Some(b.seq);
        }
        assert_eq!(out.last_seq, seq.or(out.last_seq));
    }
});
