"""How much host memory the prefix cache may hold: sized from the container's memory limit.

A fixed host cache is wrong both ways: 512 MiB next to a 220M-parameter model at 8 x 2048
tokens (1.25 GiB resident after loading) in a 1.5 GiB pod gets the pod OOM-killed under load,
and in a 16 GiB pod it leaves gigabytes idle that would spare prefills. So unless
``prefix_cache_ram_mb`` is set, the cache gets three quarters of what the memory limit leaves
once the model has loaded (measured then: weights, KV cache and the Python runtime are resident)
and a working reserve is set aside::

    reserve = 64 MiB + 4 MiB x slots + 2 x context_size x KV bytes per token
    host = min(8 GiB, max(0, 0.75 x (limit - RSS after load - reserve)))

Measured on generated F16 models at 8 slots x 2048 tokens (README.md, "Memory"): what grows
under load beyond the RSS after loading, with no host cache, is compute-buffer pages that the
first full steps touch and per-request objects: +35 MiB on bench/step_bench's short-step model,
+49 MiB on the ``bench`` preset (compute buffer 67 MiB). With a host cache, saving a sequence
copies its cells twice on the way (a ctypes buffer, then ``bytes``) before the cache evicts to
make room, so the peak is RSS + working set + what the cache holds + 2 x one sequence's KV: on
the ``bench`` preset with 512 MiB (five 96 MiB prompts held), 1278 + 49 + 478 + 2 x 96 = 1997
MiB predicted, 1989 MiB measured (peak VmRSS). The quarter left over is for the allocator's
slack (freed copies it keeps: +28 MiB over the cache's bytes on the short-step model). The cap
is llama-server's own ``--cache-ram`` default: prompts old enough to fall out of 8 GiB seldom
come back.

KV bytes per token (K and V in f16, the server's cache types) come from the GGUF metadata:
``block_count x head_count_kv x (key_length + value_length) x 2``, with key and value length
``embedding_length / head_count`` unless the file says otherwise. A file that does not say
leaves that term out (the log line says so).

The limit is ``memory_limit_mb`` (the operator passes ``limits.memory`` through the downward
API), else the cgroup's; without either the cache keeps the old fixed 512 MiB.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from .cpus import CGROUP_ROOT, cgroup_memory_limit
from .loadfail import GGUF_MAGIC

log = logging.getLogger("llamaherd.server")

MIB = 1 << 20
DEFAULT_HOST_CACHE_MB = 512
HOST_CACHE_SHARE = 0.75
HOST_CACHE_CAP = 8192 * MIB
RESERVE_BASE = 64 * MIB
RESERVE_PER_SLOT = 4 * MIB
KV_ELEMENT_BYTES = 2  # f16 K and V, llama.cpp's default cache types (the server keeps them)

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


def working_reserve(slots: int, sequence_kv: int = 0) -> int:
    """Bytes that grow under load beyond what is resident right after loading: the working
    set, and two copies of one sequence's KV while it is saved to host memory."""
    return RESERVE_BASE + RESERVE_PER_SLOT * max(slots, 0) + 2 * max(sequence_kv, 0)


def host_cache_bytes(
    explicit_mb: int | None, limit: int | None, rss: int | None, reserve: int
) -> int:
    """The host prefix cache's size in bytes: the explicit setting when there is one, else a
    share of what the limit leaves after the resident memory and the reserve (capped), else
    the fixed default when the limit or the resident memory is unknown."""
    if explicit_mb is not None:
        return explicit_mb * MIB
    if limit is None or rss is None:
        return DEFAULT_HOST_CACHE_MB * MIB
    left = limit - rss - reserve
    return int(min(HOST_CACHE_CAP, max(0, left * HOST_CACHE_SHARE)))


# GGUF metadata value types (gguf.GGUFValueType): fixed-size scalars, strings and arrays.
_GGUF_SCALARS = {
    kind: struct.Struct(layout)
    for kind, layout in {
        0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
        10: "<Q", 11: "<q", 12: "<d",
    }.items()
}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_U32, _U64 = _GGUF_SCALARS[4], _GGUF_SCALARS[10]


def _unpack(f: BinaryIO, layout: struct.Struct) -> Any:
    data = f.read(layout.size)
    if len(data) != layout.size:
        raise ValueError("truncated GGUF metadata")
    return layout.unpack(data)[0]


