"""The autoscaler's guards, without a cluster: a fake of the one Kubernetes module."""

from __future__ import annotations

import asyncio
import copy
import inspect
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from llamaherd_operator import autoscaler
from llamaherd_operator.kube import Kube
from llamaherd_operator.metrics import OperatorMetrics
from llamaherd_operator.policy import Metrics, conflicting_autoscalers
from llamaherd_operator.prom import prometheus_url_allowed
from llamaherd_operator.settings import OperatorSettings, parse_labels

DEFAULT = "http://prometheus-operated.monitoring.svc:9090"


@pytest.mark.parametrize(
    ("url", "allowed", "ok"),
    [
        (DEFAULT, [], True),
        (DEFAULT + "/", [], True),
        ("http://169.254.169.254/latest/meta-data", [], False),
        ("http://prom.team-a:9090", [], False),
        ("http://prom.team-a:9090", ["http://prom.team-a:9090"], True),
        ("http://prom.team-a:9090/", ["http://prom.team-a:9090"], True),
        ("http://prom.team-a:9090/sub", ["http://prom.team-a:9090"], True),
        ("http://prom.team-a:9090.evil.example", ["http://prom.team-a:9090"], False),
        ("http://prom.team-a:9090@evil.example", ["http://prom.team-a:9090"], False),
        ("http://prom.team-a:90901", ["http://prom.team-a:9090"], False),
        ("https://thanos.example/tenant-a/", ["https://thanos.example/tenant-a/"], True),
        ("https://thanos.example/tenant-a/x", ["https://thanos.example/tenant-a/"], True),
        ("https://thanos.example/tenant-ab", ["https://thanos.example/tenant-a/"], False),
        ("https://thanos.example/tenant-a", ["https://thanos.example/tenant-a/"], False),
        (DEFAULT + ".evil.example", [], False),
    ],
)
def test_prometheus_url_allow_list(url: str, allowed: list[str], ok: bool) -> None:
    assert prometheus_url_allowed(url, DEFAULT, allowed) is ok


def test_allowed_urls_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "LLAMAHERD_OPERATOR_ALLOWED_PROMETHEUS_URLS", " http://a:9090, https://b/x/ ,"
    )
    assert OperatorSettings().allowed_prometheus_url_list == ["http://a:9090", "https://b/x/"]
    monkeypatch.delenv("LLAMAHERD_OPERATOR_ALLOWED_PROMETHEUS_URLS")
    assert OperatorSettings().allowed_prometheus_url_list == []


def hpa(name: str, kind: str, target: str, api_version: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"scaleTargetRef": {"apiVersion": api_version, "kind": kind, "name": target}},
    }


def test_conflicting_autoscalers() -> None:
    hpas = [
        hpa("on-isvc", "InferenceService", "chat", "llamaherd.io/v1alpha1"),
        hpa("on-deploy", "Deployment", "chat", "apps/v1"),
        hpa("other-name", "InferenceService", "other", "llamaherd.io/v1alpha1"),
        hpa("other-kind", "StatefulSet", "chat", "apps/v1"),
        hpa("other-group", "InferenceService", "chat", "serving.kserve.io/v1beta1"),
    ]
    assert conflicting_autoscalers(hpas, "chat") == ["on-deploy", "on-isvc"]
    assert conflicting_autoscalers([], "chat") == []


