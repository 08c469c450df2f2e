"""The autoscaler: one operator-wide loop over the InferenceServices with autoscaling enabled.

Every ``autoscale_interval_seconds`` it takes the services from the operator's kopf index, and
for each: reads its signals from Prometheus (:mod:`llamaherd_operator.prom`), asks the pure
policy (:mod:`llamaherd_operator.policy`) for the desired replicas, and, when they differ from
``spec.replicas``, writes them through the InferenceService's **scale subresource**. The
reconcile then applies the Deployment with that count: the Deployment follows the
InferenceService.

A scale write never overwrites a newer count: the decision is made on the InferenceService as
read from the API server just before (``spec.replicas``, its spec and status), and the write
carries that read's ``resourceVersion``. A 409 Conflict (the gateway raised it from zero, a
person ran ``kubectl scale``, the spec changed) means: read it again and decide again, at most
``SCALE_ATTEMPTS`` times a period, then leave it to the next period. The policy's history is
updated only by the decision that was used.

``kubectl scale inferenceservice NAME --replicas=N``:
- autoscaling off: ``spec.replicas`` rules; the Deployment follows it;
- autoscaling on: N is taken as the current size (clamped to [minReplicas, maxReplicas]); the
  next period may move it again from the metrics, as with an HPA.

It holds (``ScalingActive`` False, no replica written) when:
- a HorizontalPodAutoscaler in the namespace targets the InferenceService or its Deployment
  (``ConflictingAutoscaler``): two owners of the replica count would fight;
- ``spec.autoscaling.prometheusUrl`` is not allowed by the operator's
  ``allowed_prometheus_urls`` (``PrometheusURLNotAllowed``): no request goes to it.

What it writes to ``.status`` (field manager ``llamaherd-autoscaler``, so it never fights the
reconcile over fields), as built by the pure :func:`llamaherd_operator.status.autoscaler_status`:
``queueDepth``, ``latencyP95Ms``, ``lastScaleTime``, the last 10 ``scalingDecisions`` that
changed the size, and the ``ScalingActive`` condition. Every change of size, and every change
of the reason it holds, is a Kubernetes Event with the numbers. Everything it reads or writes in
the cluster goes through :class:`llamaherd_operator.kube.Kube`.

No per-object kopf timer: those make kopf put a finalizer on every autoscaled service, and then
deleting one needs the operator running.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import kopf

from llamaherd_operator.handlers import indexed
from llamaherd_operator.kube import Kube, KubeError, status_code
from llamaherd_operator.metrics import OperatorMetrics
from llamaherd_operator.policy import (
    Decision,
    History,
    Metrics,
    ScalingSpec,
    conflicting_autoscalers,
    decide,
)
from llamaherd_operator.prom import (
    MetricsUnavailable,
    PrometheusClient,
    Queries,
    held_query,
    prometheus_url_allowed,
    selector_for,
)
from llamaherd_operator.status import autoscaler_status

log = logging.getLogger("llamaherd_operator.autoscaler")

FIELD_MANAGER = "llamaherd-autoscaler"
CONFLICTING_AUTOSCALER = "ConflictingAutoscaler"
PROMETHEUS_URL_NOT_ALLOWED = "PrometheusURLNotAllowed"
CONCURRENCY = 10  # services sized at the same time
SCALE_ATTEMPTS = 3  # reads, decisions and scale writes per period when the object keeps changing

Key = tuple[str, str]


@dataclass
class AutoscalerState:
    prometheus: PrometheusClient
    metrics: OperatorMetrics
    prometheus_url: str
    selector_template: str
    staleness_s: float
    allowed_urls: list[str] = field(default_factory=list)
    histories: dict[Key, History] = field(default_factory=dict)
    last_reason: dict[Key, str] = field(default_factory=dict)
    hpa_warned: set[str] = field(default_factory=set)


def forget(state: AutoscalerState, key: Key) -> None:
    state.histories.pop(key, None)
    state.last_reason.pop(key, None)
    state.metrics.forget(*key)


def autoscaling_enabled(spec: Any) -> bool:
    return bool((spec.get("autoscaling") or {}).get("enabled"))


def hold(current: int, reason: str, message: str) -> Decision:
    """Keep the current size and say why scaling is not active."""
    return Decision(current, current, reason, message, scaling_active=False)


def precheck(
    body: Mapping[str, Any], state: AutoscalerState, hpas: list[Mapping[str, Any]]
) -> Decision | None:
    """A reason to hold before any query is sent: another autoscaler, a URL not allowed."""
    meta, spec = body["metadata"], body["spec"]
    current = int(spec.get("replicas", 1))
    conflicts = conflicting_autoscalers(hpas, meta["name"])
    if conflicts:
        return hold(
            current,
            CONFLICTING_AUTOSCALER,
            f"HorizontalPodAutoscaler {', '.join(conflicts)} also scales {meta['name']}; "
            f"holding {current} replicas: delete the HorizontalPodAutoscaler or set "
            "spec.autoscaling.enabled to false",
        )
    url = (spec.get("autoscaling") or {}).get("prometheusUrl") or state.prometheus_url
    if not prometheus_url_allowed(url, state.prometheus_url, state.allowed_urls):
        return hold(
            current,
            PROMETHEUS_URL_NOT_ALLOWED,
            f"spec.autoscaling.prometheusUrl {url} is not allowed by the operator "
            "(LLAMAHERD_OPERATOR_ALLOWED_PROMETHEUS_URLS); no query is sent to it; "
            f"holding {current} replicas",
        )
    return None


class ScaleConflict(Exception):
    """The InferenceService changed between every read and the write that followed it."""


async def autoscale_once(
    body: Mapping[str, Any],
    state: AutoscalerState,
    kube: Kube,
    hpas: list[Mapping[str, Any]] | None = None,
) -> Decision | None:
    """One period for one InferenceService: measure, decide, scale, report.

    ``body`` (the index's snapshot) says what to measure; the decision is made on the object
    read afresh after measuring, and the scale write carries that read's ``resourceVersion``.
    When the object changed in between (409: the gateway raised it from zero, a person scaled
    it, the spec moved), it is read and decided again, at most ``SCALE_ATTEMPTS`` times: a
    newer replica count is never overwritten with one decided on an older one."""
    key: Key = (body["metadata"]["namespace"], body["metadata"]["name"])
    if not autoscaling_enabled(body["spec"]):
        forget(state, key)
        return None
    hpa_list = list(hpas or [])
    measured = None  # nothing is sent to Prometheus for a service held before measuring
    if precheck(body, state, hpa_list) is None:
        measured = await measure(body, state, key)
    signals = measured[0] if measured is not None else None
    outcome = await decide_and_scale(key, state, kube, hpa_list, measured, time.monotonic())
    if outcome is None:  # gone, being deleted, or no longer autoscaled
        forget(state, key)
        return None
    fresh, decision, scaling, history = outcome
    if measured is not None:
        state.histories[key] = history

    state.metrics.decisions.labels(direction=decision.direction).inc()
    labels = {"namespace": key[0], "inferenceservice": key[1]}
    state.metrics.desired_replicas.labels(**labels).set(decision.desired)
    state.metrics.min_replicas.labels(**labels).set(scaling.min_replicas)
    state.metrics.max_replicas.labels(**labels).set(scaling.max_replicas)
    changed_reason = state.last_reason.get(key) != decision.reason
    state.last_reason[key] = decision.reason
    if decision.desired != decision.current or changed_reason:
        try:
            await kube.post_event(
                fresh,
                "Normal" if decision.scaling_active else "Warning",
                decision.reason,
                decision.message,
            )
        except KubeError as err:
            log.warning("could not post the %s Event: %s", decision.reason, err)
    meta = fresh["metadata"]
    status = autoscaler_status(fresh.get("status") or {}, decision, signals, meta.get("generation"))
    await kube.apply_status(*key, status, field_manager=FIELD_MANAGER)
    return decision


async def decide_and_scale(
    key: Key,
    state: AutoscalerState,
    kube: Kube,
    hpas: list[Mapping[str, Any]],
    measured: tuple[Metrics | None, float, str] | None,
    now: float,
) -> tuple[dict[str, Any], Decision, ScalingSpec, History] | None:
    """Read the InferenceService, decide on what was read, and write the scale with the
    ``resourceVersion`` read; on a conflict, again (at most ``SCALE_ATTEMPTS`` times).

    Returns the object read, the decision, its scaling spec and the policy history that
    decision left (a copy: the caller keeps it only for the decision that stood); None when
    the service is gone or no longer autoscaled. ``measured``: the signals, held requests and
    why there are no signals; None when the period did not measure (it was held)."""
    for _ in range(SCALE_ATTEMPTS):
        fresh = await kube.get_inference_service(*key)
        if (
            fresh is None
            or not autoscaling_enabled(fresh.get("spec") or {})
            or fresh["metadata"].get("deletionTimestamp")
        ):
            return None
        spec = fresh["spec"]
        current = int(spec.get("replicas", 1))
        scaling = ScalingSpec.from_resource(spec)
        history = copy.deepcopy(state.histories.get(key) or History())
        decision = precheck(fresh, state, hpas) or decide_on(
            measured, current, now, scaling, history
        )
        if decision.desired == current:
            return fresh, decision, scaling, history
        version = str(fresh["metadata"]["resourceVersion"])
        if await kube.scale_inference_service(
            *key, decision.desired, FIELD_MANAGER, resource_version=version
        ):
            log.info("%s/%s scaled %d -> %d: %s", *key, current, decision.desired, decision.message)
            return fresh, decision, scaling, history
        log.info(
            "%s/%s changed since it was read (resourceVersion %s); deciding again", *key, version
        )
    raise ScaleConflict(
        f"it changed {SCALE_ATTEMPTS} times between a read and the scale write; "
        "nothing written, trying again next period"
    )


def decide_on(
    measured: tuple[Metrics | None, float, str] | None,
    current: int,
    now: float,
    scaling: ScalingSpec,
    history: History,
) -> Decision:
    """The policy's decision on what was measured; a hold when nothing was (the period began
    held and the hold was lifted since: the next period measures)."""
    if measured is None:
        return hold(
            current,
            "MetricsUnavailable",
            f"holding {current} replicas: not measured this period (it was held when the "
            "period began)",
        )
    signals, held, error = measured
    return decide(signals, current, now, scaling, history, unavailable_reason=error, held=held)


async def measure(
    body: Mapping[str, Any], state: AutoscalerState, key: Key
) -> tuple[Metrics | None, float, str]:
    """The service's signals from Prometheus, the requests the gateway holds for it, and why
    there are no signals when there are none."""
    auto = body["spec"].get("autoscaling") or {}
    url = auto.get("prometheusUrl") or state.prometheus_url
    queries = Queries.for_selector(
        selector_for(state.selector_template, *key), int(auto.get("metricsWindowSeconds", 60))
    )
    started = time.perf_counter()
    signals, error = None, "no metrics"
    try:
        signals = await state.prometheus.service_metrics(
            url, queries, staleness_s=state.staleness_s
        )
    except MetricsUnavailable as exc:
        error = str(exc)
        state.metrics.query_errors.inc()
    finally:
        state.metrics.query_duration.observe(time.perf_counter() - started)
    held = 0.0
    try:  # the gateway's held requests: demand, and the reason to leave zero
        held = await state.prometheus.held_requests(url, held_query(*key))
    except MetricsUnavailable as exc:
        log.debug("no held requests for %s/%s: %s", *key, exc)
    return signals, held, error


async def _namespace_hpas(state: AutoscalerState, kube: Kube, namespace: str) -> list[Any]:
    try:
        return await kube.list_horizontal_pod_autoscalers(namespace)
    except KubeError as err:
        if namespace not in state.hpa_warned:  # say it once per namespace, then keep going
            state.hpa_warned.add(namespace)
            hint = " (RBAC: list horizontalpodautoscalers)" if status_code(err) == 403 else ""
            log.warning("cannot list HorizontalPodAutoscalers in %s%s: %s", namespace, hint, err)
        return []


async def autoscale_all(
    bodies: Iterable[Mapping[str, Any]], state: AutoscalerState, kube: Kube
) -> None:
    """One period for every autoscaled service, a few at a time."""
    services = [
        body
        for body in bodies
        if autoscaling_enabled(body.get("spec") or {})
        and not body["metadata"].get("deletionTimestamp")
    ]
    keys = {(b["metadata"]["namespace"], b["metadata"]["name"]) for b in services}
    for key in set(state.histories) | set(state.last_reason):
        if key not in keys:
            forget(state, key)
    namespaces = sorted({key[0] for key in keys})
    found = await asyncio.gather(*(_namespace_hpas(state, kube, ns) for ns in namespaces))
    hpas = dict(zip(namespaces, found, strict=True))
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(body: Mapping[str, Any]) -> None:
        async with limit:
            started = time.perf_counter()
            try:
                await autoscale_once(body, state, kube, hpas[body["metadata"]["namespace"]])
            except Exception as exc:  # the next period tries again; say why now
                state.metrics.errors.inc()
                log.warning(
                    "autoscaling %s/%s failed: %s",
                    body["metadata"]["namespace"],
                    body["metadata"]["name"],
                    exc,
                )
            finally:
                state.metrics.autoscale_duration.observe(time.perf_counter() - started)

    await asyncio.gather(*(one(body) for body in services))


async def autoscale_loop(memo: Any, state: AutoscalerState, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        operator = getattr(memo, "state", None)
        if operator is None:
            continue
        try:
            await autoscale_all(list(indexed(operator.index)), state, operator.kube)
        except Exception:  # never let one bad period end the loop
            log.exception("autoscaling period failed")


def register(registry: kopf.OperatorRegistry, settings: Any) -> None:
    """The autoscaling loop, its shared state, and the operator's /metrics endpoint."""
    holder: dict[str, Any] = {}

    @kopf.on.startup(registry=registry)
    async def start_autoscaler(memo: kopf.Memo, **_: Any) -> None:
        metrics = OperatorMetrics()
        memo.operator_metrics = metrics  # the reconcile handler records its duration here
        if settings.metrics_port:
            metrics.serve(settings.metrics_host, settings.metrics_port)
        holder["http"] = httpx.AsyncClient()
        state = AutoscalerState(
            prometheus=PrometheusClient(holder["http"], settings.prometheus_timeout_seconds),
            metrics=metrics,
            prometheus_url=settings.prometheus_url,
            selector_template=settings.metrics_selector,
            staleness_s=settings.metrics_staleness_seconds,
            allowed_urls=settings.allowed_prometheus_url_list,
        )
        holder["task"] = asyncio.create_task(
            autoscale_loop(memo, state, settings.autoscale_interval_seconds), name="autoscaler"
        )

    @kopf.on.cleanup(registry=registry)
    async def stop_autoscaler(**_: Any) -> None:
        if "task" in holder:
            holder["task"].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder["task"]
        if "http" in holder:
            await holder["http"].aclose()
