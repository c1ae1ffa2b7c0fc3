//! Opening a host's keys: creating the host on its first backup, unwrapping the master key on
//! every later run. A wrong password stops here, before anything is written.

use crate::error::{Error, Result};
use tardis_core::api::Repository;
use tardis_core::crypto::{Keys, MasterKey};
use tardis_core::ids::HostId;
use tardis_core::keywrap::{KdfParams, WrappedKey};
use tardis_core::random_bytes;

/// What to do when the host does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfMissing {
    /// Create it (the first backup of a host).
    Create,
    /// Report that it has no backups (tools, the mount).
    Fail,
}

/// Opens (or creates) the keys of the host behind `repo`. `password` is `None` for a host
/// without encryption.
pub fn open_keys(repo: &dyn Repository, host: &str, password: Option<&[u8]>, if_missing: IfMissing) -> Result<Keys> {
    let Some(info) = repo.host()? else {
        if if_missing == IfMissing::Fail {
            return Err(Error::Invalid(format!("host {host} has no backups here; check --host and --db")));
        }
        let mut id = [0u8; 16];
        random_bytes(&mut id)?;
        let host_id = HostId(id);
        return match password {
            Some(pw) => {
                let master = MasterKey::generate()?;
                let wrapped = WrappedKey::wrap(&master, pw, KdfParams::DEFAULT)?;
                repo.create_host(host_id, true, Some(wrapped.as_bytes().to_vec()))?;
                tracing::info!(host, "created encrypted host");
                Ok(Keys::encrypted(host_id, &master))
            }
            None => {
                repo.create_host(host_id, false, None)?;
                tracing::warn!(host, "created host without a password: its backups are not encrypted");
                Ok(Keys::unencrypted(host_id))
            }
        };
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
            let blob = info.wrapped_key.ok_or_else(|| Error::Invalid(format!("host {host} is encrypted but has no key")))?;
            let wrapped = WrappedKey::from_bytes(&blob)?;
            match wrapped.unwrap_key(pw) {
                Ok(u) => Ok(Keys::encrypted(info.host_id, &u.master)),
                Err(tardis_core::Error::WrongPassword) => Err(Error::WrongPassword { host: host.to_owned() }),
                Err(e) => Err(e.into()),
            }
        }
    }
}
