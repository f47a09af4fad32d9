"""Bodies in and out: the size-capped request body, multipart and base64-JSON image payloads, and
responses as safetensors (named tensors plus string metadata) or JSON (the same names, nested lists).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import AsyncGenerator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson
from safetensors.numpy import save as save_safetensors
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from cotap.core.wire import JSON_MEDIA_TYPE, SAFETENSORS_MEDIA_TYPE, ErrorCode, metadata_strings
from cotap.server.errors import ServerError

PayloadKind = Literal["images", "pairs"]
INLINE_PARSE_BYTES = 1 << 20  # smaller bodies parse on the event loop (a few ms at most)
IMAGE_FIELD = "image"
PAIR_FIELDS = ("source", "target")
METADATA_KEY = "__metadata__"


@dataclass
class ImagesPayload:
    """The encoded images of a request (for pairs: source0, target0, source1, ...) and any options
    the body carried."""

    images: list[bytes]
    options: dict[str, Any] = field(default_factory=dict)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def read_body(request: Request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `max_bytes`, and with 408
    when it has not all arrived `timeout_s` after the call (a trickling client holds no more)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(request, max_bytes)
    except TimeoutError as e:
        raise ServerError(
            ErrorCode.REQUEST_TIMEOUT,
            f"the request body did not arrive within {timeout_s:g} s (body_timeout_s)",
        ) from e


async def _read_body(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError as e:
            raise ServerError(ErrorCode.INVALID_PARAMETERS, "Content-Length is not a number") from e
        if size > max_bytes:
            raise ServerError(
                ErrorCode.PAYLOAD_TOO_LARGE, f"request body is {size} bytes; the limit is {max_bytes}"
            )
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise ServerError(
                    ErrorCode.PAYLOAD_TOO_LARGE, f"request body exceeds the limit of {max_bytes} bytes"
                )
            chunks.append(chunk)
    except ClientDisconnect as e:
        raise ClientGone() from e
    return b"".join(chunks)


def _json_depth(value: Any) -> int:
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        depth = max(depth, d)
        if isinstance(v, dict):
            stack += [(x, d + 1) for x in v.values()]
        elif isinstance(v, list):
            stack += [(x, d + 1) for x in v]
    return depth


def _b64(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise ServerError(ErrorCode.INVALID_PARAMETERS, f"{where} must be a base64 string")
    if text.startswith("data:"):
        text = text.partition(",")[2]  # data:image/jpeg;base64,....
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ServerError(ErrorCode.BAD_IMAGE, f"{where} is not valid base64: {e}") from e


def parse_json(body: bytes, kind: PayloadKind, max_depth: int) -> ImagesPayload:
    """`{"images": [b64, ...], ...options}` or `{"pairs": [{"source": b64, "target": b64}], ...options}`."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ServerError(ErrorCode.INVALID_PARAMETERS, f"body is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ServerError(ErrorCode.INVALID_PARAMETERS, "the JSON body must be an object")
    if _json_depth(doc) > max_depth:
        raise ServerError(ErrorCode.INVALID_PARAMETERS, f"the JSON body nests deeper than {max_depth} levels")
    images: list[bytes] = []
    if kind == "images":
        items = doc.pop("images", None)
        if not isinstance(items, list):
            raise ServerError(ErrorCode.INVALID_PARAMETERS, 'the JSON body needs "images": [base64, ...]')
        images = [_b64(s, f"images[{i}]") for i, s in enumerate(items)]
    else:
        pairs = doc.pop("pairs", None)
        if not isinstance(pairs, list):
            raise ServerError(
                ErrorCode.INVALID_PARAMETERS,
                'the JSON body needs "pairs": [{"source": b64, "target": b64}, ...]',
            )
        for i, pair in enumerate(pairs):
            if not isinstance(pair, dict) or set(pair) != set(PAIR_FIELDS):
                raise ServerError(
                    ErrorCode.INVALID_PARAMETERS, f'pairs[{i}] must be {{"source": b64, "target": b64}}'
                )
            images += [_b64(pair[f], f"pairs[{i}].{f}") for f in PAIR_FIELDS]
    return ImagesPayload(images, doc)


