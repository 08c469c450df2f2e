"""How much host memory the prefix cache may hold: sized from the container's memory limit.

A fixed host cache is wrong both ways: 512 MiB next to a 220M-parameter model at 8 x 2048
tokens (1.25 GiB resident after loading) in a 1.5 GiB pod gets the pod OOM-killed under load,
and in a 16 GiB pod it leaves gigabytes idle that would spare prefills. So unless
``prefix_cache_ram_mb`` is set, the cache gets half of what the memory limit leaves once the
model has loaded (measured then: weights, KV cache, compute buffers and the Python runtime are
all resident) and a working reserve is set aside::

    host = min(8 GiB, max(0, (limit - RSS after load - (64 MiB + 4 MiB x slots)) / 2))

The reserve covers what grows under load after loading: compute-buffer pages touched by the
first full steps and per-request objects (+35 MiB at 8 slots on bench/step_bench's short-step
model, +49 MiB on the ``bench`` preset, whose compute buffer is 67 MiB). The other half of what
is left absorbs what the host cache costs beyond its own bytes: saving a sequence copies its
cells twice on the way (a ctypes buffer, then ``bytes``; up to 2 x context_size x KV bytes per
token), and the allocator keeps freed copies (+28 MiB over the cache's bytes on the short-step
model). The cap is llama-server's own ``--cache-ram`` default: past it, prompts old enough to be
evicted from 8 GiB seldom come back. README.md's "Memory" paragraph has the whole budget.

The limit is ``memory_limit_mb`` (the operator passes ``limits.memory`` through the downward
API), else the cgroup's; without either the cache keeps the old fixed 512 MiB.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .cpus import CGROUP_ROOT, cgroup_memory_limit

log = logging.getLogger("llamaherd.server")

MIB = 1 << 20
DEFAULT_HOST_CACHE_MB = 512
HOST_CACHE_SHARE = 0.5
HOST_CACHE_CAP = 8192 * MIB
RESERVE_BASE = 64 * MIB
RESERVE_PER_SLOT = 4 * MIB

PROC_STATUS = Path("/proc/self/status")


def process_rss(status: Path = PROC_STATUS) -> int | None:
    """This process's resident memory in bytes (VmRSS: anonymous and mapped file pages, the
    model's included); None where /proc is missing."""
    try:
        text = status.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                return int(fields[1]) * 1024
    return None


def memory_limit(setting_mb: int | None, root: Path = CGROUP_ROOT) -> tuple[int | None, str]:
    """(the container's memory limit in bytes, where it came from); None when unknown."""
    if setting_mb:
        return setting_mb * MIB, "memory_limit_mb"
    limit = cgroup_memory_limit(root)
    if limit is not None:
        return limit, "cgroup"
    return None, "none"


def working_reserve(slots: int) -> int:
    """Bytes that grow under load beyond what is resident right after loading."""
    return RESERVE_BASE + RESERVE_PER_SLOT * max(slots, 0)


def host_cache_bytes(
    explicit_mb: int | None, limit: int | None, rss: int | None, slots: int
) -> int:
    """The host prefix cache's size in bytes: the explicit setting when there is one, else a
    share of what the limit leaves after the resident memory and the working reserve (capped),
    else the fixed default when the limit or the resident memory is unknown."""
    if explicit_mb is not None:
        return explicit_mb * MIB
    if limit is None or rss is None:
        return DEFAULT_HOST_CACHE_MB * MIB
    left = limit - rss - working_reserve(slots)
    return int(min(HOST_CACHE_CAP, max(0, left * HOST_CACHE_SHARE)))


def describe(explicit_mb: int | None, limit: int | None, source: str, rss: int | None) -> str:
    """Where :func:`host_cache_bytes`'s answer came from, for the log line."""
    if explicit_mb is not None:
        return "setting"
    if limit is None:
        return "default, no memory limit known (set memory_limit_mb or prefix_cache_ram_mb)"
    if rss is None:
        return f"default, memory limit {limit // MIB} MiB ({source}) but no RSS reading"
    return (
        f"memory limit {limit // MIB} MiB ({source}), {rss // MIB} MiB resident after load, "
        f"share {HOST_CACHE_SHARE:g} of the rest after the working reserve, cap "
        f"{HOST_CACHE_CAP // MIB} MiB"
    )


def host_cache_budget(
    explicit_mb: int | None, limit_mb: int | None, slots: int, root: Path = CGROUP_ROOT
) -> Callable[[], int]:
    """The engine calls this once the model has loaded (prefix cache on): it measures the
    resident memory then, sizes the host cache, logs the size and where it came from, and
    returns it in bytes."""

    def budget() -> int:
        limit, source = memory_limit(limit_mb, root)
        rss = process_rss() if explicit_mb is None and limit is not None else None
        size = host_cache_bytes(explicit_mb, limit, rss, slots)
        log.info(
            "prefix cache host memory: %d MiB (from %s)",
            size // MIB,
            describe(explicit_mb, limit, source, rss),
        )
        return size

    return budget
