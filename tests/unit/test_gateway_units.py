"""The gateway's pure parts: the affinity key, the replica pick, the weighted split, reading
InferenceServices and EndpointSlices, the settings."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from llamaherd_gateway import picker
from llamaherd_gateway.metrics import exported_names
from llamaherd_gateway.registry import Endpoint, Registry, service_info, slice_endpoints
from llamaherd_gateway.settings import GatewaySettings


def test_affinity_key_of_completions_and_chat() -> None:
    body = {"prompt": "You are a pirate. " * 100}
    key = picker.affinity_key("/v1/completions", body, 64)
    assert key == body["prompt"][:64]
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "later turn, not in the key"},
        ]
    }
    assert picker.affinity_key("/v1/chat/completions", chat, 100) == "be brief\x00hello"
    assert picker.affinity_key("/v1/completions", body, 0) == ""
    assert picker.affinity_key("/v1/completions", {"prompt": ["a", "b"]}, 10) == "a"
    assert picker.affinity_key("/v1/generate", {}, 10) == ""
    tokens = {"prompt": [300, 301, 302, 303]}
    assert picker.affinity_key("/v1/completions", tokens, 7) == "300 301"


def test_rendezvous_is_consistent_when_a_replica_goes() -> None:
    replicas = [f"r{i}" for i in range(5)]
    keys = [f"prompt {i}" for i in range(500)]
    before = {k: picker.rendezvous_order(k, replicas)[0] for k in keys}
    after = {k: picker.rendezvous_order(k, replicas[:-1])[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    # only the keys of the replica that went move, and they all did
    assert moved and all(before[k] == "r4" for k in moved)
    assert sum(1 for k in keys if before[k] == "r4") == len(moved)
    # spread: every replica is first for some keys
    assert set(before.values()) == set(replicas)


def test_pick_keeps_the_affinity_replica_within_the_bound() -> None:
    loads = {"a": 0, "b": 0, "c": 0}
    first = picker.rendezvous_order("k", list(loads))[0]
    assert picker.pick_replica("k", loads, 0.5) == (first, picker.AFFINITY)
    # the affinity replica is busy, within (1 + c) x mean: it keeps the request
    loads = dict.fromkeys(loads, 1)
    loads[next(r for r in loads if r != first)] = 0
    assert picker.load_bound(loads, 0.5) == 2
    assert picker.pick_replica("k", loads, 0.5) == (first, picker.AFFINITY)


def test_pick_falls_back_to_least_loaded_over_the_bound() -> None:
    loads = {"a": 2, "b": 1, "c": 0}
    first = picker.rendezvous_order("k", list(loads))[0]
    loads[first] = 9
    others = [r for r in loads if r != first]
    loads[others[0]], loads[others[1]] = 1, 0
    # mean with this request (11/3) x 1.5 = 5.5 -> bound 6 < 10
    assert picker.load_bound(loads, 0.5) == 6
    assert picker.pick_replica("k", loads, 0.5) == (others[1], picker.LEAST_LOADED)


def test_no_key_is_least_loaded_with_random_ties() -> None:
    rng = random.Random(1)
    seen = Counter(picker.pick_replica("", {"a": 1, "b": 1, "c": 0}, 0.5, rng) for _ in range(20))
    assert set(seen) == {("c", picker.LEAST_LOADED)}
    ties = Counter(picker.pick_replica("", {"a": 0, "b": 0}, 0.5, rng)[0] for _ in range(200))
    assert set(ties) == {"a", "b"}


def test_pick_needs_a_replica() -> None:
    with pytest.raises(ValueError, match="at least one replica"):
        picker.pick_replica("k", {}, 0.5)


def test_weighted_split_follows_the_weights() -> None:
    rng = random.Random(7)
    n = 4000
    seen = Counter(picker.pick_weighted(["main", "canary"], [90, 10], rng) for _ in range(n))
    # binomial: mean 400, sd 19; 5 sd
    assert abs(seen["canary"] - 400) < 95
    assert picker.pick_weighted(["x"], [0], rng) == "x"
    assert Counter(picker.pick_weighted(["a", "b"], [1, 0], rng) for _ in range(50)) == {"a": 50}


def isvc(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": spec}


def test_service_info_reads_names_weight_replicas() -> None:
    info = service_info(
        isvc(
            "llama-canary",
            replicas=0,
            gateway={"servedModelNames": ["llama", "llama-canary"], "weight": 10},
            autoscaling={"enabled": True, "minReplicas": 0},
        )
    )
    assert info.served_names == ("llama-canary", "llama")
    assert (info.weight, info.replicas, info.autoscaled) == (10, 0, True)
    plain = service_info(isvc("m"))
    assert (plain.served_names, plain.weight, plain.replicas, plain.autoscaled) == (
        ("m",),
        100,
        1,
        False,
    )


def endpoint_slice(name: str, service: str, endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "metrics", "port": 9}, {"name": "http", "port": 8000}],
        "endpoints": endpoints,
    }


def test_only_ready_non_terminating_endpoints() -> None:
    obj = endpoint_slice(
        "m-abc",
        "m",
        [
            {"addresses": ["198.18.0.1"], "conditions": {"ready": True}},
            {"addresses": ["198.18.0.2"], "conditions": {"ready": False}},
            {"addresses": ["198.18.0.3"], "conditions": {"ready": True, "terminating": True}},
            {"addresses": ["198.18.0.4"], "conditions": {}},  # null ready means ready
        ],
    )
    assert slice_endpoints(obj) == [Endpoint("198.18.0.1", 8000), Endpoint("198.18.0.4", 8000)]
    assert Endpoint("fd00::1", 8000).url == "http://[fd00::1]:8000"


def test_registry_models_endpoints_and_removal() -> None:
    reg = Registry()
    reg.upsert_service(isvc("a"))
    reg.upsert_service(isvc("a-canary", gateway={"servedModelNames": ["a"], "weight": 5}))
    reg.upsert_service(isvc("idle", replicas=0))
    assert {m: [s.name for s in v] for m, v in reg.models().items()} == {
        "a": ["a", "a-canary"],
        "a-canary": ["a-canary"],
        "idle": ["idle"],
    }
    ready = [{"addresses": ["198.18.0.1"], "conditions": {"ready": True}}]
    reg.upsert_slice(endpoint_slice("a-1", "a", ready))
    reg.upsert_slice(endpoint_slice("a-2", "a", ready))  # the same pod in two slices: once
    assert reg.endpoints(("ns", "a")) == [Endpoint("198.18.0.1", 8000)]
    version = reg.version
    reg.upsert_slice(endpoint_slice("a-1", "a", []))
    reg.delete_slice("ns", "a-2")
    assert reg.endpoints(("ns", "a")) == [] and reg.version > version
    reg.replace_services("ns", [isvc("idle", replicas=0)])
    assert list(reg.models()) == ["idle"]


def test_settings_refuse_bad_values_by_name() -> None:
    with pytest.raises(ValidationError, match="hold_timeout_seconds"):
        GatewaySettings(hold_timeout_seconds=0)
    with pytest.raises(ValidationError, match="affinity_load_factor"):
        GatewaySettings(affinity_load_factor=-1)
    assert GatewaySettings(namespaces=" a, b ,").namespace_list == ["a", "b"]


def test_exported_metric_names() -> None:
    names = exported_names()
    assert {
        "llamaherd_gateway_requests_total",
        "llamaherd_gateway_requests_held",
        "llamaherd_gateway_hold_seconds_bucket",
        "llamaherd_gateway_picks_total",
        "llamaherd_gateway_retries_total",
        "llamaherd_gateway_upstream_latency_seconds_bucket",
    } <= names


def test_reported_load_sums_waiting_and_running() -> None:
    text = "\n".join(
        [
            "# HELP llamaherd_requests_waiting Requests waiting.",
            "# TYPE llamaherd_requests_waiting gauge",
            'llamaherd_requests_waiting{priority="0"} 2.0',
            'llamaherd_requests_waiting{priority="5"} 1.0',
            "llamaherd_requests_running 3.0",
            "llamaherd_requests_running_total_bogus 99",
            'llamaherd_requests_total{outcome="ok"} 40.0',
        ]
    )
    assert picker.reported_load(text) == 6
    assert picker.reported_load("up 1") is None
    assert picker.reported_load("llamaherd_requests_running 0.0") == 0


def test_api_keys_file(tmp_path: Path) -> None:
    from llamaherd_gateway import keys

    assert keys.parse_keys("# team keys\nalpha\n\n  beta  \n") == {"alpha", "beta"}
    assert keys.bearer("Bearer alpha") == "alpha"
    assert keys.bearer("bearer  alpha ") == "alpha"
    assert keys.bearer("Basic alpha") is None
    assert keys.bearer("Bearer ") is None and keys.bearer(None) is None
    path = tmp_path / "keys"
    path.write_text("alpha\n")
    key_file = keys.KeyFile(path)
    assert key_file.allows("Bearer alpha")
    assert not key_file.allows("Bearer alph") and not key_file.allows(None)
    assert not key_file.allows("Basic alpha")
    # a rotated Secret: the new key works, the old one not, once the file is read again
    path.write_text("gamma\n")
    os.utime(path, (1, 1))
    key_file.reload()
    assert key_file.allows("Bearer gamma") and not key_file.allows("Bearer alpha")
    # no file: nothing is allowed
    missing = keys.KeyFile(tmp_path / "absent")
    assert not missing.allows("Bearer alpha")
