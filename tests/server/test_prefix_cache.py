"""The prefix cache on the real llama.cpp: what each sequence holds in the KV (read back from
llama.cpp), how many prompt tokens were prefilled (the engine's counters), and that greedy
outputs are the same with the cache on and off."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaherd_server.generation import Failed, Finished
from llamaherd_server.kvcache import common_prefix

from ..conftest import wait_for

pytestmark = pytest.mark.server

SYSTEMS = [
    "You are a careful assistant for the cluster team. Answer in short sentences, name every "
    "pod you talk about, and never guess a number you were not given. " * 3,
    "You are a friendly guide to llamas and their herds. Keep answers under fifty words and "
    "end each with a question back to the user about their own herd. " * 3,
]
USERS = ["how many pods run now?", "what is a llama?", "tell me about the queue", "and GPUs?"]

PREFILLED = "llamaherd_prompt_tokens_total"
CACHED = "llamaherd_prompt_cached_tokens_total"
EVICTIONS = "llamaherd_prefix_cache_evictions_total"


def kv_positions(engine, seq_id: int) -> tuple[int, int]:
    backend = engine.backend
    lib = backend.lib
    return (
        lib.llama_memory_seq_pos_min(backend.mem, seq_id),
        lib.llama_memory_seq_pos_max(backend.mem, seq_id),
    )


def check_kv_matches_bookkeeping(engine) -> None:
    """Every sequence the engine tracks holds exactly its tokens' positions in llama.cpp's KV,
    and every other sequence id holds nothing."""
    entries = engine.kv.entries
    for seq_id in range(engine.sequences):
        entry = entries.get(seq_id)
        if entry is None or not entry.tokens:
            assert kv_positions(engine, seq_id) == (-1, -1), f"sequence {seq_id} should be empty"
        else:
            assert kv_positions(engine, seq_id) == (0, len(entry.tokens) - 1), seq_id


def greedy(h, prompt, n=24):
    return h.submit(prompt, max_tokens=n, temperature=0, ignore_eos=True)


def test_a_second_prompt_prefills_only_what_differs(make_engine, tiny_model: Path) -> None:
    # The KV-resident cache alone (no host memory behind it: see the last test for that).
    h = make_engine(tiny_model, slots=2, max_wait_ms=0, context_size=1024, prefix_cache_ram_bytes=0)
    engine = h.engine
    first_text = SYSTEMS[0] + USERS[0]
    first = greedy(h, first_text)
    assert isinstance(first.result, Finished)
    check_kv_matches_bookkeeping(engine)
    (cached,) = engine.kv.entries.values()
    a = engine.tokenize(first_text)
    # The finished sequence stays cached: its prompt and the generated tokens it decoded.
    assert cached.tokens[: len(a)] == a
    assert len(cached.tokens) == len(a) + first.result.completion_tokens - 1
    assert h.metric(PREFILLED) == len(a)
    assert h.metric(CACHED) == 0

    b = engine.tokenize(SYSTEMS[0] + USERS[1])
    shared = common_prefix(a, b, len(b) - 1)
    assert shared > 100
    second = greedy(h, b)
    assert isinstance(second.result, Finished)
    assert h.metric(CACHED) == shared
    assert h.metric(PREFILLED) == len(a) + len(b) - shared
    # Both are cached now (neither holds all of the other), each exactly as far as its tokens.
    assert len(engine.kv.entries) == 2
    check_kv_matches_bookkeeping(engine)

    # The same prompt again: everything but its last token (its logits start generation).
    again = greedy(h, b)
    assert isinstance(again.result, Finished)
    assert h.metric(CACHED) == shared + len(b) - 1
    assert again.text == second.text
    check_kv_matches_bookkeeping(engine)
    assert h.metric("llamaherd_kv_cache_usage_ratio") == 0.0
    assert h.metric("llamaherd_prefix_cache_usage_ratio") > 0.0


def test_concurrent_requests_prefill_a_shared_prefix_once(make_engine, tiny_model: Path) -> None:
    h = make_engine(tiny_model, slots=4, max_wait_ms=200, context_size=1024, token_budget=64)
    engine = h.engine
    prompts = [engine.tokenize(SYSTEMS[1] + user) for user in USERS]
    tracked = [greedy(h, p, 8) for p in prompts]
    assert all(isinstance(t.result, Finished) for t in tracked)
    shared = min(common_prefix(prompts[0], p, len(p) - 1) for p in prompts[1:])
    total = sum(len(p) for p in prompts)
    assert h.metric(PREFILLED) + h.metric(CACHED) == total
    # The system prompt was prefilled once: the three others attached it.
    assert h.metric(CACHED) >= 3 * shared
    assert h.metric(PREFILLED) <= total - 3 * shared
    assert h.metric("llamaherd_batch_size_bucket", {"le": "1.0"}) < h.metric(
        "llamaherd_batch_size_count"
    ), "the four never ran together"
    check_kv_matches_bookkeeping(engine)


def test_greedy_outputs_are_the_same_with_the_cache_on_and_off(
    make_engine, tiny_model: Path
) -> None:
    """Each prompt alone, first on an empty cache, then fully cached (all but its last token),
    then a follow-up turn that resends the first turn and its answer: token for token the same
    output as with no cache, on llama.cpp's CPU backend. A cached prefix's K and V were
    computed by the same kernels on the same tokens and positions.

    Not asserted, because it does not hold with the cache off either: the same output when
    other requests share the steps. llama.cpp's CPU kernels are not batch-invariant (the
    matrix kernels and the flash-attention path depend on the number of tokens in the step),
    so a greedy sequence's output can change when a short prompt is prefilled next to it:
    observed here with the cache off (llama-cpp-python 0.3.36). With the cache on, the steps
    hold fewer prefill tokens, so batched outputs differ in the same way. GPU backends pick
    kernels by batch shape as well; no claim is made for them."""
    prompts = [SYSTEMS[i % 2] + USERS[i] for i in range(4)]
    results: dict[bool, list[str]] = {}
    for cache in (False, True):
        h = make_engine(tiny_model, slots=4, max_wait_ms=0, prefix_cache=cache)
        texts = []
        for _ in range(2):
            for p in prompts:
                run = greedy(h, p, 32)
                assert isinstance(run.result, Finished)
                texts.append(run.text)
        follow_up = prompts[0] + texts[0] + " and what else?"
        turn = greedy(h, follow_up, 32)
        assert isinstance(turn.result, Finished)
        texts.append(turn.text)
        results[cache] = texts
        if cache:
            # The second round was served from the cache, and so was the first turn.
            assert h.metric(CACHED) >= sum(len(h.engine.tokenize(p)) - 1 for p in prompts)
        else:
            assert h.metric(CACHED) == 0
    assert results[True] == results[False]


def test_eviction_under_pressure_never_fails_a_request(make_engine, tiny_model: Path) -> None:
    """A KV cache of 2 x 256 cells and 6 sequence ids: distinct prompts of ~150 tokens and 60
    generated tokens fill it; cached prefixes must make way, and every request finishes."""
    h = make_engine(tiny_model, slots=2, max_wait_ms=0, context_size=256)
    engine = h.engine
    prompts = [f"request number {i}: " + "word " * 30 + f"and then {i * 7}" for i in range(12)]
    tracked = [h.submit(p, max_tokens=60, ignore_eos=True, temperature=0) for p in prompts]
    results = [t.result for t in tracked]
    assert all(isinstance(r, Finished) and r.completion_tokens == 60 for r in results), results
    assert h.metric(EVICTIONS) > 0
    assert engine.kv.cells() <= engine.kv.capacity
    check_kv_matches_bookkeeping(engine)


def test_a_cancelled_request_that_shared_a_prefix_leaves_the_others_correct(
    make_engine, small_model: Path
) -> None:
    """The first request prefills a long system prompt in small chunks while three more wait
    for it; it is cancelled part way. The others still answer exactly what they answer with
    no cache at all."""
    prompts = [SYSTEMS[0] * 2 + user for user in USERS]
    reference = make_engine(small_model, slots=4, max_wait_ms=100, prefix_cache=False)
    expected = [greedy(reference, p, 16) for p in prompts[1:]]
    assert all(isinstance(t.result, Finished) for t in expected)

    h = make_engine(small_model, slots=4, max_wait_ms=100, token_budget=16, context_size=1024)
    engine = h.engine
    donor = greedy(h, prompts[0], 200)
    others = [greedy(h, p, 16) for p in prompts[1:]]
    wait_for(lambda: h.metric(PREFILLED) >= 32, timeout=30, message="the donor prefilling")
    prefilled_at_cancel = h.metric(PREFILLED)
    engine.cancel(donor.req)
    result = donor.result
    assert isinstance(result, Failed) and result.outcome == "cancelled"
    for got, want in zip(others, expected, strict=True):
        assert isinstance(got.result, Finished)
        assert got.text == want.text
    # It was cancelled part way through its prompt, and the others took what it had.
    assert prefilled_at_cancel < len(engine.tokenize(prompts[0]))
    assert h.metric(CACHED) > 0
    check_kv_matches_bookkeeping(engine)


def test_a_prompt_saved_to_host_memory_comes_back_with_the_same_output(
    make_engine, tiny_model: Path
) -> None:
    """With no KV budget for the cache, a finished prompt leaves the KV cache for host memory
    (llama_state_seq_get_data); the next request with that prefix gets its cells back by copy
    (llama_state_seq_set_data) and prefills only the rest, and answers what a cache-less
    engine answers."""
    prompts = [SYSTEMS[0] + USERS[0], SYSTEMS[0] + USERS[1]]
    reference = make_engine(tiny_model, slots=2, max_wait_ms=0, prefix_cache=False)
    expected = []
    for p in prompts:
        run = greedy(reference, p)
        assert isinstance(run.result, Finished)
        expected.append(run.text)

    h = make_engine(tiny_model, slots=2, max_wait_ms=0, context_size=1024)
    engine = h.engine
    engine.kv.hit_share = 0.0
    engine.kv.admitted = lambda prompt, cached: None  # keep the KV budget at nothing
    first = greedy(h, prompts[0])
    assert isinstance(first.result, Finished)
    assert engine.kv.cells() == 0, "the finished prompt stayed in the KV cache"
    assert len(engine.kv.host) == 1 and engine.kv.host_bytes > 0
    assert h.metric("llamaherd_prefix_cache_host_bytes") == engine.kv.host_bytes
    second = greedy(h, prompts[1])
    assert isinstance(second.result, Finished)
    a, b = (engine.tokenize(p) for p in prompts)
    shared = common_prefix(a, b, len(b) - 1)
    assert h.metric(CACHED) == shared
    assert h.metric(PREFILLED) == len(a) + len(b) - shared
    assert [first.text, second.text] == expected
    check_kv_matches_bookkeeping(engine)
