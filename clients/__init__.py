"""cotap.client: the Python SDK of the cotap server (needs no torch).

    from cotap.client import Client
    with Client("http://127.0.0.1:8000") as client:
        e = client.embed("photo.jpg")            # e.patch (h, w, C), e.cls (C,), e.bundle_sha256
        p = client.prototypes("photo.jpg")       # p.ids (h, w), p.probs (h, w, M)
        c = client.correspond("a.jpg", "b.jpg")  # c.match, c.score, c.mutual (h, w); c.matches()
        client.embed_folder("photos/", "features/")

See docs/client.md.
"""

from __future__ import annotations

from cotap.client.async_client import AsyncClient
from cotap.client.client import Client
from cotap.client.errors import (
    BadImage,
    CotapError,
    DeadlineExceeded,
    ImageTooLarge,
    InvalidParameters,
    ModelNotFound,
    NotFound,
    NotReady,
    PayloadTooLarge,
    QueueFull,
    RequestTimeout,
    ServerError,
    Timeout,
    Unauthorized,
    Unreachable,
    UnsupportedMediaType,
)
from cotap.client.folder import Failure, FolderInterrupted, FolderReport, embed_folder
from cotap.client.info import Health, ModelInfo, ServerInfo, ServerLimits
from cotap.client.results import (
    Batch,
    Correspondence,
    CorrespondenceBatch,
    EmbedBatch,
    Embedding,
    Matches,
    Prototypes,
    PrototypesBatch,
    patch_centers,
)
from cotap.client.retry import RetryPolicy
from cotap.client.store import read_features

__all__ = [
    "AsyncClient",
    "BadImage",
    "Batch",
    "Client",
    "Correspondence",
    "CorrespondenceBatch",
    "CotapError",
    "DeadlineExceeded",
    "EmbedBatch",
    "Embedding",
    "Failure",
    "FolderInterrupted",
    "FolderReport",
    "Health",
    "ImageTooLarge",
    "InvalidParameters",
    "Matches",
    "ModelInfo",
    "ModelNotFound",
    "NotFound",
    "NotReady",
    "PayloadTooLarge",
    "Prototypes",
    "PrototypesBatch",
    "QueueFull",
    "RequestTimeout",
    "RetryPolicy",
    "ServerError",
    "ServerInfo",
    "ServerLimits",
    "Timeout",
    "Unauthorized",
    "Unreachable",
    "UnsupportedMediaType",
    "embed_folder",
    "patch_centers",
    "read_features",
]
