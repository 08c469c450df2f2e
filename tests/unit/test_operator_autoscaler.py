"""The autoscaler's guards, without a cluster: a fake of the one Kubernetes module."""

from __future__ import annotations

import asyncio
import inspect
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
    autoscaler calls, with the same signatures, recording what would reach the API."""

    def __init__(self, hpas: list[dict[str, Any]] | None = None) -> None:
        self.hpas = list(hpas or [])
        self.scaled: list[tuple[str, str, int]] = []
        self.scale_managers: list[str] = []
        self.events: list[tuple[str, str, str]] = []
        self.statuses: list[tuple[str, dict[str, Any], str]] = []

    async def scale_inference_service(
        self, namespace: str, name: str, replicas: int, field_manager: str
    ) -> None:
        self.scaled.append((namespace, name, replicas))
        self.scale_managers.append(field_manager)

    async def post_event(self, obj: Any, type: str, reason: str, message: str) -> None:
        self.events.append((type, reason, message))

    async def apply_status(
        self, namespace: str, name: str, status: Any, field_manager: str = ""
    ) -> dict[str, Any] | None:
        self.statuses.append((name, dict(status), field_manager))
        return {}

    async def list_horizontal_pod_autoscalers(self, namespace: str) -> list[dict[str, Any]]:
        return [h for h in self.hpas if h["metadata"].get("namespace", namespace) == namespace]


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
    prometheus, kube = FakePrometheus(), FakeKube()
    body = service(prometheusUrl="http://169.254.169.254/latest")
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
    prometheus, kube = FakePrometheus(), FakeKube()
    body = service(prometheusUrl="http://prom.team-a:9090")
    decision = asyncio.run(
        autoscaler.autoscale_once(body, state(prometheus, ["http://prom.team-a:9090"]), kube)  # type: ignore[arg-type]
    )
    assert decision is not None and decision.reason == "MetricsUnavailable"
    assert prometheus.urls == ["http://prom.team-a:9090"]


def test_a_conflicting_hpa_holds_and_writes_no_replicas() -> None:
    prometheus, kube = FakePrometheus(), FakeKube()
    body = service()
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
    prometheus, kube = FakePrometheus(), FakeKube()
    off = service()
    off["spec"]["autoscaling"]["enabled"] = False
    off["metadata"]["name"] = "off"
    asyncio.run(autoscaler.autoscale_all([service(), off], state(prometheus), kube))  # type: ignore[arg-type]
    assert [name for name, _, _ in kube.statuses] == ["chat"]


def test_one_autoscaling_period_scales_reports_and_writes_status_through_kube() -> None:
    """A queue in burst on 2 replicas: one period scales to 5 through the scale subresource,
    posts the Event and applies the autoscaler's status, all through the Kube module."""
    prometheus = FakePrometheus(Metrics(waiting=20, running=16, ready=2, latency_p95_s=4.2))
    kube = FakeKube()
    scaled = service(maxReplicas=8)
    other = service()
    other["metadata"]["namespace"] = "other-ns"
    other["spec"]["autoscaling"]["enabled"] = False
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
    kube = FakeKube()
    body = service(maxReplicas=8)
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
    kube = FakeKube()
    body = service(enabled=True, minReplicas=0, maxReplicas=3)
    body["spec"]["replicas"] = 0
    decision = asyncio.run(autoscaler.autoscale_once(body, state(prom), kube))  # type: ignore[arg-type]
    assert decision is not None and (decision.desired, decision.reason) == (1, "ScaleFromZero")
    assert kube.scaled == [("ns", "chat", 1)]
    assert prom.held_queries == [
        'sum(llamaherd_gateway_requests_held{target_namespace="ns",inferenceservice="chat"})'
    ]
