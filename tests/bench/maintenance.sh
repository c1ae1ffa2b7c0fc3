#!/usr/bin/env bash
# maintenance.sh - purging half of the backups plus reclaiming their space, and verifying every
# byte of a repository: Tardis against restic and Borg on the same data, in one run (issue 6).
#
# History: SETS backups (default 6) of one live path, the same sequence of trees for every tool.
# Sets 1..SETS/2 are the corpus's v1 tree (../shared/bench/make-corpus.sh: Debian's Linux source
# 6.12.113 plus a SQLite database and an ext4 image), sets SETS/2+1..SETS its v2 tree (6.12.117,
# both blobs changed). For set k the live path is first reset to its base (`rsync -a --delete`),
# then one in MUTATE_CLASSES of its kernel files (by sorted path, starting at the (k-1)th) gets a
# line appended, so that every set holds data of its own, as edits would leave. Tools: `tardis
# --local` (encrypted host, `--name sK`), restic (repository v2, compression auto, encrypted),
# Borg (repokey-blake2, zstd,3, as run-peers.sh). The repositories and the tools' caches are then
# moved aside as a pristine copy, and every run copies them back (`cp -a`) before each step pair:
#   verify      full data verification of the SETS-set repository: `tardis-tools verify
#               --read-data`, `restic check --read-data`, `borg check --verify-data`
#   purge       removing the older half of the sets and giving their space back:
#               `tardis-tools purge --before <start of set SETS/2+1>` + `tardis-tools compact`,
#               `restic forget <ids> --prune`, `borg delete REPO s1 .. sN` + `borg compact`, each
#               at its defaults (Tardis compacts segments under 50% live, restic prune tolerates
#               5% unused, borg compact rewrites segments with 10% or more to free)
#   purge_full  (Tardis only, TARDIS_FULL_COMPACT=1) the same with `compact --threshold 1`, which
#               rewrites every segment holding a dead byte: the most Tardis can give back and what
#               copying costs; set against the peers' purge step
# Each step is timed with /usr/bin/time -v: wall time (the sum over the step's commands, plus one
# `sync`) and peak RSS (the largest of them). The page cache is dropped and a quiet CPU awaited
# before each step. After a purge step each tool's own check runs (untimed: `tardis-tools
# verify`, `restic check`, `borg check`) and exactly the newer half of the sets must be left. A
# step that exits non-zero or fails that check is a failed step, reported as such and never as a
# figure, and makes the script exit 1. Repository sizes (du, without the tools' caches) are taken
# before and after each step.
#
# The heavy part (history and measurements) holds LOCK (flock), which the other benchmark scripts
# take too, so that two benchmarks never share the machine.
#
# Environment (defaults in brackets): BENCH_DIR [/var/tmp/bench], CORPUS_DIR [BENCH_DIR/corpus],
#   SHARED_BENCH [../shared/bench next to the repository], WORK [BENCH_DIR/maint-work] (scratch,
#   deleted at the end unless KEEP=1), RESULTS_DIR [BENCH_DIR/results/maintenance-DATE], RUNS [3]
#   (medians over runs), SETS [6] (even), MUTATE_CLASSES [8], PEERS ["restic borg"],
#   TARDIS_COMPACT_THRESHOLD [the tool's default], TARDIS_FULL_COMPACT [1], DROP_CACHES [1], LOCK
#   [BENCH_DIR/.lock], BUILD [1] (cargo build --release --locked), BIN_DIR [CARGO_TARGET_DIR or
#   target, /release], FREE_MARGIN_GB [2] (refuse a copy that would leave less free), KEEP [0] (1:
#   keep WORK/pristine; then REUSE=1 measures it again without building the history), REPORT_ONLY
#   =DIR (only rewrite DIR/maintenance.md from its CSV files), and make-corpus.sh's KERNEL_ONLY /
#   SQLITE_MB / IMG_MB for a smaller corpus.
# Output in RESULTS_DIR: maintenance.md (tables), steps.csv (every measured step of every run;
# for Tardis also the bytes of segments and index after it), history.csv (the backups that built
# the repositories), env.txt, logs/ (every command's output and /usr/bin/time -v report).
set -euo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$(cd "$TOP/.." && pwd)/shared/bench}
export BENCH_DIR=${BENCH_DIR:-/var/tmp/bench}
export CORPUS_DIR=${CORPUS_DIR:-$BENCH_DIR/corpus}
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results/maintenance-$(date +%Y%m%d-%H%M%S)}
WORK=${WORK:-$BENCH_DIR/maint-work}
RUNS=${RUNS:-3}
SETS=${SETS:-6}
MUTATE_CLASSES=${MUTATE_CLASSES:-8}
PEERS=${PEERS:-restic borg}
TARDIS_COMPACT_THRESHOLD=${TARDIS_COMPACT_THRESHOLD:-}
TARDIS_FULL_COMPACT=${TARDIS_FULL_COMPACT:-1}
export DROP_CACHES=${DROP_CACHES:-1}
LOCK=${LOCK:-$BENCH_DIR/.lock}
BUILD=${BUILD:-1}
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-$TOP/target}/release}
FREE_MARGIN_GB=${FREE_MARGIN_GB:-2}
KEEP=${KEEP:-0}
REUSE=${REUSE:-0}
PASSWORD=${BENCH_PASSWORD:-bench-password-not-a-secret}
V1=$CORPUS_DIR/v1
V2=$CORPUS_DIR/v2
REPOS=$WORK/repos        # where every tool's repository lives while it is used
PRISTINE=$WORK/pristine  # the same after the history, copied back before each run
SRC=$WORK/live           # the live path every tool backs up
# shellcheck disable=SC2034  # read by lib.sh's log
LOG_TAG=maintenance
# shellcheck source=/dev/null
. "$SHARED_BENCH/lib.sh"
# shellcheck source=tests/bench/common.sh
. "$TOP/tests/bench/common.sh"
die() { log "error: $*"; exit 1; }
q() { printf '%q' "$1"; }
((SETS >= 2 && SETS % 2 == 0)) || die "SETS must be even and at least 2"
((SETS <= MUTATE_CLASSES)) || die "SETS must not exceed MUTATE_CLASSES"
HALF=$((SETS / 2))
read -ra TOOLS <<< "tardis $PEERS"

