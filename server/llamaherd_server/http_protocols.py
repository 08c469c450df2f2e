"""uvicorn's HTTP protocols, with requests that do not parse as HTTP answered in OpenAI's error
shape instead of uvicorn's plain-text ``Invalid HTTP request received.``

The server and the gateway run httptools (llhttp) where it is installed: it refuses, before any
application code sees the request, what h11 let through to the application (a method that is
not a known HTTP method, such as ``A``, for one). A client of an OpenAI API parses every 4xx
as ``{"error": {...}}``, so these get that body too, with ``Connection: close`` as uvicorn sends.
"""

from __future__ import annotations

import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import error_body

MESSAGE = (
    "invalid HTTP request: it does not parse as HTTP/1.1 (the request line, the method, a "
    "header or the body framing is malformed)"
)


def error_bytes() -> bytes:
    return json.dumps(error_body(MESSAGE, code="invalid_http_request")).encode()


class H11OpenAIErrors(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = error_bytes()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: h11 only
    HttpToolsProtocol = None  # type: ignore[misc, assignment]


def _httptools_protocol() -> type[Any] | None:
    if HttpToolsProtocol is None:
        return None

    class HttpToolsOpenAIErrors(HttpToolsProtocol):  # type: ignore[misc, valid-type]
        def send_400_response(self, msg: str) -> None:
            body = error_bytes()
            head = [b"HTTP/1.1 400 Bad Request\r\n"]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            head += [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"connection: close\r\n\r\n",
            ]
            self.transport.write(b"".join(head) + body)
            self.transport.close()

    return HttpToolsOpenAIErrors


HTTPTOOLS_PROTOCOL = _httptools_protocol()


def http_protocol() -> type[Any]:
    """The protocol class for ``uvicorn.Config(http=...)``: httptools when installed (what
    uvicorn's ``auto`` picks), else h11; both answer unparsable requests in OpenAI's shape."""
    return HTTPTOOLS_PROTOCOL or H11OpenAIErrors
