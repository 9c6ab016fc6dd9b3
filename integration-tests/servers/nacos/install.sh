#!/usr/bin/env bash
# Install (build once per machine) the rnacos server used by the Nacos integration tests.
#
# Prints exactly one line on stdout: the absolute path of the rnacos binary. `install.sh --check`
# only reports (exit 1 when not installed, without building).
# All progress goes to stderr. Idempotent and safe to run concurrently (flock).
#
# Env:
#   EDGE_AGENT_CACHE_DIR  cache root (default: $HOME/.cache/edge-agent); rnacos lives in <cache>/rnacos/
#   RNACOS_VERSION        crate version to install (default: 0.8.8)
#   RNACOS_KEEP_TARGET    "1" keeps the cargo target dir after a successful build (default: delete it)
set -euo pipefail

RNACOS_VERSION="${RNACOS_VERSION:-0.8.8}"
CACHE_ROOT="${EDGE_AGENT_CACHE_DIR:-${HOME:?HOME not set}/.cache/edge-agent}"
ROOT="${CACHE_ROOT}/rnacos"
BIN="${ROOT}/bin/rnacos"
STAMP="${ROOT}/bin/.rnacos-${RNACOS_VERSION}.ok"   # written only after a verified, complete install

log() { printf '[rnacos-install] %s\n' "$*" >&2; }
die() { printf '[rnacos-install] ERROR: %s\n' "$*" >&2; exit 1; }

# A binary counts as installed only if: the completion stamp exists, it is executable,
# and `rnacos -V` (clap version flag; prints "rnacos <ver>" and exits, starts no server)
# reports the expected version.
is_installed() {
  [[ -f "$STAMP" && -x "$BIN" ]] || return 1
  local out
  out="$(cd / && timeout 10 "$BIN" -V 2>/dev/null)" || return 1
  [[ "$out" == *"$RNACOS_VERSION"* ]]
}

if is_installed; then
  printf '%s\n' "$BIN"
  exit 0
fi
# `install.sh --check`: exit 1 when not installed, without building.
[[ "${1:-}" != --check ]] || { log "not installed: $BIN"; exit 1; }

command -v cargo >/dev/null 2>&1 || die "cargo not found on PATH (install a Rust toolchain first)"

mkdir -p "$ROOT/bin"
LOCK="${ROOT}/.install.lock"
exec 9>"$LOCK"
if ! flock -n 9; then
  log "another install is running; waiting for lock $LOCK ..."
  flock 9
fi

# Someone else may have finished while we waited.
if is_installed; then
  printf '%s\n' "$BIN"
  exit 0
fi

# Build into a staging root; move the binary into place atomically only after it verifies.
STAGING="${ROOT}/staging"
export CARGO_TARGET_DIR="${ROOT}/target"   # persistent: an interrupted build resumes here
rm -f "$STAMP"
log "building rnacos ${RNACOS_VERSION} with cargo install (cold: 15-45 min on 2 shared cores; progress below)"
log "  root=${STAGING}  CARGO_TARGET_DIR=${CARGO_TARGET_DIR}"
start_s=$(date +%s)
# cargo prints to stderr already; send any stdout there too so our stdout stays one line.
if ! nice -n 19 cargo install rnacos --version "=${RNACOS_VERSION}" --locked --force \
      --root "$STAGING" 1>&2; then
  die "cargo install rnacos ${RNACOS_VERSION} failed (see output above); re-run to resume from ${CARGO_TARGET_DIR}"
fi
[[ -x "${STAGING}/bin/rnacos" ]] || die "cargo install succeeded but ${STAGING}/bin/rnacos is missing"

cp -f "${STAGING}/bin/rnacos" "${BIN}.tmp.$$"
chmod +x "${BIN}.tmp.$$"
mv -f "${BIN}.tmp.$$" "$BIN"          # atomic rename: $BIN is never half-written
touch "$STAMP"
is_installed || { rm -f "$STAMP"; die "installed binary ${BIN} does not report version ${RNACOS_VERSION} via -V"; }

log "built in $(( $(date +%s) - start_s ))s"
if [[ "${RNACOS_KEEP_TARGET:-0}" != "1" ]]; then
  log "removing build dirs to save disk (set RNACOS_KEEP_TARGET=1 to keep)"
  rm -rf "$CARGO_TARGET_DIR" "$STAGING"
fi
printf '%s\n' "$BIN"
