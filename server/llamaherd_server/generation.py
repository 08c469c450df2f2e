"""What the engine's callers and its backend share: a generation request, the sampling
parameters it asks for, the events it hears back, and the engine's refusals.

The scheduler (:mod:`llamaherd_server.engine`), the backend it drives
(:mod:`llamaherd_server.backend`, :mod:`llamaherd_server.llama_backend`) and the HTTP side
(:mod:`llamaherd_server.bridge`, :mod:`llamaherd_server.api`) all import these from here, so that
none of them imports another only for its types."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 100
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def has_penalties(self) -> bool:
        return (
            self.repeat_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass
class TextChunk:
    """New text of one sequence; ``n_tokens`` tokens were generated since the last chunk."""

    text: str
    n_tokens: int


@dataclass
class Finished:
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    queue_wait_s: float
    latency_s: float
    time_to_first_token_s: float | None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass
class Failed:
    outcome: str  # "timeout", "cancelled" or "error"
    message: str
    completion_tokens: int = 0


@dataclass
class Admitted:
    """The request left the queue for a slot: from now on it runs. Sent only to requests that
    ask for it (``GenerationRequest.report_admission``): a server sends a stream's response
    headers then, so a client (the gateway) knows that a connection lost before them never
    started any work."""

    queue_wait_s: float


Event = TextChunk | Finished | Failed | Admitted


class EngineNotReady(Exception):
    """The model is still loading."""


class EngineDraining(Exception):
    """The server is shutting down and admits no new requests."""


class EngineFailed(EngineNotReady):
    """The scheduler thread died: the engine serves nothing any more (/health is 503)."""


@dataclass(eq=False)
class GenerationRequest:
    prompt_tokens: list[int]
    params: SamplingParams
    emit: Callable[[Event], object]
    priority: int = 0
    timeout_s: float = 300.0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    admitted_at: float | None = None
    report_admission: bool = False
    # Put back into the queue once after a failed step that it had no output from yet.
    retried: bool = False

    @property
    def deadline(self) -> float:
        return self.arrival + self.timeout_s
