"""The bridge between the event loop and the engine's scheduler thread.

A :class:`Generation` submits one request, receives its events on the event loop (the engine
hands them over with ``call_soon_threadsafe``), and turns them into a whole text or a stream;
a client that goes away cancels the request, which frees its slot. Each request logs one line
and counts one ``llamaherd_requests_total`` sample, however it ends."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.types import Receive

from .engine import Engine
from .errors import (
    APIError,
    disconnected_error,
    draining_error,
    failed_error,
    not_ready_error,
    queue_full_error,
)
from .generation import (
    Admitted,
    EngineDraining,
    EngineNotReady,
    Failed,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextChunk,
)
from .metrics import ServerMetrics
from .protocol import error_body
from .queue import QueueFull
from .sse import DONE, EventStream, frame, wait_disconnect

request_log = logging.getLogger("llamaherd.requests")

T = TypeVar("T")

# How long past a request's own timeout the bridge waits for the engine's last word on it
# before it gives up on it (the engine times requests out itself; this only catches a request
# that the engine lost).
LOST_GRACE_S = 30.0


def log_finished(
    outcome: str,
    *,
    req: GenerationRequest | None = None,
    generated: int = 0,
    finish: Finished | None = None,
    reason: str | None = None,
) -> None:
    """The one log line of a finished request; ``outcome`` is the word that its
    ``llamaherd_requests_total`` sample carries (ok, rejected, timeout, cancelled, error)."""
    now = time.monotonic()
    fields: dict[str, Any] = {
        "request_id": req.id if req else None,
        "priority": req.priority if req else None,
        "prompt_tokens": len(req.prompt_tokens) if req else 0,
        "generated_tokens": generated,
        "queue_wait_ms": (
            round(((req.admitted_at or now) - req.arrival) * 1000, 2) if req else 0.0
        ),
        "latency_ms": round((now - req.arrival) * 1000, 2) if req else 0.0,
        "outcome": outcome,
        "finish_reason": finish.finish_reason if finish else None,
    }
    if reason is not None:
        fields["reason"] = reason
    request_log.info(
        "request %s %s", fields["request_id"] or "-", outcome, extra={"fields": fields}
    )


def refuse(
    metrics: ServerMetrics, error: APIError, req: GenerationRequest | None = None
) -> APIError:
    """Count and log a request refused before it ran (queue full, draining, not ready)."""
    metrics.requests.labels(outcome="rejected").inc()
    log_finished("rejected", req=req, reason=error.message)
    return error


def ensure_ready(engine: Engine, metrics: ServerMetrics) -> Engine:
    """The engine, or the refusal (counted and logged) that says why it admits nothing now."""
    reason = engine.unavailable_reason()
    if reason == "draining":
        raise refuse(metrics, draining_error())
    if reason is not None:
        raise refuse(metrics, not_ready_error(reason))
    return engine


class Generation:
    """One request's trip through the engine, seen from the event loop.

    It logs the request's one line when it ends, however it ends: finished, failed in the
    engine, refused at submission, or left by its client (the stream is closed early)."""

    def __init__(
        self,
        engine: Engine,
        prompt_tokens: list[int],
        params: SamplingParams,
        priority: int,
        timeout_s: float,
        *,
        report_admission: bool = False,
        lost_after_s: float | None = None,
    ) -> None:
        self.engine = engine
        self.events: asyncio.Queue[TextChunk | Finished | Failed | Admitted] = asyncio.Queue()
        self.done = False
        self.generated = 0
        self.logged = False
        self.lost_after_s = timeout_s + LOST_GRACE_S if lost_after_s is None else lost_after_s
        self._lost_timer: asyncio.TimerHandle | None = None
        # An event that admitted() took from the queue for the stream to start with.
        self._held: TextChunk | Finished | Failed | Admitted | None = None
        self.req = GenerationRequest(
            prompt_tokens=prompt_tokens,
            params=params,
            priority=priority,
            timeout_s=timeout_s,
            report_admission=report_admission,
            # The engine calls this on the event loop (its ``dispatch``), once per step for all
            # the step's events, so no hand-off of its own is needed here.
            emit=self.events.put_nowait,
        )

    def log(self, outcome: str, finish: Finished | None = None) -> None:
        if not self.logged:
            self.logged = True
            log_finished(outcome, req=self.req, generated=self.generated, finish=finish)

    def submit(self, metrics: ServerMetrics) -> None:
        """Queue the request; a refusal is counted, logged and raised as an APIError."""
        try:
            self.engine.submit(self.req)
        except QueueFull as exc:
            self.logged = True
            error = queue_full_error(str(exc), self.engine.retry_after_seconds())
            raise refuse(metrics, error, self.req) from None
        except EngineDraining:
            self.logged = True
            raise refuse(metrics, draining_error(), self.req) from None
        except EngineNotReady as exc:
            self.logged = True
            raise refuse(metrics, not_ready_error(str(exc)), self.req) from None
        self._lost_timer = asyncio.get_running_loop().call_later(self.lost_after_s, self._lost)

    def _lost(self) -> None:
        """The engine has not ended the request long past its timeout: end it here (a 500),
        and tell the engine to drop it, so the client never waits forever."""
        if self.done:
            return
        self.events.put_nowait(
            Failed(
                "error",
                f"the engine lost this request: no answer {self.lost_after_s:g}s after it was "
                "submitted (its timeout is "
                f"{self.req.timeout_s:g}s)",
                self.generated,
            )
        )
        self.engine.cancel(self.req)

    def _ended(self) -> None:
        self.done = True
        if self._lost_timer is not None:
            self._lost_timer.cancel()

    def _take(self, event: TextChunk | Finished | Failed | Admitted) -> bool:
        """Account for one event (tokens, the end, the log line); False for one that the
        caller does not see (admission)."""
        if isinstance(event, TextChunk):
            self.generated += event.n_tokens
        elif isinstance(event, Admitted):
            return False
        elif isinstance(event, Finished):
            self._ended()
            self.generated = event.completion_tokens
            self.log("ok", event)
        else:
            self._ended()
            self.generated = max(self.generated, event.completion_tokens)
            self.log(event.outcome)
        return True

    async def batches(self) -> AsyncGenerator[list[TextChunk | Finished | Failed], None]:
        """Events until Finished or Failed, a list at a time: the next event and every one
        that had already arrived behind it (when the loop fell behind the engine by a step or
        more, they are written together). Leaving early cancels the request."""
        try:
            while True:
                event = self._held if self._held is not None else await self.events.get()
                self._held = None
                batch: list[TextChunk | Finished | Failed] = []
                while True:
                    if self._take(event):
                        batch.append(event)  # type: ignore[arg-type]
                    if self.done:
                        break
                    try:
                        event = self.events.get_nowait()
                    except asyncio.QueueEmpty:
                        break
                if batch:
                    yield batch
                if self.done:
                    return
        finally:
            if not self.done:
                self._ended()
                self.engine.cancel(self.req)
                self.log("cancelled")

    async def stream(self) -> AsyncIterator[TextChunk | Finished | Failed]:
        """Events until Finished or Failed, one at a time. Leaving early cancels the request."""
        batches = self.batches()
        try:
            async for batch in batches:
                for event in batch:
                    yield event
        finally:
            await batches.aclose()

    async def admitted(self, receive: Receive) -> None:
        """Wait until the engine gives the request a slot (submitted with
        ``report_admission``). Raises the request's error when it fails first (a timeout in
        the queue, a refusal), and cancels it when the client goes away while it waits."""

        async def first() -> None:
            while True:
                event = await self.events.get()
                if isinstance(event, Admitted):
                    return
                if isinstance(event, Failed):
                    self._ended()
                    self.log(event.outcome)
                    raise failed_error(event)
                # Any other event means it runs (none comes before admission): the stream
                # starts with it.
                self._held = event
                return

        await self._unless_disconnected(first(), receive)

    async def _unless_disconnected(self, work: Awaitable[T], receive: Receive) -> T:
        """``work``'s result, or a 499 (the request cancelled) if the client goes away first
        (``receive`` is the request's ASGI receive, watched for ``http.disconnect``)."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not task.done():
            task.cancel()
            self._ended()
            self.engine.cancel(self.req)
            self.log("cancelled")
            raise disconnected_error()
        return task.result()

    async def collect(self, receive: Receive) -> tuple[str, Finished]:
        """The whole text; cancels the request if the client goes away first (``receive`` is
        the request's ASGI receive, watched for ``http.disconnect``)."""

        async def consume() -> tuple[str, Finished]:
            parts: list[str] = []
            async for event in self.stream():
                if isinstance(event, TextChunk):
                    parts.append(event.text)
                elif isinstance(event, Failed):
                    raise failed_error(event)
                elif isinstance(event, Finished):
                    return "".join(parts), event
            raise RuntimeError("generation ended without a result")

        return await self._unless_disconnected(consume(), receive)


def usage(finish: Finished) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` counts the prompt tokens
    served from the prefix cache."""
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": finish.cached_tokens},
    }


class TextFrames:
    """The SSE bytes of a stream's text chunks. The first goes through ``chunk`` (a chat
    stream's first delta names the role); every later one fills a template cut from the JSON
    of ``chunk`` once (the same bytes as ``json.dumps`` of the whole chunk, for a fraction of
    its cost: this runs once per generated token)."""

    SENTINEL = "\x00llamaherd-text\x00"

    def __init__(self, chunk: Callable[[str, str | None], dict[str, Any]]) -> None:
        self.chunk = chunk
        self.parts: tuple[bytes, bytes] | None = None
        self.first = True

    def __call__(self, text: str) -> bytes:
        if self.parts is not None:
            head, tail = self.parts
            return head + json.dumps(text).encode() + tail
        data = frame(json.dumps(self.chunk(text, None)))
        if not self.first:  # the chunk's shape is settled: cut the template from it
            whole = frame(json.dumps(self.chunk(self.SENTINEL, None)))
            pieces = whole.split(json.dumps(self.SENTINEL).encode())
            if len(pieces) == 2:
                self.parts = (pieces[0], pieces[1])
        self.first = False
        return data


async def sse(
    gen: Generation,
    receive: Receive,
    chunk: Callable[[str, str | None], dict[str, Any]],
    rid: str,
    obj: str,
    include_usage: bool,
) -> EventStream:
    """Server-sent events in OpenAI's framing, ending with ``data: [DONE]``, once the engine
    has admitted the request (``gen`` submitted with ``report_admission``).

    Until then the request is only queued and no response byte has gone out: a connection that
    breaks before the headers means the work never started (the gateway retries such a request
    on another replica), and a request that fails while queued gets its real status code.

    The chunk that carries ``finish_reason`` also carries ``usage``; with
    ``stream_options.include_usage`` a last chunk with no choices repeats it, as OpenAI does.
    A client that goes away closes the event iterator, which cancels the request.
    """
    text_frame = TextFrames(chunk)

    def finished(pending: str, event: Finished) -> bytes:
        last = chunk(pending, event.finish_reason)
        last["usage"] = usage(event)
        out = frame(json.dumps(last))
        if include_usage:
            tail = {
                "id": rid,
                "object": obj,
                "created": int(time.time()),
                "model": last["model"],
                "choices": [],
                "usage": usage(event),
            }
            out += frame(json.dumps(tail))
        return out

    async def events() -> AsyncIterator[bytes]:
        pending = ""
        async for batch in gen.batches():
            out: list[bytes] = []
            for event in batch:
                if isinstance(event, TextChunk):
                    pending += event.text
                    # Only send when there is text: empty deltas would confuse clients.
                    if pending:
                        out.append(text_frame(pending))
                        pending = ""
                elif isinstance(event, Finished):
                    out.append(finished(pending, event))
                else:
                    error = failed_error(event)
                    body = error_body(error.message, type_=error.type, code=error.code)
                    out.append(frame(json.dumps(body)))
            if out:
                yield b"".join(out)
        yield DONE

    await gen.admitted(receive)
    return EventStream(events(), ping_s=15)
