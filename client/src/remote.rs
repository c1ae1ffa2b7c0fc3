//! Opening a host's repository on a `tardisd`: connect, derive the login key from the
//! password, log in (or create the host), and unwrap the master key, all with one Argon2id run.

use crate::error::{Error, Result};
use crate::seen::Seen;
use crate::session::{self, IfMissing};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;
use tardis_core::crypto::Keys;
use tardis_core::keywrap::KdfHeader;
use tardis_core::login::LoginKey;
use tardis_net::client::{self as net, ConnectOptions, RemoteRepo};
use tardis_net::proto::{ClientInfo, ErrorCode, DEFAULT_PORT};
use tardis_net::tls::Trust;

/// Where the server is and how to trust it.
#[derive(Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// Use the repository on this tardisd server instead of a local one
    #[arg(long, env = "TARDIS_SERVER", value_name = "HOST")]
    pub server: Option<String>,
    /// UDP port of the server
    #[arg(long, env = "TARDIS_PORT", value_name = "N", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Trust server certificates issued by the CA in FILE (PEM) instead of pinning on first use
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Where server certificates are pinned [default: ~/.config/tardis/known_hosts]
    #[arg(long, env = "TARDIS_KNOWN_HOSTS", value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Keep reconnecting this long after the connection to the server is lost
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    pub retry_for: u64,
}

impl ServerArgs {
    /// The known-hosts file.
    pub fn known_hosts_file(&self) -> PathBuf {
        if let Some(f) = &self.known_hosts {
            return f.clone();
        }
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| PathBuf::from("/etc"));
        config.join("tardis/known_hosts")
    }

    fn options(&self, server: &str, program: &str) -> ConnectOptions {
        let trust = match &self.ca {
            Some(ca) => Trust::Ca(ca.clone()),
            None => Trust::KnownHosts(self.known_hosts_file()),
        };
        let machine = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
        ConnectOptions {
            server: server.to_owned(),
            port: self.port,
            trust,
            client: ClientInfo {
                software: format!("{program} {}", env!("CARGO_PKG_VERSION")),
                machine,
                pid: std::process::id(),
            },
            retry_for: Duration::from_secs(self.retry_for),
        }
    }
}

/// Connects to `server`, logs in as `host` and opens its keys. With `IfMissing::Create`, a
/// host the server does not have is created (if the server allows it).
pub fn open(
    args: &ServerArgs,
    server: &str,
    program: &str,
    host: &str,
    password: Option<&[u8]>,
    if_missing: IfMissing,
) -> Result<(RemoteRepo, Keys)> {
    let password = password.ok_or_else(|| {
        Error::Invalid(format!(
            "a host on a server logs in with its password: give --password, --password-file or --password-prompt \
             (it also encrypts the backups of {host})"
        ))
    })?;
    let greeted = net::connect(args.options(server, program))?;
    if let Some(fp) = &greeted.welcome().newly_pinned {
        eprintln!(
            "{program}: first connection to {server}:{}: pinned its certificate {fp} in {}",
            args.port,
            args.known_hosts_file().display()
        );
    }
    let Some(header) = greeted.key_header(host)? else {
        if if_missing == IfMissing::Fail {
            let hint = if program == "tardis" { "add --create to create it, or check --host" } else { "check --host" };
            return Err(Error::Invalid(format!("host {host} does not exist on server {server}; {hint}")));
        }
        if !greeted.welcome().allow_new_hosts {
            return Err(Error::Invalid(format!(
                "host {host} does not exist on server {server}, and the server does not create hosts (set \
                 AllowNewHosts = yes in its tardisd.cfg); check --host"
            )));
        }
        let new = session::new_host(Some(password))?;
        let key = new.key.expect("a host with a password has a key");
        let login = new.login.expect("a host with a password has a login key");
        let repo = greeted.create_host(host, new.host_id, key, login)?;
        tracing::info!(host, server, "created host");
        return Ok((repo, new.keys));
    };
    let header = KdfHeader::from_bytes(&header)?;
    let secrets = header.derive(password)?;
    let repo = match greeted.login(host, LoginKey::from_secrets(&secrets)?) {
        Ok(r) => r,
        Err(tardis_net::Error::Server { code: ErrorCode::Auth, message }) if message.starts_with("wrong password") => {
            return Err(Error::WrongPassword { host: host.to_owned() })
        }
        Err(e) => return Err(e.into()),
    };
    let info = repo.info().clone();
    let wrapped = session::wrapped_key(&info)?;
    let keys = session::unwrap_keys(&info, &wrapped, &secrets)?;
    Ok((repo, keys))
}

/// A repository opened by one of the Tardis programs: embedded or on a server.
#[derive(Debug)]
pub enum Opened {
    Local(Box<tardis_log::Repo>),
    Remote(RemoteRepo),
}

impl Opened {
    pub fn repo(&self) -> &dyn tardis_core::api::Repository {
        match self {
            Opened::Local(r) => r.as_ref(),
            Opened::Remote(r) => r,
        }
    }

    pub fn into_arc(self) -> std::sync::Arc<dyn tardis_core::api::Repository> {
        match self {
            Opened::Local(r) => std::sync::Arc::new(*r),
            Opened::Remote(r) => std::sync::Arc::new(r),
        }
    }
}

/// Opens the host's repository, on `--server` if one is given, else at `--db`, and its keys,
/// and checks its set list: every live set sealed by the host key, and none missing from the
/// newest this client has seen ([`Seen`]).
pub fn open_any(
    repo: &crate::cli::RepoArgs,
    server: &ServerArgs,
    program: &str,
    password: Option<&[u8]>,
    if_missing: IfMissing,
) -> Result<(Opened, Keys, Seen)> {
    let (opened, keys) = open_any_unchecked(repo, server, program, password, if_missing)?;
    let seen = Seen::new(&repo.state_dir(), keys.host());
    seen.check(&repo.host_name()?, &keys, &opened.repo().sets()?)?;
    Ok((opened, keys, seen))
}

/// [`open_any`] without the set-list check, for `verify`, which reports what the check finds
/// along with everything else.
pub fn open_any_unchecked(
    repo: &crate::cli::RepoArgs,
    server: &ServerArgs,
    program: &str,
    password: Option<&[u8]>,
    if_missing: IfMissing,
) -> Result<(Opened, Keys)> {
    let host = repo.host_name()?;
    if let Some(s) = &server.server {
        let (r, keys) = open(server, s, program, &host, password, if_missing)?;
        return Ok((Opened::Remote(r), keys));
    }
    let r = repo.open_local(if_missing == IfMissing::Create)?;
    let keys = session::open_keys(&r, &host, password, if_missing)?;
    Ok((Opened::Local(Box::new(r)), keys))
}
