"""A real server for the client tests: the app under uvicorn on a free loopback port, in a thread
of the test process (real HTTP, real models; starting it costs no extra torch import)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from cotap.server.app import create_app
from cotap.server.backends.base import Backend
from tests.server.helpers import settings_for, wait_ready


@contextmanager
def live_server(
    *bundles: Path,
    hook: Callable[[Backend], Backend] | None = None,
    start_after_s: float = 0.0,
    **settings: Any,
) -> Iterator[str]:
    """The base URL of a running server for `bundles` with these settings; stopped on exit. With
    `start_after_s`, the URL comes at once and the server starts listening that much later."""
    base: dict[str, Any] = {"drain_timeout_s": 1.0, "log_level": "warning"}
    app = create_app(settings_for(*bundles, **(base | settings)), backend_hook=hook)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)

    def run() -> None:
        time.sleep(start_after_s)  # until then the port is bound but not listening: refused
        server.run(sockets=[sock])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        if not start_after_s:
            wait_ready(url, thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of one Prometheus metric whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        base, _, lab = key.partition("{")
        if base == name and all(f'{k}="{v}"' in lab for k, v in labels.items()):
            total += float(value)
    return total


def slow(seconds: float) -> Callable[[Backend], Backend]:
    """A backend hook that makes every forward of the real backend take `seconds` longer (so that
    queues fill and folders take long enough to interrupt)."""

    def hook(backend: Backend) -> Backend:
        real = backend.forward

        def forward(images: Any) -> Any:
            time.sleep(seconds)
            return real(images)

        backend.forward = forward  # type: ignore[method-assign]
        return backend

    return hook
