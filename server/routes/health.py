"""GET /health/live (the process answers) and GET /health/ready (every model loaded and warmed, and
not draining; 503 otherwise). Neither needs the API key; both answer HEAD too (probes that only
look at the status)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from cotap.server.routes.common import server_state

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="The process is up")
async def live() -> dict[str, Any]:
    return {"status": "live"}


@router.head("/health/live", include_in_schema=False)
async def live_head() -> dict[str, Any]:
    return await live()


@router.get("/health/ready", summary="Models loaded and warmed; 503 while starting or draining")
async def ready(request: Request) -> JSONResponse:
    state = server_state(request)
    if state.ready:
        return JSONResponse({"status": "ready", "models": list(state.models)})
    if state.draining:
        status = "draining"
    elif state.load_error:
        status = "failed"
    else:
        status = "starting"
    body: dict[str, Any] = {"status": status}
    if state.load_error:
        body["error"] = state.load_error
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(state.settings.retry_after_s)})


@router.head("/health/ready", include_in_schema=False)
async def ready_head(request: Request) -> JSONResponse:
    return await ready(request)
