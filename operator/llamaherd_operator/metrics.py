"""The operator's own Prometheus metrics (served on ``metrics_port``)."""

from __future__ import annotations

import contextlib

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

from llamaherd_server.metrics import ladder_buckets

disable_created_metrics()

SCALING_DECISIONS = "llamaherd_operator_scaling_decisions"
PROMETHEUS_QUERY_ERRORS = "llamaherd_operator_prometheus_query_errors"
PROMETHEUS_QUERY_DURATION = "llamaherd_operator_prometheus_query_duration_seconds"
AUTOSCALE_DURATION = "llamaherd_operator_autoscale_duration_seconds"
AUTOSCALE_ERRORS = "llamaherd_operator_autoscale_errors"
RECONCILE_DURATION = "llamaherd_operator_reconcile_duration_seconds"
DESIRED_REPLICAS = "llamaherd_operator_desired_replicas"
MIN_REPLICAS = "llamaherd_operator_min_replicas"
MAX_REPLICAS = "llamaherd_operator_max_replicas"

# Cut from the server's one bucket table (llamaherd_server.metrics.BUCKET_LADDER).
DURATION_BUCKETS = ladder_buckets(0.005, 30.0, without=(20.0,))
PER_SERVICE = ("namespace", "inferenceservice")


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.decisions = Counter(
            SCALING_DECISIONS, "Autoscaling decisions by direction.", ["direction"], registry=r
        )
        for direction in ("up", "down", "none"):
            self.decisions.labels(direction=direction)
        self.query_errors = Counter(
            PROMETHEUS_QUERY_ERRORS,
            "Prometheus queries that failed or found no fresh data.",
            registry=r,
        )
        self.query_duration = self._duration(
            PROMETHEUS_QUERY_DURATION, "Time to read one service's signals from Prometheus."
        )
        self.autoscale_duration = self._duration(
            AUTOSCALE_DURATION, "Time of one autoscaling period of one service."
        )
        self.errors = Counter(AUTOSCALE_ERRORS, "Autoscaling periods that failed.", registry=r)
        self.reconcile_duration = self._duration(
            RECONCILE_DURATION, "Time of one reconcile of one InferenceService."
        )
        self.desired_replicas = self._per_service(
            DESIRED_REPLICAS, "Replicas the autoscaler wants, by InferenceService."
        )
        self.min_replicas = self._per_service(
            MIN_REPLICAS, "spec.autoscaling.minReplicas, by service."
        )
        self.max_replicas = self._per_service(
            MAX_REPLICAS, "spec.autoscaling.maxReplicas, by service."
        )

    def _duration(self, name: str, documentation: str) -> Histogram:
        return Histogram(name, documentation, buckets=DURATION_BUCKETS, registry=self.registry)

    def _per_service(self, name: str, documentation: str) -> Gauge:
        return Gauge(name, documentation, list(PER_SERVICE), registry=self.registry)

    def forget(self, namespace: str, name: str) -> None:
        """Drop a service's series (it was deleted or stopped autoscaling)."""
        for gauge in (self.desired_replicas, self.min_replicas, self.max_replicas):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, name)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)


def exported_names() -> set[str]:
    names: set[str] = set()
    for metric in OperatorMetrics().registry.collect():
        names.add(metric.name)
        names.update(sample.name for sample in metric.samples)
    return names
