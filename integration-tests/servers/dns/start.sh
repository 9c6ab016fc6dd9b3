#!/usr/bin/env bash
# Start dnsmasq in the FOREGROUND (exec), answering DNS on 127.0.0.1 only, from a config file
# the caller writes. The caller's child PID becomes dnsmasq's PID: SIGHUP it to re-read the
# hosts files (`addn-hosts=`), kill it to stop. SIGHUP does NOT re-read the config file itself
# (srv-host= lines live there): restart for those (dnsmasq(8), NOTES).
#
# Environment:
#   DNSMASQ_PORT   required: UDP and TCP port on 127.0.0.1
#   DNSMASQ_CONF   required: the config file (srv-host=, addn-hosts=, local=, server= lines)
#   DNSMASQ_BIN    optional: dnsmasq binary (default: output of ./install.sh)
# Extra command-line arguments are appended.
#
# No /etc/resolv.conf, no /etc/hosts, no upstream server unless the config names one, no
# privilege drop (it runs as the caller, so it can re-read the caller's files), no pid file.
# Logs every query to stderr. Ready when stderr shows "started, version".
set -euo pipefail

die() { printf '[dns-start] ERROR: %s\n' "$*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"

port="${DNSMASQ_PORT:-}"
[[ "$port" =~ ^[0-9]+$ ]] && (( port >= 1 && port <= 65535 )) \
    || die "DNSMASQ_PORT is required and must be a port: ${port:-<unset>}"
conf="${DNSMASQ_CONF:-}"
[[ -n "$conf" && -r "$conf" ]] || die "DNSMASQ_CONF must name a readable file: ${conf:-<unset>}"

if [[ -z "${DNSMASQ_BIN:-}" ]]; then
    DNSMASQ_BIN="$("${here}/install.sh")" || die "install.sh failed; cannot find dnsmasq"
fi
[[ -x "$DNSMASQ_BIN" ]] || die "DNSMASQ_BIN is not an executable file: $DNSMASQ_BIN"

printf '[dns-start] %s port=127.0.0.1:%s conf=%s\n' "$DNSMASQ_BIN" "$port" "$conf" >&2

exec "$DNSMASQ_BIN" \
    --keep-in-foreground \
    --conf-file="$conf" \
    --port="$port" \
    --listen-address=127.0.0.1 \
    --bind-interfaces \
    --no-resolv \
    --no-hosts \
    --pid-file= \
    --user="$(id -un)" \
    --log-facility=- \
    --log-queries \
    "$@"
