//! A real S3-compatible server on loopback for the bucket tests: `s3s-fs` (crates.io), which
//! serves the S3 REST API with SigV4 authentication from a directory. `.ci/run` installs it;
//! `TARDIS_S3S_FS` names the binary if it is not on `PATH`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "tardis-test";
pub const SECRET_KEY: &str = "tardis-test-secret";
pub const BUCKET: &str = "tardis";

/// A running `s3s-fs`, stopped when dropped.
#[derive(Debug)]
pub struct S3Server {
    child: Option<Child>,
    program: PathBuf,
    pub port: u16,
    /// The server's data directory: `<root>/<bucket>/<key>` is each object's bytes.
    pub root: PathBuf,
    log: PathBuf,
}

/// The `s3s-fs` binary, or `None` (with the reason printed) when the tests may skip; panics
/// when `TARDIS_REQUIRE_S3=1` requires them.
pub fn program() -> Option<PathBuf> {
    let found = std::env::var_os("TARDIS_S3S_FS").map(PathBuf::from).or_else(|| {
        std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join("s3s-fs")).find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("TARDIS_REQUIRE_S3").as_deref() != Ok("1"),
            "s3s-fs is not installed, and TARDIS_REQUIRE_S3=1 requires the bucket tests to run \
             (cargo install s3s-fs --version 0.14.1 --features binary)"
        );
        eprintln!("SKIPPED: s3s-fs is not installed; the bucket tests did not run");
    }
    found
}

impl S3Server {
    /// Starts a server with one empty bucket, [`BUCKET`], in `root`.
    pub fn start(program: &Path, root: &Path) -> S3Server {
        fs::create_dir_all(root.join(BUCKET)).expect("creating the bucket directory");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = root.with_extension("log");
        let mut s = S3Server { child: None, program: program.to_owned(), port, root: root.to_owned(), log };
        s.restart();
        s
    }

    /// Starts the server again after [`S3Server::stop`], on the same port and data.
    pub fn restart(&mut self) {
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("s3s-fs log");
        let child = Command::new(&self.program)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("s3s-fs starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "s3s-fs did not listen within 30 s: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (an outage of the object store).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The S3 keys (for `tardisd.cfg` or `migrate --config`) of [`BUCKET`] under `prefix`, with
    /// the credentials in a file next to the server's data.
    pub fn settings(&self, prefix: &str) -> String {
        let creds = self.root.with_extension("credentials");
        fs::write(&creds, format!("AccessKeyId = {ACCESS_KEY}\nSecretAccessKey = {SECRET_KEY}\n")).unwrap();
        format!(
            "S3Endpoint = {}\nS3Bucket = {BUCKET}\nS3Prefix = {prefix}\nS3CredentialsFile = {}\n",
            self.endpoint(),
            creds.display()
        )
    }

    /// Numbers of the segments of `host` under `prefix` that the server holds.
    pub fn segments(&self, prefix: &str, host: &str) -> Vec<u64> {
        let dir = self.root.join(BUCKET).join(prefix).join(host).join("segments");
        let mut segs: Vec<u64> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
            })
            .collect();
        segs.sort_unstable();
        segs
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Numbers of the segment files in a local directory (a host's staging area).
pub fn local_segments(dir: &Path) -> Vec<u64> {
    let mut segs: Vec<u64> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| u64::from_str_radix(e.ok()?.file_name().to_str()?.strip_suffix(".seg")?, 16).ok())
        .collect();
    segs.sort_unstable();
    segs
}
