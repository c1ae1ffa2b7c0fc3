#!/usr/bin/env bash
# compare.sh - Tardis against restic and Borg (and rsync) on the same data, RUNS times in one go.
#
# Builds the release binaries, installs the peers from Debian, builds the benchmark corpus if it
# is missing (../shared/bench/make-corpus.sh: two versions of Debian's Linux source tree plus a
# database and a disk image), then RUNS times: the shared peer script (run-peers.sh) and the same
# steps for Tardis on the same live path. It writes one table of medians over the runs, with the
# ratios that issue #8 sets targets for:
#   a_full_v1   first backup of v1          b_noop_v1   second backup, nothing changed
#   w_walk      `find -printf` stat walk of the same tree (v1), the floor under b_noop_v1
#   f_remote_v1 first backup of v1 to a fresh `tardisd` over loopback QUIC (also: daemon peak RSS)
#   c_incr_v2   backup after v1 -> v2       d_restore   full restore of the v2 set (verified)
#   e_restore1  restore of one file (verified)
# Page caches are dropped before every step; each step waits for a quiet CPU first.
#
# Environment: BENCH_DIR (/var/tmp/bench), CORPUS_DIR, SHARED_BENCH (../shared/bench next to the
# repository), PEERS ("restic borg rsync"), RUNS (3), REMOTE (1: the loopback step), RESULTS_DIR,
# DROP_CACHES (1), and make-corpus.sh's KERNEL_ONLY / SQLITE_MB / IMG_MB to shrink the corpus.
# Output: RESULTS_DIR/compare.md (medians), RESULTS_DIR/runN/{results.csv,tardis.csv,logs/}.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$(cd "$TOP/.." && pwd)/shared/bench}
export BENCH_DIR=${BENCH_DIR:-/var/tmp/bench}
export CORPUS_DIR=${CORPUS_DIR:-$BENCH_DIR/corpus}
RESULTS_ROOT=${RESULTS_DIR:-$BENCH_DIR/results/compare-$(date +%Y%m%d-%H%M%S)}
export PEERS=${PEERS:-restic borg rsync}
export DROP_CACHES=${DROP_CACHES:-1}
RUNS=${RUNS:-3}
REMOTE=${REMOTE:-1}
SRC=${SRC:-$BENCH_DIR/live}
WORK=${WORK:-$BENCH_DIR/peers}
SINGLE_FILE=${SINGLE_FILE:-linux-source-6.12/MAINTAINERS}
V1=$CORPUS_DIR/v1
V2=$CORPUS_DIR/v2
LOG_TAG=compare
# shellcheck source=/dev/null
. "$SHARED_BENCH/lib.sh"
# shellcheck source=tests/bench/common.sh
. "$TOP/tests/bench/common.sh"

install_debs restic borgbackup rsync time e2fsprogs xz-utils
build_release tardis-client tardis-tools tardis-server
BIN=$TOP/target/release
[[ -f $CORPUS_DIR/MANIFEST.txt ]] || bash "$SHARED_BENCH/make-corpus.sh"

T=$WORK/tardis
tv() { grep -F "$1" "$2" | head -n1 | awk -F': ' '{print $2}'; }
manifest() { # DIR OUT
    (cd "$1" && find . -mindepth 1 -printf '%y %m %p %l\n' | LC_ALL=C sort > "$2.tree" \
        && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum > "$2.sum")
}
export -f manifest

# measure STEP REPO_DIR VERIFY_CMD CMD...: one timed Tardis step, appended to $CSV.
DAEMON_RSS=
measure() {
    local step=$1 repo=$2 verify=$3; shift 3
    local tf=$RUN_DIR/logs/tardis-$step.time lf=$RUN_DIR/logs/tardis-$step.log t0 t1 t2 rc v=''
    drop_caches; quiet_gate
    log "tardis $step: $*"
    t0=$(date +%s.%N)
    /usr/bin/time -v -o "$tf" "$@" > "$lf" 2>&1 && rc=0 || rc=$?
    t1=$(date +%s.%N); sync; t2=$(date +%s.%N)
    if [[ -n $verify ]]; then if bash -c "$verify" >> "$lf" 2>&1; then v=ok; else v=FAIL; fi; fi
    [[ -n $DAEMON_PID ]] && DAEMON_RSS=$(awk '/^VmHWM/{print $2}' "/proc/$DAEMON_PID/status")
    echo "$step,$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}'),$(awk -v a="$t1" -v b="$t2" 'BEGIN{printf "%.2f", b-a}'),$(tv 'User time' "$tf"),$(tv 'System time' "$tf"),$(tv 'Maximum resident' "$tf"),$(du -sb "$repo" | cut -f1),$rc,$v,$DAEMON_RSS" >> "$CSV"
    log "tardis $step: rc=$rc $(tail -n1 "$CSV")"
}

