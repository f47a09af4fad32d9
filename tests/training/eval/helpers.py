"""Hand-made features and masks for the probe tests (no model involved)."""

from __future__ import annotations

import torch

from cotap.training.eval.features import Features


def stripe_grids(n: int, grid: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """(n, grid, grid) class per patch, constant along one axis (random per image): label maps
    whose bilinear upsampling cannot blur a lone corner patch away."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, grid, grid, dtype=torch.long)
    for i in range(n):
        line = torch.randint(num_classes, (grid,), generator=g)
        out[i] = line[None, :].expand(grid, grid) if i % 2 else line[:, None].expand(grid, grid)
    return out


def make_features(patch: torch.Tensor, classes: torch.Tensor, scale: int = 8, labels=None) -> Features:
    """Features (N, h, w, C) with masks = `classes` (N, h, w) upsampled by `scale` (nearest)."""
    n, h, w = classes.shape
    masks = classes.repeat_interleave(scale, 1).repeat_interleave(scale, 2).to(torch.uint8)
    return Features(
        patch=patch.float(),
        cls=patch.float().mean((1, 2)),
        prototype=classes.clone(),
        masks=masks,
        labels=labels,
        images=torch.zeros(min(n, 2), 3, h * scale, w * scale, dtype=torch.uint8),
        input_size=(h * scale, w * scale),
        patch_size=scale,
    )


def onehot(classes: torch.Tensor, num_classes: int, dim: int = 16) -> torch.Tensor:
    """(N, h, w) -> (N, h, w, dim) one-hot class codes padded with zeros."""
    x = torch.zeros(*classes.shape, dim)
    x[..., :num_classes] = torch.nn.functional.one_hot(classes, num_classes).float()
    return x
