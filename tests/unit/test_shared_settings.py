"""The settings pieces and the bucket table that the server, the operator and the gateway share."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llamaherd_gateway import metrics as gateway_metrics
from llamaherd_gateway.settings import GatewaySettings
from llamaherd_operator import metrics as operator_metrics
from llamaherd_operator.settings import OperatorSettings
from llamaherd_server import metrics as server_metrics
from llamaherd_server.settings import ServerSettings
from llamaherd_server.shared_settings import LogLevel, comma_list, settings_from_cli


class Example(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLAMAHERD_EXAMPLE_", extra="ignore")

    hold_timeout_seconds: float = Field(default=1.0, gt=0, description="A bounded field.")
    log_level: LogLevel = "info"


def test_comma_list() -> None:
    assert comma_list(" a, b ,, c ,") == ["a", "b", "c"]
    assert comma_list("") == []
    assert comma_list(" , ") == []


def test_cli_reads_kebab_case_flags_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAHERD_EXAMPLE_LOG_LEVEL", "debug")
    settings = settings_from_cli(Example, "example", ["--hold-timeout-seconds", "2.5"])
    assert settings.hold_timeout_seconds == 2.5
    assert settings.log_level == "debug"


def test_cli_defaults_to_sys_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["example", "--log-level", "error"])
    assert settings_from_cli(Example, "example").log_level == "error"


def test_invalid_settings_exit_2_with_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[str] = []
    with pytest.raises(SystemExit) as exited:
        settings_from_cli(Example, "example", ["--hold-timeout-seconds", "0"], seen.append)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("example: invalid settings:\n")
    assert "hold_timeout_seconds" in err
    assert len(seen) == 1 and seen[0].startswith("invalid settings: ")
    assert "hold_timeout_seconds" in seen[0]


def test_the_programs_share_the_logging_and_kube_fields() -> None:
    for cls in (ServerSettings, OperatorSettings, GatewaySettings):
        fields = cls.model_fields
        assert fields["log_format"].description == "Log line format."
        assert fields["log_level"].default == "info"
    for cls in (OperatorSettings, GatewaySettings):
        timeout = cls.model_fields["request_timeout_seconds"]
        assert timeout.default == 30.0
        assert timeout.description == "Timeout of one Kubernetes API request."
    with pytest.raises(ValueError):
        GatewaySettings(watch_server_timeout_seconds=5)
    with pytest.raises(ValueError):
        OperatorSettings(request_timeout_seconds=0)
    with pytest.raises(ValueError):
        ServerSettings(model=Path("m.gguf"), log_level="verbose")  # type: ignore[arg-type]


def test_every_latency_table_is_cut_from_the_one_ladder() -> None:
    ladder = server_metrics.BUCKET_LADDER
    assert list(ladder) == sorted(set(ladder))
    tables = {
        "server latency": server_metrics.LATENCY_BUCKETS,
        "gateway hold": gateway_metrics.HOLD_BUCKETS,
        "gateway upstream latency": gateway_metrics.LATENCY_BUCKETS,
        "operator durations": operator_metrics.DURATION_BUCKETS,
    }
    for what, table in tables.items():
        assert table and set(table) <= set(ladder), what
        assert list(table) == sorted(table), what
    # The bounds the dashboards were drawn with.
    assert server_metrics.LATENCY_BUCKETS[0] == 0.005 and server_metrics.LATENCY_BUCKETS[-1] == 600
    assert gateway_metrics.HOLD_BUCKETS[:2] == (0.01, 0.05)
    assert gateway_metrics.LATENCY_BUCKETS[-4:] == (10.0, 30.0, 60.0, 120.0)
    assert operator_metrics.DURATION_BUCKETS[-2:] == (10.0, 30.0)
    assert server_metrics.ladder_buckets(0.01, 0.1, without=(0.025,)) == (0.01, 0.05, 0.1)
