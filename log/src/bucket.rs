//! Segments in an S3-compatible bucket (Ceph RGW, MinIO, Garage, AWS ...), behind [`Storage`].
//!
//! A repository base directory whose `storage.cfg` names a bucket keeps each host's segments as
//! objects `<S3Prefix>/<host>/segments/<16 hex digits>.seg`, byte for byte the local segment
//! files. Only the RocksDB index (rebuildable from the objects) and two caches stay on the
//! local disk:
//! - `<host>/segments/` is the staging area. A segment is written there while it is open and
//!   uploaded once it is sealed: when the log moves to the next segment, after every completed
//!   set, and before compaction deletes anything. A failed upload (the store is down) leaves
//!   the segment staged and durable on the local disk; the next seal retries it, so a backup
//!   carries on through an outage. A staged segment that is also in the bucket with the same
//!   length was uploaded just before a crash and is dropped on open.
//! - `<host>/cache/` holds uploaded segments, up to `S3CacheSize` bytes: whole ones (freshly
//!   uploaded segments move there, and stay across runs), and the 4 MiB blocks of others that
//!   ranged GETs fetched (dropped on open). Readers of a block being fetched wait for it.
//!
//! Every byte read back is still checked by the record CRCs, so neither cache is trusted.
//! `<host>/bucket` marks a host directory whose segments are in a bucket, so that losing
//! `storage.cfg` fails loudly instead of starting an empty local log.

use crate::error::{Error, Result};
use crate::storage::{segment_number, sync_dir, DirStorage, SegmentFile, Space, Storage};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;
use zeroize::Zeroizing;

/// The file in a repository base directory that names its bucket.
pub const DESCRIPTOR: &str = "storage.cfg";
/// The file in a host directory that says its segments are in a bucket.
const MARKER: &str = "bucket";
/// Unit of ranged GETs and of the read cache.
const BLOCK: u64 = 4 << 20;
/// Part size of multipart uploads; smaller segments go up in one PUT.
const PART: usize = 8 << 20;
/// Parts in flight per upload.
const PARTS_IN_FLIGHT: usize = 2;

/// The keys that configure a bucket, in `storage.cfg` and in `tardisd.cfg`.
pub const KEYS: &[&str] = &["S3Endpoint", "S3Bucket", "S3Prefix", "S3Region", "S3CredentialsFile", "S3CacheSize"];

/// Where a repository's segments live in a bucket. Holds no secret: the credentials come from
/// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` or from `credentials_file` when opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketConfig {
    /// `http(s)://host:port` of an S3-compatible server; AWS itself when `None`.
    pub endpoint: Option<String>,
    pub bucket: String,
    /// Object name prefix (no leading or trailing `/`), so one bucket can hold several repositories.
    pub prefix: String,
    pub region: String,
    pub credentials_file: Option<PathBuf>,
    /// Bytes of fetched segment blocks kept on the local disk per host.
    pub cache_size: u64,
}

impl Default for BucketConfig {
    fn default() -> Self {
        BucketConfig {
            endpoint: None,
            bucket: String::new(),
            prefix: String::new(),
            region: "us-east-1".into(),
            credentials_file: None,
            cache_size: 1 << 30,
        }
    }
}

impl BucketConfig {
    /// Applies one `Key = Value` pair. `Ok(false)` if `key` is not a bucket key; `Err` says
    /// what is wrong with the value.
    pub fn set(&mut self, key: &str, value: &str) -> std::result::Result<bool, String> {
        let Some(key) = KEYS.iter().find(|k| k.eq_ignore_ascii_case(key)) else { return Ok(false) };
        match *key {
            "S3Endpoint" => {
                let url = value.trim_end_matches('/');
                let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
                if rest.is_none_or(str::is_empty) {
                    return Err("expected a URL starting with http:// or https://".into());
                }
                self.endpoint = Some(url.to_owned());
            }
            "S3Bucket" => {
                let ok = (3..=63).contains(&value.len())
                    && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
                if !ok {
                    return Err("expected a bucket name: 3 to 63 lower-case letters, digits, '-' or '.'".into());
                }
                self.bucket = value.to_owned();
            }
            "S3Prefix" => {
                // Slashes and blanks at either end are not part of the prefix (stable: a
                // rendered prefix reads back the same).
                let mut p = value;
                while p.trim().trim_matches('/') != p {
                    p = p.trim().trim_matches('/');
                }
                if p.split('/').any(|part| part.is_empty() || part == "." || part == "..") && !p.is_empty() {
                    return Err("expected path parts separated by '/', none empty, '.' or '..'".into());
                }
                self.prefix = p.to_owned();
            }
            "S3Region" => self.region = value.to_owned(),
            "S3CredentialsFile" => self.credentials_file = Some(PathBuf::from(value)),
            "S3CacheSize" => {
                self.cache_size = tardis_core::config::parse_size(value)
                    .ok_or_else(|| "expected bytes, e.g. 1G or 512M".to_owned())?;
            }
            _ => unreachable!("every key in KEYS is handled"),
        }
        Ok(true)
    }

