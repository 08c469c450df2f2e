"""Fixtures for tests on the real llama.cpp engine."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llamaherd_server.api import create_app
from llamaherd_server.engine import Engine
from llamaherd_server.llama_backend import LlamaBackend
from llamaherd_server.metrics import ServerMetrics
from llamaherd_server.settings import ServerSettings
from tests.harness.engine import EngineDriver

pytestmark = pytest.mark.server


@pytest.fixture
def make_engine() -> Iterator[Any]:
    engines: list[Engine] = []

    def make(model: Path, **kwargs: Any) -> EngineDriver:
        backend = LlamaBackend.factory(
            model,
            threads=kwargs.pop("threads", 1),
            # bench/gpu.sh runs these tests on a GPU: LLAMAHERD_TEST_GPU_LAYERS=-1.
            gpu_layers=kwargs.pop(
                "gpu_layers", int(os.environ.get("LLAMAHERD_TEST_GPU_LAYERS", "0"))
            ),
        )
        slots = kwargs.setdefault("slots", 4)
        engine = Engine(model, ServerMetrics(slots), backend=backend, **kwargs)
        engine.load()
        engines.append(engine)
        return EngineDriver(engine)

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
