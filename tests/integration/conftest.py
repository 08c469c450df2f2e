"""Fixtures for tests that need a real control plane or a real Prometheus.

``control_plane`` (session): etcd + kube-apiserver + kube-controller-manager + kube-scheduler on
127.0.0.1, from the binaries that ``make binaries`` builds. With ``LLAMAHERD_TEST_USE_KUBECONFIG=1``
and ``KUBECONFIG`` set it uses that cluster instead (``restart_apiserver`` then skips).

``prometheus`` (session): one Prometheus for the whole run; tests add their own targets with
``prometheus.add_targets(<unique job>, [...])`` and remove them when done.

Missing binaries fail the test (``make test`` builds them first); they never skip it. A failing
test that used these fixtures gets a report section naming the log folders.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.harness import MissingBinaryError
from tests.harness.controlplane import ControlPlane, ExistingCluster
from tests.harness.prometheus import Prometheus


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane | ExistingCluster]:
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