# The loopback tardisd of f_remote_v1 (common.sh); its peak RSS (VmHWM) is read after the backup.
DAEMON_PID=
trap '[[ -n $DAEMON_PID ]] && kill "$DAEMON_PID" 2>/dev/null; true' EXIT

tardis_run() {
    rm -rf "$T"; mkdir -p "$T"
    printf '%s\n' "${BENCH_PASSWORD:-bench-password-not-a-secret}" > "$T/password"
    local common=(--db "$T/db" --host bench --password-file "$T/password")
    CSV=$RUN_DIR/tardis.csv
    echo "step,wall_s,sync_s,user_s,sys_s,max_rss_kb,repo_bytes,rc,verify,daemon_rss_kb" > "$CSV"
    # Back to v1 in place, as the peers' v1 -> v2 step went forward: deleting and copying the
    # whole tree again would leave 86k just-deleted inodes, which ext4 without a journal skips
    # (slowly) when this run's restore creates files, a cost restic's restore does not pay.
    rsync -a --delete "$V1/" "$SRC/"
    measure a_full_v1 "$T/db" "" "$BIN/tardis" --local "${common[@]}" --create --name s1 -q "$SRC"
    measure b_noop_v1 "$T/db" "" "$BIN/tardis" --local "${common[@]}" --name s2 -q "$SRC"
    measure w_walk "$T/db" "" bash -c "find $(printf '%q' "$SRC") -printf '%i %s %T@ %C@ %m %u %g %p\n' > /dev/null"
    if [[ $REMOTE == 1 ]]; then
        start_tardisd "$T/server" 7499 "$RUN_DIR/logs/tardisd.log"
        measure f_remote_v1 "$T/server/db" "" "$BIN/tardis" --server 127.0.0.1 --port 7499 \
            --known-hosts "$T/known_hosts" --host bench --password-file "$T/password" --create --name s1 -q "$SRC"
        stop_tardisd; DAEMON_RSS=
        rm -rf "$T/server"
    fi
    rsync -a --delete "$V2/" "$SRC/"
    measure c_incr_v2 "$T/db" "" "$BIN/tardis" --local "${common[@]}" --name s3 -q "$SRC"
    manifest "$V2" "$RUN_DIR/tardis-v2"
    local dest=$T/restore
    rm -rf "$dest"; mkdir -p "$dest"
    measure d_restore "$T/db" "manifest $dest/tree $RUN_DIR/tardis-restored && cmp $RUN_DIR/tardis-v2.tree $RUN_DIR/tardis-restored.tree && cmp $RUN_DIR/tardis-v2.sum $RUN_DIR/tardis-restored.sum" \
        "$BIN/regenerate" "${common[@]}" --set s3 -o "$dest/tree" "$SRC"
    rm -rf "$dest"; mkdir -p "$dest"
    measure e_restore1 "$T/db" "cmp $V2/$SINGLE_FILE $dest/file" \
        "$BIN/regenerate" "${common[@]}" --set s3 -o "$dest/file" "$SRC/$SINGLE_FILE"
    rm -rf "$dest"
}

log "peers: $PEERS; $RUNS runs"
for ((run = 1; run <= RUNS; run++)); do
    RUN_DIR=$RESULTS_ROOT/run$run
    mkdir -p "$RUN_DIR/logs"
    log "run $run of $RUNS"
    RESULTS_DIR=$RUN_DIR bash "$SHARED_BENCH/run-peers.sh"
    tardis_run
done

python3 - "$RESULTS_ROOT" "$RUNS" > "$RESULTS_ROOT/compare.md" <<'PY'
import csv, os, statistics, sys
root, runs = sys.argv[1], int(sys.argv[2])
rows = {}  # (tool, step) -> [row per run]
names = []
for n in range(1, runs + 1):
    d = os.path.join(root, f"run{n}")
    for r in csv.DictReader(open(os.path.join(d, "results.csv"))):
        rows.setdefault((r["peer"], r["step"]), []).append(r)
        if r["peer"] not in names:
            names.append(r["peer"])
    for r in csv.DictReader(open(os.path.join(d, "tardis.csv"))):
        rows.setdefault(("tardis", r["step"]), []).append(r)
ok = lambda r: r["rc"] == "0" and r["verify"] in ("", "ok")
def wall(tool, step):
    rs = rows.get((tool, step))
    return statistics.median(float(r["wall_s"]) + float(r["sync_s"]) for r in rs) if rs else None
def med(tool, step, col):
    rs = [r for r in rows.get((tool, step), []) if r.get(col) not in (None, "", "NA")]
    return statistics.median(int(r[col]) for r in rs) if rs else None
failed = lambda tool, step: any(not ok(r) for r in rows.get((tool, step), []))
fmt = lambda x: "-" if x is None else f"{x:.2f}"
ratio = lambda a, b: "-" if a is None or not b else f"{a / b:.2f}"

