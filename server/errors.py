"""The one error envelope, `{"error": {"code", "message", "request_id"}}`, and the exception that
carries it from anywhere in the server to the client with the status `ErrorCode` fixes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from cotap.core.wire import ERROR_MEDIA_TYPE, JSON_MEDIA_TYPE, ErrorCode


class ServerError(Exception):
    """A request that fails with a known code; its status comes from the code (or `status`)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.status = status or code.status


def envelope_bytes(code: ErrorCode, message: str, request_id: str | None) -> bytes:
    return orjson.dumps({"error": {"code": code.value, "message": message, "request_id": request_id}})


def error_response(
    code: ErrorCode,
    message: str,
    request_id: str | None,
    *,
    status: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    return Response(
        envelope_bytes(code, message, request_id),
        status_code=status or code.status,
        media_type=ERROR_MEDIA_TYPE,
        headers=dict(headers or {}),
    )


def request_id_of(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


def _respond(request: Request, code: ErrorCode, message: str, **kw: Any) -> Response:
    request.scope.setdefault("state", {})["error_code"] = code.value
    return error_response(code, message, request_id_of(request), **kw)


_HTTP_CODES = {
    400: ErrorCode.BAD_IMAGE,
    401: ErrorCode.UNAUTHORIZED,
    404: ErrorCode.NOT_FOUND,
    408: ErrorCode.REQUEST_TIMEOUT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.INVALID_PARAMETERS,
    429: ErrorCode.QUEUE_FULL,
    503: ErrorCode.NOT_READY,
    504: ErrorCode.DEADLINE_EXCEEDED,
}


def validation_message(errors: list[Any]) -> str:
    """Pydantic/FastAPI errors -> one line such as `query.top_k: Input should be >= 1`."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def install_error_handlers(app: FastAPI) -> None:
    """Map our errors, FastAPI's validation errors and Starlette's HTTP errors into the envelope."""

    async def server_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServerError)
        return _respond(request, exc.code, exc.message, status=exc.status, headers=exc.headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return _respond(request, ErrorCode.INVALID_PARAMETERS, validation_message(list(exc.errors())))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        fallback = ErrorCode.INTERNAL if exc.status_code >= 500 else ErrorCode.INVALID_PARAMETERS
        code = _HTTP_CODES.get(exc.status_code, fallback)  # 503 not_ready, 504 deadline_exceeded
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return _respond(request, code, message, status=exc.status_code, headers=exc.headers)

    app.add_exception_handler(ServerError, server_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


# -- the errors in the OpenAPI description -----------------------------------------------------------
# Without this, FastAPI documents only 200 and its own 422 `{"detail": [...]}`, so schema-driven
# clients and fuzzers (schemathesis) see neither the envelope nor the statuses the routes answer.
_ENVELOPE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "request_id"],
            "properties": {
                "code": {"type": "string", "enum": [c.value for c in ErrorCode]},
                "message": {"type": "string"},
                "request_id": {"type": ["string", "null"]},
            },
        }
    },
}
_WHEN = {
    400: "an image cannot be decoded, or bad base64 (bad_image)",
    401: "API key set and missing or wrong (unauthorized)",
    404: "unknown model= (model_not_found)",
    408: "the request body did not arrive within body_timeout_s (request_timeout)",
    413: "body, images, parts or JSON answer over a limit (payload_too_large), image over max_pixels "
    "(image_too_large)",
    415: "body neither multipart nor JSON, or image not JPEG/PNG/WebP (unsupported_media_type)",
    422: "bad or unknown option, malformed body, no images (invalid_parameters)",
    429: "the queue cannot take the request's images now, or max_uploads bodies are being received "
    "(queue_full); see Retry-After",
    500: "the backend failed on this request's batch (internal)",
    503: "models loading or failed, or draining (not_ready); see Retry-After",
    504: "no answer within deadline_ms (deadline_exceeded)",
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
_INFERENCE_ERRORS = (400, 401, 404, 408, 413, 415, 422, 429, 500, 503, 504)
_ROUTE_ERRORS = {"/v1/models": (401, 500, 503), "/metrics": (401, 500)}
_JSON_ANSWER = {  # named tensors as nested lists, plus "__metadata__"
    "type": "object",
    "properties": {"__metadata__": {"type": "object"}},
    "additionalProperties": {"type": "array"},
}


def _error_response(status: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": _WHEN[status],
        "content": {ERROR_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}},
    }
    if status in (429, 503):
        out["headers"] = _RETRY_AFTER
    return out


def document_errors(schema: dict[str, Any]) -> None:
    """Complete FastAPI's OpenAPI `schema` in place: every route's error statuses with the envelope
    schema, the JSON answer of the inference routes, /metrics as text, /health/ready's 503."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorEnvelope"] = _ENVELOPE_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            if path.startswith("/v1/") and method == "post":
                statuses: tuple[int, ...] = _INFERENCE_ERRORS
                ok = responses.setdefault("200", {"description": "named tensors"})
                ok.setdefault("content", {})[JSON_MEDIA_TYPE] = {"schema": _JSON_ANSWER}
            else:
                statuses = _ROUTE_ERRORS.get(path, ())
            responses.pop("422", None)
            for status in statuses:
                responses[str(status)] = _error_response(status)
    scrape = schema.get("paths", {}).get("/metrics", {}).get("get")
    if scrape is not None:
        scrape["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    ready = schema.get("paths", {}).get("/health/ready", {}).get("get")
    if ready is not None:
        ready["responses"]["503"] = {
            "description": "starting, failed or draining",
            "headers": _RETRY_AFTER,
            "content": {
                JSON_MEDIA_TYPE: {
                    "schema": {
                        "type": "object",
                        "required": ["status"],
                        "properties": {"status": {"type": "string"}, "error": {"type": "string"}},
                    }
                }
            },
        }
