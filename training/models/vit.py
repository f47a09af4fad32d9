"""The CoTAP ViT: a DINO-style vision transformer whose last block carries the object-aware filter.

Parameter names follow DINO (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.*`) so DINO and
CoTAP release checkpoints map onto it by prefix alone. There is no final norm: the filter's output
LayerNorm replaces it. `kernel` (M, D, k, k) holds the object prototypes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cotap.training.layers import Block, ObjectAwareFilter, PatchEmbed


@dataclass(frozen=True)
class ViTConfig:
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    in_chans: int = 3
    img_size: int = 224  # the stored position embedding covers img_size/patch_size squared
    num_prototypes: int = 64
    kernel_size: int = 3
    detach_prototypes: bool = True  # the main losses see `kernel.detach()`, as the release code
    use_filter: bool = True  # False: ablation without the filter, outputs LayerNorm([h ; h]), uniform assign
    # Position embeddings for another grid g are resampled by a scale of (g + offset) / g0, as DINO
    # and the CoTAP release do (offset 0.1): their checkpoints give their authors' features at 96 px
    # crops and 448 px only so. 0.0 is plain size-based resampling (configs saved before this field).
    interpolate_offset: float = 0.1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        """A config saved with a checkpoint or bundle. Those written before `interpolate_offset`
        existed resampled position embeddings by size, and keep doing so."""
        return cls(**{"interpolate_offset": 0.0, **d})

    @property
    def output_dim(self) -> int:
        return 2 * self.embed_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CoTAPViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if config.depth < 1:
            raise ValueError("depth must be at least 1")
        if config.img_size % config.patch_size:
            raise ValueError(
                f"img_size {config.img_size} is not a multiple of patch_size {config.patch_size}"
            )
        if not 0.0 <= config.interpolate_offset < 1.0:
            raise ValueError(f"interpolate_offset must be in [0, 1), not {config.interpolate_offset}")
        self.config = config
        d = config.embed_dim
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        grid = config.img_size // config.patch_size
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        blocks: list[nn.Module] = [
            Block(d, config.num_heads, config.mlp_ratio, config.qkv_bias) for _ in range(config.depth - 1)
        ]
        blocks.append(ObjectAwareFilter(d, config.num_heads, config.mlp_ratio, config.qkv_bias))
        self.blocks = nn.ModuleList(blocks)
        self.kernel = nn.Parameter(
            torch.zeros(config.num_prototypes, d, config.kernel_size, config.kernel_size)
        )
        self.reset_parameters()

    # -- initialisation -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.kernel, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def filter_block(self) -> ObjectAwareFilter:
        block = self.blocks[-1]
        assert isinstance(block, ObjectAwareFilter)
        return block

    # -- tokens -----------------------------------------------------------------------------------
    def interpolate_pos_encoding(self, gh: int, gw: int) -> torch.Tensor:
        """Position embeddings (1, 1+gh·gw, D) for a gh×gw grid, bicubically resampled if needed."""
        pos = self.pos_embed
        n0 = pos.shape[1] - 1
        g0 = math.isqrt(n0)
        if g0 * g0 != n0:
            raise ValueError(f"stored position embedding of {n0} patches is not a square grid")
        if (gh, gw) == (g0, g0):
            return pos
        patch_pos = pos[:, 1:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
        off = self.config.interpolate_offset
        if off:  # DINO: the offset keeps floor(g0 * scale) at g despite rounding
            scale = ((gh + off) / g0, (gw + off) / g0)
            patch_pos = F.interpolate(
                patch_pos.float(), scale_factor=scale, mode="bicubic", align_corners=False
            )
        else:
            patch_pos = F.interpolate(patch_pos.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([pos[:, :1], patch_pos], dim=1)

    def grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        if images.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image sides {h}x{w} must be multiples of the patch size {p}")
        return h // p, w // p

    def prepare_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        # images (B, 3, H, W) -> tokens (B, 1+N, D), grid (h, w)
        grid = self.grid_of(images)
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.interpolate_pos_encoding(*grid), grid

    # -- forward ------------------------------------------------------------------------------
    def forward_train(self, images: torch.Tensor, return_attention: bool = False) -> dict[str, torch.Tensor]:
        """Everything training needs: the outputs of `forward_features` as token sequences plus
        `last_input` (B, 1+N, D), the last block's input (the prototype memory bank samples), and,
        with `return_attention`, `cls_attention` (B, H, N), the last block's CLS→patch attention."""
        x, grid = self.prepare_tokens(images)
        for block in self.blocks[:-1]:
            x, _ = block(x)
        last_input = x
        fb = self.filter_block
        h, attn = fb(x, return_attention=return_attention)
        if self.config.use_filter:
            kernel = self.kernel.detach() if self.config.detach_prototypes else self.kernel
            patch, cls, assign = fb.filter(h, kernel, grid)
        else:
            patch = fb.norm_out_patch(torch.cat([h[:, 1:], h[:, 1:]], dim=-1))
            cls = fb.norm_out_cls(torch.cat([h[:, 0], h[:, 0]], dim=-1))
            m = self.config.num_prototypes
            assign = h.new_full((h.shape[0], h.shape[1] - 1, m), 1.0 / m)
        out = {"patch": patch, "cls": cls, "assign": assign, "last_input": last_input}
        if attn is not None:
            out["cls_attention"] = attn[:, :, 0, 1:]
        return out

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W), normalised, sides multiples of the patch size ->
        {"patch": (B, h, w, 2D), "cls": (B, 2D), "assign": (B, h, w, M)}."""
        b = images.shape[0]
        gh, gw = self.grid_of(images)
        out = self.forward_train(images)
        return {
            "patch": out["patch"].reshape(b, gh, gw, -1),
            "cls": out["cls"],
            "assign": out["assign"].reshape(b, gh, gw, -1),
        }

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_features(images)

    def get_intermediate_layers(
        self, images: torch.Tensor, n: int = 1, reshape: bool = False
    ) -> list[torch.Tensor]:
        """Outputs of the last `n` backbone blocks (DINO's sense: before the filter, no norm).

        Each is (B, 1+N, D) with the CLS token first, or with `reshape` the patch tokens as
        (B, D, h, w).
        """
        x, (gh, gw) = self.prepare_tokens(images)
        outputs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x, _ = block(x)
            if i >= len(self.blocks) - n:
                outputs.append(x)
        if reshape:
            outputs = [o[:, 1:].transpose(1, 2).reshape(o.shape[0], -1, gh, gw) for o in outputs]
        return outputs
