"""Pure builders: an InferenceService (a plain dict, as kopf hands it over) -> desired manifests.

Nothing here talks to the API. Every function takes the InferenceService body (or its spec)
and returns plain dicts that :mod:`llamaherd_operator.kube` server-side applies. The builders
do not rely on the CRD's defaults having been applied (unit tests hand them partial specs): each
default below matches the CRD's, and a unit test keeps the two equal.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from llamaherd_operator import names

Manifest = dict[str, Any]
Body = Mapping[str, Any]

# The server image when spec.image is empty: the CUDA variant of Dockerfile.server for a
# service that asks for GPUs, the CPU variant otherwise (operator settings server_image and
# server_image_gpu change them).
DEFAULT_IMAGE = "llamaherd/server:0.1.0-cpu"
DEFAULT_GPU_IMAGE = "llamaherd/server:0.1.0-cuda"
DEFAULT_IMAGE_PULL_POLICY = "IfNotPresent"
DEFAULT_REPLICAS = 1
DEFAULT_MIN_REPLICAS = 1
DEFAULT_MAX_REPLICAS = 4
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_SERVICE_TYPE = "ClusterIP"
DEFAULT_SERVICE_PORT = 80
DEFAULT_CACHE_SIZE_LIMIT = "20Gi"
# The server's own default (ServerSettings.drain_timeout_seconds); a unit test holds them equal.
DEFAULT_DRAIN_TIMEOUT_SECONDS = 30.0

MODEL_CACHE_DIR = "/models"
MODEL_STORE_DIR = "/model-store"
DEFAULT_MODEL_FILE = "model.gguf"

# Startup allows model loading (and, for url models, nothing else: download runs before it).
STARTUP_PERIOD_SECONDS = 10
STARTUP_FAILURE_THRESHOLD = 180  # 30 minutes
# A rollout that has not progressed in this long is reported as stuck by the Deployment.
PROGRESS_DEADLINE_SECONDS = STARTUP_PERIOD_SECONDS * STARTUP_FAILURE_THRESHOLD + 600

PROMETHEUS_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(names.SERVER_PORT),
    "prometheus.io/path": "/metrics",
}


@dataclass(frozen=True)
class BuildOptions:
    """Operator-wide knobs that shape the manifests (from the operator's settings)."""

    download_retries: int = 5
    download_timeout_seconds: float = 60.0
    pre_stop_sleep_seconds: int = 5
    termination_grace_margin_seconds: int = 10
    service_monitor_interval: str = "15s"
    service_monitor_labels: tuple[tuple[str, str], ...] = ()
    server_image: str = DEFAULT_IMAGE
    server_image_gpu: str = DEFAULT_GPU_IMAGE


def server_env_name(field: str) -> str:
    """``contextSize`` -> ``LLAMAHERD_CONTEXT_SIZE``: the contract between CRD and server."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", field)
    return names.ENV_PREFIX + snake.upper()


def selector_labels(name: str) -> dict[str, str]:
    return {names.LABEL_NAME: names.APP_NAME, names.LABEL_INSTANCE: name}


def selector_string(name: str) -> str:
    """The pod label selector in string form (status.selector, for the scale subresource)."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(name).items()))


def common_labels(name: str) -> dict[str, str]:
    return {
        **selector_labels(name),
        names.LABEL_COMPONENT: "inference",
        names.LABEL_PART_OF: "llamaherd",
        names.LABEL_MANAGED_BY: names.MANAGED_BY,
        names.LABEL_INFERENCE_SERVICE: name,
    }


def endpoint(body: Body) -> str:
    meta = body["metadata"]
    port = service_port(body.get("spec", {}))
    return f"http://{meta['name']}.{meta['namespace']}.svc.cluster.local:{port}"


def service_port(spec: Mapping[str, Any]) -> int:
    return int(spec.get("service", {}).get("port", DEFAULT_SERVICE_PORT))


def owner_reference(body: Body) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(body: Body, name: str | None = None) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "name": name or meta["name"],
        "namespace": meta["namespace"],
        "labels": common_labels(meta["name"]),
        "ownerReferences": [owner_reference(body)],
    }


def desired_replicas(spec: Mapping[str, Any]) -> int:
    """spec.replicas, clamped to [minReplicas, maxReplicas] when autoscaling is enabled."""
    replicas = int(spec.get("replicas", DEFAULT_REPLICAS))
    scaling = spec.get("autoscaling", {})
    if scaling.get("enabled", False):
        low = int(scaling.get("minReplicas", DEFAULT_MIN_REPLICAS))
        high = int(scaling.get("maxReplicas", DEFAULT_MAX_REPLICAS))
        replicas = max(low, min(high, replicas))
    return replicas