class FakeKube:
    """An in-memory stand-in for :class:`llamaherd_operator.kube.Kube`: the methods the
    autoscaler calls, with the same signatures, recording what would reach the API. Like the
    API server it keeps a ``resourceVersion`` per object, bumped on every write, and refuses a
    scale write that carries an older one (409: ``False``). ``before_write`` runs between the
    autoscaler's read and its write, as another writer would."""

    def __init__(
        self, hpas: list[dict[str, Any]] | None = None, services: list[dict[str, Any]] = ()
    ) -> None:
        self.hpas = list(hpas or [])
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.versions = itertools.count(100)
        self.reads = 0
        self.scaled: list[tuple[str, str, int]] = []
        self.scale_managers: list[str] = []
        self.conflicts: list[tuple[int, str]] = []  # (replicas, resourceVersion) refused
        self.before_write: Callable[[FakeKube], None] | None = None
        self.events: list[tuple[str, str, str]] = []
        self.statuses: list[tuple[str, dict[str, Any], str]] = []
        for body in services:
            store(self, body)

    async def get_inference_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        obj = self.objects.get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    async def scale_inference_service(
        self,
        namespace: str,
        name: str,
        replicas: int,
        field_manager: str,
        resource_version: str | None = None,
    ) -> bool:
        if self.before_write is not None:
            self.before_write(self)
        obj = self.objects[(namespace, name)]
        if resource_version is not None and resource_version != obj["metadata"]["resourceVersion"]:
            self.conflicts.append((replicas, resource_version))
            return False
        obj["spec"]["replicas"] = replicas
        bump(self, obj)
        self.scaled.append((namespace, name, replicas))
        self.scale_managers.append(field_manager)
        return True

    async def post_event(self, obj: Any, type: str, reason: str, message: str) -> None:
        self.events.append((type, reason, message))

    async def apply_status(
        self, namespace: str, name: str, status: Any, field_manager: str = ""
    ) -> dict[str, Any] | None:
        self.statuses.append((name, dict(status), field_manager))
        obj = self.objects.get((namespace, name))
        if obj is not None:
            obj["status"] = {**obj.get("status", {}), **copy.deepcopy(dict(status))}
            bump(self, obj)
        return {}

    async def list_horizontal_pod_autoscalers(self, namespace: str) -> list[dict[str, Any]]:
        return [h for h in self.hpas if h["metadata"].get("namespace", namespace) == namespace]


def bump(kube: FakeKube, obj: dict[str, Any]) -> None:
    obj["metadata"]["resourceVersion"] = str(next(kube.versions))


def store(kube: FakeKube, body: dict[str, Any]) -> dict[str, Any]:
    """Put an InferenceService into the fake API (a new resourceVersion); returns its copy."""
    obj = copy.deepcopy(body)
    bump(kube, obj)
    kube.objects[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
    return obj


def scaled_by_someone_else(replicas: int) -> Callable[[FakeKube], None]:
    """A write by another client (the gateway, ``kubectl scale``) to every stored service."""

    def write(kube: FakeKube) -> None:
        for obj in kube.objects.values():
            obj["spec"]["replicas"] = replicas
            bump(kube, obj)
        kube.before_write = None

    return write


def test_the_fake_has_the_kube_modules_signatures() -> None:
    fake = [name for name in vars(FakeKube) if not name.startswith("_")]
    assert fake, "the fake implements nothing"
    for name in fake:
        ours = inspect.signature(getattr(FakeKube, name)).parameters
        real = inspect.signature(getattr(Kube, name)).parameters
        assert list(ours) == list(real), name


class FakePrometheus:
    def __init__(self, metrics: Metrics | None = None, held: float = 0.0) -> None:
        self.urls: list[str] = []
        self.metrics = metrics
        self.held = held
        self.held_queries: list[str] = []

    async def held_requests(self, url: str, query: str) -> float:
        self.held_queries.append(query)
        return self.held

    async def service_metrics(self, url: str, queries: Any, **_: Any) -> Any:
        self.urls.append(url)
        from llamaherd_operator.prom import MetricsUnavailable

        if self.metrics is None:
            raise MetricsUnavailable(f"prometheus at {url} unreachable")
        return self.metrics


def state(prometheus: FakePrometheus, allowed: list[str] | None = None) -> Any:
    return autoscaler.AutoscalerState(
        prometheus=prometheus,  # type: ignore[arg-type]
        metrics=OperatorMetrics(),
        prometheus_url=DEFAULT,
        selector_template='namespace="{namespace}",service="{name}"',
        staleness_s=60,
        allowed_urls=allowed or [],
    )


def service(**autoscaling: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llamaherd.io/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "chat", "namespace": "ns", "uid": "u", "generation": 3},
        "spec": {"replicas": 2, "autoscaling": {"enabled": True, **autoscaling}},
    }


