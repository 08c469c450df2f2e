"""What the gateway knows of the cluster: the models, the InferenceServices that serve them,
and each service's ready endpoints. Fed by :mod:`llamaherd_gateway.watch` from the API (never
from DNS); read by the proxy. Plain data and pure parsing functions, no I/O.

- A model name is an InferenceService's name, plus the names in its
  ``spec.gateway.servedModelNames``; several services may serve one name, split by
  ``spec.gateway.weight``.
- **Names are scoped to a namespace** (unless ``cross_namespace``): each name belongs to one
  namespace, and only that namespace's services serve it. The owner is the namespace of the
  service named like the model (the oldest such service, by creationTimestamp, then
  namespace/name, if several namespaces have one), else the namespace of the oldest service
  that claims the name in ``servedModelNames`` (same order). Claims from other namespaces are
  ignored (:meth:`Registry.ignored_claims`): a tenant cannot take another's traffic by naming
  its model, whatever weight it sets.
- An endpoint gets traffic only when its EndpointSlice says it is ready and not terminating
  (``conditions.ready`` true, ``conditions.terminating`` not true), and only from slices of
  IP addresses (``addressType`` IPv4 or IPv6; an FQDN slice names a host the gateway would
  resolve and dial, anywhere). A slice update or deletion takes effect for the next pick.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PORT_NAME = "http"  # the port the operator names on the server's Service
DEFAULT_WEIGHT = 100
IP_ADDRESS_TYPES = {"IPv4": 4, "IPv6": 6}
LATEST = "~"  # sorts after every RFC 3339 timestamp: a service without one counts as newest

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
    created: str = LATEST  # metadata.creationTimestamp (RFC 3339, UTC: sorts as text)

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def seniority(self) -> tuple[str, str, str]:
        """Older first, then by namespace/name: who owns a model name claimed twice."""
        return (self.created, self.namespace, self.name)


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
        created=str(meta.get("creationTimestamp") or LATEST),
    )


def owner_namespace(model: str, claimants: Iterable[ServiceInfo]) -> str:
    """The namespace a model name belongs to: that of the oldest service named like it, else
    that of the oldest service claiming it."""
    claimants = list(claimants)
    named = [s for s in claimants if s.name == model]
    return min(named or claimants, key=lambda s: s.seniority).namespace


def model_table(
    services: Iterable[ServiceInfo], cross_namespace: bool = False
) -> tuple[dict[str, list[ServiceInfo]], dict[Key, tuple[str, ...]]]:
    """Every model name and the services that serve it (ordered by namespace/name); and the
    names each service claims but does not get (another namespace owns them)."""
    claims: dict[str, list[ServiceInfo]] = {}
    for info in sorted(services, key=lambda i: i.key):
        for served in info.served_names:
            claims.setdefault(served, []).append(info)
    if cross_namespace:
        return claims, {}
    table: dict[str, list[ServiceInfo]] = {}
    ignored: dict[Key, list[str]] = {}
    for model, claimants in claims.items():
        owner = owner_namespace(model, claimants)
        table[model] = [s for s in claimants if s.namespace == owner]
        for s in claimants:
            if s.namespace != owner:
                ignored.setdefault(s.key, []).append(model)
    return table, {k: tuple(v) for k, v in ignored.items()}


def _ip_of(address: Any, version: int | None) -> str | None:
    try:
        ip = ipaddress.ip_address(str(address))
    except ValueError:
        return None
    return str(ip) if version is None or ip.version == version else None


def slice_endpoints(obj: Mapping[str, Any]) -> list[Endpoint]:
    """The ready, non-terminating endpoints of one EndpointSlice, on the server's port: IP
    addresses only (of the slice's ``addressType``; the API always sets one, a slice written
    by hand without one may hold either family); none from an FQDN slice."""
    address_type = obj.get("addressType")
    version = IP_ADDRESS_TYPES.get(str(address_type))
    if version is None and address_type is not None:
        return []
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
        for addr in ep.get("addresses") or []:
            ip = _ip_of(addr, version)
            if ip is not None:
                found.append(Endpoint(ip, int(port), pod))
    return found


@dataclass
class Registry:
    """The gateway's view of the cluster, changed only by the watch; ``version`` counts changes
    and :meth:`wait_changed` wakes the requests held for a replica."""

    services: dict[Key, ServiceInfo] = field(default_factory=dict)
    # (namespace, slice name) -> (service name, its ready endpoints)
    slices: dict[Key, tuple[str, list[Endpoint]]] = field(default_factory=dict)
    version: int = 0
    cross_namespace: bool = False  # allow_cross_namespace_models
    _changed: asyncio.Event | None = None
    # what the reads computed at the current version (the proxy reads on every request)
    _models: dict[str, list[ServiceInfo]] | None = None
    _ignored: dict[Key, tuple[str, ...]] = field(default_factory=dict)
    _endpoints: dict[Key, list[Endpoint]] | None = None

    def _bump(self, services: bool = True) -> None:
        """A change: of the services (the model table is computed again) or of the slices."""
        self.version += 1
        self._endpoints = None
        if services:
            self._models = None
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
            self._bump(services=False)

    def delete_slice(self, namespace: str, name: str) -> None:
        if self.slices.pop((namespace, name), None) is not None:
            self._bump(services=False)

    def replace_slices(self, namespace: str | None, objs: Iterable[Mapping[str, Any]]) -> None:
        keep = {k: v for k, v in self.slices.items() if namespace is not None and k[0] != namespace}
        self.slices = keep
        for obj in objs:
            self.upsert_slice(obj)
        self._bump(services=False)

    # ---- reads (from the proxy) ----
    def models(self) -> dict[str, list[ServiceInfo]]:
        """Every model name and the services that serve it (zero replicas included)."""
        if self._models is None:
            self._models, self._ignored = model_table(self.services.values(), self.cross_namespace)
        return self._models

    def ignored_claims(self) -> dict[Key, tuple[str, ...]]:
        """The model names each service claims and does not get: another namespace owns them."""
        self.models()
        return self._ignored

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
