#!/usr/bin/env bash
# Start the integration-test Eureka server in the FOREGROUND (exec: the
# caller's child PID is the JVM itself, so killing it stops the server).
#
# Env:
#   EUREKA_PORT        (required) TCP port on 127.0.0.1.
#   EUREKA_JAR         path to the fat jar; if unset, install.sh builds/finds it.
#   EUREKA_DELTA_RETENTION_MS  how long a change stays in /eureka/apps/delta
#                      (default 30000; Eureka's own default is 180000).
#   EUREKA_JAVA_OPTS   extra JVM options (word-split), e.g. "-Xmx256m"; placed
#                      after our -D flags, so a -Dkey=value here wins too.
#   JAVA               java binary (default: java on PATH).
#   EUREKA_PEER_URLS   if set, comma-separated service URLs of the other peers
#                      (http://127.0.0.1:<port>/eureka/): this server replicates
#                      to them and reads their registry at start
#                      (defaultZone = them, register-with-eureka and
#                      fetch-registry true); unset, a standalone server.
#   EUREKA_PARENT_PID  if set, a watchdog stops the server (SIGTERM) within
#                      about 1 s of that process exiting, so a test binary that
#                      keeps its server in a static (never dropped) leaks no JVM.
# Extra arguments are passed to Spring Boot as command-line args, e.g.
#   --logging.level.root=WARN  --eureka.server.eviction-interval-timer-in-ms=500
# Our settings below are JVM system properties (-D...), which Spring Boot ranks
# BELOW command-line args, so "$@" overrides them. (Do not put the same key
# twice as --args: Spring joins repeats into "a,b" and a number fails to bind.)
#
# Ready when: GET http://127.0.0.1:$EUREKA_PORT/eureka/apps answers 200.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

: "${EUREKA_PORT:?EUREKA_PORT must be set (port on 127.0.0.1)}"
if ! [[ "$EUREKA_PORT" =~ ^[0-9]+$ ]] || (( EUREKA_PORT < 1 || EUREKA_PORT > 65535 )); then
  echo "eureka start.sh: EUREKA_PORT='$EUREKA_PORT' is not a valid port" >&2
  exit 2
fi

jar="${EUREKA_JAR:-}"
if [[ -z "$jar" ]]; then
  jar="$("$here/install.sh")"
fi
if [[ ! -f "$jar" ]]; then
  echo "eureka start.sh: jar not found: $jar" >&2
  exit 1
fi

url="http://127.0.0.1:${EUREKA_PORT}/eureka/"
zone="$url"
peered=false
if [[ -n "${EUREKA_PEER_URLS:-}" ]]; then
  IFS=, read -r -a peers <<<"$EUREKA_PEER_URLS"
  for p in "${peers[@]}"; do
    if ! [[ "$p" =~ ^http://127\.0\.0\.1:[0-9]+/eureka/$ ]]; then
      echo "eureka start.sh: EUREKA_PEER_URLS: expected http://127.0.0.1:<port>/eureka/, got '$p'" >&2
      exit 2
    fi
  done
  zone="$EUREKA_PEER_URLS"
  peered=true
fi
retention_ms="${EUREKA_DELTA_RETENTION_MS:-30000}"

if [[ -n "${EUREKA_PARENT_PID:-}" ]]; then
  # $$ is this shell's PID, which the exec below hands to the JVM.
  server_pid=$$
  (
    while kill -0 "$EUREKA_PARENT_PID" 2>/dev/null && kill -0 "$server_pid" 2>/dev/null; do
      sleep 1
    done
    kill -TERM "$server_pid" 2>/dev/null || true
  ) </dev/null >/dev/null 2>&1 &
fi

# shellcheck disable=SC2086
exec "${JAVA:-java}" \
  -Xmx192m -Xss512k -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
  -Djava.net.preferIPv4Stack=true \
  -Dserver.address=127.0.0.1 \
  -Dserver.port="$EUREKA_PORT" \
  -Dspring.jmx.enabled=false \
  -Dspring.cloud.inetutils.timeout-seconds=1 \
  -Dspring.cloud.loadbalancer.enabled=false \
  -Deureka.instance.hostname=127.0.0.1 \
  -Deureka.instance.ip-address=127.0.0.1 \
  -Deureka.instance.prefer-ip-address=true \
  -Deureka.client.register-with-eureka="$peered" \
  -Deureka.client.fetch-registry="$peered" \
  -Deureka.client.service-url.defaultZone="$zone" \
  -Deureka.server.my-url="$url" \
  -Deureka.server.registry-sync-retries=0 \
  -Deureka.server.wait-time-in-ms-when-sync-empty=0 \
  -Deureka.server.enable-self-preservation=false \
  -Deureka.server.renewal-percent-threshold=0 \
  -Deureka.server.eviction-interval-timer-in-ms=1000 \
  -Deureka.server.use-read-only-response-cache=false \
  -Deureka.server.response-cache-update-interval-ms=1000 \
  -Deureka.server.response-cache-auto-expiration-in-seconds=1 \
  -Deureka.server.retention-time-in-m-s-in-delta-queue="$retention_ms" \
  -Deureka.server.delta-retention-timer-interval-in-ms=1000 \
  ${EUREKA_JAVA_OPTS:-} \
  -jar "$jar" \
  "$@"
