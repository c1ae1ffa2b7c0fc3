//! `tardisd` and the remote client end to end: a real daemon on loopback, the real `tardis`,
//! `regenerate` and `tardis-tools` binaries, and raw QUIC clients for what no well-behaved
//! client would send.

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tardis_tests::server::Daemon;
use tardis_tests::{assert_same, bin, change_every_kind, every_kind_tree, manifest, noise, run};

fn tool(name: &str, d: &Daemon, host: &str, pw: &str, kh: &Path, args: &[&OsStr]) -> Output {
    let mut all: Vec<std::ffi::OsString> = d.client_args(host, pw, kh).into_iter().map(Into::into).collect();
    all.extend(args.iter().map(|a| a.to_os_string()));
    let refs: Vec<&OsStr> = all.iter().map(|a| a.as_os_str()).collect();
    run(name, &refs)
}

fn backup(d: &Daemon, host: &str, pw: &str, kh: &Path, extra: &[&str], path: &Path) -> Output {
    let mut args: Vec<&OsStr> = extra.iter().map(OsStr::new).collect();
    args.push(OsStr::new("--json"));
    args.push(path.as_os_str());
    tool("tardis", d, host, pw, kh, &args)
}

/// `tardis-tools --db` on the daemon's own repository, as an administrator runs it on the server.
fn on_server(d: &Daemon, host: &str, pw: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("tardis-tools"));
    cmd.arg("--db").arg(&d.db).args(["--host", host, "--password", pw]).args(args);
    cmd.output().unwrap()
}

