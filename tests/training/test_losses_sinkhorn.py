"""Sinkhorn-Knopp, the CLS losses, the entropy loss and the ROI-aligned within-image loss against
plain references."""

from __future__ import annotations

import math

import pytest
import torch

from cotap.training.losses.cls import multicrop_cls_loss, pair_cls_loss
from cotap.training.losses.entropy import prototype_entropy_loss
from cotap.training.losses.patch_inner import roi_bins_for_grid, roi_patch_loss
from cotap.training.losses.sinkhorn import sinkhorn_knopp


def test_sinkhorn_marginals() -> None:
    g = torch.Generator().manual_seed(0)
    n, k = 60, 8
    scores = torch.rand(n, k, generator=g) * 2 - 1
    codes = sinkhorn_knopp(scores, temperature=0.05, iterations=3)
    assert codes.shape == (n, k) and bool((codes >= 0).all())
    # Every sample's code is a distribution.
    assert torch.allclose(codes.sum(dim=1), torch.ones(n), atol=1e-5)
    # The prototypes share the mass: after 3 iterations close to equal, and converging with more.
    cols3 = codes.sum(dim=0)
    cols50 = sinkhorn_knopp(scores, temperature=0.05, iterations=50).sum(dim=0)
    assert float((cols50 - n / k).abs().max()) < 1e-3 * n
    assert float((cols3 - n / k).abs().max()) < 0.35 * n / k
    # Without iterations it is a plain softmax over prototypes.
    plain = torch.softmax(scores / 0.05, dim=1)
    assert torch.allclose(sinkhorn_knopp(scores, 0.05, 0), plain, atol=1e-6)


def test_sinkhorn_is_stable_for_sharp_temperatures_and_rejects_bad_input() -> None:
    scores = torch.tensor([[50.0, -50.0], [-50.0, 50.0]])
    codes = sinkhorn_knopp(scores, temperature=0.05)
    assert torch.isfinite(codes).all()
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(0, 3), 0.1)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(3), 0.1)


def test_multicrop_cls_loss_reference() -> None:
    g = torch.Generator().manual_seed(1)
    i, gl, v, k = 3, 2, 5, 7
    codes = torch.softmax(torch.randn(i, gl, k, generator=g), dim=-1)
    student = torch.randn(i, v, k, generator=g)
    got = multicrop_cls_loss(codes, student, temperature=0.1)
    terms = []
    for c in range(gl):
        sub = 0.0
        for other in range(v):
            if other == c:
                continue
            logp = torch.log_softmax(student[:, other] / 0.1, dim=-1)
            sub += float(-(codes[:, c] * logp).sum(-1).mean())
        terms.append(sub / (v - 1))
    assert float(got) == pytest.approx(sum(terms) / gl, rel=1e-5)


def test_pair_cls_loss_reference() -> None:
    g = torch.Generator().manual_seed(2)
    b, gl, k = 2, 2, 5
    codes = torch.softmax(torch.randn(2 * b, gl, k, generator=g), dim=-1)
    student = torch.randn(2 * b, gl, k, generator=g)
    got = pair_cls_loss(codes, student, temperature=0.2)
    total, count = 0.0, 0
    for img in range(2 * b):
        pair = img + b if img < b else img - b
        for tc in range(gl):
            for sc in range(gl):
                logq = torch.log_softmax(student[img, sc] / 0.2, dim=-1)
                total += float(-(codes[pair, tc] * logq).sum())
                count += 1
    assert float(got) == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError):
        pair_cls_loss(codes[:3], student[:3])


def test_entropy_loss_reference_and_gradient_path() -> None:
    g = torch.Generator().manual_seed(3)
    kernel = torch.randn(4, 3, 2, 2, generator=g, requires_grad=True)
    samples = torch.randn(9, 3, 2, 2, generator=g, requires_grad=True)
    got = prototype_entropy_loss(kernel, samples, temperature=0.1)
    want = 0.0
    for m in range(4):
        p = kernel[m].detach().flatten()
        sims = [
            float(p @ samples[n].detach().flatten())
            / (float(p.norm()) * float(samples[n].detach().flatten().norm()))
            for n in range(9)
        ]
        logits = [s / 0.1 for s in sims]
        top = max(logits)
        z = sum(math.exp(v - top) for v in logits)
        probs = [math.exp(v - top) / z for v in logits]
        want += -sum(q * math.log(q) for q in probs)
    assert float(got.detach()) == pytest.approx(want / 4, rel=1e-5)
    got.backward()
    assert kernel.grad is not None and kernel.grad.abs().sum() > 0
    assert samples.grad is None  # the bank samples are constants
    with pytest.raises(ValueError):
        prototype_entropy_loss(kernel, torch.randn(5, 4, 2, 2))


