"""When to try a request again and how long to wait: exponential backoff with full jitter, never
sooner than the server's `Retry-After`.

Only answers that say "later" are retried (429 queue full, 503 not ready or draining) and
connections that failed before an answer came; everything else is the caller's to fix, and every
request the SDK sends is safe to repeat (the server computes, it stores nothing).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff settings.

    - `max_attempts`: tries in all (1 = never retry).
    - `base_s`, `cap_s`: the k-th retry waits uniform(0, min(cap_s, base_s * 2**k)) seconds
      ("full jitter", so that many clients that failed together do not retry together).
    - `max_wait_s`: give up once this much time has gone into waiting.
    - `respect_retry_after`: wait at least the server's `Retry-After` (plus the jitter).
    - `max_connect_attempts`: tries when no connection can be made at all (a server restarting
      comes back within a few; a wrong URL should fail fast).
    """

    max_attempts: int = 10
    max_connect_attempts: int = 4
    base_s: float = 0.1
    cap_s: float = 10.0
    max_wait_s: float = 120.0
    respect_retry_after: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_connect_attempts < 1:
            raise ValueError("max_attempts and max_connect_attempts must be at least 1")
        if self.base_s < 0 or self.cap_s < 0 or self.max_wait_s < 0:
            raise ValueError("base_s, cap_s and max_wait_s must not be negative")

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """The jittered wait before retry number `retry` (0-based), without Retry-After."""
        r = (rng or random).random()
        return r * min(self.cap_s, self.base_s * (2.0**retry))

    def delay(self, retry: int, retry_after: float | None, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retry`: the server's Retry-After (when it sent
        one and we honour it) plus the jittered backoff."""
        wait = self.backoff(retry, rng)
        if self.respect_retry_after and retry_after is not None:
            wait += retry_after
        return wait


NO_RETRY = RetryPolicy(max_attempts=1, max_connect_attempts=1)


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """`Retry-After` as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class Attempts:
    """The retry budget of one request: how many retries are left and how long they have waited."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng
        self.retries = 0
        self.connect_failures = 0
        self.waited_s = 0.0

    def next_wait(self, retry_after: float | None = None, connect_failed: bool = False) -> float | None:
        """Seconds to sleep before trying again, or None when the budget is spent."""
        if self.retries + 1 >= self.policy.max_attempts:
            return None
        if connect_failed:
            self.connect_failures += 1
            if self.connect_failures >= self.policy.max_connect_attempts:
                return None
        wait = self.policy.delay(self.retries, retry_after, self.rng)
        if self.waited_s + wait > self.policy.max_wait_s:
            return None
        self.retries += 1
        self.waited_s += wait
        return wait
