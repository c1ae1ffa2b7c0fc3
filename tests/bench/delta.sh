#!/usr/bin/env bash
# delta.sh - repository growth and backup time when big files change a little, Tardis against
# restic, Borg and rsync (--link-dest) in one run.
#
# Workloads, each a v1 -> v2 pair from the benchmark corpus (../shared/bench/make-corpus.sh):
#   img     the 512 MiB ext4 image, 1% of its 4 KiB blocks rewritten
#   sqlite  the 200 MiB SQLite database after 1,000 updates, 2,000 inserts and 500 deletes
#   corpus  the whole corpus (kernel tree 6.12.113 -> 6.12.117 plus both blobs)
# For each, compare.sh runs every tool through the same steps (first backup, no-change backup,
# backup of v2, full restore verified against v2, one-file restore); this script then tabulates
# the v2 backup's time and the repository's growth from it.
#
# Environment: WORKLOADS ("img sqlite corpus"), PEERS ("restic borg rsync"), BENCH_DIR
# (/var/tmp/bench), OUT (results directory); everything compare.sh reads.
set -euo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
export BENCH_DIR=${BENCH_DIR:-/var/tmp/bench}
CORPUS=${CORPUS_DIR:-$BENCH_DIR/corpus}
OUT=${OUT:-$BENCH_DIR/results/delta-$(date +%Y%m%d-%H%M%S)}
WORKLOADS=${WORKLOADS:-img sqlite corpus}
export PEERS=${PEERS:-restic borg rsync}
mkdir -p "$OUT"
[[ -f $CORPUS/MANIFEST.txt ]] || CORPUS_DIR=$CORPUS bash "$(cd "$TOP/.." && pwd)/shared/bench/make-corpus.sh"

# A corpus of one blob: hard links into the real corpus, so nothing is copied.
blob_corpus() { # NAME FILE
    local dir=$BENCH_DIR/delta-corpus/$1
    rm -rf "$dir"
    for v in v1 v2; do
        mkdir -p "$dir/$v/blobs"
        ln "$CORPUS/$v/blobs/$2" "$dir/$v/blobs/$2"
    done
    echo "# one blob of $CORPUS: $2" > "$dir/MANIFEST.txt"
    echo "$dir"
}

for w in $WORKLOADS; do
    case $w in
        img) dir=$(blob_corpus img vm.img) single=blobs/vm.img ;;
        sqlite) dir=$(blob_corpus sqlite app.sqlite) single=blobs/app.sqlite ;;
        corpus) dir=$CORPUS single=linux-source-6.12/MAINTAINERS ;;
        *) echo "unknown workload $w (img, sqlite, corpus)" >&2; exit 2 ;;
    esac
    CORPUS_DIR=$dir SINGLE_FILE=$single RESULTS_DIR=$OUT/$w RUNS=${RUNS:-1} REMOTE=0 \
        bash "$TOP/tests/bench/compare.sh"
done

python3 - "$OUT" $WORKLOADS > "$OUT/delta.md" <<'PY'
import csv, os, sys
out, workloads = sys.argv[1], sys.argv[2:]
label = {"img": "512 MiB disk image, 1% of blocks", "sqlite": "200 MiB SQLite, 3,500 row changes",
         "corpus": "whole corpus v1 → v2"}
rows = []
for w in workloads:
    d = os.path.join(out, w, "run1")
    runs = {("tardis", r["step"]): r for r in csv.DictReader(open(os.path.join(d, "tardis.csv")))}
    for r in csv.DictReader(open(os.path.join(d, "results.csv"))):
        runs[(r["peer"], r["step"])] = r
    peers = ["tardis"] + [p for p in os.environ.get("PEERS", "").split() if (p, "c_incr_v2") in runs]
    for p in peers:
        v2, before = runs[(p, "c_incr_v2")], runs[(p, "b_noop_v1")]
        wall = float(v2["wall_s"]) + float(v2["sync_s"])
        growth = (int(v2["repo_bytes"]) - int(before["repo_bytes"])) / 2**20
        restore = runs.get((p, "d_restore"))
        rwall = float(restore["wall_s"]) + float(restore["sync_s"]) if restore else None
        ok = v2["rc"] == "0" and (restore is None or (restore["rc"] == "0" and restore["verify"] in ("", "ok")))
        rows.append((w, p, wall, growth, rwall, ok))
print("| workload | tool | backup of v2 s | growth MiB | full restore of v2 s | tardis growth ÷ tool |")
print("|---|---|---:|---:|---:|---:|")
for w, p, wall, growth, rwall, ok in rows:
    t = next(r for r in rows if r[0] == w and r[1] == "tardis")
    ratio = "" if p == "tardis" else (f"{t[3] / growth:.2f}" if growth > 0 else "-")
    rs = f"{rwall:.2f}" if rwall is not None else "-"
    print(f"| {label[w]} | {p}{'' if ok else ' (failed)'} | {wall:.2f} | {growth:,.1f} | {rs} | {ratio} |")
PY
cat "$OUT/delta.md"
echo "results in $OUT (delta.md; per workload: compare.md, run1/tardis.csv, run1/results.csv)" >&2
