"""The container's real CPU and memory budget, from cgroup files and the affinity mask.

``os.cpu_count()`` is the node's core count: a pod limited to 2 CPUs on a 64-core node that
starts 64 llama.cpp threads is throttled into the ground (llama.cpp's threads spin at barriers).
The functions here are pure over a cgroup root directory, so tests point them at fixture trees.

- cgroup v2: ``<root>/cpu.max`` holds ``"<quota> <period>"`` or ``"max <period>"``.
- cgroup v1: ``<root>/cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (or under ``cpu,cpuacct``);
  a quota of ``-1`` means unlimited.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
_V1_MEMORY_UNLIMITED = 1 << 60  # v1 writes a huge page-aligned number for "no limit"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota allows (quota / period, maybe fractional); None when unlimited
    or unknown."""
    text = _read(root / "cpu.max")
    if text is not None:
        parts = text.split()
        if len(parts) >= 1 and parts[0] != "max":
            try:
                quota = int(parts[0])
                period = int(parts[1]) if len(parts) > 1 else 100_000
            except ValueError:
                return None
            if quota > 0 and period > 0:
                return quota / period
        return None
    for name in _V1_CPU_DIRS:
        quota_text = _read(root / name / "cpu.cfs_quota_us")
        period_text = _read(root / name / "cpu.cfs_period_us")
        if quota_text is None or period_text is None:
            continue
        try:
            quota, period = int(quota_text), int(period_text)
        except ValueError:
            return None
        if quota > 0 and period > 0:
            return quota / period
        return None
    return None


def affinity_cpus() -> int | None:
    """CPUs this process may run on (``sched_getaffinity``); None where unsupported."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def cpu_budget(
    root: Path = CGROUP_ROOT, affinity: int | None = None, cpu_count: int | None = None
) -> tuple[int, str]:
    """(threads, where the number came from): the smallest of the cgroup quota (rounded up)
    and the affinity mask, at least 1; the host's core count when neither is known."""
    candidates: list[tuple[int, str]] = []
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        candidates.append((max(1, math.ceil(quota - 1e-9)), f"cgroup CPU quota {quota:g}"))
    if affinity is None:
        affinity = affinity_cpus()
    if affinity:
        candidates.append((affinity, f"CPU affinity, {affinity} CPUs"))
    if candidates:
        return min(candidates, key=lambda c: c[0])
    count = cpu_count if cpu_count is not None else os.cpu_count()
    return max(1, count or 1), "os.cpu_count()"


def cgroup_memory_limit(root: Path = CGROUP_ROOT) -> int | None:
    """The cgroup memory limit in bytes; None when unlimited or unknown."""
    candidates: Iterable[Path] = (root / "memory.max", root / "memory" / "memory.limit_in_bytes")
    for path in candidates:
        text = _read(path)
        if text is None:
            continue
        if text == "max":
            return None
        try:
            limit = int(text)
        except ValueError:
            return None
        return limit if 0 < limit < _V1_MEMORY_UNLIMITED else None
    return None
