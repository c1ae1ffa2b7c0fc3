//! The client side: connecting, logging in, and [`RemoteRepo`], which implements
//! `tardis_core::api::Repository` over QUIC so that backup, restore and the mount run
//! unchanged against a remote repository.
//!
//! A lost connection (link down, server restart) is not an error for the caller: each call
//! reconnects with exponential backoff, logs in again with the same session token (which
//! keeps the run's claim on its host), and retries, until `retry_for` has passed. Every
//! request is safe to repeat: the server ignores chunks it already holds, an entry version
//! written twice is the same version, and opening or completing a set is idempotent for the
//! session that did it. Chunk uploads that failed midway first ask which chunks the server
//! still lacks, so nothing is sent twice.

use crate::error::{Error, Result};
use crate::proto::{self, ClientInfo, ErrorCode, Request, Response, SessionToken, MAX_FRAME, MAX_HANDSHAKE_FRAME};
use crate::tls::{self, KnownHosts, Seen, Trust};
use crate::transport;
use serde_bytes::ByteBuf;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tardis_core::api::{EntryVersion, HostInfo, HostKey, Repository, SetInfo, StoredChunk, Write};
use tardis_core::event::{FileVersion, SetStats};
use tardis_core::ids::{ChunkId, DirId, HostId, NameKey, SetId};
use tardis_core::login::LoginKey;

/// Chunk upload requests in flight at once.
const PARALLEL_UPLOADS: usize = 4;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Server name or address, as the user gave it.
    pub server: String,
    pub port: u16,
    pub trust: Trust,
    /// Who is connecting (for the server's log and its "busy" message).
    pub client: ClientInfo,
    /// How long to keep reconnecting after the connection is lost before giving up.
    pub retry_for: Duration,
}

impl ConnectOptions {
    /// `name:port`, the key of the known-hosts file and the name in messages.
    pub fn server_key(&self) -> String {
        if self.server.contains(':') && !self.server.starts_with('[') {
            format!("[{}]:{}", self.server, self.port) // an IPv6 address
        } else {
            format!("{}:{}", self.server, self.port)
        }
    }
}

/// The parts of a connection that outlive any one QUIC connection.
#[derive(Debug)]
struct Link {
    rt: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    opts: ConnectOptions,
    addr: SocketAddr,
}

impl Link {
    fn new(opts: ConnectOptions) -> Result<Link> {
        let server = opts.server_key();
        let addr = (opts.server.as_str(), opts.port)
            .to_socket_addrs()
            .map_err(|e| Error::Connect { server: server.clone(), reason: format!("resolving the name: {e}") })?
            .next()
            .ok_or_else(|| Error::Connect { server: server.clone(), reason: "the name has no address".into() })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tardis-net")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the network runtime", std::path::Path::new("-"), e))?;
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("valid address");
        let endpoint = {
            let _guard = rt.enter();
            let no_socket = |e: std::io::Error| Error::Connect {
                server: server.clone(),
                reason: format!("opening a UDP socket: {e}"),
            };
            let socket = transport::udp_socket(bind).map_err(no_socket)?;
            quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, Arc::new(quinn::TokioRuntime))
                .map_err(no_socket)?
        };
        Ok(Link { rt, endpoint, opts, addr })
    }

    fn server(&self) -> String {
        self.opts.server_key()
    }

    /// One QUIC connection with TLS set up and the `Hello` exchange done.
    async fn connect(&self) -> Result<(quinn::Connection, Welcome)> {
        let server = self.server();
        let (tls, seen) = tls::client_config(&self.opts.trust, &server)?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| Error::Tls(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(transport::transport_config()));
        // The TLS name: what the user typed, so a CA-issued certificate for it verifies.
        let name = self.opts.server.trim_start_matches('[').trim_end_matches(']');
        let connecting = self
            .endpoint
            .connect_with(config, self.addr, name)
            .map_err(|e| Error::Connect { server: server.clone(), reason: e.to_string() })?;
        let conn = match connecting.await {
            Ok(c) => c,
            Err(e) => return Err(self.handshake_error(e, seen.as_deref())),
        };
        let welcome = match exchange(&conn, &self.hello(), MAX_HANDSHAKE_FRAME).await.map_err(|e| self.name(e))? {
            Response::Welcome { version, software, allow_new_hosts } => {
                Welcome { version, software, allow_new_hosts, newly_pinned: None }
            }
            other => return Err(unexpected("hello", other)),
        };
        let mut welcome = welcome;
        if let (Trust::KnownHosts(path), Some(seen)) = (&self.opts.trust, seen) {
            let kh = KnownHosts::new(path.clone());
            let fp = seen.lock().unwrap_or_else(|p| p.into_inner()).fingerprint.clone();
            if let (Some(fp), None) = (fp, kh.lookup(&server)?) {
                kh.add(&server, &fp)?;
                welcome.newly_pinned = Some(fp);
            }
        }
        Ok((conn, welcome))
    }

    fn hello(&self) -> Request {
        Request::Hello {
            min: proto::PROTOCOL_MIN,
            max: proto::PROTOCOL_MAX,
            software: self.opts.client.software.clone(),
        }
    }

    fn handshake_error(&self, e: quinn::ConnectionError, seen: Option<&Mutex<Seen>>) -> Error {
        if let Some(seen) = seen {
            if let Some((pinned, offered)) = seen.lock().unwrap_or_else(|p| p.into_inner()).mismatch.clone() {
                let Trust::KnownHosts(file) = &self.opts.trust else {
                    unreachable!("pins exist only with known hosts")
                };
                return Error::PinMismatch { server: self.server(), pinned, offered, file: file.clone() };
            }
        }
        let reason = match &e {
            quinn::ConnectionError::TimedOut => "no answer (is tardisd running, and is UDP port open?)".to_owned(),
            other => other.to_string(),
        };
        Error::Connect { server: self.server(), reason }
    }

    /// Puts the server's name into transport errors.
    fn name(&self, e: Error) -> Error {
        match e {
            Error::Lost { reason, .. } => Error::Lost { server: self.server(), reason },
            other => other,
        }
    }
}

