"""Which API errors the operator retries, which mean the spec itself is wrong, and how a scale
write is made conditional on what it was decided on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llamaherd_operator.kube import (
    ApiError,
    InferenceService,
    Kube,
    http,
    is_invalid,
    is_transient,
)


def api_error(code: int, message: str = "") -> ApiError:
    request = http.Request("PATCH", "https://127.0.0.1/apis/apps/v1/deployments/x")
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "message": message}  # fmt: skip
    return ApiError(request=request, response=http.Response(code, json=body, request=request))


@pytest.mark.parametrize(
    ("error", "transient", "invalid"),
    [
        (api_error(409, "the object has been modified"), True, False),
        (api_error(410, "too old resource version"), False, False),
        (api_error(429, "storage is (re)initializing"), True, False),
        (api_error(500, "etcdserver: request timed out"), True, False),
        (api_error(503, "unavailable"), True, False),
        (api_error(422, 'Deployment.apps "x" is invalid'), False, True),
        (api_error(400, "bad request"), False, True),
        (
            api_error(500, "failed to convert new object: unable to convert unstructured"),
            False,
            True,
        ),
        (api_error(403, "forbidden"), False, False),
        (api_error(404, "not found"), False, False),
        (http.ConnectError("connection refused"), True, False),
        (http.ReadTimeout("timed out"), True, False),
    ],
)
def test_error_classes(error: BaseException, transient: bool, invalid: bool) -> None:
    assert is_transient(error) is transient
    assert is_invalid(error) is invalid


class FakeClient:
    """Records the patches lightkube would send; answers each with ``answer`` (None: OK)."""

    def __init__(self, answer: BaseException | None = None) -> None:
        self.answer = answer
        self.patches: list[tuple[Any, str, Any, dict[str, Any]]] = []

    async def patch(self, resource: Any, name: str, obj: Any, **kwargs: Any) -> None:
        self.patches.append((resource, name, obj, kwargs))
        if self.answer is not None:
            raise self.answer


def test_a_scale_write_carries_the_resource_version_it_was_decided_on() -> None:
    client = FakeClient()
    written = asyncio.run(
        Kube(client).scale_inference_service(  # type: ignore[arg-type]
            "ns", "chat", 5, "llamaherd-autoscaler", resource_version="42"
        )
    )
    assert written is True
    ((resource, name, patch, kwargs),) = client.patches
    assert (resource, name) == (InferenceService.Scale, "chat")
    assert patch == {"metadata": {"resourceVersion": "42"}, "spec": {"replicas": 5}}
    assert kwargs["namespace"] == "ns"
    assert kwargs["field_manager"] == "llamaherd-autoscaler"


def test_a_scale_write_that_conflicts_writes_nothing_and_says_so() -> None:
    conflict = api_error(409, "the object has been modified; please apply your changes")
    written = asyncio.run(
        Kube(FakeClient(conflict)).scale_inference_service(  # type: ignore[arg-type]
            "ns", "chat", 5, "llamaherd-autoscaler", resource_version="42"
        )
    )
    assert written is False
    with pytest.raises(ApiError):
        asyncio.run(
            Kube(FakeClient(api_error(500, "etcd"))).scale_inference_service(  # type: ignore[arg-type]
                "ns", "chat", 5, "llamaherd-autoscaler", resource_version="42"
            )
        )
