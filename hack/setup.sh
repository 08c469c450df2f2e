#!/usr/bin/env bash
# Create .venv and install llamaherd with everything it needs to run and test.
# llama-cpp-python is compiled from its PyPI source once per machine (hack/llama-wheel.sh, with the
# CPU image's flags) and kept as a wheel in ${LLAMAHERD_CACHE:-~/.cache/llamaherd}/wheels/, where
# the server image's build finds it too; later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null

# Compiled once per machine and shared with the server image's build (hack/llama-wheel.sh).
WHEELS=$(PYTHON="$PYTHON" bash hack/llama-wheel.sh | tail -n 1)

log "installing llamaherd and its dependencies into .venv"
.venv/bin/python -m pip install -q --find-links "$WHEELS" -e ".[server,operator,dev]"
log "ready: $(.venv/bin/python -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)')"
