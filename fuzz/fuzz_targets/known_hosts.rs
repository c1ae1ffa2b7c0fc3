//! The client's known-hosts file (pinned server fingerprints): any bytes. A lookup either
//! refuses the file with its line number or returns a well-formed, lower-case fingerprint.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tardis_fuzz::scratch_file;
use tardis_net::tls::KnownHosts;

fn well_formed(fp: &str) -> bool {
    fp.len() == 7 + 64 && fp.starts_with("sha256:") && fp[7..].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch_file("known_hosts", data);
    let hosts = KnownHosts::new(path);
    // The server names the file itself mentions are the interesting ones to look up.
    let text = String::from_utf8_lossy(data);
    let names = text.lines().filter_map(|l| l.split_whitespace().next()).take(4);
    for server in names.chain(["backup.example:7430"]) {
        match hosts.lookup(server) {
            Ok(Some(fp)) => assert!(well_formed(&fp), "lookup returned {fp:?}"),
            Ok(None) => {}
            Err(e) => assert!(e.to_string().contains("known_hosts"), "the error names the file: {e}"),
        }
    }
});
