"""A trained `CoTAPViT` -> a bundle on disk (through `cotap.core.bundle`).

Training runs end here, and the exporter's `cotap export bundle` uses the same function, so there is
one way to put a model into a bundle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from cotap.core.bundle import MODEL_CARD, WEIGHTS, Bundle, BundleConfig, write_bundle
from cotap.core.preprocess import PreprocessConfig
from cotap.training.models import CoTAPViT

WEIGHTS_FORMAT = "cotap-backbone-v1"


def weights_bytes(model: CoTAPViT, arch: str) -> bytes:
    """The model's state dict as safetensors bytes (contiguous fp32 copies, string metadata)."""
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": WEIGHTS_FORMAT, "arch": arch, "patch_size": str(model.patch_size)}
    return save_safetensors(sd, metadata=meta)


def bundle_config(
    model: CoTAPViT,
    arch: str,
    name: str,
    preprocess: PreprocessConfig,
    input_sizes: Sequence[tuple[int, int]] | None = None,
    prototypes_initialized: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> BundleConfig:
    cfg = model.config
    if preprocess.patch_size != cfg.patch_size:
        raise ValueError(
            f"preprocess patch size {preprocess.patch_size} != model patch size {cfg.patch_size}"
        )
    if input_sizes is None:
        if preprocess.resize != "fixed":
            raise ValueError(
                "input_sizes are required with the shorter_side policy (the sizes to warm and export)"
            )
        input_sizes = [preprocess.size]  # type: ignore[list-item]
    for h, w in input_sizes:
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {cfg.patch_size}")
    return BundleConfig(
        name=name,
        arch=arch,
        model=cfg.to_dict(),
        preprocess=preprocess,
        input_sizes=tuple((int(h), int(w)) for h, w in input_sizes),
        outputs={
            "patch": {"dim": cfg.output_dim, "dtype": "float32"},
            "cls": {"dim": cfg.output_dim, "dtype": "float32"},
            "assign": {"dim": cfg.num_prototypes, "dtype": "float32"},
        },
        prototypes_initialized=prototypes_initialized,
        extra=dict(extra or {}),
    )


def write_model_bundle(
    model: CoTAPViT,
    arch: str,
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    preprocess: PreprocessConfig,
    input_sizes: Sequence[tuple[int, int]] | None = None,
    prototypes_initialized: bool = True,
    source: Mapping[str, Any] | None = None,
    build: Mapping[str, Any] | None = None,
    model_card: str | None = None,
    overwrite: bool = False,
) -> Bundle:
    config = bundle_config(model, arch, name, preprocess, input_sizes, prototypes_initialized)
    files: dict[str, bytes | os.PathLike[str]] = {WEIGHTS: weights_bytes(model, arch)}
    if model_card is not None:
        files[MODEL_CARD] = model_card.encode()
    return write_bundle(out_dir, config, files, source=source, build=build, overwrite=overwrite)
