"""The operator against the real control plane: ``python -m llamaherd_operator`` as a subprocess.

No kubelet runs in the test cluster, so pods stay Pending ("no nodes available"). Where a test
needs what a kubelet would report (a pod that became ready, an init container that failed), it
patches the *pod's* status through the status subresource and lets the real ReplicaSet and
Deployment controllers derive the Deployment's status from it. Patching the Deployment's status
directly does not work here: the controller-manager's Deployment controller owns that status and
rewrites it at once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import yaml

from tests.harness import wait_until
from tests.harness.controlplane import ControlPlane
from tests.harness.operator import OperatorProcess

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "inferenceservices.llamaherd.io.yaml"
API_VERSION = "llamaherd.io/v1alpha1"
T = TypeVar("T")


# --- the operator process -------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd(control_plane: ControlPlane) -> None:
    proc = control_plane.kubectl("apply", "--server-side", "-f", str(CRD))
    assert proc.returncode == 0, proc.stderr
    wait_established(control_plane, "inferenceservices.llamaherd.io")


def wait_established(plane: ControlPlane, crd_name: str) -> None:
    def established() -> bool:
        proc = plane.kubectl("get", "crd", crd_name, "-o", "json")
        conditions = json.loads(proc.stdout).get("status", {}).get("conditions", [])
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    wait_until(established, timeout=60, what=f"CRD {crd_name} established")


# No test here reads the operator's /metrics; its fixed port would clash with any other
# operator on this machine (another test run).
NO_METRICS_PORT = {"LLAMAHERD_OPERATOR_METRICS_PORT": "0"}


@pytest.fixture(scope="module")
def operator(
    control_plane: ControlPlane, crd: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    logs = Path(getattr(control_plane, "logs_dir", None) or tmp_path_factory.mktemp("operator"))
    process = OperatorProcess(
        control_plane.kubeconfig,
        logs / "llamaherd-operator.log",
        env={
            # Short periods so the loops show within a test's patience.
            "LLAMAHERD_OPERATOR_AUTOSCALE_INTERVAL_SECONDS": "1",
            "LLAMAHERD_OPERATOR_RESYNC_INTERVAL_SECONDS": "3",
            # Nothing listens here: an allowed URL that fails fast (MetricsUnavailable).
            "LLAMAHERD_OPERATOR_PROMETHEUS_URL": "http://127.0.0.1:9",
            "LLAMAHERD_OPERATOR_ALLOWED_PROMETHEUS_URLS": "http://127.0.0.1:9/allowed/",
            **NO_METRICS_PORT,
        },
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def _operator_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before and "operator" in request.fixturenames:
        process: OperatorProcess = request.getfixturevalue("operator")
        print(f"\n--- operator log {process.log_path} (last lines) ---\n{process.tail()}")


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"op-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name, check=True)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false")


# --- helpers --------------------------------------------------------------------------------


def get(plane: ControlPlane, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
    proc = plane.kubectl("get", kind, name, "-n", namespace, "-o", "json")
    if proc.returncode != 0:
        if "NotFound" in proc.stderr:
            return None
        raise AssertionError(proc.stderr)
    return dict(json.loads(proc.stdout))


def absent(plane: ControlPlane, kind: str, name: str, namespace: str) -> bool:
    return get(plane, kind, name, namespace) is None


def must_get(plane: ControlPlane, kind: str, name: str, namespace: str) -> dict[str, Any]:
    obj = get(plane, kind, name, namespace)
    assert obj is not None, f"{kind}/{name} not found"
    return obj


def manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("model", {"url": "https://models.example/tiny.gguf"})
    return {
        "apiVersion": API_VERSION,
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def apply(plane: ControlPlane, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return plane.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(obj))


def create_ok(plane: ControlPlane, obj: dict[str, Any]) -> None:
    proc = apply(plane, obj)
    assert proc.returncode == 0, proc.stderr


def patch(
    plane: ControlPlane, kind: str, name: str, namespace: str, body: Any, *extra: str
) -> None:
    proc = plane.kubectl(
        "patch", kind, name, "-n", namespace, "--type=merge", "-p", json.dumps(body), *extra
    )
    assert proc.returncode == 0, proc.stderr


def eventually(probe: Callable[[], T | bool | None], what: str, timeout: float = 60) -> T:
    result = wait_until(probe, timeout=timeout, interval=0.25, what=what)
    return cast(T, result)


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for item in (obj or {}).get("status", {}).get("conditions", []):
        if item["type"] == kind:
            return dict(item)
    return {}


def wait_condition(
    plane: ControlPlane,
    name: str,
    namespace: str,
    kind: str,
    status: str,
    reason: str | None = None,
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        found = condition(get(plane, "inferenceservice", name, namespace), kind)
        if found.get("status") == status and (reason is None or found.get("reason") == reason):
            return found
        return None

    return eventually(probe, f"{name}: {kind}={status} {reason or ''}")


def server_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return dict(next(c for c in containers if c["name"] == "server"))


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def spec_hash(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["metadata"]["annotations"]["llamaherd.io/spec-hash"])


def pods_of(plane: ControlPlane, name: str, namespace: str) -> list[dict[str, Any]]:
    proc = plane.kubectl(
        "get", "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}", "-o", "json"
    )
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout)["items"])


def patch_pod_status(plane: ControlPlane, pod: str, namespace: str, status: dict[str, Any]) -> None:
    """Stand in for the kubelet: write what it would report about the pod."""
    proc = plane.kubectl(
        "patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=strategic",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --- tests ----------------------------------------------------------------------------------


def test_create_gives_deployment_service_and_pdb(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    body = manifest(
        "chat",
        namespace,
        replicas=2,
        gpu={"count": 1},
        server={"slots": 4, "contextSize": 1024, "drainTimeoutSeconds": 20},
        apiKeySecretRef={"name": "keys", "key": "chat"},
        service={"port": 8080},
    )
    create_ok(control_plane, body)
    isvc = must_get(control_plane, "inferenceservice", "chat", namespace)
    deployment = eventually(
        lambda: get(control_plane, "deployment", "chat", namespace), "Deployment chat"
    )

    owner = deployment["metadata"]["ownerReferences"][0]
    assert owner["uid"] == isvc["metadata"]["uid"]
    assert owner["controller"] is True and owner["blockOwnerDeletion"] is True
    shown = control_plane.kubectl(
        "get", "deployment", "chat", "-n", namespace, "-o", "json", "--show-managed-fields"
    )
    managers = {m["manager"] for m in json.loads(shown.stdout)["metadata"]["managedFields"]}
    assert "llamaherd-operator" in managers
    assert deployment["spec"]["replicas"] == 2
    pod_spec = deployment["spec"]["template"]["spec"]
    assert pod_spec["terminationGracePeriodSeconds"] > 20
    assert pod_spec["initContainers"][0]["name"] == "model-download"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec[
        "tolerations"
    ]
    server = server_container(deployment)
    assert server["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
    env = env_of(server)
    assert env["LLAMAHERD_SLOTS"] == "4"
    assert env["LLAMAHERD_CONTEXT_SIZE"] == "1024"
    assert env["LLAMAHERD_MODEL_NAME"] == "chat"
    assert env["LLAMAHERD_API_KEY"] == {"secretKeyRef": {"name": "keys", "key": "chat"}}
    assert spec_hash(deployment)

    service = eventually(lambda: get(control_plane, "service", "chat", namespace), "Service")
    assert service["spec"]["ports"][0]["name"] == "http"
    assert service["spec"]["ports"][0]["port"] == 8080
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    pdb = eventually(lambda: get(control_plane, "pdb", "chat", namespace), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1

    def status_written() -> dict[str, Any] | None:
        obj = get(control_plane, "inferenceservice", "chat", namespace)
        status = (obj or {}).get("status", {})
        return status if status.get("observedGeneration") == 1 and status.get("replicas") else None

    status = eventually(status_written, "status with observedGeneration 1")
    assert status["endpoint"] == f"http://chat.{namespace}.svc.cluster.local:8080"
    assert status["selector"] == (
        "app.kubernetes.io/instance=chat,app.kubernetes.io/name=llamaherd-server"
    )
    assert status["desiredReplicas"] == 2
    assert {c["type"] for c in status["conditions"]} >= {
        "Ready", "Progressing", "Degraded", "ModelLoading"
    }  # fmt: skip
    # No node exists: the pods cannot be scheduled, and the status says so.
    degraded = wait_condition(control_plane, "chat", namespace, "Degraded", "True", "Unschedulable")
    assert "no nodes available" in degraded["message"]
    table = control_plane.kubectl("get", "lhis", "-n", namespace).stdout
    assert table.split()[:6] == ["NAME", "READY", "REPLICAS", "DESIRED", "QUEUE", "P95"]

    # One replica: the PodDisruptionBudget goes away.
    patch(control_plane, "lhis", "chat", namespace, {"spec": {"replicas": 1}})
    eventually(lambda: get(control_plane, "pdb", "chat", namespace) is None, "PDB deleted")

    # Drift: a Deployment deleted under the operator comes back.
    control_plane.kubectl("delete", "deployment", "chat", "-n", namespace, check=True)
    again = eventually(
        lambda: get(control_plane, "deployment", "chat", namespace), "Deployment re-created"
    )
    assert again["metadata"]["uid"] != deployment["metadata"]["uid"]


def test_spec_change_rolls_the_deployment(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    create_ok(control_plane, manifest("roll", namespace, server={"slots": 2}))
    first = eventually(lambda: get(control_plane, "deployment", "roll", namespace), "Deployment")
    patch(control_plane, "lhis", "roll", namespace, {"spec": {"server": {"slots": 8}}})

    def rolled() -> dict[str, Any] | None:
        dep = get(control_plane, "deployment", "roll", namespace)
        return dep if dep and spec_hash(dep) != spec_hash(first) else None

    second = eventually(rolled, "a new pod template hash")
    assert env_of(server_container(second))["LLAMAHERD_SLOTS"] == "8"
    assert second["metadata"]["generation"] > first["metadata"]["generation"]
    eventually(
        lambda: (
            (get(control_plane, "lhis", "roll", namespace) or {})
            .get("status", {})
            .get("observedGeneration")
            == 2
        ),
        "observedGeneration 2",
    )
    # A change that does not touch the pod template leaves the hash alone.
    patch(control_plane, "lhis", "roll", namespace, {"spec": {"service": {"port": 81}}})
    eventually(
        lambda: (
            must_get(control_plane, "service", "roll", namespace)["spec"]["ports"][0]["port"] == 81
        ),
        "Service port 81",
    )
    assert spec_hash(must_get(control_plane, "deployment", "roll", namespace)) == spec_hash(second)


def test_scale_subresource(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    create_ok(control_plane, manifest("scaled", namespace))
    eventually(lambda: get(control_plane, "deployment", "scaled", namespace), "Deployment")
    proc = control_plane.kubectl("scale", "lhis/scaled", "-n", namespace, "--replicas=3")
    assert proc.returncode == 0, proc.stderr
    eventually(
        lambda: must_get(control_plane, "deployment", "scaled", namespace)["spec"]["replicas"] == 3,
        "Deployment follows to 3 replicas",
    )
    eventually(lambda: get(control_plane, "pdb", "scaled", namespace), "PDB for 3 replicas")

    def scale() -> dict[str, Any] | None:
        proc = control_plane.kubectl(
            "get", "lhis", "scaled", "-n", namespace, "--subresource=scale", "-o", "json"
        )
        obj = json.loads(proc.stdout)
        return obj if obj.get("status", {}).get("replicas") == 3 else None

    scale_obj = eventually(scale, "scale subresource reports 3 replicas")
    assert scale_obj["spec"]["replicas"] == 3
    assert "app.kubernetes.io/instance=scaled" in scale_obj["status"]["selector"]

    # With autoscaling on, spec.replicas is clamped to [minReplicas, maxReplicas].
    patch(
        control_plane,
        "lhis",
        "scaled",
        namespace,
        {
            "spec": {
                "replicas": 9,
                "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 2},
            }
        },
    )
    eventually(
        lambda: must_get(control_plane, "deployment", "scaled", namespace)["spec"]["replicas"] == 2,
        "Deployment clamped to maxReplicas 2",
    )


LEGACY_FINALIZER = "llamaherd.io/finalizer"


def test_autoscaled_service_has_no_finalizer_and_deletes_without_the_operator(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    autoscaling = {"enabled": True, "minReplicas": 2, "maxReplicas": 3}
    create_ok(control_plane, manifest("nofin", namespace, replicas=2, autoscaling=autoscaling))
    # An upgraded cluster: an earlier operator (kopf timers) left its finalizer on this one.
    legacy = manifest("legacy", namespace, replicas=2, autoscaling=autoscaling)
    legacy["metadata"]["finalizers"] = [LEGACY_FINALIZER, "example.com/keep"]
    create_ok(control_plane, legacy)
    for name in ("nofin", "legacy"):
        for kind in ("deployment", "service", "pdb"):
            eventually(partial(get, control_plane, kind, name, namespace), f"{name} {kind}")
        # The autoscaling loop has been over it (no Prometheus here: it holds, and says so).
        wait_condition(control_plane, name, namespace, "ScalingActive", "False")
    eventually(
        lambda: (
            must_get(control_plane, "lhis", "legacy", namespace)["metadata"].get("finalizers")
            == ["example.com/keep"]
        ),
        "the legacy finalizer removed, the foreign one kept",
    )
    assert not must_get(control_plane, "lhis", "nofin", namespace)["metadata"].get("finalizers")
    patch(control_plane, "lhis", "legacy", namespace, {"metadata": {"finalizers": None}})

    operator.stop()
    try:
        for name in ("nofin", "legacy"):
            proc = control_plane.kubectl(
                "delete", "lhis", name, "-n", namespace, "--wait=true", "--timeout=30s"
            )
            assert proc.returncode == 0, proc.stderr
            assert absent(control_plane, "lhis", name, namespace)
            for kind in ("deployment", "service", "pdb"):
                eventually(partial(absent, control_plane, kind, name, namespace), kind, timeout=90)
    finally:
        operator.start()


def test_a_stuck_deletion_is_released(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    """Deleted while an earlier operator's finalizer held it: the new operator lets it go."""
    operator.stop()
    try:
        stuck = manifest("stuck", namespace, autoscaling={"enabled": True})
        stuck["metadata"]["finalizers"] = [LEGACY_FINALIZER]
        create_ok(control_plane, stuck)
        proc = control_plane.kubectl("delete", "lhis", "stuck", "-n", namespace, "--wait=false")
        assert proc.returncode == 0, proc.stderr
        assert must_get(control_plane, "lhis", "stuck", namespace)["metadata"]["deletionTimestamp"]
    finally:
        operator.start()
    eventually(partial(absent, control_plane, "lhis", "stuck", namespace), "stuck deleted")


