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
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen
import report

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LLAMAHERD_CACHE", Path.home() / ".cache" / "llamaherd"))
PYTHON = sys.executable
SLOTS = 16
CONTEXT = 512
THREADS = 2
BATCH = 512
# Layers on the GPU (-1 = all) for every system; None: no flag at all (llama-server's default).
GPU_LAYERS: int | None = None
# Below this many seconds of the time budget, a load point is skipped.
MIN_POINT_S = 10.0


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies of all CPUs; busy counts all but idle, iowait and steal."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    steal = fields[7] if len(fields) > 7 else 0
    return sum(fields[:8]) - fields[3] - fields[4] - steal, steal


def _process_jiffies(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


class ForeignCpu:
    """CPU used by processes other than ``pids`` (the servers and this load generator)
    while a point runs, in cores: the background load that spoils a measurement."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.cores = 0.0
        self.steal_cores = 0.0  # time the hypervisor gave our virtual CPUs to someone else

    def _sample(self) -> tuple[float, int, int, int]:
        busy, steal = _cpu_jiffies()
        return time.monotonic(), busy, steal, sum(_process_jiffies(p) for p in self.pids)

    def __enter__(self) -> ForeignCpu:
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        t1, busy1, steal1, ours1 = self._sample()
        t0, busy0, steal0, ours0 = self._start
        scale = os.sysconf("SC_CLK_TCK") * max(t1 - t0, 1e-9)
        self.cores = max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / scale)
        self.steal_cores = (steal1 - steal0) / scale


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kb(self.pid) or 0)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kb(self.pid) or 0)


@dataclass
class Server:
    name: str
    label: str
    argv: list[str]
    port: int
    ready_path: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log(f"starting {self.name}: {' '.join(self.argv)}")
        out = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        out.close()
        # Beside the log, for a caller that must clean up after a killed run (bench/gpu.sh).
        self.log_path.with_suffix(".pid").write_text(f"{self.proc.pid}\n")

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = self.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.base + self.ready_path).status_code == 200:
                        return
                time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def scrape(self) -> str | None:
        try:
            r = httpx.get(self.base + "/metrics", timeout=5.0, trust_env=False)
        except httpx.HTTPError:
            return None
        return r.text if r.status_code == 200 else None


# ---- server metrics ------------------------------------------------------------------


def llamaherd_hist(text: str | None, name: str) -> dict[str, Any] | None:
    """Cumulative buckets, sum and count of one llamaherd histogram."""
    if text is None:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        buckets: dict[str, float] = {}
        total = count = 0.0
        for s in family.samples:
            if s.name.endswith("_bucket"):
                buckets[s.labels["le"]] = s.value
            elif s.name.endswith("_sum"):
                total = s.value
            elif s.name.endswith("_count"):
                count = s.value
        return {"buckets": buckets, "sum": total, "count": count}
    return None


def batch_distribution(before: dict | None, after: dict | None) -> dict[str, Any] | None:
    """Per-bucket decode-step counts of one load point (difference of two scrapes)."""
    if before is None or after is None:
        return None
    count = after["count"] - before["count"]
    if count <= 0:
        return None
    old = before["buckets"]
    cumulative = {le: n - old.get(le, 0.0) for le, n in after["buckets"].items()}
    les = sorted(cumulative, key=lambda le: float("inf") if le == "+Inf" else float(le))
    dist: dict[str, int] = {}
    prev = 0.0
    for le in les:
        n = cumulative[le] - prev
        prev = cumulative[le]
        if n > 0:
            dist[le] = int(n)
    return {"steps": int(count), "mean": (after["sum"] - before["sum"]) / count, "le_counts": dist}


def llama_server_decodes(text: str | None) -> dict[str, float] | None:
    """n_decode_total and busy slots summed over decodes, from llama-server's /metrics."""
    if text is None:
        return None
    values = {}
    for line in text.splitlines():
        m = re.match(r"^llamacpp:(\w+) ([0-9.eE+-]+)$", line)
        if m:
            values[m.group(1)] = float(m.group(2))
    n = values.get("n_decode_total")
    per = values.get("n_busy_slots_per_decode")
    if n is None or per is None:
        return None
    return {"decodes": n, "busy": n * per}


def llama_server_batch(before: dict | None, after: dict | None) -> dict[str, Any] | None:
    if before is None or after is None:
        return None
    steps = after["decodes"] - before["decodes"]
    if steps <= 0:
        return None
    return {"steps": int(steps), "mean": (after["busy"] - before["busy"]) / steps}


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


def generated_model(name: str, ggufgen_args: list[str], what: str) -> Path:
    """A generated GGUF model cached as ``~/.cache/llamaherd/models/<name>.gguf`` (made once)."""
    path = CACHE / "models" / f"{name}.gguf"
    if not path.exists():
        log(f"generating {what} at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = [PYTHON, "-m", "llamaherd_server.ggufgen", *ggufgen_args, "--out", str(path)]
        subprocess.run(argv, check=True)
    return path


def ensure_model() -> Path:
    return generated_model(
        "bench-seed0", ["--preset", "bench", "--seed", "0"], "the bench model (~220M, F16)"
    )


def ensure_binaries() -> Path:
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "build_llama_server.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def make_servers(model: Path, bindir: Path, logdir: Path) -> list[Server]:
    ports = [free_port() for _ in range(3)]
    return [
        Server(
            "llamaherd",
            "llamaherd (continuous batching)",
            [
                PYTHON,
                "-m",
                "llamaherd_server",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(ports[0]),
                "--slots",
                str(SLOTS),
                "--context-size",
                str(CONTEXT),
                "--threads",
                str(THREADS),
                "--token-budget",
                str(BATCH),
                "--log-level",
                "warning",
                *gpu_layers_flags("--gpu-layers", GPU_LAYERS),
            ],
            ports[0],
            "/ready",
            logdir / "llamaherd.log",
        ),
        Server(
            "llama-server",
            "llama-server (llama.cpp, same source)",
            [
                str(bindir / "llama-server"),
                "-m",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(ports[1]),
                "-np",
                str(SLOTS),
                "-c",
                str(SLOTS * CONTEXT),
                "-t",
                str(THREADS),
                "-tb",
                str(THREADS),
                "-b",
                str(BATCH),
                "-ub",
                str(BATCH),
                "--kv-unified",
                "--no-webui",
                "--metrics",
                "--cache-ram",
                "0",
                *gpu_layers_flags("-ngl", GPU_LAYERS, "all"),
            ],
            ports[1],
            "/health",
            logdir / "llama-server.log",
        ),
        Server(
            "one-at-a-time",
            "one-at-a-time (llama_cpp.Llama behind a lock)",
            [
                PYTHON,
                str(ROOT / "bench" / "baseline_server.py"),
                "--model",
                str(model),
                "--port",
                str(ports[2]),
                "--context-size",
                str(CONTEXT),
                "--threads",
                str(THREADS),
                "--batch",
                str(BATCH),
                *gpu_layers_flags("--gpu-layers", GPU_LAYERS),
            ],
            ports[2],
            "/health",
            logdir / "one-at-a-time.log",
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
    before_text = server.scrape()
    load_before = loadavg()
    with RssSampler(server.pid) as rss, ForeignCpu(our_pids) as foreign:
        if rate is None:
            assert concurrency is not None
            results, wall = await loadgen.closed_loop(
                url,
                lambda i: workload.payload(i, model_name),
                concurrency=concurrency,
                n_requests=n_requests,
                first_index=first_index,
                time_limit_s=time_limit_s,
            )
        else:
            results, wall = await loadgen.open_loop(
                url,
                lambda i: workload.payload(i, model_name),
                rate=rate,
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
    if server.name == "llamaherd":
        summary["batch"] = batch_distribution(
            llamaherd_hist(before_text, "llamaherd_batch_size"),
            llamaherd_hist(after_text, "llamaherd_batch_size"),
        )
        # Share of the wall time the engine spent inside llama_decode (the rest: Python).
        d0 = llamaherd_hist(before_text, "llamaherd_decode_step_seconds")
        d1 = llamaherd_hist(after_text, "llamaherd_decode_step_seconds")
        if d0 and d1 and summary["batch"]:
            summary["batch"]["decode_busy_fraction"] = (d1["sum"] - d0["sum"]) / wall
    elif server.name == "llama-server":
        summary["batch"] = llama_server_batch(
            llama_server_decodes(before_text), llama_server_decodes(after_text)
        )
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
    if server.name == "llamaherd":
        summary["batch"] = batch_distribution(
            llamaherd_hist(before_text, "llamaherd_batch_size"),
            llamaherd_hist(after_text, "llamaherd_batch_size"),
        )
    else:
        summary["batch"] = llama_server_batch(
            llama_server_decodes(before_text), llama_server_decodes(after_text)
        )
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
            "--model",
            str(model),
            "--batches",
            ",".join(map(str, batches)),
            "--repeats",
            str(repeats),
            "--threads",
            str(THREADS),
            "--slots",
            str(SLOTS),
            "--context-size",
            str(CONTEXT),
            "--token-budget",
            str(BATCH),
            "--json",
            str(out),
            *gpu_layers_flags("--gpu-layers", GPU_LAYERS),
        ],
        check=True,
        timeout=timeout_s,
        cwd=ROOT,
    )
    return json.loads(out.read_text())


def parse_batched_bench(text: str) -> dict[str, dict[str, float]]:
    """Rows of llama-batched-bench's markdown table, keyed by B."""
    rows: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 10 or not cells[0].isdigit():
            continue
        pp, tg, b, _nkv, _t_pp, s_pp, _t_tg, s_tg, t, s = cells
        rows[b] = {
            "pp": float(pp),
            "tg": float(tg),
            "pp_tokens_per_s": float(s_pp),
            "tg_tokens_per_s": float(s_tg),
            "total_tokens_per_s": float(s),
            "t_s": float(t),
        }
    return rows


def run_batched_bench(
    bindir: Path, model: Path, batches: list[int], repeats: int, timeout_s: float = 600.0
) -> dict[str, Any]:
    argv = [str(bindir / "llama-batched-bench"), "-m", str(model), "-c", str(SLOTS * CONTEXT)]
    argv += ["-b", str(BATCH), "-ub", str(BATCH), "-npp", "32", "-ntg", "48"]
    argv += ["-npl", ",".join(map(str, batches)), "-t", str(THREADS), "-tb", str(THREADS)]
    argv.append("--kv-unified")
    argv += gpu_layers_flags("-ngl", GPU_LAYERS, "all")
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


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        concurrencies = [1, 4, 16]
        engine_batches = [1, 4, 16]
        repeats = 1
        rounds = 1
    else:
        concurrencies = [1, 2, 4, 8, 16, 32]
        engine_batches = [1, 2, 4, 8, 16]
        repeats = 3
        rounds = 2
    if args.rounds:
        rounds = args.rounds
    if args.concurrency:
        concurrencies = [int(c) for c in args.concurrency.split(",")]
    if args.engine_batches:
        engine_batches = [int(b) for b in args.engine_batches.split(",")]
    if args.repeats:
        repeats = args.repeats
    budget = Budget(args.time_budget_s)
    skipped: list[str] = []

    def n_requests(c: int) -> int:
        if args.requests:
            return args.requests
        if args.requests_per_stream:
            return max(args.requests_min or 0, args.requests_per_stream * c)
        return max(8, c) if args.quick else max(24, 4 * c)

    model = args.model or ensure_model()
    facts = model_facts(model)
    workload = loadgen.Workload(
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        vocab=facts["vocab"] or loadgen.Workload.vocab,
    )
    model_name = model.stem
    bindir = args.bindir or ensure_binaries()
    started = dt.datetime.now(dt.UTC)
    results: dict[str, Any] = {
        "meta": {
            "mode": "quick" if args.quick else "full",
            "started": started.isoformat(timespec="seconds"),
            "machine": machine_info(),
            "model": {"path": str(model), "params_m": facts["params_m"], "dtype": "f16"},
            "workload": {
                "prompt_tokens": workload.prompt_tokens,
                "max_tokens": workload.max_tokens,
                "temperature": workload.temperature,
                "top_k": workload.top_k,
                "concurrency": concurrencies,
                "requests_per_point": {
                    str(c): max(c, n_requests(c) // rounds) * rounds for c in concurrencies
                },
                "rounds": rounds,
                "open_loop": None
                if args.quick
                else {"rate_rps": args.open_rate, "requests": args.open_requests},
                "seed": {
                    "requests": args.seed_requests,
                    "wave": args.seed_concurrency,
                    "max_tokens": args.seed_max_tokens,
                }
                if args.seed_workload
                else None,
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
        },
        "systems": {},
        "closed_loop": {},
        "open_loop": {},
    }
    log(f"machine load average at start: {loadavg()}")
    results["python_baseline_rss_kb"] = python_baseline_rss()

    if not args.skip_engine:
        if budget.left() < 4 * MIN_POINT_S:
            skipped.append("engine-only microbenchmark")
        else:
            log("engine-only microbenchmark (llamaherd Engine, no HTTP)")
            try:
                results["engine"] = {
                    "llamaherd": run_engine_bench(
                        model, engine_batches, repeats, args.tmp, budget.limit(900)
                    ),
                    "batched_bench": run_batched_bench(
                        bindir, model, engine_batches, repeats, budget.limit(600)
                    ),
                    "loadavg_after": loadavg(),
                }
            except subprocess.TimeoutExpired:
                skipped.append("engine-only microbenchmark (ran out of the time budget)")

    servers = make_servers(model, bindir, args.logs or args.tmp)
    if args.systems:
        keep = set(args.systems.split(","))
        servers = [s for s in servers if s.name in keep]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
            s.info = {"label": s.label, "argv": s.argv, "rss_ready_kb": rss_kb(s.pid)}
            results["systems"][s.name] = s.info
            results["closed_loop"][s.name] = {}
        for s in servers:
            await warm_up(s, workload, model_name)
            time.sleep(1.0)
            s.info["rss_idle_kb"] = rss_kb(s.pid)
            log(f"{s.name} ready, idle RSS {s.info['rss_idle_kb'] / 1024:.0f} MiB")
        our_pids = [os.getpid()] + [s.pid for s in servers]
        if args.seed_workload:
            results["seed"] = {}
            for s in servers:
                if s.name not in SEED_SYSTEMS:
                    continue
                if budget.left() < MIN_POINT_S:
                    skipped.append(f"seed workload {s.name}")
                    continue
                seed = await run_seed_workload(
                    s,
                    model_name,
                    n_requests=args.seed_requests,
                    wave=args.seed_concurrency,
                    max_tokens=args.seed_max_tokens,
                    time_limit_s=budget.limit(600),
                )
                results["seed"][s.name] = seed
                log(
                    f"seed workload {s.name:14s} {seed['tokens_per_s']:7.1f} tok/s  latency "
                    f"p50 {seed['latency_ms']['p50'] or 0:.0f} ms p95 "
                    f"{seed['latency_ms']['p95'] or 0:.0f} ms  ok {seed['ok']}/{seed['requests']}"
                )
        index = 0
        for k, c in enumerate(concurrencies):
            # Take turns, rotating who goes first and reversing the order every other round,
            # so that drift in background load is shared by all three.
            parts: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
            per_round = max(c, n_requests(c) // rounds)
            for r in range(rounds):
                order = servers[k % len(servers) :] + servers[: k % len(servers)]
                for s in order[:: -1 if r % 2 else 1]:
                    if budget.left() < MIN_POINT_S:
                        skipped.append(f"c={c} {s.name} round {r + 1}")
                        continue
                    part = await run_point(
                        s,
                        workload,
                        model_name,
                        concurrency=c,
                        rate=None,
                        n_requests=per_round,
                        first_index=index,
                        our_pids=our_pids,
                        time_limit_s=budget.limit(600),
                    )
                    parts[s.name].append(part)
                    log(f"c={c:2d} {s.name:14s} {describe(part)}")
                index += per_round
            for s in servers:
                if not parts[s.name]:
                    continue
                merged = merge_rounds(parts[s.name], workload.max_tokens)
                results["closed_loop"][s.name][str(c)] = merged
                if rounds > 1:
                    log(f"c={c:2d} {s.name:14s} {describe(merged)} (all rounds)")
        if not args.quick:
            for s in servers:
                if budget.left() < MIN_POINT_S:
                    skipped.append(f"open loop {s.name}")
                    continue
                summary = await run_point(
                    s,
                    workload,
                    model_name,
                    concurrency=None,
                    rate=args.open_rate,
                    n_requests=args.open_requests,
                    first_index=index,
                    our_pids=our_pids,
                    time_limit_s=budget.limit(600),
                )
                summary.pop("_raw")
                results["open_loop"][s.name] = summary
                log(f"open loop {args.open_rate}/s {s.name:14s} {describe(summary)}")
        for s in servers:
            s.info["rss_idle_after_kb"] = rss_kb(s.pid)
    finally:
        for s in servers:
            s.stop()
    if skipped:
        log(f"skipped for the time budget: {', '.join(skipped)}")
    results["meta"]["skipped"] = skipped
    results["meta"]["loadavg_end"] = loadavg()
    results["meta"]["duration_s"] = round((dt.datetime.now(dt.UTC) - started).total_seconds())
    return results


def main() -> None:
    global SLOTS, CONTEXT, THREADS, BATCH, GPU_LAYERS
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
    args = parser.parse_args()
    SLOTS, CONTEXT, THREADS, BATCH = args.slots, args.context_size, args.threads, args.batch
    GPU_LAYERS = args.gpu_layers
    if args.out is None:
        args.out = ROOT / "bench" / "results" / ("quick" if args.quick else "")
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
