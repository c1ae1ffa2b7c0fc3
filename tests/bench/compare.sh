#!/usr/bin/env bash
# compare.sh - Tardis against restic and Borg (and rsync) on the same data, in one run.
#
# Builds the release binaries, installs the peers from Debian, builds the benchmark corpus if it
# is missing (../shared/bench/make-corpus.sh: two versions of Debian's Linux source tree plus a
# database and a disk image), runs the shared peer script (run-peers.sh) and then the same steps
# for Tardis on the same live path, and writes a table of wall times, ratios and repository sizes:
#   a_full_v1   first backup of v1          b_noop_v1   second backup, nothing changed
#   c_incr_v2   backup after v1 -> v2       d_restore   full restore of the v2 set (verified)
#   e_restore1  restore of one file (verified)
# Page caches are dropped before every step; each step waits for a quiet CPU first.
#
# Environment: BENCH_DIR (/var/tmp/bench), CORPUS_DIR, SHARED_BENCH (../shared/bench next to the
# repository), PEERS ("restic borg rsync"), RESULTS_DIR, DROP_CACHES (1), and make-corpus.sh's
# KERNEL_ONLY / SQLITE_MB / IMG_MB to shrink the corpus.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$(cd "$TOP/.." && pwd)/shared/bench}
export BENCH_DIR=${BENCH_DIR:-/var/tmp/bench}
export CORPUS_DIR=${CORPUS_DIR:-$BENCH_DIR/corpus}
export RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results/compare-$(date +%Y%m%d-%H%M%S)}
export PEERS=${PEERS:-restic borg rsync}
export DROP_CACHES=${DROP_CACHES:-1}
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
build_release tardis-client tardis-tools
BIN=$TOP/target/release
[[ -f $CORPUS_DIR/MANIFEST.txt ]] || bash "$SHARED_BENCH/make-corpus.sh"

mkdir -p "$RESULTS_DIR/logs"
log "peers: $PEERS"
bash "$SHARED_BENCH/run-peers.sh"

# Tardis, same steps, same live path.
T=$WORK/tardis
rm -rf "$T"; mkdir -p "$T"
printf '%s\n' "${BENCH_PASSWORD:-bench-password-not-a-secret}" > "$T/password"
COMMON=(--db "$T/db" --host bench --password-file "$T/password")
CSV=$RESULTS_DIR/tardis.csv
echo "step,wall_s,sync_s,user_s,sys_s,max_rss_kb,repo_bytes,rc,verify" > "$CSV"
tv() { grep -F "$1" "$2" | head -n1 | awk -F': ' '{print $2}'; }
measure() { # STEP VERIFY_CMD CMD...
    local step=$1 verify=$2; shift 2
    local tf=$RESULTS_DIR/logs/tardis-$step.time lf=$RESULTS_DIR/logs/tardis-$step.log t0 t1 t2 rc v=''
    drop_caches; quiet_gate
    log "tardis $step: $*"
    t0=$(date +%s.%N)
    /usr/bin/time -v -o "$tf" "$@" > "$lf" 2>&1 && rc=0 || rc=$?
    t1=$(date +%s.%N); sync; t2=$(date +%s.%N)
    if [[ -n $verify ]]; then if bash -c "$verify" >> "$lf" 2>&1; then v=ok; else v=FAIL; fi; fi
    echo "$step,$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}'),$(awk -v a="$t1" -v b="$t2" 'BEGIN{printf "%.2f", b-a}'),$(tv 'User time' "$tf"),$(tv 'System time' "$tf"),$(tv 'Maximum resident' "$tf"),$(du -sb "$T/db" | cut -f1),$rc,$v" >> "$CSV"
    log "tardis $step: rc=$rc $(tail -n1 "$CSV")"
}
manifest() { # DIR OUT
    (cd "$1" && find . -mindepth 1 -printf '%y %m %p %l\n' | LC_ALL=C sort > "$2.tree" \
        && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum > "$2.sum")
}
export -f manifest
rm -rf "$SRC"; cp -a "$V1" "$SRC"
measure a_full_v1 "" "$BIN/tardis" --local "${COMMON[@]}" --name s1 -q "$SRC"
measure b_noop_v1 "" "$BIN/tardis" --local "${COMMON[@]}" --name s2 -q "$SRC"
rsync -a --delete "$V2/" "$SRC/"
measure c_incr_v2 "" "$BIN/tardis" --local "${COMMON[@]}" --name s3 -q "$SRC"
manifest "$V2" "$RESULTS_DIR/tardis-v2"
dest=$T/restore; rm -rf "$dest"; mkdir -p "$dest"
measure d_restore "manifest $dest/tree $RESULTS_DIR/tardis-restored && cmp $RESULTS_DIR/tardis-v2.tree $RESULTS_DIR/tardis-restored.tree && cmp $RESULTS_DIR/tardis-v2.sum $RESULTS_DIR/tardis-restored.sum" \
    "$BIN/regenerate" "${COMMON[@]}" --set s3 -o "$dest/tree" "$SRC"
