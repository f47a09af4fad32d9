"""Dense nearest-neighbour retrieval (Hummingbird-style label transfer): a memory bank of train
patch features with their soft labels; each val patch takes the softmax(cos / T)-weighted mean of
its k nearest bank labels; the label maps are bilinearly upsampled to the mask and scored by mIoU.

Differences from open-hummingbird-eval (A.11): no augmentation passes, and the bank is a uniform
random (seeded) sample of the labelled train patches when there are more than `memory_size`
(Hummingbird samples a fixed number per image, preferring rare classes). Exact search, no faiss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cotap.training.eval.checks import check_float, check_int
from cotap.training.eval.features import Features
from cotap.training.eval.metrics import IGNORE_INDEX, confusion_matrix, segmentation_metrics


@dataclass(frozen=True)
class RetrievalConfig:
    """k = 30 and T = 0.02 as Hummingbird; `memory_size` 1024*10^2 is its small ("smoke") bank."""

    k: int = 30
    temperature: float = 0.02
    memory_size: int = 102_400
    chunk: int = 1024  # val patches per similarity block
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("k", self.k, 1)
        check_float("temperature", self.temperature)
        check_int("memory_size", self.memory_size, 1)
        check_int("chunk", self.chunk, 1)
        check_int("seed", self.seed, 0)


def patch_label_distribution(masks: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """masks (N, Hm, Wm) uint8 -> (N, h, w, K) fraction of each class among the labelled pixels
    under each patch (rows of zeros where every pixel is ignore)."""
    out = []
    for start in range(0, masks.shape[0], 64):
        m = masks[start : start + 64].long()
        m = torch.where(m == IGNORE_INDEX, torch.full_like(m, num_classes), m)
        if int(m.max()) > num_classes:
            raise ValueError(f"masks hold class ids outside 0..{num_classes - 1} (and not {IGNORE_INDEX})")
        onehot = F.one_hot(m, num_classes + 1).permute(0, 3, 1, 2).float()  # (B, K+1, Hm, Wm)
        frac = F.adaptive_avg_pool2d(onehot, grid)[:, :num_classes]  # (B, K, h, w)
        total = frac.sum(1, keepdim=True)
        out.append((frac / total.clamp_min(1e-12)).permute(0, 2, 3, 1))
    return torch.cat(out)


def build_memory(
    train: Features, num_classes: int, config: RetrievalConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank: (M, C) L2-normalised patch features and (M, K) their label distributions."""
    if train.masks is None:
        raise ValueError("retrieval needs masks in the train data")
    labels = patch_label_distribution(train.masks, train.grid, num_classes).reshape(-1, num_classes)
    feats = train.patch.reshape(-1, train.dim)
    keep = torch.nonzero(labels.sum(1) > 0).squeeze(1)
    if keep.numel() == 0:
        raise ValueError("no train patch covers a labelled pixel")
    if keep.numel() > config.memory_size:
        gen = torch.Generator().manual_seed(config.seed)
        keep = keep[torch.randperm(keep.numel(), generator=gen)[: config.memory_size]].sort().values
    return F.normalize(feats[keep].float(), dim=-1), labels[keep]


def transfer_labels(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    k: int,
    temperature: float,
    chunk: int = 1024,
) -> torch.Tensor:
    """(Q, C) query features -> (Q, K) softmax(cos/T)-weighted mean of the k nearest bank labels."""
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, query.shape[0], chunk):
        q = F.normalize(query[start : start + chunk].float(), dim=-1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, k)
        weight = torch.softmax(sim / temperature, dim=1)
        out.append((weight[..., None] * bank_labels[idx]).sum(1))
    return torch.cat(out)


def run_retrieval(
    train: Features,
    val: Features,
    num_classes: int,
    config: RetrievalConfig = RetrievalConfig(),
    class_names: list[str] | None = None,
    keep: int = 8,
    progress: bool = True,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Build the bank from `train`, label `val`, score mIoU; also the first `keep` predictions."""
    if val.masks is None:
        raise ValueError("retrieval needs masks in the val data")
    bank, bank_labels = build_memory(train, num_classes, config)
    size = (int(val.masks.shape[-2]), int(val.masks.shape[-1]))
    h, w = val.grid
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    kept: list[torch.Tensor] = []
    per = max(1, config.chunk // (h * w))  # val images per block
    bar = tqdm(total=len(val), desc="retrieval", unit="img", disable=not progress, leave=False)
    for start in range(0, len(val), per):
        q = val.patch[start : start + per]
        b = q.shape[0]
        dist = transfer_labels(
            bank, bank_labels, q.reshape(-1, val.dim), config.k, config.temperature, config.chunk
        )
        dist = dist.reshape(b, h, w, num_classes).permute(0, 3, 1, 2)
        pred = F.interpolate(dist, size=size, mode="bilinear", align_corners=False).argmax(1)
        conf += confusion_matrix(pred, val.masks[start : start + b], num_classes)
        kept += list(pred[: max(0, keep - len(kept))])
        bar.update(b)
    bar.close()
    metrics = segmentation_metrics(conf, class_names)
    metrics["memory_size"] = int(bank.shape[0])
    metrics["train_patches"] = len(train) * train.grid[0] * train.grid[1]
    return metrics, torch.stack(kept) if kept else torch.empty(0, dtype=torch.long)
