"""Serving benchmark: llamaherd against llama-server and one-at-a-time serving.

    python bench/run.py            # full run (make bench)
    python bench/run.py --quick    # fewer points and requests (make bench-quick)

Starts the three servers on the same generated model (loopback ports), warms them up, then
sweeps closed-loop concurrency (systems take turns at every point, so a change in background
load hits all three alike), runs an open-loop Poisson point, the engine-only microbenchmark and
llama-batched-bench, and writes ``results.json``, ``results.md`` and plots (see report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import report
from common import (
    PYTHON,
    RESULTS,
    ROOT,
    ForeignCpu,
    RssSampler,
    Server,
    batched_bench_command,
    ensure_binaries,
    free_port,
    generated_model,
    llama_server_command,
    llamaherd_hist,
    loadavg,
    log,
    parse_batched_bench,
    rss_kb,
    running,
    server_batch,
    server_command,
)

SLOTS = 16
CONTEXT = 512
THREADS = 2
BATCH = 512
# Layers on the GPU (-1 = all) for every system; None: no flag at all (llama-server's default).
GPU_LAYERS: int | None = None
# Below this many seconds of the time budget, a load point is skipped.
MIN_POINT_S = 10.0
# The systems whose /metrics tell how many sequences share a decode.
BATCH_METRICS = ("llamaherd", "llama-server")


# ---- phases --------------------------------------------------------------------------


class Budget:
    """What is left of ``--time-budget-s`` (infinite without one)."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def limit(self, most: float) -> float:
        """A time limit for the next phase: ``most``, or what is left when that is less."""
        return max(1.0, min(most, self.left()))


def model_facts(path: Path) -> dict[str, Any]:
    """Parameters (millions, from the tensor shapes) and vocabulary size of a GGUF model."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    return {
        "params_m": round(sum(int(t.n_elements) for t in reader.tensors) / 1e6, 1),
        "vocab": len(tokens.data) if tokens is not None else None,
    }


def gpu_layers_flags(flag: str, value: int | None, all_word: str | None = None) -> list[str]:
    """``[flag, value]`` when a GPU layer count is set (``all_word`` stands for -1)."""
    if value is None:
        return []
    return [flag, all_word if value == -1 and all_word else str(value)]


def ensure_model() -> Path:
    return generated_model(
        "bench-seed0", ["--preset", "bench", "--seed", "0"], "the bench model (~220M, F16)"
    )


def llamaherd_command(model: Path, port: int) -> list[str]:
    return server_command(
        model,
        port,
        *("--slots", str(SLOTS), "--context-size", str(CONTEXT), "--threads", str(THREADS)),
        *("--token-budget", str(BATCH), "--log-level", "warning"),
        *gpu_layers_flags("--gpu-layers", GPU_LAYERS),
    )


def baseline_command(model: Path, port: int) -> list[str]:
    return [
        PYTHON,
        str(ROOT / "bench" / "baseline_server.py"),
        *("--model", str(model), "--port", str(port), "--context-size", str(CONTEXT)),
        *("--threads", str(THREADS), "--batch", str(BATCH)),
        *gpu_layers_flags("--gpu-layers", GPU_LAYERS),
    ]


def make_servers(model: Path, bindir: Path, logdir: Path) -> list[Server]:
    ports = [free_port() for _ in range(3)]
    llama_server = llama_server_command(
        bindir, model, ports[1], SLOTS, CONTEXT, THREADS, BATCH,
        *("--cache-ram", "0", *gpu_layers_flags("-ngl", GPU_LAYERS, "all")),
    )  # fmt: skip
    return [
        Server(
            "llamaherd",
            llamaherd_command(model, ports[0]),
            ports[0],
            logdir / "llamaherd.log",
            label="llamaherd (continuous batching)",
        ),
        Server(
            "llama-server",
            llama_server,
            ports[1],
            logdir / "llama-server.log",
            "/health",
            label="llama-server (llama.cpp, same source)",
        ),
        Server(
            "one-at-a-time",
            baseline_command(model, ports[2]),
            ports[2],
            logdir / "one-at-a-time.log",
            "/health",
            label="one-at-a-time (llama_cpp.Llama behind a lock)",
        ),
    ]


def python_baseline_rss() -> dict[str, int | None]:
    """RSS of a bare interpreter, and of one that imported the server's stack (no model)."""
    out: dict[str, int | None] = {}
    code = {
        "bare": "import sys; print('up', flush=True); sys.stdin.read()",
        "imports": "import llamaherd_server.api, llama_cpp, uvicorn, sys; "
        "print('up', flush=True); sys.stdin.read()",
    }
    for name, src in code.items():
        proc = subprocess.Popen(
            [PYTHON, "-c", src], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
        )
        assert proc.stdout is not None and proc.stdin is not None
        proc.stdout.readline()
        out[name] = rss_kb(proc.pid)
        proc.stdin.close()
        proc.wait(timeout=30)
    return out


