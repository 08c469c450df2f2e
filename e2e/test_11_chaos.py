"""Scenario 11: chaos under load through the gateway. Only the requests that the chaos touches
may fail: a replica force-deleted mid-stream fails the streams it was running and no others,
and the gateway stops picking it at once; a deleted gateway fails at most the requests sent
while no gateway was ready and, when force-deleted, those in flight on it; poison requests are
answered and nothing else notices them.

How a request is attributed to a replica: the load streams its chat completions and records the
response id from the first chunk (``chatcmpl-<request id>``), and every server logs one line per
request however it ends (``request <id> <outcome>``), so the survivors' logs say which requests
they ran; the gateway logs one JSON line per routed request with the replica's address, its
outcome, its end and its duration, which places every pick on a replica in time.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.conftest import Chart
from e2e.kube import Kube, KubeError, Obj, pod_ready, wait_for
from e2e.support import (
    GATEWAY_SERVICE,
    GATEWAY_URL,
    RELEASE_NAMESPACE,
    LoadPod,
    LoadResult,
    Models,
    deploy,
    gateway_pods,
    gateway_requests,
    inference_service,
    lhis_state,
    load_args,
    pod_get,
    ready_addresses,
    ready_pods,
    request_id,
    restart_counts,
    served_requests,
    server_selector,
    start_load,
)
from e2e.test_10_gateway import gateway_get

pytestmark = pytest.mark.e2e

# Streams long enough to outlive a force-deleted pod (it runs on for ~3 s: the kubelet's
# shortest grace) on the small model: about 10 s each on a 2-core node (p50 11-12 s on kind).
LONG_STREAMS = {"slots": 2, "threads": 1, "contextSize": 1024}
LONG_STREAM_TOKENS = 400


# -- helpers -----------------------------------------------------------------------------------


def wait_gateway_ready(kube: Kube) -> list[Obj]:
    return wait_for(
        lambda: [p for p in gateway_pods(kube) if pod_ready(p)] or None,
        timeout=180,
        description="a Ready gateway pod (gateway.enabled in examples/helm/kind-values.yaml)",
        state=lambda: kube.kubectl("get", "pods", "-o", "wide", "-n", RELEASE_NAMESPACE).stdout,
    )


def gateway_endpoints(kube: Kube, namespace: str, name: str) -> int | None:
    """How many ready replicas of ``namespace/name`` the gateway routes to now (its registry,
    from GET /v1/models); None when it does not list the model."""
    for model in json.loads(gateway_get(kube, "/v1/models"))["data"]:
        if model["id"] == name:
            return sum(
                s["readyEndpoints"]
                for s in model["services"]
                if (s["namespace"], s["name"]) == (namespace, name)
            )
    return None


def wait_gateway_endpoints(kube: Kube, namespace: str, name: str, count: int) -> None:
    wait_for(
        lambda: gateway_endpoints(kube, namespace, name) == count,
        timeout=120,
        interval=1.0,
        description=f"the gateway routing {namespace}/{name} to {count} ready replicas",
        state=lambda: gateway_get(kube, "/v1/models"),
    )


def deploy_behind_gateway(kube: Kube, service: Obj, *, pods: int) -> list[Obj]:
    """:func:`deploy` ``service`` with ``pods`` Ready pods, and wait until the gateway routes
    to all of them."""
    ready = deploy(kube, service, pods=pods)
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    wait_gateway_endpoints(kube, namespace, name, pods)
    return ready


def stream_through_gateway(
    kube: Kube,
    namespace: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    duration: float,
    max_tokens: int,
    failure_backoff: float = 0.0,
) -> LoadPod:
    """:func:`start_load` streaming chat completions of ``model`` through the gateway, each
    with a prompt of its own (no prefix affinity)."""
    args = load_args(
        GATEWAY_URL,
        model=model,
        stream=True,
        unique_prompts=True,
        concurrency=concurrency,
        requests=requests,
        duration=duration,
        max_tokens=max_tokens,
        failure_backoff=failure_backoff,
    )
    return start_load(kube, namespace, args)


def in_flight(kube: Kube, pod: Obj) -> tuple[int, int]:
    """(running, waiting) requests on a server pod, from its /metrics."""
    running = waiting = 0.0
    for family in text_string_to_metric_families(pod_get(kube, pod, "/metrics")):
        for sample in family.samples:
            if sample.name == "llamaherd_requests_running":
                running += sample.value
            elif sample.name == "llamaherd_requests_waiting":
                waiting += sample.value
    return int(running), int(waiting)


def health(kube: Kube, pod: Obj) -> str | None:
    """None when the pod's /health says healthy, else what it said."""
    try:
        body = json.loads(pod_get(kube, pod, "/health"))
    except (KubeError, ValueError, OSError) as exc:
        return f"{type(exc).__name__}: {str(exc)[-300:]}"
    return None if body.get("status") == "healthy" else json.dumps(body)[:300]


