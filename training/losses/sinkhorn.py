"""Sinkhorn-Knopp equipartition (SwAV), as the release applies it to teacher prototype scores.

Scores (n, K) become soft codes whose rows sum to 1 while every prototype receives about the same
total mass over the n samples. Under DDP the sums run over all ranks (`all_reduce_sum`), so the
equipartition is over the global batch, as in the release.
"""

from __future__ import annotations

import torch

from cotap.training.distributed import all_reduce_max, all_reduce_sum, world_size


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """Soft codes for `scores` (n, K): (n, K) float32, each row summing to 1.

    Q = exp(scores/T)ᵀ is scaled alternately so that each prototype (row of Q) holds 1/K of the mass
    and each sample (column) 1/n, `iterations` times; the columns are then renormalised to sum 1.
    """
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty (n, K) matrix, got {tuple(scores.shape)}")
    if temperature <= 0 or iterations < 0:
        raise ValueError(f"need temperature > 0 and iterations ≥ 0, got {temperature}, {iterations}")
    x = scores.detach().float() / temperature
    top = all_reduce_max(x.max().clone())
    q = torch.exp(x - top).t()  # (K, n); the shift cancels in the normalisations
    q /= all_reduce_sum(q.sum())
    k, n = q.shape
    r = 1.0 / k
    c = 1.0 / (world_size() * n)
    rows = all_reduce_sum(q.sum(dim=1))
    for _ in range(iterations):
        q *= (r / rows).unsqueeze(1)
        q *= (c / q.sum(dim=0)).unsqueeze(0)
        rows = all_reduce_sum(q.sum(dim=1))
    return (q / q.sum(dim=0, keepdim=True)).t()
