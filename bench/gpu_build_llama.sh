#!/usr/bin/env bash
# Build libllama/libggml (shared), llama-server and llama-batched-bench from the pruned llama.cpp
# source that bench/gpu_prepare.sh carries, with CUDA (one architecture) or without. bench/gpu.sh
# runs it on the GPU machine; it prints the directory that holds the libraries and the
# executables as its last line.
#
#   bash bench/gpu_build_llama.sh --cuda ON|OFF --src TARBALL --work DIR --logs DIR
#        [--python PY] [--arch 90-real] [--cuda-fa OFF|ON] [--configure-only]
#
# CUDA: nvcc from PATH; its toolkit (the directory above nvcc's bin/) for cudart and cuBLAS,
# else the pip wheels' nvidia/cu13 (their versioned libraries named outright); the driver
# library for CUDA's virtual memory from the toolkit's stubs or the installed driver, else none
# (GGML_CUDA_NO_VMM).
#
# Flash attention's CUDA kernels are off unless --cuda-fa ON: their 34 template instances are
# about a third of the CUDA compile (measured here: ~43 CPU-s per fattn-mma instance, ~35 per
# mmq one, ~5-20 for most other files), and at this benchmark's lengths (prompts of 5-32
# tokens, 64-100 generated) attention is a small part of a step. With it on, only the F16
# vector kernels are compiled (the KV cache is F16; the default adds q4_0, q8_0, bf16).
set -euo pipefail

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# The pip wheels' CUDA library folders (nvidia/cu13/lib), when the python has them.
pip_cuda_libs() {
    "$PY" - <<'EOF' 2>/dev/null || true
import importlib.util
import os

spec = importlib.util.find_spec("nvidia")
for base in list(spec.submodule_search_locations) if spec else []:
    if os.path.isdir(os.path.join(base, "cu13", "lib")):
        print(os.path.join(base, "cu13", "lib"))
EOF
}

# find_lib ROOT NAME: the first ROOT/{lib64,lib,targets/x86_64-linux/lib}/NAME.
find_lib() {
    local d
    for d in "$1/lib64" "$1/lib" "$1/targets/x86_64-linux/lib"; do
        [ -e "$d/$2" ] && { echo "$d/$2"; return 0; }
    done
    return 1
}

main() {
    CUDA=OFF SRC= WORK= LOGS= PY=python3 ARCH=90-real CUDA_FA=OFF CONFIGURE_ONLY=0
    while [ $# -gt 0 ]; do
        case $1 in
            --cuda) CUDA=$2; shift ;;
            --src) SRC=$2; shift ;;
            --work) WORK=$2; shift ;;
            --logs) LOGS=$2; shift ;;
            --python) PY=$2; shift ;;
            --arch) ARCH=$2; shift ;;
            --cuda-fa) CUDA_FA=$2; shift ;;
            --configure-only) CONFIGURE_ONLY=1 ;;
            *) echo "unknown argument $1" >&2; exit 2 ;;
        esac
        shift
    done
    [ -f "$SRC" ] && [ -n "$WORK" ] && [ -n "$LOGS" ] || { echo "need --src, --work, --logs" >&2; exit 2; }

    kind=$([ "$CUDA" = ON ] && echo cuda || echo cpu)
    src=$WORK/src
    build=$WORK/build-$kind
    mkdir -p "$LOGS"

    # Extract once per tarball (a rebuild here then only compiles what changed). The archive's
    # times are all the same (gpu_prepare.sh makes it reproducible): a new one starts a new build.
    key=$(sha256sum "$SRC" | cut -c1-16)
    if [ "$(cat "$src/.key" 2>/dev/null)" != "$key" ]; then
        rm -rf "$src" "$WORK"/build-* && mkdir -p "$src"
        tar -C "$src" -xzf "$SRC"
        echo "$key" >"$src/.key"
    fi

    args=()
    if [ "$CUDA" = ON ]; then
        nvcc=$(command -v nvcc) || { log "no nvcc on PATH"; exit 1; }
        root=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
        log "nvcc: $nvcc ($("$nvcc" --version | tail -n 1)), toolkit $root"
        args+=(-DGGML_CUDA=ON "-DCMAKE_CUDA_COMPILER=$nvcc" "-DCUDAToolkit_ROOT=$root"
            "-DCMAKE_CUDA_ARCHITECTURES=$ARCH" "-DGGML_CUDA_FA=$CUDA_FA" -DGGML_CUDA_FA_QUANTS=f16-f16)
        if ! find_lib "$root" libcublas.so >/dev/null; then
            cu13=$(pip_cuda_libs | head -n 1)
            if [ -n "$cu13" ] && [ -e "$cu13/libcublas.so.13" ]; then
                log "cuBLAS and cudart from the pip wheels: $cu13"
                args+=("-DCUDA_cublas_LIBRARY=$cu13/libcublas.so.13"
                    "-DCUDA_cublasLt_LIBRARY=$cu13/libcublasLt.so.13")
                # FindCUDAToolkit looks for cudart under the unversioned name as CUDA_CUDART.
                if [ -e "$cu13/libcudart.so.13" ] && ! find_lib "$root" libcudart.so >/dev/null; then
                    args+=("-DCUDA_CUDART=$cu13/libcudart.so.13"
                        "-DCUDA_cudart_LIBRARY=$cu13/libcudart.so.13")
                fi
                if [ ! -e "$root/include/cublas_v2.h" ] && [ -e "$cu13/../include/cublas_v2.h" ]; then
                    args+=("-DCMAKE_CUDA_FLAGS=-I$(cd "$cu13/../include" && pwd)")
                fi
            else
                log "no cuBLAS in $root nor in the pip wheels: configuring anyway"
            fi
        fi
        if ! find_lib "$root" stubs/libcuda.so >/dev/null; then
            driver=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 .*x86-64/ {print $NF; exit}')
            if [ -n "$driver" ]; then
                args+=("-DCUDA_cuda_driver_LIBRARY=$driver")
            else
                log "no libcuda (driver or stub): building without CUDA VMM"
                args+=(-DGGML_CUDA_NO_VMM=ON)
            fi
        fi
    else
        args+=(-DGGML_CUDA=OFF)
    fi

    generator=()
    command -v ninja >/dev/null && generator=(-G Ninja)
    log "cmake ${args[*]}"
    if ! cmake -S "$src/llama.cpp" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DGGML_CCACHE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF "${args[@]}" >"$LOGS/cmake.log" 2>&1; then
        tail -n 40 "$LOGS/cmake.log" >&2
        exit 1
    fi
    grep -E "CUDA Toolkit found|Using CMAKE_CUDA_ARCHITECTURES|Including .* backend" "$LOGS/cmake.log" >&2 || true
    if [ "$CONFIGURE_ONLY" = 1 ]; then
        echo "$build/bin"
        exit 0
    fi
    started=$(date +%s)
    log "building llama, llama-server, llama-batched-bench with -j$(nproc)"
    if ! cmake --build "$build" --target llama llama-server llama-batched-bench -j"$(nproc)" \
        >"$LOGS/build.log" 2>&1; then
        grep -E "error|Error" "$LOGS/build.log" | head -n 20 >&2
        tail -n 20 "$LOGS/build.log" >&2
        exit 1
    fi
    log "llama.cpp ($kind) built in $(($(date +%s) - started))s"
    echo "$build/bin"
}

# Parsed whole before it runs: an edit of this file during a build cannot change the build.
main "$@"; exit $?
