"""Continuous batching: the scheduler.

One model context holds a unified KV cache with ``slots`` sequences of ``context_size`` tokens
each. One scheduler thread owns it; nothing else touches the context. Each iteration:

1. drop sequences whose client went away or whose deadline passed;
2. admit waiting requests into free slots, best rank first (see :mod:`llamaherd_server.queue`),
   each on a fresh llama.cpp sequence to which the longest prefix of its prompt already in the
   KV cache is attached (the prefix cache, :mod:`llamaherd_server.kvcache`): only the rest of
   the prompt is prefilled;
3. build ONE batch: the pending token of every decoding sequence, then prefill chunks of
   admitted prompts until the per-step token budget is spent (chunked prefill keeps the
   inter-token latency of running sequences flat while long prompts arrive);
4. decode it (``llama_decode`` is a ctypes call: it releases the GIL, so the HTTP side keeps
   running);
5. sample each sequence that produced logits with its own sampler, stream its text out, and
   finish it (slot freed, its KV kept as a cached prefix or dropped) on EOS, a stop string,
   ``max_tokens`` or a full context.

The engine knows nothing of HTTP, nor of llama.cpp: it drives the
:class:`~llamaherd_server.backend.Backend` made by the factory its caller hands it (the
server's: :meth:`LlamaBackend.factory <llamaherd_server.llama_backend.LlamaBackend.factory>`;
the unit tests': a fake). A request, its sampling parameters, its events and the engine's
refusals live in :mod:`llamaherd_server.generation` (imported from here too, as before). It
reports to each request through a callback that the caller makes thread-safe (the API hands
tokens to its event loop with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import codecs
import functools
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from .backend import Backend, BackendFactory, BatchToken, ContextShape
from .chat import controls_pattern
from .generation import (
    Admitted,
    EngineDraining,
    EngineFailed,
    EngineNotReady,
    Event,
    Failed,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextChunk,
)
from .kvcache import KvEntry, KvPool, Match
from .loadfail import ModelLoadError, failure_message
from .metrics import ServerMetrics
from .queue import PriorityQueue, QueueFull
from .sampling import SamplingMode, request_seed, sampling_mode

log = logging.getLogger("llamaherd.engine")

# How stale the KV gauges may get while only decode steps run.
KV_GAUGE_INTERVAL_S = 0.25

__all__ = [
    "Admitted",
    "Engine",
    "EngineDraining",
    "EngineFailed",
    "EngineNotReady",
    "Event",
    "Failed",
    "Finished",
    "GenerationRequest",
    "QueueFull",
    "SamplingParams",
    "TextChunk",
]


class DecodeFailed(RuntimeError):
    """llama_decode returned an error for a whole batch."""


class _Sequence:
    """A request holding a slot: engine-thread state only."""

    __slots__ = (
        "accepted",
        "cached",
        "decoder",
        "emitted",
        "entry",
        "generated",
        "last_token_at",
        "mode",
        "next_token",
        "pos",
        "prompt_i",
        "req",
        "rng",
        "sampler",
        "seq_id",
        "text",
        "ttft",
        "wait",
    )

    def __init__(self, req: GenerationRequest, entry: KvEntry, sampler: Any) -> None:
        self.req = req
        self.entry = entry
        self.seq_id = entry.seq_id
        self.sampler = sampler
        self.pos = 0  # tokens in this sequence's KV (once the step that batched them decoded)
        self.prompt_i = 0  # next prompt token to prefill
        self.cached = 0  # prompt tokens attached from the prefix cache
        self.wait: Match | None = None  # a prefix another sequence is still prefilling
        self.accepted = False  # the prompt went to the sampler's penalties
        # How the engine samples this sequence when the backend can do it for several at
        # once (sampling.py): GREEDY (temperature 0), SOFTMAX (plain temperature sampling,
        # with ``rng`` drawing one uniform per token), else llama.cpp's sampler chain.
        self.mode = sampling_mode(req.params)
        self.rng: np.random.Generator | None = None
        self.next_token: int | None = None  # sampled, not yet decoded
        self.generated = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0  # chars of self.text handed out
        self.last_token_at = 0.0
        self.ttft: float | None = None


@dataclass
class _StepPlan:
    """One step's batch and what each of its entries is for."""

    batch: list[BatchToken] = field(default_factory=list)
    outputs: list[tuple[int, _Sequence]] = field(default_factory=list)  # (batch index, seq)
    decoded: list[_Sequence] = field(default_factory=list)  # their pending token in the batch
    prefilled: list[tuple[_Sequence, int, int]] = field(default_factory=list)  # (seq, from, to)
    sequences: int = 0  # sequences in the batch


