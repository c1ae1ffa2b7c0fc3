//! The daemon's configuration file (`tardisd.cfg`) and a base directory's `storage.cfg`: any
//! text. Parsing either refuses with a message naming the file, or gives a configuration whose
//! values are in range; a bucket's settings survive being written out and read back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tardis_log::bucket::BucketConfig;
use tardis_server::config::Config;
use tardis_server::service::Hosts;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text, Path::new("/fuzz/tardisd.cfg")) {
        Ok(c) => {
            assert!(c.port != 0 && c.max_connections > 0);
            assert!((0.0..=1.0).contains(&c.jobs.compact_threshold));
            assert!(c.jobs.compact_every.is_none_or(|d| !d.is_zero()) && !c.jobs.space_check_every.is_zero());
            assert!(c.jobs.purge_every.is_none_or(|d| !d.is_zero()) && !c.jobs.idle_close.is_zero());
            for hosts in [&c.rules.new_hosts, &c.rules.append_only] {
                if let Hosts::Only(names) = hosts {
                    assert!(!names.is_empty());
                    assert!(names.iter().all(|n| tardis_log::repo::check_host_name(n).is_ok()), "{names:?}");
                }
            }
            // Parsing is a function of the text alone.
            let again = Config::parse(text, Path::new("/fuzz/tardisd.cfg")).expect("the same text parses again");
            assert_eq!(again, c);
        }
        Err(e) => assert!(e.to_string().contains("/fuzz/tardisd.cfg"), "the error names the file: {e}"),
    }
    match BucketConfig::parse(text, Path::new("/fuzz/storage.cfg"), false) {
        Ok(Some(b)) => {
            assert!(b.check().is_ok());
            let again = BucketConfig::parse(&b.render(), Path::new("/fuzz/storage.cfg"), false);
            assert_eq!(again.expect("rendered settings parse").as_ref(), Some(&b));
        }
        Ok(None) => {}
        Err(e) => assert!(e.to_string().contains("/fuzz/storage.cfg"), "the error names the file: {e}"),
    }
});
