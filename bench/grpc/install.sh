#!/usr/bin/env bash
# Install (once) and cache the gRPC tools of `make bench` (bench/run.sh, section grpc):
#   - ghz, the gRPC load generator, built from its Go module (github.com/bojand/ghz/cmd/ghz);
#   - grpc-echo, the grpc-go backend in this folder (main.go), rebuilt when its sources change.
#
# stdout: exactly one line, the absolute path of the cache dir (bin/ghz, bin/grpc-echo).
# stderr: progress and errors. Idempotent: quick when cached.
#
# Cache: ${EDGE_AGENT_CACHE_DIR:-$HOME/.cache/edge-agent}/ghz/
set -euo pipefail

GHZ_VERSION="v0.120.0"

log() { printf '[ghz-install] %s\n' "$*" >&2; }
die() { printf '[ghz-install] ERROR: %s\n' "$*" >&2; exit 1; }

here="$(cd "$(dirname "$0")" && pwd -P)"
cache="${EDGE_AGENT_CACHE_DIR:-${HOME}/.cache/edge-agent}/ghz"
mkdir -p "$cache/bin" || die "cannot create $cache"
cache="$(cd "$cache" && pwd -P)"
if command -v flock >/dev/null 2>&1; then
    exec 9>"${cache}/.lock"
    flock 9
fi
command -v go >/dev/null 2>&1 || die "step 'find go': the go command is not on PATH"

ghz="${cache}/bin/ghz"
if [[ ! -x "$ghz" ]] || ! "$ghz" --version 2>&1 | grep -q "${GHZ_VERSION#v}"; then
    log "building ghz ${GHZ_VERSION} (go install)"
    rm -rf "${cache}/bin.tmp"
    GOBIN="${cache}/bin.tmp" GOFLAGS="-buildvcs=false" CGO_ENABLED=0 GOWORK=off \
        nice -n 19 go install -trimpath -ldflags "-s -w -X main.version=${GHZ_VERSION#v}" \
        "github.com/bojand/ghz/cmd/ghz@${GHZ_VERSION}" >&2 \
        || die "step 'go install ghz' failed"
    mv -f "${cache}/bin.tmp/ghz" "$ghz" && rmdir "${cache}/bin.tmp"
fi

echo_bin="${cache}/bin/grpc-echo"
sum=$(cat "$here/main.go" "$here/go.mod" "$here/go.sum" | sha256sum | cut -c1-16)
if [[ ! -x "$echo_bin" ]] || [[ "$(cat "${echo_bin}.src" 2>/dev/null)" != "$sum" ]]; then
    log "building grpc-echo (go build, $here)"
    (cd "$here" && GOFLAGS="-buildvcs=false -mod=readonly" CGO_ENABLED=0 GOWORK=off \
        nice -n 19 go build -trimpath -o "${echo_bin}.tmp" .) >&2 || die "step 'go build grpc-echo' failed"
    mv -f "${echo_bin}.tmp" "$echo_bin"
    echo "$sum" >"${echo_bin}.src"
fi

printf '%s\n' "$cache"
