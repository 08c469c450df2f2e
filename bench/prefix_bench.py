"""Prefix-cache benchmark: the traffic that repeats itself, against llama-server's prompt cache.

    python bench/prefix_bench.py            # full run (make bench-prefix)
    python bench/prefix_bench.py --quick    # 3 concurrency points, fewer requests

Three systems on the same generated model (the demo shape, ~33M parameters), same slots,
context, threads and batch sizes, all started once and warmed up:

- ``llamaherd``: the server as shipped (prefix cache on);
- ``llamaherd-no-cache``: the same server with ``--no-prefix-cache``;
- ``llama-server``: llama.cpp's server from the same vendored source, with its prompt cache on
  as by default (``cache_prompt`` true, host-memory cache at its default size).

Four workloads of text prompts over ``/v1/completions`` (streaming, 64 output tokens with
``ignore_eos``, the same sampler chain on every system), closed loop at each concurrency, the
systems taking turns at every point (the order rotates):

- ``shared``: 4 system prompts of ~512 tokens; each request one of them at random plus a short
  distinct user message;
- ``many``: the same with 32 system prompts, more than the 16 slots;
- ``multi-turn``: conversations of 4-8 turns, each opening with a distinct ~200-token message,
  each turn resending the whole history (with the answers as the server gave them);
- ``unique``: no sharing at all: a distinct ~128-token prompt per request.

Per point: output tokens/s, TTFT and ITL percentiles, and the share of prompt tokens each
system served from its cache (llamaherd: ``usage.prompt_tokens_details.cached_tokens``;
llama-server: ``timings.cache_n``). Writes ``results.json``, ``results.md`` and ``ttft.png``
into ``bench/results/prefix/`` (``--quick``: ``bench/results/quick/prefix/``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
from common import (
    RESULTS,
    ForeignCpu,
    Server,
    counter,
    ensure_binaries,
    free_port,
    generated_model,
    llama_server_command,
    log,
    running,
    server_command,
    table_head,
)

SLOTS = 16
CONTEXT = 2048  # per slot: a multi-turn conversation grows to ~1,000 tokens
THREADS = 2
BATCH = 512
MAX_TOKENS = 64
WORKLOADS = ("shared", "many", "multi-turn", "unique")
SAMPLING = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 1.0,
    "min_p": 0.0,
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
    # llama-server only: its prompt cache on (the default, said out loud) and exactly
    # llamaherd's sampler chain.
    "cache_prompt": True,
    "samplers": ["top_k", "temperature"],
}

_WORD_LIST = """
cluster pod node queue replica model token prompt cache slot latency batch stream request answer
question server client gateway scale metric alert llama herd field river mountain window garden
letter number system policy budget memory thread kernel vector matrix layer weight signal record
table column schedule report
"""
WORDS = tuple(_WORD_LIST.split())


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Texts:
    """Prompt texts sized in tokens with the model's own tokenizer."""

    def __init__(self, model: Path) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)

    def count(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=True))

    def sized(self, rng: random.Random, tokens: int, head: str = "") -> str:
        text = head
        while self.count(text) < tokens:
            text += " " + words(rng, 8)
        return text


@dataclass
class Workload:
    name: str
    texts: Texts
    seed: int = 1234

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        n_systems = {"shared": 4, "many": 32}.get(self.name, 0)
        self.systems = [
            self.texts.sized(rng, 512, f"System {k}: you are assistant number {k}.")
            for k in range(n_systems)
        ]

    def request(self, index: int) -> str:
        """The prompt of request ``index`` (independent requests)."""
        rng = random.Random(self.seed * 7919 + index)
        if self.name == "unique":
            return self.texts.sized(rng, 128, f"Request {index}:")
        system = rng.choice(self.systems)
        return f"{system}\nUser {index}: {words(rng, 10)}?\nAssistant:"

    def conversation(self, index: int) -> tuple[str, list[str]]:
        """An opening message and the user turns of conversation ``index``."""
        rng = random.Random(self.seed * 104729 + index)
        opening = self.texts.sized(rng, 200, f"Conversation {index}. Read this:")
        turns = [f"{words(rng, 12)}?" for _ in range(rng.randint(4, 8))]
        return opening, turns


