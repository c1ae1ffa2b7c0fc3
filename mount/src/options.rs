//! The seed's `-o key=value,...` mount options.
//!
//! `tardisfs -o database=DIR,host=NAME,password=PW MOUNTPOINT` is how the original Tardis was
//! mounted, and how `/etc/fstab`-style tooling passes options, so these are parsed by hand
//! rather than by clap: each `-o` argument is a comma-separated list, and `-o` may repeat.
//! A comma inside a value is written `\,` (a password with a comma is better given with
//! `password_file=`).

use crate::error::{Error, Result};
use std::path::PathBuf;

/// Where the password comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordOption {
    /// `password=PW`.
    Given(String),
    /// `password=` with an empty value: ask on the terminal.
    Prompt,
    /// `password_file=F`: the first line of F.
    File(PathBuf),
}

impl std::fmt::Debug for PasswordOption {
    // Never print a password, even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PasswordOption::Given(_) => f.write_str("Given(..)"),
            PasswordOption::Prompt => f.write_str("Prompt"),
            PasswordOption::File(p) => f.debug_tuple("File").field(p).finish(),
        }
    }
}

/// Everything the `-o` options can say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// `database=DIR`: the repository directory (as `--db`).
    pub database: Option<PathBuf>,
    /// `host=NAME`: whose backups to show (as `--host`).
    pub host: Option<String>,
    pub password: Option<PasswordOption>,
    /// `allow_other`: users other than the one who mounted may look (kernel permission checks
    /// against the backed-up modes and owners still apply).
    pub allow_other: bool,
    /// `allow_root`: root may look as well as the user who mounted.
    pub allow_root: bool,
    /// `threads=N`: request-handling threads.
    pub threads: Option<usize>,
    /// `cache=MIB`: size of the decoded-chunk cache in MiB.
    pub cache_mib: Option<usize>,
}

/// Options that are accepted for compatibility and change nothing: the mount is always
/// read-only, never honours set-uid bits or devices, and always checks permissions.
const ACCEPTED_NOOPS: &[&str] = &["ro", "default_permissions", "nosuid", "nodev", "noatime", "noexec", "exec"];

impl MountOptions {
    /// Parses every `-o` argument, later ones overriding earlier ones.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<MountOptions> {
        let mut o = MountOptions::default();
        for arg in args {
            for item in split_items(arg.as_ref()) {
                o.apply(&item)?;
            }
        }
        Ok(o)
    }

    fn apply(&mut self, item: &str) -> Result<()> {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (item, None),
        };
        let need = |what: &str| -> Result<String> {
            match value {
                Some(v) if !v.is_empty() => Ok(v.to_owned()),
                _ => Err(Error::Usage(format!("option {key} needs a value: -o {key}={what}"))),
            }
        };
        let number = |what: &str| -> Result<usize> {
            need(what)?
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| Error::Usage(format!("option {key} takes a positive number")))
        };
        match key {
            "database" | "db" => self.database = Some(PathBuf::from(need("DIR")?)),
            "host" => self.host = Some(need("NAME")?),
            "password" => {
                self.password = Some(match value {
                    Some(v) if !v.is_empty() => PasswordOption::Given(v.to_owned()),
                    _ => PasswordOption::Prompt,
                })
            }
            "password_file" => self.password = Some(PasswordOption::File(PathBuf::from(need("FILE")?))),
            "allow_other" => self.allow_other = true,
            "allow_root" => self.allow_root = true,
            "threads" => self.threads = Some(number("N")?),
            "cache" => self.cache_mib = Some(number("MIB")?),
            "rw" => return Err(Error::Usage("tardisfs is read-only: option rw is not supported".into())),
            k if ACCEPTED_NOOPS.contains(&k) && value.is_none() => {}
            _ => {
                return Err(Error::Usage(format!(
                    "unknown mount option {key:?}; known: database=DIR, host=NAME, password=[PW], \
                     password_file=F, allow_other, allow_root, threads=N, cache=MIB"
                )))
            }
        }
        Ok(())
    }
}

/// Splits one `-o` argument at unescaped commas; `\,` is a literal comma and `\\` a backslash.
fn split_items(arg: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = arg.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n @ (',' | '\\')) => cur.push(n),
                Some(n) => {
                    cur.push('\\');
                    cur.push(n);
                }
                None => cur.push('\\'),
            },
            ',' => items.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    items.push(cur);
    items.retain(|i| !i.is_empty());
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_syntax() {
        let o = MountOptions::parse(&["database=/srv/tardis,host=pi", "password=s3cret"]).unwrap();
        assert_eq!(o.database, Some(PathBuf::from("/srv/tardis")));
        assert_eq!(o.host.as_deref(), Some("pi"));
        assert_eq!(o.password, Some(PasswordOption::Given("s3cret".into())));
        assert!(!o.allow_other);
    }

    #[test]
    fn empty_password_prompts_and_file_reads() {
        let o = MountOptions::parse(&["database=/d,password="]).unwrap();
        assert_eq!(o.password, Some(PasswordOption::Prompt));
        let o = MountOptions::parse(&["password", "password_file=/etc/pw"]).unwrap();
        assert_eq!(o.password, Some(PasswordOption::File("/etc/pw".into())));
    }

    #[test]
    fn escaped_commas_and_flags() {
        let o = MountOptions::parse(&[r"password=a\,b\\c,allow_other,ro,threads=3,cache=16"]).unwrap();
        assert_eq!(o.password, Some(PasswordOption::Given(r"a,b\c".into())));
        assert!(o.allow_other);
        assert_eq!(o.threads, Some(3));
        assert_eq!(o.cache_mib, Some(16));
    }

    #[test]
    fn bad_options_are_usage_errors() {
        for bad in ["colour=blue", "rw", "database=", "host", "threads=0", "threads=x", "ro=1"] {
            let e = MountOptions::parse(&[bad]).unwrap_err();
            assert!(matches!(e, Error::Usage(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn passwords_stay_out_of_debug_output() {
        let o = MountOptions::parse(&["password=s3cret"]).unwrap();
        assert!(!format!("{o:?}").contains("s3cret"));
    }
}
