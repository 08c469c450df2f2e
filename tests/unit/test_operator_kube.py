"""Which API errors the operator retries, and which mean the spec itself is wrong."""

from __future__ import annotations

import pytest

from llamaherd_operator.kube import ApiError, http, is_invalid, is_transient


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
