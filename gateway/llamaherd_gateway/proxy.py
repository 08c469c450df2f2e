"""The gateway's HTTP side, a plain ASGI app (no framework between a byte from a replica and the
client): routes by the ``model`` field, holds requests for a service with no ready replica,
picks a replica (:mod:`llamaherd_gateway.picker`), retries only where the replica cannot have
started the request, ejects replicas that keep failing (:mod:`llamaherd_gateway.outliers`), and
streams the answer through unchanged (SSE included).

The replicas are reached with aiohttp (its C HTTP parser): measured on a stream of SSE chunks,
the gateway spends about 70 us of CPU per chunk with it against 125-150 us with httpx, CPU
that a 2-core node would take from llama.cpp (bench/gateway_bench.py, docs/gateway.md).

A client that disconnects cancels the forwarding task, which closes the upstream response: the
server sees its client go and frees the slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from llamaherd_gateway import picker
from llamaherd_gateway.keys import KeyFile, PriorityLimits
from llamaherd_gateway.logs import log_value
from llamaherd_gateway.metrics import GatewayMetrics
from llamaherd_gateway.outliers import OutlierDetector
from llamaherd_gateway.registry import Endpoint, Key, Registry, ServiceInfo
from llamaherd_gateway.settings import GatewaySettings
from llamaherd_server.protocol import MAX_PRIORITY, parse_priority

log = logging.getLogger("llamaherd_gateway.requests")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ScaleUp = Callable[[str, str], Awaitable[bool]]

ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/generate")
# Every path the gateway answers, with its one method (another method: 405 with Allow).
ROUTES = {
    **dict.fromkeys(ROUTED_PATHS, "POST"),
    "/v1/models": "GET",
    "/metrics": "GET",
    "/healthz": "GET",
    "/ready": "GET",
}
# Bodies from this size up are parsed and written by a worker thread, not on the event loop.
OFF_LOOP_BYTES = 64 * 1024
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Not passed on to a replica: the client sets host and content-length for the body it sends
# (which may be rewritten); expect concerns the client's own connection.
NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
UrlFor = Callable[[Endpoint], str]

# How a request to one replica failed before its response headers (failure_kind):
CONNECT = "connect"  # never connected: refused, connect timeout
UNSENT = "unsent"  # the connection broke before the request was handed over whole
UNSTARTED = "unstarted"  # streamed: closed before the headers, which come with a slot
TIMEOUT = "timeout"  # no response headers within upstream_timeout_seconds
MAY_HAVE_RUN = "may_have_run"  # closed (or answered garbage) after the whole request went
RETRYABLE = frozenset({CONNECT, UNSENT, UNSTARTED})


def failure_kind(exc: BaseException, handed_over: bool, streamed: bool) -> str:
    """What a failure before the response headers says about the request.

    Only the first three kinds are retried on another replica: there the replica cannot have
    started it. It never got the connection (``connect``); or the connection broke before the
    request was handed over whole (``unsent``: ``handed_over`` turns true as the body's bytes
    go to the connection, so false means the replica cannot hold the whole request); or, for
    a streamed request, before any response header: the llamaherd server sends a streamed
    response's headers only once a slot has taken the request, so before them it was at most
    queued (``unstarted``). A non-streamed request whose connection closes after it went whole
    may have run (``may_have_run``): it is never sent to a second replica."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return CONNECT
    if not handed_over:
        return UNSENT
    if isinstance(exc, TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return TIMEOUT
    if streamed and isinstance(exc, aiohttp.ClientConnectionError):
        return UNSTARTED
    return MAY_HAVE_RUN


class RequestBody(aiohttp.BytesPayload):
    """A request body that knows whether it was handed to the connection: ``handed_over``
    turns true just before its bytes are written, if the connection is open then (the headers
    wait in aiohttp's buffer to go out with them). While it is false the replica cannot have
    the whole request."""

    handed_over = False

    def _hand_over(self, writer: Any) -> None:
        if not hasattr(writer, "transport"):  # a writer that does not say: count it as sent
            self.handed_over = True
            return
        transport = writer.transport
        self.handed_over = transport is not None and not transport.is_closing()

    async def write(self, writer: Any) -> None:
        self._hand_over(writer)
        await super().write(writer)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        self._hand_over(writer)
        await super().write_with_length(writer, content_length)


def upstream_session(settings: GatewaySettings) -> aiohttp.ClientSession:
    """The client to the replicas: bytes through unchanged (no decompression, no default
    headers added), bounded connections, a connect timeout and a timeout between reads; idle
    connections closed before the server would close them."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            limit=settings.max_connections,
            ttl_dns_cache=None,
            keepalive_timeout=settings.upstream_keepalive_seconds,
        ),
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=settings.connect_timeout_seconds,
            sock_read=settings.upstream_timeout_seconds,
        ),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Accept"),
        trust_env=False,
    )


SCALE_RETRY_S = 2.0


class GatewayError(Exception):
    """An answer from the gateway itself, OpenAI-style."""

    def __init__(
        self,
        status: int,
        message: str,
        outcome: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.outcome = status, message, outcome
        self.type, self.code, self.param, self.retry_after = type, code, param, retry_after

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.retry_after).encode())] if self.retry_after else []


@dataclass
class Outcome:
    """What one request came to: for the metric and the one log line."""

    model: str = ""  # as the client sent it: logged (escaped), a label only when known
    known: bool = False  # the gateway serves that model
    service: ServiceInfo | None = None
    endpoint: Endpoint | None = None
    status: int = 0
    outcome: str = "ok"
    reason: str = ""
    retries: int = 0
    hold_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    # The client has had the whole answer: an SSE stream's closing ``data: [DONE]`` went out.
    # A client that hangs up after it (the openai client does, before the body's end) left
    # nothing unfinished: the request counts as ok, not cancelled.
    answered: bool = False


def ends_stream(tail: bytes) -> bool:
    """Whether relayed bytes end with the SSE event that closes an OpenAI stream."""
    return tail.rstrip().endswith(b"data: [DONE]")


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        registry: Registry,
        metrics: GatewayMetrics,
        http: aiohttp.ClientSession,
        scale_up: ScaleUp | None = None,
        url_for: UrlFor | None = None,
        ready: Callable[[], bool] = lambda: True,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.http = http
        self.url_for: UrlFor = url_for or (lambda endpoint: endpoint.url)
        self.keys = KeyFile(settings.api_keys_file) if settings.api_keys_file else None
        self.priority_limits = (
            PriorityLimits(settings.priority_limits_file) if settings.priority_limits_file else None
        )
        # the client's Authorization goes on unless it was the gateway's own key
        self.forward_authorization = self.keys is None or settings.forward_authorization
        self.escape_logs = settings.log_format == "text"  # JSON lines escape on their own
        self.scale_up = scale_up
        self.is_ready = ready
        self.rng = rng or random.Random()
        self.outliers: OutlierDetector[Endpoint] = OutlierDetector(
            settings.outlier_consecutive_failures,
            settings.outlier_base_ejection_seconds,
            settings.outlier_max_ejection_seconds,
            clock,
        )
        self._outliers_version = -1
        self.outstanding: dict[Endpoint, int] = {}
        # requests of others (other gateways, the Service's clients) on each replica, as of the
        # last poll of its /metrics
        self.others: dict[Endpoint, int] = {}
        self._poller: asyncio.Task[None] | None = None
        self.held = 0
        self._scaling: dict[Key, asyncio.Task[bool]] = {}
        self._scale_tried: dict[Key, float] = {}

    # ---- ASGI ----
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if self.keys is not None and path.startswith("/v1/") and not self._authorized(scope):
            err = GatewayError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                "unauthorized",
                code="invalid_api_key",
            )
            self.metrics.requests.labels("", "", "", "unauthorized").inc()
            await _send(send, 401, err.body(), extra=[(b"www-authenticate", b"Bearer")])
            return
        allowed = ROUTES.get(path)
        if allowed is None:
            err = GatewayError(404, f"no route {path}", "not_found", code="not_found")
            await _send(send, 404, err.body())
        elif method != allowed:
            err = GatewayError(
                405,
                f"{path} takes {allowed}, not {method}",
                "bad_request",
                code="method_not_allowed",
            )
            await _send(send, 405, err.body(), extra=[(b"allow", allowed.encode())])
        elif path in ROUTED_PATHS:
            await self._routed(scope, receive, send)
        elif path == "/v1/models":
            await _send_json(send, 200, self.model_list())
        elif path == "/metrics":
            self._count_endpoints()
            await _send(send, 200, self.metrics.render(), b"text/plain; version=0.0.4")
        elif path == "/healthz":
            await _send_json(send, 200, {"status": "ok"})
        else:  # /ready
            ok = self.is_ready()
            await _send_json(send, 200 if ok else 503, {"ready": ok})

    def _authorized(self, scope: Scope) -> bool:
        assert self.keys is not None
        return self.keys.allows(_header(scope, b"authorization"))

    def _count_endpoints(self) -> None:
        """The per-service gauges, from the registry and the outlier state as they are now."""
        for gauge in (self.metrics.endpoints, self.metrics.ejected, self.metrics.ignored_claims):
            gauge.clear()
        ejected = self.outliers.ejected()
        ignored = self.registry.ignored_claims()
        for key in self.registry.services:
            endpoints = self.registry.endpoints(key)
            self.metrics.endpoints.labels(*key).set(len(endpoints))
            self.metrics.ejected.labels(*key).set(sum(1 for ep in endpoints if ep in ejected))
            self.metrics.ignored_claims.labels(*key).set(len(ignored.get(key, ())))

    # ---- /v1/models ----
    def model_list(self) -> dict[str, Any]:
        data = []
        for name, services in sorted(self.registry.models().items()):
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "llamaherd",
                    "services": [
                        {
                            "namespace": s.namespace,
                            "name": s.name,
                            "replicas": s.replicas,
                            "readyEndpoints": len(self.registry.endpoints(s.key)),
                            "weight": s.weight,
                        }
                        for s in services
                    ],
                }
            )
        return {"object": "list", "data": data}

    # ---- routed requests ----
    async def _routed(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = Outcome()
        too_large = self._refuse_by_length(scope)
        if too_large is not None:  # the body is never read
            outcome.status, outcome.outcome = too_large.status, too_large.outcome
            await _send(send, too_large.status, too_large.body(), extra=[(b"connection", b"close")])
            self._record(outcome)
            return
        disconnected = asyncio.Event()
        started_response = False

        async def guarded_send(message: Message) -> None:
            nonlocal started_response
            started_response = True
            await send(message)

        async def work() -> None:
            raw = await _read_body(receive, self.settings.max_body_bytes)
            watcher = asyncio.create_task(_watch_disconnect(receive, disconnected))
            try:
                await self._forward(scope, raw, guarded_send, outcome)
            finally:
                watcher.cancel()

        task = asyncio.create_task(work())
        stopper = asyncio.create_task(disconnected.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # the client went away: stop, and close the upstream request
                task.cancel()
                outcome.outcome = "ok" if outcome.answered else "cancelled"
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if task.cancelled():  # also when the client left while sending the body
                outcome.outcome = "ok" if outcome.answered else "cancelled"
        except GatewayError as err:
            outcome.status, outcome.outcome = err.status, err.outcome
            if not started_response:
                await _send(send, err.status, err.body(), extra=err.headers())
        except OSError:  # the client's socket broke while we wrote to it
            outcome.outcome = "ok" if outcome.answered else "cancelled"
        except Exception:  # a fault of the gateway's own: this request fails alone, in JSON
            log.exception("request failed in the gateway")
            outcome.status, outcome.outcome = 500, "error"
            if not started_response:
                fault = GatewayError(
                    500,
                    "the gateway failed on this request",
                    "error",
                    type="server_error",
                    code="internal_error",
                )
                with contextlib.suppress(Exception):
                    await _send(send, 500, fault.body())
        finally:
            stopper.cancel()
            self._record(outcome)

    def _refuse_by_length(self, scope: Scope) -> GatewayError | None:
        """A 413 for a Content-Length over the limit, before any byte of the body is read."""
        length = _header(scope, b"content-length")
        if length is None:
            return None
        limit = self.settings.max_body_bytes
        try:
            size = int(length.strip())
        except ValueError:
            return GatewayError(400, "the Content-Length header is not a number", "bad_request")
        if size > limit:
            return GatewayError(
                413,
                f"the request body ({size} bytes) is over {limit} bytes",
                "bad_request",
                code="request_too_large",
            )
        return None

    def _record(self, o: Outcome) -> None:
        svc = o.service
        labels = (svc.namespace, svc.name) if svc else ("", "")
        self.metrics.requests.labels(o.model if o.known else "", *labels, o.outcome).inc()
        model = log_value(o.model) if self.escape_logs else o.model
        log.info(
            "request %s",
            o.outcome,
            extra={
                "fields": {
                    "model": model,
                    "service": f"{labels[0]}/{labels[1]}" if svc else "",
                    "endpoint": f"{o.endpoint.address}:{o.endpoint.port}" if o.endpoint else "",
                    "status": o.status,
                    "outcome": o.outcome,
                    "pick": o.reason,
                    "retries": o.retries,
                    "hold_s": round(o.hold_s, 3),
                    "duration_s": round(time.monotonic() - o.started, 3),
                }
            },
        )

    async def _forward(self, scope: Scope, raw: bytes, send: Send, o: Outcome) -> None:
        big = len(raw) >= OFF_LOOP_BYTES  # parsed and written by a worker thread
        body = await asyncio.to_thread(_parse, raw) if big else _parse(raw)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(
                400,
                "the request names no model: the field 'model' must be a non-empty string",
                "bad_request",
                param="model",
            )
        o.model = model
        services = self.registry.backends(model)
        if not services:
            raise GatewayError(
                404,
                f"The model '{model}' does not exist: no InferenceService serves it here "
                "(GET /v1/models lists the models)",
                "not_found",
                param="model",
                code="model_not_found",
            )
        o.known = True
        path = scope["path"]
        headers, changes = self._upstream_headers(scope, body)
        streamed = body.get("stream") is True
        key = picker.affinity_key(path, body, self.settings.affinity_prefix_chars)
        service, endpoints = self._ready_choice(services)
        if service is None:
            service, endpoints = await self._hold(model, services, o)
        o.service = service
        labels = (service.namespace, service.name)
        if model != service.name:  # the server answers only to its own name
            changes["model"] = service.name
        payload = raw
        if changes:
            payload = await asyncio.to_thread(_dump, body, changes) if big else _dump(body, changes)
        tried: set[Endpoint] = set()
        deadline = time.monotonic() + self.settings.hold_timeout_seconds
        for attempt in range(self.settings.retries + 1):
            candidates = [ep for ep in self._in_service(endpoints) if ep not in tried]
            if not candidates:  # the endpoints may have changed; else the ejected, before waiting
                current = self.registry.endpoints(service.key)
                candidates = [ep for ep in self._in_service(current) if ep not in tried] or [
                    ep for ep in current if ep not in tried
                ]
            if not candidates and tried:
                # Every ready replica refused: the endpoints are behind (a pod died). Wait, as a
                # hold does and within its bound, for one not tried yet.
                candidates = await self._wait_for_another(service, tried, deadline)
            if not candidates:
                break
            by_url = {ep.url: ep for ep in candidates}
            loads = {url: self.load(ep) + self.outliers.failures(ep) for url, ep in by_url.items()}
            url, reason = picker.pick_replica(
                key, loads, self.settings.affinity_load_factor, self.rng
            )
            endpoint = by_url[url]
            o.endpoint, o.reason = endpoint, reason
            self.metrics.picks.labels(*labels, reason).inc()
            if attempt:
                o.retries += 1
                self.metrics.retries.labels(*labels).inc()
            tried.add(endpoint)
            if await self._send_to(
                endpoint, service, path, headers, payload, streamed, send, o, labels
            ):
                return
        raise GatewayError(
            502,
            f"no replica of {service.namespace}/{service.name} accepted the request "
            f"(tried {len(tried)})",
            "unavailable",
            type="server_error",
            code="upstream_unavailable",
        )

    def _upstream_headers(
        self, scope: Scope, body: dict[str, Any]
    ) -> tuple[list[tuple[str, str]], dict[str, Any]]:
        """The headers for the replica (hop-by-hop, the gateway's own key and priorities over the
        client's limit left out or lowered), and the body fields to change."""
        not_forwarded = NOT_FORWARDED | _connection_tokens(scope)
        if not self.forward_authorization:
            not_forwarded = not_forwarded | {b"authorization"}
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.lower() not in not_forwarded
        ]
        if not any(k.lower() == "content-type" for k, _ in headers):
            headers.append(("Content-Type", "application/json"))
        changes: dict[str, Any] = {}
        limit = self._priority_limit(scope)
        if limit >= MAX_PRIORITY:
            return headers, changes
        for i, (name, value) in enumerate(headers):
            if name.lower() == "x-priority":
                asked = _priority(value, "X-Priority")
                if asked > limit:
                    headers[i] = (name, str(limit))
        asked_in_body = body.get("priority")
        if asked_in_body is not None and _priority(asked_in_body, "priority") > limit:
            changes["priority"] = limit
        return headers, changes

    def _priority_limit(self, scope: Scope) -> int:
        default = self.settings.max_priority
        if self.priority_limits is None:
            return default
        return self.priority_limits.limit_for(_header(scope, b"authorization"), default)

    def _in_service(self, endpoints: list[Endpoint]) -> list[Endpoint]:
        """The endpoints outlier detection leaves in (never fewer than its floor)."""
        if self.registry.version != self._outliers_version:  # forget endpoints that are gone
            self._outliers_version = self.registry.version
            self.outliers.forget(
                ep for key in self.registry.services for ep in self.registry.endpoints(key)
            )
        ejected = self.outliers.ejected()
        if not ejected:
            return endpoints
        return picker.in_service(endpoints, ejected, self.settings.outlier_max_ejection_percent)

    def _failed(self, endpoint: Endpoint, service: ServiceInfo, why: str) -> None:
        """Count a failure against ``endpoint``; eject it when that makes enough in a row and
        its service keeps its floor."""
        endpoints = self.registry.endpoints(service.key)
        ejected = self.outliers.ejected()
        may_eject = picker.ejectable(
            len(endpoints),
            sum(1 for ep in endpoints if ep in ejected),
            self.settings.outlier_max_ejection_percent,
        )
        length = self.outliers.failure(endpoint, may_eject)
        if length is not None:
            self.metrics.ejections.labels(service.namespace, service.name).inc()
            log.warning(
                "replica %s:%s of %s/%s ejected for %gs after %d failures in a row (last: %s)",
                endpoint.address,
                endpoint.port,
                service.namespace,
                service.name,
                length,
                self.settings.outlier_consecutive_failures,
                why,
            )

    async def _wait_for_another(
        self, service: ServiceInfo, tried: set[Endpoint], deadline: float
    ) -> list[Endpoint]:
        """Ready endpoints of ``service`` not in ``tried``, waiting for one until ``deadline``
        (counted as held meanwhile); [] when none came."""
        gauge = self.metrics.held.labels(service.namespace, service.name)
        gauge.inc()
        try:
            while True:
                fresh = [ep for ep in self.registry.endpoints(service.key) if ep not in tried]
                left = deadline - time.monotonic()
                if fresh or left <= 0:
                    return fresh
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self.registry.wait_changed()
        finally:
            gauge.dec()

    async def _send_to(
        self,
        endpoint: Endpoint,
        service: ServiceInfo,
        path: str,
        headers: list[tuple[str, str]],
        payload: bytes,
        streamed: bool,
        send: Send,
        o: Outcome,
        labels: tuple[str, str],
    ) -> bool:
        """Forward to one replica; False when it cannot have started the request (the caller
        may try another), a GatewayError when it may have (never tried again)."""
        self.outstanding[endpoint] = self.outstanding.get(endpoint, 0) + 1
        self.metrics.outstanding.labels(*labels).inc()
        try:
            sent = time.monotonic()
            body = RequestBody(payload)
            try:
                response = await self.http.post(
                    self.url_for(endpoint) + path, data=body, headers=headers
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                kind = failure_kind(exc, body.handed_over, streamed)
                self._failed(endpoint, service, kind)
                where = f"replica {endpoint.address}:{endpoint.port}"
                if kind in RETRYABLE:
                    log.warning("%s failed before it started it (%s): %r", where, kind, exc)
                    return False
                if kind == TIMEOUT:
                    raise GatewayError(
                        504,
                        f"{where} did not answer in {self.settings.upstream_timeout_seconds:g}s",
                        "unavailable",
                        type="server_error",
                        code="upstream_timeout",
                    ) from exc
                raise GatewayError(
                    502,
                    f"{where} failed after the request was sent ({exc!r}); it may have run, so "
                    "it is not sent again",
                    "unavailable",
                    type="server_error",
                    code="upstream_error",
                ) from exc
            self.metrics.upstream_latency.labels(*labels).observe(time.monotonic() - sent)
            if response.status >= 500:
                self._failed(endpoint, service, f"status {response.status}")
            else:
                self.outliers.success(endpoint)
            finished = False
            try:
                o.status = response.status
                o.outcome = (
                    "ok"
                    if response.status < 400
                    else "upstream_4xx"
                    if response.status < 500
                    else "upstream_5xx"
                )
                out_headers = [
                    (k, v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP
                ]
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": out_headers,
                    }
                )
                try:
                    async for chunk in response.content.iter_any():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        o.answered = ends_stream(chunk[-32:])
                except (aiohttp.ClientError, TimeoutError) as exc:
                    # Started: never retried. The response is left unfinished, so the client's
                    # connection closes without the end of the body and it sees the break
                    # (unless it already has the whole answer: then only the end is missing).
                    o.outcome = "ok" if o.answered else "upstream_broken"
                    self._failed(endpoint, service, "broke mid-response")
                    log.warning(
                        "replica %s:%s broke mid-response: %r", endpoint.address, endpoint.port, exc
                    )
                    return True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                finished = True
                return True
            finally:
                if finished:
                    response.release()  # read to the end: the connection goes back to the pool
                else:
                    response.close()  # cancelled or broken: close it, the server sees it go
        finally:
            left = self.outstanding.get(endpoint, 1) - 1
            if left > 0:
                self.outstanding[endpoint] = left
            else:
                self.outstanding.pop(endpoint, None)
            self.metrics.outstanding.labels(*labels).dec()

    def load(self, endpoint: Endpoint) -> int:
        return self.outstanding.get(endpoint, 0) + self.others.get(endpoint, 0)

    def start_load_poll(self) -> None:
        if self.settings.load_poll_seconds > 0 and self._poller is None:
            self._poller = asyncio.create_task(self._poll_loads(), name="load-poll")

    async def _poll_loads(self) -> None:
        while True:
            await asyncio.sleep(self.settings.load_poll_seconds)
            endpoints = {
                ep for key in self.registry.services for ep in self.registry.endpoints(key)
            }
            await asyncio.gather(*(self._poll_one(ep) for ep in endpoints))
            for gone in set(self.others) - endpoints:
                del self.others[gone]

    async def _poll_one(self, endpoint: Endpoint) -> None:
        own = self.outstanding.get(endpoint, 0)
        timeout = aiohttp.ClientTimeout(total=max(0.5, self.settings.load_poll_seconds))
        try:
            async with self.http.get(self.url_for(endpoint) + "/metrics", timeout=timeout) as r:
                text = await r.text() if r.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError):
            return  # keep the last estimate; the pick still counts the gateway's own
        reported = picker.reported_load(text)
        if reported is not None:
            self.others[endpoint] = max(0, reported - own)

    # ---- picking a service, holding ----
    def _ready_choice(
        self, services: list[ServiceInfo]
    ) -> tuple[ServiceInfo | None, list[Endpoint]]:
        """A service by weight among those with a ready endpoint, and its endpoints."""
        ready = [(s, eps) for s in services if (eps := self.registry.endpoints(s.key))]
        if not ready:
            return None, []
        if len(ready) == 1:
            return ready[0]
        return picker.pick_weighted(ready, [s.weight for s, _ in ready], self.rng)

    async def _hold(
        self, model: str, services: list[ServiceInfo], o: Outcome
    ) -> tuple[ServiceInfo, list[Endpoint]]:
        """Wait for a ready replica, raising a service from zero; bounded in time and number.
        The request counts for the service it waits for, refused or not."""
        retry_after = self.settings.retry_after_seconds
        target = picker.pick_weighted(services, [s.weight for s in services], self.rng)
        o.service = target
        if self.held >= self.settings.max_held_requests:
            raise GatewayError(
                503,
                f"no ready replica for model '{model}' and {self.held} requests already wait "
                f"(max_held_requests {self.settings.max_held_requests}); retry later",
                "hold_full",
                type="server_error",
                code="hold_full",
                retry_after=retry_after,
            )
        gauge = self.metrics.held.labels(target.namespace, target.name)
        self.held += 1
        gauge.inc()
        started = time.monotonic()
        deadline = started + self.settings.hold_timeout_seconds
        try:
            while True:
                service, endpoints = self._ready_choice(self.registry.backends(model) or services)
                if service is not None:
                    return service, endpoints
                self._wake(self.registry.services.get(target.key, target))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GatewayError(
                        503,
                        f"no ready replica for model '{model}' within the hold time "
                        f"({self.settings.hold_timeout_seconds:g}s); retry later",
                        "hold_timeout",
                        type="server_error",
                        code="hold_timeout",
                        retry_after=retry_after,
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, SCALE_RETRY_S)):
                        await self.registry.wait_changed()
        finally:
            self.held -= 1
            gauge.dec()
            o.hold_s = time.monotonic() - started
            self.metrics.hold_time.labels(model).observe(o.hold_s)

    def _wake(self, service: ServiceInfo) -> None:
        """Raise an autoscaled service at zero replicas to one, once at a time per service."""
        if (
            self.scale_up is None
            or not self.settings.scale_from_zero
            or service.replicas > 0
            or not service.autoscaled
        ):
            return
        task = self._scaling.get(service.key)
        if task is not None and not task.done():
            return
        if time.monotonic() - self._scale_tried.get(service.key, -1e9) < SCALE_RETRY_S:
            return
        self._scale_tried[service.key] = time.monotonic()
        self._scaling[service.key] = asyncio.create_task(self._scale(service))

    async def _scale(self, service: ServiceInfo) -> bool:
        assert self.scale_up is not None
        try:
            raised = await self.scale_up(service.namespace, service.name)
        except Exception as exc:
            log.warning("could not scale %s/%s from zero: %s", service.namespace, service.name, exc)
            return False
        if raised:
            self.metrics.scale_ups.labels(service.namespace, service.name).inc()
            log.info("scaled %s/%s from zero to one replica", service.namespace, service.name)
        return raised

    async def close(self) -> None:
        tasks = [*self._scaling.values(), *([self._poller] if self._poller else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), as text."""
    value = next((v for k, v in scope["headers"] if k.lower() == name), None)
    return value.decode("latin-1") if value is not None else None


def _connection_tokens(scope: Scope) -> frozenset[bytes]:
    """Headers the client named in Connection: hop-by-hop for this request (RFC 9110 7.6.1)."""
    tokens = [v for k, v in scope["headers"] if k.lower() == b"connection"]
    if not tokens:
        return frozenset()
    return frozenset(t.strip().lower() for v in tokens for t in v.split(b",") if t.strip())


def _priority(value: Any, param: str) -> int:
    try:
        return parse_priority(value)
    except ValueError as exc:
        raise GatewayError(400, f"{param}: {exc}", "bad_request", param=param) from None


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise GatewayError(400, f"the request body is not JSON: {exc}", "bad_request") from exc
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object", "bad_request")
    return body


def _dump(body: dict[str, Any], changes: dict[str, Any]) -> bytes:
    try:
        return json.dumps({**body, **changes}).encode()
    except (ValueError, RecursionError) as exc:
        raise GatewayError(400, f"the body cannot be written again: {exc}", "bad_request") from exc


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GatewayError(
                413,
                f"the request body is over {limit} bytes",
                "bad_request",
                code="request_too_large",
            )
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _watch_disconnect(receive: Receive, disconnected: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            return


async def _send(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, *extra]})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send: Send, status: int, obj: Any) -> None:
    await _send(send, status, json.dumps(obj).encode())


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
