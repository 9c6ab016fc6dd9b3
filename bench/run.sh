#!/usr/bin/env bash
# `make bench`: edge-agent side by side with nginx and HAProxy on loopback, criterion
# micro-benchmarks, and memory at scale. Prints markdown tables (also kept in $BENCH_OUT).
# See BENCHMARKS.md for what each figure means and the last recorded run.
#
# Knobs (environment): BENCH_DURATION (s per load run, 8), BENCH_ROUNDS (3), BENCH_CONNS (32),
# BENCH_SKIP_MICRO=1, BENCH_SKIP_PROXY=1, BENCH_PERF=1 (perf profile of edge-agent, 1 worker),
# BENCH_CALLGRIND=1 (instructions per request, edge-agent vs nginx: bench/callgrind.sh),
# BENCH_OUT (results folder, default a temp dir that is kept),
# BENCH_ONLY=SECTION[,SECTION...] (run only these; sections: http1 (wrk + fixed rate, with the
# access-log row), accesslog (the access-log row alone: agent with and without it), h2 (h2load),
# grpc (ghz), scale, micro, fleet; e.g. `BENCH_ONLY=h2 make bench`), BENCH_H2_CONNS (4) and
# BENCH_H2_STREAMS (25) (h2load -c/-m), BENCH_GRPC_CONNS (4) and BENCH_GRPC_CONCURRENCY (100).
#
# Pinning: the proxy under test runs on CPU 1, the load generator and the backend on CPU 0
# (`taskset`). The "edge-agent default threads" row is left unpinned (both CPUs, tokio's
# default of one worker per CPU), so it competes with the load generator.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/edge-agent/target-bench}
DUR=${BENCH_DURATION:-8}
ROUNDS=${BENCH_ROUNDS:-3}
CONNS=${BENCH_CONNS:-32}
HOSTNAME_HDR=bench
WORK=$(mktemp -d /tmp/edge-agent-bench.XXXXXX)
OUT=${BENCH_OUT:-$WORK/out}
mkdir -p "$OUT"
PIDS=()
T0=$(date +%s)

log() { printf '[bench %4ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }

# want SECTION: is SECTION selected (BENCH_ONLY unset: every section, less the BENCH_SKIP_* ones)?
want() {
    if [ -n "${BENCH_ONLY:-}" ]; then
        case ",$BENCH_ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac
    fi
    case $1 in
        http1 | accesslog) [ -z "${BENCH_SKIP_PROXY:-}" ] ;;
        h2) [ -z "${BENCH_SKIP_PROXY:-}" ] && [ -z "${BENCH_SKIP_H2:-}" ] ;;
        grpc) [ -z "${BENCH_SKIP_PROXY:-}" ] && [ -z "${BENCH_SKIP_GRPC:-}" ] ;;
        micro) [ -z "${BENCH_SKIP_MICRO:-}" ] ;;
        fleet) [ -z "${BENCH_SKIP_FLEET:-}" ] ;;
        *) return 0 ;;
    esac
}
if [ -n "${BENCH_ONLY:-}" ]; then
    for s in ${BENCH_ONLY//,/ }; do
        case $s in http1 | accesslog | h2 | grpc | scale | micro | fleet) ;;
            *) echo "bench: BENCH_ONLY: unknown section '$s' (http1, accesslog, h2, grpc, scale, micro, fleet)" >&2; exit 2 ;;
        esac
    done
fi
# The 1-minute load average (/proc/loadavg), kept with every figure.
load1() { cut -d' ' -f1 /proc/loadavg; }

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK/run"
    rm -f "$WORK/agent1log.log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools ----------------------------------------------------------------------------------
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)
command -v python3 >/dev/null || need+=(python3)
command -v curl >/dev/null || need+=(curl)
command -v jq >/dev/null || need+=(jq)
command -v gnuplot >/dev/null || need+=(gnuplot-nox)
if want h2; then command -v h2load >/dev/null || need+=(nghttp2-client); fi
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH=$PATH:/usr/sbin
GHZ_CACHE=""
if want grpc; then
    log "gRPC tools: ghz and the grpc-go echo backend (bench/grpc/install.sh, cached)"
    GHZ_CACHE=$(bash "$ROOT/bench/grpc/install.sh")
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 8192 2>/dev/null || true

NCPU=$(nproc)
if [ "$NCPU" -ge 2 ]; then PROXY_CPU=1; LOAD_CPU=0; else PROXY_CPU=0; LOAD_CPU=0; fi
ALL_CPUS=0-$((NCPU - 1))
CLK_TCK=$(getconf CLK_TCK)

