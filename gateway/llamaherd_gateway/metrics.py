"""Every Prometheus metric the gateway exports: the contract that the autoscaler (held
requests count as demand), the dashboard and the alerts read.

The InferenceService a series is about is in the labels ``target_namespace`` and
``inferenceservice``: ``namespace`` is taken by the gateway pod's own namespace at scrape time.
"""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from llamaherd_server.metrics import ladder_buckets

disable_created_metrics()

# Names without the _total/_bucket suffixes that Prometheus adds to counters and histograms.
REQUESTS = "llamaherd_gateway_requests"
REQUESTS_HELD = "llamaherd_gateway_requests_held"
HOLD_TIME = "llamaherd_gateway_hold_seconds"
PICKS = "llamaherd_gateway_picks"
RETRIES = "llamaherd_gateway_retries"
UPSTREAM_LATENCY = "llamaherd_gateway_upstream_latency_seconds"
OUTSTANDING = "llamaherd_gateway_requests_outstanding"
ENDPOINTS = "llamaherd_gateway_ready_endpoints"
SCALE_UPS = "llamaherd_gateway_scale_from_zero"
EJECTIONS = "llamaherd_gateway_ejections"
EJECTED = "llamaherd_gateway_ejected_endpoints"
IGNORED_CLAIMS = "llamaherd_gateway_ignored_model_claims"

# ok: the replica answered 2xx; upstream_4xx / upstream_5xx: it answered an error;
# not_found: no such model; bad_request: the gateway could not read the request;
# hold_timeout / hold_full: no ready replica in time / too many held (503 + Retry-After);
# unavailable: every replica tried refused or reset the connection (502);
# cancelled: the client went away first; upstream_broken: the replica broke mid-response;
# unauthorized: the gateway's own API key check refused it; error: a fault of the gateway's own
# (500). The model label is '' unless the model is one the gateway serves: a client's made-up
# name never becomes a series.
OUTCOMES = (
    "ok",
    "upstream_4xx",
    "upstream_5xx",
    "not_found",
    "bad_request",
    "hold_timeout",
    "hold_full",
    "unavailable",
    "cancelled",
    "upstream_broken",
    "unauthorized",
    "error",
)

# Cut from the server's one bucket table (llamaherd_server.metrics.BUCKET_LADDER).
HOLD_BUCKETS = ladder_buckets(0.01, 600.0, without=(0.025,))
LATENCY_BUCKETS = ladder_buckets(0.001, 120.0, without=(20.0,))

SERVICE = ("target_namespace", "inferenceservice")

MetricT = TypeVar("MetricT", Counter, Gauge)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            REQUESTS,
            "Requests by model, the InferenceService that served them ('' when none) and outcome.",
            ["model", *SERVICE, "outcome"],
            registry=r,
        )
        self.held = self._per_service(
            Gauge,
            REQUESTS_HELD,
            "Requests waiting for a ready replica of the service (demand for the autoscaler).",
        )
        self.hold_time = Histogram(
            HOLD_TIME,
            "Time a request waited for a ready replica, whatever came of it.",
            ["model"],
            buckets=HOLD_BUCKETS,
            registry=r,
        )
        self.picks = Counter(
            PICKS,
            "Replica picks by reason: affinity (the prompt's prefix replica) or least_loaded.",
            [*SERVICE, "reason"],
            registry=r,
        )
        self.retries = self._per_service(
            Counter,
            RETRIES,
            "Requests sent again to another replica after a connection was refused or reset "
            "before the first response byte.",
        )
        self.upstream_latency = Histogram(
            UPSTREAM_LATENCY,
            "Time from sending a request to a replica to its response headers.",
            list(SERVICE),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.outstanding = self._per_service(
            Gauge, OUTSTANDING, "Requests forwarded to the service's replicas and not yet finished."
        )
        self.endpoints = self._per_service(
            Gauge, ENDPOINTS, "Ready endpoints of each InferenceService the gateway routes to."
        )
        self.scale_ups = self._per_service(
            Counter, SCALE_UPS, "Times the gateway raised a service from zero replicas to one."
        )
        self.ejections = self._per_service(
            Counter,
            EJECTIONS,
            "Times a replica of the service was ejected from picking by outlier detection "
            "(consecutive refused or broken connections, or 5xx answers).",
        )
        self.ejected = self._per_service(
            Gauge, EJECTED, "Ready endpoints of the service ejected from picking now."
        )
        self.ignored_claims = self._per_service(
            Gauge,
            IGNORED_CLAIMS,
            "Model names the service claims (its name, servedModelNames) that another "
            "namespace owns: not routed to it.",
        )

    def _per_service(self, kind: type[MetricT], name: str, documentation: str) -> MetricT:
        """A gauge or counter labelled by the InferenceService alone."""
        return kind(name, documentation, list(SERVICE), registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def exported_names() -> set[str]:
    """Every series name a scrape of the gateway can show (for the contract tests)."""
    from prometheus_client.parser import text_string_to_metric_families

    metrics = GatewayMetrics()
    for outcome in OUTCOMES:
        metrics.requests.labels("m", "ns", "svc", outcome)
    metrics.held.labels("ns", "svc")
    metrics.hold_time.labels("m")
    metrics.picks.labels("ns", "svc", "affinity")
    metrics.retries.labels("ns", "svc")
    metrics.upstream_latency.labels("ns", "svc")
    metrics.outstanding.labels("ns", "svc")
    metrics.endpoints.labels("ns", "svc")
    metrics.scale_ups.labels("ns", "svc")
    metrics.ejections.labels("ns", "svc")
    metrics.ejected.labels("ns", "svc")
    metrics.ignored_claims.labels("ns", "svc")
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics.render().decode()):
        names.update(sample.name for sample in family.samples)
    return names
