"""`Client`: the synchronous SDK. One `httpx.Client` (a keep-alive connection pool) per `Client`.

Thread safety: a `Client` may be shared by any number of threads. What they share is the
connection pool (httpx's is thread-safe), the cached `/v1/models` answer (read and refreshed under
a lock), the statistics (locked counters) and a small thread pool that sends the chunks of one
large call side by side (`max_in_flight`). Nothing else is mutable, and no call depends on another.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, overload

import httpx

from cotap.client import protocol
from cotap.client.base import (
    CLOSED_MESSAGE,
    CallPlan,
    ClientCore,
    DType,
    ImageFormat,
    Item,
    Outputs,
    correspond_plan,
    embed_plan,
    encode_all,
    health_from,
    images_of,
    not_ready_error,
    pair_inputs,
    prototypes_plan,
)
from cotap.client.errors import ImageTooLarge, NotFound, PayloadTooLarge
from cotap.client.folder import embed_folder
from cotap.client.info import Health, ServerInfo
from cotap.client.inputs import ImageInput
from cotap.client.results import (
    Correspondence,
    CorrespondenceBatch,
    EmbedBatch,
    Embedding,
    Prototypes,
    PrototypesBatch,
)
from cotap.client.retry import Attempts, RetryPolicy


class Client(ClientCore):
    """Patch embeddings, prototype maps and correspondences from a cotap server, as NumPy arrays.

    >>> with Client("http://127.0.0.1:8000") as client:
    ...     e = client.embed("photo.jpg")          # Embedding: e.patch (h, w, C), e.cls (C,)
    ...     batch = client.embed(["a.jpg", "b.jpg"])  # EmbedBatch: batch.patch (2, h, w, C)

    - `url`: the server (default $COTAP_URL, else http://127.0.0.1:8000); `api_key`: sent as a
      Bearer token (default $COTAP_API_KEY); `model`: the served model to ask (default: the
      server's default).
    - `timeout`: seconds per request (connect at most 10 s); `retry`: backoff on 429/503 and on
      connections that fail (`RetryPolicy()`: up to 10 tries, full jitter, Retry-After honoured).
    - `images_per_request`: a cap of your own on top of the server's limits.
    - `max_in_flight`: requests one call sends at once when it is split into several (fewer when
      more would hold more images than the server's queue, `max_queue`).
    - `image_format`: how in-memory images (PIL, NumPy) are encoded: "PNG" (lossless, default),
      "JPEG" or "WEBP" (lossless), in any case.
    - `transport`: an httpx transport (proxies, tests).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float | httpx.Timeout | None = 60.0,
        retry: RetryPolicy | None = None,
        max_in_flight: int = 4,
        images_per_request: int | None = None,
        image_format: ImageFormat = "PNG",
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, model, retry, max_in_flight, images_per_request, image_format)
        self._http = httpx.Client(**self.http_options(api_key, headers, timeout), transport=transport)
        self._info: ServerInfo | None = None
        self._info_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._http.is_closed:
            raise RuntimeError(CLOSED_MESSAGE)

    def close(self) -> None:
        """Close the connections and the chunk thread pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------------
    def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        files: protocol.Files | None = None,
        item_offset: int = 0,
    ) -> httpx.Response:
        """One request, retried on 429/503 and failed connections; errors raised as CotapError."""
        self._check_open()
        t = self._transport
        attempts = Attempts(t.retry)
        headers = protocol.ACCEPT if files is not None else None
        while True:
            t.stats.add(requests=1)
            try:
                response = self._http.request(method, path, params=params, files=files, headers=headers)
            except httpx.TransportError as e:
                time.sleep(t.wait_after_failure(attempts, e, self.url))
                continue
            wait = t.should_retry(attempts, response)
            if wait is None:
                return t.check(response, item_offset)
            response.close()
            time.sleep(wait)

    # -- server information ---------------------------------------------------------------------
    def models(self, refresh: bool = False) -> ServerInfo:
        """`GET /v1/models`: served models and limits (cached; `refresh=True` asks again)."""
        with self._info_lock:
            if self._info is None or refresh:
                try:
                    self._info = ServerInfo.from_dict(self._send("GET", protocol.MODELS).json())
                except NotFound as e:  # every cotap server has /v1/models: a wrong URL
                    raise self.not_a_server(e) from e
            return self._info

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> Health:
        """Ask `health()` every `interval` seconds until the server is ready (it may still be
        starting, warming its models, or not listening yet); raise `NotReady`, or `Unreachable`
        when nothing answered, after `timeout` seconds."""
        start = time.monotonic()
        while True:
            h = self.health()
            waited = time.monotonic() - start
            if h.ready:
                return h
            if waited + interval > timeout:
                raise not_ready_error(self.url, h, timeout)
            time.sleep(interval)

    def health(self) -> Health:
        """`/health/live` and `/health/ready`, asked once each (no retries: this reports state).
        The probes are open: a wrong API key shows up on the first call that needs it."""
        self._check_open()
        try:
            live = self._http.get(protocol.LIVE).status_code == 200
            ready = self._http.get(protocol.READY)
        except httpx.TransportError as e:
            return Health(live=False, ready=False, status="unreachable", error=f"{type(e).__name__}: {e}")
        return health_from(live, ready)

    # -- calls ----------------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="cotap-client")
            return self._pool

    def _post(self, plan: CallPlan, chunk: range) -> list[Any]:
        """Results of one chunk; a chunk refused as too large (limits changed under us) is split."""
        items: list[Item] = plan.items[chunk.start : chunk.stop]
        try:
            response = self._send(
                "POST", plan.path, params=plan.params, files=plan.files(items), item_offset=chunk.start
            )
        except PayloadTooLarge as e:
            if len(chunk) < 2 or isinstance(e, ImageTooLarge):
                raise
            self.models(refresh=True)
            mid = chunk.start + len(chunk) // 2
            return self._post(plan, range(chunk.start, mid)) + self._post(plan, range(mid, chunk.stop))
        return plan.parse(protocol.decode(response.content, response.headers), len(items))

    def _run(self, plan: CallPlan) -> list[Any]:
        """Every chunk of the plan, a window of them in flight at once (`max_in_flight`, and never
        more images than the server's queue holds); results in input order."""
        self._check_open()
        info = self.models()
        chunks = plan.chunks(info, self.images_per_request)
        window = plan.in_flight(info, chunks, self.max_in_flight)
        with plan.bar() as bar:
            if len(chunks) == 1:
                out = self._post(plan, chunks[0])
                bar.update(len(out))
                return out
            results: list[list[Any]] = [[] for _ in chunks]
            running: dict[Future[list[Any]], int] = {}
            pool, nxt = self._executor(), 0
            try:
                while nxt < len(chunks) or running:
                    while nxt < len(chunks) and len(running) < window:
                        running[pool.submit(self._post, plan, chunks[nxt])] = nxt
                        nxt += 1
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for f in done:
                        i = running.pop(f)
                        results[i] = f.result()
                        bar.update(len(chunks[i]))
            except BaseException:
                for f in running:
                    f.cancel()
                raise
        return [r for part in results for r in part]

    @overload
    def embed(  # type: ignore[overload-overlap]  # a str is a Sequence[str] too: the first overload wins
        self,
        images: ImageInput,
        *,
        outputs: Outputs = ...,
        normalize: bool = ...,
        dtype: DType = ...,
        progress: bool = ...,
        model: str | None = ...,
    ) -> Embedding: ...
    @overload
    def embed(
        self,
        images: Sequence[ImageInput],
        *,
        outputs: Outputs = ...,
        normalize: bool = ...,
        dtype: DType = ...,
        progress: bool = ...,
        model: str | None = ...,
    ) -> EmbedBatch: ...
    def embed(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        outputs: Outputs = ("patch", "cls"),
        normalize: bool = False,
        dtype: DType = None,
        progress: bool = False,
        model: str | None = None,
    ) -> Embedding | EmbedBatch:
        """Patch embeddings (h, w, C) and cls embeddings (C,) of one image (-> `Embedding`) or of a
        sequence of them (-> `EmbedBatch`, in order). `normalize`: L2-normalised; `dtype`: float16
        (default) or float32, as a name or a NumPy type; `outputs`: ("patch",), ("cls",) or both
        (a single name such as "cls" works too); `progress`: a tqdm bar on stderr (long lists)."""
        self._check_open()
        items, single = images_of(images)
        encoded = encode_all(items, self.image_format)
        results = self._run(embed_plan(encoded, outputs, normalize, dtype, model or self.model, progress))
        return results[0] if single else EmbedBatch(results)

    @overload
    def prototypes(  # type: ignore[overload-overlap]  # a str is a Sequence[str] too: the first overload wins
        self,
        images: ImageInput,
        *,
        top_k: int | None = ...,
        dtype: DType = ...,
        progress: bool = ...,
        model: str | None = ...,
    ) -> Prototypes: ...
    @overload
    def prototypes(
        self,
        images: Sequence[ImageInput],
        *,
        top_k: int | None = ...,
        dtype: DType = ...,
        progress: bool = ...,
        model: str | None = ...,
    ) -> PrototypesBatch: ...
    def prototypes(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        top_k: int | None = None,
        dtype: DType = None,
        progress: bool = False,
        model: str | None = None,
    ) -> Prototypes | PrototypesBatch:
        """Per-patch prototype ids (h, w) and probabilities: all M (h, w, M) by default, or the
        `top_k` largest (h, w, k) with their ids. `dtype`, `progress`: as `embed`."""
        self._check_open()
        items, single = images_of(images)
        encoded = encode_all(items, self.image_format)
        results = self._run(prototypes_plan(encoded, top_k, dtype, model or self.model, progress))
        return results[0] if single else PrototypesBatch(results)

    @overload
    def correspond(  # type: ignore[overload-overlap]  # a str is a Sequence[str] too: the first overload wins
        self,
        source: ImageInput,
        target: ImageInput,
        *,
        top_k: int = ...,
        mutual_only: bool = ...,
        dense: bool = ...,
        dtype: DType = ...,
        progress: bool = ...,
        model: str | None = ...,
    ) -> Correspondence: ...
    @overload
    def correspond(
        self,
        source: Sequence[ImageInput],
        target: Sequence[ImageInput],
        *,
        top_k: int = ...,
        mutual_only: bool = ...,
        dense: bool = ...,
        dtype: DType = ...,
        progress: bool = ...,
        model: str | None = ...,
    ) -> CorrespondenceBatch: ...
    def correspond(
        self,
        source: ImageInput | Sequence[ImageInput],
        target: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = 1,
        mutual_only: bool = False,
        dense: bool = False,
        dtype: DType = None,
        progress: bool = False,
        model: str | None = None,
    ) -> Correspondence | CorrespondenceBatch:
        """For every patch of `source` its best match in `target` (one pair -> `Correspondence`;
        two equally long sequences, paired in order -> `CorrespondenceBatch`). `top_k` > 1 adds
        the k best; `dense` adds the full similarity (split so each request stays under the
        server's `max_dense_elements`); `mutual_only` keeps mutual matches only. `dtype`,
        `progress`: as `embed`."""
        self._check_open()
        sources, targets, single = pair_inputs(source, target)
        pairs = list(
            zip(
                encode_all(sources, self.image_format, "source"),
                encode_all(targets, self.image_format, "target"),
                strict=True,
            )
        )
        info = self.models()
        plan = correspond_plan(pairs, top_k, mutual_only, dense, dtype, model or self.model, info, progress)
        results = self._run(plan)
        return results[0] if single else CorrespondenceBatch(results)

    # -- folders --------------------------------------------------------------------------------
    # `client.embed_folder(src, dst, ...)` is `cotap.client.folder.embed_folder(client, src, dst, ...)`:
    # one definition, so its keywords and docstring are the method's too (IDEs, mypy, help()).
    embed_folder = embed_folder
