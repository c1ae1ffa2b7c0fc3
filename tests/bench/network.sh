#!/usr/bin/env bash
# network.sh - Tardis over QUIC against rsync (TCP, rsync daemon) and restic (SFTP over ssh) on the
# same links, in one run: loopback, and two network namespaces joined by a veth pair with a `tbf`
# rate limit and nftables random loss each way.
#
# Run as root from anywhere:   tests/bench/network.sh
# Needs: the release binaries `tardis` and `tardisd` (built here unless BUILD=0), the benchmark
# corpus (../shared/bench/make-corpus.sh builds it if absent), and iproute2, nftables, ethtool,
# rsync, restic, openssh-server, time (installed with apt-get when missing).
#
# What it measures, for every link and every run:
#   v1  first backup of SUBSET of the corpus's v1 tree into an empty repository
#   v2  backup after the same live path was moved to v2 (rsync: into a new directory with
#       --link-dest=../v1, the usual rsync snapshot scheme; restic and Tardis: the same repository)
# Tools: `tardis` -> `tardisd` (QUIC, default BBR; "tardis-cubic": both ends with
# TARDIS_QUIC_CONGESTION=cubic, on the links in CUBIC_LOSSES), `rsync $RSYNC_OPTS` -> an rsync
# daemon, and `restic` -> an SFTP repository (sshd with key auth, one ssh connection). Servers run
# in the server namespace, clients in the client namespace; on "loopback" both run in the server
# namespace and talk over its own `lo` (no impairment), so nothing on the host's network changes.
# Also on loopback: `tardis --local` into a repository on the same disk, for the remote/local
# throughput ratio (issue 8).
# Recorded per step: wall time (with a `sync` on the server's disk afterwards), exit status,
# client peak RSS (/usr/bin/time -v), bytes through the client's interface both ways (`ip -s
# link`; on loopback, bytes through `lo`, both directions counted once), packets the loss rules
# dropped, UDP datagrams dropped at a full socket receive buffer (RcvbufErrors in /proc/net/snmp
# of both namespaces: a loss that the link did not cause), and for Tardis the
# daemon's peak RSS (VmHWM of a daemon started fresh for each link and tool; read after v1 and
# after v2). The page cache is warm (the live tree is read once before each phase): this measures
# the network path, not the disk. This kernel has no netem, so no delay can be added for the TCP
# tools; the veth round trip is well under a millisecond.
#
# Environment (defaults in brackets):
#   CORPUS_DIR [/var/tmp/bench/corpus]   SUBSET [linux-source-6.12/fs] (a path inside
#     v1/ and v2/; "." for the whole corpus)     LOSSES ["0 5 15"] (% dropped each way on the veth)
#   RATE [100mbit] (tbf, each way; "" for none)  TBF_BURST [64kb]  TBF_LATENCY [20ms]
#   RUNS [3] (medians over runs)   TOOLS ["tardis rsync restic"]   CUBIC_LOSSES ["5 15"]
#   LOOPBACK [1] (measure the loopback link)    LOCAL_RATIO [1] (tardis --local on loopback)
#   RSYNC_OPTS [-az]   STEP_TIMEOUT [300] (s; a step that takes longer is killed and reported)
#   WORK [/var/tmp/bench/netbench] (scratch; emptied first)   RESULTS_DIR [results/network-DATE]
#   BIN_DIR [$CARGO_TARGET_DIR/release or target/release]   BUILD [1]   KEEP [0] (keep repositories)
#   REPORT_ONLY=DIR: only rewrite DIR/network.md from DIR/steps.csv (e.g. after an interrupted run)
# Output: RESULTS_DIR/network.md (tables), steps.csv (every step), logs/ (client and server logs).
set -euo pipefail
TOP=$(cd "$(dirname "$0")/../.." && pwd)
SHARED_BENCH=${SHARED_BENCH:-$(cd "$TOP/.." && pwd)/shared/bench}
BENCH_DIR=${BENCH_DIR:-/var/tmp/bench}
export CORPUS_DIR=${CORPUS_DIR:-$BENCH_DIR/corpus}
SUBSET=${SUBSET:-linux-source-6.12/fs}
LOSSES=${LOSSES:-0 5 15}
RATE=${RATE-100mbit}
TBF_BURST=${TBF_BURST:-64kb}
TBF_LATENCY=${TBF_LATENCY:-20ms}
RUNS=${RUNS:-3}
TOOLS=${TOOLS:-tardis rsync restic}
CUBIC_LOSSES=${CUBIC_LOSSES-5 15}
LOOPBACK=${LOOPBACK:-1}
LOCAL_RATIO=${LOCAL_RATIO:-1}
RSYNC_OPTS=${RSYNC_OPTS:--az}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
WORK=${WORK:-$BENCH_DIR/netbench}
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results/network-$(date +%Y%m%d-%H%M%S)}
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-$TOP/target}/release}
BUILD=${BUILD:-1}
KEEP=${KEEP:-0}
PASSWORD=${BENCH_PASSWORD:-bench-password-not-a-secret}
export RESTIC_PASSWORD=$PASSWORD