    /// Reads the bucket keys of a `Key = Value` file (`storage.cfg`, or a `tardisd.cfg` when
    /// `other_keys` is true, whose other keys are skipped). `None` if it names no bucket.
    pub fn from_file(path: &Path, other_keys: bool) -> Result<Option<BucketConfig>> {
        let text = fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        BucketConfig::parse(&text, path, other_keys)
    }

    /// Parses the text of such a file (`path` is for messages).
    pub fn parse(text: &str, path: &Path, other_keys: bool) -> Result<Option<BucketConfig>> {
        let mut cfg = BucketConfig::default();
        let mut any = false;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') || line.starts_with('[') {
                continue;
            }
            let bad = |why: String| Error::Refused(format!("{}:{}: {why}", path.display(), i + 1));
            let Some((k, v)) = line.split_once('=') else { return Err(bad("expected `Key = Value`".into())) };
            let (k, v) = (k.trim(), v.trim().trim_matches('"').trim());
            match cfg.set(k, v) {
                Ok(true) => any = true,
                Ok(false) if other_keys => {}
                Ok(false) => return Err(bad(format!("unknown key {k:?}; valid keys are {}", KEYS.join(", ")))),
                Err(why) => return Err(bad(format!("{k} = {v:?}: {why}"))),
            }
        }
        if !any {
            return Ok(None);
        }
        cfg.check().map_err(|why| Error::Refused(format!("{}: {why}", path.display())))?;
        Ok(Some(cfg))
    }

    /// Checks that the keys together name a bucket.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.bucket.is_empty() {
            return Err("S3Bucket is missing: every S3 key needs S3Bucket = NAME".into());
        }
        Ok(())
    }

    /// The text of `storage.cfg` for this bucket.
    pub fn render(&self) -> String {
        let mut s = String::from("# Segments of this repository's hosts are in this bucket (tardis-log bucket.rs).\n");
        if let Some(e) = &self.endpoint {
            s += &format!("S3Endpoint = {e}\n");
        }
        s += &format!("S3Bucket = {}\nS3Prefix = {}\nS3Region = {}\n", self.bucket, self.prefix, self.region);
        if let Some(f) = &self.credentials_file {
            s += &format!("S3CredentialsFile = {}\n", f.display());
        }
        s += &format!("S3CacheSize = {}\n", self.cache_size);
        s
    }

    /// `s3://bucket/prefix`, for messages.
    pub fn url(&self) -> String {
        match self.prefix.as_str() {
            "" => format!("s3://{}", self.bucket),
            p => format!("s3://{}/{p}", self.bucket),
        }
    }

    fn credentials(&self) -> Result<Credentials> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            return Ok(Credentials { id, secret: Zeroizing::new(secret) });
        }
        let Some(path) = &self.credentials_file else {
            return Err(Error::Refused(format!(
                "no credentials for {}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or S3CredentialsFile",
                self.url()
            )));
        };
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| Error::io("reading credentials", path, e))?);
        let (mut id, mut secret) = (None, None);
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            let v = v.trim().trim_matches('"').to_owned();
            match k.trim().to_ascii_lowercase().as_str() {
                "accesskeyid" | "aws_access_key_id" => id = Some(v),
                "secretaccesskey" | "aws_secret_access_key" => secret = Some(Zeroizing::new(v)),
                _ => {}
            }
        }
        match (id, secret) {
            (Some(id), Some(secret)) => Ok(Credentials { id, secret }),
            _ => Err(Error::Refused(format!(
                "{} must hold `AccessKeyId = ...` and `SecretAccessKey = ...` lines",
                path.display()
            ))),
        }
    }

    /// A client for the bucket.
    pub fn client(&self) -> Result<Arc<dyn ObjectStore>> {
        let creds = self.credentials()?;
        // Fail fast enough that a backup carries on (staging) during an outage, and retry
        // long enough to ride out a restart of the store.
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(4),
                base: 2.0,
            },
            max_retries: 4,
            retry_timeout: Duration::from_secs(30),
        };
        let http = self.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
        let options = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(300))
            .with_allow_http(http);
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_access_key_id(&creds.id)
            .with_secret_access_key(creds.secret.as_str())
            .with_retry(retry)
            .with_client_options(options);
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e);
        }
        let store = b.build().map_err(|e| Error::Refused(format!("configuring the client of {}: {e}", self.url())))?;
        Ok(Arc::new(store))
    }

    fn host_dir(&self, host: &str) -> ObjPath {
        let mut parts: Vec<&str> = self.prefix.split('/').filter(|p| !p.is_empty()).collect();
        parts.extend([host, "segments"]);
        ObjPath::from_iter(parts)
    }
}

