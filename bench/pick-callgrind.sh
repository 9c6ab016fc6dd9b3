#!/usr/bin/env bash
# Instructions per pick for one subset_pick case of benches/micro.rs (#14, BENCHMARKS.md).
# usage: bench/pick-callgrind.sh <micro bench binary> <balancer/case, e.g. roundrobin/none>
# The binary: `cargo bench --bench micro --no-run` prints its path.
set -euo pipefail
bin=$1; case=$2; out=$(mktemp)
valgrind --tool=callgrind --callgrind-out-file=$out --toggle-collect='criterion::bencher::Bencher*::iter*' \
  $bin --bench --profile-time 1 "subset_pick/$case\$" >/dev/null 2>&1
callgrind_annotate --tree=calling --inclusive=yes $out 2>/dev/null | python3 -c '
import re,sys
lines=sys.stdin.read().splitlines()
tot=None;calls=None
for l in lines:
    m=re.match(r"\s*([\d,]+) \([^)]*\)\s+\*.*Bencher<M>::iter",l)
    if m and tot is None: tot=int(m.group(1).replace(",",""))
    m=re.search(r">.*Balancer>::next \(([\d,]+)x\)",l)
    if m and calls is None: calls=int(m.group(1).replace(",",""))
print(sys.argv[1], tot, calls, round(tot/calls,1) if tot and calls else None)' "$case"
rm -f $out