async def warm_up(server: Server, workload: loadgen.Workload, model_name: str) -> None:
    warm = dataclasses.replace(workload, max_tokens=8, seed=workload.seed + 99)
    results, _ = await loadgen.closed_loop(
        server.base + "/v1/completions",
        lambda i: warm.payload(i, model_name),
        concurrency=4,
        n_requests=4,
        time_limit_s=300,
    )
    bad = [r.error for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"{server.name}: warm-up failed: {bad[0]}")


async def run_point(
    server: Server,
    workload: loadgen.Workload,
    model_name: str,
    *,
    concurrency: int | None,
    rate: float | None,
    n_requests: int,
    first_index: int,
    our_pids: list[int],
    time_limit_s: float = 600.0,
) -> dict[str, Any]:
    url = server.base + "/v1/completions"
    if rate is None:
        assert concurrency is not None
        load = functools.partial(loadgen.closed_loop, concurrency=concurrency)
    else:
        load = functools.partial(loadgen.open_loop, rate=rate)
    before_text = server.scrape()
    load_before = loadavg()
    with RssSampler(server.pid) as rss, ForeignCpu(our_pids) as foreign:
        results, wall = await load(
            url,
            lambda i: workload.payload(i, model_name),
            n_requests=n_requests,
            first_index=first_index,
            time_limit_s=time_limit_s,
        )
    after_text = server.scrape()
    summary = loadgen.summarize(results, wall, workload.max_tokens)
    summary["rss_peak_kb"] = rss.peak
    summary["loadavg_before"] = load_before
    summary["loadavg_after"] = loadavg()
    summary["foreign_cpu_cores"] = round(foreign.cores, 3)
    summary["steal_cpu_cores"] = round(foreign.steal_cores, 3)
    summary["_raw"] = (results, wall)
    if server.name in BATCH_METRICS:
        summary["batch"] = server_batch(server.name, before_text, after_text)
    if server.name == "llamaherd":
        # Share of the wall time the engine spent inside llama_decode (the rest: Python).
        d0 = llamaherd_hist(before_text, "llamaherd_decode_step_seconds")
        d1 = llamaherd_hist(after_text, "llamaherd_decode_step_seconds")
        if d0 and d1 and summary["batch"]:
            summary["batch"]["decode_busy_fraction"] = (d1["sum"] - d0["sum"]) / wall
    return summary


