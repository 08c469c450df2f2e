#!/usr/bin/env bash
# Fill .gpu-carry/ (git-ignored) with what bench/gpu.sh needs on a GPU machine that has no
# network: it is sent there as an ignored path beside the working tree (64 MiB in all).
#
#   .gpu-carry/wheels/            cp312 manylinux x86_64 / py3-none-any wheels of the Python
#                                 packages the GPU machine's python3 lacks (one version each,
#                                 the versions of this checkout's .venv)
#   .gpu-carry/llama.cpp-src.tar.gz
#                                 the llama.cpp that llama-cpp-python <pin> vendors, pruned to
#                                 what a CUDA + CPU build of libllama/libggml, llama-server and
#                                 llama-batched-bench needs
#   .gpu-carry/llama_cpp/         llama-cpp-python's pure-Python package (it loads libllama.so
#                                 from $LLAMA_CPP_LIB_PATH)
#   .gpu-carry/prebuilt/          optional: the CUDA libraries of the llamaherd-server:cuda image
#                                 and llama-server + llama-batched-bench built here against them
#                                 (host C++ only), when that image exists and the whole fits
#   .gpu-carry/MANIFEST.txt       what is there, with sizes
#
#   bash bench/gpu_prepare.sh [--no-prebuilt] [--max-mib N]
#
# Idempotent: each part is remade only when missing or stale. Prints the size breakdown last.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CARRY=$ROOT/.gpu-carry
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
CACHE=${LLAMAHERD_CACHE:-$HOME/.cache/llamaherd}
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
SDIST=$CACHE/sdist/llama_cpp_python-$VERSION.tar.gz
SRC=$CACHE/src/llama-cpp-python-$VERSION
IMAGE=${LLAMAHERD_CUDA_IMAGE:-llamaherd-server:cuda}
IMAGE_LIB=/opt/llamaherd/lib/python3.11/site-packages/llama_cpp/lib
MAX_MIB=60 # the carry and the working tree share 64 MiB
PREBUILT=1
while [ $# -gt 0 ]; do
    case $1 in
        --no-prebuilt) PREBUILT=0 ;;
        --max-mib) MAX_MIB=$2; shift ;;
        *) echo "usage: $0 [--no-prebuilt] [--max-mib N]" >&2; exit 2 ;;
    esac
    shift
done

log() { printf '[gpu-prepare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
mib() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }

# The packages the GPU machine's python3 lacks: llamaherd's `server` extra and its dependency
# closure, less what that python has (numpy, httpx+anyio+h11, jinja2, prometheus-client,
# pyyaml, tqdm, requests, pytest, hypothesis, uvloop, aiohttp, matplotlib), plus pytest-timeout
# (pyproject's pytest `timeout`). llama-cpp-python itself comes as its pure-Python package.
WHEELS=(
    fastapi starlette annotated-doc opentelemetry-api
    uvicorn click
    sse-starlette
    pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection
    typing-extensions
    gguf diskcache nvidia-ml-py
    pytest-timeout
)

