"""What `Client` and `AsyncClient` share: configuration (URL, key, timeouts, retries), the typed
call plans (which route, which options, how to split, how to read the answer) and the statistics.

A plan holds no connection: the sync client runs it with `httpx.Client` and threads, the async one
with `httpx.AsyncClient` and tasks, and both end in the same `protocol` decoders.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import httpx

from cotap.client import protocol
from cotap.client.chunking import max_part_bytes, plan_chunks
from cotap.client.errors import CotapError, PayloadTooLarge, Timeout, Unreachable, error_from_response
from cotap.client.info import Health, ServerInfo
from cotap.client.inputs import EncodedImage, EncodeFormat, as_list, encode_image, image_size
from cotap.client.retry import RETRY_STATUSES, Attempts, RetryPolicy, retry_after_seconds
from cotap.core.version import __version__

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV, KEY_ENV = "COTAP_URL", "COTAP_API_KEY"
Outputs = Sequence[Literal["patch", "cls"]]


def resolve_url(url: str | None) -> str:
    """`url`, else $COTAP_URL, else http://127.0.0.1:8000 (no trailing slash)."""
    value = url or os.environ.get(URL_ENV) or DEFAULT_URL
    if "://" not in value:
        value = "http://" + value
    return value.rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    """`api_key`, else $COTAP_API_KEY, else none."""
    return api_key or os.environ.get(KEY_ENV) or None


