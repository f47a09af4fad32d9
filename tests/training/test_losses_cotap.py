"""The CoTAP loss (§3.2) against a plain per-element loop of its formula, and the pair construction."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from cotap.training.losses.continuous_ap import continuous_ap_loss, huber_step
from cotap.training.losses.patch_intra import derangement, patch_intra_loss, pool_sizes_for_grid


def reference_loss(
    t: list[float], s: torch.Tensor, y: list[int], tau: float, theta: float, alpha: float
) -> torch.Tensor:
    """§3.2 written out item by item with Python control flow (s is a 1-D leaf tensor)."""
    n = len(t)

    def phi(x: torch.Tensor) -> torch.Tensor:
        v = float(x.detach())
        if v >= tau:
            return x * 0.0
        if v >= 0:
            return (x / tau - 1.0) ** 2
        return 1.0 - 2.0 * x / tau

    num = s.new_zeros(())
    den = 0.0
    for k in range(n):
        n_k = s.new_zeros(())
        p_k = 0
        for j in range(n):
            gap = t[k] - t[j]
            if gap > 0:
                n_k = n_k + gap * phi(s[k] - s[j])
            if t[j] >= t[k] and float(s[j].detach()) >= float(s[k].detach()):
                p_k += 1
        ell = n_k / (p_k + 1e-5)
        g_k = ell / (1 + ell)
        w_k = max(t[k] - theta, 0.0) * (alpha if y[k] == 0 else 1.0)
        num = num + w_k * g_k
        den += w_k
    return num / (den + 1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_continuous_ap_matches_loop_with_ties(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 40
    # Values on a coarse lattice so that both t and s have many exact ties.
    t = torch.randint(-4, 9, (n,), generator=g).double() / 8  # in [-0.5, 1]
    s = torch.randint(-8, 9, (n,), generator=g).double() / 8
    y = (torch.rand(n, generator=g) < 0.4).long()
    assert len(set(t.tolist())) < n and len(set(s.tolist())) < n  # ties present
    for tau, theta, alpha in [(0.5, -0.2, 0.1), (0.3, 0.1, 0.5)]:
        s1 = s.clone().requires_grad_(True)
        got = continuous_ap_loss(t, s1, y, tau=tau, theta=theta, alpha=alpha)
        got.backward()
        s2 = s.clone().requires_grad_(True)
        want = reference_loss(t.tolist(), s2, y.tolist(), tau, theta, alpha)
        want.backward()
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), (float(got), float(want))
        assert s1.grad is not None and s2.grad is not None
        assert s2.grad.abs().sum() > 0
        assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


def test_continuous_ap_accepts_any_equal_shape_and_ignores_teacher_grad() -> None:
    g = torch.Generator().manual_seed(3)
    t = torch.rand(3, 4, 5, generator=g, requires_grad=True)
    s = torch.rand(3, 4, 5, generator=g, requires_grad=True)
    y = torch.ones(3, 4, 5)
    loss = continuous_ap_loss(t, s, y)
    loss.backward()
    assert t.grad is None and s.grad is not None
    flat = continuous_ap_loss(t.detach().flatten(), s.detach().flatten(), y.flatten())
    assert torch.allclose(loss.detach(), flat)


def test_continuous_ap_perfect_ranking_is_small_and_inverted_is_large() -> None:
    t = torch.linspace(1, 0, 20)
    y = torch.ones(20)
    good = continuous_ap_loss(t, t * 10, y)  # same order, margins ≥ τ: no soft negatives above
    bad = continuous_ap_loss(t, -t * 10, y)
    assert float(good) < 1e-6
    assert float(bad) > 0.5


def test_continuous_ap_bad_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        continuous_ap_loss(torch.zeros(3), torch.zeros(4), torch.zeros(3))
    with pytest.raises(ValueError, match="non-empty"):
        continuous_ap_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0))


def test_huber_step_values() -> None:
    x = torch.tensor([-1.0, -0.25, 0.0, 0.25, 0.5, 2.0])
    want = torch.tensor([1 + 2 / 0.5, 1 + 0.5 / 0.5, 1.0, 0.25, 0.0, 0.0])
    assert torch.allclose(huber_step(x, 0.5), want)


def test_pool_sizes_rule() -> None:
    assert pool_sizes_for_grid(14) == (7, 14)
    assert pool_sizes_for_grid(28) == (7, 14)
    assert pool_sizes_for_grid(8) == (4, 8)
    assert pool_sizes_for_grid((12, 16)) == (6, 12)
    assert pool_sizes_for_grid(4) == (2, 4)
    assert pool_sizes_for_grid(1) == (1,)


def test_derangement_has_no_fixed_points() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 7):
        for _ in range(20):
            p = derangement(n, g)
            assert sorted(p.tolist()) == list(range(n))
            assert all(p[i] != i for i in range(n))
    with pytest.raises(ValueError):
        derangement(1)


def reference_patch_intra(student, teacher, masks, pool_sizes, topk, perms_by_size, tau, theta, alpha):
    """Independent construction: per image pick cells, then build the list item by item; the
    negatives of pooling size pool_sizes[j] are the derangements perms_by_size[j]."""
    i, c = student.shape[:2]
    b = i // 2
    losses = []
    for ks, perms in zip(pool_sizes, perms_by_size, strict=True):
        cells_s, cells_t = [], []
        for img in range(i):
            cs, ct, cm = [], [], []
            for crop in range(c):
                ps = F.adaptive_avg_pool2d(student[img, crop], ks)  # (K, ks, ks)
                pt = F.adaptive_avg_pool2d(teacher[img, crop], ks)
                pm = F.adaptive_avg_pool2d(masks[img, crop][None], ks)[0]
                for r, q in itertools.product(range(ks), range(ks)):
                    cs.append(ps[:, r, q])
                    ct.append(pt[:, r, q])
                    cm.append(float(pm[r, q]))
            order = sorted(range(len(cm)), key=lambda j: -cm[j])[:topk]
            cells_s.append([cs[j] for j in order])
            cells_t.append([ct[j] for j in order])
        t_list, s_list, y_list = [], [], []
        for a in range(b):
            partners = [(b + a, 1)] + [(b + int(p[a]), 0) for p in perms]
            for x in range(len(cells_s[a])):
                for partner, label in partners:
                    for yv in range(len(cells_s[partner])):
                        s_list.append(
                            F.cosine_similarity(cells_s[a][x], cells_s[partner][yv], dim=0, eps=1e-5)
                        )
                        t_list.append(
                            float(F.cosine_similarity(cells_t[a][x], cells_t[partner][yv], dim=0, eps=1e-5))
                        )
                        y_list.append(label)
        losses.append(reference_loss(t_list, torch.stack(s_list), y_list, tau, theta, alpha))
    return torch.stack(losses).mean()


def test_patch_intra_matches_independent_construction() -> None:
    g = torch.Generator().manual_seed(5)
    b, c, k, h, w = 4, 2, 6, 4, 4  # 9 derangements of 4: the two pooling sizes' draws differ
    student = torch.randn(2 * b, c, k, h, w, generator=g, dtype=torch.float64)
    teacher = torch.randn(2 * b, c, k, h, w, generator=g, dtype=torch.float64)
    # Distinct mask values per cell so that top-k is unambiguous.
    masks = torch.rand(2 * b, c, h, w, generator=g, dtype=torch.float64)
    gen = torch.Generator().manual_seed(11)
    got = patch_intra_loss(student, teacher, masks, pool_sizes=(2, 4), topk=3, num_negatives=2, generator=gen)
    gen = torch.Generator().manual_seed(11)
    perms_by_size = [[derangement(b, gen) for _ in range(2)] for _ in (2, 4)]  # drawn per size, in order
    assert not all(torch.equal(p, q) for p, q in zip(*perms_by_size, strict=True))
    want = reference_patch_intra(
        student.float(), teacher.float(), masks.float(), (2, 4), 3, perms_by_size, 0.5, -0.2, 0.1
    )
    assert torch.allclose(got, want.float(), rtol=1e-4, atol=1e-5), (float(got), float(want))


def test_patch_intra_uses_each_images_own_mask() -> None:
    """Cells are chosen by the image's own mask: moving only image 0's mask changes the loss."""
    g = torch.Generator().manual_seed(6)
    student = torch.randn(4, 2, 5, 4, 4, generator=g)
    teacher = torch.randn(4, 2, 5, 4, 4, generator=g)
    masks = torch.zeros(4, 2, 4, 4)
    masks[:, :, :2, :2] = 1
    base = patch_intra_loss(
        student,
        teacher,
        masks,
        pool_sizes=(4,),
        topk=2,
        num_negatives=1,
        generator=torch.Generator().manual_seed(0),
    )
    moved = masks.clone()
    moved[0] = 0
    moved[0, :, 2:, 2:] = 1
    other = patch_intra_loss(
        student,
        teacher,
        moved,
        pool_sizes=(4,),
        topk=2,
        num_negatives=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert not torch.allclose(base, other)


def test_patch_intra_l1_mode_and_gradients() -> None:
    g = torch.Generator().manual_seed(7)
    student = torch.randn(4, 2, 5, 4, 4, generator=g, requires_grad=True)
    teacher = student.detach().clone()
    masks = torch.rand(4, 2, 4, 4, generator=g)
    same = patch_intra_loss(
        student, teacher, masks, pool_sizes=(2, 4), mode="l1", generator=torch.Generator().manual_seed(0)
    )
    assert float(same.detach()) == pytest.approx(0.0, abs=1e-6)
    loss = patch_intra_loss(
        student,
        teacher + 0.5 * torch.randn_like(teacher),
        masks,
        pool_sizes=(2,),
        generator=torch.Generator().manual_seed(0),
    )
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_patch_intra_single_pair_has_no_negatives_and_bad_shapes() -> None:
    x = torch.randn(2, 2, 5, 4, 4)
    loss = patch_intra_loss(x, x + 0.1, torch.rand(2, 2, 4, 4), pool_sizes=(2,))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="mode"):
        patch_intra_loss(x, x, torch.rand(2, 2, 4, 4), mode="kl")
    with pytest.raises(ValueError, match="masks"):
        patch_intra_loss(x, x, torch.rand(2, 2, 3, 4))
    with pytest.raises(ValueError, match="odd"):
        patch_intra_loss(x[:1], x[:1], torch.rand(1, 2, 4, 4))
