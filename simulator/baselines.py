"""The autoscalers users would pick instead of llamaherd's, each from its documented algorithm.

Every scaler is a small object with an ``interval_s`` (how often it decides) and a
``desired(obs)`` that takes what it could observe at that moment (:class:`Observation`) and
returns the replicas it asks for. They know nothing of the simulator's internals, so the unit
tests feed them hand-made observations.

- :class:`HPA`: the Kubernetes HorizontalPodAutoscaler's controller (``pkg/controller/
  podautoscaler``: ``replica_calculator.go`` and ``horizontal.go``, as documented in
  "Horizontal Pod Autoscaling" on kubernetes.io), shared by the two HPA-based baselines:
  a raw recommendation from the metric, the 10% tolerance, the autoscaling/v2 default
  behaviour (scale up by max(4 pods, 100%) per 15 s, no scale-up stabilization; scale down
  with a 300 s stabilization window, 100% per 15 s), clamped to [min, max], every 15 s
  (``--horizontal-pod-autoscaler-sync-period``).
- :class:`CpuHPA`: that HPA on CPU utilization (a Resource metric, target 70%).
- :class:`KedaQueue`: KEDA's Prometheus scaler on the queue depth (keda.sh, "Prometheus"
  scaler and "ScaledObject specification"): KEDA hands the HPA an External metric with target
  type AverageValue = ``threshold``, so the HPA asks for ``ceil(metricValue / threshold)``
  (current replicas when ``metricValue / (threshold x current)`` is within 10% of 1), with the
  same HPA behaviour. ``pollingInterval`` (30 s) and ``cooldownPeriod`` (300 s) only govern
  activation, i.e. scaling between 0 and 1 replica, so they act only when min is 0.
- :class:`KubeAI`: KubeAI's model autoscaler (kubeai.org, "Autoscaling"; ``internal/
  modelautoscaler``): every ``interval`` (10 s) it counts the active (in-flight) requests of
  the model, keeps a simple moving average over ``timeWindow / interval`` samples (10 min /
  10 s = 60), and asks for ``ceil(average / targetRequests)``; scale-ups apply at once,
  scale-downs only after ``scaleDownDelaySeconds`` (30 s) worth of consecutive lower answers.
- :func:`hindsight_schedule`: not an autoscaler but the lower bound: knowing every arrival,
  the fewest replicas with the capacity for them, started a cold start ahead.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Observation:
    """What an autoscaler could see about the fleet at one moment."""

    now: float
    current: int  # replicas asked for (the scale subresource's replicas), cold ones included
    ready: int  # replicas that serve
    waiting: int  # requests queued in front of the service
    running: int  # sequences running on ready replicas
    # Per ready replica: CPU utilization of its request, as metrics-server reports it.
    cpu_utilization: tuple[float, ...] = ()


@dataclass
class HPABehavior:
    """autoscaling/v2 ``spec.behavior`` defaults, with the controller's tolerance."""

    tolerance: float = 0.1
    scale_up_pods: int = 4
    scale_up_percent: float = 100.0
    scale_up_period_s: float = 15.0
    scale_up_stabilization_s: float = 0.0
    scale_down_percent: float = 100.0
    scale_down_stabilization_s: float = 300.0