/// What the server said to `Hello`.
#[derive(Debug, Clone)]
pub struct Welcome {
    pub version: u16,
    pub software: String,
    pub allow_new_hosts: bool,
    /// The fingerprint pinned by this connection, if the server was not known before.
    pub newly_pinned: Option<String>,
}

/// Sends one request on a new stream and reads its single response.
async fn exchange(conn: &quinn::Connection, req: &Request, limit: usize) -> Result<Response> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(transport::lost)?;
    transport::write_frame(&mut send, req).await?;
    let _ = send.finish();
    match transport::read_frame::<Response>(&mut recv, limit).await? {
        Some(Response::Error { code, message }) => Err(Error::Server { code, message }),
        Some(r) => Ok(r),
        None => {
            // The stream ended without an answer: usually the connection is going away.
            match conn.close_reason() {
                Some(reason) => Err(transport::lost(reason)),
                None => Err(Error::Protocol(format!("no answer to {}", req.name()))),
            }
        }
    }
}

fn unexpected(what: &str, r: Response) -> Error {
    Error::Protocol(format!("unexpected answer to {what}: {r:?}").chars().take(200).collect())
}

/// A connection that has said hello but not logged in.
#[derive(Debug)]
pub struct Greeted {
    link: Link,
    conn: quinn::Connection,
    welcome: Welcome,
}

/// Connects and greets the server (no login yet).
pub fn connect(opts: ConnectOptions) -> Result<Greeted> {
    let link = Link::new(opts)?;
    let (conn, welcome) = link.rt.block_on(link.connect())?;
    Ok(Greeted { link, conn, welcome })
}

impl Greeted {
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The public header of `host`'s wrapped key, or `None` if the host does not exist.
    pub fn key_header(&self, host: &str) -> Result<Option<Vec<u8>>> {
        let req = Request::KeyHeader { host: host.to_owned() };
        match self.link.rt.block_on(exchange(&self.conn, &req, MAX_HANDSHAKE_FRAME))? {
            Response::KeyHeader { header } => Ok(header.map(ByteBuf::into_vec)),
            other => Err(unexpected("key-header", other)),
        }
    }

    /// Logs in as `host` with the key derived from its password.
    pub fn login(self, host: &str, key: LoginKey) -> Result<RemoteRepo> {
        let session = new_token()?;
        let info = self.link.rt.block_on(login(&self.link, &self.conn, host, &key, session))?;
        Ok(RemoteRepo::new(self, host, key, session, info))
    }

