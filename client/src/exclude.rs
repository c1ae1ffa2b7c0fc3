//! Which files a backup leaves out (SPEC section 3).
//!
//! Patterns come from five places: the global file (`TARDIS_GLOBAL_EXCLUDES`, default
//! `/etc/tardis/excludes`, may be missing), `--exclude-file` files, `--exclude` arguments, and two
//! files per directory: `.tardis-excludes` (`TARDIS_EXCLUDES`, applies to that directory and
//! everything below) and `.tardis-local-excludes` (`TARDIS_LOCAL_EXCLUDES`, that directory's own
//! entries only). A directory holding `.tardis-skip` (`TARDIS_SKIPFILE`) or a valid `CACHEDIR.TAG`
//! is skipped entirely.
//!
//! The pattern language is shell globs, close to `.gitignore`: one pattern per line; blank lines
//! and lines starting with `#` are ignored, as is trailing white space; `*` and `?` never match
//! `/`, `**` matches any number of directories, `\` escapes. A pattern without `/` matches an
//! entry's base name at any depth below where it applies; a pattern with `/` is matched against the
//! path relative to the directory of the file it came from (the backup root for the global file,
//! `--exclude-file` and `--exclude`), and a leading `/` only marks it as anchored. A trailing `/`
//! limits a pattern to directories.
//!
//! Cost: the walker calls [`Rules::enter_dir`] once per directory. Each patterns file is compiled
//! into a `GlobSet` once and shared by `Arc` with every directory below it, so entering a directory
//! without pattern files costs two failed `open`s and a short `Vec` clone.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use globset::{Candidate, GlobBuilder, GlobSet, GlobSetBuilder};
use nix::fcntl::OFlag;

use crate::error::{Error, Result};

/// Default name of the per-directory file whose patterns apply to the directory and below.
pub const DEFAULT_EXCLUDES: &str = ".tardis-excludes";
/// Default name of the per-directory file whose patterns apply to that directory only.
pub const DEFAULT_LOCAL_EXCLUDES: &str = ".tardis-local-excludes";
/// Default global patterns file; a missing file means no global patterns.
pub const DEFAULT_GLOBAL_EXCLUDES: &str = "/etc/tardis/excludes";
/// Default name of the file whose presence skips a directory and everything below.
pub const DEFAULT_SKIPFILE: &str = ".tardis-skip";
/// What a valid `CACHEDIR.TAG` starts with (<https://bford.info/cachedir/>).
pub const CACHEDIR_SIGNATURE: &[u8; 43] = b"Signature: 8a477f597d28d172789f06886806bc55";

/// Where exclusion patterns come from: file names (from the environment) and command-line input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExcludeConfig {
    /// Per-directory patterns for the directory and below (`TARDIS_EXCLUDES`).
    pub excludes_name: OsString,
    /// Per-directory patterns for the directory's own entries (`TARDIS_LOCAL_EXCLUDES`).
    pub local_excludes_name: OsString,
    /// Presence skips the directory (`TARDIS_SKIPFILE`).
    pub skip_name: OsString,
    /// Global patterns file (`TARDIS_GLOBAL_EXCLUDES`); may be missing.
    pub global_file: PathBuf,
    /// `--exclude PATTERN`, anchored at each backup root.
    pub cli_patterns: Vec<String>,
    /// `--exclude-file F`, anchored at each backup root; must exist.
    pub exclude_files: Vec<PathBuf>,
}

impl ExcludeConfig {
    /// Reads the file names from `TARDIS_EXCLUDES`, `TARDIS_LOCAL_EXCLUDES`, `TARDIS_SKIPFILE` and
    /// `TARDIS_GLOBAL_EXCLUDES`; unset or empty variables give the defaults.
    pub fn from_env(cli_patterns: Vec<String>, exclude_files: Vec<PathBuf>) -> Self {
        Self::from_lookup(|var| std::env::var_os(var), cli_patterns, exclude_files)
    }

