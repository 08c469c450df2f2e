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

import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import uvicorn
from pydantic import ValidationError

from .api import create_app
from .loadfail import (
    ModelLoadError,
    check_model_file,
    failure_message,
    write_termination_message,
)
from .settings import ENV_PREFIX, ServerSettings

log = logging.getLogger("llamaherd.server")


class DrainingServer(uvicorn.Server):
    """uvicorn, but a first exit signal drains the engine before the server stops."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float) -> None:
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self._draining = False
        self.exit_code = 0

    def fail(self, _message: str) -> None:
        """Stop the server and exit non-zero (the model could not be loaded). Any thread."""
        self.exit_code = 1
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        engine = getattr(self.config.app.state, "engine", None)  # type: ignore[union-attr]
        if engine is None:
            super().handle_exit(sig, frame)
            return
        engine.start_drain()
        log.info("signal %d: draining (up to %.0fs)", sig, self.drain_timeout)
        threading.Thread(target=self._drain, args=(engine,), daemon=True).start()

    def _drain(self, engine) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + self.drain_timeout
        while engine.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        if engine.busy():
            log.warning(
                "drain timeout: failing %d running and %d queued requests",
                engine.active_count,
                engine.queue_depth,
            )
            engine.abort_all("server shut down before the request finished")
        else:
            log.info("drained: no request left")
        self.should_exit = True


def main(argv: list[str] | None = None) -> None:
    from .logs import configure_logging

    try:
        settings = ServerSettings(
            _cli_parse_args=sys.argv[1:] if argv is None else argv,  # type: ignore[call-arg]
            _cli_prog_name="llamaherd-server",  # type: ignore[call-arg]
            _cli_kebab_case=True,  # type: ignore[call-arg]
        )
    except ValidationError as exc:
        print(f"llamaherd-server: invalid settings:\n{exc}", file=sys.stderr)
        default = "/dev/termination-log"
        path = os.environ.get(ENV_PREFIX + "TERMINATION_MESSAGE_PATH", default)
        write_termination_message(Path(path), f"invalid settings: {exc}")
        raise SystemExit(2) from None
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

    server: DrainingServer | None = None

    def on_load_failure(message: str) -> None:
        load_failed(message)
        if server is not None:
            server.fail(message)

    app = create_app(settings, on_load_failure=on_load_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=log_config,
        timeout_graceful_shutdown=5,
        access_log=False,
    )
    server = DrainingServer(config, settings.drain_timeout_seconds)
    server.run()
    if server.exit_code:
        raise SystemExit(server.exit_code)


if __name__ == "__main__":
    main()
