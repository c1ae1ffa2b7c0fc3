//! zstd compression with a stored-uncompressed fallback.
//!
//! Already-compressed data (media, archives, encrypted files) does not shrink, and storing
//! zstd's slightly larger output would waste both space and read-time CPU, so a chunk is kept
//! compressed only when that saves at least 1/64 of its size.

use std::cell::RefCell;

use crate::{Error, Result};

thread_local! {
    // One zstd context per thread, reused: creating one per chunk allocates and clears its
    // tables every time, which showed as 1% of a full restore's CPU.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// zstd level used for new chunks: level 3 is zstd's own default and the best
/// throughput-to-ratio point for a backup that must keep up with the disk.
pub const LEVEL: i32 = 3;

/// Compresses `data`; returns `None` when storing it raw is better.
pub fn compress(data: &[u8]) -> Result<Option<Vec<u8>>> {
    if data.len() < 64 {
        return Ok(None);
    }
    let out = COMPRESSOR
        .with(|c| {
            let mut c = c.borrow_mut();
            if c.is_none() {
                *c = Some(zstd::bulk::Compressor::new(LEVEL)?);
            }
            c.as_mut().expect("set above").compress(data)
        })
        .map_err(|e| Error::Invalid(format!("zstd: {e}")))?;
    Ok((out.len() < data.len() - data.len() / 64).then_some(out))
}

/// Decompresses into exactly `plain_len` bytes, refusing anything that would exceed it, so a
/// hostile frame cannot make the reader allocate more than the declared chunk size.
pub fn decompress(data: &[u8], plain_len: usize) -> Result<Vec<u8>> {
    let out = decompress_bounded(data, plain_len)?;
    if out.len() != plain_len {
        return Err(Error::malformed("zstd frame", format!("{} bytes, expected {plain_len}", out.len())));
    }
    Ok(out)
}

/// Decompresses a frame of unknown length, refusing output longer than `max` bytes.
pub fn decompress_bounded(data: &[u8], max: usize) -> Result<Vec<u8>> {
    DECOMPRESSOR
        .with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(zstd::bulk::Decompressor::new()?);
            }
            d.as_mut().expect("set above").decompress(data, max)
        })
        .map_err(|e| Error::malformed("zstd frame", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn incompressible_data_is_stored_raw() {
        let noise: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let text = b"tardis ".repeat(10_000);
        assert!(compress(&text).unwrap().is_some());
        let c = compress(&noise).unwrap();
        if let Some(c) = c {
            assert!(c.len() < noise.len());
        }
    }

    #[test]
    fn declared_size_bounds_output() {
        let text = b"abc".repeat(10_000);
        let c = compress(&text).unwrap().unwrap();
        assert!(decompress(&c, 100).is_err());
        assert!(decompress(&c, text.len() + 1).is_err());
        assert_eq!(decompress(&c, text.len()).unwrap(), text);
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(0u8..4, 0..20_000)) {
            if let Some(c) = compress(&data).unwrap() {
                prop_assert_eq!(decompress(&c, data.len()).unwrap(), data);
            }
        }
    }
}