struct Credentials {
    id: String,
    secret: Zeroizing<String>,
}

/// Where a base directory's segments are.
#[derive(Debug, Clone)]
pub enum Backend {
    /// `<host>/segments/` on the local disk.
    Local,
    Bucket(BucketConfig),
}

impl Backend {
    /// Reads `<base>/storage.cfg`; `Local` without one.
    pub fn of(base: &Path) -> Result<Backend> {
        let path = base.join(DESCRIPTOR);
        if !path.exists() {
            return Ok(Backend::Local);
        }
        match BucketConfig::from_file(&path, false)? {
            Some(cfg) => Ok(Backend::Bucket(cfg)),
            None => Err(Error::Refused(format!("{} names no bucket: add S3Bucket = NAME", path.display()))),
        }
    }
}

/// Names every host with segments under `base`: in its directory and, for a bucket, under the
/// bucket's prefix (a new machine has only the bucket).
pub fn host_names(base: &Path) -> Result<Vec<String>> {
    let mut names: BTreeSet<String> = fs::read_dir(base)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.') && has_local_segments(base, n))
        .collect();
    if let Backend::Bucket(cfg) = Backend::of(base)? {
        let prefix = (!cfg.prefix.is_empty()).then(|| ObjPath::from(cfg.prefix.as_str()));
        let listed = list(&cfg.client()?, prefix).map_err(|e| Error::io("listing hosts in", cfg.url(), e))?;
        names.extend(listed.common_prefixes.iter().filter_map(|p| p.filename().map(str::to_owned)));
    }
    Ok(names.into_iter().collect())
}

fn has_local_segments(base: &Path, host: &str) -> bool {
    fs::read_dir(base.join(host).join("segments")).is_ok_and(|mut d| d.next().is_some())
}

/// Whether `host` has segments under `base`, locally or in its bucket.
pub fn host_exists(base: &Path, host: &str) -> Result<bool> {
    if has_local_segments(base, host) {
        return Ok(true);
    }
    match Backend::of(base)? {
        Backend::Local => Ok(false),
        Backend::Bucket(cfg) => Ok(!remote_segments(&cfg, host)?.is_empty()),
    }
}

/// The segments of `host` in the bucket, with their lengths.
pub fn remote_segments(cfg: &BucketConfig, host: &str) -> Result<BTreeMap<u64, u64>> {
    segments_in(&cfg.client()?, &cfg.host_dir(host)).map_err(|e| Error::io("listing segments in", cfg.url(), e))
}

/// Makes `base` keep its segments in the bucket `cfg`: writes `storage.cfg`, durably. Refused
/// when `base` already names another bucket, or holds local hosts that `tardis-tools migrate`
/// must move first.
pub fn adopt(base: &Path, cfg: &BucketConfig) -> Result<()> {
    match Backend::of(base)? {
        Backend::Bucket(old) if old == *cfg => return Ok(()),
        Backend::Bucket(old) if old.url() == cfg.url() && old.endpoint == cfg.endpoint => {}
        Backend::Bucket(old) => {
            return Err(Error::Refused(format!(
            "{} keeps its segments in {} ({}), not in {}; change the S3 settings back, or use another base directory",
            base.display(),
            old.url(),
            base.join(DESCRIPTOR).display(),
            cfg.url()
        )))
        }
        Backend::Local => {
            let local: Vec<String> = host_names(base)?;
            if !local.is_empty() {
                return Err(Error::Refused(format!(
                    "{} holds local repositories ({}); move them into {} first with `tardis-tools --db {} migrate --config FILE`",
                    base.display(),
                    local.join(", "),
                    cfg.url(),
                    base.display()
                )));
            }
        }
    }
    write_descriptor(base, cfg)
}

/// Writes `<base>/storage.cfg` atomically and durably.
pub fn write_descriptor(base: &Path, cfg: &BucketConfig) -> Result<()> {
    fs::create_dir_all(base).map_err(|e| Error::io("creating", base, e))?;
    write_settings(base, DESCRIPTOR, cfg)
}