def gateway_failed(pick: dict[str, Any]) -> bool:
    """A request the gateway saw fail. Not "cancelled": the client went away first, which the
    openai client does as soon as it reads a stream's ``[DONE]``, sometimes before the gateway
    has relayed the end of the body (the client has its whole answer)."""
    return pick["outcome"] not in ("ok", "cancelled")


def ok_started_after(load: LoadPod, moment: float) -> int:
    return sum(1 for r in load.output().ok if r["started_at"] > moment)


def short(records: list[dict[str, Any]], limit: int = 5) -> list[dict[str, Any]]:
    keys = ("i", "status", "error", "id", "started_at", "latency_s", "address", "outcome", "start")
    return [{k: r.get(k) for k in keys if k in r} for r in records[:limit]]


def assert_all_complete(result: LoadResult) -> None:
    incomplete = [r for r in result.ok if not r["complete"]]
    assert not incomplete, f"answers cut short: {incomplete[:5]}"


# -- (a) a replica killed mid-stream -----------------------------------------------------------


@pytest.mark.timeout(900)
def test_replica_killed_mid_stream_fails_only_its_own_requests(
    kube: Kube, operator: Chart, models: Models, namespace: str
) -> None:
    """Two replicas stream long answers through the gateway; one with streams running is
    force-deleted (``--grace-period=0 --force``). Only requests on that replica fail, no more
    than it had in flight, and the gateway picks it for no request after it saw it go."""
    wait_gateway_ready(kube)
    name = "chaos"
    service = inference_service(
        name, namespace, models, file="small.gguf", replicas=2, server=LONG_STREAMS
    )
    deploy_behind_gateway(kube, service, pods=2)
    load = stream_through_gateway(
        kube,
        namespace,
        name,
        concurrency=4,
        requests=300,
        duration=300,
        max_tokens=LONG_STREAM_TOKENS,
    )
    load.wait_ok(2, timeout=240)

    def busy_replica() -> tuple[Obj, int, int] | None:
        loads = [(p, *in_flight(kube, p)) for p in ready_pods(kube, name, namespace)]
        busiest = max(loads, key=lambda item: item[1], default=None)
        return busiest if busiest is not None and busiest[1] >= 1 else None

    victim, running, waiting = wait_for(
        busy_replica,
        timeout=120,
        interval=0.5,
        description="a replica with streams running",
        state=lambda: lhis_state(kube, name, namespace),
    )
    victim_name, victim_ip = victim["metadata"]["name"], victim["status"]["podIP"]
    killed_at = time.time()
    kube.kubectl(
        "delete",
        "pod",
        victim_name,
        f"--namespace={namespace}",
        "--grace-period=0",
        "--force",
        "--wait=false",
    )
    # The gateway's own view: its registry routes to one replica (the survivor) only.
    wait_for(
        lambda: gateway_endpoints(kube, namespace, name) == 1,
        timeout=60,
        interval=0.2,
        description=f"the gateway dropping the deleted replica {victim_name} ({victim_ip})",
        state=lambda: gateway_get(kube, "/v1/models"),
    )
    dropped_at = time.time()
    slice_has_victim = victim_ip in ready_addresses(kube, namespace, name)

    # The Deployment replaces it; the load goes on over the survivor and the replacement.
    def others_ready() -> list[Obj] | None:
        pods = [
            p for p in ready_pods(kube, name, namespace) if p["metadata"]["name"] != victim_name
        ]
        return pods if len(pods) >= 2 else None

    others = wait_for(
        others_ready,
        timeout=300,
        description="a Ready replacement replica",
        state=lambda: lhis_state(kube, name, namespace),
    )
    # Picks are told apart by address: the replacement must not have the victim's.
    assert victim_ip not in {p["status"]["podIP"] for p in others}, "the victim's IP came back"
    wait_gateway_endpoints(kube, namespace, name, 2)
    wait_for(
        lambda: ok_started_after(load, dropped_at) >= 4,
        timeout=300,
        interval=1.0,
        description="4 requests started after the kill served",
        state=lambda: load.output().raw[-2000:],
    )
    load.stop()
    result = load.wait_done(timeout=300)

    # Which replica ran what: the survivors' (and the replacement's) request logs, the
    # gateway's picks.
    replicas = kube.pods(namespace, server_selector(name))
    ran_on: dict[str, str] = {}
    for pod in replicas:
        for rid in served_requests(kube, pod):
            ran_on[rid] = pod["metadata"]["name"]
    picks = [r for r in gateway_requests(kube) if r.get("service") == f"{namespace}/{name}"]
    assert picks, "the gateway logged no request of this service (gateway.logFormat json?)"
    on_victim = [r for r in picks if r["address"] == victim_ip]
    failed_elsewhere = [r for r in picks if r["address"] != victim_ip and gateway_failed(r)]
    failed_on_victim = [r for r in on_victim if gateway_failed(r)]
    picked_after_drop = [r for r in on_victim if r["start"] > dropped_at]
    victim_in_flight = [r for r in on_victim if r["start"] <= dropped_at and r["end"] >= killed_at]

    failed = result.failed
    failed_with_survivor_id = [r for r in failed if request_id(r.get("id")) in ran_on]
    failed_after_drop = [r for r in failed if r["started_at"] > dropped_at]
    per_replica: dict[str, list[int]] = {}
    for r in result.requests:
        pod_name = ran_on.get(request_id(r.get("id")) or "", f"{victim_name} (killed)")
        per_replica.setdefault(pod_name, [0, 0])[0 if r["ok"] else 1] += 1
    print(
        f"\n[e2e] replica {victim_name} force-deleted with {running} running, {waiting} waiting;"
        f" the gateway dropped it {dropped_at - killed_at:.2f}s later (EndpointSlice still "
        f"listing it then: {slice_has_victim}); gateway picks on it in flight at the kill: "
        f"{len(victim_in_flight)}, failed: {len(failed_on_victim)}, started after the drop: "
        f"{len(picked_after_drop)}; client: {result.summary}; ok/failed per replica: "
        f"{per_replica}"
    )

    assert victim_in_flight, "the kill hit no request in flight: the scenario tested nothing"
    assert not failed_elsewhere, f"requests failed on other replicas: {short(failed_elsewhere)}"
    assert not failed_with_survivor_id, (
        f"failed requests that a surviving replica ran: {short(failed_with_survivor_id)}"
    )
    assert not picked_after_drop, (
        f"the gateway sent requests to the deleted replica after it dropped it: "
        f"{short(picked_after_drop)}"
    )
    assert not failed_after_drop, (
        f"requests started after the gateway dropped the replica failed: {short(failed_after_drop)}"
    )
    assert len(failed) <= len(failed_on_victim), (
        f"{len(failed)} client failures but only {len(failed_on_victim)} failed picks on the "
        f"victim: {short(failed)} / {short(failed_on_victim)}"
    )
    assert len(failed) <= len(victim_in_flight), (
        f"{len(failed)} failures, more than the {len(victim_in_flight)} requests in flight on "
        f"the victim: {short(failed)}"
    )
    assert_all_complete(result)


