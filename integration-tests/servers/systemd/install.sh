#!/usr/bin/env bash
# systemd-analyze for integration-tests/tests/systemd.rs (`systemd-analyze verify` of
# config/edge-agent.service). Debian's `systemd` package; quick when already there.
set -euo pipefail
if command -v systemd-analyze >/dev/null; then
    echo "systemd-analyze: $(command -v systemd-analyze) ($(systemd-analyze --version | head -1))"
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends systemd >/dev/null
command -v systemd-analyze >/dev/null || { echo "systemd-analyze still missing after installing systemd" >&2; exit 1; }
echo "systemd-analyze installed: $(systemd-analyze --version | head -1)"