/// Writes `cfg`'s settings to `dir/name` atomically (temporary file, fsync, rename, directory
/// fsync): `storage.cfg`, and the `bucket` marker of a host directory.
fn write_settings(dir: &Path, name: &str, cfg: &BucketConfig) -> Result<()> {
    let (path, tmp) = (dir.join(name), dir.join(format!(".{name}.tmp")));
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        io::Write::write_all(&mut f, cfg.render().as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(dir)
    };
    write().map_err(|e| Error::io("writing", &path, e))
}

/// Refuses to open `dir` (a host directory) with local segments when it is marked as keeping
/// them in a bucket.
pub fn check_not_marked(dir: &Path) -> Result<()> {
    let marker = dir.join(MARKER);
    match fs::read_to_string(&marker) {
        Ok(text) => Err(Error::Refused(format!(
            "{} keeps its segments in a bucket ({}), but {} is missing; put it back (its settings are in {}) \
             or run `tardis-tools migrate` again if it was interrupted",
            dir.display(),
            text.lines().find(|l| l.starts_with("S3Bucket")).unwrap_or("S3Bucket = ?").trim(),
            dir.parent().unwrap_or(dir).join(DESCRIPTOR).display(),
            marker.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("reading", marker, e)),
    }
}

/// The runtime the blocking [`Storage`] calls run the client's futures on. Its own, so that
/// callers may be on a Tokio worker thread of the daemon (where `block_on` would panic).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tardis-s3")
            .enable_all()
            .build()
            .expect("a Tokio runtime can be started")
    })
}

/// Runs `f` on [`runtime`] and waits for it.
fn run<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> io::Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv().map_err(|_| io::Error::other("the S3 client stopped"))
}

fn store_error(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e.to_string()),
        e => io::Error::other(e.to_string()),
    }
}

/// One listing of the objects and common prefixes under `prefix` (the whole bucket if `None`).
fn list(store: &Arc<dyn ObjectStore>, prefix: Option<ObjPath>) -> io::Result<object_store::ListResult> {
    let store = store.clone();
    run(async move { store.list_with_delimiter(prefix.as_ref()).await }).and_then(|r| r.map_err(store_error))
}

/// The segment objects under `dir`, with their lengths.
fn segments_in(store: &Arc<dyn ObjectStore>, dir: &ObjPath) -> io::Result<BTreeMap<u64, u64>> {
    let listed = list(store, Some(dir.clone()))?;
    Ok(listed.objects.iter().filter_map(|o| Some((o.location.filename().and_then(segment_number)?, o.size))).collect())
}

/// Which segments are staged locally and which are in the bucket (with their lengths).
#[derive(Debug, Default)]
struct State {
    staged: BTreeSet<u64>,
    uploaded: BTreeMap<u64, u64>,
}

/// One host's segments: staged locally while open, in the bucket once sealed.
pub struct BucketStorage {
    store: Arc<dyn ObjectStore>,
    dir: ObjPath,
    url: String,
    staging: DirStorage,
    cache: Cache,
    state: RwLock<State>,
}

impl std::fmt::Debug for BucketStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BucketStorage").field("url", &self.url).finish_non_exhaustive()
    }
}

impl BucketStorage {
    /// Opens `host`'s segments in the bucket, staging in `host_dir/segments` and caching in
    /// `host_dir/cache`. Lists the bucket once; drops staged copies that are already uploaded.
    pub fn open(cfg: &BucketConfig, host_dir: &Path, host: &str) -> Result<BucketStorage> {
        let store = cfg.client()?;
        let dir = cfg.host_dir(host);
        let url = format!("s3://{}/{dir}", cfg.bucket);
        let staging = DirStorage::new(&host_dir.join("segments"), &host_dir.join("quarantine"))
            .map_err(|e| Error::io("opening staging directory", host_dir.join("segments"), e))?;
        if !host_dir.join(MARKER).exists() {
            write_settings(host_dir, MARKER, cfg)?;
        }
        let uploaded = segments_in(&store, &dir).map_err(|e| Error::io("listing segments in", &url, e))?;
        let mut state = State { uploaded, ..State::default() };
        for seg in staging.list().map_err(|e| Error::io("listing", staging.path(0), e))? {
            match state.uploaded.get(&seg) {
                Some(&len) if staging.len(seg).ok() == Some(len) => {
                    // Uploaded just before a crash or by `migrate`: the bucket's copy is the one.
                    staging.remove(seg).map_err(|e| Error::io("removing uploaded", staging.path(seg), e))?;
                }
                _ => {
                    state.staged.insert(seg);
                }
            }
        }
        let cache = Cache::new(&host_dir.join("cache"), cfg.cache_size, &state.uploaded)?;
        Ok(BucketStorage { store, dir, url, staging, cache, state: RwLock::new(state) })
    }

