"""kopf handlers: thin glue between kopf's events and one idempotent reconcile.

- ``reconcile``: on create, update and resume of an InferenceService, server-side apply its
  Deployment, Service, PodDisruptionBudget (only when more than one replica may run; deleted
  otherwise) and ServiceMonitor (only where the Prometheus operator's CRD exists), then write
  the status. Safe to run any number of times; what it applies comes from
  :mod:`llamaherd_operator.builders`.
- ``refresh_status``: on any event of an owned Deployment or of a server pod, recompute the
  status (:mod:`llamaherd_operator.status`) and write it when it changed. Refreshes of one service
  are serialised and coalesced: while one waits, further requests for it are dropped, because the
  waiting one reads everything afresh.

No handler sleeps: what is not ready yet raises ``kopf.TemporaryError(delay=...)``; a spec that
the API server refuses to turn into objects raises ``kopf.PermanentError`` until it changes.
No finalizers: deletion is left to Kubernetes' garbage collector through owner references, so
an InferenceService can be deleted even while the operator is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from llamaherd_operator import builders, names
from llamaherd_operator.kube import ApiError, Kube, KubeError, is_invalid, is_transient
from llamaherd_operator.settings import OperatorSettings
from llamaherd_operator.status import (
    Problem,
    compute_status,
    same_status,
    transition_events,
)

Key = tuple[str, str]

log = logging.getLogger("llamaherd_operator")


@dataclass
class OperatorState:
    """What the handlers share, kept on kopf's root memo."""

    settings: OperatorSettings
    kube: Kube
    options: builders.BuildOptions
    problems: dict[Key, list[Problem]] = field(default_factory=dict)
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    waiting: set[Key] = field(default_factory=set)
    service_monitors: bool | None = None
    service_monitors_checked: float = 0.0

    def forget(self, key: Key) -> None:
        self.problems.pop(key, None)
        self.locks.pop(key, None)


def _key(body: Mapping[str, Any]) -> Key:
    return body["metadata"]["namespace"], body["metadata"]["name"]


def _api_message(err: BaseException) -> str:
    if isinstance(err, ApiError):
        return str(err.status.message or err)
    return str(err) or type(err).__name__


async def _service_monitors_served(state: OperatorState) -> bool:
    """Check API discovery at most every few minutes; say so once when it changes."""
    now = time.monotonic()
    if (
        state.service_monitors is None
        or now - state.service_monitors_checked > state.settings.service_monitor_recheck_seconds
    ):
        served = await state.kube.service_monitors_served()
        if served != state.service_monitors:
            if served:
                log.info("monitoring.coreos.com/v1 ServiceMonitor found: creating ServiceMonitors")
            else:
                log.info("monitoring.coreos.com CRDs not found: skipping ServiceMonitors")
        state.service_monitors = served
        state.service_monitors_checked = now
    return bool(state.service_monitors)


async def _claim_problems(state: OperatorState, body: Mapping[str, Any]) -> list[Problem]:
    namespace = body["metadata"]["namespace"]
    model = body["spec"]["model"]
    claims: list[tuple[str, str]] = []
    if "persistentVolumeClaim" in model:
        claims.append(("ModelPVCNotFound", model["persistentVolumeClaim"]["claimName"]))
    cache = model.get("cache", {})
    if "url" in model and cache.get("type") == "PersistentVolumeClaim":
        claims.append(("CachePVCNotFound", cache["claimName"]))
    problems = []
    for reason, claim in claims:
        if not await state.kube.pvc_exists(namespace, claim):
            problems.append(
                Problem(
                    reason,
                    f"PersistentVolumeClaim {namespace}/{claim} not found; "
                    "pods wait until it exists",
                )
            )
    return problems


