"""Requests that do not parse as HTTP get OpenAI's error shape (llamaherd_server.http_protocols),
from both of uvicorn's HTTP/1.1 protocols, on a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
import uvicorn

from llamaherd_server.http_protocols import HTTPTOOLS_PROTOCOL, H11OpenAIErrors, http_protocol

PROTOCOLS = [pytest.param(H11OpenAIErrors, id="h11")]
if HTTPTOOLS_PROTOCOL is not None:
    PROTOCOLS.append(pytest.param(HTTPTOOLS_PROTOCOL, id="httptools"))

BAD = [
    b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: twelve\r\n\r\n",
]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def exchange(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


async def answers(protocol: type[Any], requests: list[bytes]) -> list[bytes]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, http=protocol, lifespan="off", log_level="critical")
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        return [await asyncio.to_thread(exchange, port, raw) for raw in requests]
    finally:
        server.should_exit = True
        await task


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_unparsable_requests_get_an_openai_error(protocol: type[Any]) -> None:
    good = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    replies = await answers(protocol, [*BAD, good])
    for raw, reply in zip(BAD, replies[:-1], strict=True):
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), (raw, reply)
        assert b"content-type: application/json" in head.lower()
        error = json.loads(body)["error"]
        assert error["type"] == "invalid_request_error"
        assert "does not parse as HTTP" in error["message"]
    assert replies[-1].startswith(b"HTTP/1.1 200") and b"\r\nok\r\n" in replies[-1]


@pytest.mark.skipif(HTTPTOOLS_PROTOCOL is None, reason="httptools is not installed")
async def test_httptools_refuses_unknown_methods_in_openai_shape() -> None:
    # h11 passes any token as a method to the application; llhttp refuses it while parsing.
    assert http_protocol() is HTTPTOOLS_PROTOCOL
    (reply,) = await answers(http_protocol(), [b"A / HTTP/1.1\r\nHost: x\r\n\r\n"])
    assert reply.startswith(b"HTTP/1.1 400")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "invalid_http_request"