def merge_rounds(parts: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """One point measured in several rounds (systems taking turns): pool the requests."""
    requests = [r for p in parts for r in p["_raw"][0]]
    wall = sum(p["_raw"][1] for p in parts)
    merged = loadgen.summarize(requests, wall, max_tokens)
    merged["rounds"] = len(parts)
    merged["rss_peak_kb"] = max(p["rss_peak_kb"] for p in parts)
    merged["loadavg_before"] = parts[0]["loadavg_before"]
    merged["loadavg_after"] = parts[-1]["loadavg_after"]
    for key in ("foreign_cpu_cores", "steal_cpu_cores"):
        merged[key] = round(sum(p[key] * p["_raw"][1] for p in parts) / wall, 3)
    batches = [p["batch"] for p in parts if p.get("batch")]
    if batches:
        steps = sum(b["steps"] for b in batches)
        batch: dict[str, Any] = {
            "steps": steps,
            "mean": sum(b["mean"] * b["steps"] for b in batches) / steps,
        }
        if all("le_counts" in b for b in batches):
            counts: dict[str, int] = {}
            for b in batches:
                for le, n in b["le_counts"].items():
                    counts[le] = counts.get(le, 0) + n
            batch["le_counts"] = dict(sorted(counts.items(), key=lambda kv: float(kv[0])))
        busy = [
            (p["batch"]["decode_busy_fraction"], p["_raw"][1])
            for p in parts
            if p.get("batch") and "decode_busy_fraction" in p["batch"]
        ]
        if busy:
            batch["decode_busy_fraction"] = sum(f * w for f, w in busy) / sum(w for _, w in busy)
        merged["batch"] = batch
    return merged


def describe(summary: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        v = summary[key]["p50"]
        return "-" if v is None else f"{v:.0f}"

    return (
        f"{summary['tokens_per_s']:6.1f} tok/s  TTFT p50 {ms('ttft_ms')} ms  "
        f"ITL p50 {ms('itl_ms')} ms  ok {summary['ok']}/{summary['requests']}  "
        f"other CPU {summary['foreign_cpu_cores']:.2f}, steal {summary['steal_cpu_cores']:.2f}"
    )


# The seed tutorial's load test (shared/SEED-tutorial.md, "Step 5: Testing"): prompt
# "Explain topic {i}", max_tokens 100, priority i % 3, waves of 50 concurrent requests, against
# its targets (>500 tokens/s, p50 latency <200 ms, p95 <500 ms, batch efficiency >90%).
SEED_SYSTEMS = ("llamaherd", "llama-server")


def seed_request(system: str, i: int, max_tokens: int, model_name: str) -> tuple[str, dict]:
    """The path and body of seed request ``i``: llamaherd gets the tutorial's own
    ``/v1/generate`` body; llama-server the same prompt over ``/v1/completions`` with
    llamaherd's /v1/generate sampling defaults (temperature 0.7, nothing else)."""
    prompt = f"Explain topic {i}"
    if system == "llamaherd":
        return "/v1/generate", {"prompt": prompt, "max_tokens": max_tokens, "priority": i % 3}
    return "/v1/completions", {
        "model": model_name,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
        "samplers": ["top_k", "temperature"],
    }


async def run_seed_workload(
    server: Server,
    model_name: str,
    *,
    n_requests: int,
    wave: int,
    max_tokens: int,
    time_limit_s: float,
) -> dict[str, Any]:
    path, _ = seed_request(server.name, 0, max_tokens, model_name)
    before_text = server.scrape()
    with GpuSampler() as gpu:
        results, wall = await loadgen.waves(
            server.base + path,
            lambda i: seed_request(server.name, i, max_tokens, model_name)[1],
            n_requests=n_requests,
            wave=wave,
            time_limit_s=time_limit_s,
        )
    after_text = server.scrape()
    summary = loadgen.summarize_waves(results, wall)
    summary["path"] = path
    summary["gpu"] = gpu.summary
    summary["batch"] = server_batch(server.name, before_text, after_text)
    if summary["batch"]:
        # Sequences per decode against the most that could share one.
        summary["batch"]["efficiency"] = summary["batch"]["mean"] / min(wave, SLOTS)
    return summary


def run_engine_bench(
    model: Path, batches: list[int], repeats: int, tmp: Path, timeout_s: float = 900.0
) -> dict[str, Any]:
    out = tmp / "engine.json"
    subprocess.run(
        [
            PYTHON,
            str(ROOT / "bench" / "engine_bench.py"),
            *("--model", str(model), "--batches", ",".join(map(str, batches))),
            *("--repeats", str(repeats), "--threads", str(THREADS), "--slots", str(SLOTS)),
            *("--context-size", str(CONTEXT), "--token-budget", str(BATCH), "--json", str(out)),
            *gpu_layers_flags("--gpu-layers", GPU_LAYERS),
        ],
        check=True,
        timeout=timeout_s,
        cwd=ROOT,
    )
    return json.loads(out.read_text())


def run_batched_bench(
    bindir: Path, model: Path, batches: list[int], repeats: int, timeout_s: float = 600.0
) -> dict[str, Any]:
    argv = batched_bench_command(
        bindir, model, SLOTS * CONTEXT, BATCH, 32, 48, batches, THREADS,
        *gpu_layers_flags("-ngl", GPU_LAYERS, "all"),
    )  # fmt: skip
    runs = []
    deadline = time.monotonic() + timeout_s
    for _ in range(repeats):
        left = max(1.0, deadline - time.monotonic())
        out = subprocess.run(argv, capture_output=True, text=True, timeout=left, check=True)
        runs.append(parse_batched_bench(out.stdout + out.stderr))
    rows: dict[str, dict[str, Any]] = {}
    for b in runs[0]:
        vals = [r[b] for r in runs if b in r]
        rows[b] = {
            key: sorted(v[key] for v in vals)[len(vals) // 2]
            for key in ("tg_tokens_per_s", "total_tokens_per_s", "pp_tokens_per_s")
        }
        rows[b]["runs_tg_tokens_per_s"] = [v["tg_tokens_per_s"] for v in vals]
    return {"argv": " ".join(argv), "rows": rows}


def gpu_info() -> list[dict[str, str]] | None:
    """The NVIDIA GPUs nvidia-smi lists (name, memory, driver), or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,memory.total,driver_version,compute_cap"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    keys = query.split(",")
    return [
        dict(zip(keys, (c.strip() for c in line.split(",")), strict=False))
        for line in out.splitlines()
        if line.strip()
    ]


def parse_gpu_samples(text: str) -> list[tuple[float, float]]:
    """(utilization %, memory used MiB) per line of ``nvidia-smi --query-gpu=utilization.gpu,
    memory.used --format=csv,noheader,nounits``; lines that are not two numbers are skipped."""
    samples = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 2:
            continue
        try:
            samples.append((float(cells[0]), float(cells[1])))
        except ValueError:
            continue
    return samples


class GpuSampler:
    """GPU utilization and memory from ``nvidia-smi`` every ``interval_ms`` while a phase runs;
    nothing without nvidia-smi."""

    def __init__(self, interval_ms: int = 100) -> None:
        self.interval_ms = interval_ms
        self.summary: dict[str, Any] | None = None
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    f"--loop-ms={self.interval_ms}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            out, _ = self._proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate()
        samples = parse_gpu_samples(out)
        if samples:
            utils = [u for u, _ in samples]
            self.summary = {
                "samples": len(samples),
                "utilization_mean_pct": sum(utils) / len(utils),
                "utilization_max_pct": max(utils),
                "memory_used_max_mib": max(m for _, m in samples),
            }


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    commit = ""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    import llama_cpp

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "git_commit": commit,
        "gpu": gpu_info(),
    }


@dataclass
class Plan:
    """The points a run measures: the mode's (full or ``--quick``), as the flags override them."""

    quick: bool
    concurrencies: list[int]
    engine_batches: list[int]
    repeats: int
    rounds: int
    requests: int | None = None
    requests_per_stream: int | None = None
    requests_min: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        if args.quick:
            plan = cls(True, [1, 4, 16], [1, 4, 16], repeats=1, rounds=1)
        else:
            plan = cls(False, [1, 2, 4, 8, 16, 32], [1, 2, 4, 8, 16], repeats=3, rounds=2)
        plan.rounds = args.rounds or plan.rounds
        if args.concurrency:
            plan.concurrencies = [int(c) for c in args.concurrency.split(",")]
        if args.engine_batches:
            plan.engine_batches = [int(b) for b in args.engine_batches.split(",")]
        plan.repeats = args.repeats or plan.repeats
        plan.requests = args.requests
        plan.requests_per_stream = args.requests_per_stream
        plan.requests_min = args.requests_min
        return plan

    def n_requests(self, c: int) -> int:
        if self.requests:
            return self.requests
        if self.requests_per_stream:
            return max(self.requests_min or 0, self.requests_per_stream * c)
        return max(8, c) if self.quick else max(24, 4 * c)

    def per_round(self, c: int) -> int:
        return max(c, self.n_requests(c) // self.rounds)


def run_meta(
    args: argparse.Namespace,
    plan: Plan,
    model: Path,
    facts: dict[str, Any],
    workload: loadgen.Workload,
    started: dt.datetime,
) -> dict[str, Any]:
    """What results.json says about the run before it measures anything."""
    seed = {
        "requests": args.seed_requests,
        "wave": args.seed_concurrency,
        "max_tokens": args.seed_max_tokens,
    }
    return {
        "mode": "quick" if args.quick else "full",
        "started": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "model": {"path": str(model), "params_m": facts["params_m"], "dtype": "f16"},
        "workload": {
            "prompt_tokens": workload.prompt_tokens,
            "max_tokens": workload.max_tokens,
            "temperature": workload.temperature,
            "top_k": workload.top_k,
            "concurrency": plan.concurrencies,
            "requests_per_point": {
                str(c): plan.per_round(c) * plan.rounds for c in plan.concurrencies
            },
            "rounds": plan.rounds,
            "open_loop": None
            if args.quick
            else {"rate_rps": args.open_rate, "requests": args.open_requests},
            "seed": seed if args.seed_workload else None,
        },
        "server_config": {
            "slots": SLOTS,
            "context_per_slot": CONTEXT,
            "threads": THREADS,
            "batch": BATCH,
            "gpu_layers": GPU_LAYERS,
        },
        "time_budget_s": args.time_budget_s,
        "loadavg_start": loadavg(),
    }


@dataclass
class Phases:
    """The phases of one run, in order, writing into ``results``; what the time budget did not
    leave room for is named in ``skipped``."""

    args: argparse.Namespace
    plan: Plan
    workload: loadgen.Workload
    model_name: str
    results: dict[str, Any]
    budget: Budget
    skipped: list[str] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)
    our_pids: list[int] = field(default_factory=list)

    def engine_only(self, model: Path, bindir: Path) -> None:
        if self.budget.left() < 4 * MIN_POINT_S:
            self.skipped.append("engine-only microbenchmark")
            return
        log("engine-only microbenchmark (llamaherd Engine, no HTTP)")
        batches, repeats = self.plan.engine_batches, self.plan.repeats
        try:
            self.results["engine"] = {
                "llamaherd": run_engine_bench(
                    model, batches, repeats, self.args.tmp, self.budget.limit(900)
                ),
                "batched_bench": run_batched_bench(
                    bindir, model, batches, repeats, self.budget.limit(600)
                ),
                "loadavg_after": loadavg(),
            }
        except subprocess.TimeoutExpired:
            self.skipped.append("engine-only microbenchmark (ran out of the time budget)")

    async def warm_up(self, servers: list[Server]) -> None:
        """Record each ready server, warm it up, record its idle RSS."""
        self.servers = servers
        for s in servers:
            s.info = {"label": s.label, "argv": s.argv, "rss_ready_kb": rss_kb(s.pid)}
            self.results["systems"][s.name] = s.info
            self.results["closed_loop"][s.name] = {}
        for s in servers:
            await warm_up(s, self.workload, self.model_name)
            time.sleep(1.0)
            s.info["rss_idle_kb"] = rss_kb(s.pid)
            log(f"{s.name} ready, idle RSS {s.info['rss_idle_kb'] / 1024:.0f} MiB")
        self.our_pids = [os.getpid()] + [s.pid for s in servers]

    def out_of_time(self, what: str) -> bool:
        if self.budget.left() >= MIN_POINT_S:
            return False
        self.skipped.append(what)
        return True

    async def seed_workload(self) -> None:
        args = self.args
        self.results["seed"] = {}
        for s in self.servers:
            if s.name not in SEED_SYSTEMS or self.out_of_time(f"seed workload {s.name}"):
                continue
            seed = await run_seed_workload(
                s,
                self.model_name,
                n_requests=args.seed_requests,
                wave=args.seed_concurrency,
                max_tokens=args.seed_max_tokens,
                time_limit_s=self.budget.limit(600),
            )
            self.results["seed"][s.name] = seed
            log(
                f"seed workload {s.name:14s} {seed['tokens_per_s']:7.1f} tok/s  latency "
                f"p50 {seed['latency_ms']['p50'] or 0:.0f} ms p95 "
                f"{seed['latency_ms']['p95'] or 0:.0f} ms  ok {seed['ok']}/{seed['requests']}"
            )

    async def point(self, s: Server, *, c: int | None, n: int, first: int) -> dict[str, Any]:
        """One load point of ``s``: closed loop at ``c`` streams, or the open loop."""
        return await run_point(
            s,
            self.workload,
            self.model_name,
            concurrency=c,
            rate=None if c is not None else self.args.open_rate,
            n_requests=n,
            first_index=first,
            our_pids=self.our_pids,
            time_limit_s=self.budget.limit(600),
        )

    async def closed_loop(self) -> int:
        """The concurrency sweep; returns the next free request index."""
        servers, rounds = self.servers, self.plan.rounds
        index = 0
        for k, c in enumerate(self.plan.concurrencies):
            # Take turns, rotating who goes first and reversing the order every other round,
            # so that drift in background load is shared by all three.
            parts: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
            per_round = self.plan.per_round(c)
            for r in range(rounds):
                order = servers[k % len(servers) :] + servers[: k % len(servers)]
                for s in order[:: -1 if r % 2 else 1]:
                    if self.out_of_time(f"c={c} {s.name} round {r + 1}"):
                        continue
                    part = await self.point(s, c=c, n=per_round, first=index)
                    parts[s.name].append(part)
                    log(f"c={c:2d} {s.name:14s} {describe(part)}")
                index += per_round
            for s in servers:
                if not parts[s.name]:
                    continue
                merged = merge_rounds(parts[s.name], self.workload.max_tokens)
                self.results["closed_loop"][s.name][str(c)] = merged
                if rounds > 1:
                    log(f"c={c:2d} {s.name:14s} {describe(merged)} (all rounds)")
        return index

    async def open_loop(self, first: int) -> None:
        for s in self.servers:
            if self.out_of_time(f"open loop {s.name}"):
                continue
            summary = await self.point(s, c=None, n=self.args.open_requests, first=first)
            summary.pop("_raw")
            self.results["open_loop"][s.name] = summary
            log(f"open loop {self.args.open_rate}/s {s.name:14s} {describe(summary)}")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    plan = Plan.from_args(args)
    model = args.model or ensure_model()
    facts = model_facts(model)
    workload = loadgen.Workload(
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        vocab=facts["vocab"] or loadgen.Workload.vocab,
    )
    bindir = args.bindir or ensure_binaries()
    started = dt.datetime.now(dt.UTC)
    results: dict[str, Any] = {
        "meta": run_meta(args, plan, model, facts, workload, started),
        "systems": {},
        "closed_loop": {},
        "open_loop": {},
    }
    log(f"machine load average at start: {loadavg()}")
    results["python_baseline_rss_kb"] = python_baseline_rss()
    phases = Phases(args, plan, workload, model.stem, results, Budget(args.time_budget_s))
    if not args.skip_engine:
        phases.engine_only(model, bindir)
    servers = make_servers(model, bindir, args.logs or args.tmp)
    if args.systems:
        keep = set(args.systems.split(","))
        servers = [s for s in servers if s.name in keep]
    with running(servers):
        await phases.warm_up(servers)
        if args.seed_workload:
            await phases.seed_workload()
        index = await phases.closed_loop()
        if not args.quick:
            await phases.open_loop(index)
        for s in servers:
            s.info["rss_idle_after_kb"] = rss_kb(s.pid)
    if phases.skipped:
        log(f"skipped for the time budget: {', '.join(phases.skipped)}")
    results["meta"]["skipped"] = phases.skipped
    results["meta"]["loadavg_end"] = loadavg()
    results["meta"]["duration_s"] = round((dt.datetime.now(dt.UTC) - started).total_seconds())
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer points and requests")
    parser.add_argument(
        "--out", type=Path, help="default: bench/results (full), bench/results/quick (quick)"
    )
    parser.add_argument("--concurrency", help="comma-separated list (overrides the mode's)")
    parser.add_argument("--requests", type=int, help="requests per point (overrides the mode's)")
    parser.add_argument(
        "--requests-per-stream",
        type=int,
        help="requests per point = max(--requests-min, this x concurrency) (overrides the mode's)",
    )
    parser.add_argument("--requests-min", type=int, help="see --requests-per-stream")
    parser.add_argument("--rounds", type=int, help="rounds per point (overrides the mode's)")
    parser.add_argument("--systems", help="comma-separated subset of the three systems")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--open-rate", type=float, default=4.0, help="open loop, requests/s")
    parser.add_argument("--open-requests", type=int, default=48)
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--engine-batches", help="engine-only batch sizes (overrides the mode's)")
    parser.add_argument("--repeats", type=int, help="engine-only runs per batch size")
    parser.add_argument("--threads", type=int, default=THREADS, help="llama.cpp threads")
    parser.add_argument("--slots", type=int, default=SLOTS, help="parallel sequences per server")
    parser.add_argument(
        "--context-size", type=int, default=CONTEXT, help="tokens per slot (llama-server: x slots)"
    )
    parser.add_argument("--batch", type=int, default=BATCH, help="llama.cpp batch / token budget")
    parser.add_argument(
        "--gpu-layers", type=int, help="layers on the GPU for every system (-1 = all)"
    )
    parser.add_argument("--model", type=Path, help="a GGUF model (default: the bench preset)")
    parser.add_argument(
        "--bindir", type=Path, help="llama-server and llama-batched-bench (default: build them)"
    )
    parser.add_argument(
        "--seed-workload",
        action="store_true",
        help="also the seed tutorial's load test (llamaherd /v1/generate, llama-server)",
    )
    parser.add_argument("--seed-requests", type=int, default=200)
    parser.add_argument("--seed-concurrency", type=int, default=50, help="requests per wave")
    parser.add_argument("--seed-max-tokens", type=int, default=100)
    parser.add_argument(
        "--time-budget-s",
        type=float,
        help="stop starting phases and load points past this many seconds; results stay",
    )
    parser.add_argument("--logs", type=Path, help="write the server logs here (kept)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the server logs")
    return parser.parse_args()


def main() -> None:
    global SLOTS, CONTEXT, THREADS, BATCH, GPU_LAYERS
    args = parse_args()
    SLOTS, CONTEXT, THREADS, BATCH = args.slots, args.context_size, args.threads, args.batch
    GPU_LAYERS = args.gpu_layers
    if args.out is None:
        args.out = RESULTS / ("quick" if args.quick else "")
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    args.tmp = Path(tempfile.mkdtemp(prefix="llamaherd-bench-"))
    # A terminated run stops its servers on the way out (the finally blocks), as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        results = asyncio.run(main_async(args))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        report.write_report(results, args.out)
        log(f"wrote {args.out}/results.json, results.md and plots")
        print((args.out / "results.md").read_text())
    finally:
        if args.keep_logs:
            log(f"server logs kept in {args.tmp}")
        else:
            shutil.rmtree(args.tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
