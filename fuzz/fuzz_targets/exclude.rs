//! Exclude patterns (`/etc/tardis/excludes`, `.tardis-excludes`, `--exclude-file`, `--exclude`):
//! any bytes. A file either compiles or is refused with its line; a compiled literal name (no glob
//! syntax, no `/`) excludes exactly that name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::ffi::OsString;
use std::path::Path;
use tardis_client::exclude::ExcludeConfig;
use tardis_fuzz::{scratch_dir, scratch_file};

fuzz_target!(|data: &[u8]| {
    // UTF-8 text goes in as `--exclude` patterns (the same parser, without a file write per
    // execution); other bytes as the global exclude file.
    let (file, cli) = match std::str::from_utf8(data) {
        Ok(text) => (scratch_dir().join("absent"), vec![text.to_owned()]),
        Err(_) => (scratch_file("excludes", data), Vec::new()),
    };
    let config = ExcludeConfig::from_lookup(
        |var| (var == "TARDIS_GLOBAL_EXCLUDES").then(|| OsString::from(&file)),
        cli,
        Vec::new(),
    );
    let root = Path::new("/src");
    let Ok(rules) = config.root_rules(root) else { return };
    let text = std::str::from_utf8(data).expect("a file that compiled is UTF-8");
    for line in text.split('\n') {
        let name = line.trim_end();
        let literal = !name.is_empty()
            && !name.starts_with('#')
            && !name.contains(|c| "*?[]{}\\/".contains(c))
            && name != "."
            && name != "..";
        let path = root.join(name);
        let excluded = rules.is_excluded(&path, false);
        if literal {
            assert!(excluded, "literal pattern {name:?} does not exclude {path:?}");
            assert!(rules.is_excluded(&path, true), "a pattern without a trailing / applies to directories");
        }
        let _ = rules.is_excluded(&root.join(line), true);
    }
});
