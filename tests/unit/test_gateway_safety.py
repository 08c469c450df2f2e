"""The gateway's rules for many tenants (issue 20): scoped model names, labels and log lines
that a client cannot make, the body limit, which failures are retried, outlier ejection, the
service labels of hold refusals, 405s, the gateway's own keys kept from the replicas, IP-only
EndpointSlices, readiness that follows the watches, priority limits per key.

Pure parts are called directly; the gateway itself through ``httpx.ASGITransport`` (no socket
to it), with small asyncio servers on 127.0.0.1 as replicas where a connection's fate matters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import shlex
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from llamaherd_gateway import picker
from llamaherd_gateway.keys import PriorityLimits, parse_priority_limits
from llamaherd_gateway.logs import log_value
from llamaherd_gateway.metrics import GatewayMetrics
from llamaherd_gateway.outliers import OutlierDetector
from llamaherd_gateway.proxy import (
    Gateway,
    RequestBody,
    ends_stream,
    failure_kind,
    upstream_session,
)
from llamaherd_gateway.registry import Endpoint, Registry, model_table, service_info
from llamaherd_gateway.routing import CONNECT, MAY_HAVE_RUN, TIMEOUT, UNSENT, UNSTARTED
from llamaherd_gateway.settings import GatewaySettings
from llamaherd_server.logs import TextFormatter

# ---- model names belong to one namespace ----------------------------------------------------


def isvc(namespace: str, name: str, created: str = "", **gateway: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if created:
        meta["creationTimestamp"] = created
    return {"metadata": meta, "spec": {"gateway": gateway} if gateway else {}}


def served(reg: Registry) -> dict[str, list[str]]:
    return {m: [f"{s.namespace}/{s.name}" for s in v] for m, v in reg.models().items()}


def test_a_namespace_cannot_claim_another_namespaces_model() -> None:
    reg = Registry()
    reg.upsert_service(isvc("team-a", "llama", "2024-05-01T00:00:00Z"))
    # older, heavier, and still no share of team-a's model
    reg.upsert_service(
        isvc("team-b", "squatter", "2020-01-01T00:00:00Z", servedModelNames=["llama"], weight=10000)
    )
    # the same namespace may split its own model
    reg.upsert_service(isvc("team-a", "llama-canary", servedModelNames=["llama"], weight=5))
    assert served(reg)["llama"] == ["team-a/llama", "team-a/llama-canary"]
    assert served(reg)["squatter"] == ["team-b/squatter"]
    assert reg.ignored_claims() == {("team-b", "squatter"): ("llama",)}


def test_a_name_nobody_is_named_goes_to_the_oldest_claimant_namespace() -> None:
    services = [
        service_info(isvc("b", "x", "2024-01-02T00:00:00Z", servedModelNames=["shared"])),
        service_info(isvc("a", "y", "2024-01-03T00:00:00Z", servedModelNames=["shared"])),
        service_info(isvc("b", "z", "2024-01-04T00:00:00Z", servedModelNames=["shared"])),
    ]
    table, ignored = model_table(services)
    assert [s.key for s in table["shared"]] == [("b", "x"), ("b", "z")]
    assert ignored == {("a", "y"): ("shared",)}
    # same second: namespace, then name, decide; a service without a timestamp counts as newest
    tie = [
        service_info(isvc("b", "x", "2024-01-01T00:00:00Z", servedModelNames=["s"])),
        service_info(isvc("a", "y", "2024-01-01T00:00:00Z", servedModelNames=["s"])),
        service_info(isvc("0", "w", servedModelNames=["s"])),
    ]
    assert [s.key for s in model_table(tie)[0]["s"]] == [("a", "y")]
    # two namespaces with a service of that name: the older one's
    twins = [
        service_info(isvc("new", "llama", "2025-01-01T00:00:00Z")),
        service_info(isvc("old", "llama", "2023-01-01T00:00:00Z")),
        service_info(isvc("other", "fan", "2020-01-01T00:00:00Z", servedModelNames=["llama"])),
    ]
    assert [s.key for s in model_table(twins)[0]["llama"]] == [("old", "llama")]


def test_cross_namespace_models_when_allowed() -> None:
    reg = Registry(cross_namespace=True)
    reg.upsert_service(isvc("team-a", "llama"))
    reg.upsert_service(isvc("team-b", "helper", servedModelNames=["llama"]))
    assert served(reg)["llama"] == ["team-a/llama", "team-b/helper"]
    assert reg.ignored_claims() == {}


def test_only_ip_endpoint_slices_are_dialled() -> None:
    from llamaherd_gateway.registry import slice_endpoints

    def slice_of(address_type: str | None, *addresses: str) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "metadata": {"name": "m-x", "namespace": "ns"},
            "ports": [{"name": "http", "port": 8000}],
            "endpoints": [{"addresses": list(addresses), "conditions": {"ready": True}}],
        }
        if address_type is not None:
            obj["addressType"] = address_type
        return obj

    assert slice_endpoints(slice_of("FQDN", "evil.example.com")) == []
    assert slice_endpoints(slice_of("FQDN", "198.18.0.1")) == []
    assert slice_endpoints(slice_of("Unix", "198.18.0.1")) == []
    # written by hand without a type (the API requires one): IP literals only
    assert slice_endpoints(slice_of(None, "198.18.0.1", "localhost")) == [
        Endpoint("198.18.0.1", 8000)
    ]
    assert slice_endpoints(slice_of("IPv4", "198.18.0.1", "not-an-ip", "fd00::1")) == [
        Endpoint("198.18.0.1", 8000)
    ]
    assert slice_endpoints(slice_of("IPv6", "fd00::1", "198.18.0.1")) == [Endpoint("fd00::1", 8000)]


# ---- outlier detection ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_consecutive_failures_eject_for_a_growing_time() -> None:
    clock = Clock()
    det: OutlierDetector[str] = OutlierDetector(3, base_s=10, max_s=25, clock=clock)
    assert det.failure("a") is None and det.failure("a") is None
    det.success("a")  # a success resets the count
    assert det.failure("a") is None and det.failure("a") is None
    assert det.failure("a") == 10
    assert det.ejected() == {"a": 1000.0}
    clock.now += 10
    assert det.ejected() == {}  # back in service; needs three new failures
    assert det.failure("a") is None and det.failure("a") is None
    assert det.failure("a") == 20  # the second ejection is longer
    clock.now += 20
    for _ in range(2):
        det.failure("a")
    assert det.failure("a") == 25  # capped at max_s
    # a long time back in service forgives earlier ejections
    clock.now += 25 + 10 * 10
    for _ in range(2):
        det.failure("a")
    assert det.failure("a") == 10
    # the caller's floor: no ejection when it says no
    for _ in range(3):
        assert det.failure("b", may_eject=False) is None
    assert "b" not in det.ejected() and det.failures("b") == 3
    det.forget(["a"])
    assert det.failures("b") == 0
    off: OutlierDetector[str] = OutlierDetector(0, base_s=10, max_s=10, clock=clock)
    assert all(off.failure("a") is None for _ in range(10))


def test_ejection_keeps_a_floor_of_endpoints() -> None:
    assert not picker.ejectable(1, 0, 50)  # a lone endpoint is never ejected
    assert picker.ejectable(2, 0, 50) and not picker.ejectable(2, 1, 50)
    assert picker.ejectable(3, 0, 50) and not picker.ejectable(3, 1, 50)
    assert picker.ejectable(10, 2, 30) and not picker.ejectable(10, 3, 30)
    replicas = ["a", "b", "c", "d"]
    # three ejected, two may stay out: the two ejected first
    assert picker.in_service(replicas, {"c": 5.0, "a": 7.0, "b": 6.0}, 50) == ["a", "d"]
    assert picker.in_service(replicas, {}, 50) == replicas
    assert picker.in_service(replicas, {"a": 1.0}, 0) == replicas
    # everything ejected and allowed to be: all come back (a service never has none)
    assert picker.in_service(["a"], {"a": 1.0}, 100) == ["a"]


# ---- which failures are retried -------------------------------------------------------------


def connector_error() -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey("198.18.0.1", 80, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))


@pytest.mark.parametrize(
    ("exc", "handed_over", "streamed", "kind"),
    [
        (connector_error(), False, False, CONNECT),
        (aiohttp.ConnectionTimeoutError(), False, False, CONNECT),
        (aiohttp.ServerDisconnectedError(), False, False, UNSENT),
        (aiohttp.ClientOSError(104, "reset"), False, False, UNSENT),
        (aiohttp.ServerDisconnectedError(), True, False, MAY_HAVE_RUN),
        (aiohttp.ClientOSError(104, "reset"), True, False, MAY_HAVE_RUN),
        (aiohttp.ServerDisconnectedError(), True, True, UNSTARTED),
        (aiohttp.ClientOSError(104, "reset"), True, True, UNSTARTED),
        (aiohttp.SocketTimeoutError(), True, True, TIMEOUT),
        (aiohttp.SocketTimeoutError(), True, False, TIMEOUT),
        (aiohttp.ClientPayloadError("garbage"), True, True, MAY_HAVE_RUN),
    ],
)
def test_failure_kinds(exc: BaseException, handed_over: bool, streamed: bool, kind: str) -> None:
    assert failure_kind(exc, handed_over, streamed) == kind


class FakeTransport:
    def __init__(self, closing: bool) -> None:
        self.closing = closing

    def is_closing(self) -> bool:
        return self.closing


class FakeWriter:
    def __init__(self, transport: FakeTransport | None) -> None:
        self.transport = transport
        self.written = b""

    async def write(self, chunk: bytes) -> None:
        self.written += bytes(chunk)


@pytest.mark.parametrize(
    ("transport", "handed_over"),
    [(FakeTransport(False), True), (FakeTransport(True), False), (None, False)],
)
async def test_a_body_knows_whether_it_was_handed_over(
    transport: FakeTransport | None, handed_over: bool
) -> None:
    for length in (None, 5):
        body = RequestBody(b'{"model": "m"}')
        assert not body.handed_over
        writer = FakeWriter(transport)
        await body.write_with_length(writer, length)
        assert body.handed_over is handed_over
    body = RequestBody(b"{}")
    await body.write(FakeWriter(transport))
    assert body.handed_over is handed_over


# ---- logs and labels ------------------------------------------------------------------------


def test_log_values_cannot_forge_lines_or_fields() -> None:
    assert log_value("llama-3.1:8b") == "llama-3.1:8b"
    assert log_value("") == ""
    for evil in (
        "x\nrequest ok model=forged",
        "x\rforged",
        "x\u2028forged",
        "x\x00\x1b[31m\x7f",
        "a b=c",
        'q"uote',
    ):
        out = log_value(evil)  # one quoted token, nothing that ends a line
        assert out.isascii() and out.isprintable()
        assert out.startswith('"') and out.endswith('"') and json.loads(out) == evil


def test_settings_of_the_rules_are_bounded() -> None:
    for bad in (
        {"max_body_bytes": 10},
        {"max_priority": 10},
        {"outlier_consecutive_failures": -1},
        {"outlier_base_ejection_seconds": 0},
        {"outlier_max_ejection_percent": 101},
        {"upstream_keepalive_seconds": 0},
    ):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            GatewaySettings(**bad)
    defaults = GatewaySettings()
    assert defaults.forward_authorization is False
    assert defaults.allow_cross_namespace_models is False
    assert defaults.max_priority == 9


def test_the_body_limit_defaults_to_the_servers() -> None:
    from llamaherd_server.settings import ServerSettings

    server_default = ServerSettings.model_fields["max_body_bytes"].default
    assert GatewaySettings().max_body_bytes == server_default


def test_priority_limits_file(tmp_path: Path) -> None:
    assert parse_priority_limits("# who may jump the queue\nk1 5\nk2 high\nbad\nk3 11\n") == (
        ("k1", 5),
        ("k2", 2),
    )
    path = tmp_path / "limits"
    path.write_text("vip 7\n")
    limits = PriorityLimits(path)
    assert limits.limit_for("Bearer vip", 1) == 7
    assert limits.limit_for("Bearer vi", 1) == 1
    assert limits.limit_for(None, 1) == 1
    assert PriorityLimits(tmp_path / "absent").limit_for("Bearer vip", 2) == 2


def test_affinity_key_of_odd_bodies() -> None:
    assert picker.affinity_key("/v1/chat/completions", {"messages": 5}, 10) == ""
    assert picker.affinity_key("/v1/chat/completions", {"messages": "abc"}, 10) == ""
    assert picker.affinity_key("/v1/completions", {"prompt": [True, 2]}, 10) == ""
    key = picker.affinity_key("/v1/completions", {"prompt": "\ud800 lone"}, 10)
    assert picker.rendezvous_order(key, ["a", "b"])  # a lone surrogate hashes


# ---- the gateway, in process ----------------------------------------------------------------


class Replica:
    """A stand-in replica on 127.0.0.1. ``ok``: answers 200 with what it received (headers,
    body); ``fail``: answers 503; ``close``: reads the whole request, then closes without a
    word. ``port`` of a closed socket: refuses."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.connections = 0
        self.received: list[dict[str, Any]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> Replica:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                headers = [
                    (k.strip().lower(), v.strip())
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                ]
                length = int(dict(headers).get("content-length", "0"))
                body = await reader.readexactly(length)
                seen = {"line": lines[0], "headers": headers, "body": json.loads(body or b"{}")}
                self.received.append(seen)
                if self.mode == "close":
                    return
                status = 503 if self.mode == "fail" else 200
                payload = json.dumps(seen).encode()
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        finally:
            writer.close()


def refused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


POD = "198.18.0.{}"


def add_service(
    reg: Registry, name: str, ports: list[int], replicas: int = 1, namespace: str = "ns"
) -> list[Endpoint]:
    reg.upsert_service(
        {"metadata": {"name": name, "namespace": namespace}, "spec": {"replicas": replicas}}
    )
    for i, port in enumerate(ports):
        reg.upsert_slice(
            {
                "metadata": {
                    "name": f"{name}-{i}",
                    "namespace": namespace,
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": port}],
                "endpoints": [{"addresses": [POD.format(i + 1)], "conditions": {"ready": True}}],
            }
        )
    return reg.endpoints((namespace, name))


def loopback(endpoint: Endpoint) -> str:
    return f"http://127.0.0.1:{endpoint.port}"


Harness = tuple[Gateway, Registry, httpx.AsyncClient]


@pytest.fixture
async def make_gateway() -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    made: list[tuple[Gateway, httpx.AsyncClient]] = []

    async def make(**settings: Any) -> Harness:
        config = GatewaySettings(load_poll_seconds=0, affinity_prefix_chars=0, **settings)
        registry = Registry(cross_namespace=config.allow_cross_namespace_models)
        gateway = Gateway(
            config,
            registry,
            GatewayMetrics(),
            upstream_session(config),
            url_for=loopback,
            rng=random.Random(0),
        )
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway), base_url="http://gateway", timeout=20
        )
        made.append((gateway, client))
        return gateway, registry, client

    yield make
    for gateway, client in made:
        await client.aclose()
        await gateway.close()
        await gateway.http.close()


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    gateway._count_endpoints()  # the gauges a scrape sets
    total = 0.0
    for family in text_string_to_metric_families(gateway.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def openai_error(r: httpx.Response) -> dict[str, Any]:
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


async def test_a_wrong_method_is_405_with_allow(
    make_gateway: Callable[..., Awaitable[Harness]],
) -> None:
    _, _, client = await make_gateway()
    r = await client.get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert openai_error(r)["code"] == "method_not_allowed"
    r = await client.post("/v1/models", json={})
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    r = await client.delete("/ready")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    r = await client.get("/v2/nothing")
    assert r.status_code == 404 and openai_error(r)["code"] == "not_found"


async def test_content_length_over_the_limit_is_413_before_the_body(
    make_gateway: Callable[..., Awaitable[Harness]],
) -> None:
    gateway, _, _ = await make_gateway(max_body_bytes=4096)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        raise AssertionError("the body was read")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "headers": [(b"content-length", b"99999999999999999999"), (b"host", b"gw")],
    }
    await gateway(scope, receive, send)
    start, body = sent
    assert start["status"] == 413
    assert (b"connection", b"close") in start["headers"]
    assert json.loads(body["body"])["error"]["code"] == "request_too_large"
    assert metric(gateway, "llamaherd_gateway_requests_total", outcome="bad_request") == 1


