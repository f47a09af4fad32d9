"""POST /v1/embed: patch embeddings (N, h, w, C) and image embeddings `cls` (N, C)."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from cotap.core.wire import CLS, PATCH
from cotap.server import tasks
from cotap.server.options import EmbedOptions
from cotap.server.registry import ServedModel
from cotap.server.routes.common import Plan, grids_metadata, openapi_body, patch_counts, run_inference

router = APIRouter(tags=["inference"])


def input_metadata(
    model: ServedModel, pixels: list[np.ndarray], originals: list[tuple[int, int]]
) -> dict[str, Any]:
    sizes = [(int(p.shape[1]), int(p.shape[2])) for p in pixels]
    return {
        "items": len(pixels),
        "original_sizes": [list(o) for o in originals],
        "input_sizes": [list(s) for s in sizes],
        "patch_size": model.bundle.config.patch_size,
        "stacked": len(set(sizes)) == 1,
        **grids_metadata("", sizes, model.bundle.config.patch_size),
    }


def _plan(
    model: ServedModel,
    opts: EmbedOptions,
    pixels: list[np.ndarray],
    originals: list[tuple[int, int]],
    dtype: str,
) -> Plan:
    meta = input_metadata(model, pixels, originals) | {"normalized": opts.normalize, "outputs": opts.outputs}
    dim = model.bundle.config.embed_dim
    per_patch = dim if PATCH in opts.outputs else 0
    values = sum(
        per_patch * n + (dim if CLS in opts.outputs else 0)
        for n in patch_counts(pixels, model.bundle.config.patch_size)
    )
    return Plan(tasks.embed(opts.outputs, opts.normalize, dtype), meta, values)


@router.post(
    "/v1/embed",
    summary="Patch embeddings and cls embeddings of one or more images",
    response_class=Response,
    openapi_extra=openapi_body("images"),
)
async def embed(request: Request, query: Annotated[EmbedOptions, Query()]) -> Response:
    return await run_inference(
        request, route="embed", kind="images", options_cls=EmbedOptions, query=query, plan=_plan
    )