async def parse_multipart(
    headers: Headers, body: bytes, kind: PayloadKind, max_parts: int, max_field_bytes: int
) -> ImagesPayload:
    """Repeated `image` file parts, or `source`/`target` parts paired in order; other (text) fields
    are options, each at most `max_field_bytes`."""

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(
        headers, stream(), max_files=max_parts, max_fields=max_parts, max_part_size=max_field_bytes
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        too_big = "Too many" in e.message or "maximum size" in e.message
        code = ErrorCode.PAYLOAD_TOO_LARGE if too_big else ErrorCode.INVALID_PARAMETERS
        raise ServerError(code, f"multipart body refused: {e.message}") from e
    try:
        names = (IMAGE_FIELD,) if kind == "images" else PAIR_FIELDS
        files: dict[str, list[bytes]] = {n: [] for n in names}
        options: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name in files:
                if not isinstance(value, UploadFile):
                    raise ServerError(
                        ErrorCode.INVALID_PARAMETERS,
                        f"field {name!r} must be a file part (curl -F {name}=@photo.jpg)",
                    )
                files[name].append(await value.read())
            elif isinstance(value, UploadFile):
                raise ServerError(
                    ErrorCode.INVALID_PARAMETERS,
                    f"unexpected file field {name!r}; expected {' and '.join(repr(n) for n in names)}",
                )
            else:
                options.setdefault(name, []).append(value)
    finally:
        await form.close()
    options = {k: v[0] if len(v) == 1 else v for k, v in options.items()}
    if kind == "images":
        return ImagesPayload(files[IMAGE_FIELD], options)
    sources, targets = files["source"], files["target"]
    if len(sources) != len(targets):
        raise ServerError(
            ErrorCode.INVALID_PARAMETERS,
            f"{len(sources)} source and {len(targets)} target images: they are paired in order, send as many of each",
        )
    return ImagesPayload([x for pair in zip(sources, targets, strict=True) for x in pair], options)


async def parse_payload(
    request: Request,
    body: bytes,
    kind: PayloadKind,
    max_parts: int,
    max_depth: int,
    max_field_bytes: int,
    pool: Executor | None = None,
) -> ImagesPayload:
    """The images and options of a multipart or base64-JSON body. Bodies of `INLINE_PARSE_BYTES`
    or more are parsed in `pool`, so that the event loop keeps serving (40 MB of base64 JSON takes
    about 0.2 s to parse)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    offload = pool is not None and len(body) >= INLINE_PARSE_BYTES
    loop = asyncio.get_running_loop()
    if ctype == "multipart/form-data":
        parse = parse_multipart(request.headers, body, kind, max_parts, max_field_bytes)
        if offload:
            return await loop.run_in_executor(pool, asyncio.run, parse)  # a loop of its own there
        return await parse
    if ctype == "application/json":
        if offload:
            return await loop.run_in_executor(pool, parse_json, body, kind, max_depth)
        return parse_json(body, kind, max_depth)
    raise ServerError(
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        f"content type {ctype or '(none)'!r} is not accepted; send multipart/form-data or application/json",
    )


# -- responses -------------------------------------------------------------------------------------
@dataclass
class Result:
    """A response's named tensors (host NumPy arrays) and its metadata."""

    tensors: dict[str, np.ndarray]
    metadata: dict[str, Any]


def _accept_quality(accept: str, media_type: str) -> float:
    """The q-value `accept` gives `media_type` (0 when it does not accept it): the most specific
    matching range decides (RFC 9110 §12.5.1), `type/*` over `*/*`."""
    best_rank, best_q = -1, 0.0
    main = media_type.split("/", 1)[0]
    for item in accept.split(","):
        rng, *params = (p.strip() for p in item.split(";"))
        rng = rng.lower()
        rank = {media_type: 2, f"{main}/*": 1, "*/*": 0}.get(rng, -1)
        if rank <= best_rank:
            continue
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 0.0
        best_rank, best_q = rank, q
    return best_q


def wants_binary(request: Request) -> bool:
    """Whether to answer in safetensors: asked for by name, with a q-value above 0 and not below
    JSON's (`Accept: application/x-safetensors;q=0, application/json` gets JSON)."""
    accept = request.headers.get("accept", "")
    if SAFETENSORS_MEDIA_TYPE not in accept.lower():
        return False
    binary = _accept_quality(accept, SAFETENSORS_MEDIA_TYPE)
    return binary > 0 and binary >= _accept_quality(accept, "application/json")


def encode_safetensors(result: Result) -> bytes:
    tensors = {k: np.ascontiguousarray(v) for k, v in result.tensors.items()}
    return save_safetensors(tensors, metadata=metadata_strings(result.metadata))


def json_too_big(size: str, max_bytes: int) -> ServerError:
    return ServerError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"the JSON answer would be {size} bytes, over the limit of {max_bytes} bytes: ask for the binary "
        f"form with 'Accept: {SAFETENSORS_MEDIA_TYPE}' (float16, about 6x smaller), or for fewer outputs",
    )


def check_json_room(values: int, max_bytes: int) -> None:
    """413 when a JSON answer of `values` numbers cannot fit in `max_bytes` (each number takes at
    least two characters, "0,"): checked before inference, so no model time goes to it."""
    if 2 * values > max_bytes:
        raise json_too_big(f"at least {2 * values}", max_bytes)


def encode_json(result: Result, max_bytes: int) -> bytes:
    check_json_room(sum(int(v.size) for v in result.tensors.values()), max_bytes)
    data = orjson.dumps(
        {**result.tensors, METADATA_KEY: result.metadata},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    if len(data) > max_bytes:
        raise json_too_big(str(len(data)), max_bytes)
    return data


def encode_result(result: Result, binary: bool, max_json_bytes: int) -> tuple[bytes, str]:
    if binary:
        return encode_safetensors(result), SAFETENSORS_MEDIA_TYPE
    return encode_json(result, max_json_bytes), JSON_MEDIA_TYPE
