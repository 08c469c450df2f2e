"""Streaming load generator for OpenAI-compatible ``/v1/completions`` (async httpx).

Every request streams (``stream: true``), so the client itself measures time to first token
(send → first text chunk), inter-token latency (gaps between text chunks) and end-to-end
latency (send → ``[DONE]``). Prompts are token ids: a fixed number of random ids per request,
the same ids for the same request index on every system, and different for every request so
that no server can reuse a cached prompt. Output length is fixed with ``ignore_eos``.

Three modes, all bounded in requests and time:

* closed loop: ``concurrency`` workers, each sends its next request when its last one ends;
* open loop: Poisson arrivals at ``rate`` requests per second, at most ``max_in_flight`` open;
* waves (the seed tutorial's load test, non-streaming): ``wave`` requests at once, the next
  wave when all of them have answered.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

# Token ids above the specials and the 256 byte tokens of the generated vocabulary.
FIRST_PLAIN_TOKEN = 259


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 32
    max_tokens: int = 64
    vocab: int = 32000
    temperature: float = 0.8
    top_k: int = 40
    seed: int = 1234

    def prompt(self, index: int) -> list[int]:
        rng = random.Random(self.seed * 1_000_003 + index)
        return [rng.randrange(FIRST_PLAIN_TOKEN, self.vocab) for _ in range(self.prompt_tokens)]

    def payload(self, index: int, model: str) -> dict[str, Any]:
        """The same sampler chain on every system: top-k, temperature, random draw."""
        return {
            "model": model,
            "prompt": self.prompt(index),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": 1.0,
            "min_p": 0.0,
            "seed": index,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            # llama-server only: no prompt cache and exactly llamaherd's sampler chain.
            "cache_prompt": False,
            "samplers": ["top_k", "temperature"],
        }


@dataclass
class RequestResult:
    index: int
    sent: float
    first_chunk: float | None = None
    done: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    # Prompt tokens the server took from its cache (llamaherd: usage.prompt_tokens_details;
    # llama-server: timings.cache_n), when it says.
    cached_tokens: int | None = None
    text: str = ""
    error: str | None = None
    # What the server said the request took (llamaherd's /v1/generate: latency_ms), if it says.
    server_latency_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.done is not None and self.first_chunk is not None


async def stream_one(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], index: int
) -> RequestResult:
    result = RequestResult(index=index, sent=time.perf_counter())
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread())[:200].decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {body}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    result.done = time.perf_counter()
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])[:200]
                    return result
                choices = event.get("choices") or []
                if choices and choices[0].get("text"):
                    now = time.perf_counter()
                    if result.first_chunk is None:
                        result.first_chunk = now
                    result.chunk_times.append(now)
                    result.text += choices[0]["text"]
                usage = event.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    result.completion_tokens = int(usage["completion_tokens"])
                    result.prompt_tokens = usage.get("prompt_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        result.cached_tokens = int(details["cached_tokens"])
                timings = event.get("timings")
                if timings and timings.get("cache_n") is not None:
                    result.cached_tokens = int(timings["cache_n"])
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    if result.done is None and result.error is None:
        result.error = "stream ended without [DONE]"
    return result


def make_client(max_connections: int, timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=10.0),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64),
        trust_env=False,  # loopback only: never a proxy
    )


async def _finish(tasks: list[asyncio.Task[None]], timeout_s: float) -> None:
    """Wait for ``tasks``; those still running after ``timeout_s`` are cancelled."""
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=timeout_s)
    except TimeoutError:
        for task in tasks:
            task.cancel()


async def closed_loop(
    url: str,
    payload: Callable[[int], dict[str, Any]],
    *,
    concurrency: int,
    n_requests: int,
    first_index: int = 0,
    time_limit_s: float = 600.0,
) -> tuple[list[RequestResult], float]:
    """``concurrency`` workers share ``n_requests`` requests. Returns results and wall time."""
    results: list[RequestResult] = []
    next_i = 0
    deadline = time.perf_counter() + time_limit_s

    async with make_client(concurrency + 4, time_limit_s) as client:

        async def worker() -> None:
            nonlocal next_i
            while next_i < n_requests and time.perf_counter() < deadline:
                i = first_index + next_i
                next_i += 1
                results.append(await stream_one(client, url, payload(i), i))

        started = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
        await _finish(tasks, time_limit_s + 30)
        wall = time.perf_counter() - started
    return results, wall


async def open_loop(
    url: str,
    payload: Callable[[int], dict[str, Any]],
    *,
    rate: float,
    n_requests: int,
    first_index: int = 0,
    seed: int = 7,
    max_in_flight: int = 64,
    time_limit_s: float = 600.0,
) -> tuple[list[RequestResult], float]:
    """Poisson arrivals at ``rate`` per second; a request that would exceed ``max_in_flight``
    waits for a free place (and its wait counts in its latency)."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(max_in_flight)
    results: list[RequestResult] = []

    async with make_client(max_in_flight + 4, time_limit_s) as client:

        async def one(i: int, scheduled: float) -> None:
            async with gate:
                r = await stream_one(client, url, payload(i), i)
            r.sent = scheduled  # latency counts from the arrival, not from the send
            results.append(r)

        started = time.perf_counter()
        deadline = started + time_limit_s
        tasks: list[asyncio.Task[None]] = []
        arrival = started
        for k in range(n_requests):
            arrival += rng.expovariate(rate)
            delay = arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() > deadline:
                break
            tasks.append(asyncio.create_task(one(first_index + k, arrival)))
        await _finish(tasks, max(1.0, deadline - time.perf_counter()) + 30)
        wall = time.perf_counter() - started
    return results, wall


