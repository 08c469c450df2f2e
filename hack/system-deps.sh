#!/usr/bin/env bash
# Install the Debian packages that the tests run for real (Prometheus with promtool).
set -euo pipefail
need=()
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -eq 0 ]; then
    echo "[system-deps] prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}') present"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "[system-deps] need root to apt-get install: ${need[*]}" >&2
    exit 1
fi
echo "[system-deps] apt-get install ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${need[@]}"
# Debian's package starts a system Prometheus on :9090; the tests run their own.
if command -v systemctl >/dev/null && systemctl is-active -q prometheus 2>/dev/null; then
    systemctl stop prometheus || true
fi
