"""Dynamic batching: requests' images wait in a bounded queue keyed on (model, input size) and run
on dedicated worker threads in batches of up to the model's max batch, as soon as a batch is full
or its oldest image has waited `max_queue_delay_ms` (the setting; `max_delay_s` here).

- A request that does not fit in the queue is refused at once (429 with Retry-After).
- A lone image does not wait for company when every admitted request already has its job queued
  or running (nothing else is on its way), so a single client pays no batching delay.
- Work of a request that was cancelled (client gone) or whose deadline passed is dropped before
  inference, never run.
- A backend exception in a batch of several requests reruns each request on its own, so only a
  request that fails alone gets the 500; the worker and the other batches carry on.
- When every image of a request has run, its `finish` (post-processing) runs on the same worker
  thread with the backend's `PostOps`, so the event loop never computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cotap.core.wire import ErrorCode
from cotap.server.backends.base import Backend, DeviceArray, PostOps
from cotap.server.errors import ServerError
from cotap.server.metrics import ServerMetrics

log = logging.getLogger("cotap.server.scheduler")

Finish = Callable[[PostOps, list[dict[str, DeviceArray]]], Any]


@dataclass(eq=False)
class Job:
    """One request's images on their way through the queue, and where its answer goes."""

    model: str
    backend: Backend
    max_batch: int
    images: list[np.ndarray]  # each float32 (3, H, W)
    finish: Finish
    deadline: float  # time.monotonic() after which it is dropped
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    request_id: str = ""
    route: str = ""
    t_enqueue: float = 0.0
    queue_s: float | None = None  # enqueue -> its first batch starts
    inference_s: float = 0.0  # forward passes it took part in + its post-processing
    slots: list[dict[str, DeviceArray] | None] = field(default_factory=list)
    remaining: int = 0
    done: bool = False
    cancelled: bool = False
    cancel_reason: str = "cancelled"  # the `reason` label of its dropped images: cancelled | deadline
    on_done: Callable[[], None] | None = None  # set by the scheduler: one fewer active job
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.slots = [None] * len(self.images)
        self.remaining = len(self.images)

    def cancel(self, reason: str = "cancelled") -> None:
        """The client is gone ("cancelled") or its deadline passed while it waited ("deadline"):
        drop whatever has not run, counted under `reason`."""
        self.cancel_reason = reason
        self.cancelled = True

    def alive(self, now: float) -> bool:
        return not (self.done or self.cancelled or now > self.deadline)

    def _settle(self, result: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            if self.done:
                return
            self.done = True
        if self.on_done is not None:
            self.on_done()

        def set_it() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(set_it)

    def fail(self, error: ServerError) -> None:
        self._settle(error=error)

    def resolve(self, result: Any) -> None:
        self._settle(result=result)


Item = tuple[Job, int]  # (job, index of the image in the job)
Key = tuple[str, tuple[int, int]]  # (model, (H, W))


class Scheduler:
    def __init__(
        self,
        *,
        max_queue: int,
        max_delay_s: float,
        workers: int,
        metrics: ServerMetrics,
        retry_after_s: int = 1,
    ) -> None:
        self.max_queue = max_queue
        self.max_delay_s = max_delay_s
        self.n_workers = workers
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self._queues: dict[Key, deque[Item]] = defaultdict(deque)
        self._depth = 0
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._flush = False
        self._closed = False
        self._admitted = 0  # inference requests between admission and their answer
        self._active = 0  # submitted jobs not yet answered
        self._decoding = 0  # images being decoded, reserved in the queue (`reserve`)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.n_workers):
            t = threading.Thread(target=self._worker, name=f"cotap-infer-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def flush(self) -> None:
        """Run whatever waits now, without waiting for batches to fill (used while draining)."""
        with self._cond:
            self._flush = True
            self._cond.notify_all()

    def stop(self, timeout: float) -> None:
        """Refuse new work, run what is queued (up to `timeout` seconds), then stop the workers."""
        with self._cond:
            self._closed = True
            self._stopping = True
            self._flush = True
            self._cond.notify_all()
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        with self._cond:
            left = [item for q in self._queues.values() for item in q]
            self._queues.clear()
            self._depth = 0
        for job, _ in left:
            job.fail(ServerError(ErrorCode.NOT_READY, "the server stopped before this request ran"))

    @property
    def depth(self) -> int:
        return self._depth

    # -- admission ------------------------------------------------------------------------------
    def expect(self) -> None:
        """An inference request was admitted; `unexpect` once it has its answer. Admitted requests
        without an active job (still reading or decoding, or still sending an earlier answer, which
        under a closed-loop client means the next request is about to come) count as company on
        its way; with none, a lone image runs at once instead of waiting `max_delay_s` for nobody."""
        with self._cond:
            self._admitted += 1

    def unexpect(self) -> None:
        with self._cond:
            self._admitted -= 1
            self._cond.notify_all()

    def reserve(self, n: int) -> None:
        """Hold room for `n` images before they are decoded, or refuse at once (429): images being
        decoded count towards `max_queue`, so an overload cannot pile unbounded decoding work (and
        latency) in front of the queue. `release(n)` once decoded, right before `submit`."""
        with self._cond:
            self.check_room(n)
            self._decoding += n

    def check_room(self, n: int = 1) -> None:
        """Refuse at once (429) when the queue cannot take `n` more images now (used before a
        request's body is even read)."""
        with self._cond:
            if not self._room(self._decoding + n):
                raise self._queue_full(n)

    def release(self, n: int) -> None:
        with self._cond:
            self._decoding -= n

    def _room(self, n: int) -> bool:
        """Whether `n` more images fit in the queue (call with the lock held). Work that was
        cancelled or expired while the workers were busy gives its places back first."""
        if self._depth + n <= self.max_queue:
            return True
        self._drop_dead(time.monotonic())
        return self._depth + n <= self.max_queue

    def _queue_full(self, n: int) -> ServerError:
        return ServerError(
            ErrorCode.QUEUE_FULL,
            f"the queue is full ({self._depth} of {self.max_queue} images waiting, {self._decoding} being "
            f"decoded, this request has {n}); retry after {self.retry_after_s} s",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    def _job_done(self) -> None:
        with self._cond:
            self._active -= 1

    def submit(self, job: Job) -> None:
        """Queue every image of `job`, or refuse the whole job at once (429) when they do not fit."""
        n = len(job.images)
        with self._cond:
            if self._closed:
                raise ServerError(ErrorCode.NOT_READY, "the server is shutting down")
            if not self._room(n):
                raise self._queue_full(n)
            job.t_enqueue = time.monotonic()
            job.on_done = self._job_done
            self._active += 1
            for i, image in enumerate(job.images):
                key = (job.model, (int(image.shape[1]), int(image.shape[2])))
                self._queues[key].append((job, i))
            self._depth += n
            self._set_depth_gauge(job.model)
            self._cond.notify(max(1, self.n_workers))

    def _set_depth_gauge(self, model: str) -> None:
        self.metrics.queue_depth.labels(model).set(
            sum(len(q) for (m, _), q in self._queues.items() if m == model)
        )

    # -- workers --------------------------------------------------------------------------------
    def _drop_dead(self, now: float) -> None:
        for key, q in self._queues.items():
            if all(job.alive(now) for job, _ in q):
                continue
            keep: deque[Item] = deque()
            for job, i in q:
                if job.alive(now):
                    keep.append((job, i))
                    continue
                self._depth -= 1
                if job.cancelled:
                    self.metrics.dropped.labels(job.cancel_reason).inc()
                    job.fail(ServerError(ErrorCode.DEADLINE_EXCEEDED, "cancelled before it ran"))
                elif not job.done:
                    self.metrics.dropped.labels("deadline").inc()
                    job.fail(ServerError(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed while queued"))
                else:
                    self.metrics.dropped.labels("failed").inc()
            self._queues[key] = keep
            self._set_depth_gauge(key[0])

    def _next_batch(self) -> tuple[Key, list[Item]] | None:
        with self._cond:
            while True:
                now = time.monotonic()
                self._drop_dead(now)
                best: Key | None = None
                best_t = float("inf")
                wait: float | None = None
                for key, q in self._queues.items():
                    if not q:
                        continue
                    head = q[0][0]
                    age = now - head.t_enqueue
                    alone = self._admitted <= self._active  # nothing else on its way: waiting gains nothing
                    if len(q) >= head.max_batch or age >= self.max_delay_s or self._flush or alone:
                        if head.t_enqueue < best_t:
                            best, best_t = key, head.t_enqueue
                    else:
                        left = self.max_delay_s - age
                        wait = left if wait is None else min(wait, left)
                if best is not None:
                    q = self._queues[best]
                    limit = q[0][0].max_batch
                    items = [q.popleft() for _ in range(min(limit, len(q)))]
                    if not q:
                        del self._queues[best]
                    self._depth -= len(items)
                    self._set_depth_gauge(best[0])
                    return best, items
                if self._stopping and not any(self._queues.values()):
                    return None
                # wake at the next batch deadline, and at least once a second to drop expired work
                self._cond.wait(timeout=min(wait, 1.0) if wait is not None else 1.0)

    def _worker(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(*batch)
            except Exception:  # never let one batch kill the worker
                log.exception("unexpected error in the batch worker")

    def _run(self, key: Key, items: list[Item]) -> None:
        jobs = list(dict.fromkeys(job for job, _ in items))
        backend = jobs[0].backend
        t0 = time.monotonic()
        for job in jobs:
            if job.queue_s is None:
                job.queue_s = t0 - job.t_enqueue
        try:
            if len(items) == 1:  # a lone image: a view, not a 600 KB copy
                lone, i = items[0]
                images = lone.images[i][None]  # (1, 3, H, W)
            else:
                images = np.stack([job.images[i] for job, i in items])  # (B, 3, H, W)
            out = backend.forward(images)
        except Exception as e:
            if len(jobs) == 1:
                self._fail(key, items, jobs, e)
                return
            failure = f"{type(e).__name__}: {e}"
        else:
            self._finish_batch(key, items, jobs, out, time.monotonic() - t0)
            return
        # outside the `except`: the failed forward's frames, and the memory they hold (a GPU
        # batch's activations), are released before each request runs again on its own
        self._isolate(key, items, jobs, failure)

    def _fail(self, key: Key, items: list[Item], jobs: list[Job], e: Exception) -> None:
        log.exception(
            "inference failed",
            extra={
                "fields": {
                    "model": key[0],
                    "batch": len(items),
                    "request_ids": [j.request_id for j in jobs],
                }
            },
        )
        for job in jobs:
            job.fail(ServerError(ErrorCode.INTERNAL, f"inference failed: {type(e).__name__}: {e}"))

    def _finish_batch(
        self, key: Key, items: list[Item], jobs: list[Job], out: dict[str, DeviceArray], dt: float
    ) -> None:
        self.metrics.batch_size.labels(key[0]).observe(len(items))
        for job in jobs:
            job.inference_s += dt
        finished = []
        for b, (job, i) in enumerate(items):
            with job._lock:
                if job.done:
                    continue
                job.slots[i] = {name: value[b] for name, value in out.items()}
                job.remaining -= 1
                if job.remaining == 0:
                    finished.append(job)
        for job in finished:
            self._finish(job)

    def _isolate(self, key: Key, items: list[Item], jobs: list[Job], error: str) -> None:
        """A batch of several requests failed: run each request's images on their own, so that
        only a request the backend cannot run (its inputs, its size: out of memory) gets the 500."""
        log.warning(
            "a batch failed; running its requests one by one",
            extra={
                "fields": {
                    "model": key[0],
                    "batch": len(items),
                    "error": error,
                    "request_ids": [j.request_id for j in jobs],
                }
            },
        )
        for job in jobs:
            if job.alive(time.monotonic()):
                self._run(key, [item for item in items if item[0] is job])
            else:
                job.fail(ServerError(ErrorCode.DEADLINE_EXCEEDED, "the deadline passed or the client left"))

    def _finish(self, job: Job) -> None:
        t0 = time.monotonic()
        try:
            slots = [s for s in job.slots if s is not None]
            result = job.finish(job.backend.ops, slots)
        except ServerError as e:
            job.fail(e)
            return
        except Exception as e:
            log.exception("post-processing failed", extra={"fields": {"request_id": job.request_id}})
            job.fail(ServerError(ErrorCode.INTERNAL, f"post-processing failed: {type(e).__name__}: {e}"))
            return
        job.inference_s += time.monotonic() - t0
        self.metrics.count_images(job.model, job.route, len(job.slots))
        job.resolve(result)
