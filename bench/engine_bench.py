"""Engine-only microbenchmark: llamaherd's Engine without HTTP, on llama-batched-bench's shapes.

For each batch size B, B requests (``prompt_tokens`` random token ids each, ``ignore_eos``)
are submitted together to an idle engine; the first step prefills all B prompts and samples
each sequence's first token, then ``gen_tokens`` decode steps of B tokens follow, as in
``llama-batched-bench -npp P -ntg N -npl B``. Reported per B (median of ``repeats`` runs):

* ``tg_tokens_per_s``: B x gen_tokens / (last token - first token): decode speed, the number
  to hold against batched-bench's S_TG (our sampling and streaming hand-off are inside it);
* ``total_tokens_per_s``: (B x (prompt + gen)) / (submit - last token), against batched-bench's S.

    python bench/engine_bench.py --model M.gguf --batches 1,2,4,8,16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen import FIRST_PLAIN_TOKEN

from llamaherd_server.engine import (
    Engine,
    Failed,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextChunk,
)
from llamaherd_server.llama_backend import LlamaBackend
from llamaherd_server.metrics import ServerMetrics

# ---- the Engine without HTTP (bench/gpu_checks.py and bench/step_bench.py use these too) ----


def load_engine(
    model: Path, slots: int, *, threads: int, gpu_layers: int = 0, **options: Any
) -> Engine:
    """An Engine on llama.cpp with ``slots`` sequences and metrics of its own, loaded;
    ``options``: the other Engine arguments (context_size, token_budget, ...). An engine from
    before the backend factory (``step_bench.py`` measures other checkouts too) takes the
    threads and GPU layers itself."""
    factory = getattr(LlamaBackend, "factory", None)
    if factory is not None:
        options["backend"] = factory(model, threads=threads, gpu_layers=gpu_layers)
    else:
        options.update(threads=threads, gpu_layers=gpu_layers)
    engine = Engine(model, ServerMetrics(slots), slots=slots, **options)
    engine.load()
    return engine


def random_prompt(rng: random.Random, engine: Engine, tokens: int) -> list[int]:
    """``tokens`` random ids of plain tokens (no specials, no byte tokens)."""
    return [rng.randrange(FIRST_PLAIN_TOKEN, engine.n_vocab) for _ in range(tokens)]


@dataclass
class Tracked:
    """One request's events: text chunks (text, tokens, time) and how it ended."""

    submitted: float = 0.0
    chunks: list[tuple[str, int, float]] = field(default_factory=list)
    end: Finished | Failed | None = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def first_token_at(self) -> float | None:
        return self.chunks[0][2] if self.chunks else None

    @property
    def finished_at(self) -> float | None:
        return self.chunks[-1][2] if self.chunks else None

    @property
    def text(self) -> str:
        return "".join(c[0] for c in self.chunks)

    @property
    def token_times(self) -> list[float]:
        """When each chunk that carried tokens came."""
        return [at for _, n, at in self.chunks if n]


def submit(engine: Engine, prompt: list[int], params: SamplingParams) -> Tracked:
    tracked = Tracked(submitted=time.perf_counter())

    def emit(event: Any) -> None:
        if isinstance(event, TextChunk):
            tracked.chunks.append((event.text, event.n_tokens, time.perf_counter()))
        else:
            tracked.end = event
            tracked.done.set()

    engine.submit(GenerationRequest(prompt_tokens=prompt, params=params, emit=emit))
    return tracked


def wait_all(tracked: list[Tracked], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    return all(t.done.wait(max(0.0, deadline - time.monotonic())) for t in tracked)


# ---- the benchmark ---------------------------------------------------------------------------


def run_batch(
    engine: Engine,
    batch: int,
    prompt_tokens: int,
    gen_tokens: int,
    seed: int,
    sampling: dict[str, Any] | None = None,
) -> dict:
    """``sampling``: SamplingParams fields (default temperature 0.8, top-k 40)."""
    rng = random.Random(seed)
    # One decode step per generated token after the first (sampled from the prefill logits).
    chosen = sampling if sampling is not None else {"temperature": 0.8, "top_k": 40}
    params = SamplingParams(max_tokens=gen_tokens + 1, ignore_eos=True, **chosen)
    prompts = [random_prompt(rng, engine, prompt_tokens) for _ in range(batch)]
    registry = engine.metrics.registry
    decode_before = registry.get_sample_value("llamaherd_decode_step_seconds_sum") or 0.0
    started = time.perf_counter()
    tracked = [submit(engine, prompt, params) for prompt in prompts]
    if not wait_all(tracked, 600):
        raise RuntimeError(f"batch of {batch} did not finish in 600 s")
    failures = [t.end.message for t in tracked if isinstance(t.end, Failed)]
    if failures:
        raise RuntimeError(f"engine failed: {failures[0]}")
    times = [t.token_times for t in tracked]
    first = max(t[0] for t in times)
    last = max(t[-1] for t in times)
    decode_s = (
        registry.get_sample_value("llamaherd_decode_step_seconds_sum") or 0.0
    ) - decode_before
    tg = batch * gen_tokens / (last - first)
    total = batch * (prompt_tokens + gen_tokens) / (last - started)
    return {
        "tg_tokens_per_s": tg,
        "total_tokens_per_s": total,
        "wall_s": last - started,
        "window_s": last - first,
        # Decode steps every sequence took part in (its tokens after the first).
        "steps": min(len(x) for x in times) - 1,
        # Share of the run spent inside llama_decode; the rest is Python, sampling, waiting.
        "decode_fraction": decode_s / (last - started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--gen-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--context-size", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-layers", type=int, default=0, help="n_gpu_layers (-1 = all)")
    parser.add_argument("--json", type=Path, help="write results here")
    args = parser.parse_args()

    batches = [int(b) for b in args.batches.split(",")]
    engine = load_engine(
        args.model,
        args.slots,
        context_size=args.context_size,
        token_budget=args.token_budget,
        threads=args.threads,
        gpu_layers=args.gpu_layers,
    )
    try:
        run_batch(engine, max(batches), args.prompt_tokens, 8, seed=0)  # warm-up
        out: dict[str, Any] = {}
        for b in batches:
            runs = [
                run_batch(engine, b, args.prompt_tokens, args.gen_tokens, seed=100 * b + k)
                for k in range(args.repeats)
            ]
            out[str(b)] = {
                key: statistics.median(r[key] for r in runs)
                for key in ("tg_tokens_per_s", "total_tokens_per_s", "wall_s", "decode_fraction")
            }
            out[str(b)]["runs_tg_tokens_per_s"] = [r["tg_tokens_per_s"] for r in runs]
            print(
                f"[engine] B={b:2d}  TG {out[str(b)]['tg_tokens_per_s']:7.1f} tok/s  "
                f"total {out[str(b)]['total_tokens_per_s']:7.1f} tok/s  "
                f"in llama_decode {out[str(b)]['decode_fraction']:.1%}",
                flush=True,
            )
    finally:
        engine.close()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
