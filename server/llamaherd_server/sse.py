"""Server-sent events with as little per-event work as a token stream can get.

Every generated token of a streamed request is one event, so what the event loop spends per
event is spent per token, on the same cores as llama.cpp. :class:`EventStream` takes events
already framed as bytes (``data: ...\\n\\n``), one or more at a time, and hands them to the
server's ``send``. It watches the connection for ``http.disconnect`` and then
stops iterating, which closes the event source (that cancels the request), and sends a comment
line after ``ping_s`` of silence so that idle proxies keep the connection open.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"


def frame(data: str) -> bytes:
    """One event's bytes: ``data: <data>`` and the blank line that ends it (``data`` is one
    line of JSON here, so no line splitting)."""
    return b"data: " + data.encode() + b"\n\n"


class EventStream(Response):
    """A ``text/event-stream`` response of framed events: ``events`` yields the bytes of one
    or more whole events at a time."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], *, ping_s: float = 15.0) -> None:
        # Not Response.__init__: it would add a Content-Length (of an empty body).
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]
        self.events = events
        self.ping_s = ping_s
        self.last_write = 0.0
        self.ended = False  # the last message is going out: no ping may follow it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        self.last_write = asyncio.get_running_loop().time()
        writer = asyncio.ensure_future(self._write(send))
        watch = asyncio.ensure_future(wait_disconnect(receive))
        others = [watch, asyncio.ensure_future(self._ping(send))]
        try:
            await asyncio.wait({writer, *others}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (writer, *others):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await writer
            # The event source's cleanup (a request left by its client is cancelled) runs now.
            closer: Callable[[], Awaitable[None]] | None = getattr(self.events, "aclose", None)
            if closer is not None:
                await closer()
        if not writer.cancelled() and writer.exception() is not None:
            raise writer.exception()  # type: ignore[misc]

    async def _write(self, send: Send) -> None:
        """Each event as it comes, one write each; the last message ends the body."""
        loop = asyncio.get_running_loop()
        async for body in self.events:
            await send({"type": "http.response.body", "body": body, "more_body": True})
            self.last_write = loop.time()
        self.ended = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _ping(self, send: Send) -> None:
        """A comment line after ``ping_s`` without a write. A ping between two events is valid
        SSE, and every ``send`` carries whole events, so the two writers need no lock."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, self.last_write + self.ping_s - loop.time()))
            if self.ended:
                return
            if loop.time() - self.last_write >= self.ping_s:
                await send({"type": "http.response.body", "body": PING, "more_body": True})
                self.last_write = loop.time()


async def wait_disconnect(receive: Receive) -> None:
    """Returns when the client has gone away (``http.disconnect`` on the ASGI receive)."""
    while (await receive())["type"] != "http.disconnect":
        pass
