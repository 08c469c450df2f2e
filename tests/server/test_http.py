"""The HTTP API in-process (httpx.ASGITransport, the real engine behind it)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.server


GOOD = {
    "prompt": "hello world, tell me a story",
    "max_tokens": 12,
    "temperature": 0,
    "ignore_eos": True,
}

# (endpoint, body or raw bytes, expected status, the field the error must name)
BAD_INPUTS: list[tuple[str, Any, int, str]] = [
    ("/v1/generate", b'{"prompt": "hi", "max_tokens": ', 400, "body"),
    ("/v1/generate", b"not json at all", 400, "body"),
    ("/v1/generate", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/generate", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/generate", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/generate", {"prompt": "hi", "max_tokens": 100_000}, 400, "max_tokens"),
    ("/v1/generate", {"prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    ("/v1/generate", {"prompt": "hi", "priority": "urgent"}, 400, "priority"),
    ("/v1/generate", {"prompt": "hi", "priority": 42}, 400, "priority"),
    ("/v1/generate", {"prompt": ""}, 400, "prompt"),
    ("/v1/generate", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/generate", {"prompt": "word " * 400}, 400, "prompt"),
    ("/v1/generate", {"prompt": "x" * 20_000}, 413, "body"),
    ("/v1/generate", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "model": "no-such-model"}, 404, "model"),
    ("/v1/completions", {"prompt": [999_999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 3}, 400, "n"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        400,
        "messages.0.role",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        400,
        "temperature",
    ),
]


async def test_every_bad_input_gets_a_clear_error_while_good_requests_complete(
    make_client: Any,
) -> None:
    client = await make_client()
    good = [asyncio.create_task(client.post("/v1/generate", json=GOOD)) for _ in range(6)]
    for path, body, status, param in BAD_INPUTS:
        if isinstance(body, bytes):
            r = await client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = await client.post(path, json=body)
        assert r.status_code == status, (path, body, r.text)
        error = r.json()["error"]
        assert error["param"] == param, (body, error)
        assert error["message"], error
    for r in await asyncio.gather(*good):
        assert r.status_code == 200, r.text
        assert r.json()["tokens_generated"] == 12
    texts = {r.json()["text"] for r in [await g for g in good]}
    assert len(texts) == 1, "the same greedy request gave different text"


async def test_generate_keeps_the_seed_shape(make_client: Any) -> None:
    client = await make_client()
    r = await client.post("/v1/generate", json={"prompt": "hello", "max_tokens": 5})
    assert r.status_code == 200
    body = r.json()
    assert set(body) >= {"request_id", "text", "tokens_generated", "latency_ms", "batch_wait_ms"}
    assert body["tokens_generated"] <= 5
    assert body["latency_ms"] >= body["batch_wait_ms"] >= 0


async def test_priority_header_is_used_and_checked(make_client: Any) -> None:
    client = await make_client()
    r = await client.post(
        "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers={"X-Priority": "high"}
    )
    assert r.status_code == 200
    r = await client.post(
        "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers={"X-Priority": "11"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "X-Priority"


async def test_api_key_guards_inference_but_not_probes_or_metrics(make_client: Any) -> None:
    client = await make_client(api_key="s3cret")
    body = {"prompt": "hi", "max_tokens": 2}
    assert (await client.post("/v1/completions", json=body)).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await client.post("/v1/completions", json=body, headers=wrong)).status_code == 401
    assert (await client.get("/v1/models")).status_code == 401
    ok = {"Authorization": "Bearer s3cret"}
    assert (await client.post("/v1/completions", json=body, headers=ok)).status_code == 200
    for path in ("/health", "/ready", "/metrics"):
        assert (await client.get(path)).status_code == 200, path


async def test_no_chat_template_is_a_400_that_says_so(make_client: Any, tmp_path: Path) -> None:
    from llamaherd_server.ggufgen import PRESETS, write_model

    bare = write_model(tmp_path / "bare.gguf", PRESETS["tiny"], chat_template=None)
    client = await make_client(model=bare)
    assert client.app.state.engine.chat_template is None  # type: ignore[attr-defined]
    r = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages"
    assert "no chat template" in r.json()["error"]["message"]
    # A configured template fills the gap.
    client = await make_client(model=bare, chat_template="{{ messages[0]['content'] }}")
    r = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 200, r.text


async def test_health_ready_and_metrics(make_client: Any) -> None:
    client = await make_client()
    health = (await client.get("/health")).json()
    assert health["status"] == "healthy"
    # None without a GPU (or NVML), else a mean utilization in percent.
    gpu = health["gpu_utilization"]
    assert gpu is None or (isinstance(gpu, int | float) and 0 <= gpu <= 100), gpu
    assert {"active_requests", "queue_depth"} <= set(health)
    assert (await client.get("/ready")).json() == {"ready": True}
    await client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 3})
    text = (await client.get("/metrics")).text
    assert 'llamaherd_requests_total{outcome="ok"} 1.0' in text
    assert "llamaherd_slots 4.0" in text
    assert "process_resident_memory_bytes" in text


async def test_health_names_the_devices_and_a_gpu_request_without_a_gpu_runs_on_the_cpu(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """This machine's llama.cpp has no GPU backend: asking for every layer on the GPU (what the
    CUDA image and a GPU InferenceService ask) still serves, on the CPU, and says why."""
    with caplog.at_level(logging.WARNING, logger="llamaherd_server.llama_backend"):
        client = await make_client(gpu_layers=-1)
    gpu = (await client.get("/health")).json()["gpu"]
    assert gpu["backend"] == "cpu" and gpu["devices"] == [], gpu
    assert gpu["gpu_layers"] == 0 and gpu["offload_supported"] is False, gpu
    assert any(
        "gpu-layers=-1" in r.getMessage() and "CPU" in r.getMessage() for r in caplog.records
    )
    r = await client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200, r.text


async def test_a_dead_engine_fails_requests_with_500_and_health_with_503(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client()
    engine = client.app.state.engine  # type: ignore[attr-defined]
    assert (await client.get("/health")).status_code == 200

    # The scheduler's own bookkeeping (not one request's) breaking is what kills the engine.
    def boom(now: float) -> None:
        raise RuntimeError("scheduler state exploded")

    monkeypatch.setattr(engine, "_drop_cancelled_and_expired", boom)
    r = await client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 3})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error"
    assert "engine failed: RuntimeError: scheduler state exploded" in error["message"]

    health = await client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "unhealthy"
    assert "scheduler state exploded" in health.json()["reason"]
    ready = await client.get("/ready")
    assert ready.status_code == 503 and "engine failed" in ready.json()["reason"]
    # New requests are refused at once instead of waiting for a dead engine.
    r = await client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 3})
    assert r.status_code == 503 and "engine failed" in r.json()["error"]["message"]
    assert 'llamaherd_requests_total{outcome="error"} 1.0' in (await client.get("/metrics")).text


async def test_a_stalled_engine_turns_health_to_503(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client(engine_stall_seconds=0.3, max_wait_ms=0)
    engine = client.app.state.engine  # type: ignore[attr-defined]
    real_step = engine._step
    release = threading.Event()

    def stuck() -> None:
        release.wait(30)
        real_step()

    monkeypatch.setattr(engine, "_step", stuck)
    request = asyncio.ensure_future(
        client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
    )
    deadline = time.monotonic() + 10
    while (health := await client.get("/health")).status_code == 200:
        assert time.monotonic() < deadline, "the watchdog did not fire"
        await asyncio.sleep(0.05)
    assert health.status_code == 503
    assert health.json()["reason"].startswith("engine stalled: no progress for")
    release.set()
    assert (await request).status_code == 200
    assert (await client.get("/health")).status_code == 200


# ---- one log line per finished request -----------------------------------------------------------


async def test_every_finished_request_logs_one_line_with_the_metric_s_outcome(
    make_client: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ok, timeout, error and rejected: each request logs exactly one line, and per outcome the
    lines match the ``llamaherd_requests_total{outcome}`` samples (client disconnects:
    tests/server/test_process.py, which needs a real socket)."""
    caplog.set_level(logging.INFO, logger="llamaherd.requests")
    client = await make_client(request_timeout_seconds=0.5, max_wait_ms=0)
    engine = client.app.state.engine  # type: ignore[attr-defined]
    expected: Counter[str] = Counter()

    r = await client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200
    expected["ok"] += 1
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "stream": True})
    assert r.status_code == 200 and "[DONE]" in r.text
    expected["ok"] += 1

    real_step = engine._step

    def slow_step() -> None:
        time.sleep(0.05)
        real_step()

    monkeypatch.setattr(engine, "_step", slow_step)
    r = await client.post(
        "/v1/generate", json={"prompt": "hi", "max_tokens": 200, "ignore_eos": True}
    )
    assert r.status_code == 504
    expected["timeout"] += 1
    r = await client.post(
        "/v1/completions",
        json={"prompt": "hi", "max_tokens": 200, "ignore_eos": True, "stream": True},
    )
    assert r.status_code == 200 and '"timeout"' in r.text
    expected["timeout"] += 1
    monkeypatch.setattr(engine, "_step", real_step)

    engine.start_drain()
    r = await client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 3})
    assert r.status_code == 503
    expected["rejected"] += 1
    engine.draining = False

    def boom(params: object) -> None:
        raise RuntimeError("sampler set-up exploded")

    monkeypatch.setattr(engine, "_make_sampler", boom)
    r = await client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 3})
    assert r.status_code == 500  # this request alone
    expected["error"] += 1
    monkeypatch.undo()

    def dead(now: float) -> None:
        raise RuntimeError("scheduler state exploded")

    monkeypatch.setattr(engine, "_drop_cancelled_and_expired", dead)
    r = await client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 3})
    assert r.status_code == 500
    expected["error"] += 1
    # A dead engine refuses what comes next.
    r = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert r.status_code == 503
    expected["rejected"] += 1

    lines = [rec for rec in caplog.records if rec.name == "llamaherd.requests"]
    logged = Counter(rec.fields["outcome"] for rec in lines)  # type: ignore[attr-defined]
    assert logged == expected
    ids = [rec.fields["request_id"] for rec in lines if rec.fields["request_id"]]  # type: ignore[attr-defined]
    assert len(ids) == len(set(ids)), "a request logged twice"
    text = (await client.get("/metrics")).text
    for outcome, count in expected.items():
        assert f'llamaherd_requests_total{{outcome="{outcome}"}} {float(count)}' in text
    for rec in lines:
        fields = rec.fields  # type: ignore[attr-defined]
        assert {"priority", "prompt_tokens", "generated_tokens", "latency_ms"} <= set(fields)
        assert rec.getMessage().endswith(" " + fields["outcome"])


