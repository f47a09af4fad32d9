"""`create_app(settings)`: the FastAPI application serving bundles over HTTP (DESIGN.md "HTTP API").

The lifespan starts the inference workers and loads, verifies and warms every model in the
background; /health/ready turns 200 only when that is done, and 503 again while draining.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Route

from cotap.core.version import __version__
from cotap.core.wire import BUNDLE_HASH_HEADER, MODEL_HEADER, REQUEST_ID_HEADER, TIMING_HEADERS, ErrorCode
from cotap.server.errors import document_errors, error_response, install_error_handlers
from cotap.server.middleware import RequestContextMiddleware
from cotap.server.registry import BackendHook
from cotap.server.routes import ROUTERS
from cotap.server.settings import Settings
from cotap.server.state import ServerState

DESCRIPTION = """Dense CoTAP image features over HTTP: patch embeddings, prototype assignments and
patch correspondences, batched dynamically. Send images as multipart parts (`image`, or
`source`/`target`) or base64 JSON; ask for `Accept: application/x-safetensors` for compact binary
answers (float16 by default). Errors: `{"error": {"code", "message", "request_id"}}`."""


def create_app(settings: Settings | None = None, *, backend_hook: BackendHook | None = None) -> FastAPI:
    """The app for `settings` (default: from `COTAP_*` environment variables).

    `backend_hook` receives each backend after it is built and returns the one to serve; it exists
    for wrappers (instrumentation, fault injection in tests) and defaults to none.
    """
    settings = settings or Settings()
    state = ServerState(settings, backend_hook)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(
        title="cotap",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/openapi.json",
        redoc_url=None,
    )
    app.state.cotap = state
    _complete_openapi(app, bearer=settings.api_key is not None)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    routes = [(r.path_regex, r.path) for router in ROUTERS for r in router.routes if isinstance(r, Route)]
    app.add_middleware(RequestContextMiddleware, state=state, routes=routes)
    if settings.cors_origins:
        app.add_middleware(
            EnvelopeCORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept", REQUEST_ID_HEADER],
            expose_headers=[
                REQUEST_ID_HEADER,
                MODEL_HEADER,
                BUNDLE_HASH_HEADER,
                *TIMING_HEADERS.values(),
                "Retry-After",  # not CORS-safelisted: pages could not see when to retry a 429/503
            ],
        )
    return app


class EnvelopeCORSMiddleware(CORSMiddleware):
    """Starlette's CORS handling, with a refused preflight answered in the error envelope rather
    than as plain text. It is the outermost layer (so that 401s carry CORS headers): a refused
    preflight gets a request id of its own here, and is neither logged nor counted."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        reason = bytes(response.body).decode(errors="replace")
        request_id = uuid.uuid4().hex
        headers = {k: v for k, v in response.headers.items() if k.startswith("access-control-")}
        return error_response(
            ErrorCode.INVALID_PARAMETERS,
            f"CORS preflight refused: {reason}",
            request_id,
            status=response.status_code,
            headers={**headers, REQUEST_ID_HEADER: request_id},
        )


def _complete_openapi(app: FastAPI, bearer: bool) -> None:
    """`app.openapi()` with what FastAPI cannot infer: the error statuses and their envelope
    (`document_errors`) and, with an API key, the bearer scheme, so that /docs offers an Authorize
    button (the middleware checks the key, not FastAPI)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()  # cached by FastAPI in app.openapi_schema; completed here in place
            document_errors(schema)
            if bearer:
                schemes = schema["components"].setdefault("securitySchemes", {})
                schemes["bearer"] = {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the server's API key",
                }
                schema["security"] = [{"bearer": []}]
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
