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