    /// Creates `host` with `key` (its wrapped master key and verifier) and logs in as it.
    pub fn create_host(self, host: &str, host_id: HostId, key: HostKey, login: LoginKey) -> Result<RemoteRepo> {
        let session = new_token()?;
        let binding = transport::binding(&self.conn)?;
        let req = Request::CreateHost {
            host: host.to_owned(),
            host_id,
            key,
            client: self.link.opts.client.clone(),
            session,
            proof: ByteBuf::from(login.prove(host, &binding).to_vec()),
        };
        let info = match self.link.rt.block_on(exchange(&self.conn, &req, MAX_HANDSHAKE_FRAME))? {
            Response::LoggedIn { info } => info,
            other => return Err(unexpected("create-host", other)),
        };
        Ok(RemoteRepo::new(self, host, login, session, info))
    }
}

fn new_token() -> Result<SessionToken> {
    let mut t = [0u8; 16];
    tardis_core::random_bytes(&mut t)?;
    Ok(t)
}

async fn login(
    link: &Link,
    conn: &quinn::Connection,
    host: &str,
    key: &LoginKey,
    session: SessionToken,
) -> Result<HostInfo> {
    let binding = transport::binding(conn)?;
    let req = Request::Login {
        host: host.to_owned(),
        client: link.opts.client.clone(),
        session,
        proof: ByteBuf::from(key.prove(host, &binding).to_vec()),
    };
    match exchange(conn, &req, MAX_HANDSHAKE_FRAME).await.map_err(|e| link.name(e))? {
        Response::LoggedIn { info } => Ok(info),
        other => Err(unexpected("login", other)),
    }
}

/// A host's repository on a `tardisd`, logged in.
#[derive(Debug)]
pub struct RemoteRepo {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    link: Link,
    host: String,
    key: LoginKey,
    session: SessionToken,
    info: HostInfo,
    /// The current connection and its generation (bumped by each reconnect).
    conn: Mutex<(quinn::Connection, u64)>,
    reconnecting: tokio::sync::Mutex<()>,
}

impl RemoteRepo {
    fn new(g: Greeted, host: &str, key: LoginKey, session: SessionToken, info: HostInfo) -> RemoteRepo {
        let inner = Inner {
            link: g.link,
            host: host.to_owned(),
            key,
            session,
            info,
            conn: Mutex::new((g.conn, 0)),
            reconnecting: tokio::sync::Mutex::new(()),
        };
        RemoteRepo { inner: Arc::new(inner) }
    }

    /// The host as the login returned it (with its wrapped key).
    pub fn info(&self) -> &HostInfo {
        &self.inner.info
    }

    /// `name:port` of the server.
    pub fn server(&self) -> String {
        self.inner.link.server()
    }

    fn call(&self, req: Request) -> Result<Response> {
        let inner = self.inner.clone();
        self.inner.link.rt.block_on(async move {
            inner
                .with_retry(req.name(), |conn, _| {
                    let req = req.clone();
                    async move { exchange(&conn, &req, MAX_FRAME).await }
                })
                .await
        })
    }
}

impl Drop for RemoteRepo {
    fn drop(&mut self) {
        let conn = self.inner.current().0;
        conn.close(quinn::VarInt::from_u32(transport::CLOSE_DONE), b"done");
        // Give the close frame a moment to leave, so the server frees the session at once.
        let endpoint = self.inner.link.endpoint.clone();
        self.inner.link.rt.block_on(async move {
            let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
        });
    }
}

