"""Where each microsecond per generated token goes, outside and inside ``llama_decode``.

``make profile`` (about 3 minutes on 2 cores): the short-step model of ``step_bench.py`` (decode
steps of 1-3 ms, as short as a GPU's) served by llamaherd at 1, 16 and 64 streams, straight
and through the gateway, streamed ``/v1/completions`` with a stop string (sampled: top-k 40,
temperature 0.8; 32 prompt tokens, 64 generated). The server and the gateway run under timers
that this script installs in their processes (``serve-server`` / ``serve-gateway`` below wrap
their functions before they start; the product code carries no profiling hooks), and report
per generated token, in microseconds:

* the engine thread: wall time per step split into ``llama_decode`` (the ctypes call, with the
  GIL released), planning the batch, committing it, sampling, accepting tokens (detokenizing,
  stop strings, the event into the outbox) and the hand-off to the event loop; its own CPU
  time, and the **wait**: wall time in steps that the thread spent neither on a CPU nor in
  llama.cpp's compute (waiting for the GIL, or for a core), also split for ``llama_decode``
  alone (there the GIL is retaken when the call returns);
* the event loop thread: its CPU time, the JSON framing of chunks, the SSE encoding and the
  transport writes;
* llama.cpp's worker threads: the CPU that the process used beyond its two Python threads;
* the gateway process: its CPU per relayed token, parsing the body, picking a replica and
  writing chunks to the client;

and the client's tokens/s on both paths (their ratio is the gateway's cost). The load
generator runs in this process, on the same 2 cores. Results: ``bench/results/profile/``
(``results.json``, ``results.md``). On a GPU machine: ``make profile`` after ``make
bench-gpu-prepare``'s setup, with ``PROFILE_ARGS="--gpu-layers -1"``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import gateway_bench  # noqa: E402
import loadgen  # noqa: E402
import run  # noqa: E402
import step_bench  # noqa: E402
from common import RESULTS, Server, free_port, server_command, table_head  # noqa: E402

OUT = RESULTS / "profile"
STOP = "\n\n###"  # a stop string that random tokens never make: every token pays the check
DUMP_ENV = "LLAMAHERD_PROFILE_DUMP"


def log(msg: str) -> None:
    common.log(msg, tag="profile")


# ---- timers, installed inside the profiled process ---------------------------------------------


class Timers:
    """Totals of wall time (and CPU time, for some) per named part, in seconds, and calls.

    Reset and dumped to ``$LLAMAHERD_PROFILE_DUMP`` as JSON on SIGUSR1 (handled on the main
    thread, between two bytecodes of the event loop)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.threads: dict[str, int] = {}  # name -> pthread id, for their CPU clocks
        self.native: dict[str, int] = {}  # name -> kernel thread id, for its context switches
        self.window_start = (time.perf_counter(), self._cpu_now())
        self.seq = 0

    def add(self, name: str, wall: float, cpu: float | None = None) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.calls[name] = self.calls.get(name, 0) + 1
        if cpu is not None:
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    def wrap(self, name: str, fn: Callable[..., Any], *, cpu: bool = False) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            c0 = time.thread_time() if cpu else 0.0
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = time.perf_counter()
                self.add(name, t1 - t0, (time.thread_time() - c0) if cpu else None)

        return timed

    def wrap_cpu(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """The event loop's parts count the loop thread's CPU time, not wall time: a preempted
        or GIL-less loop thread is not slower framing."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            c0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.thread_time() - c0)

        return timed

    def wrap_async(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """CPU time of the loop thread while the coroutine runs (``send`` seldom suspends: only
        when the transport is paused, and then the count includes what ran meanwhile)."""

        async def timed(*args: Any, **kwargs: Any) -> Any:
            c0 = time.thread_time()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.add(name, time.thread_time() - c0)

        return timed

    def _cpu_now(self) -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        now = {"process": usage.ru_utime + usage.ru_stime}
        for name, tid in self.native.items():  # counts, not seconds: the report divides them
            now.update(_switches(name, tid))
        for name, ident in self.threads.items():
            try:
                now[name] = time.clock_gettime(time.pthread_getcpuclockid(ident))
            except OSError:  # the thread is gone
                continue
        return now

    def dump(self, *_: Any) -> None:
        now, cpu = time.perf_counter(), self._cpu_now()
        start, cpu0 = self.window_start
        self.seq += 1
        out = {
            "seq": self.seq,
            "window_s": now - start,
            "thread_cpu_s": {k: v - cpu0.get(k, 0.0) for k, v in cpu.items() if k in cpu0},
            "wall_s": self.wall,
            "cpu_s": self.cpu,
            "calls": self.calls,
        }
        path = Path(os.environ[DUMP_ENV])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(path)
        self.wall, self.cpu, self.calls = {}, {}, {}
        self.window_start = (now, cpu)


def _switches(name: str, tid: int) -> dict[str, float]:
    """A thread's voluntary context switches (it blocked: on the GIL, a lock, a sleep) and
    involuntary ones (preempted for another thread), from /proc."""
    out: dict[str, float] = {}
    try:
        text = Path(f"/proc/self/task/{tid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            out[f"{name} {key.split('_')[0]} switches"] = float(value)
    return out


def _time_http_writes(timers: Timers) -> None:
    """Every ASGI ``send`` of uvicorn's HTTP protocols (the transport writes and framing)."""
    from uvicorn.protocols.http import h11_impl

    cycles: list[Any] = [h11_impl.RequestResponseCycle]
    try:
        from uvicorn.protocols.http import httptools_impl

        cycles.append(httptools_impl.RequestResponseCycle)
    except ImportError:  # no httptools: uvicorn uses h11
        pass
    for cycle in cycles:
        cycle.send = timers.wrap_async("loop.write", cycle.send)  # type: ignore[method-assign]


def instrument_server(timers: Timers) -> None:
    """Timers around the engine's per-step methods and the event loop's per-chunk work."""
    import llama_cpp
    import sse_starlette.sse as sse

    from llamaherd_server import bridge
    from llamaherd_server import engine as engine_mod
    from llamaherd_server.llama_backend import LlamaBackend

    e = engine_mod.Engine
    real_loop = e._loop

    def loop(self: Any) -> None:
        timers.threads["engine"] = threading.get_ident()
        timers.native["engine"] = threading.get_native_id()
        real_loop(self)

    e._loop = loop  # type: ignore[method-assign]
    e._step = timers.wrap("engine.step", e._step, cpu=True)  # type: ignore[method-assign]
    e._plan_step = timers.wrap("engine.plan", e._plan_step)  # type: ignore[method-assign]
    e._commit = timers.wrap("engine.commit", e._commit)  # type: ignore[method-assign]
    e._sample_outputs = timers.wrap("engine.sample+accept", e._sample_outputs)  # type: ignore[method-assign]
    e._accept_token = timers.wrap("engine.accept", e._accept_token)  # type: ignore[method-assign]
    e._emit = timers.wrap("engine.accept.emit", e._emit)  # type: ignore[method-assign]
    e._deliver = timers.wrap("engine.handoff", e._deliver)  # type: ignore[method-assign]
    LlamaBackend.token_bytes = timers.wrap(  # type: ignore[method-assign]
        "engine.accept.detokenize", LlamaBackend.token_bytes
    )
    engine_mod.safe_emit_length = timers.wrap("engine.accept.stop", engine_mod.safe_emit_length)
    llama_cpp.llama_decode = timers.wrap("engine.llama_decode", llama_cpp.llama_decode, cpu=True)

    class TimedJson:
        dumps = staticmethod(timers.wrap_cpu("loop.json", json.dumps))

    bridge.json = TimedJson  # type: ignore[assignment]
    if hasattr(bridge, "TextFrames"):  # a token's SSE bytes from a template (json inside)
        frames = bridge.TextFrames
        frames.__call__ = timers.wrap_cpu("loop.text_frames", frames.__call__)  # type: ignore[method-assign]
    sse.ServerSentEvent.encode = timers.wrap_cpu("loop.sse", sse.ServerSentEvent.encode)  # type: ignore[method-assign]
    _time_http_writes(timers)


def instrument_gateway(timers: Timers) -> None:
    from llamaherd_gateway import proxy

    proxy._parse = timers.wrap_cpu("gateway.parse", proxy._parse)
    proxy.Gateway._choose = timers.wrap_cpu("gateway.pick", proxy.Gateway._choose)  # type: ignore[method-assign]
    _time_http_writes(timers)


def profiled(kind: str, argv: list[str]) -> None:
    """Run the server (``kind`` = server) or the gateway under timers; SIGUSR1 dumps them."""
    timers = Timers()
    timers.threads["loop"] = threading.get_ident()
    signal.signal(signal.SIGUSR1, timers.dump)
    if kind == "server":
        instrument_server(timers)
        from llamaherd_server.__main__ import main

        main(argv)
    else:
        instrument_gateway(timers)
        gateway_bench.serve(gateway_bench.parse_args(["serve", *argv]))


# ---- the driver ---------------------------------------------------------------------------------


class Profiled:
    """A profiled process of this benchmark and its dump file."""

    def __init__(self, server: Server, dump: Path) -> None:
        self.server, self.dump = server, dump
        self.seq = 0

    def take(self) -> dict[str, Any]:
        """Ask for the totals since the last take (SIGUSR1) and wait for them."""
        self.seq += 1
        os.kill(self.server.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                got = json.loads(self.dump.read_text())
            except (OSError, ValueError):
                got = {}
            if got.get("seq") == self.seq:
                return got
            time.sleep(0.01)
        raise TimeoutError(f"{self.server.name} wrote no profile dump")


def start_profiled(kind: str, args: list[str], logdir: Path, port: int) -> Profiled:
    dump = logdir / f"{kind}-profile.json"
    argv = [sys.executable, str(Path(__file__).resolve()), f"serve-{kind}", *args]
    env = {**gateway_bench.env(), DUMP_ENV: str(dump)}
    ready = "/ready"
    server = Server(kind, argv, port, logdir / f"{kind}.log", ready, env=env,
                    stop_signal=signal.SIGTERM)  # fmt: skip
    server.start().wait_ready(300.0)
    return Profiled(server, dump)


@contextmanager
def processes(args: argparse.Namespace, model: Path, logdir: Path) -> Iterator[list[Profiled]]:
    port = free_port()
    server_args = server_command(
        model,
        port,
        *("--model-name", "m", "--slots", str(max(args.streams)), "--context-size", "512"),
        *("--threads", str(args.threads), "--token-budget", "512", "--log-level", "warning"),
        *args.server_args,
    )[3:]  # fmt: skip  (server_command is python -m llamaherd_server ...)
    started: list[Profiled] = []
    try:
        started.append(start_profiled("server", server_args, logdir, port))
        gw_port = free_port()
        gw_args = ["--port", str(gw_port), "--model", "m", "--upstreams", f"127.0.0.1:{port}"]
        gw_args += ["--settings", "{}"]
        started.append(start_profiled("gateway", gw_args, logdir, gw_port))
        yield started
    finally:
        for p in reversed(started):
            p.server.stop()


def per_token(dump: dict[str, Any], tokens: int) -> dict[str, float]:
    """Microseconds per generated token of every total in a dump."""
    us = 1e6 / max(tokens, 1)
    out = {k: v * us for k, v in dump["wall_s"].items()}
    out.update({f"{k} (cpu)": v * us for k, v in dump["cpu_s"].items()})
    out.update({f"{k} thread cpu": v * us for k, v in dump["thread_cpu_s"].items()})
    return out


def breakdown(server: dict[str, Any], gateway: dict[str, Any] | None, tokens: int) -> dict:
    """The report's rows from the dumps: microseconds per token by part."""
    s = per_token(server, tokens)
    get = s.get
    step, decode = get("engine.step", 0.0), get("engine.llama_decode", 0.0)
    sample_accept = get("engine.sample+accept", 0.0)
    accept = get("engine.accept", 0.0)
    detok, stop = get("engine.accept.detokenize", 0.0), get("engine.accept.stop", 0.0)
    emit = get("engine.accept.emit", 0.0)
    engine = {
        "step wall": step,
        "llama_decode": decode,
        "plan": get("engine.plan", 0.0),
        "commit": get("engine.commit", 0.0),
        "sample": sample_accept - accept,
        "accept: detokenize": detok,
        "accept: stop strings": stop,
        "accept: event": emit,
        "accept: rest": accept - detok - stop - emit,
        "hand-off": get("engine.handoff", 0.0),
    }
    engine["step rest"] = step - sum(v for k, v in engine.items() if k != "step wall")
    engine["thread cpu in steps"] = get("engine.step (cpu)", 0.0)
    engine["wait in steps (GIL or a core)"] = step - get("engine.step (cpu)", 0.0)
    engine["wait in llama_decode"] = decode - get("engine.llama_decode (cpu)", 0.0)
    for kind in ("voluntary", "nonvoluntary"):  # counts: per_token scaled them by 1e6
        engine[f"{kind} switches per token"] = get(f"engine {kind} switches thread cpu", 0.0) / 1e6
    loop_cpu = get("loop thread cpu", 0.0)
    writes = get("loop.write", 0.0)
    # Framing: the template's cost where there is one (json.dumps of the text inside it), else
    # json.dumps of each chunk plus sse-starlette's encoding (older servers).
    framing = get("loop.text_frames") or get("loop.json", 0.0) + get("loop.sse", 0.0)
    loop = {
        "thread cpu": loop_cpu,
        "framing (json, sse)": framing,
        "writes (ASGI send)": writes,
        "rest": loop_cpu - framing - writes,
    }
    python = get("engine thread cpu", 0.0) + loop_cpu
    process = {
        "process cpu": get("process thread cpu", 0.0),
        "llama.cpp workers and other threads": get("process thread cpu", 0.0) - python,
    }
    out: dict[str, Any] = {"engine": engine, "loop": loop, "process": process}
    if gateway is not None:
        g = per_token(gateway, tokens)
        out["gateway"] = {
            "process cpu": g.get("process thread cpu", 0.0),
            "parse": g.get("gateway.parse", 0.0),
            "pick": g.get("gateway.pick", 0.0),
            "writes to the client": g.get("loop.write", 0.0),
        }
        out["gateway"]["relay rest"] = out["gateway"]["process cpu"] - sum(
            v for k, v in out["gateway"].items() if k != "process cpu"
        )
    return {k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in out.items()}


async def one_point(
    target: str, workload: loadgen.Workload, streams: int, n: int, first: int
) -> tuple[int, float, dict[str, Any]]:
    def payload(i: int) -> dict[str, Any]:
        return {**workload.payload(i, "m"), "stop": [STOP]}

    results, wall = await loadgen.closed_loop(
        target + "/v1/completions", payload, concurrency=streams, n_requests=n, first_index=first
    )
    summary = loadgen.summarize(results, wall, workload.max_tokens)
    tokens = sum(r.completion_tokens or 0 for r in results if r.ok)
    return tokens, wall, summary


async def measure(args: argparse.Namespace, procs: list[Profiled]) -> list[dict[str, Any]]:
    server, gateway = procs
    workload = loadgen.Workload(prompt_tokens=32, max_tokens=64, vocab=args.vocab)
    for target in (server, gateway):  # warm both paths
        await one_point(target.server.base, workload, 4, 8, 0)
    points: list[dict[str, Any]] = []
    first = 1000
    for streams in args.streams:
        n = max(args.requests, 2 * streams)
        row: dict[str, Any] = {"streams": streams, "requests": n}
        for path, target in (("direct", server), ("gateway", gateway)):
            server.take(), gateway.take()  # reset both
            tokens, wall, summary = await one_point(target.server.base, workload, streams, n, first)
            first += n
            dumps = server.take(), gateway.take()
            row[path] = {
                "tokens": tokens,
                "tokens_per_s": tokens / wall,
                "ttft_p50_ms": summary["ttft_ms"]["p50"],
                "errors": summary["errors"],
                "profile_us_per_token": breakdown(
                    dumps[0], dumps[1] if path == "gateway" else None, tokens
                ),
            }
        row["gateway_ratio"] = row["gateway"]["tokens_per_s"] / row["direct"]["tokens_per_s"]
        log(
            f"{streams} streams: direct {row['direct']['tokens_per_s']:.0f} tok/s, gateway "
            f"{row['gateway']['tokens_per_s']:.0f} ({row['gateway_ratio']:.3f}x)"
        )
        points.append(row)
    return points


def machine(m: dict[str, Any]) -> str:
    gpu = ", ".join(g.get("name", "?") for g in m.get("gpu") or []) or "no GPU"
    return f"{m.get('cpu', '?')}, {m.get('cores')} cores, {gpu}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Where the time per generated token goes (short-step model)",
        "",
        f"`make profile`; method in `bench/token_profile.py`. Run {result['started']}, git "
        f"{result['git']}, {machine(result['machine'])}. Microseconds per generated token; streams "
        "through the server directly (engine and loop) and through the gateway (gateway).",
        "",
        *table_head(
            "streams", "direct tok/s", "gateway tok/s", "ratio", "TTFT p50 direct / gateway ms"
        ),
    ]
    for p in result["points"]:
        d, g = p["direct"], p["gateway"]
        lines.append(
            f"| {p['streams']} | {d['tokens_per_s']:.0f} | {g['tokens_per_s']:.0f} | "
            f"{p['gateway_ratio']:.3f} | {d['ttft_p50_ms']:.1f} / {g['ttft_p50_ms']:.1f} |"
        )
    streams = [p["streams"] for p in result["points"]]
    for part in ("engine", "loop", "process", "gateway"):
        source = "gateway" if part == "gateway" else "direct"
        rows = result["points"][0][source]["profile_us_per_token"][part]
        lines += ["", f"**{part}** ({source} runs), us per token", ""]
        lines += table_head(part, *(f"{s} streams" for s in streams))
        for name in rows:
            values = [p[source]["profile_us_per_token"][part][name] for p in result["points"]]
            digits = 3 if "switches" in name else 1
            lines.append(f"| {name} | " + " | ".join(f"{v:.{digits}f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,16,64")
    parser.add_argument("--requests", type=int, default=48, help="requests per point (at least)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, help="a GGUF (default: step_bench's model)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size of --model")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--server-args", default="", help="more server flags, space-separated")
    args = parser.parse_args(argv)
    args.streams = [int(s) for s in args.streams.split(",")]
    args.server_args = args.server_args.split()
    return args


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("serve-server", "serve-gateway"):
        profiled(sys.argv[1].removeprefix("serve-"), sys.argv[2:])
        return
    args = parse_args()
    model = args.model or step_bench.ensure_model()
    logdir = common.CACHE / "logs" / "profile"  # the servers' logs, not committed
    logdir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with processes(args, model, logdir) as procs:
        points = asyncio.run(measure(args, procs))
    result = {
        "started": started,
        "git": step_bench.engine_source()["commit"],
        "machine": run.machine_info(),
        "model": str(model),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "points": points,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(result))
    log(f"wrote {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
