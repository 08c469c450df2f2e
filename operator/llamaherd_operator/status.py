"""Pure status computation: (InferenceService, its Deployment, its pods) -> ``.status``.

Conditions owned by the operator: ``Ready`` (at least one replica serves), ``Progressing`` (a
rollout or scale is under way), ``Degraded`` (something needs a person: a failed download, a
model that fails to load, a crash loop, an image that cannot be pulled, no GPU to schedule on,
a missing claim) and ``ModelLoading`` (a replica is downloading or loading its model). The
autoscaler owns ``ScalingActive`` and the metrics fields; the status is written with server-side
apply, so each writer keeps its own fields (``conditions`` is a map keyed by ``type``); its part
is built here too (:func:`autoscaler_status`), with the same condition and time helpers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llamaherd_operator import builders, names
from llamaherd_operator.policy import Decision, Metrics

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
MODEL_LOADING = "ModelLoading"
OWNED_CONDITIONS = (READY, PROGRESSING, DEGRADED, MODEL_LOADING)
# The autoscaler's condition, and how many scaling decisions its status keeps.
SCALING_ACTIVE = "ScalingActive"
MAX_DECISIONS = 10

# Degraded reasons, most telling first: the first found is the one reported.
MODEL_DOWNLOAD_FAILED = "ModelDownloadFailed"
MODEL_LOAD_FAILED = "ModelLoadFailed"
IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"
CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
INSUFFICIENT_GPU = "InsufficientGPU"
UNSCHEDULABLE = "Unschedulable"
PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
REPLICA_FAILURE = "ReplicaFailure"
_POD_REASON_ORDER = (
    MODEL_DOWNLOAD_FAILED,
    MODEL_LOAD_FAILED,
    IMAGE_PULL_BACK_OFF,
    CRASH_LOOP_BACK_OFF,
    CONTAINER_CONFIG_ERROR,
    INSUFFICIENT_GPU,
    UNSCHEDULABLE,
)
_IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
_CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}

# The server's termination message when its model cannot be loaded starts with this prefix
# (``llamaherd_server.loadfail.LOAD_FAILED_PREFIX``; a unit test holds the two equal: the
# operator does not import the server). Other crashes do not carry it.
MODEL_LOAD_FAILED_PREFIX = "model load failed: "
# Longest termination message copied into a condition (the kubelet keeps up to 4096 bytes).
MAX_MESSAGE_CHARS = 1024

Body = Mapping[str, Any]


@dataclass(frozen=True)
class Problem:
    """Why a service is Degraded: a condition reason and a message for a person."""

    reason: str
    message: str


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post about the InferenceService."""

    type: str  # "Normal" or "Warning"
    reason: str
    message: str


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get(obj: Mapping[str, Any] | None, *path: str, default: Any = None) -> Any:
    current: Any = obj
    for key in path:
        if not isinstance(current, Mapping) or key not in current:
            return default
        current = current[key]
    return current if current is not None else default


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in _get(pod, "status", "conditions", default=[])
    )


