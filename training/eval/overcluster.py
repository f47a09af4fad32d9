"""Unsupervised segmentation by (over)clustering: k-means on the L2-normalised val patch features,
clusters mapped to classes by Hungarian matching (K = C) or by majority vote, many-to-one (K > C),
then mIoU of the mapped cluster maps (nearest-upsampled to the mask).

Differences from the Leopart/NeCo protocol (A.12): no z-scoring or PCA-50, exact torch k-means
(k-means++ init, Lloyd) instead of faiss, one seed per call (run several seeds for mean ± std).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cotap.training.eval.checks import check_float, check_int, check_ints
from cotap.training.eval.features import Features
from cotap.training.eval.metrics import (
    IGNORE_INDEX,
    hungarian_match,
    many_to_one_match,
    matched_confusion,
    remap,
    segmentation_metrics,
)


@dataclass(frozen=True)
class OverclusterConfig:
    """`clusters`: the K values (empty: K = the number of classes); `fit_size`: at most this many
    patches (a seeded sample) fit the centroids, then every patch is assigned."""

    clusters: tuple[int, ...] = ()
    iterations: int = 50
    tol: float = 1e-5
    fit_size: int = 100_000
    seed: int = 0

    def __post_init__(self) -> None:
        check_ints("clusters", self.clusters, 1, allow_empty=True)
        check_int("iterations", self.iterations, 1)
        check_float("tol", self.tol, inclusive=True)
        check_int("fit_size", self.fit_size, 1)
        check_int("seed", self.seed, 0)


def kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: (k, C) centres drawn from rows of x (N, C), each with probability
    proportional to its squared distance to the nearest centre chosen so far."""
    n = x.shape[0]
    centres = [x[int(torch.randint(n, (1,), generator=gen))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: repeat one (it will stay empty)
            i = int(torch.randint(n, (1,), generator=gen))
        else:
            i = int(torch.multinomial(d2 / total, 1, generator=gen))
        centres.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return torch.stack(centres)


def assign(x: torch.Tensor, centres: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """(N,) index of the nearest centre (Euclidean) of each row of x."""
    c2 = (centres**2).sum(1)
    out = [(c2 - 2 * x[s : s + chunk] @ centres.T).argmin(1) for s in range(0, x.shape[0], chunk)]
    return torch.cat(out)


def kmeans(x: torch.Tensor, k: int, iterations: int = 50, tol: float = 1e-5, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means with k-means++ init on (N, C) rows; returns (k, C) centres. An emptied
    cluster is re-seeded at the point farthest from its centre, so all k stay in use."""
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k = {k} clusters need 1 <= k <= {x.shape[0]} points")
    x = x.float()
    gen = torch.Generator().manual_seed(seed)
    centres = kmeans_pp_init(x, k, gen)
    for _ in range(iterations):
        labels = assign(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).float()
        new = sums / counts.clamp_min(1)[:, None]
        empty = counts == 0
        if empty.any():
            far = ((x - centres[labels]) ** 2).sum(1).topk(int(empty.sum())).indices
            new[empty] = x[far]
        shift = float(((new - centres) ** 2).sum(1).max())
        centres = new
        if shift <= tol:
            break
    return centres


def cluster_overlap(clusters: torch.Tensor, masks: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """(K, C) pixel counts of cluster maps (N, Hm, Wm) against masks, ignore excluded."""
    c = clusters.reshape(-1).long()
    m = masks.reshape(-1).long()
    keep = m != IGNORE_INDEX
    return torch.bincount(c[keep] * num_classes + m[keep], minlength=k * num_classes).reshape(k, num_classes)


def run_overcluster(
    val: Features,
    num_classes: int,
    config: OverclusterConfig = OverclusterConfig(),
    class_names: list[str] | None = None,
    keep: int = 8,
) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """Cluster the val patches for each K and score; returns the metrics per K and the first `keep`
    mapped predictions (N, Hm, Wm) per K (ignore = pixels of an unmatched cluster)."""
    if val.masks is None:
        raise ValueError("overclustering is scored against masks; the val data has none")
    ks = config.clusters or (num_classes,)
    x = F.normalize(val.patch.reshape(-1, val.dim).float(), dim=-1)
    gen = torch.Generator().manual_seed(config.seed)
    fit = (
        x
        if x.shape[0] <= config.fit_size
        else x[torch.randperm(x.shape[0], generator=gen)[: config.fit_size]]
    )
    size = (int(val.masks.shape[-2]), int(val.masks.shape[-1]))
    h, w = val.grid
    results: dict[str, Any] = {}
    kept: dict[int, torch.Tensor] = {}
    for k in ks:
        centres = kmeans(fit, k, config.iterations, config.tol, config.seed)
        labels = assign(x, centres).reshape(len(val), 1, h, w).float()
        maps = F.interpolate(labels, size=size, mode="nearest-exact").squeeze(1).long()  # (N, Hm, Wm)
        overlap = cluster_overlap(maps, val.masks, k, num_classes)
        matching = "hungarian" if k <= num_classes else "many_to_one"
        mapping = hungarian_match(overlap) if matching == "hungarian" else many_to_one_match(overlap)
        metrics = segmentation_metrics(matched_confusion(overlap, mapping), class_names)
        metrics["matching"] = matching
        results[f"K{k}"] = metrics
        kept[k] = remap(maps[:keep], mapping, IGNORE_INDEX)
    first = results[f"K{ks[0]}"]
    out: dict[str, Any] = {"miou": first["miou"], "clusters": list(ks), "per_k": results}
    return out, kept
