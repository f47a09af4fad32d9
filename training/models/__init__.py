"""CoTAP models: the ViT with the object-aware filter and its registry of named sizes."""

from cotap.training.models.registry import build_model, list_models, model_config, register_model
from cotap.training.models.vit import CoTAPViT, ViTConfig

__all__ = ["CoTAPViT", "ViTConfig", "build_model", "list_models", "model_config", "register_model"]
