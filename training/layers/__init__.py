"""ViT building blocks, one concept per module, with DINO's parameter names."""

from cotap.training.layers.attention import Attention
from cotap.training.layers.block import Block
from cotap.training.layers.mlp import Mlp
from cotap.training.layers.object_filter import ObjectAwareFilter
from cotap.training.layers.patch_embed import PatchEmbed

__all__ = ["Attention", "Block", "Mlp", "ObjectAwareFilter", "PatchEmbed"]
