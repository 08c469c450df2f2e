"""The gateway's routing decisions (llamaherd_gateway.routing) without a network: tables of
cases, and properties over generated registries, loads and clocks (hypothesis)."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamaherd_gateway import picker, routing
from llamaherd_gateway.proxy import GatewayError
from llamaherd_gateway.registry import Endpoint, Key, ServiceInfo
from llamaherd_gateway.routing import (
    CONNECT,
    EVERY_REPLICA_TRIED,
    MAY_HAVE_RUN,
    NO_READY_REPLICA,
    RETRYABLE,
    SCALE_RETRY_S,
    TIMEOUT,
    UNSENT,
    UNSTARTED,
    Chosen,
    Forward,
    Hold,
    HoldLimits,
    Refuse,
)

LIMITS = HoldLimits(max_held=3, timeout_s=30.0, retry_after=10)
A, B, C = (Endpoint(f"10.0.0.{i}", 8080, f"pod-{i}") for i in (1, 2, 3))


def svc(name: str, weight: int = 100, replicas: int = 1, autoscaled: bool = False) -> ServiceInfo:
    return ServiceInfo("ns", name, (name,), weight=weight, replicas=replicas, autoscaled=autoscaled)


class NoRandom(random.Random):
    """A generator that fails when drawn from: the decision must not need one."""

    def random(self) -> float:
        raise AssertionError("drew a random number")


def assert_carries_a_reason(refusal: Refuse) -> None:
    assert 400 <= refusal.status < 600
    assert refusal.message and refusal.outcome
    assert refusal.type in ("invalid_request_error", "server_error")


# ---- the model --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "services", "status", "code", "outcome", "message"),
    [
        (
            "",
            [],
            400,
            None,
            "bad_request",
            "the request names no model: the field 'model' must be a non-empty string",
        ),
        (
            "ghost",
            [],
            404,
            "model_not_found",
            "not_found",
            "The model 'ghost' does not exist: no InferenceService serves it here "
            "(GET /v1/models lists the models)",
        ),
    ],
)
def test_a_request_naming_no_served_model_is_refused(
    model: str,
    services: list[ServiceInfo],
    status: int,
    code: str | None,
    outcome: str,
    message: str,
) -> None:
    refusal = routing.model_refusal(model, services)
    assert refusal == Refuse(status, code, message, outcome, param="model")


def test_a_served_model_is_routed() -> None:
    assert routing.model_refusal("m", [svc("m")]) is None


# ---- the service ------------------------------------------------------------------------------


def chosen_name(
    services: list[ServiceInfo], ready: dict[Key, list[Endpoint]], rng: random.Random
) -> str:
    chosen = routing.choose_service(services, ready, rng)
    assert chosen is not None
    return chosen.service.name


def test_no_ready_service_is_no_choice() -> None:
    services = [svc("a"), svc("b")]
    assert routing.choose_service(services, {}, NoRandom()) is None
    assert routing.choose_service(services, {("ns", "a"): []}, NoRandom()) is None


def test_the_one_ready_service_is_chosen_without_a_draw() -> None:
    a, b = svc("a"), svc("b")
    chosen = routing.choose_service([a, b], {b.key: [A, B]}, NoRandom())
    assert chosen == Chosen(b, [A, B])


def test_weight_zero_gets_nothing_while_another_is_ready() -> None:
    live, dark = svc("live", weight=5), svc("dark", weight=0)
    rng = random.Random(1)
    ready = {live.key: [A], dark.key: [B]}
    picks = {chosen_name([live, dark], ready, rng) for _ in range(200)}
    assert picks == {"live"}


def test_the_split_follows_the_weights() -> None:
    big, small = svc("big", weight=90), svc("small", weight=10)
    rng = random.Random(7)
    ready = {big.key: [A], small.key: [B]}
    names = [chosen_name([big, small], ready, rng) for _ in range(2000)]
    assert 0.05 < names.count("small") / len(names) < 0.15


# ---- holding ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "expected"),
    [
        (0, Hold(NO_READY_REPLICA, 130.0)),
        (2, Hold(NO_READY_REPLICA, 130.0)),
        (
            3,
            Refuse(
                503,
                "hold_full",
                "no ready replica for model 'm' and 3 requests already wait "
                "(max_held_requests 3); retry later",
                "hold_full",
                type="server_error",
                retry_after=10,
            ),
        ),
    ],
)
def test_holds_are_bounded_in_number(held: int, expected: Hold | Refuse) -> None:
    assert routing.admit_hold("m", held, LIMITS, now=100.0) == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (100.0, SCALE_RETRY_S),  # far from the end: look again after SCALE_RETRY_S
        (129.5, 0.5),  # never waits past the end
        (
            130.0,
            Refuse(
                503,
                "hold_timeout",
                "no ready replica for model 'm' within the hold time (30s); retry later",
                "hold_timeout",
                type="server_error",
                retry_after=10,
            ),
        ),
    ],
)
def test_holds_are_bounded_in_time(now: float, expected: float | Refuse) -> None:
    assert routing.keep_holding("m", Hold(NO_READY_REPLICA, 130.0), LIMITS, now) == expected


def test_the_hold_waits_for_the_service_by_weight() -> None:
    services = [svc("a", weight=0), svc("b", weight=1)]
    assert {routing.hold_target(services, random.Random(i)).name for i in range(50)} == {"b"}


@pytest.mark.parametrize(
    ("service", "enabled", "scaling", "last_tried", "wake"),
    [
        (svc("m", replicas=0, autoscaled=True), True, False, None, True),
        (svc("m", replicas=0, autoscaled=True), True, False, 100.0 - SCALE_RETRY_S, True),
        (svc("m", replicas=0, autoscaled=True), True, False, 99.0, False),  # tried just now
        (svc("m", replicas=0, autoscaled=True), True, True, None, False),  # under way
        (svc("m", replicas=0, autoscaled=True), False, False, None, False),  # scaling off
        (svc("m", replicas=0, autoscaled=False), True, False, None, False),  # not autoscaled
        (svc("m", replicas=1, autoscaled=True), True, False, None, False),  # not at zero
    ],
)
def test_a_service_is_woken_from_zero_once_at_a_time(
    service: ServiceInfo, enabled: bool, scaling: bool, last_tried: float | None, wake: bool
) -> None:
    got = routing.should_wake(
        service, enabled=enabled, scaling=scaling, last_tried=last_tried, now=100.0
    )
    assert got is wake


# ---- the replica ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoints", "current", "tried", "ejected", "percent", "expected"),
    [
        ([A, B, C], [A, B, C], set(), {}, 50, [A, B, C]),
        ([A, B, C], [A, B, C], {A}, {}, 50, [B, C]),
        ([A, B, C], [A, B, C], set(), {B: 1.0}, 50, [A, C]),  # ejected: out
        ([A, B, C], [A, B, C], set(), {B: 1.0, C: 2.0}, 50, [A, C]),  # floor: one out of three
        ([A, B], [A, B], set(), {A: 1.0, B: 2.0}, 100, [A, B]),  # never none
        ([A, B], [A, B, C], {A, B}, {}, 50, [C]),  # the endpoints changed since
        ([A, B], [A, B], {A}, {B: 1.0}, 50, [B]),  # only an ejected one left: it goes
        ([A, B], [A, B], {A, B}, {}, 50, []),  # every one tried
    ],
)
def test_candidates(
    endpoints: list[Endpoint],
    current: list[Endpoint],
    tried: set[Endpoint],
    ejected: dict[Endpoint, float],
    percent: int,
    expected: list[Endpoint],
) -> None:
    assert routing.candidates(endpoints, current, tried, ejected, percent) == expected


def test_the_affinity_replica_takes_its_key_within_the_bound() -> None:
    loads = {A: 0, B: 0, C: 0}
    first = routing.pick("the same prompt", [A, B, C], loads, 0.0, random.Random(0))
    assert first.reason == picker.AFFINITY
    for seed in range(20):  # the same key: the same replica, whatever the draw
        assert routing.pick("the same prompt", [A, B, C], loads, 0.0, random.Random(seed)) == first
    busy = {**loads, first.endpoint: 5}
    other = routing.pick("the same prompt", [A, B, C], busy, 0.0, random.Random(0))
    assert other.reason == picker.LEAST_LOADED and other.endpoint != first.endpoint


def test_no_key_goes_to_the_least_loaded() -> None:
    forward = routing.pick("", [A, B, C], {A: 3, B: 1, C: 2}, 0.0, random.Random(0))
    assert forward == Forward(B, picker.LEAST_LOADED)


@pytest.mark.parametrize(
    ("endpoints", "tried", "now", "expected"),
    [
        ([B], {A}, 10.0, Forward(B, picker.LEAST_LOADED)),
        ([], {A, B}, 10.0, Hold(EVERY_REPLICA_TRIED, 20.0)),
        (
            [],
            {A, B},
            20.0,
            Refuse(
                502,
                "upstream_unavailable",
                "no replica of ns/m accepted the request (tried 2)",
                "unavailable",
                type="server_error",
            ),
        ),
        (
            [],
            set(),
            10.0,
            Refuse(
                502,
                "upstream_unavailable",
                "no replica of ns/m accepted the request (tried 0)",
                "unavailable",
                type="server_error",
            ),
        ),
    ],
)
def test_attempt(
    endpoints: list[Endpoint], tried: set[Endpoint], now: float, expected: routing.Decision
) -> None:
    loads = dict.fromkeys(endpoints, 0)
    got = routing.attempt("", svc("m"), endpoints, tried, loads, 0.0, now, 20.0, random.Random(0))
    assert got == expected


# ---- failures and answers ---------------------------------------------------------------------


def classify(
    connected: bool, handed_over: bool, timed_out: bool, closed: bool, streamed: bool
) -> str:
    return routing.classify_failure(
        connected=connected,
        handed_over=handed_over,
        timed_out=timed_out,
        closed=closed,
        streamed=streamed,
    )


@pytest.mark.parametrize(
    ("connected", "handed_over", "timed_out", "closed", "streamed", "kind"),
    [
        (False, False, False, True, False, CONNECT),
        (False, False, True, False, True, CONNECT),  # a connect timeout
        (True, False, False, True, False, UNSENT),
        (True, False, True, False, False, UNSENT),
        (True, True, True, False, True, TIMEOUT),
        (True, True, True, True, False, TIMEOUT),
        (True, True, False, True, True, UNSTARTED),
        (True, True, False, True, False, MAY_HAVE_RUN),
        (True, True, False, False, True, MAY_HAVE_RUN),  # garbage from the replica
    ],
)
def test_failure_kinds(
    connected: bool, handed_over: bool, timed_out: bool, closed: bool, streamed: bool, kind: str
) -> None:
    assert classify(connected, handed_over, timed_out, closed, streamed) == kind


@pytest.mark.parametrize("kind", sorted(RETRYABLE))
def test_a_failure_where_the_replica_cannot_have_started_is_tried_again(kind: str) -> None:
    assert routing.after_failure(kind, "replica 10.0.0.1:8080", "Err()", 30.0) is None


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (
            TIMEOUT,
            Refuse(
                504,
                "upstream_timeout",
                "replica 10.0.0.1:8080 did not answer in 2.5s",
                "unavailable",
                type="server_error",
            ),
        ),
        (
            MAY_HAVE_RUN,
            Refuse(
                502,
                "upstream_error",
                "replica 10.0.0.1:8080 failed after the request was sent (Err()); it may have "
                "run, so it is not sent again",
                "unavailable",
                type="server_error",
            ),
        ),
    ],
)
def test_a_failure_after_the_request_went_is_never_tried_again(kind: str, expected: Refuse) -> None:
    assert routing.after_failure(kind, "replica 10.0.0.1:8080", "Err()", 2.5) == expected


@pytest.mark.parametrize(
    ("status", "outcome", "failure"),
    [
        (200, "ok", False),
        (302, "ok", False),
        (400, "upstream_4xx", False),
        (429, "upstream_4xx", False),
        (500, "upstream_5xx", True),
        (503, "upstream_5xx", True),
    ],
)
def test_answers(status: int, outcome: str, failure: bool) -> None:
    assert routing.answer_outcome(status) == outcome
    assert routing.counts_as_failure(status) is failure


def test_an_unfinished_request_whose_answer_was_whole_is_ok() -> None:
    assert routing.unfinished_outcome(True, "cancelled") == "ok"
    assert routing.unfinished_outcome(False, "cancelled") == "cancelled"
    assert routing.unfinished_outcome(False, "upstream_broken") == "upstream_broken"


def test_a_refusal_becomes_the_gateways_openai_error() -> None:
    refusal = routing.admit_hold("m", 3, LIMITS, 0.0)
    assert isinstance(refusal, Refuse)
    err = GatewayError.refusing(refusal)
    assert (err.status, err.outcome, err.headers()) == (503, "hold_full", [(b"retry-after", b"10")])
    assert (
        err.body()
        == GatewayError(
            503, refusal.message, "hold_full", type="server_error", code="hold_full", retry_after=10
        ).body()
    )


# ---- properties -------------------------------------------------------------------------------

ENDPOINTS = [Endpoint(f"10.0.{i // 4}.{i % 4}", 8080 + i % 2, f"pod-{i}") for i in range(8)]
endpoint_lists = st.lists(st.sampled_from(ENDPOINTS), unique=True, max_size=6)
services_st = st.lists(
    st.builds(
        svc,
        st.sampled_from(["m", "m-canary", "m-b"]),
        weight=st.integers(0, 100),
        replicas=st.integers(0, 3),
        autoscaled=st.booleans(),
    ),
    unique_by=lambda s: s.name,
    max_size=3,
)
times = st.floats(0, 1e6, allow_nan=False)


def first_decision(
    model: str,
    services: list[ServiceInfo],
    ready: dict[Key, list[Endpoint]],
    held: int,
    key: str,
    loads: dict[Endpoint, int],
    now: float,
    rng: random.Random,
) -> routing.Decision:
    """What the proxy does with a fresh request, as one decision (no outliers, nothing tried)."""
    refusal = routing.model_refusal(model, services)
    if refusal is not None:
        return refusal
    chosen = routing.choose_service(services, ready, rng)
    if chosen is None:
        return routing.admit_hold(model, held, LIMITS, now)
    found = routing.candidates(chosen.endpoints, chosen.endpoints, set(), {}, 50)
    return routing.attempt(key, chosen.service, found, set(), loads, 1.0, now, now + 1, rng)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["", "m", "other"]),
    services_st,
    st.data(),
    st.integers(0, 5),
    st.text(max_size=8),
    times,
    st.randoms(use_true_random=False),
)
def test_every_decision_is_a_ready_replica_a_bounded_hold_or_a_refusal_with_a_reason(
    model: str,
    services: list[ServiceInfo],
    data: Any,
    held: int,
    key: str,
    now: float,
    rng: random.Random,
) -> None:
    served = [s for s in services if model and s.name.startswith(model)]
    ready = {s.key: data.draw(endpoint_lists) for s in services}
    loads = {ep: data.draw(st.integers(0, 20)) for ep in ENDPOINTS}
    decision = first_decision(model, served, ready, held, key, loads, now, rng)
    if isinstance(decision, Refuse):
        assert_carries_a_reason(decision)
    elif isinstance(decision, Hold):
        assert decision.reason == NO_READY_REPLICA
        assert now < decision.until <= now + LIMITS.timeout_s
        assert not any(ready[s.key] for s in served)  # held only when none is ready
    else:
        assert decision.reason in picker.REASONS
        assert any(decision.endpoint in ready[s.key] for s in served)


@settings(max_examples=200, deadline=None)
@given(times, st.floats(0.1, 600), st.lists(st.floats(0, 5), max_size=40))
def test_a_hold_never_outlasts_its_bound(start: float, timeout_s: float, late: list[float]) -> None:
    """Waiting as told (each wake-up possibly late), a held request is refused by the end of
    its bound plus one late wake-up, never later; and it is never refused before the bound."""
    limits = HoldLimits(max_held=1, timeout_s=timeout_s, retry_after=1)
    hold = routing.admit_hold("m", 0, limits, start)
    assert isinstance(hold, Hold)
    now = start
    for extra in itertools.chain(late, itertools.repeat(0.0, 1000)):
        wait = routing.keep_holding("m", hold, limits, now)
        if isinstance(wait, Refuse):
            assert_carries_a_reason(wait)
            assert hold.until <= now <= hold.until + max(late, default=0.0) + 1e-6  # rounding
            return
        assert 0 < wait <= min(SCALE_RETRY_S, hold.until - now)
        now += wait + extra
    raise AssertionError("the hold never ended")


@settings(max_examples=300, deadline=None)
@given(
    endpoint_lists,
    endpoint_lists,
    st.sets(st.sampled_from(ENDPOINTS)),
    st.dictionaries(st.sampled_from(ENDPOINTS), st.floats(0, 100)),
    st.integers(0, 100),
)
def test_candidates_are_ready_untried_and_never_all_ejected(
    endpoints: list[Endpoint],
    current: list[Endpoint],
    tried: set[Endpoint],
    ejected: dict[Endpoint, float],
    percent: int,
) -> None:
    found = routing.candidates(endpoints, current, tried, ejected, percent)
    assert not set(found) & tried
    assert set(found) <= set(endpoints) | set(current)
    if any(ep not in tried and ep not in ejected for ep in endpoints):
        assert found and set(found) <= set(endpoints)  # the chosen endpoints first
    if not found:  # an ejected one of the chosen, gone from the current endpoints, is not tried
        assert set(current) <= tried


@settings(max_examples=300, deadline=None)
@given(
    st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.floats(0.1, 99)
)
def test_only_a_request_the_replica_cannot_have_started_is_tried_again(
    connected: bool,
    handed_over: bool,
    timed_out: bool,
    closed: bool,
    streamed: bool,
    timeout_s: float,
) -> None:
    kind = classify(connected, handed_over, timed_out, closed, streamed)
    refusal = routing.after_failure(kind, "replica x:1", "Err()", timeout_s)
    cannot_have_started = not connected or not handed_over or (streamed and closed)
    if refusal is None:
        assert cannot_have_started and not (connected and handed_over and timed_out)
    else:
        assert_carries_a_reason(refusal)
        assert refusal.status in (502, 504)
    if connected and handed_over and not streamed:  # the whole request went: maybe it ran
        assert refusal is not None
