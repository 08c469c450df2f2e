"""The autoscaling policy: a pure function from metrics to a replica count and a reason.

Inputs: the service's metrics as Prometheus sees them (waiting and running requests summed over
its pods, how many pods report ready, p95 latency and time to first token), the current
replica count, the time, the autoscaling spec, and the recommendations of earlier periods.
Output: the desired replica count, which way it moves, and a reason a person can read.

The rules, in order:

1. **No data, no move.** Metrics missing, stale or failing (Prometheus down, no series yet,
   no pod reporting ready): hold the current replicas, ``scaling_active`` False, and say why.
   Never drop to the minimum for lack of data.
2. **Per-signal recommendations**, each ``ceil(ready x observed / target)``, where
   ``observed`` is per ready pod; pods that are not ready do not count as capacity:
   - queue: waiting requests per ready pod against ``targetQueueDepthPerReplica``;
   - slots: running sequences per ready pod against 80% of the pod's ``slots`` (a fleet whose
     slots are busy needs its pods even with an empty queue; the 20% headroom keeps a fleet
     from being sized to exactly full, where any jitter queues);
   - latency: p95 request latency against ``targetLatencyP95Ms``, when set.
   A signal within the tolerance band (|observed / target - 1| <= 10%) recommends no change.
   The recommendation is the largest of them, clamped to [minReplicas, maxReplicas].
3. **Burst**: waiting per ready pod at least twice the target skips scale-down entirely and
   scales up at once to the recommendation.
4. **Scale up fast**: otherwise up to +100% or +4 pods per period, whichever is more, after
   the (default 0 s) scale-up stabilization window: the lowest recommendation in that window.
5. **Scale down slowly**: the highest recommendation in the scale-down stabilization window
   (default 300 s); and never while any pod is not ready yet (cold start).
6. Clamp to [minReplicas, maxReplicas]; rules 2-5 never go below one replica.
7. **Scale to zero** (``minReplicas: 0`` only): a service with every pod ready and no waiting,
   running, recently finished or gateway-held request for ``scaleToZeroIdleSeconds`` goes to
   zero (reason ``ScaledToZero``). At zero it stays there until a request is held for it by the
   gateway (the gateway raises it to one itself; the autoscaler does too, ``ScaleFromZero``).
   Held requests count as waiting demand in rule 2, and a pod still loading is never scaled
   away (no data and not-ready pods hold the current size).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TOLERANCE = 0.1
UP_FACTOR = 2.0  # +100% per period
UP_PODS = 4  # or +4 pods, whichever is more
BURST_FACTOR = 2.0
SLOT_UTILIZATION_TARGET = 0.8


@dataclass(frozen=True)
class ScalingSpec:
    min_replicas: int = 1
    max_replicas: int = 1
    target_queue_depth: float = 4.0
    target_latency_p95_s: float | None = None
    slots: int = 8
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 300.0
    scale_to_zero_idle_s: float = 600.0
    tolerance: float = TOLERANCE

    @classmethod
    def from_resource(cls, spec: dict[str, Any]) -> ScalingSpec:
        """From an InferenceService's ``spec`` (camelCase, defaults as in the CRD)."""
        a = spec.get("autoscaling") or {}
        server = spec.get("server") or {}
        latency_ms = a.get("targetLatencyP95Ms")
        return cls(
            min_replicas=int(a.get("minReplicas", 1)),
            max_replicas=int(a.get("maxReplicas", max(1, int(a.get("minReplicas", 1))))),
            target_queue_depth=float(a.get("targetQueueDepthPerReplica", 4)),
            target_latency_p95_s=float(latency_ms) / 1000 if latency_ms else None,
            slots=int(server.get("slots", 8)),
            scale_up_stabilization_s=float(a.get("scaleUpStabilizationSeconds", 0)),
            scale_down_stabilization_s=float(a.get("scaleDownStabilizationSeconds", 300)),
            scale_to_zero_idle_s=float(a.get("scaleToZeroIdleSeconds", 600)),
        )

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


