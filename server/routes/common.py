"""The path every inference route shares: admit, read and parse the body, merge options, decode
images off the event loop, queue them, wait (watching deadline and disconnect), encode the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from cotap.core.images import ImageDecodeError, load_pixels
from cotap.core.wire import (
    BUNDLE_HASH_HEADER,
    MODEL_HEADER,
    SAFETENSORS_MEDIA_TYPE,
    TIMING_HEADERS,
    ErrorCode,
)
from cotap.server.codecs import (
    ClientGone,
    ImagesPayload,
    PayloadKind,
    Result,
    check_json_room,
    encode_result,
    parse_payload,
    read_body,
    wants_binary,
)
from cotap.server.errors import ServerError
from cotap.server.options import OptionsT, check_repeats, merge_options
from cotap.server.registry import ServedModel
from cotap.server.scheduler import Finish, Job
from cotap.server.settings import Settings
from cotap.server.state import ServerState

# Every inference route documents both request forms in OpenAPI (the body is parsed by hand so
# that limits apply before anything is buffered or decoded).
_INLINE_ENCODE_BYTES = 4 * 1024 * 1024  # safetensors up to this size: a memcpy, cheaper than a thread hop
_B64_LIST = {"type": "array", "items": {"type": "string", "format": "byte"}, "minItems": 1}


def openapi_body(kind: PayloadKind) -> dict[str, Any]:
    binary = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
    if kind == "images":
        multipart = {"image": binary}
        json_body = {"images": _B64_LIST}
    else:
        multipart = {"source": binary, "target": binary}
        pair = {
            "type": "object",
            "properties": {
                "source": {"type": "string", "format": "byte"},
                "target": {"type": "string", "format": "byte"},
            },
            "required": ["source", "target"],
            "additionalProperties": False,
        }
        json_body = {"pairs": {"type": "array", "items": pair, "minItems": 1}}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": multipart, "required": list(multipart)}
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": json_body,
                        "required": list(json_body),
                        "description": "options may also be given here, as in the query",
                    }
                },
            },
        },
        "responses": {
            "200": {
                "description": "named tensors: JSON by default, safetensors with "
                f"'Accept: {SAFETENSORS_MEDIA_TYPE}'",
                "content": {SAFETENSORS_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    }


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.cotap
    return state


async def _decode(
    state: ServerState, model: ServedModel, payload: ImagesPayload, labels: list[str]
) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    loop = asyncio.get_running_loop()
    cfg, limits = model.preprocess, state.limits
    futures = [
        loop.run_in_executor(state.decode_pool, load_pixels, data, cfg, limits) for data in payload.images
    ]
    results = await asyncio.gather(*futures, return_exceptions=True)
    pixels, originals = [], []
    for label, r in zip(labels, results, strict=True):
        if isinstance(r, ImageDecodeError):
            raise ServerError(r.code, f"{label}: {r}")
        if isinstance(r, BaseException):
            raise ServerError(ErrorCode.BAD_IMAGE, f"{label}: could not be decoded: {type(r).__name__}: {r}")
        pixels.append(r[0])
        originals.append(r[1])
    return pixels, originals


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _wait(job: Job, request: Request, deadline_ms: int) -> Any:
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        timeout = max(0.0, job.deadline - time.monotonic())
        done, _ = await asyncio.wait(
            {job.future, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watcher.cancel()
    if job.future in done:
        return job.future.result()
    job.cancel("cancelled" if watcher in done else "deadline")
    job.future.cancel()
    if watcher in done:
        raise ClientGone()
    raise ServerError(ErrorCode.DEADLINE_EXCEEDED, f"no answer within the deadline of {deadline_ms} ms")


class Plan(NamedTuple):
    """What a route will compute for a request, known before it is queued."""

    finish: Finish  # post-processing, on the worker, once every image has run
    metadata: dict[str, Any]  # the answer's metadata
    values: int  # how many numbers the answer holds: a JSON answer too big is refused before inference


# plan(model, options, pixels, original sizes, dtype) -> Plan
InferencePlan = Callable[[ServedModel, Any, list[np.ndarray], list[tuple[int, int]], str], Plan]


async def _receive(state: ServerState, request: Request) -> bytes:
    """The request body, with at most `max_uploads` bodies arriving at once (429 beyond: memory stays
    under max_uploads x max_body_bytes) and each within `body_timeout_s` (408)."""
    settings = state.settings
    if state.uploads >= settings.max_uploads:
        raise ServerError(
            ErrorCode.QUEUE_FULL,
            f"{state.uploads} request bodies are being received already (max_uploads); "
            f"retry after {settings.retry_after_s} s",
            headers={"Retry-After": str(settings.retry_after_s)},
        )
    state.uploads += 1
    try:
        return await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    finally:
        state.uploads -= 1


def _check_count(request: Request, kind: PayloadKind, n: int, settings: Settings) -> None:
    """422 for no images (worded for the body sent), 413 for more than a request or the queue holds."""
    if n == 0:
        as_json = request.headers.get("content-type", "").lower().startswith("application/json")
        what = {
            ("images", False): "image parts (field 'image')",
            ("images", True): 'base64 images in "images"',
            ("pairs", False): "pairs (fields 'source' and 'target')",
            ("pairs", True): 'pairs in "pairs": [{"source": b64, "target": b64}]',
        }[(kind, as_json)]
        raise ServerError(ErrorCode.INVALID_PARAMETERS, f"no images: send one or more {what}")
    if n > settings.max_images_per_request:
        raise ServerError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"{n} images in one request; the limit is {settings.max_images_per_request}",
        )
    if n > settings.max_queue:  # could never be queued: a retryable 429 would loop forever
        raise ServerError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"{n} images in one request; the queue holds at most {settings.max_queue} "
            "(max_queue): split the request",
        )


def _item_labels(kind: PayloadKind, n: int) -> list[str]:
    """How error messages name each image: `image 3`, or `pair 1 target`."""
    if kind == "images":
        return [f"image {i}" for i in range(n)]
    return [f"pair {i // 2} {'source' if i % 2 == 0 else 'target'}" for i in range(n)]


def _check_sizes(model: ServedModel, pixels: list[np.ndarray]) -> None:
    """422 when an image's input size (after the resize policy) is not one the backend was built for."""
    supported = model.backend.sizes
    if supported is None:
        return
    bad = sorted({(int(p.shape[1]), int(p.shape[2])) for p in pixels} - supported)
    if bad:
        raise ServerError(
            ErrorCode.INVALID_PARAMETERS,
            f"input size {bad[0][0]}x{bad[0][1]} (after the bundle's resize policy) is not one the "
            f"{model.backend.kind} model was built for ({sorted(supported)}); send images that map "
            "to those sizes, or serve this bundle with --backend torch",
        )


