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

from cotap.core.wire import ERROR_MEDIA_TYPE, ErrorCode


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
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.INVALID_PARAMETERS)
        if exc.status_code >= 500:
            code = ErrorCode.INTERNAL
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return _respond(request, code, message, status=exc.status_code, headers=exc.headers)

    app.add_exception_handler(ServerError, server_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
