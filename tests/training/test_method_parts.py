"""EMA teacher and momentum schedule, projection heads, memory bank and k-means, parameter groups
and schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cotap.training.heads import ProjectionHead
from cotap.training.models import build_model
from cotap.training.prototype_bank import PrototypeBank, pool_tokens, spherical_kmeans
from cotap.training.schedules import LrSchedule, cosine, param_groups
from cotap.training.teacher import ema_update, make_teacher, momentum_at


# -- teacher ---------------------------------------------------------------------------------------------
def test_momentum_schedule_values() -> None:
    assert momentum_at(0, 100) == pytest.approx(0.9997)
    assert momentum_at(100, 100) == pytest.approx(0.9999)
    assert momentum_at(50, 100) == pytest.approx(0.9998)
    assert momentum_at(25, 100) == pytest.approx(
        0.9999 + 0.5 * (0.9997 - 0.9999) * (1 + math.cos(math.pi / 4))
    )
    assert momentum_at(500, 100) == pytest.approx(0.9999)  # clamped past the end
    values = [momentum_at(t, 40, 0.99, 0.999) for t in range(41)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    with pytest.raises(ValueError):
        momentum_at(0, 0)


def test_teacher_is_exact_copy_and_ema_covers_every_parameter() -> None:
    torch.manual_seed(0)
    student = torch.nn.ModuleDict(
        {"backbone": build_model("cotap_test"), "head": ProjectionHead(64, 16, 8, 10)}
    )
    teacher = make_teacher(student)
    for (n, ps), (_, pt) in zip(student.named_parameters(), teacher.named_parameters(), strict=True):
        assert torch.equal(ps, pt), n
        assert not pt.requires_grad
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update(teacher, student, 0.9)
    for n, p in teacher.named_parameters():
        want = 0.9 * before[n] + 0.1 * dict(student.named_parameters())[n]
        assert torch.allclose(p, want, atol=1e-6), n
    assert "backbone.kernel" in before and "head.prototypes.weight_v" in before


# -- heads -----------------------------------------------------------------------------------------------
def test_projection_head_shapes_cosines_and_fixed_gain() -> None:
    torch.manual_seed(1)
    head = ProjectionHead(12, hidden_dim=16, bottleneck_dim=8, num_prototypes=5, num_layers=3)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 16), (16, 16), (16, 8)]
    assert linears[-1].bias is None and all(m.bias is not None for m in linears[:-1])
    x = torch.randn(2, 7, 12)
    out = head(x).detach()
    assert out.shape == (2, 7, 5)
    assert float(out.abs().max()) <= 1 + 1e-5  # cosines
    # g fixed at 1: rescaling the prototype directions changes nothing.
    with torch.no_grad():
        head.prototypes.weight_v.mul_(7.0)
    assert torch.allclose(head(x), out, atol=1e-6)
    assert ProjectionHead(12, num_layers=1, bottleneck_dim=4, num_prototypes=3)(x).shape == (2, 7, 3)
    with pytest.raises(ValueError):
        head(torch.randn(3, 11))


# -- memory bank and k-means ----------------------------------------------------------------------------
def test_pool_tokens_matches_mean_of_blocks() -> None:
    tokens = torch.randn(2, 1 + 6 * 6, 4)
    pooled = pool_tokens(tokens, (6, 6), 3)
    maps = tokens[:, 1:].reshape(2, 6, 6, 4)
    assert torch.allclose(pooled[:, :, 1, 2], maps[:, 2:4, 4:6].mean(dim=(1, 2)), atol=1e-6)
    with pytest.raises(ValueError):
        pool_tokens(tokens, (5, 6), 3)


def test_bank_fills_then_adds_a_few_per_step() -> None:
    bank = PrototypeBank(size=10, dim=4, kernel_size=3, add_per_step=2)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        tokens = torch.full((4, 1 + 9, 4), float(step))
        bank.update(tokens, (3, 3), g)
    assert len(bank) == 10 and bank.full  # 4 + 4 + 2 (trimmed to size)
    assert float(bank.samples[0].mean()) == 2.0 and float(bank.samples[-1].mean()) == 0.0
    bank.update(torch.full((4, 10, 4), 9.0), (3, 3), g)
    assert len(bank) == 10
    assert (
        float(bank.samples[:2].mean()) == 9.0 and float(bank.samples[2].mean()) == 2.0
    )  # 2 new, newest first
    state = bank.state_dict()
    other = PrototypeBank(10, 4, 3, 2)
    other.load_state_dict(state)
    assert torch.equal(other.samples, bank.samples) and other.initialized == bank.initialized


def test_spherical_kmeans_recovers_clusters_and_reseeds_dead_ones() -> None:
    g = torch.Generator().manual_seed(0)
    dirs = torch.eye(6)[:4] * 5  # four well separated directions
    samples = torch.cat([d + 0.1 * torch.randn(25, 6, generator=g) for d in dirs])
    centres = spherical_kmeans(samples, 4, iterations=100, generator=torch.Generator().manual_seed(1))
    assert centres.shape == (4, 6)
    assert torch.allclose(centres.norm(dim=1), torch.ones(4), atol=1e-5)
    # Each true direction has a centre within a small angle.
    cos = centres @ torch.eye(6)[:4].t()
    assert float(cos.max(dim=0).values.min()) > 0.98
    # More clusters than distinct points: empty clusters are re-seeded, no NaN.
    dup = torch.cat([torch.eye(3)] * 4)
    centres = spherical_kmeans(dup, 5, iterations=10, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(centres).all()
    with pytest.raises(ValueError):
        spherical_kmeans(torch.randn(3, 4), 5)


# -- parameter groups and schedules --------------------------------------------------------------------
def test_param_groups_split_lr_and_decay() -> None:
    backbone = build_model("cotap_test")
    heads = torch.nn.ModuleDict(
        {"patch": ProjectionHead(64, 16, 8, 10), "cls": ProjectionHead(64, 16, 8, 12)}
    )
    groups = param_groups(backbone, heads, lr=1e-4, head_lr_mult=10)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone_decay", "backbone_no_decay", "heads_decay", "heads_no_decay"}
    assert by_name["backbone_decay"]["base_lr"] == 1e-4 and by_name["heads_decay"][
        "base_lr"
    ] == pytest.approx(1e-3)
    assert by_name["backbone_decay"]["decay"] and not by_name["backbone_no_decay"]["decay"]
    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}
    assert id(backbone.kernel) in ids["backbone_decay"]  # prototypes at the backbone lr, decayed
    filter_norm = backbone.filter_block.norm_out_patch.weight
    assert id(filter_norm) in ids["backbone_no_decay"]
    assert id(heads["patch"].prototypes.weight_v) in ids["heads_decay"]
    for name, p in backbone.named_parameters():
        group = "backbone_no_decay" if name.endswith(".bias") or p.ndim == 1 else "backbone_decay"
        assert id(p) in ids[group], name
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(backbone.parameters())) + len(list(heads.parameters()))


def test_lr_and_weight_decay_schedules() -> None:
    sched = LrSchedule(max_steps=100, min_lr=3e-6)
    assert sched.at(3e-5, 0) == pytest.approx(3e-5)
    assert sched.at(3e-5, 100) == pytest.approx(3e-6)
    assert sched.at(3e-4, 50) == pytest.approx(3e-6 + 0.5 * (3e-4 - 3e-6))
    warm = LrSchedule(max_steps=100, min_lr=0.0, warmup_steps=10, warmup_start_lr=0.0)
    assert warm.at(1.0, 0) == 0.0 and warm.at(1.0, 5) == pytest.approx(0.5)
    assert warm.at(1.0, 10) == pytest.approx(1.0) and warm.at(1.0, 100) == pytest.approx(0.0)
    assert cosine(0.024, 0.24, 0, 100) == pytest.approx(0.024)
    assert cosine(0.024, 0.24, 100, 100) == pytest.approx(0.24)
    assert cosine(0.024, 0.24, 50, 100) == pytest.approx(0.132)
