"""The gateway's only link to the Kubernetes API (lightkube): list-then-watch of the
InferenceServices and EndpointSlices in the watched namespaces into the
:class:`~llamaherd_gateway.registry.Registry`, and raising a service from zero replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from lightkube import ApiError, AsyncClient
from lightkube.generic_resource import create_namespaced_resource
from lightkube.operators import exists
from lightkube.resources.discovery_v1 import EndpointSlice
from lightkube.types import PatchType

from llamaherd_gateway.logs import log_value
from llamaherd_gateway.registry import SERVICE_NAME_LABEL, Registry

try:  # lightkube 1.x speaks HTTP through httpx2, older releases through httpx
    import httpx2 as http
except ImportError:  # pragma: no cover
    import httpx as http  # type: ignore[no-redef]

log = logging.getLogger("llamaherd_gateway.watch")

GROUP, VERSION, KIND, PLURAL = "llamaherd.io", "v1alpha1", "InferenceService", "inferenceservices"
InferenceService = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)
FIELD_MANAGER = "llamaherd-gateway"
RETRY_DELAY_S = 2.0


def _as_dict(obj: Any) -> dict[str, Any]:
    return dict(obj.to_dict()) if hasattr(obj, "to_dict") else dict(obj)


def connect(request_timeout: float) -> AsyncClient:
    """A client from $KUBECONFIG, ~/.kube/config or the in-cluster service account."""
    return AsyncClient(
        field_manager=FIELD_MANAGER, timeout=http.Timeout(request_timeout, connect=10.0)
    )


class Watcher:
    """Keeps the registry in step with the API: one list-then-watch loop per kind and
    namespace (or one cluster-wide), relisting in full every ``resync_s`` and after any error.

    ``ready`` is true while every loop has listed and its watch has not failed since: a loop
    whose list or watch fails (the API is gone, RBAC was taken away) makes it false until that
    loop has listed again, so a gateway whose view of the cluster is going stale leaves its
    Service's endpoints. A 410 Gone (the watch's resourceVersion is too old) is routine: the
    loop lists again at once and stays ready."""

    def __init__(
        self,
        client: AsyncClient,
        registry: Registry,
        namespaces: list[str],
        *,
        server_timeout: int = 300,
        resync_s: float = 600.0,
    ) -> None:
        self.client = client
        self.registry = registry
        self.namespaces: list[str | None] = list(namespaces) or [None]
        self.server_timeout = server_timeout
        self.resync_s = resync_s
        self.synced: set[tuple[str, str | None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._reported_claims: dict[tuple[str, str], tuple[str, ...]] = {}

    @property
    def ready(self) -> bool:
        """Every loop has listed its objects at least once."""
        return len(self.synced) == 2 * len(self.namespaces)

    def start(self) -> None:
        for ns in self.namespaces:
            self._tasks.append(asyncio.create_task(self._loop("isvc", ns), name=f"watch-isvc-{ns}"))
            self._tasks.append(
                asyncio.create_task(self._loop("slices", ns), name=f"watch-slices-{ns}")
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _loop(self, kind: str, namespace: str | None) -> None:
        while True:
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.resync_s):
                        await self._list_and_watch(kind, namespace)
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.status.code == 410:  # Gone: the version is too old; list again now
                    log.info("watch of %s in %s expired; listing again", kind, namespace or "all")
                    continue
                self._failed(kind, namespace, exc)
            except Exception as exc:  # the API went away, a dropped connection: list again
                self._failed(kind, namespace, exc)
            else:
                continue  # the resync period is over: list again
            await asyncio.sleep(RETRY_DELAY_S)

    def _failed(self, kind: str, namespace: str | None, exc: Exception) -> None:
        self.synced.discard((kind, namespace))
        log.warning(
            "watching %s in %s failed (not ready until it lists again): %s",
            kind,
            namespace or "all",
            exc,
        )

    def _report_claims(self) -> None:
        """Log each model name claim that another namespace's ownership makes void, once."""
        ignored = self.registry.ignored_claims()
        for (namespace, name), models in ignored.items():
            if self._reported_claims.get((namespace, name)) != models:
                log.warning(
                    "InferenceService %s/%s claims model names that another namespace serves; "
                    "not routed to it: %s (allow_cross_namespace_models allows it)",
                    namespace,
                    name,
                    ", ".join(log_value(m) for m in models),
                )
        self._reported_claims = dict(ignored)

    async def _list_and_watch(self, kind: str, namespace: str | None) -> None:
        res: Any
        labels: dict[str, Any] | None
        if kind == "isvc":
            res, labels = InferenceService, None
            replace: Callable[..., None] = self.registry.replace_services
            upsert, delete = self.registry.upsert_service, self.registry.delete_service
        else:
            res, labels = EndpointSlice, {SERVICE_NAME_LABEL: exists()}
            replace = self.registry.replace_slices
            upsert, delete = self.registry.upsert_slice, self.registry.delete_slice
        listing = self.client.list(res, namespace=namespace or "*", labels=labels)
        objs = [_as_dict(obj) async for obj in listing]
        replace(namespace, objs)
        self.synced.add((kind, namespace))
        if kind == "isvc":
            self._report_claims()
        version = listing.resourceVersion
        stream = self.client.watch(
            res,
            namespace=namespace or "*",
            labels=labels,
            resource_version=version,
            server_timeout=self.server_timeout,
        )
        async for op, obj in stream:
            body = _as_dict(obj)
            meta = body.get("metadata") or {}
            if op == "DELETED":
                delete(meta["namespace"], meta["name"])
            else:
                upsert(body)
            if kind == "isvc":
                self._report_claims()


async def raise_from_zero(client: AsyncClient, namespace: str, name: str) -> bool:
    """Set the InferenceService's replicas to 1 through its scale subresource, only if they are
    0 now (the write carries the resourceVersion read: a concurrent change wins). True when
    this call raised it."""
    for _ in range(3):
        scale = _as_dict(await client.get(InferenceService.Scale, name, namespace=namespace))
        if int((scale.get("spec") or {}).get("replicas") or 0) > 0:
            return False
        patch = {
            "metadata": {"resourceVersion": scale["metadata"]["resourceVersion"]},
            "spec": {"replicas": 1},
        }
        try:
            await client.patch(
                InferenceService.Scale,
                name,
                patch,
                namespace=namespace,
                patch_type=PatchType.MERGE,
                field_manager=FIELD_MANAGER,
            )
        except ApiError as err:
            if err.status.code == 409:  # changed since the read: look again
                continue
            raise
        return True
    return False


ScaleUp = Callable[[str, str], Awaitable[bool]]
