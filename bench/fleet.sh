#!/usr/bin/env bash
# Fleet simulation (issue #8, section 4), the last part of `make bench` (bench/run.sh calls it;
# it also runs alone: `bash bench/fleet.sh`). For each registry, N agent processes watch one real
# server; prints markdown tables (idle registry load, propagation to all N, extrapolation).
# The driver is bench/fleet.py (Python standard library: nothing to compile).
#
# Knobs (environment):
#   BENCH_FLEET_AGENTS      N agents per registry (50)
#   BENCH_FLEET_REGISTRIES  which, in order (consul,eureka,nacos)
#   BENCH_FLEET_IDLE        idle window, s (20)
#   BENCH_FLEET_CHANGES     registrations + deregistrations timed (5 each)
#   BENCH_FLEET_INSTALL=1   build every missing registry server (Consul, rnacos: ~15 min each cold)
#   EDGE_AGENT_BIN          the agent binary (bench/run.sh passes its release build; alone: the
#                           release binary in $CARGO_TARGET_DIR, built when missing)
#   BENCH_OUT               results folder (fleet.jsonl, fleet.md, fleet-<registry>.log)
#
# Servers: a registry is measured when its server is installed (`install.sh --check`). Eureka is
# built when missing (Maven, ~1.5 min cold); Consul and rnacos take ~15 min each to build cold, so
# they are built only with BENCH_FLEET_INSTALL=1; otherwise a line says it was not measured.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
T0=$(date +%s)
N=${BENCH_FLEET_AGENTS:-50}
REGS=${BENCH_FLEET_REGISTRIES:-consul,eureka,nacos}
IDLE=${BENCH_FLEET_IDLE:-20}
CHANGES=${BENCH_FLEET_CHANGES:-5}
OUT=${BENCH_OUT:-$(mktemp -d /tmp/edge-agent-fleet.XXXXXX)}
mkdir -p "$OUT"
log() { printf '[fleet %4ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }

AGENT=${EDGE_AGENT_BIN:-}
if [ -z "$AGENT" ]; then
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/edge-agent/target-bench}
    AGENT=$CARGO_TARGET_DIR/release/edge-agent
    if [ ! -x "$AGENT" ]; then
        log "building the release agent into $CARGO_TARGET_DIR (fat LTO, several minutes)"
        cargo build --release --bin edge-agent >&2 || exit 1
    fi
fi
[ -x "$AGENT" ] || { echo "fleet: agent binary $AGENT missing" >&2; exit 1; }
# Every agent needs a few file descriptors; N up to a few hundred fits the usual limits.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

declare -A HOWTO=(
    [consul]="\`bash integration-tests/servers/consul/install.sh\` (Go; ~15 min cold)"
    [eureka]="\`bash integration-tests/servers/eureka/install.sh\` (Java 17 + Maven; ~1.5 min cold)"
    [nacos]="\`bash integration-tests/servers/nacos/install.sh\` (cargo install rnacos; ~15 min cold)"
)
JSONL=$OUT/fleet.jsonl
: >"$JSONL"
NOTES=()
FAILED=0
IFS=',' read -r -a REG_LIST <<<"$REGS"
for reg in "${REG_LIST[@]}"; do
    script=integration-tests/servers/$reg/install.sh
    [ -f "$script" ] || { echo "fleet: unknown registry $reg" >&2; FAILED=1; continue; }
    if ! bash "$script" --check >/dev/null 2>&1; then
        if [ -n "${BENCH_FLEET_INSTALL:-}" ] || [ "$reg" = eureka ]; then
            log "$reg: server not installed; installing (${HOWTO[$reg]})"
            if ! bash "$script" >/dev/null 2>"$OUT/fleet-$reg-install.log"; then
                tail -5 "$OUT/fleet-$reg-install.log" >&2
                NOTES+=("- **$reg: not measured**: its server failed to install (log: \`$OUT/fleet-$reg-install.log\`); install it with ${HOWTO[$reg]}.")
                FAILED=1
                continue
            fi
        else
            log "$reg: server not installed: NOT MEASURED (BENCH_FLEET_INSTALL=1 make bench installs it)"
            NOTES+=("- **$reg: not measured**: its server is not installed here. \`BENCH_FLEET_INSTALL=1 make bench\` installs every registry, or ${HOWTO[$reg]}.")
            continue
        fi
    fi
    log "$reg: $N agents"
    t=$(date +%s)
    if timeout --signal=TERM 900 python3 bench/fleet.py run --registry "$reg" --agents "$N" --agent-bin "$AGENT" \
        --idle-secs "$IDLE" --changes "$CHANGES" --out "$JSONL" >/dev/null 2> >(tee "$OUT/fleet-$reg.log" >&2); then
        log "$reg: measured in $(($(date +%s) - t)) s"
    else
        NOTES+=("- **$reg: failed** (see \`$OUT/fleet-$reg.log\`).")
        FAILED=1
    fi
done

{
    echo
    echo "### Fleet simulation ($N agents per registry; \`bench/fleet.sh\`)"
    echo
    python3 bench/fleet.py report "$JSONL"
    if [ ${#NOTES[@]} -gt 0 ]; then
        echo
        printf '%s\n' "${NOTES[@]}"
    fi
} | tee "$OUT/fleet.md"
log "fleet simulation done in $(($(date +%s) - T0)) s; raw results in $OUT"
exit "$FAILED"