    /// Like [`ExcludeConfig::from_env`] with an explicit variable lookup (tests cannot safely
    /// change the process environment while other tests run).
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<OsString>,
        cli_patterns: Vec<String>,
        exclude_files: Vec<PathBuf>,
    ) -> Self {
        let get =
            |var: &str, default: &str| lookup(var).filter(|v| !v.is_empty()).unwrap_or_else(|| OsString::from(default));
        ExcludeConfig {
            excludes_name: get("TARDIS_EXCLUDES", DEFAULT_EXCLUDES),
            local_excludes_name: get("TARDIS_LOCAL_EXCLUDES", DEFAULT_LOCAL_EXCLUDES),
            skip_name: get("TARDIS_SKIPFILE", DEFAULT_SKIPFILE),
            global_file: PathBuf::from(get("TARDIS_GLOBAL_EXCLUDES", DEFAULT_GLOBAL_EXCLUDES)),
            cli_patterns,
            exclude_files,
        }
    }

    /// The rules for backing up `root`: global file, `--exclude-file`s and `--exclude`s, all
    /// anchored at `root`. Call [`Rules::enter_dir`] on `root` next to pick up its own files.
    pub fn root_rules(&self, root: &Path) -> Result<Rules> {
        let mut sets = Vec::new();
        match fs::read(&self.global_file) {
            Ok(bytes) => sets.extend(PatternSet::parse(&bytes, &self.global_file.display().to_string(), root)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("reading global exclude file", &self.global_file, e)),
        }
        for file in &self.exclude_files {
            let bytes = fs::read(file).map_err(Error::io_at("reading exclude file", file))?;
            sets.extend(PatternSet::parse(&bytes, &file.display().to_string(), root)?);
        }
        let cli = self.cli_patterns.join("\n");
        sets.extend(PatternSet::parse(cli.as_bytes(), "--exclude", root)?);
        Ok(Rules {
            names: Arc::new(Names {
                excludes: self.excludes_name.clone(),
                local: self.local_excludes_name.clone(),
                skip: self.skip_name.clone(),
            }),
            inherited: sets.into_iter().map(Arc::new).collect(),
            local: None,
        })
    }
}

#[derive(Debug)]
struct Names {
    excludes: OsString,
    local: OsString,
    skip: OsString,
}

/// The patterns in force for the entries of one directory.
///
/// Obtained from [`ExcludeConfig::root_rules`] and then [`Rules::enter_dir`] for each directory
/// the walker descends into; the result answers [`Rules::is_excluded`] for that directory's
/// entries. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Rules {
    names: Arc<Names>,
    /// Sets that apply to this directory and everything below it.
    inherited: Vec<Arc<PatternSet>>,
    /// The directory's `.tardis-local-excludes`, not passed on to subdirectories.
    local: Option<Arc<PatternSet>>,
}

impl Rules {
    /// Reads `dir`'s own pattern files and returns the rules for the entries directly in `dir`.
    /// `self` must be the rules of `dir`'s parent (or the root rules when `dir` is the root).
    pub fn enter_dir(&self, dir: &Path) -> Result<Rules> {
        let mut inherited = self.inherited.clone();
        if let Some(set) = read_patterns(&dir.join(&self.names.excludes), dir)? {
            inherited.push(Arc::new(set));
        }
        let local = read_patterns(&dir.join(&self.names.local), dir)?.map(Arc::new);
        Ok(Rules { names: Arc::clone(&self.names), inherited, local })
    }

    /// True if `dir` and everything below it should be left out: it holds the skip file or a
    /// valid `CACHEDIR.TAG`.
    pub fn skip_dir(&self, dir: &Path) -> bool {
        fs::symlink_metadata(dir.join(&self.names.skip)).is_ok() || has_cachedir_tag(dir)
    }