# ---- the event loop never tokenizes --------------------------------------------------------------


async def test_tokenizing_and_templating_run_off_the_event_loop(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client()
    engine = client.app.state.engine  # type: ignore[attr-defined]
    loop_thread = threading.get_ident()
    seen: list[tuple[str, int]] = []
    real_tokenize = engine.tokenize

    def tokenize(text: str, **kwargs: Any) -> list[int]:
        seen.append(("tokenize", threading.get_ident()))
        return real_tokenize(text, **kwargs)

    monkeypatch.setattr(engine, "tokenize", tokenize)
    import llamaherd_server.api as api

    real_render = api.render_chat_parts

    def render_chat_parts(*args: Any, **kwargs: Any) -> Any:
        seen.append(("render_chat", threading.get_ident()))
        return real_render(*args, **kwargs)

    monkeypatch.setattr(api, "render_chat_parts", render_chat_parts)
    for path, body in [
        ("/v1/generate", {"prompt": "hi", "max_tokens": 2}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ),
        ("/v1/generate", {"prompt": "word " * 400}),  # too long: the 400 comes from the worker
    ]:
        r = await client.post(path, json=body)
        assert r.status_code == (400 if "word" in str(body) else 200), r.text
    names = [name for name, _ in seen]
    # The chat prompt is tokenized in parts (chat.tokenize_parts): one call or more.
    assert names[:3] == ["tokenize", "tokenize", "render_chat"], names
    assert names[3:] == ["tokenize"] * (len(names) - 3) and len(names) >= 5, names
    assert all(ident != loop_thread for _, ident in seen), seen


async def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(make_client: Any) -> None:
    client = await make_client()
    body = {
        "prompt": "the same long prompt, sent twice by a client that retries",
        "max_tokens": 4,
        "temperature": 0,
    }
    first = (await client.post("/v1/completions", json=body)).json()
    second = (await client.post("/v1/completions", json=body)).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    prompt_tokens = second["usage"]["prompt_tokens"]
    # All but the last prompt token, whose logits start generation.
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": prompt_tokens - 1}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]

    off = await make_client(prefix_cache=False)
    for _ in range(2):
        reply = (await off.post("/v1/completions", json=body)).json()
        assert reply["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_text_that_cannot_fit_is_refused_without_tokenizing(make_client: Any) -> None:
    """Every token stands for at most max_token_bytes of text: a prompt with more characters
    than the context times that is refused before the tokenizer sees it."""
    client = await make_client()
    engine = client.app.state.engine  # type: ignore[attr-defined]
    calls: list[int] = []
    tokenize = engine.tokenize

    def counting(text: str, **kwargs: Any) -> list[int]:
        calls.append(len(text))
        return tokenize(text, **kwargs)

    engine.tokenize = counting
    chars = 256 * engine.max_token_bytes
    for path, body in (
        ("/v1/completions", {"prompt": "a" * chars}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * chars}]}),
    ):
        r = await client.post(path, json={**body, "max_tokens": 1})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert "at least 256 tokens" in error["message"]
    assert calls == [], "the tokenizer ran on text that could never fit"
    # Under the bound, the tokenizer decides.
    r = await client.post("/v1/completions", json={"prompt": "a" * 200, "max_tokens": 1})
    assert calls == [200]
    assert r.status_code == 200 or "at least" not in r.json()["error"]["message"], r.text
