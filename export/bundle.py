"""Checkpoint -> bundle: `cotap export bundle --checkpoint PATH --arch NAME --out DIR`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cotap.core.bundle import Bundle
from cotap.core.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from cotap.training.bundles import write_model_bundle
from cotap.training.checkpoints import load_model


def export_bundle(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    arch: str | None = None,
    which: str | None = None,
    name: str | None = None,
    size: int | tuple[int, int] = 224,
    resize: str = "fixed",
    input_sizes: list[tuple[int, int]] | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    overwrite: bool = False,
) -> Bundle:
    """Load `checkpoint` strictly (any layout `load_model` accepts) and write it as a bundle."""
    loaded = load_model(checkpoint, arch=arch, which=which)
    patch = loaded.model.patch_size
    preprocess = PreprocessConfig(
        resize=resize,  # type: ignore[arg-type]
        size=size if resize == "shorter_side" else (size if isinstance(size, tuple) else (size, size)),
        patch_size=patch,
        mean=mean,
        std=std,
    )
    if input_sizes is None and resize == "shorter_side":
        s = int(size) if not isinstance(size, tuple) else size[0]
        input_sizes = [(s, s)]
    source: dict[str, Any] = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "sha256": loaded.source_sha256,
        "layout": loaded.layout,
        "which": which,
        "notes": loaded.notes,
    }
    build = {
        "command": "export bundle",
        "arch": loaded.arch,
        "size": list(size) if isinstance(size, tuple) else size,
        "resize": resize,
        "input_sizes": input_sizes,
    }
    return write_model_bundle(
        loaded.model,
        loaded.arch,
        out,
        name=name or Path(out).name,
        preprocess=preprocess,
        input_sizes=input_sizes,
        prototypes_initialized=loaded.prototypes_initialized,
        source=source,
        build=build,
        overwrite=overwrite,
    )
