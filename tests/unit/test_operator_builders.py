"""The pure builders: InferenceService dict -> Deployment, Service, PDB, ServiceMonitor."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from lightkube import codecs

from llamaherd_operator import builders, names
from llamaherd_operator.builders import BuildOptions

SHA = "ab" * 32


def service(spec: dict[str, Any] | None = None, name: str = "chat") -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "metadata": {"name": name, "namespace": "ml", "uid": "uid-1", "generation": 7},
        "spec": {"model": {"url": "https://models.example/tiny.gguf"}, **(spec or {})},
    }


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def server_of(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == names.SERVER_CONTAINER)


@pytest.mark.parametrize(
    ("field", "env"),
    [
        ("slots", "LLAMAHERD_SLOTS"),
        ("contextSize", "LLAMAHERD_CONTEXT_SIZE"),
        ("maxWaitMs", "LLAMAHERD_MAX_WAIT_MS"),
        ("requestTimeoutSeconds", "LLAMAHERD_REQUEST_TIMEOUT_SECONDS"),
        ("gpuLayers", "LLAMAHERD_GPU_LAYERS"),
    ],
)
def test_server_env_name(field: str, env: str) -> None:
    assert builders.server_env_name(field) == env


def test_deployment_basics() -> None:
    deployment = builders.build_deployment(service({"server": {"slots": 4, "maxWaitMs": 2.5}}))
    meta = deployment["metadata"]
    assert (meta["name"], meta["namespace"]) == ("chat", "ml")
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "llamaherd.io/v1alpha1",
            "kind": "InferenceService",
            "name": "chat",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert meta["annotations"][names.ANNOTATION_GENERATION] == "7"
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["selector"]["matchLabels"] == builders.selector_labels("chat")
    labels = spec["template"]["metadata"]["labels"]
    assert labels.items() >= builders.selector_labels("chat").items()
    server = server_of(deployment)
    assert server["command"] == ["python", "-m", "llamaherd_server"]
    assert server["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert server["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert server["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    env = env_of(server)
    assert env["LLAMAHERD_MODEL"] == "/models/tiny.gguf"
    assert env["LLAMAHERD_MODEL_NAME"] == "chat"
    assert env["LLAMAHERD_SLOTS"] == "4"
    assert env["LLAMAHERD_MAX_WAIT_MS"] == "2.5"


@pytest.mark.parametrize(
    ("server", "grace"),
    [
        ({}, 30 + 5 + 10),
        ({"drainTimeoutSeconds": 120}, 120 + 15),
        ({"drainTimeoutSeconds": 0.5}, 16),
    ],
)
def test_grace_period_outlasts_drain(server: dict[str, Any], grace: int) -> None:
    pod = builders.build_deployment(service({"server": server}))["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == grace
    drain = server.get("drainTimeoutSeconds", builders.DEFAULT_DRAIN_TIMEOUT_SECONDS)
    assert pod["terminationGracePeriodSeconds"] > drain + 5


@pytest.mark.parametrize(
    ("spec", "replicas", "pdb"),
    [
        ({}, 1, False),
        ({"replicas": 0}, 0, False),
        ({"replicas": 3}, 3, True),
        ({"replicas": 1, "autoscaling": {"enabled": True, "maxReplicas": 4}}, 1, True),
        ({"replicas": 9, "autoscaling": {"enabled": True, "maxReplicas": 4}}, 4, True),
        ({"replicas": 0, "autoscaling": {"enabled": True, "minReplicas": 2}}, 2, True),
        (
            {"replicas": 1, "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 1}},
            1,
            False,
        ),
        ({"replicas": 9, "autoscaling": {"enabled": False, "maxReplicas": 2}}, 9, True),
    ],
)
def test_replicas_and_pdb(spec: dict[str, Any], replicas: int, pdb: bool) -> None:
    assert builders.build_deployment(service(spec))["spec"]["replicas"] == replicas
    assert builders.needs_pdb(service(spec)["spec"]) is pdb


def test_url_model_downloads_into_cache() -> None:
    body = service({"model": {"url": "https://h.example/m/x.gguf?sig=1", "sha256": SHA.upper()}})
    pod = builders.build_deployment(body)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["name"] == names.DOWNLOAD_CONTAINER
    assert init["command"] == ["python", "-m", "llamaherd_operator.model_download"]
    env = env_of(init)
    assert env["DOWNLOAD_URL"] == "https://h.example/m/x.gguf?sig=1"
    assert env["DOWNLOAD_PATH"] == "/models/x.gguf"
    assert env["DOWNLOAD_SHA256"] == SHA
    assert init["volumeMounts"] == [{"name": "model-cache", "mountPath": "/models"}]
    assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["volumes"] == [{"name": "model-cache", "emptyDir": {"sizeLimit": "20Gi"}}]
    assert server_of({"spec": {"template": {"spec": pod}}})["volumeMounts"] == [
        {"name": "model-cache", "mountPath": "/models", "readOnly": True}
    ]


@pytest.mark.parametrize(
    ("model", "volume", "mount", "path"),
    [
        (
            {
                "url": "https://h.example/file",
                "fileName": "m.gguf",
                "cache": {"type": "PersistentVolumeClaim", "claimName": "cache"},
            },
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": "cache"}},
            {"name": "model-cache", "mountPath": "/models", "readOnly": True},
            "/models/m.gguf",
        ),
        (
            {"url": "https://h.example/download"},
            {"name": "model-cache", "emptyDir": {"sizeLimit": "20Gi"}},
            {"name": "model-cache", "mountPath": "/models", "readOnly": True},
            "/models/model.gguf",
        ),
        (
            {"persistentVolumeClaim": {"claimName": "store", "path": "/llama/q4.gguf"}},
            {"name": "model", "persistentVolumeClaim": {"claimName": "store", "readOnly": True}},
            {"name": "model", "mountPath": "/model-store", "readOnly": True},
            "/model-store/llama/q4.gguf",
        ),
        (
            {"hostPath": {"path": "/srv/models/demo.gguf"}},
            {"name": "model", "hostPath": {"path": "/srv/models/demo.gguf", "type": "File"}},
            {"name": "model", "mountPath": "/models/demo.gguf", "readOnly": True},
            "/models/demo.gguf",
        ),
    ],
)
def test_model_sources(
    model: dict[str, Any], volume: dict[str, Any], mount: dict[str, Any], path: str
) -> None:
    deployment = builders.build_deployment(service({"model": model}))
    pod = deployment["spec"]["template"]["spec"]
    assert pod["volumes"] == [volume]
    assert server_of(deployment)["volumeMounts"] == [mount]
    assert env_of(server_of(deployment))["LLAMAHERD_MODEL"] == path
    assert ("initContainers" in pod) is ("url" in model)


def test_gpu_requests_limits_and_toleration() -> None:
    body = service(
        {
            "gpu": {"count": 2},
            "resources": {"limits": {"memory": "8Gi"}, "requests": {"cpu": "2"}},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml"}],
        }
    )
    deployment = builders.build_deployment(body)
    resources = server_of(deployment)["resources"]
    assert resources == {
        "limits": {"memory": "8Gi", "nvidia.com/gpu": 2},
        "requests": {"cpu": "2", "nvidia.com/gpu": 2},
    }
    pod = deployment["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml"} in pod["tolerations"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    # The caller's spec is not modified.
    assert body["spec"]["resources"] == {"limits": {"memory": "8Gi"}, "requests": {"cpu": "2"}}


def test_no_gpu_no_gpu_fields() -> None:
    deployment = builders.build_deployment(service())
    assert "resources" not in server_of(deployment)
    assert "tolerations" not in deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_custom_gpu_resource_name() -> None:
    body = service({"gpu": {"count": 1, "resourceName": "amd.com/gpu"}})
    deployment = builders.build_deployment(body)
    assert server_of(deployment)["resources"]["limits"] == {"amd.com/gpu": 1}
    assert deployment["spec"]["template"]["spec"]["tolerations"][0]["key"] == "amd.com/gpu"


def test_pass_through_fields() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                ]
            }
        }
    }
    body = service(
        {
            "nodeSelector": {"pool": "gpu"},
            "affinity": affinity,
            "priorityClassName": "high",
            "runtimeClassName": "nvidia",
            "serviceAccountName": "llm",
            "imagePullSecrets": [{"name": "regcred"}],
            "image": "registry.example/llamaherd:1",
            "imagePullPolicy": "Always",
            "podAnnotations": {"team": "ml", "prometheus.io/scrape": "false"},
            "podLabels": {"team": "ml", names.LABEL_INSTANCE: "spoofed"},
            "env": [
                {"name": "HF_HOME", "value": "/tmp"},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            ],
            "apiKeySecretRef": {"name": "keys", "key": "chat"},
        }
    )
    template = builders.build_deployment(body)["spec"]["template"]
    pod = template["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["affinity"] == affinity
    assert pod["priorityClassName"] == "high"
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["serviceAccountName"] == "llm"
    assert "automountServiceAccountToken" not in pod
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    server = pod["containers"][0]
    assert (server["image"], server["imagePullPolicy"]) == (
        "registry.example/llamaherd:1",
        "Always",
    )
    assert template["metadata"]["annotations"]["team"] == "ml"
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "false"
    # Selector labels cannot be overridden, or the Deployment would lose its pods.
    assert template["metadata"]["labels"][names.LABEL_INSTANCE] == "chat"
    assert template["metadata"]["labels"]["team"] == "ml"
    env = env_of(server)
    assert env["HF_HOME"] == "/tmp"
    assert env["TOKEN"] == {"secretKeyRef": {"name": "s", "key": "k"}}
    assert env["LLAMAHERD_API_KEY"] == {"secretKeyRef": {"name": "keys", "key": "chat"}}


def _threads_ref(resource: str) -> dict[str, Any]:
    return {"resourceFieldRef": {"containerName": "server", "resource": resource, "divisor": "1"}}


@pytest.mark.parametrize(
    ("spec", "threads"),
    [
        # No CPU limit or request: limits.cpu would read as the node's CPUs; the server
        # reads its cgroup quota and affinity itself.
        ({}, None),
        ({"resources": {"limits": {"memory": "8Gi"}}}, None),
        ({"resources": {"limits": {"cpu": "2500m"}}}, _threads_ref("limits.cpu")),
        (
            {"resources": {"limits": {"cpu": "4"}, "requests": {"cpu": "1"}}},
            _threads_ref("limits.cpu"),
        ),
        ({"resources": {"requests": {"cpu": "3"}}}, _threads_ref("requests.cpu")),
        # The user's setting wins.
        ({"resources": {"limits": {"cpu": "4"}}, "server": {"threads": 6}}, "6"),
    ],
)
def test_threads_from_the_cpu_limit_or_request(spec: dict[str, Any], threads: Any) -> None:
    env = server_of(builders.build_deployment(service(spec)))["env"]
    names_seen = [item["name"] for item in env]
    assert len(names_seen) == len(set(names_seen))
    assert env_of({"env": env}).get("LLAMAHERD_THREADS") == threads


def _memory_ref() -> dict[str, Any]:
    return {
        "resourceFieldRef": {
            "containerName": "server",
            "resource": "limits.memory",
            "divisor": "1Mi",
        }
    }


@pytest.mark.parametrize(
    ("spec", "limit"),
    [
        # No memory limit: limits.memory would read as the node's allocatable memory; the
        # server reads its cgroup's limit itself. A request alone is no limit.
        ({}, None),
        ({"resources": {"limits": {"cpu": "2"}}}, None),
        ({"resources": {"requests": {"memory": "4Gi"}}}, None),
        ({"resources": {"limits": {"memory": "8Gi"}}}, _memory_ref()),
        (
            {"resources": {"limits": {"memory": "2Gi"}, "requests": {"memory": "1Gi"}}},
            _memory_ref(),
        ),
        # The user's setting wins; an explicit host cache size leaves the limit in place.
        ({"resources": {"limits": {"memory": "8Gi"}}, "server": {"memoryLimitMb": 6000}}, "6000"),
        (
            {"resources": {"limits": {"memory": "8Gi"}}, "server": {"prefixCacheRamMb": 64}},
            _memory_ref(),
        ),
    ],
)
def test_memory_limit_from_the_memory_limit(spec: dict[str, Any], limit: Any) -> None:
    env = server_of(builders.build_deployment(service(spec)))["env"]
    names_seen = [item["name"] for item in env]
    assert len(names_seen) == len(set(names_seen))
    assert env_of({"env": env}).get("LLAMAHERD_MEMORY_LIMIT_MB") == limit


def test_env_names_are_unique_even_when_user_repeats_operator_names() -> None:
    body = service({"env": [{"name": "LLAMAHERD_MODEL", "value": "/evil"}]})
    env = server_of(builders.build_deployment(body))["env"]
    names_seen = [item["name"] for item in env]
    assert len(names_seen) == len(set(names_seen))
    assert env_of({"env": env})["LLAMAHERD_MODEL"] == "/models/tiny.gguf"


def test_spec_hash_changes_with_the_pod_template_only() -> None:
    def pod_hash(spec: dict[str, Any]) -> str:
        template = builders.build_deployment(service(spec))["spec"]["template"]
        return str(template["metadata"]["annotations"][names.ANNOTATION_SPEC_HASH])

    base = pod_hash({})
    assert base == pod_hash({})
    assert len(base) == 16
    assert pod_hash({"replicas": 5}) == base
    assert pod_hash({"service": {"port": 8080}}) == base
    assert pod_hash({"server": {"slots": 2}}) != base
    assert pod_hash({"image": "other:1"}) != base
    assert pod_hash({"gpu": {"count": 1}}) != base


def test_service() -> None:
    svc = builders.build_service(
        service({"service": {"type": "LoadBalancer", "port": 8080, "annotations": {"a": "b"}}})
    )
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    assert svc["spec"]["selector"] == builders.selector_labels("chat")
    annotations = svc["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8000"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["a"] == "b"
    assert svc["metadata"]["ownerReferences"][0]["controller"] is True
    default = builders.build_service(service())
    assert default["spec"]["type"] == "ClusterIP"
    assert default["spec"]["ports"][0]["port"] == 80


def test_pdb_and_service_monitor() -> None:
    pdb = builders.build_pdb(service())
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": builders.selector_labels("chat")},
    }
    monitor = builders.build_service_monitor(service(), BuildOptions(service_monitor_interval="5s"))
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "5s"}]
    assert monitor["spec"]["selector"]["matchLabels"] == builders.selector_labels("chat")
    # The ServiceMonitor selects the Service by labels the Service carries.
    svc_labels = builders.build_service(service())["metadata"]["labels"]
    assert svc_labels.items() >= monitor["spec"]["selector"]["matchLabels"].items()


def test_endpoint_and_selector() -> None:
    body = service({"service": {"port": 8080}})
    assert builders.endpoint(body) == "http://chat.ml.svc.cluster.local:8080"
    assert builders.selector_string("chat") == (
        "app.kubernetes.io/instance=chat,app.kubernetes.io/name=llamaherd-server"
    )


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {"gpu": {"count": 1}, "replicas": 3, "resources": {"limits": {"cpu": "1"}}},
        {
            "model": {"persistentVolumeClaim": {"claimName": "c", "path": "m.gguf"}},
            "apiKeySecretRef": {"name": "s", "key": "k"},
            "env": [{"name": "A", "value": "1"}],
        },
        {"model": {"hostPath": {"path": "/m.gguf"}}, "server": {"slots": 2}},
    ],
)
def test_manifests_are_valid_kubernetes_shapes(spec: dict[str, Any]) -> None:
    """lightkube's models drop fields they do not know: a round trip catches misspelt fields."""
    body = service(spec)
    for manifest in (
        builders.build_deployment(body),
        builders.build_service(body),
        builders.build_pdb(body),
    ):
        assert codecs.from_dict(copy.deepcopy(manifest)).to_dict() == manifest


