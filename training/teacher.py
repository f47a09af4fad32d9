"""The EMA teacher (§2.1): an exact copy of the student at the start, then θ_T ← m θ_T + (1 − m) θ_S
after every optimiser step, over every parameter (backbone, prototypes, filter norms and heads),
with the momentum following a cosine from m0 (0.9997 in all release scripts) to 0.9999."""

from __future__ import annotations

import copy
import math
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def momentum_at(step: int, max_steps: int, start: float = 0.9997, end: float = 0.9999) -> float:
    """m_t = end + ½ (start − end)(1 + cos(π t / T)): `start` at t = 0, `end` at t = T."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    if not (0 <= start <= 1 and 0 <= end <= 1):
        raise ValueError(f"momenta must lie in [0, 1], got {start}, {end}")
    t = min(max(step, 0), max_steps)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t / max_steps))


def make_teacher(student: M) -> M:
    """An exact, gradient-free copy of `student` in eval mode."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_T ← m θ_T + (1 − m) θ_S for every parameter, paired by name."""
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError(
            "teacher and student parameters differ: " + ", ".join(sorted(t_params.keys() ^ s_params.keys()))
        )
    names = sorted(t_params)
    ts: list[torch.Tensor] = [t_params[n] for n in names]
    ss = [s_params[n].detach().to(t_params[n].dtype) for n in names]
    torch._foreach_mul_(ts, momentum)
    torch._foreach_add_(ts, ss, alpha=1 - momentum)
