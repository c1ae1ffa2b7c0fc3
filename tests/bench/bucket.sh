#!/usr/bin/env bash
# bucket.sh - backup and restore throughput with the segments in an S3-compatible bucket, next to
# the same steps with the segments on the local disk, in one run.
#
# Builds the release binaries (tardis, regenerate, tardis-tools) as a user's would be, builds the
# benchmark corpus if it is missing (../shared/bench/make-corpus.sh) and backs up its v1 tree
# (Debian's Linux source 6.12.113 plus the SQLite database and the ext4 image) as it is. The
# object store is s3s-fs (S3 REST API with SigV4 over a directory, on loopback), the server the
# bucket tests use; the bucket's directory is on the same disk as everything else. Each of ROUNDS
# rounds measures, in this order:
#   local  backup    `tardis --local` into a fresh, empty --db (encrypted host, --name v1)
#   bucket backup    the same into a fresh --db set up for the bucket with `tardis-tools migrate
#                    --config` (untimed), under a prefix of its own (bench-<date>-rN)
#   local  restore   `regenerate` of the whole tree from the latest set into a fresh directory
#   bucket restore   the same from the bucket-backed --db. With RESTORE_CACHE=cold (the default)
#                    its local segment cache (<db>/<host>/cache) is deleted first, untimed, so
#                    that every block is fetched from the bucket, as on a machine that kept the
#                    index but not the cache: uploaded segments otherwise stay cached whole across
#                    runs (up to S3CacheSize), and the restore would read them from the local disk
# The page cache is dropped (sync; echo 3 > /proc/sys/vm/drop_caches) and a quiet CPU awaited
# before every step. A step is the command's wall time under /usr/bin/time -v (peak RSS, user and
# system time) plus one `sync` afterwards; throughput is the tree's file bytes (MB = 10^6) divided
# by that. Each restore is verified, untimed, against a manifest of the source (types, modes,
# symlink targets, SHA-256 of every file); a step that exits non-zero or fails that check is
# reported as failed, never as a figure, and makes the script exit 1. The CPU seconds that the
# whole machine spent during a step (/proc/stat) are kept too, so that what other processes took
# meanwhile (the machine may be shared) can be told apart from Tardis's and s3s-fs's own.
# For the bucket steps a fresh s3s-fs is started before the step and stopped after it, with
# request logging on (RUST_LOG=s3s::service=debug; one line per request), so that its peak RSS
# and CPU seconds are the step's and its log gives every request's start and duration: the
# upload of each sealed segment (multipart: create, parts, complete, then a HEAD), in particular
# the last one, which the backup makes when the set completes, and the ranged GETs of a restore.
# Sizes after each backup: the local segments directory, the objects in the bucket, the index,
# and what the bucket-backed --db keeps on the local disk (index, staging, block cache).
#
# Run (from the workspace root, as root, since it drops the page cache):
#   tests/bench/bucket.sh                      # ROUNDS=3
# Everything after the build (the rounds) holds `flock LOCK`, which the other benchmark scripts
# take too, so that two benchmarks never share the machine.
#
# Environment (defaults in brackets): BENCH_DIR [/var/tmp/bench], CORPUS_DIR [BENCH_DIR/corpus],
#   SHARED_BENCH [../shared/bench next to the repository], SRC [CORPUS_DIR/v1] (the tree backed
#   up), ROUNDS [3], WORK [BENCH_DIR/bucket-work] (databases, bucket, restores; deleted at the end
#   unless KEEP=1), RESULTS_DIR [BENCH_DIR/results/bucket-DATE], LOCK [BENCH_DIR/.lock], BUILD [1]
#   (cargo build --release --locked), BIN_DIR [CARGO_TARGET_DIR or target, /release], S3S_FS
#   [s3s-fs on PATH, else /var/tmp/s3/s3s-root/bin/s3s-fs; installed there with `cargo install
#   s3s-fs --version 0.14.1 --features binary --locked` if missing], RESTORE_CACHE [cold] (or
#   keep: restore from the bucket --db with its cache as the backup left it), DROP_CACHES [1],
#   FREE_MARGIN_GB [2], REPORT_ONLY=DIR (only rewrite DIR/bucket.md from its CSV files).
# Output in RESULTS_DIR: bucket.md (tables of medians), steps.csv (every step of every round, raw),
# requests.csv (every request s3s-fs served during a bucket step), env.txt, logs/ (each command's
# output and /usr/bin/time -v report, and each s3s-fs log).
set -euo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$(cd "$TOP/.." && pwd)/shared/bench}
export BENCH_DIR=${BENCH_DIR:-/var/tmp/bench}
export CORPUS_DIR=${CORPUS_DIR:-$BENCH_DIR/corpus}
SRC=${SRC:-$CORPUS_DIR/v1}
ROUNDS=${ROUNDS:-3}
WORK=${WORK:-$BENCH_DIR/bucket-work}
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results/bucket-$STAMP}
LOCK=${LOCK:-$BENCH_DIR/.lock}
BUILD=${BUILD:-1}
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-$TOP/target}/release}
S3S_ROOT_DEFAULT=/var/tmp/s3/s3s-root
export DROP_CACHES=${DROP_CACHES:-1}
FREE_MARGIN_GB=${FREE_MARGIN_GB:-2}
RESTORE_CACHE=${RESTORE_CACHE:-cold}
KEEP=${KEEP:-0}
PASSWORD=${BENCH_PASSWORD:-bench-password-not-a-secret}
ACCESS_KEY=bench
SECRET_KEY=bench-secret-not-a-secret
BUCKET=tardis
HOST=bench
# shellcheck disable=SC2034  # read by lib.sh's log
LOG_TAG=bucket
# shellcheck source=/dev/null
. "$SHARED_BENCH/lib.sh"
# shellcheck source=tests/bench/common.sh
. "$TOP/tests/bench/common.sh"
die() { log "error: $*"; exit 1; }
[[ $RESTORE_CACHE == cold || $RESTORE_CACHE == keep ]] || die "RESTORE_CACHE must be cold or keep"

