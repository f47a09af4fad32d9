"""The Pillow plots: the prototype overlay tints each patch with its prototype's colour, the legend
lists the biggest prototypes, and correspondence lines join the matched patch centres."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cotap.client.plots import correspondence_lines, palette, prototype_colour, prototype_overlay
from cotap.client.results import Correspondence, Prototypes


def test_palette_is_distinct_and_stable() -> None:
    p = palette(64)
    assert p.shape == (64, 3) and p.dtype == np.uint8
    assert len({tuple(c) for c in p}) == 64
    assert prototype_colour(0) == (242, 109, 109)  # the web page's protoColour(0) (checked there too)


def test_overlay_blends_each_patch_with_its_prototype_colour() -> None:
    grey = np.full((256, 256, 3), 100, np.uint8)
    ids = np.array([[0, 1], [2, 2]], np.int32)
    p = Prototypes(ids, None, None, 64, (2, 2), (16, 16), (256, 256), "m", "h")
    out = np.asarray(prototype_overlay(grey, p, alpha=0.5, legend=3))
    assert out.shape[1] == 256 and out.shape[0] > 256  # legend strip below
    for (i, j), pid in np.ndenumerate(ids):
        y, x = 64 + 128 * i, 64 + 128 * j
        expected = (np.array(prototype_colour(int(pid))) + 100) / 2
        assert np.abs(out[y, x].astype(float) - expected).max() <= 1.0
    legend = out[256:]
    assert (np.abs(legend.astype(int) - np.array(prototype_colour(2))).sum(-1) <= 3).any()  # #2 swatch
    no_legend = prototype_overlay(Image.fromarray(grey), p, legend=0)
    assert no_legend.size == (256, 256)


def test_lines_join_matched_patch_centres() -> None:
    black = np.zeros((64, 64, 3), np.uint8)
    match = np.array([[3, -1], [-1, -1]], np.int32)  # patch (0, 0) -> (1, 1)
    c = Correspondence(
        match,
        np.array([[0.9, 0], [0, 0]], np.float16),
        np.array([[True, False], [False, False]]),
        (2, 2),
        (2, 2),
        (64, 64),
        (64, 64),
        "m",
        "h",
    )
    img = np.asarray(correspondence_lines(black, black, c, height=64, gap=10))
    assert img.shape == (64 + 24, 64 + 10 + 64, 3)
    # the line runs from (16, 16) in A to (48, 48) in B: its midpoint is lit
    mid_x, mid_y = (16 + 64 + 10 + 48) // 2, 24 + (16 + 48) // 2
    assert img[mid_y - 1 : mid_y + 2, mid_x - 1 : mid_x + 2].max() > 50
    assert img[24 + 48, 48].max() == 0  # no line from an unmatched patch
