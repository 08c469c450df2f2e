#!/usr/bin/env bash
# A Python 3.12 like the GPU machine's python3, for rehearsing bench/gpu.sh on a CPU machine:
# a venv that has what that python has (numpy, httpx, anyio, jinja2, prometheus-client,
# uvloop, aiohttp, matplotlib, pyyaml, tqdm, requests, pytest, hypothesis) and nothing of
# llamaherd's server stack, so the rehearsal installs the carried wheels as the GPU run does.
# Made once under ${LLAMAHERD_CACHE:-~/.cache/llamaherd}/gpu-rehearsal-py312; prints its
# python as the last line.
set -euo pipefail
CACHE=${LLAMAHERD_CACHE:-$HOME/.cache/llamaherd}
VENV=$CACHE/gpu-rehearsal-py312
HAS=(numpy httpx anyio jinja2 prometheus-client uvloop aiohttp matplotlib pyyaml tqdm requests
    pytest hypothesis)

log() { printf '[gpu-rehearsal-env] %s\n' "$*" >&2; }

if [ -x "$VENV/bin/python" ] && [ -f "$VENV/.complete" ]; then
    echo "$VENV/bin/python"
    exit 0
fi

base=${LLAMAHERD_REHEARSAL_BASE_PYTHON:-}
if [ -z "$base" ]; then
    for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            base=$candidate
            break
        fi
    done
fi
[ -n "$base" ] || { log "no Python 3.12 found (set LLAMAHERD_REHEARSAL_BASE_PYTHON)"; exit 1; }
log "making $VENV from $base with: ${HAS[*]}"
rm -rf "$VENV"
"$base" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >&2
"$VENV/bin/python" -m pip install -q "${HAS[@]}" >&2
touch "$VENV/.complete"
echo "$VENV/bin/python"