# -- (c) poison requests -----------------------------------------------------------------------

# Requests that crashed the engine once (a seed of -1; a temperature so small that 1/t
# overflows): valid by the API, so each must be answered, and nothing else may notice.
POISON_FIELDS: list[dict[str, Any]] = [
    {"max_tokens": 8, "seed": -1, "temperature": 0.8},
    {"max_tokens": 8, "temperature": 1e-40},
]
# Several prompts: prefix affinity sends each prompt to one replica; several reach both.
POISON_PROMPTS = ["hi", "hi 1", "hi 2", "hi 3"]


def poison_requests() -> list[dict[str, Any]]:
    posts: list[dict[str, Any]] = []
    for fields in POISON_FIELDS:
        label = "seed=-1" if fields.get("seed") == -1 else f"temperature={fields['temperature']}"
        for prompt in POISON_PROMPTS:
            chat = {"messages": [{"role": "user", "content": prompt}], **fields}
            text = {"prompt": prompt, **fields}
            posts += [
                {"path": "/v1/generate", "body": text, "label": label},
                {"path": "/v1/completions", "body": text, "label": label},
                {"path": "/v1/completions", "body": {**text, "stream": True}, "label": label},
                {"path": "/v1/chat/completions", "body": chat, "label": label},
                {"path": "/v1/chat/completions", "body": {**chat, "stream": True}, "label": label},
            ]
    return posts


