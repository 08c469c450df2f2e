"""Pod discovery for the chart's in-cluster Prometheus (prometheus.enabled).

Debian's prometheus package is built without Kubernetes service discovery
(kubernetes_sd_configs), so this sidecar lists the pods through the Kubernetes API and writes
Prometheus file_sd target files with the same __meta_kubernetes_* labels as the pod role of
kubernetes_sd_configs would: prometheus.yml's relabel rules keep and label the targets exactly as
with Kubernetes discovery. Standard library only; runs in the operator image.

Environment: DISCOVERY_OUTPUT (a folder), DISCOVERY_INTERVAL_SECONDS, SERVER_NAMESPACES (comma
list; empty = every namespace), SERVER_SELECTOR, OPERATOR_NAMESPACE, OPERATOR_SELECTOR,
GATEWAY_SELECTOR (optional: the gateway's pods in OPERATOR_NAMESPACE).
"""

from __future__ import annotations

import json
import os
import re
import ssl
import sys
import time
import urllib.parse
import urllib.request
from typing import Any

ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def meta_name(name: str) -> str:
    """A Kubernetes label key as Prometheus writes it into a meta label name."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_targets(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """file_sd target groups of one pod: one per container port, as the kubernetes_sd pod role."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    status = pod.get("status", {})
    ip = status.get("podIP")
    if not ip:
        return []
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", [])
    )
    common = {
        "__meta_kubernetes_namespace": meta.get("namespace", ""),
        "__meta_kubernetes_pod_name": meta.get("name", ""),
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_phase": status.get("phase", ""),
        "__meta_kubernetes_pod_ready": "true" if ready else "false",
        "__meta_kubernetes_pod_node_name": spec.get("nodeName", ""),
        "__meta_kubernetes_pod_uid": meta.get("uid", ""),
    }
    for key, value in (meta.get("labels") or {}).items():
        common[f"__meta_kubernetes_pod_label_{meta_name(key)}"] = value
        common[f"__meta_kubernetes_pod_labelpresent_{meta_name(key)}"] = "true"
    groups = []
    for init, containers in (
        (False, spec.get("containers", [])),
        (True, spec.get("initContainers", [])),
    ):
        for container in containers or []:
            for port in container.get("ports") or []:
                if port.get("protocol", "TCP") != "TCP":
                    continue
                number = port["containerPort"]
                host = f"[{ip}]" if ":" in ip else ip
                labels = {
                    **common,
                    "__meta_kubernetes_pod_container_name": container.get("name", ""),
                    "__meta_kubernetes_pod_container_init": "true" if init else "false",
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(number),
                    "__meta_kubernetes_pod_container_port_protocol": "TCP",
                }
                groups.append({"targets": [f"{host}:{number}"], "labels": labels})
    return groups


class Api:
    """The in-cluster API server, with the pod's ServiceAccount token (re-read: it rotates)."""

    def __init__(self) -> None:
        host = os.environ["KUBERNETES_SERVICE_HOST"]
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.base = f"https://{f'[{host}]' if ':' in host else host}:{port}"
        self.context = ssl.create_default_context(cafile=f"{ACCOUNT}/ca.crt")

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        path = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
        url = f"{self.base}{path}?{urllib.parse.urlencode({'labelSelector': selector})}"
        with open(f"{ACCOUNT}/token") as f:
            token = f.read().strip()
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, context=self.context, timeout=10) as response:
            return json.load(response).get("items", [])


def write(folder: str, job: str, groups: list[dict[str, Any]]) -> None:
    """Atomically: Prometheus watches the folder and must never read half a file."""
    path = os.path.join(folder, f"{job}.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(groups, f, sort_keys=True)
    os.replace(tmp, path)


def discover_once(api: Api, env: dict[str, str]) -> None:
    jobs = {
        "llamaherd-server": [
            (namespace, env["SERVER_SELECTOR"])
            for namespace in (env.get("SERVER_NAMESPACES", "").split(",") or [""])
        ],
        "llamaherd-operator": [(env["OPERATOR_NAMESPACE"], env["OPERATOR_SELECTOR"])],
    }
    if env.get("GATEWAY_SELECTOR"):  # the gateway's pods, in the release namespace
        jobs["llamaherd-gateway"] = [(env["OPERATOR_NAMESPACE"], env["GATEWAY_SELECTOR"])]
    for job, queries in jobs.items():
        groups = [g for ns, sel in queries for pod in api.pods(ns, sel) for g in pod_targets(pod)]
        write(env["DISCOVERY_OUTPUT"], job, groups)


def main() -> None:
    env = dict(os.environ)
    interval = float(env.get("DISCOVERY_INTERVAL_SECONDS", "5"))
    api = Api()
    while True:
        try:
            discover_once(api, env)
        except Exception as exc:  # keep the last files; try again next round
            print(f"discovery failed: {exc!r}", file=sys.stderr, flush=True)
        time.sleep(interval)


if __name__ == "__main__":
    main()
