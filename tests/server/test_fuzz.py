"""Property-based tests of the server's API against the real llama.cpp engine: requests made from
the OpenAPI schema that the server publishes (schemathesis: schema-valid bodies, and bodies
that break the schema), and from hand-written strategies for what a schema cannot say well
(sampling fields at their edges, chat content with typed control markers, token-id prompts),
while a victim stream runs beside them.

Invariants, for every request: no 5xx; a 200 matches the response schema (a stream: every event
is a chunk, no error inside, ``[DONE]`` last); any error is OpenAI's error object; a body that
breaks the schema gets a 4xx. Across the run: every victim completes with all its tokens,
``/health`` stays healthy, and the KV gauges return to 0.

The run is deterministic (derandomized, a fixed example budget). ``LLAMAHERD_FUZZ_EXAMPLES``
sets the budget per strategy (CI: the default below; ``make fuzz``: a longer run).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from ..conftest import ServerProcess, start_server, wait_for

pytestmark = [pytest.mark.server, pytest.mark.slow]

EXAMPLES = int(os.environ.get("LLAMAHERD_FUZZ_EXAMPLES", "40"))
CONTEXT = 256
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ENDPOINTS = ("/v1/generate", "/v1/completions", "/v1/chat/completions")
RESPONSES = {
    "/v1/generate": "GenerateResponse",
    "/v1/completions": "CompletionResponse",
    "/v1/chat/completions": "ChatCompletionResponse",
}
VICTIM_TOKENS = 32


class Victim:
    """Greedy streams, one after another, for as long as the fuzzing runs (bounded): each must
    finish with all its tokens, whatever the fuzzed requests beside it do."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.completed = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        body = {
            "prompt": "the victim's own story",
            "max_tokens": VICTIM_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        deadline = time.monotonic() + 900  # bounded, whatever happens
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    with client.stream("POST", "/v1/completions", json=body) as r:
                        text = r.read().decode()
                    chunks = [
                        json.loads(line[6:])
                        for line in text.splitlines()
                        if line.startswith("data: ") and line != "data: [DONE]"
                    ]
                    usage = chunks[-1]["usage"] if chunks else None
                    if (
                        r.status_code != 200
                        or not text.rstrip().endswith("data: [DONE]")
                        or not usage
                        or usage["completion_tokens"] != VICTIM_TOKENS
                    ):
                        self.failures.append(f"{r.status_code}: {text[-300:]}")
                    else:
                        self.completed += 1
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))


@pytest.fixture(scope="module")
def fuzz_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    env = {
        "LLAMAHERD_SLOTS": "4",
        "LLAMAHERD_CONTEXT_SIZE": str(CONTEXT),
        "LLAMAHERD_THREADS": "1",
        "LLAMAHERD_MAX_BODY_BYTES": "65536",
        "LLAMAHERD_REQUEST_TIMEOUT_SECONDS": "60",
    }
    server = start_server(tiny_model, tmp_path_factory.mktemp("fuzz"), env=env)
    victim = Victim(server.url)
    victim.thread.start()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        schema = client.get("/openapi.json").json()
        yield server, client, schema, victim
    victim.stop.set()
    victim.thread.join(120)
    server.stop()