log() { printf '[network %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=tests/bench/common.sh
. "$TOP/tests/bench/common.sh"
# report DIR: DIR/network.md from DIR/steps.csv and DIR/env.txt (also alone: REPORT_ONLY=DIR).
report() {
python3 - "$1/steps.csv" "$1/env.txt" > "$1/network.md" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
cells = {}
for r in rows:
    cells.setdefault((r["link"], r["tool"], r["phase"]), []).append(r)
links = []
for r in rows:
    if r["link"] not in links:
        links.append(r["link"])
def med(link, tool, phase, field="wall_s"):
    rs = cells.get((link, tool, phase), [])
    ok = [float(r[field]) for r in rs if r["rc"] == "0" and r[field] != ""]
    failed = [r for r in rs if r["rc"] != "0"]
    return (statistics.median(ok) if ok else None), failed, len(rs)
def fmt(link, tool, phase):
    m, failed, n = med(link, tool, phase)
    if n == 0:
        return "-"
    if m is None:
        return "FAILED (" + ", ".join("timeout" if r["rc"] == "124" else "rc " + r["rc"] for r in failed) + ")"
    return f"{m:.1f}" + (f" ({len(failed)} of {n} failed)" if failed else "")
def ratio(link, a, b, phase):
    x, _, _ = med(link, a, phase)
    y, _, _ = med(link, b, phase)
    return f"{x / y:.2f}" if x and y else "-"
name = {"loopback": "loopback (lo, no limit)"}
def label(link):
    return name.get(link, f"veth, {link[4:]}% loss each way")
env = dict(l.rstrip("\n").split(": ", 1) for l in open(sys.argv[2]) if ": " in l)
runs = env.get("runs", "?")
print(f"Wall seconds, median of {runs} run(s) per cell; ratios are Tardis time / peer time (below 1: Tardis faster).")
print()
for phase, what in (("v1", "first backup of v1"), ("v2", "backup after v1 -> v2")):
    print(f"**{what}**")
    print()
    print("| link | tardis | rsync | restic | tardis/rsync | tardis/restic | tardis CUBIC | CUBIC/BBR |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for link in links:
        if not any((link, t, phase) in cells for t in ("tardis", "rsync", "restic")):
            continue
        print(f"| {label(link)} | {fmt(link, 'tardis', phase)} | {fmt(link, 'rsync', phase)} | {fmt(link, 'restic', phase)} | "
              f"{ratio(link, 'tardis', 'rsync', phase)} | {ratio(link, 'tardis', 'restic', phase)} | "
              f"{fmt(link, 'tardis-cubic', phase)} | {ratio(link, 'tardis-cubic', 'tardis', phase)} |")
    print()
print("**Bytes through the client's interface, MB (10^6), sent / received, median** (loopback: all bytes through `lo`)")
print()
tools = ["tardis", "tardis-cubic", "rsync", "restic"]
print("| link | phase | " + " | ".join(tools) + " |")
print("|---|---|" + "---:|" * len(tools))
for link in links:
    for phase in ("v1", "v2"):
        out = []
        for t in tools:
            tx, _, n = med(link, t, phase, "tx_bytes")
            rx, _, _ = med(link, t, phase, "rx_bytes")
            if n == 0 or tx is None:
                out.append("-")
            elif link == "loopback":
                out.append(f"{tx / 1e6:.1f}")
            else:
                out.append(f"{tx / 1e6:.1f} / {rx / 1e6:.1f}")
        print(f"| {label(link)} | {phase} | " + " | ".join(out) + " |")
print()
if any(r.get("udp_rcvbuf_errors") for r in rows):
    print("**UDP datagrams dropped at a full socket receive buffer** (`UdpRcvbufErrors` of both namespaces, median; a loss the link did not cause)")
    print()
    print("| link | phase | tardis | tardis-cubic |")
    print("|---|---|---:|---:|")
    for link in links:
        for phase in ("v1", "v2"):
            out = []
            for t in ("tardis", "tardis-cubic"):
                m, _, n = med(link, t, phase, "udp_rcvbuf_errors")
                out.append("-" if m is None else f"{m:.0f}")
            if out != ["-", "-"]:
                print(f"| {label(link)} | {phase} | " + " | ".join(out) + " |")
    print()
print("**Peak RSS, MiB, median**: `tardisd` (VmHWM after v1 = during the initial backup) and the clients (v1)")
print()
print("| link | tardisd (BBR) | tardisd (CUBIC) | tardis client | rsync client | restic client |")
print("|---|---:|---:|---:|---:|---:|")
for link in links:
    out = []
    for t, f in (("tardis", "server_hwm_kb"), ("tardis-cubic", "server_hwm_kb"), ("tardis", "client_rss_kb"),
                 ("rsync", "client_rss_kb"), ("restic", "client_rss_kb")):
        m, _, n = med(link, t, "v1", f)
        out.append("-" if m is None else f"{m / 1024:.0f}")
    print(f"| {label(link)} | " + " | ".join(out) + " |")
if ("loopback", "tardis-local", "v1") in cells:
    l, _, _ = med("loopback", "tardis-local", "v1")
    q, _, _ = med("loopback", "tardis", "v1")
    print()
    print("**Issue 8: remote over loopback QUIC vs `--local`, first backup of v1**")
    print()
    # Per run: the two backups ran back to back, so their ratio is steadier than a ratio of medians.
    local = {r["run"]: float(r["wall_s"]) for r in cells[("loopback", "tardis-local", "v1")] if r["rc"] == "0"}
    remote = {r["run"]: float(r["wall_s"]) for r in cells.get(("loopback", "tardis", "v1"), []) if r["rc"] == "0"}
    per_run = [local[k] / remote[k] for k in sorted(local) if k in remote]
    print("| tardis --local s | tardis --server 127.0.0.1 s | remote/local throughput, per run | median |")
    print("|---:|---:|---|---:|")
    print(f"| {fmt('loopback', 'tardis-local', 'v1')} | {fmt('loopback', 'tardis', 'v1')} | "
          + ", ".join(f"{x:.2f}" for x in per_run) + " | "
          + (f"{statistics.median(per_run):.2f}" if per_run else "-") + " |")
PY
}
if [[ -n ${REPORT_ONLY:-} ]]; then report "$REPORT_ONLY"; cat "$REPORT_ONLY/network.md"; exit 0; fi
[[ $(id -u) == 0 ]] || die "needs root (network namespaces, nftables, tc)"

install_debs iproute2 nftables ethtool rsync restic openssh-server openssh-client time
if [[ $BUILD == 1 ]]; then
    build_release tardis-client tardis-server
fi
for b in tardis tardisd; do [[ -x $BIN_DIR/$b ]] || die "$BIN_DIR/$b missing (BUILD=1 or BIN_DIR)"; done
[[ -f $CORPUS_DIR/MANIFEST.txt ]] || bash "$SHARED_BENCH/make-corpus.sh"
V1=$CORPUS_DIR/v1/$SUBSET
V2=$CORPUS_DIR/v2/$SUBSET
[[ -d $V1 && -d $V2 ]] || die "$V1 or $V2 is not a directory (SUBSET)"

# Namespaces: client C (10.202.0.1) and server S (10.202.0.2), a veth pair between them.
NS_C=tnetbench-$$-c
NS_S=tnetbench-$$-s
ADDR_C=10.202.0.1
ADDR_S=10.202.0.2
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    ip netns del "$NS_C" 2>/dev/null || true
    ip netns del "$NS_S" 2>/dev/null || true
    [[ $KEEP == 1 ]] || rm -rf "$WORK/srv" "$WORK/local"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Daemons start with `ip netns exec` directly (it execs the program), never through a shell
# function, so that $! is the daemon's own pid (for SIGTERM and /proc/PID/status).
ip netns add "$NS_C"
ip netns add "$NS_S"
ip link add veth0 netns "$NS_C" type veth peer name veth0 netns "$NS_S"
for ns in "$NS_C" "$NS_S"; do
    a=$ADDR_C; [[ $ns == "$NS_S" ]] && a=$ADDR_S
    ip -n "$ns" addr add "$a/30" dev veth0
    ip -n "$ns" link set veth0 up
    ip -n "$ns" link set lo up
    # One packet on the wire is one packet to the loss rule and to tbf: no TSO/GSO super-packets
    # (which a drop would lose whole) and no GRO.
    ip netns exec "$ns" ethtool -K veth0 tso off gso off gro off tx-udp-segmentation off >/dev/null 2>&1 ||
        ip netns exec "$ns" ethtool -K veth0 tso off gso off gro off >/dev/null
    if [[ -n $RATE ]]; then
        tc -n "$ns" qdisc replace dev veth0 root tbf rate "$RATE" burst "$TBF_BURST" latency "$TBF_LATENCY"
    fi
done
set_loss() { # PERCENT: drop that share of the packets arriving at each end (so, each way)
    local ns
    for ns in "$NS_C" "$NS_S"; do
        ip netns exec "$ns" nft -f - <<EOF
table ip netbench {}
delete table ip netbench
table ip netbench {
  chain ingress {
    type filter hook prerouting priority raw; policy accept;
    iifname "veth0" numgen random mod 100 < $1 counter drop
  }
}
EOF
    done
}
rcvbuf_errors() { # UDP datagrams both namespaces dropped at a full socket receive buffer so far
    local ns n=0 c
    for ns in "$NS_C" "$NS_S"; do
        c=$(ip netns exec "$ns" awk '/^Udp:/ {if (h) {print $f; exit} for (i = 1; i <= NF; i++) if ($i == "RcvbufErrors") f = i; h = 1}' /proc/net/snmp)
        n=$((n + ${c:-0}))
    done
    echo "$n"
}
dropped() { # packets dropped by both loss rules so far
    local ns n=0 c
    for ns in "$NS_C" "$NS_S"; do
        c=$(ip netns exec "$ns" nft list chain ip netbench ingress 2>/dev/null | grep -o 'packets [0-9]*' | awk '{print $2}')
        n=$((n + ${c:-0}))
    done
    echo "$n"
}

rm -rf "$WORK"
mkdir -p "$WORK/srv" "$RESULTS_DIR/logs"
LIVE=$WORK/live/$(basename "$SUBSET")
[[ $SUBSET == . ]] && LIVE=$WORK/live/corpus
mkdir -p "$LIVE"

# Servers in S: an rsync daemon and sshd (key auth, SFTP), both for the whole run.
D=$WORK/daemons
mkdir -p "$D" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$D/hostkey"
ssh-keygen -q -t ed25519 -N '' -f "$D/clientkey"
cp "$D/clientkey.pub" "$D/authorized_keys"
cat > "$D/sshd_config" <<EOF
Port 2222
HostKey $D/hostkey
PidFile $D/sshd.pid
AuthorizedKeysFile $D/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
ip netns exec "$NS_S" /usr/sbin/sshd -D -e -f "$D/sshd_config" 2> "$RESULTS_DIR/logs/sshd.log" &
PIDS+=($!)
mkdir -p "$WORK/srv/rsync"
cat > "$D/rsyncd.conf" <<EOF
pid file = $D/rsyncd.pid
use chroot = no
[bench]
  path = $WORK/srv/rsync
  read only = no
  uid = root
  gid = root
EOF
ip netns exec "$NS_S" rsync --daemon --no-detach --config="$D/rsyncd.conf" --port=8730 2> "$RESULTS_DIR/logs/rsyncd.log" &
PIDS+=($!)
SSH_CMD="ssh -p 2222 -i $D/clientkey -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"

TARDISD_PID=
NEXT_PORT=7431
start_tardisd() { # NAME LISTEN PORT CONGESTION ("" = default)
    local dir=$WORK/srv/$1
    mkdir -p "$dir/db"
    printf '[Tardis]\nBaseDir = %s\nPort = %s\nListen = %s\nAllowNewHosts = yes\n' "$dir/db" "$3" "$2" > "$dir/tardisd.cfg"
    local envs=(RUST_LOG=info,quinn=warn)
    [[ -n $4 ]] && envs+=("TARDIS_QUIC_CONGESTION=$4")
    ip netns exec "$NS_S" env "${envs[@]}" "$BIN_DIR/tardisd" --foreground --config "$dir/tardisd.cfg" \
        > "$RESULTS_DIR/logs/tardisd-$1.log" 2>&1 &
    TARDISD_PID=$!
    PIDS+=("$TARDISD_PID")
    local i
    for i in $(seq 300); do
        grep -q "^tardisd: listening on .* (UDP)" "$RESULTS_DIR/logs/tardisd-$1.log" && return 0
        kill -0 "$TARDISD_PID" 2>/dev/null || break
        sleep 0.1
    done
    die "tardisd $1 did not start: $(tail -n 20 "$RESULTS_DIR/logs/tardisd-$1.log")"
}
stop_tardisd() {
    kill -TERM "$TARDISD_PID" 2>/dev/null || true
    wait "$TARDISD_PID" 2>/dev/null || true
}
hwm_kb() { awk '/^VmHWM/{print $2}' "/proc/$1/status" 2>/dev/null || echo ""; }
wait_for_port() { # NS TCP-PORT
    local i
    for i in $(seq 100); do
        ip netns exec "$1" ss -ltn "sport = :$2" | grep -q LISTEN && return 0
        sleep 0.1
    done
    die "nothing listens on tcp port $2 in $1"
}
wait_for_port "$NS_S" 2222
wait_for_port "$NS_S" 8730

# Bytes through the client's side of the link: "tx rx" (on loopback: lo in S, "tx 0").
counters() {
    if [[ $LINK == loopback ]]; then
        ip -n "$NS_S" -s -j link show lo | python3 -c 'import json,sys; s=json.load(sys.stdin)[0]["stats64"]; print(s["tx"]["bytes"], 0)'
    else
        ip -n "$NS_C" -s -j link show veth0 | python3 -c 'import json,sys; s=json.load(sys.stdin)[0]["stats64"]; print(s["tx"]["bytes"], s["rx"]["bytes"])'
    fi
}
warm() { find "$LIVE" -type f -print0 | xargs -0 -r cat > /dev/null; }

CSV=$RESULTS_DIR/steps.csv
echo "link,tool,phase,run,wall_s,rc,client_rss_kb,tx_bytes,rx_bytes,server_hwm_kb,dropped,udp_rcvbuf_errors" > "$CSV"
# step TOOL PHASE CMD... (runs CMD in the client's namespace; fields come from globals LINK, RUN)
step() {
    local tool=$1 phase=$2; shift 2
    local tag=$LINK-$tool-$phase-r$RUN
    local tf=$RESULTS_DIR/logs/$tag.time lf=$RESULTS_DIR/logs/$tag.log t0 t1 rc c0 c1 d0 d1 u0 u1 hwm=''
    log "$tag: $*"
    c0=$(counters); d0=$(dropped); u0=$(rcvbuf_errors)
    t0=$(date +%s.%N)
    timeout -k 10 "$STEP_TIMEOUT" ip netns exec "$CLIENT_NS" /usr/bin/time -v -o "$tf" "$@" > "$lf" 2>&1 && rc=0 || rc=$?
    sync -f "$WORK/srv"
    t1=$(date +%s.%N)
    c1=$(counters); d1=$(dropped); u1=$(rcvbuf_errors)
    [[ $tool == tardis || $tool == tardis-cubic ]] && hwm=$(hwm_kb "$TARDISD_PID")
    local rss; rss=$(grep -F 'Maximum resident' "$tf" 2>/dev/null | awk -F': ' '{print $2}' || true)
    local line
    line="$LINK,$tool,$phase,$RUN,$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}'),$rc,${rss:-},$(awk -v a="$c0" -v b="$c1" 'BEGIN{split(a,x," "); split(b,y," "); printf "%d,%d", y[1]-x[1], y[2]-x[2]}'),$hwm,$((d1 - d0)),$((u1 - u0))"
    echo "$line" >> "$CSV"
    if [[ $rc != 0 ]]; then
        log "$tag FAILED (rc=$rc; 124 = killed after ${STEP_TIMEOUT}s); last lines of $lf:"
        tail -n 15 "$lf" >&2 || true
    fi
    log "$tag: $line"
    return 0
}

tardis_phase() { # TOOL CONGESTION PHASE
    local tool=$1 cc=$2 phase=$3 envs=()
    [[ -n $cc ]] && envs+=("TARDIS_QUIC_CONGESTION=$cc")
    local extra=(); [[ $phase == v1 ]] && extra+=(--create)
    step "$tool" "$phase" env "${envs[@]}" "$BIN_DIR/tardis" --server "$SERVER" --port "$TPORT" \
        --known-hosts "$WORK/known_hosts-$LINK-$tool-$RUN" --host "bench" --password "$PASSWORD" "${extra[@]}" \
        --name "$phase" --json "$LIVE"
}

run_link() { # LINK (loopback | loss percentage)
    if [[ $1 == loopback ]]; then
        LINK=loopback; CLIENT_NS=$NS_S; SERVER=127.0.0.1
    else
        LINK="loss$1"; CLIENT_NS=$NS_C; SERVER=$ADDR_S
        set_loss "$1"
    fi
    local variants=() t
    for t in $TOOLS; do
        variants+=("$t")
        if [[ $t == tardis && $1 != loopback && " $CUBIC_LOSSES " == *" $1 "* ]]; then variants+=(tardis-cubic); fi
    done
    rsync -a --delete "$V1/" "$LIVE/"
    warm
    local v phase
    declare -A tpid=()
    # Set up: a fresh daemon per Tardis variant, a fresh restic repository (init is not timed).
    for v in "${variants[@]}"; do
        case $v in
            tardis|tardis-cubic)
                local cc=''; [[ $v == tardis-cubic ]] && cc=cubic
                # A new port for every daemon: one that is slow to stop never takes the next one's clients.
                start_tardisd "$LINK-$v-r$RUN" 0.0.0.0 $NEXT_PORT "$cc"
                tpid[$v]=$TARDISD_PID:$NEXT_PORT
                NEXT_PORT=$((NEXT_PORT + 1)) ;;
            restic)
                mkdir -p "$WORK/srv/restic"
                RESTIC_REPO=sftp:root@$SERVER:$WORK/srv/restic/$LINK-r$RUN
                timeout -k 10 "$STEP_TIMEOUT" ip netns exec "$CLIENT_NS" restic -r "$RESTIC_REPO" \
                    -o sftp.command="$SSH_CMD $SERVER -s sftp" init > "$RESULTS_DIR/logs/$LINK-restic-init-r$RUN.log" 2>&1 ||
                    log "restic init failed: $(tail -n 5 "$RESULTS_DIR/logs/$LINK-restic-init-r$RUN.log")" ;;
        esac
    done
    for phase in v1 v2; do
        if [[ $phase == v2 ]]; then rsync -a --delete "$V2/" "$LIVE/"; warm; fi
        for v in "${variants[@]}"; do
            case $v in
                tardis|tardis-cubic)
                    TARDISD_PID=${tpid[$v]%%:*}; TPORT=${tpid[$v]##*:}
                    local cc=''; [[ $v == tardis-cubic ]] && cc=cubic
                    tardis_phase "$v" "$cc" "$phase" ;;
                rsync)
                    local dest=rsync://$SERVER:8730/bench/$LINK-r$RUN/$phase/ ld=()
                    [[ $phase == v2 ]] && ld=(--link-dest=../v1)
                    # The parent directory must exist on the daemon before the first run.
                    mkdir -p "$WORK/srv/rsync/$LINK-r$RUN"
                    # shellcheck disable=SC2086
                    step rsync "$phase" rsync $RSYNC_OPTS --delete "${ld[@]}" "$LIVE/" "$dest" ;;
                restic)
                    step restic "$phase" restic -r "$RESTIC_REPO" -o sftp.command="$SSH_CMD $SERVER -s sftp" \
                        --cache-dir "$WORK/restic-cache-$LINK-r$RUN" backup --host bench -q "$LIVE" ;;
            esac
        done
    done
    for v in "${!tpid[@]}"; do TARDISD_PID=${tpid[$v]%%:*}; stop_tardisd; done
    [[ $KEEP == 1 ]] || rm -rf "${WORK:?}/srv/rsync/$LINK-r$RUN" "$WORK/srv/restic/$LINK-r$RUN" "$WORK/srv/$LINK-"*
}

