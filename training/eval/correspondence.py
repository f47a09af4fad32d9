"""Dense correspondence: nearest-neighbour patch matches between an image and a copy warped by a
known random homography, scored by PCK (the fraction of matches within a radius of the truth).

This is the SPair-style keypoint PCK and the "best buddies" (mutual nearest neighbour) check of
dino-vit-features, made exact and label-free: the ground truth comes from the transform itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cotap.training.data.views import as_chw_uint8
from cotap.training.eval.checks import check_float, check_int
from cotap.training.eval.datasets import EvalDataset
from cotap.training.eval.features import FrozenModel, input_size_for
from cotap.training.eval.geometry import WarpConfig, apply_homography, random_homography, warp_image
from cotap.training.preprocess import resize_to


@dataclass(frozen=True)
class CorrespondenceConfig:
    """`pairs`: how many val images to pair with their warp (None: all); `alphas`: PCK radii as a
    fraction of the longer grid side, in patches; `mutual_alpha`: the radius at which mutual-NN
    matches are called correct; pair i's transform is drawn from `default_rng([seed, i])`."""

    warp: WarpConfig = field(default_factory=WarpConfig)
    alphas: tuple[float, ...] = (0.05, 0.1, 0.2)
    mutual_alpha: float = 0.1
    pairs: int | None = None
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.alphas, Sequence) or isinstance(self.alphas, str) or not self.alphas:
            raise ValueError(f"alphas must be a non-empty list of numbers, got {self.alphas!r}")
        for a in self.alphas:
            check_float("every value of alphas", a)
        check_float("mutual_alpha", self.mutual_alpha)
        if self.pairs is not None:
            check_int("pairs", self.pairs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("seed", self.seed, 0)


@dataclass
class PairMatches:
    """One pair's matches, for scoring and figures. Grid (h, w); N = h*w source patches.

    match (N,) flat target index; mutual (N,) bool; true_xy (N, 2) ground-truth target location in
    pixels; valid (N,) whether it lies inside the target; error (N,) distance in patches."""

    match: torch.Tensor
    mutual: torch.Tensor
    true_xy: np.ndarray
    valid: np.ndarray
    error: np.ndarray
    source: torch.Tensor | None = None  # uint8 (3, H, W)
    target: torch.Tensor | None = None


def patch_centres(grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """(h*w, 2) pixel coordinates (x, y) of the patch centres, row-major."""
    h, w = grid
    ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1) * patch_size


def nearest_neighbours(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine nearest neighbours of (N, C) source rows among (M, C) target rows.

    Returns the (N,) target index of each source row and (N,) whether the match is mutual (the
    source row is also its target's nearest neighbour)."""
    s = F.normalize(source.float(), dim=-1) @ F.normalize(target.float(), dim=-1).T  # (N, M)
    fwd = s.argmax(dim=1)
    back = s.argmax(dim=0)
    mutual = back[fwd] == torch.arange(source.shape[0])
    return fwd, mutual


def score_pair(
    source: torch.Tensor, target: torch.Tensor, h: np.ndarray, patch_size: int, size: tuple[int, int]
) -> PairMatches:
    """Match the (h, w, C) patch features of a source and its warp by H (source -> target pixels)."""
    grid = (int(source.shape[0]), int(source.shape[1]))
    match, mutual = nearest_neighbours(
        source.reshape(-1, source.shape[-1]), target.reshape(-1, target.shape[-1])
    )
    centres = patch_centres(grid, patch_size)
    true_xy = apply_homography(h, centres)
    hh, ww = size
    valid = (true_xy[:, 0] >= 0) & (true_xy[:, 0] < ww) & (true_xy[:, 1] >= 0) & (true_xy[:, 1] < hh)
    pred_xy = patch_centres((int(target.shape[0]), int(target.shape[1])), patch_size)[match.numpy()]
    error = np.linalg.norm(pred_xy - true_xy, axis=1) / patch_size
    return PairMatches(match, mutual, true_xy, valid, error)


def summarise(
    pairs: list[PairMatches], grid: tuple[int, int], config: CorrespondenceConfig
) -> dict[str, Any]:
    """PCK@alpha pooled over the valid source patches of all pairs, and mutual-NN precision."""
    valid = np.concatenate([p.valid for p in pairs])
    error = np.concatenate([p.error for p in pairs])[valid]
    mutual = np.concatenate([p.mutual.numpy() for p in pairs])[valid]
    if error.size == 0:
        raise ValueError("no source patch lands inside its target: the warp range is too wide")
    side = max(grid)
    out: dict[str, Any] = {f"pck@{a:g}": float((error <= a * side).mean()) for a in config.alphas}
    correct_m = error[mutual] <= config.mutual_alpha * side
    out[f"mutual_precision@{config.mutual_alpha:g}"] = (
        float(correct_m.mean()) if mutual.any() else float("nan")
    )
    out["mutual_fraction"] = float(mutual.mean())
    out["mean_error_patches"] = float(error.mean())
    out["valid_patches"] = int(valid.sum())
    out["pairs"] = len(pairs)
    out["grid"] = list(grid)
    return out


def run_correspondence(
    model: FrozenModel,
    data: EvalDataset,
    config: CorrespondenceConfig = CorrespondenceConfig(),
    size: tuple[int, int] | None = None,
    keep: int = 4,
    progress: bool = True,
) -> tuple[dict[str, Any], list[PairMatches]]:
    """Pair each val image with its random warp, match patches, and score. Returns the metrics and
    all pairs' matches (the first `keep` carry their images for figures)."""
    size = input_size_for(data, model.patch_size, size)
    n = len(data) if config.pairs is None else min(config.pairs, len(data))
    if n == 0:
        raise ValueError(f"data set {data.name!r} is empty")
    results: list[PairMatches] = []
    grid = (size[0] // model.patch_size, size[1] // model.patch_size)
    bar = tqdm(total=n, desc="correspondence pairs", unit="pair", disable=not progress, leave=False)
    for start in range(0, n, config.batch_size):
        idx = range(start, min(n, start + config.batch_size))
        sources, targets, homs = [], [], []
        for i in idx:
            img = resize_to(as_chw_uint8(data[i].image), size)
            hom = random_homography(size, config.warp, np.random.default_rng([config.seed, i]))
            warped, _ = warp_image(img, hom)
            sources.append(img)
            targets.append(warped.round().clamp(0, 255))
            homs.append(hom)
        feats_s = model(torch.stack(sources))["patch"]
        feats_t = model(torch.stack(targets))["patch"]
        for j, i in enumerate(idx):
            pm = score_pair(feats_s[j], feats_t[j], homs[j], model.patch_size, size)
            if i < keep:
                pm.source = sources[j].round().to(torch.uint8)
                pm.target = targets[j].to(torch.uint8)
            results.append(pm)
        bar.update(len(idx))
    bar.close()
    return summarise(results, grid, config), results
