"""`L_entropy` (§3.5, the release's `EntropyMaxLoss`, which minimises): each prototype's softmax
over the cached memory-bank samples should be peaked, so each prototype commits to a few samples.
It is the only gradient path to the prototypes (the model's forward uses `kernel.detach()`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prototype_entropy_loss(
    kernel: torch.Tensor, samples: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """mean_m H(softmax_n(cos(P_m, c_n) / T)).

    Args:
        kernel: (M, D, k, k) prototypes (gradient flows here).
        samples: (N, D, k, k) cached samples (treated as constants).
    """
    if kernel.ndim != 4 or samples.ndim != 4 or kernel.shape[1:] != samples.shape[1:]:
        raise ValueError(
            f"kernel (M, D, k, k) and samples (N, D, k, k) must agree, got {tuple(kernel.shape)}, {tuple(samples.shape)}"
        )
    if samples.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    p = F.normalize(kernel.float().reshape(kernel.shape[0], -1), dim=1)  # (M, k²D)
    c = F.normalize(samples.detach().float().reshape(samples.shape[0], -1), dim=1)  # (N, k²D)
    logits = p @ c.t() / temperature  # (M, N)
    log_p = torch.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()
