"""Gate arithmetic against hand-computed figures, and the fixtures it runs on."""

from __future__ import annotations

import math

import numpy as np

from cotap.export.fixtures import synthetic_images
from cotap.export.gate import THRESHOLDS, GateThresholds, compare_outputs

T = GateThresholds(
    patch_cos_mean=0.99, patch_cos_min=0.9, cls_cos_mean=0.99, argmax_agreement=0.9, margin=0.1
)


def _outputs(patch: np.ndarray, assign: np.ndarray) -> dict[str, np.ndarray]:
    # patch (1, 2, 2, C), assign (1, 2, 2, M), cls = the mean patch
    return {"patch": patch, "cls": patch.mean(axis=(1, 2)), "assign": assign}


def test_cosine_figures_match_known_angles() -> None:
    angles = [0.0, 0.1, 0.2, 0.3]  # radians, one per patch
    ref = np.zeros((1, 2, 2, 2), np.float32)
    got = np.zeros_like(ref)
    for i, a in enumerate(angles):
        y, x = divmod(i, 2)
        ref[0, y, x] = [1.0, 0.0]
        got[0, y, x] = [2 * math.cos(a), 2 * math.sin(a)]  # length does not matter
    assign = np.full((1, 2, 2, 3), 1 / 3, np.float32)
    r = compare_outputs(_outputs(ref, assign), _outputs(got, assign), T)
    assert math.isclose(r.patch_cos_mean, sum(math.cos(a) for a in angles) / 4, rel_tol=1e-6)
    assert math.isclose(r.patch_cos_min, math.cos(0.3), rel_tol=1e-6)
    assert r.argmax_agreement is None and r.argmax_excluded_fraction == 1.0  # uniform: all excluded
    assert any("patch cos mean" in f for f in r.failures)  # 0.9713 < 0.99
    assert not any("argmax" in f for f in r.failures)


def test_argmax_agreement_ignores_near_ties() -> None:
    patch = np.ones((1, 2, 2, 4), np.float32)
    ref_assign = np.array(
        [[[[0.8, 0.1, 0.1], [0.1, 0.7, 0.2]], [[0.34, 0.33, 0.33], [0.35, 0.34, 0.31]]]], np.float32
    )  # margins 0.7, 0.5 (clear), 0.01, 0.01 (ties)
    got_assign = ref_assign.copy()
    got_assign[0, 1, 0] = [0.33, 0.34, 0.33]  # a tie flips: excluded, no failure
    r = compare_outputs(_outputs(patch, ref_assign), _outputs(patch, got_assign), T)
    assert r.argmax_agreement == 1.0 and r.argmax_excluded_fraction == 0.5 and r.passed
    got_assign[0, 0, 1] = [0.1, 0.2, 0.7]  # a clear winner flips: 1 of 2 counted patches disagrees
    r = compare_outputs(_outputs(patch, ref_assign), _outputs(patch, got_assign), T)
    assert r.argmax_agreement == 0.5 and not r.passed
    assert r.failures == ["argmax agreement 50.00% < 90%"]


def test_thresholds_are_at_least_the_issue_minimums() -> None:
    for precision, (cos, agree) in {
        "fp32": (0.9999, 0.99),
        "fp16": (0.999, 0.98),
        "int8": (0.99, 0.95),
    }.items():
        t = THRESHOLDS[precision]
        assert t.patch_cos_mean >= cos and t.argmax_agreement >= agree


def test_fixtures_are_deterministic_and_photo_like() -> None:
    a, b = synthetic_images(3), synthetic_images(3)
    assert [np.asarray(x).tobytes() for x in a] == [np.asarray(x).tobytes() for x in b]
    assert a[0].size == (256, 192) and a[1].size == (192, 256)
    arr = np.asarray(a[0]).astype(np.float32)
    assert arr.std() > 20  # structure, not a flat image
    # neighbouring pixels correlate (smooth regions), unlike noise
    corr = np.corrcoef(arr[:, :-1, 0].ravel(), arr[:, 1:, 0].ravel())[0, 1]
    assert corr > 0.8
