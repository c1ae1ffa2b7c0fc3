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
    Ok(Keys::encrypted(info.host_id, &open_master(info, wrapped, secrets)?))
}

fn open_master(info: &HostInfo, wrapped: &WrappedKey, secrets: &Secrets) -> Result<MasterKey> {
    wrapped.open(secrets).map_err(|e| match e {
        tardis_core::Error::WrongPassword => Error::WrongPassword { host: info.name.clone() },
        e => e.into(),
    })
}

/// What changing the password of an unencrypted host is refused with.
pub fn no_password_to_change(host: &str) -> Error {
    Error::Invalid(format!(
        "host {host} has no password to change: it was created without one, so its backups are not encrypted"
    ))
}

/// Changes the password of the encrypted host behind `repo` from `old` to `new`: the master key
/// is wrapped again (fresh salt, the default Argon2id cost) and stored with a new login verifier
/// in one event. The data stays encrypted under the master key, which does not change, so
/// nothing else is rewritten. The old password stops opening the host once this returns.
pub fn change_password(repo: &dyn Repository, host: &str, old: &[u8], new: &[u8]) -> Result<()> {
    let info = repo.host()?.ok_or_else(|| Error::Invalid(format!("host {host} has no backups here; check --host")))?;
    if !info.encrypted {
        return Err(no_password_to_change(host));
    }
    let wrapped = wrapped_key(&info)?;
    let master = open_master(&info, &wrapped, &wrapped.header().derive(old)?)?;
    let header = KdfHeader::new(KdfParams::DEFAULT)?;
    let secrets = header.derive(new)?;
    let sealed = WrappedKey::seal(&master, &header, &secrets)?;
    // The new blob replaces the only copy the index serves: read it back before it does.
    let reopened = WrappedKey::from_bytes(sealed.as_bytes())?.open(&secrets)?;
    if reopened.as_bytes() != master.as_bytes() {
        return Err(Error::Invalid("the key wrapped under the new password did not open to the same key".into()));
    }
    let verifier = LoginKey::from_secrets(&secrets)?.verifier();
    repo.set_wrapped_key(HostKey { wrapped: sealed.as_bytes().to_vec(), verifier })?;
    Ok(())
}
