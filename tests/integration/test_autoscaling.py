"""Autoscaling end to end on real parts, short of a kubelet.

Real: the control plane (etcd, kube-apiserver, controller-manager, scheduler), Prometheus
(Debian's package) scraping real llamaherd server processes running a generated model, the
operator as its own process (``python -m llamaherd_operator``), and a bounded load generator.

Stand-in: pods do not run in this harness (no kubelet), so **the server processes stand in for
the pods as Prometheus targets**. A small "fleet" loop plays the kubelet and the Service: when
the InferenceService's replica count says N, the first N server processes are the Prometheus
targets (labelled with the service's namespace and name, as a ServiceMonitor would) and the
load generator sends its requests to them round-robin. The full-node end-to-end test (e2e/)
closes that gap with real pods.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.chart.test_metric_names import dashboard_exprs, scraped_names, used_names
from tests.conftest import ServerProcess, start_server
from tests.harness import free_port, wait_until
from tests.harness.controlplane import ControlPlane
from tests.harness.operator import autoscaling_operator
from tests.harness.prometheus import Prometheus

pytestmark = [pytest.mark.cluster, pytest.mark.prometheus, pytest.mark.slow]

MAX_REPLICAS = 3
ALERTS = Path(__file__).resolve().parents[2] / "monitoring" / "alerts" / "llamaherd.rules.yaml"


class Fleet:
    """Plays kubelet and Service for the server processes: follows spec.replicas."""

    def __init__(
        self,
        control_plane: ControlPlane,
        prometheus: Prometheus,
        servers: list[ServerProcess],
        namespace: str,
        name: str,
    ) -> None:
        self.cp, self.prom, self.servers = control_plane, prometheus, servers
        self.namespace, self.name = namespace, name
        self.job = f"autoscale-{namespace}"
        self.replicas = 0
        self.history: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.prom.remove_targets(self.job)

    def active(self) -> list[ServerProcess]:
        return self.servers[: max(1, self.replicas)]

    def _run(self) -> None:
        while not self._stop.is_set():
            proc = self.cp.kubectl(
                "get", "lhis", self.name, "-n", self.namespace, "-o", "jsonpath={.spec.replicas}"
            )
            if proc.returncode == 0 and proc.stdout.strip():
                n = min(int(proc.stdout), len(self.servers))
                if n != self.replicas:
                    self.replicas = n
                    self.history.append(n)
                    self.prom.add_targets(
                        self.job,
                        [f"127.0.0.1:{s.port}" for s in self.servers[:n]],
                        labels={"namespace": self.namespace, "service": self.name},
                    )
            self._stop.wait(0.5)


def load(fleet: Fleet, stop: threading.Event, workers: int, deadline_s: float) -> list[int]:
    """Closed-loop load: ``workers`` clients, round-robin over the fleet, until ``stop`` or
    ``deadline_s``; bounded in time and count."""
    statuses: list[int] = []
    counter = itertools.count()
    end = time.monotonic() + deadline_s

    def worker() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set() and time.monotonic() < end and len(statuses) < 5000:
                servers = fleet.active()
                server = servers[next(counter) % len(servers)]
                try:
                    r = client.post(
                        server.url + "/v1/generate",
                        json={
                            "prompt": "tell me a long story",
                            "max_tokens": 48,
                            "ignore_eos": True,
                        },
                    )
                    statuses.append(r.status_code)
                except httpx.HTTPError:
                    statuses.append(0)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=deadline_s + 60)
    return statuses


@pytest.fixture
def servers(small_model: Path, tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started = [
        start_server(small_model, tmp_path, "--threads", "1", "--slots", "2", "--max-wait-ms", "0")
        for _ in range(MAX_REPLICAS)
    ]
    yield started
    for s in started:
        s.stop()


def get_isvc(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    proc = cp.kubectl("get", "lhis", name, "-n", namespace, "-o", "json", check=True)
    return dict(json.loads(proc.stdout))


def test_desired_replicas_follow_the_queue_up_and_back_down(
    control_plane: ControlPlane,
    prometheus: Prometheus,
    servers: list[ServerProcess],
    operator_crd: None,
    small_model: Path,
    tmp_path: Path,
) -> None:
    namespace, name = f"as-{uuid.uuid4().hex[:6]}", "herd"
    cp = control_plane
    cp.kubectl("create", "namespace", namespace, check=True)
    metrics_port = free_port()
    # A Prometheus that never answers, allowed (the allow-list is not what this test checks).
    dead_prometheus = f"http://127.0.0.1:{free_port()}"
    operator = autoscaling_operator(
        cp.kubeconfig,
        tmp_path / "operator.log",
        prometheus.url,
        namespace,
        metrics_port,
        LLAMAHERD_OPERATOR_ALLOWED_PROMETHEUS_URLS=dead_prometheus,
    )
    fleet = Fleet(cp, prometheus, servers, namespace, name)
    manifest = {
        "apiVersion": "llamaherd.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"hostPath": {"path": str(small_model)}},
            "server": {"slots": 2},
            "autoscaling": {
                "enabled": True,
                "minReplicas": 1,
                "maxReplicas": MAX_REPLICAS,
                "targetQueueDepthPerReplica": 1,
                "scaleDownStabilizationSeconds": 10,
                "metricsWindowSeconds": 10,
            },
        },
    }
    try:
        cp.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=True)
        operator.start()
        fleet.start()
        wait_until(lambda: fleet.replicas == 1, timeout=30, what="the fleet at one replica")
        # Idle: metrics flow, the autoscaler is active and holds one replica.
        wait_until(
            lambda: (
                condition(get_isvc(cp, namespace, name), "ScalingActive").get("status") == "True"
            ),
            timeout=60,
            what="ScalingActive=True before load",
            describe=lambda: json.dumps(get_isvc(cp, namespace, name).get("status")),
        )

        stop = threading.Event()
        result: list[list[int]] = []
        loader = threading.Thread(target=lambda: result.append(load(fleet, stop, 10, 240)))
        loader.start()
        try:
            wait_until(
                lambda: get_isvc(cp, namespace, name)["spec"]["replicas"] >= 2,
                timeout=120,
                what=f"scale-up under load (operator log {operator.log_path})",
            )
        finally:
            stop.set()
            loader.join(timeout=120)
        assert result and result[0] and all(s == 200 for s in result[0]), set(result[0])

        isvc = get_isvc(cp, namespace, name)
        ups = [d for d in isvc["status"]["scalingDecisions"] if d["to"] > d["from"]]
        assert ups, isvc["status"]
        assert ups[0]["reason"] in ("ScaleUp", "BurstScaleUp")
        assert "waiting" in ups[0]["message"]
        assert "lastScaleTime" in isvc["status"]
        deployment = json.loads(
            cp.kubectl("get", "deployment", name, "-n", namespace, "-o", "json", check=True).stdout
        )
        assert deployment["spec"]["replicas"] >= 2, "the Deployment did not follow"

        # Load gone: back to the minimum after the short stabilization window.
        wait_until(
            lambda: get_isvc(cp, namespace, name)["spec"]["replicas"] == 1,
            timeout=120,
            what="scale-down after the load stopped",
        )
        isvc = get_isvc(cp, namespace, name)
        downs = [d for d in isvc["status"]["scalingDecisions"] if d["to"] < d["from"]]
        assert downs and downs[-1]["reason"] == "ScaleDown"
        assert isvc["status"]["queueDepth"] == 0
        events = cp.kubectl("get", "events", "-n", namespace, "-o", "json", check=True)
        reasons = {e["reason"] for e in json.loads(events.stdout)["items"]}
        assert reasons & {"ScaleUp", "BurstScaleUp"} and "ScaleDown" in reasons, reasons
        assert max(fleet.history) >= 2

        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        # The running operator exports every operator metric the dashboard and alerts read.
        used = used_names(
            dashboard_exprs()
            + [
                rule["expr"]
                for group in yaml.safe_load(ALERTS.read_text())["groups"]
                for rule in group["rules"]
            ]
        )
        wanted = {n for n in used if n.startswith("llamaherd_operator_")}
        assert wanted, "the dashboard and alerts read no operator metric?"
        assert not wanted - scraped_names(text), wanted - scraped_names(text)
        assert _sample(text, 'llamaherd_operator_scaling_decisions_total{direction="up"}') >= 1
        assert _sample(text, 'llamaherd_operator_scaling_decisions_total{direction="down"}') >= 1

        # Prometheus gone: the autoscaler holds and says why, never drops to the minimum.
        cp.kubectl("scale", "lhis", name, "-n", namespace, "--replicas=2", check=True)
        cp.kubectl(
            "patch",
            "lhis",
            name,
            "-n",
            namespace,
            "--type=merge",
            "-p",
            json.dumps({"spec": {"autoscaling": {"prometheusUrl": dead_prometheus}}}),
            check=True,
        )
        wait_until(
            lambda: (
                condition(get_isvc(cp, namespace, name), "ScalingActive").get("status") == "False"
            ),
            timeout=60,
            what="ScalingActive=False without Prometheus",
        )
        isvc = get_isvc(cp, namespace, name)
        assert isvc["spec"]["replicas"] == 2
        scaling = next(c for c in isvc["status"]["conditions"] if c["type"] == "ScalingActive")
        assert scaling["reason"] == "MetricsUnavailable"
        assert "unreachable" in scaling["message"]
    finally:
        fleet.stop()
        operator.stop()
        cp.kubectl("delete", "namespace", namespace, "--wait=false")


def condition(isvc: dict[str, Any], kind: str) -> dict[str, Any]:
    """The status condition of type ``kind`` ({} if there is none)."""
    for c in (isvc.get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return dict(c)
    return {}


def _sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0
