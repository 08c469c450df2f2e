"""Engine checks that matter on a GPU: llamaherd's Engine on llama.cpp with ``gpu_layers``.

    python bench/gpu_checks.py --model M.gguf --gpu-layers -1 --json checks.json [--require-gpu]

1. devices: what llama.cpp computes on (ggml's device list, as /health reports it); with
   ``--require-gpu`` a run without a GPU device fails.
2. continuous batching: 16 concurrent requests all complete and share decode steps (batch sizes
   above 1 in ``llamaherd_batch_size``); 8 requests admitted while 8 others are generating start
   before those finish.
3. temperature 0, alone against batched: 8 prompts decoded greedily one at a time, then all 8
   at once; per prompt, equal or the first token where they part. Recorded, not asserted:
   llama.cpp's kernels are not batch-invariant on the CPU (the GPU is what this measures).
   The prefix cache is off here, so the batched run computes its prompts again.

Exit status 1 when a hard check (1 with --require-gpu, 2) fails; the JSON is written anyway.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import batch_distribution, llamaherd_hist
from engine_bench import load_engine, random_prompt, submit, wait_all
from prometheus_client import generate_latest

from llamaherd_server.engine import Engine, Failed, Finished, SamplingParams

PROMPTS = [
    "Explain topic 0",
    "the model is here and the queue is long",
    "hello world, tell me a story about a llama",
    "write a small answer to this question",
    "explain the cluster and the server to a user",
    "Explain topic 1, then topic 2, then the first one again in other words",
    "data in the cloud is fast and small",
    "a question for the assistant: what is a batch",
]


def first_divergence(
    a: list[tuple[str, int, float]], b: list[tuple[str, int, float]]
) -> int | None:
    """The index of the first generated token where two greedy outputs part (counted from
    their text chunks; a chunk holds one token unless a UTF-8 character or a held-back stop
    prefix spans several), or None when they are equal."""
    tokens = 0
    for (text_a, n_a, _), (text_b, n_b, _) in zip(a, b, strict=False):
        if text_a != text_b or n_a != n_b:
            return tokens
        tokens += n_a
    return None if len(a) == len(b) else tokens


def scrape(engine: Engine) -> str:
    """The engine's metrics as /metrics would serve them."""
    return generate_latest(engine.metrics.registry).decode()


def batch_stats(before: str, after: str) -> dict[str, Any]:
    """Decode steps and batch sizes between two scrapes (bench/common.py's histogram helpers)."""
    dist = batch_distribution(
        llamaherd_hist(before, "llamaherd_batch_size"),
        llamaherd_hist(after, "llamaherd_batch_size"),
    )
    if dist is None:
        return {"decode_steps": 0, "steps_with_more_than_one_sequence": 0, "mean_batch": None}
    d0 = llamaherd_hist(before, "llamaherd_decode_step_seconds")
    d1 = llamaherd_hist(after, "llamaherd_decode_step_seconds")
    decode_s = d1["sum"] - d0["sum"] if d0 and d1 else None
    return {
        "decode_steps": dist["steps"],
        "steps_with_more_than_one_sequence": dist["steps"] - dist["le_counts"].get("1.0", 0),
        "mean_batch": dist["mean"],
        "largest_batch_bucket_le": max(float(le) for le in dist["le_counts"]),
        "mean_decode_step_ms": None if decode_s is None else 1000 * decode_s / dist["steps"],
    }


def check_concurrent(engine: Engine, n: int, max_tokens: int) -> dict[str, Any]:
    rng = random.Random(0)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=40, ignore_eos=True)
    before = scrape(engine)
    started = time.perf_counter()
    tracked = [submit(engine, random_prompt(rng, engine, 32), params) for _ in range(n)]
    complete = wait_all(tracked, 300)
    wall = time.perf_counter() - started
    finished = [t for t in tracked if isinstance(t.end, Finished)]
    tokens = sum(t.end.completion_tokens for t in finished if isinstance(t.end, Finished))
    out = {
        "requests": n,
        "finished": len(finished),
        "failures": [t.end.message for t in tracked if isinstance(t.end, Failed)][:3],
        "all_answered_in_time": complete,
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall else None,
        **batch_stats(before, scrape(engine)),
    }
    out["ok"] = bool(
        complete and len(finished) == n and out["steps_with_more_than_one_sequence"] > 0
    )
    return out


def check_join_midway(engine: Engine, n: int, max_tokens: int) -> dict[str, Any]:
    """``n`` requests run; once each has generated a quarter of its tokens, ``n`` more come.
    Continuous batching admits them into the running batch: they start before the first
    ``n`` finish (a static batch would make them wait for the whole batch)."""
    rng = random.Random(1)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_k=40, ignore_eos=True)

    first = [submit(engine, random_prompt(rng, engine, 32), params) for _ in range(n)]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all(
        sum(c[1] for c in t.chunks) >= max_tokens // 4 or t.done.is_set() for t in first
    ):
        time.sleep(0.001)
    late = [submit(engine, random_prompt(rng, engine, 32), params) for _ in range(n)]
    complete = wait_all(first + late, 300)
    first_done = min((t.finished_at for t in first if t.finished_at), default=None)
    late_started = [t.first_token_at for t in late if t.first_token_at]
    joined = sum(1 for s in late_started if first_done is not None and s < first_done)
    return {
        "first": n,
        "late": n,
        "all_finished": complete and all(isinstance(t.end, Finished) for t in first + late),
        "late_started_before_first_finished": joined,
        "ok": bool(complete and joined == n),
    }


