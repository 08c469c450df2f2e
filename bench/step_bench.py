"""Per-step overhead: the engine alone against llama-batched-bench on a short-step model.

On a GPU a decode step takes a few milliseconds, so what Python spends per step (scheduling,
batch building, sampling, the hand-off of tokens) decides the GPU result. This benchmark uses
a generated model whose decode step on this machine's CPU is about as short (1-3 ms at B=1 to
16) as the stand-in, and measures at B = 1, 4 and 16:

* the ratio of the engine's decode rate (``llamaherd_server.engine.Engine``, no HTTP: B
  requests of 32 prompt and 128 generated tokens submitted together, tokens/s from first to
  last generated token) to ``llama-batched-bench``'s S_TG on the same model and shapes
  (-npp 32 -ntg 128, same context, batch, threads, --kv-unified), runs interleaved and
  repeated, medians reported. Two workloads: ``greedy`` (temperature 0: the engine's own
  overhead, since batched-bench samples nothing) and ``sampled`` (temperature 0.8, top-k 40
  through llama.cpp's sampler chain, which batched-bench does not pay for);
* a profile: per-step microseconds inside llama_decode, filling the batch, sampling,
  accepting tokens (detokenize, stop strings, events), handing events out, and the rest of
  the scheduler loop, from timers wrapped around the engine's methods in a separate run (the
  ratio runs carry no timers).

    python bench/step_bench.py --label after            # this checkout's engine
    PYTHONPATH=/tmp/old/server python bench/step_bench.py --label before   # another one

Writes ``bench/results/step/<label>.json`` and, when both exist, ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import engine_bench
from common import (
    RESULTS,
    batched_bench_command,
    generated_model,
    parse_batched_bench,
    table_head,
)

import llamaherd_server
from llamaherd_server.engine import Engine

OUT = RESULTS / "step"
# ~17M parameters, F16: decode steps of about 1-3 ms at B=1..16 on the 2-core machine.
SHAPE = ["--n-embd", "384", "--n-layer", "6", "--n-head", "6", "--n-head-kv", "6"]
SHAPE += ["--n-ff", "1024", "--vocab", "8192"]
SLOTS = 16
CONTEXT = 512
BATCH = 512
PROMPT = 32
GEN = 128
WORKLOADS = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 0.8, "top_k": 40},
}


def log(msg: str) -> None:
    common.log(msg, tag="step")


def ensure_model() -> Path:
    return generated_model("step-seed0", [*SHAPE, "--seed", "0"], "the short-step model")


def run_batch(engine: Engine, batch: int, workload: str, seed: int) -> dict[str, float]:
    """B requests together (engine_bench's run): decode tokens/s from the last sequence's first
    token to the last token (every sequence decodes in every step of that window)."""
    return engine_bench.run_batch(engine, batch, PROMPT, GEN, seed, sampling=WORKLOADS[workload])


class Timers:
    """Wraps the engine's per-step methods with timers (only for the profile runs)."""

    PHASES = ("llama_decode", "fill", "sample", "accept", "deliver")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.total = dict.fromkeys(self.PHASES, 0.0)
        self.on = False
        backend = engine.backend
        lib = backend.lib
        real_decode = lib.llama_decode
        batch_fill = getattr(getattr(backend, "batch", None), "fill", None)

        def timed(phase: str, fn: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    if self.on:
                        self.total[phase] += time.perf_counter() - t0

            return wrapper

        # llama_decode itself (inside backend.decode, whatever else decode does).
        lib.llama_decode = timed("llama_decode", real_decode)
        real_backend_decode = backend.decode
        if batch_fill is not None:  # the numpy batch: fill is its own method
            backend.batch.fill = timed("fill", batch_fill)
            backend.decode = real_backend_decode
        else:  # older engines fill the ctypes batch inside decode: fill = decode - llama_decode

            def decode(entries: Any) -> int:
                t0 = time.perf_counter()
                before = self.total["llama_decode"]
                rc: int = real_backend_decode(entries)
                if self.on:
                    inner = self.total["llama_decode"] - before
                    self.total["fill"] += time.perf_counter() - t0 - inner
                return rc

            backend.decode = decode
        backend.sample = timed("sample", backend.sample)
        if hasattr(backend, "argmax"):
            backend.argmax = timed("sample", backend.argmax)
        engine._accept_token = timed("accept", engine._accept_token)  # type: ignore[method-assign]
        engine._deliver = timed("deliver", engine._deliver)  # type: ignore[method-assign]


def profile(engine: Engine, timers: Timers, batch: int, workload: str) -> dict[str, float]:
    for phase in timers.total:
        timers.total[phase] = 0.0
    timers.on = True
    started = time.perf_counter()
    result = run_batch(engine, batch, workload, seed=7)
    wall = time.perf_counter() - started
    timers.on = False
    # Per step over the whole run (prefill step included; the phases cover all of it).
    steps = result["steps"] + 1
    per_step = {phase: t / steps * 1e6 for phase, t in timers.total.items()}
    per_step["other"] = wall / steps * 1e6 - sum(per_step.values())
    per_step["step"] = wall / steps * 1e6
    return {k: round(v, 1) for k, v in per_step.items()}


def engine_source() -> dict[str, str]:
    where = Path(llamaherd_server.__file__).resolve().parent
    commit = subprocess.run(
        ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    dirty = subprocess.run(
        ["git", "-C", str(where), "status", "--porcelain", "--", "."],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return {"path": str(where), "commit": commit + ("+changes" if dirty else "")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="results file name, e.g. before/after")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--no-prefix-cache", dest="prefix_cache", action="store_false",
        help="the engine without its prefix cache: cached cells stay out of the KV, as in "
        "batched-bench, whose KV is empty at each batch size",
    )  # fmt: skip
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


@dataclass
class Runs:
    """Decode tokens/s of every run: llama-batched-bench's and the engine's per workload, by
    B; the 1-minute load average before and after each repeat."""

    theirs: dict[str, list[float]]
    ours: dict[str, dict[str, list[float]]]
    loadavg: list[float]


def measure(engine: Engine, argv: list[str], batches: list[int], repeats: int) -> Runs:
    runs = Runs(
        theirs={str(b): [] for b in batches},
        ours={w: {str(b): [] for b in batches} for w in WORKLOADS},
        loadavg=[os.getloadavg()[0]],
    )
    for workload in WORKLOADS:  # warm-up
        run_batch(engine, max(batches), workload, seed=1)
    for r in range(repeats):
        # Alternate who goes first, so that drift in background load hits both alike.
        order = ["theirs", "ours"] if r % 2 == 0 else ["ours", "theirs"]
        for who in order:
            if who == "theirs":
                out = subprocess.run(argv, capture_output=True, text=True, check=True)
                rows = parse_batched_bench(out.stdout + out.stderr)
                for b in batches:
                    runs.theirs[str(b)].append(rows[str(b)]["tg_tokens_per_s"])
            else:
                for workload in WORKLOADS:
                    for b in batches:
                        got = run_batch(engine, b, workload, seed=100 * r + b)
                        runs.ours[workload][str(b)].append(got["tg_tokens_per_s"])
        runs.loadavg.append(os.getloadavg()[0])
        log(
            f"repeat {r + 1}/{repeats}: batched-bench "
            + " ".join(f"B={b}:{runs.theirs[str(b)][-1]:.0f}" for b in batches)
            + " | greedy "
            + " ".join(f"{runs.ours['greedy'][str(b)][-1]:.0f}" for b in batches)
            + " | sampled "
            + " ".join(f"{runs.ours['sampled'][str(b)][-1]:.0f}" for b in batches)
        )
    return runs


def medians(runs: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {b: {"median": statistics.median(v), "runs": v} for b, v in runs.items()}


def summary(args: argparse.Namespace, model: Path, argv: list[str], runs: Runs) -> dict[str, Any]:
    theirs = runs.theirs
    return {
        "label": args.label,
        "model": {"path": str(model), "shape": " ".join(SHAPE), "params_m": 16.9},
        "shapes": {
            "prompt": PROMPT,
            "gen": GEN,
            "slots": SLOTS,
            "context": CONTEXT,
            "batch": BATCH,
            "threads": args.threads,
        },
        "batched_bench_argv": " ".join(argv),
        "repeats": args.repeats,
        "loadavg": runs.loadavg,
        "batched_bench": medians(theirs),
        "engine": {w: medians(per_b) for w, per_b in runs.ours.items()},
        "ratio": {
            w: {
                b: statistics.median(o / t for o, t in zip(per_b[b], theirs[b], strict=True))
                for b in per_b
            }
            for w, per_b in runs.ours.items()
        },
    }


def main() -> None:
    args = parse_args()
    batches = args.batches
    model = ensure_model()
    argv = batched_bench_command(
        common.ensure_binaries(), model, SLOTS * CONTEXT, BATCH, PROMPT, GEN, batches,
        args.threads,
    )  # fmt: skip
    source = engine_source()
    log(f"engine from {source['path']} ({source['commit']}), model {model.name}")
    engine = engine_bench.load_engine(
        model, SLOTS, threads=args.threads, context_size=CONTEXT, token_budget=BATCH,
        max_wait_ms=0, **({} if args.prefix_cache else {"prefix_cache": False}),
    )  # fmt: skip
    try:
        runs = measure(engine, argv, batches, args.repeats)
        timers = Timers(engine)
        profiles = {w: {str(b): profile(engine, timers, b, w) for b in batches} for w in WORKLOADS}
    finally:
        engine.close()
    result = summary(args, model, argv, runs)
    result["profile_us_per_step"] = profiles
    result["engine_source"] = source
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.label}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {path}")
    for w in WORKLOADS:
        log(f"{w:8s} ratio " + "  ".join(
            f"B={b}: {result['ratio'][w][str(b)]:.3f}" for b in batches
        ))  # fmt: skip
    write_markdown(args.out)


def per_batch(
    runs: dict[str, dict[str, Any]], key: str
) -> Iterator[tuple[str, Any, str, str, Any]]:
    """(label, run, workload, B, value) for every value of ``run[key][workload][B]``."""
    for label, r in runs.items():
        for w, per_b in r[key].items():
            for b, value in per_b.items():
                yield label, r, w, b, value


def write_markdown(out: Path) -> None:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    if not runs:
        return
    lines = [
        "# Per-step overhead: engine alone vs llama-batched-bench (short-step model)",
        "",
        "`python bench/step_bench.py --label <label>`; method in the script's docstring.",
        "Ratio: engine decode tokens/s over llama-batched-bench S_TG, median of the per-repeat",
        "ratios (runs interleaved). Profile: microseconds per engine step, from timers around",
        "the engine's methods in a separate run.",
        "",
        *table_head(
            "run", "engine", "workload", "B", "engine tok/s", "batched-bench S_TG", "ratio"
        ),
    ]
    lines += [
        f"| {label} | {r['engine_source']['commit']} | {w} | {b} "
        f"| {r['engine'][w][b]['median']:.0f} "
        f"| {r['batched_bench'][b]['median']:.0f} | {ratio:.3f} |"
        for label, r, w, b, ratio in per_batch(runs, "ratio")
    ]
    phases = ("step", "llama_decode", "fill", "sample", "accept", "deliver", "other")
    lines += ["", *table_head("run", "workload", "B", *phases)]
    lines += [
        f"| {label} | {w} | {b} | " + " | ".join(f"{p[phase]:.0f}" for phase in phases) + " |"
        for label, _, w, b, p in per_batch(runs, "profile_us_per_step")
    ]
    lines += ["", "Load average (1 min) before and after each repeat:", ""]
    for label, r in runs.items():
        lines.append(f"- {label}: {', '.join(f'{x:.2f}' for x in r['loadavg'])}")
    (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
