"""The gateway's routing decisions: pure functions over a snapshot, like the autoscaling
policy's ``decide``. :mod:`llamaherd_gateway.proxy` gathers the inputs (the request's model
and affinity key, the registry's view, each replica's load, the clock) and performs what comes
out: forward to a replica (:class:`Forward`), hold the request (:class:`Hold`), or refuse it
(:class:`Refuse`, an OpenAI-style error). No I/O here, no clock read, no asyncio: randomness
comes in as a ``random.Random`` and time as ``now``.

The stages of one request, in order:

1. :func:`model_refusal`: a request naming no model is a 400; a model no service serves, 404.
2. :func:`choose_service`: a service by weight among those with a ready endpoint
   (:func:`llamaherd_gateway.picker.pick_weighted`); none: the request is held.
3. Holding (:func:`admit_hold`, :func:`keep_holding`): at most ``max_held`` requests wait, each
   at most ``timeout_s``, looking again at least every ``SCALE_RETRY_S``; meanwhile an
   autoscaled service at zero replicas is raised to one (:func:`should_wake`).
4. :func:`attempt`: for each try, a replica among those not tried yet and not ejected
   (:func:`candidates`, :func:`llamaherd_gateway.picker.pick_replica`); when every ready
   replica was tried, hold for a new one within the hold time; then 502.
5. After a failure before the response headers (:func:`classify_failure`,
   :func:`after_failure`): another try only where the replica cannot have started the
   request; else 504 (no answer in time) or 502 (it may have run: never sent again).
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from llamaherd_gateway import picker
from llamaherd_gateway.registry import Endpoint, Key, ServiceInfo

# Longest wait of a held request between two looks (and between two scale-ups of a service).
SCALE_RETRY_S = 2.0

# How a request to one replica failed before its response headers (classify_failure):
CONNECT = "connect"  # never connected: refused, connect timeout
UNSENT = "unsent"  # the connection broke before the request was handed over whole
UNSTARTED = "unstarted"  # streamed: closed before the headers, which come with a slot
TIMEOUT = "timeout"  # no response headers within upstream_timeout_seconds
MAY_HAVE_RUN = "may_have_run"  # closed (or answered garbage) after the whole request went
RETRYABLE = frozenset({CONNECT, UNSENT, UNSTARTED})
FAILURE_KINDS = (CONNECT, UNSENT, UNSTARTED, TIMEOUT, MAY_HAVE_RUN)

# Why a request waits (Hold.reason):
NO_READY_REPLICA = "no_ready_replica"  # no service of the model has a ready endpoint
EVERY_REPLICA_TRIED = "every_replica_tried"  # each ready one refused: wait for a new one


@dataclass(frozen=True)
class Forward:
    """Send the request to ``endpoint``; ``reason`` is the pick's (picker.REASONS)."""

    endpoint: Endpoint
    reason: str


@dataclass(frozen=True)
class Hold:
    """Wait for a ready replica, at most until ``until`` (the clock's time)."""

    reason: str
    until: float


@dataclass(frozen=True)
class Refuse:
    """Answer the request with an error of the gateway's own (OpenAI-shaped): ``outcome`` is
    the metric's and the log line's label for it."""

    status: int
    code: str | None
    message: str
    outcome: str
    type: str = "invalid_request_error"
    param: str | None = None
    retry_after: int | None = None


Decision = Forward | Hold | Refuse


@dataclass(frozen=True)
class Chosen:
    """A service with a ready endpoint, and its ready endpoints (never empty)."""

    service: ServiceInfo
    endpoints: Sequence[Endpoint]


@dataclass(frozen=True)
class HoldLimits:
    """The bounds on held requests (from the gateway's settings)."""

    max_held: int
    timeout_s: float
    retry_after: int


