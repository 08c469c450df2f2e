"""kopf handlers: thin glue between kopf's events and one idempotent reconcile.

- ``reconcile``: on create, update and resume of an InferenceService, server-side apply its
  Deployment, Service, PodDisruptionBudget (only when more than one replica may run; deleted
  otherwise) and ServiceMonitor (only where the Prometheus operator's CRD exists and the
  operator's settings want them), then write the status. Safe to run any number of times; what
  it applies comes from :mod:`llamaherd_operator.builders`. Reconciles of one service are
  serialised.
- **Level-based.** Each apply remembers the owned object's generation (Deployment, PDB) or
  resource version (Service); an event of an owned object that no longer matches (a
  ``kubectl edit`` or ``kubectl scale`` of the Deployment, a changed or deleted Service or PDB)
  puts the service on a work queue, whose worker reconciles it again at once and retries
  failures with a doubling delay. A periodic resync puts every InferenceService on the queue
  every ``resync_interval_seconds``, for whatever events missed.
- ``refresh_status``: on any event of an owned Deployment or of a server pod, recompute the
  status (:mod:`llamaherd_operator.status`) and write it when it changed. Refreshes of one service
  are serialised and coalesced: while one waits, further requests for it are dropped, because the
  waiting one reads everything afresh.

No handler sleeps: what is not ready yet raises ``kopf.TemporaryError(delay=...)``; a spec that
the API server refuses to turn into objects raises ``kopf.PermanentError`` until it changes.

**No finalizers.** No handler asks kopf for one (no per-object timers or daemons: the resync and
the autoscaler are operator-wide loops over a kopf index of the InferenceServices), deletion is
left to Kubernetes' garbage collector through owner references, and the finalizer that operator
versions with per-object autoscaling timers left behind is taken off at the next reconcile, so
an InferenceService can always be deleted while the operator is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

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

# The finalizer kopf put on autoscaled InferenceServices while the autoscaler ran as per-object
# kopf timers. kopf's persistence.finalizer keeps this name, so kopf takes it off too.
LEGACY_FINALIZER = f"{names.GROUP}/finalizer"
INDEX_ID = "inferenceservices"
MAX_RETRY_DELAY_SECONDS = 300.0


class WorkQueue:
    """Keys to reconcile, each due at a time; a failed key comes back with a doubling delay.

    Adding a key that is already queued keeps the earlier due time, so bursts of events for one
    service coalesce into one reconcile.
    """

    def __init__(self, base_delay: float, max_delay: float = MAX_RETRY_DELAY_SECONDS) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.due: dict[Key, float] = {}
        self.failures: dict[Key, int] = {}
        self.changed = asyncio.Event()

    def add(self, key: Key, delay: float = 0.0, now: float | None = None) -> None:
        when = (time.monotonic() if now is None else now) + max(0.0, delay)
        if key not in self.due or when < self.due[key]:
            self.due[key] = when
            self.changed.set()

    def retry_delay(self, key: Key) -> float:
        """The delay before the next try after one more failure of ``key``."""
        failures = self.failures.get(key, 0)
        return min(self.base_delay * 2 ** min(failures, 16), self.max_delay)

    def failed(self, key: Key, delay: float | None = None, now: float | None = None) -> float:
        """Schedule ``key`` again after a failure; returns the delay used."""
        wait = self.retry_delay(key) if delay is None else delay
        self.failures[key] = self.failures.get(key, 0) + 1
        self.add(key, wait, now)
        return wait

    def succeeded(self, key: Key) -> None:
        self.failures.pop(key, None)

    def forget(self, key: Key) -> None:
        self.due.pop(key, None)
        self.failures.pop(key, None)

    def pop_due(self, now: float | None = None) -> list[Key]:
        moment = time.monotonic() if now is None else now
        ready = sorted((when, key) for key, when in self.due.items() if when <= moment)
        for _, key in ready:
            del self.due[key]
        return [key for _, key in ready]

    def next_due(self) -> float | None:
        return min(self.due.values(), default=None)


def drift_token(kind: str, obj: Mapping[str, Any]) -> str:
    """What changes when someone else changes an owned object, and not when its status does.

    The Deployment and the PodDisruptionBudget have their status rewritten all the time by
    their controllers, but ``metadata.generation`` moves only with their spec; a Service has
    no generation and rarely a status, so its resource version stands in.
    """
    meta = obj.get("metadata") or {}
    if kind in ("Deployment", "PodDisruptionBudget"):
        return f"generation:{meta.get('generation')}"
    return f"resourceVersion:{meta.get('resourceVersion')}"


def is_drift(kind: str, event_type: str, obj: Mapping[str, Any], recorded: str | None) -> bool:
    """Whether an event of an owned object shows a change the operator did not make."""
    if event_type == "DELETED":
        # A PDB the operator deleted itself (one replica left) is no drift.
        return kind != "PodDisruptionBudget" or recorded is not None
    seen = drift_token(kind, obj)
    if recorded is None or seen == recorded:
        return recorded is None
    before, _, old = recorded.partition(":")
    now, _, new = seen.partition(":")
    if before == now == "generation" and old.isdigit() and new.isdigit():
        return int(new) > int(old)  # an older generation is a stale event
    return True


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of an InferenceService as the index keeps it."""
    return copy.deepcopy(
        {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}
    )


