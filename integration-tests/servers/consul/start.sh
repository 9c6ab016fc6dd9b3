#!/usr/bin/env bash
# Start a single-node dev-mode Consul server (or, with CONSUL_ROLE, one member of a cluster) in
# the FOREGROUND (exec), bound to 127.0.0.1 only. The caller's child PID becomes consul's PID:
# kill it to stop.
#
# Environment:
#   CONSUL_ROLE           optional: dev (default: one -dev server), server (a cluster server:
#                         -server -bootstrap-expect=$CONSUL_BOOTSTRAP_EXPECT, default 3) or
#                         client (a client agent). server and client need CONSUL_DATA_DIR and
#                         CONSUL_RETRY_JOIN, and run raft_multiplier = 1 (dev mode's timing:
#                         an election takes ~1-2 s instead of ~5-10 s).
#   CONSUL_RETRY_JOIN     with server/client: space-separated 127.0.0.1:<serf lan port> of the
#                         other members (each becomes a -retry-join, retried every 1 s)
#   CONSUL_HTTP_PORT      required: HTTP API port on 127.0.0.1
#   CONSUL_BIN            optional: consul binary (default: output of ./install.sh)
#   CONSUL_DATA_DIR       optional: -data-dir (default: none, dev mode keeps state in memory)
#   CONSUL_ACL_TOKEN      optional: enable ACLs, default_policy "deny", with this
#                         token as initial management (and agent) token.
#                         Allowed characters: A-Z a-z 0-9 . _ - (a UUID is best;
#                         Consul logs a deprecation warning for non-UUID tokens)
#   CONSUL_SERVER_PORT    optional: server RPC port (default: picked free)
#   CONSUL_SERF_LAN_PORT  optional: serf LAN port, tcp+udp (default: picked free)
#   CONSUL_SERF_WAN_PORT  optional: serf WAN port, tcp+udp (default: picked free)
#   CONSUL_DNS_PORT       optional: serve Consul's DNS interface on 127.0.0.1, udp+tcp, on this
#                         port (default: DNS disabled)
#   CONSUL_NODE_NAME      optional: node name (default: edge-agent-consul)
#   CONSUL_LOG_LEVEL      optional: trace|debug|info|warn|error (default: warn)
#   CONSUL_EXTRA_HCL      optional: one more -hcl snippet (e.g. a `limits { ... }` block)
# Extra command-line arguments are appended to `consul agent`.
#
# DNS (unless CONSUL_DNS_PORT is set), gRPC and gRPC-TLS are disabled (-1). Ready when
#   curl -s http://127.0.0.1:$CONSUL_HTTP_PORT/v1/status/leader
# returns a non-empty string such as "127.0.0.1:PORT".
set -euo pipefail

die() { printf '[consul-start] ERROR: %s\n' "$*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"

is_port() { [[ "$1" =~ ^[0-9]+$ ]] && (( $1 >= 1 && $1 <= 65535 )); }

http_port="${CONSUL_HTTP_PORT:-}"
[[ -n "$http_port" ]] || die "CONSUL_HTTP_PORT is required"
is_port "$http_port" || die "CONSUL_HTTP_PORT is not a valid port: $http_port"
dns_port="${CONSUL_DNS_PORT:--1}"
[[ "$dns_port" == -1 ]] || is_port "$dns_port" || die "CONSUL_DNS_PORT is not a valid port: $dns_port"

if [[ -z "${CONSUL_BIN:-}" ]]; then
    CONSUL_BIN="$("${here}/install.sh")" || die "install.sh failed; cannot find a consul binary"
fi
[[ -x "$CONSUL_BIN" ]] || die "CONSUL_BIN is not an executable file: $CONSUL_BIN"

# Pick free 127.0.0.1 ports (free for both TCP and UDP; serf uses both).
# All sockets are held until every port is chosen, so the ports are distinct.
pick_free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
n = int(sys.argv[1]); held = []; ports = []
while len(ports) < n:
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.bind(("127.0.0.1", 0))
    p = t.getsockname()[1]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.bind(("127.0.0.1", p))
    except OSError:
        t.close(); u.close(); continue
    held += [t, u]; ports.append(p)
print(" ".join(map(str, ports)))
PY
}

need=0
for v in CONSUL_SERVER_PORT CONSUL_SERF_LAN_PORT CONSUL_SERF_WAN_PORT; do
    if [[ -n "${!v:-}" ]]; then
        is_port "${!v}" || die "$v is not a valid port: ${!v}"
    else
        need=$((need + 1))
    fi
