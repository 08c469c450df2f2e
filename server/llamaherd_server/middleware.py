"""Plain ASGI middleware: it sees only the request's start and body, never the response, so
server-sent event streams pass through untouched and unbuffered."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import body_too_large_error, error_response, invalid_api_key_error


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413 before they reach a route, and read every
    POST body as JSON whatever its Content-Type says (``curl -d`` sends a form type)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = body_too_large_error(self.limit)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await error_response(too_big)(scope, receive, send)
                return
        if scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await error_response(too_big)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class APIKey:
    """Answer 401 to any ``/v1/`` request without ``Authorization: Bearer <key>``; ``key``
    None lets everything through. /health, /ready and /metrics stay open for probes."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.key is not None
            and scope["type"] == "http"
            and scope["path"].startswith("/v1/")
            and not self._authorized(scope)
        ):
            await error_response(invalid_api_key_error())(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.key is not None
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)
