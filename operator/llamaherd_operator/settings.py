"""Operator settings: one pydantic-settings model, read from ``LLAMAHERD_OPERATOR_*`` variables."""

from __future__ import annotations

import json

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llamaherd_operator.builders import DEFAULT_GPU_IMAGE, DEFAULT_IMAGE, BuildOptions
from llamaherd_server.shared_settings import (
    KubeRequestTimeout,
    LogFormat,
    LogLevel,
    WatchServerTimeout,
    comma_list,
)

ENV_PREFIX = "LLAMAHERD_OPERATOR_"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    namespaces: str = Field(
        default="",
        description="Comma-separated namespaces to watch (LLAMAHERD_OPERATOR_NAMESPACES=a,b); "
        "empty watches the whole cluster.",
    )
    log_format: LogFormat = "text"
    log_level: LogLevel = "info"
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
    request_timeout_seconds: KubeRequestTimeout = 30.0
    watch_server_timeout_seconds: WatchServerTimeout = 300
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
    resync_interval_seconds: float = Field(
        default=300.0,
        ge=1,
        le=86400,
        description="How often every InferenceService is reconciled even when no event came: "
        "the periodic resync that catches what watch events missed.",
    )
    service_monitors_enabled: bool = Field(
        default=True,
        description="Create a ServiceMonitor per InferenceService where the Prometheus "
        "operator's CRD exists; false deletes the ones the operator made (for example when a "
        "PodMonitor already scrapes the pods).",
    )
    service_monitor_labels: str = Field(
        default="",
        description="Extra labels on every ServiceMonitor, as a JSON object "
        '(\'{"release": "kube-prometheus-stack"}\') or comma-separated key=value pairs.',
    )
    server_image: str = Field(
        default=DEFAULT_IMAGE,
        min_length=1,
        description="Server image of an InferenceService without spec.image and without GPUs "
        "(the CPU variant of Dockerfile.server).",
    )
    server_image_gpu: str = Field(
        default=DEFAULT_GPU_IMAGE,
        min_length=1,
        description="Server image of an InferenceService without spec.image that asks for GPUs "
        "(spec.gpu.count > 0; the CUDA variant of Dockerfile.server).",
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
        "spec.autoscaling.prometheusUrl overrides it when allowed_prometheus_urls lets it.",
    )
    allowed_prometheus_urls: str = Field(
        default="",
        description="Comma-separated URLs an InferenceService's spec.autoscaling.prometheusUrl "
        "may name: an entry matches that URL and every URL below its path (an entry ending "
        "in / matches only below it). prometheus_url is always allowed; empty allows no "
        "other.",
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

    @field_validator("service_monitor_labels")
    @classmethod
    def _labels_parse(cls, value: str) -> str:
        parse_labels(value)  # fail at start, not at the first ServiceMonitor
        return value

    @property
    def namespace_list(self) -> list[str]:
        return comma_list(self.namespaces)

    @property
    def allowed_prometheus_url_list(self) -> list[str]:
        return comma_list(self.allowed_prometheus_urls)

    @property
    def service_monitor_label_map(self) -> dict[str, str]:
        return parse_labels(self.service_monitor_labels)

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
            server_image=self.server_image,
            server_image_gpu=self.server_image_gpu,
            service_monitor_labels=tuple(sorted(self.service_monitor_label_map.items())),
        )


def parse_labels(text: str) -> dict[str, str]:
    """Labels from a JSON object or from ``key=value,key2=value2``; empty gives none."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        loaded = json.loads(text)
        if not isinstance(loaded, dict):
            raise ValueError(f"labels must be a JSON object, got {text!r}")
        return {str(key): str(value) for key, value in loaded.items()}
    labels: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key.strip():
            raise ValueError(f"labels must be key=value pairs, got {item!r}")
        labels[key.strip()] = value.strip()
    return labels
