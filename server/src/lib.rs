//! `tardisd`, the repository daemon.
//!
//! It will serve many hosts' repositories (one `tardis_log::Repo` per host under `BaseDir`) over
//! the QUIC protocol of `tardis-net`, authenticate each host against a stored verifier, and run
//! the scheduled purge and compaction jobs. Today the same repository is reachable in-process
//! with `tardis --local`.