def payload(prompt: str, index: int, model: str) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "seed": index, **SAMPLING}


async def closed_loop(
    url: str,
    workload: Workload,
    model: str,
    concurrency: int,
    n_requests: int,
    first_index: int,
) -> tuple[list[loadgen.RequestResult], float]:
    """``concurrency`` streams; for multi-turn each stream runs whole conversations (each turn
    sent when the last answer is in), for the others each sends one request after another."""
    results: list[loadgen.RequestResult] = []
    state = {"next": 0}
    deadline = time.perf_counter() + 900

    async with loadgen.make_client(concurrency + 4, 900) as client:

        async def independent() -> None:
            while state["next"] < n_requests and time.perf_counter() < deadline:
                i = first_index + state["next"]
                state["next"] += 1
                body = payload(workload.request(i), i, model)
                results.append(await loadgen.stream_one(client, url, body, i))

        async def conversations() -> None:
            while state["next"] < n_requests and time.perf_counter() < deadline:
                # Conversations in a fixed order, so that every system gets the same ones.
                c = first_index + state.setdefault("conversation", 0)
                state["conversation"] += 1
                opening, turns = workload.conversation(c)
                history = f"User: {opening}"
                for t, turn in enumerate(turns):
                    state["next"] += 1
                    history += f"\nUser: {turn}\nAssistant:"
                    i = c * 100 + t
                    r = await loadgen.stream_one(client, url, payload(history, i, model), i)
                    results.append(r)
                    if not r.ok:
                        break
                    history += r.text

        worker: Callable[[], Any] = conversations if workload.name == "multi-turn" else independent
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return results, wall


def make_servers(model: Path, bindir: Path, logdir: Path) -> list[Server]:
    ports = [free_port() for _ in range(3)]

    def llamaherd(name: str, port: int, *extra: str) -> Server:
        argv = server_command(
            model,
            port,
            *("--slots", str(SLOTS), "--context-size", str(CONTEXT), "--threads", str(THREADS)),
            *("--token-budget", str(BATCH), "--log-level", "warning", *extra),
        )
        return Server(name, argv, port, logdir / f"{name}.log", label=name)

    llama_server = llama_server_command(bindir, model, ports[2], SLOTS, CONTEXT, THREADS, BATCH)
    return [
        llamaherd("llamaherd", ports[0]),
        llamaherd("llamaherd-no-cache", ports[1], "--no-prefix-cache"),
        Server(
            "llama-server",
            llama_server,
            ports[2],
            logdir / "ls.log",
            "/health",
            label="llama-server",
        ),
    ]


def ensure_model() -> Path:
    return generated_model(
        "prefix-demo-seed0", ["--preset", "demo", "--seed", "0"], "the model (demo shape, ~33M)"
    )


def hit_ratio(results: list[loadgen.RequestResult]) -> float | None:
    pairs = [(r.cached_tokens, r.prompt_tokens) for r in results if r.ok]
    cached = sum(c for c, _ in pairs if c is not None)
    prompt = sum(p for _, p in pairs if p)
    if not prompt or all(c is None for c, _ in pairs):
        return None
    return cached / prompt


