//! Crash injection with real processes: a real `tardisd` (which compacts every second, during
//! the backups) and the real `tardis`, `tardis-tools purge` and `tardis-tools compact`, each
//! killed with SIGKILL at a seeded random moment, again and again on one repository. After
//! every crash the daemon restarts, and at checkpoints `verify --read-data` must pass, every set
//! whose backup reported success (exit 0, the acknowledgement) must still be listed unless a
//! purge may have taken it, and every listed set must restore bit-exact to the tree it was taken
//! from (the ledger). A set that a killed run may or may not have completed is judged by what
//! the repository says: if it lists the set, the set must be whole. A purge that reported
//! success must have taken its set for good.
//!
//! Each crash point prints its seed and what it killed; `TARDIS_CRASH_SEED` repeats a run and
//! `TARDIS_CRASH_POINTS` changes how many points it has (CI: 50).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};
use tardis_tests::relay::Rng;
use tardis_tests::server::{client_args, Daemon};
use tardis_tests::{assert_same, bin, manifest, noise, Entry};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Changes a few files of the source tree: rewrites, adds and deletes.
fn mutate(src: &Path, rng: &mut Rng) {
    for _ in 0..3 {
        let f = src.join(format!("f{:02}", rng.below(16)));
        match rng.below(4) {
            0 if f.exists() => fs::remove_file(&f).unwrap(),
            _ => fs::write(&f, noise(64 * 1024 + rng.below(512 * 1024) as usize, rng.next_u64())).unwrap(),
        }
    }
}

/// Kills `child` unless it has exited, and returns how it ended: a success means it finished
/// and reported success before the signal could reach it.
fn sigkill(child: &mut Child) -> ExitStatus {
    let _ = child.kill();
    child.wait().unwrap()
}

/// Kills the daemon (then restarts it, and lets the client finish or give up within
/// `--retry-for`) or the client, and returns how the client ended.
fn kill_one(d: &mut Daemon, child: &mut Child, kill_daemon: bool) -> ExitStatus {
    if kill_daemon {
        d.crash_and_restart();
        child.wait().unwrap()
    } else {
        sigkill(child)
    }
}

/// What the clients were told: the sets whose backup reported success and that no purge was
/// asked to take since, and the sets a purge reported taking.
#[derive(Default)]
struct Acks {
    completed: BTreeSet<String>,
    purged: BTreeSet<String>,
}