print(f"Medians of {runs} runs; wall seconds including the `sync` after the step.\n")
steps = ["a_full_v1", "b_noop_v1", "c_incr_v2", "d_restore", "e_restore1"]
print("| step | tardis s | " + " | ".join(f"{n} s | tardis/{n}" for n in names) + " |")
print("|---|---:|" + "---:|---:|" * len(names))
for s in steps:
    tw = wall("tardis", s)
    cells = [fmt(tw) + (" (failed)" if failed("tardis", s) else "")]
    for n in names:
        pw = wall(n, s)
        cells += [fmt(pw) + (" (failed)" if failed(n, s) else ""), ratio(tw, pw)]
    print(f"| {s} | " + " | ".join(cells) + " |")
print()
print("| repository after | tardis MiB | " + " | ".join(f"{n} MiB" for n in names) + " |")
print("|---|---:|" + "---:|" * len(names))
for s, label in (("a_full_v1", "v1"), ("c_incr_v2", "v1 + v2")):
    cells = [med(t, s, "repo_bytes") for t in ["tardis"] + names]
    print(f"| {label} | " + " | ".join("-" if c is None else f"{c / 2**20:,.0f}" for c in cells) + " |")
print()
print("| peak RSS MiB, first backup | tardis | " + " | ".join(names) + " | tardisd (loopback) |")
print("|---|---:|" + "---:|" * len(names) + "---:|")
cells = [med(t, "a_full_v1", "max_rss_kb") for t in ["tardis"] + names] + [med("tardis", "f_remote_v1", "daemon_rss_kb")]
print("| | " + " | ".join("-" if c is None else f"{c / 1024:,.0f}" for c in cells) + " |")
print()

# Issue #8's targets, from the medians above.
def growth(tool):
    a, c = med(tool, "b_noop_v1", "repo_bytes"), med(tool, "c_incr_v2", "repo_bytes")
    return None if a is None or c is None else c - a
targets = []
def target(what, value, limit, unit="×"):
    met = value is not None and value <= limit
    shown = "-" if value is None else (f"{value:.2f}" if unit == "×" else f"{value:.2f} {unit}")
    targets.append((what, shown, f"≤ {limit}" + ("" if unit == "×" else f" {unit}"), "met" if met else "not met"))
tw = {s: wall("tardis", s) for s in steps + ["w_walk", "f_remote_v1"]}
r = lambda s, p: None if tw[s] is None or wall(p, s) is None else tw[s] / wall(p, s)
if "restic" in names:
    target("initial backup ÷ restic", r("a_full_v1", "restic"), 0.5)
if "borg" in names:
    target("initial backup ÷ Borg", r("a_full_v1", "borg"), 0.33)
if "restic" in names:
    target("no-change backup ÷ restic", r("b_noop_v1", "restic"), 0.5)
target("no-change backup ÷ `find -printf` walk", None if tw["w_walk"] is None else tw["b_noop_v1"] / tw["w_walk"], 2)
if "restic" in names:
    target("v1 → v2 backup ÷ restic", r("c_incr_v2", "restic"), 0.5)
    g, gr = growth("tardis"), growth("restic")
    target("v1 → v2 repository growth ÷ restic", None if g is None or not gr else g / gr, 0.5)
    target("full restore ÷ restic", r("d_restore", "restic"), 0.5)
target("one-file restore", tw["e_restore1"], 0.2, "s")
if "borg" in names:
    tb, bb = med("tardis", "c_incr_v2", "repo_bytes"), med("borg", "c_incr_v2", "repo_bytes")
    target("repository after v1 + v2 ÷ Borg", None if tb is None or not bb else tb / bb, 1)
if "restic" in names:
    tr, rr = med("tardis", "a_full_v1", "max_rss_kb"), med("restic", "a_full_v1", "max_rss_kb")
    target("client peak RSS ÷ restic", None if tr is None or not rr else tr / rr, 0.5)
d = med("tardis", "f_remote_v1", "daemon_rss_kb")
target("tardisd peak RSS", None if d is None else d / 1024, 100, "MiB")
if tw["f_remote_v1"] is not None:
    target("loopback QUIC time ÷ `--local` (throughput ≥ 0.8 ⇔ time ≤ 1.25)", tw["f_remote_v1"] / tw["a_full_v1"], 1.25)
print("| target (issue #8) | measured | target | |")
print("|---|---:|---:|---|")
for t in targets:
    print("| " + " | ".join(t) + " |")
print()
print("Stat walk (`find -printf`, cold cache): " + fmt(tw["w_walk"]) + " s. Per-run Tardis walls:")
for s in steps + ["w_walk", "f_remote_v1"]:
    rs = rows.get(("tardis", s), [])
    if rs:
        print(f"- {s}: " + ", ".join(f"{float(x['wall_s']) + float(x['sync_s']):.2f}" for x in rs))
PY
cat "$RESULTS_ROOT/run1/env.txt" > "$RESULTS_ROOT/compare-env.txt" 2>/dev/null || true
cat "$RESULTS_ROOT/compare.md"
log "results in $RESULTS_ROOT (compare.md; per run: tardis.csv, results.csv, logs/)"