async def test_the_body_limit_is_a_setting(make_gateway: Callable[..., Awaitable[Harness]]) -> None:
    _, _, client = await make_gateway(max_body_bytes=2048)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        yield b'{"model": "m", "prompt": "'
        for _ in range(4):
            yield b"x" * 1000
        yield b'"}'

    r = await client.post("/v1/completions", content=chunks())
    assert r.status_code == 413 and openai_error(r)["code"] == "request_too_large"


async def test_bodies_that_are_not_requests_are_400s(
    make_gateway: Callable[..., Awaitable[Harness]],
) -> None:
    _, _, client = await make_gateway()
    for body in (b"[" * 50_000, b"\xff\xfe", b"[1]", b"{}", b'{"model": 5}', b""):
        r = await client.post("/v1/completions", content=body)
        assert r.status_code == 400, body[:20]
        openai_error(r)


async def test_an_unknown_model_never_becomes_a_label_or_a_log_line(
    make_gateway: Callable[..., Awaitable[Harness]], caplog: pytest.LogCaptureFixture
) -> None:
    gateway, _, client = await make_gateway()
    evil = "made-up\nrequest ok model=forged service=ns/x"
    with caplog.at_level(logging.INFO, logger="llamaherd_gateway.requests"):
        r = await client.post("/v1/completions", json={"model": evil, "prompt": "x"})
    assert r.status_code == 404 and openai_error(r)["code"] == "model_not_found"
    text = gateway.metrics.render().decode()
    assert "made-up" not in text and "forged" not in text
    assert metric(gateway, "llamaherd_gateway_requests_total", model="", outcome="not_found") == 1
    (record,) = [r for r in caplog.records if r.name == "llamaherd_gateway.requests"]
    line = TextFormatter().format(record)
    assert "\n" not in line and json.dumps(evil) in line
    fields = shlex.split(line)  # the model is one quoted token: no field of its making
    assert [f for f in fields if f.startswith(("model=", "service="))] == [
        "model=" + json.dumps(evil)[1:-1],
        "service=",
    ]


