"""Scenario 1: a url model, downloaded and checked in its pod, serves an OpenAI client in a pod."""

from __future__ import annotations

import pytest

from e2e.conftest import Chart
from e2e.kube import LHIS, Kube, condition
from e2e.support import (
    LoadPod,
    Models,
    get_lhis,
    inference_service,
    load_args,
    ready_pods,
    wait_condition,
)

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)
def test_url_model_serves_openai_chat(
    kube: Kube, operator: Chart, models: Models, namespace: str
) -> None:
    """The init container downloads the model and checks its sha256, the service turns Ready,
    and the official openai client in a pod gets a chat completion through Service DNS."""
    name = "chat"
    kube.apply(inference_service(name, namespace, models, file="tiny.gguf"))
    wait_condition(kube, name, namespace, "Ready", timeout=300)

    obj = get_lhis(kube, name, namespace)
    endpoint = obj["status"]["endpoint"]
    assert endpoint == f"http://{name}.{namespace}.svc.cluster.local:80"
    assert condition(obj, "Degraded").get("status") == "False", obj["status"]

    # The download ran in the pod, verified the hash and exited 0.
    pod = ready_pods(kube, name, namespace)[0]
    init = {c["name"]: c for c in pod["status"].get("initContainerStatuses", [])}
    assert init["model-download"]["state"]["terminated"]["exitCode"] == 0, init
    download_log = kube.logs(pod["metadata"]["name"], namespace, "model-download")
    assert models.sha256["tiny.gguf"] in download_log, download_log

    client = LoadPod(
        kube,
        namespace,
        load_args(endpoint, mode="once", concurrency=1, requests=1, duration=60, max_tokens=16),
    ).start()
    result = client.wait_done(timeout=180)
    once = result.once
    assert once is not None, result.raw
    assert once["ok"], once
    assert once["model"] == name, once
    assert once["content"], once
    assert once["finish_reason"] == "length", once
    assert once["usage"]["completion_tokens"] == 16, once
    assert once["usage"]["prompt_tokens"] > 0, once

    # What a person sees: `kubectl get lhis` shows it Ready.
    table = kube.kubectl("get", "lhis", f"--namespace={namespace}").stdout.splitlines()
    header = table[0].split()
    row = next(line.split() for line in table[1:] if line.split()[0] == name)
    assert header[:3] == ["NAME", "READY", "REPLICAS"], table
    assert row[1] == "True", table
    assert kube.get(LHIS, name, namespace) is not None
