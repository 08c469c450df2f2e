"""The fleet simulator replays traces through the real policy: deterministic, and the policy
keeps its promises against the baselines on every trace."""

import json
from dataclasses import asdict

import pytest

from simulator.fleet import TRACES, Config, arrivals, run_all, simulate, throughput_at


def test_throughput_curve_interpolates_between_measured_points() -> None:
    curve = {1: 100.0, 2: 150.0, 4: 250.0}
    assert throughput_at(curve, 3) == 200.0
    assert throughput_at(curve, 9) == 250.0
    assert throughput_at(curve, 0) == 0.0


def test_same_seed_same_result() -> None:
    cfg = Config(trace="spike", duration_s=900)
    times = arrivals(cfg)
    assert times == arrivals(cfg)
    a, b = simulate(cfg, "llamaherd", times), simulate(cfg, "llamaherd", times)
    # (compared as text: the timeline holds NaN where no request finished, and NaN != NaN)
    assert json.dumps(asdict(a)) == json.dumps(asdict(b))


@pytest.mark.parametrize("trace", sorted(TRACES))
def test_llamaherd_meets_the_slo_more_cheaply_than_a_cpu_hpa(trace: str) -> None:
    cfg = Config(trace=trace)
    ours, fixed, hpa = run_all(cfg)
    assert ours.replica_seconds < hpa.replica_seconds
    assert ours.slo_attainment >= 0.85
    assert ours.slo_attainment > fixed.slo_attainment
    # Every request of the trace finished.
    assert ours.requests == len(arrivals(cfg))
