"""Status computation from Deployment and pod dicts (no API server)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from llamaherd_operator import names
from llamaherd_operator.policy import Decision, Metrics
from llamaherd_operator.status import (
    MAX_DECISIONS,
    Event,
    Problem,
    autoscaler_status,
    compute_status,
    merge_conditions,
    pod_problems,
    same_status,
    transition_events,
)

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
EARLIER = "2026-01-01T00:00:00Z"


def isvc(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": "chat", "namespace": "ml", "uid": "u", "generation": 3},
        "spec": {"model": {"url": "https://h.example/m.gguf"}, **spec},
    }
    if status is not None:
        body["status"] = status
    return body


def deployment(
    desired: int = 1,
    *,
    ready: int = 0,
    updated: int | None = None,
    replicas: int | None = None,
    available: int | None = None,
    generation: int = 1,
    observed: int = 1,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation, "annotations": {names.ANNOTATION_GENERATION: "3"}},
        "spec": {"replicas": desired},
        "status": {
            "observedGeneration": observed,
            "replicas": desired if replicas is None else replicas,
            "updatedReplicas": desired if updated is None else updated,
            "readyReplicas": ready,
            "availableReplicas": ready if available is None else available,
            "conditions": conditions or [],
        },
    }


def pod(
    name: str = "chat-1",
    *,
    ready: bool = False,
    init: list[dict[str, Any]] | None = None,
    containers: list[dict[str, Any]] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    phase: str = "Pending",
    deleting: bool = False,
) -> dict[str, Any]:
    conds = list(conditions or [])
    conds.append({"type": "Ready", "status": "True" if ready else "False"})
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = EARLIER
    return {
        "metadata": meta,
        "status": {
            "phase": phase,
            "conditions": conds,
            "initContainerStatuses": init or [],
            "containerStatuses": containers or [],
        },
    }


def waiting(name: str, reason: str, message: str = "", **extra: Any) -> dict[str, Any]:
    return {"name": name, "state": {"waiting": {"reason": reason, "message": message}}, **extra}


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_ready_service() -> None:
    status = compute_status(
        isvc(), deployment(2, ready=2), [pod(ready=True), pod("chat-2", ready=True)], now=NOW
    )
    assert status["replicas"] == 2
    assert status["readyReplicas"] == 2
    assert status["desiredReplicas"] == 2
    assert status["observedGeneration"] == 3
    assert status["selector"] == (
        "app.kubernetes.io/instance=chat,app.kubernetes.io/name=llamaherd-server"
    )
    assert status["endpoint"] == "http://chat.ml.svc.cluster.local:80"
    c = conditions(status)
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("True", "ReplicasReady")
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("False", "Complete")
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("False", "AsExpected")
    assert (c["ModelLoading"]["status"], c["ModelLoading"]["reason"]) == ("False", "ModelLoaded")
    assert all(item["lastTransitionTime"] == "2026-01-02T03:04:05Z" for item in c.values())
    assert all(item["observedGeneration"] == 3 for item in c.values())


def test_no_deployment_yet() -> None:
    status = compute_status(isvc(replicas=2), None, [], now=NOW)
    c = conditions(status)
    assert status["desiredReplicas"] == 2
    assert "observedGeneration" not in status
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "Creating")
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("True", "Creating")


@pytest.mark.parametrize(
    ("dep", "reason", "status_value"),
    [
        (deployment(3, ready=1, updated=1, replicas=3), "RollingOut", "True"),
        (deployment(2, ready=2, updated=2, replicas=3), "RollingOut", "True"),
        (deployment(2, ready=1, available=1), "WaitingForReplicas", "True"),
        (deployment(2, generation=2, observed=1), "RolloutPending", "True"),
        (
            deployment(
                1,
                conditions=[
                    {
                        "type": "Progressing",
                        "status": "False",
                        "reason": "ProgressDeadlineExceeded",
                        "message": "stuck",
                    }
                ],
            ),
            "ProgressDeadlineExceeded",
            "False",
        ),
    ],
)
def test_progressing(dep: dict[str, Any], reason: str, status_value: str) -> None:
    c = conditions(compute_status(isvc(), dep, [], now=NOW))
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == (status_value, reason)


def test_scaled_to_zero() -> None:
    c = conditions(compute_status(isvc(replicas=0), deployment(0), [], now=NOW))
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "ScaledToZero")


def test_model_download_failed() -> None:
    failing = pod(
        init=[
            {
                "name": names.DOWNLOAD_CONTAINER,
                "restartCount": 2,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                "lastState": {
                    "terminated": {
                        "exitCode": 1,
                        "message": "[model-download] downloading...\n"
                        "[model-download] model download failed: HTTP 404 Not Found from "
                        "https://h.example/m.gguf\n",
                    }
                },
            }
        ]
    )
    status = compute_status(isvc(), deployment(1), [failing], now=NOW)
    c = conditions(status)
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("True", "ModelDownloadFailed")
    assert "HTTP 404 Not Found" in c["Degraded"]["message"]
    assert "failed 3 times" in c["Degraded"]["message"]
    assert c["Ready"]["reason"] == "ModelDownloadFailed"
    assert (c["ModelLoading"]["status"], c["ModelLoading"]["reason"]) == (
        "False",
        "ModelDownloadFailed",
    )


LOAD_FAILURE = (
    "model load failed: /models/m.gguf: not a GGUF file (starts with b'<htm', a GGUF file "
    "starts with b'GGUF'; 1234 bytes)"
)


@pytest.mark.parametrize(
    "server_status",
    [
        # Restarting after the failure: CrashLoopBackOff, the message in lastState.
        waiting(
            "server",
            "CrashLoopBackOff",
            "back-off 10s restarting failed container",
            restartCount=2,
            lastState={"terminated": {"exitCode": 1, "message": LOAD_FAILURE}},
        ),
        # Just ended, not restarted yet: the message in state.terminated.
        {"name": "server", "state": {"terminated": {"exitCode": 1, "message": LOAD_FAILURE}}},
        # Starting again: running, not ready, the last run's message in lastState.
        {
            "name": "server",
            "state": {"running": {}},
            "ready": False,
            "restartCount": 1,
            "lastState": {"terminated": {"exitCode": 1, "message": LOAD_FAILURE}},
        },
        # FallbackToLogsOnError: no message file, the log's tail (with its timestamps).
        waiting(
            "server",
            "CrashLoopBackOff",
            lastState={
                "terminated": {
                    "exitCode": 1,
                    "message": "2026-01-02 03:04:05 INFO llamaherd.api: llama.cpp threads: 2\n"
                    "2026-01-02 03:04:05 ERROR llamaherd.engine: " + LOAD_FAILURE + "\n",
                }
            },
        ),
    ],
)
def test_model_load_failed(server_status: dict[str, Any]) -> None:
    status = compute_status(isvc(), deployment(1), [pod(containers=[server_status])], now=NOW)
    c = conditions(status)
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("True", "ModelLoadFailed")
    assert LOAD_FAILURE in c["Degraded"]["message"]
    assert "pod chat-1, container server" in c["Degraded"]["message"]
    assert c["Ready"]["reason"] == "ModelLoadFailed"
    assert c["ModelLoading"]["status"] == "False" or c["ModelLoading"]["reason"] == "ModelLoading"


def test_model_load_failed_message_is_trimmed_and_counts_failures() -> None:
    long = "model load failed: /models/m.gguf: " + "x" * 5000
    crashing = waiting(
        "server",
        "CrashLoopBackOff",
        restartCount=4,
        lastState={"terminated": {"exitCode": 1, "message": long}},
    )
    c = conditions(compute_status(isvc(), deployment(1), [pod(containers=[crashing])], now=NOW))
    assert c["Degraded"]["reason"] == "ModelLoadFailed"
    assert len(c["Degraded"]["message"]) <= 1024
    assert "failed 5 times" in c["Degraded"]["message"]
    assert c["Degraded"]["message"].endswith("...")
    assert (c["ModelLoading"]["status"], c["ModelLoading"]["reason"]) == (
        "False",
        "ModelLoadFailed",
    )


def test_other_crashes_are_not_load_failures() -> None:
    crashing = waiting(
        "server",
        "CrashLoopBackOff",
        lastState={"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
    )
    other = waiting(
        "sidecar",
        "CrashLoopBackOff",
        lastState={"terminated": {"exitCode": 1, "message": LOAD_FAILURE}},
    )
    for container in (crashing, other):
        c = conditions(
            compute_status(isvc(), deployment(1), [pod(containers=[container])], now=NOW)
        )
        assert c["Degraded"]["reason"] == "CrashLoopBackOff"
    # A download failure is still the most telling: it explains the load failure.
    both = pod(
        init=[
            {
                "name": names.DOWNLOAD_CONTAINER,
                "state": {"terminated": {"exitCode": 1, "message": "HTTP 404"}},
            }
        ],
        containers=[
            waiting(
                "server",
                "CrashLoopBackOff",
                lastState={"terminated": {"exitCode": 1, "message": LOAD_FAILURE}},
            )
        ],
    )
    c = conditions(compute_status(isvc(), deployment(1), [both], now=NOW))
    assert c["Degraded"]["reason"] == "ModelDownloadFailed"


@pytest.mark.parametrize(
    ("the_pod", "reason", "needle"),
    [
        (
            pod(containers=[waiting("server", "ImagePullBackOff", "pull access denied")]),
            "ImagePullBackOff",
            "pull access denied",
        ),
        (
            pod(init=[waiting(names.DOWNLOAD_CONTAINER, "ErrImagePull", "not found")]),
            "ImagePullBackOff",
            "init container model-download",
        ),
        (
            pod(
                containers=[
                    waiting(
                        "server",
                        "CrashLoopBackOff",
                        lastState={"terminated": {"exitCode": 2, "message": "bad gguf"}},
                    )
                ]
            ),
            "CrashLoopBackOff",
            "exit code 2: bad gguf",
        ),
        (
            pod(
                containers=[waiting("server", "CreateContainerConfigError", 'secret "k" not found')]
            ),
            "CreateContainerConfigError",
            'secret "k" not found',
        ),
        (
            pod(
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    }
                ]
            ),
            "InsufficientGPU",
            "nvidia.com/gpu",
        ),
        (
            pod(
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "no nodes available to schedule pods",
                    }
                ]
            ),
            "Unschedulable",
            "no nodes available",
        ),
    ],
)
def test_pod_problems(the_pod: dict[str, Any], reason: str, needle: str) -> None:
    c = conditions(compute_status(isvc(gpu={"count": 1}), deployment(1), [the_pod], now=NOW))
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("True", reason)
    assert needle in c["Degraded"]["message"]
    assert c["Ready"]["status"] == "False"


def test_most_telling_problem_first_and_counted() -> None:
    pods = [
        pod(
            "a",
            conditions=[
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "x",
                }
            ],
        ),
        pod("b", containers=[waiting("server", "ImagePullBackOff")]),
    ]
    problems = pod_problems(pods, "nvidia.com/gpu")
    assert [p.reason for p in problems] == ["ImagePullBackOff", "Unschedulable"]
    c = conditions(compute_status(isvc(), deployment(2), pods, now=NOW))
    assert c["Degraded"]["reason"] == "ImagePullBackOff"
    assert c["Degraded"]["message"].endswith("(and 1 more)")


def test_ready_and_deleted_pods_are_not_problems() -> None:
    pods = [
        pod("a", ready=True, containers=[waiting("server", "CrashLoopBackOff")]),
        pod("b", deleting=True, containers=[waiting("server", "ImagePullBackOff")]),
        pod("c", phase="Failed", containers=[waiting("server", "ImagePullBackOff")]),
    ]
    assert pod_problems(pods, "nvidia.com/gpu") == []


def test_operator_problems_come_first() -> None:
    problem = Problem("ModelPVCNotFound", "PersistentVolumeClaim ml/models not found")
    c = conditions(
        compute_status(
            isvc(),
            deployment(1),
            [pod(containers=[waiting("server", "ImagePullBackOff")])],
            problems=[problem],
            now=NOW,
        )
    )
    assert c["Degraded"]["reason"] == "ModelPVCNotFound"


@pytest.mark.parametrize(
    ("the_pod", "reason"),
    [
        (
            pod(init=[{"name": names.DOWNLOAD_CONTAINER, "state": {"running": {}}}]),
            "ModelDownloading",
        ),
        (
            pod(containers=[{"name": "server", "state": {"running": {}}, "ready": False}]),
            "ModelLoading",
        ),
    ],
)
def test_model_loading(the_pod: dict[str, Any], reason: str) -> None:
    c = conditions(compute_status(isvc(), deployment(1), [the_pod], now=NOW))
    assert (c["ModelLoading"]["status"], c["ModelLoading"]["reason"]) == ("True", reason)
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", reason)
    assert c["Degraded"]["status"] == "False"


def test_transition_time_kept_while_status_unchanged() -> None:
    old = [
        {"type": "Ready", "status": "False", "reason": "A", "lastTransitionTime": EARLIER},
        {"type": "Degraded", "status": "False", "reason": "B", "lastTransitionTime": EARLIER},
    ]
    new = [
        {"type": "Ready", "status": "False", "reason": "C", "message": ""},
        {"type": "Degraded", "status": "True", "reason": "D", "message": ""},
    ]
    merged = {c["type"]: c for c in merge_conditions(old, new, now=NOW, generation=4)}
    assert merged["Ready"]["lastTransitionTime"] == EARLIER
    assert merged["Ready"]["reason"] == "C"
    assert merged["Degraded"]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert merged["Degraded"]["observedGeneration"] == 4


def test_same_status_ignores_conditions_owned_by_others() -> None:
    new = compute_status(isvc(), deployment(1, ready=1), [pod(ready=True)], now=NOW)
    old = {
        **new,
        "conditions": [*new["conditions"], {"type": "ScalingActive", "status": "True"}],
        "queueDepth": 3.0,
    }
    assert same_status(old, new)
    later = compute_status(
        isvc(status=old),
        deployment(1, ready=1),
        [pod(ready=True)],
        now=NOW + dt.timedelta(minutes=5),
    )
    assert same_status(old, later)  # nothing changed: no write, no new transition times
    assert not same_status(old, {**new, "readyReplicas": 0})


def test_transition_events() -> None:
    ready = compute_status(isvc(), deployment(1, ready=1), [pod(ready=True)], now=NOW)
    broken = compute_status(
        isvc(), deployment(1), [pod(containers=[waiting("server", "CrashLoopBackOff")])], now=NOW
    )
    assert transition_events(None, ready) == [Event("Normal", "Ready", "1 of 1 replicas ready")]
    events = transition_events(ready, broken)
    assert [(e.type, e.reason) for e in events] == [
        ("Warning", "NotReady"),
        ("Warning", "CrashLoopBackOff"),
    ]
    assert [(e.type, e.reason) for e in transition_events(broken, ready)] == [
        ("Normal", "Ready"),
        ("Normal", "Recovered"),
    ]
    assert transition_events(ready, ready) == []


def test_autoscaler_status_keeps_the_transition_time() -> None:
    at = [dt.datetime(2026, 1, 1, 0, minute, 0, tzinfo=dt.UTC) for minute in range(3)]
    held = Decision(2, 2, "MetricsUnavailable", "no metrics", scaling_active=False)
    first = autoscaler_status({}, held, None, 1, now=at[0])
    later = autoscaler_status(first, held, None, 1, now=at[1])
    assert later["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    up = Decision(3, 2, "ScaleUp", "queue")
    scaled = autoscaler_status(later, up, None, 1, now=at[2])
    assert scaled["lastScaleTime"] == "2026-01-01T00:02:00Z"
    assert scaled["scalingDecisions"][-1]["to"] == 3
    assert scaled["conditions"][0]["status"] == "True"
    assert scaled["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:02:00Z"


def test_autoscaler_status_fields() -> None:
    signals = Metrics(waiting=7, running=3, ready=1, latency_p95_s=1.23456)
    steady = Decision(1, 1, "Steady", "1 replicas fit the load")
    status = autoscaler_status({}, steady, signals, 4, now=NOW)
    assert status == {
        "queueDepth": 7.0,
        "latencyP95Ms": 1234.6,
        "conditions": [
            {
                "type": "ScalingActive",
                "status": "True",
                "reason": "Steady",
                "message": "1 replicas fit the load",
                "lastTransitionTime": "2026-01-02T03:04:05Z",
                "observedGeneration": 4,
            }
        ],
    }
    # Without signals (Prometheus down) the last queue depth stays (as before the move to this
    # module, the latency does not); with signals but no latency, the last latency stays.
    held = Decision(1, 1, "MetricsUnavailable", "down", scaling_active=False)
    kept = autoscaler_status(status, held, None, 4, now=NOW)
    assert kept["queueDepth"] == 7.0
    no_latency = autoscaler_status(status, steady, Metrics(0, 0, 1), 4, now=NOW)
    assert (no_latency["queueDepth"], no_latency["latencyP95Ms"]) == (0.0, 1234.6)
    # Only the ScalingActive condition is the autoscaler's; the reconcile's stay out of it.
    mixed = {"conditions": [{"type": "Ready", "status": "True"}, *status["conditions"]]}
    assert [c["type"] for c in autoscaler_status(mixed, steady, None, 4)["conditions"]] == [
        "ScalingActive"
    ]


def test_autoscaler_status_keeps_the_last_decisions() -> None:
    status: dict[str, Any] = {}
    for step in range(MAX_DECISIONS + 3):
        up = Decision(step + 2, step + 1, "ScaleUp", "x" * 2000)
        status = autoscaler_status(status, up, None, 1, now=NOW)
    decisions = status["scalingDecisions"]
    assert len(decisions) == MAX_DECISIONS
    assert decisions[-1]["to"] == MAX_DECISIONS + 4
    assert decisions[0]["from"] == 4
    assert len(decisions[-1]["message"]) == 1000