@dataclass(frozen=True)
class Metrics:
    """One service's signals, summed over its pods."""

    waiting: float
    running: float
    ready: int  # pods that report ready
    latency_p95_s: float | None = None
    ttft_p95_s: float | None = None
    recent: float = 0.0  # requests finished within the metrics window


@dataclass(frozen=True)
class Decision:
    desired: int
    current: int
    reason: str  # CamelCase, for Events and the ScalingActive condition
    message: str
    scaling_active: bool = True
    recommendation: int | None = None

    @property
    def direction(self) -> str:
        if self.desired > self.current:
            return "up"
        if self.desired < self.current:
            return "down"
        return "none"


@dataclass
class History:
    """Recommendations of earlier periods, for the stabilization windows."""

    entries: deque[tuple[float, int]] = field(default_factory=deque)
    idle_since: float | None = None  # since when no request waits, runs or is held

    def add(self, now: float, recommendation: int, keep_s: float) -> None:
        self.entries.append((now, recommendation))
        while self.entries and self.entries[0][0] < now - keep_s:
            self.entries.popleft()

    def within(self, now: float, window_s: float) -> list[int]:
        return [r for t, r in self.entries if t >= now - window_s]


def signal_recommendation(ready: int, observed: float, target: float, tolerance: float) -> int:
    """``ceil(ready x observed / target)``; within the tolerance band, ``ready``."""
    ratio = observed / target
    if abs(ratio - 1.0) <= tolerance:
        return ready
    return math.ceil(ready * ratio - 1e-9)


def decide(
    metrics: Metrics | None,
    current: int,
    now: float,
    spec: ScalingSpec,
    history: History,
    *,
    unavailable_reason: str = "no metrics",
    held: float = 0.0,
) -> Decision:
    """The desired replicas for this period. ``history`` is updated in place. ``held``: the
    requests the gateway holds for the service (no ready replica yet)."""
    clamped = spec.clamp(current)
    if current == 0 and clamped == 0:
        history.idle_since = None
        if held > 0:
            return Decision(1, 0, "ScaleFromZero", f"0 -> 1: the gateway holds {held:g} requests")
        return Decision(0, 0, "ScaledToZero", "at zero replicas: no request is held for it")
    if metrics is None or metrics.ready <= 0:
        why = unavailable_reason if metrics is None else "no ready pod reports metrics yet"
        return Decision(
            clamped,
            current,
            "MetricsUnavailable",
            f"holding {clamped} replicas: {why}",
            scaling_active=False,
        )
    idle = _scale_to_zero(metrics, current, now, spec, history, held)
    if idle is not None:
        return idle

    ready = min(metrics.ready, current) if current > 0 else metrics.ready
    waiting = metrics.waiting + held
    per_pod_waiting = waiting / ready
    signals = _signals(metrics, ready, per_pod_waiting, spec)
    driver = max(signals, key=lambda k: signals[k])
    recommendation = max(1, spec.clamp(max(signals.values())))
    keep = max(spec.scale_down_stabilization_s, spec.scale_up_stabilization_s)
    if not history.entries:
        # A fresh history (new service or operator restart) counts as having recommended
        # the current size for a whole window: no scale-down before a window has passed.
        history.add(now - keep, clamped, keep)
    history.add(now, recommendation, keep)
    burst = per_pod_waiting >= BURST_FACTOR * spec.target_queue_depth
    numbers = (
        f"waiting {waiting:g} ({per_pod_waiting:.2f}/pod, target "
        f"{spec.target_queue_depth:g}), running {metrics.running:g}, ready {metrics.ready}"
        + (f", p95 {metrics.latency_p95_s * 1000:.0f}ms" if metrics.latency_p95_s else "")
    )

    if current != clamped:
        desired, reason, what = (
            clamped,
            "OutOfBounds",
            f"{current} outside [{spec.min_replicas}, {spec.max_replicas}]",
        )
    elif recommendation > current:
        window = history.within(now, spec.scale_up_stabilization_s)
        desired, reason, what = _scale_up(current, recommendation, burst, driver, window)
    elif recommendation < current:
        window = history.within(now, spec.scale_down_stabilization_s)
        desired, reason, what = _scale_down(current, burst, metrics.ready, window)
    else:
        desired, reason, what = current, "Steady", f"{current} replicas fit the load"
    return Decision(
        max(1, spec.clamp(desired)),
        current,
        reason,
        f"{what}: {numbers}",
        recommendation=recommendation,
    )