    /// True if the entry at `path` (directly inside the directory these rules were made for)
    /// matches any pattern in force. `is_dir` lets patterns with a trailing `/` apply.
    pub fn is_excluded(&self, path: &Path, is_dir: bool) -> bool {
        let Some(name) = path.file_name() else {
            return false;
        };
        let base = Candidate::new(name);
        self.inherited.iter().chain(&self.local).any(|set| set.matches(path, &base, is_dir))
    }
}

/// True if `dir/CACHEDIR.TAG` is a regular file that starts with the signature.
fn has_cachedir_tag(dir: &Path) -> bool {
    // Non-blocking and not following symlinks, so a FIFO or a link planted under that name can
    // neither hang the walk nor point it elsewhere.
    let file = crate::fsmeta::open_read(&dir.join("CACHEDIR.TAG"), OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW);
    let Ok(mut file) = file else {
        return false;
    };
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return false;
    }
    let mut buf = [0u8; 43];
    file.read_exact(&mut buf).is_ok() && &buf == CACHEDIR_SIGNATURE
}

/// Reads and compiles a per-directory patterns file; a missing file has no patterns.
fn read_patterns(file: &Path, anchor: &Path) -> Result<Option<PatternSet>> {
    let read = |file: &Path| -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        crate::fsmeta::open_read(file, OFlag::empty())?.read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    match read(file) {
        Ok(bytes) => PatternSet::parse(&bytes, &file.display().to_string(), anchor),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("reading exclude file", file, e)),
    }
}

/// The compiled patterns of one source (a file or the command line), with their anchor.
#[derive(Debug)]
struct PatternSet {
    anchor: PathBuf,
    /// Patterns without `/`, matched against the base name.
    base: GlobSet,
    base_dirs: GlobSet,
    /// Patterns with `/`, matched against the path relative to `anchor`.
    anchored: GlobSet,
    anchored_dirs: GlobSet,
}