impl Inner {
    fn current(&self) -> (quinn::Connection, u64) {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `attempt` on the current connection; on a transient failure, reconnects (with
    /// backoff, until `retry_for` has passed since the failure) and runs it again. `attempt`
    /// gets the attempt number, so uploads can first ask what still needs sending.
    async fn with_retry<T, F, Fut>(self: &Arc<Self>, what: &str, mut attempt: F) -> Result<T>
    where
        F: FnMut(quinn::Connection, u32) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut n = 0;
        let mut failed_since: Option<Instant> = None;
        let mut delay = Duration::from_millis(250);
        loop {
            let (conn, generation) = self.current();
            let err = match attempt(conn, n).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() => self.link.name(e),
                Err(e) => return Err(self.link.name(e)),
            };
            n += 1;
            let since = *failed_since.get_or_insert_with(Instant::now);
            tracing::warn!("{what}: {err}; reconnecting");
            loop {
                if since.elapsed() > self.link.opts.retry_for {
                    return Err(err);
                }
                match self.reconnect(generation).await {
                    Ok(()) => break,
                    Err(e) if e.is_transient() => {
                        tracing::info!("reconnecting to {}: {e}; next try in {delay:?}", self.link.server());
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(8));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Replaces the connection of `generation` with a new, logged-in one (unless another task
    /// already did).
    async fn reconnect(&self, generation: u64) -> Result<()> {
        let _one_at_a_time = self.reconnecting.lock().await;
        if self.current().1 != generation {
            return Ok(());
        }
        let (conn, _) = self.link.connect().await?;
        login(&self.link, &conn, &self.host, &self.key, self.session).await?;
        tracing::info!("reconnected to {}", self.link.server());
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = (conn, generation + 1);
        Ok(())
    }

    /// Uploads one group of chunks; a retry first drops the chunks the server now holds.
    async fn upload_chunks(self: Arc<Self>, set: SetId, group: Vec<Write>) -> Result<()> {
        let group = Arc::new(Mutex::new(group));
        self.with_retry("append", |conn, n| {
            let group = group.clone();
            async move {
                let writes = group.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let writes = if n == 0 { writes } else { still_missing(&conn, writes).await? };
                if writes.is_empty() {
                    return Ok(());
                }
                expect_done("append", exchange(&conn, &Request::Append { set, writes }, MAX_FRAME).await?)
            }
        })
        .await
    }
}

/// Of the chunk writes in `writes`, those the server does not hold.
async fn still_missing(conn: &quinn::Connection, writes: Vec<Write>) -> Result<Vec<Write>> {
    let ids: Vec<ChunkId> =
        writes.iter().filter_map(|w| if let Write::Chunk(c) = w { Some(c.id) } else { None }).collect();
    let missing = match exchange(conn, &Request::MissingChunks { ids }, MAX_FRAME).await? {
        Response::Missing { ids } => ids,
        other => return Err(unexpected("missing-chunks", other)),
    };
    let missing: std::collections::HashSet<ChunkId> = missing.into_iter().collect();
    Ok(writes.into_iter().filter(|w| matches!(w, Write::Chunk(c) if missing.contains(&c.id))).collect())
}

fn expect_done(what: &str, r: Response) -> Result<()> {
    match r {
        Response::Done => Ok(()),
        other => Err(unexpected(what, other)),
    }
}

impl Repository for RemoteRepo {
    fn host(&self) -> tardis_core::Result<Option<HostInfo>> {
        match self.call(Request::Host)? {
            Response::Host { info } => Ok(info),
            other => Err(unexpected("host", other).into()),
        }
    }

    fn create_host(&self, _host_id: HostId, _key: Option<HostKey>) -> tardis_core::Result<HostInfo> {
        // A logged-in host exists already; new hosts are created by `Greeted::create_host`.
        Err(Error::Server { code: ErrorCode::Refused, message: format!("host {} already exists", self.inner.host) }
            .into())
    }

    fn set_wrapped_key(&self, key: HostKey) -> tardis_core::Result<()> {
        Ok(expect_done("set-wrapped-key", self.call(Request::SetWrappedKey { key })?)?)
    }

    fn sets(&self) -> tardis_core::Result<Vec<SetInfo>> {
        match self.call(Request::Sets)? {
            Response::Sets { sets } => Ok(sets),
            other => Err(unexpected("sets", other).into()),
        }
    }

    fn lookup(&self, set: SetId, dir: &DirId, name: &NameKey) -> tardis_core::Result<Option<FileVersion>> {
        match self.call(Request::Lookup { set, dir: *dir, name: *name })? {
            Response::Version { version } => Ok(version),
            other => Err(unexpected("lookup", other).into()),
        }
    }

    fn list(&self, set: SetId, dir: &DirId) -> tardis_core::Result<Vec<FileVersion>> {
        let inner = self.inner.clone();
        let dir = *dir;
        let r = self.inner.link.rt.block_on(async move {
            inner
                .with_retry("list", |conn, _| async move {
                    let (mut send, mut recv) = conn.open_bi().await.map_err(transport::lost)?;
                    transport::write_frame(&mut send, &Request::List { set, dir }).await?;
                    let _ = send.finish();
                    let mut all = Vec::new();
                    loop {
                        match transport::read_frame::<Response>(&mut recv, MAX_FRAME).await? {
                            Some(Response::Page { versions, last }) => {
                                all.extend(versions);
                                if last {
                                    return Ok(all);
                                }
                            }
                            Some(Response::Error { code, message }) => return Err(Error::Server { code, message }),
                            Some(other) => return Err(unexpected("list", other)),
                            None => {
                                return Err(Error::Lost { server: String::new(), reason: "listing cut short".into() })
                            }
                        }
                    }
                })
                .await
        });
        Ok(r?)
    }

    fn history(&self, dir: &DirId, name: &NameKey) -> tardis_core::Result<Vec<EntryVersion>> {
        match self.call(Request::History { dir: *dir, name: *name })? {
            Response::History { versions } => Ok(versions),
            other => Err(unexpected("history", other).into()),
        }
    }

    fn read_chunk(&self, id: &ChunkId) -> tardis_core::Result<StoredChunk> {
        match self.call(Request::ReadChunk { id: *id })? {
            Response::Chunk { chunk } => Ok(chunk),
            other => Err(unexpected("read-chunk", other).into()),
        }
    }

    fn missing_chunks(&self, ids: &[ChunkId]) -> tardis_core::Result<Vec<ChunkId>> {
        let mut missing = Vec::new();
        // 64k IDs make a 2 MiB request: far below the frame limit.
        for part in ids.chunks(65536) {
            match self.call(Request::MissingChunks { ids: part.to_vec() })? {
                Response::Missing { ids } => missing.extend(ids),
                other => return Err(unexpected("missing-chunks", other).into()),
            }
        }
        Ok(missing)
    }

    fn open_set(&self, name: &str, priority: u32) -> tardis_core::Result<SetId> {
        match self.call(Request::OpenSet { name: name.to_owned(), priority })? {
            Response::SetOpened { set } => Ok(set),
            other => Err(unexpected("open-set", other).into()),
        }
    }

    fn append(&self, set: SetId, writes: Vec<Write>) -> tardis_core::Result<()> {
        let (chunk_groups, entry_groups) = proto::split_writes(writes);
        let inner = self.inner.clone();
        let r: Result<()> = self.inner.link.rt.block_on(async move {
            // Chunks on parallel streams, at most PARALLEL_UPLOADS groups at a time.
            let mut tasks = tokio::task::JoinSet::new();
            let mut first_err = None;
            for group in chunk_groups {
                while tasks.len() >= PARALLEL_UPLOADS {
                    if let Some(Err(e)) = tasks.join_next().await.map(flatten) {
                        first_err.get_or_insert(e);
                    }
                }
                if first_err.is_some() {
                    break;
                }
                tasks.spawn(inner.clone().upload_chunks(set, group));
            }
            while let Some(r) = tasks.join_next().await {
                if let Err(e) = flatten(r) {
                    first_err.get_or_insert(e);
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            // Then the entries that reference them, in order.
            for writes in entry_groups {
                let req = Request::Append { set, writes };
                let r = inner
                    .with_retry("append", |conn, _| {
                        let req = req.clone();
                        async move { exchange(&conn, &req, MAX_FRAME).await }
                    })
                    .await?;
                expect_done("append", r)?;
            }
            Ok(())
        });
        Ok(r?)
    }

    fn complete_set(&self, set: SetId, stats: SetStats, seal: Option<Vec<u8>>) -> tardis_core::Result<()> {
        let seal = seal.map(ByteBuf::from);
        Ok(expect_done("complete-set", self.call(Request::CompleteSet { set, stats, seal })?)?)
    }

    fn config(&self) -> tardis_core::Result<std::collections::BTreeMap<String, String>> {
        match self.call(Request::Config)? {
            Response::Config { values } => Ok(values),
            other => Err(unexpected("config", other).into()),
        }
    }

    fn set_config(&self, key: &str, value: Option<&str>) -> tardis_core::Result<()> {
        let req = Request::SetConfig { key: key.to_owned(), value: value.map(str::to_owned) };
        Ok(expect_done("set-config", self.call(req)?)?)
    }

    fn set_locked(&self, set: SetId, locked: bool) -> tardis_core::Result<()> {
        Ok(expect_done("set-locked", self.call(Request::SetLocked { set, locked })?)?)
    }

    fn purge_sets(&self, sets: &[SetId]) -> tardis_core::Result<()> {
        Ok(expect_done("purge-sets", self.call(Request::PurgeSets { sets: sets.to_vec() })?)?)
    }
}

fn flatten(r: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    r.map_err(|e| Error::Protocol(format!("upload task failed: {e}")))?
}
