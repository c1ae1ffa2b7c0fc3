//! What the daemon does with requests, independent of the network: the hosts' repositories,
//! login checks, and the claim ("lease") that keeps one backup per host running at a time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tardis_core::api::{HostInfo, HostKey, Repository, SetState};
use tardis_core::ids::{HostId, SetId};
use tardis_core::keywrap::KdfHeader;
use tardis_core::login::{self, BINDING_LEN};
use tardis_log::{Repo, RepoOptions};
use tardis_net::proto::{ClientInfo, ErrorCode, Request, Response, SessionToken, LIST_PAGE};

/// A refusal to send back: the code and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal { code, message: message.into() }
    }

    pub fn response(self) -> Response {
        Response::Error { code: self.code, message: self.message }
    }
}

impl From<tardis_core::Error> for Refusal {
    fn from(e: tardis_core::Error) -> Refusal {
        match e {
            tardis_core::Error::NotFound(what) => Refusal::new(ErrorCode::NotFound, what),
            other => Refusal::new(ErrorCode::Refused, tardis_core::chain(&other)),
        }
    }
}

impl From<tardis_log::Error> for Refusal {
    fn from(e: tardis_log::Error) -> Refusal {
        Refusal::new(ErrorCode::Refused, tardis_core::chain(&e))
    }
}

type Reply<T> = std::result::Result<T, Refusal>;

/// A choice of hosts made in `tardisd.cfg` (`no`, `yes` or names): which hosts clients may
/// create (`AllowNewHosts`), which are append-only (`AppendOnly`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Hosts {
    #[default]
    None,
    Any,
    Only(std::collections::BTreeSet<String>),
}

impl Hosts {
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Hosts::None => false,
            Hosts::Any => true,
            Hosts::Only(names) => names.contains(name),
        }
    }
}

impl std::fmt::Display for Hosts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hosts::None => f.write_str("no"),
            Hosts::Any => f.write_str("yes"),
            Hosts::Only(names) => f.write_str(&names.iter().cloned().collect::<Vec<_>>().join(", ")),
        }
    }
}

/// What the daemon lets clients do beyond backing up and reading their own host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// `AllowNewHosts`.
    pub new_hosts: Hosts,
    /// `AppendOnly`: their clients may add sets and lock them, but not purge, unlock, change
    /// the configuration or the password; that is done on the server with `tardis-tools --db`.
    pub append_only: Hosts,
}

/// The claim of one client run on its host's backup.
#[derive(Debug, Clone)]
struct Lease {
    session: SessionToken,
    client: ClientInfo,
    peer: SocketAddr,
    since: SystemTime,
    /// The set this run opened.
    set: Option<SetId>,
    /// Connections of this run that are open now.
    live: u32,
    /// When the last of them closed.
    left: Option<Instant>,
}

/// One host's open repository and its lease.
#[derive(Debug)]
pub struct Host {
    name: String,
    repo: Repo,
    lease: Mutex<Option<Lease>>,
    /// When a login, a job or a closing connection last used it: see [`Service::close_idle`].
    touched: Mutex<Instant>,
}

