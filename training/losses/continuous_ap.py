"""The Continuous-Target AP loss of CoTAP (reference/cotap-method.md §3.2).

A ranking loss over one flat list of items: each item k has a teacher similarity t_k (a continuous
relevance, no gradient), a student similarity s_k and a pair label y_k (1: the item comes from the
positive anchor↔partner block, 0: from a random-negative block). For every k,

    φ_τ(x) = (min(x, τ)/τ − 1)²  if x ≥ 0,   1 − 2x/τ  if x < 0          (smooth step, φ_τ(0) = 1)
    N_k    = Σ_l (t_k − t_l)_+ · φ_τ(s_k − s_l)                           (soft negatives above k)
    P_k    = Σ_l 1[t_l ≥ t_k] · 1[s_l ≥ s_k]                               (no gradient; l = k counts)
    g_k    = ℓ_k / (1 + ℓ_k),   ℓ_k = N_k / (P_k + 1e-5)                    (≈ N_k / (P_k + N_k))
    w_k    = max(t_k − θ, 0) · (α if y_k = 0 else 1)
    L      = Σ_k w_k g_k / (Σ_k w_k + 1e-5)

No threshold ever binarises the teacher similarities ("decision-agnostic"), and mis-orderings among
highly relevant items dominate ("adaptive focusing"). The pairwise form costs O(n²) time and
memory, which is fine at the list sizes of the method (n = B·5·30 per pooling size).
"""

from __future__ import annotations

import torch


def huber_step(x: torch.Tensor, tau: float) -> torch.Tensor:
    """φ_τ(x): 1 at x = 0, falling to 0 at x = τ and staying there, growing linearly for x < 0."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    xc = x.clamp(max=tau)
    return torch.where(xc >= 0, (xc / tau - 1) ** 2, 1 - 2 * xc / tau)


def continuous_ap_loss(
    t: torch.Tensor,
    s: torch.Tensor,
    y: torch.Tensor,
    tau: float = 0.5,
    theta: float = -0.2,
    alpha: float = 0.1,
) -> torch.Tensor:
    """The §3.2 loss over one list.

    Args:
        t: teacher similarities, any shape; treated as constants (detached).
        s: student similarities, same shape as `t`; the gradient flows through these.
        y: pair labels, same shape, 1 for the positive block and 0 for random negatives.
        tau: margin of the smooth step φ_τ.
        theta: relevance threshold of the item weights w_k = max(t_k − θ, 0).
        alpha: down-weighting of label-0 items.

    Returns:
        A scalar (float32), differentiable in `s`.
    """
    if t.shape != s.shape or y.shape != s.shape:
        raise ValueError(
            f"t, s and y must have the same shape, got {tuple(t.shape)}, {tuple(s.shape)}, {tuple(y.shape)}"
        )
    if s.numel() == 0:
        raise ValueError("continuous_ap_loss needs a non-empty list")
    t = t.detach().reshape(-1).float()  # (n,)
    s = s.reshape(-1).float()  # (n,)
    y = y.detach().reshape(-1)  # (n,)
    gap = (t[:, None] - t[None, :]).clamp(min=0)  # (n, n): (t_k − t_l)_+
    neg = (gap * huber_step(s[:, None] - s[None, :], tau)).sum(dim=1)  # (n,) N_k
    with torch.no_grad():
        above = (t[None, :] >= t[:, None]) & (s[None, :] >= s[:, None])  # (n, n) [k, l]
        pos = above.sum(dim=1).to(s.dtype)  # (n,) P_k
        weight = (t - theta).clamp(min=0) * torch.where(y == 0, alpha, 1.0).to(s.dtype)  # (n,)
    ratio = neg / (pos + 1e-5)
    g = ratio / (1 + ratio)
    return (weight * g).sum() / (weight.sum() + 1e-5)
