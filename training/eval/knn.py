"""Image classification by k nearest neighbours on the CLS feature (DINO's weighted kNN): cosine
similarity to every train image, the k most similar vote with weight exp(sim / T)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cotap.training.eval.checks import check_float, check_int, check_ints


@dataclass(frozen=True)
class KnnConfig:
    ks: tuple[int, ...] = (10, 20)
    temperature: float = 0.07
    chunk: int = 1024

    def __post_init__(self) -> None:
        check_ints("ks", self.ks, 1)
        check_float("temperature", self.temperature)
        check_int("chunk", self.chunk, 1)


def knn_scores(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    query: torch.Tensor,
    k: int,
    num_classes: int,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """(M, num_classes) vote of the k cosine-nearest train rows (N, C) for each query row (M, C)."""
    if train.shape[0] != train_labels.shape[0]:
        raise ValueError("one label per train row is needed")
    k = min(k, train.shape[0])
    bank = F.normalize(train.float(), dim=-1)
    votes = []
    for start in range(0, query.shape[0], chunk):
        q = F.normalize(query[start : start + chunk].float(), dim=-1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (m, k)
        weight = (sim / temperature).exp()
        onehot = F.one_hot(train_labels[idx].long(), num_classes).float()  # (m, k, K)
        votes.append((onehot * weight[..., None]).sum(1))
    return torch.cat(votes)


def run_knn(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    val: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    config: KnnConfig = KnnConfig(),
) -> dict[str, Any]:
    """Top-1 (and top-5 where there are more than 5 classes) accuracy for each k."""
    out: dict[str, Any] = {}
    for k in config.ks:
        scores = knn_scores(train, train_labels, val, k, num_classes, config.temperature, config.chunk)
        out[f"top1@k{k}"] = float((scores.argmax(1) == val_labels).double().mean())
        if num_classes > 5:
            # As DINO's eval_knn: at most k classes got a vote, so with k < 5 top-5 is top-k (the
            # other "guesses" would be classes no neighbour voted for).
            top5 = scores.topk(min(5, k, train.shape[0]), dim=1).indices
            out[f"top5@k{k}"] = float((top5 == val_labels[:, None]).any(1).double().mean())
    out["train_images"] = int(train.shape[0])
    out["val_images"] = int(val.shape[0])
    return out
