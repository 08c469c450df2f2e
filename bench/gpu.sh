#!/usr/bin/env bash
# Benchmark llamaherd on an NVIDIA GPU machine in under 8 minutes, from this repository and the
# .gpu-carry/ folder that bench/gpu_prepare.sh fills (no network needed):
#
#   bash bench/gpu.sh OUTDIR
#
# Steps, each timed against the whole run's deadline (LLAMAHERD_GPU_DEADLINE_S, 450 s):
#   detect     nvidia-smi, nvcc, python, cores, memory: recorded in OUTDIR/env/
#   wheels     the carried wheels into a --target folder (PYTHONPATH), llama-cpp-python's
#              Python package beside them; imports and requirements checked
#   model      python -m llamaherd_server.ggufgen --preset gpu-1b (~1.1B, F16), in the background
#   llama.cpp  the carried prebuilt CUDA libraries if they load and see a CUDA device, else a
#              CMake/ninja build of the carried source (CUDA, sm_90, shared libraries):
#              libllama, llama-server, llama-batched-bench; LLAMA_CPP_LIB_PATH points at them
#   checks     bench/gpu_checks.py: devices, continuous batching, temperature 0 alone vs batched
#   bench      bench/run.py: engine only vs llama-batched-bench, the seed tutorial's workload,
#              closed loop 1..32 streams and an open loop against llama-server and
#              one-at-a-time, all on the GPU; JSON, markdown and PNGs into OUTDIR/bench/
#   tests      tests/server/test_engine.py on the GPU, when time is left
#
# Rehearsal on a machine without a GPU (automatic without nvidia-smi, or
# LLAMAHERD_GPU_REHEARSAL=1): the same steps with a Python 3.12 that has only what the GPU
# machine's has (bench/gpu_rehearsal_env.sh), the venv's CPU llama.cpp libraries and the cached
# CPU llama-server (or, with LLAMAHERD_GPU_BUILD=1, a CPU build of the carried source), a small
# model and few requests. Everything but CUDA itself.
#
# Environment: LLAMAHERD_GPU_PYTHON (python3), LLAMAHERD_GPU_DEADLINE_S, LLAMAHERD_GPU_WORK
# (/tmp/lh-gpu), LLAMAHERD_GPU_SITE (/tmp/lh-site), LLAMAHERD_GPU_PRESET (gpu-1b; tiny in a
# rehearsal), LLAMAHERD_GPU_ARCH (90-real), LLAMAHERD_GPU_CUDA_FA (OFF: no flash-attention
# kernels in a build from source, a third less to compile; see bench/gpu_build_llama.sh),
# LLAMAHERD_GPU_BUILD (1: build even when prebuilt libraries work), LLAMAHERD_GPU_PREBUILT (1:
# use the prebuilt libraries in a rehearsal too), LLAMAHERD_GPU_TESTS (0: skip the tests step).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
mkdir -p "$1" && OUT=$(cd "$1" && pwd)
mkdir -p "$OUT/env" "$OUT/logs"
exec > >(tee -a "$OUT/gpu.log") 2>&1
exec 3>&1 # the log, also for a trap that runs while a step's output goes elsewhere

T0=$(date +%s)
CARRY=$ROOT/.gpu-carry
WORK=${LLAMAHERD_GPU_WORK:-/tmp/lh-gpu}
SITE=${LLAMAHERD_GPU_SITE:-/tmp/lh-site}
NPROC=$(nproc)

REHEARSAL=${LLAMAHERD_GPU_REHEARSAL:-}
if [ -z "$REHEARSAL" ]; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
        REHEARSAL=0
    else
        REHEARSAL=1
    fi
fi

if [ "$REHEARSAL" = 1 ]; then
    DEADLINE_S=${LLAMAHERD_GPU_DEADLINE_S:-3600}
    PRESET=${LLAMAHERD_GPU_PRESET:-tiny}
    GPU_LAYERS=-1 # asked for, as on the GPU; llama.cpp without a GPU backend runs on the CPU
    # One thread: llama.cpp's spinning threads and other busy processes on few cores slow
    # decoding many times over (a rehearsal's numbers mean nothing anyway).
    THREADS=1
    BUILD_CAP=3000
    CHECKS_CAP=600
    BENCH_CAP=1200
    BENCH_ARGS=(--slots 16 --context-size 512 --concurrency 1,4,16 --requests-per-stream 1
        --requests-min 4 --engine-batches 1,4 --repeats 1 --open-rate 8 --open-requests 8
        --seed-requests 40 --seed-concurrency 20 --seed-max-tokens 32)
