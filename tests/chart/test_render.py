"""The chart renders, lints and validates, with defaults and with every switch flipped.

Built-in kinds validate against the Kubernetes 1.34 OpenAPI schemas (kubernetes-validate, strict:
unknown fields fail). The InferenceService validates against the CRD's own openAPIV3Schema
(jsonschema, draft 4 semantics as OpenAPI 3.0 has them; the CEL rules run for real in
test_install.py). For the monitoring.coreos.com kinds this repository has no CRD, so they get
structural checks only: the fields the chart uses, typed, with unknown fields refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from llamaherd_operator.settings import ENV_PREFIX, OperatorSettings
from tests.chart.conftest import (
    CHART,
    NAMESPACE,
    VALUES,
    Objects,
    load_generator,
    run_helm,
    values_args,
)
from tests.harness import REPO_ROOT

KUBERNETES_VERSION = "1.34.0"
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "InferenceService"}
REQUIRED_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
)

values_cases = pytest.mark.parametrize("values", list(VALUES.values()), ids=list(VALUES))
# The defaults with the in-cluster Prometheus on (a render() argument list).
PROMETHEUS_ON: tuple[Any, ...] = (None, "--set", "prometheus.enabled=true")


def by_kind(objects: Objects, kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: Objects, kind: str) -> dict[str, Any]:
    (found,) = by_kind(objects, kind)
    return found


def component(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def without_prometheus(objects: Objects) -> Objects:
    """The operator's objects: everything but the in-cluster Prometheus (prometheus.enabled)
    and the gateway (gateway.enabled)."""
    return [o for o in objects if component(o) not in ("prometheus", "gateway")]


def gateway_objects(objects: Objects) -> Objects:
    return [o for o in objects if component(o) == "gateway"]


def prometheus_objects(objects: Objects) -> Objects:
    return [o for o in objects if component(o) == "prometheus"]


# --- helm itself ---------------------------------------------------------------------------------


@values_cases
@pytest.mark.tools
def test_helm_lint_strict_is_clean(helm: Path, values: Path | None) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART), *values_args(values))
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


@pytest.mark.tools
def test_every_switch_renders_its_objects(render: Callable[..., Objects]) -> None:
    defaults = {o["kind"] for o in render(None)}
    all_on = {o["kind"] for o in render(VALUES["all-on"])}
    minimal = {o["kind"] for o in render(VALUES["minimal"])}
    assert defaults == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
    }
    assert all_on == defaults | {"ConfigMap", "Role", "RoleBinding", *CRD_KINDS}
    assert minimal == {"Deployment", "Service"}
    # The in-cluster Prometheus is off by default and makes all of its objects when on.
    assert not prometheus_objects(render(None)) and not prometheus_objects(
        render(VALUES["minimal"])
    )
    on = [(o["kind"], o["metadata"]["name"]) for o in prometheus_objects(render(*PROMETHEUS_ON))]
    assert sorted(on) == sorted(
        (kind, "llamaherd-prometheus")
        for kind in (
            "ConfigMap",
            "Deployment",
            "Service",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
        )
    )


@pytest.mark.tools
def test_values_schema_refuses_bad_values(helm: Path) -> None:
    for bad in (
        ["--set", "operator.logFormat=xml"],
        ["--set", "operator.metricsPort=70000"],
        ["--set", "operator.prometheusUrl=prometheus:9090"],
        ["--set", "monitoring.prometheusRule.queueDepthFor=ten minutes"],
        ["--set", "operatr.logLevel=debug"],  # a typo: unknown keys are refused
        ["--set", "sampleInferenceService.name=Not_A_Name"],
        ["--set", "prometheus.enabled=yes"],
        ["--set", "prometheus.scrapeInterval=5 seconds"],
        ["--set", "prometheus.retention=six hours"],
        ["--set", "prometheus.namespaces={Team_A}"],
        ["--set", "prometheus.service.port=0"],
        ["--set", "prometheus.scrapeIntervall=5s"],
    ):
        proc = run_helm(helm, "template", "x", str(CHART), *bad, check=False)
        assert proc.returncode != 0, f"{bad} rendered"
        assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


def _leaf_paths(node: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(node, dict) and node:
        return [p for key, value in node.items() for p in _leaf_paths(value, (*prefix, key))]
    return [prefix]


def test_every_value_is_in_the_schema_and_documented() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path in _leaf_paths(values):
        node = schema
        for key in path:
            if "properties" not in node:  # a free-form object (resources, securityContext)
                break
            assert key in node["properties"], f"values.schema.json lacks {'.'.join(path)}"
            node = node["properties"][key]
    # Line by line: every key whose value is a scalar, list or {} has a comment right above it,
    # or belongs to a block (resources:, securityContext: ...) whose key has one.
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented_blocks: list[int] = []  # indentation of the documented block keys we are in
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_]+):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        documented_blocks = [i for i in documented_blocks if i < indent]
        has_comment = index > 0 and lines[index - 1].strip().startswith("#")
        opens_block = not match.group(3).strip()
        if has_comment and opens_block:
            documented_blocks.append(indent)
        if not opens_block and not documented_blocks:
            assert has_comment, f"values.yaml line {index + 1} is not documented: {line.strip()}"


# --- the objects ---------------------------------------------------------------------------------


@values_cases
@pytest.mark.tools
def test_builtin_objects_validate_against_kubernetes_schemas(
    render: Callable[..., Objects], values: Path | None
) -> None:
    checked = 0
    for obj in render(values):
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{obj['kind']} {obj['metadata']['name']}: {exc}") from exc
        checked += 1
    assert checked >= 2


def test_manifest_objects_validate_against_kubernetes_schemas() -> None:
    """manifests/install.yaml (CRD and Namespace included) is what kubectl users apply."""
    objects = [
        o for o in yaml.safe_load_all((REPO_ROOT / "manifests/install.yaml").read_text()) if o
    ]
    assert {"Namespace", "CustomResourceDefinition", "Deployment"} <= {o["kind"] for o in objects}
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        if obj["kind"] != "CustomResourceDefinition":
            assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE


@values_cases
@pytest.mark.tools
def test_every_object_carries_the_app_kubernetes_io_labels(
    render: Callable[..., Objects], values: Path | None
) -> None:
    for obj in render(values):
        labels = obj["metadata"].get("labels", {})
        missing = [label for label in REQUIRED_LABELS if label not in labels]
        assert not missing, f"{obj['kind']} {obj['metadata']['name']} lacks {missing}"
        template = obj.get("spec", {}).get("template")
        if template:
            assert set(REQUIRED_LABELS) <= set(template["metadata"]["labels"])


@values_cases
@pytest.mark.tools
def test_operator_deployment(render: Callable[..., Objects], values: Path | None) -> None:
    objects = without_prometheus(render(values))
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "llamaherd_operator"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert ports[probe["port"]] == int(env["LLAMAHERD_OPERATOR_LIVENESS_PORT"])
    assert ports["metrics"] == int(env["LLAMAHERD_OPERATOR_METRICS_PORT"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # The metrics Service reaches the metrics port of exactly this pod.
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert spec["selector"]["matchLabels"] == service["spec"]["selector"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    expected_account = "existing-operator" if values == VALUES["minimal"] else None
    if expected_account:
        assert pod["serviceAccountName"] == expected_account
    else:
        assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
        binding = one(objects, "ClusterRoleBinding")
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": NAMESPACE}
        ]
        assert binding["roleRef"]["name"] == one(objects, "ClusterRole")["metadata"]["name"]


@values_cases
@pytest.mark.tools
def test_operator_env_is_the_operators_settings(
    render: Callable[..., Objects], values: Path | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every LLAMAHERD_OPERATOR_* variable is a settings field, and its value validates."""
    deployment = one(without_prometheus(render(values)), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    fields = set(OperatorSettings.model_fields)
    names = {name.removeprefix(ENV_PREFIX).lower() for name in env}
    unknown = names - fields
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = OperatorSettings()  # pydantic refuses a bad value
    assert settings.namespace_list == (["team-a", "team-b"] if values == VALUES["all-on"] else [])
    assert not unknown, f"the chart sets unknown settings {unknown}"
    assert str(settings.liveness_port) == env["LLAMAHERD_OPERATOR_LIVENESS_PORT"]


def _rbac_source_rules(role: str = "llamaherd-operator") -> list[dict[str, Any]]:
    """The rules of one ClusterRole of operator/rbac.yaml: ``llamaherd-operator`` (namespaced
    resources) or ``llamaherd-operator-cluster`` (cluster-scoped)."""
    docs = yaml.safe_load_all((REPO_ROOT / "operator" / "rbac.yaml").read_text())
    (found,) = [
        d for d in docs if d and d["kind"] == "ClusterRole" and d["metadata"]["name"] == role
    ]
    return list(found["rules"])


# Cluster-scoped resources the operator may read; the namespaced rules name none of them.
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces"}


def test_rbac_source_splits_namespaced_and_cluster_scoped_rules() -> None:
    namespaced = {res for r in _rbac_source_rules() for res in r["resources"]}
    cluster = _rbac_source_rules("llamaherd-operator-cluster")
    assert not namespaced & CLUSTER_SCOPED
    assert {res for r in cluster for res in r["resources"]} == CLUSTER_SCOPED
    # Read-only, cluster-wide.
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in cluster)