async def test_hold_refusals_carry_their_service(
    make_gateway: Callable[..., Awaitable[Harness]],
) -> None:
    gateway, reg, client = await make_gateway(max_held_requests=0)
    add_service(reg, "parked", [], replicas=0)
    r = await client.post("/v1/completions", json={"model": "parked", "prompt": "x"})
    assert r.status_code == 503 and openai_error(r)["code"] == "hold_full"
    assert "retry-after" in r.headers
    labels = {"target_namespace": "ns", "inferenceservice": "parked"}
    assert metric(gateway, "llamaherd_gateway_requests_total", outcome="hold_full", **labels) == 1
    gateway, reg, client = await make_gateway(hold_timeout_seconds=0.2)
    add_service(reg, "parked", [], replicas=0)
    r = await client.post("/v1/completions", json={"model": "parked", "prompt": "x"})
    assert r.status_code == 503 and openai_error(r)["code"] == "hold_timeout"
    assert (
        metric(gateway, "llamaherd_gateway_requests_total", outcome="hold_timeout", **labels) == 1
    )


async def test_the_gateways_own_key_stays_with_the_gateway(
    make_gateway: Callable[..., Awaitable[Harness]], tmp_path: Path
) -> None:
    replica = await Replica().start()
    keys = tmp_path / "keys"
    keys.write_text("team-key\n")
    try:
        for settings, forwarded in (
            ({"api_keys_file": keys}, False),
            ({"api_keys_file": keys, "forward_authorization": True}, True),
            ({}, True),  # no key check of its own: the header is for the servers
        ):
            _, reg, client = await make_gateway(**settings)
            add_service(reg, "m", [replica.port])
            r = await client.post(
                "/v1/completions",
                json={"model": "m", "prompt": "x"},
                headers={"Authorization": "Bearer team-key"},
            )
            assert r.status_code == 200, r.text
            names = [k for k, _ in r.json()["headers"]]
            assert ("authorization" in names) is forwarded, settings
    finally:
        await replica.stop()


