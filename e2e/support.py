"""What the scenarios share: InferenceService specs, the model server, load pods, the chart."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from e2e.kube import API_GROUP, LHIS, Kube, Obj, condition, pod_ready, wait_for

SERVER_IMAGE = "llamaherd-server:cpu"
CLIENT_IMAGE = "llamaherd-e2e-client:dev"

RELEASE = "llamaherd"
RELEASE_NAMESPACE = "llamaherd-system"
OPERATOR_SELECTOR = (
    "app.kubernetes.io/name=llamaherd,app.kubernetes.io/instance=llamaherd,"
    "app.kubernetes.io/component=operator"
)
PROMETHEUS_DEPLOYMENT = "llamaherd-prometheus"
# The gateway (gateway.enabled in examples/helm/kind-values.yaml).
GATEWAY_SERVICE = "llamaherd-gateway"
GATEWAY_SELECTOR = (
    "app.kubernetes.io/name=llamaherd-gateway,app.kubernetes.io/instance=llamaherd,"
    "app.kubernetes.io/component=gateway"
)
GATEWAY_URL = f"http://{GATEWAY_SERVICE}.{RELEASE_NAMESPACE}.svc.cluster.local:80"

MODELS_NAMESPACE = "llamaherd-e2e-models"
MODEL_FILES = ("tiny.gguf", "small.gguf", "not-a-gguf.gguf")

# The node has 2 CPUs for everything: every pod asks for little.
SMALL_REQUESTS = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
SERVER_RESOURCES = {"requests": {"cpu": "50m", "memory": "192Mi"}, "limits": {"memory": "1Gi"}}

RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
}


def server_selector(name: str) -> str:
    return f"app.kubernetes.io/name=llamaherd-server,app.kubernetes.io/instance={name}"


# -- the chart ---------------------------------------------------------------------------------


def helm_install(kube: Kube) -> None:
    """Install (or upgrade) the chart exactly as the docs tell a user: Helm installs the CRD on
    the first install and never upgrades it, so an upgrade applies it first
    (docs/chart.md, "CRD upgrades"); a cluster kept from an older checkout needs that."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", "charts/llamaherd/crds/")
    kube.helm(
        "upgrade",
        "--install",
        RELEASE,
        "charts/llamaherd",
        "--namespace",
        RELEASE_NAMESPACE,
        "--create-namespace",
        "-f",
        "examples/helm/kind-values.yaml",
        "--wait",
        "--timeout",
        "5m",
        timeout=420,
    )
    wait_for(
        lambda: any(pod_ready(p) for p in kube.pods(RELEASE_NAMESPACE, OPERATOR_SELECTOR)),
        timeout=180,
        description="the operator pod to be Ready",
    )


def operator_installed(kube: Kube) -> bool:
    pods = kube.pods(RELEASE_NAMESPACE, OPERATOR_SELECTOR)
    return kube.get("deployment", RELEASE, RELEASE_NAMESPACE) is not None and any(
        pod_ready(p) for p in pods
    )


def operator_pod(kube: Kube) -> Obj:
    pods = [p for p in kube.pods(RELEASE_NAMESPACE, OPERATOR_SELECTOR) if pod_ready(p)]
    assert pods, "no Ready operator pod"
    return pods[0]


# -- the model server --------------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    """GGUF files served over HTTP inside the cluster, with their sha256."""

    base_url: str
    sha256: Mapping[str, str]

    def url(self, file: str) -> str:
        return f"{self.base_url}/{file}"


def model_server_manifests() -> list[Obj]:
    labels = {"app.kubernetes.io/name": "llamaherd-e2e-models"}
    generate = (
        "set -e; "
        "python -m llamaherd_server.ggufgen --preset tiny --out /srv/tiny.gguf; "
        "python -m llamaherd_server.ggufgen --preset small --out /srv/small.gguf; "
        "echo 'this is a text file, not a GGUF model' > /srv/not-a-gguf.gguf; "
        "ls -l /srv"
    )
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": MODELS_NAMESPACE,
                "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "models", "namespace": MODELS_NAMESPACE, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "securityContext": RESTRICTED_POD,
                        "initContainers": [
                            {
                                "name": "generate",
                                "image": SERVER_IMAGE,
                                "imagePullPolicy": "IfNotPresent",
                                "command": ["sh", "-c", generate],
                                "volumeMounts": [{"name": "srv", "mountPath": "/srv"}],
                                "securityContext": RESTRICTED_CONTAINER,
                                "resources": SMALL_REQUESTS,
                            }
                        ],
                        "containers": [
                            {
                                "name": "http",
                                "image": SERVER_IMAGE,
                                "imagePullPolicy": "IfNotPresent",
                                "command": [
                                    "python",
                                    "-m",
                                    "http.server",
                                    "8080",
                                    "--directory",
                                    "/srv",
                                ],
                                "ports": [{"name": "http", "containerPort": 8080}],
                                "readinessProbe": {
                                    "tcpSocket": {"port": 8080},
                                    "periodSeconds": 2,
                                },
                                "volumeMounts": [
                                    {"name": "srv", "mountPath": "/srv", "readOnly": True}
                                ],
                                "securityContext": RESTRICTED_CONTAINER,
                                "resources": SMALL_REQUESTS,
                            }
                        ],
                        "volumes": [{"name": "srv", "emptyDir": {"sizeLimit": "512Mi"}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "models", "namespace": MODELS_NAMESPACE, "labels": labels},
            "spec": {
                "selector": labels,
                "ports": [{"name": "http", "port": 8080, "targetPort": "http"}],
            },
        },
    ]


