//! `tardisd.cfg`: the daemon's configuration file, merged with environment variables and
//! command-line options (command line over environment over file over defaults).
//!
//! The format is the seed's: `Key = Value` lines, `#` or `;` comments, and optional
//! `[Section]` headers, which are accepted and ignored. Keys are case-insensitive. An unknown
//! key or a bad value is an error naming the file, the line and the fix, never ignored.

use crate::error::{Error, Result};
use crate::jobs::{JobConfig, MinFree};
use crate::service::{Hosts, Rules};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tardis_log::bucket::BucketConfig;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/tardis/tardisd.cfg";

/// Every key the file may hold.
const KEYS: &[&str] = &[
    "BaseDir",
    "Port",
    "Listen",
    "CertFile",
    "KeyFile",
    "AllowNewHosts",
    "LogLevel",
    "LogFile",
    "PidFile",
    "SessionTimeout",
    "MaxConnections",
    "CompactInterval",
    "CompactThreshold",
    "MinFreeSpace",
    "SpaceCheckInterval",
    "HostIdleTimeout",
    "PurgeInterval",
    "AppendOnly",
];

const POSITIVE: &str = "expected a positive number of seconds";

/// A positive number of seconds.
fn positive_secs(v: &str) -> Option<Duration> {
    v.parse().ok().filter(|s| *s > 0).map(Duration::from_secs)
}

const SECS_OR_NEVER: &str = "expected a number of seconds (0: never)";

/// A number of seconds, 0 meaning never.
fn secs_or_never(v: &str) -> Option<Option<Duration>> {
    v.parse().ok().map(|s: u64| (s > 0).then(|| Duration::from_secs(s)))
}

/// The daemon's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the hosts' repositories live (`BaseDir`, `TARDIS_DB`, `--db`).
    pub base_dir: PathBuf,
    /// UDP port (`Port`, `TARDIS_PORT`, `--port`).
    pub port: u16,
    /// Address to listen on (`Listen`); `::` also accepts IPv4 where the system allows.
    pub listen: String,
    /// PEM certificate chain and key; generated self-signed on first start if both are absent.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Which hosts clients may create (`AllowNewHosts`: yes, no or a list of names;
    /// `--allow-new-hosts`) and which are append-only (`AppendOnly`).
    pub rules: Rules,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    pub log_level: String,
    /// Log destination when running in the background (stderr in the foreground).
    pub log_file: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    /// How long a disconnected client's claim on its host's running backup lasts, so that
    /// it can reconnect and resume; after that another client may back the host up.
    pub session_timeout: Duration,
    pub max_connections: u32,
    /// The maintenance jobs: scheduled compaction and purging when the disk runs low.
    pub jobs: JobConfig,
    /// An S3-compatible bucket for the segments (`S3*` keys); the base directory then keeps
    /// only the indexes, staging and caches.
    pub bucket: Option<BucketConfig>,
}

impl Config {
    /// Defaults for a repository under `base_dir`.
    pub fn with_base(base_dir: PathBuf) -> Config {
        Config {
            cert_file: base_dir.join(".tardisd/cert.pem"),
            key_file: base_dir.join(".tardisd/key.pem"),
            base_dir,
            port: tardis_net::proto::DEFAULT_PORT,
            listen: "::".into(),
            rules: Rules::default(),
            log_level: "info".into(),
            log_file: None,
            pid_file: None,
            session_timeout: Duration::from_secs(120),
            max_connections: 256,
            jobs: JobConfig {
                compact_every: Some(Duration::from_secs(6 * 3600)),
                compact_threshold: 0.5,
                min_free: MinFree::Off,
                space_check_every: Duration::from_secs(60),
                idle_close: Duration::from_secs(60),
                purge_every: None,
            },
            bucket: None,
        }
    }

