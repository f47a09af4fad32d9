"""POST /v1/embed: patch embeddings (N, h, w, C) and image embeddings `cls` (N, C)."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from cotap.server import tasks
from cotap.server.options import EmbedOptions
from cotap.server.registry import ServedModel
from cotap.server.routes.common import grids_metadata, openapi_body, run_inference
from cotap.server.scheduler import Finish

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
) -> tuple[Finish, dict[str, Any]]:
    meta = input_metadata(model, pixels, originals) | {"normalized": opts.normalize, "outputs": opts.outputs}
    return tasks.embed(opts.outputs, opts.normalize, dtype), meta


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
