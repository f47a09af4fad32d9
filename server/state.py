"""The running server's state: settings, served models, scheduler, decode pool, metrics and the
lifecycle flags (loading -> ready -> draining) that health checks and admission read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from cotap.core.wire import ErrorCode
from cotap.server.errors import ServerError
from cotap.server.metrics import ServerMetrics
from cotap.server.registry import BackendHook, ServedModel, decode_limits, load_models
from cotap.server.scheduler import Scheduler
from cotap.server.settings import Settings

log = logging.getLogger("cotap.server")


class ServerState:
    def __init__(self, settings: Settings, backend_hook: BackendHook | None = None) -> None:
        self.settings = settings
        self.backend_hook = backend_hook
        self.metrics = ServerMetrics()
        self.limits = decode_limits(settings)
        self.models: dict[str, ServedModel] = {}
        self.default_model: str | None = None
        self.scheduler = Scheduler(
            max_queue=settings.max_queue,
            max_delay_s=settings.max_queue_delay_ms / 1000.0,
            workers=settings.worker_threads,
            metrics=self.metrics,
            retry_after_s=settings.retry_after_s,
        )
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="cotap-decode")
        self.ready = False
        self.draining = False
        self.drain_deadline: float | None = None  # time.monotonic() when the drain's budget ends
        self.load_error: str | None = None
        self.in_flight = 0
        self.uploads = 0  # request bodies being received (bounded by settings.max_uploads)
        self.started_at = time.time()
        # called with a message when the models cannot be loaded (`cotap serve` then exits 1)
        self.on_fatal: Callable[[str], None] | None = None
        self._loader: asyncio.Task[None] | None = None
        self._ready_event: asyncio.Event | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    async def startup(self) -> None:
        """Start the workers and load the models in the background: /health/live answers at once,
        /health/ready once every model is loaded and warmed."""
        self._ready_event = asyncio.Event()
        self.scheduler.start()
        self._loader = asyncio.create_task(self._load())

    async def _load(self) -> None:
        t0 = time.monotonic()
        assert self._ready_event is not None
        try:
            models = await asyncio.to_thread(load_models, self.settings, self.backend_hook)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("models could not be loaded", extra={"fields": {"error": self.load_error}})
            self._ready_event.set()
            if self.on_fatal is not None:
                self.on_fatal(self.load_error)
            return
        self.models = models
        self.default_model = next(iter(models))
        self.ready = not self.draining
        self.metrics.ready.set(1 if self.ready else 0)
        self._ready_event.set()
        log.info(
            "ready" if self.ready else "models loaded while draining: not ready",
            extra={"fields": {"models": list(models), "load_s": round(time.monotonic() - t0, 3)}},
        )

    async def wait_loaded(self, timeout: float) -> bool:
        """Wait until loading has finished (or failed); True when ready."""
        assert self._ready_event is not None, "the app has not started (enter its lifespan first)"
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout)
        except TimeoutError:
            return False
        return self.ready

    def begin_drain(self) -> None:
        """Stop admitting: readiness and new inference requests answer 503; queued work runs now."""
        if not self.draining:
            log.info("draining", extra={"fields": {"in_flight": self.in_flight}})
            self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s
        self.draining = True
        self.ready = False
        self.metrics.ready.set(0)
        self.metrics.draining.set(1)
        self.scheduler.flush()

    def drain_left(self) -> float:
        """Seconds left of the drain: one budget of `drain_timeout_s` from its start covers waiting
        for in-flight requests, queued work and a model still loading, together."""
        if self.drain_deadline is None:
            return self.settings.drain_timeout_s
        return max(0.0, self.drain_deadline - time.monotonic())

    async def shutdown(self) -> None:
        self.begin_drain()
        if self._loader is not None and not self._loader.done():
            try:  # a loading thread cannot be interrupted; give it a bounded wait
                await asyncio.wait_for(asyncio.shield(self._loader), self.drain_left())
            except TimeoutError:
                log.warning("shutting down while models are still loading")
        await asyncio.to_thread(self.scheduler.stop, self.drain_left())
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        for model in self.models.values():
            try:
                model.backend.close()
            except Exception:
                log.exception("closing a backend failed")
        log.info("stopped")

    # -- admission ------------------------------------------------------------------------------
    def check_admitting(self) -> None:
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.draining:
            raise ServerError(
                ErrorCode.NOT_READY, "the server is draining (shutting down); retry elsewhere", headers=retry
            )
        if not self.ready:
            why = (
                f"models failed to load: {self.load_error}" if self.load_error else "models are still loading"
            )
            raise ServerError(ErrorCode.NOT_READY, why, headers=retry)

    def model(self, name: str | None) -> ServedModel:
        key = name or self.default_model
        if key is None or key not in self.models:
            raise ServerError(
                ErrorCode.MODEL_NOT_FOUND,
                f"no model named {name!r}; served: {', '.join(self.models) or 'none'}",
            )
        return self.models[key]
