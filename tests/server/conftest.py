"""Fixtures for tests on the real llama.cpp engine."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamaherd_server.api import create_app
from llamaherd_server.engine import (
    Engine,
    Failed,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextChunk,
)
from llamaherd_server.metrics import ServerMetrics
from llamaherd_server.settings import ServerSettings

pytestmark = pytest.mark.server


@dataclass
class Tracked:
    """A request and everything the engine told it, with the time each event came."""

    req: GenerationRequest
    events: list[tuple[float, Any]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        return "".join(e.text for _, e in self.events if isinstance(e, TextChunk))

    @property
    def tokens(self) -> int:
        return sum(e.n_tokens for _, e in self.events if isinstance(e, TextChunk))

    @property
    def result(self) -> Finished | Failed:
        assert self.done.wait(60), f"request {self.req.id} did not finish"
        last = self.events[-1][1]
        assert isinstance(last, Finished | Failed)
        return last

    @property
    def first_token_at(self) -> float:
        return next(t for t, e in self.events if isinstance(e, TextChunk))

    @property
    def finished_at(self) -> float:
        self.result  # noqa: B018 (waits)
        return self.events[-1][0]


class EngineHarness:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def submit(
        self, prompt: str | list[int], priority: int = 0, timeout_s: float = 120.0, **params: Any
    ) -> Tracked:
        tokens = self.engine.tokenize(prompt) if isinstance(prompt, str) else prompt
        holder: list[Tracked] = []

        def emit(event: Any) -> None:
            tracked = holder[0]
            tracked.events.append((time.monotonic(), event))
            if not isinstance(event, TextChunk):
                tracked.done.set()

        req = GenerationRequest(
            prompt_tokens=tokens,
            params=SamplingParams(**params),
            emit=emit,
            priority=priority,
            timeout_s=timeout_s,
        )
        holder.append(Tracked(req))
        self.engine.submit(req)
        return holder[0]

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.engine.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


@pytest.fixture
def make_engine() -> Iterator[Any]:
    engines: list[Engine] = []

    def make(model: Path, **kwargs: Any) -> EngineHarness:
        kwargs.setdefault("threads", 1)
        # bench/gpu.sh runs these tests on a GPU: LLAMAHERD_TEST_GPU_LAYERS=-1.
        kwargs.setdefault("gpu_layers", int(os.environ.get("LLAMAHERD_TEST_GPU_LAYERS", "0")))
        slots = kwargs.setdefault("slots", 4)
        engine = Engine(model, ServerMetrics(slots), **kwargs)
        engine.load()
        engines.append(engine)
        return EngineHarness(engine)

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
async def make_client(tiny_model: Path) -> AsyncIterator[Any]:
    stack: list[Any] = []

    async def make(model: Path = tiny_model, **overrides: Any) -> httpx.AsyncClient:
        settings = ServerSettings(
            model=model, threads=1, slots=4, context_size=256, max_body_bytes=16_384, **overrides
        )
        app = create_app(settings, load_in_background=False)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://llamaherd.test", timeout=60
        )
        stack.append((lifespan, client))
        client.app = app  # type: ignore[attr-defined]
        return client

    yield make
    for lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)