# report DIR: DIR/maintenance.md from DIR/steps.csv and DIR/history.csv (alone: REPORT_ONLY=DIR).
report() {
python3 - "$1/steps.csv" "$1/history.csv" > "$1/maintenance.md" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
hist = list(csv.DictReader(open(sys.argv[2])))
tools = list(dict.fromkeys(h["tool"] for h in hist))
nsets = len({h["set"] for h in hist})
half = nsets // 2
peers = tools[1:]
ok = lambda r: r["rc"] == "0" and r["check"] in ("", "ok")
cell = {}
for r in rows:
    cell.setdefault((r["tool"], r["step"]), []).append(r)
def med(tool, step, f):
    rs = cell.get((tool, step), [])
    good = [f(r) for r in rs if ok(r)]
    bad = len(rs) - len(good)
    return (statistics.median(good) if good and not bad else None), bad, len(rs)
wall = lambda r: float(r["wall_s"]) + float(r["sync_s"])
rss = lambda r: int(r["max_rss_kb"]) / 1024
mib = lambda b: int(b) / 2**20
# purge_full (Tardis only, TARDIS_FULL_COMPACT=1) is set against the peers' purge.
label = {"purge": f"purge {half} of {nsets} sets + compaction", "verify": f"verify, reading all data ({nsets} sets)",
         "purge_full": "the same, Tardis compacting at `--threshold 1`"}
steps = [st for st in ("purge", "purge_full", "verify") if ("tardis", st) in cell]
peer_step = lambda st: "purge" if st == "purge_full" else st
def fmt(v, bad, n, spec):
    return f"failed ({bad} of {n} runs)" if bad else ("-" if v is None else format(v, spec))
def table(title, f, spec, unit):
    print(f"**{title}** (median of the runs; ratio = Tardis / peer, below 1 means Tardis is {'faster' if unit == 's' else 'smaller'})")
    print()
    print("| " + " | ".join(["step", f"tardis {unit}"] + [f"{p} {unit} | tardis/{p}" for p in peers]) + " |")
    print("|---|---:|" + "---:|---:|" * len(peers))
    for st in steps:
        t, tb, tn = med("tardis", st, f)
        cells = [fmt(t, tb, tn, spec)]
        for p in peers:
            v, b, n = med(p, peer_step(st), f)
            cells += [fmt(v, b, n, spec), f"{t / v:.2f}" if t is not None and v else "-"]
        print(f"| {label[st]} | " + " | ".join(cells) + " |")
    print()
table("Wall time, seconds", wall, ".1f", "s")
table("Peak memory (max RSS), MiB", rss, ",.0f", "MiB")
print(f"**Repository size, MiB** (du; caches not counted)")
print()
columns = [(t, "purge", t) for t in tools]
if "purge_full" in steps:
    columns.insert(1, ("tardis", "purge_full", "tardis, `--threshold 1`"))
print("| repository | " + " | ".join(c[2] for c in columns) + " |")
print("|---|" + "---:|" * len(columns))
sizes = {}
for t, st, _ in columns:
    rs = [r for r in cell.get((t, st), []) if ok(r)]
    sizes[(t, st)] = ([mib(r["repo_before"]) for r in rs], [mib(r["repo_after"]) for r in rs])
# The median; the range too where the runs differ by a MiB or more.
def fmts(xs):
    if not xs:
        return "-"
    m = statistics.median(xs)
    return f"{m:,.0f}" + (f" ({min(xs):,.0f}–{max(xs):,.0f})" if max(xs) - min(xs) >= 1 else "")
print(f"| {nsets} sets (before the purge) | " + " | ".join(fmts(sizes[c[:2]][0]) for c in columns) + " |")
print(f"| {nsets - half} sets (after purge + compaction) | " + " | ".join(fmts(sizes[c[:2]][1]) for c in columns) + " |")
def freed(k):
    b, a = (statistics.median(x) if x else None for x in sizes[k])
    return f"{b - a:,.0f} ({100 * (b - a) / b:.0f}%)" if a is not None and b else "-"
print("| freed | " + " | ".join(freed(c[:2]) for c in columns) + " |")
print()
for st in ("purge", "purge_full"):
    d = [r["detail_after"] for r in cell.get(("tardis", st), []) if ok(r) and r.get("detail_after")]
    if d:
        print(f"Tardis after {st}: {d[0]} bytes (first run).")
        print()
print("**Single runs** (wall s / max RSS MiB, in run order)")
print()
for t in tools:
    for st in steps:
        rs = cell.get((t, st), [])
        if not rs:
            continue
        runs = ", ".join(f"{wall(r):.1f} s / {rss(r):,.0f} MiB" + ("" if ok(r) else f" (FAILED rc={r['rc']} check={r['check']})") for r in rs)
        print(f"- {t} {st}: {runs}")
print()
print("**History** (the backups that built the repositories; untimed context)")
print()
print("| set | tree | files edited | " + " | ".join(f"{t} backup s | {t} MiB" for t in tools) + " |")
print("|---|---|---:|" + "---:|---:|" * len(tools))
by = {(h["set"], h["tool"]): h for h in hist}
for k in range(1, nsets + 1):
    s = f"s{k}"
    h0 = by[(s, tools[0])]
    cells = []
    for t in tools:
        h = by[(s, t)]
        cells += [f"{float(h['backup_wall_s']):.1f}", f"{mib(h['repo_bytes']):,.0f}"]
    print(f"| {s} | {h0['base']} | {int(h0['mutated_files']):,} ({int(h0['mutated_bytes']) / 2**20:,.0f} MiB) | " + " | ".join(cells) + " |")
PY
}
if [[ -n ${REPORT_ONLY:-} ]]; then report "$REPORT_ONLY"; cat "$REPORT_ONLY/maintenance.md"; exit 0; fi

