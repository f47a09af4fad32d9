"""Linear segmentation probe: a 1x1 linear head (with bias) on frozen patch features, its logits
bilinearly upsampled to the mask, trained with cross-entropy (ignore 255) by Adam at a constant
learning rate, then scored by mIoU on the val set.

This is the CoTAP/Leopart/NeCo linear protocol, trained on cached features: no crop or flip
augmentation (features are computed once) and no best-epoch selection (the last head is scored).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cotap.training.eval.checks import check_float, check_int
from cotap.training.eval.features import Features
from cotap.training.eval.metrics import IGNORE_INDEX, confusion_matrix, segmentation_metrics


@dataclass(frozen=True)
class LinearConfig:
    """The training budget is a number of image samples, as CoTAP's protocol (100k samples there),
    so the cost does not grow with the train set: 4000 samples in batches of 16 (250 Adam steps)
    at a constant lr of 1e-2. On LayerNorm-ed features that reaches the plateau that lr 3e-3 reaches
    in about 8000 samples; lr 1e-3 is still climbing after 8000."""

    samples: int = 4000
    batch_size: int = 16
    lr: float = 1e-2
    weight_decay: float = 0.0
    seed: int = 0
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        check_int("samples", self.samples, 1)
        check_int("batch_size", self.batch_size, 1)
        check_float("lr", self.lr)
        check_float("weight_decay", self.weight_decay, inclusive=True)
        check_int("seed", self.seed, 0)
        check_int("eval_batch_size", self.eval_batch_size, 1)

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.samples / self.batch_size))


def segmentation_logits(head: nn.Linear, patch: torch.Tensor, mask_size: tuple[int, int]) -> torch.Tensor:
    """patch (B, h, w, C) -> logits (B, K, Hm, Wm), bilinearly upsampled (align_corners=False)."""
    logits = head(patch.float()).permute(0, 3, 1, 2)  # (B, K, h, w)
    return F.interpolate(logits, size=mask_size, mode="bilinear", align_corners=False)


def train_linear_head(
    train: Features, num_classes: int, config: LinearConfig = LinearConfig(), progress: bool = True
) -> tuple[nn.Linear, list[float]]:
    """Fit the head on cached train features; returns it and the loss of every step.

    Batches are consecutive slices of a stream of seeded random permutations of the train set
    (epochs without a ragged last batch)."""
    if train.masks is None:
        raise ValueError("the linear probe needs masks in the train data")
    if config.samples < 1 or config.batch_size < 1:
        raise ValueError("samples and batch_size must be at least 1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = nn.Linear(train.dim, num_classes)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    masks = train.masks
    mask_size = (int(masks.shape[-2]), int(masks.shape[-1]))
    n = len(train)
    losses: list[float] = []
    stream = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(config.steps), desc="linear probe", unit="step", disable=not progress, leave=False)
    for step in bar:
        while stream.numel() < config.batch_size:
            stream = torch.cat([stream, torch.randperm(n, generator=gen)])
        idx, stream = stream[: config.batch_size], stream[config.batch_size :]
        target = masks[idx].long()  # (B, Hm, Wm)
        if bool((target == IGNORE_INDEX).all()):
            continue
        loss = F.cross_entropy(
            segmentation_logits(head, train.patch[idx], mask_size), target, ignore_index=IGNORE_INDEX
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if not losses:
        raise ValueError("every train mask pixel is ignore (255): nothing to learn from")
    return head.eval(), losses


@torch.no_grad()
def predict(head: nn.Linear, feats: Features, batch_size: int = 32) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first index, predicted classes (B, Hm, Wm) int64) over `feats` in batches."""
    if feats.masks is None:
        raise ValueError("predictions are made at the mask resolution; these features have no masks")
    size = (int(feats.masks.shape[-2]), int(feats.masks.shape[-1]))
    for start in range(0, len(feats), batch_size):
        yield start, segmentation_logits(head, feats.patch[start : start + batch_size], size).argmax(1)


def run_linear(
    train: Features,
    val: Features,
    num_classes: int,
    config: LinearConfig = LinearConfig(),
    class_names: list[str] | None = None,
    keep: int = 8,
    progress: bool = True,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Train on `train`, score mIoU on `val`. Returns the metrics and the first `keep` val predictions."""
    if val.masks is None:
        raise ValueError("the linear probe needs masks in the val data")
    head, losses = train_linear_head(train, num_classes, config, progress)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    kept: list[torch.Tensor] = []
    for start, pred in predict(head, val, config.eval_batch_size):
        conf += confusion_matrix(pred, val.masks[start : start + len(pred)], num_classes)
        kept += list(pred[: max(0, keep - len(kept))])
    metrics = segmentation_metrics(conf, class_names)
    window = max(1, len(losses) // 10)  # mean loss of the first and the last tenth of the steps
    metrics["train_loss_start"] = sum(losses[:window]) / window
    metrics["train_loss"] = sum(losses[-window:]) / window
    metrics["steps"] = len(losses)
    return metrics, torch.stack(kept) if kept else torch.empty(0, dtype=torch.long)
