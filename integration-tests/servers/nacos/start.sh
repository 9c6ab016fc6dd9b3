#!/usr/bin/env bash
# Start rnacos (Nacos-compatible server) in the FOREGROUND for integration tests.
# The script ends by `exec`ing rnacos, so the PID you spawned is the rnacos PID (kill it to stop;
# SIGTERM shuts down in ~0.3 s). Every listener binds 127.0.0.1; the web console is disabled.
#
# Inputs (env):
#   NACOS_HTTP_PORT   required  HTTP/open-API port
#   NACOS_GRPC_PORT   optional  gRPC port (default NACOS_HTTP_PORT+1000: nacos-sdk clients derive grpc = http+1000)
#   NACOS_DATA_DIR    required  data dir, fresh (empty or missing) per run; rnacos runs with it as cwd.
#                               Re-using a dir this script already initialised (restart test) is fine.
#   NACOS_AUTH        optional  "1" = require auth on the open API and gRPC (RNACOS_ENABLE_OPEN_API_AUTH=true)
#   NACOS_USERNAME    optional  initial admin user (default "admin"); only applied when the data dir is initialised
#   NACOS_PASSWORD    optional  initial admin password (default "admin"); same caveat
#   RNACOS_BIN        optional  rnacos binary; if unset, install.sh (next to this script) builds/finds it
#   RUST_LOG          optional  rnacos log level (default "info")
#   NACOS_CLUSTER_NODE_ID  optional  raft node id of one member of a cluster (default 1 = a standalone
#                               node, or the cluster's first member: it initialises the raft group).
#                               Another id (2, 3, ...) joins the group at NACOS_CLUSTER_JOIN on its first
#                               start (RNACOS_RAFT_AUTO_INIT=false, RNACOS_RAFT_JOIN_ADDR) and skips the
#                               init phase below (it must not form a group of its own).
#   NACOS_CLUSTER_JOIN     with NACOS_CLUSTER_NODE_ID > 1: 127.0.0.1:<grpc port> of node 1 (running)
# Other RNACOS_* tuning variables are passed through (e.g. RNACOS_NAMING_HEALTH_TIMEOUT_SECOND,
# RNACOS_NAMING_INSTANCE_TIMEOUT_SECOND, RNACOS_NAMING_PERPETUAL_INSTANCE_PROBE_INTERVAL_SECOND which
# this script defaults to 0 = no TCP probing of persistent instances);
# those controlling binding, ports, data dir, auth and clustering are always forced here.
#
# Readiness: poll `GET http://127.0.0.1:$NACOS_HTTP_PORT/health` until 200 "success" (~0.3 s after exec).
#
# Fresh data dir => one-time init phase (~1 s) before the exec: rnacos 0.8.8 has a startup race on a
# FRESH data dir (raft auto-init applies log entries before its StateApplyManager actor is wired:
# panic at raftapply.rs:421, seen in ~30-50% of fresh starts here). The server then *looks* healthy
# for a few seconds but every raft-backed write is lost for good (login -> 403 "Mailbox has closed",
# config publish not stored, /health -> 503 "RaftStoreApply module ill." after ~5.5 s), and the
# data dir stays broken across restarts. So on a fresh dir we start rnacos in the background, prove a
# raft write works (an open-API login, which also creates the admin user), stop it, wipe and retry on
# failure, then exec rnacos for real on the initialised dir (restarts of an initialised dir do not race).
# The init server listens on kernel-chosen loopback ports, never on NACOS_HTTP_PORT/NACOS_GRPC_PORT.
set -euo pipefail

log() { printf '[rnacos-start] %s\n' "$*" >&2; }
die() { printf '[rnacos-start] ERROR: %s\n' "$*" >&2; exit 2; }
is_port() { [[ "$1" =~ ^[0-9]+$ ]] && (( $1 >= 1 && $1 <= 65535 )); }

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
INIT_MARKER=".edge-agent-rnacos-initialized"
INIT_ATTEMPTS=5
INIT_TIMEOUT_S=30

: "${NACOS_HTTP_PORT:?NACOS_HTTP_PORT is required}"
: "${NACOS_DATA_DIR:?NACOS_DATA_DIR is required (fresh directory per run)}"
is_port "$NACOS_HTTP_PORT" || die "NACOS_HTTP_PORT='$NACOS_HTTP_PORT' is not a valid port"
NACOS_GRPC_PORT="${NACOS_GRPC_PORT:-$(( NACOS_HTTP_PORT + 1000 ))}"
is_port "$NACOS_GRPC_PORT" || die "NACOS_GRPC_PORT='$NACOS_GRPC_PORT' is not a valid port (default is HTTP+1000; pick HTTP <= 64535)"
[[ "$NACOS_GRPC_PORT" != "$NACOS_HTTP_PORT" ]] || die "NACOS_GRPC_PORT must differ from NACOS_HTTP_PORT"
if (( NACOS_GRPC_PORT != NACOS_HTTP_PORT + 1000 )); then
  log "note: grpc port $NACOS_GRPC_PORT != http+1000; nacos-sdk clients must be told the gRPC port explicitly"
