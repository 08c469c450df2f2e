"""The prefix cache's bookkeeping (:mod:`llamaherd_server.kvcache`) against a simulation of
llama.cpp's unified KV cache: cells that each hold one position for a set of sequences, with
``seq_cp`` and ``seq_rm`` as llama.cpp defines them. Random operations; after each, the pool's
cell count and every sequence's tokens must agree with the simulated cells."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llamaherd_server import kvcache
from llamaherd_server.kvcache import KvPool, common_prefix


class SimulatedKv:
    def __init__(self) -> None:
        self.cells: list[tuple[int, set[int]]] = []  # (position, sequences)

    def seq_rm(self, seq_id: int) -> None:
        for _, seqs in self.cells:
            seqs.discard(seq_id)
        self.cells = [(p, s) for p, s in self.cells if s]

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        for pos, seqs in self.cells:
            if p0 <= pos < p1 and src in seqs:
                seqs.add(dst)

    def seq_trim(self, seq_id: int, keep: int) -> bool:
        for pos, seqs in self.cells:
            if pos >= keep:
                seqs.discard(seq_id)
        self.cells = [(p, s) for p, s in self.cells if s]
        return True

    def seq_save(self, seq_id: int) -> bytes:
        return ",".join(str(p) for p in self.positions(seq_id)).encode()

    def seq_restore(self, data: bytes, seq_id: int) -> bool:
        self.cells.extend((int(p), {seq_id}) for p in data.decode().split(","))
        return True

    def decode(self, seq_id: int, start: int, n: int) -> None:
        self.cells.extend((start + i, {seq_id}) for i in range(n))

    def positions(self, seq_id: int) -> list[int]:
        return sorted(p for p, s in self.cells if seq_id in s)


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4], 10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3], 2) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3, 4], 10) == 3
    assert common_prefix([], [1], 10) == 0
    assert common_prefix([5], [1], 10) == 0
    long = list(range(1000))
    assert common_prefix(long, [*long[:777], -1], 2000) == 777


PROMPTS = [
    [1, 2, 3, 4, 5, 6, 7, 8],
    [1, 2, 3, 4, 9, 9],
    [1, 2, 3, 4, 5, 6, 7, 8, 10, 11],
    [1, 7, 7, 7, 7],
    [2, 2, 2],
]


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["start", "step", "finish", "room"]), st.integers(0, 50)),
        max_size=60,
    ),
    keep=st.booleans(),
    host=st.sampled_from([0, 40]),
)
def test_the_pool_agrees_with_the_cells(ops: list[tuple[str, int]], keep: bool, host: int) -> None:
    kv = SimulatedKv()
    pool = KvPool(kv, ids=6, capacity=40, keep=keep, floor=40 if host == 0 else 8, host_bytes=host)
    kvcache.HOST_MIN_GAIN = 1  # the prompts here are short
    restored = 0
    running: list[tuple[object, list[int]]] = []  # (entry, prompt)
    for op, arg in ops:
        if op == "start" and len(running) < 3:
            prompt = PROMPTS[arg % len(PROMPTS)]
            entry = pool.acquire()
            assert entry is not None
            match = pool.match(prompt, exclude=entry, wait=False)
            if match is not None:
                n = pool.attach(entry, match)
                assert n == match.length and entry.tokens == prompt[:n]
                assert kv.positions(entry.seq_id) == list(range(n))
                restored += match.host is not None
            entry.planned = prompt
            running.append((entry, prompt))
        elif op == "step" and running:
            entry, prompt = running[arg % len(running)]
            done = len(entry.tokens)
            new = prompt[done : done + 3] if done < len(prompt) else [100 + arg]
            pool.make_room(len(new))
            kv.decode(entry.seq_id, done, len(new))
            entry.commit(new)
        elif op == "finish" and running:
            entry, _ = running.pop(arg % len(running))
            pool.release(entry, keep=arg % 4 != 0)
        elif op == "room":
            pool.make_room(arg)
        # The pool's view of every sequence is llama.cpp's.
        assert pool.cells() == len(kv.cells)
        assert pool.cells(running_only=True) <= pool.cells()
        for seq_id in range(6):
            entry = pool.entries.get(seq_id)
            expected = list(range(len(entry.tokens))) if entry else []
            assert kv.positions(seq_id) == expected
        assert all(e.running for e in pool.entries.values()) or keep
    for entry, _ in running:
        assert entry.alive, "a running sequence was evicted"
    assert pool.host_bytes == sum(len(h.data) for h in pool.host) <= max(host, 0)
    kvcache.HOST_MIN_GAIN = 16


def test_an_evicted_prompt_comes_back_from_host_memory() -> None:
    kv = SimulatedKv()
    # Host memory ten times the prompt's copy: at a hit share of 0 it earns a tenth of it.
    pool = KvPool(kv, ids=3, capacity=100, keep=True, floor=0, host_bytes=2000)
    pool.hit_share = 0.0  # budget 0: every finished prompt leaves the KV at once
    first = pool.acquire()
    assert first is not None
    prompt = list(range(1, 41))
    kv.decode(first.seq_id, 0, 40)
    first.commit(prompt)
    pool.release(first)
    assert not first.alive and len(kv.cells) == 0
    assert [h.tokens for h in pool.host] == [prompt]
    again = pool.acquire()
    assert again is not None
    match = pool.match([*prompt[:30], 99], exclude=again)
    assert match is not None and match.host is not None and match.length == 30
    assert pool.attach(again, match) == 30
    assert kv.positions(again.seq_id) == list(range(30))
    assert again.tokens == prompt[:30]
    assert pool.cells() == len(kv.cells) == 30


def test_least_recently_used_is_evicted_first_and_duplicates_are_not_kept() -> None:
    kv = SimulatedKv()
    pool = KvPool(kv, ids=3, capacity=100, keep=True, floor=100)
    entries = []
    for prompt in ([1, 2, 3], [4, 5, 6]):
        e = pool.acquire()
        assert e is not None
        kv.decode(e.seq_id, 0, len(prompt))
        e.commit(prompt)
        pool.release(e)
        entries.append(e)
    # A prompt that the cache already holds whole adds nothing: not kept.
    dup = pool.acquire()
    assert dup is not None
    match = pool.match([1, 2, 3, 9], exclude=dup)
    assert match is not None and match.entry is entries[0] and match.length == 3
    pool.attach(dup, match)
    # The cached source is wholly inside the new sequence: dropped, its cells live on.
    assert not entries[0].alive
    assert kv.positions(dup.seq_id) == [0, 1, 2]
    kv.decode(dup.seq_id, 3, 1)
    dup.commit([9])
    pool.release(dup)
    # Ids run out: the least recently used cached entry goes.
    a = pool.acquire()
    b = pool.acquire()
    assert a is not None and b is not None
    assert not entries[1].alive and dup.alive
    assert len(pool.entries) == 3


def test_a_cache_that_serves_nothing_shrinks_to_what_it_earns() -> None:
    kv = SimulatedKv()
    pool = KvPool(kv, ids=40, capacity=1000, keep=True, slots=40)
    pool.hit_share = 0.0  # as after a long run of misses
    for k in range(30):
        e = pool.acquire()
        assert e is not None
        prompt = [1000 + k] * 30  # nothing shared with any other
        pool.admitted(prompt, 0)
        kv.decode(e.seq_id, 0, len(prompt))
        e.commit(prompt)
        pool.release(e)
    # Thirty misses: no budget, nothing kept.
    assert pool.hit_share == 0
    assert pool.cells() <= pool.budget() == 0
    assert len(kv.cells) == pool.cells() == 0
    # A prompt that an evicted entry would have served earns the cache room...
    again = [1000 + 29] * 30 + [5]
    pool.admitted(again, 0)
    assert pool.hit_share > 0 and pool.budget() > 0
    # ...and hits raise it further.
    for _ in range(60):
        pool.admitted(again, 30)
    assert pool.budget() > 900


def saved_prompts(pool: KvPool, kv: SimulatedKv, share: float, n: int) -> int:
    """Finish ``n`` distinct 40-token prompts at a fixed hit share; the host bytes held."""
    for i in range(n):
        pool.hit_share = share
        entry = pool.acquire()
        assert entry is not None
        kv.decode(entry.seq_id, 0, 40)
        entry.commit([1000 * (i + 1) + t for t in range(40)])
        pool.release(entry)
        assert pool.host_bytes <= pool.host_budget() <= pool.host_limit
    return pool.host_bytes


@given(share=st.floats(0.0, 1.0))
def test_host_memory_is_earned_by_the_hit_share(share: float) -> None:
    kv = SimulatedKv()
    limit = 20_000  # about 180 saved prompts of 40 tokens
    pool = KvPool(kv, ids=3, capacity=100, keep=True, floor=0, host_bytes=limit)
    held = saved_prompts(pool, kv, share, 200)
    earned = limit * max(kvcache.HOST_MIN_SHARE, share)
    assert held <= earned
    # It fills what it earned, short of one copy's bytes (about 110).
    assert held >= earned - 120