@pytest.mark.timeout(900)
def test_poison_requests_fail_alone_and_crash_nothing(
    kube: Kube, operator: Chart, models: Models, namespace: str
) -> None:
    """Poison requests (seed -1, temperature 1e-40) through the gateway on every API path,
    streamed and not, beside normal streaming load: the normal load all completes, every
    replica's /health stays healthy throughout, no pod restarts or is replaced, and each poison
    request gets its answer."""
    wait_gateway_ready(kube)
    name = "poison"
    alias = "poison-alias"  # the poison requests' model name, to find them in the gateway's log
    service = inference_service(name, namespace, models, file="tiny.gguf", replicas=2)
    service["spec"]["gateway"] = {"servedModelNames": [alias]}
    pods = deploy_behind_gateway(kube, service, pods=2)
    restarts = restart_counts(pods)
    normal = stream_through_gateway(
        kube, namespace, name, concurrency=3, requests=300, duration=240, max_tokens=48
    )
    normal.wait_ok(3)

    posts = poison_requests()
    poison = LoadPod(
        kube,
        namespace,
        [
            "--base-url",
            GATEWAY_URL,
            "--mode",
            "post",
            "--model",
            alias,
            "--concurrency",
            "4",
            "--requests",
            str(len(posts)),
            "--duration",
            "120",
            "--timeout",
            "60",
            *(arg for post in posts for arg in ("--post", json.dumps(post))),
        ],
    ).start()
    # /health of every replica, over and over, until the poison load is over.
    unhealthy: list[tuple[float, str, str]] = []
    checks = 0

    def poison_done() -> bool:
        nonlocal checks
        for pod in pods:
            problem = health(kube, pod)
            checks += 1
            if problem is not None:
                unhealthy.append((time.time(), pod["metadata"]["name"], problem))
        return poison.phase() in ("Succeeded", "Failed")

    wait_for(
        poison_done,
        timeout=300,
        interval=0.5,
        description=f"poison load pod {poison.name} to finish",
        state=lambda: (poison.pod() or {}).get("status"),
    )
    poisoned = poison.wait_done(timeout=30)
    served = len(normal.output().ok)
    normal.wait_ok(served + 3)  # the normal load goes on after the poison
    normal.stop()
    result = normal.wait_done(timeout=300)

    for pod in pods:
        problem = health(kube, pod)
        if problem is not None:
            unhealthy.append((time.time(), pod["metadata"]["name"], problem))
    now = ready_pods(kube, name, namespace)
    picks = [r for r in gateway_requests(kube) if r.get("model") == alias]
    poison_replicas = sorted({r["address"] for r in picks})
    print(
        f"\n[e2e] poison: {len(poisoned.requests)} sent, statuses "
        f"{poisoned.summary.get('statuses')}, on replicas {poison_replicas}; normal load "
        f"beside it: {result.summary}; /health checks: {checks}, unhealthy: {len(unhealthy)}"
    )

    assert not result.failed, f"normal requests failed beside the poison: {short(result.failed)}"
    assert_all_complete(result)
    assert not unhealthy, f"a replica's /health was not healthy: {unhealthy[:5]}"
    assert restart_counts(now) == restarts, (
        f"pods restarted or were replaced: before {restarts}, after {restart_counts(now)}"
    )
    bad = poisoned.failed
    assert len(poisoned.requests) == len(posts), poisoned.raw[-3000:]
    assert not bad, (
        f"{len(bad)} of {len(posts)} poison requests got no answer: "
        f"{[(r.get('path'), r.get('label'), r.get('status'), r.get('error')) for r in bad[:6]]}"
    )


# -- (b) the gateway restarted -----------------------------------------------------------------


def gateway_state(kube: Kube) -> str:
    return kube.kubectl("get", "pods", "-o", "wide", "-n", RELEASE_NAMESPACE).stdout


