"""Reading a service's signals back from Prometheus (HTTP API, PromQL over httpx).

The metric names come from the server's own contract module, so a renamed metric breaks here
and in the contract tests, not silently in production.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import httpx

from llamaherd_server import metrics as names

from .policy import Metrics

DEFAULT_SELECTOR = 'namespace="{namespace}",service="{name}"'
GATEWAY_REQUESTS_HELD = "llamaherd_gateway_requests_held"  # llamaherd_gateway.metrics


class MetricsUnavailable(Exception):
    """Prometheus failed, or has no fresh series for the service."""


@dataclass(frozen=True)
class Queries:
    waiting: str
    running: str
    ready: str
    freshness: str
    latency_p95: str
    ttft_p95: str
    recent: str = ""

    @classmethod
    def for_selector(cls, selector: str, window_s: int) -> Queries:
        sel = "{" + selector + "}"
        window = f"{max(1, int(window_s))}s"

        def p95(histogram: str) -> str:
            return (
                f"histogram_quantile(0.95, sum by (le) (rate({histogram}_bucket{sel}[{window}])))"
            )

        return cls(
            waiting=f"sum({names.REQUESTS_WAITING}{sel})",
            running=f"sum({names.REQUESTS_RUNNING}{sel})",
            ready=f"count({names.READY}{sel} == 1)",
            freshness=f"max(timestamp({names.REQUESTS_RUNNING}{sel}))",
            latency_p95=p95(names.REQUEST_LATENCY),
            ttft_p95=p95(names.TIME_TO_FIRST_TOKEN),
            recent=f"sum(increase({names.REQUESTS}_total{sel}[{window}]))",
        )

    def all(self) -> list[str]:
        return [
            self.waiting,
            self.running,
            self.ready,
            self.freshness,
            self.latency_p95,
            self.ttft_p95,
            self.recent,
        ]


def prometheus_url_allowed(url: str, default_url: str, allowed: list[str]) -> bool:
    """Whether the operator may send queries to ``url`` (server-side request forgery guard).

    The operator's own Prometheus is always allowed. An entry of ``allowed`` matches the same
    URL (a trailing ``/`` aside) and every URL below its path; an entry that ends in ``/``
    matches only below it. Matching stops at a path boundary, so an entry
    ``http://prom:9090`` does not allow ``http://prom:9090.evil.example`` or
    ``http://prom:9090@evil.example``.
    """
    for entry in [default_url, *allowed]:
        if not entry:
            continue
        if entry.endswith("/"):
            if url.startswith(entry):
                return True
            continue
        if url.rstrip("/") == entry or url.startswith(entry + "/"):
            return True
    return False


def selector_for(template: str, namespace: str, name: str) -> str:
    return template.format(namespace=namespace, name=name)


def held_query(namespace: str, name: str) -> str:
    """The requests the gateways hold for one InferenceService (the gateway's metric
    ``llamaherd_gateway_requests_held``, labelled with the service it waits for)."""
    return (
        f'sum({GATEWAY_REQUESTS_HELD}{{target_namespace="{namespace}",inferenceservice="{name}"}})'
    )


class PrometheusClient:
    def __init__(self, http: httpx.AsyncClient, timeout_s: float = 5.0) -> None:
        self.http = http
        self.timeout_s = timeout_s

    async def scalar(self, base_url: str, promql: str) -> float | None:
        """The value of a single-series instant query; None for an empty result."""
        url = base_url.rstrip("/") + "/api/v1/query"
        try:
            r = await self.http.get(url, params={"query": promql}, timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise MetricsUnavailable(
                f"prometheus at {base_url} unreachable: {type(exc).__name__}: {exc}"
            ) from exc
        if r.status_code != 200:
            raise MetricsUnavailable(f"prometheus answered {r.status_code}: {r.text[:200]}")
        body = r.json()
        if body.get("status") != "success":
            raise MetricsUnavailable(f"prometheus query failed: {body.get('error')}")
        result = body["data"]["result"]
        if not result:
            return None
        return float(result[0]["value"][1])

    async def service_metrics(
        self,
        base_url: str,
        queries: Queries,
        *,
        staleness_s: float = 60.0,
        now: float | None = None,
    ) -> Metrics:
        values = await asyncio.gather(*(self.scalar(base_url, q) for q in queries.all()))
        waiting, running, ready, fresh, latency, ttft, recent = values
        if running is None or fresh is None:
            raise MetricsUnavailable("no series yet for the service's pods")
        age = (time.time() if now is None else now) - fresh
        if age > staleness_s:
            raise MetricsUnavailable(f"metrics are stale: last sample {age:.0f}s ago")
        return Metrics(
            waiting=waiting or 0.0,  # no priority has had a waiting request yet
            running=running,
            ready=int(ready or 0),
            latency_p95_s=_finite(latency),
            ttft_p95_s=_finite(ttft),
            recent=_finite(recent) or 0.0,
        )

    async def held_requests(self, base_url: str, query: str) -> float:
        """Requests the gateway holds for a service (0 when no gateway reports any)."""
        return _finite(await self.scalar(base_url, query)) or 0.0


def _finite(value: float | None) -> float | None:
    """histogram_quantile gives NaN when no request finished in the window."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return value
