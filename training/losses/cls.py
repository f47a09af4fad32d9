"""The image-level (CLS) Sinkhorn losses kept by CoTAP (§3.4).

- `multicrop_cls_loss` (`L_inner_cls`, SwAV/DINO multi-crop): the teacher's Sinkhorn codes of each
  global crop are predicted by the student from every OTHER crop of the same image (the other
  global crop and all local crops), cross-entropy with student temperature 0.1.
- `pair_cls_loss` (`L_intra_cls`, cross-image): the teacher codes of the partner's global crops
  supervise the anchor's global crops and vice versa, over all crop pairs, student temperature 0.2.
- `cls_contrastive_loss` (not CoTAP): multi-crop InfoNCE on the CLS head's embeddings, for training
  an initialisation from scratch quickly.
"""

from __future__ import annotations

import torch


def multicrop_cls_loss(codes: torch.Tensor, student: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Args:
        codes: (I, G, K) teacher codes (rows sum to 1) of the G global crops of I images.
        student: (I, V, K) student CLS scores of all V ≥ G crops, globals first (same order).
    Returns the cross-entropy averaged over images, target crops and predicting crops."""
    if codes.ndim != 3 or student.ndim != 3:
        raise ValueError(
            f"codes and student must be (I, crops, K), got {tuple(codes.shape)}, {tuple(student.shape)}"
        )
    i, g, k = codes.shape
    if student.shape[0] != i or student.shape[2] != k or student.shape[1] < max(g, 2):
        raise ValueError(f"student scores {tuple(student.shape)} do not fit codes {tuple(codes.shape)}")
    v = student.shape[1]
    log_p = torch.log_softmax(student.float() / temperature, dim=-1)  # (I, V, K)
    ce = -(codes.detach().float()[:, :, None, :] * log_p[:, None, :, :]).sum(-1)  # (I, G, V)
    off_diag = torch.ones(g, v, dtype=torch.bool, device=ce.device)
    off_diag[torch.arange(g), torch.arange(g)] = False  # a crop never predicts its own code
    return ce[:, off_diag].mean()


def pair_cls_loss(codes: torch.Tensor, student: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Args:
        codes: (2B, G, K) teacher codes of the global crops; rows 0..B-1 anchors, B+b the partner of b.
        student: (2B, G, K) student CLS scores of the same crops.
    Returns the cross-entropy of each image's crops against its pair's codes, over all G×G crop pairs."""
    if codes.shape != student.shape or codes.ndim != 3 or codes.shape[0] % 2:
        raise ValueError(
            f"codes and student must both be (2B, G, K), got {tuple(codes.shape)}, {tuple(student.shape)}"
        )
    b = codes.shape[0] // 2
    target = torch.cat([codes[b:], codes[:b]]).detach().float()  # the partner's codes for each image
    log_q = torch.log_softmax(student.float() / temperature, dim=-1)
    return -(target[:, :, None, :] * log_q[:, None, :, :]).sum(-1).mean()


def cls_contrastive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 0.2,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-crop InfoNCE on CLS embeddings (MoCo v3 style, EMA-teacher keys): an image-level loss
    that learns from scratch in hundreds of steps where the Sinkhorn losses above need far more.
    Not part of CoTAP (weight 0 by default); the synthetic experiment's stand-in for the DINO
    initialisation uses it (docs/results.md).

    Args:
        student: (I, V, E) L2-normalised student embeddings of all V crops, globals first.
        teacher: (I, G, E) L2-normalised teacher embeddings of the 2 ≤ G ≤ V global crops.
        exclude: (I,) for each image the row whose keys are neither positives nor negatives (its
            pair partner, possibly another crop set of the same image); None: none excluded.
    Returns the cross-entropy of each query crop against all I·G keys, positives being the keys of
    the same image's OTHER global crops (every global for a local crop), averaged over positives
    and queries.
    """
    if student.ndim != 3 or teacher.ndim != 3 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher must be (I, V, E) and (I, G, E), got {tuple(student.shape)}, "
            f"{tuple(teacher.shape)}"
        )
    i, v, e = student.shape
    g = teacher.shape[1]
    if teacher.shape[2] != e or v < g or g < 2:  # a global query needs another global as positive
        raise ValueError(f"student {tuple(student.shape)} does not fit teacher {tuple(teacher.shape)}")
    logits = torch.einsum("ive,jge->ivjg", student.float(), teacher.detach().float()) / temperature
    rows = torch.arange(i, device=student.device)
    same = rows[:, None] == rows[None, :]  # (I, I)
    other_crop = torch.ones(v, g, dtype=torch.bool, device=student.device)
    other_crop[torch.arange(g), torch.arange(g)] = False  # (V, G): a crop is never its own key
    positive = same[:, None, :, None] & other_crop[None, :, None, :]  # (I, V, I, G)
    if exclude is not None:
        banned = (rows[None, :] == exclude[:, None]) & ~same  # (I, I)
        logits = logits.masked_fill(banned[:, None, :, None], float("-inf"))
    log_p = logits.flatten(2).log_softmax(-1).view_as(logits)
    positive_log_p = torch.where(positive, log_p, torch.zeros_like(log_p))
    per_query = -positive_log_p.flatten(2).sum(-1) / positive.flatten(2).sum(-1)  # (I, V)
    return per_query.mean()
