"""Shared fixtures: generated GGUF models and real server processes on loopback."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.harness import MissingBinaryError, free_port
from tests.harness.process import ManagedProcess, server_command

if TYPE_CHECKING:
    # Imported where used: the control plane's harness needs cryptography, which the server
    # tests do not (bench/gpu.sh runs them with only the server's packages).
    from tests.harness.controlplane import ControlPlane, ExistingCluster
    from tests.harness.prometheus import Prometheus

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = (
    Path(os.environ.get("LLAMAHERD_CACHE", Path.home() / ".cache" / "llamaherd")) / "models"
)


def generated_model(preset: str) -> Path:
    """A model from the project's own generator, made once per preset and generator version."""
    from llamaherd_server import ggufgen

    shape = ggufgen.PRESETS[preset]
    digest = hashlib.sha256(repr(shape).encode() + Path(ggufgen.__file__).read_bytes())
    key = digest.hexdigest()[:12]
    path = MODEL_CACHE / f"{preset}-{key}.gguf"
    if not path.exists():
        ggufgen.write_model(path, shape)
    return path


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """n_embd 256, 4 layers: thousands of tokens per second."""
    return generated_model("tiny")


@pytest.fixture(scope="session")
def small_model() -> Path:
    """About 30M parameters: slow enough that one request can outlast another."""
    return generated_model("small")


@dataclass
class ServerProcess:
    """A server started by :func:`start_server`: its :class:`ManagedProcess` and its port."""

    process: ManagedProcess
    port: int

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.process.proc is not None, "the server was not started"
        return self.process.proc

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.process.log()

    def tail(self, lines: int = 60) -> str:
        return self.process.tail(lines)

    def stop(self) -> int:
        self.process.stop()
        return self.proc.returncode


def start_server(
    model: Path,
    log_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 60.0,
) -> ServerProcess:
    """``python -m llamaherd_server`` as a real process on a free loopback port."""
    port = free_port()
    process = ManagedProcess(
        server_command(model, port, *args),
        log_dir / f"server-{port}.log",
        name="server",
        env=env or {},
        cwd=None,
    )
    server = ServerProcess(process.start(), port)
    if wait_ready:
        wait_until_ready(server, timeout)
    return server


def wait_until_ready(server: ServerProcess, timeout: float = 60.0) -> None:
    """Until ``/ready`` answers 200; :class:`ProcessFailed` if the server exits first or
    ``timeout`` passes (it is then stopped)."""
    server.process.wait_http_ok(server.url + "/ready", timeout)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    """Start real servers; every one is stopped at the end of the test."""
    started: list[ServerProcess] = []

    def start(model: Path, *args: str, **kwargs) -> ServerProcess:  # type: ignore[no-untyped-def]
        server = start_server(model, tmp_path, *args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02, message: str = ""):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


# ---- the real control plane and Prometheus (tests/harness) -----------------------------------
# ``control_plane`` (session): etcd + kube-apiserver + kube-controller-manager + kube-scheduler
# on 127.0.0.1, from the binaries that ``make binaries`` builds. With
# ``LLAMAHERD_TEST_USE_KUBECONFIG=1`` and ``KUBECONFIG`` set it uses that cluster instead
# (``restart_apiserver`` then skips). ``prometheus`` (session): one Prometheus for the whole run;
# tests add their own targets with ``prometheus.add_targets(<unique job>, [...])`` and remove
# them when done. Missing binaries fail the test (``make test`` builds them first); they never
# skip it. A failing test that used these fixtures gets a report section naming the log folders.


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane | ExistingCluster]:
    from tests.harness.controlplane import ControlPlane, ExistingCluster

    kubeconfig = os.environ.get("KUBECONFIG")
    if os.environ.get("LLAMAHERD_TEST_USE_KUBECONFIG") == "1" and kubeconfig:
        yield ExistingCluster(Path(kubeconfig))
        return
    plane = ControlPlane()
    try:
        plane.start()
    except MissingBinaryError as exc:
        pytest.fail(f"{exc}\n(CI runs `make test`, which runs `make binaries` first)")
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def prometheus() -> Iterator[Prometheus]:
    from tests.harness.prometheus import Prometheus

    prom = Prometheus()
    try:
        prom.start()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    try:
        yield prom
    finally:
        prom.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        funcargs = getattr(item, "funcargs", {})
        lines = [
            funcargs[name].describe()
            for name in ("control_plane", "prometheus")
            if name in funcargs and hasattr(funcargs[name], "describe")
        ]
        if lines:
            report.sections.append(("llamaherd harness logs", "\n".join(lines)))
    return report


@pytest.fixture(scope="session")
def operator_crd(control_plane: ControlPlane | ExistingCluster) -> None:
    """The InferenceService CRD from crds/, applied and established."""
    crd = REPO / "crds" / "inferenceservices.llamaherd.io.yaml"
    proc = control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    assert proc.returncode == 0, proc.stderr
    proc = control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "crd/inferenceservices.llamaherd.io",
        "--timeout=60s",
    )
    assert proc.returncode == 0, proc.stderr