def indexed(index: Any) -> Iterator[dict[str, Any]]:
    """The InferenceServices in the kopf index (one snapshot per key)."""
    if index is None:
        return
    for store in list(index.values()):
        yield from list(store)[-1:]


@dataclass
class OperatorState:
    """What the handlers share, kept on kopf's root memo."""

    settings: OperatorSettings
    kube: Kube
    options: builders.BuildOptions
    problems: dict[Key, list[Problem]] = field(default_factory=dict)
    locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    reconcile_locks: dict[Key, asyncio.Lock] = field(default_factory=dict)
    # Reconciles in flight at once, from kopf's handlers and the work queue together (the
    # settings' worker_limit); kopf's own workers are not limited, see configure_kopf.
    reconcile_slots: asyncio.Semaphore | None = None
    waiting: set[Key] = field(default_factory=set)
    service_monitors: bool | None = None
    service_monitors_checked: float = 0.0
    # (kind, namespace, name) -> drift_token of the object as the last apply left it
    applied: dict[tuple[str, str, str], str] = field(default_factory=dict)
    queue: WorkQueue = field(default_factory=lambda: WorkQueue(5.0))
    index: Any = None  # kopf's index of the InferenceServices: (namespace, name) -> snapshot
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def forget(self, key: Key) -> None:
        self.problems.pop(key, None)
        self.locks.pop(key, None)
        self.reconcile_locks.pop(key, None)
        self.queue.forget(key)
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"):
            self.applied.pop((kind, *key), None)

    def remember(self, obj: Mapping[str, Any]) -> None:
        meta = obj["metadata"]
        self.applied[(obj["kind"], meta["namespace"], meta["name"])] = drift_token(obj["kind"], obj)


def _key(body: Mapping[str, Any]) -> Key:
    return body["metadata"]["namespace"], body["metadata"]["name"]


async def post_event(
    state: OperatorState, obj: Mapping[str, Any], type: str, reason: str, message: str
) -> None:
    """An Event about ``obj``; a failure to post one is logged, never raised."""
    try:
        await state.kube.post_event(obj, type, reason, message)
    except KubeError as err:
        log.warning("could not post the %s Event: %s", reason, err)


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
    lock = state.reconcile_locks.setdefault(key, asyncio.Lock())
    if state.reconcile_slots is None:
        state.reconcile_slots = asyncio.Semaphore(state.settings.worker_limit)
    async with state.reconcile_slots, lock:
        await _reconcile(body, state, logger, reason, retry)


