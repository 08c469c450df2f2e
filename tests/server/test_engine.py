"""The scheduler on the real llama.cpp, without HTTP."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from llamaherd_server.generation import (
    EngineFailed,
    Failed,
    Finished,
    SamplingParams,
    TextChunk,
)
from llamaherd_server.queue import QueueFull

from ..conftest import wait_for

pytestmark = pytest.mark.server

PROMPTS = [
    "the model is here and the queue is long",
    "hello world, tell me a story about a llama",
    "write a small answer to this question",
    "explain the cluster and the server to a user",
]


def test_concurrent_sequences_share_llama_decode_calls(make_engine, tiny_model: Path) -> None:
    h = make_engine(tiny_model, slots=4, max_wait_ms=50)
    tracked = [h.submit(p, max_tokens=24, temperature=0, ignore_eos=True) for p in PROMPTS]
    for t in tracked:
        assert isinstance(t.result, Finished)
        assert t.result.completion_tokens == 24
    steps = h.metric("llamaherd_batch_size_count")
    # Steps with at most 3 sequences; the rest decoded all 4 together.
    small = h.metric("llamaherd_batch_size_bucket", {"le": "3.0"})
    assert steps - small >= 20, f"{steps} steps, {small} with fewer than 4 sequences"
    assert h.metric("llamaherd_generated_tokens_total") == 4 * 24
    # The whole KV cache is free again.
    assert h.engine.active_count == 0
    assert h.metric("llamaherd_kv_cache_usage_ratio") == 0.0


def test_a_request_admitted_mid_generation_starts_before_the_others_finish(
    make_engine, small_model: Path
) -> None:
    """Continuous batching: the late request does not wait for the running ones to end."""
    h = make_engine(small_model, slots=4, max_wait_ms=0)
    long = [h.submit(p, max_tokens=120, temperature=0, ignore_eos=True) for p in PROMPTS[:2]]
    wait_for(lambda: all(t.tokens >= 10 for t in long), message="long requests to be running")
    late = h.submit(PROMPTS[2], max_tokens=5, temperature=0, ignore_eos=True)
    assert isinstance(late.result, Finished)
    # Judged by when the engine handed each event out, not by when this thread looks: the
    # engine thread can keep the GIL from this one for a while.
    for t in long:
        assert late.first_token_at < t.finished_at
        assert late.finished_at < t.finished_at
        assert isinstance(t.result, Finished) and t.result.completion_tokens == 120
        after = sum(1 for at, e in t.events if isinstance(e, TextChunk) and at > late.finished_at)
        assert after >= 50, f"only {after} tokens after the late request ended: static?"


def test_priority_order_under_saturation(make_engine, small_model: Path) -> None:
    h = make_engine(small_model, slots=1, max_wait_ms=0, aging_seconds=1000)
    blocker = h.submit(PROMPTS[0], max_tokens=60, temperature=0, ignore_eos=True)
    wait_for(lambda: blocker.tokens >= 1, message="the blocker to hold the only slot")
    low = [h.submit(PROMPTS[1], priority=0, max_tokens=3, ignore_eos=True) for _ in range(3)]
    high = [h.submit(PROMPTS[2], priority=2, max_tokens=3, ignore_eos=True) for _ in range(3)]
    assert h.metric("llamaherd_requests_waiting", {"priority": "0"}) == 3
    assert h.metric("llamaherd_requests_waiting", {"priority": "2"}) == 3
    order = sorted(low + high, key=lambda t: t.finished_at)
    assert order == high + low
    assert not any(t.req.admitted_at is None for t in order)
    assert blocker.finished_at < min(t.finished_at for t in order)


def test_queue_overflow_is_refused(make_engine, small_model: Path) -> None:
    h = make_engine(small_model, slots=1, queue_limit=2, max_wait_ms=0)
    blocker = h.submit(PROMPTS[0], max_tokens=80, ignore_eos=True)
    wait_for(lambda: blocker.tokens >= 1, message="blocker running")
    queued = [h.submit(PROMPTS[1], max_tokens=2) for _ in range(2)]
    with pytest.raises(QueueFull, match="2 waiting"):
        h.submit(PROMPTS[2], max_tokens=2)
    assert all(isinstance(t.result, Finished) for t in [blocker, *queued])


def test_cancellation_frees_the_slot_and_its_kv_within_an_iteration(
    make_engine, small_model: Path
) -> None:
    # Without the prefix cache, a released sequence's KV is dropped at once.
    h = make_engine(small_model, slots=1, max_wait_ms=0, context_size=1024, prefix_cache=False)
    engine = h.engine
    running = h.submit(PROMPTS[0], max_tokens=1000, ignore_eos=True)
    waiting = h.submit(PROMPTS[1], max_tokens=4, ignore_eos=True)
    wait_for(lambda: running.tokens >= 5, message="first request generating")
    assert engine.backend.lib.llama_memory_seq_pos_max(engine.backend.mem, 0) >= 5

    engine.cancel(running.req)
    result = running.result
    assert isinstance(result, Failed) and result.outcome == "cancelled"
    tokens_at_cancel = running.tokens
    # The freed slot went straight to the waiting request, which ran to its end.
    assert isinstance(waiting.result, Finished)
    assert waiting.result.completion_tokens == 4
    assert running.tokens == tokens_at_cancel
    wait_for(lambda: engine.active_count == 0)
    assert engine.backend.lib.llama_memory_seq_pos_max(engine.backend.mem, 0) == -1
    assert h.metric("llamaherd_requests_total", {"outcome": "cancelled"}) == 1


def test_cancelling_a_queued_request_takes_it_out_of_the_queue(
    make_engine, small_model: Path
) -> None:
    h = make_engine(small_model, slots=1, max_wait_ms=0)
    blocker = h.submit(PROMPTS[0], max_tokens=60, ignore_eos=True)
    wait_for(lambda: blocker.tokens >= 1)
    queued = h.submit(PROMPTS[1], max_tokens=4)
    assert h.engine.queue_depth == 1
    h.engine.cancel(queued.req)
    assert queued.done.is_set(), "a queued request must leave at once, not when admitted"
    assert isinstance(queued.result, Failed) and queued.result.outcome == "cancelled"
    assert h.engine.queue_depth == 0
    assert queued.tokens == 0


def test_deadline_while_generating_is_a_timeout(make_engine, small_model: Path) -> None:
    h = make_engine(small_model, slots=1, max_wait_ms=0)
    slow = h.submit(PROMPTS[0], max_tokens=100_000, ignore_eos=True, timeout_s=0.5)
    queued = h.submit(PROMPTS[1], max_tokens=2, timeout_s=0.3)
    q_result = queued.result
    assert isinstance(q_result, Failed) and q_result.outcome == "timeout"
    assert "waiting in the queue" in q_result.message
    result = slow.result
    assert isinstance(result, Failed) and result.outcome == "timeout"
    assert "timed out after 0.5s" in result.message
    assert h.metric("llamaherd_requests_total", {"outcome": "timeout"}) == 2


def test_the_kv_usage_gauge_follows_every_release(make_engine, small_model: Path) -> None:
    """Not only a step updates the gauge: a cancel or a timeout that leaves the engine idle
    (no step follows) shows the KV freed at once. (With the prefix cache on, the freed cells
    move to the prefix cache's gauge: see test_prefix_cache.py.)"""
    h = make_engine(small_model, slots=2, max_wait_ms=0, context_size=512, prefix_cache=False)
    engine = h.engine
    running = h.submit(PROMPTS[0], max_tokens=400, ignore_eos=True)
    wait_for(lambda: running.tokens >= 5, message="the request to be generating")
    assert h.metric("llamaherd_kv_cache_usage_ratio") > 0
    engine.cancel(running.req)
    assert isinstance(running.result, Failed) and running.result.outcome == "cancelled"
    assert engine.active_count == 0
    assert h.metric("llamaherd_kv_cache_usage_ratio") == 0.0

    slow = h.submit(PROMPTS[1], max_tokens=400, ignore_eos=True, timeout_s=0.5)
    wait_for(lambda: slow.tokens >= 1, message="the second request to be generating")
    assert h.metric("llamaherd_kv_cache_usage_ratio") > 0
    assert isinstance(slow.result, Failed) and slow.result.outcome == "timeout"
    assert h.metric("llamaherd_kv_cache_usage_ratio") == 0.0

    # A finished request frees its KV too.
    short = h.submit(PROMPTS[2], max_tokens=3, temperature=0, ignore_eos=True)
    assert isinstance(short.result, Finished)
    assert h.metric("llamaherd_kv_cache_usage_ratio") == 0.0
    assert engine.backend.lib.llama_memory_seq_pos_max(engine.backend.mem, 0) == -1


def test_max_tokens_eos_and_stop_strings(make_engine, tiny_model: Path) -> None:
    h = make_engine(tiny_model, slots=2)
    full = h.submit(PROMPTS[1], max_tokens=40, temperature=0, ignore_eos=True)
    assert isinstance(full.result, Finished)
    assert (full.result.finish_reason, full.result.completion_tokens) == ("length", 40)
    text = full.text
    # A stop string taken from the middle of the greedy text ends generation right before it.
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    cut = text.index(stop)
    stopped = h.submit(PROMPTS[1], max_tokens=40, temperature=0, ignore_eos=True, stop=(stop,))
    assert isinstance(stopped.result, Finished)
    assert stopped.result.finish_reason == "stop"
    assert stopped.text == text[:cut]
    assert stop not in stopped.text


def test_the_context_per_slot_bounds_generation(make_engine, tiny_model: Path) -> None:
    h = make_engine(tiny_model, slots=2, context_size=64)
    prompt = h.engine.tokenize(PROMPTS[0])
    t = h.submit(prompt, max_tokens=1000, ignore_eos=True)
    assert isinstance(t.result, Finished)
    assert t.result.finish_reason == "length"
    assert len(prompt) + t.result.completion_tokens == 64


def test_seeded_sampling_repeats_and_streams_whole_characters(
    make_engine, tiny_model: Path
) -> None:
    h = make_engine(tiny_model, slots=2)
    kwargs = dict(max_tokens=150, temperature=1.5, seed=1234, ignore_eos=True)
    a = h.submit("naïve café 世界", **kwargs)
    b = h.submit("naïve café 世界", **kwargs)
    assert isinstance(a.result, Finished) and isinstance(b.result, Finished)
    assert a.text == b.text
    for _, event in a.events:
        if isinstance(event, TextChunk):
            event.text.encode("utf-8")  # a split character would be a lone surrogate: raises


def test_utf8_characters_split_across_tokens_are_never_split_in_the_stream(
    make_engine, tiny_model: Path
) -> None:
    """Feed the byte tokens of multi-byte characters through the real detokenizer."""
    h = make_engine(tiny_model, slots=1)
    engine = h.engine
    # The generator's vocabulary puts byte b at token 5 + b.
    assert all(engine.token_bytes(5 + b) == bytes([b]) for b in range(256))

    from llamaherd_server.engine import _Sequence
    from llamaherd_server.generation import GenerationRequest
    from llamaherd_server.kvcache import KvEntry

    chunks: list[str] = []
    req = GenerationRequest(
        prompt_tokens=[1],
        params=SamplingParams(max_tokens=100),
        emit=lambda e: chunks.append(getattr(e, "text", "")),
    )
    seq = _Sequence(req, KvEntry(seq_id=0, origin=1), None)
    for byte in "é世🦙".encode():
        engine._accept_token(seq, 5 + byte, 0.0)
    assert "".join(chunks) == "é世🦙"
    assert [c for c in chunks if c] == ["é", "世", "🦙"]


def test_temperature_zero_alone_and_batched(make_engine, tiny_model: Path) -> None:
    """Greedy output of a prompt decoded alone, then in a batch with other prompts that start
    with it.

    Observed on llama.cpp's CPU backend (llama-cpp-python 0.3.36): identical when the prompts
    start together. It is not true of every batch: the CPU kernels are not batch-invariant,
    and a short prompt prefilled in the middle of another sequence's generation can change
    that sequence's greedy tokens (see test_prefix_cache.py). GPU backends may differ too.
    """
    h = make_engine(tiny_model, slots=4, max_wait_ms=50)
    alone = h.submit(PROMPTS[0], max_tokens=32, temperature=0, ignore_eos=True)
    assert isinstance(alone.result, Finished)
    batch = [h.submit(p, max_tokens=32, temperature=0, ignore_eos=True) for p in PROMPTS]
    assert all(isinstance(t.result, Finished) for t in batch)
    assert h.metric("llamaherd_batch_size_bucket", {"le": "3.0"}) < h.metric(
        "llamaherd_batch_size_count"
    ), "the second run was not batched"
    assert batch[0].text == alone.text


# ---- a dead engine is a dead server ------------------------------------------------------------


def test_an_exception_in_the_scheduler_loop_fails_every_request(
    make_engine, small_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside the per-step try (here: queue expiry), an exception kills the loop: every running
    and queued request fails with an error that says so, and the engine reports unhealthy."""
    h = make_engine(small_model, slots=1, max_wait_ms=0)
    running = h.submit(PROMPTS[0], max_tokens=2000, ignore_eos=True)
    wait_for(lambda: running.tokens >= 2, message="the request to be generating")
    queued = [h.submit(PROMPTS[1], max_tokens=5) for _ in range(2)]
    assert h.engine.unhealthy_reason() is None

    def boom(now: float) -> None:
        raise RuntimeError("queue expiry exploded")

    monkeypatch.setattr(h.engine, "_expire_queued", boom)
    for t in [running, *queued]:
        result = t.result
        assert isinstance(result, Failed), result
        assert result.outcome == "error"
        assert "engine failed: RuntimeError: queue expiry exploded" in result.message
    assert isinstance(running.result, Failed) and running.result.completion_tokens >= 2
    reason = h.engine.unhealthy_reason()
    assert reason is not None and "queue expiry exploded" in reason
    assert h.engine.unavailable_reason() == reason
    assert h.engine.active_count == 0 and h.engine.queue_depth == 0
    assert h.metric("llamaherd_requests_total", {"outcome": "error"}) == 3
    assert h.metric("llamaherd_ready") == 0
    # Nothing new is admitted: it would wait forever.
    with pytest.raises(EngineFailed, match="queue expiry exploded"):
        h.submit(PROMPTS[2], max_tokens=2)


def test_an_exception_at_admission_fails_that_request_alone(
    make_engine, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    h = make_engine(tiny_model, slots=2, max_wait_ms=0)
    real = h.engine._make_sampler

    def boom(params: SamplingParams) -> object:
        if params.max_tokens == 5:
            raise ValueError("sampler set-up exploded")
        return real(params)

    monkeypatch.setattr(h.engine, "_make_sampler", boom)
    bystander = h.submit(PROMPTS[1], max_tokens=40, temperature=0, ignore_eos=True)
    tracked = h.submit(PROMPTS[0], max_tokens=5)
    result = tracked.result
    assert isinstance(result, Failed) and result.outcome == "error"
    assert "ValueError: sampler set-up exploded" in result.message
    assert h.engine.unhealthy_reason() is None
    # The traceback is logged, with the request's id.
    logged = [r for r in caplog.records if r.name == "llamaherd.engine" and r.exc_info]
    assert logged and tracked.req.id in logged[0].getMessage()
    assert isinstance(bystander.result, Finished) and bystander.tokens == 40
    assert isinstance(h.submit(PROMPTS[2], max_tokens=3).result, Finished)
    assert h.engine.kv.cells(running_only=True) == 0


def test_the_watchdog_reports_a_stalled_engine(
    make_engine, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make_engine(tiny_model, slots=2, max_wait_ms=0, stall_seconds=0.5)
    engine = h.engine
    real_step = engine._step
    release = threading.Event()

    def stuck() -> None:
        release.wait(30)
        real_step()

    monkeypatch.setattr(engine, "_step", stuck)
    tracked = h.submit(PROMPTS[0], max_tokens=4, temperature=0, ignore_eos=True)
    reason = wait_for(engine.unhealthy_reason, timeout=10, message="the watchdog")
    assert reason.startswith("engine stalled: no progress for")
    assert "1 running" in reason
    release.set()
    assert isinstance(tracked.result, Finished)
    # Idle again: an idle engine is never stalled, however long it waits.
    wait_for(lambda: engine.unhealthy_reason() is None, message="healthy again")
    time.sleep(0.7)
    assert engine.unhealthy_reason() is None


# ---- shutdown ----------------------------------------------------------------------------------


def test_close_never_frees_the_context_under_a_running_step(
    make_engine, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A step that outlasts close()'s wait: close() returns, frees nothing (it logs the leak),
    and the step finishes on a context that is still there; a later close() frees it."""
    h = make_engine(tiny_model, slots=1, max_wait_ms=0)
    engine = h.engine
    lib = engine.backend.lib
    freed: list[str] = []
    # (The batch is numpy memory the backend owns: nothing of llama.cpp's to free.)
    for name in ("llama_free", "llama_model_free", "llama_sampler_free"):
        real = getattr(lib, name)

        def spy(*args: object, _name: str = name, _real: object = real) -> object:
            freed.append(_name)
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(lib, name, spy)
    real_step = engine._step
    inside = threading.Event()
    release = threading.Event()
    finished_step = threading.Event()

    def stuck() -> None:
        inside.set()
        release.wait(30)
        real_step()
        finished_step.set()

    monkeypatch.setattr(engine, "_step", stuck)
    engine.close_timeout_s = 0.3
    tracked = h.submit(PROMPTS[0], max_tokens=50, temperature=0, ignore_eos=True)
    assert inside.wait(10), "the step did not start"

    started = time.monotonic()
    engine.close()
    assert time.monotonic() - started < 5
    assert freed == []
    backend = engine.backend
    assert backend.ctx is not None and backend.model is not None and backend.batch is not None
    assert "leaving the llama.cpp context and model allocated" in caplog.text
    assert not engine.ready

    release.set()
    assert finished_step.wait(10), "the step did not finish"
    engine._thread.join(10)
    assert not engine._thread.is_alive()
    # The step ran to its end on the live context: its first token went out.
    assert tracked.tokens == 1
    engine.close()
    assert {"llama_free", "llama_model_free"} <= set(freed)
    assert engine.backend.ctx is None and engine.backend.model is None


def test_the_greedy_fast_path_picks_what_a_greedy_sampler_picks(
    make_engine, small_model: Path
) -> None:
    """The engine takes temperature-0 tokens as one argmax over the step's logits; check it
    against llama.cpp's own greedy sampler on a batch that mixes a prefill with decodes (the
    logits of several sequences, one of them from a prompt's last token)."""
    h = make_engine(small_model, slots=4, max_wait_ms=0)
    backend = h.engine.backend
    lib = backend.lib
    # Four sequences: three decode one token each, the fourth prefills a 5-token prompt.
    prompts = [backend.tokenize(p, True, False) for p in PROMPTS[:4]]
    h.engine.close()  # the test drives the backend directly from here on
    backend = type(backend)(
        small_model, slots=4, context_size=256, batch_size=64, threads=2, gpu_layers=0
    )
    backend.load()
    try:
        batch = []
        for seq, toks in enumerate(prompts[:3]):
            batch += [(t, i, seq, i == len(toks) - 1) for i, t in enumerate(toks)]
        assert backend.decode(batch) == 0
        batch = [(prompts[s][-1], len(prompts[s]), s, True) for s in range(3)]
        batch += [(t, i, 3, i == len(prompts[3]) - 1) for i, t in enumerate(prompts[3])]
        assert backend.decode(batch) == 0
        outputs = [i for i, entry in enumerate(batch) if entry[3]]
        assert len(outputs) == 4
        greedy = lib.llama_sampler_init_greedy()
        expected = [lib.llama_sampler_sample(greedy, backend.ctx, i) for i in outputs]
        lib.llama_sampler_free(greedy)
        assert backend.argmax(range(4), 4) == expected
        assert backend.argmax([1, 3], 4) == [expected[1], expected[3]]
    finally:
        backend.free()


def test_plain_temperature_sampling_is_the_engines_own_and_seeded(
    make_engine, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Temperature-only requests (the API's default) are sampled by the engine, all of a
    step's at once; a seed repeats them, another seed changes them; a request with top-k in
    the same steps still goes through llama.cpp's sampler chain."""
    h = make_engine(tiny_model, slots=3, max_wait_ms=50)
    backend = h.engine.backend
    chain_calls: list[int] = []
    real_sample = backend.sample

    def sample(sampler: object, index: int) -> int:
        chain_calls.append(index)
        return real_sample(sampler, index)

    monkeypatch.setattr(backend, "sample", sample)
    plain = dict(max_tokens=40, temperature=0.9, ignore_eos=True)
    a = h.submit(PROMPTS[0], seed=7, **plain)
    b = h.submit(PROMPTS[0], seed=8, **plain)
    chained = h.submit(PROMPTS[1], max_tokens=40, temperature=0.9, top_k=40, ignore_eos=True)
    for t in (a, b, chained):
        assert isinstance(t.result, Finished), t.result
    assert len(chain_calls) == 40, "only the top-k request samples through llama.cpp"
    assert a.text != b.text
    # The same seed twice more: the same text (compared within one batch, not with the first
    # run: llama.cpp on a CPU is not batch-invariant, so the logits themselves may differ).
    again = [h.submit(PROMPTS[0], seed=7, **plain) for _ in range(2)]
    for t in again:
        assert isinstance(t.result, Finished), t.result
    assert again[0].text == again[1].text