def test_a_url_not_allowed_is_never_queried() -> None:
    prometheus = FakePrometheus()
    body = service(prometheusUrl="http://169.254.169.254/latest")
    kube = FakeKube(services=[body])
    decision = asyncio.run(autoscaler.autoscale_once(body, state(prometheus), kube))  # type: ignore[arg-type]
    assert decision is not None and decision.reason == "PrometheusURLNotAllowed"
    assert prometheus.urls == []
    assert kube.scaled == []
    name, status, manager = kube.statuses[0]
    assert name == "chat"
    assert manager == "llamaherd-autoscaler"
    (cond,) = status["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == (
        "ScalingActive",
        "False",
        "PrometheusURLNotAllowed",
    )
    assert "http://169.254.169.254/latest" in cond["message"]
    assert kube.events and kube.events[0][:2] == ("Warning", "PrometheusURLNotAllowed")


def test_an_allowed_url_is_queried() -> None:
    prometheus = FakePrometheus()
    body = service(prometheusUrl="http://prom.team-a:9090")
    kube = FakeKube(services=[body])
    decision = asyncio.run(
        autoscaler.autoscale_once(body, state(prometheus, ["http://prom.team-a:9090"]), kube)  # type: ignore[arg-type]
    )
    assert decision is not None and decision.reason == "MetricsUnavailable"
    assert prometheus.urls == ["http://prom.team-a:9090"]


def test_a_conflicting_hpa_holds_and_writes_no_replicas() -> None:
    prometheus = FakePrometheus()
    body = service()
    kube = FakeKube(services=[body])
    hpas = [hpa("users-hpa", "InferenceService", "chat", "llamaherd.io/v1alpha1")]
    decision = asyncio.run(autoscaler.autoscale_once(body, state(prometheus), kube, hpas))  # type: ignore[arg-type]
    assert decision is not None
    assert (decision.reason, decision.desired, decision.scaling_active) == (
        "ConflictingAutoscaler",
        2,
        False,
    )
    assert "users-hpa" in decision.message
    assert kube.scaled == [] and prometheus.urls == []
    assert kube.events[0][1] == "ConflictingAutoscaler"
    # The same reason again is no new Event.
    asyncio.run(autoscaler.autoscale_once(body, autoscaler_state := state(prometheus), kube, hpas))  # type: ignore[arg-type]
    asyncio.run(autoscaler.autoscale_once(body, autoscaler_state, kube, hpas))  # type: ignore[arg-type]
    assert [e[1] for e in kube.events] == ["ConflictingAutoscaler", "ConflictingAutoscaler"]


def test_autoscale_all_skips_services_without_autoscaling() -> None:
    prometheus = FakePrometheus()
    off = service()
    off["spec"]["autoscaling"]["enabled"] = False
    off["metadata"]["name"] = "off"
    kube = FakeKube(services=[service(), off])
    asyncio.run(autoscaler.autoscale_all([service(), off], state(prometheus), kube))  # type: ignore[arg-type]
    assert [name for name, _, _ in kube.statuses] == ["chat"]


def test_one_autoscaling_period_scales_reports_and_writes_status_through_kube() -> None:
    """A queue in burst on 2 replicas: one period scales to 5 through the scale subresource,
    posts the Event and applies the autoscaler's status, all through the Kube module."""
    prometheus = FakePrometheus(Metrics(waiting=20, running=16, ready=2, latency_p95_s=4.2))
    scaled = service(maxReplicas=8)
    other = service()
    other["metadata"]["namespace"] = "other-ns"
    other["spec"]["autoscaling"]["enabled"] = False
    kube = FakeKube(services=[scaled, other])
    asyncio.run(autoscaler.autoscale_all([scaled, other], state(prometheus), kube))  # type: ignore[arg-type]
    assert kube.scaled == [("ns", "chat", 5)]  # ceil(2 x (20 / 2) / 4), at once in a burst
    assert kube.scale_managers == ["llamaherd-autoscaler"]
    assert [(kind, reason) for kind, reason, _ in kube.events] == [("Normal", "BurstScaleUp")]
    assert "2 -> 5" in kube.events[0][2]
    ((name, status, manager),) = kube.statuses
    assert (name, manager) == ("chat", "llamaherd-autoscaler")
    assert status["queueDepth"] == 20.0
    assert status["latencyP95Ms"] == 4200.0
    (decision,) = status["scalingDecisions"]
    assert (decision["from"], decision["to"], decision["reason"]) == (2, 5, "BurstScaleUp")
    assert status["lastScaleTime"] == decision["time"]
    (cond,) = status["conditions"]
    assert (cond["type"], cond["status"], cond["reason"], cond["observedGeneration"]) == (
        "ScalingActive",
        "True",
        "BurstScaleUp",
        3,
    )


