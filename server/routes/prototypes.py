"""POST /v1/prototypes: per-patch prototype ids (argmax of the filter's assignment) and
probabilities, all M or the top k."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from cotap.core.wire import ErrorCode
from cotap.server import tasks
from cotap.server.errors import ServerError
from cotap.server.options import PrototypeOptions
from cotap.server.registry import ServedModel
from cotap.server.routes.common import Plan, openapi_body, patch_counts, run_inference
from cotap.server.routes.embed import input_metadata

router = APIRouter(tags=["inference"])


def _plan(
    model: ServedModel,
    opts: PrototypeOptions,
    pixels: list[np.ndarray],
    originals: list[tuple[int, int]],
    dtype: str,
) -> Plan:
    m = model.bundle.config.num_prototypes
    if opts.top_k is not None and opts.top_k > m:
        raise ServerError(
            ErrorCode.INVALID_PARAMETERS, f"top_k={opts.top_k} but model {model.name!r} has {m} prototypes"
        )
    meta = input_metadata(model, pixels, originals) | {
        "num_prototypes": m,
        "top_k": opts.top_k,
        "prototypes_initialized": model.bundle.config.prototypes_initialized,
    }
    per_patch = 1 + (m if opts.top_k is None else 2 * opts.top_k)  # id, then probabilities (+ ids)
    values = per_patch * sum(patch_counts(pixels, model.bundle.config.patch_size))
    return Plan(tasks.prototypes(opts.top_k, dtype), meta, values)


@router.post(
    "/v1/prototypes",
    summary="Per-patch prototype ids and probabilities",
    response_class=Response,
    openapi_extra=openapi_body("images"),
)
async def prototypes(request: Request, query: Annotated[PrototypeOptions, Query()]) -> Response:
    return await run_inference(
        request, route="prototypes", kind="images", options_cls=PrototypeOptions, query=query, plan=_plan
    )