impl PatternSet {
    /// Compiles the patterns in `text`; `Ok(None)` if there are none. `origin` names the source in
    /// error messages.
    fn parse(text: &[u8], origin: &str, anchor: &Path) -> Result<Option<PatternSet>> {
        let bad = |line: usize, reason: String| Error::Pattern { file: origin.to_owned(), line, reason };
        let mut builders: [GlobSetBuilder; 4] = std::array::from_fn(|_| GlobSetBuilder::new());
        let mut count = 0;
        for (index, raw) in text.split(|b| *b == b'\n').enumerate() {
            let line = std::str::from_utf8(raw).map_err(|_| bad(index + 1, "pattern is not UTF-8".into()))?;
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let dir_only = line.ends_with('/');
            let pattern = line.trim_end_matches('/');
            let anchored = pattern.contains('/');
            let pattern = pattern.strip_prefix('/').unwrap_or(pattern);
            if pattern.is_empty() {
                return Err(bad(index + 1, format!("pattern {line:?} matches nothing")));
            }
            let glob = GlobBuilder::new(pattern)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| bad(index + 1, e.kind().to_string()))?;
            let slot = usize::from(anchored) * 2 + usize::from(dir_only);
            builders[slot].add(glob);
            count += 1;
        }
        if count == 0 {
            return Ok(None);
        }
        // Building fails only if the combined automaton is too large; no single line is to blame.
        let [base, base_dirs, anchored, anchored_dirs] = builders.map(|b| b.build().map_err(|e| bad(0, e.to_string())));
        Ok(Some(PatternSet {
            anchor: anchor.to_path_buf(),
            base: base?,
            base_dirs: base_dirs?,
            anchored: anchored?,
            anchored_dirs: anchored_dirs?,
        }))
    }

    fn matches(&self, path: &Path, base: &Candidate<'_>, is_dir: bool) -> bool {
        // Patterns apply strictly below their anchor.
        let rel = match path.strip_prefix(&self.anchor) {
            Ok(rel) if rel.as_os_str() != OsStr::new("") => rel,
            _ => return false,
        };
        if self.base.is_match_candidate(base) || (is_dir && self.base_dirs.is_match_candidate(base)) {
            return true;
        }
        if self.anchored.is_empty() && (!is_dir || self.anchored_dirs.is_empty()) {
            return false;
        }
        let rel = Candidate::new(rel);
        self.anchored.is_match_candidate(&rel) || (is_dir && self.anchored_dirs.is_match_candidate(&rel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::ffi::OsStrExt;

    fn config(cli: &[&str]) -> ExcludeConfig {
        let mut c = ExcludeConfig::from_lookup(|_| None, cli.iter().map(|s| s.to_string()).collect(), vec![]);
        c.global_file = PathBuf::from("/nonexistent/tardis/excludes");
        c
    }

    /// Rules for the entries of `root/rel`, entering every directory on the way like the walker.
    fn rules_at(config: &ExcludeConfig, root: &Path, rel: &str) -> Rules {
        let mut rules = config.root_rules(root).unwrap().enter_dir(root).unwrap();
        let mut dir = root.to_path_buf();
        for part in Path::new(rel).components() {
            dir.push(part);
            rules = rules.enter_dir(&dir).unwrap();
        }
        rules
    }

    #[test]
    fn names_from_environment_with_defaults() {
        let c = ExcludeConfig::from_lookup(|_| None, vec!["*.o".into()], vec!["/x".into()]);
        assert_eq!(c.excludes_name, ".tardis-excludes");
        assert_eq!(c.local_excludes_name, ".tardis-local-excludes");
        assert_eq!(c.skip_name, ".tardis-skip");
        assert_eq!(c.global_file, Path::new("/etc/tardis/excludes"));
        assert_eq!(c.cli_patterns, vec!["*.o".to_string()]);
        assert_eq!(c.exclude_files, vec![PathBuf::from("/x")]);

        let c = ExcludeConfig::from_lookup(
            |var| match var {
                "TARDIS_EXCLUDES" => Some("E".into()),
                "TARDIS_LOCAL_EXCLUDES" => Some("L".into()),
                "TARDIS_SKIPFILE" => Some("S".into()),
                "TARDIS_GLOBAL_EXCLUDES" => Some("/g".into()),
                _ => None,
            },
            vec![],
            vec![],
        );
        assert_eq!((c.excludes_name.as_os_str(), c.local_excludes_name.as_os_str()), ("E".as_ref(), "L".as_ref()));
        assert_eq!((c.skip_name.as_os_str(), c.global_file.as_path()), ("S".as_ref(), Path::new("/g")));

        // An empty variable is treated as unset rather than as "the directory itself".
        let c = ExcludeConfig::from_lookup(|_| Some(OsString::new()), vec![], vec![]);
        assert_eq!(c.excludes_name, ".tardis-excludes");
    }

    #[test]
    fn excludes_file_applies_to_its_directory_and_below() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::write(root.join("a/.tardis-excludes"), "# comment\n\n*.o\n   \nbuild/\n").unwrap();
        let c = config(&[]);

        let top = rules_at(&c, root, "");
        assert!(!top.is_excluded(&root.join("x.o"), false), "above the file");
        let a = rules_at(&c, root, "a");
        assert!(a.is_excluded(&root.join("a/x.o"), false));
        assert!(!a.is_excluded(&root.join("a/x.c"), false));
        assert!(!a.is_excluded(&root.join("a/# comment"), false));
        let abc = rules_at(&c, root, "a/b/c");
        assert!(abc.is_excluded(&root.join("a/b/c/deep.o"), false));
        // A trailing slash limits the pattern to directories.
        assert!(abc.is_excluded(&root.join("a/b/c/build"), true));
        assert!(!abc.is_excluded(&root.join("a/b/c/build"), false));
    }

    #[test]
    fn local_excludes_apply_to_this_directory_only() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join(".tardis-local-excludes"), "*.tmp\n").unwrap();
        let c = config(&[]);
        let top = rules_at(&c, root, "");
        assert!(top.is_excluded(&root.join("x.tmp"), false));
        let sub = rules_at(&c, root, "sub");
        assert!(!sub.is_excluded(&root.join("sub/x.tmp"), false));
    }

    #[test]
    fn slash_patterns_are_anchored_at_their_file() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::create_dir_all(root.join("p/q/r")).unwrap();
        fs::write(root.join("p/.tardis-excludes"), "q/*.log\n/top\ncache/**/*.bin\n").unwrap();
        let c = config(&[]);
        let q = rules_at(&c, root, "p/q");
        assert!(q.is_excluded(&root.join("p/q/x.log"), false));
        // `*` does not cross a slash.
        let r = rules_at(&c, root, "p/q/r");
        assert!(!r.is_excluded(&root.join("p/q/r/x.log"), false));
        // A leading slash anchors a name without other slashes.
        let p = rules_at(&c, root, "p");
        assert!(p.is_excluded(&root.join("p/top"), false));
        assert!(!q.is_excluded(&root.join("p/q/top"), false));
        // `**` spans any number of directories, including none.
        let pr = rules_at(&c, root, "p");
        assert!(pr.is_excluded(&root.join("p/cache/a.bin"), false));
        assert!(pr.is_excluded(&root.join("p/cache/x/y/a.bin"), false));
        assert!(!pr.is_excluded(&root.join("p/other/cache/a.bin"), false));
    }

    #[test]
    fn command_line_global_and_exclude_file_patterns() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("d/e")).unwrap();
        let global = tmp.path().join("global");
        fs::write(&global, "*.swp\nd/e\n").unwrap();
        let extra = tmp.path().join("extra");
        fs::write(&extra, "*.bak\n").unwrap();
        let mut c = config(&["core", "**/node_modules"]);
        c.global_file = global;
        c.exclude_files = vec![extra];

        let d = rules_at(&c, &root, "d");
        assert!(d.is_excluded(&root.join("d/.x.swp"), false));
        assert!(d.is_excluded(&root.join("d/e"), true), "anchored at the backup root");
        assert!(d.is_excluded(&root.join("d/y.bak"), false));
        assert!(d.is_excluded(&root.join("d/core"), false));
        assert!(d.is_excluded(&root.join("d/node_modules"), true));
        assert!(!d.is_excluded(&root.join("d/keep"), false));
        let top = rules_at(&c, &root, "");
        assert!(!top.is_excluded(&root.join("e"), true));

        // A missing global file is fine; a missing --exclude-file is not.
        let mut c = config(&[]);
        assert!(c.root_rules(&root).is_ok());
        c.exclude_files = vec![tmp.path().join("missing")];
        let msg = c.root_rules(&root).unwrap_err().to_string();
        assert!(msg.starts_with("reading exclude file ") && msg.contains("missing"), "{msg}");
    }

    #[test]
    fn bad_patterns_name_file_and_line() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::write(root.join(".tardis-excludes"), "ok\n# fine\na[b\n").unwrap();
        let c = config(&[]);
        let err = c.root_rules(root).unwrap().enter_dir(root).unwrap_err();
        match &err {
            Error::Pattern { file, line, .. } => {
                assert!(file.ends_with(".tardis-excludes"), "{file}");
                assert_eq!(*line, 3);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains(".tardis-excludes line 3"), "{err}");

        let err = config(&["fine", "{x"]).root_rules(root).unwrap_err();
        assert!(matches!(&err, Error::Pattern { file, line: 2, .. } if file == "--exclude"), "{err:?}");
        let err = config(&["/"]).root_rules(root).unwrap_err();
        assert!(matches!(&err, Error::Pattern { line: 1, .. }), "{err:?}");

        fs::write(root.join(".tardis-local-excludes"), b"\xff\n").unwrap();
        fs::remove_file(root.join(".tardis-excludes")).unwrap();
        let err = c.root_rules(root).unwrap().enter_dir(root).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[test]
    fn non_utf8_names_match() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let c = config(&["*.tmp"]);
        let rules = rules_at(&c, root, "");
        let name = OsStr::from_bytes(b"caf\xe9.tmp");
        assert!(rules.is_excluded(&root.join(name), false));
        assert!(!rules.is_excluded(&root.join(OsStr::from_bytes(b"caf\xe9")), false));
    }

    #[test]
    fn skip_file_and_cachedir_tag() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for d in ["plain", "skip", "cache", "badtag", "shorttag", "fifotag"] {
            fs::create_dir(root.join(d)).unwrap();
        }
        fs::write(root.join("skip/.tardis-skip"), "").unwrap();
        let mut tag = CACHEDIR_SIGNATURE.to_vec();
        tag.extend_from_slice(b"\n# This file is a cache directory tag.\n");
        fs::write(root.join("cache/CACHEDIR.TAG"), &tag).unwrap();
        fs::write(root.join("badtag/CACHEDIR.TAG"), b"Signature: 0000000000000000000000000000000").unwrap();
        fs::write(root.join("shorttag/CACHEDIR.TAG"), &CACHEDIR_SIGNATURE[..42]).unwrap();
        nix::unistd::mkfifo(&root.join("fifotag/CACHEDIR.TAG"), nix::sys::stat::Mode::from_bits_truncate(0o600))
            .unwrap();

        let rules = config(&[]).root_rules(root).unwrap();
        assert!(!rules.skip_dir(&root.join("plain")));
        assert!(rules.skip_dir(&root.join("skip")));
        assert!(rules.skip_dir(&root.join("cache")));
        assert!(!rules.skip_dir(&root.join("badtag")));
        assert!(!rules.skip_dir(&root.join("shorttag")));
        assert!(!rules.skip_dir(&root.join("fifotag")));

        // The skip file's name comes from the configuration.
        let mut c = config(&[]);
        c.skip_name = "NOBACKUP".into();
        fs::write(root.join("plain/NOBACKUP"), "").unwrap();
        let rules = c.root_rules(root).unwrap();
        assert!(rules.skip_dir(&root.join("plain")));
        assert!(!rules.skip_dir(&root.join("skip")));
    }

    #[test]
    fn paths_outside_the_anchor_never_match() {
        let tmp = tempfile::tempdir().unwrap();
        let rules = config(&["*", "a/b"]).root_rules(tmp.path()).unwrap();
        assert!(!rules.is_excluded(Path::new("/elsewhere/a/b"), false));
        assert!(!rules.is_excluded(tmp.path(), true), "the root itself");
        assert!(rules.is_excluded(&tmp.path().join("a/b"), false));
    }

    proptest! {
        #[test]
        fn random_patterns_and_paths_never_panic(
            patterns in proptest::collection::vec("[a-c*?/\\[\\]{},!\\\\#. -]{0,12}", 0..6),
            path in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..8), 1..5),
            is_dir in any::<bool>(),
        ) {
            let root = Path::new("/r");
            if let Ok(rules) = config(&[]).root_rules(root) {
                let text = patterns.join("\n");
                let Ok(Some(set)) = PatternSet::parse(text.as_bytes(), "prop", root) else { return Ok(()) };
                let rules = Rules { inherited: vec![Arc::new(set)], ..rules };
                let mut p = root.to_path_buf();
                for part in path {
                    // Slashes and NULs are not part of a name.
                    let part: Vec<u8> = part.into_iter().filter(|b| *b != b'/' && *b != 0).collect();
                    if !part.is_empty() {
                        p.push(OsStr::from_bytes(&part));
                    }
                }
                let _ = rules.is_excluded(&p, is_dir);
            }
        }
    }
}
