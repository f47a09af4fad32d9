"""The scheduler's batching rules, driven directly (no app, no worker threads): a full batch runs at
once even with a long delay, queues are keyed on (model, input size), the oldest head goes first,
and an image waits for company only while another admitted request is on its way."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np
import pytest

from cotap.server.metrics import ServerMetrics
from cotap.server.scheduler import Job, Scheduler

LONG = 100.0  # max_delay_s: a batch that runs did not wait it out


def scheduler() -> Scheduler:
    return Scheduler(max_queue=64, max_delay_s=LONG, workers=1, metrics=ServerMetrics())


def job(model: str, sizes: list[int], max_batch: int = 4) -> Job:
    loop = asyncio.new_event_loop()
    return Job(
        model=model,
        backend=None,  # type: ignore[arg-type]  # never run: only queued and batched here
        max_batch=max_batch,
        images=[np.zeros((3, s, s), np.float32) for s in sizes],
        finish=lambda ops, outs: None,
        deadline=time.monotonic() + 60,
        loop=loop,
        future=loop.create_future(),
    )


def next_batch(s: Scheduler, timeout: float = 2.0) -> tuple[Any, int] | None:
    """The next batch's (key, size), or None when the scheduler would still be waiting."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(s._next_batch()), daemon=True)
    t.start()
    t.join(timeout)
    if not out:
        with s._cond:  # let the waiting call return (it re-checks under _flush) and finish
            s._flush = True
            s._cond.notify_all()
        t.join(5)
        return None
    batch = out[0]
    return None if batch is None else (batch[0], len(batch[1]))


def test_a_full_batch_runs_at_once_while_company_is_on_its_way() -> None:
    s = scheduler()
    for _ in range(3):  # three admitted requests: the other two are still uploading
        s.expect()
    s.submit(job("m", [32, 32], max_batch=2))
    assert next_batch(s) == (("m", (32, 32)), 2)  # full: no 100 s wait


def test_a_partial_batch_waits_for_company_on_its_way_and_not_for_nobody() -> None:
    s = scheduler()
    s.expect()
    s.expect()  # one more admitted request still on its way
    s.submit(job("m", [32], max_batch=2))
    assert next_batch(s, timeout=0.5) is None  # waits (up to max_delay) for the other
    s = scheduler()
    s.expect()  # the only admitted request: nobody to wait for
    s.submit(job("m", [32], max_batch=2))
    assert next_batch(s) == (("m", (32, 32)), 1)


def test_queues_are_keyed_on_model_and_input_size_and_the_oldest_runs_first() -> None:
    s = scheduler()
    s.flush()  # every queue is ready: only the order is under test
    first = job("m", [48, 32, 48])
    time.sleep(0.002)
    second = job("other", [32])
    s.submit(first)
    time.sleep(0.002)
    s.submit(second)
    order = [next_batch(s) for _ in range(3)]
    # one job's images split by input size (the same enqueue time: either of its keys may go first),
    # and the later job's queue runs after both
    assert sorted(order[:2]) == [(("m", (32, 32)), 1), (("m", (48, 48)), 2)]
    assert order[2] == (("other", (32, 32)), 1)


@pytest.mark.parametrize("max_batch", [1, 3])
def test_batches_never_exceed_the_model_max_batch(max_batch: int) -> None:
    s = scheduler()
    s.flush()
    s.submit(job("m", [32] * 5, max_batch=max_batch))
    sizes = []
    while s.depth:
        batch = next_batch(s)
        assert batch is not None
        sizes.append(batch[1])
    assert sizes == [max_batch] * (5 // max_batch) + ([5 % max_batch] if 5 % max_batch else [])
