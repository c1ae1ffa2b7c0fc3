//! Two small text parsers: per-host configuration values (set by a client, stored in the log,
//! read back by the server's retention jobs) and the `--time` argument of the tools. The
//! first byte picks the parser and, for configuration, the key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use tardis_core::config::{self, Config, KEYS};

fuzz_target!(|data: &[u8]| {
    let [selector, rest @ ..] = data else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    if selector & 0x80 != 0 {
        let _ = tardis_tools::select::parse_when(text);
        return;
    }
    let key = KEYS[usize::from(*selector) % KEYS.len()].name;
    let valid = config::validate(key, text).is_ok();
    // What the log holds is what was validated when it was set; reading it back must agree.
    let stored = BTreeMap::from([(key.to_owned(), text.to_owned())]);
    match Config::from_stored(&stored) {
        Ok(c) => {
            assert!(valid, "from_stored accepted {key} = {text:?}, which validate refuses");
            assert_eq!(c.get(key), text);
            let schedule = c.schedule();
            for priority in [0, 1, 10, 20, 30, 40, 1000] {
                let _ = schedule.keep_for(priority);
            }
            let _ = c.max_delta_chain();
        }
        Err(_) => assert!(!valid, "from_stored refused {key} = {text:?}, which validate accepts"),
    }
});
