"""Evaluation data: one item type (image, mask, label) over every source the protocols accept.

Sources (see docs/evaluation.md): synthetic scenes (`synthetic:N[:seed[:size]]`), an image folder
with a mask folder (VOC-style PNG of class ids, 255 = ignore; `write_scenes` output; VOC2012 with
its split lists; converted COCO-Stuff), and a class-subfolder image tree for kNN classification.
The readers themselves live in `cotap.training.data`; this module adapts them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cotap.core.images import IMAGE_SUFFIXES, ImageDecodeError
from cotap.training.data.folders import (
    SegmentationFolder,
    fingerprint_files,
    list_files,
    parse_synthetic_spec,
    read_rgb,
)
from cotap.training.data.synthetic import SceneConfig, SyntheticScenes

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
log = logging.getLogger(__name__)


@dataclass
class EvalItem:
    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray | None = None  # uint8 (H, W) class ids, 255 = ignore
    label: int | None = None  # image class


class EvalDataset:
    """A sized, indexable set of `EvalItem`s with what the protocols need to know about it.

    `get(i)` builds item i; `num_classes`/`class_names` describe masks (segmentation) or labels
    (classification); `fingerprint` identifies the exact items (None: never cached on disk)."""

    def __init__(
        self,
        get: Callable[[int], EvalItem],
        length: int,
        name: str,
        *,
        has_masks: bool,
        has_labels: bool,
        num_classes: int | Callable[[], int] | None = None,
        class_names: Sequence[str] | None = None,
        fingerprint: str | None = None,
    ) -> None:
        self._get = get
        self._len = int(length)
        self.name = name
        self.has_masks = has_masks
        self.has_labels = has_labels
        self._num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> EvalItem:
        index = int(index)
        if not -self._len <= index < self._len:
            raise IndexError(f"item {index} out of range for {self._len} items of {self.name}")
        return self._get(index % self._len)

    @property
    def num_classes(self) -> int | None:
        if callable(self._num_classes):
            self._num_classes = int(self._num_classes())
        return self._num_classes

    def subset(self, indices: Sequence[int], name: str | None = None) -> EvalDataset:
        """The items at `indices`, in that order."""
        idx = [int(i) for i in indices]
        fp = None
        if self.fingerprint is not None:
            fp = hashlib.sha256((self.fingerprint + ":" + ",".join(map(str, idx))).encode()).hexdigest()
        return EvalDataset(
            lambda i: self[idx[i]],
            len(idx),
            name or f"{self.name}[subset {len(idx)}]",
            has_masks=self.has_masks,
            has_labels=self.has_labels,
            num_classes=self._num_classes,
            class_names=self.class_names,
            fingerprint=fp,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": len(self),
            "masks": self.has_masks,
            "labels": self.has_labels,
            "fingerprint": self.fingerprint,
        }


def split(data: EvalDataset, val_fraction: float = 0.2, seed: int = 0) -> tuple[EvalDataset, EvalDataset]:
    """A seeded random train/val split, for a single data set given without `--val-data`."""
    if not 0 < val_fraction < 1 or len(data) < 2:
        raise ValueError("splitting needs at least 2 items and 0 < val_fraction < 1")
    perm = np.random.default_rng(seed).permutation(len(data))
    n_val = max(1, round(len(data) * val_fraction))
    val, train = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())
    return data.subset(train, f"{data.name}[train split]"), data.subset(val, f"{data.name}[val split]")


def from_synthetic(scenes: SyntheticScenes, name: str | None = None) -> EvalDataset:
    """Synthetic scenes: masks (things then stuff classes) and image labels (the dominant thing)."""

    def get(i: int) -> EvalItem:
        s = scenes[i]
        return EvalItem(s.image, s.mask, s.label)

    return EvalDataset(
        get,
        len(scenes),
        name or scenes.spec(),
        has_masks=True,
        has_labels=True,
        num_classes=scenes.num_classes,
        class_names=scenes.class_names,
        fingerprint=scenes.fingerprint(),
    )


def from_arrays(
    images: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    name: str = "arrays",
) -> EvalDataset:
    """In-memory images (N, H, W, 3) uint8 with optional masks (N, H, W) and labels (N,)."""
    n = len(images)
    if (masks is not None and len(masks) != n) or (labels is not None and len(labels) != n):
        raise ValueError("images, masks and labels must have the same length")
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    if num_classes is None:
        if masks is not None:
            valid = [m[m != 255] for m in masks]
            num_classes = 1 + max((int(v.max()) for v in valid if v.size), default=0)
        elif labels is not None:
            num_classes = 1 + int(np.max(labels))

    def get(i: int) -> EvalItem:
        return EvalItem(
            np.asarray(images[i], dtype=np.uint8),
            None if masks is None else np.asarray(masks[i], dtype=np.uint8),
            None if labels is None else int(labels[i]),
        )

    return EvalDataset(
        get, n, name, has_masks=masks is not None, has_labels=labels is not None,
        num_classes=num_classes, class_names=class_names,
    )  # fmt: skip


def mask_folder(
    images_dir: str | os.PathLike[str],
    masks_dir: str | os.PathLike[str],
    split_list: str | os.PathLike[str] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    name: str | None = None,
) -> EvalDataset:
    """Images paired with same-stem PNG masks (L or palette PNG of class ids, 255 = ignore).

    `split_list`: a text file of stems (VOC's ImageSets/Segmentation/*.txt). `num_classes`: else
    meta.json beside the masks, else the largest id + 1 over the masks. `labels`: image labels in
    the folder's (sorted stem) order, as `write_scenes` stores in meta.json."""
    folder = SegmentationFolder(images_dir, masks_dir, split=split_list, num_classes=num_classes)
    names = list(class_names) if class_names is not None else folder.class_names
    meta_labels = folder.meta.get("labels") if folder.meta else None
    if labels is None and meta_labels is not None and len(meta_labels) == len(folder):
        labels = [int(v) for v in meta_labels]

    def get(i: int) -> EvalItem:
        image, mask = folder[i]
        return EvalItem(image, mask, None if labels is None else int(labels[i]))

    return EvalDataset(
        get,
        len(folder),
        name or str(images_dir),
        has_masks=True,
        has_labels=labels is not None,
        num_classes=(lambda: folder.num_classes) if num_classes is None else num_classes,
        class_names=names,
        fingerprint=fingerprint_files([*folder.image_paths, *folder.mask_paths]),
    )


def class_folder(root: str | os.PathLike[str], name: str | None = None, min_classes: int = 2) -> EvalDataset:
    """An image tree with one subfolder per class (ImageNet style): label = the subfolder's index
    in sorted order. An unreadable image is an error (a substitute would carry the wrong label).

    Fewer than `min_classes` subfolders holding images is an error (one class makes every kNN
    prediction right); images directly in `root` belong to no class: they are ignored, with a
    warning."""
    base = Path(root)
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = sorted(p.name for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    paths: list[Path] = []
    labels: list[int] = []
    filled: list[str] = []
    for c, cname in enumerate(classes):
        found = list_files(base / cname, IMAGE_SUFFIXES)
        paths += found
        labels += [c] * len(found)
        if found:
            filled.append(cname)
    ignored = (
        f"the {len(loose)} images directly in {base} (e.g. {loose[0]}) belong to no class subfolder "
        "and are ignored"
        if loose
        else ""
    )
    if len(filled) < min_classes:
        found_text = f"{len(filled)} ({', '.join(filled)})" if filled else "none"
        raise ValueError(
            f"{base}: a class-per-subfolder tree needs images in at least {min_classes} subfolders, one "
            f"per class; found {found_text}" + (f"; {ignored}" if ignored else "")
        )
    if ignored:
        log.warning("%s", ignored)

    def get(i: int) -> EvalItem:
        try:
            return EvalItem(read_rgb(paths[i]), None, labels[i])
        except (ImageDecodeError, OSError) as e:
            raise ValueError(f"{paths[i]}: {e}") from e

    return EvalDataset(
        get, len(paths), name or str(base), has_masks=False, has_labels=True,
        num_classes=len(classes), class_names=classes, fingerprint=fingerprint_files(paths),
    )  # fmt: skip


def _has_images(d: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir() if p.is_file())


def open_eval_data(spec: str | os.PathLike[str], num_classes: int | None = None) -> EvalDataset:
    """An `EvalDataset` from a command-line spec:

    - `synthetic:N[:seed[:size]]`: N synthetic scenes;
    - `images=DIR,masks=DIR[,split=FILE][,classes=N]`: any image folder with a mask folder;
    - `ROOT[@SPLIT]` where ROOT holds `images/` + `masks/` (`write_scenes` output) or is a VOC
      root (`JPEGImages/` + `SegmentationClassAug/` or `SegmentationClass/`); SPLIT is a stem list,
      relative to ROOT or absolute (e.g. `VOC2012@ImageSets/Segmentation/val.txt`);
    - `ROOT` whose subfolders hold images: one class per subfolder (kNN classification).
    """
    text = os.fspath(spec)
    if text.startswith("synthetic:"):
        n, seed, size = parse_synthetic_spec(text)
        cfg = SceneConfig() if size is None else SceneConfig(size=size)
        return from_synthetic(SyntheticScenes(n, seed, cfg), name=text)
    if text.startswith("images="):
        opts = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
        unknown = set(opts) - {"images", "masks", "split", "classes"}
        if unknown or "masks" not in opts:
            raise ValueError(f"{text!r}: expected images=DIR,masks=DIR[,split=FILE][,classes=N]")
        classes = int(opts["classes"]) if "classes" in opts else num_classes
        return mask_folder(opts["images"], opts["masks"], opts.get("split"), classes, name=text)
    root_text, _, split_text = text.partition("@")
    root = Path(root_text)
    if not root.is_dir():
        raise FileNotFoundError(f"data not found: {root} (a folder, or synthetic:N[:seed[:size]])")
    split_path = None
    if split_text:
        split_path = Path(split_text) if Path(split_text).is_absolute() else root / split_text
        if not split_path.is_file():
            raise FileNotFoundError(f"split list not found: {split_path}")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return mask_folder(root / "images", root / "masks", split_path, num_classes, name=text)
    if (root / "JPEGImages").is_dir():
        masks = next(
            (root / d for d in ("SegmentationClassAug", "SegmentationClass") if (root / d).is_dir()), None
        )
        if masks is None:
            raise FileNotFoundError(
                f"{root} has JPEGImages/ but no SegmentationClassAug/ or SegmentationClass/"
            )
        k = num_classes or len(VOC_CLASSES)
        names = VOC_CLASSES if k == len(VOC_CLASSES) else None
        return mask_folder(root / "JPEGImages", masks, split_path, k, names, name=text)
    if split_path is not None:
        raise ValueError(f"{root}: a split list needs images/ + masks/ or a VOC root")
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    if subdirs and any(_has_images(d) for d in subdirs):
        return class_folder(root, name=text)
    raise ValueError(
        f"{root}: no known layout: expected images/ + masks/, a VOC root (JPEGImages/ + "
        "SegmentationClass/), or one subfolder of images per class"
    )
