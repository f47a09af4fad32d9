"""Prometheus metrics, one registry per app (so several apps in one process never collide).

Requests and errors by route and status/code, queue depth, batch sizes, stage latencies,
images served and a 10-second images/s gauge.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # the *_created series only add noise to scrapes

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
STAGES = ("decode", "queue", "inference", "total")


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "cotap_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r
        )
        self.errors = Counter(
            "cotap_errors", "error answers, by route and error code", ["route", "code"], registry=r
        )
        self.in_flight = Gauge("cotap_requests_in_flight", "inference requests being handled", registry=r)
        self.queue_depth = Gauge("cotap_queue_depth", "images waiting for inference", ["model"], registry=r)
        self.batch_size = Histogram(
            "cotap_batch_size", "images per inference batch", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "cotap_stage_seconds",
            "per-request time in each stage (decode, queue, inference, total)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("cotap_images", "images run through a model", ["model", "route"], registry=r)
        self.dropped = Counter(
            "cotap_dropped_images", "images dropped before inference, by reason", ["reason"], registry=r
        )
        self.throughput = Gauge(
            "cotap_images_per_second", "images per second over the last 10 seconds", registry=r
        )
        self.ready = Gauge("cotap_ready", "1 when every model is loaded and warmed", registry=r)
        self.draining = Gauge("cotap_draining", "1 while draining after SIGTERM", registry=r)
        self._window: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def count_images(self, model: str, route: str, n: int) -> None:
        self.images.labels(model, route).inc(n)
        now = time.monotonic()
        with self._lock:
            self._window.append((now, n))
            self._update_rate(now)

    def _update_rate(self, now: float) -> None:
        while self._window and now - self._window[0][0] > 10.0:
            self._window.popleft()
        self.throughput.set(sum(n for _, n in self._window) / 10.0)

    def render(self) -> bytes:
        with self._lock:
            self._update_rate(time.monotonic())
        return generate_latest(self.registry)
