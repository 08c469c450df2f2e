"""Test harness: real control-plane binaries and Prometheus on loopback.

The binaries are built by ``hack/build-binaries.sh`` into
``${LLAMAHERD_CACHE:-~/.cache/llamaherd}/bin/<component>-<version>/``; the versions are pinned in
``hack/versions.env``, which the build script sources and :func:`binary_path` reads.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "hack" / "versions.env"

# binary name -> (component folder, key in versions.env)
_COMPONENTS: dict[str, tuple[str, str]] = {
    **{
        name: ("kubernetes", "KUBERNETES_VERSION")
        for name in (
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubelet",
            "kubectl",
        )
    },
    "etcd": ("etcd", "ETCD_VERSION"),
    "helm": ("helm", "HELM_VERSION"),
    "kind": ("kind", "KIND_VERSION"),
}

T = TypeVar("T")


class MissingBinaryError(FileNotFoundError):
    """A pinned binary has not been built yet."""


def cache_dir() -> Path:
    """The cache folder shared with the build scripts (``$LLAMAHERD_CACHE``)."""
    env = os.environ.get("LLAMAHERD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llamaherd"


@functools.cache
def versions() -> dict[str, str]:
    """The ``KEY=value`` pairs of ``hack/versions.env``."""
    pairs: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip().strip("\"'")
    return pairs


def binary_version(name: str) -> str:
    """The pinned version of the component that ships binary ``name``."""
    return versions()[_COMPONENTS[name][1]]


def binary_path(name: str) -> Path:
    """Path of a pinned binary; :class:`MissingBinaryError` tells how to build it."""
    if name not in _COMPONENTS:
        raise KeyError(f"unknown binary {name!r}; known: {sorted(_COMPONENTS)}")
    component, _ = _COMPONENTS[name]
    path = cache_dir() / "bin" / f"{component}-{binary_version(name)}" / name
    if not os.access(path, os.X_OK):
        raise MissingBinaryError(
            f"{path} is missing: run `make binaries` (hack/build-binaries.sh) to build it"
        )
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Whether a socket still listens on (or is bound to) ``127.0.0.1:port``.

    SO_REUSEADDR makes connections lingering in TIME_WAIT not count: they block nobody's listen.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def wait_port_free(port: int, timeout: float = 15.0) -> None:
    """Wait until nothing holds ``127.0.0.1:port`` any more."""
    wait_until(lambda: not port_in_use(port), timeout=timeout, what=f"port {port} to be freed")


def wait_until(
    probe: Callable[[], T | Literal[False] | None],
    *,
    timeout: float,
    interval: float = 0.2,
    what: str = "condition",
    describe: Callable[[], str] | None = None,
    show: Callable[[object], str] = repr,
) -> T:
    """Poll ``probe`` until it returns something truthy and return it.

    Exceptions from ``probe`` count as "not yet"; the last one (or the last value), as ``show``
    writes it, is named in the :class:`TimeoutError`.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
        except Exception as exc:  # any failure means "not yet"
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            state = ""
            if describe is not None:
                try:
                    state = f"; state: {describe()}"
                except Exception as exc:  # the description must not hide the timeout
                    state = f"; state unknown ({exc!r})"
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what}; last: {show(last)}{state}"
            )
        time.sleep(interval)