def start_model_server(kube: Kube) -> Models:
    """Apply the model server (reused when already running) and read the files' sha256."""
    kube.apply(model_server_manifests())
    selector = "app.kubernetes.io/name=llamaherd-e2e-models"
    pod = wait_for(
        lambda: next((p for p in kube.pods(MODELS_NAMESPACE, selector) if pod_ready(p)), None),
        timeout=300,
        description="the model server pod to be Ready",
        state=lambda: [
            (p["metadata"]["name"], p.get("status", {}).get("phase"))
            for p in kube.pods(MODELS_NAMESPACE, selector)
        ],
    )
    name = pod["metadata"]["name"]
    out = kube.exec(name, MODELS_NAMESPACE, "sha256sum", *(f"/srv/{f}" for f in MODEL_FILES))
    sums = {}
    for line in out.splitlines():
        digest, path = line.split()
        sums[path.rsplit("/", 1)[-1]] = digest
    assert set(sums) == set(MODEL_FILES), out
    return Models(f"http://models.{MODELS_NAMESPACE}.svc.cluster.local:8080", sums)


# -- InferenceServices -------------------------------------------------------------------------


def inference_service(
    name: str,
    namespace: str,
    models: Models,
    *,
    file: str = "tiny.gguf",
    sha256: str | None = None,
    replicas: int | None = 1,
    server: Mapping[str, Any] | None = None,
    autoscaling: Mapping[str, Any] | None = None,
) -> Obj:
    """An InferenceService on a url model from the in-cluster model server."""
    spec: Obj = {
        "model": {"url": models.url(file), "sha256": sha256 or models.sha256[file]},
        "image": SERVER_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "server": {"slots": 2, "threads": 1, "contextSize": 512, **(server or {})},
        "resources": SERVER_RESOURCES,
    }
    if replicas is not None:
        spec["replicas"] = replicas
    if autoscaling is not None:
        spec["autoscaling"] = {"enabled": True, **autoscaling}
    return {
        "apiVersion": f"{API_GROUP}/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def get_lhis(kube: Kube, name: str, namespace: str) -> Obj:
    obj = kube.get(LHIS, name, namespace)
    assert obj is not None, f"InferenceService {namespace}/{name} is gone"
    return obj


def lhis_state(kube: Kube, name: str, namespace: str) -> object:
    """A compact view of an InferenceService and its pods, for timeout messages."""
    obj = kube.get(LHIS, name, namespace) or {}
    pods = kube.pods(namespace, server_selector(name))
    return {
        "spec.replicas": obj.get("spec", {}).get("replicas"),
        "status": obj.get("status"),
        "pods": [
            {
                "name": p["metadata"]["name"],
                "phase": p.get("status", {}).get("phase"),
                "ready": pod_ready(p),
                "containers": [
                    {
                        "name": c.get("name"),
                        "state": c.get("state"),
                        "restarts": c.get("restartCount"),
                    }
                    for c in (p.get("status", {}).get("initContainerStatuses") or [])
                    + (p.get("status", {}).get("containerStatuses") or [])
                ],
            }
            for p in pods
        ],
    }


def wait_condition(
    kube: Kube,
    name: str,
    namespace: str,
    kind: str,
    status: str = "True",
    *,
    reason: str | None = None,
    timeout: float = 300,
) -> Mapping[str, Any]:
    """Wait until the InferenceService has condition ``kind`` with ``status`` (and ``reason``)."""

    def check() -> Mapping[str, Any] | None:
        found = condition(kube.get(LHIS, name, namespace), kind)
        if found.get("status") == status and (reason is None or found.get("reason") == reason):
            return found
        return None

    what = f"{kind}={status}" + (f" ({reason})" if reason else "")
    return wait_for(
        check,
        timeout=timeout,
        description=f"InferenceService {namespace}/{name} {what}",
        state=lambda: lhis_state(kube, name, namespace),
    )


def deploy(kube: Kube, service: Obj, *, pods: int = 0, scaling_active: bool = False) -> list[Obj]:
    """Apply ``service`` (an :func:`inference_service`) and wait until it is Ready; with
    ``scaling_active``, until the autoscaler reads its metrics too (Prometheus scrapes the pod:
    wait for it before any load is sent); then until ``pods`` of its pods are Ready (returned)."""
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    kube.apply(service)
    wait_condition(kube, name, namespace, "Ready", timeout=300)
    if scaling_active:
        wait_condition(kube, name, namespace, "ScalingActive", timeout=180)
    return wait_ready_pods(kube, name, namespace, pods) if pods else []


def ready_pods(kube: Kube, name: str, namespace: str) -> list[Obj]:
    return [p for p in kube.pods(namespace, server_selector(name)) if pod_ready(p)]


def wait_ready_pods(
    kube: Kube, name: str, namespace: str, count: int, *, timeout: float = 300
) -> list[Obj]:
    def enough() -> list[Obj] | None:
        pods = ready_pods(kube, name, namespace)
        return pods if len(pods) >= count else None

    return wait_for(
        enough,
        timeout=timeout,
        description=f"{count} Ready pods of {namespace}/{name}",
        state=lambda: lhis_state(kube, name, namespace),
    )


def deployment_replicas(kube: Kube, name: str, namespace: str) -> int | None:
    deployment = kube.get("deployment", name, namespace)
    return None if deployment is None else int(deployment["spec"].get("replicas", 0))


# -- load from a pod in the cluster ------------------------------------------------------------


@dataclass
class LoadResult:
    """What a load pod printed: one line per finished request and a summary."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    once: dict[str, Any] | None = None
    raw: str = ""

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("ok")]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if not r.get("ok")]


def json_lines(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects among a log's lines (other lines skipped)."""
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            yield json.loads(line)
        except ValueError:
            continue


def parse_load_output(text: str) -> LoadResult:
    result = LoadResult(raw=text)
    for item in json_lines(text):
        event = item.get("event")
        if event == "request":
            result.requests.append(item)
        elif event == "summary":
            result.summary = item
        elif event == "once":
            result.once = item
    return result


class LoadPod:
    """A pod of the client image that runs e2e/loadgen.py once (restartPolicy Never)."""

    def __init__(self, kube: Kube, namespace: str, args: list[str], name: str | None = None):
        self.kube = kube
        self.namespace = namespace
        self.name = name or f"load-{uuid.uuid4().hex[:6]}"
        self.args = args
        self.started_at: float | None = None

    def manifest(self) -> Obj:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/name": "llamaherd-e2e-load"},
            },
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "terminationGracePeriodSeconds": 5,
                "securityContext": RESTRICTED_POD,
                "containers": [
                    {
                        "name": "load",
                        "image": CLIENT_IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["python", "/opt/e2e/loadgen.py", *self.args],
                        "securityContext": RESTRICTED_CONTAINER,
                        "resources": SMALL_REQUESTS,
                    }
                ],
            },
        }

    def start(self) -> LoadPod:
        self.kube.apply(self.manifest())
        return self

    def pod(self) -> Obj | None:
        return self.kube.get("pod", self.name, self.namespace)

    def phase(self) -> str:
        return str(((self.pod() or {}).get("status") or {}).get("phase", ""))

    def wait_running(self, timeout: float = 120) -> float:
        """Wait until the load runs; return the time (time.monotonic) it was first seen running."""
        wait_for(
            lambda: self.phase() in ("Running", "Succeeded", "Failed"),
            timeout=timeout,
            interval=0.5,
            description=f"load pod {self.name} to run",
            state=lambda: (self.pod() or {}).get("status"),
        )
        self.started_at = time.monotonic()
        return self.started_at

    def output(self) -> LoadResult:
        return parse_load_output(self.kube.logs(self.name, self.namespace))

    def wait_ok(self, count: int, timeout: float = 180) -> LoadResult:
        """Wait until ``count`` requests have finished ok (the load is flowing)."""

        def enough() -> LoadResult | None:
            out = self.output()
            return out if len(out.ok) >= count else None

        return wait_for(
            enough,
            timeout=timeout,
            interval=1.0,
            description=f"{count} successful requests from load pod {self.name}",
            state=lambda: self.output().raw[-2000:],
        )

    def stop(self) -> None:
        """Ask the load to stop starting requests (it finishes those in flight)."""
        self.kube.exec(self.name, self.namespace, "touch", "/tmp/stop")

    def wait_done(self, timeout: float = 600) -> LoadResult:
        phase = wait_for(
            lambda: (p := self.phase()) in ("Succeeded", "Failed") and p,
            timeout=timeout,
            description=f"load pod {self.name} to finish",
            state=lambda: (self.pod() or {}).get("status"),
        )
        out = self.output()
        assert phase == "Succeeded", f"load pod {self.name} ended {phase}: {out.raw[-3000:]}"
        assert out.summary or out.once, f"load pod printed no summary: {out.raw[-3000:]}"
        return out


