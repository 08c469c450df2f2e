"""Scenario 8: deleting an InferenceService removes what it owns; helm uninstall the operator.

The chart is installed again by the ``operator`` fixture of any test that runs after this one.
"""

from __future__ import annotations

import pytest

from e2e.conftest import Chart
from e2e.kube import LHIS, Kube, wait_for
from e2e.support import (
    OPERATOR_SELECTOR,
    RELEASE,
    RELEASE_NAMESPACE,
    Models,
    deploy,
    inference_service,
    server_selector,
)
from e2e.test_02_autoscaling import AUTOSCALING

pytestmark = pytest.mark.e2e

OWNED_KINDS = "deployments,replicasets,services,poddisruptionbudgets,pods"
RELEASE_KINDS = (
    "deployments,replicasets,pods,services,serviceaccounts,configmaps,roles,rolebindings"
)


def _owned_by(kube: Kube, namespace: str, uids: set[str]) -> list[str]:
    """Objects in ``namespace`` owned (directly or through a ReplicaSet) by ``uids``."""
    found = []
    owners = set(uids)
    items = kube.items(OWNED_KINDS, namespace)
    for _ in range(3):  # Deployment -> ReplicaSet -> Pod
        for item in items:
            refs = {ref["uid"] for ref in item["metadata"].get("ownerReferences", [])}
            if refs & owners:
                owners.add(item["metadata"]["uid"])
    for item in items:
        refs = {ref["uid"] for ref in item["metadata"].get("ownerReferences", [])}
        if refs & owners:
            found.append(f"{item['kind']}/{item['metadata']['name']}")
    return found


@pytest.mark.timeout(900)
def test_delete_then_uninstall(kube: Kube, operator: Chart, models: Models, namespace: str) -> None:
    """Deleting an InferenceService (autoscaled, two replicas) removes its Deployment, pods,
    Service and PodDisruptionBudget; `helm uninstall` then removes the operator and
    everything the release made, and leaves the CRD (Helm never deletes crds/)."""
    name = "doomed"
    deploy(
        kube,
        inference_service(name, namespace, models, replicas=2, autoscaling=AUTOSCALING),
        pods=1,
    )
    obj = kube.get(LHIS, name, namespace)
    assert obj is not None
    uid = obj["metadata"]["uid"]
    for kind in ("deployment", "service", "poddisruptionbudget"):
        assert kube.get(kind, name, namespace) is not None, f"no {kind} {name}"
    owned = _owned_by(kube, namespace, {uid})
    assert any(o.startswith("Pod/") for o in owned), owned

    kube.delete(LHIS, name, namespace, wait=True, timeout=180)
    wait_for(
        lambda: (
            not _owned_by(kube, namespace, {uid})
            and not kube.pods(namespace, server_selector(name))
            and all(
                kube.get(k, name, namespace) is None
                for k in ("deployment", "service", "poddisruptionbudget")
            )
        ),
        timeout=180,
        description=f"every object owned by {name} to be gone",
        state=lambda: _owned_by(kube, namespace, {uid}),
    )

    kube.helm(
        "uninstall",
        RELEASE,
        "--namespace",
        RELEASE_NAMESPACE,
        "--wait",
        "--timeout",
        "3m",
        timeout=240,
    )
    selector = f"app.kubernetes.io/instance={RELEASE}"
    wait_for(
        lambda: (
            not kube.items(RELEASE_KINDS, RELEASE_NAMESPACE, selector=selector)
            and not kube.pods(RELEASE_NAMESPACE, OPERATOR_SELECTOR)
        ),
        timeout=180,
        description="the release's objects to be gone",
        state=lambda: [
            f"{o['kind']}/{o['metadata']['name']}"
            for o in kube.items(RELEASE_KINDS, RELEASE_NAMESPACE, selector=selector)
        ],
    )
    cluster_scoped = kube.items("clusterroles,clusterrolebindings", None, selector=selector)
    assert not cluster_scoped, [o["metadata"]["name"] for o in cluster_scoped]
    releases = kube.helm("list", "--namespace", RELEASE_NAMESPACE, "-q").stdout.split()
    assert RELEASE not in releases, releases
    assert kube.get("crd", LHIS) is not None, "helm uninstall must keep the CRD"
