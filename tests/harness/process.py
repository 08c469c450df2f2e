"""One way to run a child process for the tests, the harnesses and the benchmarks.

:class:`ManagedProcess` starts a command with its output in a log file, waits for it to become
ready with a bound (failing at once, with the log's tail, if it exits first), and stops it:
a signal (SIGTERM unless told), then SIGKILL after a grace period. :func:`server_command` is the
one place the command line of ``python -m llamaherd_server`` is put together.

Light on purpose (the standard library and httpx only): ``bench/`` imports it too, on machines
that have only the server's packages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.harness import REPO_ROOT

# What a readiness probe may raise while the process is still coming up.
NOT_YET = (httpx.TransportError, urllib.error.URLError, ConnectionError, TimeoutError)


class ProcessFailed(AssertionError):
    """The process exited early or was not ready in time; the message holds its log's tail.

    An AssertionError, so that a test reports it as a failure, not an error of the harness."""


@dataclass
class ManagedProcess:
    """A child process with its stdout and stderr in ``log_path``.

    ``env`` is added to this process's environment; ``append`` keeps earlier runs' output in
    the log (a harness that restarts the same process); ``new_session`` puts the child in a
    session of its own (a caller that may have to kill its whole group)."""

    argv: Sequence[str]
    log_path: Path
    name: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = REPO_ROOT
    stop_signal: int = signal.SIGTERM
    stop_timeout_s: float = 30.0
    append: bool = False
    new_session: bool = False
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            self.name = Path(self.argv[0]).name

    def start(self) -> ManagedProcess:
        mode = "ab" if self.append else "wb"
        with self.log_path.open(mode) as out:
            if self.append:
                out.write(f"\n=== start {time.strftime('%H:%M:%S')}\n".encode())
                out.flush()
            self.proc = subprocess.Popen(
                list(self.argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                start_new_session=self.new_session,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise :class:`ProcessFailed` with the log's tail if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ProcessFailed(
                f"{self.name} exited with {self.proc.returncode} (log {self.log_path}):\n"
                f"{self.tail()}"
            )

    def wait_ready(
        self, probe: Callable[[], bool], timeout_s: float = 60.0, interval_s: float = 0.1
    ) -> None:
        """Poll ``probe`` until it returns true. The process exiting first, or ``timeout_s``
        passing (the process is then stopped), raises :class:`ProcessFailed`. A probe that
        raises one of ``NOT_YET`` (nothing listens yet) counts as not ready."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            try:
                if probe():
                    return
            except NOT_YET:
                pass
            if time.monotonic() >= deadline:
                break
            time.sleep(interval_s)
        self.stop()
        raise ProcessFailed(
            f"{self.name} not ready after {timeout_s:.0f}s (log {self.log_path}):\n{self.tail()}"
        )

    def wait_http_ok(self, url: str, timeout_s: float = 60.0, interval_s: float = 0.1) -> None:
        """:meth:`wait_ready` on ``GET url`` answering 200."""

        def ok() -> bool:
            return httpx.get(url, timeout=2.0, trust_env=False).status_code == 200

        self.wait_ready(ok, timeout_s, interval_s)

    def stop(self, timeout_s: float | None = None) -> int | None:
        """``stop_signal``, then SIGKILL if it has not exited within the grace period. Returns
        the exit status (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=self.stop_timeout_s if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


def server_command(
    model: Path, port: int, *args: str, host: str = "127.0.0.1", python: str = sys.executable
) -> list[str]:
    """``python -m llamaherd_server`` on ``model`` listening on ``host:port``, then ``args``
    (any other flags, as ``--slots 4``)."""
    return [
        python,
        "-m",
        "llamaherd_server",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        *args,
    ]
