"""The operator as it runs in a cluster: ``python -m llamaherd_operator`` in its own process,
talking to the test control plane through a kubeconfig."""

from __future__ import annotations

import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import free_port
from tests.harness.process import ManagedProcess


@dataclass
class OperatorProcess:
    """The operator as it runs in a cluster: its own process, talking to the API server; its
    liveness endpoint on a free loopback port (a new one at each start), its log appended to
    ``log_path``."""

    kubeconfig: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: ManagedProcess = field(init=False)

    def __post_init__(self) -> None:
        self.process = ManagedProcess(
            [sys.executable, "-m", "llamaherd_operator"],
            self.log_path,
            name="operator",
            append=True,
        )

    def start(self) -> None:
        self.port = free_port()
        self.process.env = {
            "KUBECONFIG": str(self.kubeconfig),
            "LLAMAHERD_OPERATOR_LIVENESS_HOST": "127.0.0.1",
            "LLAMAHERD_OPERATOR_LIVENESS_PORT": str(self.port),
            "LLAMAHERD_OPERATOR_CLAIM_RECHECK_SECONDS": "2",
            "LLAMAHERD_OPERATOR_RETRY_DELAY_SECONDS": "1",
            "LLAMAHERD_OPERATOR_SERVICE_MONITOR_RECHECK_SECONDS": "1",
            **self.env,
        }
        self.process.start().wait_ready(self.live, timeout_s=60)

    def live(self) -> bool:
        self.process.check_alive()
        url = f"http://127.0.0.1:{self.port}/healthz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)

    def alive(self) -> bool:
        return self.process.alive()

    def stop(self) -> None:
        self.process.stop()

    def tail(self, lines: int = 60) -> str:
        return self.process.tail(lines)


def autoscaling_operator(
    kubeconfig: Path,
    log_path: Path,
    prometheus_url: str,
    namespace: str,
    metrics_port: int = 0,
    **env: str,
) -> OperatorProcess:
    """An operator for the autoscaling tests (not started): it watches ``namespace`` only and
    autoscales every 2 s from the Prometheus at ``prometheus_url``; its own metrics on
    ``127.0.0.1:metrics_port`` (a free port unless given). ``env``: more settings, by their
    ``LLAMAHERD_OPERATOR_*`` names."""
    return OperatorProcess(
        kubeconfig,
        log_path,
        env={
            "LLAMAHERD_OPERATOR_PROMETHEUS_URL": prometheus_url,
            "LLAMAHERD_OPERATOR_AUTOSCALE_INTERVAL_SECONDS": "2",
            "LLAMAHERD_OPERATOR_METRICS_HOST": "127.0.0.1",
            "LLAMAHERD_OPERATOR_METRICS_PORT": str(metrics_port or free_port()),
            "LLAMAHERD_OPERATOR_NAMESPACES": namespace,
            **env,
        },
    )
