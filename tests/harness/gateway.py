"""The gateway as its own process for the integration tests, with loopback standing in for the
pod network.

The API server refuses EndpointSlice addresses in 127.0.0.0/8, so the tests write the slices
as a kubelet and the EndpointSlice controller would, with pod-like addresses from 198.18.0.0/15
and each server process's real port; this wrapper runs the real gateway (``serve`` from
``llamaherd_gateway.__main__``, every setting from ``LLAMAHERD_GATEWAY_*``) with one change:
its connections to 198.18.0.0/15 go to 127.0.0.1 on the same port (``url_for``). That is the
whole stand-in; the registry, the watch, the pick and the proxy are the production code.

``python -m tests.harness.gateway``
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llamaherd_gateway.registry import Endpoint
from tests.harness import free_port
from tests.harness.process import ManagedProcess

POD_NETWORK = ipaddress.ip_network("198.18.0.0/15")


def loopback_url(endpoint: Endpoint) -> str:
    """The URL the gateway dials for an endpoint: a 'pod' address in 198.18.0.0/15 becomes
    127.0.0.1, same port."""
    if ipaddress.ip_address(endpoint.address) in POD_NETWORK:
        return f"http://127.0.0.1:{endpoint.port}"
    return endpoint.url


def main() -> None:
    from llamaherd_gateway.__main__ import serve
    from llamaherd_gateway.app import run
    from llamaherd_gateway.settings import GatewaySettings

    settings = GatewaySettings()
    run(serve(settings, loopback_url), settings.event_loop)


def pod_address(index: int) -> str:
    """A pod-like address for the index-th stand-in pod."""
    return str(POD_NETWORK[index + 1])


@dataclass
class GatewayProcess:
    """``python -m tests.harness.gateway`` on a free loopback port (a new one at each start),
    its log appended to ``log_path``."""

    kubeconfig: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: ManagedProcess = field(init=False)

    def __post_init__(self) -> None:
        self.process = ManagedProcess(
            [sys.executable, "-m", "tests.harness.gateway"],
            self.log_path,
            name="gateway",
            stop_timeout_s=15,
            append=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayProcess:
        self.port = free_port()
        self.process.env = {
            "KUBECONFIG": str(self.kubeconfig),
            "LLAMAHERD_GATEWAY_HOST": "127.0.0.1",
            "LLAMAHERD_GATEWAY_PORT": str(self.port),
            **self.env,
        }
        self.process.start().wait_ready(self.ready, timeout_s=60)
        return self

    def ready(self) -> bool:
        self.process.check_alive()
        return httpx.get(self.url + "/ready", timeout=2).status_code == 200

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", timeout=5).text

    def stop(self) -> None:
        self.process.stop()

    def tail(self, lines: int = 60) -> str:
        return self.process.tail(lines)


if __name__ == "__main__":
    main()
