//! Opening a host's keys: creating the host on its first backup, unwrapping the master key on
//! every later run. A wrong password stops here, before anything is written.

use crate::error::{Error, Result};
use tardis_core::api::{HostInfo, HostKey, Repository};
use tardis_core::crypto::{Keys, MasterKey};
use tardis_core::ids::HostId;
use tardis_core::keywrap::{KdfHeader, KdfParams, Secrets, WrappedKey};
use tardis_core::login::LoginKey;
use tardis_core::random_bytes;

/// What to do when the host does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfMissing {
    /// Create it (the first backup of a host).
    Create,
    /// Report that it has no backups (tools, the mount).
    Fail,
}

/// A new host's identity and, with a password, its wrapped key and login verifier.
#[derive(Debug)]
pub struct NewHost {
    pub host_id: HostId,
    pub key: Option<HostKey>,
    pub keys: Keys,
    /// The key the host logs in to `tardisd` with (encrypted hosts only).
    pub login: Option<LoginKey>,
}

/// Makes the identity and keys of a new host (one Argon2id run serves both the wrapped key
/// and the login verifier).
pub fn new_host(password: Option<&[u8]>) -> Result<NewHost> {
    let mut id = [0u8; 16];
    random_bytes(&mut id)?;
    let host_id = HostId(id);
    let Some(pw) = password else {
        return Ok(NewHost { host_id, key: None, keys: Keys::unencrypted(host_id), login: None });
    };
    let master = MasterKey::generate()?;
    let header = KdfHeader::new(KdfParams::DEFAULT)?;
    let secrets = header.derive(pw)?;
    let wrapped = WrappedKey::seal(&master, &header, &secrets)?;
    let login = LoginKey::from_secrets(&secrets)?;
    let key = HostKey { wrapped: wrapped.as_bytes().to_vec(), verifier: login.verifier() };
    Ok(NewHost { host_id, key: Some(key), keys: Keys::encrypted(host_id, &master), login: Some(login) })
}

/// Opens (or creates) the keys of the host behind `repo`. `password` is `None` for a host
/// without encryption.
pub fn open_keys(repo: &dyn Repository, host: &str, password: Option<&[u8]>, if_missing: IfMissing) -> Result<Keys> {
    let Some(info) = repo.host()? else {
        if if_missing == IfMissing::Fail {
            return Err(Error::Invalid(format!("host {host} has no backups here; check --host and --db")));
        }
        let new = new_host(password)?;
        repo.create_host(new.host_id, new.key)?;
        match password {
            Some(_) => tracing::info!(host, "created encrypted host"),
            None => tracing::warn!(host, "created host without a password: its backups are not encrypted"),
        }
        return Ok(new.keys);
    };
    match (info.encrypted, password) {
        (true, None) => Err(Error::Invalid(format!(
            "host {host} is encrypted: give --password, --password-file or --password-prompt"
        ))),
        (false, Some(_)) => Err(Error::Invalid(format!(
            "host {host} was created without a password and its backups are not encrypted; run without a password option"
        ))),
        (false, None) => Ok(Keys::unencrypted(info.host_id)),
        (true, Some(pw)) => {
            let wrapped = wrapped_key(&info)?;
            let secrets = wrapped.header().derive(pw)?;
            let keys = unwrap_keys(&info, &wrapped, &secrets)?;
            if info.verifier.is_none() {
                // A key wrapped before login verifiers existed: add one, so that the host can
                // also be served by tardisd. Same blob, so the key and password do not change.
                let verifier = LoginKey::from_secrets(&secrets)?.verifier();
                repo.set_wrapped_key(HostKey { wrapped: wrapped.as_bytes().to_vec(), verifier })?;
                tracing::info!(host, "added the login verifier to the host's key");
            }
            Ok(keys)
        }
    }
}

/// The host's wrapped key, parsed.
pub fn wrapped_key(info: &HostInfo) -> Result<WrappedKey> {
    let blob = info
        .wrapped_key
        .as_ref()
        .ok_or_else(|| Error::Invalid(format!("host {} is encrypted but has no key", info.name)))?;
    Ok(WrappedKey::from_bytes(blob)?)
}

/// Unwraps the master key with secrets derived from the password.
pub fn unwrap_keys(info: &HostInfo, wrapped: &WrappedKey, secrets: &Secrets) -> Result<Keys> {
    match wrapped.open(secrets) {
        Ok(master) => Ok(Keys::encrypted(info.host_id, &master)),
        Err(tardis_core::Error::WrongPassword) => Err(Error::WrongPassword { host: info.name.clone() }),
        Err(e) => Err(e.into()),
    }
}