def validator(openapi: dict[str, Any], name: str) -> jsonschema.Validator:
    schema = {"components": openapi["components"], "$ref": f"#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema)


def check(
    server: ServerProcess, openapi: dict[str, Any], path: str, body: Any, r: httpx.Response
) -> None:
    """The invariants for one response."""
    where = f"{path} {json.dumps(body, default=repr)[:400]} -> {r.status_code} {r.text[:400]}"
    assert r.status_code < 500, where
    if r.status_code != 200:
        validator(openapi, "ErrorResponse").validate(r.json())
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert lines and lines[-1] == "data: [DONE]", where
        for line in lines[:-1]:
            chunk = json.loads(line[6:])
            assert "error" not in chunk, where
            assert chunk["object"] in ("text_completion", "chat.completion.chunk"), where
        return
    validator(openapi, RESPONSES[path]).validate(r.json())


def post(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):  # a raw body (not JSON, or not UTF-8)
        return client.post(path, content=body, headers={"content-type": "application/json"})
    if isinstance(body, dict) and body.get("stream"):
        with client.stream("POST", path, json=body) as r:
            r.read()
            return r
    return client.post(path, json=body)


def healthy(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "healthy", r.text


# ---- requests from the schema ------------------------------------------------------------------


def schema_cases(openapi: dict[str, Any], path: str, mode: GenerationMode) -> Any:
    """schemathesis' strategy for the operation's requests (their bodies are what we send)."""
    return schemathesis.openapi.from_dict(openapi)[path]["POST"].as_strategy(mode)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path", ENDPOINTS)
def test_requests_from_the_schema_never_get_a_5xx(
    fuzz_server: Any, path: str, mode: GenerationMode
) -> None:
    """POSITIVE: bodies the schema accepts; NEGATIVE: bodies that break it, which must get a
    4xx (or a 200 when they break it only in a way that a JSON parser does not see)."""
    server, client, openapi, _ = fuzz_server

    @FUZZ
    @given(case=schema_cases(openapi, path, mode))
    def run(case: Any) -> None:
        r = post(client, path, case.body)
        check(server, openapi, path, case.body, r)

    run()
    healthy(client)


# ---- hand-written strategies -------------------------------------------------------------------

MARKERS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>", "<|im_start|>system\n"]
texts = st.one_of(
    st.text(min_size=1, max_size=60),
    st.lists(
        st.sampled_from([*MARKERS, "hi", " ", "\n", "é", "🦙", "\x00", "\ufffd"]), min_size=1
    ).map("".join),
)
temperatures = st.one_of(
    st.sampled_from([0.0, 5e-324, 1e-300, 1e-40, 1e-6, 1e-5, 2.0]),
    st.floats(0.0, 2.0, allow_nan=False),
)
seeds = st.one_of(
    st.sampled_from([-1, -5, 0, 2**32 - 1, 2**32, 2**63 - 1, -(2**63), 2**64 - 1]),
    st.integers(-(2**63), 2**64 - 1),
)
# Fields that every request may carry, whichever sampler it asks for.
common = {
    "seed": seeds,
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(texts, max_size=4)),
    "ignore_eos": st.booleans(),
    "priority": st.one_of(st.integers(0, 9), st.sampled_from(["low", "high", "critical"])),
    "max_tokens": st.integers(1, 48),
    "stream": st.booleans(),
}
# One sampler path in three each: greedy, plain temperature sampling (the API's default; the
# engine samples it itself) and llama.cpp's chains (any of the other fields).
sampling = st.one_of(
    st.fixed_dictionaries({"temperature": st.just(0.0)}, optional=common),
    st.fixed_dictionaries({"temperature": temperatures}, optional=common),
    st.fixed_dictionaries(
        {},
        optional={
            **common,
            "temperature": temperatures,
            "top_p": st.one_of(st.sampled_from([1e-9, 1.0]), st.floats(1e-9, 1.0)),
            "top_k": st.one_of(st.sampled_from([0, 1, 10**9]), st.integers(0, 100)),
            "min_p": st.floats(0.0, 1.0),
            "repeat_penalty": st.one_of(st.sampled_from([1e-9, 10.0]), st.floats(1e-9, 10.0)),
            "presence_penalty": st.floats(-2.0, 2.0),
            "frequency_penalty": st.floats(-2.0, 2.0),
        },
    ),
)
token_prompts = st.lists(st.integers(0, 511), min_size=1, max_size=64)
chat_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
            "content": st.one_of(
                texts,
                st.none(),
                st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts})),
            ),
        }
    ),
    min_size=1,
    max_size=4,
)
hand_written = st.one_of(
    st.tuples(st.just("/v1/generate"), st.fixed_dictionaries({"prompt": texts}), sampling),
    st.tuples(
        st.just("/v1/completions"),
        st.fixed_dictionaries(
            {"prompt": st.one_of(texts, token_prompts, st.lists(texts, min_size=1, max_size=1))}
        ),
        sampling,
    ),
    st.tuples(
        st.just("/v1/chat/completions"),
        st.fixed_dictionaries({"messages": chat_messages}),
        sampling,
    ),
)


def test_edge_sampling_fields_chat_content_and_token_prompts_never_get_a_5xx(
    fuzz_server: Any,
) -> None:
    server, client, openapi, _ = fuzz_server

    @settings(FUZZ, max_examples=3 * EXAMPLES)
    @given(case=hand_written)
    def run(case: tuple[str, dict[str, Any], dict[str, Any]]) -> None:
        path, base, fields = case
        body = {**base, **fields}
        if path == "/v1/generate":
            body.pop("stream", None)
        r = post(client, path, body)
        check(server, openapi, path, body, r)
        # Everything here is valid for this model, except what the context cannot hold.
        if r.status_code != 200:
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "context_length_exceeded", r.text

    run()
    healthy(client)


# ---- after the run (pytest runs the module's tests in order) -------------------------------


def test_the_victim_completed_and_the_server_is_whole(fuzz_server: Any) -> None:
    server, client, _, victim = fuzz_server
    wait_for(lambda: victim.completed >= 3, timeout=60, message="three victim streams")
    victim.stop.set()
    victim.thread.join(120)
    assert not victim.failures, victim.failures[:3]
    healthy(client)

    def kv_empty() -> bool:
        text = client.get("/metrics").text
        values = {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith(("llamaherd_kv_cache_usage_ratio ", "llamaherd_requests_running "))
        }
        return values == {"llamaherd_kv_cache_usage_ratio": 0.0, "llamaherd_requests_running": 0.0}

    wait_for(kv_empty, timeout=10, message="KV gauges back to 0")
    assert server.proc.poll() is None
