"""Every Prometheus metric the server exports: the contract that the autoscaler, the
dashboards and the alerts read. Change a name here and the contract tests say who breaks.
"""

from __future__ import annotations

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

# 5 ms to 10 minutes, roughly x2 apart.
LATENCY_BUCKETS = (
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
        self.time_to_first_token = Histogram(
            TIME_TO_FIRST_TOKEN,
            "Arrival to first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            INTER_TOKEN_LATENCY,
            "Time between consecutive generated tokens of one sequence.",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            QUEUE_WAIT, "Arrival to admission into a slot.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter(PROMPT_TOKENS, "Prompt tokens prefilled.", registry=r)
        self.prompt_cached_tokens = Counter(
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
        self.generated_tokens = Counter(GENERATED_TOKENS, "Tokens generated.", registry=r)
        self.requests = Counter(REQUESTS, "Finished requests by outcome.", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        self.batch_size = Histogram(
            BATCH_SIZE, "Sequences in one llama_decode call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            BATCH_TOKENS,
            "Tokens in one llama_decode call (decode plus prefill).",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.decode_step = Histogram(
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