async def measure(
    server: Server, workload: Workload, model: str, c: int, n: int, first: int, pids: list[int]
) -> dict[str, Any]:
    before = server.scrape()
    with ForeignCpu(pids) as foreign:
        results, wall = await closed_loop(
            server.base + "/v1/completions", workload, model, c, n, first
        )
    after = server.scrape()
    summary = loadgen.summarize(results, wall, MAX_TOKENS)
    summary["hit_ratio_reported"] = hit_ratio(results)
    summary["foreign_cpu_cores"] = round(foreign.cores, 3)
    if server.name.startswith("llamaherd"):
        got = {}
        for key in ("llamaherd_prompt_cached_tokens_total", "llamaherd_prompt_tokens_total"):
            a, b = counter(before, key), counter(after, key)
            got[key] = None if a is None or b is None else b - a
        cached, prefilled = got.values()
        if cached is not None and prefilled is not None and cached + prefilled > 0:
            summary["hit_ratio_metrics"] = cached / (cached + prefilled)
    return summary


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def table(results: dict[str, Any]) -> str:
    lines = table_head(
        *("workload", "streams", "system", "tok/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms"),
        *("cache hits", "vs llama-server tok/s", "vs llama-server TTFT p50"),
    )
    for name, points in results["workloads"].items():
        for c, systems in points.items():
            base = systems.get("llama-server")
            for system, s in systems.items():
                hits = s.get("hit_ratio_metrics", s.get("hit_ratio_reported"))
                tps = ratio(s["tokens_per_s"], base and base["tokens_per_s"])
                ttft = ratio(
                    base and base["ttft_ms"]["p50"], s["ttft_ms"]["p50"]
                )  # > 1: faster first token than llama-server
                lines.append(
                    f"| {name} | {c} | {system} | {s['tokens_per_s']:.1f} | "
                    f"{s['ttft_ms']['p50'] or 0:.0f} | {s['ttft_ms']['p95'] or 0:.0f} | "
                    f"{s['itl_ms']['p50'] or 0:.0f} | "
                    f"{'-' if hits is None else f'{hits:.0%}'} | "
                    f"{'-' if tps is None else f'{tps:.2f}x'} | "
                    f"{'-' if ttft is None else f'{ttft:.2f}x'} |"
                )
    return "\n".join(lines)


# (workload, concurrency or None for all, what, bound): the musts and targets.
TARGETS = [
    ("shared", None, "tok/s and TTFT p50 vs llama-server", 1.0),
    ("shared", 16, "tok/s vs llama-server", 1.3),
    ("many", 16, "tok/s vs llama-server", 1.5),
    ("multi-turn", None, "tok/s and TTFT p50 vs llama-server", 1.0),
    ("unique", None, "tok/s vs no cache", 0.97),
]