    /// Reads `path`; `None` uses the default file if it exists (and defaults if not).
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let (path, required) = match path {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Config::parse(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Config::with_base(PathBuf::from("/srv/tardis")))
            }
            Err(e) => Err(Error::Config(format!("reading {}: {e}", path.display()))),
        }
    }

    /// Parses the text of a configuration file (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        let mut values: Vec<(&'static str, String, usize)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.starts_with('[') && line.ends_with(']') {
                continue;
            }
            let bad = |why: String| Error::Config(format!("{}:{}: {why}", path.display(), i + 1));
            let Some((k, v)) = line.split_once('=').or_else(|| line.split_once(':')) else {
                return Err(bad("expected `Key = Value`".into()));
            };
            let k = k.trim();
            let key =
                KEYS.iter().chain(tardis_log::bucket::KEYS).find(|known| known.eq_ignore_ascii_case(k)).ok_or_else(
                    || {
                        bad(format!(
                            "unknown key {k:?}; valid keys are {}, {}",
                            KEYS.join(", "),
                            tardis_log::bucket::KEYS.join(", ")
                        ))
                    },
                )?;
            values.push((key, v.trim().trim_matches('"').to_owned(), i + 1));
        }
        let base = values
            .iter()
            .rev()
            .find(|(k, _, _)| *k == "BaseDir")
            .map(|(_, v, _)| PathBuf::from(v))
            .unwrap_or_else(|| PathBuf::from("/srv/tardis"));
        let mut c = Config::with_base(base);
        for (key, v, line) in values {
            let bad = |why: &str| Error::Config(format!("{}:{line}: {key} = {v:?}: {why}", path.display()));
            match key {
                "BaseDir" => {}
                "Port" => c.port = v.parse().map_err(|_| bad("expected a port number 1-65535"))?,
                "Listen" => c.listen = v,
                "CertFile" => c.cert_file = PathBuf::from(v),
                "KeyFile" => c.key_file = PathBuf::from(v),
                "AllowNewHosts" => c.rules.new_hosts = parse_hosts(&v).map_err(|why| bad(&why))?,
                "AppendOnly" => c.rules.append_only = parse_hosts(&v).map_err(|why| bad(&why))?,
                "LogLevel" => {
                    if !["error", "warn", "info", "debug", "trace"].contains(&v.to_ascii_lowercase().as_str()) {
                        return Err(bad("expected error, warn, info, debug or trace"));
                    }
                    c.log_level = v.to_ascii_lowercase();
                }
                "LogFile" => c.log_file = Some(PathBuf::from(v)),
                "PidFile" => c.pid_file = Some(PathBuf::from(v)),
                "SessionTimeout" => {
                    let s: u64 = v.parse().map_err(|_| bad("expected a number of seconds"))?;
                    c.session_timeout = Duration::from_secs(s);
                }
                "MaxConnections" => {
                    c.max_connections =
                        v.parse().ok().filter(|n| *n > 0).ok_or_else(|| bad("expected a positive number"))?
                }
                "CompactInterval" => c.jobs.compact_every = secs_or_never(&v).ok_or_else(|| bad(SECS_OR_NEVER))?,
                "PurgeInterval" => c.jobs.purge_every = secs_or_never(&v).ok_or_else(|| bad(SECS_OR_NEVER))?,
                "CompactThreshold" => {
                    c.jobs.compact_threshold = v
                        .parse()
                        .ok()
                        .filter(|f| (0.0..=1.0).contains(f))
                        .ok_or_else(|| bad("expected a fraction from 0 to 1, e.g. 0.5"))?
                }
                "MinFreeSpace" => {
                    c.jobs.min_free =
                        MinFree::parse(&v).ok_or_else(|| bad("expected bytes (e.g. 10G, 500M) or a percentage (5%)"))?
                }
                "SpaceCheckInterval" => c.jobs.space_check_every = positive_secs(&v).ok_or_else(|| bad(POSITIVE))?,
                "HostIdleTimeout" => c.jobs.idle_close = positive_secs(&v).ok_or_else(|| bad(POSITIVE))?,
                s3 => {
                    let b = c.bucket.get_or_insert_with(BucketConfig::default);
                    b.set(s3, &v).map_err(|why| bad(&why))?;
                }
            }
        }
        if c.port == 0 {
            return Err(Error::Config(format!("{}: Port must not be 0", path.display())));
        }
        if let Some(b) = &c.bucket {
            b.check().map_err(|why| Error::Config(format!("{}: {why}", path.display())))?;
        }
        Ok(c)
    }
}