impl Host {
    fn touch(&self) {
        *self.touched.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    pub fn repo(&self) -> &Repo {
        &self.repo
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What a client presents to log in: its proof for this connection's binding, its run's
/// token, who it is and where it connects from.
#[derive(Debug, Clone)]
pub struct LoginAttempt {
    pub binding: [u8; BINDING_LEN],
    pub proof: Vec<u8>,
    pub token: SessionToken,
    pub client: ClientInfo,
    pub peer: SocketAddr,
}

/// A logged-in connection's view: its host and its run.
#[derive(Debug, Clone)]
pub struct Session {
    pub host: Arc<Host>,
    pub token: SessionToken,
    pub client: ClientInfo,
    pub peer: SocketAddr,
}

/// The daemon's state.
#[derive(Debug)]
pub struct Service {
    base: PathBuf,
    rules: Rules,
    session_timeout: Duration,
    hosts: Mutex<HashMap<String, Arc<Host>>>,
    /// A fixed time (`TARDIS_NOW`, tests only) for the repositories' events and the jobs.
    clock: Option<i64>,
}

impl Service {
    pub fn new(base: PathBuf, rules: Rules, session_timeout: Duration, clock: Option<i64>) -> Service {
        Service { base, rules, session_timeout, hosts: Mutex::new(HashMap::new()), clock }
    }

    /// Now, in Unix nanoseconds: the fixed clock if there is one, else the system clock; the
    /// same time the repositories stamp sets with, so the retention schedule compares like
    /// with like.
    pub fn now(&self) -> i64 {
        self.clock.unwrap_or_else(tardis_log::clock::system_now)
    }

    /// Whether clients may create some host (what the greeting tells them).
    pub fn allow_new_hosts(&self) -> bool {
        self.rules.new_hosts != Hosts::None
    }

    /// The open repository of `name`, opening it on first use; `None` if the host has no
    /// repository (nothing is created for an unknown name).
    fn host(&self, name: &str, create: bool) -> Reply<Option<Arc<Host>>> {
        tardis_log::repo::check_host_name(name)?;
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = hosts.get(name) {
            h.touch();
            return Ok(Some(h.clone()));
        }
        if !create && !Repo::exists(&self.base, name)? {
            return Ok(None);
        }
        let clock = self.clock.map(|t| Arc::new(std::sync::atomic::AtomicI64::new(t)));
        let repo = Repo::open(&self.base, name, RepoOptions { clock, ..RepoOptions::default() })?;
        let h = Arc::new(Host {
            name: name.to_owned(),
            repo,
            lease: Mutex::new(None),
            touched: Mutex::new(Instant::now()),
        });
        hosts.insert(name.to_owned(), h.clone());
        tracing::info!(host = name, "opened repository");
        Ok(Some(h))
    }

    /// Where the repositories live.
    pub fn base(&self) -> &std::path::Path {
        &self.base
    }

    /// Every host with a repository under `BaseDir`, sorted.
    pub fn host_names(&self) -> Vec<String> {
        tardis_log::bucket::host_names(&self.base).unwrap_or_else(|e| {
            tracing::error!("listing the hosts: {e}");
            Vec::new()
        })
    }

    /// A host's open repository (opened if needed), for the maintenance jobs; `None` (with
    /// the reason logged) if it cannot be opened.
    pub fn open_host(&self, name: &str) -> Option<Arc<Host>> {
        match self.host(name, false) {
            Ok(h) => h,
            Err(r) => {
                tracing::error!(host = name, "opening the repository: {}", r.message);
                None
            }
        }
    }

    /// The repositories open now.
    pub fn open_hosts(&self) -> Vec<Arc<Host>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Closes the repositories that nothing has used for `idle`: no connection is logged in to
    /// the host, no job holds it, no run's claim on it is still in force, and nothing touched it
    /// for that long. A closed repository releases its lock, so that `tardis-tools --db` (verify,
    /// compact, rebuild-index) can open it on the server, and its index's memory; the next login
    /// opens it again. Returns how many were closed.
    pub fn close_idle(&self, idle: Duration) -> usize {
        // Only the map holds it (no session or job can take it while the map is locked), and
        // nothing used it for `idle`.
        let unused = |h: &Arc<Host>| {
            Arc::strong_count(h) == 1
                && self.unclaimed(h)
                && h.touched.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= idle
        };
        let candidates: Vec<String> = {
            let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            hosts.iter().filter(|(_, h)| unused(h)).map(|(n, _)| n.clone()).collect()
        };
        // Segments left staged by an outage of the object store go first, without the map
        // locked (an upload may take a while); a host whose upload fails stays open to retry.
        let uploaded: Vec<String> = candidates
            .into_iter()
            .filter(|name| {
                let Some(h) = self.hosts.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned() else {
                    return false;
                };
                h.repo.upload_sealed().map_err(|e| tracing::warn!(host = h.name, "segments stay staged: {e}")).is_ok()
            })
            .collect();
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for name in uploaded {
            if hosts.get(&name).is_some_and(unused) {
                // Dropped with the map locked, so that a login cannot try to open the repository
                // while this process still holds its lock file.
                drop(hosts.remove(&name));
                tracing::info!(host = name, "closed idle repository");
                closed += 1;
            }
        }
        closed
    }

    /// No run holds the host's claim, or the one that did has let it expire.
    fn unclaimed(&self, h: &Host) -> bool {
        h.lease.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_none_or(|l| self.expired(l))
    }

    /// A claim whose run has had no connection for `SessionTimeout`.
    fn expired(&self, l: &Lease) -> bool {
        l.live == 0 && l.left.is_some_and(|t| t.elapsed() >= self.session_timeout)
    }

    /// Drops every open repository (on shutdown, once no request uses them).
    pub fn close(&self) {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// The public header of a host's wrapped key.
    pub fn key_header(&self, name: &str) -> Reply<Option<Vec<u8>>> {
        let Some(h) = self.host(name, false)? else { return Ok(None) };
        let Some(info) = h.repo.host()? else { return Ok(None) };
        let Some(blob) = info.wrapped_key else {
            return Err(Refusal::new(
                ErrorCode::Auth,
                format!(
                    "host {name} was created without a password; only `--local` can use it (a remote host needs \
                     a password, which also encrypts its backups)"
                ),
            ));
        };
        Ok(Some(blob[..KdfHeader::LEN.min(blob.len())].to_vec()))
    }

    /// Checks a login proof and returns the session.
    pub fn login(&self, name: &str, a: LoginAttempt) -> Reply<(Session, HostInfo)> {
        let no_host = || Refusal::new(ErrorCode::NoHost, format!("host {name} does not exist on this server"));
        let host = self.host(name, false)?.ok_or_else(no_host)?;
        let info = host.repo.host()?.ok_or_else(no_host)?;
        let Some(verifier) = info.verifier else {
            return Err(Refusal::new(
                ErrorCode::Auth,
                format!(
                    "host {name} has no login verifier yet (its key predates them); run `tardis-tools --db {} --host \
                     {name} sets` with its password on the server once to add it",
                    self.base.display()
                ),
            ));
        };
        if !login::check(&verifier, name, &a.binding, &a.proof) {
            tracing::warn!(host = name, peer = %a.peer, "failed login");
            return Err(Refusal::new(ErrorCode::Auth, format!("wrong password for host {name}")));
        }
        tracing::info!(host = name, peer = %a.peer, client = %a.client, "login");
        self.attach(&host, a.token);
        Ok((Session { host, token: a.token, client: a.client, peer: a.peer }, info))
    }

    /// Creates a host and logs in as it.
    pub fn create_host(
        &self,
        name: &str,
        host_id: HostId,
        key: HostKey,
        a: LoginAttempt,
    ) -> Reply<(Session, HostInfo)> {
        if !self.rules.new_hosts.contains(name) {
            let why = match &self.rules.new_hosts {
                Hosts::Only(_) => format!(
                    "this server creates only the hosts named in AllowNewHosts, and host {name} is not one of them \
                     and does not exist: add it to AllowNewHosts in tardisd.cfg, or check --host"
                ),
                _ => format!(
                    "this server does not create hosts, and host {name} does not exist: set AllowNewHosts = yes in \
                     tardisd.cfg (or start tardisd with --allow-new-hosts), or check --host"
                ),
            };
            return Err(Refusal::new(ErrorCode::NewHostsNotAllowed, why));
        }
        // The proof shows the creator holds the key behind the verifier it registers.
        if !login::check(&key.verifier, name, &a.binding, &a.proof) {
            return Err(Refusal::new(ErrorCode::Auth, "the new host's login proof does not match its verifier"));
        }
        let host = self.host(name, true)?.expect("created on demand");
        if host.repo.host()?.is_some() {
            return Err(Refusal::new(ErrorCode::Refused, format!("host {name} already exists; log in instead")));
        }
        let info = host.repo.create_host(host_id, Some(key))?;
        tracing::info!(host = name, peer = %a.peer, client = %a.client, "created host");
        self.attach(&host, a.token);
        Ok((Session { host, token: a.token, client: a.client, peer: a.peer }, info))
    }

    /// Counts a new connection of a run that holds its host's lease (a reconnect).
    fn attach(&self, host: &Host, token: SessionToken) {
        let mut lease = host.lease.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = lease.as_mut().filter(|l| l.session == token) {
            l.live += 1;
            l.left = None;
        }
    }

    /// A connection of `session` closed.
    pub fn detach(&self, session: &Session) {
        session.host.touch();
        let mut lease = session.host.lease.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = lease.as_mut().filter(|l| l.session == session.token) {
            l.live = l.live.saturating_sub(1);
            if l.live == 0 {
                l.left = Some(Instant::now());
            }
        }
    }

    /// Takes (or confirms) the host's lease for `session`; refused while another live run
    /// holds it.
    fn claim(&self, s: &Session) -> Reply<()> {
        let mut lease = s.host.lease.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = lease.as_ref() {
            if l.session == s.token {
                return Ok(());
            }
            let expired = self.expired(l);
            if !expired {
                let since = humantime(l.since);
                let state = match l.left {
                    None => "connected".to_owned(),
                    Some(t) => format!(
                        "disconnected {} s ago; its claim expires after {} s",
                        t.elapsed().as_secs(),
                        self.session_timeout.as_secs()
                    ),
                };
                return Err(Refusal::new(
                    ErrorCode::Busy,
                    format!(
                        "host {} is being backed up by {} from {} since {since} ({state}); wait for it to finish",
                        s.host.name, l.client, l.peer
                    ),
                ));
            }
            tracing::warn!(host = %s.host.name, client = %l.client, "taking over the claim of a client that went away");
        }
        *lease = Some(Lease {
            session: s.token,
            client: s.client.clone(),
            peer: s.peer,
            since: SystemTime::now(),
            set: None,
            live: 1,
            left: None,
        });
        Ok(())
    }

    /// Handles one request of a logged-in session. `page` receives the pages of a listing
    /// (all but the last; the last page is the returned response).
    pub fn handle(&self, s: &Session, req: Request, page: &mut dyn FnMut(Response) -> bool) -> Response {
        match self.dispatch(s, req, page) {
            Ok(r) => r,
            Err(refusal) => refusal.response(),
        }
    }

    fn dispatch(&self, s: &Session, req: Request, page: &mut dyn FnMut(Response) -> bool) -> Reply<Response> {
        let repo = &s.host.repo;
        if self.rules.append_only.contains(&s.host.name) {
            let what = match &req {
                Request::PurgeSets { .. } => Some("purge sets"),
                Request::SetLocked { locked: false, .. } => Some("unlock sets"),
                Request::SetConfig { .. } => Some("change its configuration"),
                Request::SetWrappedKey { .. } => Some("change its password"),
                _ => None,
            };
            if let Some(what) = what {
                tracing::warn!(host = %s.host.name, peer = %s.peer, "refused to {what}: the host is append-only");
                return Err(Refusal::new(
                    ErrorCode::Refused,
                    format!(
                        "host {} is append-only on this server (AppendOnly in tardisd.cfg): its clients cannot {what}; \
                         do it on the server with `tardis-tools --db {}`",
                        s.host.name,
                        self.base.display()
                    ),
                ));
            }
        }
        Ok(match req {
            Request::Host => Response::Host { info: repo.host()? },
            Request::SetWrappedKey { key } => {
                repo.set_wrapped_key(key)?;
                Response::Done
            }
            Request::Sets => Response::Sets { sets: repo.sets()? },
            Request::Lookup { set, dir, name } => Response::Version { version: repo.lookup(set, &dir, &name)? },
            Request::List { set, dir } => {
                let mut versions = repo.list(set, &dir)?;
                while versions.len() > LIST_PAGE {
                    let rest = versions.split_off(LIST_PAGE);
                    if !page(Response::Page { versions, last: false }) {
                        return Err(Refusal::new(ErrorCode::Protocol, "listing abandoned by the client"));
                    }
                    versions = rest;
                }
                Response::Page { versions, last: true }
            }
            Request::History { dir, name } => Response::History { versions: repo.history(&dir, &name)? },
            Request::ReadChunk { id } => Response::Chunk { chunk: repo.read_chunk(&id)? },
            Request::MissingChunks { ids } => Response::Missing { ids: repo.missing_chunks(&ids)? },
            Request::OpenSet { name, priority } => {
                self.claim(s)?;
                let mut lease = s.host.lease.lock().unwrap_or_else(|p| p.into_inner());
                let l = lease.as_mut().expect("claimed above");
                // A retried open (the answer was lost) gets the set it already opened.
                if let Some(set) = l.set {
                    if repo.sets()?.iter().any(|i| i.id == set && i.state == SetState::Open) {
                        return Ok(Response::SetOpened { set });
                    }
                }
                let set = repo.open_set(&name, priority)?;
                l.set = Some(set);
                tracing::info!(host = %s.host.name, set, name, "set opened");
                Response::SetOpened { set }
            }
            Request::Append { set, writes } => {
                self.claim(s)?;
                repo.append(set, writes)?;
                Response::Done
            }
            Request::CompleteSet { set, stats, seal } => {
                self.claim(s)?;
                let done = repo.sets()?.iter().any(|i| i.id == set && i.state == SetState::Completed);
                if !done {
                    repo.complete_set(set, stats, seal.map(|s| s.into_vec()))?;
                    tracing::info!(host = %s.host.name, set, "set completed");
                }
                // The run is over: release the claim.
                let mut lease = s.host.lease.lock().unwrap_or_else(|p| p.into_inner());
                if lease.as_ref().is_some_and(|l| l.session == s.token) {
                    *lease = None;
                }
                Response::Done
            }
            Request::Config => Response::Config { values: repo.config()? },
            Request::SetConfig { key, value } => {
                repo.set_config(&key, value.as_deref())?;
                tracing::info!(host = %s.host.name, key, value, "configuration changed");
                Response::Done
            }
            Request::SetLocked { set, locked } => {
                repo.set_locked(set, locked)?;
                tracing::info!(host = %s.host.name, set, locked, "set lock changed");
                Response::Done
            }
            Request::PurgeSets { sets } => {
                repo.purge_sets(&sets)?;
                tracing::info!(host = %s.host.name, ?sets, "sets purged");
                Response::Done
            }
            Request::Hello { .. } | Request::KeyHeader { .. } | Request::Login { .. } | Request::CreateHost { .. } => {
                return Err(Refusal::new(ErrorCode::Protocol, format!("{} after login", req.name())))
            }
        })
    }
}

fn humantime(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_time() {
        assert_eq!(humantime(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(humantime(t), "2026-11-18 11:06:40 UTC");
    }
}