# ---- the model, the service ----
def model_refusal(model: str, services: Sequence[ServiceInfo]) -> Refuse | None:
    """Why a request for ``model`` ('' when the body names none: no field, or not a string),
    which ``services`` serve, cannot be routed; None when it can."""
    if not model:
        return Refuse(
            400,
            None,
            "the request names no model: the field 'model' must be a non-empty string",
            "bad_request",
            param="model",
        )
    if not services:
        return Refuse(
            404,
            "model_not_found",
            f"The model '{model}' does not exist: no InferenceService serves it here "
            "(GET /v1/models lists the models)",
            "not_found",
            param="model",
        )
    return None


def choose_service(
    services: Sequence[ServiceInfo],
    ready: Mapping[Key, Sequence[Endpoint]],
    rng: random.Random,
) -> Chosen | None:
    """A service by weight among those with a ready endpoint (``ready``: service key -> its
    ready endpoints), and its endpoints; None when none has one."""
    found = [Chosen(s, eps) for s in services if (eps := ready.get(s.key))]
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    return picker.pick_weighted(found, [c.service.weight for c in found], rng)


# ---- holding ----
def hold_target(services: Sequence[ServiceInfo], rng: random.Random) -> ServiceInfo:
    """The service a held request waits for (and counts for), by weight."""
    return picker.pick_weighted(services, [s.weight for s in services], rng)


def admit_hold(model: str, held: int, limits: HoldLimits, now: float) -> Hold | Refuse:
    """Hold a request that found no ready replica, while fewer than ``max_held`` wait."""
    if held >= limits.max_held:
        return Refuse(
            503,
            "hold_full",
            f"no ready replica for model '{model}' and {held} requests already wait "
            f"(max_held_requests {limits.max_held}); retry later",
            "hold_full",
            type="server_error",
            retry_after=limits.retry_after,
        )
    return Hold(NO_READY_REPLICA, now + limits.timeout_s)


def keep_holding(model: str, hold: Hold, limits: HoldLimits, now: float) -> float | Refuse:
    """A held request still without a ready replica at ``now``: how long to wait for a change
    before looking again (never past the hold's end), or the refusal once the hold is over."""
    left = hold.until - now
    if left <= 0:
        return Refuse(
            503,
            "hold_timeout",
            f"no ready replica for model '{model}' within the hold time "
            f"({limits.timeout_s:g}s); retry later",
            "hold_timeout",
            type="server_error",
            retry_after=limits.retry_after,
        )
    return min(left, SCALE_RETRY_S)


def should_wake(
    service: ServiceInfo, *, enabled: bool, scaling: bool, last_tried: float | None, now: float
) -> bool:
    """Whether to raise ``service`` from zero replicas to one now: an autoscaled service at
    zero, with scaling from zero ``enabled``, no scale-up of it under way (``scaling``) and
    none tried within ``SCALE_RETRY_S``."""
    if not enabled or service.replicas > 0 or not service.autoscaled or scaling:
        return False
    return last_tried is None or now - last_tried >= SCALE_RETRY_S


# ---- the replica ----
def untried(endpoints: Sequence[Endpoint], tried: Collection[Endpoint]) -> list[Endpoint]:
    return [ep for ep in endpoints if ep not in tried]


def candidates(
    endpoints: Sequence[Endpoint],
    current: Sequence[Endpoint],
    tried: Collection[Endpoint],
    ejected: Mapping[Endpoint, float],
    max_ejection_percent: int,
) -> list[Endpoint]:
    """The replicas a try may go to: those of ``endpoints`` (the service's, as chosen) that
    outlier detection leaves in (``ejected``: endpoint -> when it was ejected; never fewer than
    its floor) and that were not tried; if none, the same of ``current`` (the endpoints may
    have changed since), else the ejected ones of ``current`` not tried."""
    found = untried(picker.in_service(endpoints, ejected, max_ejection_percent), tried)
    if found:
        return found
    left_in = picker.in_service(current, ejected, max_ejection_percent)
    return untried(left_in, tried) or untried(current, tried)


