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


def by_kind(objects: Objects, kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: Objects, kind: str) -> dict[str, Any]:
    (found,) = by_kind(objects, kind)
    return found


# --- helm itself ---------------------------------------------------------------------------------


@values_cases
def test_helm_lint_strict_is_clean(helm: Path, values: Path | None) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART), *values_args(values))
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


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
    assert all_on == defaults | {"ConfigMap", *CRD_KINDS}
    assert minimal == {"Deployment", "Service"}


def test_values_schema_refuses_bad_values(helm: Path) -> None:
    for bad in (
        ["--set", "operator.logFormat=xml"],
        ["--set", "operator.metricsPort=70000"],
        ["--set", "operator.prometheusUrl=prometheus:9090"],
        ["--set", "monitoring.prometheusRule.queueDepthFor=ten minutes"],
        ["--set", "operatr.logLevel=debug"],  # a typo: unknown keys are refused
        ["--set", "sampleInferenceService.name=Not_A_Name"],
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
def test_operator_deployment(render: Callable[..., Objects], values: Path | None) -> None:
    objects = render(values)
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
def test_operator_env_is_the_operators_settings(
    render: Callable[..., Objects], values: Path | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every LLAMAHERD_OPERATOR_* variable is a settings field, and its value validates."""
    (container,) = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"]
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


def _rbac_source_rules() -> list[dict[str, Any]]:
    docs = yaml.safe_load_all((REPO_ROOT / "operator" / "rbac.yaml").read_text())
    (role,) = [d for d in docs if d and d["kind"] == "ClusterRole"]
    return role["rules"]


def test_cluster_role_rules_are_operator_rbac_yaml(render: Callable[..., Objects]) -> None:
    assert (CHART / "files" / "rbac.yaml").read_bytes() == (
        REPO_ROOT / "operator" / "rbac.yaml"
    ).read_bytes(), "charts/llamaherd/files/rbac.yaml drifted: run `make chart`"
    for values in (None, VALUES["all-on"]):
        assert one(render(values), "ClusterRole")["rules"] == _rbac_source_rules()


def test_chart_crds_are_the_crds_folder_byte_for_byte() -> None:
    sources = sorted(p.name for p in (REPO_ROOT / "crds").glob("*.yaml"))
    copies = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert copies == sources
    for name in sources:
        assert (CHART / "crds" / name).read_bytes() == (REPO_ROOT / "crds" / name).read_bytes(), (
            f"charts/llamaherd/crds/{name} drifted from crds/{name}: run `make chart`"
        )


def test_generated_files_are_fresh(helm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """manifests/install.yaml, the alert rule file and the chart's copies match a fresh run."""
    monkeypatch.setenv("HELM", str(helm))
    generator = load_generator()
    stale = generator.stale(generator.expected(str(helm)))
    assert not stale, f"stale: {[str(p.relative_to(REPO_ROOT)) for p in stale]}: run `make chart`"


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


def test_sample_inference_service_validates_against_the_crd(
    render: Callable[..., Objects],
) -> None:
    sample = one(render(VALUES["all-on"]), "InferenceService")
    assert sample["apiVersion"] == "llamaherd.io/v1alpha1"
    _validate_inference_service(sample)
    assert len(sample["metadata"]["name"]) <= 52


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


def test_monitoring_objects_are_structurally_sound(render: Callable[..., Objects]) -> None:
    objects = render(VALUES["all-on"])
    service_monitor = one(objects, "ServiceMonitor")
    pod_monitor = one(objects, "PodMonitor")
    jsonschema.Draft202012Validator(_monitor_schema("endpoints")).validate(service_monitor)
    jsonschema.Draft202012Validator(_monitor_schema("podMetricsEndpoints")).validate(pod_monitor)
    jsonschema.Draft202012Validator(RULE_SCHEMA).validate(one(objects, "PrometheusRule"))
    for obj in (service_monitor, pod_monitor, one(objects, "PrometheusRule")):
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # The operator's ServiceMonitor picks the operator's metrics Service, and keeps the
    # InferenceService namespace label of its series.
    service = one(objects, "Service")
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
    } <= set(alerts)
    assert alerts["LlamaherdQueueDepthHigh"]["labels"]["team"] == "inference"
    assert "absent(" in alerts["LlamaherdOperatorMetricsAbsent"]["expr"]


def test_dashboard_config_map(render: Callable[..., Objects]) -> None:
    config_map = one(render(VALUES["all-on"]), "ConfigMap")
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
