"""The host prefix cache's size: from the setting, else from the memory limit and the memory
resident after load, else the old fixed default; and the settings that feed it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamaherd_server import memory
from llamaherd_server.memory import (
    DEFAULT_HOST_CACHE_MB,
    HOST_CACHE_CAP,
    MIB,
    host_cache_budget,
    host_cache_bytes,
    memory_limit,
    process_rss,
    working_reserve,
)
from llamaherd_server.settings import ServerSettings

GIB = 1 << 30
# RSS right after load, measured (README "Memory"): bench/step_bench's short-step model and the
# ggufgen "bench" preset, both F16, at the server's default 8 slots x 2048 tokens.
STEP_RSS = 260 * MIB
BENCH_RSS = 1278 * MIB


@pytest.mark.parametrize(
    ("explicit", "limit", "rss", "slots", "expected"),
    [
        (None, None, None, 8, DEFAULT_HOST_CACHE_MB * MIB),
        (None, None, STEP_RSS, 8, DEFAULT_HOST_CACHE_MB * MIB),
        (None, 2 * GIB, None, 8, DEFAULT_HOST_CACHE_MB * MIB),
        # (2048 - 260 - 96) / 2, (8192 - 260 - 96) / 2
        (None, 2 * GIB, STEP_RSS, 8, 846 * MIB),
        (None, 8 * GIB, STEP_RSS, 8, 3918 * MIB),
        # (2048 - 1278 - 96) / 2, (8192 - 1278 - 96) / 2
        (None, 2 * GIB, BENCH_RSS, 8, 337 * MIB),
        (None, 8 * GIB, BENCH_RSS, 8, 3409 * MIB),
        # Less than the reserve left, or more resident than the limit: no host cache.
        (None, 1300 * MIB, BENCH_RSS, 8, 0),
        (None, GIB, BENCH_RSS, 8, 0),
        # A big pod: the cap.
        (None, 64 * GIB, BENCH_RSS, 8, HOST_CACHE_CAP),
        # The setting wins over everything, 0 included.
        (0, 64 * GIB, STEP_RSS, 8, 0),
        (100, GIB, BENCH_RSS, 8, 100 * MIB),
        (4096, None, None, 8, 4096 * MIB),
    ],
)
def test_host_cache_bytes(
    explicit: int | None, limit: int | None, rss: int | None, slots: int, expected: int
) -> None:
    assert host_cache_bytes(explicit, limit, rss, slots) == expected


sizes = st.integers(min_value=0, max_value=1 << 44)


@given(limit=sizes, rss=sizes, slots=st.integers(min_value=1, max_value=256))
def test_sized_cache_fits_beside_what_is_resident(limit: int, rss: int, slots: int) -> None:
    size = host_cache_bytes(None, limit, rss, slots)
    assert 0 <= size <= min(limit, HOST_CACHE_CAP)
    if size > 0:
        # Twice the cache (itself, and the half kept for its copies) fits beside the
        # resident memory and the working reserve.
        assert rss + working_reserve(slots) + 2 * size <= limit


@given(limit=sizes, more=sizes, rss=sizes, slots=st.integers(min_value=1, max_value=256))
def test_more_memory_never_shrinks_the_cache(limit: int, more: int, rss: int, slots: int) -> None:
    assert host_cache_bytes(None, limit + more, rss, slots) >= host_cache_bytes(
        None, limit, rss, slots
    )
    assert host_cache_bytes(None, limit, rss + more, slots) <= host_cache_bytes(
        None, limit, rss, slots
    )


@given(
    explicit=st.integers(min_value=0, max_value=1_048_576),
    limit=st.none() | sizes,
    rss=st.none() | sizes,
    slots=st.integers(min_value=1, max_value=256),
)
def test_an_explicit_value_always_wins(
    explicit: int, limit: int | None, rss: int | None, slots: int
) -> None:
    assert host_cache_bytes(explicit, limit, rss, slots) == explicit * MIB


def test_process_rss(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  900 kB\nVmRSS:\t  812 kB\nThreads:\t3\n")
    assert process_rss(status) == 812 * 1024
    status.write_text("Name:\tpython\n")
    assert process_rss(status) is None
    assert process_rss(tmp_path / "missing") is None
    own = process_rss()
    assert own is not None and own > 10 * MIB


def test_memory_limit_from_the_setting_then_the_cgroup(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text(f"{3 * GIB}\n")
    assert memory_limit(2048, tmp_path) == (2 * GIB, "memory_limit_mb")
    assert memory_limit(None, tmp_path) == (3 * GIB, "cgroup")
    (tmp_path / "memory.max").write_text("max\n")
    assert memory_limit(None, tmp_path) == (None, "none")


@pytest.mark.parametrize(
    ("explicit", "limit_mb", "cgroup", "logged"),
    [
        (300, 4096, None, "300 MiB (from setting)"),
        (None, None, "max", f"{DEFAULT_HOST_CACHE_MB} MiB (from default, no memory limit"),
        (None, None, str(64 * GIB), f"{HOST_CACHE_CAP // MIB} MiB (from memory limit 65536 MiB"),
        (None, 1, None, "0 MiB (from memory limit 1 MiB (memory_limit_mb)"),
    ],
)
def test_the_budget_logs_its_size_and_source(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    explicit: int | None,
    limit_mb: int | None,
    cgroup: str | None,
    logged: str,
) -> None:
    if cgroup is not None:
        (tmp_path / "memory.max").write_text(cgroup + "\n")
    budget = host_cache_budget(explicit, limit_mb, slots=8, root=tmp_path)
    with caplog.at_level(logging.INFO, logger=memory.log.name):
        size = budget()
    (line,) = [r.getMessage() for r in caplog.records if "prefix cache host memory" in r.message]
    assert line.startswith("prefix cache host memory: " + logged), line
    assert f"{size // MIB} MiB" in line


def test_settings_auto_and_explicit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    defaults = ServerSettings(model=model)
    assert defaults.prefix_cache_ram_mb is None and defaults.memory_limit_mb is None
    for auto in ("auto", "AUTO", ""):
        assert ServerSettings(model=model, prefix_cache_ram_mb=auto).prefix_cache_ram_mb is None
    assert ServerSettings(model=model, prefix_cache_ram_mb=0).prefix_cache_ram_mb == 0
    assert ServerSettings(model=model, memory_limit_mb=0).memory_limit_mb is None
    monkeypatch.setenv("LLAMAHERD_PREFIX_CACHE_RAM_MB", "auto")
    monkeypatch.setenv("LLAMAHERD_MEMORY_LIMIT_MB", "2048")
    settings = ServerSettings(model=model)
    assert (settings.prefix_cache_ram_mb, settings.memory_limit_mb) == (None, 2048)
    monkeypatch.setenv("LLAMAHERD_PREFIX_CACHE_RAM_MB", "64")
    monkeypatch.setenv("LLAMAHERD_MEMORY_LIMIT_MB", "")
    settings = ServerSettings(model=model)
    assert (settings.prefix_cache_ram_mb, settings.memory_limit_mb) == (64, None)
    assert settings.host_cache_budget()() == 64 * MIB
    for bad in ({"prefix_cache_ram_mb": -1}, {"prefix_cache_ram_mb": "lots"}):
        with pytest.raises(ValueError, match="prefix_cache_ram_mb"):
            ServerSettings(model=model, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="memory_limit_mb"):
        ServerSettings(model=model, memory_limit_mb=-5)


def test_settings_from_the_cli(tmp_path: Path) -> None:
    from llamaherd_server.shared_settings import settings_from_cli

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    argv = ["--model", str(model), "--prefix-cache-ram-mb", "auto", "--memory-limit-mb", "3072"]
    settings = settings_from_cli(ServerSettings, "llamaherd-server", argv)
    assert (settings.prefix_cache_ram_mb, settings.memory_limit_mb) == (None, 3072)