# --- build (once; reused while sources are unchanged) -----------------------------------------
# One build: `cargo bench --no-run` also builds the edge-agent binary (bench profile = release
# settings, thin LTO) for the benches, so the release binary is not built a second time with
# other feature unification.
newest() { find "$CARGO_TARGET_DIR/release/deps" -maxdepth 1 -type f -perm -u+x -name "$1-*" ! -name '*.*' -printf '%T@ %p\n' 2>/dev/null | sort -n | tail -1 | cut -d' ' -f2-; }
if [ -n "${BENCH_NO_BUILD:-}" ]; then
    log "BENCH_NO_BUILD: using the binaries already in $CARGO_TARGET_DIR"
    AGENT=$CARGO_TARGET_DIR/release/edge-agent
    LOADGEN=$(newest loadgen)
    MICRO=$(newest micro)
else
    log "building edge-agent and the benches (bench profile = release, thin LTO; into $CARGO_TARGET_DIR)"
    BUILD_JSON=$(cargo bench --no-run --bench loadgen --bench micro --message-format=json)
    exe() { echo "$BUILD_JSON" | jq -r --arg n "$1" 'select(.executable != null and .target.name == $n) | .executable' | tail -1; }
    LOADGEN=$(exe loadgen)
    MICRO=$(exe micro)
    AGENT=$(exe edge-agent)
fi
[ -x "$LOADGEN" ] || { echo "bench: loadgen not built" >&2; exit 1; }
[ -x "$AGENT" ] || { echo "bench: edge-agent binary not built" >&2; exit 1; }
[ -x "$MICRO" ] || { echo "bench: micro not built" >&2; exit 1; }