def start_load(kube: Kube, namespace: str, args: list[str]) -> LoadPod:
    """A :class:`LoadPod` running ``args`` (:func:`load_args`), started and seen running (the
    time it was first seen running is its ``started_at``)."""
    load = LoadPod(kube, namespace, args).start()
    load.wait_running()
    return load


def load_service(
    kube: Kube,
    name: str,
    namespace: str,
    *,
    concurrency: int,
    requests: int,
    duration: float,
    max_tokens: int,
) -> LoadPod:
    """:func:`start_load` with chat requests to the InferenceService's own endpoint (its
    Service): the load under which the tests change something."""
    endpoint = get_lhis(kube, name, namespace)["status"]["endpoint"]
    args = load_args(
        endpoint,
        concurrency=concurrency,
        requests=requests,
        duration=duration,
        max_tokens=max_tokens,
    )
    return start_load(kube, namespace, args)


def load_args(
    base_url: str,
    *,
    concurrency: int,
    requests: int,
    duration: float,
    max_tokens: int,
    mode: str = "chat",
    prompt: str = "Tell me about the llama herd on the hill.",
    model: str | None = None,
    stream: bool = False,
    unique_prompts: bool = False,
    failure_backoff: float = 0.0,
) -> list[str]:
    extra = [*(["--model", model] if model else []), *(["--stream"] if stream else [])]
    extra += ["--unique-prompts"] if unique_prompts else []
    extra += ["--failure-backoff", str(failure_backoff)] if failure_backoff else []
    return [
        *extra,
        "--base-url",
        base_url,
        "--mode",
        mode,
        "--concurrency",
        str(concurrency),
        "--requests",
        str(requests),
        "--duration",
        str(duration),
        "--max-tokens",
        str(max_tokens),
        "--prompt",
        prompt,
        "--stop-file",
        "/tmp/stop",
    ]


