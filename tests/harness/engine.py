"""One driver for the engine's tests, without HTTP: it submits requests whose callback records
every event with the time it came, waits for their results and reads the engine's metrics.

The scheduler's unit tests (``tests/unit/test_scheduler.py``, a fake backend) and the tests on
real llama.cpp (``tests/server``) both drive their engines with it."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from llamaherd_server.engine import Engine
from llamaherd_server.generation import (
    Event,
    Failed,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextChunk,
)

# How long a test waits for a request's last event before it fails.
RESULT_TIMEOUT_S = 60.0


@dataclass
class Tracked:
    """A request and everything the engine told it, with the time each event came."""

    req: GenerationRequest
    events: list[tuple[float, Event]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def text(self) -> str:
        return "".join(e.text for _, e in self.events if isinstance(e, TextChunk))

    @property
    def tokens(self) -> int:
        return sum(e.n_tokens for _, e in self.events if isinstance(e, TextChunk))

    @property
    def result(self) -> Finished | Failed:
        """The last event (waits for it): how the request ended."""
        assert self.done.wait(RESULT_TIMEOUT_S), f"request {self.req.id} did not finish"
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


class EngineDriver:
    """Submits requests to a loaded engine and keeps what happened to them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.finished: list[str] = []  # the names of the requests that ended, in that order
        self._lock = threading.Lock()

    def submit(
        self,
        prompt: str | list[int],
        priority: int = 0,
        timeout_s: float = 120.0,
        *,
        name: str = "",
        **params: Any,
    ) -> Tracked:
        """Submit a prompt (text is tokenized by the engine) with these sampling parameters."""
        tokens = self.engine.tokenize(prompt) if isinstance(prompt, str) else prompt
        holder: list[Tracked] = []

        def emit(event: Event) -> None:
            tracked = holder[0]
            tracked.events.append((time.monotonic(), event))
            if not isinstance(event, TextChunk):
                with self._lock:
                    self.finished.append(name)
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