install_debs restic borgbackup rsync time e2fsprogs xz-utils
if [[ $BUILD == 1 ]]; then
    build_release tardis-client tardis-tools
fi
for b in tardis tardis-tools; do [[ -x $BIN_DIR/$b ]] || die "$BIN_DIR/$b missing (BUILD=1 or BIN_DIR)"; done
[[ -f $CORPUS_DIR/MANIFEST.txt ]] || bash "$SHARED_BENCH/make-corpus.sh"
[[ -d $V1 && -d $V2 ]] || die "corpus incomplete: $V1 and $V2 expected"

LOGS=$RESULTS_DIR/logs
mkdir -p "$LOGS" "$WORK"
STEPS_CSV=$RESULTS_DIR/steps.csv
HIST_CSV=$RESULTS_DIR/history.csv

# ---------------------------------------------------------------- the tools
export RESTIC_REPOSITORY=$REPOS/restic/repo RESTIC_PASSWORD=$PASSWORD RESTIC_CACHE_DIR=$REPOS/restic/cache
export BORG_PASSPHRASE=$PASSWORD BORG_BASE_DIR=$REPOS/borg/base
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=no
BORG_REPO_DIR=$REPOS/borg/repo
TT="$(q "$BIN_DIR/tardis-tools") --db $(q "$REPOS/tardis/db") --host bench --password-file $(q "$REPOS/tardis/password")"