@pytest.mark.parametrize(
    "model",
    [
        {"url": "https://models.example/m.gguf"},
        {"persistentVolumeClaim": {"claimName": "m", "path": "m.gguf"}},
    ],
)
def test_pods_pass_the_restricted_pod_security_standard(model: dict[str, Any]) -> None:
    """The fields the `restricted` level checks, on the pod and on every container."""
    pod = builders.build_deployment(service({"model": model}))["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostPID" not in pod
    containers = pod["containers"] + pod.get("initContainers", [])
    assert len(containers) == (2 if "url" in model else 1)
    for container in containers:
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True
        assert not any("hostPort" in port for port in container.get("ports", []))


# ---- GPU rules: image, gpu-layers ---------------------------------------------------------


def test_the_image_follows_the_gpu_request_unless_spec_image_is_set() -> None:
    options = builders.BuildOptions(server_image="reg/cpu:1", server_image_gpu="reg/cuda:1")
    cpu = builders.build_deployment(service({}), options)
    gpu = builders.build_deployment(service({"gpu": {"count": 1}}), options)
    pinned = builders.build_deployment(service({"gpu": {"count": 1}, "image": "mine:2"}), options)
    assert server_of(cpu)["image"] == "reg/cpu:1"
    assert server_of(gpu)["image"] == "reg/cuda:1"
    assert server_of(pinned)["image"] == "mine:2"
    # The download init container runs the same image as the server.
    pod = gpu["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["image"] == "reg/cuda:1"
    # The defaults name the two variants of Dockerfile.server.
    assert builders.DEFAULT_IMAGE.endswith("-cpu") and builders.DEFAULT_GPU_IMAGE.endswith("-cuda")


def test_gpu_layers_default_to_all_with_gpus() -> None:
    gpu = builders.build_deployment(service({"gpu": {"count": 1}}))
    assert env_of(server_of(gpu))["LLAMAHERD_GPU_LAYERS"] == "-1"
    cpu = builders.build_deployment(service({}))
    assert "LLAMAHERD_GPU_LAYERS" not in env_of(server_of(cpu)), "the server finds no GPU itself"
    # What the user sets wins, once.
    chosen = builders.build_deployment(service({"gpu": {"count": 1}, "server": {"gpuLayers": 20}}))
    names = [item["name"] for item in server_of(chosen)["env"]]
    assert names.count("LLAMAHERD_GPU_LAYERS") == 1
    assert env_of(server_of(chosen))["LLAMAHERD_GPU_LAYERS"] == "20"
