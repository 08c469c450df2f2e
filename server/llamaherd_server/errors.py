"""OpenAI-style errors: the exception routes raise, the builders for each refusal, and the
handlers that turn them (and FastAPI's validation errors) into ``{"error": {...}}`` bodies."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .generation import Failed
from .protocol import error_body


class APIError(Exception):
    """An HTTP error with OpenAI's error fields; raised anywhere below a route."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type_: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_
        self.code = code
        self.headers = headers


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, type_=exc.type, param=exc.param, code=exc.code),
        status_code=exc.status,
        headers=exc.headers,
    )


def not_ready_error(reason: str) -> APIError:
    return APIError(
        503, reason, type_="unavailable", code="not_ready", headers={"Retry-After": "5"}
    )


def draining_error() -> APIError:
    return APIError(
        503,
        "server is shutting down",
        type_="unavailable",
        code="draining",
        headers={"Retry-After": "1"},
    )


def queue_full_error(detail: str, retry_after_s: int) -> APIError:
    return APIError(
        429,
        f"server is busy: {detail}; retry later",
        type_="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def body_too_large_error(limit: int) -> APIError:
    return APIError(
        413,
        f"request body is larger than {limit} bytes",
        param="body",
        code="body_too_large",
    )


def invalid_api_key_error() -> APIError:
    return APIError(
        401,
        "missing or wrong API key (Authorization: Bearer <key>)",
        type_="authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def disconnected_error() -> APIError:
    return APIError(499, "client disconnected", type_="cancelled")


def failed_error(event: Failed) -> APIError:
    """The error for a request the engine ended without a result."""
    if event.outcome == "timeout":
        return APIError(504, event.message, type_="timeout", code="timeout")
    if event.outcome == "cancelled":
        return APIError(499, event.message, type_="cancelled")
    return APIError(500, event.message, type_="server_error")


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """A 400 that names the first bad field (OpenAI answers 400 where FastAPI says 422)."""
    first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    code = "unsupported_field" if first.get("type") == "unsupported" else "invalid_value"
    if first.get("type") == "json_invalid":
        param, message = "body", f"malformed JSON: {first.get('msg')}"
    else:
        param = ".".join(loc) or "body"
        message = f"{param}: {first.get('msg')}"
        if "input" in first and first.get("type") != "missing":
            message += f" (got {json.dumps(first['input'], default=str)[:80]})"
    return JSONResponse(error_body(message, param=param, code=code), status_code=400)


def install_error_handlers(app: FastAPI) -> None:
    async def _api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error_response(exc)

    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
