"""Gateway settings: one pydantic-settings model, read from ``LLAMAHERD_GATEWAY_*`` variables
and CLI flags alike (``--hold-timeout-seconds 60`` or ``LLAMAHERD_GATEWAY_HOLD_TIMEOUT_SECONDS``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llamaherd_server.shared_settings import (
    KubeRequestTimeout,
    ListenHost,
    LogFormat,
    LogLevel,
    WatchServerTimeout,
    comma_list,
)

ENV_PREFIX = "LLAMAHERD_GATEWAY_"


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: ListenHost = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port to listen on.")
    namespaces: str = Field(
        default="",
        description="Comma-separated namespaces whose InferenceServices the gateway serves; "
        "empty watches the whole cluster.",
    )
    log_format: LogFormat = "text"
    log_level: LogLevel = "info"
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        default="auto",
        description="Event loop: uvloop when installed (auto), or asyncio's own. uvloop, and "
        "httptools for HTTP parsing (used by uvicorn when installed), cut the CPU per "
        "streamed token.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="A file of API keys, one per line (a mounted Secret); when set, every /v1/ "
        "request needs 'Authorization: Bearer <one of them>' (401 otherwise). The file is read "
        "again when it changes.",
    )
    forward_authorization: bool = Field(
        default=False,
        description="With api_keys_file, pass the client's Authorization header on to the "
        "replica too (for servers with the same apiKey). Off: the gateway's keys stay with the "
        "gateway. Without api_keys_file the header always goes on (the servers check it).",
    )
    # ---- tenants ----
    allow_cross_namespace_models: bool = Field(
        default=False,
        description="Let services in several namespaces serve one model name (a split across "
        "namespaces). Off: a name belongs to one namespace (the one whose service is named "
        "like it, else the oldest claimant's) and claims from other namespaces are ignored.",
    )
    max_priority: int = Field(
        default=9,
        ge=0,
        le=9,
        description="Highest priority (X-Priority header or the body's 'priority', 0-9) a "
        "client may ask for; higher asks are lowered to it. Keys in priority_limits_file get "
        "their own limit. 9: no limit.",
    )
    priority_limits_file: Path | None = Field(
        default=None,
        description="A file of '<api key> <max priority>' lines (a mounted Secret): the highest "
        "priority each key may ask for, in place of max_priority. Read again when it changes.",
    )
    max_body_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        le=1 << 30,
        description="Largest request body, in bytes (the server's own default limit): a larger "
        "Content-Length is refused with 413 before the body is read.",
    )
    # ---- holding requests for a service with no ready replica ----
    hold_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        le=3600,
        description="Longest a request waits for a ready replica (scale from zero, a cold "
        "start) before it gets 503 with Retry-After. Separate from generation timeouts: once "
        "forwarded, a request runs as long as the server lets it.",
    )
    max_held_requests: int = Field(
        default=256,
        ge=0,
        le=100_000,
        description="Most requests held at once by this gateway replica, all models together; "
        "one more gets 503 with Retry-After.",
    )
    retry_after_seconds: int = Field(
        default=10, ge=1, le=3600, description="The Retry-After of a 503 from the gateway."
    )
    scale_from_zero: bool = Field(
        default=True,
        description="Raise a service at zero replicas to one (its scale subresource) when a "
        "request for it comes; false holds the request until someone else scales it.",
    )
    # ---- picking a replica ----
    affinity_prefix_chars: int = Field(
        default=512,
        ge=0,
        le=1_000_000,
        description="Characters at the start of the prompt (chat: system prompt and first user "
        "message) that pick the replica by consistent hash; 0 turns prefix affinity off.",
    )
    affinity_load_factor: float = Field(
        default=0.5,
        ge=0,
        le=100,
        description="c in the bounded-load rule: the affinity replica is skipped when its "
        "outstanding requests would exceed (1 + c) x the mean over the service's replicas.",
    )
    load_poll_seconds: float = Field(
        default=2.0,
        ge=0,
        le=3600,
        description="How often the gateway reads each replica's reported queue (waiting and "
        "running requests from its /metrics), so that requests sent by other gateway "
        "replicas or straight to the Service count in the load; 0 counts only its own.",
    )
    retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="Other replicas tried when one cannot have started the request: the "
        "connection was refused, or broke before the request was sent, or (streamed requests, "
        "whose response starts when a slot takes them) before the response headers.",
    )
    # ---- outlier detection ----
    outlier_consecutive_failures: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="Consecutive failures (refused or broken connections, 5xx answers) that "
        "eject a replica from picking for a while; 0 turns ejection off.",
    )
    outlier_base_ejection_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="First ejection's length; each further ejection of the same replica "
        "lasts this much longer (one is forgiven per this long back in service).",
    )
    outlier_max_ejection_seconds: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="Longest ejection.",
    )
    outlier_max_ejection_percent: int = Field(
        default=50,
        ge=0,
        le=100,
        description="Most of a service's ready endpoints ejected at once, in percent (rounded "
        "down: a service with one endpoint keeps it).",
    )
    # ---- upstream ----
    connect_timeout_seconds: float = Field(
        default=5.0, gt=0, le=120, description="Timeout of one connection to a replica."
    )
    upstream_timeout_seconds: float = Field(
        default=900.0,
        gt=0,
        le=86400,
        description="Longest wait for the next bytes from a replica (a whole non-streaming "
        "generation included).",
    )
    max_connections: int = Field(
        default=1000, ge=1, le=100_000, description="Most open connections to all replicas."
    )
    upstream_keepalive_seconds: float = Field(
        default=4.0,
        gt=0,
        le=3600,
        description="How long an idle connection to a replica is kept for the next request: "
        "under the server's own keep-alive (uvicorn's 5 s), so the gateway closes it first and "
        "never sends a request on a connection the server is closing.",
    )
    # ---- Kubernetes ----
    request_timeout_seconds: KubeRequestTimeout = 30.0
    watch_server_timeout_seconds: WatchServerTimeout = 300
    resync_interval_seconds: float = Field(
        default=600.0,
        ge=5,
        le=86400,
        description="How often the InferenceServices and EndpointSlices are listed again in "
        "full, whatever the watches said.",
    )

    @property
    def namespace_list(self) -> list[str]:
        return comma_list(self.namespaces)
