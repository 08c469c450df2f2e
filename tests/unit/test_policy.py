"""The autoscaling policy on time-series traces, and its properties (hypothesis)."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from llamaherd_operator.policy import (
    SLOT_UTILIZATION_TARGET,
    Decision,
    History,
    Metrics,
    ScalingSpec,
    decide,
    signal_recommendation,
)

PERIOD = 15.0
SPEC = ScalingSpec(
    min_replicas=1, max_replicas=10, target_queue_depth=4, slots=8, scale_down_stabilization_s=300
)


def right_size(demand: float, spec: ScalingSpec = SPEC) -> int:
    """Pods that run ``demand`` requests at the slot-utilization target, within bounds."""
    return spec.clamp(math.ceil(demand / (spec.slots * SLOT_UTILIZATION_TARGET)))


@dataclass
class Trace:
    times: list[float]
    replicas: list[int]
    decisions: list[Decision]

    def direction_changes(self) -> int:
        moves = [d.direction for d in self.decisions if d.direction != "none"]
        return sum(1 for a, b in itertools.pairwise(moves) if a != b)

    def first_time(self, predicate: Callable[[int], bool], after: float = 0.0) -> float | None:
        for t, r in zip(self.times, self.replicas, strict=True):
            if t >= after and predicate(r):
                return t
        return None


def run(
    demand: Callable[[float], float],
    duration: float,
    *,
    spec: ScalingSpec = SPEC,
    start_delay: float = 30.0,
    metrics_up: Callable[[float], bool] = lambda t: True,
    start: int = 1,
) -> Trace:
    """A fleet whose pods take ``start_delay`` to become ready; ``demand`` is concurrent
    requests wanted; each ready pod runs ``slots`` of them and the rest wait."""
    history = History()
    current = start
    ready_at = [0.0] * start  # when each pod became (or becomes) ready
    trace = Trace([], [], [])
    t = 0.0
    while t <= duration:
        ready = sum(1 for r in ready_at[:current] if r <= t)
        want = demand(t)
        running = min(want, ready * spec.slots)
        metrics = (
            Metrics(waiting=want - running, running=running, ready=ready) if metrics_up(t) else None
        )
        d = decide(metrics, current, t, spec, history, unavailable_reason="prometheus down")
        if d.desired > current:
            ready_at = ready_at[:current] + [t + start_delay] * (d.desired - current)
        current = d.desired
        trace.times.append(t)
        trace.replicas.append(current)
        trace.decisions.append(d)
        t += PERIOD
    return trace


def test_step_up_scales_within_two_minutes_without_flapping() -> None:
    trace = run(lambda t: 4 if t < 60 else 64, 900)
    reached = trace.first_time(lambda r: r >= 8, after=60)
    assert reached is not None and reached - 60 <= 120, trace.replicas
    # The queue signal overshoots a big step (it ignores the slots new pods bring); the
    # overshoot comes back once, after the scale-down window, and stays at the right size.
    assert trace.direction_changes() <= 1
    assert trace.replicas[-1] == right_size(64)


def test_moderate_step_up_is_one_move_up() -> None:
    trace = run(lambda t: 24 if t < 60 else 44, 900, start=right_size(24))
    assert set(trace.replicas[: trace.times.index(60.0)]) == {right_size(24)}
    assert trace.direction_changes() == 0
    assert trace.replicas[-1] == right_size(44)


def test_scale_up_is_limited_to_double_or_four_pods_per_period() -> None:
    spec = ScalingSpec(max_replicas=100, target_latency_p95_s=1.0)
    metrics = Metrics(waiting=0, running=8, ready=2, latency_p95_s=20.0)
    d = decide(metrics, 2, 0.0, spec, History())
    assert (d.reason, d.recommendation, d.desired) == ("ScaleUp", 40, 6)  # 2 + 4
    d = decide(
        Metrics(waiting=0, running=80, ready=10, latency_p95_s=20.0), 10, 15.0, spec, History()
    )
    assert d.desired == 20  # +100%


def test_burst_jumps_straight_to_the_recommendation() -> None:
    trace = run(lambda t: 4 if t < 60 else 400, 200)
    i = trace.times.index(60.0)
    assert trace.decisions[i].reason == "BurstScaleUp"
    assert trace.replicas[i] == 10  # one period, clamped at max


def test_slow_ramp_only_ever_goes_up() -> None:
    trace = run(lambda t: t / 15, 1200)  # 0 to 80 concurrent requests over 20 minutes
    assert trace.direction_changes() == 0
    assert trace.replicas == sorted(trace.replicas)
    assert trace.replicas[-1] == right_size(80)


def test_oscillating_load_does_not_flap() -> None:
    trace = run(lambda t: 40 if int(t // 60) % 2 else 8, 1800)
    assert trace.direction_changes() <= 1, trace.replicas
    assert max(trace.replicas) >= 5


def test_load_going_away_scales_down_after_the_window_only() -> None:
    trace = run(lambda t: 32 if t < 300 else 0, 1200, start=right_size(32))
    assert right_size(32) == 5
    assert set(trace.replicas[: trace.times.index(300.0)]) == {5}
    # Nothing goes down for a whole stabilization window after the load stops ...
    assert {r for t, r in zip(trace.times, trace.replicas, strict=True) if t < 600} == {5}
    # ... then straight to the minimum, in one move.
    assert trace.replicas[trace.times.index(600.0)] == 1
    assert trace.direction_changes() == 0


def test_metrics_gap_holds_replicas_and_says_so() -> None:
    trace = run(lambda t: 64, 900, metrics_up=lambda t: not 300 <= t < 600)
    gap = [d for t, d in zip(trace.times, trace.decisions, strict=True) if 300 <= t < 600]
    assert all(d.reason == "MetricsUnavailable" and not d.scaling_active for d in gap)
    held = trace.replicas[trace.times.index(285.0)]
    assert all(d.desired == held for d in gap)
    assert trace.replicas[-1] == right_size(64)  # back on data


def test_prometheus_down_from_the_start_holds_the_current_replicas() -> None:
    trace = run(lambda t: 64, 300, metrics_up=lambda t: False, start=3)
    assert set(trace.replicas) == {3}
    assert "prometheus down" in trace.decisions[0].message


def test_no_scale_down_while_pods_are_cold() -> None:
    history = History()
    d = decide(
        Metrics(waiting=0, running=0, ready=2),
        5,
        1000.0,
        ScalingSpec(max_replicas=10, scale_down_stabilization_s=0),
        history,
    )
    assert (d.desired, d.reason) == (5, "PodsNotReady")


def test_latency_signal_scales_up_when_the_queue_looks_fine() -> None:
    spec = ScalingSpec(max_replicas=10, target_latency_p95_s=1.0)
    d = decide(Metrics(waiting=4, running=8, ready=2, latency_p95_s=3.0), 2, 0.0, spec, History())
    assert d.desired == 6 and "latency" in d.message


def test_tolerance_band() -> None:
    assert signal_recommendation(10, 4.3, 4.0, 0.1) == 10
    assert signal_recommendation(10, 3.7, 4.0, 0.1) == 10
    assert signal_recommendation(10, 4.5, 4.0, 0.1) == 12
    assert signal_recommendation(10, 2.0, 4.0, 0.1) == 5


def test_spec_from_the_resource() -> None:
    spec = ScalingSpec.from_resource(
        {
            "autoscaling": {
                "enabled": True,
                "minReplicas": 2,
                "maxReplicas": 7,
                "targetQueueDepthPerReplica": 3,
                "targetLatencyP95Ms": 1500,
                "scaleDownStabilizationSeconds": 60,
            },
            "server": {"slots": 16},
        }
    )
    assert spec == ScalingSpec(
        min_replicas=2,
        max_replicas=7,
        target_queue_depth=3,
        target_latency_p95_s=1.5,
        slots=16,
        scale_down_stabilization_s=60,
    )


# ---- properties ----------------------------------------------------------------------

specs = st.builds(
    lambda lo, span, target, slots, down, lat: ScalingSpec(
        min_replicas=lo,
        max_replicas=lo + span,
        target_queue_depth=target,
        slots=slots,
        scale_down_stabilization_s=down,
        target_latency_p95_s=lat,
    ),
    st.integers(1, 5),
    st.integers(0, 20),
    st.floats(0.5, 20),
    st.integers(1, 32),
    st.sampled_from([0.0, 60.0, 300.0]),
    st.none() | st.floats(0.1, 10),
)
metrics_st = st.builds(
    Metrics,
    waiting=st.floats(0, 1000),
    running=st.floats(0, 500),
    ready=st.integers(0, 30),
    latency_p95_s=st.none() | st.floats(0.01, 60),
)
histories = st.lists(st.tuples(st.floats(0, 600), st.integers(0, 40)), max_size=8).map(
    lambda xs: History(deque_of(sorted(xs)))
)


def deque_of(items: list[tuple[float, int]]):  # type: ignore[no-untyped-def]
    from collections import deque

    return deque(items)


@settings(max_examples=400, deadline=None)
@given(specs, st.none() | metrics_st, st.integers(0, 40), histories)
def test_always_within_bounds(
    spec: ScalingSpec, metrics: Metrics | None, current: int, history: History
) -> None:
    d = decide(metrics, current, 600.0, spec, history)
    assert spec.min_replicas <= d.desired <= spec.max_replicas


@settings(max_examples=400, deadline=None)
@given(specs, metrics_st, st.integers(1, 40), histories)
def test_never_down_while_pods_are_not_ready(
    spec: ScalingSpec, metrics: Metrics, current: int, history: History
) -> None:
    if metrics.ready >= current or not spec.min_replicas <= current <= spec.max_replicas:
        return
    assert decide(metrics, current, 600.0, spec, history).desired >= current


@settings(max_examples=400, deadline=None)
@given(
    specs,
    metrics_st,
    st.floats(0, 500),
    st.floats(0, 200),
    st.floats(0, 30),
    st.integers(0, 40),
    histories,
)
def test_more_load_never_gives_fewer_replicas(
    spec: ScalingSpec,
    low: Metrics,
    more_waiting: float,
    more_running: float,
    more_latency: float,
    current: int,
    history: History,
) -> None:
    high = Metrics(
        waiting=low.waiting + more_waiting,
        running=low.running + more_running,
        ready=low.ready,
        latency_p95_s=None if low.latency_p95_s is None else low.latency_p95_s + more_latency,
    )
    d_low = decide(low, current, 600.0, spec, copy.deepcopy(history))
    d_high = decide(high, current, 600.0, spec, copy.deepcopy(history))
    assert d_high.desired >= d_low.desired, (d_low, d_high)


# ---- scale to zero (minReplicas 0) ----------------------------------------------------------

ZERO = ScalingSpec(min_replicas=0, max_replicas=4, scale_to_zero_idle_s=600, slots=8)
IDLE = Metrics(waiting=0, running=0, ready=1)


def test_idle_service_goes_to_zero_after_the_idle_time_only() -> None:
    history = History()
    assert decide(IDLE, 1, 0.0, ZERO, history).desired == 1
    assert decide(IDLE, 1, 599.0, ZERO, history).desired == 1
    last = decide(IDLE, 1, 600.0, ZERO, history)
    assert (last.desired, last.reason) == (0, "ScaledToZero")
    assert "600s" in last.message


def test_any_request_restarts_the_idle_clock() -> None:
    history = History()
    decide(IDLE, 1, 0.0, ZERO, history)
    busy = Metrics(waiting=0, running=1, ready=1)
    assert decide(busy, 1, 300.0, ZERO, history).desired == 1
    recent = Metrics(waiting=0, running=0, ready=1, recent=2.0)  # finished between samples
    assert decide(recent, 1, 400.0, ZERO, history).desired == 1
    assert decide(IDLE, 1, 500.0, ZERO, history).desired == 1
    assert decide(IDLE, 1, 1099.0, ZERO, history).desired == 1
    assert decide(IDLE, 1, 1100.0, ZERO, history).desired == 0


def test_held_requests_keep_a_service_up_and_count_as_waiting() -> None:
    history = History()
    for t in (0.0, 700.0, 1400.0):
        assert decide(IDLE, 1, t, ZERO, history, held=1).desired == 1
    burst = decide(IDLE, 1, 1500.0, ZERO, history, held=20)
    assert burst.desired > 1 and "waiting 20" in burst.message


def test_normal_scale_down_never_reaches_zero() -> None:
    spec = ScalingSpec(
        min_replicas=0, max_replicas=4, scale_down_stabilization_s=0, scale_to_zero_idle_s=10**5
    )
    history, current, trace = History(), 2, []
    for t in (0.0, 15.0, 30.0, 45.0):
        current = decide(
            Metrics(waiting=0, running=0, ready=current), current, t, spec, history
        ).desired
        trace.append(current)
    assert trace[-1] == 1 and min(trace) == 1


def test_a_loading_pod_is_never_scaled_away() -> None:
    history = History()
    loading = Metrics(waiting=0, running=0, ready=0)
    for t in (0.0, 700.0, 1400.0):
        d = decide(loading, 1, t, ZERO, history)
        assert d.desired == 1 and not d.scaling_active
    # one of two pods still loading: no scale to zero either
    for t in (2000.0, 2700.0):
        assert decide(IDLE, 2, t, ZERO, history).desired >= 1


def test_at_zero_the_service_stays_until_a_request_is_held() -> None:
    history = History()
    rest = decide(None, 0, 0.0, ZERO, history)
    assert (rest.desired, rest.reason) == (0, "ScaledToZero")
    wake = decide(None, 0, 15.0, ZERO, history, held=3)
    assert (wake.desired, wake.reason) == (1, "ScaleFromZero")


def test_scale_to_zero_idle_from_the_resource() -> None:
    spec = ScalingSpec.from_resource(
        {"autoscaling": {"minReplicas": 0, "maxReplicas": 2, "scaleToZeroIdleSeconds": 45}}
    )
    assert (spec.min_replicas, spec.scale_to_zero_idle_s) == (0, 45.0)