    fn object(&self, seg: u64) -> ObjPath {
        self.dir.clone().join(format!("{seg:016x}.seg").as_str())
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Segments staged locally (for tests and `migrate`).
    pub fn staged(&self) -> Vec<u64> {
        self.state().staged.iter().copied().collect()
    }

    /// Uploads one sealed, staged segment, checks its length in the bucket, and moves the local
    /// copy into the read cache.
    fn upload(&self, seg: u64) -> io::Result<()> {
        let path = self.staging.path(seg);
        let len = fs::metadata(&path)?.len();
        let (store, object) = (self.store.clone(), self.object(seg));
        if len <= PART as u64 {
            let bytes = fs::read(&path)?;
            run(async move { store.put(&object, PutPayload::from(bytes)).await })?.map_err(store_error)?;
        } else {
            let mut file = File::open(&path)?;
            run(async move {
                let upload = store.put_multipart(&object).await.map_err(store_error)?;
                let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
                let mut buf = vec![0u8; PART];
                loop {
                    // A blocking read of one part from the local disk: short next to its upload.
                    let n = read_full(&mut file, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    w.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(store_error)?;
                    w.write(&buf[..n]);
                }
                w.finish().await.map_err(store_error).map(|_| ())
            })??;
        }
        let (store, object) = (self.store.clone(), self.object(seg));
        let meta = run(async move { store.head(&object).await })?.map_err(store_error)?;
        if meta.size != len {
            return Err(io::Error::other(format!(
                "the bucket holds {} bytes of segment {seg} after uploading {len}",
                meta.size
            )));
        }
        let mut state = self.state_mut();
        state.staged.remove(&seg);
        state.uploaded.insert(seg, len);
        self.staging.forget_reader(seg);
        if let Err(e) = self.cache.adopt(seg, &path, len) {
            tracing::warn!(segment = seg, "keeping an uploaded segment in the cache: {e}");
            let _ = fs::remove_file(&path);
        }
        drop(state);
        tracing::info!(segment = seg, bytes = len, bucket = %self.url, "uploaded segment");
        Ok(())
    }

    fn fetch(&self, seg: u64, range: std::ops::Range<u64>) -> io::Result<Vec<u8>> {
        let (store, object) = (self.store.clone(), self.object(seg));
        let bytes = run(async move { store.get_range(&object, range).await })?.map_err(store_error)?;
        Ok(bytes.to_vec())
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

impl Storage for BucketStorage {
    fn list(&self) -> io::Result<Vec<u64>> {
        let s = self.state();
        let mut all: Vec<u64> = s.staged.iter().chain(s.uploaded.keys()).copied().collect();
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    fn create(&self, seg: u64, header: &[u8]) -> io::Result<Box<dyn SegmentFile>> {
        if self.state().uploaded.contains_key(&seg) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("segment {seg} is in the bucket")));
        }
        let f = self.staging.create(seg, header)?;
        self.state_mut().staged.insert(seg);
        Ok(f)
    }

    fn open_append(&self, seg: u64) -> io::Result<Box<dyn SegmentFile>> {
        if !self.appendable(seg) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, format!("segment {seg} is sealed in the bucket")));
        }
        self.staging.open_append(seg)
    }

    fn appendable(&self, seg: u64) -> bool {
        self.state().staged.contains(&seg)
    }

    fn len(&self, seg: u64) -> io::Result<u64> {
        let s = self.state();
        if s.staged.contains(&seg) {
            return self.staging.len(seg);
        }
        s.uploaded
            .get(&seg)
            .copied()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no segment {seg} in {}", self.url)))
    }

    fn read_at(&self, seg: u64, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = {
            let s = self.state();
            if s.staged.contains(&seg) {
                // Read under the lock: an upload moves the file away only under the write lock.
                return self.staging.read_at(seg, offset, buf);
            }
            *s.uploaded
                .get(&seg)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no segment {seg} in {}", self.url)))?
        };
        if offset + buf.len() as u64 > len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("read past the end of segment {seg}")));
        }
        self.cache.read(seg, offset, buf, len, &|range| self.fetch(seg, range))
    }

    fn truncate(&self, seg: u64, len: u64) -> io::Result<()> {
        if !self.appendable(seg) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, format!("segment {seg} is sealed in the bucket")));
        }
        self.staging.truncate(seg, len)
    }

    fn remove(&self, seg: u64) -> io::Result<()> {
        let (staged, uploaded) = {
            let s = self.state();
            (s.staged.contains(&seg), s.uploaded.contains_key(&seg))
        };
        if uploaded {
            let (store, object) = (self.store.clone(), self.object(seg));
            run(async move { store.delete(&object).await })?.map_err(store_error)?;
            self.state_mut().uploaded.remove(&seg);
            self.cache.drop_segment(seg);
        }
        if staged {
            let mut s = self.state_mut();
            self.staging.remove(seg)?;
            s.staged.remove(&seg);
        }
        Ok(())
    }

    fn quarantine(&self, seg: u64, offset: u64, bytes: &[u8]) -> io::Result<PathBuf> {
        self.staging.quarantine(seg, offset, bytes)
    }

    fn describe(&self, seg: u64) -> PathBuf {
        if self.state().staged.contains(&seg) || seg == 0 {
            return self.staging.describe(seg);
        }
        PathBuf::from(format!("{}/{seg:016x}.seg", self.url))
    }

    fn space(&self) -> io::Result<Option<Space>> {
        // Only staging can fill up: it is what must never run out mid-write.
        self.staging.space()
    }

    fn remote(&self) -> bool {
        true
    }

    fn seal(&self, below: u64) -> io::Result<()> {
        let due: Vec<u64> = self.state().staged.range(..below).copied().collect();
        for seg in due {
            // In order, stopping at the first failure: the store is likely down for all of them.
            self.upload(seg)
                .map_err(|e| io::Error::new(e.kind(), format!("uploading segment {seg} to {}: {e}", self.url)))?;
        }
        Ok(())
    }
}

