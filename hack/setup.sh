#!/usr/bin/env bash
# Create .venv and install llamaherd with everything it needs to run and test.
# llama-cpp-python is compiled from its PyPI source once and kept as a wheel in
# ${LLAMAHERD_CACHE:-~/.cache/llamaherd}/wheels/<version>-<flags>/, so later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
CACHE=${LLAMAHERD_CACHE:-$HOME/.cache/llamaherd}
CMAKE_ARGS=${CMAKE_ARGS:-}
flags_key=$(printf '%s' "$CMAKE_ARGS" | sha256sum | cut -c1-12)
WHEELS="$CACHE/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$flags_key"
PYTHON=${PYTHON:-python3}

log() { printf '[setup] %s\n' "$*"; }

if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null

if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source (about 4 minutes on 2 cores; once per version)"
    mkdir -p "$WHEELS.tmp"
    CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        .venv/bin/python -m pip wheel --no-deps --no-binary llama-cpp-python \
        -w "$WHEELS.tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" 2>&1 \
        | while IFS= read -r line; do printf '[setup]   %s\n' "$line"; done
    rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
    log "wheel cached in $WHEELS"
else
    log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION: cached wheel in $WHEELS"
fi

log "installing llamaherd and its dependencies into .venv"
.venv/bin/python -m pip install -q --find-links "$WHEELS" -e ".[server,operator,dev]"
log "ready: $(.venv/bin/python -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)')"
