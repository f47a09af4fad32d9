"""A pre-norm transformer block (DINO's `blocks.N.{norm1, attn, norm2, mlp}`), no drop-path."""

from __future__ import annotations

import torch
from torch import nn

from cotap.training.layers.attention import Attention
from cotap.training.layers.mlp import Mlp

LN_EPS = 1e-6


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # x: (B, 1+N, D) -> (B, 1+N, D), attention (B, H, 1+N, 1+N) when asked for
        y, attn = self.attn(self.norm1(x), return_attention=return_attention)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, attn
