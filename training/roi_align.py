"""ROI-align in plain torch (torchvision's `roi_align` semantics, one box per map), used by the
Leopart-style within-image patch loss to bring two crops' maps onto their common overlap.

Each output bin averages `sampling_ratio`² bilinear samples taken on a regular grid inside the bin.
Bilinear sampling follows torchvision exactly: a sample further than one cell outside the map is 0,
coordinates in [-1, 0] clamp to the border, and the last row/column clamps. `aligned=True` shifts
the box by half a cell so that box coordinate x sits at the continuous position x of the map,
where cell j spans [j, j+1). torchvision's adaptive sampling ratio (ceil(box/bins) per box) is not
supported: a fixed ratio keeps the computation batched (two small matrix products per box).
"""

from __future__ import annotations

import torch


def _axis_weights(
    start: torch.Tensor, length: torch.Tensor, bins: int, ratio: int, size: int
) -> torch.Tensor:
    """(I, bins·ratio, size) interpolation weights of the sample points along one axis."""
    n = bins * ratio
    steps = (torch.arange(n, device=start.device, dtype=start.dtype) + 0.5) / ratio  # (n,) in bin units
    pos = start[:, None] + steps[None, :] * (length / bins)[:, None]  # (I, n)
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    pos = torch.where(at_end, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    vf = valid.to(pos.dtype)
    weights = torch.zeros(*pos.shape, size, device=start.device, dtype=start.dtype)
    weights.scatter_add_(2, low.unsqueeze(-1), ((1 - frac) * vf).unsqueeze(-1))
    weights.scatter_add_(2, high.unsqueeze(-1), (frac * vf).unsqueeze(-1))
    return weights


def roi_align(
    features: torch.Tensor,
    boxes: torch.Tensor,
    output_size: int | tuple[int, int],
    sampling_ratio: int = 2,
    aligned: bool = True,
) -> torch.Tensor:
    """Pool `features` (I, C, H, W) over one box per map.

    Args:
        features: (I, C, H, W) maps.
        boxes: (I, 4) boxes (x0, y0, x1, y1) in the maps' cell coordinates (a box covering the
            whole map is (0, 0, W, H)).
        output_size: bins per side, or (bins_h, bins_w).
        sampling_ratio: samples per bin along each axis (> 0).
        aligned: shift by half a cell (torchvision's `aligned=True`).

    Returns:
        (I, C, bins_h, bins_w).
    """
    if features.ndim != 4:
        raise ValueError(f"features must be (I, C, H, W), got {tuple(features.shape)}")
    if boxes.shape != (features.shape[0], 4):
        raise ValueError(f"boxes must be ({features.shape[0]}, 4), got {tuple(boxes.shape)}")
    if sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be a positive integer, got {sampling_ratio}")
    bh, bw = (output_size, output_size) if isinstance(output_size, int) else output_size
    if bh < 1 or bw < 1:
        raise ValueError(f"output size must be positive, got {output_size}")
    i, c, h, w = features.shape
    dtype = features.dtype if features.is_floating_point() else torch.float32
    boxes = boxes.to(device=features.device, dtype=dtype)
    offset = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (boxes[:, j] - offset for j in range(4))
    width, height = x1 - x0, y1 - y0
    if not aligned:
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    wy = _axis_weights(y0, height, bh, sampling_ratio, h)  # (I, bh·r, H)
    wx = _axis_weights(x0, width, bw, sampling_ratio, w)  # (I, bw·r, W)
    samples = torch.einsum("iyh,ichw,ixw->icyx", wy, features.to(dtype), wx)  # (I, C, bh·r, bw·r)
    return samples.reshape(i, c, bh, sampling_ratio, bw, sampling_ratio).mean(dim=(3, 5))
