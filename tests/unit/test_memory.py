"""The host prefix cache's size: from the setting, else from the memory limit and the memory
resident after load, else the old fixed default; and the settings that feed it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamaherd_server import memory
from llamaherd_server.ggufgen import ModelShape, write_model
from llamaherd_server.memory import (
    DEFAULT_HOST_CACHE_MB,
    HOST_CACHE_CAP,
    MIB,
    host_cache_budget,
    host_cache_bytes,
    kv_bytes_per_token,
    memory_limit,
    process_rss,
    working_reserve,
)
from llamaherd_server.settings import ServerSettings

GIB = 1 << 30
# Measured at the server's default 8 slots x 2048 tokens (README "Memory"), both F16: RSS right
# after load, and one sequence's KV (2048 tokens x the KV bytes per token).
STEP_RSS, STEP_SEQUENCE = 260 * MIB, 2048 * 9216  # bench/step_bench's short-step model
BENCH_RSS, BENCH_SEQUENCE = 1278 * MIB, 2048 * 49152  # ggufgen's "bench" preset
STEP_RESERVE = working_reserve(8, STEP_SEQUENCE)  # 64 + 4 x 8 + 2 x 18 MiB
BENCH_RESERVE = working_reserve(8, BENCH_SEQUENCE)  # 64 + 4 x 8 + 2 x 96 MiB


def test_the_measured_models_reserves() -> None:
    assert (STEP_RESERVE, BENCH_RESERVE) == (132 * MIB, 288 * MIB)


@pytest.mark.parametrize(
    ("explicit", "limit", "rss", "reserve", "expected"),
    [
        (None, None, None, STEP_RESERVE, DEFAULT_HOST_CACHE_MB * MIB),
        (None, None, STEP_RSS, STEP_RESERVE, DEFAULT_HOST_CACHE_MB * MIB),
        (None, 2 * GIB, None, STEP_RESERVE, DEFAULT_HOST_CACHE_MB * MIB),
        # 0.75 x (2048 - 260 - 132), 0.75 x (8192 - 260 - 132)
        (None, 2 * GIB, STEP_RSS, STEP_RESERVE, 1242 * MIB),
        (None, 8 * GIB, STEP_RSS, STEP_RESERVE, 5850 * MIB),
        # 0.75 x (2048 - 1278 - 288), 0.75 x (8192 - 1278 - 288)
        (None, 2 * GIB, BENCH_RSS, BENCH_RESERVE, int(361.5 * MIB)),
        (None, 8 * GIB, BENCH_RSS, BENCH_RESERVE, int(4969.5 * MIB)),
        # Less than the reserve left, or more resident than the limit: no host cache.
        (None, 1500 * MIB, BENCH_RSS, BENCH_RESERVE, 0),
        (None, GIB, BENCH_RSS, BENCH_RESERVE, 0),
        # A big pod: the cap.
        (None, 64 * GIB, BENCH_RSS, BENCH_RESERVE, HOST_CACHE_CAP),
        # The setting wins over everything, 0 included.
        (0, 64 * GIB, STEP_RSS, STEP_RESERVE, 0),
        (100, GIB, BENCH_RSS, BENCH_RESERVE, 100 * MIB),
        (4096, None, None, 0, 4096 * MIB),
    ],
)
def test_host_cache_bytes(
    explicit: int | None, limit: int | None, rss: int | None, reserve: int, expected: int
) -> None:
    assert host_cache_bytes(explicit, limit, rss, reserve) == expected


sizes = st.integers(min_value=0, max_value=1 << 44)
slot_counts = st.integers(min_value=1, max_value=256)


@given(limit=sizes, rss=sizes, slots=slot_counts, sequence=sizes)
def test_sized_cache_fits_beside_what_is_resident(
    limit: int, rss: int, slots: int, sequence: int
) -> None:
    reserve = working_reserve(slots, sequence)
    size = host_cache_bytes(None, limit, rss, reserve)
    assert 0 <= size <= min(limit, HOST_CACHE_CAP)
    if size > 0:
        # The cache, full, while one sequence is copied into it twice, beside the resident
        # memory and the working set, still leaves a quarter of the rest free.
        assert rss + reserve + size <= limit
        assert size <= 0.75 * (limit - rss - reserve)


@given(limit=sizes, more=sizes, rss=sizes, reserve=sizes)
def test_more_memory_never_shrinks_the_cache(limit: int, more: int, rss: int, reserve: int) -> None:
    cache = host_cache_bytes(None, limit, rss, reserve)
    assert host_cache_bytes(None, limit + more, rss, reserve) >= cache
    assert host_cache_bytes(None, limit, rss + more, reserve) <= cache
    assert host_cache_bytes(None, limit, rss, reserve + more) <= cache


@given(
    explicit=st.integers(min_value=0, max_value=1_048_576),
    limit=st.none() | sizes,
    rss=st.none() | sizes,
    reserve=sizes,
)
def test_an_explicit_value_always_wins(
    explicit: int, limit: int | None, rss: int | None, reserve: int
) -> None:
    assert host_cache_bytes(explicit, limit, rss, reserve) == explicit * MIB


def test_kv_bytes_per_token_from_the_gguf_metadata(tmp_path: Path) -> None:
    # n_layer x n_head_kv x (key + value length) x 2 bytes; what llama.cpp's own log line says
    # for these shapes: 144 MiB and 768 MiB of KV for 16384 cells.
    step = tmp_path / "step.gguf"
    write_model(step, ModelShape(n_embd=384, n_layer=6, n_head=6, n_head_kv=6, vocab=1024))
    assert kv_bytes_per_token(step) == 6 * 6 * (64 + 64) * 2 == 9216
    gqa = tmp_path / "gqa.gguf"
    write_model(gqa, ModelShape(n_embd=256, n_layer=3, n_head=8, n_head_kv=2, vocab=1024))
    assert kv_bytes_per_token(gqa) == 3 * 2 * (32 + 32) * 2
    assert kv_bytes_per_token(tmp_path / "missing.gguf") is None
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(step.read_bytes()[:200])
    assert kv_bytes_per_token(broken) is None
    broken.write_bytes(b"not a model")
    assert kv_bytes_per_token(broken) is None


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
    model = tmp_path / "m.gguf"
    write_model(model, ModelShape(n_embd=128, n_layer=2, n_head=2, n_head_kv=2, vocab=1024))
    budget = host_cache_budget(
        explicit, limit_mb, slots=8, context_size=1024, model=model, root=tmp_path
    )
    with caplog.at_level(logging.INFO, logger=memory.log.name):
        size = budget()
    (line,) = [r.getMessage() for r in caplog.records if "prefix cache host memory" in r.message]
    assert line.startswith("prefix cache host memory: " + logged), line
    assert f"{size // MIB} MiB" in line
    if limit_mb == 1:  # 2 x 1024 tokens x 2 layers x 2 heads x (64 + 64) x 2 bytes
        assert "2 x 1 MiB for one sequence's KV" in line, line


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