else
    DEADLINE_S=${LLAMAHERD_GPU_DEADLINE_S:-450}
    PRESET=${LLAMAHERD_GPU_PRESET:-gpu-1b}
    GPU_LAYERS=-1
    THREADS=4
    BUILD_CAP=330
    CHECKS_CAP=90
    BENCH_CAP=260
    BENCH_ARGS=(--slots 64 --context-size 512 --concurrency 1,2,4,8,16,32
        --requests-per-stream 2 --requests-min 16 --engine-batches 1,2,4,8,16 --repeats 3
        --open-rate 16 --open-requests 48 --seed-requests 200 --seed-concurrency 50
        --seed-max-tokens 100)
fi
if [ "$REHEARSAL" = 1 ]; then
    PY=${LLAMAHERD_GPU_PYTHON:-$(bash "$ROOT/bench/gpu_rehearsal_env.sh" | tail -n 1)}
else
    PY=${LLAMAHERD_GPU_PYTHON:-python3}
fi
MODEL=$WORK/models/$PRESET.gguf

elapsed() { echo $(($(date +%s) - T0)); }
left() { echo $((DEADLINE_S - $(elapsed))); }
say() { printf '[gpu.sh +%3ss] %s\n' "$(elapsed)" "$*"; }
die() { say "FAILED: $*"; exit 1; }