log "subset $SUBSET: $(find "$V1" -type f | wc -l) files, $(du -sb "$V1" | cut -f1) bytes (v1); links: $([[ $LOOPBACK == 1 ]] && echo 'loopback ')veth at ${LOSSES// /,}% loss, rate ${RATE:-unlimited}; $RUNS run(s)"
{
    echo "date: $(date -u +%FT%TZ)"; echo "kernel: $(uname -r)"; echo "cpu: $(lscpu | sed -n 's/^Model name: *//p') x $(nproc)"
    echo "tardis: $("$BIN_DIR/tardis" --version)"; echo "restic: $(restic version)"; echo "rsync: $(rsync --version | head -n1)"
    echo "ssh: $(ssh -V 2>&1)"; echo "subset: $SUBSET"; echo "losses: $LOSSES"; echo "rate: $RATE burst $TBF_BURST latency $TBF_LATENCY"
    echo "runs: $RUNS"; echo "rsync options: $RSYNC_OPTS"
} > "$RESULTS_DIR/env.txt"

for RUN in $(seq "$RUNS"); do
    if [[ $LOOPBACK == 1 ]]; then
        run_link loopback
        if [[ $LOCAL_RATIO == 1 ]]; then
            # The same v1 backup into a local repository, same disk, same namespace.
            LINK=loopback; CLIENT_NS=$NS_S
            rsync -a --delete "$V1/" "$LIVE/"; warm
            rm -rf "$WORK/local"; mkdir -p "$WORK/local"
            printf '%s\n' "$PASSWORD" > "$WORK/local-password"
            step tardis-local v1 "$BIN_DIR/tardis" --local --db "$WORK/local" --host bench \
                --password-file "$WORK/local-password" --name v1 --json "$LIVE"
            rm -rf "$WORK/local"
        fi
    fi
    for loss in $LOSSES; do run_link "$loss"; done
done

report "$RESULTS_DIR"
cat "$RESULTS_DIR/network.md"
log "results in $RESULTS_DIR (network.md, steps.csv, logs/)"
