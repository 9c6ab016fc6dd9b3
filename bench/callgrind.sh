#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind (deterministic, unlike
# timings on a shared machine): edge-agent (one worker) and nginx as reverse proxy (one
# process), each under valgrind behind the same nginx backend, wrk driving keep-alive requests.
# Counters are zeroed after a warm-up and dumped after a fixed window; instructions ÷ requests.
#
#   bash bench/callgrind.sh AGENT_BINARY [OUT_DIR]     (`BENCH_CALLGRIND=1 make bench` runs it)
#
# Prints a markdown table; keeps the callgrind files and annotated top functions in OUT_DIR.
# Installs valgrind, wrk and nginx from Debian when missing. Binds 127.0.0.1 only; stops what it started.
set -euo pipefail
AGENT=$1
OUT=${2:-$(mktemp -d /tmp/edge-agent-callgrind.XXXXXX)}
WINDOW=${CALLGRIND_SECONDS:-8}
mkdir -p "$OUT"
export PATH=$PATH:/usr/sbin
need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
W=$(mktemp -d /tmp/edge-agent-cg.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

read -r BP AP NP <<<"$(python3 -c '
import socket
s = [socket.socket() for _ in range(3)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))')"
BODY=$(printf 'x%.0s' $(seq 99))
mkdir -p "$W/b/logs" "$W/b/tmp" "$W/n/logs" "$W/n/tmp"
cat >"$W/b/nginx.conf" <<EOF
worker_processes 1; pid $W/b/nginx.pid; error_log $W/b/logs/error.log warn; daemon off;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $W/b/tmp;
  server { listen 127.0.0.1:$BP; location / { default_type text/plain; return 200 "$BODY"; } } }
EOF
cat >"$W/n/nginx.conf" <<EOF
master_process off; worker_processes 1; pid $W/n/nginx.pid; error_log $W/n/logs/error.log warn; daemon off;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $W/n/tmp; proxy_temp_path $W/n/tmp;
  upstream b { server 127.0.0.1:$BP; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$NP;
    location / { proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
EOF
printf '[[service]]\nname = "bench"\ninstances = [{ addr = "127.0.0.1:%s" }]\n' "$BP" >"$W/services.toml"

nginx -p "$W/b" -c "$W/b/nginx.conf" >/dev/null 2>&1 &
PIDS+=($!)

measure() { # NAME PORT PID
    local name=$1 port=$2 pid=$3 n ir f
    for _ in $(seq 300); do
        curl -sf -o /dev/null -H 'Host: bench' "http://127.0.0.1:$port/" && break
        sleep 0.2
    done
    wrk -t1 -c16 -d3s -H 'Host: bench' "http://127.0.0.1:$port/" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    n=$(wrk -t1 -c16 -d"${WINDOW}s" -H 'Host: bench' "http://127.0.0.1:$port/" | awk '/requests in/ {print $1}')
    callgrind_control -d "$pid" >/dev/null 2>&1
    for _ in $(seq 50); do
        f=$(ls -S "$OUT/$name".cg.* 2>/dev/null | head -1 || true)
        [ -n "$f" ] && break
        sleep 0.1
    done
    ir=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    callgrind_annotate --inclusive=no --threshold=100 "$f" 2>/dev/null | grep -E '^ *[0-9,]+ \(' |
        sed -E 's|/root/.cargo/registry/src/[^/]+/||; s|/rustc/[0-9a-f]+/library/||' | head -40 >"$OUT/$name.top.txt"
    echo "$name $n $ir"
}

env TOKIO_WORKER_THREADS=1 RUST_LOG=warn EDGE_AGENT_LISTEN="127.0.0.1:$AP" \
    EDGE_AGENT_ADMIN_LISTEN=127.0.0.1:0 EDGE_AGENT_REGISTRY="file://$W/services.toml" \
    EDGE_AGENT_STATE_DIR="$W/state" \
    valgrind --tool=callgrind --callgrind-out-file="$OUT/agent.cg.%p" "$AGENT" >"$W/agent.log" 2>&1 &
APID=$!
PIDS+=("$APID")
A=$(measure agent "$AP" "$APID")
kill "$APID"

valgrind --tool=callgrind --callgrind-out-file="$OUT/nginx.cg.%p" \
    nginx -p "$W/n" -c "$W/n/nginx.conf" >"$W/nginx.log" 2>&1 &
NPID=$!
PIDS+=("$NPID")
N=$(measure nginx "$NP" "$NPID")
kill "$NPID"

python3 - "$A" "$N" <<'EOF'
import sys
rows = [a.split() for a in sys.argv[1:]]
per = {r[0]: int(r[2]) / int(r[1]) for r in rows}
print("| proxy (under callgrind, 1 worker) | requests | instructions | instructions/request |")
print("| --- | ---: | ---: | ---: |")
for name, n, ir in rows:
    label = "edge-agent" if name == "agent" else "nginx"
    print(f"| {label} | {int(n):,} | {int(ir):,} | {int(ir) / int(n):,.0f} |")
print()
print(f"edge-agent / nginx, user-space instructions per request: {per['agent'] / per['nginx']:.2f}")
EOF
