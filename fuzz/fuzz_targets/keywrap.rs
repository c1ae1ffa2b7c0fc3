//! Wrapped-key blobs and KDF headers as the server stores and sends them. Parsing checks the
//! layout and that the Argon2id parameters lie between floor and ceiling (a hostile server must
//! not make the client spend unbounded memory or time); a parsed blob keeps its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tardis_core::keywrap::{KdfHeader, KdfParams, WrappedKey, BLOB_LEN};

fuzz_target!(|data: &[u8]| {
    let header = KdfHeader::from_bytes(data);
    if let Ok(h) = &header {
        let p = h.params();
        let (f, c) = (KdfParams::FLOOR, KdfParams::CEILING);
        assert!((f.m_kib..=c.m_kib).contains(&p.m_kib) && (f.t..=c.t).contains(&p.t) && (f.p..=c.p).contains(&p.p));
        assert_eq!(h.as_bytes(), &data[..h.as_bytes().len()]);
        let again = KdfHeader::from_bytes(h.as_bytes()).expect("a parsed header parses again");
        assert_eq!(again.as_bytes(), h.as_bytes());
    }
    if let Ok(w) = WrappedKey::from_bytes(data) {
        assert_eq!(data.len(), BLOB_LEN);
        assert_eq!(w.as_bytes(), data);
        assert!(header.is_ok(), "a valid blob has a valid header");
        assert_eq!(w.header().as_bytes(), header.expect("checked above").as_bytes());
        assert_eq!(w.params(), w.header().params());
    }
});