def pick(
    key: str,
    endpoints: Sequence[Endpoint],
    loads: Mapping[Endpoint, int],
    factor: float,
    rng: random.Random,
) -> Forward:
    """The replica for a request with affinity ``key`` among ``endpoints`` (not empty), by
    their ``loads`` (:func:`llamaherd_gateway.picker.pick_replica`)."""
    by_url = {ep.url: ep for ep in endpoints}
    url, reason = picker.pick_replica(
        key, {url: loads[ep] for url, ep in by_url.items()}, factor, rng
    )
    return Forward(by_url[url], reason)


def attempt(
    key: str,
    service: ServiceInfo,
    endpoints: Sequence[Endpoint],
    tried: Collection[Endpoint],
    loads: Mapping[Endpoint, int],
    factor: float,
    now: float,
    until: float,
    rng: random.Random,
) -> Decision:
    """One try of a request: forward to one of ``endpoints`` (the candidates); with none left
    after some were tried, hold for a replica not tried yet until ``until``; then refuse."""
    if endpoints:
        return pick(key, endpoints, loads, factor, rng)
    if tried and now < until:
        return Hold(EVERY_REPLICA_TRIED, until)
    return no_replica_accepted(service, len(tried))


def no_replica_accepted(service: ServiceInfo, tried: int) -> Refuse:
    """The refusal once no replica is left to try, or the tries are spent."""
    return Refuse(
        502,
        "upstream_unavailable",
        f"no replica of {service.namespace}/{service.name} accepted the request (tried {tried})",
        "unavailable",
        type="server_error",
    )


# ---- failures and answers ----
def classify_failure(
    *, connected: bool, handed_over: bool, timed_out: bool, closed: bool, streamed: bool
) -> str:
    """What a failure before the response headers says about the request.

    Only the first three kinds are retried on another replica: there the replica cannot have
    started it. It never got the connection (``connect``: not ``connected``); or the connection
    broke before the request was handed over whole (``unsent``: ``handed_over`` turns true as
    the body's bytes go to the connection, so false means the replica cannot hold the whole
    request); or, for a streamed request, the connection ``closed`` before any response header:
    the llamaherd server sends a streamed response's headers only once a slot has taken the
    request, so before them it was at most queued (``unstarted``). No response headers in time
    (``timed_out``) is ``timeout``. A non-streamed request whose connection closes after it
    went whole may have run (``may_have_run``): it is never sent to a second replica."""
    if not connected:
        return CONNECT
    if not handed_over:
        return UNSENT
    if timed_out:
        return TIMEOUT
    if streamed and closed:
        return UNSTARTED
    return MAY_HAVE_RUN


def after_failure(kind: str, where: str, error: str, timeout_s: float) -> Refuse | None:
    """The answer to a request whose try at ``where`` failed (``error``) before the response
    headers: None when another replica may be tried (the replica cannot have started it)."""
    if kind in RETRYABLE:
        return None
    if kind == TIMEOUT:
        return Refuse(
            504,
            "upstream_timeout",
            f"{where} did not answer in {timeout_s:g}s",
            "unavailable",
            type="server_error",
        )
    return Refuse(
        502,
        "upstream_error",
        f"{where} failed after the request was sent ({error}); it may have run, so "
        "it is not sent again",
        "unavailable",
        type="server_error",
    )


def answer_outcome(status: int) -> str:
    """The outcome of a request the replica answered with ``status``."""
    if status < 400:
        return "ok"
    return "upstream_4xx" if status < 500 else "upstream_5xx"


def counts_as_failure(status: int) -> bool:
    """Whether an answer counts against the replica for outlier detection (its own 5xx)."""
    return status >= 500


def unfinished_outcome(answered: bool, outcome: str) -> str:
    """The outcome of a request that ended early: ``ok`` when the client already had the whole
    answer (an SSE stream's ``data: [DONE]``), else ``outcome``."""
    return "ok" if answered else outcome