/// Uploaded segments on the local disk: whole ones (`<n>.seg`, moved here after their upload,
/// kept across runs when their length matches the object's) and fetched blocks of others
/// (`<n>.part`, sparse, dropped on open since nothing records which blocks they hold).
#[derive(Debug)]
struct Cache {
    dir: PathBuf,
    limit: u64,
    inner: Mutex<CacheInner>,
    /// Signalled when a block fetch ends, for readers waiting on the same block.
    fetched: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct CacheInner {
    segs: HashMap<u64, Cached>,
    bytes: u64,
    tick: u64,
    /// Blocks being fetched now: other readers of the same block wait instead of fetching it
    /// again (eight restore threads often want the same 4 MiB block at once).
    fetching: HashSet<(u64, u64)>,
}

#[derive(Debug)]
struct Cached {
    file: Arc<File>,
    path: PathBuf,
    /// Block numbers present; every block when the whole segment is here.
    blocks: HashSet<u64>,
    whole: bool,
    bytes: u64,
    used: u64,
}

impl Cache {
    /// Opens the cache in `dir`, keeping the whole segments that match `uploaded` (segment
    /// number to length) and deleting everything else.
    fn new(dir: &Path, limit: u64, uploaded: &BTreeMap<u64, u64>) -> Result<Cache> {
        fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        let mut inner = CacheInner::default();
        for entry in fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))? {
            let path = entry.map_err(|e| Error::io("listing", dir, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let len = fs::metadata(&path).map(|m| m.len()).ok();
            let keep = segment_number(name).filter(|seg| uploaded.get(seg).copied() == len);
            match (keep, len) {
                (Some(seg), Some(len)) => {
                    let file = Arc::new(File::open(&path).map_err(|e| Error::io("opening", &path, e))?);
                    inner.bytes += len;
                    inner
                        .segs
                        .insert(seg, Cached { file, path, blocks: HashSet::new(), whole: true, bytes: len, used: 0 });
                }
                _ => {
                    if let Err(e) = fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), "removing a stale cache file: {e}");
                    }
                }
            }
        }
        let cache = Cache { dir: dir.to_owned(), limit, inner: Mutex::new(inner), fetched: std::sync::Condvar::new() };
        cache.evict(&mut cache.lock(), u64::MAX);
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a freshly uploaded segment file whole.
    fn adopt(&self, seg: u64, from: &Path, len: u64) -> io::Result<()> {
        let to = self.dir.join(format!("{seg:016x}.seg"));
        fs::rename(from, &to)?;
        let file = Arc::new(File::open(&to)?);
        let mut inner = self.lock();
        inner.tick += 1;
        let used = inner.tick;
        inner.bytes += len;
        let old =
            inner.segs.insert(seg, Cached { file, path: to, blocks: HashSet::new(), whole: true, bytes: len, used });
        if let Some(old) = old {
            inner.bytes -= old.bytes;
        }
        self.evict(&mut inner, seg);
        Ok(())
    }

    fn drop_segment(&self, seg: u64) {
        let mut inner = self.lock();
        if let Some(c) = inner.segs.remove(&seg) {
            inner.bytes -= c.bytes;
            let _ = fs::remove_file(&c.path);
        }
    }

    /// Drops least recently used segments (never `keep`) until the cache fits its limit.
    fn evict(&self, inner: &mut CacheInner, keep: u64) {
        while inner.bytes > self.limit {
            let Some((&victim, _)) = inner.segs.iter().filter(|(s, _)| **s != keep).min_by_key(|(_, c)| c.used) else {
                break;
            };
            let c = inner.segs.remove(&victim).expect("just found");
            inner.bytes -= c.bytes;
            let _ = fs::remove_file(&c.path);
        }
    }

    /// Reads `buf.len()` bytes at `offset` of an uploaded segment of `len` bytes, fetching the
    /// blocks that are not cached.
    fn read(
        &self,
        seg: u64,
        offset: u64,
        buf: &mut [u8],
        len: u64,
        fetch: &dyn Fn(std::ops::Range<u64>) -> io::Result<Vec<u8>>,
    ) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let block = at / BLOCK;
            let file = self.block(seg, block, len, fetch)?;
            let block_end = ((block + 1) * BLOCK).min(len);
            let n = ((block_end - at) as usize).min(buf.len() - done);
            // Read from the file that holds this block, even if eviction has since unlinked it.
            file.read_exact_at(&mut buf[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }

    /// The cache file holding block `block` of `seg`, fetching the block first if needed (or
    /// waiting for the reader that is fetching it).
    fn block(
        &self,
        seg: u64,
        block: u64,
        len: u64,
        fetch: &dyn Fn(std::ops::Range<u64>) -> io::Result<Vec<u8>>,
    ) -> io::Result<Arc<File>> {
        let mut inner = self.lock();
        loop {
            inner.tick += 1;
            let tick = inner.tick;
            if let Some(c) = inner.segs.get_mut(&seg) {
                c.used = tick;
                if c.whole || c.blocks.contains(&block) {
                    return Ok(c.file.clone());
                }
            }
            if !inner.fetching.contains(&(seg, block)) {
                break;
            }
            inner = self.fetched.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner.fetching.insert((seg, block));
        drop(inner);
        let start = block * BLOCK;
        let fetched = fetch(start..(start + BLOCK).min(len));
        let mut inner = self.lock();
        let stored = fetched.and_then(|bytes| self.store(&mut inner, seg, block, &bytes));
        // Waiters look again: they find the block, or (after a failure) fetch it themselves.
        inner.fetching.remove(&(seg, block));
        self.fetched.notify_all();
        stored
    }

    /// Writes a fetched block into its segment's partial file (under the cache lock, so that a
    /// block is marked present only once its bytes are there).
    fn store(&self, inner: &mut CacheInner, seg: u64, block: u64, bytes: &[u8]) -> io::Result<Arc<File>> {
        let file = match inner.segs.get(&seg) {
            Some(c) => c.file.clone(),
            None => {
                let path = self.dir.join(format!("{seg:016x}.part"));
                let file = Arc::new(OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?);
                inner.tick += 1;
                let used = inner.tick;
                let cached = Cached { file: file.clone(), path, blocks: HashSet::new(), whole: false, bytes: 0, used };
                inner.segs.insert(seg, cached);
                file
            }
        };
        file.write_all_at(bytes, block * BLOCK)?;
        let c = inner.segs.get_mut(&seg).expect("inserted above");
        if c.blocks.insert(block) {
            c.bytes += bytes.len() as u64;
            inner.bytes += bytes.len() as u64;
        }
        self.evict(inner, seg);
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_render_and_refuse_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.cfg");
        fs::write(
            &p,
            "S3Endpoint = http://127.0.0.1:9000/\nS3Bucket = backups\nS3Prefix = /site/a/\nS3CacheSize = 64M\n",
        )
        .unwrap();
        let c = BucketConfig::from_file(&p, false).unwrap().unwrap();
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!((c.prefix.as_str(), c.cache_size, c.url()), ("site/a", 64 << 20, "s3://backups/site/a".into()));
        assert_eq!(c.host_dir("h").as_ref(), "site/a/h/segments");
        fs::write(&p, c.render()).unwrap();
        assert_eq!(BucketConfig::from_file(&p, false).unwrap().unwrap(), c);

        fs::write(&p, "Port = 1\nS3Bucket = b-1\n").unwrap();
        assert!(BucketConfig::from_file(&p, true).unwrap().is_some());
        let e = BucketConfig::from_file(&p, false).unwrap_err().to_string();
        assert!(e.contains("s.cfg:1") && e.contains("S3Bucket"), "{e}");
        for (text, want) in [
            ("S3Bucket = Has_Upper\n", "bucket name"),
            ("S3Bucket = b1x\nS3Endpoint = ftp://x\n", "http://"),
            ("S3Bucket = b1x\nS3Prefix = a//b\n", "none empty"),
            ("S3Prefix = a\n", "S3Bucket is missing"),
            ("S3Bucket = b1x\nS3CacheSize = lots\n", "1G"),
        ] {
            fs::write(&p, text).unwrap();
            let e = BucketConfig::from_file(&p, false).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        fs::write(&p, "Port = 1\n").unwrap();
        assert!(BucketConfig::from_file(&p, true).unwrap().is_none());
    }

    #[test]
    fn credentials_come_from_a_file_and_are_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("creds");
        fs::write(&p, "[default]\naws_access_key_id = AKID\naws_secret_access_key = very-secret\n").unwrap();
        let c = BucketConfig { bucket: "b1x".into(), credentials_file: Some(p.clone()), ..BucketConfig::default() };
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            let creds = c.credentials().unwrap();
            assert_eq!((creds.id.as_str(), creds.secret.as_str()), ("AKID", "very-secret"));
        }
        assert!(!format!("{c:?}{}", c.render()).contains("very-secret"));
        fs::write(&p, "AccessKeyId = x\n").unwrap();
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            let e = c.credentials().err().unwrap().to_string();
            assert!(e.contains("SecretAccessKey"), "{e}");
        }
    }

    #[test]
    fn the_cache_reads_across_blocks_and_stays_within_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(&dir.path().join("c"), 2 * BLOCK, &BTreeMap::new()).unwrap();
        let data: Vec<u8> = (0..3 * BLOCK + 100).map(|i| (i % 251) as u8).collect();
        let fetches = std::sync::atomic::AtomicUsize::new(0);
        let fetch = |r: std::ops::Range<u64>| {
            fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(data[r.start as usize..r.end as usize].to_vec())
        };
        let len = data.len() as u64;
        for (seg, off, n) in [(1, BLOCK - 10, 20usize), (1, 0, 10), (1, 3 * BLOCK, 100), (2, 5, 7), (1, BLOCK - 10, 20)]
        {
            let mut buf = vec![0u8; n];
            cache.read(seg, off, &mut buf, len, &fetch).unwrap();
            assert_eq!(buf, data[off as usize..off as usize + n]);
        }
        assert!(cache.lock().bytes <= 2 * BLOCK);
        // Blocks 0 and 1 of segment 1 were fetched once for the first two reads, block 3 once,
        // segment 2's block once; the last read needed blocks that eviction dropped again.
        assert!(fetches.load(std::sync::atomic::Ordering::SeqCst) >= 4);
    }

    #[test]
    fn readers_of_one_block_share_a_single_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(&dir.path().join("c"), 1 << 30, &BTreeMap::new()).unwrap();
        let data: Vec<u8> = (0..BLOCK).map(|i| (i % 253) as u8).collect();
        let fetches = std::sync::atomic::AtomicUsize::new(0);
        let fetch = |r: std::ops::Range<u64>| {
            fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(50));
            Ok(data[r.start as usize..r.end as usize].to_vec())
        };
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (cache, data, fetch) = (&cache, &data, &fetch);
                s.spawn(move || {
                    let mut buf = vec![0u8; 1000];
                    cache.read(7, t * 1000, &mut buf, BLOCK, fetch).unwrap();
                    assert_eq!(buf, data[(t * 1000) as usize..(t * 1000) as usize + 1000]);
                });
            }
        });
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn whole_segments_stay_cached_across_opens_and_partial_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("c");
        let cache = Cache::new(&c, 1 << 30, &BTreeMap::new()).unwrap();
        let staged = dir.path().join("staged");
        fs::write(&staged, vec![1u8; 5000]).unwrap();
        cache.adopt(1, &staged, 5000).unwrap();
        let mut buf = [0u8; 10];
        cache.read(2, 0, &mut buf, 100, &|r| Ok(vec![2u8; (r.end - r.start) as usize])).unwrap();
        drop(cache);
        // Reopened: segment 1 (same length in the bucket) is kept, segment 2's blocks are not.
        let cache = Cache::new(&c, 1 << 30, &BTreeMap::from([(1, 5000), (2, 100)])).unwrap();
        let never = |_: std::ops::Range<u64>| -> io::Result<Vec<u8>> { panic!("segment 1 is cached whole") };
        cache.read(1, 100, &mut buf, 5000, &never).unwrap();
        assert_eq!(buf, [1u8; 10]);
        assert!(!c.join(format!("{:016x}.part", 2)).exists());
        drop(cache);
        // A whole file whose length no longer matches the bucket's is dropped.
        let cache = Cache::new(&c, 1 << 30, &BTreeMap::from([(1, 4096)])).unwrap();
        assert!(cache.lock().segs.is_empty());
    }
}
