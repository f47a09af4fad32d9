"""The prototype memory bank and the one-time k-means initialisation of the object prototypes
(§2.2 of the method notes).

The bank caches the student's last-block INPUT tokens, one adaptively average-pooled k×k×D sample
per image (per student global crop), newest first. Until it is full it takes every sample of a
step; afterwards at most `add_per_step` random ones (32 in the release). When it first fills,
k-means over the L2-normalised flattened samples (random initial centres, dead clusters re-seeded,
stop when the mean distance no longer changes or after `iterations`) gives the M prototypes,
computed on rank 0 and broadcast (`CoTAPMethod`). After that the prototypes learn only from the entropy loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def pool_tokens(tokens: torch.Tensor, grid: tuple[int, int], size: int) -> torch.Tensor:
    """Patch tokens of (B, 1+N, D) block inputs (CLS first) → (B, D, size, size) pooled samples."""
    b, n1, d = tokens.shape
    h, w = grid
    if n1 != 1 + h * w:
        raise ValueError(f"{n1 - 1} patch tokens do not form a {h}x{w} grid")
    maps = tokens[:, 1:].transpose(1, 2).reshape(b, d, h, w)
    return F.adaptive_avg_pool2d(maps.float(), size)


class PrototypeBank:
    """FIFO cache of (D, k, k) samples with a `full` flag and the `initialized` flag of the prototypes."""

    def __init__(self, size: int, dim: int, kernel_size: int = 3, add_per_step: int = 32) -> None:
        if size < 1 or dim < 1 or kernel_size < 1 or add_per_step < 1:
            raise ValueError(
                f"bank size, dim, kernel_size and add_per_step must be positive, got {size}, {dim}, {kernel_size}, {add_per_step}"
            )
        self.size, self.dim, self.kernel_size, self.add_per_step = size, dim, kernel_size, add_per_step
        self.samples = torch.zeros(0, dim, kernel_size, kernel_size)
        self.initialized = False

    @property
    def full(self) -> bool:
        return self.samples.shape[0] >= self.size

    def __len__(self) -> int:
        return int(self.samples.shape[0])

    @torch.no_grad()
    def update(
        self, last_input: torch.Tensor, grid: tuple[int, int], generator: torch.Generator | None = None
    ) -> None:
        """Add samples pooled from `last_input` (B, 1+N, D), the last block's input tokens."""
        pooled = pool_tokens(last_input.detach(), grid, self.kernel_size)  # (B, D, k, k)
        if pooled.shape[1] != self.dim:
            raise ValueError(f"bank holds width {self.dim}, got tokens of width {pooled.shape[1]}")
        n_keep = min(self.add_per_step, pooled.shape[0]) if self.full else pooled.shape[0]
        keep = torch.randperm(pooled.shape[0], generator=generator)[:n_keep].to(pooled.device)
        if self.samples.device != pooled.device:
            self.samples = self.samples.to(pooled.device)
        self.samples = torch.cat([pooled[keep], self.samples], dim=0)[: self.size]

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples.detach().cpu(), "initialized": self.initialized}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        samples = state["samples"].float()
        if samples.ndim != 4 or samples.shape[1:] != (self.dim, self.kernel_size, self.kernel_size):
            raise ValueError(f"bank samples of shape {tuple(samples.shape)} do not fit this bank")
        self.samples = samples[: self.size].to(self.samples.device)
        self.initialized = bool(state["initialized"])


@torch.no_grad()
def spherical_kmeans(
    samples: torch.Tensor, num_clusters: int, iterations: int = 3000, generator: torch.Generator | None = None
) -> torch.Tensor:
    """k-means on L2-normalised rows of `samples` (N, F) with centres renormalised after each step.

    Centres start at `num_clusters` distinct random samples; a cluster left empty is re-seeded with
    a random sample. Stops when the mean squared distance to the nearest centre repeats exactly.
    Returns (num_clusters, F) unit-norm centres.
    """
    if samples.ndim != 2:
        raise ValueError(f"samples must be (N, F), got {tuple(samples.shape)}")
    n = samples.shape[0]
    if num_clusters < 1 or n < num_clusters:
        raise ValueError(f"k-means needs at least {num_clusters} samples, got {n}")
    x = F.normalize(samples.float(), dim=1)
    centres = x[torch.randperm(n, generator=generator)[:num_clusters].to(x.device)]
    last = None
    for _ in range(iterations):
        dist = torch.cdist(x, centres).pow(2)  # (N, M)
        min_dist, assign = dist.min(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_clusters).to(x.dtype)
        dead = counts == 0
        centres = sums / counts.clamp(min=1).unsqueeze(1)
        if bool(dead.any()):
            reseed = torch.randperm(n, generator=generator)[: int(dead.sum())].to(x.device)
            centres[dead] = x[reseed]
        centres = F.normalize(centres, dim=1)
        mean = float(min_dist.mean())
        if last is not None and mean == last:
            break
        last = mean
    return centres
