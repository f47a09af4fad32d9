"""Multi-crop views: overlap constraints, boxes against pixels, teacher = un-jittered student, and
the photometric ops against independent per-pixel references."""

from __future__ import annotations

import colorsys
import math

import numpy as np
import pytest
import torch

from cotap.training.data.views import (
    GRAY_WEIGHTS,
    ViewConfig,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    grayscale,
    hsv_to_rgb,
    make_views,
    overlap_boxes,
    overlap_boxes_batched,
    rgb_to_hsv,
    sample_crops,
)

PLAIN = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _area(c: tuple[int, int, int, int]) -> int:
    return c[2] * c[3]


def _ov(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    h = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    w = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0, h) * max(0, w)


@pytest.mark.parametrize(
    "cfg",
    [
        ViewConfig(),
        # hard constraints and a single try: the fallbacks must keep them anyway
        ViewConfig(min_overlap_global=0.15, min_overlap_local=0.03, max_tries=1, num_local=6),
    ],
)
def test_overlap_constraints_hold_over_many_draws(cfg: ViewConfig) -> None:
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    for _ in range(400):
        h = int(rng.integers(24, 400))
        w = int(np.clip(h * np.exp(rng.uniform(-1.1, 1.1)), 24, 600))  # aspect up to 3:1
        area = h * w
        crops = sample_crops(h, w, cfg, g)
        assert len(crops) == 2 + cfg.num_local
        for c in crops:
            top, left, ch, cw = c
            assert top >= 0 and left >= 0 and ch >= 1 and cw >= 1 and top + ch <= h and left + cw <= w
        assert _ov(crops[0], crops[1]) > cfg.min_overlap_global * area
        for c in crops[2:]:
            assert _ov(c, crops[0]) > cfg.min_overlap_local * area
            assert _ov(c, crops[1]) > cfg.min_overlap_local * area


def test_crop_areas_follow_the_scale_ranges() -> None:
    cfg = ViewConfig()
    g = torch.Generator().manual_seed(1)
    glob, loc = [], []
    for _ in range(200):
        crops = sample_crops(300, 400, cfg, g)
        glob += [_area(c) / 120000 for c in crops[:2]]
        loc += [_area(c) / 120000 for c in crops[2:]]
    assert min(glob) > 0.23 and max(glob) <= 1.0 and np.median(glob) > 0.45
    assert min(loc) > 0.045 and max(loc) < 0.11


