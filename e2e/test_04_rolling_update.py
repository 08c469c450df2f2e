"""Scenario 4: a rolling update (a spec.server change) under load loses no request."""

from __future__ import annotations

import pytest

from e2e.conftest import Chart
from e2e.kube import Kube, condition, wait_for
from e2e.support import (
    Models,
    deploy,
    get_lhis,
    inference_service,
    lhis_state,
    load_service,
    server_selector,
)

pytestmark = pytest.mark.e2e

SPEC_HASH = "llamaherd.io/spec-hash"


@pytest.mark.timeout(900)
def test_rolling_update_under_load(
    kube: Kube, operator: Chart, models: Models, namespace: str
) -> None:
    """Changing spec.server.maxWaitMs rolls every pod while a client pod sends requests: every
    request gets a complete answer (all its tokens), none fails, and the service stays Ready."""
    name = "rollout"
    service = inference_service(name, namespace, models, replicas=2, server={"maxWaitMs": 5})
    old_pods = {p["metadata"]["name"] for p in deploy(kube, service, pods=2)}
    deployment = kube.get("deployment", name, namespace)
    assert deployment is not None
    old_hash = deployment["spec"]["template"]["metadata"]["annotations"][SPEC_HASH]

    load = load_service(
        kube, name, namespace, concurrency=4, requests=3000, duration=300, max_tokens=32
    )
    at_patch = len(load.wait_ok(5).ok)

    kube.patch("lhis", name, namespace, {"spec": {"server": {"maxWaitMs": 20}}})
    not_ready_seen: list[object] = []

    def rolled() -> bool:
        obj = get_lhis(kube, name, namespace)
        if condition(obj, "Ready").get("status") != "True":
            not_ready_seen.append(obj.get("status"))
        dep = kube.get("deployment", name, namespace) or {}
        new_hash = dep["spec"]["template"]["metadata"]["annotations"][SPEC_HASH]
        status = dep.get("status", {})
        pods = kube.pods(namespace, server_selector(name))
        return (
            new_hash != old_hash
            and status.get("observedGeneration") == dep["metadata"]["generation"]
            and status.get("updatedReplicas") == 2
            and status.get("readyReplicas") == 2
            and status.get("replicas") == 2
            and not any(p["metadata"]["name"] in old_pods for p in pods)
        )

    wait_for(
        rolled,
        timeout=420,
        description="the rollout to replace both pods",
        state=lambda: lhis_state(kube, name, namespace),
    )
    at_rolled = len(load.output().ok)
    load.wait_ok(at_rolled + 5)
    load.stop()
    result = load.wait_done(timeout=300)

    assert at_rolled > at_patch, "no request finished during the rollout"
    assert result.summary["failed"] == 0, result.failed[:5]
    incomplete = [r for r in result.requests if not r["complete"]]
    assert not incomplete, incomplete[:5]
    assert result.summary["sent"] == result.summary["complete"], result.summary
    assert not not_ready_seen, f"the service was not Ready during the rollout: {not_ready_seen[0]}"
    print(f"\n[e2e] rolling update under load: {result.summary}")
