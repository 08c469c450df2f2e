"""Scenario 5: a serving pod deleted under load: no accepted request fails."""

from __future__ import annotations

import pytest

from e2e.conftest import Chart
from e2e.kube import Kube, wait_for
from e2e.support import (
    Models,
    deploy,
    inference_service,
    lhis_state,
    load_service,
    ready_pods,
)

pytestmark = pytest.mark.e2e


def _refused(record: dict) -> bool:
    """A request the server did not accept: 503 "draining" (or 429 queue full) before admission."""
    error = str(record.get("error", ""))
    return record.get("status") == 429 or (record.get("status") == 503 and "draining" in error)


@pytest.mark.timeout(900)
def test_pod_deleted_under_load(
    kube: Kube, operator: Chart, models: Models, namespace: str
) -> None:
    """Deleting one of two serving pods while requests flow: the pod leaves the endpoints
    (readiness, preStop) before it drains, so every request it accepted completes and the
    Deployment replaces it."""
    name = "victim"
    pods = deploy(kube, inference_service(name, namespace, models, replicas=2), pods=2)
    load = load_service(
        kube, name, namespace, concurrency=4, requests=3000, duration=300, max_tokens=32
    )
    load.wait_ok(5)

    victim = pods[0]["metadata"]["name"]
    kube.delete("pod", victim, namespace, wait=False)
    wait_for(
        lambda: (
            kube.get("pod", victim, namespace) is None
            and len(
                [p for p in ready_pods(kube, name, namespace) if p["metadata"]["name"] != victim]
            )
            >= 2
        ),
        timeout=300,
        description=f"pod {victim} gone and replaced by a Ready pod",
        state=lambda: lhis_state(kube, name, namespace),
    )
    served = len(load.output().ok)
    load.wait_ok(served + 5)
    load.stop()
    result = load.wait_done(timeout=300)

    refused = [r for r in result.failed if _refused(r)]
    failed = [r for r in result.failed if not _refused(r)]
    assert not failed, failed[:5]
    incomplete = [r for r in result.ok if not r["complete"]]
    assert not incomplete, incomplete[:5]
    assert result.summary["ok"] >= 10, result.summary
    print(
        f"\n[e2e] pod deleted under load: {result.summary}; refused before admission: "
        f"{len(refused)}"
    )
