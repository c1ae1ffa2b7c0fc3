//! The time the programs see: the system clock, or `TARDIS_NOW`, which tests set to simulate
//! months of backups in seconds. Every program (`tardis`, `tardis-tools`, `tardisd`) reads it
//! here, so they agree on what it means.

/// The environment variable that fixes the time.
pub const NOW_VAR: &str = "TARDIS_NOW";

/// The time given by `TARDIS_NOW`, in Unix nanoseconds: Unix seconds (`1767225600`) or RFC 3339
/// (`2026-01-01T00:00:00Z`); `None` when it is not set. The error is a one-line message that
/// names the fix.
pub fn from_env() -> Result<Option<i64>, String> {
    let Some(v) = std::env::var_os(NOW_VAR) else { return Ok(None) };
    let v = v.to_string_lossy();
    let parsed = match v.parse::<i64>() {
        Ok(secs) => secs.checked_mul(1_000_000_000),
        Err(_) => chrono::DateTime::parse_from_rfc3339(&v).ok().and_then(|t| t.timestamp_nanos_opt()),
    };
    parsed.map(Some).ok_or_else(|| {
        format!("{NOW_VAR}={v:?} is not a time: give Unix seconds or RFC 3339 (2026-01-01T00:00:00Z), or unset it")
    })
}

/// The system clock in Unix nanoseconds (0 before 1970), for when `TARDIS_NOW` is not set.
pub fn system_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}
