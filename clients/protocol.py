"""The wire side of the SDK, shared by `Client` and `AsyncClient`: request parts and query options
out, safetensors answers in (decoded with `safetensors.numpy.load`, metadata read from the header),
split into one result per image or pair.

Answer layout (DESIGN.md "HTTP API"): items that share a grid are stacked along a first axis N
(`patch` (N, h, w, C)); otherwise each has its own tensors `patch.0`, `patch.1`, ... without it.
`cls` is always stacked. Metadata values are strings; the non-string ones are JSON-encoded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors

from cotap.client.errors import ServerError
from cotap.client.inputs import EncodedImage
from cotap.client.results import Correspondence, Embedding, Prototypes, Size
from cotap.core.wire import (
    BUNDLE_HASH_HEADER,
    CLS,
    MATCH,
    MATCH_TOPK,
    MODEL_HEADER,
    MUTUAL,
    PATCH,
    PROTOTYPE_ID,
    PROTOTYPE_PROB,
    PROTOTYPE_TOPK_ID,
    REQUEST_ID_HEADER,
    SAFETENSORS_MEDIA_TYPE,
    SCORE,
    SCORE_TOPK,
    SIMILARITY,
)

EMBED, PROTOTYPES, CORRESPOND = "/v1/embed", "/v1/prototypes", "/v1/correspond"
MODELS, LIVE, READY = "/v1/models", "/health/live", "/health/ready"
ACCEPT = {"Accept": SAFETENSORS_MEDIA_TYPE}
_STRING_METADATA = frozenset({"model", "bundle_sha256", "route", "dtype"})

Files = list[tuple[str, tuple[str, bytes, str]]]


def query(**options: Any) -> dict[str, str]:
    """Options as query parameters: None dropped, booleans as true/false, lists comma-joined."""
    out: dict[str, str] = {}
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, list | tuple):
            out[key] = ",".join(str(v) for v in value)
        else:
            out[key] = str(value)
    return out


def _part(field: str, index: int, image: EncodedImage) -> tuple[str, tuple[str, bytes, str]]:
    # Short part names keep the body size predictable (chunking.PART_OVERHEAD); the server does
    # not use them.
    ext = image.media_type.rsplit("/", 1)[-1]
    return field, (f"{index}.{ext}", image.data, image.media_type)


def image_files(images: Sequence[EncodedImage]) -> Files:
    """Repeated `image` parts."""
    return [_part("image", i, im) for i, im in enumerate(images)]


def pair_files(pairs: Sequence[tuple[EncodedImage, EncodedImage]]) -> Files:
    """`source` and `target` parts, paired in order."""
    files: Files = []
    for i, (source, target) in enumerate(pairs):
        files += [_part("source", i, source), _part("target", i, target)]
    return files


@dataclass
class Decoded:
    """A decoded answer: named tensors, metadata, and who produced it."""

    tensors: dict[str, np.ndarray]
    metadata: dict[str, Any]
    model: str
    bundle_sha256: str
    request_id: str | None


def read_metadata(body: bytes) -> dict[str, Any]:
    """The `__metadata__` of a safetensors body, JSON values decoded."""
    if len(body) < 8:
        raise ValueError("body is shorter than a safetensors header")
    n = int.from_bytes(body[:8], "little")
    if n > len(body) - 8:
        raise ValueError("safetensors header length runs past the body")
    raw = json.loads(body[8 : 8 + n]).get("__metadata__") or {}
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _STRING_METADATA:
            meta[key] = value
            continue
        try:
            meta[key] = json.loads(value)
        except (TypeError, ValueError):
            meta[key] = value
    return meta


def decode(body: bytes, headers: Mapping[str, str]) -> Decoded:
    """A safetensors answer as tensors and metadata."""
    ctype = headers.get("content-type", "")
    request_id = headers.get(REQUEST_ID_HEADER)
    if not ctype.startswith(SAFETENSORS_MEDIA_TYPE):
        raise ServerError(
            f"expected a {SAFETENSORS_MEDIA_TYPE} answer, got {ctype or 'no content type'!r}",
            request_id=request_id,
        )
    try:
        tensors = load_safetensors(body)
        meta = read_metadata(body)
    except Exception as e:
        raise ServerError(f"undecodable safetensors answer: {e}", request_id=request_id) from e
    return Decoded(
        tensors=tensors,
        metadata=meta,
        model=str(meta.get("model") or headers.get(MODEL_HEADER, "")),
        bundle_sha256=str(meta.get("bundle_sha256") or headers.get(BUNDLE_HASH_HEADER, "")),
        request_id=request_id,
    )


def item_tensor(tensors: Mapping[str, np.ndarray], name: str, i: int) -> np.ndarray | None:
    """Item i of output `name`: a row of the stacked tensor, or its own `name.i`."""
    if name in tensors:
        return tensors[name][i]
    return tensors.get(f"{name}.{i}")


def _size(value: Any) -> Size:
    return int(value[0]), int(value[1])


def _grid(meta: Mapping[str, Any], prefix: str, i: int) -> Size:
    if f"{prefix}grid" in meta:
        return _size(meta[f"{prefix}grid"])
    return _size(meta[f"{prefix}grids"][i])


def _check_count(dec: Decoded, key: str, n: int) -> None:
    got = dec.metadata.get(key)
    if got is not None and int(got) != n:
        raise ServerError(f"sent {n} items but the answer holds {got}", request_id=dec.request_id)


def embeddings(dec: Decoded, n: int) -> list[Embedding]:
    _check_count(dec, "items", n)
    meta = dec.metadata
    return [
        Embedding(
            patch=item_tensor(dec.tensors, PATCH, i),
            cls=item_tensor(dec.tensors, CLS, i),
            grid=_grid(meta, "", i),
            input_size=_size(meta["input_sizes"][i]),
            original_size=_size(meta["original_sizes"][i]),
            model=dec.model,
            bundle_sha256=dec.bundle_sha256,
            normalized=bool(meta.get("normalized", False)),
            request_id=dec.request_id,
        )
        for i in range(n)
    ]


def prototypes(dec: Decoded, n: int) -> list[Prototypes]:
    _check_count(dec, "items", n)
    meta = dec.metadata
    out = []
    for i in range(n):
        ids = item_tensor(dec.tensors, PROTOTYPE_ID, i)
        if ids is None:
            raise ServerError(f"the answer has no {PROTOTYPE_ID} for item {i}", request_id=dec.request_id)
        out.append(
            Prototypes(
                ids=ids,
                probs=item_tensor(dec.tensors, PROTOTYPE_PROB, i),
                topk_ids=item_tensor(dec.tensors, PROTOTYPE_TOPK_ID, i),
                num_prototypes=int(meta.get("num_prototypes", 0)),
                grid=_grid(meta, "", i),
                input_size=_size(meta["input_sizes"][i]),
                original_size=_size(meta["original_sizes"][i]),
                model=dec.model,
                bundle_sha256=dec.bundle_sha256,
                request_id=dec.request_id,
            )
        )
    return out


def correspondences(dec: Decoded, n: int) -> list[Correspondence]:
    _check_count(dec, "pairs", n)
    meta = dec.metadata
    out = []
    for i in range(n):
        match = item_tensor(dec.tensors, MATCH, i)
        score = item_tensor(dec.tensors, SCORE, i)
        mutual = item_tensor(dec.tensors, MUTUAL, i)
        if match is None or score is None or mutual is None:
            raise ServerError(f"the answer lacks match/score/mutual for pair {i}", request_id=dec.request_id)
        originals = meta["original_sizes"][i]
        out.append(
            Correspondence(
                match=match,
                score=score,
                mutual=mutual,
                source_grid=_grid(meta, "source_", i),
                target_grid=_grid(meta, "target_", i),
                source_size=_size(originals[0]),
                target_size=_size(originals[1]),
                model=dec.model,
                bundle_sha256=dec.bundle_sha256,
                match_topk=item_tensor(dec.tensors, MATCH_TOPK, i),
                score_topk=item_tensor(dec.tensors, SCORE_TOPK, i),
                similarity=item_tensor(dec.tensors, SIMILARITY, i),
                request_id=dec.request_id,
            )
        )
    return out
