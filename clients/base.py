"""What `Client` and `AsyncClient` share: configuration (URL, key, timeouts, retries), the typed
call plans (which route, which options, how to split, how to read the answer) and the statistics.

A plan holds no connection: the sync client runs it with `httpx.Client` and threads, the async one
with `httpx.AsyncClient` and tasks, and both end in the same `protocol` decoders.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import httpx
import numpy as np
import numpy.typing as npt

from cotap.client import protocol
from cotap.client.chunking import max_part_bytes, plan_chunks
from cotap.client.errors import (
    BadImage,
    CotapError,
    NotFound,
    NotReady,
    PayloadTooLarge,
    Timeout,
    Unreachable,
    error_from_response,
)
from cotap.client.info import Health, ServerInfo
from cotap.client.inputs import (
    EncodedImage,
    EncodeFormat,
    ImageInput,
    as_list,
    encode_format,
    encode_image,
    image_size,
)
from cotap.client.retry import RETRY_STATUSES, Attempts, RetryPolicy, retry_after_seconds
from cotap.core.version import __version__

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV, KEY_ENV = "COTAP_URL", "COTAP_API_KEY"
Outputs = Sequence[Literal["patch", "cls"]] | Literal["patch", "cls", "patch,cls"]
DType = npt.DTypeLike | None  # None: the server's default (float16 in binary answers)
CLOSED_MESSAGE = "this client is closed (close() was called, or its `with` block ended): make a new one"


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


_TIMEOUT_PHASES = {
    httpx.ConnectTimeout: "connect",
    httpx.ReadTimeout: "read",
    httpx.WriteTimeout: "write",
    httpx.PoolTimeout: "pool",
}


def _timed_out(e: httpx.TimeoutException) -> str:
    """ " to POST /v1/embed within 60 s": the request and the limit it ran into, where httpx knows them."""
    try:
        request = e.request
    except RuntimeError:  # raised before a request existed
        return ""
    limits = request.extensions.get("timeout", {})
    seconds = limits.get(_TIMEOUT_PHASES.get(type(e), "read"))
    within = f" within {seconds:g} s" if isinstance(seconds, int | float) else ""
    return f" to {request.method} {request.url.path}{within}"


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
    progress: bool = False  # a tqdm bar on stderr, advanced as chunks come back

    def in_flight(self, info: ServerInfo, chunks: Sequence[range], max_in_flight: int) -> int:
        """How many chunks may be in flight at once: `max_in_flight`, but never more images than
        the server's queue holds (more would only be refused with 429 and retried)."""
        parts = 2 if self.pairs else 1
        biggest = max((len(c) for c in chunks), default=1) * parts
        return info.limits.requests_in_flight(max_in_flight, biggest)

    def bar(self) -> Any:
        """A progress bar over the items (disabled unless `progress`)."""
        from tqdm.auto import tqdm  # a widget in notebooks, text in terminals

        what = "pairs" if self.pairs else "img"
        return tqdm(
            total=len(self.items),
            unit=what,
            desc=self.path.rsplit("/", 1)[-1],
            disable=not self.progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )

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
            return Timeout(
                f"no answer from {url}{_timed_out(e)} ({type(e).__name__}); raise the client's timeout"
            )
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
        self.image_format: ImageFormat = encode_format(image_format)
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

    def not_a_server(self, e: NotFound) -> NotFound:
        """The error for a 404 on `GET /v1/models`: the URL is not a cotap server's root."""
        return NotFound(
            f"{self.url}{protocol.MODELS} answered 404 ({e.message}): {self.url} does not look like a "
            "cotap server; give the server's root URL, such as http://host:8000 (no path)",
            status=e.status,
            request_id=e.request_id,
        )

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


def not_ready_error(url: str, health: Health, timeout: float) -> CotapError:
    """What `wait_until_ready` raises when `timeout` seconds were not enough (`health`: the last answer)."""
    detail = f" ({health.error})" if health.error else ""
    if health.status == "unreachable":
        return Unreachable(f"{url} could not be reached within {timeout:g} s{detail}")
    return NotReady(f"{url} was not ready within {timeout:g} s: {health.status}{detail}", status=503)


