"""Scale to zero and back on real parts: the operator's autoscaler takes an idle service to zero,
and counts the requests the gateway holds (read from Prometheus) as the demand that brings it
back.

Real: the control plane, Prometheus scraping a llamaherd server process and the gateway process,
the operator as its own process, the gateway as its own process. Stand-ins as in
test_gateway.py and test_autoscaling.py: no kubelet, so the server process plays the pod (a
Prometheus target labelled with the service's namespace and name while the service has a
replica, as its ServiceMonitor would make it) and the test writes its EndpointSlice (addresses
from 198.18.0.0/15 that the gateway dials on 127.0.0.1).
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import start_server
from tests.harness import free_port, wait_until
from tests.harness.controlplane import ControlPlane
from tests.harness.gateway import GatewayProcess
from tests.harness.operator import OperatorProcess
from tests.harness.prometheus import Prometheus
from tests.integration.test_gateway import endpoint_slice, inference_service, metric

pytestmark = [pytest.mark.cluster, pytest.mark.prometheus, pytest.mark.server, pytest.mark.slow]

IDLE_S = 30  # the CRD's minimum scaleToZeroIdleSeconds


def isvc(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    out = cp.kubectl("get", "lhis", name, "-n", namespace, "-o", "json", check=True).stdout
    return dict(json.loads(out))


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return dict(c)
    return {}


def test_idle_service_goes_to_zero_and_held_requests_bring_it_back(
    control_plane: ControlPlane,
    prometheus: Prometheus,
    operator_crd: None,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    cp = control_plane
    namespace, name = f"gwz-{uuid.uuid4().hex[:6]}", "napper"
    cp.kubectl("create", "namespace", namespace, check=True)
    server_job, gateway_job = f"gwz-server-{namespace}", f"gwz-gateway-{namespace}"
    server = start_server(tiny_model, tmp_path, "--model-name", name, "--threads", "1")
    operator = OperatorProcess(
        cp.kubeconfig,
        tmp_path / "operator.log",
        env={
            "LLAMAHERD_OPERATOR_PROMETHEUS_URL": prometheus.url,
            "LLAMAHERD_OPERATOR_AUTOSCALE_INTERVAL_SECONDS": "2",
            "LLAMAHERD_OPERATOR_METRICS_HOST": "127.0.0.1",
            "LLAMAHERD_OPERATOR_METRICS_PORT": str(free_port()),
            "LLAMAHERD_OPERATOR_NAMESPACES": namespace,
        },
    )
    # The gateway does not scale here: only the autoscaler's reading of the held requests can
    # bring the service back.
    gateway = GatewayProcess(
        cp.kubeconfig,
        tmp_path / "gateway.log",
        env={
            "LLAMAHERD_GATEWAY_NAMESPACES": namespace,
            "LLAMAHERD_GATEWAY_SCALE_FROM_ZERO": "false",
            "LLAMAHERD_GATEWAY_HOLD_TIMEOUT_SECONDS": "120",
        },
    )
    autoscaling = {
        "enabled": True,
        "minReplicas": 0,
        "maxReplicas": 2,
        "scaleToZeroIdleSeconds": IDLE_S,
        "metricsWindowSeconds": 10,
    }
    try:
        cp.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(
                inference_service(namespace, name, tiny_model, 1, autoscaling=autoscaling)
            ),
            check=True,
        )
        pod_labels = {"namespace": namespace, "service": name}
        prometheus.add_targets(server_job, [f"127.0.0.1:{server.port}"], labels=pod_labels)
        cp.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(endpoint_slice(namespace, name, [(0, server.port, "ready")])),
            check=True,
        )
        operator.start()
        gateway.start()
        prometheus.add_targets(gateway_job, [f"127.0.0.1:{gateway.port}"])

        # One request through the gateway, then nothing: after the idle time, zero.
        r = httpx.post(
            gateway.url + "/v1/completions",
            json={"model": name, "prompt": "hi", "max_tokens": 2},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        wait_until(
            lambda: isvc(cp, namespace, name)["spec"]["replicas"] == 0,
            timeout=IDLE_S + 60,
            what=f"scale to zero after {IDLE_S}s idle (operator log {operator.log_path})",
            describe=lambda: json.dumps(isvc(cp, namespace, name).get("status")),
        )
        obj = isvc(cp, namespace, name)
        down = obj["status"]["scalingDecisions"][-1]
        assert (down["to"], down["reason"]) == (0, "ScaledToZero"), down
        wait_until(
            lambda: condition(isvc(cp, namespace, name), "Ready").get("reason") == "ScaledToZero",
            timeout=30,
            what="Ready False, ScaledToZero",
        )
        assert condition(isvc(cp, namespace, name), "Ready")["status"] == "False"
        # the pod goes: no endpoint, no Prometheus target
        prometheus.remove_targets(server_job)
        cp.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(endpoint_slice(namespace, name, [])),
            check=True,
        )

        # A request at zero is held; the autoscaler reads it from Prometheus and scales up.
        result: list[httpx.Response] = []
        client = threading.Thread(
            target=lambda: result.append(
                httpx.post(
                    gateway.url + "/v1/completions",
                    json={"model": name, "prompt": "wake up", "max_tokens": 2},
                    timeout=150,
                )
            ),
            daemon=True,
        )
        client.start()
        wait_until(
            lambda: isvc(cp, namespace, name)["spec"]["replicas"] == 1,
            timeout=60,
            what="the autoscaler raising the service for the held request",
            describe=lambda: json.dumps(isvc(cp, namespace, name).get("status")),
        )
        up = isvc(cp, namespace, name)["status"]["scalingDecisions"][-1]
        assert (up["from"], up["to"], up["reason"]) == (0, 1, "ScaleFromZero"), up
        assert client.is_alive(), "the held request ended before a replica was ready"
        # the pod starts and turns ready: the held request is answered
        prometheus.add_targets(server_job, [f"127.0.0.1:{server.port}"], labels=pod_labels)
        cp.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(endpoint_slice(namespace, name, [(0, server.port, "ready")])),
            check=True,
        )
        client.join(timeout=120)
        assert result and result[0].status_code == 200, result and result[0].text
        text = gateway.metrics()
        assert metric(text, "llamaherd_gateway_scale_from_zero_total") == 0
        assert metric(text, "llamaherd_gateway_requests_total", outcome="ok") == 2
    finally:
        gateway.stop()
        operator.stop()
        server.stop()
        prometheus.remove_targets(server_job)
        prometheus.remove_targets(gateway_job)
        cp.kubectl("delete", "namespace", namespace, "--wait=false")