fi
command -v curl >/dev/null 2>&1 || die "curl is required"

if [[ -z "${RNACOS_BIN:-}" ]]; then
  RNACOS_BIN="$("$SCRIPT_DIR/install.sh")" || die "install.sh failed"
fi
[[ -x "$RNACOS_BIN" ]] || die "RNACOS_BIN='$RNACOS_BIN' is not an executable file"

mkdir -p "$NACOS_DATA_DIR"
NACOS_DATA_DIR="$(cd "$NACOS_DATA_DIR" && pwd)"
cd "$NACOS_DATA_DIR"

ADMIN_USER="${NACOS_USERNAME:-admin}"
ADMIN_PASS="${NACOS_PASSWORD:-admin}"

# Binding: RNACOS_SDK_HOST is the bind host of BOTH the HTTP (open API) and the gRPC listener;
# RNACOS_CONSOLE_HOST (defaults to SDK host) is the console's. Console port 0 = console not started.
export RNACOS_SDK_HOST=127.0.0.1
export RNACOS_CONSOLE_HOST=127.0.0.1
export RNACOS_HTTP_PORT="$NACOS_HTTP_PORT"
export RNACOS_GRPC_PORT="$NACOS_GRPC_PORT"
export RNACOS_HTTP_CONSOLE_PORT=0
export RNACOS_ENABLE_NO_AUTH_CONSOLE=false
export RNACOS_DATA_DIR="$NACOS_DATA_DIR"
unset RNACOS_CONFIG_DB_DIR RNACOS_RUN_IN_DOCKER
# Raft talks over our own gRPC port on loopback. Node 1: a standalone node or a cluster's first.
NODE_ID="${NACOS_CLUSTER_NODE_ID:-1}"
[[ "$NODE_ID" =~ ^[1-9][0-9]*$ ]] || die "NACOS_CLUSTER_NODE_ID='$NODE_ID' is not a positive integer"
export RNACOS_RAFT_NODE_ID="$NODE_ID"
export RNACOS_RAFT_NODE_ADDR="127.0.0.1:${NACOS_GRPC_PORT}"
unset RNACOS_RAFT_JOIN_ADDR RNACOS_CLUSTER_TOKEN
if (( NODE_ID == 1 )); then
  export RNACOS_RAFT_AUTO_INIT=true
else
  [[ "${NACOS_CLUSTER_JOIN:-}" =~ ^127\.0\.0\.1:[0-9]+$ ]] \
    || die "NACOS_CLUSTER_NODE_ID=$NODE_ID needs NACOS_CLUSTER_JOIN=127.0.0.1:<grpc port of node 1>, got '${NACOS_CLUSTER_JOIN:-}'"
  export RNACOS_RAFT_AUTO_INIT=false
  export RNACOS_RAFT_JOIN_ADDR="$NACOS_CLUSTER_JOIN"
fi
# The initial admin user is created (whatever the auth setting) only when the data dir is initialised.
export RNACOS_INIT_ADMIN_USERNAME="$ADMIN_USER"
export RNACOS_INIT_ADMIN_PASSWORD="$ADMIN_PASS"
export RUST_LOG="${RUST_LOG:-info}"
# rnacos TCP-probes the ip:port of every persistent (ephemeral=false) instance (default every 60 s).
# Off by default here: tests register fake addresses (no probes to arbitrary IPs, deterministic health).
# Set RNACOS_NAMING_PERPETUAL_INSTANCE_PROBE_INTERVAL_SECOND (>= 5) to turn it back on.
export RNACOS_NAMING_PERPETUAL_INSTANCE_PROBE_INTERVAL_SECOND="${RNACOS_NAMING_PERPETUAL_INSTANCE_PROBE_INTERVAL_SECOND:-0}"

# ---- one-time init phase for a fresh data dir (see header) -----------------------------------
INIT_PID=""
INIT_LOG=""
cleanup_init() {
  if [[ -n "$INIT_PID" ]] && kill -0 "$INIT_PID" 2>/dev/null; then
    kill -TERM "$INIT_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$INIT_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$INIT_PID" 2>/dev/null || true
    wait "$INIT_PID" 2>/dev/null || true
  fi
  INIT_PID=""
}
trap 'cleanup_init; [[ -n "$INIT_LOG" ]] && rm -f "$INIT_LOG"' EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

