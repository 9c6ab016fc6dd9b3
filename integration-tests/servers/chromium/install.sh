#!/usr/bin/env bash
# Headless Chromium for integration-tests/tests/chromium.rs (the admin status page, rendered and
# screenshotted). Debian's `chromium` package; the downloaded .debs are kept in
# ~/.cache/edge-agent/chromium/debs so a reinstall does not download again. Quick when installed.
set -euo pipefail
CACHE=${EDGE_AGENT_CACHE_DIR:-$HOME/.cache/edge-agent}/chromium
if command -v chromium >/dev/null; then
    echo "chromium: $(command -v chromium) ($(chromium --version 2>/dev/null | head -1))"
    exit 0
fi
mkdir -p "$CACHE/debs/partial"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
start=$(date +%s)
$SUDO apt-get update -qq
# fonts-dejavu-core: readable text in the screenshot; no recommends (no desktop extras).
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    -o Dir::Cache::archives="$CACHE/debs" chromium fonts-dejavu-core >/dev/null
command -v chromium >/dev/null || { echo "chromium missing after apt-get install" >&2; exit 1; }
echo "chromium installed in $(( $(date +%s) - start ))s: $(chromium --version 2>/dev/null | head -1)"