@dataclass
class HPA:
    """The HPA controller's stabilization and rate limits around a raw recommendation.

    ``normalize`` follows ``normalizeDesiredReplicasWithBehaviors``: the raw recommendation is
    recorded; the answer is the current replicas moved up to the lowest recommendation of the
    scale-up window and down to the highest of the scale-down window; then the rate policies
    (scale up to at most max(current + 4, current x 2), down to at least current x 0 with the
    default 100%) and [min, max]. Replicas added within the last policy period count against
    the scale-up limit, as the controller's scale events do.
    """

    min_replicas: int
    max_replicas: int
    behavior: HPABehavior = field(default_factory=HPABehavior)
    interval_s: float = 15.0
    recommendations: deque[tuple[float, int]] = field(default_factory=deque)
    scale_ups: deque[tuple[float, int]] = field(default_factory=deque)

    def normalize(self, now: float, current: int, raw: int) -> int:
        b = self.behavior
        self.recommendations.append((now, raw))
        keep = max(b.scale_down_stabilization_s, b.scale_up_stabilization_s)
        while self.recommendations and self.recommendations[0][0] < now - keep:
            self.recommendations.popleft()
        up = min(r for t, r in self.recommendations if t >= now - b.scale_up_stabilization_s)
        down = max(r for t, r in self.recommendations if t >= now - b.scale_down_stabilization_s)
        stabilized = min(max(current, up), down)
        while self.scale_ups and self.scale_ups[0][0] <= now - b.scale_up_period_s:
            self.scale_ups.popleft()
        period_start = current - sum(n for _, n in self.scale_ups)
        up_limit = max(
            period_start + b.scale_up_pods,
            math.ceil(period_start * (1 + b.scale_up_percent / 100)),
        )
        down_limit = math.floor(current * (1 - b.scale_down_percent / 100))
        desired = max(min(stabilized, up_limit), down_limit)
        desired = max(self.min_replicas, min(self.max_replicas, desired))
        if desired > current:
            self.scale_ups.append((now, desired - current))
        return desired


def within_tolerance(ratio: float, tolerance: float) -> bool:
    return abs(ratio - 1.0) <= tolerance


@dataclass
class CpuHPA:
    """The HPA on CPU utilization (``GetResourceReplicas``), target ``target`` of the request.

    Over the ready pods, ``ratio = mean utilization / target``; within the tolerance, no
    change; otherwise ``ceil(ratio x ready)``. Pods not ready yet (cold starts) are left out
    when scaling down; when scaling up they count as 0% and the ratio is taken again over all
    pods: no change if that lands within the tolerance or below 1, else ``ceil(ratio x pods)``.
    """

    hpa: HPA
    target: float = 0.7

    @property
    def interval_s(self) -> float:
        return self.hpa.interval_s

    def raw(self, obs: Observation) -> int:
        usage = obs.cpu_utilization
        if not usage:
            return obs.current
        tolerance = self.hpa.behavior.tolerance
        ratio = sum(usage) / len(usage) / self.target
        unready = max(0, obs.current - len(usage))
        if unready == 0 or ratio < 1.0:
            if within_tolerance(ratio, tolerance):
                return obs.current
            return math.ceil(ratio * len(usage))
        if within_tolerance(ratio, tolerance):
            return obs.current
        rebalanced = sum(usage) / (len(usage) + unready) / self.target
        if within_tolerance(rebalanced, tolerance) or rebalanced < 1.0:
            return obs.current
        return math.ceil(rebalanced * (len(usage) + unready))

    def desired(self, obs: Observation) -> int:
        return self.hpa.normalize(obs.now, obs.current, self.raw(obs))


@dataclass
class KedaQueue:
    """KEDA's Prometheus scaler, query ``sum(llamaherd_requests_waiting{...})``, ``threshold``.

    The HPA gets an External metric of target type AverageValue (``GetExternalPerPodMetric
    Replicas``): ``ceil(metric / threshold)``, or the current replicas when
    ``metric / (threshold x current)`` is within the tolerance. With ``min_replicas`` 0, KEDA
    itself activates the target (0 -> 1) at the first poll (every ``polling_interval_s``) that
    sees the metric above ``activation_threshold``, and deactivates it (1 -> 0) once no poll has
    for ``cooldown_period_s``; the HPA never goes below 1.
    """

    hpa: HPA  # min 1 at least: the HPA never scales to 0
    threshold: float = 4.0
    min_replicas: int = 1  # the ScaledObject's minReplicaCount
    activation_threshold: float = 0.0
    polling_interval_s: float = 30.0
    cooldown_period_s: float = 300.0
    last_active: float = 0.0

    @property
    def interval_s(self) -> float:
        return self.hpa.interval_s

    def raw(self, obs: Observation) -> int:
        metric = float(obs.waiting)
        if obs.current > 0 and within_tolerance(
            metric / (self.threshold * obs.current), self.hpa.behavior.tolerance
        ):
            return obs.current
        return math.ceil(metric / self.threshold)

    def desired(self, obs: Observation) -> int:
        if self.min_replicas == 0:
            active = obs.waiting > self.activation_threshold
            if active:
                self.last_active = obs.now
            poll = obs.now % self.polling_interval_s == 0
            if obs.current == 0:  # KEDA owns 0 -> 1; the HPA is idle
                return 1 if poll and active else 0
            if poll and obs.now - self.last_active >= self.cooldown_period_s:
                return 0
        return self.hpa.normalize(obs.now, obs.current, self.raw(obs))


