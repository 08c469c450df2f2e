"""A real ``helm install`` / ``helm uninstall`` into the harness's control plane.

No kubelet runs, so the operator's pod stays Pending; the objects are what is checked. Helm
installs crds/ on first install and never deletes them: after uninstall the CRD stays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.chart.conftest import CHART, NAMESPACE, run_helm
from tests.harness import REPO_ROOT, wait_until

pytestmark = pytest.mark.cluster

RELEASE = "herd"
CRD = "inferenceservices.llamaherd.io"


def get(plane: Any, *args: str) -> dict[str, Any] | None:
    proc = plane.kubectl("get", *args, "-o", "json")
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def crd_exists(plane: Any) -> bool:
    return get(plane, "crd", CRD) is not None


def delete_namespace(plane: Any) -> None:
    plane.kubectl("delete", "namespace", NAMESPACE, "--wait=false")
    wait_until(
        lambda: get(plane, "namespace", NAMESPACE) is None, timeout=90, what="namespace deleted"
    )


def test_helm_install_and_uninstall(control_plane: Any, helm: Path) -> None:
    # Other tests may share this control plane and its CRD: leave it as found.
    crd_was_there = crd_exists(control_plane)
    kube = ["--kubeconfig", str(control_plane.kubeconfig), "--namespace", NAMESPACE]
    install = run_helm(
        helm,
        "install",
        RELEASE,
        str(CHART),
        *kube,
        "--create-namespace",
        "--set",
        "sampleInferenceService.enabled=true",
        "--set",
        "operator.prometheusUrl=http://prometheus.monitoring:9090",
        "--timeout",
        "2m",
    )
    try:
        # NOTES.txt tells what to do next, CRD upgrades included.
        assert "kubectl apply --server-side --force-conflicts -f" in install.stdout
        assert "kubectl get inferenceservices" in install.stdout

        name = f"{RELEASE}-llamaherd"
        crd = get(control_plane, "crd", CRD)
        assert crd and crd["spec"]["versions"][0]["name"] == "v1alpha1"
        role = get(control_plane, "clusterrole", name)
        assert role and role["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        binding = get(control_plane, "clusterrolebinding", name)
        assert binding and binding["subjects"][0]["name"] == name
        assert get(control_plane, "-n", NAMESPACE, "serviceaccount", name)
        assert get(control_plane, "-n", NAMESPACE, "service", f"{name}-metrics")
        deployment = get(control_plane, "-n", NAMESPACE, "deployment", name)
        assert deployment and deployment["spec"]["strategy"]["type"] == "Recreate"
        # The controller manager makes the pod (Pending: no kubelet) with the operator's account.
        pods = wait_until(
            lambda: (
                get(
                    control_plane,
                    "-n",
                    NAMESPACE,
                    "pods",
                    "-l",
                    f"app.kubernetes.io/instance={RELEASE}",
                )
                or {}
            ).get("items"),
            timeout=60,
            what="the operator pod",
        )
        assert pods[0]["spec"]["serviceAccountName"] == name
        # The sample went through the API server's own validation (schema, defaults, CEL).
        sample = get(control_plane, "-n", NAMESPACE, "inferenceservice", "sample")
        assert sample and sample["spec"]["autoscaling"]["maxReplicas"] == 4  # a CRD default

        # The documented CRD upgrade path works on top of a Helm-installed CRD.
        applied = control_plane.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds")
        )
        assert applied.returncode == 0, applied.stderr
        # And the chart's RBAC lets the operator's account do what the operator does.
        account = f"system:serviceaccount:{NAMESPACE}:{name}"
        for verb, resource in (
            ("patch", "inferenceservices.llamaherd.io/scale"),
            ("create", "deployments.apps"),
            ("create", "events"),
            ("list", "pods"),
        ):
            can = control_plane.kubectl("auth", "can-i", verb, resource, "--as", account, "-A")
            assert can.stdout.strip() == "yes", f"{account} cannot {verb} {resource}"
        cannot = control_plane.kubectl("auth", "can-i", "get", "secrets", "--as", account, "-A")
        assert cannot.stdout.strip() == "no"
    finally:
        run_helm(helm, "uninstall", RELEASE, *kube, "--wait", "--timeout", "2m", check=False)

    name = f"{RELEASE}-llamaherd"
    for args in (
        ("clusterrole", name),
        ("clusterrolebinding", name),
        ("-n", NAMESPACE, "serviceaccount", name),
        ("-n", NAMESPACE, "deployment", name),
        ("-n", NAMESPACE, "service", f"{name}-metrics"),
    ):
        wait_until(
            lambda args=args: get(control_plane, *args) is None, timeout=60, what=f"{args} gone"
        )
    wait_until(
        lambda: get(control_plane, "-n", NAMESPACE, "inferenceservice", "sample") is None,
        timeout=60,
        what="the sample InferenceService gone",
    )
    # Helm never deletes what crds/ installed: the CRD (and every InferenceService) stays.
    assert crd_exists(control_plane)
    if not crd_was_there:
        control_plane.kubectl("delete", "crd", CRD, "--wait=true")
    delete_namespace(control_plane)


def test_static_manifest_applies(control_plane: Any) -> None:
    """manifests/install.yaml: the API server accepts every object (server-side dry run)."""
    manifest = REPO_ROOT / "manifests" / "install.yaml"
    crd_was_there = crd_exists(control_plane)
    # Namespaced objects need their namespace, and nothing can be dry-run against a CRD that
    # does not exist: create those two for real first.
    control_plane.kubectl("create", "namespace", NAMESPACE)
    if not crd_was_there:
        created = control_plane.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
        assert created.returncode == 0, created.stderr
    try:
        proc = control_plane.kubectl(
            "apply", "--server-side", "--dry-run=server", "-f", str(manifest)
        )
        assert proc.returncode == 0, proc.stderr
        assert "deployment.apps/llamaherd serverside-applied (server dry run)" in proc.stdout
    finally:
        delete_namespace(control_plane)
        if not crd_was_there:
            control_plane.kubectl("delete", "crd", CRD, "--wait=true")


def test_notes_tell_where_the_in_cluster_prometheus_is(control_plane: Any, helm: Path) -> None:
    """NOTES.txt names the in-cluster Prometheus and how to open it (helm needs an API server)."""
    proc = run_helm(
        helm,
        "install",
        RELEASE,
        str(CHART),
        "--dry-run=client",
        "--kubeconfig",
        str(control_plane.kubeconfig),
        "--namespace",
        NAMESPACE,
        "--set",
        "prometheus.enabled=true",
    )
    url = f"http://{RELEASE}-llamaherd-prometheus.{NAMESPACE}.svc.cluster.local:9090"
    assert f"In-cluster Prometheus (prometheus.enabled): {url}" in proc.stdout
    assert f"port-forward service/{RELEASE}-llamaherd-prometheus 9090:9090" in proc.stdout
    assert f"The operator queries {url}." in proc.stdout
