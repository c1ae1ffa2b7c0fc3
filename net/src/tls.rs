//! TLS 1.3 for both ends: the server's certificate (generated self-signed on first start),
//! and the client's trust in it, either pinned on first use in a known-hosts file (like SSH)
//! or checked against a CA the user names.

use crate::error::{Error, Result};
use crate::proto::ALPN;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a certificate, the form `openssl x509 -fingerprint -sha256` prints too.
pub fn fingerprint(cert: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, cert);
    format!("sha256:{}", d.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// The server's certificate chain and key.
#[derive(Debug)]
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl ServerIdentity {
    /// Loads the PEM certificate chain and key; if neither file exists, first generates a
    /// self-signed pair for `names` and writes it there (the key readable by the owner only).
    pub fn load_or_generate(cert: &Path, key: &Path, names: &[String]) -> Result<ServerIdentity> {
        if !cert.exists() && !key.exists() {
            generate(cert, key, names)?;
            tracing::info!(cert = %cert.display(), "generated a self-signed certificate");
        }
        let chain = read_pem(cert, "certificate")?
            .into_iter()
            .filter_map(|item| match item {
                rustls_pemfile::Item::X509Certificate(c) => Some(c),
                _ => None,
            })
            .collect::<Vec<_>>();
        if chain.is_empty() {
            return Err(Error::Tls(format!("{} holds no PEM certificate", cert.display())));
        }
        let key = read_pem(key, "key")?
            .into_iter()
            .find_map(|item| match item {
                rustls_pemfile::Item::Pkcs8Key(k) => Some(PrivateKeyDer::Pkcs8(k)),
                rustls_pemfile::Item::Pkcs1Key(k) => Some(PrivateKeyDer::Pkcs1(k)),
                rustls_pemfile::Item::Sec1Key(k) => Some(PrivateKeyDer::Sec1(k)),
                _ => None,
            })
            .ok_or_else(|| Error::Tls(format!("{} holds no PEM private key", key.display())))?;
        Ok(ServerIdentity { chain, key })
    }

    /// The fingerprint clients pin.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }

    /// A secret derived from the private key, the same on every start with the same key. The
    /// server keys its QUIC stateless resets with it, so that after a restart (or a crash) a
    /// client's packets for a connection the server no longer knows get a reset it accepts,
    /// and it reconnects at once instead of waiting out the idle timeout.
    pub fn reset_secret(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"tardisd stateless reset key v1\0");
        ctx.update(self.key.secret_der());
        ctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes")
    }

    /// The rustls configuration for QUIC: TLS 1.3 only, our ALPN, and no 0-RTT (early data
    /// could be replayed).
    pub fn server_config(&self) -> Result<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| Error::Tls(format!("certificate and key do not match or are unusable: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.max_early_data_size = 0;
        Ok(config)
    }
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<rustls_pemfile::Item>> {
    let bytes = fs::read(path)
        .map_err(|e| Error::io(if what == "key" { "reading key" } else { "reading certificate" }, path, e))?;
    rustls_pemfile::read_all(&mut bytes.as_slice())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{} is not a PEM {what} file: {e}", path.display())))
}

fn generate(cert_path: &Path, key_path: &Path, names: &[String]) -> Result<()> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| Error::Tls(format!("generating certificate: {e}")))?;
    for p in [cert_path, key_path] {
        if let Some(dir) = p.parent() {
            fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;
        }
    }
    write_private(key_path, ck.signing_key.serialize_pem().as_bytes())?;
    write_private(cert_path, ck.cert.pem().as_bytes())?;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("creating", path, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io("writing", path, e))
}

/// How a client decides to trust the server.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Pin the certificate on first use in this known-hosts file.
    KnownHosts(PathBuf),
    /// Accept certificates issued for the server name by the CA(s) in this PEM file.
    Ca(PathBuf),
}

/// A known-hosts file: one `SERVER:PORT sha256:HEX` line per server; `#` starts a comment.
#[derive(Debug, Clone)]
pub struct KnownHosts {
    path: PathBuf,
}

impl KnownHosts {
    pub fn new(path: PathBuf) -> KnownHosts {
        KnownHosts { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pinned fingerprint of `server` (`name:port`), if any.
    pub fn lookup(&self, server: &str) -> Result<Option<String>> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("reading known-hosts file", &self.path, e)),
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(name), Some(fp), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(self.bad(i, "expected `SERVER:PORT sha256:HEX`"));
            };
            if !fp.starts_with("sha256:") || fp.len() != 7 + 64 || !fp[7..].bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(self.bad(i, "the fingerprint must be sha256: followed by 64 hex digits"));
            }
            if name == server {
                return Ok(Some(fp.to_ascii_lowercase()));
            }
        }
        Ok(None)
    }

    fn bad(&self, line: usize, reason: &str) -> Error {
        Error::KnownHosts {
            path: self.path.clone(),
            line: line + 1,
            reason: format!("{reason}; fix or delete the line"),
        }
    }

    /// Pins `fingerprint` for `server`, creating the file (and its directory) if needed.
    pub fn add(&self, server: &str, fingerprint: &str) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;
        }
        let mut f = fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .map_err(|e| Error::io("opening known-hosts file", &self.path, e))?;
        writeln!(f, "{server} {fingerprint}")
            .and_then(|_| f.sync_all())
            .map_err(|e| Error::io("writing known-hosts file", &self.path, e))
    }
}

/// The certificate the server offered in the last handshake, and whether it contradicted the
/// pin. Shared between the verifier and the code that reports or records the outcome.
#[derive(Debug, Default)]
pub struct Seen {
    pub fingerprint: Option<String>,
    pub mismatch: Option<(String, String)>,
}

