"""GPU utilization through NVML, when there is a GPU and the NVML library; None otherwise."""

from __future__ import annotations

from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _nvml() -> Any:
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def gpu_utilization() -> float | None:
    """Mean utilization (percent) over the visible GPUs, or None without NVML."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        count = nvml.nvmlDeviceGetCount()
        if count == 0:
            return None
        total = sum(
            nvml.nvmlDeviceGetUtilizationRates(nvml.nvmlDeviceGetHandleByIndex(i)).gpu
            for i in range(count)
        )
        return float(total) / count
    except Exception:
        return None
