"""One-at-a-time serving: the "before" picture for the benchmark.

One ``llama_cpp.Llama`` behind an ``asyncio.Lock`` in a minimal FastAPI app that streams
OpenAI ``/v1/completions``, the way llama-cpp-python's own server does it: a request holds the
lock for its whole generation, the high-level ``Llama.create_completion(stream=True)`` iterator
runs in the thread pool one chunk at a time, and every other request waits for the lock.

    python bench/baseline_server.py --model M.gguf --port 8082 --context-size 512 --threads 2

``ignore_eos`` is honoured with a ``-inf`` logit bias on the end-of-sequence token (the
high-level API has no such flag).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from llama_cpp import Llama
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    prompt: str | list[int]
    model: str | None = None
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None


def create_app(
    model: Path, context_size: int, threads: int, batch: int, gpu_layers: int = 0
) -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["llm"] = Llama(
            model_path=str(model),
            n_ctx=context_size,
            n_batch=batch,
            n_ubatch=batch,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=gpu_layers,
            verbose=False,
        )
        state["lock"] = asyncio.Lock()
        yield
        state["llm"].close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Any:
        llm: Llama = state["llm"]
        lock: asyncio.Lock = state["lock"]
        kwargs: dict[str, Any] = {
            "prompt": body.prompt,
            "max_tokens": body.max_tokens,
            "temperature": body.temperature,
            "top_k": body.top_k,
            "top_p": body.top_p,
            "min_p": body.min_p,
            "repeat_penalty": 1.0,
            "seed": body.seed,
        }
        if body.ignore_eos:
            kwargs["logit_bias"] = {llm.token_eos(): float("-inf")}
        if not body.stream:
            async with lock:
                return await run_in_threadpool(llm.create_completion, **kwargs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        n_prompt = len(body.prompt) if isinstance(body.prompt, list) else None

        async def events() -> AsyncIterator[str]:
            async with lock:
                chunks: Iterator[Any] = llm.create_completion(stream=True, **kwargs)
                generated = 0
                rid = ""
                async for chunk in iterate_in_threadpool(chunks):
                    rid = chunk["id"]
                    generated += 1
                    yield json.dumps(chunk)
                if include_usage:
                    prompt_tokens = n_prompt if n_prompt is not None else 0
                    usage = {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": generated,
                        "total_tokens": prompt_tokens + generated,
                    }
                    yield json.dumps(
                        {
                            "id": rid,
                            "object": "text_completion",
                            "created": int(time.time()),
                            "choices": [],
                            "usage": usage,
                        }
                    )
            yield "[DONE]"

        return EventSourceResponse(events(), sep="\n")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    parser.add_argument("--context-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--gpu-layers", type=int, default=0, help="n_gpu_layers (-1 = all)")
    args = parser.parse_args()
    app = create_app(args.model, args.context_size, args.threads, args.batch, args.gpu_layers)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
