"""Names that cross the wire: output tensor names, media types, error codes and their HTTP statuses.

Server and client both read these, so that a rename cannot drift between the two sides.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Final

# Model outputs (DESIGN.md, "The model contract").
PATCH: Final = "patch"  # (N, h, w, C); Final: typed as the literal, like the options that name it
CLS: Final = "cls"  # (N, C)
ASSIGN = "assign"  # (N, h, w, M), model-level name

# /v1/prototypes
PROTOTYPE_ID = "prototype_id"  # (N, h, w) int
PROTOTYPE_PROB = "prototype_prob"  # (N, h, w, k) or (N, h, w, M)
PROTOTYPE_TOPK_ID = "prototype_topk_id"  # (N, h, w, k) when top-k is asked for

# /v1/correspond
MATCH = "match"  # (N, h, w) flat index into the target grid
SCORE = "score"  # (N, h, w)
MUTUAL = "mutual"  # (N, h, w) bool
MATCH_TOPK = "match_topk"  # (N, h, w, k)
SCORE_TOPK = "score_topk"  # (N, h, w, k)
SIMILARITY = "similarity"  # (N, h*w, h'*w') dense, under a size cap

SAFETENSORS_MEDIA_TYPE = "application/x-safetensors"
JSON_MEDIA_TYPE = "application/json"
ERROR_MEDIA_TYPE = "application/json"

# Response headers
REQUEST_ID_HEADER = "x-request-id"
TIMING_HEADERS = {
    "queue": "x-queue-time-ms",
    "decode": "x-decode-time-ms",
    "inference": "x-inference-time-ms",
    "total": "x-total-time-ms",
}
BUNDLE_HASH_HEADER = "x-bundle-sha256"
MODEL_HEADER = "x-model"


class ErrorCode(StrEnum):
    """Error codes of the envelope `{"error": {"code", "message", "request_id"}}` and their statuses."""

    BAD_IMAGE = "bad_image"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    IMAGE_TOO_LARGE = "image_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_PARAMETERS = "invalid_parameters"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    MODEL_NOT_FOUND = "model_not_found"
    QUEUE_FULL = "queue_full"
    NOT_READY = "not_ready"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    REQUEST_TIMEOUT = "request_timeout"
    INTERNAL = "internal"

    @property
    def status(self) -> int:
        return _STATUS[self]


_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_IMAGE: 400,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.IMAGE_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.INVALID_PARAMETERS: 422,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.QUEUE_FULL: 429,
    ErrorCode.NOT_READY: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.REQUEST_TIMEOUT: 408,
    ErrorCode.INTERNAL: 500,
}


def metadata_strings(values: dict[str, Any]) -> dict[str, str]:
    """safetensors `__metadata__` (str -> str) as both sides write it: strings as they are, anything
    else compact JSON, so that a reader gets the same values back."""
    return {k: v if isinstance(v, str) else json.dumps(v, separators=(",", ":")) for k, v in values.items()}
