"""The server's SSE response and its per-token framing (llamaherd_server.sse, bridge.TextFrames)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from llamaherd_server.api import chat_chunks
from llamaherd_server.bridge import TextFrames
from llamaherd_server.sse import DONE, PING, EventStream, frame


def completion_chunk(text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


@given(st.lists(st.text(), min_size=1, max_size=6))
def test_text_frames_are_the_bytes_of_the_whole_chunk(texts: list[str]) -> None:
    frames = TextFrames(completion_chunk)
    for text in texts:
        assert frames(text) == frame(json.dumps(completion_chunk(text, None)))


@given(st.lists(st.text(), min_size=2, max_size=6))
def test_chat_frames_name_the_role_once(texts: list[str]) -> None:
    frames = TextFrames(chat_chunks("m", "chatcmpl-1"))
    got = [json.loads(f.removeprefix(b"data: ")) for f in map(frames, texts)]
    assert got[0]["choices"][0]["delta"] == {"content": texts[0], "role": "assistant"}
    for text, chunk in zip(texts[1:], got[1:], strict=True):
        assert chunk["choices"][0]["delta"] == {"content": text}


class Client:
    """The ASGI side: what was sent, and a receive that says disconnect when told."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.leave = asyncio.Event()
        self.changed = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        self.changed.set()

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    async def until(self, condition: Any) -> None:
        async with asyncio.timeout(5):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


async def test_event_stream_writes_every_event_then_ends() -> None:
    async def events() -> AsyncIterator[bytes]:
        yield frame('{"a": 1}')
        yield frame('{"b": 2}') + frame('{"c": 3}')
        yield DONE

    client = Client()
    await EventStream(events())({"type": "http"}, client.receive, client.send)
    start = client.sent[0]
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert b"content-length" not in headers
    assert client.body() == b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: {"c": 3}\n\n' + DONE
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_a_client_that_leaves_closes_the_event_source() -> None:
    closed = asyncio.Event()
    more = asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        try:
            yield frame("1")
            await more.wait()  # never set: the client leaves first
            yield frame("2")
        finally:
            closed.set()

    client = Client()
    task = asyncio.ensure_future(EventStream(events())({}, client.receive, client.send))
    await client.until(lambda: frame("1") in client.body())
    client.leave.set()
    await asyncio.wait_for(task, 5)
    assert closed.is_set()
    assert frame("2") not in client.body()
    assert all(m.get("more_body", True) for m in client.sent[1:])  # no clean end: it left


async def test_silence_gets_a_ping_and_events_still_follow() -> None:
    go_on = asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        yield frame("1")
        await go_on.wait()
        yield frame("2")

    client = Client()
    task = asyncio.ensure_future(
        EventStream(events(), ping_s=0.05)({}, client.receive, client.send)
    )
    await client.until(lambda: PING in client.body())
    go_on.set()
    await asyncio.wait_for(task, 5)
    body = client.body()
    assert body.startswith(frame("1")) and body.endswith(frame("2"))
    assert body.index(PING) < body.index(frame("2"))


async def test_a_failing_event_source_fails_the_response() -> None:
    async def events() -> AsyncIterator[bytes]:
        yield frame("1")
        raise RuntimeError("boom")

    client = Client()
    try:
        await EventStream(events())({}, client.receive, client.send)
    except RuntimeError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("the event source's error was swallowed")