done
free=()
if (( need > 0 )); then
    command -v python3 >/dev/null 2>&1 \
        || die "python3 not found: set CONSUL_SERVER_PORT, CONSUL_SERF_LAN_PORT and CONSUL_SERF_WAN_PORT"
    read -r -a free <<<"$(pick_free_ports "$need")" || die "could not pick free ports"
    (( ${#free[@]} == need )) || die "could not pick $need free ports"
fi
i=0
next_free() { printf '%s' "${free[$i]}"; }
server_port="${CONSUL_SERVER_PORT:-}"
if [[ -z "$server_port" ]]; then server_port="$(next_free)"; i=$((i + 1)); fi
serf_lan_port="${CONSUL_SERF_LAN_PORT:-}"
if [[ -z "$serf_lan_port" ]]; then serf_lan_port="$(next_free)"; i=$((i + 1)); fi
serf_wan_port="${CONSUL_SERF_WAN_PORT:-}"
if [[ -z "$serf_wan_port" ]]; then serf_wan_port="$(next_free)"; i=$((i + 1)); fi

role="${CONSUL_ROLE:-dev}"
case "$role" in
    dev) mode=(-dev) ;;
    server|client)
        [[ -n "${CONSUL_DATA_DIR:-}" ]] || die "CONSUL_ROLE=$role needs CONSUL_DATA_DIR"
        [[ -n "${CONSUL_RETRY_JOIN:-}" ]] || die "CONSUL_ROLE=$role needs CONSUL_RETRY_JOIN"
        # Members start side by side: the first finds no peer yet, so retry every second
        # (Consul's default is 30 s).
        mode=(-hcl 'performance { raft_multiplier = 1 }' -retry-interval 1s)
        if [[ "$role" == server ]]; then
            expect="${CONSUL_BOOTSTRAP_EXPECT:-3}"
            [[ "$expect" =~ ^[1-9][0-9]*$ ]] || die "CONSUL_BOOTSTRAP_EXPECT is not a count: $expect"
            mode+=(-server -bootstrap-expect "$expect")
        fi
        for peer in $CONSUL_RETRY_JOIN; do
            [[ "$peer" =~ ^127\.0\.0\.1:[0-9]+$ ]] \
                || die "CONSUL_RETRY_JOIN: expected 127.0.0.1:<port>, got $peer"
            mode+=(-retry-join "$peer")
        done
        ;;
    *) die "CONSUL_ROLE must be dev, server or client, not $role" ;;
esac

args=(
    agent "${mode[@]}"
    -bind 127.0.0.1
    -client 127.0.0.1
    -node "${CONSUL_NODE_NAME:-edge-agent-consul}"
    -log-level "${CONSUL_LOG_LEVEL:-warn}"
    -http-port "$http_port"
    -server-port "$server_port"
    -serf-lan-port "$serf_lan_port"
    -serf-wan-port "$serf_wan_port"
    -dns-port "$dns_port"
    -grpc-port -1
    -grpc-tls-port -1
    # No outbound call to HashiCorp's update-check service.
    -hcl 'disable_update_check = true'
)

if [[ -n "${CONSUL_EXTRA_HCL:-}" ]]; then
    args+=(-hcl "$CONSUL_EXTRA_HCL")
fi

if [[ -n "${CONSUL_DATA_DIR:-}" ]]; then
    mkdir -p "$CONSUL_DATA_DIR" || die "cannot create CONSUL_DATA_DIR $CONSUL_DATA_DIR"
    args+=(-data-dir "$CONSUL_DATA_DIR")
fi

if [[ -n "${CONSUL_ACL_TOKEN:-}" ]]; then
    [[ "$CONSUL_ACL_TOKEN" =~ ^[A-Za-z0-9._-]+$ ]] \
        || die "CONSUL_ACL_TOKEN may only contain A-Z a-z 0-9 . _ -"
    args+=(-hcl "acl {
  enabled = true
  default_policy = \"deny\"
  down_policy = \"extend-cache\"
  enable_token_persistence = false
  tokens {
    initial_management = \"${CONSUL_ACL_TOKEN}\"
    agent = \"${CONSUL_ACL_TOKEN}\"
  }
}")
fi

printf '[consul-start] role=%s %s http=127.0.0.1:%s dns=%s server=%s serf_lan=%s serf_wan=%s acl=%s\n' \
    "$role" "$CONSUL_BIN" "$http_port" "$dns_port" "$server_port" "$serf_lan_port" "$serf_wan_port" \
    "$([[ -n "${CONSUL_ACL_TOKEN:-}" ]] && echo deny || echo off)" >&2

exec "$CONSUL_BIN" "${args[@]}" "$@"
