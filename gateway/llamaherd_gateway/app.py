"""Building the gateway: the registry, the watch on the API, the upstream client, the ASGI app."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Literal

from llamaherd_gateway.metrics import GatewayMetrics
from llamaherd_gateway.proxy import Gateway, UrlFor, upstream_session
from llamaherd_gateway.registry import Registry
from llamaherd_gateway.settings import GatewaySettings
from llamaherd_gateway.watch import Watcher, connect, raise_from_zero


@contextlib.asynccontextmanager
async def running_gateway(
    settings: GatewaySettings, url_for: UrlFor | None = None
) -> AsyncIterator[Gateway]:
    """The gateway with its watch on the cluster running; everything closed on exit.
    ``url_for``: the URL of an endpoint (default ``http://address:port``)."""
    registry = Registry(cross_namespace=settings.allow_cross_namespace_models)
    kube = connect(settings.request_timeout_seconds)
    watcher = Watcher(
        kube,
        registry,
        settings.namespace_list,
        server_timeout=settings.watch_server_timeout_seconds,
        resync_s=settings.resync_interval_seconds,
    )
    metrics = GatewayMetrics()
    http = upstream_session(settings)

    async def scale_up(namespace: str, name: str) -> bool:
        return await raise_from_zero(kube, namespace, name)

    gateway = Gateway(
        settings,
        registry,
        metrics,
        http,
        scale_up=scale_up,
        url_for=url_for,
        ready=lambda: watcher.ready,
    )
    watcher.start()
    gateway.start_load_poll()
    try:
        yield gateway
    finally:
        await gateway.close()
        await watcher.stop()
        await http.close()
        await kube.close()


def run(
    main: Coroutine[Any, Any, None], loop: Literal["auto", "asyncio", "uvloop"] = "auto"
) -> None:
    """Run ``main`` on uvloop when it is installed (``auto``) or asked for, else asyncio's loop.
    uvloop roughly halves the gateway's CPU per streamed chunk (docs/gateway.md)."""
    use_uvloop = loop == "uvloop" or (
        loop == "auto" and importlib.util.find_spec("uvloop") is not None
    )
    if use_uvloop:
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)