version() {
    case $1 in
        tardis) echo "$("$BIN_DIR/tardis" --version | awk '{print $2}') ($(git -C "$TOP" rev-parse --short HEAD)$(git -C "$TOP" diff --quiet HEAD -- . 2>/dev/null || echo ' with uncommitted changes'))" ;;
        restic) restic version | awk 'NR==1 {print $2}' ;;
        borg) borg --version | awk '{print $2}' ;;
    esac
}
repo_dirs() { # what counts as the repository
    case $1 in
        tardis) echo "$REPOS/tardis/db" ;;
        restic) echo "$REPOS/restic/repo" ;;
        borg) echo "$BORG_REPO_DIR" ;;
    esac
}
cache_dirs() {
    case $1 in
        restic) echo "$REPOS/restic/cache" ;;
        borg) echo "$REPOS/borg/base" ;;
    esac
}
du_b() { local t=0 s p; for p in "$@"; do [[ -e $p ]] && { s=$(du -sb "$p" | cut -f1); t=$((t + s)); }; done; echo "$t"; }
init_cmd() {
    case $1 in
        tardis) echo "mkdir -p $(q "$REPOS/tardis") && echo $(q "$PASSWORD") > $(q "$REPOS/tardis/password")" ;;
        restic) echo "restic init --repository-version 2" ;;
        borg) echo "mkdir -p $(q "$REPOS/borg") && borg init -e repokey-blake2 $(q "$BORG_REPO_DIR")" ;;
    esac
}
backup_cmd() { # TOOL K
    case $1 in
        tardis) echo "$(q "$BIN_DIR/tardis") --local --db $(q "$REPOS/tardis/db") --host bench --password-file $(q "$REPOS/tardis/password") --name s$2 -q $(q "$SRC")" ;;
        restic) echo "restic backup --compression auto --host bench --tag s$2 -q $(q "$SRC")" ;;
        borg) echo "borg create --compression zstd,3 $(q "$BORG_REPO_DIR")::s$2 $(q "$SRC")" ;;
    esac
}
verify_cmds() {
    case $1 in
        tardis) echo "$TT verify --read-data" ;;
        restic) echo "restic check --read-data" ;;
        borg) echo "borg check --verify-data $(q "$BORG_REPO_DIR")" ;;
    esac
}
purge_cmds() { # TOOL [TARDIS_THRESHOLD]: one command per line
    local sets=() k threshold=${2:-$TARDIS_COMPACT_THRESHOLD}
    for ((k = 1; k <= HALF; k++)); do sets+=("s$k"); done
    case $1 in
        tardis)
            echo "$TT purge --before $(q "$(cat "$REPOS/tardis/purge-before")")"
            echo "$TT compact${threshold:+ --threshold $threshold}" ;;
        restic) echo "restic forget --prune $(cat "$REPOS/restic/purge-ids")" ;;
        borg)
            echo "borg delete $(q "$BORG_REPO_DIR") ${sets[*]}"
            echo "borg compact $(q "$BORG_REPO_DIR")" ;;
    esac
}
# After the purge step: the tool's own check passes and the kept sets are exactly s(HALF+1)..sSETS.
after_purge_check() { # TOOL LOGFILE
    local want got k
    want=$(for ((k = HALF + 1; k <= SETS; k++)); do echo "s$k"; done)
    case $1 in
        tardis)
            bash -c "$TT verify" >> "$2" 2>&1 || return 1
            got=$(bash -c "$TT sets --json" | python3 -c 'import json,sys; [print(json.loads(l)["name"]) for l in sys.stdin]') ;;
        restic)
            restic check >> "$2" 2>&1 || return 1
            got=$(restic snapshots --json | python3 -c 'import json,sys; [print(*s["tags"]) for s in sorted(json.load(sys.stdin), key=lambda s: s["time"])]') ;;
        borg)
            borg check "$BORG_REPO_DIR" >> "$2" 2>&1 || return 1
            got=$(borg list --short "$BORG_REPO_DIR") ;;
    esac
    echo "kept sets: $(echo "$got" | tr '\n' ' ')" >> "$2"
    [[ $got == "$want" ]]
}

