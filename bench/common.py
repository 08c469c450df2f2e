"""What the benchmarks share: paths, logging, generated models, servers, the machine's counters.

Every script in ``bench/`` imports this module (its own folder is on ``sys.path`` when it runs):

- **paths**: ``ROOT`` (the checkout), ``CACHE`` (``$LLAMAHERD_CACHE``), ``RESULTS``, ``PYTHON``;
- **logging**: :func:`log`, a timestamped line with the script's tag;
- **models and binaries**: :func:`generated_model` (a GGUF made once by
  ``llamaherd_server.ggufgen`` and cached), :func:`ensure_binaries` (llama-server and
  llama-batched-bench, built once by ``build_llama_server.sh``);
- **servers**: :class:`Server`, a process on a loopback port (``tests.harness.process``'s
  :class:`ManagedProcess` underneath), :func:`running` to start, wait for and stop several,
  :func:`server_command` and :func:`free_port`;
- **the servers' metrics**: histograms and counters from ``/metrics`` and the batch sizes
  between two scrapes, for llamaherd and llama-server;
- **the machine**: RSS, CPU time, the load average and the CPU other processes used;
- **reporting**: :func:`table_head` for the markdown tables.

Load generation is ``loadgen.py``; the serving benchmark's report is ``report.py``.
Light on purpose (the standard library, httpx and prometheus-client): ``bench/gpu.sh`` runs the
scripts with only the server's packages.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
# The checkout's root on the path: ``tests.harness`` holds the one way to run a process.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.harness import free_port  # noqa: E402
from tests.harness.process import ManagedProcess, ProcessFailed, server_command  # noqa: E402

__all__ = ["ManagedProcess", "ProcessFailed", "free_port", "server_command"]

CACHE = Path(os.environ.get("LLAMAHERD_CACHE", Path.home() / ".cache" / "llamaherd"))
RESULTS = ROOT / "bench" / "results"
PYTHON = sys.executable


def log(msg: str, *, tag: str = "bench", err: bool = False) -> None:
    """``[tag HH:MM:SS] msg`` on stdout (``err``: stderr); an empty tag leaves only the time."""
    stamp = f"{tag} {time.strftime('%H:%M:%S')}" if tag else time.strftime("%H:%M:%S")
    print(f"[{stamp}] {msg}", file=sys.stderr if err else sys.stdout, flush=True)


# ---- models and binaries ------------------------------------------------------------------


def generated_model(name: str, ggufgen_args: list[str], what: str) -> Path:
    """A generated GGUF model cached as ``~/.cache/llamaherd/models/<name>.gguf`` (made once)."""
    path = CACHE / "models" / f"{name}.gguf"
    if not path.exists():
        log(f"generating {what} at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        argv = [PYTHON, "-m", "llamaherd_server.ggufgen", *ggufgen_args, "--out", str(path)]
        subprocess.run(argv, check=True)
    return path


def ensure_binaries() -> Path:
    """The folder with llama-server and llama-batched-bench (built on the first call)."""
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "build_llama_server.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


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


def llama_server_command(
    bindir: Path,
    model: Path,
    port: int,
    slots: int,
    context: int,
    threads: int,
    batch: int,
    *args: str,
) -> list[str]:
    """llama-server with ``slots`` sequences of ``context`` tokens in one unified cache, the
    batch sizes and threads llamaherd gets, /metrics on, no web UI; then ``args``."""
    return [
        str(bindir / "llama-server"),
        *("-m", str(model), "--host", "127.0.0.1", "--port", str(port)),
        *("-np", str(slots), "-c", str(slots * context)),
        *("-t", str(threads), "-tb", str(threads), "-b", str(batch), "-ub", str(batch)),
        *("--kv-unified", "--no-webui", "--metrics", *args),
    ]


def batched_bench_command(
    bindir: Path,
    model: Path,
    context: int,
    batch: int,
    prompt: int,
    gen: int,
    batches: list[int],
    threads: int,
    *args: str,
) -> list[str]:
    """llama-batched-bench on the same shapes: ``batches`` sequences of ``prompt`` + ``gen``
    tokens, in a unified cache of ``context`` tokens; then ``args``."""
    return [
        str(bindir / "llama-batched-bench"),
        *("-m", str(model), "-c", str(context), "-b", str(batch), "-ub", str(batch)),
        *("-npp", str(prompt), "-ntg", str(gen), "-npl", ",".join(map(str, batches))),
        *("-t", str(threads), "-tb", str(threads), "--kv-unified", *args),
    ]


# ---- servers ------------------------------------------------------------------------------


@dataclass
class Server:
    """A server on ``127.0.0.1:port``, its output in ``log_path``, ready when ``ready_path``
    answers 200.

    Each leads a session of its own, and its process id is written beside the log
    (``<log>.pid``): ``bench/gpu.sh`` kills what a killed run left behind by those ids.
    ``stop`` sends ``stop_signal`` (SIGINT, as Ctrl-C would), SIGKILL after 20 s."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    ready_path: str = "/ready"
    label: str = ""
    env: dict[str, str] = field(default_factory=dict)
    stop_signal: int = signal.SIGINT
    info: dict[str, Any] = field(default_factory=dict)
    process: ManagedProcess | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    def start(self) -> Server:
        self.process = ManagedProcess(
            self.argv,
            self.log_path,
            name=self.name,
            env=self.env,
            cwd=ROOT,
            stop_signal=self.stop_signal,
            stop_timeout_s=20.0,
            new_session=True,
        ).start()
        self.log_path.with_suffix(".pid").write_text(f"{self.pid}\n")
        return self

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """:class:`ProcessFailed`, with the log's tail, if it exits or is not ready in time."""
        assert self.process is not None, f"{self.name} was not started"
        self.process.wait_http_ok(self.base + self.ready_path, timeout_s, interval_s=0.25)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def scrape(self) -> str | None:
        """``/metrics`` as text, or None when it does not answer."""
        try:
            r = httpx.get(self.base + "/metrics", timeout=5.0, trust_env=False)
        except httpx.HTTPError:
            return None
        return r.text if r.status_code == 200 else None


