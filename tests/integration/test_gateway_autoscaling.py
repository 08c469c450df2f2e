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

import httpx
import pytest

from tests.conftest import start_server
from tests.harness import wait_until
from tests.harness.controlplane import ControlPlane
from tests.harness.gateway import GatewayProcess
from tests.harness.operator import autoscaling_operator
from tests.harness.prometheus import Prometheus
from tests.integration.test_autoscaling import condition, get_isvc
from tests.integration.test_gateway import apply, endpoint_slice, inference_service, metric

pytestmark = [pytest.mark.cluster, pytest.mark.prometheus, pytest.mark.server, pytest.mark.slow]

IDLE_S = 30  # the CRD's minimum scaleToZeroIdleSeconds


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
    operator = autoscaling_operator(
        cp.kubeconfig, tmp_path / "operator.log", prometheus.url, namespace
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

    def pod_ready() -> None:
        """The server process up as the service's one ready pod: a Prometheus target labelled
        as its ServiceMonitor would label it, a ready endpoint."""
        labels = {"namespace": namespace, "service": name}
        prometheus.add_targets(server_job, [f"127.0.0.1:{server.port}"], labels=labels)
        apply(cp, endpoint_slice(namespace, name, [(0, server.port, "ready")]))

    def pod_gone() -> None:
        prometheus.remove_targets(server_job)
        apply(cp, endpoint_slice(namespace, name, []))

    autoscaling = {
        "enabled": True,
        "minReplicas": 0,
        "maxReplicas": 2,
        "scaleToZeroIdleSeconds": IDLE_S,
        "metricsWindowSeconds": 10,
    }
    try:
        apply(cp, inference_service(namespace, name, tiny_model, 1, autoscaling=autoscaling))
        pod_ready()
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
            lambda: get_isvc(cp, namespace, name)["spec"]["replicas"] == 0,
            timeout=IDLE_S + 60,
            what=f"scale to zero after {IDLE_S}s idle (operator log {operator.log_path})",
            describe=lambda: json.dumps(get_isvc(cp, namespace, name).get("status")),
        )
        obj = get_isvc(cp, namespace, name)
        down = obj["status"]["scalingDecisions"][-1]
        assert (down["to"], down["reason"]) == (0, "ScaledToZero"), down
        wait_until(
            lambda: (
                condition(get_isvc(cp, namespace, name), "Ready").get("reason") == "ScaledToZero"
            ),
            timeout=30,
            what="Ready False, ScaledToZero",
        )
        assert condition(get_isvc(cp, namespace, name), "Ready")["status"] == "False"
        # the pod goes: no endpoint, no Prometheus target
        pod_gone()

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
            lambda: get_isvc(cp, namespace, name)["spec"]["replicas"] == 1,
            timeout=60,
            what="the autoscaler raising the service for the held request",
            describe=lambda: json.dumps(get_isvc(cp, namespace, name).get("status")),
        )
        up = get_isvc(cp, namespace, name)["status"]["scalingDecisions"][-1]
        assert (up["from"], up["to"], up["reason"]) == (0, 1, "ScaleFromZero"), up
        assert client.is_alive(), "the held request ended before a replica was ready"
        # the pod starts and turns ready: the held request is answered
        pod_ready()
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