async def _reconcile(
    body: Mapping[str, Any], state: OperatorState, logger: Any, reason: str | None, retry: int
) -> None:
    key = _key(body)
    namespace, name = key
    spec = body["spec"]
    try:
        legacy = LEGACY_FINALIZER in (body["metadata"].get("finalizers") or [])
        if legacy and await state.kube.remove_finalizer(namespace, name, LEGACY_FINALIZER):
            logger.info("removed the finalizer %s an earlier operator left", LEGACY_FINALIZER)
        problems = await _claim_problems(state, body)
        deployment_manifest = builders.build_deployment(body, state.options)
        state.remember(await state.kube.apply(deployment_manifest))
        state.remember(await state.kube.apply(builders.build_service(body)))
        if builders.needs_pdb(spec):
            state.remember(await state.kube.apply(builders.build_pdb(body)))
        else:
            state.applied.pop(("PodDisruptionBudget", namespace, name), None)
            if await state.kube.delete_pdb(namespace, name):
                logger.info("deleted the PodDisruptionBudget: at most one replica runs now")
        if await _service_monitors_served(state):
            if state.settings.service_monitors_enabled:
                await state.kube.apply(builders.build_service_monitor(body, state.options))
            elif await state.kube.delete_service_monitor(namespace, name):
                logger.info("deleted the ServiceMonitor: the operator's settings turn them off")
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
        await post_event(
            state,
            body,
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
        await post_event(state, service, event.type, event.reason, event.message)


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


async def reconcile_key(state: OperatorState, key: Key, logger: Any) -> None:
    """Reconcile one InferenceService as the API server has it now (the work queue's job)."""
    namespace, name = key
    service = await state.kube.get_inference_service(namespace, name)
    if service is None:
        state.forget(key)
        return
    if service["metadata"].get("deletionTimestamp"):
        # Nothing to build for a service on its way out; but never hold its deletion.
        if LEGACY_FINALIZER in (service["metadata"].get("finalizers") or []):
            await state.kube.remove_finalizer(namespace, name, LEGACY_FINALIZER)
        return
    await reconcile(service, state, logger, retry=state.queue.failures.get(key, 0))


async def _work_one(state: OperatorState, key: Key) -> None:
    try:
        await reconcile_key(state, key, log)
    except kopf.PermanentError as err:
        state.queue.succeeded(key)  # not retried until the spec changes
        log.warning("reconcile of %s/%s: %s", *key, err)
    except kopf.TemporaryError as err:
        delay = state.queue.failed(key, err.delay)
        log.warning("reconcile of %s/%s failed, again in %.0fs: %s", *key, delay, err)
    except Exception as err:  # the API is down, a bug: retry with back-off, keep the loop alive
        delay = state.queue.failed(key)
        log.warning("reconcile of %s/%s failed, again in %.0fs: %s", *key, delay, err)
    else:
        state.queue.succeeded(key)


def _finished(running: dict[Key, asyncio.Task[None]], key: Key, _: Any) -> None:
    running.pop(key, None)


async def work_queue_loop(state: OperatorState) -> None:
    """Reconcile queued services as they come due, a few at a time, one at a time per service."""
    queue = state.queue
    running: dict[Key, asyncio.Task[None]] = {}
    limit = asyncio.Semaphore(max(1, min(state.settings.worker_limit, 20)))

    async def run(key: Key) -> None:
        async with limit:
            await _work_one(state, key)

    while True:
        queue.changed.clear()
        for key in queue.pop_due():
            if key in running:
                queue.add(key, 0.5)  # one at a time per service; try again shortly
                continue
            task = asyncio.create_task(run(key), name=f"reconcile {key[0]}/{key[1]}")
            running[key] = task
            task.add_done_callback(functools.partial(_finished, running, key))
        due = queue.next_due()
        timeout = 1.0 if due is None else max(0.05, min(1.0, due - time.monotonic()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.changed.wait(), timeout)


async def resync_loop(state: OperatorState) -> None:
    """Every resync interval, queue every InferenceService: what events missed is caught here."""
    interval = state.settings.resync_interval_seconds
    while True:
        await asyncio.sleep(interval)
        for body in indexed(state.index):
            if not body["metadata"].get("deletionTimestamp") or LEGACY_FINALIZER in (
                body["metadata"].get("finalizers") or []
            ):
                state.queue.add(_key(body))


def _state(memo: Any) -> OperatorState:
    state: OperatorState = memo.state
    return state


def register(registry: kopf.OperatorRegistry, operator_settings: OperatorSettings) -> None:
    """Register every handler in ``registry`` (no import-time side effects).

    None of them makes kopf add a finalizer: create/update/resume handlers, event handlers and
    an index need none (kopf adds one only for on.delete handlers, timers and daemons).
    """
    resource = (names.GROUP, names.VERSION, names.PLURAL)
    owned: dict[str, Any] = {
        names.LABEL_MANAGED_BY: names.MANAGED_BY,
        names.LABEL_INFERENCE_SERVICE: kopf.PRESENT,
    }

    kopf.on.login(id="login", registry=registry)(login)
    kopf.index(*resource, id=INDEX_ID, registry=registry)(index_inference_services)

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
        configure_kopf(settings, operator_settings)
        start(memo, operator_settings, kwargs.get(INDEX_ID))

    kopf.on.cleanup(id="cleanup", registry=registry)(cleanup)
    # One idempotent reconcile, whatever the cause.
    for on_change in (kopf.on.update, kopf.on.create, kopf.on.resume):
        on_change(*resource, id="reconcile", registry=registry)(reconcile_handler)
    for group, version, plural in (
        ("apps", "v1", "deployments"),
        ("", "v1", "pods"),
        ("", "v1", "services"),
        ("policy", "v1", "poddisruptionbudgets"),
    ):
        kopf.on.event(
            group, version, plural, id=f"{plural}-changed", labels=owned, registry=registry
        )(owned_changed)


def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # The same order as lightkube's client: in-cluster service account, then kubeconfig.
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def index_inference_services(body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {_key(body): snapshot(body)}


def start(memo: kopf.Memo, operator_settings: OperatorSettings, index: Any) -> None:
    """The operator's state in ``memo``, and its work queue and resync loops started."""
    state = OperatorState(
        settings=operator_settings,
        kube=Kube.connect(operator_settings.request_timeout_seconds),
        options=operator_settings.build_options(),
        queue=WorkQueue(operator_settings.retry_delay_seconds),
        index=index,
    )
    memo.state = state
    state.tasks.append(asyncio.create_task(work_queue_loop(state), name="work queue"))
    state.tasks.append(asyncio.create_task(resync_loop(state), name="resync"))


async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    state = getattr(memo, "state", None)
    if state is not None:
        for task in state.tasks:
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        await state.kube.close()


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
    """An event of an owned object: reconcile its service when someone else changed it, else
    refresh the service's status when it is a Deployment or a pod."""
    if event.get("type") is None:
        return  # the initial listing: resuming every InferenceService covers it
    state = _state(memo)
    kind = body.get("kind", "")
    namespace = body["metadata"]["namespace"]
    name = body["metadata"]["labels"][names.LABEL_INFERENCE_SERVICE]
    if kind != "Pod" and await _drifted(state, event, body, (namespace, name), logger):
        state.queue.add((namespace, name))
        return  # the reconcile refreshes the status
    if kind in ("Pod", "Deployment"):
        try:
            await refresh_status(state, namespace, name)
        except KubeError as err:
            logger.warning("status refresh of %s/%s failed: %s", namespace, name, err)


async def _drifted(
    state: OperatorState, event: Mapping[str, Any], body: kopf.Body, service: Key, logger: Any
) -> bool:
    """Whether an owned object of ``service`` changed outside the operator (logged if so)."""
    kind = body.get("kind", "")
    # Wait for a reconcile of this service in flight: its own writes are no drift.
    async with state.reconcile_locks.setdefault(service, asyncio.Lock()):
        recorded = state.applied.get((kind, service[0], body["metadata"]["name"]))
    if not is_drift(kind, str(event.get("type")), body, recorded):
        return False
    logger.info(
        "%s %s outside the operator: reconciling",
        kind,
        "deleted" if event.get("type") == "DELETED" else "changed",
    )
    return True


def configure_kopf(settings: kopf.OperatorSettings, operator: OperatorSettings) -> None:
    """kopf's own settings: where it keeps its state, timeouts, how much it posts as Events."""
    # Keep kopf's bookkeeping in annotations: the status is ours (and the autoscaler's).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.GROUP, key="last-handled-configuration"
    )
    # No handler needs a finalizer; kopf takes this one (from operators with per-object timers)
    # off any object it still finds it on.
    settings.persistence.finalizer = LEGACY_FINALIZER
    # Events come from kopf.event calls; of kopf's own log lines only warnings and errors (a
    # failing handler) become Events too.
    settings.posting.level = logging.WARNING
    # Renew watches regularly and notice a dead API server soon.
    settings.watching.server_timeout = operator.watch_server_timeout_seconds
    settings.watching.client_timeout = operator.watch_server_timeout_seconds + 30
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = operator.request_timeout_seconds
    settings.networking.connect_timeout = 10
    # No limit on kopf's workers: with an index, every worker waits until all objects of every
    # watched kind are indexed, and those still waiting for a free worker never are (a deadlock
    # once there are more objects than workers, seen with 50 InferenceServices in a backlog).
    # The reconciles themselves are bounded by OperatorState.reconcile_slots.
    settings.batching.worker_limit = None