def restart_gateway(kube: Kube, load: LoadPod, model: str, *, force: bool) -> dict[str, Any]:
    """Delete the gateway's pods (gracefully, or ``--grace-period=0 --force``) while ``load``
    runs; return when a new one serves and the old ones are gone, with the moments: the delete,
    the new pod Ready in the Service's EndpointSlice, its first request (kube-proxy may send to a
    new endpoint a moment after the slice lists it) and ``serving_from``, the later of those
    two."""
    old = wait_gateway_ready(kube)
    old_uids = {p["metadata"]["uid"] for p in old}
    killed_at = time.time()
    for pod in old:
        if force:
            kube.kubectl(
                "delete",
                "pod",
                pod["metadata"]["name"],
                f"--namespace={RELEASE_NAMESPACE}",
                "--grace-period=0",
                "--force",
                "--wait=false",
            )
        else:
            kube.delete("pod", pod["metadata"]["name"], RELEASE_NAMESPACE, wait=False)

    def new_gateway_in_service() -> list[Obj] | None:
        fresh = [
            p for p in gateway_pods(kube) if p["metadata"]["uid"] not in old_uids and pod_ready(p)
        ]
        addresses = ready_addresses(kube, RELEASE_NAMESPACE, GATEWAY_SERVICE)
        return [p for p in fresh if p["status"]["podIP"] in addresses] or None

    new = wait_for(
        new_gateway_in_service,
        timeout=240,
        interval=0.5,
        description="a new gateway pod Ready and in its Service's endpoints",
        state=lambda: gateway_state(kube),
    )
    ready_at = time.time()
    wait_for(
        lambda: ok_started_after(load, ready_at) >= 6,
        timeout=240,
        interval=1.0,
        description="6 requests started after the new gateway was ready served",
        state=lambda: load.output().raw[-2000:],
    )
    through_new = [r for r in gateway_requests(kube, new) if r.get("model") == model]
    assert through_new, "the new gateway logged no request"
    routed_at = min(r["start"] for r in through_new)
    # One gateway for what comes next: the old pod finishes its drain (or its kill) and goes.
    wait_for(
        lambda: not any(p["metadata"]["uid"] in old_uids for p in gateway_pods(kube)),
        timeout=180,
        description="the old gateway pod gone",
        state=lambda: gateway_state(kube),
    )
    return {
        "force": force,
        "killed_at": killed_at,
        "ready_at": ready_at,
        "routed_at": routed_at,
        "serving_from": max(ready_at, routed_at),
    }


@pytest.mark.timeout(900)
def test_gateway_restarted_under_load(
    kube: Kube, operator: Chart, models: Models, namespace: str
) -> None:
    """The gateway pod is deleted twice while streams flow through it, first gracefully, then
    with ``--grace-period=0 --force``. Requests sent while no gateway was ready may fail, and
    after the forced delete the requests that were in flight on the killed pod; after the
    graceful one those finish (the preStop sleep, then the drain). Every request started once
    the new gateway is ready and the Service sends to it succeeds."""
    wait_gateway_ready(kube)
    name = "steady"
    server = {"slots": 4, "threads": 1, "contextSize": 512}
    service = inference_service(
        name, namespace, models, file="small.gguf", replicas=1, server=server
    )
    deploy_behind_gateway(kube, service, pods=1)
    load = stream_through_gateway(
        kube,
        namespace,
        name,
        concurrency=4,
        requests=1000,
        duration=400,
        max_tokens=128,
        failure_backoff=0.5,
    )
    load.wait_ok(4)
    rounds = [restart_gateway(kube, load, name, force=force) for force in (False, True)]
    load.stop()
    result = load.wait_done(timeout=300)

    def in_flight(r: dict[str, Any], k: dict[str, Any]) -> bool:
        return bool(r["started_at"] < k["killed_at"] < r["time"])

    def in_gap(r: dict[str, Any], k: dict[str, Any]) -> bool:
        return bool(k["killed_at"] <= r["started_at"] <= k["serving_from"])

    unexplained = []
    for r in result.failed:
        if not any(in_gap(r, k) or (k["force"] and in_flight(r, k)) for k in rounds):
            unexplained.append(r)
    lines = []
    for k in rounds:
        flying = [r for r in result.requests if in_flight(r, k)]
        lines.append(
            f"{'forced' if k['force'] else 'graceful'} delete: the new gateway Ready and in the "
            f"Service after {k['ready_at'] - k['killed_at']:.1f}s, its first request after "
            f"{k['routed_at'] - k['killed_at']:.1f}s; in flight then: {len(flying)} "
            f"({sum(1 for r in flying if not r['ok'])} failed); failed while no gateway was "
            f"ready: {sum(1 for r in result.failed if in_gap(r, k) and not in_flight(r, k))}"
        )
    print(f"\n[e2e] gateway restarts under load: {'; '.join(lines)}; client: {result.summary}")
    assert not unexplained, (
        "requests failed that were neither sent while no gateway was ready nor in flight on a "
        f"force-deleted gateway (after a graceful delete they drain): {short(unexplained)}"
    )
    assert_all_complete(result)
