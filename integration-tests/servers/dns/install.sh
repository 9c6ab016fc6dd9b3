#!/usr/bin/env bash
# Install (once) dnsmasq, the DNS server the DNS adapter's tests run on loopback (Debian's
# `dnsmasq-base`: the binary alone, no service started). The Consul half of those tests uses the
# Consul that `../consul/install.sh` builds.
#
# stdout: exactly one line, the absolute path of the dnsmasq binary.
# stderr: progress and errors.
#
# Cache: Debian's package database is the cache (the binary is /usr/sbin/dnsmasq); a marker
# ${EDGE_AGENT_CACHE_DIR:-$HOME/.cache/edge-agent}/dns/installed records the version found.
# Cold (apt-get update + install on a fresh machine): see README.md beside this file.
#
# `install.sh --check` only reports (exit 0 and the path when installed, exit 1 when not).
set -euo pipefail

log() { printf '[dns-install] %s\n' "$*" >&2; }
die() { printf '[dns-install] ERROR: %s\n' "$*" >&2; exit 1; }

cache_dir="${EDGE_AGENT_CACHE_DIR:-${HOME}/.cache/edge-agent}/dns"

find_bin() {
    local b
    for b in "$(command -v dnsmasq 2>/dev/null || true)" /usr/sbin/dnsmasq; do
        if [[ -n "$b" && -x "$b" ]] && "$b" --version >/dev/null 2>&1; then
            printf '%s\n' "$b"
            return 0
        fi
    done
    return 1
}

if bin="$(find_bin)"; then
    printf '%s\n' "$bin"
    exit 0
fi
[[ "${1:-}" != --check ]] || { log "dnsmasq is not installed"; exit 1; }

mkdir -p "$cache_dir" || die "step 'create cache dir': cannot create $cache_dir"
# Serialize concurrent installs (apt has its own lock, but a second caller would fail on it).
if command -v flock >/dev/null 2>&1; then
    exec 9>"${cache_dir}/.lock"
    flock 9
fi
if bin="$(find_bin)"; then
    printf '%s\n' "$bin"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || die "step 'find apt-get': install dnsmasq (Debian: dnsmasq-base) by hand"
[[ "$(id -u)" == 0 ]] || die "step 'apt-get': needs root (or install dnsmasq-base by hand)"

start_s=$SECONDS
log "step 1/2: apt-get update"
DEBIAN_FRONTEND=noninteractive apt-get update >&2 || die "step 1 'apt-get update' failed"
log "step 2/2: apt-get install -y --no-install-recommends dnsmasq-base"
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dnsmasq-base >&2 \
    || die "step 2 'apt-get install dnsmasq-base' failed"
bin="$(find_bin)" || die "step 'verify': dnsmasq-base installed but no working dnsmasq binary"
"$bin" --version | head -n1 >"${cache_dir}/installed"
log "installed in $((SECONDS - start_s))s: $(cat "${cache_dir}/installed")"
printf '%s\n' "$bin"
