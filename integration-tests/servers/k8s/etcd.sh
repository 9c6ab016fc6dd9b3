#!/usr/bin/env bash
# Start a single-member etcd in the FOREGROUND (exec), client and peer URLs on 127.0.0.1 only,
# for kube-apiserver to store into (see start.sh). Kill the PID to stop.
#
# Environment:
#   K8S_ETCD_PORT       required: client port (http://127.0.0.1:PORT)
#   K8S_ETCD_DATA_DIR   required: data directory (created)
#   K8S_ETCD_PEER_PORT  optional: peer port (default: picked free)
# Ready when `curl -s http://127.0.0.1:$K8S_ETCD_PORT/health` says "health":"true".
set -euo pipefail

die() { printf '[k8s-etcd] ERROR: %s\n' "$*" >&2; exit 1; }
is_port() { [[ "$1" =~ ^[0-9]+$ ]] && (( $1 >= 1 && $1 <= 65535 )); }

port="${K8S_ETCD_PORT:-}"
is_port "$port" || die "K8S_ETCD_PORT is required and must be a port: ${port:-<unset>}"
data="${K8S_ETCD_DATA_DIR:-}"
[[ -n "$data" ]] || die "K8S_ETCD_DATA_DIR is required"
mkdir -p "$data" || die "cannot create K8S_ETCD_DATA_DIR $data"
peer="${K8S_ETCD_PEER_PORT:-}"
if [[ -z "$peer" ]]; then
    peer="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
        || die "could not pick a free peer port: set K8S_ETCD_PEER_PORT"
fi
is_port "$peer" || die "K8S_ETCD_PEER_PORT is not a valid port: $peer"
command -v etcd >/dev/null 2>&1 || die "etcd not found: run ./install.sh"

printf '[k8s-etcd] %s client=127.0.0.1:%s peer=127.0.0.1:%s data=%s\n' \
    "$(command -v etcd)" "$port" "$peer" "$data" >&2
exec etcd \
    --name edge-agent-etcd \
    --data-dir "$data" \
    --listen-client-urls "http://127.0.0.1:${port}" \
    --advertise-client-urls "http://127.0.0.1:${port}" \
    --listen-peer-urls "http://127.0.0.1:${peer}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${peer}" \
    --initial-cluster "edge-agent-etcd=http://127.0.0.1:${peer}"
