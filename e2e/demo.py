"""`make demo`: the product's main job on the local kind cluster, for a person to watch.

Installs the chart (as the README says), serves a generated model over HTTP inside the cluster,
applies an autoscaled InferenceService that downloads it, sends a bounded burst of OpenAI chat
requests from a pod in the cluster, and prints the InferenceService's columns and the autoscaler's
decisions as they change, until the service is back at one replica. It ends by itself (every wait
is bounded) and prints how to reach the service and how to remove everything.

    LLAMAHERD_E2E_KUBECONFIG=<kubeconfig> python -m e2e.demo     # make demo does this
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from e2e.kube import Kube
from e2e.support import (
    LoadPod,
    ReplicaWatch,
    get_lhis,
    helm_install,
    inference_service,
    load_args,
    scaling_story,
    start_model_server,
    wait_condition,
)
from tests.harness import binary_path

NAMESPACE = "llamaherd-demo"
NAME = "demo"
AUTOSCALING = {
    "minReplicas": 1,
    "maxReplicas": 3,
    "targetQueueDepthPerReplica": 1,
    "scaleUpStabilizationSeconds": 0,
    "scaleDownStabilizationSeconds": 30,
    "metricsWindowSeconds": 10,
}
# The burst: bounded in count and time, sent from a pod inside the cluster.
CONCURRENCY, REQUESTS, LOAD_SECONDS, MAX_TOKENS = 8, 240, 120, 64
WATCH_SECONDS = 600


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def columns(kube: Kube) -> str:
    """`kubectl get lhis demo` without its header: Ready, Replicas, Desired, Queue, P95, Age."""
    table = kube.kubectl("get", "lhis", NAME, f"--namespace={NAMESPACE}").stdout.splitlines()
    return table[-1] if table else "(none)"


def main() -> int:
    kubeconfig = os.environ.get("LLAMAHERD_E2E_KUBECONFIG")
    if not kubeconfig:
        print("set LLAMAHERD_E2E_KUBECONFIG (make demo does: it runs make kind-up first)")
        return 2
    kube = Kube(Path(kubeconfig), binary_path("kubectl"), binary_path("helm"))

    say(
        "installing the chart: helm upgrade --install llamaherd charts/llamaherd "
        "-n llamaherd-system --create-namespace -f examples/helm/kind-values.yaml"
    )
    helm_install(kube)
    say("starting the in-cluster model server (generated GGUF models, random weights)")
    models = start_model_server(kube)
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    service = inference_service(
        NAME, NAMESPACE, models, file="small.gguf", replicas=None, autoscaling=AUTOSCALING
    )
    say(
        f"applying InferenceService {NAMESPACE}/{NAME}: model {service['spec']['model']['url']}, "
        f"autoscaling {AUTOSCALING['minReplicas']}..{AUTOSCALING['maxReplicas']} replicas"
    )
    kube.apply(service)
    wait_condition(kube, NAME, NAMESPACE, "Ready", timeout=300)
    wait_condition(kube, NAME, NAMESPACE, "ScalingActive", timeout=180)
    header = kube.kubectl("get", "lhis", f"--namespace={NAMESPACE}").stdout.splitlines()[0]
    say(f"ready. kubectl get lhis -n {NAMESPACE}:\n         {header}\n         {columns(kube)}")

    endpoint = get_lhis(kube, NAME, NAMESPACE)["status"]["endpoint"]
    say(
        f"load: {REQUESTS} chat requests at most, {CONCURRENCY} at a time, at most "
        f"{LOAD_SECONDS} s, from a pod in the cluster to {endpoint}"
    )
    load = LoadPod(
        kube,
        NAMESPACE,
        load_args(
            endpoint,
            concurrency=CONCURRENCY,
            requests=REQUESTS,
            duration=LOAD_SECONDS,
            max_tokens=MAX_TOKENS,
        ),
    ).start()
    started = load.wait_running()
    watch = ReplicaWatch(kube, NAME, NAMESPACE)
    seen_decisions = len(get_lhis(kube, NAME, NAMESPACE)["status"].get("scalingDecisions") or [])
    last_row, scaled_up, load_done = "", False, False
    deadline = time.monotonic() + WATCH_SECONDS
    while time.monotonic() < deadline:
        spec, _, ready = watch.sample()
        scaled_up = scaled_up or (spec or 0) >= 2
        row = columns(kube)
        if row != last_row:
            say(f"t+{time.monotonic() - started:5.0f}s  {row}")
            last_row = row
        decisions = get_lhis(kube, NAME, NAMESPACE)["status"].get("scalingDecisions") or []
        for decision in decisions[seen_decisions:]:
            say(
                f"          decision {decision['from']} -> {decision['to']} "
                f"({decision['reason']}): {decision.get('message', '')}"
            )
        seen_decisions = len(decisions)
        load_done = load_done or load.phase() in ("Succeeded", "Failed")
        if load_done and scaled_up and spec == AUTOSCALING["minReplicas"] and ready == spec:
            break
        time.sleep(3)  # a person's refresh rate, not a wait for a condition
    result = load.wait_done(timeout=120)
    summary = result.summary
    say(
        f"load done: {summary.get('ok')} ok, {summary.get('failed')} failed, latency p50 "
        f"{summary.get('latency_p50_s')} s, p95 {summary.get('latency_p95_s')} s"
    )
    say(f"replicas over time:\n{watch.story()}")
    say(scaling_story(kube, NAME, NAMESPACE))
    if not scaled_up:
        say("the service did not scale up within the demo's time: see the decisions above")
    print(f"""
[demo] done. The service is still running; to talk to it:
  export KUBECONFIG={kubeconfig} PATH={binary_path("kubectl").parent}:$PATH
  kubectl -n {NAMESPACE} port-forward svc/{NAME} 8000:80 &
  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{NAME}", "max_tokens": 16,
        "messages": [{{"role": "user", "content": "Hello"}}]}}'
  kubectl get lhis -A
To remove everything: make kind-down""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
