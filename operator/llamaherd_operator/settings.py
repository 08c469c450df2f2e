"""Operator settings: one pydantic-settings model, read from ``LLAMAHERD_OPERATOR_*`` variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llamaherd_operator.builders import BuildOptions

ENV_PREFIX = "LLAMAHERD_OPERATOR_"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    namespaces: str = Field(
        default="",
        description="Comma-separated namespaces to watch (LLAMAHERD_OPERATOR_NAMESPACES=a,b); "
        "empty watches the whole cluster.",
    )
    log_format: Literal["text", "json"] = Field(default="text", description="Log line format.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level."
    )
    liveness_host: str = Field(default="0.0.0.0", description="Address of the liveness endpoint.")
    liveness_port: int = Field(
        default=8080, ge=0, le=65535, description="Port of the liveness endpoint (0 disables it)."
    )
    claim_recheck_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How often to look again for a missing PersistentVolumeClaim.",
    )
    service_monitor_recheck_seconds: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="How often to look again whether the ServiceMonitor CRD is installed.",
    )
    retry_delay_seconds: float = Field(
        default=5.0, gt=0, le=600, description="Delay before retrying a failed reconcile."
    )
    request_timeout_seconds: float = Field(
        default=30.0, gt=0, le=600, description="Timeout of one Kubernetes API request."
    )
    watch_server_timeout_seconds: int = Field(
        default=300,
        ge=10,
        le=3600,
        description="Server-side timeout of a watch request: watches are renewed this often.",
    )
    worker_limit: int = Field(
        default=50, ge=1, le=1000, description="Most InferenceServices handled at the same time."
    )
    model_download_retries: int = Field(
        default=5, ge=0, le=100, description="Retries of the init container's model download."
    )
    model_download_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Network timeout of one blocking read in the model download.",
    )
    pre_stop_sleep_seconds: int = Field(
        default=5,
        ge=0,
        le=120,
        description="Server pods sleep this long before SIGTERM, so endpoints drop them first.",
    )

    # ---- autoscaler (llamaherd_operator.autoscaler) ----
    prometheus_url: str = Field(
        default="http://prometheus-operated.monitoring.svc:9090",
        description="Prometheus that scrapes the server pods; an InferenceService's "
        "spec.autoscaling.prometheusUrl overrides it.",
    )
    prometheus_timeout_seconds: float = Field(
        default=5.0, gt=0, le=120, description="Timeout of one PromQL query."
    )
    autoscale_interval_seconds: float = Field(
        default=15.0, ge=1, le=3600, description="How often each autoscaled service is sized."
    )
    metrics_selector: str = Field(
        default='namespace="{namespace}",service="{name}"',
        description="PromQL label matchers that select one InferenceService's pods; "
        "{namespace} and {name} are filled in. The default fits the ServiceMonitor the "
        "operator creates.",
    )
    metrics_staleness_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Samples older than this count as missing: the autoscaler holds.",
    )
    metrics_host: str = Field(default="0.0.0.0", description="Address of the /metrics endpoint.")
    metrics_port: int = Field(
        default=8081, ge=0, le=65535, description="Port of the operator's /metrics (0 = off)."
    )

    @property
    def namespace_list(self) -> list[str]:
        return [item.strip() for item in self.namespaces.split(",") if item.strip()]

    @property
    def clusterwide(self) -> bool:
        return not self.namespace_list

    @property
    def liveness_endpoint(self) -> str | None:
        if not self.liveness_port:
            return None
        return f"http://{self.liveness_host}:{self.liveness_port}/healthz"

    def build_options(self) -> BuildOptions:
        return BuildOptions(
            download_retries=self.model_download_retries,
            download_timeout_seconds=self.model_download_timeout_seconds,
            pre_stop_sleep_seconds=self.pre_stop_sleep_seconds,
        )
