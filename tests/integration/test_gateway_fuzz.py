"""Whatever a client sends through the gateway, only its own request can fail.

Hypothesis sends arbitrary methods, paths, headers and bodies (JSON requests with odd fields,
JSON that is no request, bytes that are no JSON, bodies over the limit, a Content-Length far
past it, made-up and hostile model names, X-Priority values) through the gateway, in its own
process on the real control plane, to a real llamaherd server on a generated model, while a
victim streams its own completions through the same gateway to the same server. For every
input:

- no 5xx of the gateway's own making (a replica's own 5xx passes through, counted as such);
- every error is OpenAI-shaped JSON (``{"error": {"message": ..., "type": ...}}``);
- the gateway stays ready; and at the end every victim stream finished whole.

Fixed seed (``derandomize``), bounded: ``LLAMAHERD_FUZZ_EXAMPLES`` examples (40).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ServerProcess, start_server
from tests.harness import wait_until
from tests.harness.controlplane import ControlPlane
from tests.harness.gateway import GatewayProcess
from tests.integration.test_gateway import (
    apply,
    endpoint_slice,
    inference_service,
    metric,
)

pytestmark = [pytest.mark.cluster, pytest.mark.server, pytest.mark.slow]

EXAMPLES = int(os.environ.get("LLAMAHERD_FUZZ_EXAMPLES", "40"))
MAX_BODY = 64 * 1024
KEY, VIP_KEY = "fuzz-key", "vip-key"
# Outcomes of the gateway's own making that are 5xx: none may happen on a healthy replica.
OWN_5XX = ("unavailable", "hold_timeout", "hold_full", "error", "upstream_broken")
ROUTED = ("/v1/completions", "/v1/chat/completions", "/v1/generate")
OTHER_PATHS = (
    "/v1/models",
    "/metrics",
    "/ready",
    "/healthz",
    "/",
    "/v1/",
    "/v1/completions/",
    "/V1/models",
    "/v1/embeddings",
    "/v1/%00",
    "/../etc/passwd",
)


# ---- what a client may send -----------------------------------------------------------------

models = st.one_of(
    st.sampled_from(["fuzz", "fuzz-alias"]),
    st.sampled_from(["", "x\nrequest ok model=fuzz", "\ud800", "fuzz\x00", "a" * 300, " fuzz"]),
    st.text(max_size=20),
)
priorities = st.one_of(
    st.sampled_from(["0", "9", "high", "critical", "-1", "10", "nine", " 3 ", "99999999999999"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=8),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
messages = st.one_of(
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["system", "user", "assistant", "tool", "x"]),
                "content": st.text(max_size=40) | json_values,
            }
        ),
        max_size=3,
    ),
    json_values,
)
requests_bodies = st.fixed_dictionaries(
    {"model": models | json_values},
    optional={
        "prompt": st.text(max_size=60) | st.lists(st.integers(0, 300), max_size=8) | json_values,
        "messages": messages,
        "max_tokens": st.sampled_from([1, 2, 4, 0, -1, "3", 1.5, True, None]),
        "stream": st.booleans() | json_values,
        "priority": st.integers(-2, 12) | priorities | json_values,
        "temperature": st.sampled_from([0, 0.5, 2.5, -1, "hot", None]),
        "stop": st.text(max_size=4) | json_values,
        "n": st.sampled_from([1, 2]),
        "logprobs": json_values,
    },
)


good_fields = {
    "model": st.sampled_from(["fuzz", "fuzz-alias"]),
    "max_tokens": st.integers(1, 8),
}
good_options = {
    "stream": st.booleans(),
    "priority": st.integers(0, 9) | st.sampled_from(["low", "high", "critical"]),
    "temperature": st.floats(0, 2),
    "stop": st.text(min_size=1, max_size=3),
    "seed": st.integers(0, 2**31),
}
good_requests = st.fixed_dictionaries(
    {**good_fields, "prompt": st.text(min_size=1, max_size=60)}, optional=good_options
)
good_chats = st.fixed_dictionaries(
    {
        **good_fields,
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["system", "user"]),
                    "content": st.text(min_size=1, max_size=40),
                }
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional=good_options,
)


@st.composite
def bodies(draw: st.DrawFn, path: str) -> bytes:
    kind = draw(st.sampled_from(["good", "good", "request", "request", "json", "bytes", "large"]))
    if kind == "good":  # valid, with odd but valid values: these run on the engine
        good = good_chats if path.endswith("/chat/completions") else good_requests
        return json.dumps(draw(good)).encode()
    if kind == "request":
        return json.dumps(draw(requests_bodies)).encode()
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    return b'{"model": "fuzz", "prompt": "' + b"x" * (MAX_BODY + 10) + b'"}'


header_names = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,15}", fullmatch=True).filter(
    lambda n: n.lower() not in {"content-length", "transfer-encoding", "host", "expect"}
)
header_values = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40
).map(str.strip)


@st.composite
def client_requests(draw: st.DrawFn) -> dict[str, Any]:
    headers = draw(st.dictionaries(header_names, header_values, max_size=4))
    auth = draw(st.sampled_from([KEY, KEY, KEY, KEY, VIP_KEY, "wrong", None, "raw"]))
    if auth == "raw":
        headers["Authorization"] = draw(header_values)
    elif auth is not None:
        headers["Authorization"] = f"Bearer {auth}"
    if draw(st.booleans()):
        headers["X-Priority"] = draw(priorities).strip() or "0"
    path_kind, method_kind = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    if path_kind < 6:  # most go where the replicas are
        path = draw(st.sampled_from(ROUTED))
    elif path_kind < 8:
        path = draw(st.sampled_from(OTHER_PATHS))
    else:
        path = draw(st.from_regex(r"/[A-Za-z0-9/._~-]{0,30}", fullmatch=True))
    if method_kind < 7:
        method = "POST"
    else:
        method = draw(
            st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
            | st.from_regex(r"[A-Z]{1,8}", fullmatch=True).filter(lambda m: m != "CONNECT")
        )
    return {
        "method": method,
        "path": path,
        "headers": headers,
        "body": draw(bodies(path)),
        "huge_length": draw(st.integers(0, 9)) == 7,  # one in ten: a Content-Length far past it
    }


# ---- checks ---------------------------------------------------------------------------------


def assert_openai_error(status: int, body: bytes, what: str) -> None:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AssertionError(
            f"{what}: {status} that is not an OpenAI error: {body[:300]!r}"
        ) from exc
    assert isinstance(error, dict), what
    assert isinstance(error.get("message"), str) and isinstance(error.get("type"), str), what


def raw_huge_length(gw: GatewayProcess, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """A request whose Content-Length is far past the limit and whose body never comes: the
    answer (413) must come at once, without reading it."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{gw.port}",
        "Content-Length: 10000000000000",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in {"connection"}]
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + b'{"model": "fuzz"')
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    None,
                )
                if length is not None and len(rest) >= length:
                    break
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


