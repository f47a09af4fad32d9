"""Teacher foreground masks (§2.4 of the method notes, Leopart's `process_attentions`).

The last block's CLS→patch attention, averaged over heads, is blurred with a 7×7 Gaussian
(σ = 0.6, reflect padding as torchvision's `GaussianBlur`), and the patches that together hold the
top `mass` (60 %) of the blurred attention are foreground. Masks steer which cells the CoTAP loss
compares and which ROI bins the within-image loss keeps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_kernel1d(size: int, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torchvision's 1-D Gaussian: `size` taps at -(size-1)/2 .. (size-1)/2, normalised to sum 1."""
    if size < 1 or size % 2 == 0 or sigma <= 0:
        raise ValueError(f"need an odd kernel size and a positive sigma, got {size}, {sigma}")
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, size, dtype=dtype)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def gaussian_blur(maps: torch.Tensor, size: int = 7, sigma: float = 0.6) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, h, w) maps; reflect padding, or replicate padding when the
    map is too small to reflect (side ≤ size//2). The views' `gaussian_blur` blurs whole images the
    same way as sums of slices (faster there); this one stays a conv2d, whose float rounding the
    trained models' masks were computed with (the two differ by up to 1 ulp)."""
    if maps.ndim != 4 or maps.shape[1] != 1:
        raise ValueError(f"maps must be (B, 1, h, w), got {tuple(maps.shape)}")
    pad = size // 2
    k = gaussian_kernel1d(size, sigma, torch.float32).to(maps.device)
    mode = "reflect" if min(maps.shape[-2:]) > pad else "replicate"
    x = F.pad(maps.float(), (pad, pad, pad, pad), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, size))
    return F.conv2d(x, k.view(1, 1, size, 1))


def foreground_masks(
    cls_attention: torch.Tensor,
    grid: tuple[int, int],
    mass: float = 0.6,
    blur_size: int = 7,
    blur_sigma: float = 0.6,
) -> torch.Tensor:
    """Binary foreground masks from the last block's CLS→patch attention.

    Args:
        cls_attention: (B, H, N) attention of the CLS query to the N = h·w patches, per head.
        grid: (h, w) patch grid.
        mass: fraction of the blurred attention mass the kept patches must hold (at least).

    Returns:
        (B, h, w) float32 masks of 0 and 1.
    """
    if cls_attention.ndim != 3:
        raise ValueError(f"cls_attention must be (B, heads, N), got {tuple(cls_attention.shape)}")
    h, w = grid
    b, _, n = cls_attention.shape
    if n != h * w:
        raise ValueError(f"{n} patches do not form a {h}x{w} grid")
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    attn = cls_attention.detach().float().mean(dim=1).reshape(b, 1, h, w)
    flat = gaussian_blur(attn, blur_size, blur_sigma).reshape(b, n)
    values, order = torch.sort(flat, dim=1)  # ascending
    cum = torch.cumsum(values / values.sum(dim=1, keepdim=True), dim=1)
    keep_sorted = (cum > (1 - mass)).float()  # the largest patches whose mass reaches `mass`
    mask = torch.zeros_like(flat).scatter_(1, order, keep_sorted)
    return mask.reshape(b, h, w)
