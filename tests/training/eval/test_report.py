"""Figures and the report page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cotap.training.eval.report import Report, feature_figure, prediction_figure, render_html
from cotap.training.eval.visual import colorize, correspondence_figure, grid, palette, pca_rgb

from .helpers import make_features, onehot, stripe_grids


def test_palette_is_fixed_and_distinct() -> None:
    p = palette(64)
    assert p.shape == (64, 3) and p.dtype == np.uint8
    assert len({tuple(c) for c in p.tolist()}) == 64
    assert np.array_equal(p, palette(64)) and np.array_equal(palette(8), p[:8])
    c = colorize(np.array([[0, 255], [3, 9]]), 4)
    assert c[0, 1].tolist() == [0, 0, 0] and c[1, 1].tolist() == [0, 0, 0]
    assert c[1, 0].tolist() == p[3].tolist()


def test_pca_colours_follow_the_main_directions() -> None:
    g = torch.Generator().manual_seed(0)
    # two groups of patches far apart along one direction: they must get different colours
    a = torch.randn(4, 4, 16, generator=g) * 0.01
    b = a.clone()
    a[..., 0] += 5
    rgb = pca_rgb([a, b])
    assert rgb[0].shape == (4, 4, 3) and rgb[0].dtype == np.uint8
    assert abs(int(rgb[0][..., 0].mean()) - int(rgb[1][..., 0].mean())) > 200
    again = pca_rgb([a, b])
    assert all(np.array_equal(x, y) for x, y in zip(rgb, again, strict=True))


def test_figures_and_page(tmp_path: Path) -> None:
    cls = stripe_grids(3, 4, 3)
    feats = make_features(onehot(cls, 3), cls)
    feats.images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    fig = feature_figure(feats, num_prototypes=3, n=2)
    assert fig.size[1] > 2 * 128  # two rows of tiles enlarged to at least 128 px
    pred = prediction_figure(feats, feats.masks.long(), 3, n=3)
    line = correspondence_figure(
        feats.images[0], feats.images[1], np.array([[4.0, 4.0]]), np.array([[12.0, 4.0]]), np.array([True])
    )
    report = Report(tmp_path / "r")
    report.add("features", "features", fig, "PCA & prototypes")
    report.add("linear", "predictions_linear", pred)
    report.add("correspondence", "correspondence_0", line)
    page = report.write(
        {
            "results": {
                "linear": {
                    "metrics": {"miou": 0.5, "per_class_iou": {"a": 1.0}},
                    "timing_s": {"protocol": 1.0},
                }
            }
        },
        title="t <x>",
    )
    text = page.read_text()
    for name in ("features.png", "predictions_linear.png", "correspondence_0.png", "0.5000", "t &lt;x&gt;"):
        assert name in text
    assert (tmp_path / "r" / "results.json").is_file()
    assert "per_class_iou.a" not in render_html(
        {"results": {"x": {"metrics": {"per_class_iou": {"a": 1.0}}}}}, [], "t"
    )


def test_grid_rejects_empty() -> None:
    import pytest

    with pytest.raises(ValueError):
        grid([])
