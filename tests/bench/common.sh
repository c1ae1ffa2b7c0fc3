# shellcheck shell=bash
# common.sh - what the benchmark scripts share. Sourced, not run; the caller defines `log` and
# sets TOP (the workspace root).

# install_debs PKG...: installs those of the Debian packages that are missing (updating the
# package lists only if the first attempt fails).
install_debs() {
    local need=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
    done
    ((${#need[@]})) || return 0
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    }
}

# build_release PACKAGE...: release build of those workspace packages, as a user's would be.
build_release() {
    local args=() p
    for p in "$@"; do args+=(-p "$p"); done
    log "building release binaries"
    (cd "$TOP" && bash .ci/setup && cargo build --release --locked "${args[@]}")
}

# start_tardisd DIR PORT LOG: a fresh tardisd listening on 127.0.0.1:PORT with BaseDir DIR/db and
# new hosts allowed, logging to LOG; returns once it listens and sets DAEMON_PID. Needs $BIN.
start_tardisd() {
    local dir=$1 port=$2 out=$3 i
    rm -rf "$dir"; mkdir -p "$dir/db"
    printf '[Tardis]\nBaseDir = %s\nPort = %s\nListen = 127.0.0.1\nAllowNewHosts = yes\n' "$dir/db" "$port" \
        > "$dir/tardisd.cfg"
    "$BIN/tardisd" --foreground --config "$dir/tardisd.cfg" > "$out" 2>&1 &
    DAEMON_PID=$!
    for i in $(seq 300); do
        grep -q "^tardisd: listening on .* (UDP)" "$out" && return 0
        sleep 0.1
    done
    log "tardisd did not start: $(tail -n 5 "$out")"; exit 1
}

# stop_tardisd: SIGTERM to the daemon start_tardisd started, and wait for it to exit.
stop_tardisd() {
    kill -TERM "$DAEMON_PID"; wait "$DAEMON_PID" || true
    DAEMON_PID=
}
