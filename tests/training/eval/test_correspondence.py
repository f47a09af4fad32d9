"""The warp's ground truth, and PCK for a model that knows where each patch came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cotap.core.preprocess import IMAGENET_MEAN, IMAGENET_STD
from cotap.training.eval.correspondence import (
    CorrespondenceConfig,
    nearest_neighbours,
    patch_centres,
    run_correspondence,
    score_pair,
    summarise,
)
from cotap.training.eval.datasets import from_arrays
from cotap.training.eval.features import FrozenModel
from cotap.training.eval.geometry import WarpConfig, apply_homography, random_homography, warp_image

SIZE, P = 96, 8


def coordinate_image(size: int = SIZE) -> np.ndarray:
    """uint8 (H, W, 3): red and green encode the pixel's x and y, blue marks 'inside the image'."""
    c = (np.arange(size) + 0.5) / size * 200 + 30
    img = np.zeros((size, size, 3), dtype=np.uint8)
    img[..., 0] = np.round(c)[None, :]
    img[..., 1] = np.round(c)[:, None]
    img[..., 2] = 255
    return img


class WhereFrom(nn.Module):
    """A 'model' whose patch features say which source position a patch shows: it decodes the
    coordinate colours (ignoring the black fill outside the warp) and embeds the position with
    narrow Gaussian bumps on a dense grid, so cosine similarity falls with distance."""

    patch_size = P

    def __init__(self, size: int = SIZE) -> None:
        super().__init__()
        self.size = size
        c = torch.linspace(0, size, size // 2 + 1)  # a bump every 2 pixels
        self.register_buffer("centres", torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).reshape(-1, 2))

    def forward_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        pixels = (images * std + mean) * 255
        pooled = F.avg_pool2d(pixels, P).permute(0, 2, 3, 1)  # (B, h, w, 3)
        inside = pooled[..., 2:] / 255
        xy = (pooled[..., :2] / inside.clamp_min(1e-3) - 30) / 200 * self.size
        d2 = ((xy[..., None, :] - self.centres) ** 2).sum(-1)
        feats = torch.exp(-d2 / (2 * 1.5**2)) * (inside > 0.05)
        b, h, w, _ = feats.shape
        return {"patch": feats, "cls": feats.mean((1, 2)), "assign": torch.ones(b, h, w, 2) / 2}


def test_identity_warp_is_the_identity() -> None:
    cfg = WarpConfig(scale=(1.0, 1.0), rotation=0, translation=0, perspective=0)
    h = random_homography((SIZE, SIZE), cfg, np.random.default_rng(0))
    assert np.allclose(h, np.eye(3))
    img = torch.rand(3, SIZE, SIZE)
    warped, inside = warp_image(img, h)
    assert torch.allclose(warped, img, atol=1e-5) and bool(inside.all())


