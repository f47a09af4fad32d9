"""`serve(settings)`: run the app under uvicorn with a graceful drain.

On SIGTERM (or Ctrl+C) the server stops admitting work (/health/ready and new inference requests
answer 503), runs what is queued at once, waits for in-flight requests, then shuts down and exits
0; all of it within one budget of `drain_timeout_s` (plus about a second for uvicorn to cancel
what is still open when the budget is spent). A second signal forces the exit. If the models
cannot be loaded the process exits 1.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

from cotap.server.app import create_app
from cotap.server.logs import configure_logging
from cotap.server.protocol import http_protocol
from cotap.server.settings import Settings
from cotap.server.state import ServerState

log = logging.getLogger("cotap.server")


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with a drain phase between the first signal and the shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._drain_requested = False
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested or self.should_exit:
            super().handle_exit(sig, frame)  # second signal: stop now
            self.force_exit = True
            return
        self._drain_requested = True  # acted on in on_tick, inside the event loop

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_started is None:
            self._drain_started = time.monotonic()
            self.state.begin_drain()
        if self._drain_started is not None and not self.should_exit:
            idle = self.state.in_flight == 0 and self.state.scheduler.depth == 0
            late = self.state.drain_left() == 0
            if idle or late:
                log.info(
                    "drained" if idle else "drain timeout: stopping with requests in flight",
                    extra={
                        "fields": {
                            "in_flight": self.state.in_flight,
                            "seconds": round(time.monotonic() - self._drain_started, 3),
                        }
                    },
                )
                self.should_exit = True
        return await super().on_tick(counter)


def serve(settings: Settings) -> int:
    """Run until drained after SIGTERM/SIGINT (0), or exit 1: the server cannot start (the address
    cannot be listened on) or the models fail to load."""
    configure_logging(settings.log_level)
    log.info("settings", extra={"fields": {"settings": settings.public_dict()}})
    app = create_app(settings)
    state: ServerState = app.state.cotap
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        # uvicorn's own wait for open requests comes after the drain (which ends idle, or when its
        # budget is spent), so it is short: the whole stop takes drain_timeout_s + about 1 s
        timeout_graceful_shutdown=1,
        # request line + headers bounded in size (431 beyond max_header_bytes) and time (408)
        http=http_protocol(settings.header_timeout_s, settings.max_header_bytes),
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )
    server = DrainingServer(config, state)
    exit_code = 0

    def fatal(message: str) -> None:
        nonlocal exit_code
        exit_code = 1
        server.should_exit = True

    state.on_fatal = fatal
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits 3 when it cannot start (a bind lost to a race)
        if e.code in (0, None):
            raise
        return 1
    if exit_code == 0 and not server.started:
        exit_code = 1  # could not bind the port, or the lifespan failed
    return exit_code