wipe_data_dir() { find "$NACOS_DATA_DIR" -mindepth 1 -delete; }

# TCP ports a process is listening on (from /proc; no ss/netstat needed)
listen_ports_of() {
  local pid="$1" inodes hex
  inodes=" $(find "/proc/$pid/fd" -lname 'socket:*' -printf '%l\n' 2>/dev/null | tr -dc '0-9\n' | tr '\n' ' ') "
  for hex in $(awk -v inodes="$inodes" 'NR > 1 && $4 == "0A" && index(inodes, " " $10 " ") { split($2, a, ":"); print a[2] }' /proc/net/tcp); do
    printf '%d\n' "0x$hex"
  done
}

# One init attempt on kernel-chosen ports (never the caller's ports, so a caller polling its
# readiness URL cannot mistake this temporary server for the real one).
# Returns 0 = initialised, 1 = hit the race (retry); exits on a non-retryable error.
init_attempt() {
  local out deadline port
  : >"$INIT_LOG"
  RNACOS_HTTP_PORT=0 RNACOS_GRPC_PORT=0 RNACOS_ENABLE_OPEN_API_AUTH=true \
    "$RNACOS_BIN" -e /dev/null >"$INIT_LOG" 2>&1 &
  INIT_PID=$!
  deadline=$(( SECONDS + INIT_TIMEOUT_S ))
  while (( SECONDS < deadline )); do
    if ! kill -0 "$INIT_PID" 2>/dev/null; then
      wait "$INIT_PID" 2>/dev/null || true; INIT_PID=""
      tail -n 20 "$INIT_LOG" >&2
      die "rnacos exited during the init phase (log above)"
    fi
    if grep -q 'panicked' "$INIT_LOG"; then
      cleanup_init; return 1
    fi
    for port in $(listen_ports_of "$INIT_PID"); do
      out="$(curl -s -m 2 -X POST "http://127.0.0.1:${port}/nacos/v1/auth/login" \
              --data-urlencode "username=${ADMIN_USER}" --data-urlencode "password=${ADMIN_PASS}" 2>/dev/null || true)"
      if [[ "$out" == *'"accessToken"'* ]] && ! grep -q 'panicked' "$INIT_LOG"; then
        cleanup_init; return 0
      fi
      if [[ "$out" == *'Mailbox has closed'* ]]; then
        cleanup_init; return 1
      fi
    done
    sleep 0.1
  done
  cleanup_init
  tail -n 20 "$INIT_LOG" >&2
  die "init phase: no successful login within ${INIT_TIMEOUT_S}s (log above)"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

for port in "$NACOS_HTTP_PORT" "$NACOS_GRPC_PORT"; do
  ! port_in_use "$port" || die "127.0.0.1:$port is already in use"
done

if (( NODE_ID > 1 )); then
  log "cluster node $NODE_ID joins $RNACOS_RAFT_JOIN_ADDR (no init phase)"
elif [[ ! -e "$NACOS_DATA_DIR/$INIT_MARKER" ]]; then
  if [[ -n "$(ls -A "$NACOS_DATA_DIR")" ]]; then
    die "NACOS_DATA_DIR=$NACOS_DATA_DIR is not empty and was not initialised by this script; use a fresh dir"
  fi
  INIT_LOG="$(mktemp "${TMPDIR:-/tmp}/rnacos-init.XXXXXX")"
  ok=0
  for attempt in $(seq 1 "$INIT_ATTEMPTS"); do
    if init_attempt; then ok=1; break; fi
    log "init attempt ${attempt}/${INIT_ATTEMPTS} hit the rnacos fresh-dir startup race; wiping data dir and retrying"
    wipe_data_dir
  done
  (( ok == 1 )) || { tail -n 30 "$INIT_LOG" >&2; die "could not initialise $NACOS_DATA_DIR after ${INIT_ATTEMPTS} attempts"; }
  touch "$NACOS_DATA_DIR/$INIT_MARKER"
  rm -f "$INIT_LOG"; INIT_LOG=""
fi
trap - EXIT TERM INT

# ---- the real server -------------------------------------------------------------------------
if [[ "${NACOS_AUTH:-0}" == "1" ]]; then
  export RNACOS_ENABLE_OPEN_API_AUTH=true
else
  export RNACOS_ENABLE_OPEN_API_AUTH=false
fi

log "$RNACOS_BIN node=$NODE_ID http=127.0.0.1:$NACOS_HTTP_PORT grpc=127.0.0.1:$NACOS_GRPC_PORT console=off auth=$RNACOS_ENABLE_OPEN_API_AUTH data=$NACOS_DATA_DIR"
# `-e /dev/null`: load env from an empty file instead of searching cwd and its parents for `.env`.
exec "$RNACOS_BIN" -e /dev/null
