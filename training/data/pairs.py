"""Anchor/partner pairs of multi-crop views for CoTAP (cotap-method.md §3.1).

Item i is image i (the anchor) and a partner drawn uniformly from its first k nearest neighbours
(`nns[i][:k]`, self at index 0, so about 1 time in k the partner is a second, independently cropped
view set of the same image). Without neighbours the partner is always the image itself: the
"no nearest-neighbour pairs" ablation.

All randomness of item i in epoch e comes from a torch generator seeded by (seed, e, i), so a
resumed run sees identical batches whatever the worker count or access order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cotap.training.data.views import ViewConfig, Views, make_views


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index), well mixed (NumPy's SeedSequence)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def split_item(item: Any) -> tuple[Any, int]:
    """(image, label) from what a dataset returns: an image, a `Scene` (image + label), an
    (image, mask) pair, or a dict with "image" (and optionally "label"). Label -1 when unknown."""
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item, -1
    if hasattr(item, "image"):
        return item.image, int(getattr(item, "label", -1))
    if isinstance(item, dict):
        return item["image"], int(item.get("label", -1))
    if isinstance(item, (tuple, list)):
        return item[0], -1
    raise TypeError(f"cannot find an image in a dataset item of type {type(item).__name__}")


def get_image_and_label(dataset: Any, index: int) -> tuple[Any, int]:
    """Datasets may offer `item_with_label(i) -> (image, label)`; otherwise `dataset[i]` is split."""
    fn = getattr(dataset, "item_with_label", None)
    if fn is not None:
        image, label = fn(index)
        return image, int(label)
    return split_item(dataset[index])


class PairedViews(Dataset):
    """Dataset of anchor/partner view sets. Items are dicts:
    {"anchor": Views, "partner": Views, "index": int, "partner_index": int, "label": int}."""

    def __init__(
        self,
        dataset: Any,
        views: ViewConfig,
        nns: np.ndarray | None = None,
        k: int = 7,
        seed: int = 0,
    ) -> None:
        self.dataset = dataset
        self.views = views
        self.k = int(k)
        self.seed = int(seed)
        self.epoch = 0
        n = len(dataset)
        if nns is not None:
            nns = np.asarray(nns)
            if nns.ndim != 2 or nns.shape[0] != n:
                raise ValueError(f"nns has shape {nns.shape}; expected ({n}, k) for a dataset of {n} images")
            if self.k < 1 or self.k > nns.shape[1]:
                raise ValueError(
                    f"k={self.k} but the neighbour file holds {nns.shape[1]} neighbours per image"
                )
            if nns.size and (nns.min() < 0 or nns.max() >= n):
                raise ValueError(f"neighbour indices must lie in [0, {n})")
            nns = nns[:, : self.k].astype(np.int64)
        self.nns = nns

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating each epoch (with non-persistent DataLoader workers, so they see it)."""
        self.epoch = int(epoch)

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        g = self.generator(index)
        if self.nns is None:
            partner = index
        else:
            partner = int(self.nns[index, int(torch.randint(0, self.k, (1,), generator=g))])
        image, label = get_image_and_label(self.dataset, index)
        anchor = make_views(image, self.views, g)
        if partner != index:
            image, _ = get_image_and_label(self.dataset, partner)
        return {
            "anchor": anchor,
            "partner": make_views(image, self.views, g),
            "index": index,
            "partner_index": partner,
            "label": label,
        }


@dataclass
class ViewBatch:
    student_global: torch.Tensor  # (B, 2, 3, Hg, Wg)
    teacher_global: torch.Tensor  # (B, 2, 3, Hg, Wg)
    student_local: torch.Tensor  # (B, L, 3, Hl, Wl)
    boxes: torch.Tensor  # (B, 2 + L, 4) normalised (x0, y0, x1, y1), globals first

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ViewBatch:
        return ViewBatch(
            **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        )

    def pin_memory(self) -> ViewBatch:
        return ViewBatch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    @classmethod
    def stack(cls, views: Sequence[Views]) -> ViewBatch:
        return cls(
            student_global=torch.stack([v.student_global for v in views]),
            teacher_global=torch.stack([v.teacher_global for v in views]),
            student_local=torch.stack([v.student_local for v in views]),
            boxes=torch.stack([v.boxes for v in views]),
        )


@dataclass
class PairBatch:
    anchor: ViewBatch
    partner: ViewBatch
    index: torch.Tensor  # (B,) int64 anchor indices
    partner_index: torch.Tensor  # (B,) int64
    label: torch.Tensor  # (B,) int64, -1 where the dataset has no label

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        return PairBatch(
            anchor=self.anchor.to(device, non_blocking),
            partner=self.partner.to(device, non_blocking),
            index=self.index.to(device, non_blocking=non_blocking),
            partner_index=self.partner_index.to(device, non_blocking=non_blocking),
            label=self.label.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> PairBatch:
        return PairBatch(
            self.anchor.pin_memory(),
            self.partner.pin_memory(),
            self.index.pin_memory(),
            self.partner_index.pin_memory(),
            self.label.pin_memory(),
        )

    def __len__(self) -> int:
        return int(self.index.shape[0])


def collate_pairs(items: Sequence[dict[str, Any]]) -> PairBatch:
    """`DataLoader(..., collate_fn=collate_pairs)`: a list of `PairedViews` items -> `PairBatch`."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    return PairBatch(
        anchor=ViewBatch.stack([it["anchor"] for it in items]),
        partner=ViewBatch.stack([it["partner"] for it in items]),
        index=torch.tensor([it["index"] for it in items], dtype=torch.int64),
        partner_index=torch.tensor([it["partner_index"] for it in items], dtype=torch.int64),
        label=torch.tensor([it["label"] for it in items], dtype=torch.int64),
    )