@dataclass
class KubeAI:
    """KubeAI's autoscaler: a moving average of in-flight requests against a per-replica target.

    In-flight requests are those KubeAI's proxy holds for the model: waiting plus running.
    The average is over the last ``window`` samples, zeros before the first (KubeAI starts an
    empty window of that size); scale-downs need ``ceil(scale_down_delay_s / interval_s)``
    consecutive periods that ask for fewer.
    """

    min_replicas: int
    max_replicas: int
    target_requests: float = 100.0
    interval_s: float = 10.0
    time_window_s: float = 600.0
    scale_down_delay_s: float = 30.0
    samples: deque[float] = field(default_factory=deque)
    lower_answers: int = 0

    @property
    def window(self) -> int:
        return max(1, int(self.time_window_s / self.interval_s))

    def average(self, in_flight: float) -> float:
        if not self.samples:
            self.samples.extend([0.0] * self.window)
        self.samples.append(in_flight)
        while len(self.samples) > self.window:
            self.samples.popleft()
        return sum(self.samples) / len(self.samples)

    def desired(self, obs: Observation) -> int:
        wanted = math.ceil(self.average(obs.waiting + obs.running) / self.target_requests)
        wanted = max(self.min_replicas, min(self.max_replicas, wanted))
        if wanted >= obs.current:
            self.lower_answers = 0
            return wanted
        self.lower_answers += 1
        if self.lower_answers >= math.ceil(self.scale_down_delay_s / self.interval_s):
            self.lower_answers = 0
            return wanted
        return obs.current


def hindsight_schedule(
    arrival_times: list[float],
    duration_s: int,
    capacity_per_replica: float,
    cold_start_s: float,
    interval_s: float,
    min_replicas: int,
    max_replicas: int,
) -> list[int]:
    """Replicas to have at each second, knowing every arrival: the replica-seconds lower bound.

    For each interval (``interval_s``, an autoscaling period), the capacity its arrivals need:
    ``ceil(arrivals / (capacity_per_replica x interval_s))``, every replica's slots busy the
    whole interval, no headroom. A replica serves from its cold start on, so it must be
    started ``cold_start_s`` earlier: the schedule at second t is the largest need of the
    intervals that begin in ``[t, t + cold_start_s]`` (or contain t), clamped to
    [min, max]. Fewer replicas would leave some interval's work more than its capacity.
    """
    intervals = math.ceil(duration_s / interval_s)
    counts = [0] * intervals
    for t in arrival_times:
        counts[min(intervals - 1, int(t // interval_s))] += 1
    need = [math.ceil(n / (capacity_per_replica * interval_s) - 1e-9) for n in counts]
    schedule = []
    for second in range(duration_s):
        first = int(second // interval_s)
        last = min(intervals - 1, int((second + cold_start_s) // interval_s))
        schedule.append(max(min_replicas, min(max_replicas, max(need[first : last + 1]))))
    return schedule


@dataclass
class Scheduled:
    """Follows a schedule of replicas by the second (the hindsight bound); at ``min`` after."""

    schedule: list[int]
    min_replicas: int
    interval_s: float = 1.0

    def desired(self, obs: Observation) -> int:
        second = int(obs.now)
        return self.schedule[second] if second < len(self.schedule) else self.min_replicas
