"""Fixtures of the chart tests: the pinned helm, and rendering the chart with a values file."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.harness import REPO_ROOT, MissingBinaryError, binary_path

CHART = REPO_ROOT / "charts" / "llamaherd"
HERE = Path(__file__).resolve().parent
RELEASE = "llamaherd"
NAMESPACE = "llamaherd-system"

# The values files every render test runs with: defaults, every switch on, every switch off.
VALUES = {
    "defaults": None,
    "all-on": HERE / "values-all-on.yaml",
    "minimal": HERE / "values-minimal.yaml",
    # What the README tells a user of the local kind cluster to install with.
    "kind": HERE.parents[1] / "examples" / "helm" / "kind-values.yaml",
}

Objects = list[dict[str, Any]]


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return binary_path("helm")
    except MissingBinaryError as exc:
        pytest.fail(f"{exc}\n(CI runs `make test`, which runs `make binaries` first)")


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def values_args(values: Path | None) -> list[str]:
    return ["-f", str(values)] if values else []


@pytest.fixture(scope="session")
def render(helm: Path) -> Callable[..., Objects]:
    """``render(values_file, *extra_args)``: every object helm template makes, parsed."""
    cache: dict[tuple[Any, ...], Objects] = {}

    def _render(values: Path | None, *extra: str) -> Objects:
        key = (values, *extra)
        if key not in cache:
            out = run_helm(
                helm,
                "template",
                RELEASE,
                str(CHART),
                "--namespace",
                NAMESPACE,
                *values_args(values),
                *extra,
            ).stdout
            cache[key] = [doc for doc in yaml.safe_load_all(out) if doc]
        return cache[key]

    return _render


def load_generator() -> ModuleType:
    """hack/gen-chart.py as a module (its name has a dash)."""
    spec = importlib.util.spec_from_file_location("gen_chart", REPO_ROOT / "hack" / "gen-chart.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
