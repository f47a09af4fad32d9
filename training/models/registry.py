"""Model registry: names such as `cotap_vits16` map to configs; `build_model` builds them."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from cotap.training.models.vit import CoTAPViT, ViTConfig

_REGISTRY: dict[str, ViTConfig] = {}


def register_model(name: str, config: ViTConfig) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = config


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_config(name: str, **overrides: Any) -> ViTConfig:
    """The registered config of `name` with `overrides` applied (unknown keys are an error)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    valid = {f.name for f in fields(ViTConfig)}
    unknown = set(overrides) - valid
    if unknown:
        raise TypeError(f"unknown config keys for {name}: {sorted(unknown)}; valid: {sorted(valid)}")
    return replace(_REGISTRY[name], **overrides)


def build_model(name: str, **overrides: Any) -> CoTAPViT:
    """Build a registered model, e.g. `build_model("cotap_vits16")` or `build_model("cotap_test", depth=3)`."""
    return CoTAPViT(model_config(name, **overrides))


def _release(patch_size: int, dim: int, heads: int, depth: int = 12) -> ViTConfig:
    return ViTConfig(patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads)


# The four released sizes (README of the official code) and smaller ones.
for _name, _cfg in {
    "cotap_vits16": _release(16, 384, 6),
    "cotap_vits8": _release(8, 384, 6),
    "cotap_vitb16": _release(16, 768, 12),
    "cotap_vitb8": _release(8, 768, 12),
    "cotap_vitt16": _release(16, 192, 3),
    "cotap_vitt8": _release(8, 192, 3),
    # Small models for this machine: synthetic-scene experiments and the embedded default.
    "cotap_mini8": ViTConfig(patch_size=8, embed_dim=192, depth=6, num_heads=3, img_size=96),
    "cotap_micro8": ViTConfig(patch_size=8, embed_dim=96, depth=4, num_heads=2, img_size=64),
    # Tests only.
    "cotap_test": ViTConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, img_size=32),
}.items():
    register_model(_name, _cfg)
