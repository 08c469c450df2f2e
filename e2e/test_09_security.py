"""Scenario 9: server pods and the operator run as non-root and pass the restricted level."""

from __future__ import annotations

from typing import Any

import pytest

from e2e.conftest import Chart
from e2e.kube import Kube, wait_for
from e2e.support import (
    RELEASE_NAMESPACE,
    Models,
    inference_service,
    lhis_state,
    operator_pod,
    ready_pods,
    wait_condition,
)

pytestmark = pytest.mark.e2e


def _non_root(pod: dict[str, Any]) -> list[str]:
    """Containers of ``pod`` whose spec does not make them run as non-root (empty: all do)."""
    pod_ctx = pod["spec"].get("securityContext") or {}
    bad = []
    for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        ctx = c.get("securityContext") or {}
        non_root = ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot"))
        uid = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
        if not non_root or uid == 0:
            bad.append(f"{c['name']}: runAsNonRoot={non_root} runAsUser={uid}")
        if ctx.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{c['name']}: allowPrivilegeEscalation is not false")
        if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
            bad.append(f"{c['name']}: capabilities do not drop ALL")
    seccomp = (pod_ctx.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        bad.append(f"pod seccompProfile {seccomp!r}")
    return bad


def _failed_creates(kube: Kube, namespace: str) -> list[str]:
    return [
        f"{e['involvedObject']['name']}: {e.get('message')}"
        for e in kube.events(namespace)
        if e.get("reason") == "FailedCreate"
    ]


@pytest.mark.timeout(600)
def test_pods_run_as_non_root_under_restricted(
    kube: Kube, operator: Chart, models: Models, restricted_namespace: str
) -> None:
    """In a namespace that enforces the restricted Pod Security Standard the server pods are
    admitted (no FailedCreate) and turn Ready; they and the operator run as non-root."""
    namespace = restricted_namespace
    name = "secure"
    kube.apply(inference_service(name, namespace, models))
    wait_for(
        lambda: ready_pods(kube, name, namespace),
        timeout=300,
        description="a Ready server pod in the restricted namespace",
        state=lambda: (_failed_creates(kube, namespace), lhis_state(kube, name, namespace)),
    )
    wait_condition(kube, name, namespace, "Ready", timeout=120)
    assert not _failed_creates(kube, namespace), _failed_creates(kube, namespace)

    pod = ready_pods(kube, name, namespace)[0]
    assert not _non_root(pod), _non_root(pod)
    uid = kube.exec(pod["metadata"]["name"], namespace, "id", "-u", container="server").strip()
    assert uid.isdigit() and int(uid) != 0, uid

    op = operator_pod(kube)
    assert not _non_root(op), _non_root(op)
    op_uid = kube.exec(op["metadata"]["name"], RELEASE_NAMESPACE, "id", "-u").strip()
    assert op_uid.isdigit() and int(op_uid) != 0, op_uid

    # The API server's own verdict on the operator pod: labelling its namespace restricted
    # (dry run) warns about every existing pod that would violate the level.
    check = kube.kubectl(
        "label",
        "namespace",
        RELEASE_NAMESPACE,
        "--dry-run=server",
        "--overwrite",
        "pod-security.kubernetes.io/enforce=restricted",
    )
    warnings = check.stderr
    assert op["metadata"]["name"] not in warnings, warnings
    print(f"\n[e2e] server uid {uid}, operator uid {op_uid}; PSS dry-run: {warnings.strip()!r}")
