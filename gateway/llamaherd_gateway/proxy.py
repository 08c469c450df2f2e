"""The gateway's HTTP side, a plain ASGI app (no framework between a byte from a replica and the
client): routes by the ``model`` field, holds requests for a service with no ready replica,
picks a replica (:mod:`llamaherd_gateway.picker`), retries only where the replica cannot have
started the request, ejects replicas that keep failing (:mod:`llamaherd_gateway.outliers`), and
streams the answer through unchanged (SSE included). What to do with a request (which service
and replica, hold or refuse, try again or not) is decided by the pure functions of
:mod:`llamaherd_gateway.routing`; this module gathers their inputs and does the I/O.

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

from llamaherd_gateway import picker, routing
from llamaherd_gateway.keys import KeyFile, PriorityLimits
from llamaherd_gateway.logs import log_value
from llamaherd_gateway.metrics import GatewayMetrics
from llamaherd_gateway.outliers import OutlierDetector
from llamaherd_gateway.registry import Endpoint, Key, Registry, ServiceInfo
from llamaherd_gateway.routing import Chosen, Hold, Refuse
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


def failure_kind(exc: BaseException, handed_over: bool, streamed: bool) -> str:
    """What a failure before the response headers says about the request
    (:func:`llamaherd_gateway.routing.classify_failure`, from what aiohttp raised)."""
    return routing.classify_failure(
        connected=not isinstance(
            exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError
        ),
        handed_over=handed_over,
        timed_out=isinstance(exc, TimeoutError),  # aiohttp's ServerTimeoutError is one too
        closed=isinstance(exc, aiohttp.ClientConnectionError),
        streamed=streamed,
    )


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

    @classmethod
    def refusing(cls, refusal: Refuse) -> GatewayError:
        return cls(
            refusal.status,
            refusal.message,
            refusal.outcome,
            type=refusal.type,
            code=refusal.code,
            param=refusal.param,
            retry_after=refusal.retry_after,
        )

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return json.dumps({"error": error}).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", str(self.retry_after).encode())] if self.retry_after else []


@dataclass(frozen=True)
class UpstreamRequest:
    """What goes to a replica, whichever replica it is."""

    path: str
    headers: list[tuple[str, str]]
    payload: bytes
    streamed: bool


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
        self.hold_limits = routing.HoldLimits(
            settings.max_held_requests, settings.hold_timeout_seconds, settings.retry_after_seconds
        )
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
                outcome.outcome = routing.unfinished_outcome(outcome.answered, "cancelled")
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if task.cancelled():  # also when the client left while sending the body
                outcome.outcome = routing.unfinished_outcome(outcome.answered, "cancelled")
        except GatewayError as err:
            outcome.status, outcome.outcome = err.status, err.outcome
            if not started_response:
                await _send(send, err.status, err.body(), extra=err.headers())
        except OSError:  # the client's socket broke while we wrote to it
            outcome.outcome = routing.unfinished_outcome(outcome.answered, "cancelled")
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
        named = body.get("model")
        model = o.model = named if isinstance(named, str) else ""
        services = self.registry.backends(model) if model else []
        refusal = routing.model_refusal(model, services)
        if refusal is not None:
            raise GatewayError.refusing(refusal)
        o.known = True
        path = scope["path"]
        headers, changes = self._upstream_headers(scope, body)
        streamed = body.get("stream") is True
        key = picker.affinity_key(path, body, self.settings.affinity_prefix_chars)
        chosen = self._choose(services) or await self._hold(model, services, o)
        o.service = chosen.service
        if model != chosen.service.name:  # the server answers only to its own name
            changes["model"] = chosen.service.name
        payload = raw
        if changes:
            payload = await asyncio.to_thread(_dump, body, changes) if big else _dump(body, changes)
        await self._try_replicas(
            chosen, key, UpstreamRequest(path, headers, payload, streamed), send, o
        )

    async def _try_replicas(
        self, chosen: Chosen, key: str, request: UpstreamRequest, send: Send, o: Outcome
    ) -> None:
        """Send to one replica after another while they cannot have started the request, at
        most ``retries`` times more than once (:func:`llamaherd_gateway.routing.attempt`)."""
        service = chosen.service
        labels = (service.namespace, service.name)
        tried: set[Endpoint] = set()
        until = time.monotonic() + self.settings.hold_timeout_seconds
        for attempt in range(self.settings.retries + 1):
            decision = self._attempt(chosen, key, tried, until)
            while isinstance(decision, Hold):
                # Every ready replica refused: the endpoints are behind (a pod died). Wait, as a
                # hold does and within its bound, for one not tried yet.
                fresh = await self._wait_for_another(service, tried, decision.until)
                decision = self._attempt(chosen, key, tried, until, fresh)
            if isinstance(decision, Refuse):
                raise GatewayError.refusing(decision)
            o.endpoint, o.reason = decision.endpoint, decision.reason
            self.metrics.picks.labels(*labels, decision.reason).inc()
            if attempt:
                o.retries += 1
                self.metrics.retries.labels(*labels).inc()
            tried.add(decision.endpoint)
            if await self._send_to(decision.endpoint, service, request, send, o):
                return
        raise GatewayError.refusing(routing.no_replica_accepted(service, len(tried)))

    def _attempt(
        self,
        chosen: Chosen,
        key: str,
        tried: set[Endpoint],
        until: float,
        fresh: list[Endpoint] | None = None,
    ) -> routing.Decision:
        """The next try, over the endpoints not tried yet (``fresh`` after a wait for one)."""
        if fresh is None:
            current = self.registry.endpoints(chosen.service.key)
            pct = self.settings.outlier_max_ejection_percent
            fresh = routing.candidates(chosen.endpoints, current, tried, self._ejected(), pct)
        loads = {ep: self.load(ep) + self.outliers.failures(ep) for ep in fresh}
        factor = self.settings.affinity_load_factor
        now = time.monotonic()
        return routing.attempt(
            key, chosen.service, fresh, tried, loads, factor, now, until, self.rng
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

    def _ejected(self) -> dict[Endpoint, float]:
        """The endpoints outlier detection holds out now (each with when it was ejected); the
        state of endpoints that are gone is forgotten first."""
        if self.registry.version != self._outliers_version:
            self._outliers_version = self.registry.version
            self.outliers.forget(
                ep for key in self.registry.services for ep in self.registry.endpoints(key)
            )
        return self.outliers.ejected()

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
                fresh = routing.untried(self.registry.endpoints(service.key), tried)
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
        request: UpstreamRequest,
        send: Send,
        o: Outcome,
    ) -> bool:
        """Forward to one replica; False when it cannot have started the request (the caller
        may try another), a GatewayError when it may have (never tried again)."""
        labels = (service.namespace, service.name)
        self.outstanding[endpoint] = self.outstanding.get(endpoint, 0) + 1
        self.metrics.outstanding.labels(*labels).inc()
        try:
            sent = time.monotonic()
            body = RequestBody(request.payload)
            try:
                response = await self.http.post(
                    self.url_for(endpoint) + request.path, data=body, headers=request.headers
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                kind = failure_kind(exc, body.handed_over, request.streamed)
                return self._unanswered(endpoint, service, kind, exc)
            self.metrics.upstream_latency.labels(*labels).observe(time.monotonic() - sent)
            if routing.counts_as_failure(response.status):
                self._failed(endpoint, service, f"status {response.status}")
            else:
                self.outliers.success(endpoint)
            await self._relay(response, endpoint, service, send, o)
            return True
        finally:
            left = self.outstanding.get(endpoint, 1) - 1
            if left > 0:
                self.outstanding[endpoint] = left
            else:
                self.outstanding.pop(endpoint, None)
            self.metrics.outstanding.labels(*labels).dec()

    def _unanswered(
        self, endpoint: Endpoint, service: ServiceInfo, kind: str, exc: BaseException
    ) -> bool:
        """A try that failed (``kind``) before the response headers: False when another
        replica may be tried, else the GatewayError to answer with."""
        self._failed(endpoint, service, kind)
        where = f"replica {endpoint.address}:{endpoint.port}"
        timeout_s = self.settings.upstream_timeout_seconds
        refusal = routing.after_failure(kind, where, repr(exc), timeout_s)
        if refusal is None:
            log.warning("%s failed before it started it (%s): %r", where, kind, exc)
            return False
        raise GatewayError.refusing(refusal) from exc

    async def _relay(
        self,
        response: aiohttp.ClientResponse,
        endpoint: Endpoint,
        service: ServiceInfo,
        send: Send,
        o: Outcome,
    ) -> None:
        """Pass the replica's answer on as it comes. Once started it is never tried again."""
        finished = False
        try:
            o.status = response.status
            o.outcome = routing.answer_outcome(response.status)
            out_headers = [(k, v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP]
            await send(
                {"type": "http.response.start", "status": response.status, "headers": out_headers}
            )
            try:
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    o.answered = ends_stream(chunk[-32:])
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Started: never retried. The response is left unfinished, so the client's
                # connection closes without the end of the body and it sees the break
                # (unless it already has the whole answer: then only the end is missing).
                o.outcome = routing.unfinished_outcome(o.answered, "upstream_broken")
                self._failed(endpoint, service, "broke mid-response")
                log.warning(
                    "replica %s:%s broke mid-response: %r", endpoint.address, endpoint.port, exc
                )
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            finished = True
        finally:
            if finished:
                response.release()  # read to the end: the connection goes back to the pool
            else:
                response.close()  # cancelled or broken: close it, the server sees it go

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
    def _choose(self, services: list[ServiceInfo]) -> Chosen | None:
        """A service by weight among those with a ready endpoint, and its endpoints."""
        ready = {s.key: self.registry.endpoints(s.key) for s in services}
        return routing.choose_service(services, ready, self.rng)

    async def _hold(self, model: str, services: list[ServiceInfo], o: Outcome) -> Chosen:
        """Wait for a ready replica, raising a service from zero; bounded in time and number.
        The request counts for the service it waits for, refused or not."""
        target = o.service = routing.hold_target(services, self.rng)
        started = time.monotonic()
        hold = routing.admit_hold(model, self.held, self.hold_limits, started)
        if isinstance(hold, Refuse):
            raise GatewayError.refusing(hold)
        gauge = self.metrics.held.labels(target.namespace, target.name)
        self.held += 1
        gauge.inc()
        try:
            while True:
                chosen = self._choose(self.registry.backends(model) or services)
                if chosen is not None:
                    return chosen
                self._wake(self.registry.services.get(target.key, target))
                wait = routing.keep_holding(model, hold, self.hold_limits, time.monotonic())
                if isinstance(wait, Refuse):
                    raise GatewayError.refusing(wait)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self.registry.wait_changed()
        finally:
            self.held -= 1
            gauge.dec()
            o.hold_s = time.monotonic() - started
            self.metrics.hold_time.labels(model).observe(o.hold_s)

    def _wake(self, service: ServiceInfo) -> None:
        """Raise an autoscaled service at zero replicas to one, once at a time per service."""
        task = self._scaling.get(service.key)
        now = time.monotonic()
        if not routing.should_wake(
            service,
            enabled=self.scale_up is not None and self.settings.scale_from_zero,
            scaling=task is not None and not task.done(),
            last_tried=self._scale_tried.get(service.key),
            now=now,
        ):
            return
        self._scale_tried[service.key] = now
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