# ---- clean-up: only what this script started, by process id -----------------------------
BG_PIDS=()
cleanup() {
    local pid f
    # The servers bench/run.py started (each leads its own session) and bounded commands.
    for f in "$OUT"/logs/*.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        kill -0 "$pid" 2>/dev/null && kill -- "-$pid" 2>/dev/null
        rm -f "$f"
    done
    for pid in "${BG_PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    sleep 0.5 # the tee into gpu.log catches up
}
trap cleanup EXIT
trap 'say "interrupted" >&3; exit 130' INT TERM

# ---- steps -------------------------------------------------------------------------------
printf 'step\tseconds\tbudget_s\trc\n' >"$OUT/steps.tsv"
STEP_RC=0
# step NAME CAP_S FUNCTION...: runs FUNCTION with at most min(CAP_S, time left) seconds.
step() {
    local name=$1 cap=$2 budget started rc
    shift 2
    budget=$(left)
    [ "$budget" -gt "$cap" ] && budget=$cap
    if [ "$budget" -lt 5 ]; then
        say "step $name: skipped, out of time"
        printf '%s\t0\t%s\tskipped\n' "$name" "$budget" >>"$OUT/steps.tsv"
        STEP_RC=124
        return 0
    fi
    say "step $name (budget ${budget}s)"
    started=$(date +%s)
    STEP_BUDGET=$budget
    "$@"
    rc=$?
    STEP_RC=$rc
    printf '%s\t%s\t%s\t%s\n' "$name" "$(($(date +%s) - started))" "$budget" "$rc" >>"$OUT/steps.tsv"
    say "step $name: $([ "$rc" = 0 ] && echo done || echo "FAILED (rc $rc)") in $(($(date +%s) - started))s"
    return 0
}
# bounded CMD...: CMD under timeout with this step's budget. timeout leads a process group of
# its own; its id is kept (exec keeps the shell's) so that an interrupted run ends that group
# too. It runs as a background job that the shell waits for, since bash runs a trap only once
# a foreground command has ended (a background job starts with SIGINT ignored: env gives it
# back its default). Not in a $(...) or a pipeline, where the shell would wait all the same.
RESET_INT=()
env --default-signal=INT true 2>/dev/null && RESET_INT=(env --default-signal=INT) # coreutils 8.31
bounded() {
    local pidfile="$OUT/logs/bounded-$BASHPID-$RANDOM.pid" pid rc
    bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "${RESET_INT[@]}" \
        timeout --kill-after=15 "$STEP_BUDGET" "$@" &
    pid=$!
    wait "$pid"
    rc=$?
    rm -f "$pidfile"
    return $rc
}

detect() {
    say "mode: $([ "$REHEARSAL" = 1 ] && echo "CPU rehearsal (no GPU)" || echo GPU), deadline ${DEADLINE_S}s, $NPROC cores"
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
        echo "kernel: $(uname -r)"
        echo "cores: $NPROC"
        grep -m1 'model name' /proc/cpuinfo
        free -g | sed -n 2p
    } >"$OUT/env/machine.txt"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi >"$OUT/env/nvidia-smi.txt" 2>&1
        nvidia-smi -L | tee "$OUT/env/gpus.txt"
        if [ "$REHEARSAL" = 0 ]; then
            nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw,temperature.gpu \
                --format=csv -l 1 >"$OUT/env/gpu-usage.csv" 2>/dev/null &
            BG_PIDS+=($!)
        fi
    else
        echo "no nvidia-smi" | tee "$OUT/env/gpus.txt"
    fi
    { command -v nvcc && nvcc --version; } >"$OUT/env/nvcc.txt" 2>&1 || echo "no nvcc" >>"$OUT/env/nvcc.txt"
    tail -n 2 "$OUT/env/nvcc.txt"
    { command -v cmake ninja; cmake --version | head -n 1; ninja --version; } >"$OUT/env/build-tools.txt" 2>&1
    { "$PY" -VV && "$PY" -m pip list 2>/dev/null; } >"$OUT/env/python.txt" 2>&1
    say "python: $PY ($(head -n 1 "$OUT/env/python.txt"))"
    [ -d "$CARRY/wheels" ] || { say "no $CARRY/wheels: run bench/gpu_prepare.sh first"; return 1; }
}

install_wheels() {
    rm -rf "$SITE"
    bounded "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
        "$CARRY"/wheels/*.whl || return 1
    cp -r "$CARRY/llama_cpp" "$SITE/llama_cpp"
    export PYTHONPATH="$SITE:$ROOT/server${PYTHONPATH:+:$PYTHONPATH}"
    say "installed $(ls "$CARRY"/wheels/*.whl | wc -l) wheels and llama_cpp $(cat "$CARRY/llama_cpp/VERSION") into $SITE"
    # Every requirement of what was installed is met (by it or by the python's own packages).
    "$PY" - "$SITE" <<'EOF' | tee "$OUT/env/requirements.txt"
import importlib.metadata as md
import sys

try:
    from packaging.requirements import Requirement
except ImportError:
    print("requirements: not checked (no packaging module)")
    raise SystemExit(0)
problems = []
for dist in md.distributions(path=[sys.argv[1]]):
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            problems.append(f"{dist.metadata['Name']} needs {req}: absent")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{dist.metadata['Name']} needs {req}: has {version}")
print("requirements: " + ("all met" if not problems else "; ".join(problems)))
EOF
    "$PY" -c "import fastapi, uvicorn, sse_starlette, pydantic, pydantic_settings, gguf, diskcache, \
numpy, httpx, jinja2, prometheus_client, matplotlib, llamaherd_server.api, llamaherd_server.__main__; \
print('imports: ok (fastapi', fastapi.__version__, 'pydantic', pydantic.__version__, 'numpy', numpy.__version__ + ')')"
}

make_model() {
    mkdir -p "$(dirname "$MODEL")"
    if [ -f "$MODEL" ]; then
        say "model: $MODEL already there"
        return 0
    fi
    say "model: generating --preset $PRESET in the background"
    (
        started=$(date +%s)
        "$PY" -m llamaherd_server.ggufgen --preset "$PRESET" --seed 0 --out "$MODEL" &&
            echo "generated in $(($(date +%s) - started))s"
    ) >"$OUT/logs/model.log" 2>&1 &
    MODEL_PID=$!
    BG_PIDS+=("$MODEL_PID")
}

wait_model() {
    if [ -n "${MODEL_PID:-}" ]; then
        local waited=0
        while kill -0 "$MODEL_PID" 2>/dev/null && [ "$waited" -lt "$STEP_BUDGET" ]; do
            sleep 1
            waited=$((waited + 1))
        done
        if kill -0 "$MODEL_PID" 2>/dev/null; then
            say "model: still being generated after ${STEP_BUDGET}s"
            return 1
        fi
        wait "$MODEL_PID" 2>/dev/null
        cat "$OUT/logs/model.log"
    fi
    [ -f "$MODEL" ] && say "model: $MODEL ($(du -h "$MODEL" | cut -f1))"
}

# The pip wheels' CUDA libraries (nvidia/cu13/lib), when the python has them.
cuda_pip_libs() {
    "$PY" - <<'EOF'
import importlib.util
import os

spec = importlib.util.find_spec("nvidia")
for base in list(spec.submodule_search_locations) if spec else []:
    for sub in ("cu13/lib", "cuda_runtime/lib", "cublas/lib"):
        if os.path.isdir(os.path.join(base, sub)):
            print(os.path.join(base, sub))
EOF
}

# probe_libs LIBDIR: llama-cpp-python loads LIBDIR's libllama.so; prints what ggml computes on
# into OUTDIR/env/llama-devices.json. Exit status 0 when a GPU is there.
probe_libs() {
    LLAMA_CPP_LIB_PATH=$1 "$PY" - "$OUT/env/llama-devices.json" <<'EOF'
import json
import sys

import llama_cpp

from llamaherd_server import cudadriver

devices = cudadriver.list_devices(llama_cpp)
body = {
    "llama_cpp_python": llama_cpp.__version__,
    "lib": llama_cpp.llama_cpp._lib._name,
    "offload_supported": devices.offload_supported,
    "devices": devices.devices,
}
open(sys.argv[1], "w").write(json.dumps(body, indent=2) + "\n")
print(f"llama.cpp devices: {[d['description'] or d['name'] for d in devices.devices]} "
      f"(offload supported: {devices.offload_supported})")
raise SystemExit(0 if devices.gpus else 3)
EOF
}

build_llama_cpp() {
    bounded bash "$ROOT/bench/gpu_build_llama.sh" --cuda "$1" --python "$PY" \
        --arch "${LLAMAHERD_GPU_ARCH:-90-real}" --cuda-fa "${LLAMAHERD_GPU_CUDA_FA:-OFF}" \
        --src "$CARRY/llama.cpp-src.tar.gz" --work "$WORK" --logs "$OUT/logs/llama.cpp" \
        >"$OUT/logs/llama.cpp.dir" || return 1
    LIBDIR=$(tail -n 1 "$OUT/logs/llama.cpp.dir")
    BINDIR=$LIBDIR
}

# prebuilt_works: the carried prebuilt libraries load, and (on a GPU) both llama-cpp-python and
# llama-server see a CUDA device through them.
prebuilt_works() {
    local devices
    probe_libs "$CARRY/prebuilt/lib"
    local rc=$?
    devices=$("$CARRY/prebuilt/bin/llama-server" --list-devices 2>&1)
    local ok=$?
    printf '%s\n' "$devices" >"$OUT/env/llama-server-devices.txt"
    if [ "$REHEARSAL" = 1 ]; then
        [ "$ok" = 0 ]
    else
        [ "$rc" = 0 ] && grep -q CUDA <<<"$devices"
    fi
}

get_llama_cpp() {
    local cu13 saved=${LD_LIBRARY_PATH:-}
    cu13=$(cuda_pip_libs | paste -sd: -)
    # The prebuilt libraries: on a GPU unless a build is asked for; in a rehearsal only when
    # asked for (LLAMAHERD_GPU_PREBUILT=1: their loading, not CUDA).
    if [ -d "$CARRY/prebuilt" ] && [ "${LLAMAHERD_GPU_BUILD:-0}" != 1 ] &&
        { [ "$REHEARSAL" = 0 ] || [ "${LLAMAHERD_GPU_PREBUILT:-0}" = 1 ]; }; then
        # The image's libraries need cudart and cuBLAS: the carried cudart, the pip wheels'.
        export LD_LIBRARY_PATH="$CARRY/prebuilt/lib${cu13:+:$cu13}${saved:+:$saved}"
        if prebuilt_works; then
            say "using the carried prebuilt libraries ($(cat "$CARRY/prebuilt/IMAGE" | cut -c1-19))"
            LIBDIR=$CARRY/prebuilt/lib
            BINDIR=$CARRY/prebuilt/bin
            "$BINDIR/llama-server" --version >"$OUT/env/llama-server-version.txt" 2>&1
            return 0
        fi
        say "the carried prebuilt libraries do not serve here: building from source"
        export LD_LIBRARY_PATH=$saved
    fi
    if [ "$REHEARSAL" = 0 ]; then
        build_llama_cpp ON || return 1
    elif [ "${LLAMAHERD_GPU_BUILD:-0}" = 1 ]; then
        build_llama_cpp OFF || return 1
    else
        # The CPU libraries of this checkout's venv and the cached CPU llama-server.
        LIBDIR=$(env -u PYTHONPATH "$ROOT/.venv/bin/python" -c "import importlib.util as u, os; \
print(os.path.join(os.path.dirname(u.find_spec('llama_cpp').origin), 'lib'))") || return 1
        BINDIR=$(bash "$ROOT/bench/build_llama_server.sh" 2>/dev/null | tail -n 1) || return 1
        say "rehearsal: venv libraries $LIBDIR, binaries $BINDIR"
    fi
    # A build from source finds its CUDA libraries through its RUNPATH (where it linked them).
    export LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    probe_libs "$LIBDIR"
    local rc=$?
    "$BINDIR/llama-server" --version >"$OUT/env/llama-server-version.txt" 2>&1
    if [ "$REHEARSAL" = 0 ] && [ "$rc" != 0 ]; then
        say "llama.cpp sees no CUDA device"
        return 1
    fi
    return 0
}

run_checks() {
    bounded "$PY" "$ROOT/bench/gpu_checks.py" --model "$MODEL" --gpu-layers "$GPU_LAYERS" \
        --threads "$THREADS" --json "$OUT/checks.json" \
        $([ "$REHEARSAL" = 0 ] && echo --require-gpu)
}

run_bench() {
    # run.py stops starting load points 30 s before the step's budget ends, so that it
    # stops its servers and writes its results itself.
    [ "$STEP_BUDGET" -ge 60 ] || { say "bench: ${STEP_BUDGET}s is too little"; return 1; }
    bounded "$PY" "$ROOT/bench/run.py" --out "$OUT/bench" --logs "$OUT/logs" \
        --model "$MODEL" --bindir "$BINDIR" --gpu-layers "$GPU_LAYERS" --threads "$THREADS" \
        --rounds 1 --seed-workload --time-budget-s $((STEP_BUDGET - 30)) "${BENCH_ARGS[@]}" \
        >"$OUT/logs/bench.log" 2>&1
    local rc=$?
    grep -E '^\[bench' "$OUT/logs/bench.log" | tail -n 40
    return $rc
}

run_tests() {
    LLAMAHERD_TEST_GPU_LAYERS=$GPU_LAYERS PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 bounded \
        "$PY" -m pytest -p pytest_timeout -p no:cacheprovider -q --timeout 60 \
        tests/server/test_engine.py >"$OUT/tests.txt" 2>&1
    local rc=$?
    tail -n 15 "$OUT/tests.txt"
    return $rc
}

summary() {
    {
        echo "# bench/gpu.sh $([ "$REHEARSAL" = 1 ] && echo "(CPU rehearsal)")"
        echo
        echo "$(head -n 1 "$OUT/env/gpus.txt"); total $(elapsed)s of a ${DEADLINE_S}s deadline."
        echo
        echo "| step | seconds | budget s | rc |"
        echo "|---|---|---|---|"
        tail -n +2 "$OUT/steps.tsv" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
        if [ -f "$OUT/checks.json" ]; then
            echo
            echo "Checks: $(grep -E '^\[checks\]' "$OUT/gpu.log" | sed 's/^\[checks\] //' | paste -sd ';' -)"
        fi
        if [ -f "$OUT/bench/results.md" ]; then
            echo
            sed -n '/^## Targets/,/^## Closed loop/p' "$OUT/bench/results.md" | sed '$d'
        fi
        if [ -f "$OUT/tests.txt" ]; then
            echo
            echo "Tests: $(tail -n 1 "$OUT/tests.txt")"
        fi
    } >"$OUT/summary.md"
    cat "$OUT/summary.md"
}

main() {
    step detect 30 detect
    [ "$STEP_RC" = 0 ] || die "detect"
    step wheels 60 install_wheels
    [ "$STEP_RC" = 0 ] || die "the carried wheels do not install or import"
    step model-start 10 make_model
    step llama.cpp "$BUILD_CAP" get_llama_cpp
    [ "$STEP_RC" = 0 ] || die "no llama.cpp to run (see $OUT/logs/llama.cpp/)"
    export LLAMA_CPP_LIB_PATH=$LIBDIR
    step model-wait 120 wait_model
    [ -f "$MODEL" ] || die "no model"
    step checks "$CHECKS_CAP" run_checks
    BENCH_BUDGET=$(($(left) - 25))
    [ "$BENCH_BUDGET" -gt "$BENCH_CAP" ] && BENCH_BUDGET=$BENCH_CAP
    step bench "$BENCH_BUDGET" run_bench
    if [ "${LLAMAHERD_GPU_TESTS:-1}" != 1 ]; then
        say "tests: skipped (LLAMAHERD_GPU_TESTS=${LLAMAHERD_GPU_TESTS})"
    elif [ "$(left)" -lt 60 ]; then
        say "tests: skipped (only $(left)s left)"
    else
        step tests $(($(left) - 10)) run_tests
    fi
    say "done in $(elapsed)s; results in $OUT"
    summary
}

# Parsed whole before it runs: an edit of this file during a run cannot change the run.
main "$@"; exit $?
