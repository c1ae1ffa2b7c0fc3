//! Backups over bad links: a real `tardisd` and the real client with real UDP traffic between
//! them, through the seeded relay (loss, delay, jitter, reordering, duplication, outages) or
//! through network namespaces with kernel-level loss (nftables). Seeds are printed by the
//! relay; `TARDIS_RELAY_SEED` repeats one.

use std::ffi::OsStr;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tardis_tests::netns::{self, NetnsPair, Side};
use tardis_tests::relay::{seed_from_env, Link, Relay, RelayConfig};
use tardis_tests::server::{client_args, Daemon};
use tardis_tests::{assert_same, bin, every_kind_tree, manifest, noise};

const MS: Duration = Duration::from_millis(1);

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn through(relay: &Relay, program: &str, host: &str, kh: &Path, args: &[&OsStr]) -> Output {
    Command::new(bin(program))
        .args(client_args("127.0.0.1", relay.addr().port(), host, "pw", kh))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("client starts")
}

fn daemon_addr(d: &Daemon) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], d.port))
}

#[test]
fn backups_complete_and_restore_exactly_at_0_5_and_15_percent_loss() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    every_kind_tree(&src, 2_000_000);
    fs::write(src.join("more"), noise(2_000_000, 9)).unwrap();
    let want = manifest(&src);
    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes");
    for (i, loss) in [0.0, 0.05, 0.15].into_iter().enumerate() {
        let seed = seed_from_env(40 + i as u64);
        let link = Link { reorder: 0.02, duplicate: 0.01, jitter: 10 * MS, ..Link::lossy(loss, 100 * MS) };
        let relay = Relay::start(daemon_addr(&d), RelayConfig::symmetric(seed, link)).unwrap();
        let (host, kh) = (format!("h{i}"), work.path().join(format!("kh{i}")));
        let started = Instant::now();
        let r = through(&relay, "tardis", &host, &kh, &["--create".as_ref(), src.as_os_str()]);
        assert!(r.status.success(), "backup at {loss} loss (seed {seed}): {}", stderr(&r));
        let took = started.elapsed();
        let out = work.path().join(format!("out{i}"));
        let r = through(&relay, "regenerate", &host, &kh, &["-o".as_ref(), out.as_os_str(), src.as_os_str()]);
        assert!(r.status.success(), "regenerate at {loss} loss (seed {seed}): {}", stderr(&r));
        assert_same(&want, &manifest(&out), &format!("restored through {loss} loss"));
        let s = relay.stats();
        eprintln!(
            "loss {loss}: backup {took:?}; relay dropped {} of {} datagrams to the server, {} of {} back",
            s.to_server.dropped, s.to_server.received, s.to_client.dropped, s.to_client.received
        );
        if loss > 0.0 {
            assert!(s.to_server.dropped > 0 && s.to_client.dropped > 0, "the link really lost packets: {s:?}");
        }
    }
}

#[test]
fn a_30_second_outage_mid_backup_is_survived_without_resending_stored_chunks() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("kh"));
    fs::create_dir_all(&src).unwrap();
    let size = 32_000_000;
    for i in 0..16 {
        fs::write(src.join(format!("f{i:02}")), noise(size / 16, 300 + i as u64)).unwrap();
    }
    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes");
    // 4 MB/s to the server: the backup takes about 8 s, and the outage starts 5 s in, when
    // some 20 MB are stored.
    let up = Link { rate: Some(4_000_000), queue: 500 * MS, ..Link::lossy(0.0, 40 * MS) };
    let config = RelayConfig { seed: seed_from_env(7), to_server: up, to_client: Link::lossy(0.0, 40 * MS) };
    let relay = Relay::start(daemon_addr(&d), config).unwrap();
    let started = Instant::now();
    let window = relay.schedule_outage(Duration::from_secs(5), Duration::from_secs(30));
    let r = through(&relay, "tardis", "h", &kh, &["--create".as_ref(), "--json".as_ref(), src.as_os_str()]);
    let took = started.elapsed();
    assert!(r.status.success(), "backup across the outage: {}", stderr(&r));
    assert!(Instant::now() > window.end, "the backup ended after the outage ({took:?}), so it lived through it");
    assert!(stderr(&r).contains("reconnect"), "the client reconnected: {}", stderr(&r));
    let s = relay.stats();
    assert!(s.to_server.outage_dropped > 0, "the outage hit the backup: {s:?}");
    let sent = s.to_server.bytes_forwarded;
    eprintln!("outage: backup took {took:?}; {sent} bytes reached the server for {size} bytes of data");
    // What may cross twice: the upload requests in flight when the link went down (4 of
    // 2 MiB, each all-or-nothing), plus 10% for QUIC and TLS framing. Sending the chunks
    // stored before the outage again would add some 20 MB more.
    let bound = size as f64 * 1.1 + 4.0 * 2.0 * 1048576.0;
    assert!((sent as f64) < bound, "chunks stored before the outage were not sent again ({sent} bytes for {size})");
    let out = work.path().join("out");
    let r = through(&relay, "regenerate", "h", &kh, &["-o".as_ref(), out.as_os_str(), src.as_os_str()]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_same(&manifest(&src), &manifest(&out), "after a 30 s outage");
}

