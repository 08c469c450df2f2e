"""The autoscaler: a kopf timer per InferenceService with ``spec.autoscaling.enabled``.

Every ``autoscale_interval_seconds`` it reads the service's signals from Prometheus
(:mod:`llamaherd_operator.prom`), asks the pure policy (:mod:`llamaherd_operator.policy`) for
the desired replicas, and, when they differ from ``spec.replicas``, writes them through the
InferenceService's **scale subresource**. The reconcile handler then applies the Deployment
with that count: the operator is the one owner of the replica count, and the Deployment
follows the InferenceService.

``kubectl scale inferenceservice NAME --replicas=N``:
- autoscaling off: ``spec.replicas`` rules; the Deployment follows it;
- autoscaling on: N is taken as the current size (clamped to [minReplicas, maxReplicas]); the
  next period may move it again from the metrics, as with an HPA.

What it writes to ``.status`` (field manager ``llamaherd-autoscaler``, so it never fights the
reconcile over fields): ``queueDepth``, ``latencyP95Ms``, ``lastScaleTime``, the last 10
``scalingDecisions`` that changed the size, and the ``ScalingActive`` condition. Every change of
size, and every change of the reason it holds, is a Kubernetes Event with the numbers.

kopf puts a finalizer on objects that have a timer (to stop it cleanly), so an autoscaled
InferenceService needs the operator running to be deleted; docs/autoscaling.md says how to
remove it by hand after an uninstall.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
import kopf
from lightkube import AsyncClient
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.types import PatchType

from llamaherd_operator import names
from llamaherd_operator.kube import InferenceService
from llamaherd_operator.metrics import OperatorMetrics
from llamaherd_operator.policy import Decision, History, ScalingSpec, decide
from llamaherd_operator.prom import MetricsUnavailable, PrometheusClient, Queries, selector_for

log = logging.getLogger("llamaherd_operator.autoscaler")

FIELD_MANAGER = "llamaherd-autoscaler"
SCALING_ACTIVE = "ScalingActive"
MAX_DECISIONS = 10

Key = tuple[str, str]


@dataclass
class AutoscalerState:
    prometheus: PrometheusClient
    metrics: OperatorMetrics
    prometheus_url: str
    selector_template: str
    staleness_s: float
    histories: dict[Key, History] = field(default_factory=dict)
    last_reason: dict[Key, str] = field(default_factory=dict)


def forget(state: AutoscalerState, key: Key) -> None:
    state.histories.pop(key, None)
    state.last_reason.pop(key, None)
    state.metrics.forget(*key)


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def autoscaling_enabled(spec: Any) -> bool:
    return bool((spec.get("autoscaling") or {}).get("enabled"))


async def autoscale_once(body: Any, state: AutoscalerState, client: AsyncClient) -> Decision | None:
    """One period for one InferenceService: measure, decide, scale, report."""
    meta, spec = body["metadata"], body["spec"]
    key: Key = (meta["namespace"], meta["name"])
    if not autoscaling_enabled(spec):
        forget(state, key)
        return None
    scaling = ScalingSpec.from_resource(spec)
    current = int(spec.get("replicas", 1))
    auto = spec.get("autoscaling") or {}
    url = auto.get("prometheusUrl") or state.prometheus_url
    queries = Queries.for_selector(
        selector_for(state.selector_template, *key), int(auto.get("metricsWindowSeconds", 60))
    )
    started = time.perf_counter()
    error = "no metrics"
    try:
        signals = await state.prometheus.service_metrics(
            url, queries, staleness_s=state.staleness_s
        )
    except MetricsUnavailable as exc:
        signals, error = None, str(exc)
        state.metrics.query_errors.inc()
    finally:
        state.metrics.query_duration.observe(time.perf_counter() - started)
    history = state.histories.setdefault(key, History())
    decision = decide(
        signals, current, time.monotonic(), scaling, history, unavailable_reason=error
    )
    state.metrics.decisions.labels(direction=decision.direction).inc()
    labels = {"namespace": key[0], "inferenceservice": key[1]}
    state.metrics.desired_replicas.labels(**labels).set(decision.desired)
    state.metrics.min_replicas.labels(**labels).set(scaling.min_replicas)
    state.metrics.max_replicas.labels(**labels).set(scaling.max_replicas)

    if decision.desired != current:
        await client.patch(
            InferenceService.Scale,
            key[1],
            {"spec": {"replicas": decision.desired}},
            namespace=key[0],
            patch_type=PatchType.MERGE,
        )
        log.info("%s/%s scaled %d -> %d: %s", *key, current, decision.desired, decision.message)
    changed_reason = state.last_reason.get(key) != decision.reason
    state.last_reason[key] = decision.reason
    if decision.desired != current or changed_reason:
        kopf.event(
            cast(kopf.Body, body),
            type="Normal" if decision.scaling_active else "Warning",
            reason=decision.reason,
            message=decision.message,
        )
    await _write_status(client, body, decision, signals)
    return decision


async def _write_status(client: AsyncClient, body: Any, decision: Decision, signals: Any) -> None:
    meta = body["metadata"]
    old = body.get("status") or {}
    now = _now_iso()
    status: dict[str, Any] = {}
    if signals is not None:
        status["queueDepth"] = float(signals.waiting)
        if signals.latency_p95_s is not None:
            status["latencyP95Ms"] = round(signals.latency_p95_s * 1000, 1)
        elif "latencyP95Ms" in old:
            status["latencyP95Ms"] = old["latencyP95Ms"]
    elif "queueDepth" in old:
        status["queueDepth"] = old["queueDepth"]
    decisions = list(old.get("scalingDecisions") or [])
    if decision.desired != decision.current:
        status["lastScaleTime"] = now
        decisions.append(
            {
                "time": now,
                "from": decision.current,
                "to": decision.desired,
                "reason": decision.reason,
                "message": decision.message[:1000],
            }
        )
    elif "lastScaleTime" in old:
        status["lastScaleTime"] = old["lastScaleTime"]
    if decisions:
        status["scalingDecisions"] = decisions[-MAX_DECISIONS:]
    active = "True" if decision.scaling_active else "False"
    previous = next(
        (c for c in old.get("conditions") or [] if c.get("type") == SCALING_ACTIVE), None
    )
    status["conditions"] = [
        {
            "type": SCALING_ACTIVE,
            "status": active,
            "reason": decision.reason,
            "message": decision.message[:1000],
            "lastTransitionTime": previous["lastTransitionTime"]
            if previous and previous.get("status") == active and previous.get("lastTransitionTime")
            else now,
            "observedGeneration": meta.get("generation"),
        }
    ]
    obj: Any = InferenceService.Status(
        apiVersion=names.API_VERSION,
        kind=names.KIND,
        metadata=ObjectMeta(name=meta["name"], namespace=meta["namespace"]),
        status=status,
    )
    await client.apply(
        obj, meta["name"], namespace=meta["namespace"], field_manager=FIELD_MANAGER, force=True
    )


def register(registry: kopf.OperatorRegistry, settings: Any) -> None:
    """The timer, its shared state, and the operator's /metrics endpoint."""
    resource = (names.GROUP, names.VERSION, names.PLURAL)
    holder: dict[str, Any] = {}

    @kopf.on.startup(registry=registry)
    async def start_autoscaler(memo: kopf.Memo, **_: Any) -> None:
        metrics = OperatorMetrics()
        memo.operator_metrics = metrics  # the reconcile handler records its duration here
        if settings.metrics_port:
            metrics.serve(settings.metrics_host, settings.metrics_port)
        holder["http"] = httpx.AsyncClient()
        holder["client"] = AsyncClient(field_manager=FIELD_MANAGER)
        holder["state"] = AutoscalerState(
            prometheus=PrometheusClient(holder["http"], settings.prometheus_timeout_seconds),
            metrics=metrics,
            prometheus_url=settings.prometheus_url,
            selector_template=settings.metrics_selector,
            staleness_s=settings.metrics_staleness_seconds,
        )

    @kopf.on.cleanup(registry=registry)
    async def stop_autoscaler(**_: Any) -> None:
        if "http" in holder:
            await holder["http"].aclose()
            await holder["client"].close()

    @kopf.timer(
        *resource,
        id="autoscale",
        interval=settings.autoscale_interval_seconds,
        initial_delay=settings.autoscale_interval_seconds,
        idle=None,
        when=lambda spec, **_: autoscaling_enabled(spec),
        registry=registry,
    )
    async def autoscale(body: kopf.Body, logger: Any, **_: Any) -> None:
        state: AutoscalerState = holder["state"]
        started = time.perf_counter()
        try:
            await autoscale_once(body, state, holder["client"])
        except Exception as exc:  # the next period tries again; say why now
            state.metrics.errors.inc()
            logger.warning(
                "autoscaling %s/%s failed: %s",
                body["metadata"]["namespace"],
                body["metadata"]["name"],
                exc,
            )
        finally:
            state.metrics.autoscale_duration.observe(time.perf_counter() - started)