prepare_wheels() {
    local dir=$CARRY/wheels specs=() name version
    for name in "${WHEELS[@]}"; do
        version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
        specs+=("$name==$version")
    done
    local stamp="${specs[*]}"
    if [ -f "$dir/.specs" ] && [ "$(cat "$dir/.specs")" = "$stamp" ]; then
        log "wheels: cached ($(ls "$dir"/*.whl | wc -l) files)"
        return
    fi
    log "wheels: downloading ${#specs[@]} cp312 manylinux x86_64 / pure-Python wheels"
    rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
    PIP_FIND_LINKS='' "$PYTHON" -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any \
        -d "$dir.tmp" "${specs[@]}"
    local n
    n=$(ls "$dir.tmp"/*.whl | wc -l)
    [ "$n" -eq "${#specs[@]}" ] || { log "wheels: expected ${#specs[@]}, got $n"; exit 1; }
    echo "$stamp" >"$dir.tmp/.specs"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
}

ensure_sdist_source() {
    if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
        if [ ! -f "$SDIST" ]; then
            log "downloading the llama-cpp-python $VERSION sdist"
            mkdir -p "$(dirname "$SDIST")"
            "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$(dirname "$SDIST")" \
                "llama-cpp-python==$VERSION"
        fi
        log "extracting $SDIST"
        rm -rf "$SRC.tmp" && mkdir -p "$SRC.tmp"
        tar -xzf "$SDIST" -C "$SRC.tmp" --strip-components=1
        rm -rf "$SRC" && mv "$SRC.tmp" "$SRC"
    fi
}

# A copy of vendor/llama.cpp with only what the CUDA + CPU build of libllama, libggml,
# llama-server and llama-batched-bench reads: no other ggml backends, docs, models, tests,
# examples, conversion scripts or web UI sources (the server is built without its web UI:
# LLAMA_BUILD_UI=OFF, LLAMA_USE_PREBUILT_UI=OFF). tools/CMakeLists.txt is replaced by one that
# adds only batched-bench, the server (with the empty ui library it links) and mtmd (which the
# server links).
prune_llama_cpp() {
    local from=$SRC/vendor/llama.cpp to=$1
    mkdir -p "$to"
    cp -a "$from"/{CMakeLists.txt,LICENSE,cmake,common,include,src,vendor,licenses} "$to"/
    mkdir -p "$to/ggml/src" "$to/tools" "$to/scripts"
    cp -a "$from"/ggml/{CMakeLists.txt,cmake,include} "$to/ggml/"
    find "$from/ggml/src" -maxdepth 1 -type f -exec cp -a {} "$to/ggml/src/" \;
    cp -a "$from"/ggml/src/{ggml-cpu,ggml-cuda} "$to/ggml/src/"
    cp -a "$from"/tools/{batched-bench,server,mtmd} "$to/tools/"
    rm -rf "$to"/tools/server/{tests,bench} "$to"/tools/mtmd/{tests,legacy-models} \
        "$to"/tools/mtmd/test-*
    mkdir -p "$to/tools/ui"
    cp -a "$from"/tools/ui/{CMakeLists.txt,ui.cpp.in,ui.h.in,sources.cmake} "$to/tools/ui/"
    cp -a "$from/scripts/ui-assets.cmake" "$to/scripts/"
    cat >"$to/tools/CMakeLists.txt" <<'EOF'
# Pruned by llamaherd's bench/gpu_prepare.sh: only the tools bench/gpu.sh builds.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(batched-bench)
if (LLAMA_BUILD_SERVER)
    add_subdirectory(ui)
    add_subdirectory(server)
endif()
add_subdirectory(mtmd)
EOF
    echo "llama.cpp vendored by llama-cpp-python $VERSION, pruned by bench/gpu_prepare.sh" \
        >"$to/PRUNED.txt"
}

prepare_source() {
    local out=$CARRY/llama.cpp-src.tar.gz stamp=$CARRY/.llama.cpp-src.stamp key
    key="$VERSION $(sha256sum "$0" | cut -c1-16)"
    if [ -f "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$key" ]; then
        log "llama.cpp source: cached ($(mib "$out") MiB)"
        return
    fi
    ensure_sdist_source
    local tmp
    tmp=$(mktemp -d)
    prune_llama_cpp "$tmp/llama.cpp"
    log "llama.cpp source: pruned to $(mib "$tmp/llama.cpp") MiB (from $(mib "$SRC/vendor/llama.cpp") MiB)"
    # Byte-for-byte the same archive for the same files (a rebuild from it is then incremental).
    tar -C "$tmp" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -c llama.cpp \
        | gzip -n -6 >"$out.tmp"
    mv "$out.tmp" "$out"
    echo "$key" >"$stamp"
    rm -rf "$tmp"
}

prepare_llama_cpp_python() {
    ensure_sdist_source
    rm -rf "$CARRY/llama_cpp"
    mkdir -p "$CARRY/llama_cpp"
    cp "$SRC"/llama_cpp/*.py "$SRC/llama_cpp/py.typed" "$CARRY/llama_cpp/"
    echo "$VERSION" >"$CARRY/llama_cpp/VERSION"
}

# Optional: the CUDA libraries of the CUDA image (CUDA 13, sm_80/89/90, its cudart beside them),
# and llama-server and llama-batched-bench built here as shared-library executables from the
# same source (no CUDA needed to build them): on the GPU machine, LD_LIBRARY_PATH pointing at
# the carried libraries makes them run on CUDA. Carried only when the whole fits the budget.
needed_sonames() { readelf -d "$@" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort -u; }

prepare_prebuilt() {
    local dir=$CARRY/prebuilt
    if [ "$PREBUILT" = 0 ]; then
        PREBUILT_NOTE="skipped (--no-prebuilt)"
        log "prebuilt CUDA libraries: $PREBUILT_NOTE"
        rm -rf "$dir"
        return
    fi
    local image_id
    if ! image_id=$(docker image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null); then
        PREBUILT_NOTE="no $IMAGE image here"
        log "prebuilt CUDA libraries: $PREBUILT_NOTE; gpu.sh will build from source"
        rm -rf "$dir"
        return
    fi
    if [ -f "$dir/IMAGE" ] && [ "$(cat "$dir/IMAGE")" = "$image_id" ]; then
        log "prebuilt CUDA libraries: cached ($(mib "$dir") MiB)"
        return
    fi
    rm -rf "$dir"
    local tmp container py lib=""
    tmp=$(mktemp -d)
    container=$(docker create "$IMAGE" true)
    for py in python3.11 python3.12 python3.13; do
        if docker cp "$container:/opt/llamaherd/lib/$py/site-packages/llama_cpp/lib/." \
            "$tmp/image-lib" >/dev/null 2>&1; then
            lib=/opt/llamaherd/lib/$py/site-packages
            docker cp "$container:$lib/nvidia/cu13/lib/libcudart.so.13" "$tmp/image-lib/" \
                >/dev/null 2>&1 || true
            break
        fi
    done
    docker rm -f "$container" >/dev/null
    if [ -z "$lib" ] || [ ! -e "$tmp/image-lib/libggml-cuda.so" ]; then
        PREBUILT_NOTE="$IMAGE has no llama_cpp/lib/libggml-cuda.so"
        log "prebuilt CUDA libraries: $PREBUILT_NOTE; not carried"
        rm -rf "$tmp"
        return
    fi
    # One regular file per name that is looked up (a wheel holds copies, not symlinks, of
    # every name): the libraries llama-cpp-python's ctypes loads by name, cudart, and every
    # soname some library needs.
    mkdir -p "$tmp/out/lib" "$tmp/out/bin"
    local f base needed
    needed=$(needed_sonames "$tmp"/image-lib/*.so*)
    for f in "$tmp"/image-lib/*.so*; do
        base=$(basename "$f")
        if [[ $base =~ ^lib(llama|ggml|mtmd)\.so$|^libcudart\.so\.13$ ]] || grep -qx "$base" <<<"$needed"; then
            cp -L "$f" "$tmp/out/lib/$base"
        fi
    done
    log "prebuilt: $IMAGE's libraries, $(mib "$tmp/out/lib") MiB: $(cd "$tmp/out/lib" && ls | tr '\n' ' ')"

    # The executables: a shared-library build of the same source without CUDA (their libggml
    # is the carried one at run time). Source and build stay in the cache: a rerun is quick.
    local src=$CACHE/gpu-prebuilt-src build=$CACHE/gpu-prebuilt-build key
    key=$(sha256sum "$CARRY/llama.cpp-src.tar.gz" | cut -c1-16)
    if [ "$(cat "$src/.key" 2>/dev/null)" != "$key" ]; then
        rm -rf "$src" "$build" && mkdir -p "$src"
        tar -C "$src" -xzf "$CARRY/llama.cpp-src.tar.gz"
        echo "$key" >"$src/.key"
    fi
    log "prebuilt: building llama-server and llama-batched-bench (shared libraries, host only)"
    cmake -S "$src/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_CCACHE=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_OPENSSL=OFF -DCMAKE_SKIP_RPATH=ON >"$tmp/cmake.log" 2>&1 ||
        { tail -n 30 "$tmp/cmake.log" >&2; exit 1; }
    nice -n 19 cmake --build "$build" --target llama-server llama-batched-bench -j"$(nproc)" \
        >"$tmp/build.log" 2>&1 || { tail -n 30 "$tmp/build.log" >&2; exit 1; }
    install -m 0755 "$build/bin/llama-server" "$build/bin/llama-batched-bench" "$tmp/out/bin/"
    strip --strip-unneeded "$tmp"/out/bin/* 2>/dev/null || true
    # Their libraries that the image lacks (llama-common, the server's), transitively, under
    # their sonames; libllama and libggml* come from the image.
    local todo name next
    todo=$(needed_sonames "$tmp"/out/bin/*)
    while [ -n "$todo" ]; do
        next=""
        for name in $todo; do
            [ -e "$tmp/out/lib/$name" ] || [ ! -e "$build/bin/$name" ] && continue
            cp -L "$build/bin/$name" "$tmp/out/lib/$name"
            strip --strip-unneeded "$tmp/out/lib/$name" 2>/dev/null || true
            next+=" $(needed_sonames "$tmp/out/lib/$name" | tr '\n' ' ')"
        done
        todo=$next
    done
    echo "$image_id" >"$tmp/out/IMAGE"
    local size others
    size=$(mib "$tmp/out")
    others=$(awk -v a="$(mib "$CARRY")" -v b="$(tree_mib)" 'BEGIN {printf "%.1f", a + b}')
    if awk -v s="$size" -v o="$others" -v m="$MAX_MIB" 'BEGIN {exit !(s + o > m)}'; then
        PREBUILT_NOTE="$IMAGE: $size MiB would take the carry past $MAX_MIB MiB ($others MiB without it)"
        log "prebuilt: $PREBUILT_NOTE; not carried"
    else
        mv "$tmp/out" "$dir"
        log "prebuilt: carried, $size MiB"
    fi
    rm -rf "$tmp"
}

# The working tree that a device run sends: tracked files and untracked ones git does not ignore.
tree_mib() {
    git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null \
        | awk '$2 == "total" {s += $1} END {printf "%.1f", s / 1048576}'
}

mkdir -p "$CARRY"
prepare_wheels
prepare_source
prepare_llama_cpp_python
prepare_prebuilt

tree_mib=$(tree_mib)
{
    echo "# .gpu-carry, made $(date -u +%FT%TZ) by bench/gpu_prepare.sh (llama-cpp-python $VERSION)"
    printf '%-34s %8s MiB\n' "wheels/ ($(ls "$CARRY"/wheels/*.whl | wc -l) wheels)" "$(mib "$CARRY/wheels")"
    printf '%-34s %8s MiB\n' "llama.cpp-src.tar.gz" "$(mib "$CARRY/llama.cpp-src.tar.gz")"
    printf '%-34s %8s MiB\n' "llama_cpp/" "$(mib "$CARRY/llama_cpp")"
    if [ -d "$CARRY/prebuilt" ]; then
        printf '%-34s %8s MiB\n' "prebuilt/lib (CUDA image)" "$(mib "$CARRY/prebuilt/lib")"
        printf '%-34s %8s MiB\n' "prebuilt/bin" "$(mib "$CARRY/prebuilt/bin")"
    else
        printf '%-34s %8s  %s\n' "prebuilt/" "absent" "${PREBUILT_NOTE:-}"
    fi
    printf '%-34s %8s MiB\n' ".gpu-carry total" "$(mib "$CARRY")"
    printf '%-34s %8s MiB\n' "working tree (sent as well)" "$tree_mib"
    echo
    echo "wheels:"
    (cd "$CARRY/wheels" && ls -1 *.whl | sed 's/^/  /')
} >"$CARRY/MANIFEST.txt"
cat "$CARRY/MANIFEST.txt" >&2
total=$(awk -v a="$(mib "$CARRY")" -v b="$tree_mib" 'BEGIN {printf "%.1f", a + b}')
if awk -v t="$total" -v m="$MAX_MIB" 'BEGIN {exit !(t > m)}'; then
    log "carry + working tree = $total MiB: over the $MAX_MIB MiB budget"
    exit 1
fi
log "carry + working tree = $total MiB (budget $MAX_MIB MiB of the 64 MiB limit)"