# -- watching the replica count ----------------------------------------------------------------

AUTOSCALER_REASONS = {
    "ScaleUp",
    "BurstScaleUp",
    "ScaleDown",
    "StabilizingDown",
    "StabilizingUp",
    "Steady",
    "PodsNotReady",
    "MetricsUnavailable",
    "OutOfBounds",
}
SCALE_UP_REASONS = {"ScaleUp", "BurstScaleUp"}


@dataclass
class ReplicaWatch:
    """Samples an InferenceService's ``spec.replicas``, its Deployment's and its Ready pods."""

    kube: Kube
    name: str
    namespace: str
    samples: list[tuple[float, int | None, int | None, int]] = field(default_factory=list)

    def sample(self) -> tuple[int | None, int | None, int]:
        obj = self.kube.get(LHIS, self.name, self.namespace) or {}
        spec = obj.get("spec", {}).get("replicas")
        deployment = deployment_replicas(self.kube, self.name, self.namespace)
        ready = len(ready_pods(self.kube, self.name, self.namespace))
        self.samples.append((time.monotonic(), spec, deployment, ready))
        return spec, deployment, ready

    def highest(self) -> int:
        return max(max(s[1] or 0, s[2] or 0) for s in self.samples)

    def lowest_since(self, since: float) -> int:
        values = [min(s[1] or 0, s[2] or 0) for s in self.samples if s[0] >= since]
        return min(values) if values else 0

    def story(self) -> str:
        if not self.samples:
            return "(no samples)"
        t0 = self.samples[0][0]
        lines, last = [], None
        for t, spec, deployment, ready in self.samples:
            if (spec, deployment, ready) != last:
                lines.append(
                    f"  t+{t - t0:6.1f}s spec.replicas={spec} deployment={deployment} ready={ready}"
                )
                last = (spec, deployment, ready)
        return "\n".join(lines)