def test_cluster_role_rules_are_operator_rbac_yaml(render: Callable[..., Objects]) -> None:
    assert (CHART / "files" / "rbac.yaml").read_bytes() == (
        REPO_ROOT / "operator" / "rbac.yaml"
    ).read_bytes(), "charts/llamaherd/files/rbac.yaml drifted: run `make chart`"
    # Cluster-wide (the default): one ClusterRole with every rule, and no Role.
    objects = without_prometheus(render(None))
    assert one(objects, "ClusterRole")["rules"] == (
        _rbac_source_rules() + _rbac_source_rules("llamaherd-operator-cluster")
    )
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")


def test_watch_namespaces_gets_namespaced_roles(render: Callable[..., Objects]) -> None:
    """With operator.watchNamespaces: a Role per watched namespace with the namespaced rules;
    the ClusterRole keeps only the cluster-scoped reads."""
    objects = without_prometheus(render(VALUES["all-on"]))
    role = one(objects, "ClusterRole")
    assert role["rules"] == _rbac_source_rules("llamaherd-operator-cluster")
    account = one(objects, "ServiceAccount")["metadata"]["name"]
    subjects = [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == subjects
    roles = {r["metadata"]["namespace"]: r for r in by_kind(objects, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(objects, "RoleBinding")}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    for namespace, namespaced in roles.items():
        assert namespaced["rules"] == _rbac_source_rules()
        assert component(namespaced) == "operator"
        assert bindings[namespace]["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": namespaced["metadata"]["name"],
        }
        assert bindings[namespace]["subjects"] == subjects


def test_chart_crds_are_the_crds_folder_byte_for_byte() -> None:
    sources = sorted(p.name for p in (REPO_ROOT / "crds").glob("*.yaml"))
    copies = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert copies == sources
    for name in sources:
        assert (CHART / "crds" / name).read_bytes() == (REPO_ROOT / "crds" / name).read_bytes(), (
            f"charts/llamaherd/crds/{name} drifted from crds/{name}: run `make chart`"
        )


@pytest.mark.tools
def test_generated_files_are_fresh(helm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """manifests/install.yaml, the alert rule file and the chart's copies match a fresh run."""
    monkeypatch.setenv("HELM", str(helm))
    generator = load_generator()
    stale = generator.stale(generator.expected(str(helm)))
    assert not stale, f"stale: {[str(p.relative_to(REPO_ROOT)) for p in stale]}: run `make chart`"


@pytest.mark.tools
def test_generator_check_mode_exits_zero(helm: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "hack" / "gen-chart.py"), "--check"],
        env={**os.environ, "HELM": str(helm)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


# --- custom resources ----------------------------------------------------------------------------


def _crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load((REPO_ROOT / "crds" / "inferenceservices.llamaherd.io.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    return version["schema"]["openAPIV3Schema"]


def _validate_inference_service(obj: dict[str, Any]) -> None:
    # OpenAPI 3.0 schema objects keep draft 4's boolean exclusiveMinimum.
    jsonschema.Draft4Validator(_crd_schema()).validate(obj)


@pytest.mark.tools
def test_sample_inference_service_validates_against_the_crd(
    render: Callable[..., Objects],
) -> None:
    sample = one(render(VALUES["all-on"]), "InferenceService")
    assert sample["apiVersion"] == "llamaherd.io/v1alpha1"
    _validate_inference_service(sample)
    assert len(sample["metadata"]["name"]) <= 52


@pytest.mark.tools
def test_crd_schema_check_catches_a_bad_sample(render: Callable[..., Objects], helm: Path) -> None:
    sample = json.loads(json.dumps(one(render(VALUES["all-on"]), "InferenceService")))
    sample["spec"]["replicas"] = -1
    sample["spec"]["server"]["slots"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        _validate_inference_service(sample)


DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["matchLabels"],
    "properties": {"matchLabels": LABELS},
}
NAMESPACE_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "any": {"type": "boolean"},
        "matchNames": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    },
}
ENDPOINT_COMMON = {
    "port": {"type": "string"},
    "path": {"type": "string", "pattern": "^/"},
    "interval": DURATION,
    "scrapeTimeout": DURATION,
    "honorLabels": {"type": "boolean"},
    "relabelings": {
        "type": "array",
        "items": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "sourceLabels": {"type": "array", "items": {"type": "string"}},
                "targetLabel": {"type": "string"},
                "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop"]},
                "regex": {"type": "string"},
                "replacement": {"type": "string"},
            },
        },
    },
}


