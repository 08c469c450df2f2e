"""Scenario 6: Prometheus scaled to zero: replicas hold, ScalingActive False; then it resumes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e.conftest import Chart
from e2e.kube import LHIS, Kube, condition, hold_for, pod_ready, wait_for
from e2e.support import (
    PROMETHEUS_DEPLOYMENT,
    RELEASE_NAMESPACE,
    Models,
    ReplicaWatch,
    deploy,
    get_lhis,
    inference_service,
    lhis_state,
    scaling_story,
    wait_condition,
    wait_ready_pods,
)
from e2e.test_02_autoscaling import AUTOSCALING

pytestmark = pytest.mark.e2e


def _scale_prometheus(kube: Kube, replicas: int) -> None:
    kube.kubectl(
        "scale",
        "deployment",
        PROMETHEUS_DEPLOYMENT,
        f"--replicas={replicas}",
        f"--namespace={RELEASE_NAMESPACE}",
    )


def _prometheus_pods(kube: Kube) -> list[dict]:
    deployment = kube.get("deployment", PROMETHEUS_DEPLOYMENT, RELEASE_NAMESPACE)
    assert deployment is not None, "the chart's in-cluster Prometheus is not installed"
    labels = deployment["spec"]["selector"]["matchLabels"]
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    return kube.pods(RELEASE_NAMESPACE, selector)


@pytest.fixture
def prometheus_restored(kube: Kube, operator: Chart) -> Iterator[None]:
    """Prometheus is scaled back to one Ready pod after the test, whatever happens."""
    if kube.get("deployment", PROMETHEUS_DEPLOYMENT, RELEASE_NAMESPACE) is None:
        pytest.fail(
            f"deployment/{PROMETHEUS_DEPLOYMENT} is missing in {RELEASE_NAMESPACE}: install the "
            "chart with prometheus.enabled=true (examples/helm/kind-values.yaml)"
        )
    yield
    _scale_prometheus(kube, 1)
    wait_for(
        lambda: any(pod_ready(p) for p in _prometheus_pods(kube)),
        timeout=180,
        description="Prometheus Ready again",
    )


@pytest.mark.timeout(900)
def test_prometheus_down_holds_replicas(
    kube: Kube, operator: Chart, models: Models, namespace: str, prometheus_restored: None
) -> None:
    """Without Prometheus the autoscaler holds the replicas it has (never drops to the minimum
    for lack of data) and says why in ScalingActive=False/MetricsUnavailable; with Prometheus
    back, ScalingActive turns True and scaling resumes (down to minReplicas, as there is no
    load)."""
    name = "blind"
    service = inference_service(name, namespace, models, replicas=None, autoscaling=AUTOSCALING)
    deploy(kube, service, scaling_active=True)

    _scale_prometheus(kube, 0)
    wait_for(
        lambda: not _prometheus_pods(kube),
        timeout=180,
        description="no Prometheus pod left",
    )
    down = wait_condition(
        kube, name, namespace, "ScalingActive", "False", reason="MetricsUnavailable", timeout=120
    )
    assert down.get("message"), down
    print(f"\n[e2e] without Prometheus: ScalingActive=False {down['reason']}: {down['message']}")

    # Two replicas by hand (the scale subresource): with no metrics they must hold.
    kube.kubectl("scale", LHIS, name, "--replicas=2", f"--namespace={namespace}")
    wait_ready_pods(kube, name, namespace, 2, timeout=300)
    watch = ReplicaWatch(kube, name, namespace)

    def holding() -> bool:
        spec, deployment, _ = watch.sample()
        active = condition(kube.get(LHIS, name, namespace), "ScalingActive")
        return spec == 2 and deployment == 2 and active.get("status") == "False"

    # Longer than the scale-down window plus several autoscaling periods (5 s each).
    hold_for(
        holding,
        seconds=AUTOSCALING["scaleDownStabilizationSeconds"] + 20,
        description="2 replicas held with ScalingActive=False while Prometheus is down",
        state=lambda: (watch.story(), lhis_state(kube, name, namespace)),
    )

    _scale_prometheus(kube, 1)
    wait_for(
        lambda: any(pod_ready(p) for p in _prometheus_pods(kube)),
        timeout=180,
        description="Prometheus Ready again",
    )
    up = wait_condition(kube, name, namespace, "ScalingActive", "True", timeout=180)
    print(f"[e2e] Prometheus back: ScalingActive=True {up.get('reason')}: {up.get('message')}")
    wait_for(
        lambda: watch.sample()[:2] == (1, 1),
        timeout=240,
        description="scaling to resume: back to minReplicas without load",
        state=lambda: (watch.story(), scaling_story(kube, name, namespace)),
    )
    decisions = get_lhis(kube, name, namespace)["status"]["scalingDecisions"]
    assert decisions[-1]["from"] == 2 and decisions[-1]["to"] == 1, decisions
    assert decisions[-1]["reason"] == "ScaleDown", decisions
    reasons = [e.get("reason") for e in kube.events(namespace, name=name, kind="InferenceService")]
    assert "MetricsUnavailable" in reasons, reasons
