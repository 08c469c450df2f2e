"""The harness on the real binaries: control plane behaviour, Prometheus, pinned versions."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.harness import binary_path, binary_version, free_port, wait_until
from tests.harness.controlplane import ControlPlane
from tests.harness.prometheus import Prometheus, sample_value

VERSION_COMMANDS = {
    "kube-apiserver": ["--version"],
    "kube-controller-manager": ["--version"],
    "kube-scheduler": ["--version"],
    "kubelet": ["--version"],
    "kubectl": ["version", "--client"],
    "etcd": ["--version"],
    "helm": ["version", "--short"],
    "kind": ["version"],
}


def run_json(plane: ControlPlane, *args: str) -> Any:
    """``kubectl ... -o json``, parsed; fails the test with kubectl's stderr."""
    proc = plane.kubectl(*args, "-o", "json")
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
    return json.loads(proc.stdout)


def apply(plane: ControlPlane, manifest: dict[str, Any], *flags: str) -> None:
    proc = plane.kubectl("apply", *flags, "-f", "-", input=json.dumps(manifest))
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name, check=True)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false")


@pytest.mark.cluster
@pytest.mark.parametrize("name", sorted(VERSION_COMMANDS))
def test_binary_prints_pinned_version(name: str) -> None:
    proc = subprocess.run(
        [str(binary_path(name)), *VERSION_COMMANDS[name]],
        capture_output=True,
        text=True,
        timeout=30,
    )
    version = binary_version(name)
    expected = version.removeprefix("v") if name == "etcd" else version
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout, proc.stdout


@pytest.mark.cluster
def test_crd_and_custom_object(control_plane: ControlPlane, namespace: str) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.harness.llamaherd.io"},
        "spec": {
            "group": "harness.llamaherd.io",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    apply(control_plane, crd)
    wait = control_plane.kubectl(
        "wait", "--for=condition=Established", "crd/widgets.harness.llamaherd.io", "--timeout=60s"
    )
    assert wait.returncode == 0, wait.stderr
    widget = {
        "apiVersion": "harness.llamaherd.io/v1",
        "kind": "Widget",
        "metadata": {"name": "w1", "namespace": namespace},
        "spec": {"size": 3},
    }
    # Discovery may lag behind Established for a moment: retry the first create.
    wait_until(
        lambda: control_plane.kubectl("apply", "-f", "-", input=json.dumps(widget)).returncode == 0,
        timeout=30,
        what="the Widget to be created",
    )
    got = run_json(control_plane, "get", "widgets", "w1", "-n", namespace)
    assert got["spec"] == {"size": 3}
    widget["spec"] = {"size": 0}  # the schema's minimum refuses it
    refused = control_plane.kubectl("apply", "-f", "-", input=json.dumps(widget))
    assert refused.returncode != 0
    assert "spec.size" in refused.stderr


def deployment(name: str, namespace: str, replicas: int) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                # Never pulled: no kubelet runs, so pods stay Pending.
                "spec": {"containers": [{"name": "c", "image": "registry.invalid/none:1"}]},
            },
        },
    }


