"""Known geometric transforms for the correspondence protocol: random homographies close to an
affine map (scale, rotation, translation, a mild perspective), applied to pixel coordinates and to
images, so every source patch centre has an exact ground-truth location in the warped image.

Coordinates are continuous pixel coordinates (x, y): pixel (i, j) covers [j, j+1) x [i, i+1) and
its centre is (j + 0.5, i + 0.5), the convention of `grid_sample(align_corners=False)`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class WarpConfig:
    """Ranges of the random transform, each drawn uniformly (scale log-uniformly).

    Lengths are in units of half the longer image side, about the image centre: `translation` 0.1
    moves the image by up to 5% of its longer side; `perspective` is the magnitude of the projective
    row (0.1 makes one edge about 10% longer than the opposite one).
    """

    scale: tuple[float, float] = (0.8, 1.25)
    rotation: float = 20.0  # degrees, +-
    translation: float = 0.1
    perspective: float = 0.1

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale range must be positive and ordered, got {self.scale}")
        if self.rotation < 0 or self.translation < 0 or not 0 <= self.perspective < 0.5:
            raise ValueError("rotation and translation must be >= 0, perspective in [0, 0.5)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _normaliser(size: tuple[int, int]) -> np.ndarray:
    """3x3 map from pixel coordinates to centred ones in units of half the longer side."""
    h, w = size
    s = max(h, w) / 2
    return np.array([[1 / s, 0, -w / 2 / s], [0, 1 / s, -h / 2 / s], [0, 0, 1]], dtype=np.float64)


def random_homography(size: tuple[int, int], config: WarpConfig, rng: np.random.Generator) -> np.ndarray:
    """float64 (3, 3) H mapping source pixel coordinates to target pixel coordinates (same size)."""
    lo, hi = config.scale
    s = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    a = math.radians(rng.uniform(-config.rotation, config.rotation))
    tx, ty = rng.uniform(-config.translation, config.translation, size=2)
    px, py = rng.uniform(-config.perspective, config.perspective, size=2)
    c, sn = math.cos(a), math.sin(a)
    hn = np.array([[s * c, -s * sn, tx], [s * sn, s * c, ty], [px, py, 1.0]], dtype=np.float64)
    d = _normaliser(size)
    return np.linalg.inv(d) @ hn @ d


def apply_homography(h: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(N, 2) points (x, y) -> (N, 2) transformed points."""
    p = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ np.asarray(h).T
    return p[:, :2] / p[:, 2:3]


def warp_image(image: torch.Tensor, h: np.ndarray, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp (C, H, W) float `image` by H (source -> target pixels) into a target of the same size.

    Returns the warped image (C, H, W) (bilinear; `fill` outside the source) and a bool (H, W) mask
    of target pixels whose preimage lies inside the source.
    """
    _, hh, ww = image.shape
    ys, xs = torch.meshgrid(
        torch.arange(hh, dtype=torch.float64) + 0.5,
        torch.arange(ww, dtype=torch.float64) + 0.5,
        indexing="ij",
    )
    tgt = np.stack([xs.reshape(-1).numpy(), ys.reshape(-1).numpy()], axis=1)
    src = torch.from_numpy(apply_homography(np.linalg.inv(h), tgt)).reshape(hh, ww, 2)
    inside = (src[..., 0] >= 0) & (src[..., 0] <= ww) & (src[..., 1] >= 0) & (src[..., 1] <= hh)
    grid = torch.stack([src[..., 0] / ww * 2 - 1, src[..., 1] / hh * 2 - 1], dim=-1).to(torch.float32)
    x = image.to(torch.float32)[None] - fill
    out = F.grid_sample(x, grid[None], mode="bilinear", padding_mode="zeros", align_corners=False)[0] + fill
    return out, inside
