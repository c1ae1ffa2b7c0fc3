//! Writes the seed corpus of every fuzz target into `fuzz/corpus/<target>/` from real data: a
//! repository written through the engine (its segment files, the events in them and the rows
//! of its index), a real wrapped key, real protocol frames and the documented text formats.
//!
//! Run from `fuzz/`: `cargo run --example seed_corpus` (the files are committed; rerun after a
//! format change). File names are the content's BLAKE3 prefix, so reruns do not duplicate.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use tardis_core::api::{HostKey, Repository, Write};
use tardis_core::chunkcodec;
use tardis_core::crypto::{Keys, MasterKey};
use tardis_core::event::{EntryDeleted, Extent, FileVersion, SetStats};
use tardis_core::ids::{DirId, HostId};
use tardis_core::keywrap::{KdfHeader, KdfParams, WrappedKey};
use tardis_core::login::LoginKey;
use tardis_core::meta::{FileMeta, Kind};
use tardis_core::view;
use tardis_log::frame::{self, SEGMENT_HEADER_LEN};
use tardis_log::{LogOptions, Repo, RepoOptions};
use tardis_net::proto::{self, ClientInfo, ErrorCode, Request, Response};

struct Corpus {
    root: PathBuf,
}

impl Corpus {
    fn add(&self, target: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        fs::create_dir_all(&dir).expect("creating a corpus directory");
        let name = blake3::hash(bytes).to_hex()[..16].to_owned();
        fs::write(dir.join(name), bytes).expect("writing a corpus file");
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let corpus = Corpus { root };
    repository(&corpus);
    key_wrap(&corpus);
    deltas(&corpus);
    protocol(&corpus);
    text_formats(&corpus);
    eprintln!("seed corpus written to {}", corpus.root.display());
}

/// A small real repository: two completed sets (one deleting a file), an abandoned one.
fn repository(corpus: &Corpus) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let keys = Keys::unencrypted(HostId([9; 16]));
    let opts = || RepoOptions { log: LogOptions { segment_size: 4 << 10 }, ..RepoOptions::default() };
    let repo = Repo::open(dir.path(), "seedhost", opts()).expect("opening the repository");
    repo.create_host(keys.host(), None).expect("creating the host");
    let root_dir = keys.dir_id(&DirId::TOP, view::ROOT_NAME);
    let write = |set, files: &[(&str, &[u8])], deleted: &[&str]| {
        let mut writes = Vec::new();
        for (name, data) in files {
            let id = keys.chunk_id(data);
            let chunk = chunkcodec::encode(&keys, id, data).expect("encoding a chunk");
            corpus.add("chunk", &chunk_input(&chunk));
            writes.push(Write::Chunk(chunk));
            let meta = FileMeta {
                name: name.as_bytes().to_vec().into(),
                kind: Kind::File,
                mode: 0o644,
                size: data.len() as u64,
                user: Some("alice".into()),
                ..FileMeta::default()
            };
            let mut fm = vec![0u8, 1];
            fm.extend_from_slice(&meta.encode());
            corpus.add("file_meta", &fm);
            let key = keys.name_key(&root_dir, name.as_bytes());
            let sealed = view::seal_meta(&keys, &root_dir, &key, set, &meta).expect("sealing metadata");
            let extents = vec![Extent { offset: 0, len: data.len() as u32, id }];
            writes.push(Write::Version(FileVersion { set, dir: root_dir, name: key, extents, meta: sealed }));
        }
        for name in deleted {
            writes.push(Write::Delete(EntryDeleted {
                set,
                dir: root_dir,
                name: keys.name_key(&root_dir, name.as_bytes()),
            }));
        }
        repo.append(set, writes).expect("appending a batch");
    };
    let text = b"The quick brown fox jumps over the lazy dog. ".repeat(40);
    let s1 = repo.open_set("Daily-1", 20).expect("opening a set");
    write(s1, &[("a.txt", &text[..]), ("b.bin", &[0, 1, 2, 3, 255])], &[]);
    let seal = |set| {
        let info = repo.sets().expect("listing sets").into_iter().find(|s| s.id == set).expect("the open set");
        Some(tardis_core::setseal::seal(&keys, &info).expect("sealing a set"))
    };
    repo.complete_set(s1, SetStats::default(), seal(s1)).expect("completing a set");
    let s2 = repo.open_set("Hourly-2", 10).expect("opening a set");
    write(s2, &[("c.txt", b"changed")], &["b.bin"]);
    repo.complete_set(s2, SetStats { entries: 2, bytes: 7, changed: 1, new_chunks: 1, new_bytes: 7 }, seal(s2))
        .expect("completing a set");
    let s3 = repo.open_set("Daily-3", 20).expect("opening a set");
    write(s3, &[("a.txt", b"abandoned")], &[]);