async def reconcile(
    body: Mapping[str, Any],
    state: OperatorState,
    logger: Any,
    reason: str | None = None,
    retry: int = 0,
) -> None:
    """Drive the owned objects toward the spec, then write the status. Idempotent."""
    key = _key(body)
    namespace, name = key
    spec = body["spec"]
    try:
        problems = await _claim_problems(state, body)
        deployment_manifest = builders.build_deployment(body, state.options)
        await state.kube.apply(deployment_manifest)
        await state.kube.apply(builders.build_service(body))
        if builders.needs_pdb(spec):
            await state.kube.apply(builders.build_pdb(body))
        elif await state.kube.delete_pdb(namespace, name):
            logger.info("deleted the PodDisruptionBudget: at most one replica runs now")
        if await _service_monitors_served(state):
            await state.kube.apply(builders.build_service_monitor(body, state.options))
    except KubeError as err:
        if is_invalid(err):
            # The spec passed the CRD's validation but the API server refuses what it builds.
            message = (
                f"the API server refused the objects built from this spec: {_api_message(err)}"
            )
            state.problems[key] = [Problem("InvalidSpec", message)]
            await _refresh_quietly(state, namespace, name, logger)
            raise kopf.PermanentError(message) from err
        # Anything else is retried with a growing delay; meanwhile the status says what fails
        # (at once for errors a person must fix, such as 403; after one retry for the rest).
        message = f"applying objects failed, will retry: {_api_message(err)}"
        if retry > 0 or not is_transient(err):
            state.problems[key] = [Problem("ReconcileFailed", message)]
            await _refresh_quietly(state, namespace, name, logger)
        delay = min(state.settings.retry_delay_seconds * 2 ** min(retry, 10), 300.0)
        raise kopf.TemporaryError(message, delay=delay) from err

    state.problems[key] = problems
    template = deployment_manifest["spec"]["template"]
    if reason in ("create", "update"):
        kopf.event(  # not kopf.info: that one obeys posting.level, which is WARNING
            cast(kopf.Body, body),
            type="Normal",
            reason="Applied" if reason == "update" else "Created",
            message=f"Deployment {name}: {deployment_manifest['spec']['replicas']} replicas, "
            f"pod template {template['metadata']['annotations'][names.ANNOTATION_SPEC_HASH]}",
        )
    await _refresh_or_retry(state, namespace, name, logger)
    if problems:
        # Nothing will tell us when the claim appears: look again later.
        raise kopf.TemporaryError(problems[0].message, delay=state.settings.claim_recheck_seconds)


async def refresh_status(state: OperatorState, namespace: str, name: str) -> None:
    """Recompute the status from what exists now; write it if it changed."""
    key = (namespace, name)
    if key in state.waiting:
        return  # a refresh is already queued and will read everything afresh
    state.waiting.add(key)
    lock = state.locks.setdefault(key, asyncio.Lock())
    async with lock:
        state.waiting.discard(key)
        service = await state.kube.get_inference_service(namespace, name)
        if service is None:
            state.forget(key)
            return
        if service["metadata"].get("deletionTimestamp"):
            return
        deployment = await state.kube.get_deployment(namespace, name)
        pods = await state.kube.list_pods(namespace, builders.selector_labels(name))
        new = compute_status(service, deployment, pods, problems=state.problems.get(key, []))
        old = service.get("status")
        if same_status(old, new):
            return
        if await state.kube.apply_status(namespace, name, new) is None:
            return
    for event in transition_events(old, new):
        kopf.event(
            cast(kopf.Body, service), type=event.type, reason=event.reason, message=event.message
        )


async def _refresh_or_retry(state: OperatorState, namespace: str, name: str, logger: Any) -> None:
    try:
        await refresh_status(state, namespace, name)
    except KubeError as err:
        raise kopf.TemporaryError(
            f"writing the status failed, will retry: {_api_message(err)}",
            delay=state.settings.retry_delay_seconds,
        ) from err