# report DIR: DIR/bucket.md from DIR/steps.csv and DIR/requests.csv (alone: REPORT_ONLY=DIR).
report() {
python3 - "$1/steps.csv" "$1/requests.csv" > "$1/bucket.md" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
reqs = list(csv.DictReader(open(sys.argv[2])))
ok = lambda r: r["rc"] == "0" and r["verify"] in ("", "ok")
cell = {}
for r in rows:
    cell.setdefault((r["backend"], r["step"]), []).append(r)
nrounds = len({r["round"] for r in rows})
wall = lambda r: float(r["wall_s"]) + float(r["sync_s"])
mbs = lambda r: int(r["src_bytes"]) / 1e6 / wall(r)
rss = lambda r: int(r["max_rss_kb"]) / 1024
cpu = lambda r: float(r["user_s"]) + float(r["sys_s"])
def med(backend, step, f):
    rs = cell.get((backend, step), [])
    good = [f(r) for r in rs if ok(r)]
    return (statistics.median(good) if good and len(good) == len(rs) else None), len(rs) - len(good), len(rs)
def fmt(v, bad, n, spec):
    return f"failed ({bad} of {n})" if bad else ("-" if v is None else format(v, spec))
src = int(rows[0]["src_bytes"]) if rows else 0
print(f"**Medians of {nrounds} rounds** (tree: {src / 1e9:.2f} GB of files; MB = 10^6 bytes; times include the `sync` after the step)")
print()
print("| step | local | bucket | bucket ÷ local |")
print("|---|---:|---:|---:|")
for step, label in (("backup", "first backup of v1"), ("restore", "full restore of v1")):
    for what, f, spec, unit in (("time", wall, ".2f", " s"), ("throughput", mbs, ".0f", " MB/s"),
                                ("peak RSS", rss, ",.0f", " MiB"), ("CPU user+sys", cpu, ".1f", " s")):
        l, lb, ln = med("local", step, f)
        b, bb, bn = med("bucket", step, f)
        ratio = f"{b / l:.2f}" if l and b is not None else "-"
        print(f"| {label}: {what} | {fmt(l, lb, ln, spec)}{'' if lb or l is None else unit} | {fmt(b, bb, bn, spec)}{'' if bb or b is None else unit} | {ratio} |")
print()
srv = [("srv_rss_kb", "s3s-fs peak RSS", lambda v: f"{int(v) / 1024:,.0f} MiB"),
       ("srv_cpu_s", "s3s-fs CPU user+sys", lambda v: f"{float(v):.1f} s")]
print("| object store (bucket steps only, median) | backup | restore |")
print("|---|---:|---:|")
for key, label, f in srv:
    cells = []
    for step in ("backup", "restore"):
        vs = [float(r[key]) for r in cell.get(("bucket", step), []) if r[key] not in ("", "NA")]
        cells.append(f(statistics.median(vs)) if vs else "-")
    print(f"| {label} | " + " | ".join(cells) + " |")
print()
mib = lambda b: int(b) / 2**20
print("**Sizes after the backup** (median; MiB)")
print()
print("| | local --db | bucket --db |")
print("|---|---:|---:|")
def msize(backend, key):
    vs = [int(r[key]) for r in cell.get((backend, "backup"), []) if ok(r) and r[key] not in ("", "NA")]
    return f"{mib(statistics.median(vs)):,.1f}" if vs else "-"
def msize_restore(backend, key):
    vs = [int(r[key]) for r in cell.get((backend, "restore"), []) if ok(r) and r[key] not in ("", "NA")]
    return f"{mib(statistics.median(vs)):,.1f}" if vs else "-"
print(f"| segments: local segments dir / objects in the bucket | {msize('local', 'segments_bytes')} | {msize('bucket', 'bucket_bytes')} (in the bucket) |")
print(f"| staged segments left on the local disk | - | {msize('bucket', 'segments_bytes')} |")
print(f"| block cache on the local disk | - | {msize('bucket', 'cache_bytes')} |")
print(f"| index (RocksDB) | {msize('local', 'index_bytes')} | {msize('bucket', 'index_bytes')} |")
print(f"| whole --db on the local disk after the backup | {msize('local', 'db_local_bytes')} | {msize('bucket', 'db_local_bytes')} |")
print(f"| whole --db on the local disk after the restore | {msize_restore('local', 'db_local_bytes')} | {msize_restore('bucket', 'db_local_bytes')} |")
print(f"| s3s-fs data directory (objects and its metadata) | - | {msize('bucket', 'store_bytes')} |")
print()
# Requests, per bucket step.
by = {}
for q in reqs:
    by.setdefault((q["round"], q["step"]), []).append(q)
def segwindows(qs):
    w = {}
    for q in qs:
        if q["op"] in ("create_mpu", "part", "complete_mpu", "put", "head") and q["object"]:
            s, e = float(q["start"]), float(q["end"])
            a = w.get(q["object"])
            w[q["object"]] = (min(a[0], s), max(a[1], e)) if a else (s, e)
    return w
print("**Object store requests** (per round)")
print()
print("| round | backup: segments uploaded | upload time, all segments (share of the backup) | last upload, at set completion | from its end to exit | restore: ranged GETs | MiB fetched | ÷ segment MiB | distinct blocks |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for rnd in sorted({r["round"] for r in rows}, key=int):
    b = [r for r in rows if r["round"] == rnd and r["backend"] == "bucket" and r["step"] == "backup"]
    qs = by.get((rnd, "backup"), [])
    w = segwindows(qs)
    up = [q for q in qs if q["op"] in ("part", "put")]
    nseg = len(w)
    total = sum(e - s for s, e in w.values())
    last = max(w.items(), key=lambda kv: kv[1][1]) if w else None
    lastb = sum(int(q["bytes"] or 0) for q in up if q["object"] == last[0]) if last else 0
    lastc = f"{last[1][1] - last[1][0]:.2f} s ({lastb / 2**20:,.0f} MiB)" if last else "-"
    gap = f"{float(b[0]['t1']) - last[1][1]:.2f} s" if last and b else "-"
    rq = [q for q in by.get((rnd, "restore"), []) if q["op"] == "get"]
    gb = sum(int(q["bytes"] or 0) for q in rq)
    # A ranged GET is one block (4 MiB, tardis-log bucket.rs): its start names it.
    blocks = len({(q["object"], q["range_start"]) for q in rq})
    upb = sum(int(q["bytes"] or 0) for q in up)
    share = f" ({100 * total / (float(b[0]['wall_s'])):.0f}%)" if b and float(b[0]["wall_s"]) > 0 else ""
    dup = f"{gb / upb:.2f}" if upb else "-"
    print(f"| {rnd} | {nseg} ({upb / 2**20:,.0f} MiB) | {total:.2f} s{share} | {lastc} | {gap} | {len(rq)} | {gb / 2**20:,.0f} | {dup} | {blocks} |")
print()
print("Upload time: per segment object, from the first request of its upload (the PUT, or the")
print("multipart create) to the end of the HEAD that checks its length, summed; the backup waits for")
print("each upload. s3s-fs logs a GET's duration when the response starts, before its body is sent,")
print("so GET times are not given.")
print()
def others(r):  # CPU seconds the machine spent on anything but Tardis and s3s-fs during the step
    if r.get("all_busy_s") in (None, ""):
        return ""
    o = float(r["all_busy_s"]) - cpu(r) - float(r["srv_cpu_s"] or 0)
    return f" / others {max(o, 0):.1f} CPU s"
print("**Single rounds** (wall s incl. sync / MB/s / peak RSS MiB / CPU seconds of other processes on")
print("the machine during the step, in round order)")
print()
for backend in ("local", "bucket"):
    for step in ("backup", "restore"):
        rs = cell.get((backend, step), [])
        runs = ", ".join(f"{wall(r):.2f} s / {mbs(r):.0f} MB/s / {rss(r):,.0f} MiB{others(r)}"
                         + ("" if ok(r) else f" (FAILED rc={r['rc']} verify={r['verify']})") for r in rs)
        print(f"- {backend} {step}: {runs}")
PY
}
if [[ -n ${REPORT_ONLY:-} ]]; then report "$REPORT_ONLY"; cat "$REPORT_ONLY/bucket.md"; exit 0; fi

# ---------------------------------------------------------------- tools, binaries, corpus
install_debs time rsync xz-utils e2fsprogs
if [[ -z ${S3S_FS:-} ]]; then
    S3S_FS=$(command -v s3s-fs || true)
    [[ -n $S3S_FS ]] || S3S_FS=$S3S_ROOT_DEFAULT/bin/s3s-fs
fi
if [[ ! -x $S3S_FS ]]; then
    log "installing s3s-fs 0.14.1 into $S3S_ROOT_DEFAULT (cargo)"
    cargo install s3s-fs --version 0.14.1 --features binary --locked --root "$S3S_ROOT_DEFAULT"
    S3S_FS=$S3S_ROOT_DEFAULT/bin/s3s-fs
fi
# .ci/setup (run by build_release) installs s3s-fs from crates.io unless it is on PATH.
PATH=$(dirname "$S3S_FS"):$PATH
if [[ $BUILD == 1 ]]; then
    build_release tardis-client tardis-tools
fi
for b in tardis regenerate tardis-tools; do [[ -x $BIN_DIR/$b ]] || die "$BIN_DIR/$b missing (BUILD=1 or BIN_DIR)"; done
"$BIN_DIR/tardis-tools" migrate --help > /dev/null 2>&1 || die "$BIN_DIR/tardis-tools has no migrate command (too old)"
[[ -f $CORPUS_DIR/MANIFEST.txt ]] || bash "$SHARED_BENCH/make-corpus.sh"
[[ -d $SRC ]] || die "no tree to back up at $SRC"

LOGS=$RESULTS_DIR/logs
mkdir -p "$LOGS" "$WORK"
STEPS_CSV=$RESULTS_DIR/steps.csv
REQ_CSV=$RESULTS_DIR/requests.csv

# ---------------------------------------------------------------- helpers
du_b() { local t=0 s p; for p in "$@"; do [[ -e $p ]] && { s=$(du -sb "$p" | cut -f1); t=$((t + s)); }; done; echo "$t"; }
tv() { grep -F "$1" "$2" | head -n1 | awk -F': ' '{print $2}'; }
fsub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", b - a}'; }
need_free() { # BYTES
    local avail; avail=$(df --output=avail -B1 "$WORK" | tail -n1)
    ((avail - $1 > FREE_MARGIN_GB * 1024 * 1024 * 1024)) ||
        die "only $((avail >> 20)) MiB free under $WORK; $(($1 >> 20)) MiB more needed plus ${FREE_MARGIN_GB} GiB margin"
}
manifest() { # DIR OUT: types, modes, paths, symlink targets; SHA-256 of every file
    (cd "$1" && find . -mindepth 1 -printf '%y %m %p %l\n' | LC_ALL=C sort > "$2.tree" \
        && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum > "$2.sum")
}
export -f manifest
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The object store: one s3s-fs per bucket step, a child of this script, stopped by its PID.
S3_ROOT=$WORK/s3
S3_PORT=$(free_port)
S3_PID=''
s3_start() { # LOGFILE
    mkdir -p "$S3_ROOT/$BUCKET"
    RUST_LOG=s3s::service=debug "$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" \
        --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" "$S3_ROOT" > "$1" 2>&1 &
    S3_PID=$!
    local i
    for ((i = 0; i < 300; i++)); do
        (: < "/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null && return 0
        kill -0 "$S3_PID" 2>/dev/null || { tail -n 20 "$1" >&2; die "s3s-fs exited, see $1"; }
        sleep 0.1
    done
    die "s3s-fs did not listen on port $S3_PORT within 30 s, see $1"
}
# s3_usage: "CPU_SECONDS PEAK_RSS_KB" of the running s3s-fs
s3_usage() {
    local hz; hz=$(getconf CLK_TCK)
    awk -v hz="$hz" '{printf "%.2f ", ($14 + $15) / hz}' "/proc/$S3_PID/stat"
    awk '/^VmHWM:/ {print $2}' "/proc/$S3_PID/status"
}
s3_stop() {
    [[ -n $S3_PID ]] || return 0
    kill "$S3_PID" 2>/dev/null || true
    wait "$S3_PID" 2>/dev/null || true
    S3_PID=''
}
# s3_requests ROUND STEP LOGFILE: appends the requests of an s3s-fs log to requests.csv.
s3_requests() {
python3 - "$1" "$2" "$3" "/$BUCKET/" >> "$REQ_CSV" <<'PY'
import csv, datetime, re, sys
rnd, step, path, bucket = sys.argv[1:5]
def ts(s):  # "2026-11-27T15:20:21.666396Z" or "2026-11-27 15:20:21.66631162 +00:00:00"
    m = re.match(r"(\d{4}-\d\d-\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?", s)
    d = datetime.datetime.strptime(m.group(1), "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc)
    return d.timestamp() + int(m.group(2)) * 3600 + int(m.group(3)) * 60 + int(m.group(4)) + float("0." + (m.group(5) or "0"))
def dur(s):
    m = re.match(r"([\d.]+)(ns|µs|us|ms|s)", s)
    return float(m.group(1)) * {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]
reqs, resps, pending = {}, {}, None
for line in open(path, encoding="utf-8", errors="replace"):
    if "s3s::service: req: Request" in line or "s3s::service: duration:" in line:
        pending = line
        continue
    m = re.search(r"in s3s::service::call with start_time: (.*)$", line)
    if m and pending:
        key = m.group(1).strip()
        (reqs if "req: Request" in pending else resps)[key] = pending
        pending = None
w = csv.writer(sys.stdout)
for key, rq in sorted(reqs.items(), key=lambda kv: ts(kv[0])):
    method = re.search(r"method: (\w+)", rq).group(1)
    uri = re.search(r"uri: (\S+?),", rq).group(1)
    p, _, query = uri.partition("?")
    obj = p[len(bucket):] if p.startswith(bucket) else ""
    if method == "GET":
        op = "list" if "list-type" in query else "get"
    elif method == "HEAD":
        op = "head"
    elif method == "POST":
        op = "create_mpu" if query.startswith("uploads") else "complete_mpu"
    elif method == "PUT":
        op = "part" if "partNumber" in query else "put"
    elif method == "DELETE":
        op = "delete"
    else:
        op = method.lower()
    rs = resps.get(key)
    start = ts(key)
    if rs:
        d = dur(re.search(r"duration: (\S+?),", rs).group(1))
        status = re.search(r"status: (\d+)", rs).group(1)
        end = start + d
    else:
        d, status, end = "", "", ""
    src = rs if method == "GET" and rs else rq
    cl = re.search(r'"content-length": "(\d+)"', src or "")
    nbytes = cl.group(1) if cl and op in ("get", "part", "put") else ""
    rg = re.search(r'"range": "bytes=(\d+)-', rq)
    w.writerow([rnd, step, op, obj, f"{start:.6f}", f"{end:.6f}" if end != "" else "", f"{d:.6f}" if d != "" else "",
                nbytes, status, rg.group(1) if rg else ""])
PY
}

# step ROUND BACKEND STEP VERIFY_CMD CMD...: runs CMD under /usr/bin/time -v, then `sync`; runs
# VERIFY_CMD (untimed) if given; appends a row to steps.csv. Uses DB (the step's --db).
STEP_RC=0
step() {
    local rnd=$1 backend=$2 st=$3 verify=$4; shift 4
    local tf=$LOGS/r$rnd-$backend-$st.time lf=$LOGS/r$rnd-$backend-$st.log slog=$LOGS/r$rnd-s3s-$st.log
    local t0 t1 t2 rc v='' srv_cpu='' srv_rss='' c0 c1 busy iow steal
    if [[ $backend == bucket ]]; then s3_start "$slog"; fi
    drop_caches; quiet_gate
    log "round $rnd $backend $st: $*"
    c0=$(cpu_snapshot); t0=$(date +%s.%N)
    /usr/bin/time -v -o "$tf" "$@" > "$lf" 2>&1 && rc=0 || rc=$?
    t1=$(date +%s.%N); sync; t2=$(date +%s.%N); c1=$(cpu_snapshot)
    read -r busy iow steal < <(cpu_delta "$c0" "$c1")
    if [[ $backend == bucket ]]; then
        read -r srv_cpu srv_rss < <(s3_usage)
        s3_stop
        s3_requests "$rnd" "$st" "$slog"
    fi
    if [[ -n $verify ]]; then
        if bash -c "$verify" >> "$lf" 2>&1; then v=ok; else v=FAIL; fi
    fi
    local hd=$DB/$HOST bucket_bytes=NA store_bytes=NA
    if [[ $backend == bucket ]]; then
        bucket_bytes=$(du_b "$S3_ROOT/$BUCKET/$PREFIX")
        store_bytes=$(du_b "$S3_ROOT")
    fi
    echo "$rnd,$backend,$st,$(fsub "$t0" "$t1"),$(fsub "$t1" "$t2"),$(tv 'User time' "$tf"),$(tv 'System time' "$tf"),$(tv 'Maximum resident' "$tf"),$rc,$v,$SRC_BYTES,$QUIET_WAITED,$QUIET_START_BUSY,$srv_cpu,$srv_rss,$(du_b "$DB"),$(du_b "$hd/segments"),$(du_b "$hd/index"),$(du_b "$hd/cache"),$bucket_bytes,$store_bytes,$t0,$t1,$busy,$iow,$steal" >> "$STEPS_CSV"
    log "round $rnd $backend $st: rc=$rc verify=${v:--} wall=$(fsub "$t0" "$t2")s rss=$(tv 'Maximum resident' "$tf")KB${srv_rss:+ s3s-fs rss=${srv_rss}KB cpu=${srv_cpu}s}"
    if [[ $rc != 0 || $v == FAIL ]]; then
        STEP_RC=1; log "round $rnd $backend $st FAILED, see $lf"; tail -n 5 "$lf" >&2
    fi
}

# shellcheck disable=SC2317  # run by the trap
cleanup() {
    s3_stop
    if [[ $KEEP != 1 ]]; then rm -rf "${WORK:?}"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- the source and the environment
SRC_BYTES=$(find "$SRC" -type f -printf '%s\n' | awk '{s += $1} END {printf "%.0f", s}')  # %.0f: mawk's %d stops at 2^31-1
SRC_FILES=$(find "$SRC" -type f | wc -l)
VERSION="$("$BIN_DIR/tardis" --version | awk '{print $2}') ($(git -C "$TOP" rev-parse --short HEAD)$(git -C "$TOP" diff --quiet HEAD -- . 2>/dev/null || echo ' with uncommitted changes'))"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -sr), nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
    echo "mem: $(free -g | awk '/Mem:/{print $2" GiB"}')"
    echo "fs: $(df -T "$WORK" | tail -n1)"
    echo "source: $SRC ($SRC_FILES files, $SRC_BYTES bytes)"
    echo "corpus: $(grep -m1 '^v1 ' "$CORPUS_DIR/MANIFEST.txt" || true)"
    echo "tardis: $VERSION, $BIN_DIR"
    git -C "$TOP" diff --stat HEAD -- . 2>/dev/null | sed 's/^/  uncommitted: /'
    echo "s3s-fs: $("$S3S_FS" --version 2>/dev/null || echo '?') ($S3S_FS), loopback, data in $S3_ROOT"
    echo "ROUNDS=$ROUNDS DROP_CACHES=$DROP_CACHES RESTORE_CACHE=$RESTORE_CACHE"
} > "$RESULTS_DIR/env.txt"
log "manifest of $SRC ($SRC_FILES files, $((SRC_BYTES / 1000000)) MB)"
manifest "$SRC" "$RESULTS_DIR/source"
printf '%s\n' "$PASSWORD" > "$WORK/password"
printf 'AccessKeyId = %s\nSecretAccessKey = %s\n' "$ACCESS_KEY" "$SECRET_KEY" > "$WORK/s3-credentials"
chmod 600 "$WORK/password" "$WORK/s3-credentials"
echo "round,backend,step,wall_s,sync_s,user_s,sys_s,max_rss_kb,rc,verify,src_bytes,quiet_wait_s,busy_before,srv_cpu_s,srv_rss_kb,db_local_bytes,segments_bytes,index_bytes,cache_bytes,bucket_bytes,store_bytes,t0,t1,all_busy_s,all_iowait_s,all_steal_s" > "$STEPS_CSV"
echo "round,step,op,object,start,end,duration_s,bytes,status,range_start" > "$REQ_CSV"

# ---------------------------------------------------------------- the rounds, under the lock
exec 9>>"$LOCK"
if ! flock -n 9; then log "waiting for $LOCK (another benchmark is running)"; flock 9; fi
RUN_T0=$(date +%s)
VERIFY="manifest %s $RESULTS_DIR/restored && cmp $RESULTS_DIR/source.tree $RESULTS_DIR/restored.tree && cmp $RESULTS_DIR/source.sum $RESULTS_DIR/restored.sum"
for ((rnd = 1; rnd <= ROUNDS; rnd++)); do
    R=$WORK/r$rnd
    rm -rf "$R"; mkdir -p "$R"
    # Room for two databases, the bucket's copy and one restore at a time.
    need_free $((SRC_BYTES + SRC_BYTES / 2))
    PREFIX=bench-$STAMP-r$rnd
    printf 'S3Endpoint = http://127.0.0.1:%s\nS3Bucket = %s\nS3Prefix = %s\nS3CredentialsFile = %s\n' \
        "$S3_PORT" "$BUCKET" "$PREFIX" "$WORK/s3-credentials" > "$R/s3.cfg"
    for backend in local bucket; do
        DB=$R/$backend/db
        mkdir -p "$R/$backend"
        if [[ $backend == bucket ]]; then
            s3_start "$LOGS/r$rnd-s3s-migrate.log"
            "$BIN_DIR/tardis-tools" --db "$DB" migrate --config "$R/s3.cfg" > "$LOGS/r$rnd-migrate.log" 2>&1 ||
                { s3_stop; die "tardis-tools migrate failed: $(tail -n 3 "$LOGS/r$rnd-migrate.log")"; }
            s3_stop
        fi
        step "$rnd" "$backend" backup "" "$BIN_DIR/tardis" --local --db "$DB" --host "$HOST" \
            --password-file "$WORK/password" --state-dir "$R/$backend/state" --name v1 -q "$SRC"
    done
    for backend in local bucket; do
        DB=$R/$backend/db
        dest=$R/restore
        rm -rf "$dest"; mkdir -p "$dest"
        if [[ $backend == bucket && $RESTORE_CACHE == cold ]]; then
            log "round $rnd: emptying the bucket --db's segment cache ($(du_b "$DB/$HOST/cache") bytes)"
            rm -rf "${DB:?}/$HOST/cache"
        fi
        # shellcheck disable=SC2059  # VERIFY is the format
        step "$rnd" "$backend" restore "$(printf "$VERIFY" "$dest/tree")" "$BIN_DIR/regenerate" --db "$DB" \
            --host "$HOST" --password-file "$WORK/password" --state-dir "$R/$backend/state" -o "$dest/tree" "$SRC"
        rm -rf "$dest"
    done
    rm -rf "$R" "${S3_ROOT:?}/$BUCKET/$PREFIX"
done
RUN_T1=$(date +%s)
flock -u 9
echo "elapsed: rounds $((RUN_T1 - RUN_T0)) s" | tee -a "$RESULTS_DIR/env.txt" >&2

report "$RESULTS_DIR"
cat "$RESULTS_DIR/bucket.md"
log "results in $RESULTS_DIR (bucket.md, steps.csv, requests.csv, env.txt, logs/)"
exit "$STEP_RC"