def _monitor_schema(endpoints_key: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", endpoints_key],
                "properties": {
                    "selector": SELECTOR,
                    "namespaceSelector": NAMESPACE_SELECTOR,
                    endpoints_key: {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["port", "path"],
                            "properties": ENDPOINT_COMMON,
                        },
                    },
                },
            },
        },
    }


RULE_SCHEMA = {
    "type": "object",
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["alert", "expr", "labels", "annotations"],
                                    "properties": {
                                        "alert": {
                                            "type": "string",
                                            "pattern": "^[A-Z][A-Za-z0-9]+$",
                                        },
                                        "expr": {"type": "string"},
                                        "for": DURATION,
                                        "labels": LABELS,
                                        "annotations": {
                                            **LABELS,
                                            "required": ["summary", "description"],
                                        },
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}


@pytest.mark.tools
def test_monitoring_objects_are_structurally_sound(render: Callable[..., Objects]) -> None:
    objects = render(VALUES["all-on"])
    service_monitor = one(without_prometheus(objects), "ServiceMonitor")
    pod_monitor = one(objects, "PodMonitor")
    gateway_monitor = one(gateway_objects(objects), "ServiceMonitor")
    jsonschema.Draft202012Validator(_monitor_schema("endpoints")).validate(gateway_monitor)
    gateway_service = one(gateway_objects(objects), "Service")
    assert (
        gateway_monitor["spec"]["selector"]["matchLabels"] == (gateway_service["spec"]["selector"])
    )
    assert gateway_monitor["spec"]["endpoints"][0]["port"] == "http"
    jsonschema.Draft202012Validator(_monitor_schema("endpoints")).validate(service_monitor)
    jsonschema.Draft202012Validator(_monitor_schema("podMetricsEndpoints")).validate(pod_monitor)
    jsonschema.Draft202012Validator(RULE_SCHEMA).validate(one(objects, "PrometheusRule"))
    for obj in (service_monitor, pod_monitor, one(objects, "PrometheusRule")):
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # The operator's ServiceMonitor picks the operator's metrics Service, and keeps the
    # InferenceService namespace label of its series.
    service = one(without_prometheus(objects), "Service")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert service_monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert service_monitor["spec"]["endpoints"][0]["honorLabels"] is True
    # The inference PodMonitor picks the operator's server pods by their labels and port name.
    from llamaherd_operator import names

    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {names.LABEL_NAME: names.APP_NAME}
    assert endpoint["port"] == names.PORT_NAME and endpoint["path"] == "/metrics"
    assert endpoint["relabelings"][0]["targetLabel"] == "service"


@pytest.mark.tools
def test_alerts_cover_the_issue(render: Callable[..., Objects]) -> None:
    rule = one(render(VALUES["all-on"]), "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {
        "LlamaherdQueueDepthHigh",
        "LlamaherdLatencyP95High",
        "LlamaherdReplicasAtMax",
        "LlamaherdAutoscaleErrors",
        "LlamaherdPrometheusQueryErrors",
        "LlamaherdServerNotReady",
        "LlamaherdServerRestarting",
        "LlamaherdMetricsAbsent",
        "LlamaherdOperatorMetricsAbsent",
        "LlamaherdGatewayHoldsFail",
        "LlamaherdGatewayUpstreamUnavailable",
    } <= set(alerts)
    assert alerts["LlamaherdQueueDepthHigh"]["labels"]["team"] == "inference"
    assert "absent(" in alerts["LlamaherdOperatorMetricsAbsent"]["expr"]


@pytest.mark.tools
def test_dashboard_config_map(render: Callable[..., Objects]) -> None:
    config_map = one(without_prometheus(render(VALUES["all-on"])), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    source = (REPO_ROOT / "monitoring" / "grafana" / "llamaherd.json").read_text()
    assert config_map["data"] == {"llamaherd.json": source}
    dashboard = json.loads(source)
    exprs = " ".join(
        t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if "expr" in t
    )
    for needle in (
        "llamaherd_requests_waiting",
        "llamaherd_requests_running",
        "llamaherd_batch_size",
        "llamaherd_generated_tokens_total",
        "llamaherd_time_to_first_token_seconds_bucket",
        "llamaherd_inter_token_latency_seconds_bucket",
        "llamaherd_request_latency_seconds_bucket",
        "llamaherd_operator_desired_replicas",
        "llamaherd_ready",
        "llamaherd_operator_scaling_decisions_total",
    ):
        assert needle in exprs, f"the dashboard shows no {needle}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# --- the in-cluster Prometheus (prometheus.enabled) -----------------------------------------------

# Debian's prometheus has no kubernetes_sd_configs, so the chart's discovery sidecar
# (files/prometheus-discovery.py) writes file_sd files with the meta labels of the pod role; the
# tests run its pod_targets() on pods and prometheus.yml's relabeling on what it yields.


def _discovery() -> Any:
    import importlib.util

    path = CHART / "files" / "prometheus-discovery.py"
    spec = importlib.util.spec_from_file_location("prometheus_discovery", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pod(
    namespace: str,
    name: str,
    labels: dict[str, str],
    containers: list[dict[str, Any]],
    *,
    phase: str = "Running",
    init_containers: list[dict[str, Any]] | None = None,
    ip: str | None = "10.0.0.7",
) -> dict[str, Any]:
    return {
        "metadata": {"namespace": namespace, "name": name, "labels": labels, "uid": "u"},
        "spec": {"containers": containers, "initContainers": init_containers or []},
        "status": {"phase": phase, **({"podIP": ip} if ip else {})},
    }


def _meta_label(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _pod_target(
    namespace: str,
    pod: str,
    labels: dict[str, str],
    port_name: str,
    *,
    phase: str = "Running",
    container: str = "server",
    init: bool = False,
) -> dict[str, str]:
    target = {
        "__address__": "10.0.0.7:8000",
        "__metrics_path__": "/metrics",
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_phase": phase,
        "__meta_kubernetes_pod_ready": "true",
        "__meta_kubernetes_pod_container_name": container,
        "__meta_kubernetes_pod_container_port_name": port_name,
        "__meta_kubernetes_pod_container_init": "true" if init else "false",
    }
    for key, value in labels.items():
        target[f"__meta_kubernetes_pod_label_{_meta_label(key)}"] = value
        target[f"__meta_kubernetes_pod_labelpresent_{_meta_label(key)}"] = "true"
    return target


def _relabel(target: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabeling (keep, drop, replace) as the chart uses it; None = dropped."""
    labels = dict(target)
    for rule in rules:
        action = rule.get("action", "replace")
        assert action in {"keep", "drop", "replace"}, f"the test does not model {action}"
        value = rule.get("separator", ";").join(
            labels.get(name, "") for name in rule.get("source_labels", [])
        )
        match = re.fullmatch(f"(?:{rule.get('regex', '(.*)')})", value)
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\\1", rule.get("replacement", "$1"))
            result = match.expand(replacement)
            if result:
                labels[rule["target_label"]] = result
            else:
                labels.pop(rule["target_label"], None)
    # Labels starting with __ are gone after relabeling; job comes from the job name.
    return {k: v for k, v in labels.items() if not k.startswith("__")}


def _prometheus_config(objects: Objects) -> dict[str, Any]:
    config_map = one(prometheus_objects(objects), "ConfigMap")
    assert set(config_map["data"]) == {"prometheus.yml", "discovery.py"}
    source = (CHART / "files" / "prometheus-discovery.py").read_text()
    assert config_map["data"]["discovery.py"].strip() == source.strip()
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    assert isinstance(config, dict)
    return config


def _discovery_env(objects: Objects) -> dict[str, str]:
    pod = one(prometheus_objects(objects), "Deployment")["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["containers"] if c["name"] == "discovery"]
    return {e["name"]: e["value"] for e in sidecar["env"]}


def _jobs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["job_name"]: job for job in config["scrape_configs"]}


@pytest.mark.tools
def test_prometheus_config_scrapes_the_inference_pods_like_the_pod_monitor(
    render: Callable[..., Objects],
) -> None:
    from llamaherd_operator import builders, names

    config = _prometheus_config(render(*PROMETHEUS_ON))
    assert config["global"]["scrape_interval"] == "5s"
    server = _jobs(config)["llamaherd-server"]
    assert server.get("metrics_path", "/metrics") == "/metrics"
    assert server["file_sd_configs"] == [{"files": ["/sd/llamaherd-server.json"]}]
    rules = server["relabel_configs"]
    discovery = _discovery()

    def targets(pod: dict[str, Any]) -> list[dict[str, str]]:
        groups = discovery.pod_targets(pod)
        json.dumps(groups)  # what the sidecar writes
        return [{"__address__": t, **g["labels"]} for g in groups for t in g["targets"]]

    # The labels the operator really puts on a server pod.
    pod_labels = builders.common_labels("chat")
    assert pod_labels[names.LABEL_NAME] == names.APP_NAME
    assert pod_labels[names.LABEL_INFERENCE_SERVICE] == "chat"
    server_container = {
        "name": names.SERVER_CONTAINER,
        "ports": [{"name": names.PORT_NAME, "containerPort": names.SERVER_PORT}],
    }
    pod = _pod("team-a", "chat-7d9-x", pod_labels, [server_container])
    (target,) = targets(pod)
    assert target["__address__"] == f"10.0.0.7:{names.SERVER_PORT}"
    kept = _relabel(target, rules)
    assert kept is not None
    assert kept["namespace"] == "team-a"
    assert kept["service"] == "chat"
    assert kept["pod"] == "chat-7d9-x"
    # ... so that the operator's default selector finds the series.
    from llamaherd_operator.prom import DEFAULT_SELECTOR

    selector = DEFAULT_SELECTOR.format(namespace="team-a", name="chat")
    for matcher in selector.split(","):
        key, value = matcher.split("=", 1)
        assert kept[key] == value.strip('"'), matcher

    # Everything else is dropped: another port, a pod that is not Running, an init container,
    # a pod without the server label.
    dropped = [
        _pod_target("team-a", "chat-7d9-x", pod_labels, "debug"),
        _pod_target("team-a", "chat-7d9-x", pod_labels, ""),
        _pod_target("team-a", "chat-7d9-x", pod_labels, names.PORT_NAME, phase="Pending"),
        _pod_target("team-a", "chat-7d9-x", pod_labels, names.PORT_NAME, phase="Succeeded"),
        _pod_target("team-a", "chat-7d9-x", pod_labels, names.PORT_NAME, phase="Failed"),
        _pod_target(
            "team-a", "chat-7d9-x", pod_labels, names.PORT_NAME, container="init", init=True
        ),
        _pod_target("team-a", "web-1", {names.LABEL_NAME: "web"}, names.PORT_NAME),
        _pod_target("team-a", "web-2", {}, names.PORT_NAME),
        *targets(_pod("team-a", "chat-1", pod_labels, [server_container], phase="Pending")),
        *targets(
            _pod(
                "team-a",
                "chat-2",
                pod_labels,
                [{"name": "sidecar", "ports": [{"name": "admin", "containerPort": 9000}]}],
                init_containers=[{"name": "x", "ports": [{"name": "http", "containerPort": 1}]}],
            )
        ),
    ]
    for target in dropped:
        assert _relabel(target, rules) is None, target
    # A pod without an IP yet has no target; the sidecar lists exactly the server pods, in the
    # listed namespaces (all when empty).
    assert targets(_pod("team-a", "chat-3", pod_labels, [server_container], ip=None)) == []
    for args, namespaces in ((PROMETHEUS_ON, ""), ((VALUES["all-on"],), "team-a")):
        env = _discovery_env(render(*args))
        assert env["SERVER_SELECTOR"] == f"{names.LABEL_NAME}={names.APP_NAME}"
        assert env["SERVER_NAMESPACES"] == namespaces
        assert env["OPERATOR_NAMESPACE"] == NAMESPACE


@pytest.mark.tools
def test_prometheus_config_scrapes_the_operator(render: Callable[..., Objects]) -> None:
    for args in (PROMETHEUS_ON, (VALUES["all-on"],)):
        objects = render(*args)
        config = _prometheus_config(objects)
        operator = _jobs(config)["llamaherd-operator"]
        assert operator["honor_labels"] is True  # keeps the series' InferenceService namespace
        assert operator["file_sd_configs"] == [{"files": ["/sd/llamaherd-operator.json"]}]
        deployment = one(without_prometheus(objects), "Deployment")
        template = deployment["spec"]["template"]
        (container,) = template["spec"]["containers"]
        (port,) = [p for p in container["ports"] if p["name"] == "metrics"]
        pod = template["metadata"]["labels"]
        # The sidecar lists the operator's pods by the labels the Deployment gives them.
        selector = dict(
            kv.split("=", 1) for kv in _discovery_env(objects)["OPERATOR_SELECTOR"].split(",")
        )
        assert selector.items() <= pod.items()
        target = _pod_target(NAMESPACE, "op-1", pod, port["name"], container="operator")
        kept = _relabel(target, operator["relabel_configs"])
        assert kept is not None and kept["namespace"] == NAMESPACE and kept["pod"] == "op-1"
        for other in (
            _pod_target(NAMESPACE, "op-1", pod, "healthz", container="operator"),
            _pod_target(NAMESPACE, "op-1", pod, "metrics", container="operator", phase="Pending"),
            _pod_target(NAMESPACE, "x", {**pod, "app.kubernetes.io/instance": "other"}, "metrics"),
        ):
            assert _relabel(other, operator["relabel_configs"]) is None, other


@pytest.mark.tools
def test_prometheus_config_limits_discovery_to_the_listed_namespaces(
    render: Callable[..., Objects],
) -> None:
    objects = render(VALUES["all-on"])
    config = _prometheus_config(objects)
    assert config["global"]["scrape_interval"] == "10s"
    assert _discovery_env(objects)["SERVER_NAMESPACES"] == "team-a"
    # A Role (pods: get, list, watch) in each namespace it reads, bound to its ServiceAccount;
    # no ClusterRole.
    mine = prometheus_objects(objects)
    account = one(mine, "ServiceAccount")["metadata"]
    assert not by_kind(mine, "ClusterRole") and not by_kind(mine, "ClusterRoleBinding")
    roles = {r["metadata"]["namespace"]: r for r in by_kind(mine, "Role")}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(mine, "RoleBinding")}
    assert set(roles) == set(bindings) == {"team-a", NAMESPACE}
    for namespace, role in roles.items():
        assert role["rules"] == [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
        ]
        binding = bindings[namespace]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": NAMESPACE}
        ]


@pytest.mark.tools
def test_prometheus_cluster_role_reads_pods_only(render: Callable[..., Objects]) -> None:
    mine = prometheus_objects(render(*PROMETHEUS_ON))
    role = one(mine, "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    binding = one(mine, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": one(mine, "ServiceAccount")["metadata"]["name"],
            "namespace": NAMESPACE,
        }
    ]


def _operator_env(objects: Objects) -> dict[str, str]:
    deployment = one(without_prometheus(objects), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.mark.tools
def test_operator_queries_the_in_cluster_prometheus(
    render: Callable[..., Objects], monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render(*PROMETHEUS_ON)
    service = one(prometheus_objects(objects), "Service")
    (port,) = service["spec"]["ports"]
    url = (
        f"http://{service['metadata']['name']}.{service['metadata']['namespace']}"
        f".svc.cluster.local:{port['port']}"
    )
    assert url == f"http://llamaherd-prometheus.{NAMESPACE}.svc.cluster.local:9090"
    env = _operator_env(objects)
    assert env["LLAMAHERD_OPERATOR_PROMETHEUS_URL"] == url
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert OperatorSettings().prometheus_url == url
    # The Service's port and name follow the values.
    objects = render(
        None, "--set", "prometheus.enabled=true", "--set", "prometheus.service.port=9999"
    )
    assert _operator_env(objects)["LLAMAHERD_OPERATOR_PROMETHEUS_URL"] == (
        f"http://llamaherd-prometheus.{NAMESPACE}.svc.cluster.local:9999"
    )
    # An explicit operator.prometheusUrl wins; without either the operator keeps its default.
    explicit = "http://prometheus-operated.monitoring.svc:9090"
    objects = render(*PROMETHEUS_ON, "--set", f"operator.prometheusUrl={explicit}")
    assert _operator_env(objects)["LLAMAHERD_OPERATOR_PROMETHEUS_URL"] == explicit
    all_on = _operator_env(render(VALUES["all-on"]))
    assert all_on["LLAMAHERD_OPERATOR_PROMETHEUS_URL"] == explicit
    assert "LLAMAHERD_OPERATOR_PROMETHEUS_URL" not in _operator_env(render(None))


@pytest.mark.parametrize("args", [PROMETHEUS_ON, (VALUES["all-on"],)], ids=["on", "all-on"])
@pytest.mark.tools
def test_prometheus_pod_is_restricted_and_wired(
    render: Callable[..., Objects], args: tuple[Any, ...]
) -> None:
    mine = prometheus_objects(render(*args))
    deployment = one(mine, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    template = spec["template"]
    pod = template["spec"]
    # The restricted Pod Security Standard, field by field.
    for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(forbidden)
    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == 65534
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    for each in pod["containers"]:
        security = each["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["readOnlyRootFilesystem"] is True
        assert security.get("runAsNonRoot", True) is True
        assert security.get("runAsUser", 65534) != 0
        assert not security.get("privileged")
        assert all("hostPort" not in p for p in each.get("ports", []))
        assert each["resources"]["limits"]["memory"]
    assert all("hostPath" not in v for v in pod["volumes"])
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"prometheus", "discovery"}
    container = containers["prometheus"]
    # The discovery sidecar: the operator's image (it has Python), the discovery script of the
    # ConfigMap, writing where Prometheus' file_sd_configs read.
    sidecar = containers["discovery"]
    operator_container = one(without_prometheus(render(*args)), "Deployment")["spec"]["template"][
        "spec"
    ]["containers"][0]
    assert sidecar["image"] == operator_container["image"]
    script = sidecar["command"][-1]
    sidecar_mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert sidecar_mounts[script.rsplit("/", 1)[0]] == "config"
    assert script.rsplit("/", 1)[1] == "discovery.py"
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert sidecar_mounts[env["DISCOVERY_OUTPUT"]] == "sd"
    # Prometheus' command line, probes, storage and configuration.
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[0] in ("prometheus", "/usr/bin/prometheus")
    assert "--config.file=/etc/prometheus/prometheus.yml" in argv
    assert "--storage.tsdb.path=/prometheus" in argv
    retention = "2h" if args[0] == VALUES["all-on"] else "6h"
    assert f"--storage.tsdb.retention.time={retention}" in argv
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("readinessProbe", "/-/ready"), ("livenessProbe", "/-/healthy")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == 9090
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/prometheus"]]
    assert "emptyDir" in volumes["sd"] and mounts["/sd"] == "sd"
    config = yaml.safe_load(one(mine, "ConfigMap")["data"]["prometheus.yml"])
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            assert all(f.startswith("/sd/") for f in sd["files"])
    config_map = one(mine, "ConfigMap")
    assert volumes[mounts["/etc/prometheus"]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert template["metadata"]["annotations"]["checksum/config"]
    assert container["resources"]["requests"]
    assert pod["serviceAccountName"] == one(mine, "ServiceAccount")["metadata"]["name"]
    # Its Service reaches exactly this pod, and the operator's metrics Service does not.
    labels = template["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "prometheus"
    service = one(mine, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["metadata"]["name"] == f"{deployment['metadata']['name']}"
    assert service["metadata"]["name"].endswith("-prometheus")
    assert service["spec"]["selector"].items() <= labels.items()
    assert spec["selector"]["matchLabels"] == service["spec"]["selector"]
    (service_port,) = service["spec"]["ports"]
    assert ports[service_port["targetPort"]] == 9090
    operator_service = one(without_prometheus(render(*args)), "Service")
    assert not operator_service["spec"]["selector"].items() <= labels.items()


@pytest.mark.tools
def test_prometheus_config_passes_promtool(render: Callable[..., Objects], tmp_path: Path) -> None:
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not installed (Debian's prometheus package: `make system-deps`)")
    for args in (PROMETHEUS_ON, (VALUES["all-on"],)):
        path = tmp_path / "prometheus.yml"
        path.write_text(
            one(prometheus_objects(render(*args)), "ConfigMap")["data"]["prometheus.yml"]
        )
        proc = subprocess.run(
            [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.prometheus
@pytest.mark.tools
def test_real_prometheus_labels_the_discovered_targets(
    render: Callable[..., Objects], tmp_path: Path
) -> None:
    """Debian's prometheus with the rendered prometheus.yml and the sidecar's file_sd output."""
    import shutil
    import subprocess
    import urllib.request

    from tests.harness import free_port, wait_until

    binary = shutil.which("prometheus")
    if not binary:
        pytest.skip("prometheus is not installed (Debian's package: `make system-deps`)")
    config_map = one(prometheus_objects(render(*PROMETHEUS_ON)), "ConfigMap")
    (tmp_path / "prometheus.yml").write_text(
        config_map["data"]["prometheus.yml"].replace("/sd/", f"{tmp_path}/")
    )
    discovery = _discovery()
    labels = {
        "app.kubernetes.io/name": "llamaherd-server",
        "llamaherd.io/inference-service": "chat",
    }
    server = {"name": "server", "ports": [{"name": "http", "containerPort": free_port()}]}
    pods = [
        _pod("team-a", "chat-1", labels, [server], ip="127.0.0.1"),
        _pod("team-a", "chat-2", labels, [server], ip="127.0.0.2", phase="Pending"),
    ]
    discovery.write(
        str(tmp_path), "llamaherd-server", [g for p in pods for g in discovery.pod_targets(p)]
    )
    discovery.write(str(tmp_path), "llamaherd-operator", [])
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path}/prometheus.yml",
            f"--storage.tsdb.path={tmp_path}/data",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def targets() -> list[dict[str, str]] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets") as r:
                    active = json.load(r)["data"]["activeTargets"]
            except OSError:
                return None
            found = [t["labels"] for t in active if t["scrapePool"] == "llamaherd-server"]
            return found or None

        (found,) = wait_until(targets, timeout=30, what="prometheus targets")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert found["namespace"] == "team-a"
    assert found["service"] == "chat"
    assert found["pod"] == "chat-1"
    assert found["job"] == "llamaherd-server"


@pytest.mark.tools
def test_operator_guard_and_service_monitor_values(
    render: Callable[..., Objects], monkeypatch: pytest.MonkeyPatch
) -> None:
    """allowedPrometheusUrls, resyncIntervalSeconds and serviceMonitors reach the settings."""
    for name, value in _operator_env(render(None)).items():
        monkeypatch.setenv(name, value)
    defaults = OperatorSettings()
    assert defaults.allowed_prometheus_url_list == []
    assert defaults.service_monitors_enabled is True
    assert defaults.service_monitor_label_map == {}
    assert defaults.resync_interval_seconds == 300

    for name, value in _operator_env(render(VALUES["all-on"])).items():
        monkeypatch.setenv(name, value)
    settings = OperatorSettings()
    assert settings.allowed_prometheus_url_list == [
        "http://prometheus.team-a:9090",
        "https://thanos.example/tenant-a/",
    ]
    assert settings.service_monitors_enabled is False
    assert settings.service_monitor_label_map == {"release": "kube-prometheus-stack"}
    assert settings.resync_interval_seconds == 120
    assert settings.build_options().service_monitor_labels == (
        ("release", "kube-prometheus-stack"),
    )


def test_rbac_reads_horizontal_pod_autoscalers() -> None:
    """The autoscaler looks for HPAs that would fight it over the replica count."""
    rules = _rbac_source_rules()
    assert any(
        "autoscaling" in r["apiGroups"]
        and "horizontalpodautoscalers" in r["resources"]
        and {"get", "list"} <= set(r["verbs"])
        for r in rules
    )


# --- the gateway ---------------------------------------------------------------------------------


@pytest.mark.tools
def test_gateway_is_off_by_default_and_complete_when_on(render: Callable[..., Objects]) -> None:
    for values in (None, VALUES["minimal"]):
        assert not gateway_objects(render(values))
    on = gateway_objects(render(None, "--set", "gateway.enabled=true"))
    assert sorted(o["kind"] for o in on) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
    ]
    for obj in on:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@values_cases
@pytest.mark.tools
def test_gateway_deployment_service_and_rbac(
    render: Callable[..., Objects], values: Path | None
) -> None:
    from llamaherd_gateway.settings import ENV_PREFIX as GATEWAY_PREFIX
    from llamaherd_gateway.settings import GatewaySettings

    objects = render(values, "--set", "gateway.enabled=true")
    gateway = gateway_objects(objects)
    deployment = one(gateway, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "llamaherd_gateway"]
    # same image as the operator: the gateway ships in the operator's image
    operator = one(without_prometheus(objects), "Deployment")
    assert container["image"] == operator["spec"]["template"]["spec"]["containers"][0]["image"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    known = {GATEWAY_PREFIX + name.upper() for name in GatewaySettings.model_fields}
    assert set(env) <= known, set(env) - known
    GatewaySettings(**{k[len(GATEWAY_PREFIX) :].lower(): v for k, v in env.items()})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(env["LLAMAHERD_GATEWAY_PORT"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # its pods are its own: the operator's selectors never pick them, nor its the operator's
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    operator_selector = operator["spec"]["selector"]["matchLabels"]
    assert not operator_selector.items() <= labels.items()
    if values == VALUES["all-on"]:  # the API keys from a Secret, as a file that can change
        assert env["LLAMAHERD_GATEWAY_API_KEYS_FILE"] == "/etc/llamaherd-gateway/api-keys/keys"
        volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
        assert volume["secret"] == {
            "secretName": "gateway-keys",
            "items": [{"key": "keys.txt", "path": "keys"}],
        }
        mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
        assert "subPath" not in mount and mount["readOnly"] is True
    else:
        assert "LLAMAHERD_GATEWAY_API_KEYS_FILE" not in env
    service = one(gateway, "Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    # RBAC: read InferenceServices and EndpointSlices, patch the scale subresource; no more
    account = one(gateway, "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    roles = by_kind(gateway, "Role") or by_kind(gateway, "ClusterRole")
    for role in roles:
        grants = {
            (group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
        assert grants == {
            ("llamaherd.io", "inferenceservices", "get"),
            ("llamaherd.io", "inferenceservices", "list"),
            ("llamaherd.io", "inferenceservices", "watch"),
            ("llamaherd.io", "inferenceservices/scale", "get"),
            ("llamaherd.io", "inferenceservices/scale", "patch"),
            ("discovery.k8s.io", "endpointslices", "get"),
            ("discovery.k8s.io", "endpointslices", "list"),
            ("discovery.k8s.io", "endpointslices", "watch"),
        }
    namespaces = [n for n in env["LLAMAHERD_GATEWAY_NAMESPACES"].split(",") if n]
    if namespaces:
        assert sorted(r["metadata"]["namespace"] for r in by_kind(gateway, "Role")) == sorted(
            namespaces
        )
        assert not by_kind(gateway, "ClusterRole")
    else:
        assert len(by_kind(gateway, "ClusterRole")) == 1


@pytest.mark.tools
def test_in_cluster_prometheus_scrapes_the_gateway(render: Callable[..., Objects]) -> None:
    objects = render(None, "--set", "gateway.enabled=true", "--set", "prometheus.enabled=true")
    config_map = one(prometheus_objects(objects), "ConfigMap")
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "llamaherd-gateway"]
    keep = job["relabel_configs"][0]
    labels = one(gateway_objects(objects), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert keep["source_labels"] == [
        "__meta_kubernetes_pod_label_app_kubernetes_io_name",
        "__meta_kubernetes_pod_label_app_kubernetes_io_instance",
        "__meta_kubernetes_pod_label_app_kubernetes_io_component",
    ]
    assert keep["regex"] == ";".join(
        labels[f"app.kubernetes.io/{key}"] for key in ("name", "instance", "component")
    )
    deployment = one(prometheus_objects(objects), "Deployment")
    sidecar = next(
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "discovery"
    )
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    selector = dict(item.split("=") for item in env["GATEWAY_SELECTOR"].split(","))
    assert selector.items() <= labels.items()
    off = render(None, "--set", "prometheus.enabled=true")
    config = yaml.safe_load(one(prometheus_objects(off), "ConfigMap")["data"]["prometheus.yml"])
    assert "llamaherd-gateway" not in {j["job_name"] for j in config["scrape_configs"]}