def test_drift_is_reverted(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    create_ok(control_plane, manifest("drift", namespace, replicas=2, server={"slots": 4}))
    deployment = eventually(
        lambda: get(control_plane, "deployment", "drift", namespace), "Deployment"
    )
    eventually(lambda: get(control_plane, "pdb", "drift", namespace), "PDB")

    # kubectl scale and an edit of the pod template's env: both put back within seconds.
    proc = control_plane.kubectl("scale", "deployment/drift", "-n", namespace, "--replicas=5")
    assert proc.returncode == 0, proc.stderr
    proc = control_plane.kubectl(
        "set", "env", "deployment/drift", "-n", namespace, "-c", "server", "LLAMAHERD_SLOTS=9"
    )
    assert proc.returncode == 0, proc.stderr

    def reverted() -> dict[str, Any] | None:
        dep = must_get(control_plane, "deployment", "drift", namespace)
        env = env_of(server_container(dep))
        return dep if dep["spec"]["replicas"] == 2 and env["LLAMAHERD_SLOTS"] == "4" else None

    after = eventually(reverted, "replicas and env reverted", timeout=30)
    assert spec_hash(after) == spec_hash(deployment)

    # A deleted Service and a deleted PDB come back.
    for kind in ("service", "pdb"):
        old = must_get(control_plane, kind, "drift", namespace)
        control_plane.kubectl("delete", kind, "drift", "-n", namespace, check=True)

        def recreated(kind: str = kind, old: dict[str, Any] = old) -> bool:
            new = get(control_plane, kind, "drift", namespace)
            return bool(new) and new["metadata"]["uid"] != old["metadata"]["uid"]

        eventually(recreated, f"{kind} re-created", timeout=30)

    # A changed Service (a field the operator sets) comes back too.
    patch(control_plane, "service", "drift", namespace,
          {"metadata": {"annotations": {"prometheus.io/scrape": "false"}}})  # fmt: skip

    def service_reverted() -> bool:
        service = must_get(control_plane, "service", "drift", namespace)
        return service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"

    eventually(service_reverted, "Service annotation reverted", timeout=30)

    # What no watch event shows (metadata only, no new generation) the periodic resync puts
    # back: the operator here resyncs every 3 s.
    proc = control_plane.kubectl(
        "annotate", "deployment", "drift", "-n", namespace, "llamaherd.io/generation=99",
        "--overwrite",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    eventually(
        lambda: (
            must_get(control_plane, "deployment", "drift", namespace)["metadata"]["annotations"][
                "llamaherd.io/generation"
            ]
            == "1"
        ),
        "annotation reverted by the resync",
        timeout=30,
    )


def test_autoscaler_replicas_are_not_reverted(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    """The scale subresource moves the InferenceService; the Deployment follows and stays."""
    body = manifest("owner", namespace, replicas=1, autoscaling={"enabled": True, "maxReplicas": 4})
    create_ok(control_plane, body)
    eventually(lambda: get(control_plane, "deployment", "owner", namespace), "Deployment")
    proc = control_plane.kubectl(
        "patch", "lhis", "owner", "-n", namespace, "--subresource=scale", "--type=merge",
        "-p", json.dumps({"spec": {"replicas": 3}}), "--field-manager=llamaherd-autoscaler",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    eventually(
        lambda: must_get(control_plane, "deployment", "owner", namespace)["spec"]["replicas"] == 3,
        "Deployment follows to 3",
    )
    time.sleep(4)  # more than one resync period
    assert must_get(control_plane, "deployment", "owner", namespace)["spec"]["replicas"] == 3
    assert must_get(control_plane, "lhis", "owner", namespace)["spec"]["replicas"] == 3


def test_prometheus_url_not_allowed(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    bad = {"enabled": True, "prometheusUrl": "http://169.254.169.254/latest"}
    create_ok(control_plane, manifest("ssrf", namespace, autoscaling=bad))
    found = wait_condition(
        control_plane, "ssrf", namespace, "ScalingActive", "False", "PrometheusURLNotAllowed"
    )
    assert "http://169.254.169.254/latest" in found["message"]
    # Below an allowed prefix: allowed (and then fails to connect, as nothing listens).
    allowed = {"enabled": True, "prometheusUrl": "http://127.0.0.1:9/allowed/prom"}
    patch(control_plane, "lhis", "ssrf", namespace, {"spec": {"autoscaling": allowed}})
    wait_condition(control_plane, "ssrf", namespace, "ScalingActive", "False", "MetricsUnavailable")
    events = control_plane.kubectl(
        "get", "events", "-n", namespace, "--field-selector",
        "involvedObject.kind=InferenceService,involvedObject.name=ssrf", "-o", "json",
    )  # fmt: skip
    reasons = {e["reason"] for e in json.loads(events.stdout)["items"]}
    assert "PrometheusURLNotAllowed" in reasons


def test_conflicting_hpa_is_reported_and_not_fought(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    create_ok(
        control_plane,
        manifest("fought", namespace, replicas=2, autoscaling={"enabled": True, "maxReplicas": 5}),
    )
    eventually(lambda: get(control_plane, "deployment", "fought", namespace), "Deployment")
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "users-hpa", "namespace": namespace},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": API_VERSION,
                "kind": "InferenceService",
                "name": "fought",
            },
            "minReplicas": 1,
            "maxReplicas": 5,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 50},
                    },
                }
            ],
        },
    }
    create_ok(control_plane, hpa)
    found = wait_condition(
        control_plane, "fought", namespace, "ScalingActive", "False", "ConflictingAutoscaler"
    )
    assert "users-hpa" in found["message"]
    events = control_plane.kubectl(
        "get", "events", "-n", namespace, "--field-selector",
        "involvedObject.kind=InferenceService,involvedObject.name=fought", "-o", "json",
    )  # fmt: skip
    assert "ConflictingAutoscaler" in {e["reason"] for e in json.loads(events.stdout)["items"]}
    control_plane.kubectl("delete", "hpa", "users-hpa", "-n", namespace, check=True)
    eventually(
        lambda: (
            condition(get(control_plane, "lhis", "fought", namespace), "ScalingActive").get(
                "reason"
            )
            != "ConflictingAutoscaler"
        ),
        "conflict cleared once the HPA is gone",
    )


