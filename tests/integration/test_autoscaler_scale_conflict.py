"""The autoscaler's scale writes against the real kube-apiserver: a write decided on an older
version of the InferenceService is refused (409), and the newer replica count wins.

Real: the control plane's kube-apiserver and etcd, the CRD from crds/, the operator's
``autoscale_once`` and its Kube module over lightkube. Stand-in: the Prometheus signals (a fixed
queue in burst), so the decision is known; another writer's ``kubectl scale`` is run between
the autoscaler's read and its write.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from lightkube import AsyncClient, KubeConfig

from llamaherd_operator import autoscaler
from llamaherd_operator.kube import Kube
from llamaherd_operator.metrics import OperatorMetrics
from llamaherd_operator.policy import Metrics
from tests.harness.controlplane import ControlPlane

pytestmark = pytest.mark.cluster

NAME = "herd"
BURST = Metrics(waiting=20, running=16, ready=2)  # on 2 replicas: 2 -> 5 at once


class SignalsInBurst:
    """Prometheus as the autoscaler reads it, with fixed answers."""

    async def service_metrics(self, url: str, queries: Any, **_: Any) -> Metrics:
        return BURST

    async def held_requests(self, url: str, query: str) -> float:
        return 0.0


class Interfered(Kube):
    """The real Kube module; before its first scale write another client scales the service."""

    def __init__(self, client: AsyncClient, cp: ControlPlane, namespace: str, to: int | None):
        super().__init__(client)
        self.cp, self.namespace, self.to = cp, namespace, to
        self.writes: list[tuple[int, str, bool]] = []  # (replicas, resourceVersion, written)

    async def scale_inference_service(
        self, namespace: str, name: str, replicas: int, field_manager: str, resource_version: str
    ) -> bool:
        if self.to is not None:
            proc = self.cp.kubectl(
                "scale", f"lhis/{name}", "-n", namespace, f"--replicas={self.to}"
            )
            assert proc.returncode == 0, proc.stderr
            self.to = None
        written = await super().scale_inference_service(
            namespace, name, replicas, field_manager, resource_version
        )
        self.writes.append((replicas, resource_version, written))
        return written


@pytest.fixture
def namespace(control_plane: ControlPlane, operator_crd: None) -> Iterator[str]:
    name = f"sc-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name, check=True)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false")


def create_service(cp: ControlPlane, namespace: str) -> dict[str, Any]:
    body = {
        "apiVersion": "llamaherd.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": NAME, "namespace": namespace},
        "spec": {
            "model": {"url": "https://models.example/tiny.gguf"},
            "replicas": 2,
            "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 8},
        },
    }
    cp.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(body), check=True)
    return get_service(cp, namespace)


def get_service(cp: ControlPlane, namespace: str) -> dict[str, Any]:
    out = cp.kubectl(
        "get", "lhis", NAME, "-n", namespace, "-o", "json", "--show-managed-fields", check=True
    ).stdout
    return dict(json.loads(out))


def one_period(
    cp: ControlPlane, namespace: str, snapshot: dict[str, Any], interfere_to: int | None
) -> tuple[Any, list[tuple[int, str, bool]]]:
    async def run() -> tuple[Any, list[tuple[int, str, bool]]]:
        client = AsyncClient(config=KubeConfig.from_file(cp.kubeconfig))
        kube = Interfered(client, cp, namespace, interfere_to)
        state = autoscaler.AutoscalerState(
            prometheus=SignalsInBurst(),  # type: ignore[arg-type]
            metrics=OperatorMetrics(),
            prometheus_url="http://127.0.0.1:9",
            selector_template='namespace="{namespace}",service="{name}"',
            staleness_s=60,
        )
        try:
            decision = await autoscaler.autoscale_once(snapshot, state, kube)
        finally:
            await client.close()
        return decision, kube.writes

    return asyncio.run(run())


def test_a_scale_write_on_the_version_read_lands(
    control_plane: ControlPlane, namespace: str
) -> None:
    """Nobody else writes: the conditional write (the object's resourceVersion, sent to the
    scale subresource) is accepted, and the service goes 2 -> 5."""
    snapshot = create_service(control_plane, namespace)
    decision, writes = one_period(control_plane, namespace, snapshot, interfere_to=None)
    assert [(replicas, written) for replicas, _, written in writes] == [(5, True)]
    assert (decision.current, decision.desired, decision.reason) == (2, 5, "BurstScaleUp")
    obj = get_service(control_plane, namespace)
    assert obj["spec"]["replicas"] == 5
    assert any(
        f["manager"] == "llamaherd-autoscaler" and f.get("subresource") == "scale"
        for f in obj["metadata"]["managedFields"]
    )


def test_a_newer_scale_wins_over_a_write_decided_before_it(
    control_plane: ControlPlane, namespace: str
) -> None:
    """The autoscaler reads 2 and decides 5; ``kubectl scale --replicas=6`` lands before its
    write. The API server refuses the write (409), the autoscaler reads 6 and decides again
    (the burst holds it at 6): 6 stays, and no 5 was ever written."""
    snapshot = create_service(control_plane, namespace)
    decision, writes = one_period(control_plane, namespace, snapshot, interfere_to=6)
    ((replicas, version, written),) = writes
    assert (replicas, written) == (5, False), "the write decided on 2 replicas was accepted"
    assert version == snapshot["metadata"]["resourceVersion"]  # what it read, before 6
    assert (decision.current, decision.desired, decision.reason) == (6, 6, "Burst")
    obj = get_service(control_plane, namespace)
    assert obj["spec"]["replicas"] == 6
    assert all(d["to"] != 5 for d in obj.get("status", {}).get("scalingDecisions") or [])
