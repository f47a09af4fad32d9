"""What a server says about itself: `GET /v1/models` (served models and limits) and the health
probes, as typed objects. Unknown fields are kept in `raw`, so a newer server never breaks an
older SDK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cotap.core.preprocess import PreprocessConfig

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """The limits that shape requests (defaults: the server's own defaults, used when a server
    does not report them)."""

    max_body_bytes: int = 32 * MiB
    max_images_per_request: int = 64
    max_parts: int = 130
    max_pixels: int = 40_000_000
    min_side: int = 16
    max_queue: int = 256
    max_batch: int = 32
    max_dense_elements: int = 4 * MiB
    max_json_bytes: int = 16 * MiB
    deadline_ms: int = 30_000
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServerLimits:
        known = {k: int(v) for k, v in d.items() if k in cls.__dataclass_fields__ and k != "raw"}
        return cls(**known, raw=dict(d))

    @property
    def images_per_request(self) -> int:
        """The most images one request may carry: also never more than the queue holds (a bigger
        request would be refused with 429 however long it waited)."""
        return max(1, min(self.max_images_per_request, self.max_queue, self.max_parts))

    def requests_in_flight(self, wanted: int, images_per_request: int) -> int:
        """How many requests of `images_per_request` images may be in flight together: `wanted`,
        but never more images than the server's queue holds (`max_queue`), so that one caller
        never fills the queue on its own (the rest would only be refused with 429). At least 1."""
        return max(1, min(wanted, self.max_queue // max(1, images_per_request)))


@dataclass(frozen=True)
class ModelInfo:
    """One served model."""

    name: str
    bundle_sha256: str
    arch: str = ""
    patch_size: int = 0
    embed_dim: int = 0
    num_prototypes: int = 0
    input_sizes: list[tuple[int, int]] = field(default_factory=list)
    backend: str = ""
    device: str = ""
    precision: str = ""
    max_batch: int = 0
    preprocess: PreprocessConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        pre = d.get("preprocess")
        preprocess = None
        if isinstance(pre, dict):
            try:
                preprocess = PreprocessConfig.from_dict(pre)
            except (TypeError, ValueError):
                preprocess = None
        return cls(
            name=str(d.get("name", "")),
            bundle_sha256=str(d.get("bundle_sha256", "")),
            arch=str(d.get("arch", "")),
            patch_size=int(d.get("patch_size", 0)),
            embed_dim=int(d.get("embed_dim", 0)),
            num_prototypes=int(d.get("num_prototypes", 0)),
            input_sizes=[(int(h), int(w)) for h, w in d.get("input_sizes", [])],
            backend=str(d.get("backend", "")),
            device=str(d.get("device", "")),
            precision=str(d.get("precision", "")),
            max_batch=int(d.get("max_batch", 0)),
            preprocess=preprocess,
            raw=dict(d),
        )

    def grid(self, height: int, width: int) -> tuple[int, int] | None:
        """The patch grid an image of this size gets (None when the resize policy is unknown)."""
        return self.preprocess.grid(height, width) if self.preprocess is not None else None


@dataclass(frozen=True)
class ServerInfo:
    """`GET /v1/models`: the served models (the default first is not guaranteed: see `default`)."""

    models: list[ModelInfo]
    default: str | None
    limits: ServerLimits
    version: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServerInfo:
        return cls(
            models=[ModelInfo.from_dict(m) for m in d.get("models", [])],
            default=d.get("default"),
            limits=ServerLimits.from_dict(d.get("limits", {})),
            version=str(d.get("version", "")),
            raw=dict(d),
        )

    def model(self, name: str | None = None) -> ModelInfo | None:
        """The model of that name (None: the default); None when not served."""
        key = name or self.default
        for m in self.models:
            if m.name == key:
                return m
        return None


@dataclass(frozen=True)
class Health:
    """`/health/live` and `/health/ready`: `status` is ready, starting, failed or draining."""

    live: bool
    ready: bool
    status: str
    models: list[str] = field(default_factory=list)
    error: str | None = None