@contextmanager
def running(servers: list[Server], timeout_s: float = 300.0) -> Iterator[list[Server]]:
    """Start every server (saying so), then wait for each to be ready; stop them all on the
    way out."""
    try:
        for server in servers:
            log(f"starting {server.name}: {' '.join(server.argv)}")
            server.start()
        for server in servers:
            server.wait_ready(timeout_s)
        yield servers
    finally:
        for server in servers:
            server.stop()


# ---- the servers' metrics -----------------------------------------------------------------


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


def counter(text: str | None, name: str) -> float | None:
    """The value of an unlabelled sample ``name`` in a scrape."""
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _grown(before: dict | None, after: dict | None, key: str) -> float | None:
    """How much ``key`` grew between two scrapes; None when either is missing or it did not."""
    if before is None or after is None:
        return None
    grown: float = after[key] - before[key]
    return grown if grown > 0 else None


def batch_distribution(before: dict | None, after: dict | None) -> dict[str, Any] | None:
    """Per-bucket decode-step counts of one load point (difference of two scrapes)."""
    count = _grown(before, after, "count")
    if count is None or before is None or after is None:
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
    steps = _grown(before, after, "decodes")
    if steps is None or before is None or after is None:
        return None
    return {"steps": int(steps), "mean": (after["busy"] - before["busy"]) / steps}


def server_batch(system: str, before: str | None, after: str | None) -> dict[str, Any] | None:
    """Sequences per decode between two scrapes of ``system`` (llamaherd or llama-server)."""
    if system == "llamaherd":
        return batch_distribution(
            llamaherd_hist(before, "llamaherd_batch_size"),
            llamaherd_hist(after, "llamaherd_batch_size"),
        )
    return llama_server_batch(llama_server_decodes(before), llama_server_decodes(after))


# ---- the machine --------------------------------------------------------------------------


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


def process_jiffies(pid: int) -> int:
    """User and system CPU time of all a process's threads, in clock ticks (0 once gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads


def cpu_seconds(pid: int) -> float:
    return process_jiffies(pid) / os.sysconf("SC_CLK_TCK")


class ForeignCpu:
    """CPU used by processes other than ``pids`` (the servers and this load generator)
    while a point runs, in cores: the background load that spoils a measurement."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.cores = 0.0
        self.steal_cores = 0.0  # time the hypervisor gave our virtual CPUs to someone else

    def _sample(self) -> tuple[float, int, int, int]:
        busy, steal = _cpu_jiffies()
        return time.monotonic(), busy, steal, sum(process_jiffies(p) for p in self.pids)

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


# ---- reporting ----------------------------------------------------------------------------


def table_head(*columns: str) -> list[str]:
    """The header and separator lines of a markdown table."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
