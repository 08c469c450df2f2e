"""The server as a real process on loopback: the openai client, overflow, disconnects, drain."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(url: str, name: str, **labels: str) -> float:
    return scrape(url).get((name, tuple(sorted(labels.items()))), 0.0)


def test_openai_client_streams_a_chat_completion(server_factory, tiny_model: Path) -> None:
    server = server_factory(
        tiny_model, "--threads", "1", "--api-key", "k3y", "--model-name", "herd-tiny"
    )
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k3y", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["herd-tiny"]

    stream = client.chat.completions.create(
        model="herd-tiny",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert content

    whole = client.chat.completions.create(
        model="herd-tiny",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert whole.choices[0].message.content == content
    assert whole.usage is not None and whole.usage.completion_tokens == 20

    completion = client.completions.create(
        model="herd-tiny", prompt="Once upon", max_tokens=5, extra_headers={"X-Priority": "2"}
    )
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert completion.usage is not None and completion.usage.completion_tokens <= 5

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="herd-tiny", prompt="hi", max_tokens=0)


def test_overflow_gets_429_with_retry_after(server_factory, small_model: Path) -> None:
    server = server_factory(
        small_model, "--threads", "1", "--slots", "1", "--queue-limit", "2", "--max-wait-ms", "0"
    )
    body = {"prompt": "a long one", "max_tokens": 300, "ignore_eos": True}
    results: list[int] = []

    def post() -> None:
        results.append(httpx.post(server.url + "/v1/generate", json=body, timeout=120).status_code)

    threads = [threading.Thread(target=post) for _ in range(3)]  # 1 running + 2 queued
    for t in threads:
        t.start()
    wait_for(
        lambda: metric(server.url, "llamaherd_requests_waiting", priority="0") == 2,
        message="two requests waiting",
    )
    r = httpx.post(server.url + "/v1/generate", json=body, timeout=30)
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    assert metric(server.url, "llamaherd_requests_total", outcome="rejected") == 1
    for t in threads:
        t.join(timeout=120)
    assert results == [200, 200, 200]


def test_client_disconnect_frees_the_slot(server_factory, small_model: Path) -> None:
    server = server_factory(
        small_model,
        *("--threads", "1", "--slots", "1", "--max-wait-ms", "0", "--log-format", "json"),
    )
    body = {"prompt": "go on", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = 0
        for line in r.iter_lines():
            lines += bool(line.startswith("data:"))
            if lines >= 5:
                break
    wait_for(
        lambda: metric(server.url, "llamaherd_requests_total", outcome="cancelled") == 1,
        message="the stream's cancellation",
    )
    assert metric(server.url, "llamaherd_requests_running") == 0
    # Nothing runs: the gauge shows the cancelled stream's KV freed (no step came after it).
    assert metric(server.url, "llamaherd_kv_cache_usage_ratio") == 0

    # Non-streaming: the client times out and goes away; the request is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/generate",
            timeout=1.0,
            json={"prompt": "go on", "max_tokens": 2000, "ignore_eos": True},
        )
    wait_for(
        lambda: metric(server.url, "llamaherd_requests_total", outcome="cancelled") == 2,
        message="the non-streaming request's cancellation",
    )
    assert metric(server.url, "llamaherd_kv_cache_usage_ratio") == 0
    # The slot is free: a new request runs at once.
    r = httpx.post(server.url + "/v1/generate", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200
    # One line per request, with the metric's outcome word; a disconnect is "cancelled".
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    finished = [x for x in lines if x.get("logger") == "llamaherd.requests"]
    assert [x["outcome"] for x in finished] == ["cancelled", "cancelled", "ok"]
    assert finished[0]["generated_tokens"] >= 5


def test_request_timeout_is_a_clear_504(server_factory, small_model: Path) -> None:
    server = server_factory(small_model, "--threads", "1", "--request-timeout-seconds", "0.5")
    r = httpx.post(
        server.url + "/v1/generate",
        timeout=30,
        json={"prompt": "go on", "max_tokens": 2000, "ignore_eos": True},
    )
    assert r.status_code == 504
    assert "timed out after 0.5s" in r.json()["error"]["message"]


def test_sigterm_drains_running_requests_then_exits_zero(server_factory, small_model: Path) -> None:
    server = server_factory(
        small_model,
        "--threads",
        "1",
        "--slots",
        "2",
        "--drain-timeout-seconds",
        "60",
        "--log-format",
        "json",
    )
    results: list[httpx.Response] = []
    body = {"prompt": "a story", "max_tokens": 150, "ignore_eos": True, "temperature": 0}
    worker = threading.Thread(
        target=lambda: results.append(
            httpx.post(server.url + "/v1/generate", json=body, timeout=120)
        )
    )
    worker.start()
    wait_for(
        lambda: metric(server.url, "llamaherd_generated_tokens_total") >= 5,
        message="the request to be generating",
    )

    server.proc.send_signal(signal.SIGTERM)
    ready = wait_for(
        lambda: (r := httpx.get(server.url + "/ready")).status_code == 503 and r,
        message="/ready to turn 503",
    )
    assert ready.json()["reason"] == "draining"
    refused = httpx.post(server.url + "/v1/generate", json={"prompt": "hi"}, timeout=10)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "draining"

    worker.join(timeout=120)
    assert results and results[0].status_code == 200
    assert results[0].json()["tokens_generated"] == 150
    assert server.proc.wait(timeout=30) == 0
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    finished = [x for x in lines if x.get("logger") == "llamaherd.requests"]
    assert any(x["outcome"] == "ok" and x["generated_tokens"] == 150 for x in finished)
    assert {"request_id", "priority", "prompt_tokens", "queue_wait_ms", "latency_ms"} <= set(
        finished[0]
    )


def test_drain_timeout_fails_what_is_left_and_still_exits_zero(
    server_factory, small_model: Path
) -> None:
    server = server_factory(small_model, "--threads", "1", "--drain-timeout-seconds", "1")
    results: list[httpx.Response] = []
    worker = threading.Thread(
        target=lambda: results.append(
            httpx.post(
                server.url + "/v1/generate",
                timeout=60,
                json={"prompt": "go", "max_tokens": 2000, "ignore_eos": True},
            )
        )
    )
    worker.start()
    wait_for(lambda: metric(server.url, "llamaherd_requests_running") == 1)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    worker.join(timeout=30)
    assert time.monotonic() - started < 20
    assert results and results[0].status_code == 500
    assert "shut down" in results[0].json()["error"]["message"]


def _truncated(model: Path, tmp_path: Path) -> Path:
    data = model.read_bytes()
    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(data[: len(data) // 2])
    return cut


def _not_gguf(model: Path, tmp_path: Path) -> Path:
    path = tmp_path / "index.gguf"
    path.write_bytes(b"<html><body>404 Not Found</body></html>\n")
    return path


def _missing(model: Path, tmp_path: Path) -> Path:
    return tmp_path / "nowhere" / "model.gguf"


@pytest.mark.parametrize(
    ("make_model", "cause"),
    [
        (_missing, "no such file"),
        (_not_gguf, "not a GGUF file (starts with b'<htm'"),
        (_truncated, "llama.cpp could not load it"),
    ],
)
def test_a_model_that_cannot_load_exits_non_zero_with_a_termination_message(
    server_factory, tiny_model: Path, tmp_path: Path, make_model, cause: str
) -> None:
    model = make_model(tiny_model, tmp_path)
    message_file = tmp_path / "termination-log"
    server = server_factory(
        model,
        "--threads",
        "1",
        wait_ready=False,
        env={"LLAMAHERD_TERMINATION_MESSAGE_PATH": str(message_file)},
    )
    started = time.monotonic()
    code = server.proc.wait(timeout=60)
    assert code != 0, server.log()
    assert time.monotonic() - started < 30
    expected = f"model load failed: {model}: {cause}"
    message = message_file.read_text()
    assert message.startswith(expected), message
    assert "\n" not in message.strip()
    log_lines = [line for line in server.log().splitlines() if "model load failed:" in line]
    assert len(log_lines) == 1, server.log()
    assert expected in log_lines[0]
    if make_model is _truncated:
        assert "llama.cpp threads: 1 (from setting)" in server.log()


def test_the_termination_message_file_may_be_unwritable(server_factory, tmp_path: Path) -> None:
    """Outside Kubernetes the default /dev/termination-log may not be writable: still exit 1."""
    server = server_factory(
        tmp_path / "missing.gguf",
        wait_ready=False,
        env={"LLAMAHERD_TERMINATION_MESSAGE_PATH": str(tmp_path / "no" / "such" / "dir" / "f")},
    )
    assert server.proc.wait(timeout=60) == 1
    assert "model load failed:" in server.log()
