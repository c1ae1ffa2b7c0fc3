#!/usr/bin/env bash
# mount.sh - reading backups through FUSE: `tardisfs` against `restic mount` and `borg mount` on the
# same backup of the same tree, in one run.
#
# Builds the release binaries (tardis, tardisfs) of the repository this script lives in, installs
# restic, Borg and FUSE from Debian, builds the benchmark corpus if it is missing
# (../shared/bench/make-corpus.sh), backs up the corpus's v2 tree once with each tool (Tardis:
# `tardis --local`, encrypted host; restic: repository v2, compression auto, always encrypted;
# Borg: repokey-blake2, zstd,3 as in run-peers.sh), then mounts each backup and measures through
# the mount, every measurement on a fresh mount (each tool's own caches start empty) with the page
# cache dropped before mounting and again before measuring:
#   seq_big   sequential read (dd bs=1M to /dev/null) of BIG_FILES (vm.img and app.sqlite);
#             then verified untimed: SHA-256 of each file read through the mount = the original's
#   tree_tar  `tar -cf - TREE | wc -c` of the kernel source tree (86k small files); the byte count
#             must equal the same tar of the original tree, and on the first run of each tool the
#             SHA-256 of every file read through the mount is compared with the original's
#   find      `find ROOT -printf '%y %s %P\n'` over the whole backed-up tree (lstat of every
#             entry); the listing (types, names, file sizes) must equal the original's
#   rand4k    READS reads of 4 KiB, each one pread(2) at a 4 KiB-aligned offset drawn from a
#             seeded PRNG (SEED; the same offsets for every tool and run) in RAND_FILE (vm.img);
#             median and p95 latency of all reads, and the median of the reads of blocks that
#             are not all zeros (zero blocks are one deduplicated chunk, decoded once, for every
#             tool); the bytes read must equal the original's at those offsets
#   mount     for every fresh mount: time from starting the mount command until the backed-up
#             tree's root directory lists (start-up, key derivation and whatever the tool loads)
# Each mount runs in the foreground (-f; restic mount always does) as a child of this script and is
# unmounted with fusermount3 -u (or umount) before the next; an exit trap unmounts whatever is left.
# Also recorded per measurement: CPU seconds and peak RSS of the mount process (at the end of the
# timed step, before the verification reads). Tools interleave
# within each run (run 1: tardis, restic, borg; run 2: ...), RUNS times; the tables give medians
# and the ratio Tardis ÷ peer (below 1: Tardis is faster).
# Where each tool puts the backed-up tree SRC: tardisfs MOUNT/<set>/SRC (also MOUNT/latest ->
# latest set); restic MOUNT/snapshots/latest/SRC; borg (one archive mounted, REPO::v2) MOUNT/SRC
# without its leading slash.
#
# Everything after the build (backups and measurements) runs under `flock LOCK`, so that no other
# benchmark taking the same lock runs at the same time; each measurement also waits for a quiet
# CPU (lib.sh's quiet_gate) first.
#
# Environment (defaults in brackets): BENCH_DIR [/var/tmp/bench], CORPUS_DIR [BENCH_DIR/corpus],
# SHARED_BENCH [../shared/bench next to the repository], SRC [CORPUS_DIR/v2] (the tree backed up),
# TREE [linux-source-6.12] (inside SRC, for tree_tar), BIG_FILES ["blobs/vm.img blobs/app.sqlite"],
# RAND_FILE [blobs/vm.img], READS [200], SEED [20261127], RUNS [3], TOOLS ["tardis restic borg"],
# MEASURES ["seq_big tree_tar find rand4k"], WORK [BENCH_DIR/mount-work] (repositories, mount
# points; deleted at the end unless KEEP_WORK=1), REUSE [0] (1: use the repositories a run with
# KEEP_WORK=1 left in WORK instead of backing up again), RESULTS_DIR [BENCH_DIR/results/mount-DATE], LOCK
# [BENCH_DIR/.lock], BUILD [1], CARGO_TARGET_DIR [the repository's target/], TARDISFS_OPTS (extra
# -o options, e.g. cache=256), RESTIC_COMPRESSION [auto], BORG_COMPRESSION [zstd,3],
# BORG_ENCRYPTION [repokey-blake2], DROP_CACHES [1], VERIFY [1], MOUNT_TIMEOUT [300] (s).
# Output: RESULTS_DIR/mount.md (tables), mount.csv (every measurement), backups.csv, env.txt, logs/.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$(cd "$TOP/.." && pwd)/shared/bench}
export BENCH_DIR=${BENCH_DIR:-/var/tmp/bench}
export CORPUS_DIR=${CORPUS_DIR:-$BENCH_DIR/corpus}
SRC=${SRC:-$CORPUS_DIR/v2}
TREE=${TREE:-linux-source-6.12}
BIG_FILES=${BIG_FILES:-blobs/vm.img blobs/app.sqlite}
RAND_FILE=${RAND_FILE:-blobs/vm.img}
READS=${READS:-200}
SEED=${SEED:-20261127}
RUNS=${RUNS:-3}
TOOLS=${TOOLS:-tardis restic borg}
MEASURES=${MEASURES:-seq_big tree_tar find rand4k}
WORK=${WORK:-$BENCH_DIR/mount-work}
REUSE=${REUSE:-0}
KEEP_WORK=${KEEP_WORK:-0}
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results/mount-$(date +%Y%m%d-%H%M%S)}
LOCK=${LOCK:-$BENCH_DIR/.lock}
BUILD=${BUILD:-1}
BIN=${CARGO_TARGET_DIR:-$TOP/target}/release
TARDISFS_OPTS=${TARDISFS_OPTS:-}
RESTIC_COMPRESSION=${RESTIC_COMPRESSION:-auto}
BORG_COMPRESSION=${BORG_COMPRESSION:-zstd,3}
BORG_ENCRYPTION=${BORG_ENCRYPTION:-repokey-blake2}
export DROP_CACHES=${DROP_CACHES:-1}
VERIFY=${VERIFY:-1}
MOUNT_TIMEOUT=${MOUNT_TIMEOUT:-300}
PASSWORD=${BENCH_PASSWORD:-bench-password-not-a-secret}
# shellcheck disable=SC2034 # read by lib.sh's log
LOG_TAG=mount
# shellcheck source=/dev/null
. "$SHARED_BENCH/lib.sh"
# shellcheck source=tests/bench/common.sh
. "$TOP/tests/bench/common.sh"
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (dropping caches, mounting)"
[[ -e /dev/fuse ]] || die "/dev/fuse is missing"
install_debs restic borgbackup fuse3 python3-llfuse xz-utils e2fsprogs
if [[ $BUILD == 1 ]]; then
    build_release tardis-client tardis-mount