# --- helpers --------------------------------------------------------------------------------
free_ports() {
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# start NAME CPUS CMD... : runs CMD in the background pinned to CPUS; sets STARTED_PID.
start() {
    local name=$1 cpus=$2
    shift 2
    taskset -c "$cpus" "$@" >"$WORK/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

stop() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

wait_http() { # PORT NAME
    for _ in $(seq 150); do
        if [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $HOSTNAME_HDR" "http://127.0.0.1:$1/" || true)" = 200 ]; then
            return 0
        fi
        sleep 0.1
    done
    echo "bench: $2 on port $1 did not answer 200; log:" >&2
    tail -20 "$WORK/$2.log" >&2 || true
    exit 1
}

# The process and its direct children (nginx master + worker).
tree_pids() { echo "$1 $(ps -o pid= --ppid "$1" 2>/dev/null | tr '\n' ' ')"; }

cpu_ticks() { # PIDS...
    local t=0 p
    for p in "$@"; do
        [ -r "/proc/$p/stat" ] || continue
        t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    echo "$t"
}

rss_kb() { # PIDS... -> sum of VmRSS
    local t=0 p v
    for p in "$@"; do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        t=$((t + ${v:-0}))
    done
    echo "$t"
}

to_us() { # wrk latency (e.g. 512.00us 1.23ms 1.01s) -> microseconds
    awk -v v="$1" 'BEGIN {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
        if (u == "us") f = 1; else if (u == "ms") f = 1000; else if (u == "s") f = 1000000; else f = 1;
        printf "%.0f", n * f }'
}

mkdir -p "$WORK/run"
R=$WORK/run

# --- processes under test -------------------------------------------------------------------
read -r BP NP HP EP1 EA1 EP2 EA2 SP SA EP3 EA3 <<<"$(free_ports 11)"
BODY=$(printf 'x%.0s' $(seq 99))
mkdir -p "$R/backend" "$R/nginx"
for d in backend nginx; do mkdir -p "$R/$d/logs" "$R/$d/tmp"; done
cat >"$R/backend/nginx.conf" <<EOF
worker_processes 1;
pid $R/backend/nginx.pid;
error_log $R/backend/logs/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $R/backend/tmp;
    server {
        listen 127.0.0.1:$BP backlog=4096;
        location / { default_type text/plain; return 200 "$BODY"; }
    }
}
EOF
cat >"$R/nginx/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile 20000;
pid $R/nginx/nginx.pid;
error_log $R/nginx/logs/error.log warn;
events { worker_connections 12000; }
http {
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path $R/nginx/tmp;
    proxy_temp_path $R/nginx/tmp;
    upstream bench {
        server 127.0.0.1:$BP;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NP backlog=4096;
        location / {
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
cat >"$R/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 2000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend fe
    bind 127.0.0.1:$HP
    default_backend be
backend be
    server s1 127.0.0.1:$BP
EOF
cat >"$R/services.toml" <<EOF
[[service]]
name = "$HOSTNAME_HDR"
instances = [ { addr = "127.0.0.1:$BP" } ]
EOF

HTTP1=""
want http1 && HTTP1=1
ALOG=""
{ want http1 || want accesslog; } && ALOG=1
start backend "$LOAD_CPU" nginx -p "$R/backend" -c "$R/backend/nginx.conf" -g 'daemon off;'
BACKEND_PID=$STARTED_PID
if [ -n "$HTTP1" ]; then
    start nginx "$PROXY_CPU" nginx -p "$R/nginx" -c "$R/nginx/nginx.conf" -g 'daemon off;'
    NGINX_PID=$STARTED_PID
    start haproxy "$PROXY_CPU" haproxy -db -f "$R/haproxy.cfg"
    HAPROXY_PID=$STARTED_PID
fi

agent_env() { # LISTEN ADMIN STATE REGISTRY
    mkdir -p "$3"
    echo "EDGE_AGENT_LISTEN=127.0.0.1:$1 EDGE_AGENT_ADMIN_LISTEN=127.0.0.1:$2 EDGE_AGENT_STATE_DIR=$3 EDGE_AGENT_REGISTRY=file://$4 RUST_LOG=warn EDGE_AGENT_LOG_FORMAT=text"
}
if [ -n "$ALOG" ]; then
    # shellcheck disable=SC2046
    start agent1 "$PROXY_CPU" env $(agent_env "$EP1" "$EA1" "$R/state1" "$R/services.toml") TOKIO_WORKER_THREADS=1 "$AGENT"
    AGENT1_PID=$STARTED_PID
    # The access log's cost (#16): agent 1's settings plus EDGE_AGENT_ACCESS_LOG=stdout (JSON),
    # its stdout a regular file, $WORK/agent1log.log (deleted at exit: about 330 bytes a request).
    # shellcheck disable=SC2046
    start agent1log "$PROXY_CPU" env $(agent_env "$EP3" "$EA3" "$R/state5" "$R/services.toml") TOKIO_WORKER_THREADS=1 EDGE_AGENT_ACCESS_LOG=stdout EDGE_AGENT_ACCESS_LOG_FORMAT=json "$AGENT"
    AGENT3_PID=$STARTED_PID
fi
if [ -n "$HTTP1" ]; then
    # shellcheck disable=SC2046
    start agent2 "$ALL_CPUS" env $(agent_env "$EP2" "$EA2" "$R/state2" "$R/services.toml") "$AGENT"
    AGENT2_PID=$STARTED_PID
fi

wait_http "$BP" backend
if [ -n "$HTTP1" ]; then
    wait_http "$NP" nginx
    wait_http "$HP" haproxy
    wait_http "$EP2" agent2
fi
if [ -n "$ALOG" ]; then
    wait_http "$EP1" agent1
    wait_http "$EP3" agent1log
fi
log "backend :$BP, nginx :$NP, haproxy :$HP, edge-agent 1 worker :$EP1, edge-agent default :$EP2, with access log :$EP3"

# name port pid(s) label
if [ -n "$HTTP1" ]; then
    TARGETS=(
        "direct|$BP|$BACKEND_PID|backend directly (nginx, CPU $LOAD_CPU)"
        "nginx|$NP|$NGINX_PID|nginx proxy, 1 worker"
        "haproxy|$HP|$HAPROXY_PID|HAProxy, nbthread 1"
        "agent1|$EP1|$AGENT1_PID|edge-agent, TOKIO_WORKER_THREADS=1"
        "agent2|$EP2|$AGENT2_PID|edge-agent, default threads, unpinned"
        "agent1log|$EP3|$AGENT3_PID|edge-agent, TOKIO_WORKER_THREADS=1, access log JSON to stdout"
    )
elif [ -n "$ALOG" ]; then
    TARGETS=(
        "agent1|$EP1|$AGENT1_PID|edge-agent, TOKIO_WORKER_THREADS=1"
        "agent1log|$EP3|$AGENT3_PID|edge-agent, TOKIO_WORKER_THREADS=1, access log JSON to stdout"
    )
fi

run_wrk() { # NAME PORT PID DURATION ROUND
    local name=$1 port=$2 pid=$3 d=$4 round=$5 pids before after out load
    pids=$(tree_pids "$pid")
    load=$(load1)
    # shellcheck disable=SC2086
    before=$(cpu_ticks $pids)
    out=$(taskset -c "$LOAD_CPU" timeout $((d + 30)) wrk -t1 -c"$CONNS" -d"${d}s" --timeout 5s --latency \
        -H "Host: $HOSTNAME_HDR" "http://127.0.0.1:$port/" 2>&1 || true)
    # shellcheck disable=SC2086
    after=$(cpu_ticks $pids)
    [ "$round" = warmup ] && return 0
    echo "$out" >"$OUT/wrk-$name-$round.txt"
    local rps p50 p99 reqs errs
    rps=$(echo "$out" | awk '/^Requests\/sec:/ {print $2}')
    p50=$(to_us "$(echo "$out" | awk '$1 == "50%" {print $2}')")
    p99=$(to_us "$(echo "$out" | awk '$1 == "99%" {print $2}')")
    reqs=$(echo "$out" | awk '/requests in/ {print $1}')
    errs=$(echo "$out" | awk '/Non-2xx/ {n += $NF} /Socket errors/ {n += 1} END {print n + 0}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "${rps:-0}" "${p50:-0}" "${p99:-0}" \
        "${reqs:-0}" "$((after - before))" "$errs" "$load" >>"$OUT/wrk.tsv"
}

run_fixed() { # NAME PORT RATE ROUND
    local line
    line=$(LOADGEN_TIMELINE="$OUT/timeline-$1-$4.tsv" taskset -c "$LOAD_CPU" timeout $((DUR + 60)) "$LOADGEN" fixed "127.0.0.1:$2" "$HOSTNAME_HDR" "$3" "$CONNS" "$DUR" || true)
    printf '%s\t%s\t%s\n' "$1" "$4" "$line" >>"$OUT/fixed.tsv"
}

if [ -n "$ALOG" ]; then
    : >"$OUT/wrk.tsv"
    : >"$OUT/fixed.tsv"
    log "warm-up (2 s each)"
    for t in "${TARGETS[@]}"; do
        IFS='|' read -r name port pid _ <<<"$t"
        run_wrk "$name" "$port" "$pid" 2 warmup
    done
    for round in $(seq "$ROUNDS"); do
        for t in "${TARGETS[@]}"; do
            IFS='|' read -r name port pid _ <<<"$t"
            log "max throughput: round $round/$ROUNDS, $name"
            run_wrk "$name" "$port" "$pid" "$DUR" "$round"
        done
    done
    if [ -n "$HTTP1" ]; then
        NGINX_RPS=$(awk -F'\t' '$1 == "nginx" {print $3}' "$OUT/wrk.tsv" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}')
        RATE=$(awk -v r="$NGINX_RPS" 'BEGIN {printf "%d", r / 2}')
        echo "$RATE" >"$OUT/rate"
        for round in $(seq "$ROUNDS"); do
            for t in "${TARGETS[@]:0:4}"; do
                IFS='|' read -r name port pid _ <<<"$t"
                log "fixed rate $RATE req/s: round $round/$ROUNDS, $name"
                run_fixed "$name" "$port" "$RATE" "$round"
            done
        done
    fi
    if [ -n "${BENCH_PERF:-}" ] && command -v perf >/dev/null; then
        log "perf profile of edge-agent (1 worker) under wrk"
        (taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DUR}s" -H "Host: $HOSTNAME_HDR" "http://127.0.0.1:$EP1/" >/dev/null 2>&1 &
            timeout $((DUR + 5)) perf record -q -F 999 -g -p "$AGENT1_PID" -o "$OUT/perf.data" -- sleep "$((DUR - 2))" >/dev/null 2>&1 || true
            wait) || true
        perf report -i "$OUT/perf.data" --no-children --percent-limit 1.5 --stdio 2>/dev/null |
            grep -E '^ +[0-9.]+%' | head -25 >"$OUT/perf-top.txt" || true
    fi
    # Memory of the processes after the load rounds.
    [ -n "$HTTP1" ] && {
        printf 'nginx\t%s\n' "$(rss_kb $(tree_pids "$NGINX_PID"))"
        printf 'haproxy\t%s\n' "$(rss_kb "$HAPROXY_PID")"
        printf 'agent1\t%s\n' "$(rss_kb "$AGENT1_PID")"
    } >"$OUT/rss-after-load.tsv"
fi
if [ -n "$ALOG" ]; then
    stop "$AGENT1_PID"
    stop "$AGENT3_PID"
    # Lines the logging agent wrote (the rest were dropped: edge_agent_access_log_dropped_total).
    wc -l <"$WORK/agent1log.log" >"$OUT/access-log-lines" 2>/dev/null || true
    rm -f "$WORK/agent1log.log"
fi
if [ -n "$HTTP1" ]; then
    stop "$AGENT2_PID"
    stop "$HAPROXY_PID"
    stop "$NGINX_PID"
fi

# --- HTTP/2 (h2load): h2 on both sides, edge-agent vs nginx vs HAProxy (#13) -----------------
# Backend: nginx as an h2c origin (prior knowledge, `listen ... http2` without TLS), 1 worker, on
# CPU $LOAD_CPU with h2load; the same 99-byte body. Proxies on CPU $PROXY_CPU, one worker each,
# h2c (prior knowledge) on the client side:
#   edge-agent: `[[upstream]] protocol = "h2c"`, multiplexed connection(s) to the backend;
#   nginx 1.22: `listen ... http2`, `grpc_pass` to the backend (its only HTTP/2 upstream; one
#     upstream connection per request in flight, kept alive with `keepalive`);
#   HAProxy 2.6: `bind ... proto h2`, `server ... proto h2`, `http-reuse always` (multiplexed).
H2_CONNS=${BENCH_H2_CONNS:-4}
H2_STREAMS=${BENCH_H2_STREAMS:-25}
H2_HOST=h2bench
if want h2; then
    read -r H2B H2N H2H H2E H2EA <<<"$(free_ports 5)"
    for d in h2backend h2nginx; do mkdir -p "$R/$d/logs" "$R/$d/tmp"; done
    cat >"$R/h2backend/nginx.conf" <<EOF
worker_processes 1;
pid $R/h2backend/nginx.pid;
error_log $R/h2backend/logs/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    http2_max_concurrent_streams 1024;
    client_body_temp_path $R/h2backend/tmp;
    server {
        listen 127.0.0.1:$H2B http2 backlog=4096;
        location / { default_type text/plain; return 200 "$BODY"; }
    }
}
EOF
    cat >"$R/h2nginx/nginx.conf" <<EOF
worker_processes 1;
pid $R/h2nginx/nginx.pid;
error_log $R/h2nginx/logs/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_temp_path $R/h2nginx/tmp;
    upstream h2backend {
        server 127.0.0.1:$H2B;
        keepalive 256;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$H2N http2 backlog=4096;
        location / { grpc_pass grpc://h2backend; }
    }
}
EOF
    cat >"$R/h2haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 2000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend fe
    bind 127.0.0.1:$H2H proto h2
    default_backend be
backend be
    server s1 127.0.0.1:$H2B proto h2
EOF
    printf '[[service]]\nname = "%s"\ninstances = [ { addr = "127.0.0.1:%s" } ]\n' "$H2_HOST" "$H2B" >"$R/h2services.toml"
    printf '[[upstream]]\nid = "%s"\nprotocol = "h2c"\n\n[[route]]\nhost = "%s"\nupstream = "%s"\n' \
        "$H2_HOST" "$H2_HOST" "$H2_HOST" >"$R/h2agent.toml"
    start h2backend "$LOAD_CPU" nginx -p "$R/h2backend" -c "$R/h2backend/nginx.conf" -g 'daemon off;'
    H2B_PID=$STARTED_PID
    start h2nginx "$PROXY_CPU" nginx -p "$R/h2nginx" -c "$R/h2nginx/nginx.conf" -g 'daemon off;'
    H2N_PID=$STARTED_PID
    start h2haproxy "$PROXY_CPU" haproxy -db -f "$R/h2haproxy.cfg"
    H2H_PID=$STARTED_PID
    # shellcheck disable=SC2046
    start h2agent "$PROXY_CPU" env $(agent_env "$H2E" "$H2EA" "$R/state-h2" "$R/h2services.toml") \
        EDGE_AGENT_CONFIG="$R/h2agent.toml" TOKIO_WORKER_THREADS=1 "$AGENT"
    H2E_PID=$STARTED_PID
    for t in "h2backend|$H2B" "h2nginx|$H2N" "h2haproxy|$H2H" "h2agent|$H2E"; do
        IFS='|' read -r name port <<<"$t"
        ok=""
        for _ in $(seq 150); do
            if [ "$(curl -s --http2-prior-knowledge -o /dev/null -w '%{http_version} %{http_code}' \
                --connect-to "$H2_HOST:80:127.0.0.1:$port" "http://$H2_HOST/" || true)" = "2 200" ]; then
                ok=1
                break
            fi
            sleep 0.1
        done
        [ -n "$ok" ] || { echo "bench: $name on port $port did not answer HTTP/2 200; log:" >&2; tail -20 "$WORK/$name.log" >&2; exit 1; }
    done
    log "h2: backend :$H2B, nginx :$H2N, haproxy :$H2H, edge-agent :$H2E (h2load -c$H2_CONNS -m$H2_STREAMS)"

    run_h2load() { # NAME PORT PID DURATION ROUND
        local name=$1 port=$2 pid=$3 d=$4 round=$5 pids before after bbefore bafter out load
        pids=$(tree_pids "$pid")
        load=$(load1)
        # shellcheck disable=SC2086
        before=$(cpu_ticks $pids)
        bbefore=$(cpu_ticks $(tree_pids "$H2B_PID"))
        out=$(taskset -c "$LOAD_CPU" timeout $((d + 30)) h2load -c"$H2_CONNS" -m"$H2_STREAMS" -D "$d" \
            -H ":authority: $H2_HOST" "http://127.0.0.1:$port/" 2>&1 || true)
        # shellcheck disable=SC2086
        after=$(cpu_ticks $pids)
        bafter=$(cpu_ticks $(tree_pids "$H2B_PID"))
        [ "$round" = warmup ] && return 0
        echo "$out" >"$OUT/h2load-$name-$round.txt"
        local rps ok bad non2xx mean
        rps=$(echo "$out" | awk '/^finished in/ {gsub(",", "", $4); print $4}')
        ok=$(echo "$out" | awk '/^requests:/ {print $8}')
        bad=$(echo "$out" | awk '/^requests:/ {print $10 + $12 + $14}')
        non2xx=$(echo "$out" | awk '/^status codes:/ {print $5 + $7 + $9}')
        mean=$(to_us "$(echo "$out" | awk '/^time for request:/ {print $6}')")
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "${rps:-0}" "${ok:-0}" \
            "$(( ${bad:-0} + ${non2xx:-0} ))" "${mean:-0}" "$((after - before))" "$((bafter - bbefore))" "$load" >>"$OUT/h2.tsv"
    }
    H2_TARGETS=(
        "direct|$H2B|$H2B_PID"
        "nginx|$H2N|$H2N_PID"
        "haproxy|$H2H|$H2H_PID"
        "agent1|$H2E|$H2E_PID"
    )
    : >"$OUT/h2.tsv"
    log "h2: warm-up (2 s each)"
    for t in "${H2_TARGETS[@]}"; do
        IFS='|' read -r name port pid <<<"$t"
        run_h2load "$name" "$port" "$pid" 2 warmup
    done
    for round in $(seq "$ROUNDS"); do
        for t in "${H2_TARGETS[@]}"; do
            IFS='|' read -r name port pid <<<"$t"
            log "h2 (h2load): round $round/$ROUNDS, $name"
            run_h2load "$name" "$port" "$pid" "$DUR" "$round"
        done
    done
    curl -s "http://127.0.0.1:$H2EA/upstreams" >"$OUT/h2-agent-upstreams.json" || true
    stop "$H2E_PID"
    stop "$H2H_PID"
    stop "$H2N_PID"
    stop "$H2B_PID"
fi

# --- gRPC unary (ghz): through edge-agent vs direct (#13) ------------------------------------
# Backend: grpc-echo (bench/grpc/main.go, grpc-go), edge.test.Echo/Unary, on CPU $LOAD_CPU with
# ghz (GOMAXPROCS 1: `--cpus 1`). The agent (1 worker, CPU $PROXY_CPU) speaks h2c to it
# (`protocol = "h2c"`); ghz dials the agent with `--authority grpcbench`.
GRPC_CONNS=${BENCH_GRPC_CONNS:-4}
GRPC_CONC=${BENCH_GRPC_CONCURRENCY:-100}
GRPC_HOST=grpcbench
if want grpc; then
    read -r GB GE GEA <<<"$(free_ports 3)"
    start grpcecho "$LOAD_CPU" "$GHZ_CACHE/bin/grpc-echo" "127.0.0.1:$GB"
    GB_PID=$STARTED_PID
    printf '[[service]]\nname = "%s"\ninstances = [ { addr = "127.0.0.1:%s" } ]\n' "$GRPC_HOST" "$GB" >"$R/grpcservices.toml"
    printf '[[upstream]]\nid = "%s"\nprotocol = "h2c"\n\n[[route]]\nhost = "%s"\nupstream = "%s"\n' \
        "$GRPC_HOST" "$GRPC_HOST" "$GRPC_HOST" >"$R/grpcagent.toml"
    # shellcheck disable=SC2046
    start grpcagent "$PROXY_CPU" env $(agent_env "$GE" "$GEA" "$R/state-grpc" "$R/grpcservices.toml") \
        EDGE_AGENT_CONFIG="$R/grpcagent.toml" TOKIO_WORKER_THREADS=1 "$AGENT"
    GE_PID=$STARTED_PID
    ghz_run() { # PORT DURATION-ARGS... -> ghz's JSON report on stdout
        local port=$1
        shift
        taskset -c "$LOAD_CPU" timeout 120 "$GHZ_CACHE/bin/ghz" --insecure --cpus 1 \
            --proto "$ROOT/integration-tests/servers/grpc/echo.proto" --call edge.test.Echo.Unary \
            -d '{"text":"hello"}' --authority "$GRPC_HOST" --format json "$@" "127.0.0.1:$port"
    }
    for t in "grpcecho|$GB" "grpcagent|$GE"; do
        IFS='|' read -r name port <<<"$t"
        ok=""
        for _ in $(seq 100); do
            if [ "$(ghz_run "$port" -n 100 -c 1 --connections 1 2>/dev/null | jq -r '.statusCodeDistribution.OK // 0')" = 100 ]; then
                ok=1
                break
            fi
            sleep 0.1
        done
        [ -n "$ok" ] || { echo "bench: $name on port $port did not answer 100 gRPC calls OK; log:" >&2; tail -20 "$WORK/$name.log" >&2; exit 1; }
    done
    log "grpc: grpc-echo :$GB, edge-agent :$GE (ghz -c$GRPC_CONC --connections $GRPC_CONNS)"
    run_ghz() { # NAME PORT PID DURATION ROUND
        local name=$1 port=$2 pid=$3 d=$4 round=$5 before after bbefore bafter out load
        load=$(load1)
        before=$(cpu_ticks "$pid")
        bbefore=$(cpu_ticks "$GB_PID")
        out=$(ghz_run "$port" -c "$GRPC_CONC" --connections "$GRPC_CONNS" -z "${d}s" 2>"$OUT/ghz-$name-$round.err" || true)
        after=$(cpu_ticks "$pid")
        bafter=$(cpu_ticks "$GB_PID")
        [ "$round" = warmup ] && return 0
        echo "$out" >"$OUT/ghz-$name-$round.json"
        local line
        # Not OK: calls that failed, less those ghz cut itself when the duration ended (it closes
        # its connections with up to -c calls in flight: "use of closed network connection").
        line=$(echo "$out" | jq -r '[.rps, (.statusCodeDistribution.OK // 0),
            (([.statusCodeDistribution // {} | to_entries[] | select(.key != "OK") | .value] | add // 0)
              - ([.errorDistribution // {} | to_entries[] | select(.key | test("use of closed network connection")) | .value] | add // 0)),
            ((.latencyDistribution // []) | map(select(.percentage == 50))[0].latency // 0) / 1000,
            ((.latencyDistribution // []) | map(select(.percentage == 99))[0].latency // 0) / 1000] | @tsv' 2>/dev/null || echo "0	0	0	0	0")
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "$line" "$((after - before))" "$((bafter - bbefore))" "$load" >>"$OUT/grpc.tsv"
    }
    # direct: both CPU columns are grpc-echo's (there is no proxy).
    GRPC_TARGETS=("direct|$GB|$GB_PID" "agent1|$GE|$GE_PID")
    : >"$OUT/grpc.tsv"
    log "grpc: warm-up (2 s each)"
    for t in "${GRPC_TARGETS[@]}"; do
        IFS='|' read -r name port pid <<<"$t"
        run_ghz "$name" "$port" "$pid" 2 warmup
    done
    for round in $(seq "$ROUNDS"); do
        for t in "${GRPC_TARGETS[@]}"; do
            IFS='|' read -r name port pid <<<"$t"
            log "grpc (ghz): round $round/$ROUNDS, $name"
            run_ghz "$name" "$port" "$pid" "$DUR" "$round"
        done
    done
    stop "$GE_PID"
    stop "$GB_PID"
fi

# --- scale: memory ----------------------------------------------------------------------------
if want scale; then
log "scale: RSS idle, with 1,000 services x 10 endpoints, with 1,000 and 10,000 idle client connections (edge-agent and nginx)"
python3 - "$R/big.toml" "$HOSTNAME_HDR" "$BP" <<'EOF'
import sys
path, host, bp = sys.argv[1:]
with open(path, "w") as f:
    f.write(f'[[service]]\nname = "{host}"\ninstances = [ {{ addr = "127.0.0.1:{bp}" }} ]\n')
    for s in range(1000):
        addrs = ", ".join(f'{{ addr = "127.0.{s // 250}.{s % 250 + 1}:{8000 + i}" }}' for i in range(10))
        f.write(f'[[service]]\nname = "svc-{s:04d}"\ninstances = [ {addrs} ]\n')
EOF
: >"$OUT/rss.tsv"
# shellcheck disable=SC2046
start scale1 "$PROXY_CPU" env $(agent_env "$SP" "$SA" "$R/state3" "$R/services.toml") "$AGENT"
S1=$STARTED_PID
wait_http "$SP" scale1
sleep 2
printf 'idle, 1 service\t%s\n' "$(rss_kb "$S1")" >>"$OUT/rss.tsv"
# RSS with N idle keep-alive client connections (each answered once), edge-agent and nginx:
# rss-conns.tsv (N, target, KiB). The nginx proxy is the one of the HTTP/1.1 section (its
# worker_connections covers 10,000); it is restarted here so each target starts idle.
hold_rss() { # NAME PORT PIDS N
    local name=$1 port=$2 pids=$3 n=$4
    : >"$WORK/hold.out"
    taskset -c "$LOAD_CPU" timeout 90 "$LOADGEN" hold "127.0.0.1:$port" "$HOSTNAME_HDR" "$n" 30 >"$WORK/hold.out" 2>&1 &
    HOLD=$!
    PIDS+=("$HOLD")
    for _ in $(seq 300); do grep -q '^held' "$WORK/hold.out" && break; sleep 0.1; done
    # Idle: every connection has waited past edge-agent's 1 s buffer release (h1/server.rs)
    # and well within both proxies' keep-alive timeouts (10 s and 75 s).
    sleep 3
    # shellcheck disable=SC2086
    printf '%s\t%s\t%s\t%s\n' "$n" "$name" "$(rss_kb $pids)" "$(head -1 "$WORK/hold.out")" >>"$OUT/rss-conns.tsv"
    kill "$HOLD" 2>/dev/null || true
    wait "$HOLD" 2>/dev/null || true
}
: >"$OUT/rss-conns.tsv"
printf '0\tagent1\t%s\theld 0\n' "$(rss_kb "$S1")" >>"$OUT/rss-conns.tsv"
hold_rss agent1 "$SP" "$S1" 1000
printf '1,000 client connections held (%s)\t%s\n' "$(head -1 "$WORK/hold.out")" "$(awk -F'\t' '$1 == 1000 && $2 == "agent1" {print $3}' "$OUT/rss-conns.tsv")" >>"$OUT/rss.tsv"
hold_rss agent1 "$SP" "$S1" 10000
if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then
    stop "$S1"
    start scalenginx "$PROXY_CPU" nginx -p "$R/nginx" -c "$R/nginx/nginx.conf" -g 'daemon off;'
    SN=$STARTED_PID
    wait_http "$NP" scalenginx
    sleep 1
    printf '0\tnginx\t%s\theld 0\n' "$(rss_kb $(tree_pids "$SN"))" >>"$OUT/rss-conns.tsv"
    hold_rss nginx "$NP" "$(tree_pids "$SN")" 1000
    hold_rss nginx "$NP" "$(tree_pids "$SN")" 10000
    stop "$SN"
fi
stop "$S1" 2>/dev/null
# shellcheck disable=SC2046
start scale2 "$PROXY_CPU" env $(agent_env "$SP" "$SA" "$R/state4" "$R/big.toml") "$AGENT"
S2=$STARTED_PID
wait_http "$SP" scale2
for _ in $(seq 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: svc-0999' "http://127.0.0.1:$SP/")" != 404 ] && break
    sleep 0.1
done
sleep 2
printf '1,000 services x 10 endpoints (+1)\t%s\n' "$(rss_kb "$S2")" >>"$OUT/rss.tsv"
stop "$S2"
fi
stop "$BACKEND_PID"

# --- micro-benchmarks -------------------------------------------------------------------------
if want micro; then
    log "criterion micro-benchmarks"
    rm -rf "$CARGO_TARGET_DIR/criterion"
    "$MICRO" --bench --noplot >"$OUT/criterion.txt" 2>&1 || {
        tail -30 "$OUT/criterion.txt" >&2
        exit 1
    }
fi

# --- instructions per request (optional) -----------------------------------------------------
if [ -n "${BENCH_CALLGRIND:-}" ]; then
    log "callgrind: user-space instructions per request, edge-agent vs nginx"
    bash "$ROOT/bench/callgrind.sh" "$AGENT" "$OUT/callgrind" >"$OUT/callgrind.md" 2>"$OUT/callgrind.log" || {
        tail -20 "$OUT/callgrind.log" >&2
        exit 1
    }
fi

# --- tables -----------------------------------------------------------------------------------
export BENCH_H2_CONNS=$H2_CONNS BENCH_H2_STREAMS=$H2_STREAMS BENCH_GRPC_CONNS=$GRPC_CONNS BENCH_GRPC_CONCURRENCY=$GRPC_CONC
CRIT_DIR=$WORK/no-criterion
want micro && CRIT_DIR=$CARGO_TARGET_DIR/criterion
python3 "$ROOT/bench/report.py" "$OUT" "$CRIT_DIR" "$LOAD_CPU" "$PROXY_CPU" "$DUR" "$ROUNDS" "$CONNS" "$CLK_TCK" \
    | tee "$OUT/report.md"
if [ -s "$OUT/plot.tsv" ]; then
    gnuplot -e "data='$OUT/plot.tsv'; out='$OUT/bench.png'" "$ROOT/bench/plot.gp" 2>"$OUT/plot.log" &&
        log "plot of throughput and added p99: $OUT/bench.png" || log "no plot: see $OUT/plot.log"
fi
if [ -s "$OUT/callgrind.md" ]; then
    printf '\n### Instructions per request (callgrind)\n\n' | tee -a "$OUT/report.md"
    tee -a "$OUT/report.md" <"$OUT/callgrind.md"
fi

# --- fleet simulation (bench/fleet.sh; BENCH_SKIP_FLEET=1 skips, BENCH_FLEET_AGENTS=N) -------
FLEET_RC=0
if want fleet; then
    log "fleet simulation (bench/fleet.sh)"
    EDGE_AGENT_BIN=$AGENT BENCH_OUT=$OUT bash "$ROOT/bench/fleet.sh" || FLEET_RC=$?
fi
log "done in $(($(date +%s) - T0)) s; raw results in $OUT"
exit "$FLEET_RC"
