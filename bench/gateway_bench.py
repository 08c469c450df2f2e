"""The gateway's cost and its routing, measured on loopback. Not part of the test suite.

1. **Overhead**: one llamaherd server, streamed ``/v1/completions`` at 1-16 concurrent streams,
   straight to the server and through the gateway, the two interleaved point by point. The
   issue's bar: throughput at least 0.97x, TTFT p50 at most +2 ms.
2. **CPU per streamed chunk**: a stand-in replica that streams SSE chunks 2 ms apart (each one
   its own read, as tokens are), the gateway in front, and the gateway process's CPU seconds
   (from /proc) per chunk: the cost that a small node takes from llama.cpp. No model needed.
3. **Routing**: two servers, a shared-prefix workload (``--system-prompts`` distinct system
   prompts of ``--prefix-tokens`` tokens, each request one of them plus its own tail,
   interleaved), sent three ways: at random to either server (what a Service does), through the
   gateway with least-loaded picking only (affinity off), and through the gateway with prefix
   affinity. TTFT p50/p95 and throughput; the affinity pays off once the engine caches prefixes.

The gateway runs as its own process (``python bench/gateway_bench.py serve ...``): the real
proxy (:class:`llamaherd_gateway.proxy.Gateway` under uvicorn) with its registry filled from the
command line instead of a cluster watch, which is not on the request path.

    python bench/gateway_bench.py --quick            # a minute: tiny model, 2 points
    python bench/gateway_bench.py                    # bench model, 1-16 streams
    python bench/gateway_bench.py --part overhead --concurrency 1,4,16 --requests 64
    python bench/gateway_bench.py --part cpu         # seconds, no model

Results: ``bench/results/gateway[-quick].json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for sub in ("server", "gateway", "operator"):
    sys.path.insert(0, str(REPO / sub))
sys.path.insert(0, str(HERE))

import common  # noqa: E402  (bench/common.py)
import loadgen  # noqa: E402  (bench/loadgen.py)
from common import (  # noqa: E402
    Server,
    cpu_seconds,
    free_port,
    generated_model,
    server_command,
    table_head,
)


def log(msg: str) -> None:
    common.log(msg, tag="", err=True)


def env() -> dict[str, str]:
    paths = [str(REPO / p) for p in ("gateway", "server", "operator")] + [str(REPO)]
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join(paths + ([old] if old else []))}


def start(
    name: str, argv: list[str], port: int, logdir: Path, ready_path: str = "/ready"
) -> Server:
    """A process of this benchmark, ready (SIGTERM stops it)."""
    process = Server(
        name, argv, port, logdir / f"{name}-{port}.log", ready_path, env=env(),
        stop_signal=signal.SIGTERM,
    )  # fmt: skip
    process.start().wait_ready(120.0)
    return process


def start_server(model: Path, name: str, threads: int, slots: int, logdir: Path) -> Server:
    port = free_port()
    argv = server_command(
        model,
        port,
        *("--model-name", name, "--slots", str(slots), "--context-size", "1024"),
        *("--threads", str(threads), "--log-level", "warning"),
    )
    return start("server", argv, port, logdir)


def start_gateway(model: str, upstreams: list[str], logdir: Path, **settings: Any) -> Server:
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--port", str(port)]
    cmd += ["--model", model, "--upstreams", ",".join(upstreams)]
    cmd += ["--settings", json.dumps(settings)]
    return start("gateway", cmd, port, logdir)


# ---- the gateway process ------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> None:
    """The real gateway app, its registry filled from the command line."""
    import uvicorn

    from llamaherd_gateway.app import run
    from llamaherd_gateway.metrics import GatewayMetrics
    from llamaherd_gateway.proxy import Gateway, upstream_session
    from llamaherd_gateway.registry import Registry
    from llamaherd_gateway.settings import GatewaySettings
    from llamaherd_server.http_protocols import http_protocol

    settings = GatewaySettings(**json.loads(args.settings))
    registry = Registry()
    registry.upsert_service({"metadata": {"name": args.model, "namespace": "bench"}, "spec": {}})
    for url in args.upstreams.split(","):
        host, _, port = url.removeprefix("http://").rpartition(":")
        registry.upsert_slice(
            {
                "metadata": {
                    "name": f"{args.model}-{port}",
                    "namespace": "bench",
                    "labels": {"kubernetes.io/service-name": args.model},
                },
                "ports": [{"name": "http", "port": int(port)}],
                "endpoints": [{"addresses": [host], "conditions": {"ready": True}}],
            }
        )

    async def main() -> None:
        http = upstream_session(settings)
        gateway = Gateway(settings, registry, GatewayMetrics(), http)
        gateway.start_load_poll()
        config = uvicorn.Config(
            gateway,
            host="127.0.0.1",
            port=args.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            http=http_protocol(),
        )
        await uvicorn.Server(config).serve()
        await gateway.close()
        await http.close()

    run(main(), settings.event_loop)


# ---- measuring ----------------------------------------------------------------------------------


def point_summary(results: list[loadgen.RequestResult], wall: float, max_tokens: int) -> dict:
    s = loadgen.summarize(results, wall, max_tokens)
    return {
        "ok": s["ok"],
        "errors": s["errors"],
        "error_samples": s["error_samples"],
        "tokens_per_s": s["tokens_per_s"],
        "ttft_p50_ms": s["ttft_ms"]["p50"],
        "ttft_p95_ms": s["ttft_ms"]["p95"],
        "e2e_p50_ms": s["e2e_ms"]["p50"],
    }


async def completions(
    target: Server, workload: loadgen.Workload | SharedPrefix, concurrency: int, n: int, first: int
) -> tuple[list[loadgen.RequestResult], float]:
    """``n`` streamed completions for model ``m`` to ``target``, ``concurrency`` at a time."""
    return await loadgen.closed_loop(
        target.base + "/v1/completions",
        lambda i: workload.payload(i, "m"),
        concurrency=concurrency,
        n_requests=n,
        first_index=first,
    )


async def run_overhead(args: argparse.Namespace, model: Path, logdir: Path) -> dict[str, Any]:
    server = start_server(model, "m", args.threads, max(args.concurrency), logdir)
    gateway = start_gateway("m", [server.base], logdir)
    workload = loadgen.Workload(
        prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, vocab=args.vocab
    )
    points: list[dict[str, Any]] = []
    try:
        for target in (server, gateway):  # warm both paths
            await completions(target, workload, 2, 4, 0)
        index = 10_000
        for concurrency in args.concurrency:
            n = max(args.requests, 2 * concurrency)
            row: dict[str, Any] = {"concurrency": concurrency}
            runs: dict[str, list[dict[str, Any]]] = {"direct": [], "gateway": []}
            for repeat in range(args.repeats):
                order = [("direct", server), ("gateway", gateway)]
                if repeat % 2:
                    order.reverse()  # neither path always runs first
                for label, target in order:
                    results, wall = await completions(target, workload, concurrency, n, index)
                    index += n
                    runs[label].append(point_summary(results, wall, args.max_tokens))
            for label, parts in runs.items():
                row[label] = {
                    "tokens_per_s": sum(p["tokens_per_s"] for p in parts) / len(parts),
                    "ttft_p50_ms": _mean(p["ttft_p50_ms"] for p in parts),
                    "errors": sum(p["errors"] for p in parts),
                }
            row["throughput_ratio"] = row["gateway"]["tokens_per_s"] / max(
                row["direct"]["tokens_per_s"], 1e-9
            )
            row["ttft_p50_delta_ms"] = _delta(
                row["gateway"]["ttft_p50_ms"], row["direct"]["ttft_p50_ms"]
            )
            points.append(row)
            log(
                f"overhead c={concurrency}: ratio {row['throughput_ratio']:.3f}, "
                f"TTFT p50 delta {_ms(row['ttft_p50_delta_ms'], signed=True)}, errors "
                f"{row['direct']['errors']} direct, {row['gateway']['errors']} gateway"
            )
    finally:
        gateway.stop()
        server.stop()
    return {"points": points}


def _mean(values: Any) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


@dataclass(frozen=True)
class SharedPrefix:
    """``systems`` distinct system prompts of ``prefix_tokens`` token ids; request i uses
    system i mod systems (interleaved) and a tail of its own."""

    systems: int
    prefix_tokens: int
    tail_tokens: int
    max_tokens: int
    vocab: int = 32000
    seed: int = 99

    def payload(self, index: int, model: str) -> dict[str, Any]:
        system = random.Random(self.seed * 7919 + index % self.systems)
        tail = random.Random(self.seed * 104729 + index)
        low = loadgen.FIRST_PLAIN_TOKEN
        prompt = [system.randrange(low, self.vocab) for _ in range(self.prefix_tokens)]
        prompt += [tail.randrange(low, self.vocab) for _ in range(self.tail_tokens)]
        return {
            "model": model,
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0.8,
            "top_k": 40,
            "seed": index,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


async def random_service(
    urls: list[str], workload: SharedPrefix, concurrency: int, n: int, first: int
) -> tuple[list[loadgen.RequestResult], float]:
    """What a Service does: every request to a replica picked at random."""
    rng = random.Random(first)
    results: list[loadgen.RequestResult] = []
    next_i = 0
    async with loadgen.make_client(concurrency + 4, 600) as client:

        async def worker() -> None:
            nonlocal next_i
            while next_i < n:
                i = first + next_i
                next_i += 1
                url = rng.choice(urls) + "/v1/completions"
                results.append(await loadgen.stream_one(client, url, workload.payload(i, "m"), i))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - started


async def run_routing(args: argparse.Namespace, model: Path, logdir: Path) -> dict[str, Any]:
    threads = max(1, args.threads // 2)
    servers = [start_server(model, "m", threads, 8, logdir) for _ in range(2)]
    urls = [s.base for s in servers]
    affinity = start_gateway("m", urls, logdir)
    least = start_gateway("m", urls, logdir, affinity_prefix_chars=0)
    workload = SharedPrefix(
        args.system_prompts, args.prefix_tokens, args.tail_tokens, args.max_tokens, args.vocab
    )
    rows: dict[str, Any] = {}
    try:
        index = 0
        for label in ("service-random", "gateway-least-loaded", "gateway-affinity"):
            n, concurrency = args.routing_requests, args.routing_concurrency
            if label == "service-random":
                results, wall = await random_service(urls, workload, concurrency, n, index)
            else:
                target = affinity if label == "gateway-affinity" else least
                results, wall = await completions(target, workload, concurrency, n, index)
            index += n
            rows[label] = point_summary(results, wall, args.max_tokens)
            log(
                f"routing {label}: {rows[label]['tokens_per_s']:.1f} tok/s, TTFT p50 "
                f"{_ms(rows[label]['ttft_p50_ms'])} p95 {_ms(rows[label]['ttft_p95_ms'])}, "
                f"errors {rows[label]['errors']} {rows[label]['error_samples'][:1]}"
            )
        picks = httpx.get(affinity.base + "/metrics", timeout=5).text
        rows["affinity_picks"] = [
            line for line in picks.splitlines() if line.startswith("llamaherd_gateway_picks_total")
        ]
    finally:
        for p in (affinity, least, *servers):
            p.stop()
    return rows


# ---- CPU per chunk -------------------------------------------------------------------------------

SSE_CHUNK = (
    b'data: {"id":"cmpl-1","object":"text_completion","model":"m",'
    b'"choices":[{"index":0,"text":" tok","finish_reason":null}]}\n\n'
)


def stand_in_replica(args: argparse.Namespace) -> None:
    """A replica stand-in: every POST streams ``--chunks`` SSE chunks ``--gap-ms`` apart."""
    import uvicorn

    gap = args.gap_ms / 1000

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for _ in range(args.chunks):
            await send({"type": "http.response.body", "body": SSE_CHUNK, "more_body": True})
            await asyncio.sleep(gap)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


async def drain(url: str, n: int, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:

        async def one() -> None:
            async with gate:
                body = {"model": "m", "prompt": "x"}
                async with client.stream("POST", url, json=body) as response:
                    async for _ in response.aiter_raw():
                        pass

        await asyncio.gather(*(one() for _ in range(n)))


def run_cpu(args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve()), "replica", "--port", str(port)]
    cmd += ["--chunks", str(args.chunks), "--gap-ms", str(args.gap_ms)]
    replica = start("replica", cmd, port, logdir, "/")
    gateway = start_gateway("m", [replica.base], logdir)
    try:
        url = gateway.base + "/v1/completions"
        asyncio.run(drain(url, 4, 2))  # warm
        before = cpu_seconds(gateway.pid)
        started = time.perf_counter()
        asyncio.run(drain(url, args.cpu_requests, 4))
        wall = time.perf_counter() - started
        used = cpu_seconds(gateway.pid) - before
    finally:
        gateway.stop()
        replica.stop()
    chunks = args.cpu_requests * args.chunks
    import importlib.util

    result = {
        "requests": args.cpu_requests,
        "chunks": chunks,
        "gateway_cpu_s": used,
        "us_per_chunk": 1e6 * used / chunks,
        "ms_per_request": 1e3 * used / args.cpu_requests,
        "wall_s": wall,
        "uvloop": importlib.util.find_spec("uvloop") is not None,
        "httptools": importlib.util.find_spec("httptools") is not None,
    }
    log(
        f"cpu: {result['us_per_chunk']:.0f} us of gateway CPU per chunk, "
        f"{result['ms_per_request']:.1f} ms per request of {args.chunks} chunks "
        f"(uvloop {result['uvloop']}, httptools {result['httptools']})"
    )
    return result


def table(result: dict[str, Any]) -> str:
    lines = []
    if "overhead" in result:
        lines += table_head(
            *("streams", "direct tok/s", "gateway tok/s", "ratio", "TTFT p50 direct"),
            *("gateway", "delta"),
        )
        for row in result["overhead"]["points"]:
            d, g = row["direct"], row["gateway"]
            lines.append(
                f"| {row['concurrency']} | {d['tokens_per_s']:.1f} | {g['tokens_per_s']:.1f} | "
                f"{row['throughput_ratio']:.3f} | {_ms(d['ttft_p50_ms'])} | "
                f"{_ms(g['ttft_p50_ms'])} | {_ms(row['ttft_p50_delta_ms'], signed=True)} |"
            )
    if "cpu" in result:
        cpu = result["cpu"]
        lines += [
            "",
            f"gateway CPU: {cpu['us_per_chunk']:.0f} us per streamed chunk, "
            f"{cpu['ms_per_request']:.1f} ms per request of {cpu['chunks'] // cpu['requests']} "
            f"chunks (uvloop {cpu['uvloop']}, httptools {cpu['httptools']})",
        ]
    if "routing" in result:
        lines += ["", *table_head("routing", "tok/s", "TTFT p50", "TTFT p95", "errors")]
        for label, row in result["routing"].items():
            if not isinstance(row, dict):
                continue
            lines.append(
                f"| {label} | {row['tokens_per_s']:.1f} | {_ms(row['ttft_p50_ms'])} | "
                f"{_ms(row['ttft_p95_ms'])} | {row['errors']} |"
            )
    return "\n".join(lines)


def _ms(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f} ms" if signed else f"{value:.1f} ms"


def ensure_model(preset: str) -> Path:
    return generated_model(f"gateway-bench-{preset}", ["--preset", preset], f"the {preset} model")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="(internal) run the gateway on a fixed set of upstreams")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--upstreams", required=True, help="comma-separated http://host:port")
    s.add_argument("--settings", default="{}", help="GatewaySettings fields as JSON")
    r = sub.add_parser("replica", help="(internal) a stand-in replica that streams SSE chunks")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--chunks", type=int, default=200)
    r.add_argument("--gap-ms", type=float, default=2.0)
    p.add_argument("--quick", action="store_true", help="tiny model, few requests, 2 points")
    p.add_argument("--part", choices=["overhead", "cpu", "routing", "both", "all"], default="both")
    p.add_argument("--chunks", type=int, default=200, help="SSE chunks per request (cpu part)")
    p.add_argument("--gap-ms", type=float, default=2.0, help="time between chunks (cpu part)")
    p.add_argument("--cpu-requests", type=int, default=80, help="requests of the cpu part")
    p.add_argument("--model", type=Path, help="GGUF model (default: a generated one)")
    p.add_argument("--preset", default="bench", help="ggufgen preset when --model is not given")
    p.add_argument("--vocab", type=int, help="vocabulary size of --model (default: the preset's)")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="streams of the overhead part")
    p.add_argument("--requests", type=int, default=48, help="requests per overhead point")
    p.add_argument("--repeats", type=int, default=2, help="rounds per overhead point")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (split in routing)")
    p.add_argument("--system-prompts", type=int, default=4)
    p.add_argument("--prefix-tokens", type=int, default=384)
    p.add_argument("--tail-tokens", type=int, default=16)
    p.add_argument("--routing-requests", type=int, default=96)
    p.add_argument("--routing-concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, help="result JSON (default bench/results/gateway.json)")
    args = p.parse_args(argv)
    if args.command not in ("serve", "replica"):
        args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
        if args.quick:
            args.preset = "tiny" if args.model is None else args.preset
            args.concurrency = [1, 4]
            args.requests, args.repeats, args.max_tokens = 8, 1, 16
            args.prefix_tokens, args.routing_requests, args.routing_concurrency = 64, 16, 4
            args.cpu_requests = 20
        if any(c < 1 for c in args.concurrency):
            p.error(f"--concurrency needs positive integers, got {args.concurrency}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "serve":
        serve(args)
        return
    if args.command == "replica":
        stand_in_replica(args)
        return
    model = Path("-")
    if args.part != "cpu":  # the cpu part streams from a stand-in: no model
        model = args.model or ensure_model(args.preset)
        if args.vocab is None:
            from llamaherd_server import ggufgen

            args.vocab = 32000 if args.model else ggufgen.PRESETS[args.preset].vocab
        if not model.exists():
            raise SystemExit(f"--model {model}: no such file")
    out = args.out or HERE / "results" / ("gateway-quick.json" if args.quick else "gateway.json")
    logdir = out.parent / "gateway-logs"
    logdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "model": str(model),
        "quick": args.quick,
        "args": {k: v for k, v in vars(args).items() if k not in ("model", "out", "command")},
    }
    if args.part in ("overhead", "both", "all"):
        result["overhead"] = asyncio.run(run_overhead(args, model, logdir))
    if args.part in ("cpu", "all"):
        result["cpu"] = run_cpu(args, logdir)
    if args.part in ("routing", "both", "all"):
        result["routing"] = asyncio.run(run_routing(args, model, logdir))
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