def _scale_to_zero(
    metrics: Metrics, current: int, now: float, spec: ScalingSpec, history: History, held: float
) -> Decision | None:
    """Rule 7: zero replicas after ``scale_to_zero_idle_s`` without any request; keeps the
    start of the idle stretch in ``history``."""
    idle = spec.min_replicas == 0 and metrics.waiting + metrics.running + metrics.recent + held <= 0
    if not idle:
        history.idle_since = None
        return None
    if history.idle_since is None:
        history.idle_since = now
    idle_for = now - history.idle_since
    if idle_for >= spec.scale_to_zero_idle_s and metrics.ready >= current > 0:
        history.idle_since = None
        return Decision(
            0,
            current,
            "ScaledToZero",
            f"{current} -> 0: no request waited, ran or was held for {idle_for:.0f}s "
            f"(scaleToZeroIdleSeconds {spec.scale_to_zero_idle_s:g})",
        )
    return None


def _signals(
    metrics: Metrics, ready: int, per_pod_waiting: float, spec: ScalingSpec
) -> dict[str, int]:
    """Rule 2: each signal's recommendation."""
    signals = {
        "queue": signal_recommendation(
            ready, per_pod_waiting, spec.target_queue_depth, spec.tolerance
        ),
        "slots": signal_recommendation(
            ready, metrics.running / ready, spec.slots * SLOT_UTILIZATION_TARGET, spec.tolerance
        ),
    }
    if spec.target_latency_p95_s and metrics.latency_p95_s is not None:
        signals["latency"] = signal_recommendation(
            ready, metrics.latency_p95_s, spec.target_latency_p95_s, spec.tolerance
        )
    return signals


def _scale_up(
    current: int, recommendation: int, burst: bool, driver: str, window: list[int]
) -> tuple[int, str, str]:
    """Rules 3 and 4, for a recommendation above ``current``: (desired, reason, what
    happened). ``window``: the recommendations in the scale-up stabilization window."""
    if burst:
        return (
            recommendation,
            "BurstScaleUp",
            f"burst: {current} -> {recommendation} at once ({driver})",
        )
    stable = min(window or [recommendation])
    if stable <= current:
        return current, "StabilizingUp", f"holding {current}: the scale-up window saw {stable}"
    limit = max(math.ceil(current * UP_FACTOR), current + UP_PODS)
    desired = min(stable, limit)
    return desired, "ScaleUp", f"{current} -> {desired} ({driver})"


def _scale_down(current: int, burst: bool, ready: int, window: list[int]) -> tuple[int, str, str]:
    """Rule 5, for a recommendation below ``current``: (desired, reason, what happened).
    ``window``: the recommendations in the scale-down stabilization window (this one too)."""
    if burst:
        return current, "Burst", f"holding {current}: queue in burst"
    if ready < current:
        return current, "PodsNotReady", f"holding {current}: {current - ready} pods not ready yet"
    stable = max(window)
    if stable >= current:
        return current, "StabilizingDown", f"holding {current}: the scale-down window saw {stable}"
    return stable, "ScaleDown", f"{current} -> {stable}"


def conflicting_autoscalers(
    hpas: list[Mapping[str, Any]], name: str, group: str = "llamaherd.io"
) -> list[str]:
    """Names of the HorizontalPodAutoscalers that target an InferenceService ``name`` (through
    its scale subresource) or its Deployment (same name): a second owner of the replica count."""
    found = []
    for hpa in hpas:
        ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
        api_group = str(ref.get("apiVersion", "")).partition("/")[0]
        ours = ref.get("kind") == "InferenceService" and api_group == group
        deployment = ref.get("kind") == "Deployment" and api_group == "apps"
        if (ours or deployment) and ref.get("name") == name:
            found.append(str(hpa["metadata"]["name"]))
    return sorted(found)