def _value(f: BinaryIO, kind: int) -> object:
    """One metadata value; strings longer than a name and arrays are skipped (None)."""
    if kind in _GGUF_SCALARS:
        return _unpack(f, _GGUF_SCALARS[kind])
    if kind == _GGUF_STRING:
        size = int(_unpack(f, _U64))
        if size > 256:
            f.seek(size, 1)
            return None
        return f.read(size).decode("utf-8")
    if kind == _GGUF_ARRAY:
        item, count = int(_unpack(f, _U32)), int(_unpack(f, _U64))
        if item in _GGUF_SCALARS:
            f.seek(count * _GGUF_SCALARS[item].size, 1)
        elif item == _GGUF_STRING:
            for _ in range(count):
                f.seek(int(_unpack(f, _U64)), 1)
        else:
            for _ in range(count):
                _value(f, item)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")


def gguf_metadata(path: Path) -> dict[str, object]:
    """A GGUF file's scalar metadata and short strings (arrays such as the vocabulary are
    skipped, not read: the gguf package's reader parses all of them, 1 s and 86 MiB for a
    32k vocabulary). Raises OSError or ValueError on a file it cannot read."""
    with path.open("rb", buffering=1 << 16) as f:
        if f.read(4) != GGUF_MAGIC or _unpack(f, _U32) not in (2, 3):
            raise ValueError("not a GGUF v2/v3 file")
        _unpack(f, _U64)  # tensor count
        count = int(_unpack(f, _U64))
        meta: dict[str, object] = {}
        for _ in range(count):
            key = f.read(int(_unpack(f, _U64))).decode("utf-8")
            value = _value(f, int(_unpack(f, _U32)))
            if value is not None:
                meta[key] = value
        return meta


def kv_bytes_per_token(path: Path) -> int | None:
    """KV cache bytes per token of context (all layers, K and V in f16), from the model's
    GGUF metadata; None when the file does not say (or per-layer head counts)."""
    try:
        meta = gguf_metadata(path)
    except (OSError, ValueError, UnicodeDecodeError, struct.error):
        return None
    arch = meta.get("general.architecture")

    def number(name: str) -> int | None:
        value = meta.get(f"{arch}.{name}")
        return value if isinstance(value, int) and value > 0 else None

    layers, heads, embd = (
        number("block_count"),
        number("attention.head_count"),
        number("embedding_length"),
    )
    kv_heads = number("attention.head_count_kv") or heads
    key = number("attention.key_length") or (embd // heads if embd and heads else None)
    if not (layers and kv_heads and key):
        return None
    value = number("attention.value_length") or key
    return layers * kv_heads * (key + value) * KV_ELEMENT_BYTES


def describe(limit: int, source: str, rss: int, slots: int, sequence_kv: int | None) -> str:
    """How :func:`host_cache_bytes` sized the cache from the limit, for the log line."""
    copies = (
        f"2 x {sequence_kv / MIB:.0f} MiB for one sequence's KV"
        if sequence_kv is not None
        else "KV bytes per token unknown"
    )
    return (
        f"memory limit {limit // MIB} MiB ({source}), {rss // MIB} MiB resident after load, "
        f"reserve {working_reserve(slots, sequence_kv or 0) // MIB} MiB ({RESERVE_BASE // MIB} "
        f"+ {RESERVE_PER_SLOT // MIB} x {slots} slots + {copies}), share "
        f"{HOST_CACHE_SHARE:g} of the rest, cap {HOST_CACHE_CAP // MIB} MiB"
    )


def host_cache_budget(
    explicit_mb: int | None,
    limit_mb: int | None,
    *,
    slots: int,
    context_size: int,
    model: Path,
    root: Path = CGROUP_ROOT,
) -> Callable[[], int]:
    """The engine calls this once the model has loaded (prefix cache on): it measures the
    resident memory then, sizes the host cache, logs the size and where it came from, and
    returns it in bytes."""

    def budget() -> int:
        if explicit_mb is not None:
            size, source = explicit_mb * MIB, "setting"
        else:
            size, source = _sized(limit_mb, slots, context_size, model, root)
        log.info("prefix cache host memory: %d MiB (from %s)", size // MIB, source)
        return size

    return budget


def _sized(
    limit_mb: int | None, slots: int, context_size: int, model: Path, root: Path
) -> tuple[int, str]:
    limit, source = memory_limit(limit_mb, root)
    if limit is None:
        where = "default, no memory limit known (set memory_limit_mb or prefix_cache_ram_mb)"
        return DEFAULT_HOST_CACHE_MB * MIB, where
    rss = process_rss()
    if rss is None:
        where = f"default, memory limit {limit // MIB} MiB ({source}) but no RSS reading"
        return DEFAULT_HOST_CACHE_MB * MIB, where
    per_token = kv_bytes_per_token(model)
    sequence_kv = context_size * per_token if per_token is not None else None
    reserve = working_reserve(slots, sequence_kv or 0)
    size = host_cache_bytes(None, limit, rss, reserve)
    return size, describe(limit, source, rss, slots, sequence_kv)
