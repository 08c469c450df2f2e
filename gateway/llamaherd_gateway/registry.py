"""What the gateway knows of the cluster: the models, the InferenceServices that serve them,
and each service's ready endpoints. Fed by :mod:`llamaherd_gateway.watch` from the API (never
from DNS); read by the proxy. Plain data and pure parsing functions, no I/O.

- A model name is an InferenceService's name, plus the names in its
  ``spec.gateway.servedModelNames``; several services may serve one name, split by
  ``spec.gateway.weight``.
- An endpoint gets traffic only when its EndpointSlice says it is ready and not terminating
  (``conditions.ready`` true, ``conditions.terminating`` not true). A slice update or deletion
  takes effect for the next pick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PORT_NAME = "http"  # the port the operator names on the server's Service
DEFAULT_WEIGHT = 100

Key = tuple[str, str]  # (namespace, InferenceService name)


@dataclass(frozen=True, order=True)
class Endpoint:
    """One ready replica: ``address:port`` (the server pod)."""

    address: str
    port: int
    pod: str = ""

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"


@dataclass
class ServiceInfo:
    """One InferenceService as the gateway routes to it."""

    namespace: str
    name: str
    served_names: tuple[str, ...]
    weight: int = DEFAULT_WEIGHT
    replicas: int = 1
    autoscaled: bool = False  # spec.autoscaling.enabled: the gateway may raise it from zero

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


def service_info(obj: Mapping[str, Any]) -> ServiceInfo:
    """An InferenceService (a dict as the API returns it) as the gateway sees it."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    gateway = spec.get("gateway") or {}
    name = str(meta["name"])
    extra = [str(n) for n in gateway.get("servedModelNames") or [] if n]
    served = tuple(dict.fromkeys([name, *extra]))
    return ServiceInfo(
        namespace=str(meta["namespace"]),
        name=name,
        served_names=served,
        weight=int(gateway.get("weight", DEFAULT_WEIGHT)),
        replicas=int(spec.get("replicas", 1)),
        autoscaled=bool((spec.get("autoscaling") or {}).get("enabled")),
    )


def slice_endpoints(obj: Mapping[str, Any]) -> list[Endpoint]:
    """The ready, non-terminating endpoints of one EndpointSlice, on the server's port."""
    ports = obj.get("ports") or []
    port = next((p.get("port") for p in ports if p.get("name") == PORT_NAME), None)
    if port is None and ports:
        port = ports[0].get("port")
    if port is None:
        return []
    found: list[Endpoint] = []
    for ep in obj.get("endpoints") or []:
        conditions = ep.get("conditions") or {}
        # The API: a ready of null means ready, a terminating of null means not terminating.
        if conditions.get("ready") is False or conditions.get("terminating") is True:
            continue
        pod = ((ep.get("targetRef") or {}).get("name")) or ""
        found.extend(Endpoint(str(addr), int(port), pod) for addr in ep.get("addresses") or [])
    return found


@dataclass
class Registry:
    """The gateway's view of the cluster, changed only by the watch; ``version`` counts changes
    and :meth:`wait_changed` wakes the requests held for a replica."""

    services: dict[Key, ServiceInfo] = field(default_factory=dict)
    # (namespace, slice name) -> (service name, its ready endpoints)
    slices: dict[Key, tuple[str, list[Endpoint]]] = field(default_factory=dict)
    version: int = 0
    _changed: asyncio.Event | None = None
    # what the reads computed at the current version (the proxy reads on every request)
    _models: dict[str, list[ServiceInfo]] | None = None
    _endpoints: dict[Key, list[Endpoint]] | None = None

    def _bump(self) -> None:
        self.version += 1
        self._models = self._endpoints = None
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_changed(self) -> None:
        """Return at the next change."""
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    # ---- writes (from the watch) ----
    def upsert_service(self, obj: Mapping[str, Any]) -> None:
        info = service_info(obj)
        if self.services.get(info.key) != info:
            self.services[info.key] = info
            self._bump()

    def delete_service(self, namespace: str, name: str) -> None:
        if self.services.pop((namespace, name), None) is not None:
            self._bump()

    def replace_services(self, namespace: str | None, objs: Iterable[Mapping[str, Any]]) -> None:
        """A full list of one namespace (None: all) replaces what was known there."""
        fresh = {info.key: info for info in map(service_info, objs)}
        for key in [k for k in self.services if namespace is None or k[0] == namespace]:
            if key not in fresh:
                del self.services[key]
        self.services.update(fresh)
        self._bump()

    def upsert_slice(self, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        key = (str(meta["namespace"]), str(meta["name"]))
        if not service:
            self.delete_slice(*key)
            return
        value = (str(service), slice_endpoints(obj))
        if self.slices.get(key) != value:
            self.slices[key] = value
            self._bump()

    def delete_slice(self, namespace: str, name: str) -> None:
        if self.slices.pop((namespace, name), None) is not None:
            self._bump()

    def replace_slices(self, namespace: str | None, objs: Iterable[Mapping[str, Any]]) -> None:
        keep = {k: v for k, v in self.slices.items() if namespace is not None and k[0] != namespace}
        self.slices = keep
        for obj in objs:
            self.upsert_slice(obj)
        self._bump()

    # ---- reads (from the proxy) ----
    def models(self) -> dict[str, list[ServiceInfo]]:
        """Every model name and the services that serve it (zero replicas included)."""
        if self._models is None:
            table: dict[str, list[ServiceInfo]] = {}
            for info in sorted(self.services.values(), key=lambda i: i.key):
                for served in info.served_names:
                    table.setdefault(served, []).append(info)
            self._models = table
        return self._models

    def backends(self, model: str) -> list[ServiceInfo]:
        return self.models().get(model, [])

    def endpoints(self, key: Key) -> list[Endpoint]:
        """The ready endpoints of one InferenceService, over all its slices, without repeats."""
        if self._endpoints is None:
            found: dict[Key, set[Endpoint]] = {}
            for (ns, _), (service, eps) in self.slices.items():
                found.setdefault((ns, service), set()).update(eps)
            self._endpoints = {k: sorted(v) for k, v in found.items()}
        return self._endpoints.get(key, [])