    for (cf, key, value) in repo.index().dump().expect("dumping the index") {
        let family = match (cf, key.as_slice()) {
            ("chunks", _) => 0,
            ("sets", _) => 1,
            ("entries", _) => 2,
            ("meta", b"applied") => 3,
            ("meta", k) if k.starts_with(b"retired/") => 4,
            _ => continue,
        };
        let mut row = vec![family, key.len() as u8];
        row.extend_from_slice(&key);
        row.extend_from_slice(&value);
        corpus.add("index_rows", &row);
    }
    let segments = dir.path().join("seedhost").join("segments");
    for entry in fs::read_dir(&segments).expect("listing segments") {
        let bytes = fs::read(entry.expect("segment entry").path()).expect("reading a segment");
        corpus.add("segment_frame", &bytes);
        let mut rest = &bytes[SEGMENT_HEADER_LEN.min(bytes.len())..];
        while let Ok(p) = frame::parse_record(rest) {
            let mut event = vec![p.header.kind, p.header.version];
            event.extend_from_slice(p.meta);
            corpus.add("event", &event);
            rest = &rest[p.header.total_len() as usize..];
        }
    }
    // Histories for the model target: two bytes per operation (see `ops` there).
    for ops in [
        &[0u8, 5, 8, 9, 3, 0, 0, 7, 2, 1, 4, 0][..],
        &[0, 200, 3, 0, 7, 3, 0, 9, 1, 50, 3, 0, 6, 0],
        &[0, 1, 15, 2, 0, 2, 3, 0, 23, 7, 0, 3, 4, 0, 5, 0, 6, 0],
    ] {
        corpus.add("repo_model", ops);
    }
}

/// The input layout of the `chunk` target: mode, encoding, 24-bit plain length, body.
fn chunk_input(c: &chunkcodec::EncodedChunk) -> Vec<u8> {
    let mut v = vec![0, c.encoding];
    v.extend_from_slice(&c.plain_len.to_le_bytes()[..3]);
    v.extend_from_slice(&c.body);
    v
}

