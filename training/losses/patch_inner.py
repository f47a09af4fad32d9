"""`L_patch_inner`: the Leopart-style within-image dense loss kept by CoTAP (§3.3).

For each global crop c of an image, the teacher's Sinkhorn codes q (over the patch head's
prototypes) and the student's prediction map of every other crop v of the same image (the other
global crop and all local crops) are ROI-aligned onto the two crops' overlap, to a bins×bins grid;
the loss is the cross-entropy −Σ_K q · log softmax(s/T) over the bins that are fully foreground in
crop c's teacher mask, averaged over bins, then over v, then over c. Anchors and partners are just
images here.
"""

from __future__ import annotations

import torch

from cotap.training.data.views import overlap_boxes_batched
from cotap.training.roi_align import roi_align

FULL_FOREGROUND = 1.0 - 1e-4  # an ROI-aligned binary mask of exactly 1 can round to 0.9999999


def roi_bins_for_grid(grid: int, bins: int = 6, reference: int = 14) -> int:
    """ROI bins per side: `bins` (6) at a 14-patch global grid, scaled down for smaller grids
    (round(bins·grid/reference), at least 1); 3 bins for an 8×8 grid."""
    if grid < 1 or bins < 1:
        raise ValueError(f"grid and bins must be positive, got {grid}, {bins}")
    return bins if grid >= reference else max(1, round(bins * grid / reference))


def _scale(rel: torch.Tensor, h: int, w: int) -> torch.Tensor:
    # normalised (x0, y0, x1, y1) in a crop -> that crop's cell coordinates
    return rel * torch.tensor([w, h, w, h], dtype=rel.dtype, device=rel.device)


def roi_patch_loss(
    codes: torch.Tensor,
    masks: torch.Tensor,
    global_scores: torch.Tensor,
    local_scores: torch.Tensor | None,
    boxes: torch.Tensor,
    *,
    bins: int,
    temperature: float = 0.1,
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """Args:
        codes: (I, G, K, h, w) teacher Sinkhorn codes of the G global crops of I images.
        masks: (I, G, h, w) teacher foreground masks of the same crops.
        global_scores: (I, G, K, h, w) student patch-head scores of the global crops.
        local_scores: (I, L, K, hl, wl) student scores of the local crops, or None.
        boxes: (I, G+L, 4) crop boxes (x0, y0, x1, y1) in normalised original-image coordinates.
        bins: ROI bins per side.
    Returns a scalar."""
    if codes.ndim != 5 or global_scores.shape != codes.shape:
        raise ValueError(
            f"codes and global_scores must be (I, G, K, h, w), got {tuple(codes.shape)}, {tuple(global_scores.shape)}"
        )
    i, g, k, h, w = codes.shape
    if masks.shape != (i, g, h, w):
        raise ValueError(f"masks must be {(i, g, h, w)}, got {tuple(masks.shape)}")
    num_local = 0 if local_scores is None else local_scores.shape[1]
    if local_scores is not None and (local_scores.ndim != 5 or local_scores.shape[:3] != (i, num_local, k)):
        raise ValueError(f"local_scores must be ({i}, L, {k}, hl, wl), got {tuple(local_scores.shape)}")
    if boxes.shape != (i, g + num_local, 4):
        raise ValueError(f"boxes must be {(i, g + num_local, 4)}, got {tuple(boxes.shape)}")
    boxes = boxes.to(codes.device, torch.float32)
    total = codes.new_zeros((), dtype=torch.float32)
    for c in range(g):
        sub = codes.new_zeros((), dtype=torch.float32)
        others = [v for v in range(g + num_local) if v != c]
        for v in others:
            rel_c, rel_v, valid = overlap_boxes_batched(boxes[:, c], boxes[:, v])  # (I, 4), (I, 4), (I,)
            q = roi_align(codes[:, c].float(), _scale(rel_c, h, w), bins, sampling_ratio)  # (I, K, b, b)
            keep = roi_align(masks[:, c : c + 1].float(), _scale(rel_c, h, w), bins, sampling_ratio)[:, 0]
            keep = (keep >= FULL_FOREGROUND) & valid[:, None, None]  # (I, b, b)
            if v < g:
                pred = global_scores[:, v].float()
            else:
                assert local_scores is not None
                pred = local_scores[:, v - g].float()
            ph, pw = pred.shape[-2:]
            s = roi_align(pred, _scale(rel_v, ph, pw), bins, sampling_ratio)  # (I, K, b, b)
            ce = -(q * torch.log_softmax(s / temperature, dim=1)).sum(dim=1)  # (I, b, b)
            sub = sub + (ce * keep).sum() / keep.sum().clamp(min=1)
        total = total + sub / len(others)
    return total / g
