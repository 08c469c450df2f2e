"""The operator as it runs in a cluster: ``python -m llamaherd_operator`` in its own process,
talking to the test control plane through a kubeconfig."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import REPO_ROOT, free_port, wait_until

REPO = REPO_ROOT


@dataclass
class OperatorProcess:
    """The operator as it runs in a cluster: its own process, talking to the API server."""

    kubeconfig: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "LLAMAHERD_OPERATOR_LIVENESS_HOST": "127.0.0.1",
            "LLAMAHERD_OPERATOR_LIVENESS_PORT": str(self.port),
            "LLAMAHERD_OPERATOR_CLAIM_RECHECK_SECONDS": "2",
            "LLAMAHERD_OPERATOR_RETRY_DELAY_SECONDS": "1",
            "LLAMAHERD_OPERATOR_SERVICE_MONITOR_RECHECK_SECONDS": "1",
            **self.env,
        }
        with self.log_path.open("ab") as out:
            out.write(f"\n=== start {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llamaherd_operator"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        wait_until(self.live, timeout=60, what=f"operator liveness (log {self.log_path})")

    def live(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.tail()}")
        url = f"http://127.0.0.1:{self.port}/healthz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
