#!/usr/bin/env bash
# scale.sh - how Tardis's memory grows with the number of files and with the repository's size.
#
# For each size N in SIZES it makes a tree of N small files (distinct contents, 1,000 files per
# directory, 100-300 bytes each, so every file is a new chunk and the index grows with N), then
# measures peak RSS and wall time of the same binaries a user runs:
#   backup      first backup, --local            noop     second backup, nothing changed
#   remote      first backup to a fresh tardisd on loopback (client and daemon peak RSS)
#   restore     full restore with regenerate     verify   tardis-tools verify (index check)
# and the size of the repository and of its RocksDB index.
#
# Environment: SIZES ("100000 300000 1000000"), BENCH_DIR (/var/tmp/bench), RESULTS_DIR, BUILD (1).
# Output: RESULTS_DIR/scale.csv and scale.md.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/bench}
SIZES=${SIZES:-100000 300000 1000000}
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results/scale-$(date +%Y%m%d-%H%M%S)}
W=$BENCH_DIR/scale
log() { printf '[scale %s] %s\n' "$(date +%T)" "$*" >&2; }
# shellcheck source=tests/bench/common.sh
. "$TOP/tests/bench/common.sh"
install_debs time
[[ ${BUILD:-1} == 1 ]] && build_release tardis-client tardis-tools tardis-server
BIN=$TOP/target/release
mkdir -p "$RESULTS_DIR/logs" "$W"
CSV=$RESULTS_DIR/scale.csv
echo "files,step,wall_s,max_rss_kb,daemon_rss_kb,repo_bytes,index_bytes,rc" > "$CSV"

make_tree() { # N DIR
    [[ -f $2/.complete ]] && return 0
    rm -rf "$2"; mkdir -p "$2"
    log "making $1 files in $2"
    python3 - "$1" "$2" <<'PY'
import os, random, sys
n, root = int(sys.argv[1]), sys.argv[2]
rng = random.Random(n)
words = ["tardis", "segment", "chunk", "index", "restore", "backup", "delta", "event", "set", "host"]
for i in range(n):
    d = os.path.join(root, f"d{i // 1000:05d}")
    if i % 1000 == 0:
        os.mkdir(d)
    body = f"file {i}\n" + " ".join(rng.choice(words) for _ in range(rng.randint(15, 45))) + "\n"
    with open(os.path.join(d, f"f{i % 1000:03d}.txt"), "w") as f:
        f.write(body)
PY
    touch "$2/.complete"
}

DAEMON_PID=
trap '[[ -n $DAEMON_PID ]] && kill "$DAEMON_PID" 2>/dev/null; true' EXIT
measure() { # N STEP REPO CMD...
    local n=$1 step=$2 repo=$3 tf rc t0 t1 drss=''; shift 3
    tf=$RESULTS_DIR/logs/$n-$step.time
    sync; echo 3 > /proc/sys/vm/drop_caches
    log "$n $step: $*"
    t0=$(date +%s.%N)
    /usr/bin/time -v -o "$tf" "$@" > "$RESULTS_DIR/logs/$n-$step.log" 2>&1 && rc=0 || rc=$?
    t1=$(date +%s.%N)
    [[ -n $DAEMON_PID ]] && drss=$(awk '/^VmHWM/{print $2}' "/proc/$DAEMON_PID/status")
    local index; index=$(du -sb "$repo"/*/index 2>/dev/null | awk '{s+=$1} END {print s+0}')
    echo "$n,$step,$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}'),$(grep -F 'Maximum resident' "$tf" | awk -F': ' '{print $2}'),$drss,$(du -sb "$repo" | cut -f1),$index,$rc" >> "$CSV"
    log "$(tail -n1 "$CSV")"
    [[ $rc == 0 ]] || { tail -n 5 "$RESULTS_DIR/logs/$n-$step.log" >&2; exit 1; }
}

for n in $SIZES; do
    tree=$W/tree-$n
    make_tree "$n" "$tree"
    d=$W/run; rm -rf "$d"; mkdir -p "$d"
    echo "scale-bench-password" > "$d/password"
    common=(--db "$d/db" --host scale --password-file "$d/password")
    measure "$n" backup "$d/db" "$BIN/tardis" --local "${common[@]}" --create --name s1 -q "$tree"
    measure "$n" noop "$d/db" "$BIN/tardis" --local "${common[@]}" --name s2 -q "$tree"
    measure "$n" restore "$d/db" "$BIN/regenerate" "${common[@]}" --set s2 -o "$d/restored" "$tree"
    rm -rf "$d/restored"
    measure "$n" verify "$d/db" "$BIN/tardis-tools" "${common[@]}" verify
    start_tardisd "$d/server" 7498 "$RESULTS_DIR/logs/$n-tardisd.log"
    measure "$n" remote "$d/server/db" "$BIN/tardis" --server 127.0.0.1 --port 7498 --known-hosts "$d/known_hosts" \
        --host scale --password-file "$d/password" --create --name s1 -q "$tree"
    stop_tardisd
    rm -rf "$d"
done

python3 - "$CSV" > "$RESULTS_DIR/scale.md" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
sizes = sorted({int(r["files"]) for r in rows})
by = {(int(r["files"]), r["step"]): r for r in rows}
mib = lambda kb: f"{int(kb) / 1024:,.0f}" if kb else "-"
print("| files | repository MiB | index MiB | " + " | ".join(
    ["backup RSS MiB", "no-change RSS MiB", "restore RSS MiB", "verify RSS MiB", "remote client RSS MiB",
     "tardisd RSS MiB", "backup s", "no-change s"]) + " |")
print("|---:|" + "---:|" * 10)
for n in sizes:
    b = by[(n, "backup")]
    cells = [f"{n:,}", f"{int(b['repo_bytes']) / 2**20:,.0f}", f"{int(b['index_bytes']) / 2**20:,.1f}"]
    cells += [mib(by[(n, s)]["max_rss_kb"]) for s in ("backup", "noop", "restore", "verify", "remote")]
    cells += [mib(by[(n, "remote")]["daemon_rss_kb"]), by[(n, "backup")]["wall_s"], by[(n, "noop")]["wall_s"]]
    print("| " + " | ".join(cells) + " |")
PY
cat "$RESULTS_DIR/scale.md"
log "results in $RESULTS_DIR"