def _run_emits(outbox: list[tuple[Callable[[Event], object], Event]]) -> None:
    for emit, event in outbox:
        try:
            emit(event)
        except Exception:  # one request's consumer must not cost the others their events
            log.exception("handing %s to a request failed", type(event).__name__)


def safe_emit_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be streamed without giving away the start of a stop string."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return len(text) - hold


def sequence_ids(slots: int, prefix_cache: bool) -> int:
    """How many sequence ids the context has: one per running request, and with the prefix
    cache twice as many again for cached prefixes (more distinct prefixes than slots is what a
    cache shared by all slots is for; the cells they may hold are budgeted apart, see
    kvcache)."""
    return min(256, 3 * slots) if prefix_cache else slots


class Engine:
    """Owns the scheduler thread and the model runtime (the backend) it drives.

    ``backend`` makes that runtime for the context the engine needs (slots, sequence ids, batch
    size). ``dispatch`` says how the scheduler thread hands events out (see _deliver): None, it
    calls each request's emit itself; an event loop's call_soon_threadsafe, one wake-up of that
    loop per step runs all the step's emits there (they then need no hand-off of their own)."""

    # What load() reads from the model; these defaults stand until then.
    n_vocab = 0
    chat_template: str | None = None
    bos_text = ""
    eos_text = ""
    # The longest text one token stands for, in bytes (specials included).
    max_token_bytes = 1
    # The texts of the control tokens (<|im_start|>, </s>): only a chat template's own text may
    # turn into them (chat.tokenize_parts).
    control_tokens: Mapping[str, int] = MappingProxyType({})
    controls_pattern: re.Pattern[str] | None = None

    def __init__(
        self,
        model_path: Path,
        metrics: ServerMetrics,
        *,
        backend: BackendFactory,
        slots: int = 8,
        context_size: int = 2048,
        token_budget: int = 512,
        max_wait_ms: float = 5.0,
        queue_limit: int = 256,
        aging_seconds: float = 10.0,
        seed: int = -1,
        stall_seconds: float = 120.0,
        prefix_cache: bool = True,
        prefix_cache_ram_bytes: int | Callable[[], int] = 512 << 20,
        dispatch: Callable[[Callable[[], object]], object] | None = None,
    ) -> None:
        self.model_path = model_path  # named in the load error
        self.dispatch = dispatch
        self.metrics = metrics
        self.slots = slots
        self.context_size = context_size
        # Every decoding sequence needs one token of the budget in each step.
        self.token_budget = max(token_budget, slots)
        self.max_wait_s = max_wait_ms / 1000.0
        self.default_seed = seed
        self.queue: PriorityQueue[GenerationRequest] = PriorityQueue(
            queue_limit, aging_seconds, on_change=metrics.set_waiting
        )
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        # Set once, when the scheduler loop dies of an exception: the engine is dead.
        self.failure: str | None = None
        self.stall_seconds = stall_seconds
        # When the scheduler loop last showed it is alive (each iteration, and while idle).
        self._heartbeat = time.monotonic()
        self._wake = threading.Condition()
        self._stop = False
        self._abort: str | None = None
        self._thread: threading.Thread | None = None
        self._thread_ident: int | None = None
        # How long close() waits for the scheduler thread (and tokenizing threads) to stop.
        self.close_timeout_s = 30.0
        # Threads other than the scheduler inside tokenize(): close() frees nothing under them.
        self._users = 0
        self._users_idle = threading.Condition()
        self._loaded = False
        self._closed = False
        self._running: dict[int, _Sequence] = {}  # by sequence id
        # Events produced on the scheduler thread, handed out in one burst (see _deliver).
        self._outbox: list[tuple[Callable[[Event], object], Event]] = []
        self._avg_latency_s = 1.0
        self._kv_gauges_at = 0.0
        self.prefix_cache = prefix_cache
        self.sequences = sequence_ids(slots, prefix_cache)
        # The model runtime; only the scheduler thread decodes (tokenize: any thread).
        self.backend: Backend = backend(
            ContextShape(
                slots=slots,
                context_size=context_size,
                sequences=self.sequences,
                batch_size=self.token_budget,
            )
        )
        self._fast_sampling = callable(getattr(self.backend, "softmax_sample", None))
        # A callable sizes the host cache once the model has loaded (settings.host_cache_budget).
        self._host_budget = prefix_cache_ram_bytes
        host = prefix_cache_ram_bytes if isinstance(prefix_cache_ram_bytes, int) else 0
        self.kv = KvPool(
            self.backend,
            ids=self.sequences,
            capacity=slots * context_size,
            keep=prefix_cache,
            slots=slots,
            host_bytes=host if prefix_cache else 0,
            on_evict=metrics.prefix_cache_evictions.inc,
        )
        metrics.slots.set(slots)

    # ---- lifecycle -------------------------------------------------------------------

    def load(self) -> None:
        """Load the model, make the context and start the scheduler thread (blocking).

        On failure ``load_error`` holds the one line that says why (``model load failed:
        <path>: <cause>``), logged once, and the exception is re-raised."""
        try:
            self.backend.load()
        except Exception as exc:
            cause = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            self.load_error = failure_message(self.model_path, cause)
            log.error("%s", self.load_error)
            raise
        backend = self.backend
        if self.prefix_cache and not backend.can_share_prefixes:
            log.warning(
                "prefix cache off: this model's memory (recurrent, hybrid or sliding-window) "
                "cannot share part of a sequence"
            )
            self.prefix_cache = False
            self.kv.keep = False
        if self.prefix_cache and callable(self._host_budget):
            self.kv.host_limit = self._host_budget()
        self.n_vocab = backend.n_vocab
        longest = 1
        controls: dict[str, int] = {}
        for t in range(self.n_vocab):
            plain = backend.token_bytes(t)
            special = backend.token_bytes(t, special=True)
            longest = max(longest, len(plain), len(special))
            # A control token has text only when specials are rendered (<|im_start|>, </s>).
            if special and not plain:
                controls.setdefault(special.decode("utf-8", errors="replace"), t)
        self.max_token_bytes = longest
        self.control_tokens = controls
        self.controls_pattern = controls_pattern(controls)
        self.chat_template = backend.chat_template
        self.bos_text = backend.bos_text
        self.eos_text = backend.eos_text
        with self._users_idle:
            self._loaded = True
        self._thread = threading.Thread(target=self._loop, name="llamaherd-engine", daemon=True)
        self._thread.start()
        self.ready = True
        self.metrics.ready.set(1)

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the scheduler thread, then free the context and the model.

        They are freed only once nothing can touch them any more: the scheduler thread has
        ended and no other thread is inside :meth:`tokenize`. When that does not happen within
        ``timeout_s`` (default ``close_timeout_s``), they are left allocated (a leak the process
        exit ends) instead of being freed under a running ``llama_decode``; the log says so. A
        later call frees them once the thread has stopped."""
        timeout = self.close_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        self.ready = False
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.error(
                    "engine thread still running %.0fs after stop; leaving the llama.cpp "
                    "context and model allocated rather than freeing them under it",
                    timeout,
                )
                return
        with self._users_idle:
            self._closed = True
            while self._users and time.monotonic() < deadline:
                self._users_idle.wait(timeout=max(0.0, deadline - time.monotonic()))
            if self._users:
                log.error(
                    "%d threads still tokenizing after %.0fs; leaving the llama.cpp model "
                    "allocated",
                    self._users,
                    timeout,
                )
                return
        self._free()

    def _free(self) -> None:
        for seq in list(self._running.values()):
            self.backend.free_sampler(seq.sampler)
        self._running.clear()
        self.backend.free()

    def start_drain(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)

    def abort_all(self, message: str) -> None:
        """Fail every queued and running request (end of a drain). Any thread."""
        self._abort = message
        with self._wake:
            self._wake.notify()

    def unavailable_reason(self) -> str | None:
        """Why the engine admits no request now (None when it does)."""
        if self.load_error is not None:
            return self.load_error
        unhealthy = self.unhealthy_reason()
        if unhealthy is not None:
            return unhealthy
        if not self.ready:
            return "model is loading"
        if self.draining:
            return "draining"
        return None

    def unhealthy_reason(self) -> str | None:
        """Why the process should be restarted (None while it is healthy): the model failed to
        load, the scheduler thread died, or it has made no progress for ``stall_seconds``
        while requests wait or run (the watchdog)."""
        if self.load_error is not None:
            return self.load_error
        if self.failure is not None:
            return self.failure
        if not self.ready:
            return None
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._stop:
            return "engine failed: the scheduler thread is gone"
        if self.busy():
            quiet = time.monotonic() - self._heartbeat
            if quiet > self.stall_seconds:
                return (
                    f"engine stalled: no progress for {quiet:.1f}s with "
                    f"{self.active_count} running and {self.queue_depth} queued requests "
                    f"(engine-stall-seconds {self.stall_seconds:g})"
                )
        return None

    def busy(self) -> bool:
        return bool(self._running) or len(self.queue) > 0

    @property
    def active_count(self) -> int:
        return len(self._running)

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    def retry_after_seconds(self) -> int:
        """A guess at when the queue will have room: one queue's worth of latency per slot."""
        return max(1, math.ceil(len(self.queue) * self._avg_latency_s / self.slots))

    # ---- tokens ----------------------------------------------------------------------

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = False
    ) -> list[int]:
        """Tokens of ``text``. Safe from any thread: it reads only the vocabulary, and close()
        waits for it before freeing the model."""
        with self._users_idle:
            if self._closed or not self._loaded:
                raise EngineNotReady("model is loading" if not self._closed else "shutting down")
            self._users += 1
        try:
            return self.backend.tokenize(text, add_special, parse_special)
        finally:
            with self._users_idle:
                self._users -= 1
                self._users_idle.notify_all()

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        return self.backend.token_bytes(token, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    # ---- requests (any thread) -------------------------------------------------------

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request. Raises EngineNotReady, EngineDraining or QueueFull."""
        if self.failure is not None:
            raise EngineFailed(self.failure)
        if not self.ready:
            raise EngineNotReady(self.unavailable_reason())
        if self.draining:
            raise EngineDraining("server is draining")
        self.queue.put(req)
        # The engine may have died between the check and the put; its last act emptied the
        # queue, so a request put after that would wait forever.
        if self.failure is not None and self.queue.remove(req):
            raise EngineFailed(self.failure)
        with self._wake:
            self._wake.notify()

    def cancel(self, req: GenerationRequest) -> None:
        """The client went away: leave the queue now, or free the slot next iteration."""
        req.cancelled = True
        if self.queue.remove(req):
            self._finish_failed(req, "cancelled", "client disconnected", 0)
        with self._wake:
            self._wake.notify()

    # ---- scheduler thread ------------------------------------------------------------

    def _loop(self) -> None:
        self._thread_ident = threading.get_ident()
        try:
            self._schedule()
        except BaseException as exc:
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        """The scheduler loop raised: fail every request with a 500, turn /health to 503."""
        self.failure = f"engine failed: {type(exc).__name__}: {exc}"
        log.critical("%s; failing every request", self.failure, exc_info=exc)
        self.metrics.ready.set(0)
        message = f"{self.failure}; the server must be restarted"
        for seq in self._release_all():
            self._finish_failed(seq.req, "error", message, seq.generated)
        while (req := self.queue.pop()) is not None:
            self._finish_failed(req, "error", message, 0)
        self.metrics.requests_running.set(0)
        try:
            self._deliver()
        except Exception:
            log.exception("could not hand out the failures")

    def _schedule(self) -> None:
        last_expiry_scan = 0.0
        while True:
            self._heartbeat = time.monotonic()
            if not self._running:
                self._deliver()
            with self._wake:
                while not self._stop and not self._running and len(self.queue) == 0:
                    self._wake.wait(timeout=0.5)
                    self._heartbeat = time.monotonic()
                    self._expire_queued(time.monotonic())
                    self._deliver()
                if self._stop:
                    self._deliver()
                    return
            if self._abort is not None:
                self._fail_everything(self._abort)
                continue
            now = time.monotonic()
            if now - last_expiry_scan > 0.1:
                self._expire_queued(now)
                last_expiry_scan = now
            self._drop_cancelled_and_expired(now)
            if not self._running and self.max_wait_s > 0:
                self._gather_first_batch()
            try:
                self._admit()
                if self._running:
                    self._step()
            except Exception as exc:
                self._step_failed(exc)

    def _step_failed(self, exc: Exception) -> None:
        """llama_decode or the engine's own state failed: the step's KV cannot be trusted, so
        every running sequence loses its slot and the KV is cleared. A request that has had no
        output yet goes back to the queue once (it runs again from its prompt, as if it had
        not been admitted); the others fail with a 500. Queued requests are not touched."""
        log.error("engine step failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        message = f"internal engine error: {type(exc).__name__}: {exc}"
        retry: list[GenerationRequest] = []
        for seq in self._release_all():
            req = seq.req
            if seq.ttft is None and not req.retried and not req.cancelled:
                req.retried = True
                retry.append(req)
            else:
                self._finish_failed(req, "error", message, seq.generated)
        self.kv.drop_all()
        self.metrics.requests_running.set(0)
        self._set_kv_usage()
        for req in retry:
            try:
                self.queue.put(req, force=True)
            except Exception:
                self._finish_failed(req, "error", message, 0)

    def _release_all(self) -> list[_Sequence]:
        """Free every running sequence's slot and drop its KV (a failed step, a dead engine),
        even where freeing one fails: the sequences, for their requests to be answered."""
        sequences = list(self._running.values())
        for seq in sequences:
            try:
                self._release(seq, keep=False)
            except Exception:  # the slot is gone either way; every request is still answered
                self._running.pop(seq.seq_id, None)
                self._set_kv_usage()
        return sequences

    def _fail_everything(self, message: str) -> None:
        for seq in list(self._running.values()):
            self._release(seq)
            self._finish_failed(seq.req, "error", message, seq.generated)
        while (req := self.queue.pop()) is not None:
            self._finish_failed(req, "error", message, 0)

    def _gather_first_batch(self) -> None:
        """An idle engine waits up to max_wait_ms after the first arrival, so that a burst
        of requests starts in one batch instead of one prefill after another."""
        oldest = min((r.arrival for r in self.queue.items()), default=None)
        if oldest is None:
            return
        until = oldest + self.max_wait_s
        with self._wake:
            while not self._stop and len(self.queue) < self.slots:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(timeout=left)

    def _expire_queued(self, now: float) -> None:
        for req in self.queue.items():
            if req.deadline <= now and self.queue.remove(req):
                self._finish_failed(
                    req,
                    "timeout",
                    f"request timed out after {req.timeout_s:g}s waiting in the queue",
                    0,
                )

    def _drop_cancelled_and_expired(self, now: float) -> None:
        for seq in list(self._running.values()):
            req = seq.req
            if req.cancelled:
                self._release(seq)
                self._finish_failed(req, "cancelled", "client disconnected", seq.generated)
            elif req.deadline <= now:
                self._release(seq)
                self._finish_failed(
                    req,
                    "timeout",
                    f"request timed out after {req.timeout_s:g}s "
                    f"({seq.generated} tokens generated)",
                    seq.generated,
                )

    def _admit(self) -> None:
        now = time.monotonic()
        while len(self._running) < self.slots:
            req = self.queue.pop()
            if req is None:
                break
            if req.cancelled:
                self._finish_failed(req, "cancelled", "client disconnected", 0)
                continue
            if req.admitted_at is None:  # a retried request was admitted before
                req.admitted_at = now
                self.metrics.queue_wait.observe(now - req.arrival)
            try:
                seq = self._prepare(req)
            except Exception as exc:  # this request's own parameters or state: it alone fails
                self._request_error(req, exc, 0)
                continue
            self._running[seq.seq_id] = seq
            match = self.kv.match(req.prompt_tokens, exclude=seq.entry)
            seq.entry.planned = req.prompt_tokens
            if match is not None:
                if match.ready:
                    self._attach(seq, match)
                else:
                    seq.wait = match
            # A wait counts as a hit: the prefix will be attached, not prefilled.
            expected = match.length if match is not None else 0
            self.kv.admitted(req.prompt_tokens, expected)
            if req.report_admission:
                self._emit(req, Admitted(now - req.arrival))
        self.metrics.requests_running.set(len(self._running))

    def _prepare(self, req: GenerationRequest) -> _Sequence:
        """A slot's state for a request: its sampler, its random stream and a sequence id.
        Whatever fails here fails the request alone (nothing of it is left behind)."""
        sampler, seed = self._make_sampler(req.params)
        try:
            entry = self.kv.acquire()
            if entry is None:  # cannot happen: ids >= slots
                raise RuntimeError("no free sequence id with a free slot")
            try:
                seq = _Sequence(req, entry, sampler)
                if seq.mode is SamplingMode.SOFTMAX:
                    seq.rng = np.random.default_rng(seed)
            except BaseException:
                self.kv.release(entry, keep=False)
                raise
        except BaseException:
            self.backend.free_sampler(sampler)
            raise
        return seq

    def _request_error(self, req: GenerationRequest, exc: BaseException, generated: int) -> None:
        """Fail one request for an error of its own (logged with its id); nothing else."""
        log.error("request %s failed: %s: %s", req.id, type(exc).__name__, exc, exc_info=exc)
        self._finish_failed(
            req, "error", f"internal error in this request: {type(exc).__name__}: {exc}", generated
        )

    def _fail_sequence(self, seq: _Sequence, exc: BaseException) -> None:
        """A running sequence hit an error of its own (sampling, detokenizing, its sampler's
        penalties): free its slot and drop its KV (it may hold a token that was never
        accounted), fail it, and leave every other sequence and the prefix cache alone."""
        if self._running.get(seq.seq_id) is seq:
            try:
                self._release(seq, keep=False)
            except Exception:  # the slot is gone either way; the step's checks see the rest
                self._running.pop(seq.seq_id, None)
                log.exception("freeing the slot of failed request %s", seq.req.id)
        self._request_error(seq.req, exc, seq.generated)

    def _attach(self, seq: _Sequence, match: Match) -> None:
        """Share a cached prefix of the prompt with the sequence: prefill starts after it."""
        n = self.kv.attach(seq.entry, match)
        seq.pos = seq.prompt_i = seq.cached = n
        if n:
            self.metrics.prompt_cached_tokens.inc(n)

    def _resolve_waits(self) -> None:
        """Sequences waiting for a prefix that another one was prefilling: attach it once it
        is in the KV; when that sequence stopped short (cancelled, timed out), take the best
        prefix there is now and prefill the rest."""
        for seq in self._running.values():
            wait = seq.wait
            if wait is None:
                continue
            donor = wait.entry
            assert donor is not None  # only a sequence still prefilling is waited for
            if donor.alive and len(donor.tokens) >= wait.length:
                seq.wait = None
                self._attach(seq, wait)
            elif not donor.alive or donor.planned is None:
                seq.wait = None
                # Ready prefixes only: waiting again could wait on a sequence that waits on it.
                match = self.kv.match(seq.req.prompt_tokens, exclude=seq.entry, wait=False)
                if match is not None:
                    self._attach(seq, match)

    def _make_sampler(self, p: SamplingParams) -> tuple[Any, int]:
        """llama.cpp's sampler chain for a request, and the seed it (or the engine's own
        sampling, for SOFTMAX sequences) draws with: the request's seed reduced to 32 bits
        (see sampling.request_seed), else the server's, else a random one."""
        seed = request_seed(p.seed)
        if seed is None:
            seed = request_seed(self.default_seed)
        if seed is None:
            seed = random.getrandbits(32)
        return self.backend.make_sampler(p, seed), seed

    def _step(self) -> None:
        """One decode step: the pending token of every decoding sequence, then prefill chunks
        while the token budget lasts; then sample every sequence that got logits."""
        self._resolve_waits()
        plan = self._plan_step()
        # The last step's tokens go out now: the event loop handles them during the decode.
        self._deliver()
        if not plan.batch:
            return
        self._decode(plan.batch)
        prefill_tokens = self._commit(plan)
        self.metrics.batch_size.observe(plan.sequences)
        self.metrics.batch_tokens.observe(len(plan.batch))
        if prefill_tokens:
            self.metrics.prompt_tokens.inc(prefill_tokens)
        now = time.monotonic()
        self._sample_outputs(plan.outputs, now)
        self.metrics.generated_tokens.inc(len(plan.outputs))
        # Decode-only steps refresh the KV gauges a few times a second (counting cells walks
        # every entry); a step that prefilled, and every release, refresh them at once.
        if prefill_tokens or now - self._kv_gauges_at >= KV_GAUGE_INTERVAL_S:
            self._set_kv_usage()

    def _plan_step(self) -> _StepPlan:
        """The step's batch: the pending token of every decoding sequence first, then prefill
        chunks of the prompts not yet in the KV until the token budget is spent. A sequence
        whose prompt its sampler's penalties refuse fails alone here."""
        budget = self.token_budget
        plan = _StepPlan()
        batch = plan.batch
        for seq in self._running.values():
            if seq.next_token is not None:
                plan.outputs.append((len(batch), seq))
                batch.append((seq.next_token, seq.pos, seq.seq_id, True))
                plan.decoded.append(seq)
        plan.sequences = len(plan.outputs)
        for seq in list(self._running.values()):
            prompt = seq.req.prompt_tokens
            if seq.prompt_i >= len(prompt) or seq.wait is not None or len(batch) >= budget:
                continue
            if seq.req.params.has_penalties and not seq.accepted:
                try:
                    self.backend.accept(seq.sampler, prompt)
                except Exception as exc:
                    self._fail_sequence(seq, exc)
                    continue
                seq.accepted = True
            plan.sequences += 1
            start = seq.prompt_i
            end = min(len(prompt), start + budget - len(batch))
            pos = seq.pos - start
            batch.extend((prompt[i], pos + i, seq.seq_id, False) for i in range(start, end))
            if end == len(prompt):
                plan.outputs.append((len(batch) - 1, seq))
                token, position, seq_id, _ = batch[-1]
                batch[-1] = (token, position, seq_id, True)
            plan.prefilled.append((seq, start, end))
        return plan

    def _decode(self, batch: list[BatchToken]) -> None:
        """Decode the batch, evicting cached prefixes while the KV has no room for it."""
        self.kv.make_room(len(batch))
        started = time.perf_counter()
        rc = self.backend.decode(batch)
        while rc == 1 and self.kv.evict_one():  # no room for the batch after all
            rc = self.backend.decode(batch)
        self.metrics.decode_step.observe(time.perf_counter() - started)
        if rc != 0:
            raise DecodeFailed(f"llama_decode returned {rc}")

    def _commit(self, plan: _StepPlan) -> int:
        """The decoded batch is in the KV now: account for it in every sequence. Returns how
        many prompt tokens it prefilled."""
        for seq in plan.decoded:
            seq.entry.commit_one(seq.next_token)  # type: ignore[arg-type]
            seq.next_token = None
            seq.pos += 1
        prefill_tokens = 0
        for seq, start, end in plan.prefilled:
            seq.entry.commit(seq.req.prompt_tokens[start:end])
            seq.pos += end - start
            seq.prompt_i = end
            prefill_tokens += end - start
            if end == len(seq.req.prompt_tokens):
                seq.entry.planned = None
        return prefill_tokens

    def _sample_outputs(self, outputs: list[tuple[int, _Sequence]], now: float) -> None:
        """Sample every sequence that got logits and take its token; a sequence whose sampling
        or detokenizing fails fails alone."""
        picked: dict[int, int] = {}
        if self._fast_sampling:
            try:
                picked = self._sample_together(outputs)
            except Exception:  # sample each sequence alone below: a failure is its own
                log.exception("sampling the step's sequences together failed; one by one")
        n_vocab = self.n_vocab
        for row, (index, seq) in enumerate(outputs):
            try:
                fast = picked.get(row)
                token = self._sample_one(seq, row, index, len(outputs)) if fast is None else fast
                if not 0 <= token < n_vocab:
                    raise RuntimeError(f"the sampler returned token {token}, not in the vocabulary")
                self._accept_token(seq, token, now)
            except Exception as exc:
                self._fail_sequence(seq, exc)

    def _sample_one(self, seq: _Sequence, row: int, index: int, n_outputs: int) -> int:
        """One sequence's token, alone: llama.cpp's chain, or its fast path for one row."""
        if self._fast_sampling and seq.mode is SamplingMode.GREEDY:
            return self.backend.argmax([row], n_outputs)[0]
        if self._fast_sampling and seq.mode is SamplingMode.SOFTMAX:
            assert seq.rng is not None
            temperature = seq.req.params.temperature
            return self.backend.softmax_sample([row], n_outputs, [temperature], [seq.rng.random()])[
                0
            ]
        token: int = self.backend.sample(seq.sampler, index)
        return token

    def _sample_together(self, outputs: list[tuple[int, _Sequence]]) -> dict[int, int]:
        """Tokens of the greedy and plain-temperature sequences of this step, each kind in one
        vectorised pass over the step's logits (row = position among the outputs)."""
        greedy: list[int] = []
        soft: list[int] = []
        for row, (_, seq) in enumerate(outputs):
            if seq.mode is SamplingMode.GREEDY:
                greedy.append(row)
            elif seq.mode is SamplingMode.SOFTMAX:
                soft.append(row)
        picked: dict[int, int] = {}
        if greedy:
            tokens = self.backend.argmax(greedy, len(outputs))
            picked.update(zip(greedy, tokens, strict=True))
        if soft:
            temperatures = []
            uniforms = []
            for row in soft:
                seq = outputs[row][1]
                temperatures.append(seq.req.params.temperature)
                assert seq.rng is not None
                uniforms.append(seq.rng.random())
            tokens = self.backend.softmax_sample(soft, len(outputs), temperatures, uniforms)
            picked.update(zip(soft, tokens, strict=True))
        return picked

    def _set_kv_usage(self) -> None:
        """The KV gauges: after every step, and after every release (finish, cancel, timeout,
        failure), so that they never show KV that was already freed. Usage counts the cells
        that running sequences hold (shared cells once); the prefix cache's gauge the cells
        that only cached prefixes hold, which are freed whenever running work needs them."""
        self._kv_gauges_at = time.monotonic()
        capacity = self.kv.capacity
        running = self.kv.cells(running_only=True)
        self.metrics.kv_cache_usage.set(running / capacity)
        self.metrics.prefix_cache_usage.set((self.kv.cells() - running) / capacity)
        self.metrics.prefix_cache_host_bytes.set(self.kv.host_bytes)

    def _accept_token(self, seq: _Sequence, token: int, now: float) -> None:
        req = seq.req
        p = req.params
        if seq.ttft is None:
            seq.ttft = now - req.arrival
            self.metrics.time_to_first_token.observe(seq.ttft)
        else:
            self.metrics.inter_token_latency.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if not p.ignore_eos and self.backend.is_eog(token):
            self._finish(seq, "stop")
            return
        seq.generated += 1
        piece = self.backend.token_bytes(token)
        seq.text += seq.decoder.decode(piece)
        if p.stop:
            # A stop string can only newly appear in the tail that this token touched.
            longest = max(len(s) for s in p.stop)
            start = max(0, len(seq.text) - len(piece) - longest)
            hits = [i for i in (seq.text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                seq.text = seq.text[: min(hits)]
                self._flush(seq, len(seq.text))
                self._finish(seq, "stop")
                return
            self._flush(seq, safe_emit_length(seq.text, p.stop))
        else:
            self._flush(seq, len(seq.text))
        if seq.generated >= p.max_tokens or seq.pos + 1 >= self.context_size:
            self._finish(seq, "length")
            return
        seq.next_token = token

    def _flush(self, seq: _Sequence, upto: int) -> None:
        # One chunk per token, even an empty one (text held back for a possible stop string
        # or an unfinished UTF-8 character), so that streams can count tokens.
        chunk = seq.text[seq.emitted : upto]
        seq.emitted = max(seq.emitted, upto)
        self._emit(seq.req, TextChunk(chunk, 1))

    def _release(self, seq: _Sequence, *, keep: bool = True) -> None:
        """Free the slot; the sequence's KV stays as a cached prefix (prefix cache on and
        ``keep``) or is dropped."""
        self.backend.free_sampler(seq.sampler)
        del self._running[seq.seq_id]
        self.kv.release(seq.entry, keep=keep)
        self.metrics.requests_running.set(len(self._running))
        self._set_kv_usage()

    def _finish(self, seq: _Sequence, reason: str) -> None:
        # Bytes of a character cut short by the end of generation come out as U+FFFD.
        tail = seq.decoder.decode(b"", final=True)
        if tail:
            seq.text += tail
            self._emit(seq.req, TextChunk(tail, 0))
        self._release(seq)
        req = seq.req
        now = time.monotonic()
        latency = now - req.arrival
        self._avg_latency_s = 0.9 * self._avg_latency_s + 0.1 * latency
        self.metrics.request_latency.observe(latency)
        self.metrics.requests.labels(outcome="ok").inc()
        self._emit(
            req,
            Finished(
                finish_reason=reason,
                prompt_tokens=len(req.prompt_tokens),
                completion_tokens=seq.generated,
                queue_wait_s=(req.admitted_at or now) - req.arrival,
                latency_s=latency,
                time_to_first_token_s=seq.ttft,
                cached_tokens=seq.cached,
            ),
        )

    def _finish_failed(
        self, req: GenerationRequest, outcome: str, message: str, generated: int
    ) -> None:
        self.metrics.requests.labels(outcome=outcome).inc()
        self._emit(req, Failed(outcome, message, generated))

    def _emit(self, req: GenerationRequest, event: Event) -> None:
        """Report an event to a request. Events made on the scheduler thread wait in the outbox
        and go out together (_deliver); other threads (cancel from the API) report at once."""
        if threading.get_ident() == self._thread_ident:
            self._outbox.append((req.emit, event))
        elif self.dispatch is not None:
            self.dispatch(functools.partial(req.emit, event))
        else:
            req.emit(event)

    def _deliver(self) -> None:
        """Hand out the outbox in one burst: just before llama_decode (which releases the GIL for
        the whole step, so the consumer runs alongside it) or before the engine goes idle.

        With ``dispatch`` set to an event loop's call_soon_threadsafe, a step costs one wake-up
        of the loop instead of one per token: done per token, those wake-ups (writes to the
        loop's self-pipe) took 3% of the scheduler thread's time at 16 streams (py-spy, bench
        model, 2 cores)."""
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, []
        if self.dispatch is None:
            _run_emits(outbox)
        else:
            self.dispatch(functools.partial(_run_emits, outbox))
