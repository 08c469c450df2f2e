"""Level-based reconcile without a cluster: the work queue, drift detection, no finalizers."""

from __future__ import annotations

import kopf
import pytest

from llamaherd_operator import autoscaler, builders, handlers
from llamaherd_operator.settings import OperatorSettings


def test_no_handler_makes_kopf_add_a_finalizer() -> None:
    registry = kopf.OperatorRegistry()
    settings = OperatorSettings()
    handlers.register(registry, settings)
    autoscaler.register(registry, settings)
    # kopf adds its finalizer for daemons, timers and non-optional on.delete handlers only.
    assert list(registry._spawning.get_all_handlers()) == []
    changing = list(registry._changing.get_all_handlers())
    assert changing and not any(h.requires_finalizer for h in changing)
    assert [h.id for h in registry._indexing.get_all_handlers()] == [handlers.INDEX_ID]


def test_work_queue_coalesces_and_backs_off() -> None:
    queue = handlers.WorkQueue(base_delay=1.0, max_delay=8.0)
    key = ("ns", "a")
    queue.add(key, 5.0, now=0.0)
    queue.add(key, 0.0, now=0.0)  # an earlier due time wins
    queue.add(key, 9.0, now=0.0)  # a later one does not move it
    assert queue.pop_due(now=0.0) == [key]
    assert queue.pop_due(now=100.0) == []
    delays = [queue.failed(key, now=0.0) for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert queue.next_due() == 1.0  # the earliest of the retries
    queue.succeeded(key)
    assert queue.retry_delay(key) == 1.0
    queue.failed(key, delay=30.0, now=0.0)  # a TemporaryError's own delay
    queue.forget(key)
    assert queue.next_due() is None and queue.retry_delay(key) == 1.0


def obj(kind: str, generation: int = 1, rv: str = "10") -> dict:
    return {"kind": kind, "metadata": {"generation": generation, "resourceVersion": rv}}


@pytest.mark.parametrize(
    ("kind", "event", "live", "recorded", "drift"),
    [
        # The Deployment's status moves all the time; its generation only with its spec.
        ("Deployment", "MODIFIED", obj("Deployment", 3, "99"), "generation:3", False),
        ("Deployment", "MODIFIED", obj("Deployment", 4), "generation:3", True),
        ("Deployment", "MODIFIED", obj("Deployment", 2), "generation:3", False),  # stale event
        ("Deployment", "MODIFIED", obj("Deployment", 2), None, True),  # never applied here
        ("Deployment", "DELETED", obj("Deployment", 3), "generation:3", True),
        ("Service", "MODIFIED", obj("Service", rv="10"), "resourceVersion:10", False),
        ("Service", "MODIFIED", obj("Service", rv="11"), "resourceVersion:10", True),
        ("Service", "DELETED", obj("Service"), None, True),
        ("PodDisruptionBudget", "DELETED", obj("PodDisruptionBudget"), None, False),  # by us
        ("PodDisruptionBudget", "DELETED", obj("PodDisruptionBudget"), "generation:1", True),
        ("PodDisruptionBudget", "MODIFIED", obj("PodDisruptionBudget", 1, "50"),
         "generation:1", False),
    ],
)  # fmt: skip
def test_drift(kind: str, event: str, live: dict, recorded: str | None, drift: bool) -> None:
    assert handlers.is_drift(kind, event, live, recorded) is drift


def test_snapshots_are_copies() -> None:
    body = {"metadata": {"name": "a"}, "spec": {"autoscaling": {"enabled": True}}, "x": 1}
    snap = handlers.snapshot(body)
    body["spec"]["autoscaling"]["enabled"] = False
    assert snap == {"metadata": {"name": "a"}, "spec": {"autoscaling": {"enabled": True}}}


def test_service_monitor_labels_never_replace_the_operators() -> None:
    body = {
        "apiVersion": "llamaherd.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": "ns", "uid": "u"},
        "spec": {"model": {"url": "https://h/m.gguf"}},
    }
    options = builders.BuildOptions(
        service_monitor_labels=(("release", "kps"), ("app.kubernetes.io/name", "mine"))
    )
    labels = builders.build_service_monitor(body, options)["metadata"]["labels"]
    assert labels["release"] == "kps"
    assert labels["app.kubernetes.io/name"] == "llamaherd-server"
    assert "release" not in builders.build_service_monitor(body)["metadata"]["labels"]