def verdicts(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(target, measured, bound, pass/MISS) rows for the README."""
    rows = []
    for name, only, what, bound in TARGETS:
        points = results["workloads"].get(name)
        if not points:
            continue
        for c, systems in points.items():
            if only is not None and int(c) != only:
                continue
            ours = systems.get("llamaherd")
            base = systems.get("llamaherd-no-cache" if name == "unique" else "llama-server")
            if not ours or not base:
                continue
            got = [ratio(ours["tokens_per_s"], base["tokens_per_s"])]
            if "TTFT" in what:
                got.append(ratio(base["ttft_ms"]["p50"], ours["ttft_ms"]["p50"]))
            shown = " / ".join("-" if g is None else f"{g:.2f}" for g in got)
            ok = all(g is not None and g >= bound for g in got)
            rows.append(
                (f"{name}, {c} streams: {what}", shown, f">= {bound}", "pass" if ok else "**MISS**")
            )
    return rows


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["workloads"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        points = results["workloads"][name]
        cs = [int(c) for c in points]
        for system in ("llamaherd", "llamaherd-no-cache", "llama-server"):
            ys = [points[str(c)].get(system, {}).get("ttft_ms", {}).get("p50") for c in cs]
            ax.plot(cs, ys, marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("TTFT p50 (ms)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def describe(workload: str, c: int, system: str, s: dict[str, Any]) -> str:
    hits = s.get("hit_ratio_metrics", s.get("hit_ratio_reported"))
    return (
        f"{workload:10s} c={c:2d} {system:18s} "
        f"{s['tokens_per_s']:6.1f} tok/s  TTFT p50 {s['ttft_ms']['p50'] or 0:6.0f}"
        f" ms  ok {s['ok']}/{s['requests']}  hits "
        f"{'-' if hits is None else f'{hits:.0%}'}  other CPU "
        f"{s['foreign_cpu_cores']:.2f}"
    )


async def warm_up(servers: list[Server], model_name: str) -> None:
    """Load the weights into the page cache; fill no cache."""
    async with httpx.AsyncClient(trust_env=False, timeout=120) as client:
        for server in servers:
            r = await client.post(
                server.base + "/v1/completions",
                json={**payload("warm up", 0, model_name), "stream": False},
            )
            r.raise_for_status()


async def sweep(
    args: argparse.Namespace, servers: list[Server], workloads: list[Workload], model_name: str
) -> dict[str, Any]:
    """Every workload at every concurrency, the systems taking turns (the order rotates)."""
    concurrency = [int(c) for c in args.concurrency.split(",")]
    pids = [s.pid for s in servers] + [os.getpid()]
    out: dict[str, Any] = {}
    first = 1_000
    for w in workloads:
        out[w.name] = {}
        for k, c in enumerate(concurrency):
            n = max(args.min_requests, args.per_stream * c)
            if w.name == "multi-turn":
                n = max(args.min_requests, 6 * c)
            point: dict[str, Any] = {}
            order = servers[k % len(servers) :] + servers[: k % len(servers)]
            for server in order:
                point[server.name] = await measure(server, w, model_name, c, n, first, pids)
                log(describe(w.name, c, server.name, point[server.name]))
            first += 10_000
            out[w.name][str(c)] = {s.name: point[s.name] for s in servers if s.name in point}
    return out


def write_results(results: dict[str, Any], out: Path) -> None:
    """results.json, results.md (the table and the targets) and ttft.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    md = f"# Prefix-cache benchmark ({results['date']}, {results['machine']})\n\n"
    md += f"Model {results['model']}, {SLOTS} slots x {CONTEXT} tokens, {THREADS} threads, "
    md += f"{MAX_TOKENS} output tokens.\n\n{table(results)}\n\n"
    md += "\n".join(table_head("target", "measured", "bound", "result")) + "\n"
    md += "".join(f"| {a} | {b} | {c} | {d} |\n" for a, b, c, d in verdicts(results))
    (out / "results.md").write_text(md)
    plot(results, out / "ttft.png")
    log(f"wrote {out}/results.json, results.md, ttft.png")


async def main_async(args: argparse.Namespace) -> None:
    model = ensure_model()
    bindir = ensure_binaries()
    texts = Texts(model)
    workloads = [Workload(name, texts) for name in args.workloads.split(",")]
    logdir = Path(tempfile.mkdtemp(prefix="llamaherd-prefix-bench-"))
    servers = make_servers(model, bindir, logdir)
    if args.systems:
        servers = [s for s in servers if s.name in args.systems.split(",")]
    model_name = model.name.removesuffix(".gguf")
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "model": model.name,
        "slots": SLOTS,
        "context_per_slot": CONTEXT,
        "threads": THREADS,
        "max_tokens": MAX_TOKENS,
        "workloads": {},
    }
    with running(servers):
        await warm_up(servers, model_name)
        results["workloads"] = await sweep(args, servers, workloads, model_name)
    write_results(results, RESULTS / ("quick/prefix" if args.quick else "prefix"))
    print(table(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="concurrency 1,4,16, fewer requests")
    parser.add_argument("--concurrency", default=None, help="comma list (default 1,2,4,8,16)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--systems", default="", help="subset, comma list")
    parser.add_argument("--per-stream", type=int, default=None, help="requests per stream")
    parser.add_argument("--min-requests", type=int, default=None)
    args = parser.parse_args()
    if args.concurrency is None:
        args.concurrency = "1,4,16" if args.quick else "1,2,4,8,16"
    if args.per_stream is None:
        args.per_stream = 2 if args.quick else 4
    if args.min_requests is None:
        args.min_requests = 8 if args.quick else 16
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
