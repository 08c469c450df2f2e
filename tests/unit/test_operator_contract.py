"""The CRD against its two neighbours: the server's settings model and the operator's builders.

Renaming a field on either side, or changing a bound or default on one side only, fails here.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from llamaherd_operator import builders, names, status
from llamaherd_operator.settings import OperatorSettings

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "inferenceservices.llamaherd.io.yaml"


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return dict(yaml.safe_load(CRD_PATH.read_text()))


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    (version,) = crd["spec"]["versions"]
    return dict(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def spec_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return dict(schema["properties"]["spec"]["properties"])


@pytest.fixture(scope="module")
def server_settings() -> type[BaseSettings]:
    settings = pytest.importorskip("llamaherd_server.settings")
    return typing.cast(type[BaseSettings], settings.ServerSettings)


def snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def test_crd_identity(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == names.CRD_NAME
    assert crd["spec"]["group"] == names.GROUP
    assert crd["spec"]["names"]["kind"] == names.KIND
    assert crd["spec"]["names"]["plural"] == names.PLURAL
    assert crd["spec"]["names"]["shortNames"] == ["lhis"]
    assert "llamaherd" in crd["spec"]["names"]["categories"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == names.VERSION
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert columns == ["Ready", "Replicas", "Desired", "Queue", "P95", "Age"]


def test_every_server_field_is_a_server_setting(
    spec_schema: dict[str, Any], server_settings: type[BaseSettings]
) -> None:
    fields = server_settings.model_fields
    for name in spec_schema["server"]["properties"]:
        assert snake(name) in fields, f"spec.server.{name} has no ServerSettings.{snake(name)}"
    prefix = server_settings.model_config.get("env_prefix")
    assert prefix == names.ENV_PREFIX


def test_builder_emits_exactly_the_settings_env(
    spec_schema: dict[str, Any], server_settings: type[BaseSettings]
) -> None:
    properties = spec_schema["server"]["properties"]
    sample = {name: _sample(prop) for name, prop in properties.items()}
    body = {
        "metadata": {"name": "chat", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {
            "model": {"url": "https://h.example/m.gguf"},
            "server": sample,
            "apiKeySecretRef": {"name": "s", "key": "k"},
        },
    }
    env = builders.server_env(body)
    emitted = {item["name"] for item in env}
    expected_server = {names.ENV_PREFIX + snake(name).upper() for name in properties}
    fixed = {f"{names.ENV_PREFIX}{n}" for n in ("MODEL", "MODEL_NAME", "HOST", "PORT", "API_KEY")}
    assert emitted == expected_server | fixed
    # Every emitted variable is one the server reads.
    fields = server_settings.model_fields
    for name in emitted:
        assert name.removeprefix(names.ENV_PREFIX).lower() in fields, name


def _sample(prop: dict[str, Any]) -> Any:
    if "enum" in prop:
        return prop["enum"][0]
    if prop["type"] == "boolean":
        return False
    if prop["type"] == "integer":
        return max(int(prop.get("minimum", 1)), 1)
    return float(prop.get("minimum", 0)) + 1.5


def test_server_bounds_and_enums_match_the_settings(
    spec_schema: dict[str, Any], server_settings: type[BaseSettings]
) -> None:
    for name, prop in spec_schema["server"]["properties"].items():
        field = server_settings.model_fields[snake(name)]
        bounds: dict[str, float] = {}
        for item in field.metadata:
            for attr in ("ge", "gt", "le", "lt"):
                if getattr(item, attr, None) is not None:
                    bounds[attr] = getattr(item, attr)
        low = bounds.get("ge", bounds.get("gt"))
        high = bounds.get("le", bounds.get("lt"))
        assert prop.get("minimum") == low, f"spec.server.{name}: minimum vs {field}"
        assert prop.get("maximum") == high, f"spec.server.{name}: maximum vs {field}"
        assert bool(prop.get("exclusiveMinimum")) == ("gt" in bounds), name
        if "enum" in prop:
            assert set(prop["enum"]) == set(typing.get_args(field.annotation)), name


def test_reserved_env_names_match_what_the_operator_sets(spec_schema: dict[str, Any]) -> None:
    (rule,) = spec_schema["env"]["x-kubernetes-validations"]
    reserved = set(re.findall(r"'(LLAMAHERD_[A-Z_]+)'", rule["rule"]))
    properties = spec_schema["server"]["properties"]
    managed = {builders.server_env_name(name) for name in properties}
    managed |= {
        f"{names.ENV_PREFIX}{n}" for n in ("MODEL", "MODEL_NAME", "HOST", "PORT", "API_KEY")
    }
    assert reserved == managed


def test_load_failure_prefix_matches_the_server() -> None:
    # The operator tells a failed model load from other crashes by this prefix in the server
    # container's termination message (Degraded, reason ModelLoadFailed).
    loadfail = pytest.importorskip("llamaherd_server.loadfail")
    assert loadfail.LOAD_FAILED_PREFIX == status.MODEL_LOAD_FAILED_PREFIX
    message = loadfail.failure_message(Path("/models/m.gguf"), "no such file")
    assert message.startswith(status.MODEL_LOAD_FAILED_PREFIX)


def test_drain_default_matches_the_server(server_settings: type[BaseSettings]) -> None:
    default = server_settings.model_fields["drain_timeout_seconds"].default
    assert default == builders.DEFAULT_DRAIN_TIMEOUT_SECONDS


def test_builder_defaults_match_crd_defaults(spec_schema: dict[str, Any]) -> None:
    autoscaling = spec_schema["autoscaling"]["properties"]
    cache = spec_schema["model"]["properties"]["cache"]["properties"]
    pairs = [
        (spec_schema["imagePullPolicy"]["default"], builders.DEFAULT_IMAGE_PULL_POLICY),
        (spec_schema["replicas"]["default"], builders.DEFAULT_REPLICAS),
        (autoscaling["minReplicas"]["default"], builders.DEFAULT_MIN_REPLICAS),
        (autoscaling["maxReplicas"]["default"], builders.DEFAULT_MAX_REPLICAS),
        (
            spec_schema["gpu"]["properties"]["resourceName"]["default"],
            builders.DEFAULT_GPU_RESOURCE,
        ),
        (spec_schema["service"]["properties"]["type"]["default"], builders.DEFAULT_SERVICE_TYPE),
        (spec_schema["service"]["properties"]["port"]["default"], builders.DEFAULT_SERVICE_PORT),
        (cache["sizeLimit"]["default"], builders.DEFAULT_CACHE_SIZE_LIMIT),
    ]
    for crd_default, builder_default in pairs:
        assert crd_default == builder_default


def test_status_fields_for_the_autoscaler(schema: dict[str, Any]) -> None:
    status = schema["properties"]["status"]["properties"]
    for field in ("queueDepth", "latencyP95Ms", "lastScaleTime", "scalingDecisions"):
        assert field in status
    assert status["scalingDecisions"]["maxItems"] == 10
    assert set(status["scalingDecisions"]["items"]["properties"]) == {
        "time",
        "from",
        "to",
        "reason",
        "message",
    }
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def test_operator_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAHERD_OPERATOR_NAMESPACES", " a, b ,,")
    monkeypatch.setenv("LLAMAHERD_OPERATOR_LIVENESS_PORT", "9000")
    monkeypatch.setenv("LLAMAHERD_OPERATOR_PRE_STOP_SLEEP_SECONDS", "7")
    settings = OperatorSettings()
    assert settings.namespace_list == ["a", "b"]
    assert not settings.clusterwide
    assert settings.liveness_endpoint == "http://0.0.0.0:9000/healthz"
    assert settings.build_options().pre_stop_sleep_seconds == 7
    monkeypatch.setenv("LLAMAHERD_OPERATOR_NAMESPACES", "")
    monkeypatch.setenv("LLAMAHERD_OPERATOR_LIVENESS_PORT", "0")
    settings = OperatorSettings()
    assert settings.clusterwide
    assert settings.liveness_endpoint is None