def output_names(outputs: Outputs) -> list[str]:
    """`outputs` as a list of names: a sequence as it is, a single string ("cls", "patch,cls")
    split at commas (not into letters)."""
    if isinstance(outputs, str):
        return [o.strip() for o in outputs.split(",") if o.strip()]
    return [str(o) for o in outputs]


def dtype_name(dtype: DType | None) -> str | None:
    """`dtype` as the name the server takes: "float16" / "float32" from a string, a NumPy type
    (np.float32) or dtype (np.dtype("float16")); a name NumPy does not know is passed on as it is
    (the server then says what it accepts)."""
    if dtype is None:
        return None
    try:
        return np.dtype(dtype).name
    except TypeError:
        if isinstance(dtype, str):
            return dtype
        raise TypeError(f"dtype must be float16 or float32 (a name or a NumPy type), got {dtype!r}") from None


def images_of(images: ImageInput | Sequence[ImageInput]) -> tuple[list[ImageInput], bool]:
    """(the images as a list, whether one image was given); an empty sequence is refused here,
    before anything is sent."""
    items, single = as_list(images)
    if not items:
        raise ValueError("no images: pass one image, or a sequence of one or more")
    return items, single


def embed_plan(
    items: list[EncodedImage],
    outputs: Outputs,
    normalize: bool,
    dtype: DType | None,
    model: str | None,
    progress: bool = False,
) -> CallPlan:
    params = protocol.query(
        outputs=output_names(outputs), normalize=normalize, dtype=dtype_name(dtype), model=model
    )
    return CallPlan(protocol.EMBED, params, list(items), protocol.embeddings, progress=progress)


def prototypes_plan(
    items: list[EncodedImage],
    top_k: int | None,
    dtype: DType | None,
    model: str | None,
    progress: bool = False,
) -> CallPlan:
    params = protocol.query(top_k=top_k, dtype=dtype_name(dtype), model=model)
    return CallPlan(protocol.PROTOTYPES, params, list(items), protocol.prototypes, progress=progress)


def pair_inputs(source: Any, target: Any) -> tuple[list[Any], list[Any], bool]:
    """(sources, targets, whether one pair was given); refuses a single image paired with a
    sequence, and sequences of unequal length."""
    sources, single_s = as_list(source)
    targets, single_t = as_list(target)
    if single_s != single_t:
        one, many = ("source", "target") if single_s else ("target", "source")
        n = len(targets) if single_s else len(sources)
        raise ValueError(
            f"{one} is one image but {many} is a sequence of {n}: pass one image each (one pair, "
            "-> Correspondence) or two sequences of equal length, paired in order "
            "(-> CorrespondenceBatch), e.g. correspond([a], [b])"
        )
    if len(sources) != len(targets):
        raise ValueError(
            "source and target sequences must have equal length (they are paired in order); "
            f"got {len(sources)} sources and {len(targets)} targets"
        )
    if not sources:
        raise ValueError("no pairs: pass one image each, or two sequences of one or more")
    return sources, targets, single_s


def correspond_plan(
    pairs: list[tuple[EncodedImage, EncodedImage]],
    top_k: int,
    mutual_only: bool,
    dense: bool,
    dtype: DType | None,
    model: str | None,
    info: ServerInfo,
    progress: bool = False,
) -> CallPlan:
    params = protocol.query(
        top_k=top_k, mutual_only=mutual_only, dense=dense, dtype=dtype_name(dtype), model=model
    )
    plan = CallPlan(
        protocol.CORRESPOND, params, list(pairs), protocol.correspondences, pairs=True, progress=progress
    )
    if dense:
        plan.weights = dense_weights(info, model, pairs)
        plan.max_weight = info.limits.max_dense_elements if plan.weights is not None else None
    return plan


def encode_all(images: Sequence[Any], fmt: EncodeFormat, role: str = "") -> list[EncodedImage]:
    """Every image encoded for sending. An image that cannot be read raises `BadImage` with `item`
    set to its index in the call and a message that names it ("image 3: ..." or, with a `role`,
    "pair 3 target: ..."), as the server's own errors do."""
    out = []
    for i, x in enumerate(images):
        try:
            out.append(encode_image(x, fmt, name=f"{role or 'image'}{i}"))
        except BadImage as e:
            place = f"pair {i} {role}" if role else f"image {i}"
            raise BadImage(f"{place}: {e.message}", item=i) from e
    return out
