"""`L_patch_intra`: the cross-image patch-correspondence distillation of CoTAP (§3.2), i.e. the pair
construction around `continuous_ap_loss`, and its L1 ablation.

For every pooling size ks (7 and 14 at 224 px, scaled to smaller grids by `pool_sizes_for_grid`):

1. the patch-head score map of each global crop and its teacher foreground mask are adaptive-avg-pooled
   to ks×ks;
2. per image, the `topk` cells with the largest pooled foreground mass over BOTH global crops are kept;
3. positive block: cosine similarities between the kept cells of each anchor and of its partner
   (topk×topk items, label 1); negative blocks: the same with the partner of another anchor, for
   `num_negatives` random derangements (label 0);
4. teacher (targets t) and student (predictions s) use the same cells and derangements; the whole
   batch forms ONE flat list per pooling size, and the losses of the pooling sizes are averaged.

Each image's cells are chosen with its OWN teacher mask (the aligned masks). The release code
indexes the crop-major masks image-major (§8.2 of the method notes) and so picks cells with other
images' masks; we follow the evident intent instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cotap.training.losses.continuous_ap import continuous_ap_loss

PATCH_INTRA_MODES = ("cotap", "l1")


def pool_sizes_for_grid(
    grid: int | tuple[int, int], sizes: Sequence[int] = (7, 14), reference: int = 14
) -> tuple[int, ...]:
    """The pooling sizes for a global-crop grid: `sizes` as given when the grid is at least
    `reference` (14 = 224 px at patch 16), else each scaled by grid/reference and rounded (at
    least 1, duplicates dropped): an 8×8 grid pools to (4, 8), a 12×12 grid to (6, 12)."""
    g = min(grid) if isinstance(grid, tuple) else int(grid)
    if g < 1:
        raise ValueError(f"grid must be positive, got {grid}")
    if not sizes or any(int(s) < 1 for s in sizes):
        raise ValueError(f"pool sizes must be positive, got {tuple(sizes)}")
    if g >= reference:
        return tuple(int(s) for s in sizes)
    out: list[int] = []
    for s in sizes:
        scaled = max(1, min(g, round(int(s) * g / reference)))
        if scaled not in out:
            out.append(scaled)
    return tuple(out)


def derangement(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random permutation of range(n) with no fixed point (n ≥ 2), by rejection."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    ar = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == ar).any()):
            return perm


def _pooled_cells(maps: torch.Tensor, ks: int) -> torch.Tensor:
    # maps (I, C, K, h, w) -> cells (I, C·ks·ks, K), crop-major then row-major cells
    i, c, k, h, w = maps.shape
    pooled = F.adaptive_avg_pool2d(maps.reshape(i * c, k, h, w), ks)  # (I·C, K, ks, ks)
    return pooled.reshape(i, c, k, ks * ks).permute(0, 1, 3, 2).reshape(i, c * ks * ks, k)


def _pair_lists(
    cells: torch.Tensor, num_anchors: int, perms: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    # cells (2B, k, K) L2-normalised -> similarities (B, (1+R)·k, k) and labels of the same shape
    anchors, partners = cells[:num_anchors], cells[num_anchors:]
    blocks = [torch.einsum("bxc,byc->bxy", anchors, partners)]
    blocks += [torch.einsum("bxc,byc->bxy", anchors, partners[p]) for p in perms]
    sims = torch.cat(blocks, dim=1)
    labels = torch.zeros_like(sims)
    labels[:, : anchors.shape[1]] = 1
    return sims, labels


def patch_intra_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    masks: torch.Tensor,
    *,
    pool_sizes: Sequence[int] = (7, 14),
    topk: int = 5,
    num_negatives: int = 5,
    mode: str = "cotap",
    tau: float = 0.5,
    theta: float = -0.2,
    alpha: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cross-image patch loss over a batch of anchor/partner pairs.

    Args:
        student: (2B, C, K, h, w) student patch-head scores of the C global crops of each image;
            rows 0..B-1 are the anchors, row B+b is the partner of anchor b.
        teacher: (2B, C, K, h, w) the teacher's scores of the same (un-jittered) crops.
        masks: (2B, C, h, w) the teacher foreground masks of the same crops (values in [0, 1]).
        pool_sizes: pooled grid sizes; the loss is averaged over them.
        topk: foreground cells kept per image over its C crops.
        num_negatives: derangement blocks (skipped when B = 1: no other anchor exists).
        mode: "cotap" (the continuous AP loss) or "l1" (mean |s − t|, STEGO-like distillation).
        generator: drives the derangements (drawn anew for each pooling size).

    Returns:
        A scalar loss.
    """
    if mode not in PATCH_INTRA_MODES:
        raise ValueError(f"mode must be one of {PATCH_INTRA_MODES}, got {mode!r}")
    if student.ndim != 5 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher must both be (2B, C, K, h, w), got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    i, c, _, h, w = student.shape
    if i < 2 or i % 2:
        raise ValueError(f"the first axis holds B anchors then B partners; got an odd or too small {i}")
    if masks.shape != (i, c, h, w):
        raise ValueError(f"masks must be {(i, c, h, w)}, got {tuple(masks.shape)}")
    if topk < 1 or num_negatives < 0:
        raise ValueError(f"topk must be ≥ 1 and num_negatives ≥ 0, got {topk}, {num_negatives}")
    b = i // 2
    teacher = teacher.detach().float()
    student = student.float()
    mask_maps = masks.detach().float().unsqueeze(2)  # (2B, C, 1, h, w)
    losses = []
    for ks in pool_sizes:
        # New negatives for each pooling size, as in the method (§3.2) and the released code.
        perms = [derangement(b, generator).to(student.device) for _ in range(num_negatives if b > 1 else 0)]
        s_cells = _pooled_cells(student, ks)  # (2B, C·ks², K)
        t_cells = _pooled_cells(teacher, ks)
        m_cells = _pooled_cells(mask_maps, ks)[..., 0]  # (2B, C·ks²)
        k = min(topk, m_cells.shape[1])
        # Masks are near binary, so fully-foreground cells tie and top-k takes them in index order
        # (crop 0's first cells at the finer size), as the release does; CUDA may order ties otherwise.
        idx = m_cells.topk(k, dim=1).indices  # (2B, k)
        gather = idx.unsqueeze(-1).expand(-1, -1, s_cells.shape[-1])
        s_sel = F.normalize(torch.gather(s_cells, 1, gather), dim=-1, eps=1e-5)  # (2B, k, K)
        t_sel = F.normalize(torch.gather(t_cells, 1, gather), dim=-1, eps=1e-5)
        s_sim, labels = _pair_lists(s_sel, b, perms)  # (B, (1+R)·k, k)
        with torch.no_grad():
            t_sim, _ = _pair_lists(t_sel, b, perms)
        if mode == "cotap":
            losses.append(continuous_ap_loss(t_sim, s_sim, labels, tau=tau, theta=theta, alpha=alpha))
        else:
            losses.append((s_sim - t_sim).abs().mean())
    return torch.stack(losses).mean()
