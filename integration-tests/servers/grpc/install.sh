#!/usr/bin/env bash
# Install (once) and cache what the gRPC integration tests need (integration-tests/tests/grpc.rs):
#   - a Python venv with grpcio and grpcio-tools (PyPI), and the Python stubs for echo.proto
#     generated into the cache by grpcio-tools (nothing generated is committed);
#   - grpcurl, built from its Go module (github.com/fullstorydev/grpcurl/cmd/grpcurl).
#
# stdout: exactly one line, the absolute path of the cache dir (venv/, gen/, bin/grpcurl).
# stderr: progress and errors. Idempotent: quick when cached.
#
# Cache: ${EDGE_AGENT_CACHE_DIR:-$HOME/.cache/edge-agent}/grpc/
set -euo pipefail

GRPCIO_VERSION="1.85.1"
GRPCURL_VERSION="v1.9.3"

log() { printf '[grpc-install] %s\n' "$*" >&2; }
die() { printf '[grpc-install] ERROR: %s\n' "$*" >&2; exit 1; }

here="$(cd "$(dirname "$0")" && pwd -P)"
cache="${EDGE_AGENT_CACHE_DIR:-${HOME}/.cache/edge-agent}/grpc"
mkdir -p "$cache" || die "cannot create $cache"
cache="$(cd "$cache" && pwd -P)"
if command -v flock >/dev/null 2>&1; then
    exec 9>"${cache}/.lock"
    flock 9
fi

venv="${cache}/venv"
stamp="${venv}/.grpcio-${GRPCIO_VERSION}"
if [[ ! -f "$stamp" ]]; then
    log "creating venv ${venv} with grpcio ${GRPCIO_VERSION}"
    rm -rf "$venv"
    python3 -m venv "$venv" || die "step 'python3 -m venv' failed"
    "${venv}/bin/pip" install --quiet --disable-pip-version-check \
        "grpcio==${GRPCIO_VERSION}" "grpcio-tools==${GRPCIO_VERSION}" >&2 \
        || die "step 'pip install grpcio grpcio-tools' failed"
    touch "$stamp"
fi

gen="${cache}/gen"
if ! cmp -s "${here}/echo.proto" "${gen}/echo.proto" 2>/dev/null; then
    log "generating stubs for echo.proto"
    rm -rf "$gen.tmp" && mkdir -p "$gen.tmp"
    cp "${here}/echo.proto" "$gen.tmp/"
    (cd "$gen.tmp" && "${venv}/bin/python" -m grpc_tools.protoc -I. --python_out=. \
        --grpc_python_out=. echo.proto) || die "step 'grpc_tools.protoc' failed"
    rm -rf "$gen" && mv "$gen.tmp" "$gen"
fi

grpcurl="${cache}/bin/grpcurl"
if [[ ! -x "$grpcurl" ]] || ! "$grpcurl" -version 2>&1 | grep -q "${GRPCURL_VERSION#v}"; then
    command -v go >/dev/null 2>&1 || die "step 'find go': the go command is not on PATH"
    log "building grpcurl ${GRPCURL_VERSION} (go install)"
    mkdir -p "${cache}/bin"
    GOBIN="${cache}/bin.tmp" GOFLAGS="-buildvcs=false" CGO_ENABLED=0 GOWORK=off \
        nice -n 19 go install -trimpath -ldflags "-s -w -X main.version=${GRPCURL_VERSION}" \
        "github.com/fullstorydev/grpcurl/cmd/grpcurl@${GRPCURL_VERSION}" >&2 \
        || die "step 'go install grpcurl' failed"
    mv -f "${cache}/bin.tmp/grpcurl" "$grpcurl" && rmdir "${cache}/bin.tmp"
fi

printf '%s\n' "$cache"