async def test_priorities_are_capped_per_key(
    make_gateway: Callable[..., Awaitable[Harness]], tmp_path: Path
) -> None:
    replica = await Replica().start()
    limits = tmp_path / "limits"
    limits.write_text("vip-key 5\n")
    try:
        _, reg, client = await make_gateway(max_priority=1, priority_limits_file=limits)
        add_service(reg, "m", [replica.port])

        async def sent(headers: dict[str, str], **body: Any) -> tuple[list[str], Any]:
            r = await client.post(
                "/v1/generate", json={"model": "m", "prompt": "x", **body}, headers=headers
            )
            assert r.status_code == 200, r.text
            seen = r.json()
            return [v for k, v in seen["headers"] if k == "x-priority"], seen["body"].get(
                "priority"
            )

        assert await sent({"X-Priority": "9"}, priority=9) == (["1"], 1)
        assert await sent({"X-Priority": "critical"}, priority="high") == (["1"], 1)
        assert await sent({"X-Priority": "0"}, priority=1) == (["0"], 1)  # within: unchanged
        assert await sent({}) == ([], None)
        vip = {"Authorization": "Bearer vip-key"}
        assert await sent({**vip, "X-Priority": "9"}, priority=7) == (["5"], 5)
        assert await sent({**vip, "X-Priority": "4"}, priority=3) == (["4"], 3)
        r = await client.post(
            "/v1/generate",
            json={"model": "m", "prompt": "x"},
            headers={"X-Priority": "urgent-ish"},
        )
        assert r.status_code == 400 and openai_error(r)["param"] == "X-Priority"
        assert "urgent-ish" in r.json()["error"]["message"]
    finally:
        await replica.stop()


