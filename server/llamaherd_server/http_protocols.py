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


def error_response() -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The 400's headers (beside uvicorn's defaults) and its JSON body."""
    body = json.dumps(error_body(MESSAGE, code="invalid_http_request")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return headers, body


class H11OpenAIErrors(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        headers, body = error_response()
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


HTTPTOOLS_PROTOCOL: type[Any] | None
try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: h11 only
    HTTPTOOLS_PROTOCOL = None
else:

    class HttpToolsOpenAIErrors(HttpToolsProtocol):
        def send_400_response(self, msg: str) -> None:
            headers, body = error_response()
            head = [b"HTTP/1.1 400 Bad Request\r\n"]
            for name, value in [*self.server_state.default_headers, *headers]:
                head += [name, b": ", value, b"\r\n"]
            self.transport.write(b"".join([*head, b"\r\n", body]))
            self.transport.close()

    HTTPTOOLS_PROTOCOL = HttpToolsOpenAIErrors


def http_protocol() -> type[Any]:
    """The protocol class for ``uvicorn.Config(http=...)``: httptools when installed (what
    uvicorn's ``auto`` picks), else h11; both answer unparsable requests in OpenAI's shape."""
    return HTTPTOOLS_PROTOCOL or H11OpenAIErrors