def default_headers(api_key: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    headers = {"User-Agent": f"cotap-client/{__version__}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers | dict(extra or {})


def make_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if timeout is None:
        return httpx.Timeout(None)
    return httpx.Timeout(timeout, connect=min(10.0, timeout))


@dataclass
class ClientStats:
    """Counters of one client (all threads together): requests sent (retries included), retries,
    and answers that were errors in the end."""

    requests: int = 0
    retries: int = 0
    errors: int = 0


class StatsCounter:
    """Thread-safe increments of `ClientStats`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = ClientStats()

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, n in counts.items():
                setattr(self._stats, key, getattr(self._stats, key) + n)

    def snapshot(self) -> ClientStats:
        with self._lock:
            return ClientStats(**vars(self._stats))


Parse = Callable[[protocol.Decoded, int], list[Any]]
Item: TypeAlias = EncodedImage | tuple[EncodedImage, EncodedImage]


@dataclass
class CallPlan:
    """One SDK call: the route, its query options, the encoded items (images or pairs) and how to
    read an answer into one result per item."""

    path: str
    params: dict[str, str]
    items: list[Item]
    parse: Parse
    pairs: bool = False
    weights: list[int] | None = None  # dense similarity elements per pair
    max_weight: int | None = None

    def files(self, chunk: Sequence[Item]) -> protocol.Files:
        if self.pairs:
            return protocol.pair_files(chunk)  # type: ignore[arg-type]
        return protocol.image_files(chunk)  # type: ignore[arg-type]

    def item_bytes(self) -> list[int]:
        if self.pairs:
            return [len(s) + len(t) for s, t in self.items]  # type: ignore[misc,union-attr]
        return [len(x) for x in self.items]  # type: ignore[arg-type]

    def chunks(self, info: ServerInfo, images_per_request: int | None) -> list[range]:
        """Consecutive ranges of items, each a request within the server's limits. Raises
        PayloadTooLarge for an item too big to send at all (before anything is sent)."""
        limits = info.limits
        parts = 2 if self.pairs else 1
        biggest = max_part_bytes(limits, parts)
        for i, size in enumerate(self.item_bytes()):
            if size > biggest:
                what = "pair" if self.pairs else "image"
                raise PayloadTooLarge(
                    f"{what} {i} is {size} bytes encoded; the server takes at most {limits.max_body_bytes} "
                    "bytes per request: send a smaller image (or JPEG instead of PNG)",
                    item=i,
                )
        per_request = None
        if images_per_request is not None:
            per_request = max(1, images_per_request // parts)
        return plan_chunks(
            self.item_bytes(),
            limits,
            parts_per_item=parts,
            max_items=per_request,
            weights=self.weights,
            max_weight=self.max_weight,
        )


def dense_weights(
    info: ServerInfo, model: str | None, pairs: Sequence[tuple[EncodedImage, EncodedImage]]
) -> list[int] | None:
    """Dense similarity elements (source patches x target patches) of each pair, from the image
    headers and the model's resize policy; None when either is unknown (the server then checks)."""
    m = info.model(model)
    if m is None or m.preprocess is None:
        return None
    weights = []
    for source, target in pairs:
        ss, ts = image_size(source), image_size(target)
        if ss is None or ts is None:
            return None
        (sh, sw), (th, tw) = m.preprocess.grid(*ss), m.preprocess.grid(*ts)
        weights.append(sh * sw * th * tw)
    return weights


class Transport:
    """Sending one request with retries, and mapping failures to `CotapError`s (shared logic; the
    subclasses only differ in how they wait)."""

    def __init__(self, retry: RetryPolicy, stats: StatsCounter) -> None:
        self.retry = retry
        self.stats = stats

    def failure(self, e: httpx.TransportError, url: str) -> CotapError:
        if isinstance(e, httpx.TimeoutException):
            return Timeout(f"no answer from {url} within the timeout ({type(e).__name__})")
        return Unreachable(f"cannot reach {url}: {type(e).__name__}: {e}")

    def check(self, response: httpx.Response, item_offset: int = 0) -> httpx.Response:
        if response.status_code >= 400:
            self.stats.add(errors=1)
            raise error_from_response(
                response.status_code, response.content, response.headers, item_offset=item_offset
            )
        return response

    def wait_after_failure(self, attempts: Attempts, e: httpx.TransportError, url: str) -> float:
        """Seconds to wait before retrying a request whose connection failed; raises the mapped
        `CotapError` when it must not be retried (timeouts never are; see `RetryPolicy`)."""
        if not isinstance(e, httpx.TimeoutException):
            wait = self.should_retry(attempts, None)
            if wait is not None:
                return wait
        self.stats.add(errors=1)
        raise self.failure(e, url) from e

    def should_retry(self, attempts: Attempts, response: httpx.Response | None) -> float | None:
        """Seconds to wait before retrying this outcome (a response, or None for a connection that
        failed), or None to stop."""
        if response is not None and response.status_code not in RETRY_STATUSES:
            return None
        retry_after = retry_after_seconds(response.headers) if response is not None else None
        wait = attempts.next_wait(retry_after, connect_failed=response is None)
        if wait is not None:
            self.stats.add(retries=1)
        return wait


ImageFormat: TypeAlias = EncodeFormat


class ClientCore:
    """The configuration and counters `Client` and `AsyncClient` share; each adds its own httpx
    client (built from `http_options`) and its way of running calls."""

    def __init__(
        self,
        url: str | None,
        model: str | None,
        retry: RetryPolicy | None,
        max_in_flight: int,
        images_per_request: int | None,
        image_format: ImageFormat,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.url = resolve_url(url)
        self.model = model
        self.max_in_flight = max_in_flight
        self.images_per_request = images_per_request
        self.image_format: ImageFormat = image_format
        self._stats = StatsCounter()
        self._transport = Transport(retry or RetryPolicy(), self._stats)

    def http_options(
        self, api_key: str | None, headers: dict[str, str] | None, timeout: float | httpx.Timeout | None
    ) -> dict[str, Any]:
        """Keyword arguments for `httpx.Client` / `httpx.AsyncClient`."""
        return {
            "base_url": self.url,
            "headers": default_headers(resolve_api_key(api_key), headers),
            "timeout": make_timeout(timeout),
            "limits": httpx.Limits(
                max_connections=max(16, 2 * self.max_in_flight), max_keepalive_connections=16
            ),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, model={self.model!r})"

    @property
    def stats(self) -> ClientStats:
        """A snapshot of this client's counters (requests, retries, errors)."""
        return self._stats.snapshot()


def health_from(live: bool, ready: httpx.Response) -> Health:
    try:
        body = ready.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    return Health(
        live=live,
        ready=ready.status_code == 200,
        status=str(body.get("status", "ready" if ready.status_code == 200 else f"HTTP {ready.status_code}")),
        models=list(body.get("models", [])),
        error=body.get("error"),
    )


def embed_plan(
    items: list[EncodedImage], outputs: Outputs, normalize: bool, dtype: str | None, model: str | None
) -> CallPlan:
    params = protocol.query(outputs=list(outputs), normalize=normalize, dtype=dtype, model=model)
    return CallPlan(protocol.EMBED, params, list(items), protocol.embeddings)


def prototypes_plan(
    items: list[EncodedImage], top_k: int | None, dtype: str | None, model: str | None
) -> CallPlan:
    params = protocol.query(top_k=top_k, dtype=dtype, model=model)
    return CallPlan(protocol.PROTOTYPES, params, list(items), protocol.prototypes)


def pair_inputs(source: Any, target: Any) -> tuple[list[Any], list[Any], bool]:
    """(sources, targets, whether one pair was given); refuses unequal sequences."""
    sources, single_s = as_list(source)
    targets, single_t = as_list(target)
    if single_s != single_t or len(sources) != len(targets):
        raise ValueError(
            "source and target must be one image each or sequences of equal length "
            f"(got {len(sources)} and {len(targets)})"
        )
    return sources, targets, single_s


def correspond_plan(
    pairs: list[tuple[EncodedImage, EncodedImage]],
    top_k: int,
    mutual_only: bool,
    dense: bool,
    dtype: str | None,
    model: str | None,
    info: ServerInfo,
) -> CallPlan:
    params = protocol.query(top_k=top_k, mutual_only=mutual_only, dense=dense, dtype=dtype, model=model)
    plan = CallPlan(protocol.CORRESPOND, params, list(pairs), protocol.correspondences, pairs=True)
    if dense:
        plan.weights = dense_weights(info, model, pairs)
        plan.max_weight = info.limits.max_dense_elements if plan.weights is not None else None
    return plan


def encode_all(images: Sequence[Any], fmt: EncodeFormat, prefix: str = "image") -> list[EncodedImage]:
    return [encode_image(x, fmt, name=f"{prefix}{i}") for i, x in enumerate(images)]
