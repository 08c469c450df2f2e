"""Scenario 10: through the gateway, a model at zero replicas answers its first request from a
pod in the cluster, and goes back to zero when idle."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.conftest import Chart
from e2e.kube import Kube, pod_ready, wait_for
from e2e.support import (
    GATEWAY_SELECTOR,
    GATEWAY_SERVICE,
    GATEWAY_URL,
    RELEASE_NAMESPACE,
    LoadPod,
    Models,
    deployment_replicas,
    get_lhis,
    inference_service,
    lhis_state,
    load_args,
    ready_pods,
    scaling_story,
    wait_condition,
)

pytestmark = pytest.mark.e2e

# scaleToZeroIdleSeconds is the CRD's minimum; metricsWindowSeconds too.
AUTOSCALING = {
    "minReplicas": 0,
    "maxReplicas": 1,
    "scaleToZeroIdleSeconds": 30,
    "scaleDownStabilizationSeconds": 20,
    "metricsWindowSeconds": 10,
}


def gateway_get(kube: Kube, path: str) -> str:
    """GET on the gateway's Service through the API server's service proxy."""
    raw = f"/api/v1/namespaces/{RELEASE_NAMESPACE}/services/{GATEWAY_SERVICE}:80/proxy{path}"
    return kube.kubectl("get", "--raw", raw).stdout


def gateway_metric(kube: Kube, name: str, **labels: str) -> float:
    text = gateway_get(kube, "/metrics")
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _time(stamp: str | None) -> float:
    assert stamp, "a timestamp is missing"
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def cold_start_phases(load_pod: dict[str, Any], server_pod: dict[str, Any]) -> dict[str, float]:
    """First request to its answer at zero replicas, split at the pod's own timestamps:
    scale-up (the request until the pod object exists: the gateway's write, the reconcile, the
    ReplicaSet), pod start (scheduling, the model download in the init container, the server
    container starting), model load (until the pod is Ready) and the rest (the endpoint
    reaching the gateway, the forward and the generation)."""
    (load,) = load_pod["status"]["containerStatuses"]
    request = _time(load["state"]["terminated"]["startedAt"])
    answer = _time(load["state"]["terminated"]["finishedAt"])
    server = next(c for c in server_pod["status"]["containerStatuses"] if c["name"] == "server")
    created = _time(server_pod["metadata"]["creationTimestamp"])
    started = _time(server["state"]["running"]["startedAt"])
    ready = _time(
        next(
            c["lastTransitionTime"]
            for c in server_pod["status"]["conditions"]
            if c["type"] == "Ready"
        )
    )
    return {
        "scale_up": created - request,
        "pod_start": started - created,
        "model_load": ready - started,
        "forward_and_generation": answer - ready,
        "total": answer - request,
    }


@pytest.mark.timeout(900)
def test_a_model_at_zero_answers_through_the_gateway_and_returns_to_zero(
    kube: Kube,
    operator: Chart,
    models: Models,
    namespace: str,
    record_property: Callable[[str, object], None],
) -> None:
    """An InferenceService with minReplicas 0 rests at zero (Ready False, ScaledToZero); one chat
    completion through the gateway's Service makes the gateway raise it to one and hold the
    request until the pod is Ready, and the official openai client in a pod gets its answer;
    after scaleToZeroIdleSeconds without requests the autoscaler takes it back to zero."""
    wait_for(
        lambda: any(pod_ready(p) for p in kube.pods(RELEASE_NAMESPACE, GATEWAY_SELECTOR)),
        timeout=180,
        description="a Ready gateway pod (gateway.enabled in examples/helm/kind-values.yaml)",
    )
    name = "sleepy"
    kube.apply(
        inference_service(
            name, namespace, models, file="tiny.gguf", replicas=0, autoscaling=AUTOSCALING
        )
    )
    wait_condition(kube, name, namespace, "Ready", "False", reason="ScaledToZero", timeout=180)
    assert not ready_pods(kube, name, namespace)
    # The gateway lists the model at zero replicas.
    wait_for(
        lambda: name in {m["id"] for m in json.loads(gateway_get(kube, "/v1/models"))["data"]},
        timeout=60,
        description=f"the gateway listing {name}",
        state=lambda: gateway_get(kube, "/v1/models"),
    )

    client = LoadPod(
        kube,
        namespace,
        [
            *load_args(
                GATEWAY_URL, mode="once", concurrency=1, requests=1, duration=60, max_tokens=16
            ),
            "--model",
            name,
            "--timeout",
            "400",
        ],
    ).start()
    started = client.wait_running()
    # The gateway raised the service through its scale subresource while it holds the request.
    wait_for(
        lambda: get_lhis(kube, name, namespace)["spec"].get("replicas") == 1,
        timeout=60,
        description="the gateway raising spec.replicas to 1",
        state=lambda: lhis_state(kube, name, namespace),
    )
    result = client.wait_done(timeout=420)
    first_answer_s = time.monotonic() - started
    once = result.once
    assert once is not None, result.raw
    assert once["ok"], once
    assert once["model"] == name, once
    assert once["usage"]["completion_tokens"] == 16, once
    record_property("scale_from_zero_first_answer_seconds", round(first_answer_s, 1))
    print(f"\n[e2e] first request at zero replicas -> answer: {first_answer_s:.1f}s")
    phases = cold_start_phases(client.pod() or {}, ready_pods(kube, name, namespace)[0])
    for phase, seconds in phases.items():
        record_property(f"scale_from_zero_{phase}_seconds", seconds)
    print(f"[e2e] where the time went (cluster timestamps, 1 s resolution): {phases}")
    # Who raised it: the gateway at once, or (if its write lost a race) the autoscaler reading
    # the held request from Prometheus; one of the two, and nobody twice.
    by_gateway = gateway_metric(
        kube,
        "llamaherd_gateway_scale_from_zero_total",
        target_namespace=namespace,
        inferenceservice=name,
    )
    decisions = get_lhis(kube, name, namespace)["status"].get("scalingDecisions") or []
    by_autoscaler = sum(1 for d in decisions if d["reason"] == "ScaleFromZero")
    assert by_gateway + by_autoscaler >= 1, (by_gateway, scaling_story(kube, name, namespace))
    assert by_gateway <= 1, by_gateway
    assert (
        gateway_metric(
            kube,
            "llamaherd_gateway_requests_total",
            model=name,
            outcome="ok",
        )
        == 1
    )
    wait_condition(kube, name, namespace, "Ready", timeout=60)

    # Idle: back to zero, the pod goes, and the decision says why.
    wait_condition(kube, name, namespace, "Ready", "False", reason="ScaledToZero", timeout=300)
    wait_for(
        lambda: (
            deployment_replicas(kube, name, namespace) == 0
            and not kube.pods(namespace, f"app.kubernetes.io/instance={name}")
        ),
        timeout=180,
        description="the Deployment at zero and its pod gone",
        state=lambda: lhis_state(kube, name, namespace),
    )
    story = scaling_story(kube, name, namespace)
    decisions = get_lhis(kube, name, namespace)["status"].get("scalingDecisions") or []
    assert any(d["to"] == 0 and d["reason"] == "ScaledToZero" for d in decisions), story
