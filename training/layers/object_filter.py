"""The object-aware filter (CoTAP §2.2): the last transformer block, run a second time as a
cross-attention from the tokens to M learnable 3×3×D object prototypes, reusing its own weights.

For block output h (CLS + patches) and prototypes P (M, D, 3, 3):

    q           = qkv_q(norm1(h))                      per head, patches as an (h, w) map
    K_m, V_m    = qkv_{k,v}(norm_in(P_m))              3×3×d_h keys and values
    a_m(i, j)   = softmax_m(M^-1/2 · Σ_{3×3} <q(i+u, j+v), K_m(u, v)>)   (3×3 correlation, zero padding)
    CA          = proj(Σ_m a_m · mean_{3×3} V_m)        heads concatenated
    z           = h + CA;  z = z + mlp(norm2(z))
    out         = LayerNorm_2D([h ; z])                 `norm_out_patch` / `norm_out_cls`

The CLS query attends to the prototypes with a plain dot product against 3×3-averaged keys. The
scale 1/√M (not 1/√d_h) follows the released code. The only new parameters are `norm_in`,
`norm_out_patch` and `norm_out_cls`; the prototypes themselves live on the model (`kernel`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cotap.training.layers.block import LN_EPS, Block


class ObjectAwareFilter(Block):
    """The last block of a CoTAP ViT: a normal block plus the prototype cross-attention pass."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        self.norm_in = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_out_patch = nn.LayerNorm(2 * dim, eps=LN_EPS)
        self.norm_out_cls = nn.LayerNorm(2 * dim, eps=LN_EPS)

    def filter(
        self, h: torch.Tensor, kernel: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-attend block output `h` (B, 1+N, D) to prototypes `kernel` (M, D, k, k).

        Returns patch (B, N, 2D), cls (B, 2D) and assign (B, N, M), the prototype softmax averaged
        over heads.
        """
        b, n1, d = h.shape
        gh, gw = grid
        if n1 != 1 + gh * gw:
            raise ValueError(f"{n1 - 1} patch tokens do not form a {gh}x{gw} grid")
        m, _, k, _ = kernel.shape
        heads, dh = self.attn.num_heads, self.attn.head_dim
        scale = m**-0.5

        q, _, _ = self.attn.split_qkv(self.norm1(h))  # (B, H, 1+N, dh)
        q_cls, q_patch = q[:, :, :1], q[:, :, 1:]

        tokens = kernel.permute(0, 2, 3, 1).reshape(1, m * k * k, d)  # (1, M·k·k, D)
        _, pk, pv = self.attn.split_qkv(self.norm_in(tokens))  # (1, H, M·k·k, dh)
        pk = pk.reshape(heads, m, k, k, dh)
        v_mean = pv.reshape(heads, m, k * k, dh).mean(dim=2)  # (H, M, dh)

        # Patches: per-head 3×3 correlation of the query map with each prototype's key template.
        q_map = q_patch.transpose(2, 3).reshape(b, heads * dh, gh, gw)
        weight = pk.permute(0, 1, 4, 2, 3).reshape(heads * m, dh, k, k)
        scores = F.conv2d(q_map, weight, padding=k // 2, groups=heads) * scale  # (B, H·M, gh, gw)
        attn = scores.reshape(b, heads, m, gh * gw).softmax(dim=2)  # (B, H, M, N)
        out_patch = torch.einsum("bhmn,hmd->bhnd", attn, v_mean)  # (B, H, N, dh)

        # CLS: dot product with 3×3-averaged keys.
        k_mean = pk.reshape(heads, m, k * k, dh).mean(dim=2)  # (H, M, dh)
        attn_cls = (torch.einsum("bhqd,hmd->bhqm", q_cls, k_mean) * scale).softmax(dim=-1)  # (B, H, 1, M)
        out_cls = torch.einsum("bhqm,hmd->bhqd", attn_cls, v_mean)  # (B, H, 1, dh)

        ca = torch.cat([out_cls, out_patch], dim=2).transpose(1, 2).reshape(b, n1, d)
        z = h + self.attn.proj(ca)
        z = z + self.mlp(self.norm2(z))
        patch = self.norm_out_patch(torch.cat([h[:, 1:], z[:, 1:]], dim=-1))
        cls = self.norm_out_cls(torch.cat([h[:, 0], z[:, 0]], dim=-1))
        assign = attn.mean(dim=1).transpose(1, 2)  # (B, N, M)
        return patch, cls, assign