def test_delete_garbage_collects_everything(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    create_ok(control_plane, manifest("gone", namespace, replicas=2))
    for kind in ("deployment", "service", "pdb"):
        eventually(partial(get, control_plane, kind, "gone", namespace), f"{kind} created")
    proc = control_plane.kubectl("delete", "lhis", "gone", "-n", namespace, "--wait=true")
    assert proc.returncode == 0, proc.stderr
    for kind in ("deployment", "service", "pdb"):
        eventually(partial(absent, control_plane, kind, "gone", namespace), kind, timeout=90)
    eventually(lambda: not pods_of(control_plane, "gone", namespace), "pods gone", timeout=90)


def test_status_follows_the_pods(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    create_ok(control_plane, manifest("life", namespace))
    pods = eventually(lambda: pods_of(control_plane, "life", namespace), "a pod")
    pod_name = pods[0]["metadata"]["name"]
    wait_condition(control_plane, "life", namespace, "Ready", "False")

    # The kubelet would report: the download init container failed and is backing off.
    patch_pod_status(
        control_plane,
        pod_name,
        namespace,
        {
            "initContainerStatuses": [
                {
                    "name": "model-download",
                    "image": "llamaherd/server:0.1.0-cpu",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 1,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                    "lastState": {
                        "terminated": {
                            "exitCode": 1,
                            "reason": "Error",
                            "message": "[model-download] model download failed: HTTP 404 "
                            "Not Found from https://models.example/tiny.gguf",
                        }
                    },
                }
            ]
        },
    )
    degraded = wait_condition(
        control_plane, "life", namespace, "Degraded", "True", "ModelDownloadFailed"
    )
    assert "HTTP 404 Not Found" in degraded["message"]
    ready = condition(must_get(control_plane, "lhis", "life", namespace), "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ModelDownloadFailed")

    # ... then: the download worked, the server loaded the model and passes its readiness probe.
    now = now_rfc3339()
    patch_pod_status(
        control_plane,
        pod_name,
        namespace,
        {
            "phase": "Running",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
            ],
            "initContainerStatuses": [
                {
                    "name": "model-download",
                    "image": "llamaherd/server:0.1.0-cpu",
                    "imageID": "",
                    "ready": True,
                    "restartCount": 2,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
                }
            ],
            "containerStatuses": [
                {
                    "name": "server",
                    "image": "llamaherd/server:0.1.0-cpu",
                    "imageID": "",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                }
            ],
        },
    )
    ready = wait_condition(control_plane, "life", namespace, "Ready", "True", "ReplicasReady")
    assert ready["message"] == "1 of 1 replicas ready"
    status = must_get(control_plane, "lhis", "life", namespace)["status"]
    assert status["readyReplicas"] == 1
    assert condition({"status": status}, "Degraded")["status"] == "False"
    assert condition({"status": status}, "ModelLoading")["reason"] == "ModelLoaded"
    wait_condition(control_plane, "life", namespace, "Progressing", "False", "Complete")

    events = control_plane.kubectl(
        "get", "events", "-n", namespace, "--field-selector",
        "involvedObject.kind=InferenceService,involvedObject.name=life", "-o", "json",
    )  # fmt: skip
    reasons = {e["reason"] for e in json.loads(events.stdout)["items"]}
    assert {"Created", "ModelDownloadFailed", "Ready"} <= reasons


def test_missing_claim_is_degraded_then_recovers(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    body = manifest(
        "claimed", namespace, model={"persistentVolumeClaim": {"claimName": "models", "path": "m"}}
    )
    create_ok(control_plane, body)
    degraded = wait_condition(
        control_plane, "claimed", namespace, "Degraded", "True", "ModelPVCNotFound"
    )
    assert f"PersistentVolumeClaim {namespace}/models not found" in degraded["message"]
    deployment = must_get(control_plane, "deployment", "claimed", namespace)
    volume = deployment["spec"]["template"]["spec"]["volumes"][0]
    assert volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "models", "namespace": namespace},
        "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    create_ok(control_plane, pvc)
    eventually(
        lambda: (
            condition(get(control_plane, "lhis", "claimed", namespace), "Degraded").get("reason")
            != "ModelPVCNotFound"
        ),
        "the claim noticed",
        timeout=30,
    )
    assert operator.alive()


def test_spec_the_api_server_refuses_to_build_is_degraded(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    """The CRD passes resources through; a bad quantity is refused only in the Deployment."""
    bad = manifest("quantity", namespace, resources={"limits": {"cpu": "lots"}})
    create_ok(control_plane, bad)
    degraded = wait_condition(
        control_plane, "quantity", namespace, "Degraded", "True", "InvalidSpec"
    )
    assert "quantities must match" in degraded["message"]
    assert get(control_plane, "deployment", "quantity", namespace) is None
    assert operator.alive()
    patch(
        control_plane,
        "lhis",
        "quantity",
        namespace,
        {"spec": {"resources": {"limits": {"cpu": "2"}}}},
    )
    eventually(
        lambda: get(control_plane, "deployment", "quantity", namespace), "fixed spec applied"
    )
    eventually(
        lambda: (
            condition(get(control_plane, "lhis", "quantity", namespace), "Degraded").get("reason")
            != "InvalidSpec"
        ),
        "InvalidSpec cleared",
    )


SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


def test_service_monitor_once_its_crd_exists(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    """A stand-in for the Prometheus operator's CRD (schema left open) is enough to test this."""
    create_ok(control_plane, manifest("before", namespace))
    eventually(lambda: get(control_plane, "deployment", "before", namespace), "Deployment")
    create_ok(control_plane, SERVICE_MONITOR_CRD)
    try:
        wait_established(control_plane, "servicemonitors.monitoring.coreos.com")
        pokes = iter(range(1000))

        def monitor() -> dict[str, Any] | None:
            found = get(control_plane, "servicemonitor", "before", namespace)
            if found is None:  # reconcile again; the operator rechecks discovery every 1 s here
                patch(control_plane, "lhis", "before", namespace,
                      {"metadata": {"labels": {"poke": str(next(pokes))}}})  # fmt: skip
            return found

        found = eventually(monitor, "ServiceMonitor")
        assert found["spec"]["endpoints"][0]["port"] == "http"
        assert found["metadata"]["ownerReferences"][0]["name"] == "before"
    finally:
        control_plane.kubectl("delete", "crd", "servicemonitors.monitoring.coreos.com")
    # Once per operator process (the log file holds every start of the module's operator).
    log = operator.log_path.read_text(errors="replace").rsplit("=== start", 1)[-1]
    assert log.count("monitoring.coreos.com CRDs not found") == 1


def namespaced_rbac(rbac: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """What the chart installs with operator.watchNamespaces: a ServiceAccount (its own, so the
    cluster-wide binding of the other case is not in play), the cluster-scoped ClusterRole bound
    to it, and the namespaced rules as a Role in the watched namespace."""
    name = "llamaherd-operator-ns"
    account = next(d for d in rbac if d["kind"] == "ServiceAccount")
    account = {**account, "metadata": {**account["metadata"], "name": name}}
    subjects = [
        {"kind": "ServiceAccount", "name": name, "namespace": account["metadata"]["namespace"]}
    ]
    rules = {d["metadata"]["name"]: d for d in rbac if d["kind"] == "ClusterRole"}
    cluster = rules["llamaherd-operator-cluster"]
    rbac_group = "rbac.authorization.k8s.io"
    return [
        account,
        cluster,
        {
            "apiVersion": f"{rbac_group}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": rbac_group,
                "kind": "ClusterRole",
                "name": cluster["metadata"]["name"],
            },
            "subjects": subjects,
        },
        {
            "apiVersion": f"{rbac_group}/v1",
            "kind": "Role",
            "metadata": {"name": name, "namespace": namespace},
            "rules": rules["llamaherd-operator"]["rules"],
        },
        {
            "apiVersion": f"{rbac_group}/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": namespace},
            "roleRef": {"apiGroup": rbac_group, "kind": "Role", "name": name},
            "subjects": subjects,
        },
    ]


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
def test_operator_works_with_only_its_rbac(
    control_plane: ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    tmp_path: Path,
    scope: str,
) -> None:
    """operator/rbac.yaml is enough: run the operator as its ServiceAccount, not as admin; and
    with namespaced rules as the chart grants them with operator.watchNamespaces (a Role in the
    watched namespace, only the cluster-scoped reads cluster-wide)."""
    rbac = list(yaml.safe_load_all((REPO / "operator" / "rbac.yaml").read_text()))
    if scope == "namespaced":
        rbac = namespaced_rbac(rbac, namespace)
    account = next(d for d in rbac if d["kind"] == "ServiceAccount")["metadata"]
    sa_namespace = account["namespace"]
    control_plane.kubectl("create", "namespace", sa_namespace)
    for doc in rbac:
        create_ok(control_plane, doc)
    token = control_plane.kubectl(
        "create", "token", account["name"], "-n", sa_namespace, "--duration=1h", check=True
    ).stdout.strip()
    admin = yaml.safe_load(control_plane.kubeconfig.read_text())
    admin["users"] = [{"name": "operator", "user": {"token": token}}]
    admin["contexts"][0]["context"]["user"] = "operator"
    kubeconfig = tmp_path / "operator.kubeconfig"
    kubeconfig.write_text(json.dumps(admin))

    limited = OperatorProcess(
        kubeconfig,
        operator.log_path.with_name(f"llamaherd-operator-rbac-{scope}.log"),
        env={"LLAMAHERD_OPERATOR_NAMESPACES": namespace, **NO_METRICS_PORT},
    )
    operator.stop()
    try:
        limited.start()
        create_ok(control_plane, manifest("limited", namespace, replicas=2))
        for kind in ("deployment", "service", "pdb"):
            eventually(partial(get, control_plane, kind, "limited", namespace), kind)
        wait_condition(control_plane, "limited", namespace, "Degraded", "True", "Unschedulable")
        patch(control_plane, "lhis", "limited", namespace, {"spec": {"replicas": 1}})
        eventually(lambda: get(control_plane, "pdb", "limited", namespace) is None, "PDB deleted")
        log = limited.log_path.read_text(errors="replace")
        # (Not a bare "403": log timestamps have milliseconds.) kopf says "Not enough
        # permissions" where it falls back for lack of a cluster-wide read.
        for refused in ("forbidden", "status=403", "not enough permissions"):
            assert refused not in log.lower(), limited.tail()
    finally:
        limited.stop()
        operator.start()


BAD_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("two-sources", {"model": {"url": "https://h/m.gguf", "hostPath": {"path": "/m"}}},
     "spec.model must set exactly one of url, persistentVolumeClaim or hostPath"),
    ("no-source", {"model": {}},
     "spec.model must set exactly one of url, persistentVolumeClaim or hostPath"),
    ("no-model", {"model": None}, "spec.model: Required value"),
    ("ftp-url", {"model": {"url": "ftp://h/m.gguf"}},
     "spec.model.url must be an http:// or https:// URL"),
    ("short-sha", {"model": {"url": "https://h/m.gguf", "sha256": "abc"}},
     "spec.model.sha256 must be 64 hexadecimal digits"),
    ("sha-without-url", {"model": {"hostPath": {"path": "/m.gguf"}, "sha256": "a" * 64}},
     "spec.model.sha256 applies only to spec.model.url"),
    ("cache-claim", {"model": {"url": "https://h/m", "cache": {"type": "PersistentVolumeClaim"}}},
     "spec.model.cache.claimName is required when cache.type is PersistentVolumeClaim"),
    ("relative-host-path", {"model": {"hostPath": {"path": "m.gguf"}}},
     "spec.model.hostPath.path must be an absolute path"),
    ("min-over-max", {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
     "spec.autoscaling.minReplicas must be less than or equal to spec.autoscaling.maxReplicas"),
    ("negative-replicas", {"replicas": -1}, "spec.replicas: Invalid value: -1"),
    ("pull-policy", {"imagePullPolicy": "Sometimes"}, 'Unsupported value: "Sometimes"'),
    ("service-type", {"service": {"type": "ExternalName"}}, 'Unsupported value: "ExternalName"'),
    ("zero-slots", {"server": {"slots": 0}}, "spec.server.slots: Invalid value: 0"),
    ("bad-log-format", {"server": {"logFormat": "xml"}}, 'Unsupported value: "xml"'),
    ("reserved-env", {"env": [{"name": "LLAMAHERD_SLOTS", "value": "3"}]},
     "spec.env must not set variables the operator manages"),
    ("duplicate-env", {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
     "Duplicate value"),
    ("gpu-count", {"gpu": {"count": -1}}, "spec.gpu.count: Invalid value: -1"),
    ("unknown-field", {"modle": {}}, 'unknown field "spec.modle"'),
]  # fmt: skip


@pytest.mark.parametrize(("case", "spec", "message"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_api_server_refuses_bad_specs(
    control_plane: ControlPlane, crd: None, case: str, spec: dict[str, Any], message: str
) -> None:
    body = manifest(f"bad-{case}", "default", **spec)
    if body["spec"].get("model") is None:
        del body["spec"]["model"]
    proc = control_plane.kubectl("create", "-f", "-", input=json.dumps(body))
    assert proc.returncode != 0, f"{case} was accepted"
    assert message in proc.stderr, proc.stderr


def test_api_server_refuses_a_bad_name(control_plane: ControlPlane, crd: None) -> None:
    body = manifest("9lives", "default")
    proc = control_plane.kubectl("create", "-f", "-", input=json.dumps(body))
    assert proc.returncode != 0
    assert "metadata.name must be a DNS-1035 label" in proc.stderr, proc.stderr


def test_examples_are_accepted(control_plane: ControlPlane, crd: None) -> None:
    for path in sorted((REPO / "examples").glob("*.yaml")):
        proc = control_plane.kubectl("create", "--dry-run=server", "-n", "default", "-f", str(path))
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"


def test_picks_up_changes_made_while_away(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    create_ok(control_plane, manifest("away", namespace, server={"slots": 2}))
    before = eventually(lambda: get(control_plane, "deployment", "away", namespace), "Deployment")
    operator.stop()
    try:
        patch(control_plane, "lhis", "away", namespace, {"spec": {"server": {"slots": 6}}})
        create_ok(control_plane, manifest("newcomer", namespace))
    finally:
        operator.start()
    eventually(
        lambda: (
            spec_hash(must_get(control_plane, "deployment", "away", namespace)) != spec_hash(before)
        ),
        "the change made while away applied",
    )
    eventually(lambda: get(control_plane, "deployment", "newcomer", namespace), "newcomer")


def replica_sets_of(plane: ControlPlane, name: str, namespace: str) -> list[str]:
    proc = plane.kubectl(
        "get", "replicasets", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}",
        "-o", "jsonpath={.items[*].metadata.name}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return sorted(proc.stdout.split())


def test_operator_upgrade_rolls_no_pod(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    """A new operator version (its model download changed, other operator-only settings) over
    running services: it reconciles each of them and no pod template changes, so no pod rolls."""
    services = {
        "up-url": {"model": {"url": "https://models.example/a.gguf", "sha256": "ab" * 32}},
        "up-auto": {"replicas": 2, "autoscaling": {"enabled": True, "maxReplicas": 3}},
        "up-host": {"model": {"hostPath": {"path": "/models/b.gguf"}}},
    }
    for name, spec in services.items():
        create_ok(control_plane, manifest(name, namespace, **spec))
    before = {
        name: eventually(partial(get, control_plane, "deployment", name, namespace), name)
        for name in services
    }
    for name in services:  # the Deployment controller has made the first ReplicaSet
        eventually(partial(replica_sets_of, control_plane, name, namespace), f"{name} ReplicaSet")
    sets_before = {name: replica_sets_of(control_plane, name, namespace) for name in services}

    # The upgrade: the package as a new release would ship it, with a changed download module.
    package = tmp_path / "llamaherd_operator"
    shutil.copytree(REPO / "operator" / "llamaherd_operator", package)
    download = package / "model_download.py"
    download.write_text(download.read_text() + "\n\nNEW_IN_THIS_RELEASE = True\n")
    init = package / "__init__.py"
    init.write_text(init.read_text() + "\nprint('llamaherd_operator from', __file__)\n")
    upgraded = OperatorProcess(
        operator.kubeconfig,
        operator.log_path.with_name("llamaherd-operator-upgraded.log"),
        env={
            **operator.env,
            "PYTHONPATH": str(tmp_path),
            "LLAMAHERD_OPERATOR_RESYNC_INTERVAL_SECONDS": "1",
            "LLAMAHERD_OPERATOR_AUTOSCALE_INTERVAL_SECONDS": "2",
            "LLAMAHERD_OPERATOR_LOG_FORMAT": "json",
        },
    )
    operator.stop()
    try:
        upgraded.start()
        assert f"llamaherd_operator from {init}" in upgraded.log_path.read_text()
        # The new operator has reconciled each one: it re-creates a deleted Service.
        for name in services:
            old = must_get(control_plane, "service", name, namespace)["metadata"]["uid"]
            control_plane.kubectl("delete", "service", name, "-n", namespace, check=True)
            eventually(
                lambda name=name, old=old: (
                    (found := get(control_plane, "service", name, namespace)) is not None
                    and found["metadata"]["uid"] != old
                ),
                f"{name}: Service re-created by the upgraded operator",
            )
        time.sleep(3)  # and a few resyncs more
        for name, old_deployment in before.items():
            now = must_get(control_plane, "deployment", name, namespace)
            assert now["metadata"]["generation"] == old_deployment["metadata"]["generation"], name
            assert now["spec"]["template"] == old_deployment["spec"]["template"], name
            assert replica_sets_of(control_plane, name, namespace) == sets_before[name], name
    finally:
        upgraded.stop()
        operator.start()


def test_survives_an_apiserver_restart(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    create_ok(control_plane, manifest("steady", namespace))
    eventually(lambda: get(control_plane, "deployment", "steady", namespace), "Deployment")
    control_plane.restart_apiserver()
    assert operator.alive()
    # Watches re-established: a change and a new object after the restart are both handled.
    patch(control_plane, "lhis", "steady", namespace, {"spec": {"replicas": 2}})
    create_ok(control_plane, manifest("after", namespace))
    eventually(
        lambda: must_get(control_plane, "deployment", "steady", namespace)["spec"]["replicas"] == 2,
        "update after the restart",
        timeout=120,
    )
    eventually(
        lambda: get(control_plane, "deployment", "after", namespace), "create after the restart",
        timeout=120,
    )  # fmt: skip
    assert operator.alive()


def reconciled(plane: ControlPlane, namespace: str, count: int) -> bool:
    """``count`` services, each with a Deployment, a Service, a PDB and a status."""

    def items(kind: str) -> list[dict[str, Any]]:
        proc = plane.kubectl("get", kind, "-n", namespace, "-o", "json")
        assert proc.returncode == 0, proc.stderr
        return list(json.loads(proc.stdout)["items"])

    with_status = [i for i in items("lhis") if i.get("status", {}).get("observedGeneration") == 1]
    if len(with_status) != count:
        return False
    return all(len(items(kind)) == count for kind in ("deployments", "services", "pdb"))


def apply_many(plane: ControlPlane, namespace: str, count: int) -> None:
    items = [manifest(f"svc-{i:02d}", namespace, replicas=2) for i in range(count)]
    proc = plane.kubectl(
        "apply", "--server-side", "-f", "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_bench_fifty_services(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    """How long the operator takes to bring 50 InferenceServices to their desired objects.

    Live: the operator runs while ``kubectl apply`` creates them one after another (the clock
    includes kubectl's own time). Backlog: the 50 exist before the operator starts; the clock
    runs from its start (process start and kopf's startup included).
    """
    count = 50
    started = time.monotonic()
    apply_many(control_plane, namespace, count)
    applied = time.monotonic() - started
    eventually(lambda: reconciled(control_plane, namespace, count), "live batch", timeout=300)
    live = time.monotonic() - started

    backlog_ns = f"op-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", backlog_ns, check=True)
    try:
        operator.stop()
        try:
            apply_many(control_plane, backlog_ns, count)
        finally:
            started = time.monotonic()
            operator.start()
        eventually(lambda: reconciled(control_plane, backlog_ns, count), "backlog", timeout=300)
        backlog = time.monotonic() - started
    finally:
        control_plane.kubectl("delete", "namespace", backlog_ns, "--wait=false")
    print(
        f"\nBENCH operator, {count} InferenceServices -> Deployment+Service+PDB+status: "
        f"live {live:.1f}s (kubectl apply itself {applied:.1f}s); "
        f"backlog after operator start {backlog:.1f}s"
    )
