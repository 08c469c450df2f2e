"""``python -m llamaherd_server --model PATH --port N``: run the server.

Every setting is a flag and an environment variable (see :mod:`llamaherd_server.settings`).

Shutdown: the first SIGTERM or SIGINT starts a drain: /ready answers 503, new requests get 503,
queued and running requests finish (up to ``drain_timeout_seconds``; what is left then fails
with an error), and the process exits 0. A second signal exits at once.

A model that cannot be loaded (missing, not a GGUF, truncated, too big for the memory, or
refused by llama.cpp) makes the process exit 1 within seconds, with one log line
``model load failed: <path>: <cause>`` that is also written to the termination message file
(``termination_message_path``), where Kubernetes and the operator read it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import uvicorn

from .api import create_app
from .http_protocols import http_protocol
from .loadfail import (
    ModelLoadError,
    check_model_file,
    failure_message,
    write_termination_message,
)
from .settings import ENV_PREFIX, ServerSettings
from .shared_settings import settings_from_cli

log = logging.getLogger("llamaherd.server")

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Shutdown:
    """The process's own SIGTERM/SIGINT handling around a plain ``uvicorn.Server``.

    The first signal drains: the engine admits nothing new (/ready and new requests get 503),
    queued and running requests finish up to ``drain_timeout`` (what is left then fails), and
    then the server stops through its public ``should_exit``. A second signal stops it at once
    (``force_exit``: no waiting for open connections)."""

    def __init__(self, server: uvicorn.Server, drain_timeout: float) -> None:
        self.server = server
        self.drain_timeout = drain_timeout
        self.exit_code = 0
        self.draining = False
        self._drain_task: asyncio.Task[None] | None = None

    def fail(self, _message: str) -> None:
        """Stop the server and exit non-zero (the model could not be loaded). Any thread."""
        self.exit_code = 1
        self.server.should_exit = True

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in SHUTDOWN_SIGNALS:
            loop.add_signal_handler(sig, self.on_signal, sig)

    def on_signal(self, sig: int) -> None:
        if self.draining or self.server.should_exit:
            log.warning("signal %d again: exiting now", sig)
            self.server.should_exit = True
            self.server.force_exit = True
            return
        self.draining = True
        app = self.server.config.app
        engine = getattr(getattr(app, "state", None), "engine", None)
        if engine is None:
            self.server.should_exit = True
            return
        engine.start_drain()
        log.info("signal %d: draining (up to %.0fs)", sig, self.drain_timeout)
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(engine))

    async def _drain(self, engine) -> None:  # type: ignore[no-untyped-def]
        deadline = asyncio.get_running_loop().time() + self.drain_timeout
        while engine.busy() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if engine.busy():
            log.warning(
                "drain timeout: failing %d running and %d queued requests",
                engine.active_count,
                engine.queue_depth,
            )
            engine.abort_all("server shut down before the request finished")
        else:
            log.info("drained: no request left")
        self.server.should_exit = True

    async def serve(self) -> None:
        """Run the server with these signal handlers in place of uvicorn's.

        ``Server.serve()`` sets its own handlers (``signal.signal``, in the main thread) as it
        starts, before its first await, and puts back the ones it found when it returns. So the
        server task gets one turn first, then ours replace uvicorn's for the rest of the run. A
        signal in between (a few microseconds) reaches uvicorn's handler: a plain exit."""
        loop = asyncio.get_running_loop()
        serving = loop.create_task(self.server.serve())
        await asyncio.sleep(0)
        if not serving.done():
            self.install(loop)
        try:
            await serving
        finally:
            for sig in SHUTDOWN_SIGNALS:
                loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> None:
    from .logs import configure_logging

    def invalid(message: str) -> None:
        path = os.environ.get(ENV_PREFIX + "TERMINATION_MESSAGE_PATH", "/dev/termination-log")
        write_termination_message(Path(path), message)

    settings = settings_from_cli(ServerSettings, "llamaherd-server", argv, on_invalid=invalid)
    log_config = configure_logging(settings.log_format, settings.log_level)

    def load_failed(message: str) -> None:
        write_termination_message(settings.termination_message_path, message)

    # The cheap checks first, before anything listens: a missing or non-GGUF file fails now.
    try:
        check_model_file(settings.model, gpu_layers=settings.gpu_layers)
    except ModelLoadError as exc:
        message = failure_message(settings.model, str(exc))
        log.error("%s", message)
        load_failed(message)
        raise SystemExit(1) from None

    shutdown: Shutdown | None = None

    def on_load_failure(message: str) -> None:
        load_failed(message)
        if shutdown is not None:
            shutdown.fail(message)

    app = create_app(settings, on_load_failure=on_load_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=log_config,
        timeout_graceful_shutdown=5,
        access_log=False,
        http=http_protocol(),
    )
    shutdown = Shutdown(uvicorn.Server(config), settings.drain_timeout_seconds)
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(shutdown.serve())
    if shutdown.exit_code:
        raise SystemExit(shutdown.exit_code)


if __name__ == "__main__":
    main()
