#!/usr/bin/env bash
# The llama-cpp-python wheel, compiled once per machine, version and flags, for both the host's
# .venv (hack/setup.sh) and the CPU server image (hack/images.sh, which hands it to
# Dockerfile.server instead of compiling llama.cpp a second time).
#
#   hack/llama-wheel.sh     -> builds the wheel if it is not cached; last line: the wheel's folder
#
# The flags are the CPU image's by default (-DGGML_NATIVE=OFF: AVX2/FMA/F16C code that runs on any
# x86-64 node with AVX2, not -march=native), so the tests run the code the image ships. Set
# CMAKE_ARGS to build another flavour for the host (it gets its own cache folder; the image then
# compiles its own). The wheel is py3-none-linux_x86_64 (llama-cpp-python loads its libraries
# with ctypes), built against this host's glibc: the image's base is the same Debian release.
# --no-cache-dir: pip's own wheel cache is keyed by the source, not by CMAKE_ARGS, and would hand
# back a wheel compiled with other flags.
set -euo pipefail
cd "$(dirname "$0")/.."

# LLAMA_CPU_CMAKE_ARGS: equal to Dockerfile.server's builder-cpu flags (a test checks).
# shellcheck source=llama.env
. hack/llama.env

VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
CACHE=${LLAMAHERD_CACHE:-$HOME/.cache/llamaherd}
CMAKE_ARGS=${CMAKE_ARGS-$LLAMA_CPU_CMAKE_ARGS}
flags_key=$(printf '%s' "$CMAKE_ARGS" | sha256sum | cut -c1-12)
WHEELS="$CACHE/wheels/llama-cpp-python-$VERSION-$flags_key"
PYTHON=${PYTHON:-python3}

log() { printf '[llama-wheel] %s\n' "$*" >&2; }

have_wheel() { ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; }

mkdir -p "$CACHE/wheels"
# One build at a time (setup and the image build may ask together); the second one waits and
# finds the wheel.
exec 9>"$WHEELS.lock"
flock 9
if have_wheel; then
    log "llama-cpp-python $VERSION (${CMAKE_ARGS:-default flags}): cached in $WHEELS"
else
    # A venv of its own, so the build works before .venv exists (the image build alone).
    builder="$CACHE/wheels/.build-venv"
    [ -x "$builder/bin/python" ] || "$PYTHON" -m venv "$builder"
    "$builder/bin/python" -m pip install -q --upgrade pip wheel >/dev/null
    log "building llama-cpp-python $VERSION from source with '${CMAKE_ARGS}' (about 4 minutes on 2 cores, 8 with the machine shared; once per version and flags)"
    start=$SECONDS
    rm -rf "$WHEELS.tmp" && mkdir -p "$WHEELS.tmp"
    CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$builder/bin/python" -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
        -w "$WHEELS.tmp" "llama-cpp-python==$VERSION" 2>&1 \
        | while IFS= read -r line; do printf '[llama-wheel]   %s\n' "$line" >&2; done
    rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
    have_wheel || { log "no wheel in $WHEELS after the build"; exit 1; }
    log "compiled in $((SECONDS - start)) s; cached in $WHEELS"
fi
echo "$WHEELS"