rm -rf "$dest"; mkdir -p "$dest"
measure e_restore1 "cmp $V2/$SINGLE_FILE $dest/file" "$BIN/regenerate" "${COMMON[@]}" --set s3 -o "$dest/file" "$SRC/$SINGLE_FILE"
rm -rf "$dest"

python3 - "$RESULTS_DIR/results.csv" "$CSV" > "$RESULTS_DIR/compare.md" <<'PY'
import csv, sys
peers = list(csv.DictReader(open(sys.argv[1])))
tardis = {r["step"]: r for r in csv.DictReader(open(sys.argv[2]))}
names = []
for r in peers:
    if r["peer"] not in names:
        names.append(r["peer"])
by = {(r["peer"], r["step"]): r for r in peers}
steps = ["a_full_v1", "b_noop_v1", "c_incr_v2", "d_restore", "e_restore1"]
ok = lambda r: r["rc"] in ("0",) and r["verify"] in ("", "ok")
print("| step | tardis s | " + " | ".join(f"{n} s | tardis/{n}" for n in names) + " |")
print("|---|---:|" + "---:|---:|" * len(names))
for s in steps:
    t = tardis.get(s)
    tw = float(t["wall_s"]) + float(t["sync_s"]) if t else None
    cells = [f"{tw:.2f}" + ("" if t and ok(t) else " (failed)") if t else "-"]
    for n in names:
        r = by.get((n, s))
        if not r:
            cells += ["-", "-"]
            continue
        pw = float(r["wall_s"]) + float(r["sync_s"])
        cells += [f"{pw:.2f}" + ("" if ok(r) else " (failed)"), f"{tw / pw:.2f}" if tw and pw else "-"]
    print(f"| {s} | " + " | ".join(cells) + " |")
print()
print("| repository after | tardis MiB | " + " | ".join(f"{n} MiB" for n in names) + " |")
print("|---|---:|" + "---:|" * len(names))
for s, label in (("a_full_v1", "v1"), ("c_incr_v2", "v1 + v2")):
    cells = [f"{int(tardis[s]['repo_bytes']) / 2**20:,.0f}"]
    for n in names:
        r = by.get((n, s))
        cells.append(f"{int(r['repo_bytes']) / 2**20:,.0f}" if r and r["repo_bytes"] not in ("", "NA") else "-")
    print(f"| {label} | " + " | ".join(cells) + " |")
print()
print("| peak RSS MiB, first backup | tardis | " + " | ".join(names) + " |")
print("|---|---:|" + "---:|" * len(names))
cells = [f"{int(tardis['a_full_v1']['max_rss_kb']) / 1024:,.0f}"]
for n in names:
    r = by.get((n, "a_full_v1"))
    cells.append(f"{int(r['max_rss_kb'] or 0) / 1024:,.0f}" if r else "-")
print("| | " + " | ".join(cells) + " |")
PY
cat "$RESULTS_DIR/env.txt" > "$RESULTS_DIR/compare-env.txt" 2>/dev/null || true
cat "$RESULTS_DIR/compare.md"
log "results in $RESULTS_DIR (compare.md, tardis.csv, results.csv)"
