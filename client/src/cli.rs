//! Command-line pieces shared by `tardis`, `tardis-tools`, `regenerate` and `tardisfs`: where the
//! repository is, which host, the password options, logging, and `@file` argument files.

use crate::error::{Error, Result};
use clap::Args;
use std::ffi::OsString;
use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use tardis_log::{Repo, RepoOptions};

/// Which repository and host to use.
#[derive(Args, Debug, Clone, Default)]
pub struct RepoArgs {
    /// Repository directory [default: /srv/tardis as root, else $XDG_DATA_HOME/tardis]
    #[arg(long, env = "TARDIS_DB", value_name = "DIR")]
    pub db: Option<PathBuf>,
    /// Host whose backups these are [default: this machine's host name]
    #[arg(long, env = "TARDIS_HOST", value_name = "NAME")]
    pub host: Option<String>,
    /// Where this client remembers the newest set of each host, to notice a repository rolled
    /// back to an older copy [default: /var/lib/tardis as root, else $XDG_STATE_HOME/tardis]
    #[arg(long, env = "TARDIS_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// `given`, else `for_root` as root, else `tardis` under the XDG directory `xdg_var` (or
/// `~/home_sub` when it is unset).
fn default_dir(given: Option<&Path>, for_root: &str, xdg_var: &str, home_sub: &str) -> PathBuf {
    if let Some(d) = given {
        return d.to_owned();
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from(for_root);
    }
    let base = std::env::var_os(xdg_var)
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(home_sub)))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("tardis")
}

impl RepoArgs {
    /// The repository directory, with the seed's defaults.
    pub fn db_dir(&self) -> PathBuf {
        default_dir(self.db.as_deref(), "/srv/tardis", "XDG_DATA_HOME", ".local/share")
    }

    /// The client's state directory.
    pub fn state_dir(&self) -> PathBuf {
        default_dir(self.state_dir.as_deref(), "/var/lib/tardis", "XDG_STATE_HOME", ".local/state")
    }

    /// The host name, with the machine's host name as default.
    pub fn host_name(&self) -> Result<String> {
        if let Some(h) = &self.host {
            return Ok(h.clone());
        }
        let h = nix::unistd::gethostname()
            .map_err(|e| Error::Invalid(format!("reading the host name: {e}; give --host")))?;
        h.into_string().map_err(|_| Error::Invalid("the host name is not UTF-8; give --host".into()))
    }

    /// Opens the embedded repository of the host. With `create`, the directories are made if
    /// missing (a first backup); without, a host with no backups is an error.
    pub fn open_local(&self, create: bool) -> Result<Repo> {
        let db = self.db_dir();
        let host = self.host_name()?;
        if !create
            && !Repo::exists(&db, &host)
                .map_err(|e| Error::Invalid(format!("opening repository {} for host {host}: {e}", db.display())))?
        {
            return Err(Error::Invalid(format!(
                "no backups of host {host} in {}; check --host and --db",
                db.display()
            )));
        }
        if create {
            std::fs::create_dir_all(&db).map_err(Error::io_at("creating repository directory", &db))?;
        }
        let clock = now_override()?.map(|t| std::sync::Arc::new(std::sync::atomic::AtomicI64::new(t)));
        Repo::open(&db, &host, RepoOptions { clock, ..RepoOptions::default() })
            .map_err(|e| Error::Invalid(format!("opening repository {} for host {host}: {e}", db.display())))
    }
}

/// The time given by `TARDIS_NOW` (see [`tardis_log::clock`]), in Unix nanoseconds.
pub fn now_override() -> Result<Option<i64>> {
    tardis_log::clock::from_env().map_err(Error::Invalid)
}

/// Now, in Unix nanoseconds: `TARDIS_NOW` if set, else the system clock.
pub fn now() -> Result<i64> {
    Ok(now_override()?.unwrap_or_else(tardis_log::clock::system_now))
}

/// How the password is given (SPEC: `--password`, `--password-file`, `--password-prompt`).
#[derive(Args, Debug, Clone, Default)]
#[group(multiple = false)]
pub struct PasswordArgs {
    /// Password of the host's encryption key (visible to other users in `ps`; prefer the others)
    #[arg(long, value_name = "PW")]
    pub password: Option<String>,
    /// Read the password from the first line of FILE
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Ask for the password on the terminal, without echo
    #[arg(long)]
    pub password_prompt: bool,
}

impl PasswordArgs {
    /// The password, if one was given.
    pub fn read(&self) -> Result<Option<Vec<u8>>> {
        if let Some(p) = &self.password {
            return Ok(Some(p.as_bytes().to_vec()));
        }
        if let Some(f) = &self.password_file {
            return password_from_file(f).map(Some);
        }
        if self.password_prompt {
            let pw = rpassword::prompt_password("Password: ")
                .map_err(|e| Error::io("reading password from", "the terminal", e))?;
            return Ok(Some(pw.into_bytes()));
        }
        Ok(None)
    }
}

/// The first line of password file `f`, which must not be empty.
pub fn password_from_file(f: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(f).map_err(Error::io_at("opening password file", f))?;
    let mut line = String::new();
    std::io::BufReader::new(file).read_line(&mut line).map_err(Error::io_at("reading password file", f))?;
    let pw = line.trim_end_matches(['\n', '\r']);
    if pw.is_empty() {
        return Err(Error::Invalid(format!("password file {} is empty", f.display())));
    }
    Ok(pw.as_bytes().to_vec())
}

/// Asks for a new password on the terminal twice, without echo; refuses an empty one and two
/// that differ.
pub fn prompt_new_password() -> Result<Vec<u8>> {
    let ask = |prompt: &str| {
        rpassword::prompt_password(prompt).map_err(|e| Error::io("reading password from", "the terminal", e))
    };
    let (first, again) = (ask("New password: ")?, ask("New password again: ")?);
    if first != again {
        return Err(Error::Invalid("the two new passwords differ; nothing was changed".into()));
    }
    if first.is_empty() {
        return Err(Error::Invalid("the new password is empty; nothing was changed".into()));
    }
    Ok(first.into_bytes())
}

/// Logging flags.
#[derive(Args, Debug, Clone, Default)]
pub struct LogArgs {
    /// More output (repeat for more); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

impl LogArgs {
    /// Installs the tracing subscriber that writes to stderr.
    pub fn init(&self) {
        let level = match (self.quiet, self.verbose) {
            (true, _) => "error",
            (false, 0) => "warn",
            (false, 1) => "info",
            (false, 2) => "debug",
            _ => "trace",
        };
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .without_time()
            .try_init();
    }
}

/// The process arguments with `@file` arguments expanded (one argument per line).
pub fn args() -> Vec<OsString> {
    argfile::expand_args(argfile::parse_fromfile, argfile::PREFIX).unwrap_or_else(|e| {
        eprintln!("error: reading an @file argument: {e}");
        std::process::exit(2);
    })
}

/// Prints an error chain the way every Tardis program does: `program: what: why: cause`.
pub fn report(program: &str, err: &dyn std::error::Error) {
    eprintln!("{program}: {}", tardis_core::chain(err));
}
