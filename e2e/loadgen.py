"""Bounded load against a llamaherd Service, run inside the cluster (image: e2e/Dockerfile.client).

    python loadgen.py --base-url http://NAME.NS.svc.cluster.local:80 --concurrency 8 \
        --requests 200 --duration 120 --max-tokens 64 [--mode chat|generate|once|post]

``chat`` sends OpenAI chat completions with the official ``openai`` package (``--stream``: as
server-sent events, recording the response id from the first chunk, so a request broken
mid-stream still names the replica's request id); ``generate`` posts to ``/v1/generate`` with
httpx; ``once`` sends one chat completion and prints it; ``post`` sends the given requests
(``--post '{"path": "/v1/generate", "body": {...}}'``, repeatable, each ``--repeat`` times) as
they are, with the model filled in, and judges each by its status and, for a stream, by an error
event or a missing ``[DONE]``. ``--unique-prompts`` starts every prompt with its request's
number (spreads requests over replicas that a prefix-affinity picker would otherwise pin).
The load stops
by itself at ``--requests`` requests or ``--duration`` seconds (or when ``--stop-file`` appears),
whichever comes first; requests in flight then finish, each within ``--timeout`` seconds.

Output, one JSON object per line: ``{"event": "start", ...}``, one ``{"event": "request", ...}``
per finished request (ok, status, error, id, latency, wall-clock start and end, finish reason,
tokens), and a final
``{"event": "summary", ...}``. The exit code is 0 even when requests failed: the caller judges.

Every request opens a new connection by default (``Connection: close``): a Service balances
connections, not requests, so pooled connections would stay pinned to the pods that existed
when the load started and never reach new replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import httpx


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, separators=(",", ":")), flush=True)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index], 4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="the Service root, without /v1")
    parser.add_argument("--model", default="", help="model name (default: the first of /v1/models)")
    parser.add_argument("--mode", choices=["chat", "generate", "once", "post"], default="chat")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=100, help="most requests in all")
    parser.add_argument("--duration", type=float, default=60.0, help="stop starting after this")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="Tell me about the llama herd.")
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, in seconds")
    parser.add_argument("--max-retries", type=int, default=0, help="openai client retries")
    parser.add_argument("--keepalive", action="store_true", help="reuse connections")
    parser.add_argument("--stop-file", default="", help="stop starting requests once it exists")
    parser.add_argument("--api-key", default=os.environ.get("LLAMAHERD_API_KEY", "unused"))
    parser.add_argument("--stream", action="store_true", help="chat: stream the answers (SSE)")
    parser.add_argument(
        "--unique-prompts", action="store_true", help="start each prompt with its request number"
    )
    parser.add_argument(
        "--failure-backoff",
        type=float,
        default=0.0,
        help="seconds a worker waits after a failed request before its next one",
    )
    parser.add_argument(
        "--post",
        action="append",
        default=[],
        type=json.loads,
        help='post mode: {"path": ..., "body": {...}, "label": ...} (JSON), repeatable',
    )
    parser.add_argument("--repeat", type=int, default=1, help="post mode: times each is sent")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.duration <= 0:
        parser.error("--concurrency, --requests and --duration must be positive")
    if args.mode == "post":
        if not args.post or not all(
            isinstance(p, dict)
            and isinstance(p.get("path"), str)
            and isinstance(p.get("body"), dict)
            for p in args.post
        ):
            parser.error('post mode needs --post \'{"path": "/v1/...", "body": {...}}\'')
        if not 1 <= args.repeat <= 1000:
            parser.error("--repeat must be between 1 and 1000")
    args.failure_backoff = min(max(args.failure_backoff, 0.0), 60.0)
    args.requests = min(args.requests, 100_000)
    args.duration = min(args.duration, 3600.0)
    return args


def connection_headers(args: argparse.Namespace) -> dict[str, str]:
    return {} if args.keepalive else {"Connection": "close"}


def http_client(args: argparse.Namespace) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=args.concurrency + 2,
        max_keepalive_connections=args.concurrency if args.keepalive else 0,
    )
    return httpx.AsyncClient(timeout=args.timeout, limits=limits, headers=connection_headers(args))


async def discover_model(http: httpx.AsyncClient, base: str, deadline: float) -> str:
    """The first model of ``/v1/models``; retried (bounded) while the Service has no endpoint."""
    last = ""
    while time.monotonic() < deadline:
        try:
            response = await http.get(f"{base}/v1/models")
            response.raise_for_status()
            return str(response.json()["data"][0]["id"])
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(1.0)
    raise SystemExit(f"cannot list models at {base}/v1/models: {last}")


def error_record(exc: BaseException) -> dict[str, Any]:
    import openai

    status = None
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
    elif isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
    text = str(exc)
    if isinstance(exc, httpx.HTTPStatusError):
        text = f"{text}: {exc.response.text[:500]}"
    return {"ok": False, "status": status, "error": f"{type(exc).__name__}: {text[:800]}"}


async def chat_once(
    client: Any, model: str, args: argparse.Namespace, prompt: str | None = None
) -> dict[str, Any]:
    response = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt if prompt is None else prompt}],
        max_tokens=args.max_tokens,
        temperature=0.7,
        extra_body={"ignore_eos": True},
    )
    choice = response.choices[0]
    tokens = response.usage.completion_tokens if response.usage else None
    return {
        "ok": True,
        "status": 200,
        "id": response.id,
        "model": response.model,
        "finish_reason": choice.finish_reason,
        "tokens": tokens,
        "content": choice.message.content or "",
        "usage": response.usage.model_dump() if response.usage else None,
    }


async def chat_stream(
    client: Any, model: str, args: argparse.Namespace, prompt: str, seen: dict[str, Any]
) -> dict[str, Any]:
    """One streamed chat completion. ``seen`` gets the response id and the time to the first
    chunk as soon as they arrive, so that a stream broken later still reports them."""
    begin = time.monotonic()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=args.max_tokens,
        temperature=0.7,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    finish, usage, answered_by, chunks = None, None, None, 0
    try:
        async for chunk in stream:
            if "id" not in seen and chunk.id:
                seen["id"] = chunk.id
                seen["first_chunk_s"] = round(time.monotonic() - begin, 4)
            answered_by = chunk.model or answered_by
            usage = chunk.usage or usage
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    chunks += 1
                finish = choice.finish_reason or finish
    finally:
        await stream.close()
    return {
        "ok": True,
        "status": 200,
        "id": seen.get("id"),
        "model": answered_by,
        "finish_reason": finish,
        "tokens": usage.completion_tokens if usage else None,
        "chunks": chunks,
    }


def sse_events(text: str) -> list[str]:
    """The ``data:`` payloads of a server-sent event stream."""
    return [line[len("data:") :].strip() for line in text.splitlines() if line.startswith("data:")]


async def post_once(
    http: httpx.AsyncClient, base: str, model: str, item: dict[str, Any]
) -> dict[str, Any]:
    """Send one ``--post`` request as it is (the model filled in when it names none); ok when
    the status is 200 and the answer holds no error (a stream: and ends with ``[DONE]``)."""
    body = {"model": model, **item["body"]}
    response = await http.post(f"{base}{item['path']}", json=body)
    text = response.text
    record: dict[str, Any] = {
        "status": response.status_code,
        "path": item["path"],
        "label": item.get("label", ""),
        "answer": text[:600],
    }
    problem = ""
    if response.status_code != 200:
        problem = f"HTTP {response.status_code}"
    elif body.get("stream"):
        events = sse_events(text)
        errors = [e for e in events if e.startswith("{") and '"error"' in e]
        if errors:
            problem = f"error event in the stream: {errors[0][:400]}"
        elif not events or events[-1] != "[DONE]":
            problem = "the stream did not end with [DONE]"
        else:
            first = next((e for e in events if e.startswith("{")), "{}")
            record["id"] = json.loads(first).get("id")
    else:
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or "error" in answer:
            problem = "the answer is not a result"
        else:
            record["id"] = answer.get("id") or answer.get("request_id")
    record["ok"] = not problem
    if problem:
        record["error"] = f"{problem}: {text[:400]}"
    return record


async def generate_once(
    http: httpx.AsyncClient, base: str, args: argparse.Namespace, prompt: str | None = None
) -> dict[str, Any]:
    response = await http.post(
        f"{base}/v1/generate",
        json={
            "prompt": args.prompt if prompt is None else prompt,
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
        },
    )
    response.raise_for_status()
    body = response.json()
    tokens = body.get("tokens_generated")
    return {
        "ok": True,
        "status": response.status_code,
        "id": body.get("request_id"),
        "finish_reason": "length" if tokens == args.max_tokens else "stop",
        "tokens": tokens,
        "content": body.get("text", ""),
    }


async def run(args: argparse.Namespace) -> None:
    import openai

    base = args.base_url.rstrip("/")
    started = time.monotonic()
    deadline = started + args.duration
    async with http_client(args) as http:
        model = args.model or await discover_model(http, base, deadline)
        client = openai.AsyncOpenAI(
            base_url=f"{base}/v1",
            api_key=args.api_key,
            max_retries=args.max_retries,
            timeout=args.timeout,
            default_headers=connection_headers(args),
        )
        try:
            await load(args, base, model, http, client, started, deadline)
        finally:
            await client.close()


async def load(
    args: argparse.Namespace,
    base: str,
    model: str,
    http: httpx.AsyncClient,
    client: Any,
    started: float,
    deadline: float,
) -> None:
    """Send the requests and print their results."""
    emit({"event": "start", "time": time.time(), "model": model, "mode": args.mode})

    posts = [item for item in args.post for _ in range(args.repeat)]

    async def one(index: int = 1) -> dict[str, Any]:
        prompt = f"[{index}] {args.prompt}" if args.unique_prompts else args.prompt
        seen: dict[str, Any] = {}
        begin = time.monotonic()
        started_at = time.time()
        try:
            if args.mode == "post":
                record = await post_once(http, base, model, posts[index - 1])
            elif args.mode == "generate":
                record = await generate_once(http, base, args, prompt)
            elif args.stream and args.mode == "chat":
                record = await chat_stream(client, model, args, prompt, seen)
            else:
                record = await chat_once(client, model, args, prompt)
        except Exception as exc:  # every failure is a result, never a crash
            record = {**seen, **error_record(exc)}
        end = time.monotonic()
        record["latency_s"] = round(end - begin, 4)
        record["start_s"] = round(begin - started, 3)
        record["end_s"] = round(end - started, 3)
        record["started_at"] = round(started_at, 3)
        record["time"] = time.time()
        if args.mode != "once":
            record.pop("content", None)
        record["complete"] = bool(
            record["ok"]
            and record.get("finish_reason") == "length"
            and record.get("tokens") == args.max_tokens
        )
        return record

    if args.mode == "once":
        emit({"event": "once", **await one()})
        return

    issued = 0
    stopped_by = "requests"
    results: list[dict[str, Any]] = []

    limit = min(args.requests, len(posts)) if args.mode == "post" else args.requests

    def may_start() -> bool:
        nonlocal stopped_by
        if issued >= limit:
            stopped_by = "requests"
            return False
        if time.monotonic() >= deadline:
            stopped_by = "duration"
            return False
        if args.stop_file and os.path.exists(args.stop_file):
            stopped_by = "stop-file"
            return False
        return True

    async def worker() -> None:
        nonlocal issued
        while may_start():
            issued += 1
            index = issued
            record = await one(index)
            record["event"] = "request"
            record["i"] = index
            results.append(record)
            emit(record)
            if not record["ok"] and args.failure_backoff:
                await asyncio.sleep(args.failure_backoff)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    latencies = [r["latency_s"] for r in results if r["ok"]]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.get("status"))] = statuses.get(str(r.get("status")), 0) + 1
    emit(
        {
            "event": "summary",
            "model": model,
            "sent": len(results),
            "ok": sum(1 for r in results if r["ok"]),
            "failed": sum(1 for r in results if not r["ok"]),
            "complete": sum(1 for r in results if r["complete"]),
            "statuses": statuses,
            "stopped_by": stopped_by,
            "duration_s": round(time.monotonic() - started, 3),
            "latency_p50_s": percentile(latencies, 0.5),
            "latency_p95_s": percentile(latencies, 0.95),
            "latency_max_s": max(latencies) if latencies else None,
        }
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(run(args))
    except SystemExit as exc:
        emit({"event": "summary", "sent": 0, "ok": 0, "failed": 0, "error": str(exc.code)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
