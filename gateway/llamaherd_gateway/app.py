"""Building the gateway: the registry, the watch on the API, the upstream client, the ASGI app."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx

from llamaherd_gateway.metrics import GatewayMetrics
from llamaherd_gateway.proxy import Gateway
from llamaherd_gateway.registry import Registry
from llamaherd_gateway.settings import GatewaySettings
from llamaherd_gateway.watch import Watcher, connect, raise_from_zero


def upstream_client(settings: GatewaySettings) -> httpx.AsyncClient:
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_connections,
    )
    timeout = httpx.Timeout(
        settings.upstream_timeout_seconds, connect=settings.connect_timeout_seconds
    )
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)


@contextlib.asynccontextmanager
async def running_gateway(
    settings: GatewaySettings, http: httpx.AsyncClient | None = None
) -> AsyncIterator[Gateway]:
    """The gateway with its watch on the cluster running; everything closed on exit.
    ``http``: the client to the replicas (default :func:`upstream_client`)."""
    registry = Registry()
    kube = connect(settings.request_timeout_seconds)
    watcher = Watcher(
        kube,
        registry,
        settings.namespace_list,
        server_timeout=settings.watch_server_timeout_seconds,
        resync_s=settings.resync_interval_seconds,
    )
    metrics = GatewayMetrics()
    http = http or upstream_client(settings)

    async def scale_up(namespace: str, name: str) -> bool:
        return await raise_from_zero(kube, namespace, name)

    gateway = Gateway(
        settings, registry, metrics, http, scale_up=scale_up, ready=lambda: watcher.ready
    )
    watcher.start()
    try:
        yield gateway
    finally:
        await gateway.close()
        await watcher.stop()
        await http.aclose()
        await kube.close()
