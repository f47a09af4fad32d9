"""Image to patch tokens with one strided convolution (DINO's `patch_embed.proj`)."""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) with H, W multiples of the patch size -> (B, h*w, D)
        return self.proj(x).flatten(2).transpose(1, 2)