/// Pins one certificate: accepts the server only if its certificate has the pinned
/// fingerprint (or, with no pin yet, any certificate, to be pinned after the handshake). The
/// handshake signature is still verified against the certificate's key, so replaying a public
/// certificate does not get anyone through.
#[derive(Debug)]
struct PinVerifier {
    pinned: Option<String>,
    seen: Arc<Mutex<Seen>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint(end_entity);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.fingerprint = Some(fp.clone());
        match &self.pinned {
            Some(pin) if *pin != fp => {
                seen.mismatch = Some((pin.clone(), fp));
                Err(rustls::Error::General("server certificate does not match the pinned fingerprint".into()))
            }
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The client's TLS configuration for `trust`, and (when pinning) the record of what the
/// server offered.
pub fn client_config(trust: &Trust, server: &str) -> Result<(rustls::ClientConfig, Option<Arc<Mutex<Seen>>>)> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?;
    let (mut config, seen) = match trust {
        Trust::KnownHosts(path) => {
            let pinned = KnownHosts::new(path.clone()).lookup(server)?;
            let seen = Arc::new(Mutex::new(Seen::default()));
            let verifier = PinVerifier { pinned, seen: seen.clone(), provider: provider() };
            let c = builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth();
            (c, Some(seen))
        }
        Trust::Ca(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for item in read_pem(path, "certificate")? {
                if let rustls_pemfile::Item::X509Certificate(c) = item {
                    roots.add(c).map_err(|e| Error::Tls(format!("CA certificate in {}: {e}", path.display())))?;
                }
            }
            if roots.is_empty() {
                return Err(Error::Tls(format!("{} holds no PEM certificate", path.display())));
            }
            (builder.with_root_certificates(roots).with_no_client_auth(), None)
        }
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.enable_early_data = false;
    Ok((config, seen))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_hosts_round_trip_and_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let kh = KnownHosts::new(dir.path().join("sub/known_hosts"));
        assert_eq!(kh.lookup("a:1").unwrap(), None);
        let fp = fingerprint(b"cert");
        kh.add("a:1", &fp).unwrap();
        kh.add("b:2", &fingerprint(b"other")).unwrap();
        assert_eq!(kh.lookup("a:1").unwrap(), Some(fp));
        assert_eq!(kh.lookup("a:2").unwrap(), None);
        fs::write(kh.path(), "# comment\n\nc:3 md5:00\n").unwrap();
        let e = kh.lookup("c:3").unwrap_err().to_string();
        assert!(e.contains(":3:") && e.contains("sha256"), "{e}");
    }

    #[test]
    fn generated_identity_loads_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls/cert.pem"), dir.path().join("tls/key.pem"));
        let id = ServerIdentity::load_or_generate(&c, &k, &["localhost".into()]).unwrap();
        assert_eq!(fs::metadata(&k).unwrap().permissions().mode() & 0o777, 0o600);
        id.server_config().unwrap();
        // A second start loads the same pair.
        let again = ServerIdentity::load_or_generate(&c, &k, &["localhost".into()]).unwrap();
        assert_eq!(again.fingerprint(), id.fingerprint());
        // Only one of the two files: an error, never a silent replacement.
        fs::remove_file(&k).unwrap();
        assert!(ServerIdentity::load_or_generate(&c, &k, &["localhost".into()]).is_err());
    }

    /// A server that presents `chain` but signs the handshake with `key`.
    #[derive(Debug)]
    struct Presents(Arc<rustls::sign::CertifiedKey>);

    impl rustls::server::ResolvesServerCert for Presents {
        fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    /// Runs a QUIC handshake on loopback between the two configurations.
    async fn handshake(server: rustls::ServerConfig, client: rustls::ClientConfig) -> bool {
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(server).unwrap();
        let server_ep =
            quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(quic)), "127.0.0.1:0".parse().unwrap())
                .unwrap();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(client).unwrap();
        let mut client_ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client_ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        let connecting = client_ep.connect(server_ep.local_addr().unwrap(), "localhost").unwrap();
        let accept = async {
            if let Some(incoming) = server_ep.accept().await {
                let _ = incoming.await;
            }
        };
        let (client, ()) = tokio::join!(connecting, accept);
        client.is_ok()
    }

    #[tokio::test]
    async fn a_pinned_certificate_presented_without_its_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["localhost".to_owned()];
        let id = |n: &str| {
            ServerIdentity::load_or_generate(
                &dir.path().join(n).join("c.pem"),
                &dir.path().join(n).join("k.pem"),
                &names,
            )
            .unwrap()
        };
        let (real, other) = (id("real"), id("other"));
        let kh = dir.path().join("known_hosts");
        KnownHosts::new(kh.clone()).add("srv:1", &real.fingerprint()).unwrap();
        let client = || client_config(&Trust::KnownHosts(kh.clone()), "srv:1").unwrap().0;
        assert!(handshake(real.server_config().unwrap(), client()).await, "the real server passes the pin");

        // The pinned certificate, copied, with a key of the impostor's own.
        let signer = provider().key_provider.load_private_key(other.key.clone_key()).unwrap();
        let copied = rustls::sign::CertifiedKey::new(real.chain.clone(), signer);
        let mut impostor = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Presents(Arc::new(copied))));
        impostor.alpn_protocols = vec![ALPN.to_vec()];
        assert!(!handshake(impostor, client()).await, "a copied certificate without its key does not pass");
    }
}