def needs_pdb(spec: Mapping[str, Any]) -> bool:
    """A PodDisruptionBudget matters only when more than one replica may run."""
    scaling = spec.get("autoscaling", {})
    if scaling.get("enabled", False):
        return int(scaling.get("maxReplicas", DEFAULT_MAX_REPLICAS)) > 1
    return desired_replicas(spec) > 1


def model_file_name(model: Mapping[str, Any]) -> str:
    """Cache file name of a url model: fileName, else the URL's last segment if a .gguf."""
    if model.get("fileName"):
        return str(model["fileName"])
    last = posixpath.basename(urlsplit(str(model.get("url", ""))).path)
    if last.endswith(".gguf") and re.fullmatch(r"[A-Za-z0-9._-]+", last):
        return last
    return DEFAULT_MODEL_FILE


def model_path(model: Mapping[str, Any]) -> str:
    """Where the server finds the GGUF file inside its container (LLAMAHERD_MODEL)."""
    if "url" in model:
        return posixpath.join(MODEL_CACHE_DIR, model_file_name(model))
    if "persistentVolumeClaim" in model:
        inner = str(model["persistentVolumeClaim"]["path"]).lstrip("/")
        return posixpath.join(MODEL_STORE_DIR, inner)
    if "hostPath" in model:
        return posixpath.join(MODEL_CACHE_DIR, posixpath.basename(model["hostPath"]["path"]))
    raise ValueError("spec.model must set one of url, persistentVolumeClaim or hostPath")


def server_env(body: Body) -> list[dict[str, Any]]:
    """The server container's environment: the settings contract, then the user's extras."""
    spec = body["spec"]
    env: list[dict[str, Any]] = [
        {"name": names.ENV_PREFIX + "MODEL", "value": model_path(spec["model"])},
        {"name": names.ENV_PREFIX + "MODEL_NAME", "value": body["metadata"]["name"]},
        {"name": names.ENV_PREFIX + "HOST", "value": "0.0.0.0"},
        {"name": names.ENV_PREFIX + "PORT", "value": str(names.SERVER_PORT)},
    ]
    settings = spec.get("server", {})
    for field in sorted(settings, key=server_env_name):
        env.append({"name": server_env_name(field), "value": _env_value(settings[field])})
    if "gpuLayers" not in settings and gpu_count(spec) > 0:
        # Every layer on the GPU when the pod gets GPUs, whatever the image's own default.
        # Without GPUs nothing is set: the server finds no GPU and runs on the CPU (and CPU
        # services' pod templates stay as they were, so upgrading the operator rolls none).
        env.append({"name": server_env_name("gpuLayers"), "value": "-1"})
    for from_resources in (threads_from_resources(spec), memory_limit_from_resources(spec)):
        if from_resources is not None:
            env.append(from_resources)
    secret = spec.get("apiKeySecretRef")
    if secret:
        env.append(
            {
                "name": names.ENV_PREFIX + "API_KEY",
                "valueFrom": {"secretKeyRef": {"name": secret["name"], "key": secret["key"]}},
            }
        )
    taken = {item["name"] for item in env}
    env.extend(copy.deepcopy(item) for item in spec.get("env", []) if item["name"] not in taken)
    return env


