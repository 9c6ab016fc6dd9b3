#!/usr/bin/env bash
# Runs every cargo-fuzz target for FUZZ_SECONDS (default 60) each and prints, per target, the
# executions and whether libFuzzer found a crash (with the artifact to reproduce it). `make fuzz`
# calls this; it is not part of CI.
#
#   FUZZ_SECONDS=300 make fuzz            # longer
#   FUZZ_TARGETS="config eureka_answer" make fuzz
#   FUZZ_SANITIZER=none make fuzz         # no ASan (faster; the Rust code is safe anyway)
#
# cargo-fuzz needs nightly-only rustc flags; on a stable toolchain RUSTC_BOOTSTRAP=1 enables
# them. cargo-fuzz is taken from PATH or ~/.cache/edge-agent/tools/bin (install it with
# `cargo install cargo-fuzz --root ~/.cache/edge-agent/tools`).
# Corpora grow in $FUZZ_CORPUS (outside the tree), seeded from fuzz/seeds/<target>; crashes
# land in fuzz/artifacts/<target>/ (ignored by git).
set -uo pipefail
cd "$(dirname "$0")/.."

SECONDS_EACH=${FUZZ_SECONDS:-60}
SANITIZER=${FUZZ_SANITIZER:-address}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/edge-agent
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target-fuzz}
export RUSTC_BOOTSTRAP=1
CORPUS=${FUZZ_CORPUS:-$CACHE/fuzz-corpus}
PATH=$PATH:$CACHE/tools/bin
if ! command -v cargo-fuzz >/dev/null; then
    echo "cargo-fuzz not found: cargo install cargo-fuzz --root $CACHE/tools" >&2
    exit 2
fi
TARGETS=${FUZZ_TARGETS:-$(cargo fuzz list)}

for t in $TARGETS; do cargo fuzz build --sanitizer "$SANITIZER" "$t" || exit 1; done

summary=()
failed=0
for t in $TARGETS; do
    mkdir -p "$CORPUS/$t" "fuzz/artifacts/$t"
    log=$CORPUS/$t.log
    echo "== $t: ${SECONDS_EACH}s"
    cargo fuzz run --sanitizer "$SANITIZER" "$t" "$CORPUS/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$SECONDS_EACH" -print_final_stats=1 >"$log" 2>&1
    rc=$?
    runs=$(grep -oE '^Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' | tail -1)
    [ -z "$runs" ] && runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+')
    if [ $rc -eq 0 ]; then
        result="no crash"
    else
        failed=1
        art=$(grep -oE "Test unit written to [^ ]+" "$log" | tail -1 | sed 's/Test unit written to //')
        result="CRASH (exit $rc) ${art:-see $log}"
        grep -m1 -E "panicked at|ERROR: (libFuzzer|AddressSanitizer)" "$log" | sed 's/^/    /'
    fi
    summary+=("$(printf '%-16s %12s execs  cov %-6s %s' "$t" "${runs:-?}" "${cov:-?}" "$result")")
done

echo
echo "target           executions         coverage  result   (logs: $CORPUS/<target>.log)"
printf '%s\n' "${summary[@]}"
exit $failed
