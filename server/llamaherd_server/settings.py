"""Server settings: one model, read from ``LLAMAHERD_*`` environment variables and CLI flags.

The CLI flag for a field is its name with dashes (``--context-size``); the environment variable
is ``LLAMAHERD_`` plus the name in upper case (``LLAMAHERD_CONTEXT_SIZE``). The operator sets
exactly these variables from an InferenceService's ``spec.server`` (camelCase of the same names).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, CliImplicitFlag, SettingsConfigDict

from . import memory
from .cpus import cpu_budget
from .shared_settings import ListenHost, LogFormat, LogLevel

ENV_PREFIX = "LLAMAHERD_"


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        protected_namespaces=(),
    )

    model: Path = Field(description="Path to the GGUF model file.")
    model_name: str | None = Field(
        default=None,
        description="Model id served by /v1/models and accepted in requests "
        "(default: the file name without .gguf).",
    )
    host: ListenHost = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port to listen on.")
    slots: int = Field(
        default=8, ge=1, le=256, description="Sequences decoded together (llama.cpp n_seq_max)."
    )
    context_size: int = Field(
        default=2048,
        ge=64,
        le=1_048_576,
        description="Context per slot in tokens (prompt + generated); the KV cache holds "
        "slots x context_size tokens.",
    )
    token_budget: int = Field(
        default=512,
        ge=16,
        le=65_536,
        description="Most tokens in one decode step: one per running sequence plus prefill "
        "chunks of newly admitted prompts (chunked prefill).",
    )
    prefix_cache: CliImplicitFlag[bool] = Field(
        default=True,
        description="Keep finished requests' KV as cached prefixes and attach the longest "
        "cached prefix of each new prompt instead of prefilling it, also among requests that "
        "run at the same time (--no-prefix-cache turns it off).",
    )
    prefix_cache_ram_mb: int | None = Field(
        default=None,
        ge=0,
        le=1_048_576,
        description="Host memory in MiB for cached prefixes moved out of the KV cache "
        "(restored by copy when a prompt needs them again); 0 keeps them in the KV cache only. "
        "Unset or 'auto': three quarters of what the memory limit leaves once the model has "
        "loaded, after a working reserve (at most 8192; 512 when no limit is known).",
    )
    memory_limit_mb: int | None = Field(
        default=None,
        ge=1,
        le=1_073_741_824,
        description="The container's memory limit in MiB, which sizes the host prefix cache "
        "(the operator passes limits.memory). Unset or 0: the cgroup's memory limit.",
    )
    max_wait_ms: float = Field(
        default=5.0,
        ge=0,
        le=10_000,
        description="How long an idle engine waits after the first arrival to gather a first "
        "batch before it starts decoding.",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="CPU threads for llama.cpp (decode and batch). Unset or 0: the container's "
        "CPU budget (the cgroup CPU quota rounded up, or the CPU affinity mask, whichever is "
        "smaller), not the node's core count.",
    )
    gpu_layers: int = Field(
        default=0,
        ge=-1,
        description="Layers offloaded to the GPU (n_gpu_layers; -1 = all). Needs a CUDA build.",
    )
    queue_limit: int = Field(
        default=256, ge=0, description="Most requests waiting; more get 429 with Retry-After."
    )
    priority_aging_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A waiting request gains one priority level per this many seconds waited, "
        "so low priority cannot starve.",
    )
    request_timeout_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Deadline for a request from arrival to its last token.",
    )
    drain_timeout_seconds: float = Field(
        default=30.0,
        ge=0,
        description="On SIGTERM, how long running requests may take to finish before exit.",
    )
    log_format: LogFormat = "text"
    log_level: LogLevel = "info"
    api_key: SecretStr | None = Field(
        default=None,
        description="When set, inference endpoints require 'Authorization: Bearer <key>'.",
    )
    chat_template: str | None = Field(
        default=None,
        description="Jinja chat template; overrides the one in the GGUF metadata.",
    )
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest request body accepted, in bytes."
    )
    seed: int = Field(
        default=-1, description="Default sampling seed when a request gives none (-1 = random)."
    )
    engine_stall_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Watchdog: when requests are waiting or running and the engine has not "
        "finished a step for this long, /health answers 503 (liveness restarts the pod).",
    )
    termination_message_path: Path | None = Field(
        default=Path("/dev/termination-log"),
        description="Where a failed model load writes its one-line message for Kubernetes "
        "(the container's terminationMessagePath); a missing or read-only folder is ignored.",
    )

    @field_validator("threads", "memory_limit_mb", mode="before")
    @classmethod
    def _zero_is_auto(cls, value: object) -> object:
        # 0 (or an empty variable) means unset: threads from the CPU budget, the memory
        # limit from the cgroup.
        if value in (0, "0", ""):
            return None
        return value

    @field_validator("prefix_cache_ram_mb", mode="before")
    @classmethod
    def _host_cache_auto(cls, value: object) -> object:
        # "auto" (or an empty variable) means "sized from the memory limit", like unset.
        if isinstance(value, str) and value.strip().lower() in ("", "auto"):
            return None
        return value

    def host_cache_budget(self) -> Callable[[], int]:
        """The host prefix cache's size in bytes, to be called once the model has loaded
        (it measures the resident memory then and logs where the size came from)."""
        return memory.host_cache_budget(
            self.prefix_cache_ram_mb,
            self.memory_limit_mb,
            slots=self.slots,
            context_size=self.context_size,
            model=self.model,
        )

    def resolved_threads(self) -> tuple[int, str]:
        """(threads, where the number came from)."""
        if self.threads is not None:
            return self.threads, "setting"
        return cpu_budget()

    @property
    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        name = self.model.name
        return name[: -len(".gguf")] if name.endswith(".gguf") else name
