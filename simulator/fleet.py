"""A deterministic fleet simulator: arrival traces through the real autoscaling policy.

Discrete time (one step per second). Requests arrive by a seeded Poisson process whose rate
follows a trace, wait in one queue in front of the service (the Service's load balancer),
and run on ready replicas, each with ``slots`` slots sharing the replica's throughput at its
current number of streams (llamaherd's tokens/s by concurrency, measured by the serving
benchmark). New replicas become ready after a cold start; a replica being removed takes no new
requests and goes once its requests finish. Loads and the SLO are relative to one replica's
capacity, so the traces keep their meaning when the benchmark's numbers move.

Six ways to size the fleet, on the same arrivals (the baselines in :mod:`simulator.baselines`,
each from its project's documented algorithm and defaults):
- ``llamaherd``: the operator's policy (``llamaherd_operator.policy.decide``) every period,
  fed the queue, running sequences, ready replicas and p95 latency, as Prometheus would;
- ``fixed``: a fixed number of replicas;
- ``keda-queue``: KEDA's Prometheus scaler on the queue depth (threshold = the policy's
  target queue depth per replica), through the HPA with its default behaviour;
- ``kubeai``: KubeAI's moving average of in-flight requests per replica;
- ``hpa-cpu``: the Kubernetes HPA on CPU utilization (target 70%). llama.cpp keeps its
  threads busy whenever any sequence runs, so CPU reads ~100% on a replica with one request
  or with a full batch: it cannot see a queue (:func:`cpu_utilization`);
- ``hindsight``: the fewest replicas with the capacity for the arrivals, knowing them all in
  advance, started a cold start ahead: the lower bound on replica-seconds.

    python -m simulator.fleet --trace spike --out simulator/results
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from llamaherd_operator.policy import History, Metrics, ScalingSpec, decide
from simulator.baselines import (
    HPA,
    CpuHPA,
    KedaQueue,
    KubeAI,
    Observation,
    Scheduled,
    hindsight_schedule,
)

# Output tokens/s of one replica by concurrent streams: the serving benchmark's closed loop for
# llamaherd (bench/results/results.json, `make bench`), 2-core CPU, ~220M-parameter model.
BENCH_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "results.json"
# Used only when there are no benchmark results: llama-batched-bench's decode rates for the same
# shape of model on this kind of machine (../shared/FIELD-NOTES.md).
FALLBACK_THROUGHPUT = {1: 100.0, 2: 151.0, 4: 244.0, 8: 341.0, 16: 499.0}


def benchmark_throughput(path: Path = BENCH_RESULTS, max_streams: int = 16) -> dict[int, float]:
    """llamaherd's measured tokens/s by concurrency, up to ``max_streams`` (the slots)."""
    if not path.exists():
        return dict(FALLBACK_THROUGHPUT)
    closed = json.loads(path.read_text())["closed_loop"]["llamaherd"]
    return {int(c): float(p["tokens_per_s"]) for c, p in closed.items() if int(c) <= max_streams}


def throughput_at(curve: dict[int, float], batch: int) -> float:
    """Tokens/s at ``batch`` sequences, linear between measured points."""
    if batch <= 0:
        return 0.0
    xs = sorted(curve)
    if batch >= xs[-1]:
        return curve[xs[-1]]
    i = bisect.bisect_left(xs, batch)
    if xs[i] == batch:
        return curve[batch]
    lo, hi = xs[i - 1], xs[i]
    return curve[lo] + (curve[hi] - curve[lo]) * (batch - lo) / (hi - lo)


