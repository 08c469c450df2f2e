"""Every Prometheus metric the gateway exports: the contract that the autoscaler (held
requests count as demand), the dashboard and the alerts read.

The InferenceService a series is about is in the labels ``target_namespace`` and
``inferenceservice``: ``namespace`` is taken by the gateway pod's own namespace at scrape time.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

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

HOLD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)

SERVICE = ("target_namespace", "inferenceservice")


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
        self.held = Gauge(
            REQUESTS_HELD,
            "Requests waiting for a ready replica of the service (demand for the autoscaler).",
            list(SERVICE),
            registry=r,
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
        self.retries = Counter(
            RETRIES,
            "Requests sent again to another replica after a connection was refused or reset "
            "before the first response byte.",
            list(SERVICE),
            registry=r,
        )
        self.upstream_latency = Histogram(
            UPSTREAM_LATENCY,
            "Time from sending a request to a replica to its response headers.",
            list(SERVICE),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.outstanding = Gauge(
            OUTSTANDING,
            "Requests forwarded to the service's replicas and not yet finished.",
            list(SERVICE),
            registry=r,
        )
        self.endpoints = Gauge(
            ENDPOINTS,
            "Ready endpoints of each InferenceService the gateway routes to.",
            list(SERVICE),
            registry=r,
        )
        self.scale_ups = Counter(
            SCALE_UPS,
            "Times the gateway raised a service from zero replicas to one.",
            list(SERVICE),
            registry=r,
        )

        self.ejections = Counter(
            EJECTIONS,
            "Times a replica of the service was ejected from picking by outlier detection "
            "(consecutive refused or broken connections, or 5xx answers).",
            list(SERVICE),
            registry=r,
        )
        self.ejected = Gauge(
            EJECTED,
            "Ready endpoints of the service ejected from picking now.",
            list(SERVICE),
            registry=r,
        )
        self.ignored_claims = Gauge(
            IGNORED_CLAIMS,
            "Model names the service claims (its name, servedModelNames) that another "
            "namespace owns: not routed to it.",
            list(SERVICE),
            registry=r,
        )

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