async def test_a_streamed_request_closed_before_headers_goes_elsewhere_others_never(
    make_gateway: Callable[..., Awaitable[Harness]],
) -> None:
    """The replica read the whole request and closed. Streamed: its headers would have come
    with a slot, so it never ran: retried on the other replica. Not streamed: it may have run:
    502, never a second run."""
    closer, good = await Replica("close").start(), await Replica().start()
    try:
        gateway, reg, client = await make_gateway(outlier_consecutive_failures=0)
        _, healthy = add_service(reg, "m", [closer.port, good.port])
        gateway.others[healthy] = 5  # so that least-loaded tries the closing replica first
        body = {"model": "m", "prompt": "x", "stream": True}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200 and len(closer.received) == 1 and len(good.received) == 1
        assert metric(gateway, "llamaherd_gateway_retries_total") == 1
        r = await client.post("/v1/completions", json={**body, "stream": False})
        assert r.status_code == 502 and openai_error(r)["code"] == "upstream_error"
        assert len(closer.received) == 2 and len(good.received) == 1
        assert metric(gateway, "llamaherd_gateway_retries_total") == 1
    finally:
        await closer.stop()
        await good.stop()


async def test_a_replicas_own_5xx_is_never_retried_and_ejects_it(
    make_gateway: Callable[..., Awaitable[Harness]],
) -> None:
    failing, good = await Replica("fail").start(), await Replica().start()
    try:
        gateway, reg, client = await make_gateway(
            outlier_consecutive_failures=2, outlier_base_ejection_seconds=60
        )
        bad, healthy = add_service(reg, "m", [failing.port, good.port])
        gateway.others[healthy] = 10  # least-loaded would always pick the failing one
        statuses = [
            (await client.post("/v1/completions", json={"model": "m", "prompt": "x"})).status_code
            for _ in range(6)
        ]
        assert statuses == [503, 503, 200, 200, 200, 200]
        assert len(failing.received) == 2 and len(good.received) == 4
        assert metric(gateway, "llamaherd_gateway_retries_total") == 0
        labels = {"target_namespace": "ns", "inferenceservice": "m"}
        assert metric(gateway, "llamaherd_gateway_ejections_total", **labels) == 1
        assert metric(gateway, "llamaherd_gateway_ejected_endpoints", **labels) == 1
        assert bad in gateway.outliers.ejected()
    finally:
        await failing.stop()
        await good.stop()


