"""Scenario 2: load from a pod in the cluster scales real pods up, and back down after it."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from e2e.conftest import Chart
from e2e.kube import Kube, Obj, wait_for
from e2e.support import (
    SCALE_UP_REASONS,
    Models,
    ReplicaWatch,
    deploy,
    get_lhis,
    inference_service,
    lhis_state,
    load_service,
    scaling_story,
)

pytestmark = pytest.mark.e2e

# Small enough to move within a test on 2 CPUs; metricsWindowSeconds is the CRD's minimum.
AUTOSCALING = {
    "minReplicas": 1,
    "maxReplicas": 3,
    "targetQueueDepthPerReplica": 1,
    "scaleUpStabilizationSeconds": 0,
    "scaleDownStabilizationSeconds": 20,
    "metricsWindowSeconds": 10,
}


def autoscaled_service(name: str, namespace: str, models: Models) -> Obj:
    """The small model's InferenceService, autoscaled by AUTOSCALING from one replica."""
    return inference_service(
        name, namespace, models, file="small.gguf", replicas=None, autoscaling=AUTOSCALING
    )


@pytest.mark.timeout(900)
def test_load_scales_up_and_back_down(
    kube: Kube,
    operator: Chart,
    models: Models,
    namespace: str,
    record_property: Callable[[str, object], None],
) -> None:
    """A queue from in-cluster load drives spec.replicas from 1 to at least 2 with Ready pods,
    never above maxReplicas; after the load it returns to minReplicas; the decisions and Events
    tell the story."""
    name = "scaler"
    deploy(kube, autoscaled_service(name, namespace, models), scaling_active=True)
    watch = ReplicaWatch(kube, name, namespace)
    load = load_service(
        kube, name, namespace, concurrency=8, requests=600, duration=180, max_tokens=64
    )
    assert load.started_at is not None
    started = load.started_at

    wait_for(
        lambda: watch.sample()[2] >= 2,
        timeout=300,
        interval=1.0,
        description="a second Ready pod under load",
        state=lambda: (watch.story(), lhis_state(kube, name, namespace)),
    )
    scale_up_s = time.monotonic() - started
    record_property("scale_up_to_second_ready_pod_seconds", round(scale_up_s, 1))
    print(f"\n[e2e] load start -> second Ready pod: {scale_up_s:.1f}s")

    # Let the new pod take some of the load, then stop it.
    served = len(load.output().ok)
    load.wait_ok(served + 8, timeout=180)
    load.stop()
    result = load.wait_done(timeout=300)
    assert result.summary["failed"] == 0, result.failed[:5]
    assert result.summary["ok"] >= 10, result.summary

    wait_for(
        lambda: watch.sample()[:2] == (1, 1) and watch.samples[-1][3] == 1,
        timeout=300,
        description="the service back at minReplicas (1) after the load",
        state=lambda: (watch.story(), scaling_story(kube, name, namespace)),
    )
    story = scaling_story(kube, name, namespace)
    print(f"[e2e] replicas over time:\n{watch.story()}\n{story}")

    assert watch.highest() <= AUTOSCALING["maxReplicas"], watch.story()
    assert watch.highest() >= 2, watch.story()

    decisions = get_lhis(kube, name, namespace)["status"]["scalingDecisions"]
    ups = [i for i, d in enumerate(decisions) if d["to"] > d["from"]]
    downs = [i for i, d in enumerate(decisions) if d["to"] < d["from"]]
    assert ups and downs, story
    assert decisions[ups[0]]["reason"] in SCALE_UP_REASONS, story
    assert decisions[downs[-1]]["to"] == 1 and decisions[downs[-1]]["reason"] == "ScaleDown", story
    assert ups[0] < downs[-1], story
    assert all(d["to"] <= AUTOSCALING["maxReplicas"] for d in decisions), story

    reasons = [e.get("reason") for e in kube.events(namespace, name=name, kind="InferenceService")]
    assert SCALE_UP_REASONS & set(reasons), story
    assert "ScaleDown" in reasons, story
