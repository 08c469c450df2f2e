"""Fixtures of the e2e suite: the cluster, the chart, the model server, a namespace per test.

The cluster comes from ``$LLAMAHERD_E2E_KUBECONFIG`` or, without it, from
``hack/kind/cluster.sh up`` (idempotent; the last line of its output is the kubeconfig). The
tests never delete the cluster. On a failure, the report gets a dump of the test's namespaces
(pods, events, InferenceServices, logs) and of the operator's logs.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.kube import LHIS, Kube, KubeError, event_time, wait_for
from e2e.support import (
    GATEWAY_SELECTOR,
    OPERATOR_SELECTOR,
    RELEASE_NAMESPACE,
    Models,
    helm_install,
    operator_installed,
    start_model_server,
)
from tests.harness import REPO_ROOT, binary_path

NAMESPACES_KEY: pytest.StashKey[list[str]] = pytest.StashKey()
DUMP_DIR = Path(os.environ.get("LLAMAHERD_E2E_ARTIFACTS", "/tmp/llamaherd-e2e"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: runs against a real cluster (kind or other)")


# -- the cluster -------------------------------------------------------------------------------


def _cluster_kubeconfig() -> Path:
    env = os.environ.get("LLAMAHERD_E2E_KUBECONFIG")
    if env:
        return Path(env)
    result = subprocess.run(
        ["bash", "hack/kind/cluster.sh", "up"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"hack/kind/cluster.sh up exited {result.returncode}:\n{result.stderr[-4000:]}"
        )
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError("hack/kind/cluster.sh up printed no kubeconfig path")
    return Path(lines[-1])


@pytest.fixture(scope="session")
def kube() -> Kube:
    """kubectl/helm on the cluster under test (reachable, one node Ready at least)."""
    kubeconfig = _cluster_kubeconfig()
    assert kubeconfig.is_file(), f"kubeconfig {kubeconfig} does not exist"
    client = Kube(kubeconfig, binary_path("kubectl"), binary_path("helm"))
    wait_for(
        lambda: any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for node in client.items("nodes", namespace=None)
            for c in node.get("status", {}).get("conditions", [])
        ),
        timeout=180,
        description="a Ready node",
    )
    return client


class Chart:
    """The chart's release; installed once per session, again after a test uninstalls it."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def ensure_installed(self) -> None:
        if not operator_installed(self.kube):
            helm_install(self.kube)


@pytest.fixture(scope="session")
def chart(kube: Kube) -> Chart:
    chart = Chart(kube)
    helm_install(kube)  # upgrade --install: the chart as this checkout has it
    return chart


@pytest.fixture
def operator(chart: Chart) -> Chart:
    """The operator installed and Ready before the test starts."""
    chart.ensure_installed()
    return chart


@pytest.fixture(scope="session")
def models(kube: Kube) -> Models:
    """GGUF files (tiny, small, not-a-gguf) served at http://models.<ns>.svc.cluster.local:8080."""
    return start_model_server(kube)


# -- a namespace per test ----------------------------------------------------------------------


def _namespace_name(node: pytest.Item) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", node.name.lower().removeprefix("test_"))[:40].strip("-")
    return f"e2e-{base}-{uuid.uuid4().hex[:5]}"


def _delete_namespace(kube: Kube, name: str) -> None:
    """Delete the namespace's InferenceServices first (the operator removes kopf's finalizers)."""
    try:
        kube.kubectl(
            "delete",
            LHIS,
            "--all",
            f"--namespace={name}",
            "--wait=true",
            "--timeout=90s",
            timeout=120,
        )
    except (KubeError, subprocess.TimeoutExpired):
        # The operator is gone (or stuck): drop the finalizers so the namespace can go.
        for obj in kube.items(LHIS, name):
            kube.patch(LHIS, obj["metadata"]["name"], name, {"metadata": {"finalizers": None}})
    kube.delete("namespace", name, wait=True, timeout=240)


@pytest.fixture
def make_namespace(request: pytest.FixtureRequest, kube: Kube) -> Iterator[Callable[..., str]]:
    """Create namespaces for this test; each is deleted afterwards (waiting until it is gone)."""
    created: list[str] = []
    request.node.stash[NAMESPACES_KEY] = created

    def make(restricted: bool = False) -> str:
        name = _namespace_name(request.node)
        labels = {"llamaherd.io/e2e": "true"}
        if restricted:
            labels |= {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
                "pod-security.kubernetes.io/warn": "restricted",
            }
        kube.apply(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
        )
        created.append(name)
        return name

    yield make
    for name in created:
        _delete_namespace(kube, name)


