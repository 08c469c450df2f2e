"""Every Prometheus metric the server exports: the contract that the autoscaler, the
dashboards and the alerts read. Change a name here and the contract tests say who breaks.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# The *_created series double every counter and histogram for no use here.
disable_created_metrics()

# Names without the _total/_bucket suffixes that Prometheus adds to counters and histograms.
REQUESTS_WAITING = "llamaherd_requests_waiting"
REQUESTS_RUNNING = "llamaherd_requests_running"
SLOTS = "llamaherd_slots"
REQUEST_LATENCY = "llamaherd_request_latency_seconds"
TIME_TO_FIRST_TOKEN = "llamaherd_time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "llamaherd_inter_token_latency_seconds"
QUEUE_WAIT = "llamaherd_queue_wait_seconds"
PROMPT_TOKENS = "llamaherd_prompt_tokens"
PROMPT_CACHED_TOKENS = "llamaherd_prompt_cached_tokens"
PREFIX_CACHE_EVICTIONS = "llamaherd_prefix_cache_evictions"
PREFIX_CACHE_USAGE = "llamaherd_prefix_cache_usage_ratio"
PREFIX_CACHE_HOST_BYTES = "llamaherd_prefix_cache_host_bytes"
GENERATED_TOKENS = "llamaherd_generated_tokens"
REQUESTS = "llamaherd_requests"
BATCH_SIZE = "llamaherd_batch_size"
BATCH_TOKENS = "llamaherd_batch_tokens"
DECODE_STEP = "llamaherd_decode_step_seconds"
KV_CACHE_USAGE = "llamaherd_kv_cache_usage_ratio"
READY = "llamaherd_ready"

OUTCOMES = ("ok", "rejected", "timeout", "cancelled", "error")

# The one table that the server's, the gateway's and the operator's latency and duration
# buckets are cut from: 1 ms to 10 minutes, 1-2.5-5 steps to 10 s, then about x2 apart.
BUCKET_LADDER = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


def ladder_buckets(low: float, high: float, without: tuple[float, ...] = ()) -> tuple[float, ...]:
    """The ladder's steps from ``low`` to ``high`` (both included), less those ``without``."""
    return tuple(b for b in BUCKET_LADDER if low <= b <= high and b not in without)


# 5 ms to 10 minutes, roughly x2 apart.
LATENCY_BUCKETS = ladder_buckets(0.005, 600.0)
TOKEN_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.035,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
BATCH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class EngineHistogram:
    """A histogram that only the engine's scheduler thread writes: an observation is a
    bisect and two additions, without prometheus_client's lock (about a microsecond each, and
    the engine makes several per step and one per generated token). A scrape reads a copy;
    it may miss the observation being made at that instant, never corrupt one."""

    def __init__(
        self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        counts, total = list(self._counts), self._sum
        buckets, cumulative = [], 0
        for bound, count in zip((*self._bounds, math.inf), counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


class EngineCounter:
    """A counter that only the engine's scheduler thread increments (see EngineHistogram)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self._value = 0.0
        registry.register(self)

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self._value += amount

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, value=self._value)


class ServerMetrics:
    """The server's metrics, each in a registry of its own so that tests can run many."""

    def __init__(self, slots: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.requests_waiting = Gauge(
            REQUESTS_WAITING, "Requests waiting in the queue.", ["priority"], registry=r
        )
        # A series from the start, so that an idle server reads 0 rather than nothing.
        self.requests_waiting.labels(priority="0").set(0)
        self.requests_running = Gauge(
            REQUESTS_RUNNING, "Sequences holding a slot (prefilling or decoding).", registry=r
        )
        self.slots = Gauge(SLOTS, "Sequences the engine decodes together at most.", registry=r)
        self.slots.set(slots)
        self.request_latency = Histogram(
            REQUEST_LATENCY, "Arrival to last token.", buckets=LATENCY_BUCKETS, registry=r
        )
        # Written per step or per token by the scheduler thread only: lock-free.
        self.time_to_first_token = EngineHistogram(
            TIME_TO_FIRST_TOKEN,
            "Arrival to first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = EngineHistogram(
            INTER_TOKEN_LATENCY,
            "Time between consecutive generated tokens of one sequence.",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            QUEUE_WAIT, "Arrival to admission into a slot.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = EngineCounter(PROMPT_TOKENS, "Prompt tokens prefilled.", registry=r)
        self.prompt_cached_tokens = EngineCounter(
            PROMPT_CACHED_TOKENS,
            "Prompt tokens served from the prefix cache instead of prefilled.",
            registry=r,
        )
        self.prefix_cache_evictions = Counter(
            PREFIX_CACHE_EVICTIONS,
            "Cached prefixes evicted to make room for running work.",
            registry=r,
        )
        self.prefix_cache_usage = Gauge(
            PREFIX_CACHE_USAGE,
            "Share of the KV cache's cells held only by cached prefixes (0 to 1).",
            registry=r,
        )
        self.prefix_cache_host_bytes = Gauge(
            PREFIX_CACHE_HOST_BYTES,
            "Bytes of cached prefixes saved in host memory (out of the KV cache).",
            registry=r,
        )
        self.generated_tokens = EngineCounter(GENERATED_TOKENS, "Tokens generated.", registry=r)
        self.requests = Counter(REQUESTS, "Finished requests by outcome.", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        self.batch_size = EngineHistogram(
            BATCH_SIZE, "Sequences in one llama_decode call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = EngineHistogram(
            BATCH_TOKENS,
            "Tokens in one llama_decode call (decode plus prefill).",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.decode_step = EngineHistogram(
            DECODE_STEP,
            "Wall time of one engine iteration's llama_decode.",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            KV_CACHE_USAGE,
            "Share of the KV cache's cells that running requests hold (0 to 1).",
            registry=r,
        )
        self.ready = Gauge(READY, "1 while the server admits requests, else 0.", registry=r)

    def set_waiting(self, by_priority: dict[int, int]) -> None:
        for priority, count in by_priority.items():
            self.requests_waiting.labels(priority=str(priority)).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def exported_names() -> set[str]:
    """Every sample name a scrape of the server can show (with _total, _bucket, ...)."""
    names: set[str] = set()
    for metric in ServerMetrics(slots=1).registry.collect():
        names.add(metric.name)
        for sample in metric.samples:
            names.add(sample.name)
    return names