async def test_a_dead_endpoint_does_not_look_idle(
    make_gateway: Callable[..., Awaitable[Harness]],
) -> None:
    """The kind measurement: a ready endpoint that refuses every connection beside two real
    replicas was tried first by 644 of 997 requests. Now only until it is ejected."""
    first, second = await Replica().start(), await Replica().start()
    try:
        gateway, reg, client = await make_gateway(
            outlier_consecutive_failures=3, outlier_base_ejection_seconds=60
        )
        add_service(reg, "m", [refused_port(), first.port, second.port])
        n = 60

        async def one() -> int:
            r = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
            return r.status_code

        statuses = []
        for _ in range(n // 6):  # six at a time: loads tie at zero, as at light load
            statuses += await asyncio.gather(*(one() for _ in range(6)))
        assert statuses == [200] * n
        tried_dead = metric(gateway, "llamaherd_gateway_retries_total")
        # six in flight may reach it before the third failure ejects it
        assert tried_dead <= 3 + 5, tried_dead
        assert metric(gateway, "llamaherd_gateway_ejections_total") == 1
        assert len(first.received) + len(second.received) == n
    finally:
        await first.stop()
        await second.stop()


async def test_ejection_never_takes_a_service_below_its_floor(
    make_gateway: Callable[..., Awaitable[Harness]],
) -> None:
    gateway, reg, client = await make_gateway(
        outlier_consecutive_failures=1, outlier_max_ejection_percent=50, retries=0
    )
    add_service(reg, "m", [refused_port(), refused_port()])
    for _ in range(6):
        r = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 502 and openai_error(r)["code"] == "upstream_unavailable"
    assert metric(gateway, "llamaherd_gateway_ejections_total") == 1
    assert len(gateway.outliers.ejected()) == 1


async def test_a_fault_of_the_gateways_own_is_a_json_500(
    make_gateway: Callable[..., Awaitable[Harness]], monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway, reg, client = await make_gateway()
    add_service(reg, "m", [refused_port()])

    def broken(*args: Any) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(picker, "affinity_key", broken)
    r = await client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert r.status_code == 500 and openai_error(r)["code"] == "internal_error"
    assert metric(gateway, "llamaherd_gateway_requests_total", outcome="error") == 1


def test_void_claims_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    from llamaherd_gateway import watch

    reg = Registry()
    watcher = watch.Watcher(None, reg, [])  # type: ignore[arg-type]
    reg.upsert_service(isvc("team-a", "llama", "2024-01-01T00:00:00Z"))
    reg.upsert_service(isvc("team-b", "other", servedModelNames=["llama", "x\ny"]))
    reg.upsert_service(isvc("team-a", "x\ny", "2024-01-01T00:00:00Z"))
    with caplog.at_level(logging.WARNING, logger="llamaherd_gateway.watch"):
        watcher._report_claims()
        watcher._report_claims()  # nothing new: nothing logged
    (record,) = caplog.records
    message = record.getMessage()
    assert "team-b/other" in message and "llama" in message and "\n" not in message


# ---- readiness follows the watches ----------------------------------------------------------


class FlakyApi:
    """A stand-in for lightkube's client: lists work; the first watch of each kind fails."""

    def __init__(self) -> None:
        self.lists = 0
        self.failed: set[str] = set()
        self.release = asyncio.Event()

    def list(self, res: Any, namespace: str, labels: Any = None) -> Any:
        api = self

        class Listing:
            resourceVersion = "1"

            def __aiter__(self) -> Any:
                return self

            async def __anext__(self) -> Any:
                raise StopAsyncIteration

        api.lists += 1
        return Listing()

    async def watch(self, res: Any, **kwargs: Any) -> AsyncIterator[tuple[str, Any]]:
        kind = getattr(res, "__name__", str(res))
        if kind not in self.failed:
            await self.release.wait()
            self.failed.add(kind)
            raise ConnectionError("the API server went away")
        await asyncio.Event().wait()
        yield ("ADDED", {})  # pragma: no cover


async def test_ready_turns_false_when_a_watch_fails_and_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llamaherd_gateway import watch

    monkeypatch.setattr(watch, "RETRY_DELAY_S", 0.3)
    api = FlakyApi()
    watcher = watch.Watcher(api, Registry(), [])  # type: ignore[arg-type]
    watcher.start()
    try:
        for _ in range(100):
            if watcher.ready:
                break
            await asyncio.sleep(0.01)
        assert watcher.ready
        api.release.set()
        await asyncio.sleep(0.1)
        assert not watcher.ready  # failed, not listed again yet
        for _ in range(100):
            if watcher.ready:
                break
            await asyncio.sleep(0.02)
        assert watcher.ready and api.lists == 4
    finally:
        await watcher.stop()


# ---- a client that hangs up after the whole answer -------------------------------------------


@pytest.mark.parametrize(
    ("tail", "answered"),
    [
        (b'data: {"choices": []}\n\ndata: [DONE]\n\n', True),
        (b"data: [DONE]", True),
        (b'data: {"choices": [{"text": "data: [DONE]"}]}\n\n', False),
        (b'data: {"x": 1}\n\n', False),
        (b"", False),
    ],
)
def test_a_stream_counts_as_answered_once_its_done_event_went_out(
    tail: bytes, answered: bool
) -> None:
    assert ends_stream(tail) is answered


async def leave_after_the_first_event(gateway: Gateway, body: dict[str, Any]) -> None:
    """A client that reads one piece of the response body and hangs up."""
    raw = json.dumps(body).encode()
    got_event = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await got_event.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            got_event.set()

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "headers": [(b"content-type", b"application/json")],
        "query_string": b"",
    }
    await gateway(scope, receive, send)


async def test_a_client_that_leaves_right_after_done_is_ok_not_cancelled(
    make_gateway: Callable[..., Awaitable[Harness]],
) -> None:
    """The openai client closes its connection on ``[DONE]``, before the body's end: the
    request counts as ok. One that leaves before it is cancelled. (The gateway is driven as an
    ASGI app here: httpx's ASGI transport cannot leave half way.)"""
    release = asyncio.Event()

    async def replica(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        done = b"stay" not in await reader.readexactly(length)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        event = b'data: {"choices": []}\n\n' + (b"data: [DONE]\n\n" if done else b"")
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        await release.wait()  # the end of the body does not come while the client is there
        writer.close()

    server = await asyncio.start_server(replica, "127.0.0.1", 0)
    try:
        gateway, reg, _ = await make_gateway(outlier_consecutive_failures=0)
        add_service(reg, "m", [server.sockets[0].getsockname()[1]])
        for prompt, outcome in (("bye", "ok"), ("stay", "cancelled")):
            body = {"model": "m", "prompt": prompt, "stream": True}
            await asyncio.wait_for(leave_after_the_first_event(gateway, body), 10)
            assert metric(gateway, "llamaherd_gateway_requests_total", outcome=outcome) == 1
        release.set()
    finally:
        server.close()