def check_greedy_alone_vs_batched(engine: Engine, max_tokens: int) -> dict[str, Any]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [engine.tokenize(p) for p in PROMPTS]
    alone = []
    for p in prompts:
        t = submit(engine, p, params)
        wait_all([t], 120)
        alone.append(t)
    before = scrape(engine)
    batched = [submit(engine, p, params) for p in prompts]
    wait_all(batched, 300)
    rows = []
    for text, a, b in zip(PROMPTS, alone, batched, strict=True):
        diverge = first_divergence(a.chunks, b.chunks)
        rows.append(
            {
                "prompt": text,
                "equal": diverge is None,
                "first_diverging_token": diverge,
                "alone": a.text[:120],
                "batched": b.text[:120],
            }
        )
    return {
        "max_tokens": max_tokens,
        "prompts": len(rows),
        "equal": sum(1 for r in rows if r["equal"]),
        "batched_run": batch_stats(before, scrape(engine)),
        "rows": rows,
    }


def say(msg: str) -> None:
    print(f"[checks] {msg}", flush=True)


def describe_concurrent(c: dict[str, Any]) -> str:
    return (
        f"{c['requests']} concurrent: {c['finished']} finished, "
        f"{c['tokens_per_s']:.0f} tok/s, mean batch {c['mean_batch'] or 0:.1f}, "
        f"{c['steps_with_more_than_one_sequence']}/{c['decode_steps']} steps batched, "
        f"{c['mean_decode_step_ms'] or 0:.1f} ms per step"
    )


def describe_join_midway(j: dict[str, Any]) -> str:
    return (
        f"{j['late']} admitted mid-generation: "
        f"{j['late_started_before_first_finished']} started before the first "
        f"{j['first']} finished"
    )


def describe_greedy(g: dict[str, Any]) -> str:
    return (
        f"temperature 0, alone vs batched with {g['prompts'] - 1} others: "
        f"{g['equal']}/{g['prompts']} equal; first diverging tokens: "
        f"{[r['first_diverging_token'] for r in g['rows']]}"
    )


# (key in the JSON, what it says, what a failed hard check is called; None: recorded only)
CHECKS: list[tuple[str, Callable[[dict[str, Any]], str], str | None]] = [
    (
        "concurrent",
        describe_concurrent,
        "16 concurrent requests did not all complete in shared decode steps",
    ),
    (
        "join_midway",
        describe_join_midway,
        "requests admitted mid-generation waited for the running batch",
    ),
    ("greedy", describe_greedy, None),
]


def run_checks(engine: Engine, args: argparse.Namespace, out: dict[str, Any]) -> list[str]:
    """Every check into ``out``; returns the hard checks that failed."""
    failed: list[str] = []
    devices = getattr(engine.backend, "devices", None)
    out["devices"] = devices.as_json(args.gpu_layers) if devices is not None else None
    has_gpu = bool(out["devices"] and out["devices"]["backend"] == "gpu")
    out["on_gpu"] = has_gpu
    if args.require_gpu and not has_gpu:
        failed.append("no GPU device (llama.cpp computes on the CPU)")
    say(f"devices: {json.dumps(out['devices'])}")
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "concurrent": lambda: check_concurrent(engine, args.slots, args.max_tokens),
        "join_midway": lambda: check_join_midway(engine, args.slots // 2, 4 * args.max_tokens),
        "greedy": lambda: check_greedy_alone_vs_batched(engine, args.max_tokens),
    }
    for key, describe, failure in CHECKS:
        out[key] = got = checks[key]()
        say(describe(got))
        if failure is not None and not got["ok"]:
            failed.append(failure)
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--gpu-layers", type=int, default=-1)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--context-size", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--require-gpu", action="store_true", help="fail without a GPU device")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    out: dict[str, Any] = {"model": str(args.model), "gpu_layers": args.gpu_layers}
    started = time.perf_counter()
    engine = load_engine(
        args.model,
        args.slots,
        context_size=args.context_size,
        threads=args.threads,
        gpu_layers=args.gpu_layers,
        prefix_cache=False,
    )
    out["load_s"] = time.perf_counter() - started
    try:
        failed = run_checks(engine, args, out)
    finally:
        engine.close()
    out["failed"] = failed
    out["ok"] = not failed
    out["wall_s"] = time.perf_counter() - started
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    say("ok" if not failed else "FAILED: " + "; ".join(failed))
    raise SystemExit(0 if not failed else 1)


if __name__ == "__main__":
    main()
