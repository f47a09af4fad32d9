"""Step-indexed schedules and the AdamW parameter groups of the release recipe (§4).

- lr: cosine annealing of every group from its base lr to `min_lr` over `max_steps` (no warm-up by
  default, as in the paper; an optional linear warm-up precedes the cosine);
- weight decay: cosine from 0.024 up to 0.24, applied to the decayed groups only;
- parameter groups: backbone (incl. prototypes and filter norms) at lr, heads at 10× lr; biases
  and 1-D parameters (norms) without weight decay.
Schedules are pure functions of the step, so a resumed run recomputes them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn


def cosine(start: float, end: float, step: int, total: int) -> float:
    """end + ½ (start − end)(1 + cos(π t / T)), clamped to t ∈ [0, T]."""
    if total < 1:
        raise ValueError(f"total must be positive, got {total}")
    t = min(max(step, 0), total)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t / total))


@dataclass(frozen=True)
class LrSchedule:
    max_steps: int
    min_lr: float = 3e-6
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0

    def at(self, base_lr: float, step: int) -> float:
        """The lr of a group whose base lr is `base_lr`, at `step`."""
        if step < self.warmup_steps:
            return self.warmup_start_lr + (base_lr - self.warmup_start_lr) * step / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        return cosine(base_lr, self.min_lr, step - self.warmup_steps, span)


def param_groups(
    backbone: nn.Module, heads: nn.Module, lr: float, head_lr_mult: float = 10.0
) -> list[dict[str, Any]]:
    """AdamW groups: backbone/heads × decay/no-decay, each tagged with `name`, `base_lr` and
    `decay` (whether the weight-decay schedule applies). Frozen and empty groups are dropped."""
    groups: list[dict[str, Any]] = []
    for prefix, module, base in (("backbone", backbone, lr), ("heads", heads, lr * head_lr_mult)):
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
        for suffix, params, wd in (("decay", decay, True), ("no_decay", no_decay, False)):
            if params:
                groups.append(
                    {"params": params, "name": f"{prefix}_{suffix}", "base_lr": base, "lr": base, "decay": wd}
                )
    return groups
