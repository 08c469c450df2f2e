"""The one module that talks to the Kubernetes API (besides kopf itself), through lightkube.

Every write is a server-side apply with the field manager ``llamaherd-operator`` and ``force``:
the operator owns the fields it sets, and a person's ``kubectl edit`` of one of them is put back
at the next reconcile. Manifests come in as plain dicts from :mod:`llamaherd_operator.builders`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from lightkube import ApiError, AsyncClient, codecs
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.autoscaling_v2 import HorizontalPodAutoscaler
from lightkube.resources.core_v1 import PersistentVolumeClaim, Pod
from lightkube.resources.policy_v1 import PodDisruptionBudget
from lightkube.types import PatchType

from llamaherd_operator import names

try:  # lightkube 1.x speaks HTTP through httpx2, older releases through httpx
    import httpx2 as http
except ImportError:  # pragma: no cover
    import httpx as http  # type: ignore[no-redef]

InferenceService = create_namespaced_resource(names.GROUP, names.VERSION, names.KIND, names.PLURAL)
ServiceMonitor = create_namespaced_resource(
    "monitoring.coreos.com", "v1", "ServiceMonitor", "servicemonitors"
)
SERVICE_MONITOR_CRD = "servicemonitors.monitoring.coreos.com"

# What a call to the API may raise: an answer that is an error, or no answer at all.
KubeError = (ApiError, http.HTTPError)

__all__ = [
    "ApiError",
    "InferenceService",
    "Kube",
    "KubeError",
    "ServiceMonitor",
    "is_invalid",
    "is_transient",
]


def _as_dict(obj: Any) -> dict[str, Any]:
    return dict(obj.to_dict()) if hasattr(obj, "to_dict") else dict(obj)


def status_code(err: BaseException) -> int | None:
    if isinstance(err, ApiError):
        return int(err.status.code or 0)
    return None


def is_invalid(err: BaseException) -> bool:
    """The API server refuses the object itself: retrying the same request cannot help.

    Besides 400 and 422, a 500 that says the object could not be converted is one too: the API
    server answers that way to a malformed value inside a typed field (a quantity like "lots").
    """
    code = status_code(err)
    if code in (400, 422):
        return True
    message = str(err.status.message or "") if isinstance(err, ApiError) else ""
    return code == 500 and "unable to convert" in message


def is_transient(err: BaseException) -> bool:
    """Worth retrying: conflicts, throttling, server trouble, the connection itself."""
    code = status_code(err)  # checked first: an ApiError is an HTTPError too
    if code is not None:
        return (code in (409, 429) or code >= 500) and not is_invalid(err)
    return isinstance(err, http.HTTPError)


class Kube:
    """Async access to exactly the objects the operator reads and writes."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client

    @classmethod
    def connect(cls, request_timeout: float = 30.0) -> Kube:
        """A client from $KUBECONFIG, ~/.kube/config or the in-cluster service account."""
        timeout = http.Timeout(request_timeout, connect=10.0)
        return cls(AsyncClient(field_manager=names.FIELD_MANAGER, timeout=timeout))

    async def close(self) -> None:
        await self.client.close()

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply one manifest; returns the object as the API server has it now."""
        obj = codecs.from_dict(dict(manifest))
        applied = await self.client.apply(obj, field_manager=names.FIELD_MANAGER, force=True)
        return _as_dict(applied)

    async def delete_pdb(self, namespace: str, name: str) -> bool:
        """Delete the PodDisruptionBudget if there is one; True when one was deleted."""
        return await self._delete(PodDisruptionBudget, namespace, name)

    async def delete_service_monitor(self, namespace: str, name: str) -> bool:
        """Delete the ServiceMonitor if there is one; True when one was deleted."""
        return await self._delete(ServiceMonitor, namespace, name)

    async def remove_finalizer(self, namespace: str, name: str, finalizer: str) -> bool:
        """Take ``finalizer`` off an InferenceService; True when this call removed it.

        A JSON patch that first tests the list entry, so it never removes another finalizer
        when the list changed since it was read (the test fails with 422: nothing to do).
        """
        service = await self.get_inference_service(namespace, name)
        present = list((service or {}).get("metadata", {}).get("finalizers") or [])
        if finalizer not in present:
            return False
        index = present.index(finalizer)
        path = f"/metadata/finalizers/{index}"
        try:
            await self.client.patch(
                InferenceService,
                name,
                [{"op": "test", "path": path, "value": finalizer}, {"op": "remove", "path": path}],
                namespace=namespace,
                patch_type=PatchType.JSON,
            )
        except ApiError as err:
            if status_code(err) in (404, 409, 422):
                return False
            raise
        return True

    async def scale_inference_service(
        self, namespace: str, name: str, replicas: int, field_manager: str, resource_version: str
    ) -> bool:
        """Write ``spec.replicas`` through the InferenceService's scale subresource, only if
        the object is still at ``resource_version`` (the version the decision was made on).

        False when it changed since (409 Conflict: nothing written); the caller reads it again
        and decides again, so a newer count (the gateway raising it from zero, a person's
        ``kubectl scale``) is never overwritten with one decided on an older version."""
        patch = {"metadata": {"resourceVersion": resource_version}, "spec": {"replicas": replicas}}
        try:
            await self.client.patch(
                InferenceService.Scale,
                name,
                patch,
                namespace=namespace,
                patch_type=PatchType.MERGE,
                field_manager=field_manager,
            )
        except ApiError as err:
            if status_code(err) == 409:
                return False
            raise
        return True

    async def list_horizontal_pod_autoscalers(self, namespace: str) -> list[dict[str, Any]]:
        """The autoscaling/v2 HorizontalPodAutoscalers of one namespace."""
        return [
            _as_dict(hpa)
            async for hpa in self.client.list(HorizontalPodAutoscaler, namespace=namespace)
        ]

    async def post_event(
        self, obj: Mapping[str, Any], type: str, reason: str, message: str
    ) -> None:
        """A core v1 Event about ``obj`` (what ``kubectl describe`` and ``get events`` show)."""
        meta = obj["metadata"]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", names.API_VERSION),
                "kind": obj.get("kind", names.KIND),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": names.FIELD_MANAGER},
            "reportingComponent": names.FIELD_MANAGER,
            "reportingInstance": names.FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        manifest: Any = codecs.from_dict(event)
        await self.client.create(manifest)

    async def get_inference_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(InferenceService, namespace, name)

    async def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(Deployment, namespace, name)

    async def pvc_exists(self, namespace: str, name: str) -> bool:
        return await self._get(PersistentVolumeClaim, namespace, name) is not None

    async def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        return [
            _as_dict(pod)
            async for pod in self.client.list(Pod, namespace=namespace, labels=dict(labels))
        ]

    async def service_monitors_served(self) -> bool:
        """Whether the Prometheus operator's ServiceMonitor v1 is served (its CRD exists)."""
        try:
            crd = await self.client.get(CustomResourceDefinition, SERVICE_MONITOR_CRD)
        except ApiError as err:
            if status_code(err) == 404:
                return False
            raise
        return any(version.name == "v1" and version.served for version in crd.spec.versions)

    async def apply_status(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        field_manager: str = names.FIELD_MANAGER,
    ) -> dict[str, Any] | None:
        """Server-side apply one manager's part of ``.status``; None if the object is gone.

        The reconcile and the autoscaler use different field managers, so neither removes
        the other's fields (``conditions`` is a list map keyed by ``type``)."""
        # lightkube types generic status objects as resources, not subresources: hence Any.
        obj: Any = InferenceService.Status(
            apiVersion=names.API_VERSION,
            kind=names.KIND,
            metadata=ObjectMeta(name=name, namespace=namespace),
            status=dict(status),
        )
        try:
            applied = await self.client.apply(
                obj, name, namespace=namespace, field_manager=field_manager, force=True
            )
        except ApiError as err:
            if status_code(err) == 404:
                return None
            raise
        return _as_dict(applied)

    async def _delete(self, resource: Any, namespace: str, name: str) -> bool:
        try:
            await self.client.delete(resource, name, namespace=namespace)
        except ApiError as err:
            if status_code(err) == 404:
                return False
            raise
        return True

    async def _get(self, resource: Any, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = await self.client.get(resource, name, namespace=namespace)
        except ApiError as err:
            if status_code(err) == 404:
                return None
            raise
        return _as_dict(obj)
