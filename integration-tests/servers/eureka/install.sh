#!/usr/bin/env bash
# Build the integration-test Eureka server jar once per machine and print its
# absolute path (the ONLY line written to stdout).
#
#   ${EDGE_AGENT_CACHE_DIR:-$HOME/.cache/edge-agent}/eureka/<hash>/eureka-server.jar
#
# <hash> covers pom.xml and everything under src/, so editing either triggers a
# rebuild. If the jar for the current hash already exists, exit immediately.
# Maven output goes to <cache>/eureka/<hash>.build.log; its tail is printed to
# stderr on failure. `install.sh --check` only reports (exit 1 when not built). Env: MVN (default "mvn"), EUREKA_MVN_ARGS (extra args).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${EDGE_AGENT_CACHE_DIR:-$HOME/.cache/edge-agent}/eureka"

src_hash="$(
  cd "$here"
  find pom.xml src -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
)"
out_dir="$cache_root/$src_hash"
jar="$out_dir/eureka-server.jar"

if [[ -s "$jar" ]]; then
  printf '%s\n' "$jar"
  exit 0
fi
# `install.sh --check`: exit 1 when not built, without building.
[[ "${1:-}" != --check ]] || { echo "eureka install.sh: not built: $jar" >&2; exit 1; }

mkdir -p "$cache_root"
cache_root="$(cd "$cache_root" && pwd)"   # make absolute
out_dir="$cache_root/$src_hash"
jar="$out_dir/eureka-server.jar"

# Serialise concurrent installs (parallel test processes) on one lock file.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$cache_root/.install.lock"
  flock 9
  if [[ -s "$jar" ]]; then          # somebody else built it while we waited
    printf '%s\n' "$jar"
    exit 0
  fi
fi

command -v "${MVN:-mvn}" >/dev/null 2>&1 || {
  echo "eureka install.sh: '${MVN:-mvn}' not found (needs Maven 3.8+ and Java 17)" >&2
  exit 1
}

build_dir="$(mktemp -d "$cache_root/.build.XXXXXX")"
cleanup() { rm -rf "$build_dir"; }
trap cleanup EXIT

cp "$here/pom.xml" "$build_dir/"
cp -R "$here/src" "$build_dir/"

log="$cache_root/$src_hash.build.log"
echo "eureka install.sh: building Eureka server jar (first run on this machine; ~1-3 min), log: $log" >&2
start_s=$SECONDS
# shellcheck disable=SC2086
if ! ( cd "$build_dir" && nice -n 19 "${MVN:-mvn}" -B -ntp -Dstyle.color=never -DskipTests ${EUREKA_MVN_ARGS:-} package ) >"$log" 2>&1; then
  echo "eureka install.sh: ERROR: Maven build failed; last 60 lines of $log:" >&2
  tail -n 60 "$log" >&2 || true
  exit 1
fi

built="$build_dir/target/eureka-server.jar"
if [[ ! -s "$built" ]]; then
  echo "eureka install.sh: ERROR: Maven succeeded but $built is missing; see $log" >&2
  exit 1
fi

mkdir -p "$out_dir"
tmp_jar="$(mktemp "$out_dir/.eureka-server.jar.XXXXXX")"
cp "$built" "$tmp_jar"
chmod 0644 "$tmp_jar"
mv -f "$tmp_jar" "$jar"              # atomic rename: never a half-written jar
echo "eureka install.sh: built in $((SECONDS - start_s)) s" >&2
printf '%s\n' "$jar"
