"""`cls_contrastive_loss` against a per-query loop written from its definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cotap.training.losses.cls import cls_contrastive_loss


def naive_infonce(s: torch.Tensor, t: torch.Tensor, temperature: float, exclude: list[int] | None) -> float:
    images, crops, _ = s.shape
    globals_ = t.shape[1]
    total, count = 0.0, 0
    for i in range(images):
        for v in range(crops):
            keys, positives = [], []
            for j in range(images):
                if exclude is not None and j == exclude[i] and j != i:
                    continue
                for g in range(globals_):
                    keys.append(float(s[i, v] @ t[j, g]) / temperature)
                    positives.append(j == i and g != v)
            log_z = math.log(sum(math.exp(k) for k in keys))
            pos = [k - log_z for k, p in zip(keys, positives, strict=True) if p]
            total += -sum(pos) / len(pos)
            count += 1
    return total / count


@pytest.mark.parametrize("with_exclude", [False, True])
def test_cls_contrastive_loss_matches_naive_reference(with_exclude: bool) -> None:
    g = torch.Generator().manual_seed(0)
    s = F.normalize(torch.randn(6, 4, 8, generator=g), dim=-1)  # 6 images, 2 globals + 2 locals
    t = F.normalize(torch.randn(6, 2, 8, generator=g), dim=-1)
    exclude = [3, 4, 5, 0, 1, 2] if with_exclude else None
    got = cls_contrastive_loss(s, t, 0.2, torch.tensor(exclude) if exclude else None)
    assert float(got) == pytest.approx(naive_infonce(s.double(), t.double(), 0.2, exclude), rel=1e-5)


def test_cls_contrastive_loss_is_low_when_crops_agree_and_has_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    t = F.normalize(torch.randn(8, 2, 16, generator=g), dim=-1)
    aligned = t[:, [1, 0]].clone().requires_grad_(True)  # each global sees the other's key exactly
    shuffled = t[torch.randperm(8, generator=g)][:, [1, 0]]
    low = cls_contrastive_loss(aligned, t, 0.1)
    assert float(low.detach()) < float(cls_contrastive_loss(shuffled, t, 0.1))
    low.backward()
    assert aligned.grad is not None and float(aligned.grad.abs().sum()) > 0


def test_cls_contrastive_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="must be"):
        cls_contrastive_loss(torch.zeros(2, 3), torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="does not fit"):
        cls_contrastive_loss(torch.zeros(2, 1, 3), torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="does not fit"):  # one global crop: no positive for it
        cls_contrastive_loss(torch.zeros(2, 3, 3), torch.zeros(2, 1, 3))