class Victim:
    """Streams completions through the gateway, one after another, until stopped; every one
    must come back 200 and end with [DONE]."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.done = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Victim:
        self._thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(timeout=120) as http:
            while not self._stop.is_set():
                try:
                    with http.stream(
                        "POST",
                        self.gw.url + "/v1/completions",
                        json={
                            "model": "fuzz",
                            "prompt": "the victim",
                            "stream": True,
                            "max_tokens": 24,
                            "ignore_eos": True,
                            "temperature": 0,
                        },
                        headers={"Authorization": f"Bearer {KEY}"},
                    ) as stream:
                        text = stream.read()
                    if stream.status_code != 200 or not text.rstrip().endswith(b"data: [DONE]"):
                        self.errors.append(f"{stream.status_code}: {text[-300:]!r}")
                    else:
                        self.done += 1
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


# ---- the test -------------------------------------------------------------------------------


@pytest.fixture
def fuzz_namespace(control_plane: ControlPlane, operator_crd: None) -> Iterator[str]:
    ns = f"gwfuzz-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", ns, check=True)
    yield ns
    control_plane.kubectl("delete", "namespace", ns, "--wait=false")


def test_no_input_hurts_another_request(
    control_plane: ControlPlane, fuzz_namespace: str, tiny_model: Path, tmp_path: Path
) -> None:
    cp, ns = control_plane, fuzz_namespace
    server: ServerProcess = start_server(
        tiny_model, tmp_path, "--model-name", "fuzz", "--threads", "1", "--context-size", "256"
    )
    keys, limits = tmp_path / "keys", tmp_path / "limits"
    keys.write_text(f"{KEY}\n{VIP_KEY}\n")
    limits.write_text(f"{VIP_KEY} 5\n")
    gw = GatewayProcess(
        cp.kubeconfig,
        tmp_path / "gateway.log",
        env={
            "LLAMAHERD_GATEWAY_NAMESPACES": ns,
            "LLAMAHERD_GATEWAY_API_KEYS_FILE": str(keys),
            "LLAMAHERD_GATEWAY_PRIORITY_LIMITS_FILE": str(limits),
            "LLAMAHERD_GATEWAY_MAX_PRIORITY": "2",
            "LLAMAHERD_GATEWAY_MAX_BODY_BYTES": str(MAX_BODY),
        },
    )
    victim: Victim | None = None
    try:
        apply(
            cp,
            inference_service(
                ns, "fuzz", tiny_model, 1, gateway={"servedModelNames": ["fuzz-alias"]}
            ),
        )
        apply(cp, endpoint_slice(ns, "fuzz", [(0, server.port, "ready")]))
        gw.start()
        auth = {"Authorization": f"Bearer {KEY}"}

        def listed() -> bool:
            view = httpx.get(gw.url + "/v1/models", headers=auth, timeout=5).json()
            return any(
                m["id"] == "fuzz" and m["services"][0]["readyEndpoints"] for m in view["data"]
            )

        wait_until(listed, timeout=30, what="fuzz ready in the gateway")
        victim = Victim(gw).start()
        http = httpx.Client(timeout=60)

        def own_5xx() -> float:
            text = gw.metrics()
            return sum(metric(text, "llamaherd_gateway_requests_total", outcome=o) for o in OWN_5XX)

        statuses: Counter[int] = Counter()

        @settings(
            derandomize=True,
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(request=client_requests())
        def check(request: dict[str, Any]) -> None:
            what = f"{request['method']} {request['path']!r}"
            if request["huge_length"] and request["path"] in ROUTED:
                status, body = raw_huge_length(gw, request["path"], {**request["headers"], **auth})
                statuses[status] += 1
                assert status == 413, (what, status, body)
                assert_openai_error(status, body, what)
            else:
                upstream_5xx = metric(
                    gw.metrics(), "llamaherd_gateway_requests_total", outcome="upstream_5xx"
                )
                r = http.request(
                    request["method"],
                    gw.url + request["path"],
                    headers=request["headers"],
                    content=request["body"],
                )
                statuses[r.status_code] += 1
                if r.status_code >= 400 and request["method"] != "HEAD":
                    assert_openai_error(r.status_code, r.content, what)
                if r.status_code >= 500:  # only a replica's own, passed through
                    after = metric(
                        gw.metrics(), "llamaherd_gateway_requests_total", outcome="upstream_5xx"
                    )
                    assert after > upstream_5xx, (what, r.status_code, r.text[:300])
            assert own_5xx() == 0, (what, gw.tail(20))
            assert httpx.get(gw.url + "/ready", timeout=5).status_code == 200, what

        try:
            check()
        finally:
            http.close()
        victim.stop()
        print(f"statuses {dict(sorted(statuses.items()))}, victim streams {victim.done}")
        assert not victim.errors, victim.errors[:3]
        assert victim.done > 0
        assert gw.ready()
        # the made-up names never became series
        text = gw.metrics()
        models_seen = {
            line.split('model="', 1)[1].split('"', 1)[0]
            for line in text.splitlines()
            if line.startswith("llamaherd_gateway_requests_total{")
        }
        assert models_seen <= {"", "fuzz", "fuzz-alias"}, models_seen
    finally:
        if victim is not None:
            victim.stop()
        gw.stop()
        server.stop()
