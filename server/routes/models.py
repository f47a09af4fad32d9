"""GET /v1/models: the served models (sizes, patch size, input sizes, backend, device, precision,
bundle hash) and the server's limits."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from cotap.core.version import __version__
from cotap.server.routes.common import server_state

router = APIRouter(tags=["models"])


@router.get("/v1/models", summary="Served models and server limits")
async def models(request: Request) -> dict[str, Any]:
    state = server_state(request)
    state.check_admitting()
    return {
        "version": __version__,
        "default": state.default_model,
        "models": [m.describe() for m in state.models.values()],
        "limits": state.settings.limits(),
    }