def _coordinate_image(h: int, w: int) -> np.ndarray:
    """R = column, G = row, B = 100: every pixel says where it is."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = np.arange(w, dtype=np.uint8)[None, :]
    img[..., 1] = np.arange(h, dtype=np.uint8)[:, None]
    img[..., 2] = 100
    return img


def test_boxes_agree_with_the_pixels() -> None:
    h, w = 180, 240
    img = _coordinate_image(h, w)
    cfg = ViewConfig(global_size=64, local_size=32, mean=(0, 0, 0), std=(1, 1, 1), **PLAIN)
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        v = make_views(img, cfg, g)
        crops = [*v.teacher_global, *v.student_local]
        for view, box in zip(crops, v.boxes, strict=True):
            px = view * 255  # (3, S, S) back to grey levels
            s = px.shape[-1]
            x0, y0, x1, y1 = (box * torch.tensor([w, h, w, h])).tolist()
            sx, sy = (x1 - x0) / s, (y1 - y0) / s
            # output pixel j samples the input at x0 + (j + 0.5) * sx - 0.5 (pixel-centre convention)
            want_left, want_right = x0 + 0.5 * sx - 0.5, x1 - 0.5 * sx - 0.5
            want_top, want_bottom = y0 + 0.5 * sy - 0.5, y1 - 0.5 * sy - 0.5
            tol = 1.0 + 0.5 * max(sx, sy)
            assert abs(px[0, :, 0].mean().item() - want_left) < tol
            assert abs(px[0, :, -1].mean().item() - want_right) < tol
            assert abs(px[1, 0, :].mean().item() - want_top) < tol
            assert abs(px[1, -1, :].mean().item() - want_bottom) < tol
            mid = s // 2
            assert abs(px[0, mid, mid].item() - (x0 + (mid + 0.5) * sx - 0.5)) < 1.0
            assert torch.all(px[2] == 100)


def test_teacher_views_equal_unjittered_student_views() -> None:
    img = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    plain = ViewConfig(global_size=32, local_size=16, **PLAIN)
    v = make_views(img, plain, torch.Generator().manual_seed(0))
    assert torch.equal(v.teacher_global, v.student_global)
    jittered = make_views(img, ViewConfig(global_size=32, local_size=16), torch.Generator().manual_seed(0))
    assert torch.equal(jittered.boxes, v.boxes)  # geometry is drawn first, from the same stream
    assert torch.equal(jittered.teacher_global, v.teacher_global)
    assert not torch.equal(jittered.student_global, jittered.teacher_global)


def test_views_are_deterministic_and_accept_tensors() -> None:
    img = np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    cfg = ViewConfig(global_size=32, local_size=16, num_local=2)
    a = make_views(img, cfg, torch.Generator().manual_seed(7))
    b = make_views(torch.from_numpy(img).permute(2, 0, 1), cfg, torch.Generator().manual_seed(7))
    c = make_views(img, cfg, torch.Generator().manual_seed(8))
    assert a.student_global.shape == (2, 3, 32, 32) and a.student_local.shape == (2, 3, 16, 16)
    assert a.boxes.shape == (4, 4) and a.student_global.dtype == torch.float32
    for name in ("student_global", "teacher_global", "student_local", "boxes"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.boxes, c.boxes)
    with pytest.raises(TypeError):
        make_views(img.astype(np.float32), cfg, torch.Generator())


def test_normalisation_uses_the_config_mean_and_std() -> None:
    img = np.full((40, 40, 3), 200, dtype=np.uint8)
    v = make_views(img, ViewConfig(global_size=16, local_size=8, **PLAIN), torch.Generator().manual_seed(0))
    want = (200 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(v.teacher_global[0, :, 5, 5], want, atol=1e-5)


# -- colour ops against per-pixel references ----------------------------------------------------------
@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))


def test_grayscale_weights(pixels: torch.Tensor) -> None:
    r, g, b = pixels[0, 2, 3].item(), pixels[1, 2, 3].item(), pixels[2, 2, 3].item()
    want = 0.2989 * r + 0.587 * g + 0.114 * b
    assert GRAY_WEIGHTS == (0.2989, 0.587, 0.114)
    assert grayscale(pixels).shape == (1, 5, 7)
    assert grayscale(pixels)[0, 2, 3].item() == pytest.approx(want, abs=1e-6)


def test_brightness_contrast_saturation(pixels: torch.Tensor) -> None:
    x = pixels.numpy().astype(np.float64)
    lum = 0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    for f in (0.3, 1.0, 1.7):
        np.testing.assert_allclose(adjust_brightness(pixels, f).numpy(), np.clip(x * f, 0, 1), atol=1e-6)
        want_c = np.clip(f * x + (1 - f) * lum.mean(), 0, 1)
        np.testing.assert_allclose(adjust_contrast(pixels, f).numpy(), want_c, atol=1e-6)
        want_s = np.clip(f * x + (1 - f) * lum[None], 0, 1)
        np.testing.assert_allclose(adjust_saturation(pixels, f).numpy(), want_s, atol=1e-6)


def test_hsv_round_trip_and_hue_shift_match_colorsys(pixels: torch.Tensor) -> None:
    x = torch.cat([pixels, torch.tensor([[[0.5]], [[0.5]], [[0.5]]]).expand(3, 5, 1)], dim=2)  # greys too
    hsv = rgb_to_hsv(x)
    assert torch.allclose(hsv_to_rgb(hsv), x, atol=1e-6)
    for shift in (-0.2, 0.07, 0.2):
        out = adjust_hue(x, shift)
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                h, s, v = colorsys.rgb_to_hsv(*x[:, i, j].tolist())
                if s > 0:
                    assert hsv[0, i, j].item() == pytest.approx(h, abs=1e-5)
                want = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
                assert out[:, i, j].tolist() == pytest.approx(list(want), abs=1e-5)


def test_gaussian_blur_matches_a_direct_convolution() -> None:
    x = torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(2))
    k, sigma = 7, 1.3
    t = np.arange(k) - (k - 1) / 2
    w1 = np.exp(-0.5 * (t / sigma) ** 2)
    w1 /= w1.sum()
    w2 = np.outer(w1, w1)
    padded = np.pad(x.numpy().astype(np.float64), ((0, 0), (3, 3), (3, 3)), mode="reflect")
    want = np.zeros((3, 9, 11))
    for i in range(9):
        for j in range(11):
            want[:, i, j] = (padded[:, i : i + k, j : j + k] * w2).sum(axis=(1, 2))
    np.testing.assert_allclose(gaussian_blur(x, k, sigma).numpy(), want, atol=1e-5)


# -- overlap boxes and ROI-align ------------------------------------------------------------------------
def test_overlap_boxes_in_each_crops_frame() -> None:
    a = torch.tensor([0.0, 0.0, 0.5, 0.5])
    b = torch.tensor([0.25, 0.25, 0.75, 1.0])
    got = overlap_boxes(a, b)
    assert got is not None
    ra, rb = got
    assert torch.allclose(ra, torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert torch.allclose(rb, torch.tensor([0.0, 0.0, 0.5, 1 / 3]))
    assert overlap_boxes(a, torch.tensor([0.6, 0.0, 0.9, 0.4])) is None
    boxes = torch.rand(5, 2, 2).sort(dim=1).values.transpose(1, 2).reshape(5, 4)  # (x0, y0, x1, y1)
    boxes = boxes[:, [0, 2, 1, 3]]
    ba, bb, valid = overlap_boxes_batched(boxes[:, None], boxes[None, :])
    assert ba.shape == (5, 5, 4) and valid.shape == (5, 5)
    for i in range(5):
        for j in range(5):
            single = overlap_boxes(boxes[i], boxes[j])
            assert (single is not None) == bool(valid[i, j])
            if single is not None:
                assert torch.allclose(single[0], ba[i, j]) and torch.allclose(single[1], bb[i, j])


def test_views_reject_bad_configs() -> None:
    with pytest.raises(ValueError):
        ViewConfig(blur_kernel=6)
    with pytest.raises(ValueError):
        ViewConfig(local_scale=(0.2, 0.1))
    assert ViewConfig().num_crops == 6
    assert math.isclose(ViewConfig().ratio[0], 0.75)
