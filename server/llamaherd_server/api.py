"""The HTTP side: thin routes that turn requests into engine calls and events into responses."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .chat import ChatTemplateError, render_chat
from .engine import (
    Engine,
    EngineDraining,
    EngineNotReady,
    Failed,
    Finished,
    GenerationRequest,
    QueueFull,
    SamplingParams,
    TextChunk,
)
from .gpu import gpu_utilization
from .metrics import ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
    SamplingFields,
    error_body,
    parse_priority,
)
from .settings import ServerSettings

log = logging.getLogger("llamaherd.api")
request_log = logging.getLogger("llamaherd.requests")

MAX_STOP_STRINGS = 4


class APIError(Exception):
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
        too_big = APIError(
            413,
            f"request body is larger than {self.limit} bytes",
            param="body",
            code="body_too_large",
        )
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
    ) -> None:
        self.engine = engine
        self.events: asyncio.Queue[TextChunk | Finished | Failed] = asyncio.Queue()
        self.done = False
        self.generated = 0
        self.logged = False
        self.req = GenerationRequest(
            prompt_tokens=prompt_tokens,
            params=params,
            priority=priority,
            timeout_s=timeout_s,
            # The engine calls this on the event loop (its ``dispatch``), once per step for all
            # the step's events, so no hand-off of its own is needed here.
            emit=self.events.put_nowait,
        )

    def log(self, outcome: str, finish: Finished | None = None) -> None:
        if not self.logged:
            self.logged = True
            log_finished(outcome, req=self.req, generated=self.generated, finish=finish)

    def submit(self, metrics: ServerMetrics) -> None:
        try:
            self.engine.submit(self.req)
        except QueueFull as exc:
            self.logged = True
            raise refuse(
                metrics,
                APIError(
                    429,
                    f"server is busy: {exc}; retry later",
                    type_="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": str(self.engine.retry_after_seconds())},
                ),
                self.req,
            ) from None
        except EngineDraining:
            self.logged = True
            raise refuse(metrics, draining_error(), self.req) from None
        except EngineNotReady as exc:
            self.logged = True
            raise refuse(metrics, not_ready_error(str(exc)), self.req) from None

    async def stream(self) -> AsyncIterator[TextChunk | Finished | Failed]:
        """Events until Finished or Failed. Leaving early cancels the request."""
        try:
            while True:
                event = await self.events.get()
                if isinstance(event, TextChunk):
                    self.generated += event.n_tokens
                elif isinstance(event, Finished):
                    self.done = True
                    self.generated = event.completion_tokens
                    self.log("ok", event)
                else:
                    self.done = True
                    self.generated = max(self.generated, event.completion_tokens)
                    self.log(event.outcome)
                yield event
                if self.done:
                    return
        finally:
            if not self.done:
                self.engine.cancel(self.req)
                self.log("cancelled")

    async def collect(self, http_request: Request) -> tuple[str, Finished]:
        """The whole text; cancels the request if the client goes away first."""

        async def consume() -> tuple[str, Finished]:
            parts: list[str] = []
            async for event in self.stream():
                if isinstance(event, TextChunk):
                    parts.append(event.text)
                elif isinstance(event, Failed):
                    raise failed_error(event)
                else:
                    return "".join(parts), event
            raise RuntimeError("generation ended without a result")

        async def disconnected() -> None:
            while (await http_request.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.ensure_future(consume())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not work.done():
            work.cancel()
            self.engine.cancel(self.req)
            self.log("cancelled")
            raise APIError(499, "client disconnected", type_="cancelled")
        return work.result()


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


def failed_error(event: Failed) -> APIError:
    if event.outcome == "timeout":
        return APIError(504, event.message, type_="timeout", code="timeout")
    if event.outcome == "cancelled":
        return APIError(499, event.message, type_="cancelled")
    return APIError(500, event.message, type_="server_error")


def sampling_params(
    body: SamplingFields, max_tokens: int, temperature: float, context_size: int
) -> SamplingParams:
    if max_tokens > context_size:
        raise APIError(
            400,
            f"max_tokens ({max_tokens}) is larger than the context per slot "
            f"({context_size} tokens)",
            param="max_tokens",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    if any(s == "" for s in stop):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=tuple(stop),
        ignore_eos=body.ignore_eos,
    )


def create_app(
    settings: ServerSettings,
    *,
    load_in_background: bool = True,
    on_load_failure: Callable[[str], object] | None = None,
) -> FastAPI:
    """The server app. The engine is made in the lifespan and lives on ``app.state``.

    ``on_load_failure`` is called (from the loader thread) with the one-line message when the
    model cannot be loaded; the process entry point uses it to exit non-zero. Without it the
    app stays up and /health, /ready answer 503 with the message."""
    metrics = ServerMetrics(slots=settings.slots)
    threads, threads_from = settings.resolved_threads()
    model_name = settings.served_model_name
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = Engine(
            settings.model,
            metrics,
            slots=settings.slots,
            context_size=settings.context_size,
            token_budget=settings.token_budget,
            max_wait_ms=settings.max_wait_ms,
            threads=threads,
            gpu_layers=settings.gpu_layers,
            queue_limit=settings.queue_limit,
            aging_seconds=settings.priority_aging_seconds,
            seed=settings.seed,
            stall_seconds=settings.engine_stall_seconds,
            dispatch=asyncio.get_running_loop().call_soon_threadsafe,
        )
        app.state.engine = engine
        log.info("llama.cpp threads: %d (from %s)", threads, threads_from)
        if load_in_background:
            loader = threading.Thread(
                target=_load_quietly, args=(engine, on_load_failure), daemon=True
            )
            loader.start()
        else:
            await asyncio.to_thread(engine.load)
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="llamaherd server", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics

    def engine_of(request: Request) -> Engine:
        engine: Engine = request.app.state.engine
        return engine

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            param, message = "body", f"malformed JSON: {first.get('msg')}"
        else:
            param = ".".join(loc) or "body"
            message = f"{param}: {first.get('msg')}"
            if "input" in first and first.get("type") != "missing":
                message += f" (got {json.dumps(first['input'], default=str)[:80]})"
        return JSONResponse(error_body(message, param=param, code="invalid_value"), status_code=400)

    @app.middleware("http")
    async def _auth(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), api_key.encode()
            ):
                return error_response(
                    APIError(
                        401,
                        "missing or wrong API key (Authorization: Bearer <key>)",
                        type_="authentication_error",
                        code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                )
        return await call_next(request)

    def priority_of(request: Request, body: SamplingFields) -> int:
        header = request.headers.get("x-priority")
        if header is not None:
            try:
                return parse_priority(header)
            except ValueError as exc:
                raise APIError(400, f"X-Priority: {exc}", param="X-Priority") from None
        return body.priority if body.priority is not None else 0

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404,
                f"model {name!r} not found; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )

    def envelope(rid: str, obj: str, choice: dict[str, Any], finish: str | None) -> dict[str, Any]:
        """OpenAI's response object around one choice."""
        return {
            "id": rid,
            "object": obj,
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}],
        }

    # Tokenizing and templating a prompt up to the body limit takes milliseconds: the routes
    # run them in a worker thread (asyncio.to_thread), never on the event loop, which streams
    # every running request's tokens.
    def prompt_tokens(
        engine: Engine, prompt: str | list[int], *, special: bool = False
    ) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt must not be empty", param="prompt")
            tokens = engine.tokenize(prompt, add_special=True, parse_special=special)
        else:
            if not prompt:
                raise APIError(400, "prompt must not be empty", param="prompt")
            bad = [t for t in prompt if not 0 <= t < engine.n_vocab]
            if bad:
                raise APIError(
                    400,
                    f"prompt has token ids outside the vocabulary "
                    f"(0..{engine.n_vocab - 1}): {bad[:5]}",
                    param="prompt",
                )
            tokens = list(prompt)
        if len(tokens) >= settings.context_size:
            raise APIError(
                400,
                f"prompt is {len(tokens)} tokens, longer than the context per "
                f"slot ({settings.context_size} tokens, generation included)",
                param="prompt",
                code="context_length_exceeded",
            )
        return tokens

    def chat_prompt_tokens(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = render_chat(
                settings.chat_template or engine.chat_template,
                messages,
                bos_token=engine.bos_text,
                eos_token=engine.eos_text,
            )
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="messages", code="no_chat_template") from None
        if engine.bos_text and text.startswith(engine.bos_text):
            text = text[len(engine.bos_text) :]
        return prompt_tokens(engine, text, special=True)

    async def start(
        request: Request, tokens: list[int], params: SamplingParams, priority: int
    ) -> Generation:
        engine = engine_of(request)
        gen = Generation(engine, tokens, params, priority, settings.request_timeout_seconds)
        gen.submit(metrics)
        return gen

    def ensure_ready(request: Request) -> Engine:
        engine = engine_of(request)
        reason = engine.unavailable_reason()
        if reason == "draining":
            raise refuse(metrics, draining_error())
        if reason is not None:
            raise refuse(metrics, not_ready_error(reason))
        return engine

    # ---- routes ----------------------------------------------------------------------

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Liveness: 200 while the process can serve (loading included); 503 when the model
        failed to load, the engine died or the watchdog finds it stalled."""
        engine = engine_of(request)
        reason = engine.unhealthy_reason()
        body: dict[str, Any] = {
            "status": "healthy" if reason is None else "unhealthy",
            "model_loaded": engine.ready,
            "draining": engine.draining,
            "active_requests": engine.active_count,
            "queue_depth": engine.queue_depth,
            "gpu_utilization": gpu_utilization(),
        }
        if reason is not None:
            body["reason"] = reason
        return JSONResponse(body, status_code=200 if reason is None else 503)

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        reason = engine_of(request).unavailable_reason()
        if reason is not None:
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        engine = engine_of(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "llamaherd",
                    "meta": {
                        "slots": settings.slots,
                        "context_size": settings.context_size,
                        "n_vocab": engine.n_vocab,
                        "has_chat_template": bool(settings.chat_template or engine.chat_template),
                    },
                }
            ],
        }

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
        engine = ensure_ready(request)
        params = sampling_params(body, body.max_tokens, body.temperature, settings.context_size)
        tokens = await asyncio.to_thread(prompt_tokens, engine, body.prompt)
        gen = await start(request, tokens, params, priority_of(request, body))
        text, finish = await gen.collect(request)
        return GenerateResponse(
            request_id=gen.req.id,
            text=text,
            tokens_generated=finish.completion_tokens,
            latency_ms=round(finish.latency_s * 1000, 3),
            batch_wait_ms=round(finish.queue_wait_s * 1000, 3),
            prompt_tokens=finish.prompt_tokens,
            finish_reason=finish.finish_reason,
        )

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request
    ) -> dict[str, Any] | EventSourceResponse:
        engine = ensure_ready(request)
        check_model(body.model)
        prompt: str | list[int]
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            if len(body.prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = str(body.prompt[0])
        else:
            prompt = body.prompt  # type: ignore[assignment]
        tokens = await asyncio.to_thread(prompt_tokens, engine, prompt)
        max_tokens = body.max_tokens or settings.context_size - len(tokens)
        params = sampling_params(body, max_tokens, body.temperature, settings.context_size)
        gen = await start(request, tokens, params, priority_of(request, body))
        rid = f"cmpl-{gen.req.id}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                return envelope(rid, "text_completion", {"text": text}, finish)

            return sse(gen, chunk, rid, "text_completion", include_usage)
        text, finish = await gen.collect(request)
        return {
            **envelope(rid, "text_completion", {"text": text}, finish.finish_reason),
            "usage": usage(finish),
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, request: Request
    ) -> dict[str, Any] | EventSourceResponse:
        engine = ensure_ready(request)
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        tokens = await asyncio.to_thread(chat_prompt_tokens, engine, messages)
        max_tokens = (
            body.max_completion_tokens or body.max_tokens or settings.context_size - len(tokens)
        )
        params = sampling_params(body, max_tokens, body.temperature, settings.context_size)
        gen = await start(request, tokens, params, priority_of(request, body))
        rid = f"chatcmpl-{gen.req.id}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            first = True

            def chunk(text: str, finish: str | None) -> dict[str, Any]:
                nonlocal first
                delta: dict[str, Any] = {"content": text} if text or finish is None else {}
                if first:
                    delta["role"] = "assistant"
                    first = False
                return envelope(rid, "chat.completion.chunk", {"delta": delta}, finish)

            return sse(gen, chunk, rid, "chat.completion.chunk", include_usage)
        answer, finish = await gen.collect(request)
        message = {"message": {"role": "assistant", "content": answer}}
        return {
            **envelope(rid, "chat.completion", message, finish.finish_reason),
            "usage": usage(finish),
        }

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def usage(finish: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": finish.completion_tokens,
        "total_tokens": finish.prompt_tokens + finish.completion_tokens,
    }


def sse(
    gen: Generation,
    chunk: Callable[[str, str | None], dict[str, Any]],
    rid: str,
    obj: str,
    include_usage: bool,
) -> EventSourceResponse:
    """Server-sent events in OpenAI's framing, ending with ``data: [DONE]``.

    The chunk that carries ``finish_reason`` also carries ``usage``; with
    ``stream_options.include_usage`` a last chunk with no choices repeats it, as OpenAI does.
    """

    async def events() -> AsyncIterator[str]:
        pending = ""
        async for event in gen.stream():
            if isinstance(event, TextChunk):
                pending += event.text
                # Only send when there is text: empty deltas would confuse clients.
                if pending:
                    yield json.dumps(chunk(pending, None))
                    pending = ""
            elif isinstance(event, Finished):
                last = chunk(pending, event.finish_reason)
                last["usage"] = usage(event)
                yield json.dumps(last)
                if include_usage:
                    yield json.dumps(
                        {
                            "id": rid,
                            "object": obj,
                            "created": int(time.time()),
                            "model": last["model"],
                            "choices": [],
                            "usage": usage(event),
                        }
                    )
            else:
                error = failed_error(event)
                yield json.dumps(error_body(error.message, type_=error.type, code=error.code))
        yield "[DONE]"

    return EventSourceResponse(events(), ping=15, sep="\n")


def _load_quietly(engine: Engine, on_failure: Callable[[str], object] | None) -> None:
    try:
        engine.load()
    except Exception:  # already logged by the engine; /health and /ready report it
        if on_failure is not None:
            on_failure(engine.load_error or "model load failed")