def pods_of(plane: ControlPlane, namespace: str, app: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = run_json(
        plane, "get", "pods", "-n", namespace, "-l", f"app={app}"
    )["items"]
    return items


@pytest.mark.cluster
def test_deployment_gets_replicaset_and_pending_pods(
    control_plane: ControlPlane, namespace: str
) -> None:
    apply(control_plane, deployment("web", namespace, replicas=2))
    rs = wait_until(
        lambda: run_json(control_plane, "get", "replicasets", "-n", namespace)["items"],
        timeout=60,
        what="a ReplicaSet",
    )
    assert rs[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"
    pods = wait_until(
        lambda: len(found := pods_of(control_plane, namespace, "web")) == 2 and found,
        timeout=60,
        what="two pods",
    )
    assert all(p["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet" for p in pods)
    assert {p["status"]["phase"] for p in pods} == {"Pending"}

    # The scheduler runs and finds no node for them.
    def unschedulable() -> bool:
        conditions = [
            c
            for p in pods_of(control_plane, namespace, "web")
            for c in p["status"].get("conditions", [])
        ]
        reasons = [c.get("reason") for c in conditions if c["type"] == "PodScheduled"]
        return reasons == ["Unschedulable", "Unschedulable"]

    wait_until(unschedulable, timeout=60, what="the scheduler to mark both pods Unschedulable")


@pytest.mark.cluster
def test_deleting_owner_garbage_collects_children(
    control_plane: ControlPlane, namespace: str
) -> None:
    apply(control_plane, deployment("gc", namespace, replicas=1))
    wait_until(lambda: pods_of(control_plane, namespace, "gc"), timeout=60, what="a pod")
    parent = run_json(control_plane, "create", "configmap", "parent", "-n", namespace)
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "namespace": namespace,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": "parent",
                    "uid": parent["metadata"]["uid"],
                }
            ],
        },
    }
    apply(control_plane, child)

    control_plane.kubectl("delete", "deployment", "gc", "-n", namespace, check=True)
    control_plane.kubectl("delete", "configmap", "parent", "-n", namespace, check=True)

    def collected() -> bool:
        left = run_json(control_plane, "get", "replicasets,pods,configmaps", "-n", namespace)
        names = {i["metadata"]["name"] for i in left["items"]}
        return names <= {"kube-root-ca.crt"}

    wait_until(collected, timeout=60, what="ReplicaSet, pods and child ConfigMap to be collected")


@pytest.mark.cluster
def test_server_side_apply_records_field_manager(
    control_plane: ControlPlane, namespace: str
) -> None:
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "ssa", "namespace": namespace},
        "data": {"owned": "by-x"},
    }
    apply(control_plane, cm, "--server-side", "--field-manager=x")
    got = run_json(
        control_plane, "get", "configmap", "ssa", "-n", namespace, "--show-managed-fields"
    )
    managers = {(m["manager"], m["operation"]) for m in got["metadata"]["managedFields"]}
    assert ("x", "Apply") in managers
    entry = next(m for m in got["metadata"]["managedFields"] if m["manager"] == "x")
    assert "f:owned" in entry["fieldsV1"]["f:data"]

    cm["data"] = {"owned": "by-y"}  # another manager may not take the field without forcing
    proc = control_plane.kubectl(
        "apply", "--server-side", "--field-manager=y", "-f", "-", input=json.dumps(cm)
    )
    assert proc.returncode != 0
    assert "conflict" in proc.stderr.lower()


@pytest.mark.cluster
def test_restart_apiserver_keeps_state(control_plane: ControlPlane, namespace: str) -> None:
    control_plane.kubectl("create", "configmap", "survivor", "-n", namespace, check=True)
    control_plane.restart_apiserver()
    got = run_json(control_plane, "get", "configmap", "survivor", "-n", namespace)
    assert got["metadata"]["name"] == "survivor"


@pytest.mark.prometheus
def test_prometheus_scrapes_loopback_target(prometheus: Prometheus) -> None:
    registry = CollectorRegistry()
    Gauge("llamaherd_harness_probe", "a known value", registry=registry).set(42.5)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    job = f"probe-{uuid.uuid4().hex[:6]}"
    try:
        prometheus.add_targets(job, [f"127.0.0.1:{port}"], labels={"suite": "harness"})
        result = prometheus.wait_for(f'llamaherd_harness_probe{{job="{job}"}}', timeout=60)
        assert [sample_value(s) for s in result] == [42.5]
        assert result[0]["metric"]["suite"] == "harness"
        up = prometheus.query(f'up{{job="{job}"}}')
        assert [sample_value(s) for s in up] == [1.0]
    finally:
        prometheus.remove_targets(job)
        server.shutdown()
        thread.join(timeout=5)
