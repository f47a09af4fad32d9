"""The served models: each bundle read and verified, loaded on its backend and warmed at every
declared input size, at batch 1 and at its max batch, before the server reports ready.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cotap.core.bundle import Bundle, read_bundle
from cotap.core.images import DecodeLimits
from cotap.core.preprocess import PreprocessConfig
from cotap.server.backends import Backend, BackendOptions, build_backend
from cotap.server.settings import Settings, model_name_error

log = logging.getLogger("cotap.server.registry")

BackendHook = Callable[[Backend], Backend]


@dataclass
class ServedModel:
    name: str
    bundle: Bundle
    backend: Backend
    max_batch: int
    warmup_s: float = 0.0

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.bundle.config.preprocess

    def describe(self) -> dict[str, Any]:
        c = self.bundle.config
        return {
            "name": self.name,
            "arch": c.arch,
            "bundle_sha256": self.bundle.sha256,
            "patch_size": c.patch_size,
            "embed_dim": c.embed_dim,
            "num_prototypes": c.num_prototypes,
            "prototypes_initialized": c.prototypes_initialized,
            "preprocess": c.preprocess.to_dict(),
            "input_sizes": [list(s) for s in c.input_sizes],
            "max_batch": self.max_batch,
            "warmup_s": round(self.warmup_s, 3),
            **self.backend.describe(),
        }


def decode_limits(settings: Settings) -> DecodeLimits:
    return DecodeLimits(
        max_pixels=settings.max_pixels, min_side=settings.min_side, max_bytes=settings.max_body_bytes
    )


def load_model(
    name: str | None, path: Any, settings: Settings, hook: BackendHook | None = None
) -> ServedModel:
    """Read and verify one bundle, build its backend and warm it."""
    bundle = read_bundle(path)
    served = name or bundle.config.name
    error = model_name_error(served)
    if error is not None:
        raise ValueError(f"bundle {bundle.path}: {error}")
    options = BackendOptions(
        device=settings.device, precision=settings.precision, intra_op_threads=settings.intra_op_threads
    )
    backend = build_backend(bundle, settings.backend, options)
    if hook is not None:
        backend = hook(backend)
    max_batch = min(settings.max_batch, backend.max_batch or settings.max_batch)
    model = ServedModel(served, bundle, backend, max_batch)
    for w in backend.warnings:
        log.warning(w, extra={"fields": {"model": model.name}})
    if settings.warmup:
        model.warmup_s = warm(model)
    log.info(
        "model loaded",
        extra={
            "fields": {
                "model": model.name,
                "path": str(bundle.path),
                **backend.describe(),
                "notes": backend.selection_notes,
                "warmup_s": round(model.warmup_s, 3),
            }
        },
    )
    return model


def warm(model: ServedModel) -> float:
    """Run every declared input size at batch 1 and at max batch, post-processing included, so the
    first real request pays no allocation or kernel-selection cost. Returns seconds spent."""
    t0 = time.monotonic()
    ops = model.backend.ops
    for h, w in model.bundle.config.input_sizes:
        for b in sorted({1, model.max_batch}):
            x = np.zeros((b, 3, h, w), dtype=np.float32)
            out = model.backend.forward(x)
            ops.to_numpy(ops.l2_normalize(out["patch"]), "float16")
            ops.to_numpy(ops.prototypes(out["assign"], 3)["prototype_id"], "float32")
        one = model.backend.forward(np.zeros((1, 3, h, w), dtype=np.float32))["patch"]
        for v in ops.correspond(one, one, 2, False, False).values():
            ops.to_numpy(v, "float16")
    return time.monotonic() - t0


def load_models(settings: Settings, hook: BackendHook | None = None) -> dict[str, ServedModel]:
    """Every model of the settings, in order (the first is the default)."""
    models: dict[str, ServedModel] = {}
    for name, path in settings.model_specs():
        model = load_model(name, path, settings, hook)
        if model.name in models:
            raise ValueError(f"two served models are named {model.name!r}; name them with NAME=PATH")
        models[model.name] = model
    return models