# ---------------------------------------------------------------- helpers
need_free() { # BYTES: refuse to go below FREE_MARGIN_GB of free space
    local avail; avail=$(df --output=avail -B1 "$WORK" | tail -n1)
    ((avail - $1 > FREE_MARGIN_GB * 1024 * 1024 * 1024)) ||
        die "only $((avail >> 20)) MiB free under $WORK; $(($1 >> 20)) MiB more needed plus ${FREE_MARGIN_GB} GiB margin"
}
tv() { grep -F "$1" "$2" | head -n1 | awk -F': ' '{print $2}'; }
fsub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", b - a}'; }
fadd() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a + b}'; }
# shellcheck disable=SC2317  # run by the trap
cleanup() {
    if [[ $KEEP == 1 ]]; then rm -rf "$REPOS" "$SRC"; else rm -rf "${WORK:?}"; fi
}
trap cleanup EXIT

# Deterministic edit of one class of the kernel files of the live tree: a line naming the set is
# appended to every MUTATE_CLASSES-th regular file (by sorted path), starting at CLASS.
mutate() { # CLASS SET
    python3 - "$SRC" "$1" "$MUTATE_CLASSES" "$2" <<'PY'
import os, sys
root, cls, n, tag = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
files = []
for d, dirs, names in os.walk(os.path.join(root, "linux-source-6.12")):
    dirs.sort()
    files += [os.path.join(d, f) for f in sorted(names) if os.path.isfile(os.path.join(d, f))
              and not os.path.islink(os.path.join(d, f))]
count = size = 0
line = f"\n/* tardis maintenance benchmark: edited for set {tag} */\n".encode()
for i, p in enumerate(files):
    if i % n == cls:
        with open(p, "ab") as f:
            f.write(line)
        count += 1
        size += os.path.getsize(p)
print(count, size)
PY
}

