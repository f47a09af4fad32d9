"""Typed exceptions for the server's error envelope `{"error": {"code", "message", "request_id"}}`.

Every failure the SDK raises is a `CotapError`, so `except CotapError` catches them all; the
subclasses name the wire codes of `cotap.core.wire.ErrorCode` (and the client-side failures:
timeouts, an unreachable server) so that callers can tell "fix the input" from "try again later".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from cotap.core.wire import REQUEST_ID_HEADER, ErrorCode


class CotapError(Exception):
    """Any failure of a cotap request.

    `code`: the envelope's error code (or a client-side one: `timeout`, `unreachable`);
    `status`: the HTTP status (None when no answer came); `request_id`: the server's id of the
    request, to quote when asking for help; `item`: the index (within your call) of the image or
    pair that caused it, when the server named one.
    """

    code: str = "error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        item: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.status = status
        self.request_id = request_id
        self.item = item

    def __str__(self) -> str:
        where = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.code}: {self.message}{where}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "status": self.status,
            "message": self.message,
            "request_id": self.request_id,
            "item": self.item,
        }


class BadImage(CotapError):
    """400: an image the server cannot decode (or that is too small)."""

    code = ErrorCode.BAD_IMAGE.value


class PayloadTooLarge(CotapError):
    """413: the request body, or the number of images in it, is over the server's limit."""

    code = ErrorCode.PAYLOAD_TOO_LARGE.value


class ImageTooLarge(PayloadTooLarge):
    """413: one image declares more pixels (or bytes) than the server accepts."""

    code = ErrorCode.IMAGE_TOO_LARGE.value


class UnsupportedMediaType(CotapError):
    """415: an image format other than JPEG, PNG or WebP (the SDK converts others itself)."""

    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE.value


class InvalidParameters(CotapError):
    """422: an option the server refuses (its message names it)."""

    code = ErrorCode.INVALID_PARAMETERS.value


class Unauthorized(CotapError):
    """401: missing or wrong API key (`api_key=` or COTAP_API_KEY)."""

    code = ErrorCode.UNAUTHORIZED.value


class NotFound(CotapError):
    """404: no such route (is the URL that of a cotap server?)."""

    code = ErrorCode.NOT_FOUND.value


class ModelNotFound(NotFound):
    """404: no served model of that name (`Client.models()` lists them)."""

    code = ErrorCode.MODEL_NOT_FOUND.value


class QueueFull(CotapError):
    """429: the server's queue stayed full through every retry."""

    code = ErrorCode.QUEUE_FULL.value


class NotReady(CotapError):
    """503: the server is starting, failed to load its models, or is draining."""

    code = ErrorCode.NOT_READY.value


class DeadlineExceeded(CotapError):
    """504: the server gave up on the request after its deadline."""

    code = ErrorCode.DEADLINE_EXCEEDED.value


class RequestTimeout(CotapError):
    """408: the request body reached the server too slowly (its `body_timeout_s`)."""

    code = ErrorCode.REQUEST_TIMEOUT.value


class ServerError(CotapError):
    """500 (or any other unexpected status): a fault on the server's side."""

    code = ErrorCode.INTERNAL.value


class Timeout(CotapError):
    """No answer within the client's timeout."""

    code = "timeout"


class Unreachable(CotapError):
    """The server could not be reached (refused, reset, DNS), through every retry."""

    code = "unreachable"


_BY_CODE: dict[str, type[CotapError]] = {
    cls.code: cls
    for cls in (
        BadImage,
        PayloadTooLarge,
        ImageTooLarge,
        UnsupportedMediaType,
        InvalidParameters,
        Unauthorized,
        NotFound,
        ModelNotFound,
        QueueFull,
        NotReady,
        DeadlineExceeded,
        RequestTimeout,
        ServerError,
    )
}
_BY_STATUS: dict[int, type[CotapError]] = {
    400: BadImage,
    401: Unauthorized,
    404: NotFound,
    408: RequestTimeout,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidParameters,
    429: QueueFull,
    503: NotReady,
    504: DeadlineExceeded,
}
# The server prefixes image errors with the image's place in the request: "image 3: ..." or
# "pair 1 target: ..."; the SDK rewrites that number to the place in the caller's call.
_ITEM = re.compile(r"^(image|pair) (\d+)\b")

# Errors caused by one image: the rest of a batch is worth sending without it.
PER_IMAGE_ERRORS: tuple[type[CotapError], ...] = (BadImage, ImageTooLarge, UnsupportedMediaType)


def error_from_response(
    status: int, body: bytes, headers: Mapping[str, str], *, item_offset: int = 0
) -> CotapError:
    """The typed exception for an error answer (the envelope when there is one, else the status)."""
    code = message = request_id = None
    try:
        doc = json.loads(body)
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict):
            code, message, request_id = err.get("code"), err.get("message"), err.get("request_id")
    except ValueError:
        pass
    request_id = request_id or headers.get(REQUEST_ID_HEADER)
    if message is None:
        text = body[:300].decode("utf-8", "replace").strip()
        message = f"HTTP {status}" + (f": {text}" if text else "")
    cls = _BY_CODE.get(str(code)) if code else None
    if cls is None:
        cls = _BY_STATUS.get(status, ServerError)
    item = None
    message = str(message)
    m = _ITEM.match(message)
    if m:  # the server counts within its request; the caller's call may have been split
        item = item_offset + int(m.group(2))
        message = f"{m.group(1)} {item}{message[m.end() :]}"
    return cls(message, code=str(code) if code else None, status=status, request_id=request_id, item=item)
