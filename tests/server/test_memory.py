"""The host prefix cache sized on the real llama.cpp: the app hands the engine the settings'
budget, and the engine sizes its host cache from it once the model has loaded."""

from __future__ import annotations

import logging

import pytest

from llamaherd_server.memory import (
    MIB,
    host_cache_bytes,
    kv_bytes_per_token,
    process_rss,
    working_reserve,
)

pytestmark = pytest.mark.server


async def test_an_explicit_size_is_used_as_is(make_client, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="llamaherd.server"):
        client = await make_client(prefix_cache_ram_mb=3, memory_limit_mb=100_000)
    assert client.app.state.engine.kv.host_limit == 3 * MIB
    assert "prefix cache host memory: 3 MiB (from setting)" in caplog.text


async def test_sized_from_the_memory_limit_after_load(make_client, caplog) -> None:
    limit_mb = 4096
    before = process_rss()
    with caplog.at_level(logging.INFO, logger="llamaherd.server"):
        client = await make_client(memory_limit_mb=limit_mb)
    after = process_rss()
    assert before is not None and after is not None
    settings = client.app.state.settings
    per_token = kv_bytes_per_token(settings.model)
    assert per_token == 4 * 4 * (64 + 64) * 2  # the tiny model: 4 layers, 4 KV heads of 64
    reserve = working_reserve(settings.slots, settings.context_size * per_token)
    size = client.app.state.engine.kv.host_limit
    # Measured after the model and its KV cache were resident, not before.
    largest = host_cache_bytes(None, limit_mb * MIB, before, reserve)
    smallest = host_cache_bytes(None, limit_mb * MIB, after, reserve)
    assert 0 < smallest <= size <= largest
    assert f"prefix cache host memory: {size // MIB} MiB (from memory limit 4096 MiB" in caplog.text


async def test_no_room_left_means_no_host_cache(make_client) -> None:
    client = await make_client(memory_limit_mb=1)
    assert client.app.state.engine.kv.host_limit == 0


async def test_prefix_cache_off_needs_no_budget(make_client, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="llamaherd.server"):
        client = await make_client(prefix_cache=False, memory_limit_mb=4096)
    assert client.app.state.engine.kv.host_limit == 0
    assert "prefix cache host memory" not in caplog.text