fi
[[ -x $BIN/tardis && -x $BIN/tardisfs ]] || die "no tardis/tardisfs in $BIN (BUILD=1 builds them)"
[[ -f $CORPUS_DIR/MANIFEST.txt ]] || bash "$SHARED_BENCH/make-corpus.sh"
[[ -d $SRC/$TREE ]] || die "$SRC/$TREE is not a directory (SRC, TREE)"
read -ra BIG <<< "$BIG_FILES"
for f in "${BIG[@]}" "$RAND_FILE"; do [[ -f $SRC/$f ]] || die "$SRC/$f is not a file (BIG_FILES, RAND_FILE)"; done

mkdir -p "$RESULTS_DIR/logs" "$WORK/mnt"
export RESTIC_REPOSITORY=$WORK/restic/repo RESTIC_PASSWORD=$PASSWORD RESTIC_CACHE_DIR=$WORK/restic/cache
export BORG_PASSPHRASE=$PASSWORD BORG_BASE_DIR=$WORK/borg/base BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
BORG_REPO_DIR=$WORK/borg/repo
TDB=$WORK/tardis/db
TPW=$WORK/tardis/password

# ---------------------------------------------------------------- mounts
MNT_PID=''    # the running mount process
MNT_DIR=''
cleanup() {
    local m
    for m in "$WORK"/mnt/*; do
        [[ -d $m ]] || continue
        if mountpoint -q "$m"; then
            fusermount3 -u "$m" 2>/dev/null || umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        fi
    done
    if [[ -n $MNT_PID ]] && kill -0 "$MNT_PID" 2>/dev/null; then
        kill "$MNT_PID" 2>/dev/null || true
        wait "$MNT_PID" 2>/dev/null || true
    fi
    if [[ $KEEP_WORK != 1 && -n ${WORK:-} ]]; then
        rm -rf "${WORK:?}/tardis" "${WORK:?}/restic" "${WORK:?}/borg" "${WORK:?}/orig" "${WORK:?}/find.out" \
            "${WORK:?}/randread.py"
        rmdir "$WORK"/mnt/* "$WORK/mnt" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# root TOOL: the backed-up tree SRC inside the mount of TOOL
root() {
    case $1 in
        tardis) echo "$WORK/mnt/tardis/v2$SRC" ;;
        restic) echo "$WORK/mnt/restic/snapshots/latest$SRC" ;;
        borg) echo "$WORK/mnt/borg$SRC" ;;
    esac
}

# do_mount TOOL LOGFILE: mounts TOOL's backup in the background; sets MNT_PID, MNT_DIR and
# MOUNT_S (seconds until the root of the backed-up tree lists)
do_mount() {
    local tool=$1 lf=$2 t0 r
    MNT_DIR=$WORK/mnt/$tool
    mkdir -p "$MNT_DIR"
    mountpoint -q "$MNT_DIR" && die "$MNT_DIR is still mounted"
    r=$(root "$tool")
    t0=$(date +%s.%N)
    case $tool in
        tardis)
            "$BIN/tardisfs" -f -o "database=$TDB,host=bench,password_file=$TPW${TARDISFS_OPTS:+,$TARDISFS_OPTS}" \
                "$MNT_DIR" >> "$lf" 2>&1 &
            ;;
        restic) restic mount "$MNT_DIR" >> "$lf" 2>&1 & ;;
        borg) borg mount -f "$BORG_REPO_DIR::v2" "$MNT_DIR" >> "$lf" 2>&1 & ;;
    esac
    MNT_PID=$!
    until ls "$r" > /dev/null 2>&1; do
        kill -0 "$MNT_PID" 2>/dev/null || { tail -n 20 "$lf" >&2; die "$tool mount exited, see $lf"; }
        awk -v a="$t0" -v b="$(date +%s.%N)" -v m="$MOUNT_TIMEOUT" 'BEGIN {exit !(b - a > m)}' &&
            die "$tool: $r not listable after ${MOUNT_TIMEOUT}s"
        sleep 0.01
    done
    MOUNT_S=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}')
}

do_unmount() {
    local i
    fusermount3 -u "$MNT_DIR" 2>/dev/null || umount "$MNT_DIR"
    for i in $(seq 600); do
        kill -0 "$MNT_PID" 2>/dev/null || break
        sleep 0.1
        ((i == 300)) && kill "$MNT_PID" 2>/dev/null
    done
    wait "$MNT_PID" 2>/dev/null || true
    MNT_PID=''
}

# CPU seconds (user + system, all threads) and peak RSS (KiB) of a process
proc_cpu() { awk -v hz="$(getconf CLK_TCK)" '{sub(/^.*\) /, ""); printf "%.2f\n", ($12 + $13) / hz}' "/proc/$1/stat"; }
proc_hwm() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

# ---------------------------------------------------------------- helpers
RANDREAD=$WORK/randread.py
cat > "$RANDREAD" <<'PY'
# randread.py MOUNTED ORIGINAL N SEED: N preads of 4 KiB at seeded 4 KiB-aligned offsets of MOUNTED;
# prints "p50_ms p95_ms p50_data_ms data_reads ok|FAIL": percentiles over all reads, the median
# over the reads of blocks that are not all zeros in ORIGINAL (zero blocks are one deduplicated
# chunk to every tool, decoded once and then cached), their number, and whether the bytes read
# equal ORIGINAL's at the same offsets.
import hashlib, math, os, random, statistics, sys, time
mounted, original, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
B = 4096
size = os.path.getsize(original)
rng = random.Random(seed)
offsets = [rng.randrange(size // B) * B for _ in range(n)]
fd = os.open(mounted, os.O_RDONLY)
lat, got = [], []
for off in offsets:
    a = time.perf_counter_ns()
    d = os.pread(fd, B, off)
    lat.append((time.perf_counter_ns() - a) / 1e6)
    got.append(d)
os.close(fd)
with open(original, "rb") as f:
    want = [os.pread(f.fileno(), B, off) for off in offsets]
data = [l for l, w in zip(lat, want) if w.count(0) != len(w)]
s = sorted(lat)
p = lambda q: s[max(0, math.ceil(q * len(s)) - 1)]
p50d = f"{statistics.median(data):.3f}" if data else "-"
print(f"{p(0.5):.3f} {p(0.95):.3f} {p50d} {len(data)} {'ok' if got == want else 'FAIL'}")
PY
# listing DIR: types, sizes of regular files, paths, sorted
listing() { find "$1" -printf '%y %s %P\n' | awk '$1 != "f" {$2 = 0} {print}' | LC_ALL=C sort; }
sums() { (cd "$1" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum); }
# stop_clock: the end of a timed step, and the mount process's CPU time and peak RSS at that moment
# (before any untimed verification reads through the mount)
stop_clock() { t1=$(date +%s.%N); c1=$(proc_cpu "$MNT_PID"); rss=$(proc_hwm "$MNT_PID"); }
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", b - a}'; }

# ---------------------------------------------------------------- run
exec 9>> "$LOCK"
log "waiting for $LOCK"
flock 9
log "holding $LOCK"
RUN_T0=$(date +%s)
{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -sr), nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
    echo "mem: $(free -g | awk '/Mem:/{print $2" GiB"}')"
    echo "fs: $(df -T "$WORK" | tail -n1)"
    echo "commit: $(git -C "$TOP" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "tardis: $("$BIN/tardis" --version 2>&1 | head -n1)"
    echo "restic: $(restic version | head -n1)"
    echo "borg: $(borg --version 2>&1 | head -n1)"
    echo "SRC=$SRC TREE=$TREE BIG_FILES='$BIG_FILES' RAND_FILE=$RAND_FILE READS=$READS SEED=$SEED RUNS=$RUNS"
    echo "TOOLS='$TOOLS' MEASURES='$MEASURES' TARDISFS_OPTS='$TARDISFS_OPTS' RESTIC_COMPRESSION=$RESTIC_COMPRESSION"
    echo "BORG_COMPRESSION=$BORG_COMPRESSION BORG_ENCRYPTION=$BORG_ENCRYPTION DROP_CACHES=$DROP_CACHES"
} > "$RESULTS_DIR/env.txt"

# The original, untimed: what every mount must show.
log "reading the original tree (listing, tar size, SHA-256 sums)"
ORIG=$WORK/orig
mkdir -p "$ORIG"
listing "$SRC" > "$ORIG/listing"
TAR_BYTES=$(tar -C "$SRC" -cf - "$TREE" | wc -c)
[[ $VERIFY == 1 ]] && sums "$SRC/$TREE" > "$ORIG/tree.sum"
(cd "$SRC" && sha256sum "${BIG[@]}") > "$ORIG/big.sum"
BIG_BYTES=0
for f in "${BIG[@]}"; do BIG_BYTES=$((BIG_BYTES + $(stat -c %s "$SRC/$f"))); done
echo "entries=$(wc -l < "$ORIG/listing") tar_bytes=$TAR_BYTES big_bytes=$BIG_BYTES" >> "$RESULTS_DIR/env.txt"

# One backup per tool.
repo_of() { case $1 in tardis) echo "$TDB" ;; restic) echo "$RESTIC_REPOSITORY" ;; borg) echo "$BORG_REPO_DIR" ;; esac; }
echo "tool,wall_s,repo_bytes,rc" > "$RESULTS_DIR/backups.csv"
backup() { # TOOL CMD...
    local tool=$1 t0 t1 rc=0 lf=$RESULTS_DIR/logs/$1-backup.log; shift
    drop_caches
    log "$tool backup: $*"
    t0=$(date +%s.%N)
    "$@" > "$lf" 2>&1 || rc=$?
    sync; t1=$(date +%s.%N)
    echo "$tool,$(secs "$t0" "$t1"),$(du -sb "$(repo_of "$tool")" | cut -f1),$rc" >> "$RESULTS_DIR/backups.csv"
    ((rc == 0)) || { tail -n 20 "$lf" >&2; die "$tool backup failed (rc=$rc), see $lf"; }
}
for tool in $TOOLS; do
    if [[ $REUSE == 1 && -d $WORK/$tool ]]; then log "reusing $WORK/$tool"; continue; fi
    rm -rf "${WORK:?}/$tool"; mkdir -p "$WORK/$tool"
    case $tool in
        tardis)
            printf '%s\n' "$PASSWORD" > "$TPW"
            backup tardis "$BIN/tardis" --local --db "$TDB" --host bench --password-file "$TPW" --name v2 -q "$SRC"
            ;;
        restic)
            restic init --repository-version 2 > "$RESULTS_DIR/logs/restic-init.log" 2>&1
            backup restic restic backup --compression "$RESTIC_COMPRESSION" --host bench "$SRC"
            ;;
        borg)
            borg init -e "$BORG_ENCRYPTION" "$BORG_REPO_DIR" > "$RESULTS_DIR/logs/borg-init.log" 2>&1
            backup borg borg create --compression "$BORG_COMPRESSION" "$BORG_REPO_DIR::v2" "$SRC"
            ;;
        *) die "unknown tool $tool (tardis, restic, borg)" ;;
    esac
done

CSV=$RESULTS_DIR/mount.csv
echo "tool,run,measure,mount_s,time_s,bytes,p50_ms,p95_ms,p50_data_ms,data_reads,fuse_cpu_s,fuse_rss_kb,verify,quiet_wait_s,busy_before" > "$CSV"
for run in $(seq "$RUNS"); do
    for tool in $TOOLS; do
        for m in $MEASURES; do
            lf=$RESULTS_DIR/logs/$tool-$m-$run.log
            : > "$lf"
            drop_caches; quiet_gate
            do_mount "$tool" "$lf"
            r=$(root "$tool")
            drop_caches
            c0=$(proc_cpu "$MNT_PID")
            bytes='' p50='' p95='' p50d='' ndata='' v=''
            t0=$(date +%s.%N)
            case $m in
                seq_big)
                    for f in "${BIG[@]}"; do dd if="$r/$f" of=/dev/null bs=1M status=none 2>> "$lf" || v=FAIL; done
                    stop_clock; bytes=$BIG_BYTES
                    if [[ $VERIFY == 1 && -z $v ]]; then
                        (cd "$r" && sha256sum "${BIG[@]}") 2>> "$lf" | cmp -s - "$ORIG/big.sum" && v=ok || v=FAIL
                    fi
                    ;;
                tree_tar)
                    bytes=$(tar -C "$r" -cf - "$TREE" 2>> "$lf" | wc -c) || v=FAIL
                    stop_clock
                    [[ -z $v && $bytes == "$TAR_BYTES" ]] && v=ok || v=FAIL
                    if [[ $VERIFY == 1 && $run == 1 && $v == ok ]]; then
                        sums "$r/$TREE" 2>> "$lf" | cmp -s - "$ORIG/tree.sum" && v=ok+sums || v=FAIL
                    fi
                    ;;
                find)
                    find "$r" -printf '%y %s %P\n' > "$WORK/find.out" 2>> "$lf" || v=FAIL
                    stop_clock; bytes=$(wc -l < "$WORK/find.out")
                    if [[ -z $v ]]; then
                        awk '$1 != "f" {$2 = 0} {print}' "$WORK/find.out" | LC_ALL=C sort | cmp -s - "$ORIG/listing" && v=ok || v=FAIL
                    fi
                    ;;
                rand4k)
                    out=$(python3 "$RANDREAD" "$r/$RAND_FILE" "$SRC/$RAND_FILE" "$READS" "$SEED" 2>> "$lf") || out="- - - - FAIL"
                    stop_clock; bytes=$((READS * 4096))
                    read -r p50 p95 p50d ndata v <<< "$out"
                    [[ $p50 == - ]] && p50='' p95='' p50d='' ndata=''
                    ;;
                *) die "unknown measure $m" ;;
            esac
            do_unmount
            echo "$tool,$run,$m,$MOUNT_S,$(secs "$t0" "$t1"),$bytes,$p50,$p95,$p50d,$ndata,$(awk -v a="$c0" -v b="$c1" 'BEGIN {printf "%.2f", b - a}'),$rss,$v,$QUIET_WAITED,$QUIET_START_BUSY" >> "$CSV"
            log "run $run $tool $m: $(tail -n1 "$CSV")"
            [[ $v == ok* ]] || log "$tool $m: verification FAILED (see $lf)"
        done
    done
done
echo "elapsed (locked part): $(( $(date +%s) - RUN_T0 ))s" | tee -a "$RESULTS_DIR/env.txt" >&2

python3 - "$CSV" "$RESULTS_DIR/backups.csv" "$TOOLS" > "$RESULTS_DIR/mount.md" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
backups = {r["tool"]: r for r in csv.DictReader(open(sys.argv[2]))}
tools = [t for t in sys.argv[3].split() if any(r["tool"] == t for r in rows)]
peers = [t for t in tools if t != "tardis"]
med = lambda xs: statistics.median(xs) if xs else None
def vals(tool, measure, field):
    return [float(r[field]) for r in rows if r["tool"] == tool and r["measure"] == measure and r[field] != ""]
def ok(tool, measure):
    vs = [r["verify"] for r in rows if r["tool"] == tool and r["measure"] == measure]
    return all(v.startswith("ok") for v in vs)
def byte_count(tool, measure):
    b = [int(r["bytes"]) for r in rows if r["tool"] == tool and r["measure"] == measure and r["bytes"]]
    return b[0] if b else None
measures = []
for r in rows:
    if r["measure"] not in measures:
        measures.append(r["measure"])
lines = []  # (label, {tool: (value, text)})
def add(label, fn):
    cells = {}
    for t in tools:
        v = fn(t)
        if v is not None:
            cells[t] = v
    if cells:
        lines.append((label, cells))
def timed(measure, unit_mb):
    def fn(t):
        m = med(vals(t, measure, "time_s"))
        if m is None:
            return None
        text = f"{m:.2f} s"
        b = byte_count(t, measure)
        if unit_mb and b:
            text += f" ({b / m / 1e6:.0f} MB/s)"
        return (m, text + ("" if ok(t, measure) else " FAILED"))
    return fn
mounts = lambda t: (lambda xs: (med(xs), f"{med(xs):.2f} s") if xs else None)([float(r["mount_s"]) for r in rows if r["tool"] == t])
add("mount until the tree lists (all fresh mounts)", mounts)
labels = {"seq_big": "sequential read of the big files, cold", "tree_tar": "tar of the source tree, cold",
          "find": "find over the whole tree, cold"}
for m in measures:
    if m == "rand4k":
        add("random 4 KiB pread, median latency", lambda t: (lambda x: (x, f"{x:.2f} ms" + ("" if ok(t, m) else " FAILED")) if x is not None else None)(med(vals(t, m, "p50_ms"))))
        nd = [r["data_reads"] for r in rows if r["measure"] == m and r["data_reads"]]
        add(f"random 4 KiB pread, median latency, the {nd[0] if nd else '?'} reads of non-zero blocks",
            lambda t: (lambda x: (x, f"{x:.2f} ms") if x is not None else None)(med(vals(t, m, "p50_data_ms"))))
        add("random 4 KiB pread, p95 latency", lambda t: (lambda x: (x, f"{x:.2f} ms") if x is not None else None)(med(vals(t, m, "p95_ms"))))
    else:
        add(labels.get(m, m), timed(m, m in ("seq_big", "tree_tar")))
print("| measurement (median) | " + " | ".join(tools) + " | " + " | ".join(f"tardis ÷ {p}" for p in peers) + " |")
print("|---|" + "---:|" * (len(tools) + len(peers)))
for label, cells in lines:
    row = [cells[t][1] if t in cells else "-" for t in tools]
    for p in peers:
        row.append(f"{cells['tardis'][0] / cells[p][0]:.2f}" if "tardis" in cells and p in cells and cells[p][0] else "-")
    print(f"| {label} | " + " | ".join(row) + " |")
print()
print("| mount process, median per measurement | " + " | ".join(tools) + " |")
print("|---|" + "---:|" * len(tools))
for m in measures:
    print(f"| CPU s, {m} | " + " | ".join(f"{med(vals(t, m, 'fuse_cpu_s')):.2f}" if vals(t, m, 'fuse_cpu_s') else "-" for t in tools) + " |")
for m in measures:
    print(f"| peak RSS MiB, {m} | " + " | ".join(f"{med(vals(t, m, 'fuse_rss_kb')) / 1024:.0f}" if vals(t, m, 'fuse_rss_kb') else "-" for t in tools) + " |")
print()
print("| backup (one, untimed context) | " + " | ".join(tools) + " |")
print("|---|" + "---:|" * len(tools))
print("| wall s | " + " | ".join(f"{float(backups[t]['wall_s']):.1f}" if t in backups else "-" for t in tools) + " |")
print("| repository MiB | " + " | ".join(f"{int(backups[t]['repo_bytes']) / 2**20:,.0f}" if t in backups else "-" for t in tools) + " |")
print()
runs = sorted({int(r["run"]) for r in rows})
print("Single runs (s; rand4k: p50 / p50 of non-zero blocks / p95, ms):")
for t in tools:
    for m in measures:
        xs = [r for r in rows if r["tool"] == t and r["measure"] == m]
        if m == "rand4k":
            s = "; ".join(f"{r['p50_ms']} / {r['p50_data_ms']} / {r['p95_ms']}" for r in xs)
        else:
            s = " / ".join(r["time_s"] for r in xs)
        print(f"- {t} {m}: {s}; mount {' / '.join(r['mount_s'] for r in xs)}")
PY
cat "$RESULTS_DIR/mount.md"
log "results in $RESULTS_DIR (mount.md, mount.csv, backups.csv, env.txt, logs/)"