@pytest.fixture
def namespace(make_namespace: Callable[..., str]) -> str:
    return make_namespace()


@pytest.fixture
def restricted_namespace(make_namespace: Callable[..., str]) -> str:
    """A namespace that enforces the ``restricted`` Pod Security Standard."""
    return make_namespace(restricted=True)


# -- dump on failure ---------------------------------------------------------------------------


def _safe(what: str, fn: Callable[[], str]) -> str:
    try:
        return f"==== {what}\n{fn()}\n"
    except Exception as exc:  # a dump never hides the failure
        return f"==== {what}: cannot get it: {exc}\n"


def _kubectl_text(kube: Kube, *args: str) -> Callable[[], str]:
    return lambda: kube.kubectl(*args).stdout


def _events_text(kube: Kube, namespace: str) -> Callable[[], str]:
    def text() -> str:
        return "\n".join(
            f"{event_time(e)} {e.get('type')} {e.get('reason')} "
            f"{e['involvedObject'].get('kind')}/{e['involvedObject'].get('name')}: "
            f"{e.get('message', '').strip()}"
            for e in kube.events(namespace)
        )

    return text


def _logs_text(
    kube: Kube, pod: str, namespace: str, container: str, *, previous: bool, tail: int
) -> Callable[[], str]:
    return lambda: kube.logs(pod, namespace, container, previous=previous, tail=tail)


def dump_state(kube: Kube, namespaces: list[str]) -> str:
    """Pods, events, InferenceServices and logs of ``namespaces``, and the operator's logs."""
    parts: list[str] = []
    for ns in namespaces:
        parts.append(
            _safe(f"pods in {ns}", _kubectl_text(kube, "get", "pods", "-o", "wide", "-n", ns))
        )
        parts.append(
            _safe(
                f"deployments, replicasets, services, PDBs in {ns}",
                _kubectl_text(kube, "get", "deploy,rs,svc,pdb", "-o", "wide", "-n", ns),
            )
        )
        parts.append(_safe(f"events in {ns}", _events_text(kube, ns)))
        parts.append(
            _safe(
                f"InferenceServices in {ns}",
                _kubectl_text(kube, "get", LHIS, "-o", "yaml", "-n", ns),
            )
        )
        for pod in _pods_or_empty(kube, ns):
            parts.extend(_pod_logs(kube, pod))
    parts.append(
        _safe("pods in all namespaces", _kubectl_text(kube, "get", "pods", "-A", "-o", "wide"))
    )
    for pod in _pods_or_empty(kube, RELEASE_NAMESPACE, OPERATOR_SELECTOR):
        parts.extend(_pod_logs(kube, pod, tail=400))
    for pod in _pods_or_empty(kube, RELEASE_NAMESPACE, GATEWAY_SELECTOR):
        parts.extend(_pod_logs(kube, pod, tail=200))
    return "".join(parts)


def _pods_or_empty(kube: Kube, ns: str, selector: str | None = None) -> list[dict[str, Any]]:
    try:
        return kube.items("pods", ns, selector=selector)
    except Exception:
        return []


def _pod_logs(kube: Kube, pod: dict[str, Any], tail: int = 200) -> list[str]:
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    status = pod.get("status", {})
    out = []
    for c in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        container = c["name"]
        out.append(
            _safe(
                f"logs {ns}/{name} [{container}]",
                _logs_text(kube, name, ns, container, previous=False, tail=tail),
            )
        )
        if c.get("restartCount"):
            out.append(
                _safe(
                    f"previous logs {ns}/{name} [{container}]",
                    _logs_text(kube, name, ns, container, previous=True, tail=tail),
                )
            )
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failed setup or call, dump the cluster's state while the namespaces still exist."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.when not in ("setup", "call") or not report.failed:
        return
    kube = getattr(item, "funcargs", {}).get("kube")
    if not isinstance(kube, Kube):
        return
    created = item.stash.get(NAMESPACES_KEY, None)
    namespaces: list[str] = [*created] if created else []
    text = dump_state(kube, namespaces)
    report.sections.append(("e2e cluster state", text))
    try:
        DUMP_DIR.mkdir(parents=True, exist_ok=True)
        path = DUMP_DIR / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', item.nodeid)}.txt"
        path.write_text(text)
        report.sections.append(("e2e cluster state file", str(path)))
    except OSError:
        pass
