#!/usr/bin/env bash
# Install what the HTTP/2 integration tests need (integration-tests/tests/h2.rs): h2load, from
# Debian's nghttp2-client (curl, with HTTP/2, is on every machine already).
#
# stdout: exactly one line, the absolute path of h2load. stderr: progress and errors.
# Idempotent: instant when h2load is installed.
set -euo pipefail
log() { printf '[h2-install] %s\n' "$*" >&2; }
die() { printf '[h2-install] ERROR: %s\n' "$*" >&2; exit 1; }

if ! command -v h2load >/dev/null 2>&1; then
    log "installing h2load (Debian nghttp2-client)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client; } >&2 \
        || die "step 'apt-get install nghttp2-client' failed"
fi
command -v h2load >/dev/null 2>&1 || die "h2load is not on PATH after installing nghttp2-client"
command -v h2load
