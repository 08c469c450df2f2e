#!/usr/bin/env bash
# Build llama-server and llama-batched-bench from the llama.cpp that the pinned llama-cpp-python
# sdist vendors, so the benchmark compares llamaherd with llama.cpp's own server built from the
# very same source. Binaries are cached outside the repository in
#   ${LLAMAHERD_CACHE:-~/.cache/llamaherd}/bin/llama.cpp-<llama-cpp-python version>-<flags>/
# and the script does nothing when they are already there (idempotent). The CMake flags are the
# ones llamaherd's own llama.cpp is compiled with (LLAMA_CPU_CMAKE_ARGS in hack/llama.env, or
# CMAKE_ARGS as for hack/llama-wheel.sh), so both sides of the comparison run the same code.
# Prints the directory that holds the binaries as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
[ -n "$VERSION" ] || { echo "[build] no llama-cpp-python pin in pyproject.toml" >&2; exit 1; }
CACHE=${LLAMAHERD_CACHE:-$HOME/.cache/llamaherd}
# shellcheck source=../hack/llama.env
. hack/llama.env
LLAMA_CMAKE_ARGS=${CMAKE_ARGS-$LLAMA_CPU_CMAKE_ARGS}
flags_key=$(printf '%s' "$LLAMA_CMAKE_ARGS" | sha256sum | cut -c1-12)
BIN="$CACHE/bin/llama.cpp-$VERSION-$flags_key"
SDIST_DIR="$CACHE/sdist"
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
SRC="$CACHE/src/llama-cpp-python-$VERSION"
BUILD="$SRC/build-bench-$flags_key"
TARGETS=(llama-server llama-batched-bench)
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

log() { printf '[build] %s\n' "$*" >&2; }

have_all() {
    local t
    for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || return 1; done
}

if have_all; then
    log "llama.cpp from llama-cpp-python $VERSION: cached binaries in $BIN"
    echo "$BIN"
    exit 0
fi

if [ ! -f "$SDIST" ]; then
    log "downloading the llama-cpp-python $VERSION sdist"
    mkdir -p "$SDIST_DIR"
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$SDIST_DIR" \
        "llama-cpp-python==$VERSION"
fi

if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    log "extracting $SDIST"
    rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
    tar -xzf "$SDIST" -C "$SRC.tmp" --strip-components=1
    rm -rf "$SRC" && mv "$SRC.tmp" "$SRC"
fi

log "configuring vendor/llama.cpp (Release, no curl, no tests, ${LLAMA_CMAKE_ARGS:-default flags})"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_SERVER=ON \
    -DBUILD_SHARED_LIBS=OFF \
    $LLAMA_CMAKE_ARGS >&2

log "building ${TARGETS[*]} (about 4 minutes on 2 cores)"
cmake --build "$BUILD" --config Release --target "${TARGETS[@]}" -j"$(nproc)" >&2

mkdir -p "$BIN.tmp"
for t in "${TARGETS[@]}"; do
    install -m 0755 "$BUILD/bin/$t" "$BIN.tmp/$t"
done
rm -rf "$BIN" && mv "$BIN.tmp" "$BIN"
log "binaries cached in $BIN"
echo "$BIN"
