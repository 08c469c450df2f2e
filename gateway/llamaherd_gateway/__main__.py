"""``python -m llamaherd_gateway``: run the gateway.

Every setting is a flag and an environment variable (see :mod:`llamaherd_gateway.settings`):
``--hold-timeout-seconds 60`` or ``LLAMAHERD_GATEWAY_HOLD_TIMEOUT_SECONDS=60``. The cluster is
reached through $KUBECONFIG, ~/.kube/config or the in-cluster service account.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from llamaherd_gateway.app import run, running_gateway
from llamaherd_gateway.proxy import UrlFor
from llamaherd_gateway.settings import GatewaySettings
from llamaherd_server.http_protocols import http_protocol
from llamaherd_server.logs import configure_logging
from llamaherd_server.shared_settings import settings_from_cli

log = logging.getLogger("llamaherd_gateway")


async def serve(settings: GatewaySettings, url_for: UrlFor | None = None) -> None:
    log_config = configure_logging(settings.log_format, settings.log_level)
    for noisy in ("httpx", "httpx2"):  # lightkube's: a line per API request is too many
        logging.getLogger(noisy).setLevel(logging.WARNING)
    async with running_gateway(settings, url_for) as gateway:
        config = uvicorn.Config(
            gateway,
            host=settings.host,
            port=settings.port,
            log_config=log_config,
            access_log=False,
            lifespan="off",
            timeout_keep_alive=75,
            http=http_protocol(),
        )
        server = uvicorn.Server(config)
        log.info(
            "gateway on %s:%d, namespaces %s",
            settings.host,
            settings.port,
            settings.namespaces or "all",
        )
        await server.serve()


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_cli(GatewaySettings, "llamaherd-gateway", argv)
    run(serve(settings), settings.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
