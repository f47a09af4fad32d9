"""`AsyncClient`: the asyncio twin of `Client`, on one `httpx.AsyncClient` (a keep-alive pool).

Share one `AsyncClient` between the tasks of one event loop (not between loops or threads). Its
shared state is the connection pool, the cached `/v1/models` answer (refreshed under an
`asyncio.Lock`) and the statistics. Encoding images (file reads, PNG encoding) runs in a worker
thread so the event loop stays free; the chunks of a large call are sent `max_in_flight` at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
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


class AsyncClient(ClientCore):
    """`Client` for asyncio: the same calls, awaited.

    >>> async with AsyncClient() as client:
    ...     batch = await client.embed(["a.jpg", "b.jpg"])

    Arguments as for `Client`.
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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, model, retry, max_in_flight, images_per_request, image_format)
        self._http = httpx.AsyncClient(**self.http_options(api_key, headers, timeout), transport=transport)
        self._info: ServerInfo | None = None
        self._info_lock = asyncio.Lock()

    def _check_open(self) -> None:
        if self._http.is_closed:
            raise RuntimeError(CLOSED_MESSAGE)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        files: protocol.Files | None = None,
        item_offset: int = 0,
    ) -> httpx.Response:
        self._check_open()
        t = self._transport
        attempts = Attempts(t.retry)
        headers = protocol.ACCEPT if files is not None else None
        while True:
            t.stats.add(requests=1)
            try:
                response = await self._http.request(method, path, params=params, files=files, headers=headers)
            except httpx.TransportError as e:
                await asyncio.sleep(t.wait_after_failure(attempts, e, self.url))
                continue
            wait = t.should_retry(attempts, response)
            if wait is None:
                return t.check(response, item_offset)
            await response.aclose()
            await asyncio.sleep(wait)

    async def models(self, refresh: bool = False) -> ServerInfo:
        """`GET /v1/models` (cached; `refresh=True` asks again)."""
        async with self._info_lock:
            if self._info is None or refresh:
                try:
                    response = await self._send("GET", protocol.MODELS)
                    self._info = ServerInfo.from_dict(response.json())
                except NotFound as e:  # every cotap server has /v1/models: a wrong URL
                    raise self.not_a_server(e) from e
            return self._info

    async def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> Health:
        """As `Client.wait_until_ready`: poll `health()` until ready, or raise after `timeout` s."""
        start = time.monotonic()
        while True:
            h = await self.health()
            waited = time.monotonic() - start
            if h.ready:
                return h
            if waited + interval > timeout:
                raise not_ready_error(self.url, h, timeout)
            await asyncio.sleep(interval)

    async def health(self) -> Health:
        """As `Client.health`: both probes once each, no retries, no API key needed."""
        self._check_open()
        try:
            live = (await self._http.get(protocol.LIVE)).status_code == 200
            ready = await self._http.get(protocol.READY)
        except httpx.TransportError as e:
            return Health(live=False, ready=False, status="unreachable", error=f"{type(e).__name__}: {e}")
        return health_from(live, ready)

    async def _post(self, plan: CallPlan, chunk: range) -> list[Any]:
        items: list[Item] = plan.items[chunk.start : chunk.stop]
        try:
            response = await self._send(
                "POST", plan.path, params=plan.params, files=plan.files(items), item_offset=chunk.start
            )
        except PayloadTooLarge as e:
            if len(chunk) < 2 or isinstance(e, ImageTooLarge):
                raise
            await self.models(refresh=True)
            mid = chunk.start + len(chunk) // 2
            first = await self._post(plan, range(chunk.start, mid))
            return first + await self._post(plan, range(mid, chunk.stop))
        return plan.parse(protocol.decode(response.content, response.headers), len(items))

    async def _run(self, plan: CallPlan) -> list[Any]:
        self._check_open()
        info = await self.models()
        chunks = plan.chunks(info, self.images_per_request)
        with plan.bar() as bar:
            if len(chunks) == 1:
                out = await self._post(plan, chunks[0])
                bar.update(len(out))
                return out
            window = asyncio.Semaphore(plan.in_flight(info, chunks, self.max_in_flight))

            async def one(chunk: range) -> list[Any]:
                async with window:
                    out = await self._post(plan, chunk)
                bar.update(len(chunk))
                return out

            parts = await asyncio.gather(*(one(c) for c in chunks))
        return [r for part in parts for r in part]

    @overload
    async def embed(  # type: ignore[overload-overlap]  # a str is a Sequence[str] too: the first overload wins
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
    async def embed(
        self,
        images: Sequence[ImageInput],
        *,
        outputs: Outputs = ...,
        normalize: bool = ...,
        dtype: DType = ...,
        progress: bool = ...,
        model: str | None = ...,
    ) -> EmbedBatch: ...
    async def embed(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        outputs: Outputs = ("patch", "cls"),
        normalize: bool = False,
        dtype: DType = None,
        progress: bool = False,
        model: str | None = None,
    ) -> Embedding | EmbedBatch:
        """As `Client.embed`."""
        self._check_open()
        items, single = images_of(images)
        encoded = await asyncio.to_thread(encode_all, items, self.image_format)
        plan = embed_plan(encoded, outputs, normalize, dtype, model or self.model, progress)
        results = await self._run(plan)
        return results[0] if single else EmbedBatch(results)

    @overload
    async def prototypes(  # type: ignore[overload-overlap]  # a str is a Sequence[str] too: the first overload wins
        self,
        images: ImageInput,
        *,
        top_k: int | None = ...,
        dtype: DType = ...,
        progress: bool = ...,
        model: str | None = ...,
    ) -> Prototypes: ...
    @overload
    async def prototypes(
        self,
        images: Sequence[ImageInput],
        *,
        top_k: int | None = ...,
        dtype: DType = ...,
        progress: bool = ...,
        model: str | None = ...,
    ) -> PrototypesBatch: ...
    async def prototypes(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        top_k: int | None = None,
        dtype: DType = None,
        progress: bool = False,
        model: str | None = None,
    ) -> Prototypes | PrototypesBatch:
        """As `Client.prototypes`."""
        self._check_open()
        items, single = images_of(images)
        encoded = await asyncio.to_thread(encode_all, items, self.image_format)
        results = await self._run(prototypes_plan(encoded, top_k, dtype, model or self.model, progress))
        return results[0] if single else PrototypesBatch(results)

    @overload
    async def correspond(  # type: ignore[overload-overlap]  # a str is a Sequence[str] too: the first overload wins
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
    async def correspond(
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
    async def correspond(
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
        """As `Client.correspond`."""
        self._check_open()
        sources, targets, single = pair_inputs(source, target)
        encoded_s = await asyncio.to_thread(encode_all, sources, self.image_format, "source")
        encoded_t = await asyncio.to_thread(encode_all, targets, self.image_format, "target")
        pairs = list(zip(encoded_s, encoded_t, strict=True))
        info = await self.models()
        plan = correspond_plan(pairs, top_k, mutual_only, dense, dtype, model or self.model, info, progress)
        results = await self._run(plan)
        return results[0] if single else CorrespondenceBatch(results)