# ---------------------------------------------------------------- measuring
# step TOOL STEP RUN CMD...: runs the commands in order under /usr/bin/time -v (stopping at the
# first failure), then `sync`; appends a row to steps.csv and returns the first non-zero status.
STEP_RC=0
step() {
    local tool=$1 st=$2 run=$3; shift 3
    local wall=0 user=0 sys=0 rss=0 rc=0 i=0 cmd tf lf t0 t1 t2 r r_rss before after
    lf=$LOGS/$tool-$st-r$run.log
    : > "$lf"
    before=$(du_b "$(repo_dirs "$tool")")
    drop_caches; quiet_gate
    for cmd in "$@"; do
        i=$((i + 1)); tf=$LOGS/$tool-$st-r$run-$i.time
        log "run $run $tool $st: $cmd"
        echo "\$ $cmd" >> "$lf"
        t0=$(date +%s.%N)
        /usr/bin/time -v -o "$tf" bash -c "$cmd" >> "$lf" 2>&1 && r=0 || r=$?
        t1=$(date +%s.%N)
        wall=$(fadd "$wall" "$(fsub "$t0" "$t1")")
        user=$(fadd "$user" "$(tv 'User time' "$tf")"); sys=$(fadd "$sys" "$(tv 'System time' "$tf")")
        r_rss=$(tv 'Maximum resident' "$tf"); ((r_rss > rss)) && rss=$r_rss
        echo "# exit $r, $(fsub "$t0" "$t1") s, max RSS ${r_rss} KB" >> "$lf"
        if ((r != 0)); then rc=$r; break; fi
    done
    t1=$(date +%s.%N); sync; t2=$(date +%s.%N)
    after=$(du_b "$(repo_dirs "$tool")")
    STEP_CHECK=''
    if [[ $rc == 0 && $st == verify && $tool == tardis ]]; then
        grep -q ': no damage$' "$lf" && STEP_CHECK=ok || STEP_CHECK=FAIL
    fi
    if [[ $rc == 0 && $st == purge* ]]; then
        after_purge_check "$tool" "$lf" && STEP_CHECK=ok || STEP_CHECK=FAIL
    fi
    local detail=''
    [[ $tool == tardis ]] && detail="segments $(du_b "$REPOS"/tardis/db/*/segments) + index $(du_b "$REPOS"/tardis/db/*/index)"
    echo "$tool,${VERSION[$tool]},$run,$st,$i,$wall,$(fsub "$t1" "$t2"),$user,$sys,$rss,$before,$after,$(du_b "$(cache_dirs "$tool")"),$rc,$STEP_CHECK,$QUIET_WAITED,$QUIET_START_BUSY,$detail" >> "$STEPS_CSV"
    log "run $run $tool $st: rc=$rc check=${STEP_CHECK:--} wall=${wall}s rss=${rss}KB repo $before -> $after bytes"
    if [[ $rc != 0 || $STEP_CHECK == FAIL ]]; then
        STEP_RC=1; log "run $run $tool $st FAILED, see $lf"; tail -n 5 "$lf" >&2
    fi
}

declare -A VERSION
for t in "${TOOLS[@]}"; do VERSION[$t]=$(version "$t"); done
{
    echo "date: $(date -u +%FT%TZ)"
    echo "host: $(uname -sr), nproc=$(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
    echo "mem: $(free -g | awk '/Mem:/{print $2" GiB"}')"
    echo "fs: $(df -T "$WORK" | tail -n1)"
    echo "corpus: $CORPUS_DIR ($(grep -m1 '^v1 ' "$CORPUS_DIR/MANIFEST.txt" || true) / $(grep -m1 '^v2 ' "$CORPUS_DIR/MANIFEST.txt" || true))"
    echo "SETS=$SETS HALF=$HALF MUTATE_CLASSES=$MUTATE_CLASSES RUNS=$RUNS DROP_CACHES=$DROP_CACHES TARDIS_COMPACT_THRESHOLD=${TARDIS_COMPACT_THRESHOLD:-default}"
    for t in "${TOOLS[@]}"; do echo "version $t ${VERSION[$t]}"; done
} > "$RESULTS_DIR/env.txt"

# ---------------------------------------------------------------- the run, under the lock
exec 9>>"$LOCK"
if ! flock -n 9; then log "waiting for $LOCK (another benchmark is running)"; flock 9; fi
RUN_T0=$(date +%s)

if [[ $REUSE == 1 && -f $PRISTINE/COMPLETE ]]; then
    log "reusing the history in $PRISTINE"
    cp "$PRISTINE/history.csv" "$HIST_CSV"