async def post_one(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], index: int
) -> RequestResult:
    """One non-streaming request: llamaherd's ``/v1/generate`` (``tokens_generated``,
    ``latency_ms``) or an OpenAI ``/v1/completions`` (``usage``). No stream, so the first
    chunk is the whole reply."""
    result = RequestResult(index=index, sent=time.perf_counter())
    try:
        resp = await client.post(url, json=payload)
        now = time.perf_counter()
        if resp.status_code != 200:
            result.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
            return result
        body = resp.json()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    result.first_chunk = result.done = now
    usage = body.get("usage") or {}
    tokens = body.get("tokens_generated", usage.get("completion_tokens"))
    result.completion_tokens = None if tokens is None else int(tokens)
    prompt = body.get("prompt_tokens", usage.get("prompt_tokens"))
    result.prompt_tokens = None if prompt is None else int(prompt)
    if body.get("latency_ms") is not None:
        result.server_latency_ms = float(body["latency_ms"])
    choices = body.get("choices") or []
    result.text = body.get("text") or (choices[0].get("text", "") if choices else "")
    return result


async def waves(
    url: str,
    payload: Callable[[int], dict[str, Any]],
    *,
    n_requests: int,
    wave: int,
    first_index: int = 0,
    time_limit_s: float = 600.0,
) -> tuple[list[RequestResult], float]:
    """The seed tutorial's load test: ``wave`` requests sent at once, the next wave when the
    whole wave has answered (non-streaming). Bounded by ``n_requests`` and ``time_limit_s``
    (no new wave starts after it)."""
    results: list[RequestResult] = []
    async with make_client(wave + 4, time_limit_s) as client:
        started = time.perf_counter()
        deadline = started + time_limit_s
        for start in range(0, n_requests, wave):
            if time.perf_counter() > deadline:
                break
            indices = range(first_index + start, first_index + min(start + wave, n_requests))
            batch = [post_one(client, url, payload(i), i) for i in indices]
            left = max(1.0, deadline - time.perf_counter())
            try:
                results += await asyncio.wait_for(asyncio.gather(*batch), timeout=left + 30)
            except TimeoutError:
                break
        wall = time.perf_counter() - started
    return results, wall


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[RequestResult], wall_s: float, max_tokens: int) -> dict[str, Any]:
    """Aggregate metrics of one load point (times in milliseconds)."""
    ok = [r for r in results if r.ok]
    errors = [r.error for r in results if not r.ok]
    tokens = [r.completion_tokens if r.completion_tokens is not None else max_tokens for r in ok]
    short = sum(1 for t in tokens if t != max_tokens)
    ttft = [(r.first_chunk - r.sent) * 1000 for r in ok if r.first_chunk is not None]
    e2e = [(r.done - r.sent) * 1000 for r in ok if r.done is not None]
    itl = [
        (b - a) * 1000 for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)
    ]

    def pcts(values: list[float]) -> dict[str, float | None]:
        return {f"p{q}": percentile(values, q) for q in (50, 95, 99)}

    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wrong_length": short,
        "wall_s": wall_s,
        "output_tokens": sum(tokens),
        "tokens_per_s": sum(tokens) / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "ttft_ms": pcts(ttft),
        "itl_ms": pcts(itl),
        "e2e_ms": pcts(e2e),
        "itl_mean_ms": sum(itl) / len(itl) if itl else None,
    }


def summarize_waves(results: list[RequestResult], wall_s: float) -> dict[str, Any]:
    """Aggregate of a non-streaming load (``waves``): tokens/s over the wall time and the
    client's end-to-end latency, plus the server's own latency where it reports one."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    e2e = [(r.done - r.sent) * 1000 for r in ok if r.done is not None]
    server = [r.server_latency_ms for r in ok if r.server_latency_ms is not None]

    def pcts(values: list[float]) -> dict[str, float | None]:
        return {f"p{q}": percentile(values, q) for q in (50, 95, 99)}

    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": [r.error for r in results if not r.ok][:3],
        "wall_s": wall_s,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "mean_output_tokens": tokens / len(ok) if ok else None,
        "latency_ms": pcts(e2e),
        "server_latency_ms": pcts(server) if server else None,
    }