/// Starts `tardis` backing up `src` as set `name` of host h (password pw), and returns once the
/// daemon has opened that set, so that the run can be paused in the middle of its work.
fn start_run(d: &Daemon, kh: &Path, name: &str, src: &Path) -> std::process::Child {
    let opened = d.log().matches("set opened").count();
    let client = Command::new(bin("tardis"))
        .args(d.client_args("h", "pw", kh))
        .args(["--name", name])
        .arg(src)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.log().matches("set opened").count() == opened {
        assert!(Instant::now() < deadline, "run {name} never opened its set:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    client
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn regenerate(d: &Daemon, host: &str, pw: &str, kh: &Path, set: &str, path: &Path, out: &Path) {
    let args: Vec<&OsStr> = vec!["--set".as_ref(), set.as_ref(), "-o".as_ref(), out.as_os_str(), path.as_os_str()];
    let r = tool("regenerate", d, host, pw, kh, &args);
    assert!(r.status.success(), "regenerate failed: {}", stderr(&r));
}

#[test]
fn backups_over_quic_regenerate_exactly() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    every_kind_tree(&src, 3_000_000);
    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes");
    let m1 = manifest(&src);

    let r = backup(&d, "h", "pw", &kh, &["--create", "--name", "first"], &src);
    assert!(r.status.success(), "first backup: {}", stderr(&r));
    assert!(stderr(&r).contains("pinned its certificate"), "{}", stderr(&r));
    let pin = fs::read_to_string(&kh).unwrap();
    assert!(pin.starts_with(&format!("127.0.0.1:{} sha256:", d.port)), "{pin}");

    change_every_kind(&src);
    let m2 = manifest(&src);
    let r = backup(&d, "h", "pw", &kh, &["--name", "second"], &src);
    assert!(r.status.success(), "second backup: {}", stderr(&r));
    let s2: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert!(s2["files_read"].as_u64().unwrap() < 10, "only changed files are read: {s2}");
    assert_eq!(fs::read_to_string(&kh).unwrap(), pin, "a known server is not pinned twice");

    for (set, want) in [("first", &m1), ("second", &m2)] {
        let out = work.path().join(format!("out-{set}"));
        regenerate(&d, "h", "pw", &kh, set, &src, &out);
        assert_same(want, &manifest(&out), &format!("set {set} over QUIC"));
    }

    // The tools list and compare over the network as they do locally.
    let sets = tool("tardis-tools", &d, "h", "pw", &kh, &["sets".as_ref(), "--json".as_ref()]);
    assert!(sets.status.success(), "{}", stderr(&sets));
    let names: Vec<String> = String::from_utf8_lossy(&sets.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["first", "second"]);
    let ls =
        tool("tardis-tools", &d, "h", "pw", &kh, &["ls".as_ref(), "--set".as_ref(), "first".as_ref(), src.as_os_str()]);
    assert!(ls.status.success() && String::from_utf8_lossy(&ls.stdout).contains("plain.txt"), "{}", stderr(&ls));
    let diff = tool("tardis-tools", &d, "h", "pw", &kh, &["diff".as_ref(), "first".as_ref(), "second".as_ref()]);
    assert!(diff.status.success() && !diff.stdout.is_empty(), "{}", stderr(&diff));
    let v = tool("tardis-tools", &d, "h", "pw", &kh, &["verify".as_ref()]);
    assert!(!v.status.success() && stderr(&v).contains("--db"), "verify names where it runs: {}", stderr(&v));
}

#[test]
fn refusals_are_clear_and_leave_the_repository_untouched() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(100_000, 1)).unwrap();
    let mut d = Daemon::start(&work.path().join("srv"), "");

    // No AllowNewHosts: creating is refused, naming the setting.
    let r = backup(&d, "h", "pw", &kh, &["--create"], &src);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("AllowNewHosts"), "{}", stderr(&r));
    assert!(!d.db.join("h").exists(), "a refused host leaves nothing behind");

    d.stop();
    let mut d = Daemon::start_on(&d.db.clone(), d.port, "AllowNewHosts = yes");
    // An unknown host without --create.
    let r = backup(&d, "h", "pw", &kh, &[], &src);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("does not exist") && stderr(&r).contains("--create"), "{}", stderr(&r));
    assert!(!d.db.join("h").exists());
    // No password: remote hosts need one.
    let port = d.port.to_string();
    let args: Vec<&OsStr> = vec![
        "--server".as_ref(),
        "127.0.0.1".as_ref(),
        "--port".as_ref(),
        port.as_ref(),
        "--known-hosts".as_ref(),
        kh.as_os_str(),
        "--host".as_ref(),
        "h".as_ref(),
        "--create".as_ref(),
        src.as_os_str(),
    ];
    let r = run("tardis", &args);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("--password"), "{}", stderr(&r));

    let r = backup(&d, "h", "pw", &kh, &["--create", "--name", "one"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let before = listing(&d.db.join("h/segments"));

    // A wrong password.
    let r = backup(&d, "h", "nope", &kh, &[], &src);
    assert_eq!(r.status.code(), Some(1));
    assert_eq!(stderr(&r).trim(), "tardis: wrong password for host h");
    // Another host's password does not open this one.
    let r = backup(&d, "other", "pw2", &kh, &["--create"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = backup(&d, "h", "pw2", &kh, &[], &src);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("wrong password"), "{}", stderr(&r));
    assert_eq!(listing(&d.db.join("h/segments")), before, "failed logins wrote nothing");

    // A server whose certificate changed is refused, naming the file to edit.
    let pinned = fs::read_to_string(&kh).unwrap();
    let fake = format!("127.0.0.1:{} sha256:{}\n", d.port, "ab".repeat(32));
    fs::write(&kh, &fake).unwrap();
    let r = backup(&d, "h", "pw", &kh, &[], &src);
    assert_eq!(r.status.code(), Some(1));
    let e = stderr(&r);
    assert!(e.contains("certificate") && e.contains("changed") && e.contains(&kh.display().to_string()), "{e}");
    assert_eq!(listing(&d.db.join("h/segments")), before);
    fs::write(&kh, pinned).unwrap();

    // A daemon stopped with SIGTERM exits 0.
    assert!(d.stop().success(), "{}", d.log());
}

fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
        .collect();
    v.sort();
    v
}

#[test]
fn one_backup_per_host_and_a_dead_clients_claim_expires() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(4_000_000, 2)).unwrap();
    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes\nSessionTimeout = 3");
    let r = backup(&d, "h", "pw", &kh, &["--create"], &src);
    assert!(r.status.success(), "{}", stderr(&r));

    // A client that opens a set and then stops answering (SIGSTOP), like a machine that
    // dropped off the network; later it is killed without a goodbye to the server.
    let big = work.path().join("big");
    fs::create_dir_all(&big).unwrap();
    for i in 0..48 {
        fs::write(big.join(format!("f{i:02}")), noise(2_000_000, 200 + i)).unwrap();
    }
    let mut args = d.client_args("h", "pw", &kh);
    args.extend(["--name".into(), "stuck".into(), big.display().to_string()]);
    let mut stuck =
        Command::new(bin("tardis")).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log().contains("name=\"stuck\"") {
        assert!(Instant::now() < deadline, "the stuck backup never opened its set:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    let stuck_pid = nix::unistd::Pid::from_raw(stuck.id() as i32);
    nix::sys::signal::kill(stuck_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    assert!(!d.log().contains("set completed host=h set=2"), "the stuck backup finished before it was stopped");
    // While it runs, a second backup of the same host is refused, naming the running one.
    let r = backup(&d, "h", "pw", &kh, &[], &src);
    assert_eq!(r.status.code(), Some(1));
    let e = stderr(&r);
    assert!(e.contains("being backed up by tardis") && e.contains(&format!("pid {}", stuck.id())), "{e}");
    // A second host is not affected.
    let r = backup(&d, "h2", "pw", &kh, &["--create"], &src);
    assert!(r.status.success(), "{}", stderr(&r));

    stuck.kill().unwrap();
    stuck.wait().unwrap();
    // Its claim expires by itself once the server notices the connection is gone (idle
    // timeout) and SessionTimeout has passed; no manual unlock.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = backup(&d, "h", "pw", &kh, &["--name", "after"], &src);
        if r.status.success() {
            break;
        }
        assert!(stderr(&r).contains("being backed up"), "{}", stderr(&r));
        assert!(Instant::now() < deadline, "the dead client's claim never expired: {}", stderr(&r));
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[test]
fn a_server_restart_mid_backup_is_resumed() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    for i in 0..48 {
        fs::write(src.join(format!("f{i:02}")), noise(2_000_000, 100 + i)).unwrap();
    }
    let mut d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes");
    let mut args = d.client_args("h", "pw", &kh);
    args.extend(["--create".into(), "--json".into(), src.display().to_string()]);
    let client = Command::new(bin("tardis")).args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.log().contains("set opened") {
        assert!(Instant::now() < deadline, "the backup never started:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.stop().success(), "SIGTERM stops the daemon cleanly:\n{}", d.log());
    std::thread::sleep(Duration::from_secs(2));
    d.restart();
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "the backup survived the restart: {}", stderr(&out));
    let err = stderr(&out);
    let log = d.log();
    assert!(err.contains("reconnecting"), "the restart happened mid-backup and the client reconnected:\n{err}\n{log}");
    let out_dir = work.path().join("out");
    let r = tool("regenerate", &d, "h", "pw", &kh, &["-o".as_ref(), out_dir.as_os_str(), src.as_os_str()]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_same(&manifest(&src), &manifest(&out_dir), "after a server restart");
    // One set: the resumed run completed the set it opened.
    let sets = tool("tardis-tools", &d, "h", "pw", &kh, &["sets".as_ref(), "--json".as_ref()]);
    assert_eq!(String::from_utf8_lossy(&sets.stdout).lines().count(), 1, "{}", String::from_utf8_lossy(&sets.stdout));
}

#[test]
fn daemon_detaches_with_a_pidfile_and_stops_on_sigterm() {
    let work = tempfile::tempdir().unwrap();
    let port = tardis_tests::server::free_port();
    let pidfile = work.path().join("run/tardisd.pid");
    let cfg = work.path().join("tardisd.cfg");
    fs::write(&cfg, format!("BaseDir = {}\nPort = {port}\nListen = 127.0.0.1\n", work.path().join("srv").display()))
        .unwrap();
    let started = Instant::now();
    let r = Command::new(bin("tardisd")).arg("--config").arg(&cfg).arg("--pidfile").arg(&pidfile).output().unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    let pid: i32 = fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    // Whatever happens below, the background daemon does not outlive the test.
    struct Reaper(i32);
    impl Drop for Reaper {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), nix::sys::signal::Signal::SIGKILL);
        }
    }
    let _reaper = Reaper(pid);
    let alive = |p: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok();
    assert!(alive(pid));
    // A second daemon with the same pidfile is refused.
    let r2 = Command::new(bin("tardisd")).arg("--config").arg(&cfg).arg("--pidfile").arg(&pidfile).output().unwrap();
    assert!(!r2.status.success());
    assert!(stderr(&r2).contains("already running"), "{}", stderr(&r2));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM).unwrap();
    while alive(pid) {
        assert!(started.elapsed() < Duration::from_secs(60), "tardisd did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pidfile.exists(), "the pidfile is removed on a clean stop");
    let log = fs::read_to_string(work.path().join("srv/.tardisd/tardisd.log")).unwrap();
    assert!(log.contains("listening") && log.contains("stopped"), "{log}");
}

#[test]
fn a_bad_configuration_file_names_the_line() {
    let work = tempfile::tempdir().unwrap();
    let cfg = work.path().join("bad.cfg");
    fs::write(&cfg, "BaseDir = /tmp/x\nPotr = 7430\n").unwrap();
    let r = Command::new(bin("tardisd")).arg("--config").arg(&cfg).arg("--foreground").output().unwrap();
    assert_eq!(r.status.code(), Some(2));
    let e = stderr(&r);
    assert!(e.contains("bad.cfg:2") && e.contains("Potr") && e.contains("Port"), "{e}");
}

/// A raw QUIC connection to the daemon, trusting whatever certificate it offers (pinned in a
/// scratch file), for sending what the real client never sends.
fn raw_connect(rt: &tokio::runtime::Runtime, d: &Daemon, kh: &Path) -> quinn::Connection {
    use std::sync::Arc;
    use tardis_net::tls::{client_config, Trust};
    rt.block_on(async {
        let (tls, _) = client_config(&Trust::KnownHosts(kh.to_owned()), "ignored").unwrap();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        ep.connect(format!("127.0.0.1:{}", d.port).parse().unwrap(), "localhost").unwrap().await.unwrap()
    })
}

/// Sends raw bytes on a new stream and reads the answer frame, if any.
fn raw_exchange(
    rt: &tokio::runtime::Runtime,
    conn: &quinn::Connection,
    bytes: &[u8],
) -> Option<tardis_net::proto::Response> {
    rt.block_on(async {
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(bytes).await.ok()?;
        let _ = send.finish();
        tardis_net::transport::read_frame(&mut recv, tardis_net::proto::MAX_FRAME).await.ok().flatten()
    })
}

#[test]
fn hostile_clients_get_errors_and_the_daemon_keeps_serving() {
    use tardis_net::proto::{encode, ErrorCode, Request, Response, PROTOCOL_MAX, PROTOCOL_MIN};
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(300_000, 3)).unwrap();
    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes");
    let r = backup(&d, "h", "pw", &kh, &["--create", "--name", "one"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let before = listing(&d.db.join("h/segments"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let scratch = work.path().join("raw_known_hosts");

    // A client of an incompatible protocol version.
    let conn = raw_connect(&rt, &d, &scratch);
    let hello = Request::Hello { min: 900, max: 901, software: "tardis 9.0".into() };
    match raw_exchange(&rt, &conn, &encode(&hello)) {
        Some(Response::Error { code: ErrorCode::Version, message }) => {
            assert!(message.contains("900-901") && message.contains("upgrade"), "{message}")
        }
        other => panic!("expected a version refusal, got {other:?}"),
    }

    // Requests before login.
    let conn = raw_connect(&rt, &d, &scratch);
    let hello = Request::Hello { min: PROTOCOL_MIN, max: PROTOCOL_MAX, software: "raw".into() };
    assert!(matches!(raw_exchange(&rt, &conn, &encode(&hello)), Some(Response::Welcome { .. })));
    match raw_exchange(&rt, &conn, &encode(&Request::Sets)) {
        Some(Response::Error { code: ErrorCode::Protocol, message }) => {
            assert!(message.contains("log in"), "{message}")
        }
        other => panic!("expected a protocol refusal, got {other:?}"),
    }
    // A replayed login: a proof made for another TLS session does not verify in this one.
    let login = Request::Login {
        host: "h".into(),
        client: tardis_net::proto::ClientInfo { software: "raw".into(), machine: "m".into(), pid: 1 },
        session: [0; 16],
        proof: serde_bytes::ByteBuf::from(vec![7u8; 64]),
    };
    match raw_exchange(&rt, &conn, &encode(&login)) {
        Some(Response::Error { code: ErrorCode::Auth, .. }) => {}
        other => panic!("expected an auth refusal, got {other:?}"),
    }

    // Oversized, truncated and garbage frames.
    let conn = raw_connect(&rt, &d, &scratch);
    let huge = (u32::MAX).to_be_bytes();
    match raw_exchange(&rt, &conn, &huge) {
        Some(Response::Error { code: ErrorCode::Protocol, message }) => assert!(message.contains("limit"), "{message}"),
        other => panic!("expected a size refusal, got {other:?}"),
    }
    for garbage in [&b"\x00\x00\x00\x10garbage"[..], b"\x00\x00\x00\x03\xc1\xc1\xc1", b"\x00\x00"] {
        let conn = raw_connect(&rt, &d, &scratch);
        let r = raw_exchange(&rt, &conn, garbage);
        assert!(matches!(r, None | Some(Response::Error { code: ErrorCode::Protocol, .. })), "{r:?}");
    }

    // Random datagrams on the port: not QUIC, dropped.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..2000u64 {
        let len = 1 + (i * 7919 % 1400) as usize;
        let _ = sock.send_to(&noise(len, i), ("127.0.0.1", d.port));
    }

    // After all that, the repository is unchanged and a real backup still works.
    assert_eq!(listing(&d.db.join("h/segments")), before);
    let r = backup(&d, "h", "pw", &kh, &["--name", "two"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
}

#[test]
fn the_sysv_init_script_starts_reports_and_stops_the_daemon() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(10_000, 4)).unwrap();
    let port = tardis_tests::server::free_port();
    let cfg = work.path().join("tardisd.cfg");
    let srv = work.path().join("srv");
    fs::write(&cfg, format!("BaseDir = {}\nPort = {port}\nListen = 127.0.0.1\nAllowNewHosts = yes\n", srv.display()))
        .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../init/tardisd");
    let pidfile = work.path().join("tardisd.pid");
    let init = |action: &str| {
        Command::new("sh")
            .arg(&script)
            .arg(action)
            .env("TARDISD", bin("tardisd"))
            .env("PIDFILE", &pidfile)
            .env("TARDIS_DAEMON_CONFIG", &cfg)
            .output()
            .unwrap()
    };
    let r = init("start");
    assert!(r.status.success(), "start: {}", stderr(&r));
    let r = init("status");
    assert!(r.status.success() && String::from_utf8_lossy(&r.stdout).contains("is running"));
    let args = tardis_tests::server::client_args("127.0.0.1", port, "h", "pw", &kh);
    let r = Command::new(bin("tardis")).args(&args).arg("--create").arg(&src).output().unwrap();
    assert!(r.status.success(), "a backup to the daemon the script started: {}", stderr(&r));
    let r = init("stop");
    assert!(r.status.success(), "stop: {}", stderr(&r));
    assert_eq!(init("status").status.code(), Some(3), "status after stop");
    assert!(!pidfile.exists());
}

#[test]
fn configuration_locks_and_purge_over_the_network() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes");
    for (i, name) in ["one", "two", "three"].iter().enumerate() {
        fs::write(src.join("f"), noise(50_000, 10 + i as u64)).unwrap();
        let r = backup(&d, "h", "pw", &kh, &["--create", "--name", name], &src);
        assert!(r.status.success(), "{}", stderr(&r));
    }
    let tools = |args: &[&str]| {
        let a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        tool("tardis-tools", &d, "h", "pw", &kh, &a)
    };
    // Per-host configuration lives in the repository on the server.
    let r = tools(&["config", "DailyKeep", "45d"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = tools(&["config", "DailyKeep"]);
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "45d");
    let r = tools(&["config", "DailyKept", "1d"]);
    assert!(!r.status.success() && stderr(&r).contains("DailyKeep"), "{}", stderr(&r));
    // A locked set survives a purge aimed at it; an unlocked one goes.
    assert!(tools(&["lock", "one"]).status.success());
    let r = tools(&["purge", "--set", "one"]);
    assert!(!r.status.success() && stderr(&r).contains("locked"), "{}", stderr(&r));
    let r = tools(&["purge", "--set", "two"]);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = tools(&["sets", "--json"]);
    let names: Vec<String> = String::from_utf8_lossy(&r.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["one", "three"]);
    // Another host cannot see any of it.
    let r = backup(&d, "other", "pw2", &kh, &["--create"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = tool("tardis-tools", &d, "other", "pw2", &kh, &["config".as_ref(), "DailyKeep".as_ref()]);
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "30d", "{}", stderr(&r));
    let r = tool("tardis-tools", &d, "other", "pw2", &kh, &["purge".as_ref(), "--set".as_ref(), "three".as_ref()]);
    assert!(!r.status.success(), "host other cannot purge host h's set three");
}

#[test]
fn a_daemon_low_on_space_purges_the_oldest_lowest_priority_sets() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh, srv) = (work.path().join("src"), work.path().join("known_hosts"), work.path().join("srv"));
    fs::create_dir_all(&src).unwrap();
    fs::create_dir_all(&srv).unwrap();
    // A small file system of its own, so "low on space" is real.
    let st =
        Command::new("mount").args(["-t", "tmpfs", "-o", "size=48m", "tardis-space", srv.to_str().unwrap()]).status();
    assert!(st.is_ok_and(|s| s.success()), "mounting a tmpfs (the tests run as root)");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&srv);
    let d = Daemon::start(
        &srv.join("db"),
        "AllowNewHosts = yes\nMinFreeSpace = 20M\nSpaceCheckInterval = 1\nCompactInterval = 0",
    );
    fs::write(src.join("small"), noise(100_000, 1)).unwrap();
    let r = backup(&d, "b", "pw", &kh, &["--create", "--name", "only"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let free = || nix::sys::statvfs::statvfs(&srv).map(|s| s.blocks_available() * s.fragment_size()).unwrap();
    // The daemon checks every second; a loaded machine may need longer to purge and compact.
    let back_above_floor = || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while free() < 20 << 20 {
            assert!(
                Instant::now() < deadline,
                "free space never got back above the floor: {} bytes\n{}",
                free(),
                d.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    for i in 1..=4u64 {
        // Hourly backups, not back to back: each one starts with the floor restored.
        back_above_floor();
        fs::write(src.join("big"), noise(8_000_000, 100 + i)).unwrap();
        let name = format!("s{i}");
        let extra: Vec<&str> = if i == 1 { vec!["--create"] } else { vec![] };
        let mut args = extra;
        args.extend(["--name", &name, "--priority", "10"]);
        let r = backup(&d, "a", "pw", &kh, &args, &src);
        assert!(r.status.success(), "backup {name}: {}", stderr(&r));
    }
    back_above_floor();
    let log = d.log();
    assert!(log.contains("disk low: purged set"), "{log}");
    let names = |host: &str, pw: &str| -> Vec<String> {
        let r = tool("tardis-tools", &d, host, pw, &kh, &["sets".as_ref(), "--json".as_ref()]);
        String::from_utf8_lossy(&r.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let a = names("a", "pw");
    assert!(a.len() < 4 && a.last().map(String::as_str) == Some("s4"), "oldest purged first, the latest kept: {a:?}");
    assert!(a.iter().all(|n| ["s2", "s3", "s4"].contains(&n.as_str())), "{a:?}");
    assert_eq!(names("b", "pw"), ["only"], "a host's only set is never purged");
    let out = work.path().join("out");
    let r = tool("regenerate", &d, "a", "pw", &kh, &["-o".as_ref(), out.as_os_str(), src.as_os_str()]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_same(&manifest(&src), &manifest(&out), "the latest set after purging for space");
}

/// Whether `needle` occurs in any file below `dir`.
fn found_below(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().map(|e| e.unwrap()) {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else if fs::read(&p).unwrap().windows(needle.len()).any(|w| w == needle) {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

#[test]
fn the_server_never_holds_names_contents_or_the_password() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    let name = "Quarterly-Report-Zebra-7731.txt";
    let marker = b"PLAINTEXT-MARKER-5d41402abc4b2a76";
    let password = "correct-horse-battery-staple-42";
    fs::create_dir_all(src.join("Private-Folder-Okapi")).unwrap();
    // Incompressible bytes around the marker, so that compression alone cannot hide it.
    let mut content = noise(200_000, 77);
    content[100_000..100_000 + marker.len()].copy_from_slice(marker);
    fs::write(src.join("Private-Folder-Okapi").join(name), &content).unwrap();

    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes\nLogLevel = trace");
    let r = backup(&d, "h", password, &kh, &["--create"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let out = work.path().join("out");
    let r = tool("regenerate", &d, "h", password, &kh, &["-o".as_ref(), out.as_os_str(), src.as_os_str()]);
    assert!(r.status.success(), "{}", stderr(&r));
    // Everything the server keeps: repositories, index, certificate, and its log.
    let mut server_side = found_below(&d.db, marker);
    for needle in [name.as_bytes(), b"Private-Folder-Okapi", password.as_bytes()] {
        server_side.extend(found_below(&d.db, needle));
        assert!(!d.log().as_bytes().windows(needle.len()).any(|w| w == needle), "the daemon's log holds a secret");
    }
    assert!(server_side.is_empty(), "plaintext on the server: {server_side:?}");

    // The same search does find them in an unencrypted repository: it is not blind.
    let plain_db = work.path().join("plain");
    let args: Vec<&OsStr> = vec![
        "--local".as_ref(),
        "--db".as_ref(),
        plain_db.as_os_str(),
        "--host".as_ref(),
        "p".as_ref(),
        src.as_os_str(),
    ];
    let r = run("tardis", &args);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(!found_below(&plain_db, marker).is_empty() && !found_below(&plain_db, name.as_bytes()).is_empty());
}

fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_flood_of_connections_is_refused_beyond_the_limit_and_memory_stays_bounded() {
    use std::sync::Arc;
    use tardis_net::tls::{client_config, Trust};
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(1_000_000, 5)).unwrap();
    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes\nMaxConnections = 8");
    let r = backup(&d, "h", "pw", &kh, &["--create"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let before = rss_kib(d.pid());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let scratch = work.path().join("raw_known_hosts");
    let (tls, _) = client_config(&Trust::KnownHosts(scratch), "ignored").unwrap();
    let quic = Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap());
    let (held, refused) = rt.block_on(async {
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(quic));
        let addr = format!("127.0.0.1:{}", d.port).parse().unwrap();
        let (mut held, mut refused) = (Vec::new(), 0);
        for _ in 0..64 {
            match tokio::time::timeout(Duration::from_secs(5), ep.connect(addr, "localhost").unwrap()).await {
                Ok(Ok(c)) => held.push(c),
                _ => refused += 1,
            }
        }
        (held, refused)
    });
    assert!(held.len() <= 8 && refused >= 56, "{} connections held, {refused} refused", held.len());
    // While the slots are taken, a real client is turned away too; once they go, it gets in.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = backup(&d, "h", "pw", &kh, &[], &src);
        if r.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "the daemon never served again: {}", stderr(&r));
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = rss_kib(d.pid());
    eprintln!("daemon RSS: {before} KiB before the flood, {after} KiB after");
    assert!(after < before + 64 * 1024, "the flood grew the daemon by {} KiB", after - before);
}

/// Connections that send megabytes before saying hello: the server grants a connection that
/// has not logged in a 256 KiB window, so a flood of them parks little memory in its buffers.
#[test]
fn a_flood_of_connections_sending_data_before_login_parks_little_memory() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(500_000, 6)).unwrap();
    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes\nMaxConnections = 64");
    let r = backup(&d, "h", "pw", &kh, &["--create"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let before = rss_kib(d.pid());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let scratch = work.path().join("raw_known_hosts");
    let conns: Vec<quinn::Connection> = (0..60).map(|_| raw_connect(&rt, &d, &scratch)).collect();
    // On each: a hello that never finishes, and three streams of 1 MiB the server never reads.
    let writers: Vec<_> = conns
        .iter()
        .flat_map(|c| {
            let rt = &rt;
            (0..4).map(move |i| {
                let c = c.clone();
                rt.spawn(async move {
                    let (mut send, _recv) = c.open_bi().await?;
                    let bytes = if i == 0 { 60_000u32.to_be_bytes().to_vec() } else { noise(1 << 20, i) };
                    send.write_all(&bytes).await?;
                    std::future::pending::<()>().await;
                    Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
                })
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let during = rss_kib(d.pid());
    eprintln!("daemon RSS: {before} KiB before, {during} KiB with 60 connections pushing 3 MiB each before login");
    assert!(during < before + 48 * 1024, "the flood parked {} KiB in the daemon", during - before);
    for w in writers {
        w.abort();
    }
    drop(conns);
    let r = backup(&d, "h", "pw", &kh, &[], &src);
    assert!(r.status.success(), "the daemon serves again: {}", stderr(&r));
}

/// Logs in as `host` on a raw connection, the way the client does.
fn raw_login(rt: &tokio::runtime::Runtime, d: &Daemon, kh: &Path, host: &str, pw: &str) -> quinn::Connection {
    use tardis_net::proto::{encode, ClientInfo, Request, Response, PROTOCOL_MAX, PROTOCOL_MIN};
    let conn = raw_connect(rt, d, kh);
    let hello = Request::Hello { min: PROTOCOL_MIN, max: PROTOCOL_MAX, software: "raw".into() };
    assert!(matches!(raw_exchange(rt, &conn, &encode(&hello)), Some(Response::Welcome { .. })));
    let header = match raw_exchange(rt, &conn, &encode(&Request::KeyHeader { host: host.into() })) {
        Some(Response::KeyHeader { header: Some(h) }) => h.into_vec(),
        other => panic!("expected the key header, got {other:?}"),
    };
    let secrets = tardis_core::keywrap::KdfHeader::from_bytes(&header).unwrap().derive(pw.as_bytes()).unwrap();
    let key = tardis_core::login::LoginKey::from_secrets(&secrets).unwrap();
    let binding = tardis_net::transport::binding(&conn).unwrap();
    let login = Request::Login {
        host: host.into(),
        client: ClientInfo { software: "raw".into(), machine: "m".into(), pid: 1 },
        session: [9; 16],
        proof: serde_bytes::ByteBuf::from(key.prove(host, &binding).to_vec()),
    };
    assert!(matches!(raw_exchange(rt, &conn, &encode(&login)), Some(Response::LoggedIn { .. })));
    conn
}

/// A logged-in client of host `h` that floods maximal requests from several connections and
/// stalls their bodies holds at most its host's share of the request budget: another host backs
/// up meanwhile, and the daemon's memory stays within the budget.
#[test]
fn a_hostile_logged_in_client_with_stalled_large_requests_starves_no_other_host() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(3_000_000, 7)).unwrap();
    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes");
    for host in ["h", "h2"] {
        let r = backup(&d, host, "pw", &kh, &["--create"], &src);
        assert!(r.status.success(), "{}", stderr(&r));
    }
    let before = rss_kib(d.pid());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let scratch = work.path().join("raw_known_hosts");
    let conns: Vec<quinn::Connection> = (0..4).map(|_| raw_login(&rt, &d, &scratch, "h", "pw")).collect();
    // 4 connections x 8 streams, each announcing a maximal frame and sending all but its end.
    let max = tardis_net::proto::MAX_FRAME;
    let writers: Vec<_> = conns
        .iter()
        .flat_map(|c| {
            let rt = &rt;
            (0..8).map(move |i| {
                let c = c.clone();
                rt.spawn(async move {
                    let (mut send, _recv) = c.open_bi().await?;
                    send.write_all(&(max as u32).to_be_bytes()).await?;
                    send.write_all(&noise(max - 1024, i)).await?;
                    std::future::pending::<()>().await;
                    Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
                })
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    // Another host's backup goes through while h's requests hold their share.
    fs::write(src.join("g"), noise(3_000_000, 8)).unwrap();
    let mut child = Command::new(bin("tardis"))
        .args(d.client_args("h2", "pw", &kh))
        .arg(&src)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("host h2's backup was starved by host h's stalled requests");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "h2's backup failed");
    let during = rss_kib(d.pid());
    eprintln!("daemon RSS: {before} KiB before, {during} KiB with 32 stalled 8 MiB requests and another host's backup");
    assert!(during < before + 160 * 1024, "the daemon grew by {} KiB", during - before);
    for w in writers {
        w.abort();
    }
}

#[test]
fn a_ca_signed_server_is_trusted_with_ca_and_two_hosts_back_up_at_once() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let work = tempfile::tempdir().unwrap();
    let tls = work.path().join("tls");
    fs::create_dir_all(&tls).unwrap();
    // A private CA and a server certificate it issued for the address clients use.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "Tardis test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&server_key, &issuer).unwrap();
    fs::write(tls.join("ca.pem"), ca_cert.pem()).unwrap();
    fs::write(tls.join("cert.pem"), server_cert.pem()).unwrap();
    fs::write(tls.join("key.pem"), server_key.serialize_pem()).unwrap();
    // Another CA, which did not issue the server's certificate.
    let other_key = KeyPair::generate().unwrap();
    let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    fs::write(tls.join("other-ca.pem"), other.self_signed(&other_key).unwrap().pem()).unwrap();

    let config = format!(
        "AllowNewHosts = yes\nCertFile = {}\nKeyFile = {}",
        tls.join("cert.pem").display(),
        tls.join("key.pem").display()
    );
    let d = Daemon::start(&work.path().join("srv"), &config);
    let client = |host: &str, ca: &str, src: &Path| {
        Command::new(bin("tardis"))
            .args(["--server", "127.0.0.1", "--port", &d.port.to_string(), "--host", host, "--password", "pw"])
            .arg("--ca")
            .arg(tls.join(ca))
            .args(["--create", "--json"])
            .arg(src)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let trees: Vec<_> = ["a", "b"]
        .iter()
        .map(|h| {
            let src = work.path().join(format!("src-{h}"));
            fs::create_dir_all(&src).unwrap();
            for i in 0..6u64 {
                fs::write(src.join(format!("f{i}")), noise(1_500_000, i + if *h == "a" { 0 } else { 100 })).unwrap();
            }
            src
        })
        .collect();
    // Two hosts at once, both trusting the server through the CA (nothing is pinned).
    let running: Vec<_> =
        [("a", &trees[0]), ("b", &trees[1])].iter().map(|(h, src)| client(h, "ca.pem", src)).collect();
    for c in running {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    for (h, src) in [("a", &trees[0]), ("b", &trees[1])] {
        let out = work.path().join(format!("out-{h}"));
        let r = Command::new(bin("regenerate"))
            .args(["--server", "127.0.0.1", "--port", &d.port.to_string(), "--host", h, "--password", "pw"])
            .arg("--ca")
            .arg(tls.join("ca.pem"))
            .arg("-o")
            .arg(&out)
            .arg(src)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", stderr(&r));
        assert_same(&manifest(src), &manifest(&out), &format!("host {h}, backed up alongside the other"));
    }
    // A CA that did not issue the certificate is not trusted.
    let r = client("a", "other-ca.pem", &trees[0]).wait_with_output().unwrap();
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("certificate"), "{}", stderr(&r));
}

#[test]
fn a_password_changed_over_the_network_holds_across_a_restart() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(300_000, 3)).unwrap();
    let mut d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes");
    let r = backup(&d, "h", "old", &kh, &["--create", "--name", "first"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = backup(&d, "other", "theirs", &kh, &["--create"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let m1 = manifest(&src);
    let keys = |host: &str, pw: &str, new: &str| {
        tool("tardis-tools", &d, host, pw, kh.as_path(), &["keys".as_ref(), "--new-password".as_ref(), new.as_ref()])
    };

    // Another host's password does not log in as h, so it cannot change h's.
    let r = keys("h", "theirs", "mine");
    assert!(!r.status.success() && stderr(&r).contains("wrong password"), "{}", stderr(&r));
    let r = keys("h", "old", "new");
    assert!(r.status.success(), "{}", stderr(&r));

    d.stop();
    d.restart();
    let r = backup(&d, "h", "old", &kh, &[], &src);
    assert!(!r.status.success() && stderr(&r).contains("wrong password for host h"), "{}", stderr(&r));
    let r = backup(&d, "h", "new", &kh, &["--name", "second"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let s: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(s["files_read"].as_u64(), Some(0), "the same key: nothing to read again: {s}");
    let out = work.path().join("out");
    regenerate(&d, "h", "new", &kh, "first", &src, &out);
    assert_same(&m1, &manifest(&out), "first set under the new password");
    // The other host is untouched.
    let r = tool("tardis-tools", &d, "other", "theirs", &kh, &["sets".as_ref()]);
    assert!(r.status.success(), "{}", stderr(&r));
}

#[test]
fn verify_runs_on_the_server_while_the_daemon_serves_other_hosts() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(300_000, 5)).unwrap();
    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes\nHostIdleTimeout = 1");
    for host in ["h", "other"] {
        let r = backup(&d, host, "pw", &kh, &["--create"], &src);
        assert!(r.status.success(), "{}", stderr(&r));
    }
    let on_server = |args: &[&str]| on_server(&d, "h", "pw", args);
    // The daemon lets go of a host it has not used for HostIdleTimeout.
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.log().matches("closed idle repository").count() < 2 {
        assert!(Instant::now() < deadline, "the daemon never closed the idle hosts:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let v = on_server(&["verify", "--read-data"]);
    assert!(v.status.success(), "verify beside a running daemon: {}", stderr(&v));
    // The daemon opens it again for the next client, and meanwhile served the other host.
    fs::write(src.join("g"), noise(10_000, 6)).unwrap();
    let r = backup(&d, "h", "pw", &kh, &["--name", "after"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = tool("tardis-tools", &d, "other", "pw", &kh, &["sets".as_ref()]);
    assert!(r.status.success(), "{}", stderr(&r));
    // While a run holds the host, it stays open however long the run is silent, and a program
    // on the server is refused with a clear message; the run then finishes.
    fs::write(src.join("big"), noise(48 << 20, 7)).unwrap();
    let client = start_run(&d, &kh, "paused", &src);
    let pid = nix::unistd::Pid::from_raw(client.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let busy = on_server(&["sets"]);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let out = client.wait_with_output().unwrap();
    assert!(!busy.status.success(), "the repository of a host in use opened beside the daemon");
    assert!(stderr(&busy).contains("locked by another process"), "{}", stderr(&busy));
    assert!(out.status.success(), "the paused run finishes: {}", stderr(&out));
}

#[test]
fn the_daemon_applies_each_hosts_retention_schedule_by_its_own_clock() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    let mut d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes\nPurgeInterval = 1");
    let day = 24 * 3600;
    d.restart_at(tardis_tests::MARCH_1);
    // Priority 0 goes after a day by the default schedule; above 40, never.
    for (i, (name, priority)) in [("a", "0"), ("b", "0"), ("c", "0"), ("monthly", "60"), ("d", "0")].iter().enumerate()
    {
        fs::write(src.join("f"), noise(20_000, i as u64)).unwrap();
        let create: &[&str] = if i == 0 { &["--create"] } else { &[] };
        let mut args = create.to_vec();
        args.extend(["--name", name, "--priority", priority]);
        let r = backup(&d, "h", "pw", &kh, &args, &src);
        assert!(r.status.success(), "{}", stderr(&r));
    }
    let tools = |d: &Daemon, args: &[&str]| {
        let a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        tool("tardis-tools", d, "h", "pw", &kh, &a)
    };
    assert!(tools(&d, &["lock", "b"]).status.success());
    let names = |d: &Daemon| -> Vec<String> {
        let r = tools(d, &["sets", "--json"]);
        String::from_utf8_lossy(&r.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["name"].as_str().unwrap().to_owned())
            .collect()
    };
    // Half a day later nothing is due.
    d.restart_at(tardis_tests::MARCH_1 + day / 2);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(names(&d), ["a", "b", "c", "monthly", "d"]);
    // Two days later the daemon purges what is due by its clock, whatever the clients' clocks
    // say: never the locked set, the latest one or one of priority above 40.
    d.restart_at(tardis_tests::MARCH_1 + 2 * day);
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.log().matches("purged set by the retention schedule").count() < 2 {
        assert!(Instant::now() < deadline, "nothing was purged:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(names(&d), ["b", "monthly", "d"]);
}

#[test]
fn a_client_whose_clock_is_days_ahead_does_not_purge() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes");
    for (i, name) in ["a", "b"].iter().enumerate() {
        fs::write(src.join("f"), noise(20_000, i as u64)).unwrap();
        let create: &[&str] = if i == 0 { &["--create"] } else { &[] };
        let mut args = create.to_vec();
        args.extend(["--name", name]);
        let r = backup(&d, "h", "pw", &kh, &args, &src);
        assert!(r.status.success(), "{}", stderr(&r));
    }
    let real_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let purge_at = |now: Option<u64>, name: &str| {
        let mut c = Command::new(bin("tardis"));
        c.args(d.client_args("h", "pw", &kh)).args(["--name", name, "--purge"]).arg(&src);
        match now {
            Some(t) => c.env("TARDIS_NOW", t.to_string()),
            None => c.env_remove("TARDIS_NOW"),
        };
        c.output().unwrap()
    };
    // Two days ahead, set a (priority 0, kept a day) would look due: the purge is skipped, the
    // backup itself is kept, and the run ends with a warning (exit 3).
    let r = purge_at(Some(real_now + 2 * 86_400), "c");
    assert_eq!(r.status.code(), Some(3), "{}", stderr(&r));
    assert!(
        stderr(&r).contains("purge skipped: this machine's clock is 2 days ahead of the repository's"),
        "{}",
        stderr(&r)
    );
    let r = tool("tardis-tools", &d, "h", "pw", &kh, &["sets".as_ref(), "--json".as_ref()]);
    let listed: Vec<String> = String::from_utf8_lossy(&r.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, ["a", "b", "c"]);
    // With the clock right, the purge runs (nothing is due yet).
    let r = purge_at(None, "d");
    assert!(r.status.success(), "{}", stderr(&r));
}

#[test]
fn a_server_creates_only_the_hosts_it_lists() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), "data").unwrap();
    let d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = web1, db1");
    let r = backup(&d, "web1", "pw", &kh, &["--create"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = backup(&d, "intruder", "pw", &kh, &["--create"], &src);
    assert_eq!(r.status.code(), Some(1));
    assert!(
        stderr(&r).contains(
            "this server creates only the hosts named in AllowNewHosts, and host intruder is not one of them"
        ),
        "{}",
        stderr(&r)
    );
    assert!(!d.db.join("intruder").exists(), "nothing is created for a refused host");
    let r = backup(&d, "web1", "pw", &kh, &[], &src);
    assert!(r.status.success(), "a listed host backs up as usual: {}", stderr(&r));
}

#[test]
fn a_client_paused_past_its_claim_while_the_daemon_compacts_loses_nothing() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    let mut d = Daemon::start(
        &work.path().join("srv"),
        "AllowNewHosts = yes\nSessionTimeout = 1\nCompactInterval = 1\nCompactThreshold = 1",
    );
    // Set old holds a file that base replaced; the paused run brings old's content back, so the
    // chunks it finds stored are those of a set purged while it is paused.
    for (i, name) in ["old", "base"].iter().enumerate() {
        fs::write(src.join("f"), noise(2 << 20, i as u64)).unwrap();
        let create: &[&str] = if i == 0 { &["--create"] } else { &[] };
        let mut args = create.to_vec();
        args.extend(["--name", name]);
        let r = backup(&d, "h", "pw", &kh, &args, &src);
        assert!(r.status.success(), "{}", stderr(&r));
    }
    fs::write(src.join("f"), noise(2 << 20, 0)).unwrap();
    fs::write(src.join("g"), noise(48 << 20, 9)).unwrap();
    let want = manifest(&src);
    let client = start_run(&d, &kh, "paused", &src);
    // Paused past its claim (1 s) and past the connection's idle timeout (20 s), while old is
    // purged and the daemon compacts every second: the open set keeps every chunk, so the run
    // either finishes with all its chunks stored or is refused; it must not lose data.
    let pid = nix::unistd::Pid::from_raw(client.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let r = tool("tardis-tools", &d, "h", "pw", &kh, &["purge".as_ref(), "--set".as_ref(), "old".as_ref()]);
    assert!(r.status.success(), "{}", stderr(&r));
    std::thread::sleep(Duration::from_secs(25));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let out = client.wait_with_output().unwrap();
    assert!(out.status.success(), "the paused run finishes: {}", stderr(&out));

    assert!(d.stop().success());
    let on_server = |args: &[&str]| on_server(&d, "h", "pw", args);
    let v = on_server(&["verify", "--read-data"]);
    assert!(v.status.success(), "{}{}", String::from_utf8_lossy(&v.stdout), stderr(&v));
    let restored = work.path().join("out");
    let r = on_server(&["regenerate", "--set", "paused", "-o", restored.to_str().unwrap(), src.to_str().unwrap()]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_same(&want, &manifest(&restored), "the set of the paused run");
}

#[test]
fn an_append_only_hosts_client_cannot_delete_but_the_server_can() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), noise(100_000, 1)).unwrap();
    let mut d = Daemon::start(&work.path().join("srv"), "AllowNewHosts = yes\nAppendOnly = web1");
    // The first sets are stamped three days ago, so the retention schedule has some due.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    d.restart_at(now - 3 * 86_400);
    for (i, name) in ["one", "two", "three"].iter().enumerate() {
        let create: &[&str] = if i == 0 { &["--create"] } else { &[] };
        let mut args = create.to_vec();
        args.extend(["--name", name]);
        let r = backup(&d, "web1", "pw", &kh, &args, &src);
        assert!(r.status.success(), "{}", stderr(&r));
    }
    let web1 = |d: &Daemon, args: &[&str]| {
        let a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        tool("tardis-tools", d, "web1", "pw", &kh, &a)
    };
    let refused = |r: &Output, what: &str| {
        assert_eq!(r.status.code(), Some(1), "{what}: {}", stderr(r));
        let e = stderr(r);
        assert!(e.contains("host web1 is append-only") && e.contains("tardis-tools --db"), "{what}: {e}");
    };
    d.restart_at(now);
    // Adding and locking are allowed; anything that could lead to losing a set is not.
    assert!(web1(&d, &["lock", "one"]).status.success());
    refused(&web1(&d, &["unlock", "one"]), "unlock");
    refused(&web1(&d, &["purge", "--set", "two"]), "purge");
    refused(&web1(&d, &["config", "DailyKeep", "1h"]), "config");
    refused(&web1(&d, &["keys", "--new-password", "stolen"]), "keys");
    // A backup with --purge still records its set, and warns about the purge.
    let r = backup(&d, "web1", "pw", &kh, &["--purge", "--name", "four"], &src);
    assert_eq!(r.status.code(), Some(3), "{}", stderr(&r));
    assert!(stderr(&r).contains("purge failed; the backup itself is complete"), "{}", stderr(&r));
    let sets = |r: Output| -> Vec<String> {
        assert!(r.status.success(), "{}", stderr(&r));
        String::from_utf8_lossy(&r.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(sets(web1(&d, &["sets", "--json"])), ["one", "two", "three", "four"]);
    let r = web1(&d, &["config", "DailyKeep"]);
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "30d", "{}", stderr(&r));
    // Other hosts keep every right.
    let r = backup(&d, "db1", "pw2", &kh, &["--create", "--name", "a"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = backup(&d, "db1", "pw2", &kh, &["--name", "b"], &src);
    assert!(r.status.success(), "{}", stderr(&r));
    let r = tool("tardis-tools", &d, "db1", "pw2", &kh, &["purge".as_ref(), "--set".as_ref(), "a".as_ref()]);
    assert!(r.status.success(), "{}", stderr(&r));

    // On the server, with the password, the administrator can do what the client could not.
    assert!(d.stop().success());
    let on_server = |args: &[&str]| on_server(&d, "web1", "pw", args);
    for args in [&["unlock", "one"][..], &["purge", "--set", "one"], &["config", "DailyKeep", "60d"]] {
        let r = on_server(args);
        assert!(r.status.success(), "{args:?}: {}", stderr(&r));
    }
    d.restart();
    assert_eq!(sets(web1(&d, &["sets", "--json"])), ["two", "three", "four"]);
    let r = web1(&d, &["config", "DailyKeep"]);
    assert_eq!(String::from_utf8_lossy(&r.stdout).trim(), "60d", "{}", stderr(&r));
}
