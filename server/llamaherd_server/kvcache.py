"""The KV cache's sequences and the prefix cache: which tokens each llama.cpp sequence holds,
which cells sequences share, and where a new request's prompt is already computed.

llama.cpp's unified KV cache is a pool of cells; each cell holds one position of one or more
sequences. ``llama_memory_seq_cp(src, dst, 0, n)`` makes the cells of ``src``'s first ``n``
positions belong to ``dst`` as well, without copying or computing anything. So a prompt prefix
computed once can be attached to any number of sequences.

:class:`KvPool` hands out sequence ids. A running request holds one (there are at most
``slots`` of those); with the prefix cache on, a finished request's sequence stays in the cache,
with its tokens, as a *cached entry* until its id or its cells are needed. A new request gets a
fresh id, and the longest prefix of its prompt that any sequence (running or cached) already
holds is attached to it with ``seq_cp``. The engine then prefills only the rest.

A prefix that another running request is still prefilling is worth waiting for (see
:meth:`KvPool.match`): several requests with one system prompt arriving together prefill it
once, then fan out.

Cell accounting (what the KV gauges show and what eviction frees) follows from how cells are
made: a sequence decoding its own tokens makes new cells (its *origin*); ``seq_cp`` of a prefix
shares cells of the source's origins. So each sequence is a list of spans ``[origin, start,
end)``, spans of one origin all start at the same position, and the cells in use are, per
origin, the furthest end minus that start.

Cached cells are not free: llama.cpp's attention scans every cell up to the highest one in use
for each query of each step, masked or not (on the CPU, a 531-token prefill took 250 ms with
1.6k cells in use and 450 ms with 6.9k). So the cache holds only as many cells as it earns: at
most ``slots`` average prompts (what llama-server's slots hold, but shared by all slots), times
the recent share of prompt tokens it served (an exponential average over admissions, optimistic
at first), and never less than ``floor`` (0 in the engine). Evicted entries leave their tokens
behind as *ghosts* (no KV): a prompt that a ghost would have served counts as a hit too, so a
cache that was too small to hold what repeats grows back. Traffic that repeats itself keeps a
full cache; traffic that never does keeps next to nothing and pays next to nothing.

All of it runs on the scheduler thread only.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# A prefilling sequence's prompt is worth waiting for when it shares at least this many more
# tokens with a new prompt than anything already in the cache: below that, prefilling them
# costs less than the step or two of waiting.
MIN_WAIT_GAIN = 32
# A prompt in host memory is restored when it spares at least this many tokens of prefill
# beyond what the KV offers, and a quarter of what it copies back (restoring copies all of it).
HOST_MIN_GAIN = 16

# Weight of one admission in the average hit share that sets the cache's budget (~ the last 20).
HIT_SMOOTHING = 0.05
# Host memory is earned the same way: the recent hit share of ``host_bytes``, never less than
# this share of it. Unique prompts (every request a miss) then keep a tenth of it instead of
# filling all of it with copies that nothing reads (at 64 streams on the short-step model, 220
# MiB of the server's RSS); ghosts of what it dropped count as hits, so traffic that repeats
# itself keeps it all.
HOST_MIN_SHARE = 0.1


class KvBackend(Protocol):
    def seq_rm(self, seq_id: int) -> None: ...

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None: ...

    def seq_trim(self, seq_id: int, keep: int) -> bool: ...

    def seq_save(self, seq_id: int) -> bytes: ...

    def seq_restore(self, data: bytes, seq_id: int) -> bool: ...


@dataclass(eq=False)
class HostEntry:
    """A cached prompt moved out of the KV cache into host memory: its tokens and its saved KV,
    which ``seq_restore`` puts back into new cells (a copy, no compute)."""

    tokens: list[int]
    data: bytes
    last_used: int = 0


@dataclass(eq=False)
class KvEntry:
    """One llama.cpp sequence id and what its KV holds."""

    seq_id: int
    origin: int  # the origin of the cells this sequence decodes itself
    tokens: list[int] = field(default_factory=list)  # in the KV, at positions 0..len-1
    spans: list[list[int]] = field(default_factory=list)  # [origin, start, end)
    running: bool = True
    # While prefilling: the prompt, which the KV will hold once prefilled (others may wait).
    planned: list[int] | None = None
    last_used: int = 0
    alive: bool = True  # False once its id was freed (evicted, or released without keeping)

    def commit(self, tokens: Sequence[int]) -> None:
        """``tokens`` were decoded into this sequence's own new cells."""
        if not tokens:
            return
        end = len(self.tokens)
        spans = self.spans
        if spans and spans[-1][0] == self.origin:
            spans[-1][2] = end + len(tokens)
        else:
            spans.append([self.origin, end, end + len(tokens)])
        self.tokens.extend(tokens)

    def commit_one(self, token: int) -> None:
        spans = self.spans
        if spans and spans[-1][0] == self.origin:
            spans[-1][2] += 1
        else:
            end = len(self.tokens)
            spans.append([self.origin, end, end + 1])
        self.tokens.append(token)


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the longest common prefix of ``a`` and ``b``, at most ``limit``.

    Compares slices (C speed), halving the range: a few slice compares instead of a Python
    loop over thousands of tokens."""
    n = min(len(a), len(b), limit)
    if n <= 0 or a[0] != b[0]:
        return 0
    if a[:n] == b[:n]:
        return n
    lo, hi = 1, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Match:
    """Where a new prompt's prefix is: ``length`` tokens of ``entry``; ``ready`` when they are in
    the KV now, else ``entry`` is still prefilling them. Or of ``host``, a prompt saved in host
    memory (``entry`` is None then)."""

    entry: KvEntry | None
    length: int
    ready: bool
    host: HostEntry | None = None


class KvPool:
    """The sequence ids of one context, the prefix cache, and the cell accounting.

    ``ids`` sequence ids (llama.cpp's n_seq_max), ``capacity`` cells. With ``keep`` False there
    is no cache: a released sequence's KV is dropped at once, and nothing is ever shared."""

    def __init__(
        self,
        backend: KvBackend,
        *,
        ids: int,
        capacity: int,
        keep: bool,
        floor: int = 0,
        slots: int = 1,
        host_bytes: int = 0,
        on_evict: Callable[[], object] | None = None,
    ) -> None:
        self.backend = backend
        self.capacity = capacity
        self.keep = keep
        self.on_evict = on_evict
        self._free_ids = list(range(ids - 1, -1, -1))
        self.entries: dict[int, KvEntry] = {}
        self._origins = itertools.count(1)
        self._clock = itertools.count(1)
        # Recent share of admitted prompt tokens served (or, by a ghost, servable) from the
        # cache. Optimistic at first, so that a new server fills its (bounded) cache before
        # the misses judge it.
        self.hit_share = 1.0
        self.floor = floor
        self.slots = slots
        self.prompt_tokens = 0.0  # average admitted prompt length
        self._ghosts: deque[list[int]] = deque(maxlen=ids)
        # Host memory for evicted prompts (0: none; they leave ghosts only).
        self.host_limit = host_bytes
        self.host: list[HostEntry] = []
        self.host_bytes = 0

    # ---- ids ---------------------------------------------------------------------------

    def acquire(self) -> KvEntry | None:
        """A fresh, empty sequence for a new request; evicts the least recently used cached
        entry when no id is free. None when every id runs a request."""
        if not self._free_ids and not self._evict_lru():
            return None
        seq_id = self._free_ids.pop()
        entry = KvEntry(seq_id, next(self._origins), last_used=next(self._clock))
        self.entries[seq_id] = entry
        return entry

    def release(self, entry: KvEntry, *, keep: bool = True) -> None:
        """A request is done with its sequence: keep its KV as a cached entry (prefix cache on,
        ``keep`` True, and it adds something the cache lacks), or drop it."""
        if not entry.alive:
            return
        entry.running = False
        entry.planned = None
        if not (self.keep and keep and entry.tokens and self._adds_something(entry)):
            self._drop(entry)
            return
        entry.last_used = next(self._clock)
        # Cached entries that this one extends hold nothing it does not.
        for other in list(self.entries.values()):
            if other is not entry and not other.running and self._covers(entry, other):
                self._drop(other)
        self.trim()

    def admitted(self, prompt: Sequence[int], cached: int) -> None:
        """A request was admitted with ``cached`` of its prompt tokens from the cache (or
        from a sequence still prefilling them); a ghost may say more would have been."""
        if not prompt or not self.keep:
            return
        limit = len(prompt) - 1
        servable = max([cached, *(common_prefix(g, prompt, limit) for g in self._ghosts)])
        self.hit_share += HIT_SMOOTHING * (servable / len(prompt) - self.hit_share)
        if not self.prompt_tokens:
            self.prompt_tokens = float(len(prompt))
        self.prompt_tokens += HIT_SMOOTHING * (len(prompt) - self.prompt_tokens)

    def budget(self) -> int:
        """Cells that cached entries (beyond what running sequences hold) may keep."""
        # With host memory behind it, the KV keeps only the hottest quarter: the rest waits in
        # host memory, where it costs the attention nothing.
        slots = max(1, self.slots // 4) if self.host_limit else self.slots
        earned = self.hit_share * slots * self.prompt_tokens
        return min(self.capacity, max(self.floor, int(earned)))

    def trim(self) -> int:
        """Evict cached entries, least recently used first, while they hold more cells than the
        budget; returns how many went."""
        evicted = 0
        budget = self.budget()
        while self.cells() - self.cells(running_only=True) > budget:
            if not self._evict_lru(freeing=True):
                break
            evicted += 1
        return evicted

    def _adds_something(self, entry: KvEntry) -> bool:
        return not any(
            other is not entry and self._covers(other, entry) for other in self.entries.values()
        )

    @staticmethod
    def _covers(big: KvEntry, small: KvEntry) -> bool:
        n = len(small.tokens)
        return len(big.tokens) >= n and common_prefix(big.tokens, small.tokens, n) == n

    def _drop(self, entry: KvEntry, ghost: bool = False) -> None:
        if ghost and entry.tokens:
            self._ghosts.append(entry.tokens)
        self.backend.seq_rm(entry.seq_id)
        entry.alive = False
        del self.entries[entry.seq_id]
        self._free_ids.append(entry.seq_id)

    def drop_all(self) -> None:
        """Forget every cached entry (the engine failed a step: trust no cell)."""
        for entry in list(self.entries.values()):
            if not entry.running:
                self._drop(entry)

    # ---- matching ----------------------------------------------------------------------

    def match(
        self, prompt: Sequence[int], exclude: KvEntry | None = None, *, wait: bool = True
    ) -> Match | None:
        """The longest prefix of ``prompt`` held by a sequence, leaving at least the last prompt
        token to decode (its logits start generation).

        A sequence still prefilling counts with the prompt it will hold, when that beats what
        the KV holds now by ``MIN_WAIT_GAIN`` tokens: then the new request waits for it."""
        if not self.keep:
            return None
        limit = len(prompt) - 1
        best: Match | None = None
        best_key = (0, 0)
        waiting: Match | None = None
        for entry in self.entries.values():
            if entry is exclude:
                continue
            n = common_prefix(entry.tokens, prompt, limit)
            key = (n, entry.last_used)
            if n > 0 and key > best_key:
                best, best_key = Match(entry, n, True), key
            planned = entry.planned
            if wait and planned is not None and len(planned) > len(entry.tokens):
                m = common_prefix(planned, prompt, limit)
                if m > n and (waiting is None or m > waiting.length):
                    waiting = Match(entry, m, False)
        if waiting is not None and waiting.length >= best_key[0] + MIN_WAIT_GAIN:
            return waiting
        # A saved prompt that beats the KV: restoring copies all its cells, worth it when it
        # spares a real prefill.
        for host in self.host:
            n = common_prefix(host.tokens, prompt, limit)
            if (
                n >= best_key[0] + HOST_MIN_GAIN
                and 4 * n >= len(host.tokens)
                and (best is None or n > best.length)
            ):
                best = Match(None, n, True, host=host)
        return best

    def attach(self, dst: KvEntry, match: Match) -> int:
        """Share the matched prefix's cells with ``dst`` (empty); returns the tokens attached.

        A cached source that the attached prefix wholly covers is then dropped: ``dst`` holds
        all of it. A prompt in host memory is restored into ``dst`` instead."""
        if match.host is not None:
            return self._restore(dst, match.host, match.length)
        src = match.entry
        assert src is not None
        n = min(match.length, len(src.tokens))
        if n <= 0 or not src.alive or dst.tokens:
            return 0
        self.backend.seq_cp(src.seq_id, dst.seq_id, 0, n)
        dst.tokens = list(src.tokens[:n])
        dst.spans = [[o, s, min(e, n)] for o, s, e in src.spans if s < n]
        now = next(self._clock)
        src.last_used = now
        dst.last_used = now
        if not src.running and n == len(src.tokens):
            self._drop(src)
        return n

    # ---- host memory -------------------------------------------------------------------

    def host_budget(self) -> int:
        """Bytes of host memory that saved prompts may hold now (at most ``host_limit``)."""
        return int(self.host_limit * max(HOST_MIN_SHARE, self.hit_share))

    def _save(self, entry: KvEntry) -> bool:
        """Copy an evicted entry's KV to host memory; False when it cannot go there."""
        tokens = entry.tokens
        for host in self.host:
            if len(host.tokens) >= len(tokens) and common_prefix(
                host.tokens, tokens, len(tokens)
            ) == len(tokens):
                host.last_used = next(self._clock)
                return True
        budget = self.host_budget()
        data = self.backend.seq_save(entry.seq_id)
        if not data or len(data) > budget:
            return False
        for host in list(self.host):  # what the new one extends
            if common_prefix(host.tokens, tokens, len(host.tokens)) == len(host.tokens):
                self._forget(host)
        self.host.append(HostEntry(list(tokens), data, next(self._clock)))
        self.host_bytes += len(data)
        while self.host_bytes > budget:
            oldest = min(self.host, key=lambda h: h.last_used)
            self._forget(oldest)
            self._ghosts.append(oldest.tokens)
        return True

    def _forget(self, host: HostEntry) -> None:
        self.host.remove(host)
        self.host_bytes -= len(host.data)

    def _restore(self, dst: KvEntry, host: HostEntry, n: int) -> int:
        if dst.tokens or n <= 0:
            return 0
        # Out of the list while cells are made for it, so that making room cannot drop it.
        self._forget(host)
        try:
            self.make_room(len(host.tokens))
            if not self.backend.seq_restore(host.data, dst.seq_id):
                self.backend.seq_rm(dst.seq_id)
                return 0
            if n < len(host.tokens) and not self.backend.seq_trim(dst.seq_id, n):
                self.backend.seq_rm(dst.seq_id)
                return 0
        finally:
            host.last_used = next(self._clock)
            self.host.append(host)
            self.host_bytes += len(host.data)
        dst.tokens = list(host.tokens[:n])
        dst.spans = [[dst.origin, 0, n]]
        dst.last_used = host.last_used
        return n

    # ---- cells -------------------------------------------------------------------------

    def cells(self, running_only: bool = False) -> int:
        """Cells in use: by every sequence, or by running ones only."""
        extent: dict[int, list[int]] = {}
        for entry in self.entries.values():
            if running_only and not entry.running:
                continue
            for origin, start, end in entry.spans:
                span = extent.get(origin)
                if span is None:
                    extent[origin] = [start, end]
                elif end > span[1]:
                    span[1] = end
        return sum(end - start for start, end in extent.values())

    def make_room(self, tokens: int) -> int:
        """Evict cached entries, least recently used first, until ``tokens`` new cells fit;
        returns how many were evicted. Running sequences are never touched."""
        # Every entry's length bounds the cells (shared prefixes count once per sharer): when
        # even that fits, there is room without walking the spans.
        if sum(len(entry.tokens) for entry in self.entries.values()) + tokens <= self.capacity:
            return 0
        evicted = 0
        while self.cells() + tokens > self.capacity and self._evict_lru(freeing=True):
            evicted += 1
        return evicted

    def evict_one(self) -> bool:
        """Evict the least recently used cached entry (llama.cpp found no room after all)."""
        return self._evict_lru()

    def _evict_lru(self, freeing: bool = False) -> bool:
        cached = sorted(
            (e for e in self.entries.values() if not e.running), key=lambda e: e.last_used
        )
        if freeing:
            # An entry whose cells all live on in other sequences frees nothing.
            cached = [e for e in cached if self._exclusive_cells(e) > 0] or cached
        if not cached:
            return False
        victim = cached[0]
        saved = bool(self.host_limit) and bool(victim.tokens) and self._save(victim)
        self._drop(victim, ghost=not saved)
        if self.on_evict is not None:
            self.on_evict()
        return True

    def _exclusive_cells(self, entry: KvEntry) -> int:
        others: dict[int, int] = {}
        for other in self.entries.values():
            if other is entry:
                continue
            for origin, _, end in other.spans:
                if end > others.get(origin, -1):
                    others[origin] = end
        return sum(
            max(0, end - max(start, others.get(origin, start)))
            for origin, start, end in entry.spans
        )