/// Real deltas for the `delta` target: a text and a binary base, each edited in place, by
/// insertion and by deletion. Layout: mode, encoding, 16-bit plain length, split, base, body.
fn deltas(corpus: &Corpus) {
    let keys = Keys::unencrypted(HostId([9; 16]));
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog; ".repeat(40);
    let binary: Vec<u8> = (0..3000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    for base in [text, binary] {
        let mut edited = vec![base.clone(), base.clone(), base[..base.len() / 2].to_vec()];
        edited[0][100..140].copy_from_slice(&[b'X'; 40]);
        edited[1].splice(500..500, b"inserted bytes".iter().copied());
        edited[2].extend_from_slice(&base[base.len() / 2 + 200..]);
        for new in edited {
            let (id, base_id) = (keys.chunk_id(&new), keys.chunk_id(&base));
            let Some(c) = chunkcodec::encode_delta(&keys, id, &new, base_id, &base, 0).expect("a delta") else {
                continue;
            };
            let total = base.len() + c.body.len();
            let split = (base.len() * 255).div_ceil(total) as u8;
            let mut v = vec![2, c.encoding];
            v.extend_from_slice(&(c.plain_len as u16).to_le_bytes());
            v.push(split);
            v.extend_from_slice(&base);
            v.extend_from_slice(&c.body);
            corpus.add("delta", &v);
        }
    }
}

fn key_wrap(corpus: &Corpus) {
    let master = MasterKey::generate().expect("a master key");
    let header = KdfHeader::new(KdfParams::FLOOR).expect("a KDF header");
    let secrets = header.derive(b"correct horse").expect("deriving");
    let wrapped = WrappedKey::seal(&master, &header, &secrets).expect("wrapping");
    corpus.add("keywrap", wrapped.as_bytes());
    corpus.add("keywrap", header.as_bytes());
    let verifier = LoginKey::from_secrets(&secrets).expect("a login key").verifier();
    let key = HostKey { wrapped: wrapped.as_bytes().to_vec(), verifier };
    corpus.add("proto", &proto::encode(&Request::SetWrappedKey { key }));
}

fn protocol(corpus: &Corpus) {
    let client = ClientInfo { software: "tardis 0.1.0".into(), machine: "laptop".into(), pid: 4242 };
    let requests = [
        Request::Hello { min: proto::PROTOCOL_MIN, max: proto::PROTOCOL_MAX, software: "tardis 0.1.0".into() },
        Request::KeyHeader { host: "laptop".into() },
        Request::Login { host: "laptop".into(), client, session: [7; 16], proof: vec![1; 64].into() },
        Request::Sets,
        Request::OpenSet { name: "Daily-2026-11-27".into(), priority: 20 },
        Request::MissingChunks { ids: vec![tardis_core::ids::ChunkId([3; 32]); 3] },
        Request::SetConfig { key: "DailyKeep".into(), value: Some("30d".into()) },
        Request::PurgeSets { sets: vec![1, 2, 3] },
    ];
    for r in &requests {
        corpus.add("proto", &proto::encode(r));
    }
    let responses = [
        Response::Welcome { version: 1, software: "tardisd 0.1.0".into(), allow_new_hosts: false },
        Response::KeyHeader { header: Some(vec![0; 36].into()) },
        Response::Done,
        Response::SetOpened { set: 12 },
        Response::Config { values: BTreeMap::from([("HourlyKeep".to_owned(), "48h".to_owned())]) },
        Response::Error { code: ErrorCode::Busy, message: "host laptop is being backed up".into() },
    ];
    for r in &responses {
        corpus.add("proto", &proto::encode(r));
    }
}

fn text_formats(corpus: &Corpus) {
    corpus.add("server_config", b"BaseDir = /srv/tardis\nAllowNewHosts = yes\n");
    corpus.add(
        "server_config",
        b"AllowNewHosts = web1, db1 pi\nAppendOnly = web1\nPurgeInterval = 3600\nHostIdleTimeout = 60\n",
    );
    corpus.add(
        "server_config",
        b"[Tardis]\n# comment\nBaseDir = /data/backup\nport=7431\nListen = ::1\nLogLevel = debug\n; x\n\
          SessionTimeout = 30\nMaxConnections = 64\nCompactInterval = 0\nCompactThreshold = 0.25\n\
          MinFreeSpace = 10G\nSpaceCheckInterval = 5\nPidFile = \"/run/tardisd.pid\"\n",
    );
    corpus.add("exclude", b"# caches\n*.tmp\n.cache/\n/build\nnode_modules\n**/target/\n[abc]?.o\n\\#literal\n");
    corpus.add("exclude", b"Downloads\n*.iso\n");
    corpus.add(
        "known_hosts",
        b"# Tardis known hosts\nbackup.example:7430 sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n",
    );
    // The selector picks the key by index (see the target); seeds hold each key's default.
    for (i, spec) in tardis_core::config::KEYS.iter().enumerate() {
        let mut v = vec![i as u8];
        v.extend_from_slice(spec.default.as_bytes());
        corpus.add("when_and_host_config", &v);
    }
    for when in ["now", "today", "yesterday", "3 days ago", "2026-11-26 10:00", "2026-11-26 10:00:30", "2026-11-26"] {
        let mut v = vec![0x80];
        v.extend_from_slice(when.as_bytes());
        corpus.add("when_and_host_config", &v);
    }
}