#[test]
fn kernel_level_loss_between_network_namespaces() {
    if !netns::skip_unless_available("kernel_level_loss_between_network_namespaces") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("kh"));
    every_kind_tree(&src, 3_000_000);
    let pair = NetnsPair::create("lossy").unwrap();
    pair.set_loss(Side::A, 10).unwrap();
    pair.set_loss(Side::B, 10).unwrap();
    let launcher: Vec<String> = ["ip", "netns", "exec", pair.name(Side::B)].map(String::from).to_vec();
    let server = Side::B.addr().to_string();
    let d = Daemon::launch(&work.path().join("srv"), 7430, &server, &launcher, "AllowNewHosts = yes");
    let client = |program: &str, args: &[&OsStr]| -> Output {
        pair.command(Side::A, bin(program))
            .args(client_args(&server, d.port, "h", "pw", &kh))
            .args(args)
            .output()
            .expect("client starts")
    };
    let r = client("tardis", &["--create".as_ref(), src.as_os_str()]);
    assert!(r.status.success(), "backup through 10% kernel loss: {}", stderr(&r));
    let out = work.path().join("out");
    let r = client("regenerate", &["-o".as_ref(), out.as_os_str(), src.as_os_str()]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_same(&manifest(&src), &manifest(&out), "through kernel-level loss");
    let dropped = pair.loss_dropped(Side::A).unwrap() + pair.loss_dropped(Side::B).unwrap();
    eprintln!("nftables dropped {dropped} packets");
    assert!(dropped > 0, "the loss rules dropped packets");
}

/// Over QUIC only the delta of a changed chunk crosses to the server: 1% of a 16 MiB file's
/// 4 KiB blocks rewritten sends a few times the bytes written, not the 16 MiB of chunks they
/// touch. (The bases come back the other way: the client reads each replaced chunk to delta
/// against it.)
#[test]
fn over_quic_a_small_edit_sends_deltas_not_chunks() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("kh"));
    fs::create_dir_all(&src).unwrap();
    let path = src.join("disk.img");
    let mut data = noise(16 << 20, 11);
    fs::write(&path, &data).unwrap();
    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes");
    let link = || RelayConfig::symmetric(seed_from_env(12), Link::lossy(0.0, 20 * MS));
    let relay = Relay::start(daemon_addr(&d), link()).unwrap();
    let r = through(&relay, "tardis", "h", &kh, &["--create".as_ref(), src.as_os_str()]);
    assert!(r.status.success(), "{}", stderr(&r));
    let first = relay.stats().to_server.bytes_forwarded;

    let blocks = data.len() / 4096;
    for i in 0..blocks / 100 {
        let b = (i * 97 + 13) % blocks;
        data[b * 4096..][..4096].copy_from_slice(&noise(4096, 500 + i as u64));
    }
    fs::write(&path, &data).unwrap();
    let changed = (blocks / 100 * 4096) as u64;
    let relay = Relay::start(daemon_addr(&d), link()).unwrap();
    let r = through(&relay, "tardis", "h", &kh, &["--json".as_ref(), src.as_os_str()]);
    assert!(r.status.success(), "{}", stderr(&r));
    let s = relay.stats();
    eprintln!(
        "16 MiB file, {changed} bytes rewritten: first backup sent {first} bytes; the second sent {} and \
         received {}",
        s.to_server.bytes_forwarded, s.to_client.bytes_forwarded
    );
    assert!(
        s.to_server.bytes_forwarded < 4 * changed,
        "{} bytes sent for {changed} changed",
        s.to_server.bytes_forwarded
    );
    let out = work.path().join("out");
    let r = through(&relay, "regenerate", "h", &kh, &["-o".as_ref(), out.as_os_str(), path.as_os_str()]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(fs::read(&out).unwrap() == data, "the second version regenerates exactly");
}
