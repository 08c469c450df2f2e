"""The HTTP side: the app factory and thin routes that turn requests into engine calls.

Errors live in :mod:`.errors`, the ASGI middleware (body limit, API key) in :mod:`.middleware`,
and the hand-off between the event loop and the engine thread in :mod:`.bridge`."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from . import __version__
from .bridge import Generation, ensure_ready, sse, usage
from .chat import ChatTemplateError, render_chat, render_chat_parts, tokenize_parts
from .engine import Engine
from .errors import APIError, install_error_handlers
from .generation import SamplingParams
from .gpu import gpu_utilization
from .llama_backend import LlamaBackend
from .metrics import ServerMetrics
from .middleware import APIKey, BodyLimit
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    SamplingFields,
    parse_priority,
)
from .settings import ServerSettings
from .sse import EventStream

log = logging.getLogger("llamaherd.api")

MAX_STOP_STRINGS = 4

Body = TypeVar("Body", bound=BaseModel)


async def read_body(request: Request, model: type[Body]) -> Body:
    """The request's JSON body, parsed and validated in a worker thread: a body near
    max-body-bytes takes milliseconds to parse, which every running stream would otherwise wait
    out on the event loop. Errors are FastAPI's (a 400 naming the field, see errors.py)."""
    raw = await request.body()
    try:
        return await asyncio.to_thread(model.model_validate_json, raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = Engine(
            settings.model,
            metrics,
            backend=LlamaBackend.factory(
                settings.model, threads=threads, gpu_layers=settings.gpu_layers
            ),
            slots=settings.slots,
            context_size=settings.context_size,
            token_budget=settings.token_budget,
            max_wait_ms=settings.max_wait_ms,
            queue_limit=settings.queue_limit,
            aging_seconds=settings.priority_aging_seconds,
            seed=settings.seed,
            stall_seconds=settings.engine_stall_seconds,
            prefix_cache=settings.prefix_cache,
            prefix_cache_ram_bytes=settings.host_cache_budget(),
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
    app.state.created = int(time.time())
    install_error_handlers(app)
    app.include_router(router)
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    # The last added runs first: the body limit, then the API key.
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(APIKey, key=api_key)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def _load_quietly(engine: Engine, on_failure: Callable[[str], object] | None) -> None:
    try:
        engine.load()
    except Exception:  # already logged by the engine; /health and /ready report it
        if on_failure is not None:
            on_failure(engine.load_error or "model load failed")


# The routes read their bodies themselves (read_body: parsed off the event loop), so FastAPI
# does not know them: the schema gets them here, as the fuzz tests and clients read it.
REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/generate": GenerateRequest,
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in {
        400: "invalid request (the message and `param` name the field)",
        401: "missing or wrong API key",
        404: "unknown model",
        413: "body too large",
        429: "queue full (Retry-After)",
        499: "client disconnected",
        500: "this request failed in the engine",
        503: "loading, draining or unhealthy (Retry-After)",
        504: "request timed out",
    }.items()
}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _, defs = models_json_schema(
        [(model, "validation") for model in REQUEST_BODIES.values()],
        ref_template="#/components/schemas/{model}",
    )
    schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
    for path, model in REQUEST_BODIES.items():
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    app.openapi_schema = schema
    return schema


def stream_or(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {
        **ERRORS,
        200: {
            "model": model,
            "description": "the answer; with `stream: true` server-sent events",
            "content": {"text/event-stream": {}},
        },
    }


# ---- what routes read from the app ---------------------------------------------------------


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def settings_of(request: Request) -> ServerSettings:
    settings: ServerSettings = request.app.state.settings
    return settings


def metrics_of(request: Request) -> ServerMetrics:
    metrics: ServerMetrics = request.app.state.metrics
    return metrics


# ---- request → engine input -----------------------------------------------------------------


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


def priority_of(request: Request, body: SamplingFields) -> int:
    header = request.headers.get("x-priority")
    if header is not None:
        try:
            return parse_priority(header)
        except ValueError as exc:
            raise APIError(400, f"X-Priority: {exc}", param="X-Priority") from None
    return body.priority if body.priority is not None else 0


def check_model(settings: ServerSettings, name: str | None) -> None:
    model_name = settings.served_model_name
    if name is not None and name != model_name:
        raise APIError(
            404,
            f"model {name!r} not found; this server serves {model_name!r}",
            param="model",
            code="model_not_found",
        )


# Tokenizing and templating a prompt up to the body limit takes milliseconds: the routes run
# them in a worker thread (asyncio.to_thread), never on the event loop, which streams every
# running request's tokens.
def prompt_tokens(
    engine: Engine, settings: ServerSettings, prompt: str | list[int], *, special: bool = False
) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        too_long(engine, settings, len(prompt))
        tokens = engine.tokenize(prompt, add_special=True, parse_special=special)
    else:
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        bad = [t for t in prompt if not 0 <= t < engine.n_vocab]
        if bad:
            raise APIError(
                400,
                f"prompt has token ids outside the vocabulary (0..{engine.n_vocab - 1}): {bad[:5]}",
                param="prompt",
            )
        tokens = list(prompt)
    return fits_context(tokens, settings, "prompt")


def fits_context(tokens: list[int], settings: ServerSettings, param: str) -> list[int]:
    """``tokens``, or the 400 that says they leave no room in a slot's context."""
    if len(tokens) >= settings.context_size:
        raise APIError(
            400,
            f"prompt is {len(tokens)} tokens, longer than the context per "
            f"slot ({settings.context_size} tokens, generation included)",
            param=param,
            code="context_length_exceeded",
        )
    return tokens


def too_long(engine: Engine, settings: ServerSettings, chars: int) -> None:
    """Refuse text that cannot fit the context whatever it says, without tokenizing it: every
    token stands for at most ``engine.max_token_bytes`` bytes of text, and a character is at
    least one byte, so the text needs at least chars / max_token_bytes tokens."""
    at_least = -(-chars // max(1, engine.max_token_bytes))
    if at_least >= settings.context_size:
        raise APIError(
            400,
            f"prompt is at least {at_least} tokens ({chars} characters), longer than the "
            f"context per slot ({settings.context_size} tokens, generation included)",
            param="prompt",
            code="context_length_exceeded",
        )


def chat_prompt_tokens(
    engine: Engine, settings: ServerSettings, messages: list[dict[str, str]]
) -> list[int]:
    """The chat prompt's tokens. The messages' content is text, whatever it says: only the
    template's own markers become control tokens (chat.render_chat_parts)."""
    too_long(engine, settings, sum(len(m["content"]) for m in messages))
    template = settings.chat_template or engine.chat_template
    render = {"bos_token": engine.bos_text, "eos_token": engine.eos_text}
    try:
        parts = render_chat_parts(template, messages, **render)
        if parts is None:
            # The template edits or drops content: the clients' text cannot be told apart.
            # Safe only when no message holds a control token's text.
            if any(
                engine.controls_pattern is not None and engine.controls_pattern.search(m["content"])
                for m in messages
            ):
                raise APIError(
                    400,
                    "a message contains a special token's text, and this model's chat template "
                    "changes message content, so it cannot be kept as plain text",
                    param="messages",
                )
            parts = [(render_chat(template, messages, **render), False)]
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages", code="no_chat_template") from None
    bos = engine.bos_text
    if bos and parts and not parts[0][1] and parts[0][0].startswith(bos):
        # The template writes BOS; tokenizing adds it (once).
        parts[0] = (parts[0][0][len(bos) :], False)
    text_chars = sum(len(text) for text, _ in parts)
    if not text_chars:
        raise APIError(400, "the rendered chat prompt is empty", param="messages")
    tokens = engine.tokenize("", add_special=True) + tokenize_parts(
        parts,
        lambda text: engine.tokenize(text, add_special=False),
        engine.controls_pattern,
        engine.control_tokens,
    )
    return fits_context(tokens, settings, "messages")


def start(
    request: Request,
    tokens: list[int],
    params: SamplingParams,
    priority: int,
    *,
    stream: bool = False,
) -> Generation:
    """Submit to the engine; refusals (queue full, draining) raise their APIError. A stream's
    generation reports its admission: its response headers wait for it (see bridge.sse)."""
    settings = settings_of(request)
    gen = Generation(
        engine_of(request),
        tokens,
        params,
        priority,
        settings.request_timeout_seconds,
        report_admission=stream,
    )
    gen.submit(metrics_of(request))
    return gen


def envelope(
    model_name: str, rid: str, obj: str, choice: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    """OpenAI's response object around one choice."""
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, **choice, "logprobs": None, "finish_reason": finish}],
    }


def chat_chunks(model_name: str, rid: str) -> Callable[[str, str | None], dict[str, Any]]:
    """A chat stream's chunks, one call each: the first delta names the role, and a chunk
    that only finishes carries an empty delta."""
    first = True

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        nonlocal first
        delta: dict[str, Any] = {"content": text} if text or finish is None else {}
        if first:
            delta["role"] = "assistant"
            first = False
        return envelope(model_name, rid, "chat.completion.chunk", {"delta": delta}, finish)

    return chunk


# ---- routes ---------------------------------------------------------------------------------

router = APIRouter()


@router.get("/health")
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
    devices = getattr(engine.backend, "devices", None)
    if devices is not None:
        body["gpu"] = devices.as_json(getattr(engine.backend, "gpu_layers", 0))
    if reason is not None:
        body["reason"] = reason
    return JSONResponse(body, status_code=200 if reason is None else 503)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    reason = engine_of(request).unavailable_reason()
    if reason is not None:
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)
    return JSONResponse({"ready": True})


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    return Response(metrics_of(request).render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    settings = settings_of(request)
    return {
        "object": "list",
        "data": [
            {
                "id": settings.served_model_name,
                "object": "model",
                "created": request.app.state.created,
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


@router.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(request: Request) -> GenerateResponse:
    body = await read_body(request, GenerateRequest)
    settings = settings_of(request)
    engine = ensure_ready(engine_of(request), metrics_of(request))
    params = sampling_params(body, body.max_tokens, body.temperature, settings.context_size)
    tokens = await asyncio.to_thread(prompt_tokens, engine, settings, body.prompt)
    gen = start(request, tokens, params, priority_of(request, body))
    text, finish = await gen.collect(request.receive)
    return GenerateResponse(
        request_id=gen.req.id,
        text=text,
        tokens_generated=finish.completion_tokens,
        latency_ms=round(finish.latency_s * 1000, 3),
        batch_wait_ms=round(finish.queue_wait_s * 1000, 3),
        prompt_tokens=finish.prompt_tokens,
        finish_reason=finish.finish_reason,
    )


@router.post("/v1/completions", response_model=None, responses=stream_or(CompletionResponse))
async def completions(request: Request) -> dict[str, Any] | EventStream:
    body = await read_body(request, CompletionRequest)
    settings = settings_of(request)
    engine = ensure_ready(engine_of(request), metrics_of(request))
    check_model(settings, body.model)
    prompt: str | list[int]
    if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
        if len(body.prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt")
        prompt = str(body.prompt[0])
    else:
        prompt = body.prompt  # type: ignore[assignment]
    tokens = await asyncio.to_thread(prompt_tokens, engine, settings, prompt)
    max_tokens = body.max_tokens or settings.context_size - len(tokens)
    params = sampling_params(body, max_tokens, body.temperature, settings.context_size)
    gen = start(request, tokens, params, priority_of(request, body), stream=body.stream)
    rid = f"cmpl-{gen.req.id}"
    model_name = settings.served_model_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return envelope(model_name, rid, "text_completion", {"text": text}, finish)

        return await sse(gen, request.receive, chunk, rid, "text_completion", include_usage)
    text, finish = await gen.collect(request.receive)
    return {
        **envelope(model_name, rid, "text_completion", {"text": text}, finish.finish_reason),
        "usage": usage(finish),
    }


@router.post(
    "/v1/chat/completions", response_model=None, responses=stream_or(ChatCompletionResponse)
)
async def chat_completions(request: Request) -> dict[str, Any] | EventStream:
    body = await read_body(request, ChatCompletionRequest)
    settings = settings_of(request)
    engine = ensure_ready(engine_of(request), metrics_of(request))
    check_model(settings, body.model)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    tokens = await asyncio.to_thread(chat_prompt_tokens, engine, settings, messages)
    max_tokens = (
        body.max_completion_tokens or body.max_tokens or settings.context_size - len(tokens)
    )
    params = sampling_params(body, max_tokens, body.temperature, settings.context_size)
    gen = start(request, tokens, params, priority_of(request, body), stream=body.stream)
    rid = f"chatcmpl-{gen.req.id}"
    model_name = settings.served_model_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk = chat_chunks(model_name, rid)
        return await sse(gen, request.receive, chunk, rid, "chat.completion.chunk", include_usage)
    answer, finish = await gen.collect(request.receive)
    message = {"message": {"role": "assistant", "content": answer}}
    return {
        **envelope(model_name, rid, "chat.completion", message, finish.finish_reason),
        "usage": usage(finish),
    }