/// `yes`, `no`, or host names separated by commas or spaces.
fn parse_hosts(v: &str) -> std::result::Result<Hosts, String> {
    match parse_bool(v) {
        Some(true) => return Ok(Hosts::Any),
        Some(false) => return Ok(Hosts::None),
        None => {}
    }
    let mut names = std::collections::BTreeSet::new();
    for name in v.split([',', ' ', '\t']).filter(|n| !n.is_empty()) {
        tardis_log::repo::check_host_name(name).map_err(|e| {
            format!("expected yes, no or host names separated by commas, and {name:?} is not a host name: {e}")
        })?;
        names.insert(name.to_owned());
    }
    if names.is_empty() {
        return Err("expected yes, no or host names separated by commas".into());
    }
    Ok(Hosts::Only(names))
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" | "on" | "1" => Some(true),
        "no" | "false" | "off" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config> {
        Config::parse(t, Path::new("t.cfg"))
    }

    #[test]
    fn seed_style_file() {
        let c = parse(
            "[Tardis]\n# comment\nBaseDir = /data/backup\nport=7431\nAllowNewHosts = Yes\n; x\nSessionTimeout = 30\n\
             MinFreeSpace = 5%\nCompactInterval = 0\nHostIdleTimeout = 5\nPurgeInterval = 3600\n",
        )
        .unwrap();
        assert_eq!(c.jobs.idle_close, Duration::from_secs(5));
        assert_eq!(c.jobs.purge_every, Some(Duration::from_secs(3600)));
        assert_eq!(c.jobs.min_free, MinFree::Percent(5.0));
        assert_eq!(c.jobs.compact_every, None);
        assert_eq!(c.base_dir, PathBuf::from("/data/backup"));
        assert_eq!(c.cert_file, PathBuf::from("/data/backup/.tardisd/cert.pem"));
        assert_eq!(c.port, 7431);
        assert_eq!(c.rules.new_hosts, Hosts::Any);
        assert_eq!(c.rules.append_only, Hosts::None);
        let rules = parse("AllowNewHosts = web1, db1 pi\nAppendOnly = yes\n").unwrap().rules;
        let only = rules.new_hosts;
        assert!(only.contains("web1") && only.contains("pi") && !only.contains("other"), "{only}");
        assert!(rules.append_only.contains("anything"));
        assert_eq!(c.session_timeout, Duration::from_secs(30));
        assert_eq!(parse("").unwrap(), Config::with_base("/srv/tardis".into()));
    }

    #[test]
    fn errors_name_line_and_fix() {
        let e = parse("BaseDir = /x\nPrt = 1\n").unwrap_err().to_string();
        assert!(e.contains("t.cfg:2") && e.contains("unknown key") && e.contains("Port"), "{e}");
        let e = parse("Port = seventy\n").unwrap_err().to_string();
        assert!(e.contains("t.cfg:1") && e.contains("port number"), "{e}");
        let e = parse("AllowNewHosts = ,\n").unwrap_err().to_string();
        assert!(e.contains("expected yes, no or host names"), "{e}");
        let e = parse("AllowNewHosts = web1, ../etc\n").unwrap_err().to_string();
        assert!(e.contains("\"../etc\" is not a host name"), "{e}");
        assert!(parse("just words\n").is_err());
        assert!(parse("Port = 0\n").is_err());
        let e = parse("HostIdleTimeout = 0\n").unwrap_err().to_string();
        assert!(e.contains("positive number of seconds"), "{e}");
        let c = parse("S3Bucket = backups\nS3Endpoint = http://127.0.0.1:9000\n").unwrap();
        assert_eq!(c.bucket.unwrap().endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        let e = parse("S3Prefix = x\n").unwrap_err().to_string();
        assert!(e.contains("S3Bucket is missing"), "{e}");
        let e = parse("S3Bucket = NO\n").unwrap_err().to_string();
        assert!(e.contains("t.cfg:1") && e.contains("bucket name"), "{e}");
    }
}
