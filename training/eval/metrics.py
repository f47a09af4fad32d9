"""Segmentation metrics: the confusion matrix, per-class IoU and mIoU, and the cluster-to-class
matchings (Hungarian for K = C, many-to-one for K > C) that overclustering is scored with.

Conventions: confusion rows are ground-truth classes, columns predictions; pixels whose ground truth
is the ignore index (255) never count. mIoU is the plain mean of per-class IoU over the classes that
occur in the ground truth or the prediction (TP + FP + FN > 0; no Hungarian matching unless a
matching is asked for), as CoTAP's and STEGO's metrics and mmseg compute it: a class predicted
where the ground truth has none counts, with IoU 0.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

IGNORE_INDEX = 255


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts: [true class, predicted class].

    `pred` and `target` are integer tensors of one shape. Ground-truth pixels equal to
    `ignore_index` are dropped; any other value outside 0..num_classes-1, in either tensor, is an
    error (it would mean a probe and its data disagree on the class count).
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"target holds class ids outside 0..{num_classes - 1} (and not {ignore_index})")
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
        raise ValueError(f"prediction holds class ids outside 0..{num_classes - 1}")
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def per_class_iou(conf: torch.Tensor | np.ndarray) -> np.ndarray:
    """float64 (C,) IoU per class; NaN for a class absent from both ground truth and prediction.

    `conf` is (C, C) or (C, C + E): E extra prediction columns ("no class", e.g. clusters left
    unmatched) count against the recall of the true class and against no class's precision.
    """
    c = np.asarray(conf, dtype=np.float64)
    k = c.shape[0]
    if c.ndim != 2 or c.shape[1] < k:
        raise ValueError(f"confusion must be (C, C) or (C, C+E), got {c.shape}")
    tp = np.diag(c[:, :k])
    union = c[:, :k].sum(0) + c.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(conf: torch.Tensor | np.ndarray) -> float:
    """Mean IoU over the classes in the ground truth or the prediction (union > 0)."""
    c = np.asarray(conf, dtype=np.float64)
    if not (c.sum(1) > 0).any():
        raise ValueError("no labelled pixel in the ground truth: mIoU is undefined")
    iou = per_class_iou(c)
    return float(iou[~np.isnan(iou)].mean())


def pixel_accuracy(conf: torch.Tensor | np.ndarray) -> float:
    c = np.asarray(conf, dtype=np.float64)
    total = c.sum()
    return float(np.trace(c[:, : c.shape[0]]) / total) if total > 0 else float("nan")


def segmentation_metrics(conf: torch.Tensor | np.ndarray, class_names: list[str] | None = None) -> dict:
    """mIoU, pixel accuracy and per-class IoU (null for classes neither in the ground truth nor
    predicted; 0 for a class only predicted); `classes_present` counts the ground truth's classes."""
    c = np.asarray(conf, dtype=np.float64)
    iou = per_class_iou(c)
    names = class_names or [str(i) for i in range(len(iou))]
    return {
        "miou": mean_iou(c),
        "pixel_accuracy": pixel_accuracy(c),
        "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou, strict=True)},
        "classes_present": int((c.sum(1) > 0).sum()),
    }


def hungarian_match(overlap: torch.Tensor | np.ndarray) -> np.ndarray:
    """One-to-one cluster -> class map maximising the matched overlap.

    `overlap` is (K clusters, C classes) pixel counts. Returns int64 (K,) class per cluster; with
    K > C the unmatched clusters get -1 (they count as wrong), with K < C some classes stay unmatched.
    """
    o = np.asarray(overlap, dtype=np.float64)
    rows, cols = linear_sum_assignment(o, maximize=True)
    mapping = np.full(o.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def many_to_one_match(overlap: torch.Tensor | np.ndarray) -> np.ndarray:
    """Each cluster -> the class it overlaps most (its majority class); int64 (K,).

    A cluster that covers no labelled pixel maps to class 0 (it covers nothing, so it changes no score).
    """
    o = np.asarray(overlap, dtype=np.float64)
    return o.argmax(axis=1).astype(np.int64)


def matched_confusion(overlap: torch.Tensor | np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """(C, C + 1) class confusion after mapping clusters to classes.

    `overlap` is (K, C) cluster-by-class pixel counts; `mapping` (K,) a class per cluster or -1.
    Pixels of clusters mapped to -1 land in the last column ("no class").
    """
    o = np.asarray(overlap, dtype=np.float64)
    k, c = o.shape
    m = np.asarray(mapping, dtype=np.int64)
    if m.shape != (k,) or m.max(initial=-1) >= c or m.min(initial=0) < -1:
        raise ValueError(f"mapping must give each of {k} clusters a class in 0..{c - 1} or -1")
    conf = np.zeros((c, c + 1), dtype=np.float64)
    cols = np.where(m < 0, c, m)
    np.add.at(conf.T, cols, o)  # conf[:, cols[j]] += o[j]
    return conf


def remap(pred: torch.Tensor, mapping: np.ndarray, unmatched: int = IGNORE_INDEX) -> torch.Tensor:
    """Apply a cluster -> class map to a cluster-id tensor (for pictures); -1 becomes `unmatched`."""
    m = torch.as_tensor(mapping, dtype=torch.long)
    m = torch.where(m < 0, torch.full_like(m, unmatched), m)
    return m[pred.long()]