def scaling_story(kube: Kube, name: str, namespace: str) -> str:
    """The decisions in the status and the autoscaler's Events, for a person to read."""
    obj = kube.get(LHIS, name, namespace) or {}
    decisions = (obj.get("status") or {}).get("scalingDecisions") or []
    lines = ["status.scalingDecisions:"]
    lines += [
        f"  {d.get('time')} {d.get('from')}->{d.get('to')} {d.get('reason')}: {d.get('message')}"
        for d in decisions
    ]
    lines.append("events:")
    for event in kube.events(namespace, name=name, kind="InferenceService"):
        lines.append(f"  {event.get('type')} {event.get('reason')}: {event.get('message')}")
    return "\n".join(lines)


# -- who served what: pods, their request logs, the gateway's request log ----------------------

SERVER_CONTAINER = "server"
GATEWAY_CONTAINER = "gateway"
# The server logs one line per request however it ends: "request <id> <outcome>" (text or JSON).
_SERVER_REQUEST_LINE = re.compile(r"\brequest ([0-9a-f]{32}) ([a-z_]+)")


def wall_time(stamp: str) -> float:
    """An RFC 3339 time (a log line's ``ts``, an object's timestamp) as seconds since the epoch."""
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def request_id(response_id: str | None) -> str | None:
    """The server's request id in an OpenAI response id (``chatcmpl-<id>``, ``cmpl-<id>``)."""
    return response_id.rsplit("-", 1)[-1] if response_id else None


def container_port(pod: Obj, port_name: str = "http") -> int:
    for container in pod["spec"]["containers"]:
        for port in container.get("ports") or []:
            if port.get("name") == port_name:
                return int(port["containerPort"])
    raise AssertionError(f"pod {pod['metadata']['name']} has no port named {port_name}")


def pod_get(kube: Kube, pod: Obj, path: str, *, port_name: str = "http") -> str:
    """GET ``path`` on one pod through the API server's pod proxy (the request goes from the
    API server to the pod, inside the cluster's network); a non-2xx answer raises KubeError."""
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    raw = f"/api/v1/namespaces/{ns}/pods/{name}:{container_port(pod, port_name)}/proxy{path}"
    return kube.kubectl("get", "--raw", raw, timeout=30).stdout


def served_requests(kube: Kube, pod: Obj) -> dict[str, str]:
    """A server pod's requests from its log: request id -> outcome (ok, cancelled, error, ...)."""
    text = kube.logs(pod["metadata"]["name"], pod["metadata"]["namespace"], SERVER_CONTAINER)
    return {m.group(1): m.group(2) for m in _SERVER_REQUEST_LINE.finditer(text)}


def restart_counts(pods: list[Obj]) -> dict[str, int]:
    """Pod name -> the sum of its containers' restartCount."""
    return {
        p["metadata"]["name"]: sum(
            int(c.get("restartCount") or 0)
            for c in (p.get("status") or {}).get("containerStatuses") or []
        )
        for p in pods
    }


def ready_addresses(kube: Kube, namespace: str, service: str) -> set[str]:
    """The addresses a Service's EndpointSlices list as ready and not terminating: what the
    gateway (and kube-proxy) send new requests to."""
    addresses: set[str] = set()
    slices = kube.items(
        "endpointslices.discovery.k8s.io",
        namespace,
        selector=f"kubernetes.io/service-name={service}",
    )
    for item in slices:
        for endpoint in item.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is not False and not conditions.get("terminating"):
                addresses.update(endpoint.get("addresses") or [])
    return addresses


def gateway_pods(kube: Kube) -> list[Obj]:
    return kube.pods(RELEASE_NAMESPACE, GATEWAY_SELECTOR)


def gateway_requests(kube: Kube, pods: list[Obj] | None = None) -> list[dict[str, Any]]:
    """The gateway's request log (one JSON line per routed request, gateway.logFormat json):
    each line's fields (model, service, endpoint, status, outcome, retries, duration_s) plus
    ``start`` and ``end`` (seconds since the epoch), ``address`` (the replica's IP, "" when none
    was picked) and ``gateway_pod``."""
    lines: list[dict[str, Any]] = []
    for pod in gateway_pods(kube) if pods is None else pods:
        name = pod["metadata"]["name"]
        text = kube.logs(name, RELEASE_NAMESPACE, GATEWAY_CONTAINER)
        for item in json_lines(text):
            if item.get("logger") != "llamaherd_gateway.requests" or "outcome" not in item:
                continue
            end = wall_time(str(item["ts"]))
            item["end"] = end
            item["start"] = end - float(item.get("duration_s") or 0.0)
            item["address"] = str(item.get("endpoint") or "").rsplit(":", 1)[0]
            item["gateway_pod"] = name
            lines.append(item)
    return lines