async def _refresh_quietly(state: OperatorState, namespace: str, name: str, logger: Any) -> None:
    try:
        await refresh_status(state, namespace, name)
    except KubeError as err:
        logger.warning("could not refresh the status of %s/%s: %s", namespace, name, err)


def _state(memo: Any) -> OperatorState:
    state: OperatorState = memo.state
    return state


def register(registry: kopf.OperatorRegistry, operator_settings: OperatorSettings) -> None:
    """Register every handler in ``registry`` (no import-time side effects)."""
    resource = (names.GROUP, names.VERSION, names.PLURAL)
    owned: dict[str, Any] = {
        names.LABEL_MANAGED_BY: names.MANAGED_BY,
        names.LABEL_INFERENCE_SERVICE: kopf.PRESENT,
    }

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same order as lightkube's client: in-cluster service account, then kubeconfig.
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure_kopf(settings, operator_settings)
        memo.state = OperatorState(
            settings=operator_settings,
            kube=Kube.connect(operator_settings.request_timeout_seconds),
            options=operator_settings.build_options(),
        )

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        state = getattr(memo, "state", None)
        if state is not None:
            await state.kube.close()

    @kopf.on.resume(*resource, id="reconcile", registry=registry)
    @kopf.on.create(*resource, id="reconcile", registry=registry)
    @kopf.on.update(*resource, id="reconcile", registry=registry)
    async def reconcile_handler(
        body: kopf.Body, reason: str, retry: int, memo: kopf.Memo, logger: Any, **_: Any
    ) -> None:
        cause = str(getattr(reason, "value", reason))  # kopf passes a str enum
        started = time.perf_counter()
        try:
            await reconcile(body, _state(memo), logger, reason=cause, retry=retry)
        finally:
            metrics = getattr(memo, "operator_metrics", None)  # set by the autoscaler's startup
            if metrics is not None:
                metrics.reconcile_duration.observe(time.perf_counter() - started)

    async def owned_changed(
        event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any
    ) -> None:
        if event.get("type") is None:
            return  # the initial listing: resuming every InferenceService covers it
        state = _state(memo)
        namespace = body["metadata"]["namespace"]
        name = body["metadata"]["labels"][names.LABEL_INFERENCE_SERVICE]
        try:
            if event.get("type") == "DELETED" and body.get("kind") in ("Deployment", "Service"):
                service = await state.kube.get_inference_service(namespace, name)
                if service is not None and not service["metadata"].get("deletionTimestamp"):
                    logger.info("%s deleted under the operator: applying it again", body["kind"])
                    await reconcile(service, state, logger)
                    return
            await refresh_status(state, namespace, name)
        except (kopf.TemporaryError, kopf.PermanentError) as err:
            logger.warning("reconcile of %s/%s after a change: %s", namespace, name, err)
        except KubeError as err:
            logger.warning("status refresh of %s/%s failed: %s", namespace, name, err)

    for group, version, plural in (
        ("apps", "v1", "deployments"),
        ("", "v1", "pods"),
        ("", "v1", "services"),
    ):
        kopf.on.event(
            group, version, plural, id=f"{plural}-changed", labels=owned, registry=registry
        )(owned_changed)


def configure_kopf(settings: kopf.OperatorSettings, operator: OperatorSettings) -> None:
    """kopf's own settings: where it keeps its state, timeouts, how much it posts as Events."""
    # Keep kopf's bookkeeping in annotations: the status is ours (and the autoscaler's).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{names.GROUP}/finalizer"
    # Events come from kopf.event calls; of kopf's own log lines only warnings and errors (a
    # failing handler) become Events too.
    settings.posting.level = logging.WARNING
    # Renew watches regularly and notice a dead API server soon.
    settings.watching.server_timeout = operator.watch_server_timeout_seconds
    settings.watching.client_timeout = operator.watch_server_timeout_seconds + 30
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = operator.request_timeout_seconds
    settings.networking.connect_timeout = 10
    settings.batching.worker_limit = operator.worker_limit
