"""FIFO queues of teacher prototype scores that widen the Sinkhorn equipartition beyond one batch
(the release keeps 262,144 patch scores and 32,768 CLS scores, split across GPUs)."""

from __future__ import annotations

from typing import Any

import torch


class FeatureQueue:
    """Holds up to `capacity` rows of width `dim`, newest first; each push adds at most `max_add`
    randomly chosen rows and drops the oldest. Capacity 0 disables the queue."""

    def __init__(self, capacity: int, dim: int, max_add: int) -> None:
        if capacity < 0 or dim < 1 or max_add < 1:
            raise ValueError(f"need capacity ≥ 0, dim ≥ 1 and max_add ≥ 1, got {capacity}, {dim}, {max_add}")
        self.capacity, self.dim, self.max_add = capacity, dim, max_add
        self.rows = torch.zeros(0, dim)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def contents(self, device: torch.device | None = None) -> torch.Tensor:
        """(n, dim) float32 rows, newest first."""
        return self.rows.to(device) if device is not None else self.rows

    @torch.no_grad()
    def push(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Add up to `max_add` random rows of `x` (n, dim)."""
        if not self.enabled or x.shape[0] == 0:
            return
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"queue rows must be (n, {self.dim}), got {tuple(x.shape)}")
        keep = torch.randperm(x.shape[0], generator=generator)[: self.max_add].to(x.device)
        new = x.detach().float()[keep]
        if self.rows.device != new.device:
            self.rows = self.rows.to(new.device)
        self.rows = torch.cat([new, self.rows], dim=0)[: self.capacity]

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "dim": self.dim, "rows": self.rows.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["dim"]) != self.dim:
            raise ValueError(f"queue width {state['dim']} does not match {self.dim}")
        self.rows = state["rows"].float()[: self.capacity].to(self.rows.device)