def test_a_steady_period_writes_status_but_no_replicas_and_no_repeated_event() -> None:
    prometheus = FakePrometheus(Metrics(waiting=0, running=13, ready=2))
    body = service(maxReplicas=8)
    kube = FakeKube(services=[body])
    autoscaler_state = state(prometheus)
    for _ in range(2):
        asyncio.run(autoscaler.autoscale_once(body, autoscaler_state, kube))  # type: ignore[arg-type]
    assert kube.scaled == []
    assert [reason for _, reason, _ in kube.events] == ["Steady"]  # once: the reason held
    assert len(kube.statuses) == 2
    assert all(s["conditions"][0]["status"] == "True" for _, s, _ in kube.statuses)
    assert "scalingDecisions" not in kube.statuses[-1][1]


@pytest.mark.parametrize(
    ("text", "labels"),
    [
        ("", {}),
        ('{"release": "kube-prometheus-stack"}', {"release": "kube-prometheus-stack"}),
        ("release=kps, team=a", {"release": "kps", "team": "a"}),
    ],
)
def test_service_monitor_labels_setting(text: str, labels: dict[str, str]) -> None:
    assert parse_labels(text) == labels


def test_bad_service_monitor_labels_fail_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMAHERD_OPERATOR_SERVICE_MONITOR_LABELS", "release")
    with pytest.raises(ValueError, match="key=value"):
        OperatorSettings()


def test_held_requests_are_queried_for_the_service_and_wake_it_from_zero() -> None:
    prom = FakePrometheus(None, held=2)
    body = service(enabled=True, minReplicas=0, maxReplicas=3)
    body["spec"]["replicas"] = 0
    kube = FakeKube(services=[body])
    decision = asyncio.run(autoscaler.autoscale_once(body, state(prom), kube))  # type: ignore[arg-type]
    assert decision is not None and (decision.desired, decision.reason) == (1, "ScaleFromZero")
    assert kube.scaled == [("ns", "chat", 1)]
    assert prom.held_queries == [
        'sum(llamaherd_gateway_requests_held{target_namespace="ns",inferenceservice="chat"})'
    ]


# ---- scale writes never overwrite newer ones --------------------------------------------------


def test_a_scale_write_that_a_newer_one_overtook_conflicts_and_is_decided_again() -> None:
    """The autoscaler reads 2 replicas and, with a queue in burst, decides 5; before its write
    someone scales the service to 6. Its write carries the version it read, so it conflicts;
    it reads 6 and decides again against 6 (the burst holds it there): 6 stays."""
    prometheus = FakePrometheus(Metrics(waiting=20, running=16, ready=2))
    body = service(maxReplicas=8)
    kube = FakeKube(services=[body])
    read_version = kube.objects[("ns", "chat")]["metadata"]["resourceVersion"]
    kube.before_write = scaled_by_someone_else(6)
    decision = asyncio.run(autoscaler.autoscale_once(body, state(prometheus), kube))  # type: ignore[arg-type]
    assert kube.conflicts == [(5, read_version)]  # the first decision's write was refused
    assert kube.scaled == []  # and nothing else was written: 6 already fits
    assert kube.objects[("ns", "chat")]["spec"]["replicas"] == 6
    assert decision is not None
    assert (decision.current, decision.desired, decision.reason) == (6, 6, "Burst")
    assert kube.reads == 2
    ((_, status, _),) = kube.statuses
    assert "scalingDecisions" not in status  # the refused 2 -> 5 is not reported as made


