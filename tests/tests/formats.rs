//! Repositories written by earlier builds keep opening: each directory under
//! `tests/fixtures/` is a repository (segments and index) written by the build of the format
//! revision it is named after (`docs/FORMAT.md`), checked in and never regenerated. Every build
//! must verify it, restore both of its sets exactly, and back up on top of it.
//!
//! A new format revision adds a fixture: `TARDIS_MAKE_FIXTURE=format-1.6 cargo test -p
//! tardis-tests --test formats -- --ignored make_fixture`, with the binaries of that revision
//! built, then commit `tests/fixtures/format-1.6`.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use tardis_tests::{assert_same, host_command, manifest, noise, ok, set_mtime};

/// Where the fixtures' trees were backed up from. The sets record this path; it need not exist.
const SOURCE: &str = "/tmp/tardis-format-fixture/src";

/// The tree of the first set. Frozen: the fixtures hold backups of exactly this.
fn first_tree(root: &Path) {
    use std::os::unix::fs::{symlink, PermissionsExt};
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::write(root.join("text.txt"), "format fixture\n".repeat(100)).unwrap();
    fs::write(root.join("dir/noise.bin"), noise(1280 << 10, 11)).unwrap();
    fs::write(root.join("dir/sub/empty"), "").unwrap();
    fs::write(root.join(OsStr::from_bytes(b"caf\xe9")), "latin-1 name").unwrap();
    fs::write(root.join("private"), "0600").unwrap();
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    nix::unistd::chown(&root.join("private"), Some(1234.into()), Some(5678.into())).unwrap();
    fs::hard_link(root.join("text.txt"), root.join("dir/hardlink")).unwrap();
    symlink("../text.txt", root.join("dir/link")).unwrap();
    xattr::set(root.join("text.txt"), "user.fixture", b"xattr value").unwrap();
    stamp(root);
}

/// The tree of the second set: the first with a file changed in the middle, one deleted and
/// one added.
fn second_tree(root: &Path) {
    let mut data = noise(1280 << 10, 11);
    data[640 << 10..(640 << 10) + 4096].fill(0xAB);
    fs::write(root.join("dir/noise.bin"), data).unwrap();
    fs::remove_file(root.join("dir/sub/empty")).unwrap();
    fs::write(root.join("dir/sub/new.txt"), "added in the second set").unwrap();
    stamp(root);
}

/// Fixed times on every entry, children before their directory.
fn stamp(root: &Path) {
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            stack.extend(fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
        paths.push(p);
    }
    for (i, p) in paths.iter().rev().enumerate() {
        set_mtime(p, 1_700_000_000 + i as i64, 500_000_000);
    }
}

/// Runs a program on host `h` (password `pw`) of `db`, at [`MARCH_1`], remembering the sets it
/// has seen in `state`: every fixture has the same host ID in every run, so the machine's own
/// state directory would take the set a run adds for a rollback in the next.
fn on_host(db: &Path, state: &Path, program: &str, args: &[&str]) -> Output {
    host_command(db, program).args(args).env("TARDIS_STATE_DIR", state).output().expect("program starts")
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Copies a directory tree (files and directories only, which is all a fixture holds).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().map(|e| e.unwrap()) {
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn repositories_of_every_earlier_format_revision_verify_restore_and_take_new_backups() {
    let mut revisions: Vec<PathBuf> = fs::read_dir(fixtures()).unwrap().map(|e| e.unwrap().path()).collect();
    revisions.sort();
    assert!(!revisions.is_empty(), "no fixtures in {}", fixtures().display());
    let work = tempfile::tempdir().unwrap();
    let (tree, want) = (work.path().join("tree"), |root: &Path| manifest(root));
    first_tree(&tree);
    let first = want(&tree);
    second_tree(&tree);
    let second = want(&tree);
    for fixture in &revisions {
        let name = fixture.file_name().unwrap().to_string_lossy().into_owned();
        eprintln!("fixture {name}");
        let (db, state) = (work.path().join(&name), work.path().join(format!("{name}-state")));
        copy_tree(fixture, &db);
        let v = on_host(&db, &state, "tardis-tools", &["verify", "--read-data"]);
        assert!(v.status.success(), "{name}: verify: {}{}", ok_text(&v.stdout), ok_text(&v.stderr));
        for (set, expected) in [("first", &first), ("second", &second)] {
            let out = work.path().join(format!("{name}-{set}"));
            ok(on_host(&db, &state, "regenerate", &["--set", set, "-o", out.to_str().unwrap(), SOURCE]));
            assert_same(expected, &manifest(&out), &format!("{name}: set {set}"));
        }
        // This build appends to it, as an incremental backup on top of the old sets.
        ok(on_host(&db, &state, "tardis", &["--local", "--name", "third", tree.to_str().unwrap()]));
        let out = work.path().join(format!("{name}-third"));
        ok(on_host(
            &db,
            &state,
            "regenerate",
            &["--set", "third", "-o", out.to_str().unwrap(), tree.to_str().unwrap()],
        ));
        assert_same(&second, &manifest(&out), &format!("{name}: a new set on top"));
        let v = on_host(&db, &state, "tardis-tools", &["verify", "--read-data"]);
        assert!(v.status.success(), "{name}: verify after a new set: {}", ok_text(&v.stdout));
    }
}

fn ok_text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Writes the fixture named by `TARDIS_MAKE_FIXTURE` with the binaries of this build.
#[test]
#[ignore = "writes a new fixture; run by hand when the format changes"]
fn make_fixture() {
    let name = std::env::var("TARDIS_MAKE_FIXTURE").expect("TARDIS_MAKE_FIXTURE=format-X.Y");
    let dest = fixtures().join(&name);
    assert!(!dest.exists(), "{} exists: fixtures are never regenerated", dest.display());
    let src = Path::new(SOURCE);
    if src.exists() {
        fs::remove_dir_all(src).unwrap();
    }
    first_tree(src);
    let (db, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    ok(on_host(db.path(), state.path(), "tardis", &["--local", "--name", "first", SOURCE]));
    second_tree(src);
    ok(on_host(db.path(), state.path(), "tardis", &["--local", "--name", "second", SOURCE]));
    fs::remove_dir_all(src.parent().unwrap()).unwrap();
    // The repository without what is not part of it: the lock and RocksDB's text logs.
    copy_tree(db.path(), &dest);
    for e in walk(&dest) {
        let file = e.file_name().unwrap().to_string_lossy().into_owned();
        if file == "lock" || file.starts_with("LOG") {
            fs::remove_file(&e).unwrap();
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap().map(|e| e.unwrap()) {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}
