"""The scheduler (:class:`llamaherd_server.engine.Engine`) against a fake backend: admission by
priority, continuous batching, the token budget and cancellation, with no model at all.

The same behaviours are checked on the real llama.cpp backend in tests/server/test_engine.py."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from llamaherd_server.backend import Backend, BatchToken, ContextShape
from llamaherd_server.engine import Engine
from llamaherd_server.generation import Failed, Finished, SamplingParams
from llamaherd_server.metrics import ServerMetrics
from tests.conftest import wait_for
from tests.harness.engine import EngineDriver, Tracked

EOS = 1
GENERATED = 7  # the one token the fake ever samples: never EOS, so requests run to max_tokens


class FakeBackend:
    """A model that always says "x": it records every batch and every KV and sampler call.

    ``gate`` (set by default) holds each decode while it is clear; ``in_decode`` is set when a
    decode has started waiting on it. ``step_s`` makes each decode take that long."""

    def __init__(self, step_s: float = 0.0) -> None:
        self.n_vocab = 256
        self.chat_template: str | None = None
        self.bos_text = ""
        self.eos_text = ""
        self.can_share_prefixes = True
        self.step_s = step_s
        self.gate = threading.Event()
        self.gate.set()
        self.in_decode = threading.Event()
        self.batches: list[list[BatchToken]] = []
        self.removed: list[int] = []
        self.copies: list[tuple[int, int, int, int]] = []
        self.live_samplers: set[int] = set()
        self.freed = False
        self.shapes: list[ContextShape] = []  # what the engine asked the factory for
        self._ids = itertools.count()

    def load(self) -> None:
        pass

    def free(self) -> None:
        self.freed = True

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return [2 + ord(c) % 250 for c in text]

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        return b"x"

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def make_sampler(self, params: SamplingParams, seed: int) -> Any:
        sampler = next(self._ids)
        self.live_samplers.add(sampler)
        return sampler

    def accept(self, sampler: Any, tokens: Sequence[int]) -> None:
        pass

    def free_sampler(self, sampler: Any) -> None:
        self.live_samplers.remove(sampler)

    def decode(self, batch: Sequence[BatchToken]) -> int:
        self.in_decode.set()
        assert self.gate.wait(30), "the test never opened the gate"
        self.batches.append(list(batch))
        if self.step_s:
            time.sleep(self.step_s)
        return 0

    def sample(self, sampler: Any, index: int) -> int:
        return GENERATED

    def seq_rm(self, seq_id: int) -> None:
        self.removed.append(seq_id)

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.copies.append((src, dst, p0, p1))

    def seq_trim(self, seq_id: int, keep: int) -> bool:
        return True

    def seq_save(self, seq_id: int) -> bytes:
        return b""  # nothing to save: prompts leave ghosts only

    def seq_restore(self, data: bytes, seq_id: int) -> bool:
        return False


def _is_a_backend(backend: FakeBackend) -> Backend:
    return backend  # mypy checks that the fake follows the protocol


class Harness(EngineDriver):
    """The driver, with the fake backend, submitting prompts of made-up tokens by name."""

    def __init__(self, engine: Engine, backend: FakeBackend) -> None:
        super().__init__(engine)
        self.backend = backend

    def submit(  # type: ignore[override]
        self, name: str, prompt_len: int = 4, priority: int = 0, **params: Any
    ) -> Tracked:
        prompt = [2 + i % 200 for i in range(prompt_len)]
        return super().submit(prompt, priority, name=name, **params)


@pytest.fixture
def make_engine() -> Iterator[Any]:
    engines: list[Engine] = []

    def make(step_s: float = 0.0, **kwargs: Any) -> Harness:
        slots = kwargs.setdefault("slots", 2)
        kwargs.setdefault("max_wait_ms", 0)
        # The requests here share their prompts; prefix sharing is tested on its own below.
        kwargs.setdefault("prefix_cache", False)
        backend = FakeBackend(step_s)

        def make_backend(shape: ContextShape) -> Backend:
            backend.shapes.append(shape)
            return _is_a_backend(backend)

        engine = Engine(Path("fake.gguf"), ServerMetrics(slots), backend=make_backend, **kwargs)
        engine.load()
        engines.append(engine)
        return Harness(engine, backend)

    yield make
    for engine in engines:
        engine.close()


def test_a_saturated_engine_admits_by_priority_then_arrival(make_engine: Any) -> None:
    h = make_engine(slots=1)
    h.backend.gate.clear()
    blocker = h.submit("blocker", max_tokens=5)
    assert h.backend.in_decode.wait(10), "the blocker never reached decode"
    # The only slot is taken and its decode is held: everything below waits in the queue.
    h.submit("low", priority=0, max_tokens=2)
    h.submit("high", priority=10, max_tokens=2)
    h.submit("mid", priority=5, max_tokens=2)
    h.submit("high-later", priority=10, max_tokens=2)
    assert h.engine.queue_depth == 4
    h.backend.gate.set()
    assert isinstance(blocker.result, Finished)
    wait_for(lambda: len(h.finished) == 5, message="every request finished")
    assert h.finished == ["blocker", "high", "high-later", "mid", "low"]


def test_a_late_short_request_finishes_while_long_ones_keep_running(make_engine: Any) -> None:
    h = make_engine(step_s=0.002, slots=3)
    long_ones = [h.submit(f"long{i}", max_tokens=400) for i in range(2)]
    wait_for(lambda: all(t.tokens >= 10 for t in long_ones), message="both long ones decoding")
    short = h.submit("short", max_tokens=3)
    result = short.result
    assert isinstance(result, Finished) and result.completion_tokens == 3
    # It was admitted into the free slot at once, not after the long ones.
    assert h.finished[0] == "short"
    assert not any(t.done.is_set() for t in long_ones)
    assert any({entry[2] for entry in batch} == {0, 1, 2} for batch in h.backend.batches), (
        "the short request never shared a batch with the long ones"
    )
    for tracked in long_ones:
        h.engine.cancel(tracked.req)
        assert isinstance(tracked.result, Failed)


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget(make_engine: Any) -> None:
    h = make_engine(slots=2, token_budget=16)
    tracked = h.submit("long-prompt", prompt_len=50, max_tokens=2)
    result = tracked.result
    assert isinstance(result, Finished) and result.prompt_tokens == 50
    assert [len(b) for b in h.backend.batches] == [16, 16, 16, 2, 1]
    prefill = [entry for batch in h.backend.batches[:4] for entry in batch]
    assert [pos for _, pos, _, _ in prefill] == list(range(50))
    # Logits only for the last prompt token: the first generated token comes from it.
    assert [logits for *_, logits in prefill] == [False] * 49 + [True]
    assert h.metric("llamaherd_prompt_tokens_total") == 50


def test_prefill_chunks_leave_room_for_the_running_sequences(make_engine: Any) -> None:
    h = make_engine(slots=2, token_budget=16)
    h.backend.gate.clear()
    running = h.submit("running", prompt_len=2, max_tokens=10_000)
    assert h.backend.in_decode.wait(10)
    long_prompt = h.submit("long-prompt", prompt_len=50, max_tokens=2)
    h.backend.gate.set()
    assert isinstance(long_prompt.result, Finished)
    assert all(len(batch) <= 16 for batch in h.backend.batches)
    # The step that admits the long prompt: one decode token for "running" (slot 0) and the
    # rest of the budget for the first chunk of the prompt (slot 1).
    shared = next(b for b in h.backend.batches if any(entry[2] == 1 for entry in b))
    assert [entry[2] for entry in shared] == [0] + [1] * 15
    h.engine.cancel(running.req)
    assert isinstance(running.result, Failed)


def test_cancelling_a_running_request_frees_its_slot_for_the_next(make_engine: Any) -> None:
    h = make_engine(step_s=0.001, slots=1)
    running = h.submit("running", max_tokens=10_000)
    waiting = h.submit("waiting", max_tokens=4)
    wait_for(lambda: running.tokens >= 5, message="first request generating")
    assert h.engine.queue_depth == 1

    h.engine.cancel(running.req)
    result = running.result
    assert isinstance(result, Failed) and result.outcome == "cancelled"
    assert 0 in h.backend.removed, "the cancelled sequence's KV was not dropped"
    # The freed slot went straight to the waiting request, which ran to its end.
    waited = waiting.result
    assert isinstance(waited, Finished) and waited.completion_tokens == 4
    wait_for(lambda: h.engine.active_count == 0)
    assert h.backend.removed == [0, 0]
    assert h.backend.live_samplers == set()
    assert h.metric("llamaherd_requests_total", {"outcome": "cancelled"}) == 1
    assert h.metric("llamaherd_requests_total", {"outcome": "ok"}) == 1
    assert h.metric("llamaherd_requests_running") == 0
    assert h.metric("llamaherd_kv_cache_usage_ratio") == 0.0


def test_close_frees_the_backend(make_engine: Any) -> None:
    h = make_engine()
    assert isinstance(h.submit("one", max_tokens=2).result, Finished)
    h.engine.close()
    assert h.backend.freed


def test_the_engine_makes_its_backend_for_the_context_it_needs(make_engine: Any) -> None:
    h = make_engine(slots=3, context_size=128, token_budget=2, prefix_cache=True)
    # Every decoding sequence needs one token of each batch: the budget is at least the slots;
    # the prefix cache adds two sequence ids per slot for cached prefixes.
    shape = ContextShape(slots=3, context_size=128, sequences=9, batch_size=3)
    assert h.backend.shapes == [shape]
    assert make_engine(slots=3, prefix_cache=False).backend.shapes[0].sequences == 3