def _live_pods(pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Pods that count: not being deleted, not finished."""
    return [
        pod
        for pod in pods
        if not _get(pod, "metadata", "deletionTimestamp")
        and _get(pod, "status", "phase") not in ("Succeeded", "Failed")
    ]


def _terminated_text(terminated: Mapping[str, Any]) -> str:
    code = terminated.get("exitCode")
    text = (terminated.get("message") or terminated.get("reason") or "").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    return f"exit code {code}" + (f": {last}" if last else "")


def _trim(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_failure(terminated: Mapping[str, Any]) -> str | None:
    """The server's load failure line in a termination message, if it is one. With
    ``FallbackToLogsOnError`` the message may be the log's tail: the line is found in it."""
    text = str(terminated.get("message") or "")
    for line in reversed(text.splitlines()):
        at = line.find(MODEL_LOAD_FAILED_PREFIX)
        if at >= 0:
            return line[at:].strip()
    return None


def _container_problem(pod_name: str, status: Mapping[str, Any], *, init: bool) -> Problem | None:
    name = status.get("name", "?")
    waiting = _get(status, "state", "waiting", default={})
    terminated = _get(status, "state", "terminated", default={})
    last = _get(status, "lastState", "terminated", default={})
    where = f"pod {pod_name}, {'init ' if init else ''}container {name}"
    reason = waiting.get("reason", "")
    if reason in _IMAGE_PULL_REASONS:
        detail = waiting.get("message") or reason
        return Problem(IMAGE_PULL_BACK_OFF, f"{where}: cannot pull image: {detail}")
    if reason in _CONFIG_REASONS:
        return Problem(CONTAINER_CONFIG_ERROR, f"{where}: {waiting.get('message') or reason}")
    if init and name == names.DOWNLOAD_CONTAINER:
        failed = terminated if terminated.get("exitCode", 0) != 0 else last
        if failed and failed.get("exitCode", 0) != 0:
            restarts = status.get("restartCount", 0)
            tries = f" (failed {restarts + 1} times)" if restarts else ""
            return Problem(
                MODEL_DOWNLOAD_FAILED,
                f"{where}: model download failed{tries}: {_terminated_text(failed)}",
            )
        return None
    if not init and name == names.SERVER_CONTAINER:
        for ended in (terminated, last):
            failure = _load_failure(ended) if ended else None
            if failure:
                restarts = status.get("restartCount", 0)
                tries = f" (failed {restarts + 1} times)" if restarts else ""
                code = ended.get("exitCode")
                return Problem(
                    MODEL_LOAD_FAILED,
                    _trim(f"{where}: exit code {code}{tries}: {failure}"),
                )
    if reason == "CrashLoopBackOff":
        detail = _terminated_text(last) if last else waiting.get("message", "")
        return Problem(CRASH_LOOP_BACK_OFF, f"{where} keeps crashing: {detail}")
    return None


def _unschedulable_problem(
    pod_name: str, pod: Mapping[str, Any], gpu_resource: str
) -> Problem | None:
    for condition in _get(pod, "status", "conditions", default=[]):
        if (
            condition.get("type") == "PodScheduled"
            and condition.get("status") == "False"
            and condition.get("reason") == "Unschedulable"
        ):
            message = condition.get("message", "")
            if gpu_resource and gpu_resource in message:
                return Problem(
                    INSUFFICIENT_GPU,
                    f"pod {pod_name} cannot be scheduled: not enough {gpu_resource}: {message}",
                )
            return Problem(UNSCHEDULABLE, f"pod {pod_name} cannot be scheduled: {message}")
    return None


def pod_problems(pods: Iterable[Mapping[str, Any]], gpu_resource: str) -> list[Problem]:
    """Problems of the pods that are not ready, most telling reason first."""
    found: list[Problem] = []
    for pod in _live_pods(pods):
        if _pod_ready(pod):
            continue
        pod_name = _get(pod, "metadata", "name", default="?")
        for status in _get(pod, "status", "initContainerStatuses", default=[]):
            problem = _container_problem(pod_name, status, init=True)
            if problem:
                found.append(problem)
        for status in _get(pod, "status", "containerStatuses", default=[]):
            problem = _container_problem(pod_name, status, init=False)
            if problem:
                found.append(problem)
        problem = _unschedulable_problem(pod_name, pod, gpu_resource)
        if problem:
            found.append(problem)
    return sorted(found, key=lambda p: _POD_REASON_ORDER.index(p.reason))


def _deployment_problems(deployment: Mapping[str, Any] | None) -> list[Problem]:
    found = []
    for condition in _get(deployment, "status", "conditions", default=[]):
        if condition.get("type") == "Progressing" and condition.get("reason") == (
            PROGRESS_DEADLINE_EXCEEDED
        ):
            found.append(Problem(PROGRESS_DEADLINE_EXCEEDED, condition.get("message", "")))
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            found.append(Problem(REPLICA_FAILURE, condition.get("message", "")))
    return found


def _running(status: Mapping[str, Any]) -> bool:
    return "running" in (status.get("state") or {})


def _model_loading(pods: Sequence[Mapping[str, Any]]) -> tuple[str, str, str] | None:
    downloading, loading = [], []
    for pod in pods:
        if _pod_ready(pod):
            continue
        pod_name = _get(pod, "metadata", "name", default="?")
        for status in _get(pod, "status", "initContainerStatuses", default=[]):
            if status.get("name") == names.DOWNLOAD_CONTAINER and _running(status):
                downloading.append(pod_name)
        for status in _get(pod, "status", "containerStatuses", default=[]):
            if (
                status.get("name") == names.SERVER_CONTAINER
                and _running(status)
                and not status.get("ready")
            ):
                loading.append(pod_name)
    if downloading:
        return ("True", "ModelDownloading", f"downloading the model: {', '.join(downloading)}")
    if loading:
        return ("True", "ModelLoading", f"loading the model: {', '.join(loading)}")
    return None


def _condition(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


def _summarise(problems: Sequence[Problem]) -> Problem:
    first = problems[0]
    others = len(problems) - 1
    if others:
        return Problem(first.reason, f"{first.message} (and {others} more)")
    return first


@dataclass(frozen=True)
class _Replicas:
    """The Deployment's replica counts, and the generation of the spec they come from."""

    desired: int
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    available: int = 0
    observed: int | None = None  # observedGeneration, when known


def _replicas(
    deployment: Mapping[str, Any] | None, spec: Mapping[str, Any], old_status: Mapping[str, Any]
) -> _Replicas:
    if deployment is None:
        return _Replicas(
            desired=builders.desired_replicas(spec),
            observed=old_status.get("observedGeneration"),
        )
    generation_text = _get(deployment, "metadata", "annotations", names.ANNOTATION_GENERATION)
    return _Replicas(
        desired=int(_get(deployment, "spec", "replicas", default=0)),
        replicas=int(_get(deployment, "status", "replicas", default=0)),
        ready=int(_get(deployment, "status", "readyReplicas", default=0)),
        updated=int(_get(deployment, "status", "updatedReplicas", default=0)),
        available=int(_get(deployment, "status", "availableReplicas", default=0)),
        observed=int(generation_text) if generation_text else old_status.get("observedGeneration"),
    )


def _degraded(problems: Sequence[Problem]) -> dict[str, str]:
    if problems:
        worst = _summarise(problems)
        return _condition(DEGRADED, "True", worst.reason, worst.message)
    return _condition(DEGRADED, "False", "AsExpected", "no problems found")


def _model_loading_condition(
    loading: tuple[str, str, str] | None, problems: Sequence[Problem], ready: int
) -> dict[str, str]:
    if loading:
        return _condition(MODEL_LOADING, *loading)
    if any(p.reason == MODEL_DOWNLOAD_FAILED for p in problems):
        return _condition(
            MODEL_LOADING, "False", MODEL_DOWNLOAD_FAILED, "the model download failed"
        )
    if any(p.reason == MODEL_LOAD_FAILED for p in problems):
        return _condition(MODEL_LOADING, "False", MODEL_LOAD_FAILED, "the model failed to load")
    if ready > 0:
        return _condition(MODEL_LOADING, "False", "ModelLoaded", "the model is loaded")
    return _condition(MODEL_LOADING, "False", "NoRunningPods", "no pod is running")


def _progressing(
    deployment: Mapping[str, Any] | None, counts: _Replicas, problems: Sequence[Problem]
) -> dict[str, str]:
    desired, updated = counts.desired, counts.updated
    dep_generation = int(_get(deployment, "metadata", "generation", default=0))
    dep_observed = int(_get(deployment, "status", "observedGeneration", default=0))
    if deployment is None:
        return _condition(PROGRESSING, "True", "Creating", "creating the Deployment")
    if dep_observed < dep_generation:
        return _condition(
            PROGRESSING, "True", "RolloutPending", "the Deployment's new spec is not picked up yet"
        )
    if any(p.reason == PROGRESS_DEADLINE_EXCEEDED for p in problems):
        return _condition(
            PROGRESSING, "False", PROGRESS_DEADLINE_EXCEEDED, "the rollout stopped making progress"
        )
    if updated < desired:
        return _condition(
            PROGRESSING, "True", "RollingOut", f"{updated} of {desired} replicas updated"
        )
    if counts.replicas > updated:
        return _condition(
            PROGRESSING,
            "True",
            "RollingOut",
            f"{counts.replicas - updated} old replicas terminating",
        )
    if counts.available < desired:
        return _condition(
            PROGRESSING,
            "True",
            "WaitingForReplicas",
            f"{counts.available} of {desired} replicas available",
        )
    return _condition(
        PROGRESSING, "False", "Complete", f"{desired} replicas up to date and available"
    )


def _ready(
    deployment: Mapping[str, Any] | None,
    counts: _Replicas,
    degraded: Mapping[str, str],
    loading: tuple[str, str, str] | None,
) -> dict[str, str]:
    desired, ready = counts.desired, counts.ready
    if desired == 0 and deployment is not None:
        return _condition(READY, "False", "ScaledToZero", "no replicas requested")
    if ready > 0:
        return _condition(READY, "True", "ReplicasReady", f"{ready} of {desired} replicas ready")
    if degraded["status"] == "True":
        return _condition(READY, "False", degraded["reason"], degraded["message"])
    if loading:
        return _condition(READY, "False", loading[1], loading[2])
    if deployment is None:
        return _condition(READY, "False", "Creating", "creating the Deployment")
    return _condition(READY, "False", "NoReadyReplicas", f"0 of {desired} replicas ready")


def compute_status(
    body: Body,
    deployment: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    *,
    problems: Sequence[Problem] = (),
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The operator's part of ``.status``, computed from what exists now.

    ``problems`` come from the operator itself (a missing claim, a reconcile that failed); they
    are reported before the pods' own.
    """
    now = now or dt.datetime.now(dt.UTC)
    meta = body["metadata"]
    spec = body.get("spec", {})
    old_status = body.get("status") or {}
    gpu_resource = str(spec.get("gpu", {}).get("resourceName", builders.DEFAULT_GPU_RESOURCE))
    live = _live_pods(pods)
    counts = _replicas(deployment, spec, old_status)
    all_problems = [*problems, *pod_problems(live, gpu_resource), *_deployment_problems(deployment)]
    degraded = _degraded(all_problems)
    loading = _model_loading(live)
    conditions = merge_conditions(
        old_status.get("conditions", []),
        [
            _ready(deployment, counts, degraded, loading),
            _progressing(deployment, counts, all_problems),
            degraded,
            _model_loading_condition(loading, all_problems, counts.ready),
        ],
        now=now,
        generation=counts.observed,
    )
    status: dict[str, Any] = {
        "replicas": counts.replicas,
        "readyReplicas": counts.ready,
        "desiredReplicas": counts.desired,
        "selector": builders.selector_string(meta["name"]),
        "endpoint": builders.endpoint(body),
        "conditions": conditions,
    }
    if counts.observed is not None:
        status["observedGeneration"] = int(counts.observed)
    return status


def merge_conditions(
    old: Iterable[Mapping[str, Any]],
    new: Iterable[Mapping[str, Any]],
    *,
    now: dt.datetime,
    generation: int | None,
) -> list[dict[str, Any]]:
    """New conditions, keeping ``lastTransitionTime`` where the status did not change."""
    previous = {c.get("type"): c for c in old}
    merged = []
    for condition in new:
        item = dict(condition)
        before = previous.get(item["type"])
        if before and before.get("status") == item["status"] and before.get("lastTransitionTime"):
            item["lastTransitionTime"] = before["lastTransitionTime"]
        else:
            item["lastTransitionTime"] = rfc3339(now)
        if generation is not None:
            item["observedGeneration"] = int(generation)
        merged.append(item)
    return merged


def autoscaler_status(
    old: Mapping[str, Any],
    decision: Decision,
    signals: Metrics | None,
    generation: int | None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The autoscaler's part of ``.status`` after one decision: the last signals (kept from
    ``old`` when there are none), the scaling decisions that changed the size, and the
    ``ScalingActive`` condition, whose ``lastTransitionTime`` moves only when its status does."""
    moment = now or dt.datetime.now(dt.UTC)
    stamp = rfc3339(moment)
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
        status["lastScaleTime"] = stamp
        decisions.append(
            {
                "time": stamp,
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
    condition = _condition(
        SCALING_ACTIVE,
        "True" if decision.scaling_active else "False",
        decision.reason,
        decision.message[:1000],
    )
    previous = [c for c in old.get("conditions") or [] if c.get("type") == SCALING_ACTIVE]
    status["conditions"] = merge_conditions(
        previous, [condition], now=moment, generation=generation
    )
    return status


def _by_type(status: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    return {c.get("type", ""): c for c in (status or {}).get("conditions", [])}


def transition_events(
    old_status: Mapping[str, Any] | None, new_status: Mapping[str, Any]
) -> list[Event]:
    """Events a person would ask about: became ready, not ready any more, degraded (and why)."""
    old, new = _by_type(old_status), _by_type(new_status)
    events: list[Event] = []
    ready_before = old.get(READY, {}).get("status")
    ready_now = new.get(READY, {})
    if ready_now.get("status") == "True" and ready_before != "True":
        events.append(Event("Normal", "Ready", ready_now.get("message", "")))
    elif ready_before == "True" and ready_now.get("status") != "True":
        events.append(Event("Warning", "NotReady", ready_now.get("message", "")))
    degraded_before = old.get(DEGRADED, {})
    degraded_now = new.get(DEGRADED, {})
    if degraded_now.get("status") == "True" and (
        degraded_before.get("status") != "True"
        or degraded_before.get("reason") != degraded_now.get("reason")
    ):
        reason = degraded_now.get("reason", DEGRADED)
        events.append(Event("Warning", reason, degraded_now.get("message", "")))
    elif degraded_before.get("status") == "True" and degraded_now.get("status") == "False":
        events.append(Event("Normal", "Recovered", f"no longer {degraded_before.get('reason')}"))
    return events


def same_status(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` would change nothing the operator owns."""
    old = old or {}
    for key, value in new.items():
        if key == "conditions":
            continue
        if old.get(key) != value:
            return False
    old_conditions = _by_type(old)
    for condition in new.get("conditions", []):
        before = old_conditions.get(condition["type"])
        if before is None or any(before.get(k) != v for k, v in condition.items()):
            return False
    return True