else
    rm -rf "$REPOS" "$PRISTINE" "$SRC"
    mkdir -p "$REPOS"
    need_free "$(du_b "$V1")"
    log "preparing $SRC as a copy of v1"
    cp -a "$V1" "$SRC"
    echo "set,base,mutated_files,mutated_bytes,tool,backup_wall_s,rc,repo_bytes" > "$HIST_CSV"
    for t in "${TOOLS[@]}"; do
        bash -c "$(init_cmd "$t")" > "$LOGS/$t-init.log" 2>&1 || die "$t init failed, see $LOGS/$t-init.log"
    done
    for ((k = 1; k <= SETS; k++)); do
        base=$V1; ((k > HALF)) && base=$V2
        rsync -a --delete "$base/" "$SRC/"
        read -r mf mb < <(mutate $((k - 1)) "s$k") || true
        [[ -n ${mb:-} ]] || die "editing the tree for s$k failed"
        log "set s$k: $(basename "$base") with $mf files edited ($((mb >> 20)) MiB)"
        for t in "${TOOLS[@]}"; do
            t0=$(date +%s.%N)
            bash -c "$(backup_cmd "$t" "$k")" > "$LOGS/$t-backup-s$k.log" 2>&1 && r=0 || r=$?
            t1=$(date +%s.%N); sync
            echo "s$k,$(basename "$base"),$mf,$mb,$t,$(fsub "$t0" "$t1"),$r,$(du_b "$(repo_dirs "$t")")" >> "$HIST_CSV"
            ((r == 0)) || die "$t backup of s$k failed (exit $r), see $LOGS/$t-backup-s$k.log"
        done
    done
    rm -rf "$SRC"
    # What each tool's purge names: Tardis the start of the first kept set (sets that finished
    # before it go), restic the snapshot IDs of the older half.
    bash -c "$TT sets --json" > "$LOGS/tardis-sets.json" || die "tardis-tools sets failed"
    python3 - "$HALF" "$LOGS/tardis-sets.json" > "$REPOS/tardis/purge-before" <<'PY' || die "no Tardis set times"
import json, sys
half = int(sys.argv[1])
sets = [json.loads(l) for l in open(sys.argv[2])]
assert [s["name"] for s in sets] == [f"s{k}" for k in range(1, len(sets) + 1)], sets
print(sets[half]["started"])
PY
    [[ " ${TOOLS[*]} " != *" restic "* ]] || restic snapshots --json | python3 -c '
import json, sys
half = int(sys.argv[1])
snaps = sorted(json.load(sys.stdin), key=lambda s: s["time"])
old = [s["short_id"] for s in snaps if int(s["tags"][0][1:]) <= half]
assert len(old) == half, snaps
print(" ".join(old))' "$HALF" > "$REPOS/restic/purge-ids" || die "no restic snapshot IDs"
    mv "$REPOS" "$PRISTINE"
    cp "$HIST_CSV" "$PRISTINE/history.csv"
    touch "$PRISTINE/COMPLETE"
fi
HIST_T1=$(date +%s)

echo "tool,version,run,step,commands,wall_s,sync_s,user_s,sys_s,max_rss_kb,repo_before,repo_after,cache_bytes,rc,check,quiet_wait_s,busy_before,detail_after" > "$STEPS_CSV"
for ((run = 1; run <= RUNS; run++)); do
    # Rotate the order of the tools from run to run, so none always goes first.
    n=${#TOOLS[@]}; order=()
    for ((i = 0; i < n; i++)); do order+=("${TOOLS[$(((i + run - 1) % n))]}"); done
    for t in "${order[@]}"; do
        rm -rf "${REPOS:?}/$t"; mkdir -p "$REPOS"
        need_free "$(du_b "$PRISTINE/$t")"
        cp -a "$PRISTINE/$t" "$REPOS/$t"
        mapfile -t cmds < <(verify_cmds "$t")
        step "$t" verify "$run" "${cmds[@]}"
        mapfile -t cmds < <(purge_cmds "$t")
        step "$t" purge "$run" "${cmds[@]}"
        rm -rf "${REPOS:?}/$t"
        if [[ $t == tardis && $TARDIS_FULL_COMPACT == 1 ]]; then
            cp -a "$PRISTINE/$t" "$REPOS/$t"
            mapfile -t cmds < <(purge_cmds "$t" 1)
            step "$t" purge_full "$run" "${cmds[@]}"
            rm -rf "${REPOS:?}/$t"
        fi
    done
done
RUN_T1=$(date +%s)
flock -u 9
echo "elapsed: history $((HIST_T1 - RUN_T0)) s, measurements $((RUN_T1 - HIST_T1)) s" | tee -a "$RESULTS_DIR/env.txt" >&2

report "$RESULTS_DIR"
cat "$RESULTS_DIR/maintenance.md"
log "results in $RESULTS_DIR (maintenance.md, steps.csv, history.csv, logs/)"
exit "$STEP_RC"
