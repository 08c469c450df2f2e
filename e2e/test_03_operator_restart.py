"""Scenario 3: the operator pod is deleted under load; replicas hold and the new one takes over."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from e2e.conftest import Chart
from e2e.kube import Kube, event_time, pod_ready, wait_for
from e2e.support import (
    AUTOSCALER_REASONS,
    OPERATOR_SELECTOR,
    RELEASE_NAMESPACE,
    Models,
    ReplicaWatch,
    deploy,
    get_lhis,
    lhis_state,
    load_service,
    operator_pod,
    scaling_story,
)
from e2e.test_02_autoscaling import AUTOSCALING, autoscaled_service

pytestmark = pytest.mark.e2e


def _time(text: str | None) -> dt.datetime:
    return dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))


@pytest.mark.timeout(900)
def test_operator_restart_under_load(
    kube: Kube, operator: Chart, models: Models, namespace: str
) -> None:
    """With the service scaled up under load, deleting the operator pod never lowers the replica
    count while the load runs; the new operator posts its own decisions and, after the load,
    scales back to minReplicas, keeping the decisions made before the restart."""
    name = "restart"
    deploy(kube, autoscaled_service(name, namespace, models), scaling_active=True)
    watch = ReplicaWatch(kube, name, namespace)
    load = load_service(
        kube, name, namespace, concurrency=8, requests=800, duration=240, max_tokens=64
    )

    def scaled_up() -> bool:
        spec, deployment, _ = watch.sample()
        return (spec or 0) >= 2 and deployment == spec

    wait_for(
        scaled_up,
        timeout=300,
        interval=1.0,
        description="the autoscaler to scale up under load (and the Deployment to follow)",
        state=lambda: (watch.story(), lhis_state(kube, name, namespace)),
    )
    before = get_lhis(kube, name, namespace)["status"].get("scalingDecisions") or []
    assert before, "a scale-up decision is recorded before the restart"

    old = operator_pod(kube)
    deleted_at = time.monotonic()
    kube.delete("pod", old["metadata"]["name"], RELEASE_NAMESPACE, wait=False)
    floor = watch.samples[-1][1] or 0

    def new_operator() -> dict | None:
        watch.sample()
        pods = kube.pods(RELEASE_NAMESPACE, OPERATOR_SELECTOR)
        fresh = [p for p in pods if p["metadata"]["uid"] != old["metadata"]["uid"] and pod_ready(p)]
        return fresh[0] if fresh else None

    new = wait_for(
        new_operator,
        timeout=240,
        interval=1.0,
        description="a new Ready operator pod",
        state=lambda: kube.kubectl("get", "pods", "-o", "wide", "-n", RELEASE_NAMESPACE).stdout,
    )
    new_start = _time(new["metadata"]["creationTimestamp"])

    def new_operator_decided() -> bool:
        watch.sample()
        return any(
            e.get("reason") in AUTOSCALER_REASONS and _time(event_time(e)) >= new_start
            for e in kube.events(namespace, name=name, kind="InferenceService")
        )

    wait_for(
        new_operator_decided,
        timeout=120,
        interval=1.0,
        description="an autoscaling Event from the new operator",
        state=lambda: scaling_story(kube, name, namespace),
    )
    assert load.phase() == "Running", "the load ended before the new operator took over"

    served = len(load.output().ok)
    wait_for(
        lambda: watch.sample() and len(load.output().ok) >= served + 5,
        timeout=180,
        interval=1.0,
        description="more requests served after the restart",
    )
    load.stop()
    stopped_at = time.monotonic()
    result = load.wait_done(timeout=300)
    since_delete = [
        min(s[1] or 0, s[2] or 0) for s in watch.samples if deleted_at <= s[0] <= stopped_at
    ]
    assert since_delete, watch.story()
    assert min(since_delete) >= floor, f"replicas fell below {floor} under load:\n{watch.story()}"
    assert result.summary["failed"] == 0, result.failed[:5]

    wait_for(
        lambda: watch.sample()[:2] == (1, 1),
        timeout=300,
        description="the new operator to scale back to minReplicas",
        state=lambda: (watch.story(), scaling_story(kube, name, namespace)),
    )
    print(f"\n[e2e] replicas over time:\n{watch.story()}\n{scaling_story(kube, name, namespace)}")
    after = get_lhis(kube, name, namespace)["status"]["scalingDecisions"]
    assert before[0] in after or len(after) == 10, "the decisions before the restart are kept"
    assert after[-1]["to"] == 1 and after[-1]["reason"] == "ScaleDown", after
    assert watch.highest() <= AUTOSCALING["maxReplicas"], watch.story()