def test_roi_bins_rule() -> None:
    assert roi_bins_for_grid(14) == 6
    assert roi_bins_for_grid(28) == 6
    assert roi_bins_for_grid(8) == 3
    assert roi_bins_for_grid(4) == 2
    assert roi_bins_for_grid(1) == 1


def test_roi_patch_loss_on_identical_full_crops_is_masked_cross_entropy() -> None:
    """Both global crops cover the whole image: ROI-align with bins = grid and one sample per bin is
    the identity, so the loss is the plain cross-entropy over foreground patches."""
    g = torch.Generator().manual_seed(4)
    i, gl, k, h, w = 3, 2, 6, 4, 4
    codes = torch.softmax(torch.randn(i, gl, k, h, w, generator=g), dim=2)
    student = torch.randn(i, gl, k, h, w, generator=g, requires_grad=True)
    masks = (torch.rand(i, gl, h, w, generator=g) > 0.4).float()
    boxes = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(i, gl, 4).clone()
    got = roi_patch_loss(codes, masks, student, None, boxes, bins=4, temperature=0.1, sampling_ratio=1)
    want = 0.0
    for c in range(gl):
        v = 1 - c
        logp = torch.log_softmax(student[:, v].detach() / 0.1, dim=1)
        ce = -(codes[:, c] * logp).sum(dim=1)  # (I, h, w)
        want += float((ce * masks[:, c]).sum() / masks[:, c].sum())
    assert float(got.detach()) == pytest.approx(want / gl, rel=1e-5)
    got.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_roi_patch_loss_aligns_shifted_crops() -> None:
    """Crop 0 is the whole image (left half prototype 0, right half prototype 1), crop 1 its right
    half. A student that predicts prototype 1 on crop 1 fits the overlap; the loss must see that
    through the boxes (claiming both crops cover the same region makes the same student worse)."""
    k, h = 3, 4
    codes = torch.zeros(1, 2, k, h, h)
    codes[0, 0, 0, :, :2] = 1  # crop 0, left half
    codes[0, 0, 1, :, 2:] = 1  # crop 0, right half
    codes[0, 1, 1] = 1  # crop 1 = the right half
    masks = torch.ones(1, 2, h, h)
    student = torch.zeros(1, 2, k, h, h)
    student[0, 0] = codes[0, 0] * 0.5  # crop 0 predicts its own layout
    student[0, 1, 1] = 0.5  # crop 1 predicts prototype 1
    boxes = torch.tensor([[[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.0, 1.0]]])
    good = float(roi_patch_loss(codes, masks, student, None, boxes, bins=2))
    wrong_geometry = float(roi_patch_loss(codes, masks, student, None, boxes[:, [0, 0]], bins=2))
    bad_student = student.clone()
    bad_student[0, 1] = 0
    bad_student[0, 1, 0] = 0.5
    bad = float(roi_patch_loss(codes, masks, bad_student, None, boxes, bins=2))
    assert good < wrong_geometry and good < bad
    # Crops that do not overlap contribute no bins.
    apart = torch.tensor([[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]])
    assert float(roi_patch_loss(codes, masks, student, None, apart, bins=2)) == 0.0


def test_roi_patch_loss_with_local_crops_and_bad_shapes() -> None:
    g = torch.Generator().manual_seed(8)
    i, k = 2, 5
    codes = torch.softmax(torch.randn(i, 2, k, 4, 4, generator=g), dim=2)
    student = torch.randn(i, 2, k, 4, 4, generator=g)
    local = torch.randn(i, 3, k, 2, 2, generator=g, requires_grad=True)
    boxes = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],
            [0.2, 0.2, 0.9, 0.9],
            [0.1, 0.1, 0.4, 0.4],
            [0.5, 0.5, 0.8, 0.8],
            [0.3, 0.0, 0.6, 0.3],
        ]
    )
    boxes = boxes.expand(i, 5, 4).clone()
    loss = roi_patch_loss(codes, torch.ones(i, 2, 4, 4), student, local, boxes, bins=2)
    loss.backward()
    assert local.grad is not None and local.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="boxes"):
        roi_patch_loss(codes, torch.ones(i, 2, 4, 4), student, local, boxes[:, :4], bins=2)
    with pytest.raises(ValueError, match="masks"):
        roi_patch_loss(codes, torch.ones(i, 2, 3, 4), student, None, boxes[:, :2], bins=2)