def threads_from_resources(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """``LLAMAHERD_THREADS`` from the server container's CPU limit (its request without a
    limit), through the downward API, rounded up to whole CPUs (divisor 1). Only when the user
    did not set ``spec.server.threads`` and ``spec.resources`` names a CPU limit or request:
    without one, ``limits.cpu`` would read as the node's allocatable CPUs. The server then
    falls back to its own reading of the cgroup quota and the affinity mask."""
    if "threads" in spec.get("server", {}):
        return None
    resources = spec.get("resources") or {}
    if "cpu" in (resources.get("limits") or {}):
        resource = "limits.cpu"
    elif "cpu" in (resources.get("requests") or {}):
        resource = "requests.cpu"
    else:
        return None
    return _resource_env("threads", resource, "1")


def memory_limit_from_resources(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """``LLAMAHERD_MEMORY_LIMIT_MB`` from the server container's memory limit, through the
    downward API, in MiB (divisor 1Mi), which sizes the server's host prefix cache. Only when
    ``spec.resources`` names a memory limit (without one, ``limits.memory`` would read as the
    node's allocatable memory) and the user did not set ``spec.server.memoryLimitMb``; the
    server then reads its cgroup's limit itself."""
    if "memoryLimitMb" in spec.get("server", {}):
        return None
    if "memory" not in ((spec.get("resources") or {}).get("limits") or {}):
        return None
    return _resource_env("memoryLimitMb", "limits.memory", "1Mi")


def _resource_env(field: str, resource: str, divisor: str) -> dict[str, Any]:
    return {
        "name": server_env_name(field),
        "valueFrom": {
            "resourceFieldRef": {
                "containerName": names.SERVER_CONTAINER,
                "resource": resource,
                "divisor": divisor,
            }
        },
    }


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def gpu_count(spec: Mapping[str, Any]) -> int:
    return int(spec.get("gpu", {}).get("count", 0))


def server_image(spec: Mapping[str, Any], options: BuildOptions) -> str:
    """The one rule: spec.image when set; else the GPU image when the service asks for GPUs
    (spec.gpu.count > 0), the CPU image otherwise."""
    image = spec.get("image")
    if image:
        return str(image)
    return options.server_image_gpu if gpu_count(spec) > 0 else options.server_image


def server_resources(spec: Mapping[str, Any]) -> dict[str, Any]:
    resources = copy.deepcopy(dict(spec.get("resources", {})))
    gpu = spec.get("gpu", {})
    count = int(gpu.get("count", 0))
    if count > 0:
        resource = gpu.get("resourceName", DEFAULT_GPU_RESOURCE)
        for section in ("limits", "requests"):
            resources.setdefault(section, {})[resource] = count
    return resources


def tolerations(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    result = [copy.deepcopy(dict(item)) for item in spec.get("tolerations", [])]
    gpu = spec.get("gpu", {})
    if int(gpu.get("count", 0)) > 0:
        gpu_toleration = {
            "key": gpu.get("resourceName", DEFAULT_GPU_RESOURCE),
            "operator": "Exists",
            "effect": "NoSchedule",
        }
        if gpu_toleration not in result:
            result.append(gpu_toleration)
    return result


def termination_grace_seconds(spec: Mapping[str, Any], options: BuildOptions) -> int:
    server = spec.get("server", {})
    drain = float(server.get("drainTimeoutSeconds", DEFAULT_DRAIN_TIMEOUT_SECONDS))
    margin = options.pre_stop_sleep_seconds + options.termination_grace_margin_seconds
    return math.ceil(drain) + margin


def _volumes(spec: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, server container mounts) for the model source."""
    model = spec["model"]
    if "url" in model:
        cache = model.get("cache", {})
        if cache.get("type", "EmptyDir") == "PersistentVolumeClaim":
            source: dict[str, Any] = {"persistentVolumeClaim": {"claimName": cache["claimName"]}}
        else:
            source = {"emptyDir": {"sizeLimit": cache.get("sizeLimit", DEFAULT_CACHE_SIZE_LIMIT)}}
        volume = {"name": "model-cache", **source}
        mount = {"name": "model-cache", "mountPath": MODEL_CACHE_DIR, "readOnly": True}
        return [volume], [mount]
    if "persistentVolumeClaim" in model:
        claim = model["persistentVolumeClaim"]["claimName"]
        volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        mount = {"name": "model", "mountPath": MODEL_STORE_DIR, "readOnly": True}
        return [volume], [mount]
    host_path = model["hostPath"]["path"]
    volume = {"name": "model", "hostPath": {"path": host_path, "type": "File"}}
    mount = {"name": "model", "mountPath": model_path(model), "readOnly": True}
    return [volume], [mount]


def _container_security() -> dict[str, Any]:
    """Restricted Pod Security: nothing to escalate, no capabilities, nothing written to the
    image (the model cache is a volume; the server writes no files)."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


# The init container runs the download module that ships in the server image (the image
# installs the whole project; the module and its package import only the standard library).
# Only this fixed command and the env enter the pod template, so a new operator version with
# a changed download module leaves every pod template, and so every running pod, alone.
DOWNLOAD_COMMAND = ("python", "-m", "llamaherd_operator.model_download")


def download_container(spec: Mapping[str, Any], options: BuildOptions) -> dict[str, Any]:
    model = spec["model"]
    env = [
        {"name": "DOWNLOAD_URL", "value": model["url"]},
        {"name": "DOWNLOAD_PATH", "value": model_path(model)},
        {"name": "DOWNLOAD_RETRIES", "value": str(options.download_retries)},
        {"name": "DOWNLOAD_TIMEOUT_SECONDS", "value": _env_value(options.download_timeout_seconds)},
    ]
    if model.get("sha256"):
        env.append({"name": "DOWNLOAD_SHA256", "value": str(model["sha256"]).lower()})
    return {
        "name": names.DOWNLOAD_CONTAINER,
        "image": server_image(spec, options),
        "imagePullPolicy": spec.get("imagePullPolicy", DEFAULT_IMAGE_PULL_POLICY),
        "command": list(DOWNLOAD_COMMAND),
        "env": env,
        "volumeMounts": [{"name": "model-cache", "mountPath": MODEL_CACHE_DIR}],
        "securityContext": _container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def server_container(body: Body, options: BuildOptions) -> dict[str, Any]:
    spec = body["spec"]
    _, mounts = _volumes(spec)
    container: dict[str, Any] = {
        "name": names.SERVER_CONTAINER,
        "image": server_image(spec, options),
        "imagePullPolicy": spec.get("imagePullPolicy", DEFAULT_IMAGE_PULL_POLICY),
        "command": ["python", "-m", "llamaherd_server"],
        "ports": [{"name": names.PORT_NAME, "containerPort": names.SERVER_PORT, "protocol": "TCP"}],
        "env": server_env(body),
        "volumeMounts": mounts,
        "startupProbe": {
            "httpGet": {"path": "/health", "port": names.PORT_NAME},
            "periodSeconds": STARTUP_PERIOD_SECONDS,
            "timeoutSeconds": 5,
            "failureThreshold": STARTUP_FAILURE_THRESHOLD,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": names.PORT_NAME},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": names.PORT_NAME},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        # Endpoints drop the pod while it sleeps; only then does SIGTERM start the drain.
        "lifecycle": {
            "preStop": {"exec": {"command": ["sleep", str(options.pre_stop_sleep_seconds)]}}
        },
        "securityContext": _container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = server_resources(spec)
    if resources:
        container["resources"] = resources
    return container


def spec_hash(template: Mapping[str, Any]) -> str:
    """A short, stable digest of a pod template (without its own hash annotation)."""
    text = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_pod_template(body: Body, options: BuildOptions) -> dict[str, Any]:
    spec = body["spec"]
    name = body["metadata"]["name"]
    volumes, _ = _volumes(spec)
    pod: dict[str, Any] = {
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": termination_grace_seconds(spec, options),
        "containers": [server_container(body, options)],
        "volumes": volumes,
    }
    if "url" in spec["model"]:
        pod["initContainers"] = [download_container(spec, options)]
    if spec.get("serviceAccountName"):
        pod["serviceAccountName"] = spec["serviceAccountName"]
    else:
        pod["automountServiceAccountToken"] = False
    for key in ("nodeSelector", "affinity", "priorityClassName", "runtimeClassName"):
        if spec.get(key):
            pod[key] = copy.deepcopy(spec[key])
    if spec.get("imagePullSecrets"):
        pod["imagePullSecrets"] = [{"name": item["name"]} for item in spec["imagePullSecrets"]]
    pod_tolerations = tolerations(spec)
    if pod_tolerations:
        pod["tolerations"] = pod_tolerations
    template: dict[str, Any] = {
        "metadata": {
            "labels": {**spec.get("podLabels", {}), **common_labels(name)},
            "annotations": {**PROMETHEUS_ANNOTATIONS, **spec.get("podAnnotations", {})},
        },
        "spec": pod,
    }
    template["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH] = spec_hash(template)
    return template


def build_deployment(body: Body, options: BuildOptions | None = None) -> Manifest:
    options = options or BuildOptions()
    spec = body["spec"]
    name = body["metadata"]["name"]
    gpus = int(spec.get("gpu", {}).get("count", 0))
    # GPUs are scarce: replace pods in place rather than ask for one more GPU during a rollout.
    rolling = {"maxSurge": 0, "maxUnavailable": 1} if gpus else {"maxSurge": 1, "maxUnavailable": 0}
    metadata = _metadata(body)
    generation = str(body["metadata"].get("generation", 0))
    metadata["annotations"] = {names.ANNOTATION_GENERATION: generation}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": desired_replicas(spec),
            "revisionHistoryLimit": 3,
            "progressDeadlineSeconds": PROGRESS_DEADLINE_SECONDS,
            "selector": {"matchLabels": selector_labels(name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": rolling},
            "template": build_pod_template(body, options),
        },
    }


def build_service(body: Body) -> Manifest:
    spec = body["spec"]
    service = spec.get("service", {})
    metadata = _metadata(body)
    metadata["annotations"] = {**PROMETHEUS_ANNOTATIONS, **service.get("annotations", {})}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": service.get("type", DEFAULT_SERVICE_TYPE),
            "selector": selector_labels(body["metadata"]["name"]),
            "ports": [
                {
                    "name": names.PORT_NAME,
                    "port": service_port(spec),
                    "targetPort": names.PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_pdb(body: Body) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(body),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(body["metadata"]["name"])},
        },
    }


def build_service_monitor(body: Body, options: BuildOptions | None = None) -> Manifest:
    options = options or BuildOptions()
    metadata = _metadata(body)
    # Extra labels (a Prometheus' serviceMonitorSelector) never replace the operator's own.
    metadata["labels"] = {**dict(options.service_monitor_labels), **metadata["labels"]}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata,
        "spec": {
            "selector": {"matchLabels": selector_labels(body["metadata"]["name"])},
            "endpoints": [
                {
                    "port": names.PORT_NAME,
                    "path": "/metrics",
                    "interval": options.service_monitor_interval,
                }
            ],
        },
    }
