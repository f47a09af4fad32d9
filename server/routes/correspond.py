"""POST /v1/correspond: for every patch of each source image its best match in the paired target
(flat index into the target grid), the cosine score, and whether the match is mutual; optionally
the top k matches and the dense similarity (under a size cap)."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from cotap.core.wire import ErrorCode
from cotap.server import tasks
from cotap.server.errors import ServerError
from cotap.server.options import CorrespondOptions
from cotap.server.registry import ServedModel
from cotap.server.routes.common import (
    InferencePlan,
    Plan,
    grids_metadata,
    openapi_body,
    patch_counts,
    run_inference,
    server_state,
)

router = APIRouter(tags=["inference"])


def _plan_with_cap(max_dense: int) -> InferencePlan:
    def plan(
        model: ServedModel,
        opts: CorrespondOptions,
        pixels: list[np.ndarray],
        originals: list[tuple[int, int]],
        dtype: str,
    ) -> Plan:
        p = model.bundle.config.patch_size
        sizes = [(int(x.shape[1]), int(x.shape[2])) for x in pixels]
        src, tgt = sizes[0::2], sizes[1::2]
        patches = patch_counts(pixels[0::2], p), patch_counts(pixels[1::2], p)
        fewest = min(patches[1])
        if opts.top_k > fewest:
            raise ServerError(
                ErrorCode.INVALID_PARAMETERS,
                f"top_k={opts.top_k} but a target image has only {fewest} patches",
            )
        dense_values = sum(a * b for a, b in zip(*patches, strict=True)) if opts.dense else 0
        if dense_values > max_dense:
            raise ServerError(
                ErrorCode.INVALID_PARAMETERS,
                f"the dense similarity would hold {dense_values} values; the limit is {max_dense} "
                "(max_dense_elements): send fewer or smaller pairs, or use top_k instead",
            )
        meta = {
            "pairs": len(src),
            "original_sizes": [
                [list(a), list(b)] for a, b in zip(originals[0::2], originals[1::2], strict=True)
            ],
            "input_sizes": [[list(a), list(b)] for a, b in zip(src, tgt, strict=True)],
            "patch_size": p,
            "top_k": opts.top_k,
            "mutual_only": opts.mutual_only,
            "dense": opts.dense,
            "stacked": len(set(src)) == 1 and len(set(tgt)) == 1,
            **grids_metadata("source_", src, p),
            **grids_metadata("target_", tgt, p),
        }
        per_patch = 3 + (2 * opts.top_k if opts.top_k > 1 else 0)  # match, score, mutual (+ top k)
        values = per_patch * sum(patches[0]) + dense_values
        return Plan(tasks.correspond(opts.top_k, opts.mutual_only, opts.dense, dtype), meta, values)

    return plan


@router.post(
    "/v1/correspond",
    summary="Patch correspondences between image pairs",
    response_class=Response,
    openapi_extra=openapi_body("pairs"),
)
async def correspond(request: Request, query: Annotated[CorrespondOptions, Query()]) -> Response:
    cap = server_state(request).settings.max_dense_elements
    return await run_inference(
        request,
        route="correspond",
        kind="pairs",
        options_cls=CorrespondOptions,
        query=query,
        plan=_plan_with_cap(cap),
    )