async def run_inference(
    request: Request,
    *,
    route: str,
    kind: PayloadKind,
    options_cls: type[OptionsT],
    query: OptionsT,
    plan: InferencePlan,
) -> Response:
    """What every inference route does, in order: admit, read and parse the body, check the image
    count, decode (off the loop), check the sizes against the backend, plan, queue, wait, encode,
    answer with timing headers. `plan(model, options, pixels, original sizes, dtype)` checks the
    route's own limits and returns the `Plan`: finish function, response metadata, answer size."""
    state = server_state(request)
    ctx = request.scope.setdefault("state", {})
    settings = state.settings
    state.check_admitting()
    scheduler = state.scheduler
    scheduler.expect()
    try:
        check_repeats(options_cls, request.query_params.multi_items())
        scheduler.check_room(1)  # a full queue refuses before the body is read or parsed
        body = await _receive(state, request)
        payload = await parse_payload(
            request,
            body,
            kind,
            settings.max_parts,
            settings.max_json_depth,
            settings.max_field_bytes,
            state.decode_pool,
        )
        del body
        opts = merge_options(options_cls, query, payload.options)
        model = state.model(opts.model)
        n = len(payload.images)
        _check_count(request, kind, n, settings)
        labels = _item_labels(kind, n)
        scheduler.reserve(n)  # 429 now, before decoding, when the queue cannot take n more images
        t_decode = time.monotonic()
        try:
            pixels, originals = await _decode(state, model, payload, labels)
        finally:
            scheduler.release(n)  # submit (below, no await in between) queues them or refuses
        decode_s = time.monotonic() - t_decode
        del payload
        _check_sizes(model, pixels)
        binary = wants_binary(request)
        dtype = opts.dtype or ("float16" if binary else "float32")
        finish, metadata, values = plan(model, opts, pixels, originals, dtype)
        if not binary:
            check_json_room(values, settings.max_json_bytes)
        loop = asyncio.get_running_loop()
        job = Job(
            model=model.name,
            backend=model.backend,
            max_batch=model.max_batch,
            images=pixels,
            finish=finish,
            deadline=ctx.get("t0", time.monotonic()) + settings.deadline_ms / 1000.0,
            loop=loop,
            future=loop.create_future(),
            request_id=ctx.get("request_id", ""),
            route=route,
        )
        del pixels
        scheduler.submit(job)
        tensors = await _wait(job, request, settings.deadline_ms)
        metadata |= {
            "model": model.name,
            "bundle_sha256": model.bundle.sha256,
            "route": route,
            "dtype": dtype,
        }
        result = Result(tensors, metadata)
        if sum(int(t.nbytes) for t in tensors.values()) <= _INLINE_ENCODE_BYTES and binary:
            body_bytes, media_type = encode_result(result, binary, settings.max_json_bytes)  # ~0.1 ms
        else:  # large or JSON answers are encoded off the event loop
            body_bytes, media_type = await loop.run_in_executor(
                state.decode_pool, encode_result, result, binary, settings.max_json_bytes
            )
    except ClientGone:
        ctx["log"] = {"client": "disconnected"}
        return Response(status_code=499)
    finally:
        scheduler.unexpect()
    m = state.metrics
    queue_s = job.queue_s or 0.0
    m.stage_seconds.labels("decode").observe(decode_s)
    m.stage_seconds.labels("queue").observe(queue_s)
    m.stage_seconds.labels("inference").observe(job.inference_s)
    ctx["log"] = {
        "model": model.name,
        "images": n,
        "decode_ms": round(decode_s * 1000, 2),
        "queue_ms": round(queue_s * 1000, 2),
        "inference_ms": round(job.inference_s * 1000, 2),
        "bytes": len(body_bytes),
    }
    headers = {
        TIMING_HEADERS["decode"]: f"{decode_s * 1000:.2f}",
        TIMING_HEADERS["queue"]: f"{queue_s * 1000:.2f}",
        TIMING_HEADERS["inference"]: f"{job.inference_s * 1000:.2f}",
        MODEL_HEADER: model.name,
        BUNDLE_HASH_HEADER: model.bundle.sha256,
    }
    return Response(body_bytes, media_type=media_type, headers=headers)


def patch_counts(pixels: list[np.ndarray], patch: int) -> list[int]:
    """Patches in each (3, H, W) model input."""
    return [(int(x.shape[1]) // patch) * (int(x.shape[2]) // patch) for x in pixels]


def grids_metadata(prefix: str, sizes: list[tuple[int, int]], patch: int) -> dict[str, Any]:
    """`<prefix>grid` [h, w] when all items share one, else `<prefix>grids` [[h, w], ...]."""
    grids = [[h // patch, w // patch] for h, w in sizes]
    if len({tuple(g) for g in grids}) == 1:
        return {f"{prefix}grid": grids[0]}
    return {f"{prefix}grids": grids}
