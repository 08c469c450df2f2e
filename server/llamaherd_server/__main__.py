"""``python -m llamaherd_server --model PATH --port N``: run the server.

Every setting is a flag and an environment variable (see :mod:`llamaherd_server.settings`).

Shutdown: the first SIGTERM or SIGINT starts a drain: /ready answers 503, new requests get 503,
queued and running requests finish (up to ``drain_timeout_seconds``; what is left then fails
with an error), and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import FrameType

import uvicorn
from pydantic import ValidationError

from .api import create_app
from .settings import ServerSettings

log = logging.getLogger("llamaherd.server")


class DrainingServer(uvicorn.Server):
    """uvicorn, but a first exit signal drains the engine before the server stops."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float) -> None:
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self._draining = False

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
        raise SystemExit(2) from None
    log_config = configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=log_config,
        timeout_graceful_shutdown=5,
        access_log=False,
    )
    DrainingServer(config, settings.drain_timeout_seconds).run()


if __name__ == "__main__":
    main()
