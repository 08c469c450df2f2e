"""Scenario 7: a wrong sha256 and a file that is not a GGUF end in Degraded, saying why."""

from __future__ import annotations

import time

import pytest

from e2e.conftest import Chart
from e2e.kube import Kube, condition
from e2e.support import (
    Models,
    get_lhis,
    inference_service,
    wait_condition,
)

pytestmark = pytest.mark.e2e

WRONG_SHA256 = "0" * 64


@pytest.mark.timeout(600)
def test_wrong_sha256_is_model_download_failed(
    kube: Kube, operator: Chart, models: Models, namespace: str
) -> None:
    """The init container refuses a file whose sha256 differs; the service is Degraded with
    reason ModelDownloadFailed and a message that names the mismatch, and never Ready."""
    name = "badsum"
    kube.apply(inference_service(name, namespace, models, sha256=WRONG_SHA256))
    degraded = wait_condition(
        kube, name, namespace, "Degraded", reason="ModelDownloadFailed", timeout=180
    )
    message = degraded.get("message", "")
    assert "sha256 mismatch" in message, message
    assert WRONG_SHA256 in message, message
    assert models.sha256["tiny.gguf"] in message, message
    obj = get_lhis(kube, name, namespace)
    assert condition(obj, "Ready").get("status") == "False", obj["status"]
    print(f"\n[e2e] Degraded {degraded['reason']}: {message}")


@pytest.mark.timeout(600)
def test_not_a_gguf_is_degraded_with_load_failure(
    kube: Kube, operator: Chart, models: Models, namespace: str
) -> None:
    """A file that downloads fine (right sha256) but is no GGUF: the server exits with a
    termination message, and within two minutes the service is Degraded (ModelLoadFailed) with
    a message that names the load failure."""
    name = "notgguf"
    started = time.monotonic()
    kube.apply(inference_service(name, namespace, models, file="not-a-gguf.gguf"))
    degraded = wait_condition(kube, name, namespace, "Degraded", timeout=120)
    elapsed = time.monotonic() - started
    message = degraded.get("message", "")
    print(f"\n[e2e] after {elapsed:.0f}s: Degraded {degraded.get('reason')}: {message}")
    assert "model load failed" in message.lower(), degraded
    assert degraded.get("reason") == "ModelLoadFailed", degraded
    assert condition(get_lhis(kube, name, namespace), "Ready").get("status") == "False"