def test_a_raise_from_zero_by_the_gateway_is_decided_on_again() -> None:
    """At zero with held requests the autoscaler decides 0 -> 1; the gateway raises it to 1
    first. The autoscaler's write conflicts, and its new decision is made on 1 replica."""
    prometheus = FakePrometheus(None, held=2)
    body = service(minReplicas=0, maxReplicas=3)
    body["spec"]["replicas"] = 0
    kube = FakeKube(services=[body])
    kube.before_write = scaled_by_someone_else(1)
    decision = asyncio.run(autoscaler.autoscale_once(body, state(prometheus), kube))  # type: ignore[arg-type]
    assert [replicas for replicas, _ in kube.conflicts] == [1]
    assert kube.scaled == []
    assert decision is not None
    assert (decision.current, decision.desired, decision.reason) == (1, 1, "MetricsUnavailable")
    assert kube.objects[("ns", "chat")]["spec"]["replicas"] == 1


def test_the_decision_is_made_on_the_object_read_not_on_the_snapshot() -> None:
    """The index's snapshot says 2 replicas and no decisions yet; the API server already has 1
    replica and an earlier decision. The autoscaler decides on what it read (1 -> 5, a burst on
    one pod) and reports it after the earlier decision, not instead of it."""
    prometheus = FakePrometheus(Metrics(waiting=20, running=2, ready=1))
    snapshot = service(maxReplicas=8)
    earlier = {"time": "2025-01-01T00:00:00Z", "from": 2, "to": 1, "reason": "ScaleDown",
               "message": "2 -> 1"}  # fmt: skip
    now = copy.deepcopy(snapshot)
    now["spec"]["replicas"] = 1
    now["status"] = {"scalingDecisions": [earlier]}
    kube = FakeKube(services=[now])
    decision = asyncio.run(autoscaler.autoscale_once(snapshot, state(prometheus), kube))  # type: ignore[arg-type]
    assert decision is not None
    assert (decision.current, decision.desired, decision.reason) == (1, 5, "BurstScaleUp")
    assert kube.scaled == [("ns", "chat", 5)]
    ((_, status, _),) = kube.statuses
    assert [(d["from"], d["to"]) for d in status["scalingDecisions"]] == [(2, 1), (1, 5)]


def test_a_service_that_keeps_changing_is_left_to_the_next_period() -> None:
    """Every write conflicts: after SCALE_ATTEMPTS reads and decisions the period gives up
    without writing anything, and the policy's history keeps none of those decisions."""
    prometheus = FakePrometheus(Metrics(waiting=20, running=16, ready=2))
    body = service(maxReplicas=8)
    kube = FakeKube(services=[body])
    replicas = itertools.count(10)  # above maxReplicas: every decision writes 8

    def keeps_changing(kube: FakeKube) -> None:
        scaled_by_someone_else(next(replicas))(kube)
        kube.before_write = keeps_changing

    kube.before_write = keeps_changing
    autoscaler_state = state(prometheus)
    with pytest.raises(autoscaler.ScaleConflict):
        asyncio.run(autoscaler.autoscale_once(body, autoscaler_state, kube))  # type: ignore[arg-type]
    assert len(kube.conflicts) == autoscaler.SCALE_ATTEMPTS
    assert kube.scaled == [] and kube.statuses == [] and kube.events == []
    assert autoscaler_state.histories == {}
    # In the loop over all services it is one failed service, counted and logged.
    asyncio.run(autoscaler.autoscale_all([body], autoscaler_state, kube))  # type: ignore[arg-type]
    assert autoscaler_state.metrics.errors._value.get() == 1


def test_a_service_gone_or_no_longer_autoscaled_when_read_is_left_alone() -> None:
    prometheus = FakePrometheus(Metrics(waiting=20, running=16, ready=2))
    body = service(maxReplicas=8)
    assert asyncio.run(autoscaler.autoscale_once(body, state(prometheus), FakeKube())) is None  # type: ignore[arg-type]
    off = copy.deepcopy(body)
    off["spec"]["autoscaling"]["enabled"] = False
    kube = FakeKube(services=[off])
    assert asyncio.run(autoscaler.autoscale_once(body, state(prometheus), kube)) is None  # type: ignore[arg-type]
    assert kube.scaled == [] and kube.statuses == []