TRACES: dict[str, Callable[[float], float]] = {
    # Load at time t (seconds) in units of one replica's capacity (requests/s that one replica
    # serves with every slot busy), so the traces mean the same whatever the throughput curve;
    # a 40-minute day in miniature.
    "spike": lambda t: 0.4 if t < 600 or t >= 1500 else 3.6,
    "ramp": lambda t: 0.13 + 3.47 * min(1.0, t / 1800),
    "diurnal": lambda t: 1.8 + 1.55 * math.sin(2 * math.pi * t / 2400 - math.pi / 2),
    "oscillating": lambda t: 3.1 if int(t // 120) % 2 else 0.5,
}


@dataclass
class Config:
    trace: str = "spike"
    duration_s: int = 2400
    seed: int = 7
    output_tokens: int = 128
    slots: int = 16
    cold_start_s: float = 60.0
    period_s: float = 15.0
    # The SLO: 2.5 x the latency of one request on a replica whose slots are all busy.
    slo_factor: float = 2.5
    min_replicas: int = 1
    max_replicas: int = 8
    target_queue_depth: float = 4.0
    fixed_replicas: int = 2
    hpa_target_cpu: float = 0.7
    # KubeAI's targetRequests: in-flight requests per replica, 80% of the slots.
    kubeai_target_requests: int = 13
    throughput: dict[int, float] = field(default_factory=benchmark_throughput)

    @property
    def replica_capacity(self) -> float:
        """Requests/s one replica finishes with every slot busy."""
        return throughput_at(self.throughput, self.slots) / self.output_tokens

    @property
    def slo_latency_s(self) -> float:
        per_stream = throughput_at(self.throughput, self.slots) / self.slots
        return round(self.slo_factor * self.output_tokens / per_stream, 1)

    def rate(self, t: float) -> float:
        """Arrivals per second at time t."""
        return TRACES[self.trace](t) * self.replica_capacity


@dataclass
class Request:
    arrival: float
    remaining: float
    done: float | None = None


@dataclass
class Replica:
    ready_at: float
    running: list[Request] = field(default_factory=list)
    leaving: bool = False
    busy_seconds: deque[int] = field(default_factory=lambda: deque(maxlen=60))


@dataclass
class Result:
    policy: str
    slo_attainment: float
    latency_p50_s: float
    latency_p95_s: float
    replica_seconds: float
    scaling_actions: int
    requests: int
    timeline: dict[str, list[float]]


def arrivals(cfg: Config) -> list[float]:
    rng = np.random.default_rng(cfg.seed)
    rate = cfg.rate
    times: list[float] = []
    for second in range(cfg.duration_s):
        n = rng.poisson(rate(second))
        times.extend(sorted(second + rng.random(n)))
    return times


POLICIES = ("llamaherd", "fixed", "keda-queue", "kubeai", "hpa-cpu", "hindsight")


class Scaler(Protocol):
    @property
    def interval_s(self) -> float: ...

    def desired(self, obs: Observation) -> int: ...


@dataclass
class Llamaherd:
    """The operator's policy, fed what Prometheus would give it."""

    spec: ScalingSpec
    interval_s: float
    history: History = field(default_factory=History)
    latency_p95_s: float | None = None

    def desired(self, obs: Observation) -> int:
        metrics = Metrics(
            waiting=obs.waiting,
            running=obs.running,
            ready=obs.ready,
            latency_p95_s=self.latency_p95_s,
        )
        return decide(metrics, obs.current, obs.now, self.spec, self.history).desired


def scaler_for(cfg: Config, policy: str, arrival_times: list[float]) -> Scaler | None:
    """The autoscaler behind ``policy`` (None: a fixed fleet)."""
    lo, hi = cfg.min_replicas, cfg.max_replicas
    if policy == "fixed":
        return None
    if policy == "llamaherd":
        spec = ScalingSpec(
            min_replicas=lo,
            max_replicas=hi,
            target_queue_depth=cfg.target_queue_depth,
            slots=cfg.slots,
        )
        return Llamaherd(spec, cfg.period_s)
    if policy == "keda-queue":
        return KedaQueue(HPA(max(1, lo), hi), cfg.target_queue_depth, min_replicas=lo)
    if policy == "kubeai":
        return KubeAI(lo, hi, target_requests=cfg.kubeai_target_requests)
    if policy == "hpa-cpu":
        return CpuHPA(HPA(max(1, lo), hi), cfg.hpa_target_cpu)
    if policy == "hindsight":
        schedule = hindsight_schedule(
            arrival_times,
            cfg.duration_s,
            cfg.replica_capacity,
            cfg.cold_start_s,
            cfg.period_s,
            lo,
            hi,
        )
        return Scheduled(schedule, lo)
    raise ValueError(f"unknown policy {policy!r}")


def cpu_utilization(replica: Replica) -> float:
    """The replica's CPU use over its CPU request, as metrics-server reports it.

    llama.cpp runs all its threads on every decode step whatever the batch, and its CPU
    request is the cores those threads use, so utilization is the fraction of the last minute
    (metrics-server's usage window) in which the replica decoded at least one sequence.
    """
    return float(np.mean(replica.busy_seconds)) if replica.busy_seconds else 0.0


def simulate(cfg: Config, policy: str, arrival_times: list[float]) -> Result:
    replicas = [
        Replica(ready_at=0.0)
        for _ in range(cfg.fixed_replicas if policy == "fixed" else cfg.min_replicas)
    ]
    queue: deque[Request] = deque()
    finished: list[Request] = []
    scaler = scaler_for(cfg, policy, arrival_times)
    actions = 0
    timeline: dict[str, list[float]] = {
        "t": [],
        "rate": [],
        "replicas": [],
        "ready": [],
        "waiting": [],
        "p95": [],
    }
    pending = deque(Request(t, cfg.output_tokens) for t in arrival_times)
    replica_seconds = 0.0
    for now in range(cfg.duration_s + 600):  # 10 more minutes to finish what is left
        while pending and pending[0].arrival < now + 1:
            queue.append(pending.popleft())
        ready = [r for r in replicas if r.ready_at <= now and not r.leaving]
        # Admit: least-loaded ready replica first (a balancer that sees free slots).
        for replica in sorted(ready, key=lambda r: len(r.running)):
            while queue and len(replica.running) < cfg.slots:
                replica.running.append(queue.popleft())
        for replica in replicas:
            if replica.ready_at > now:
                continue
            n = len(replica.running)
            replica.busy_seconds.append(1 if n else 0)
            if not n:
                continue
            per_sequence = throughput_at(cfg.throughput, n) / n
            for req in list(replica.running):
                req.remaining -= per_sequence
                if req.remaining <= 0:
                    req.done = now + 1
                    replica.running.remove(req)
                    finished.append(req)
        replicas = [r for r in replicas if not (r.leaving and not r.running)]
        replica_seconds += len(replicas)

        recent = [r.done - r.arrival for r in finished[-500:] if r.done and r.done > now - 60]
        if scaler is not None and now % scaler.interval_s == 0:
            current = sum(1 for r in replicas if not r.leaving)
            ready = [r for r in replicas if r.ready_at <= now and not r.leaving]
            if isinstance(scaler, Llamaherd):
                scaler.latency_p95_s = float(np.percentile(recent, 95)) if recent else None
            obs = Observation(
                now=float(now),
                current=current,
                ready=len(ready),
                waiting=len(queue),
                running=sum(len(r.running) for r in ready),
                cpu_utilization=tuple(cpu_utilization(r) for r in ready),
            )
            desired = scaler.desired(obs)
            if desired != current:
                actions += 1
                _resize(replicas, current, desired, now + cfg.cold_start_s)
        timeline["t"].append(now)
        timeline["rate"].append(cfg.rate(now) if now < cfg.duration_s else 0.0)
        timeline["replicas"].append(sum(1 for r in replicas if not r.leaving))
        timeline["ready"].append(len(ready))
        timeline["waiting"].append(len(queue))
        timeline["p95"].append(float(np.percentile(recent, 95)) if recent else float("nan"))
        if (
            now >= cfg.duration_s
            and not queue
            and not pending
            and not any(r.running for r in replicas)
        ):
            break
    latencies = np.array([r.done - r.arrival for r in finished if r.done is not None])
    return Result(
        policy=policy,
        slo_attainment=float(np.mean(latencies <= cfg.slo_latency_s)) if len(latencies) else 0,
        latency_p50_s=float(np.percentile(latencies, 50)) if len(latencies) else 0.0,
        latency_p95_s=float(np.percentile(latencies, 95)) if len(latencies) else 0.0,
        replica_seconds=replica_seconds,
        scaling_actions=actions,
        requests=len(arrival_times),
        timeline=timeline,
    )


def _resize(replicas: list[Replica], current: int, desired: int, ready_at: float) -> None:
    if desired > current:
        replicas.extend(Replica(ready_at=ready_at) for _ in range(desired - current))
        return
    # Remove the least busy first; cold ones before warm ones.
    active = sorted(
        (r for r in replicas if not r.leaving), key=lambda r: (-r.ready_at, len(r.running))
    )
    for replica in active[: current - desired]:
        replica.leaving = True


def plot(results: list[Result], cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    base = results[0].timeline
    minutes = np.array(base["t"]) / 60
    axes[0].plot(minutes, base["rate"], color="black")
    axes[0].set_ylabel("arrivals (req/s)")
    axes[0].set_title(
        f"fleet simulator: trace '{cfg.trace}', {cfg.slots} slots/replica, "
        f"cold start {cfg.cold_start_s:.0f}s"
    )
    for res in results:
        t = np.array(res.timeline["t"]) / 60
        label = f"{res.policy}: SLO {res.slo_attainment:.1%}, {res.replica_seconds:.0f} replica-s"
        axes[1].step(t, res.timeline["replicas"], where="post", label=label)
        axes[2].plot(t, res.timeline["p95"], label=res.policy)
    axes[1].set_ylabel("replicas")
    axes[1].legend(loc="upper left", fontsize="small")
    axes[2].axhline(cfg.slo_latency_s, color="red", linestyle="--", label="SLO")
    axes[2].set_ylabel("p95 latency, last minute (s)")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("minutes")
    axes[2].legend(loc="upper left", fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_summary(out: Path, path: Path) -> None:
    """SLO attainment against replica-seconds, every policy on every trace in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(out.glob("fleet-*.json"))
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 4.2), squeeze=False)
    for ax, run in zip(axes[0], runs, strict=True):
        summary = json.loads(run.read_text())
        for i, res in enumerate(summary["results"]):
            ax.scatter(
                res["replica_seconds"],
                100 * res["slo_attainment"],
                color=f"C{i}",
                marker="*" if res["policy"] == "llamaherd" else "o",
                s=140 if res["policy"] == "llamaherd" else 50,
                label=res["policy"],
            )
        ax.set_title(f"trace '{summary['config']['trace']}'")
        ax.set_xlabel("replica-seconds")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("SLO attainment (%)")
    axes[0][0].legend(loc="lower right", fontsize="small")
    fig.suptitle("fleet simulator: every policy on every trace (up and left is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_all(cfg: Config) -> list[Result]:
    times = arrivals(cfg)
    return [simulate(cfg, policy, times) for policy in POLICIES]


def table(results: list[Result], cfg: Config) -> str:
    lines = [
        f"| policy | SLO attainment (latency <= {cfg.slo_latency_s:g}s) | p50 | p95 "
        "| replica-seconds | scaling actions |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        name = f"fixed ({cfg.fixed_replicas})" if r.policy == "fixed" else r.policy
        lines.append(
            f"| {name} | {r.slo_attainment:.1%} | {r.latency_p50_s:.1f}s | "
            f"{r.latency_p95_s:.1f}s | {r.replica_seconds:.0f} | "
            f"{r.scaling_actions} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", choices=sorted(TRACES), default="spike")
    parser.add_argument("--out", type=Path, default=Path("simulator/results"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    cfg = Config(trace=args.trace, seed=args.seed)
    results = run_all(cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, cfg, args.out / f"fleet-{cfg.trace}.png")
    summary = {
        "config": asdict(cfg),
        "results": [{k: v for k, v in asdict(r).items() if k != "timeline"} for r in results],
    }
    (args.out / f"fleet-{cfg.trace}.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_summary(args.out, args.out / "fleet-summary.png")
    md = table(results, cfg)
    (args.out / f"fleet-{cfg.trace}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