def test_warp_sends_each_pixel_where_the_homography_says() -> None:
    """Warp an image whose pixels hold their own coordinates: the value found at a target pixel
    is the source point the inverse homography gives, and H(c) finds c."""
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    coords = torch.stack([xs, ys]).double()
    cfg = WarpConfig(scale=(0.8, 1.2), rotation=25, translation=0.1, perspective=0.1)
    for seed in range(4):
        h = random_homography((SIZE, SIZE), cfg, np.random.default_rng(seed))
        warped, inside = warp_image(coords, h)
        tgt = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).numpy()
        src = apply_homography(np.linalg.inv(h), tgt).reshape(SIZE, SIZE, 2)
        interior = (src[..., 0] > 1) & (src[..., 0] < SIZE - 1) & (src[..., 1] > 1) & (src[..., 1] < SIZE - 1)
        assert interior.sum() > SIZE * SIZE / 3
        got = warped.permute(1, 2, 0).numpy()
        assert np.abs(got[interior] - src[interior]).max() < 1e-3
        assert bool(inside.numpy()[interior].all())
        # forward: each patch centre c lands at H(c), where the warped image reads back c
        centres = patch_centres((SIZE // P, SIZE // P), P)
        true = apply_homography(h, centres)
        for c, t in zip(centres, true, strict=True):
            j, i = int(t[0]), int(t[1])
            if 1 <= j < SIZE - 1 and 1 <= i < SIZE - 1 and interior[i, j]:
                assert np.abs(got[i, j] - c).max() < 1.0  # within the pixel that holds H(c)


def test_nearest_neighbours_and_mutual_match_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 5, generator=g), torch.randn(15, 5, generator=g)
    fwd, mutual = nearest_neighbours(a, b)
    sim = F.cosine_similarity(a[:, None], b[None], dim=-1)
    for i in range(20):
        j = int(sim[i].argmax())
        assert int(fwd[i]) == j
        assert bool(mutual[i]) == (int(sim[:, j].argmax()) == i)


def test_pck_is_one_for_a_model_that_knows_positions_and_low_for_random_features() -> None:
    data = from_arrays([coordinate_image()] * 6)
    cfg = CorrespondenceConfig(pairs=6, seed=0)
    metrics, pairs = run_correspondence(FrozenModel(WhereFrom()), data, cfg, keep=1, progress=False)
    assert metrics["pck@0.1"] == 1.0 and metrics["pck@0.2"] == 1.0
    assert metrics["mutual_precision@0.1"] == 1.0
    assert metrics["valid_patches"] > 6 * 30
    assert pairs[0].source is not None and pairs[1].source is None

    g = torch.Generator().manual_seed(0)
    grid = SIZE // P
    random_pairs = []
    for i in range(6):
        h = random_homography((SIZE, SIZE), cfg.warp, np.random.default_rng([0, i]))
        src, tgt = torch.randn(grid, grid, 32, generator=g), torch.randn(grid, grid, 32, generator=g)
        random_pairs.append(score_pair(src, tgt, h, P, (SIZE, SIZE)))
    low = summarise(random_pairs, (grid, grid), cfg)
    assert low["pck@0.1"] < 0.2


def test_only_patches_landing_inside_count() -> None:
    shift = np.array([[1, 0, 3 * P], [0, 1, 0], [0, 0, 1]], dtype=np.float64)  # 3 patches right
    feats = torch.randn(4, 4, 8)
    target = torch.roll(feats, 3, dims=1)  # the right content for the columns that stay inside
    pm = score_pair(feats, target, shift, P, (4 * P, 4 * P))
    assert pm.valid.reshape(4, 4)[:, 0].all() and not pm.valid.reshape(4, 4)[:, 1:].any()
    m = summarise([pm], (4, 4), CorrespondenceConfig())
    assert m["valid_patches"] == 4 and m["pck@0.05"] == pytest.approx(1.0)


def test_a_non_square_grid_keeps_rows_and_columns_apart() -> None:
    """A 3 × 5 grid shifted one patch down: valid means inside the target's height AND width (the
    two must not swap), and the error is measured in patches along the right axes."""
    h, w = 3, 5
    down = np.array([[1, 0, 0], [0, 1, P], [0, 0, 1]], dtype=np.float64)
    feats = torch.randn(h, w, 16)
    target = torch.roll(feats, 1, dims=0)  # row r of the source is row r + 1 of the target
    pm = score_pair(feats, target, down, P, (h * P, w * P))
    valid = pm.valid.reshape(h, w)
    assert valid[:2].all() and not valid[2].any()  # the last row leaves through the bottom
    centres = (np.stack(np.meshgrid(np.arange(w), np.arange(h)), -1).reshape(-1, 2) + 0.5) * P  # (x, y)
    np.testing.assert_allclose(pm.true_xy, centres + np.array([0.0, P]))
    assert np.allclose(pm.error.reshape(h, w)[:2], 0)  # rows 0-1 found exactly
    m = summarise([pm], (h, w), CorrespondenceConfig(alphas=(0.1,)))
    assert m["valid_patches"] == 10 and m["pck@0.1"] == 1.0


def test_pck_counts_an_error_of_exactly_alpha_times_the_longer_side() -> None:
    """PCK@a counts errors <= a·max(h, w) patches (the longer side, so a 4 × 10 grid at a = 0.1
    allows one patch); a hand-made pair puts errors on and just past that edge."""
    error = np.array([0.0, 1.0, 1.0 + 1e-9, 2.0])
    pm = score_pair(torch.randn(1, 4, 8), torch.randn(1, 4, 8), np.eye(3), P, (P, 4 * P))
    pm.error, pm.valid = error, np.ones(4, bool)
    pm.mutual = torch.tensor([True, True, False, False])
    m = summarise([pm], (4, 10), CorrespondenceConfig(alphas=(0.1, 0.2), mutual_alpha=0.1))
    assert m["pck@0.1"] == 0.5 and m["pck@0.2"] == 1.0  # 0 and 1 are within 1 patch; 2 within 2
    assert m["mutual_precision@0.1"] == 1.0 and m["mutual_fraction"] == 0.5
