"""ROI-align against a naive per-sample transcription of torchvision's bilinear rule."""

from __future__ import annotations

import math

import pytest
import torch

from cotap.training.roi_align import roi_align


def bilinear(fmap: list[list[float]], y: float, x: float) -> float:
    """torchvision's `bilinear_interpolate` for one channel."""
    height, width = len(fmap), len(fmap[0])
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * fmap[y_low][x_low]
        + hy * lx * fmap[y_low][x_high]
        + ly * hx * fmap[y_high][x_low]
        + ly * lx * fmap[y_high][x_high]
    )


def naive_roi_align(
    fmap: list[list[float]], box: list[float], bins: int, ratio: int, aligned: bool
) -> list[list[float]]:
    off = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (v - off for v in box)
    rw, rh = x1 - x0, y1 - y0
    if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
    bw, bh = rw / bins, rh / bins
    out = []
    for ph in range(bins):
        row = []
        for pw in range(bins):
            acc = 0.0
            for iy in range(ratio):
                y = y0 + ph * bh + (iy + 0.5) * bh / ratio
                for ix in range(ratio):
                    x = x0 + pw * bw + (ix + 0.5) * bw / ratio
                    acc += bilinear(fmap, y, x)
            row.append(acc / (ratio * ratio))
        out.append(row)
    return out


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_matches_naive_reference(aligned: bool) -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(5, 2, 6, 7, generator=g, dtype=torch.float64)
    boxes = torch.tensor(
        [
            [0.0, 0.0, 7.0, 6.0],  # whole map
            [1.3, 0.7, 4.9, 3.2],  # inside
            [-1.5, -0.8, 2.0, 2.5],  # partly outside top-left
            [5.5, 4.2, 8.6, 7.9],  # partly outside bottom-right
            [2.0, 2.0, 2.4, 2.3],  # tiny
        ],
        dtype=torch.float64,
    )
    for bins, ratio in [(3, 2), (2, 3), (4, 1)]:
        got = roi_align(feats, boxes, bins, sampling_ratio=ratio, aligned=aligned)
        assert got.shape == (5, 2, bins, bins)
        for i in range(5):
            for c in range(2):
                want = naive_roi_align(feats[i, c].tolist(), boxes[i].tolist(), bins, ratio, aligned)
                assert torch.allclose(got[i, c], torch.tensor(want, dtype=torch.float64), atol=1e-12), (
                    i,
                    c,
                    bins,
                    ratio,
                )


def test_roi_align_identity_and_rectangular_bins() -> None:
    feats = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    full = torch.tensor([[0.0, 0.0, 5.0, 4.0]] * 2)
    out = roi_align(feats, full, (4, 5), sampling_ratio=1)
    assert torch.allclose(out, feats)  # one sample at each cell centre


def test_roi_align_gradient_flows_and_bad_shapes() -> None:
    feats = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = roi_align(feats, torch.tensor([[0.5, 0.5, 3.0, 3.5], [0.0, 1.0, 2.0, 4.0]]), 2)
    out.sum().backward()
    assert feats.grad is not None and math.isfinite(float(feats.grad.sum()))
    with pytest.raises(ValueError):
        roi_align(feats.detach(), torch.zeros(3, 4), 2)
    with pytest.raises(ValueError):
        roi_align(feats.detach()[0], torch.zeros(1, 4), 2)
    with pytest.raises(ValueError):
        roi_align(feats.detach(), torch.zeros(2, 4), 2, sampling_ratio=0)