fn live_sets(d: &Daemon, kh: &Path) -> Vec<String> {
    let out = Command::new(bin("tardis-tools"))
        .args(client_args("127.0.0.1", d.port, "h", "pw", kh))
        .args(["sets", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "listing sets: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["state"] == "complete")
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// With the daemon stopped: `verify --read-data` passes, the acknowledged sets are listed and
/// the acknowledged purges are not, and every listed set restores to its ledger entry.
fn check(d: &mut Daemon, ledger: &BTreeMap<String, BTreeMap<Vec<u8>, Entry>>, acks: &Acks, src: &Path, work: &Path) {
    // Stopped first: a request of a killed client may still be running on the server.
    assert!(d.stop().success(), "the daemon stops cleanly:\n{}", d.log());
    let out = Command::new(bin("tardis-tools"))
        .arg("--db")
        .arg(&d.db)
        .args(["--host", "h", "--password", "pw", "sets", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "listing sets: {}", stderr(&out));
    // Completed sets only: a killed backup leaves its set open or abandoned, never shown.
    let sets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["state"] == "complete")
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    for name in &acks.completed {
        assert!(sets.contains(name), "set {name}, whose backup reported success, is lost; listed: {sets:?}");
    }
    for name in &acks.purged {
        assert!(!sets.contains(name), "set {name}, whose purge reported success, is listed again");
    }
    let v = Command::new(bin("tardis-tools"))
        .arg("--db")
        .arg(&d.db)
        .args(["--host", "h", "--password", "pw", "verify", "--read-data"])
        .output()
        .unwrap();
    assert!(v.status.success(), "verify after crashes: {}{}", String::from_utf8_lossy(&v.stdout), stderr(&v));
    for name in &sets {
        let want = ledger.get(name).unwrap_or_else(|| panic!("set {name} is listed but was never attempted"));
        let out = work.join(format!("restore-{name}"));
        let r = Command::new(bin("regenerate"))
            .arg("--db")
            .arg(&d.db)
            .args(["--host", "h", "--password", "pw", "--set", name, "-o"])
            .arg(&out)
            .arg(src)
            .output()
            .unwrap();
        assert!(r.status.success(), "regenerate {name}: {}", stderr(&r));
        assert_same(want, &manifest(&out), &format!("set {name} after crashes"));
        fs::remove_dir_all(&out).unwrap();
    }
    d.restart();
}

#[test]
fn sigkill_at_random_moments_of_backup_purge_and_compaction_loses_no_completed_set() {
    let work = tempfile::tempdir().unwrap();
    let (src, kh) = (work.path().join("src"), work.path().join("known_hosts"));
    fs::create_dir_all(&src).unwrap();
    let base_seed = env_u64("TARDIS_CRASH_SEED", 20261127);
    let points = env_u64("TARDIS_CRASH_POINTS", 50);
    eprintln!("crash test: TARDIS_CRASH_SEED={base_seed} TARDIS_CRASH_POINTS={points}");
    let mut rng = Rng::from_seed(base_seed);
    for i in 0..16 {
        fs::write(src.join(format!("f{i:02}")), noise(128 * 1024, i)).unwrap();
    }
    // The daemon compacts every second, so its compactions run during the backups and purges
    // and die with it; the test also runs and kills `tardis-tools compact` on its own.
    let mut d = Daemon::start(
        &work.path().join("srv"),
        "AllowNewHosts = yes\nCompactInterval = 1\nCompactThreshold = 1\nSessionTimeout = 1",
    );
    let mut ledger: BTreeMap<String, BTreeMap<Vec<u8>, Entry>> = BTreeMap::new();
    let mut acks = Acks::default();
    let client = |d: &Daemon, extra: &[&str]| {
        let mut c = Command::new(bin("tardis"));
        c.args(client_args("127.0.0.1", d.port, "h", "pw", &kh)).args(["--retry-for", "3"]).args(extra);
        c
    };
    let r = client(&d, &["--create", "--name", "base"]).arg(&src).output().unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    ledger.insert("base".into(), manifest(&src));
    acks.completed.insert("base".into());

    let mut kills = BTreeMap::<&str, u32>::new();
    for point in 0..points {
        let seed = rng.next_u64();
        let mut prng = Rng::from_seed(seed);
        let delay = Duration::from_millis(prng.below(700));
        let kind = prng.below(10);
        let mut what = if kind < 6 {
            "backup"
        } else if kind < 8 {
            "purge"
        } else {
            "compact"
        };
        // A purge needs a set it may take (neither the latest nor the only one); else back up.
        let sets = if what == "purge" { live_sets(&d, &kh) } else { Vec::new() };
        if what == "purge" && sets.len() < 3 {
            what = "backup";
        }
        let kill_daemon = what != "compact" && prng.below(2) == 0;
        eprintln!(
            "point {point}: seed {seed}: {what}, SIGKILL {} after {delay:?}",
            if kill_daemon { "tardisd" } else { "the client" }
        );
        match what {
            "backup" => {
                mutate(&src, &mut prng);
                let name = format!("c{point}");
                ledger.insert(name.clone(), manifest(&src));
                let mut child = client(&d, &["--name", &name])
                    .arg(&src)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                std::thread::sleep(delay);
                if kill_one(&mut d, &mut child, kill_daemon).success() {
                    acks.completed.insert(name);
                }
            }
            "purge" => {
                let victim = &sets[prng.below(sets.len() as u64 - 1) as usize];
                let mut child = Command::new(bin("tardis-tools"))
                    .args(client_args("127.0.0.1", d.port, "h", "pw", &kh))
                    .args(["purge", "--set", victim])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                std::thread::sleep(delay / 4);
                // Killed, the purge may or may not have taken the set: neither kept nor gone.
                acks.completed.remove(victim);
                if kill_one(&mut d, &mut child, kill_daemon).success() {
                    acks.purged.insert(victim.clone());
                }
            }
            _ => {
                assert!(d.stop().success(), "{}", d.log());
                let mut child = Command::new(bin("tardis-tools"))
                    .arg("--db")
                    .arg(&d.db)
                    .args(["--host", "h", "--password", "pw", "compact", "--threshold", "0.9"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                std::thread::sleep(delay / 2);
                sigkill(&mut child);
                d.restart();
            }
        }
        *kills.entry(what).or_default() += 1;
        if point % 25 == 24 {
            check(&mut d, &ledger, &acks, &src, work.path());
            // A purge that is not killed, so that the daemon's own compactions (every second)
            // have dead records to reclaim while the next backups run and are killed.
            let sets = live_sets(&d, &kh);
            if sets.len() >= 3 {
                let out = Command::new(bin("tardis-tools"))
                    .args(client_args("127.0.0.1", d.port, "h", "pw", &kh))
                    .args(["purge", "--set", &sets[0]])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{}", stderr(&out));
                acks.completed.remove(&sets[0]);
                acks.purged.insert(sets[0].clone());
            }
        }
    }
    eprintln!(
        "crash points by operation: {kills:?}; sets listed at the end: {}; acknowledged and held to it: {} backups, {} purges",
        live_sets(&d, &kh).len(),
        acks.completed.len(),
        acks.purged.len()
    );
    let started = Instant::now();
    // A last backup after all the crashes works and restores.
    let r = client(&d, &["--name", "final"]).arg(&src).output().unwrap();
    assert!(r.status.success(), "{}", stderr(&r));
    ledger.insert("final".into(), manifest(&src));
    acks.completed.insert("final".into());
    check(&mut d, &ledger, &acks, &src, work.path());
    eprintln!("final backup and check: {:?}", started.elapsed());
    let log = d.log();
    let (compacted, interrupted) =
        (log.matches("compacted segments").count(), log.matches("a backup started during compaction").count());
    eprintln!("the daemon's own compactions: {compacted} retired segments, {interrupted} stopped by a backup");
    assert!(compacted > 0, "the daemon compacted while the test ran");
}
