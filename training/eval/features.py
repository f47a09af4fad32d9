"""Frozen feature extraction: a model behind the `forward_features` contract, run once over a data
set in batches with progress, its outputs kept (and optionally cached on disk) for the probes.

Every probe trains or matches on these cached tensors, never on the live model, so the backbone is
frozen by construction and each image goes through it exactly once per evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from cotap.core.fsio import atomic_path
from cotap.core.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from cotap.training.checkpoints import LoadedModel
from cotap.training.data.views import as_chw_uint8
from cotap.training.distributed import resolve_device
from cotap.training.eval.checks import check_int, check_size
from cotap.training.eval.datasets import EvalDataset
from cotap.training.preprocess import normalize_tensor, resize_to

CACHE_VERSION = "1"
log = logging.getLogger(__name__)


class FrozenModel:
    """A frozen backbone that takes uint8-range images at their input size and returns its outputs.

    Wraps any module with `forward_features(images) -> {"patch": (B,h,w,C), "cls": (B,C),
    "assign": (B,h,w,M)}` and the normalisation it expects (a bundle's mean/std, else ImageNet's).
    """

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        device: str | torch.device = "cpu",
        name: str = "model",
        fingerprint: str | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        patch = getattr(model, "patch_size", None) or getattr(
            getattr(model, "config", None), "patch_size", None
        )
        if not isinstance(patch, int) or patch < 1:
            raise TypeError("the model must expose its patch size as `patch_size` or `config.patch_size`")
        if not callable(getattr(model, "forward_features", None)):
            raise TypeError("the model must have forward_features(images) -> {'patch', 'cls', 'assign'}")
        device = resolve_device(device)
        self.model = model.eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.patch_size: int = patch
        self.mean: tuple[float, float, float] = (mean[0], mean[1], mean[2])
        self.std: tuple[float, float, float] = (std[0], std[1], std[2])
        self.device = torch.device(device)
        self.name = name
        self._fingerprint = fingerprint
        self.info: dict[str, Any] = dict(info or {})

    @classmethod
    def from_loaded(
        cls, loaded: LoadedModel, device: str | torch.device = "cpu", which: str | None = None
    ) -> FrozenModel:
        """A `load_model` result: a bundle brings its own mean/std and name. `which`: what was asked
        of `load_model`, recorded beside the model it actually took (`info["which"]`)."""
        mean, std, name = IMAGENET_MEAN, IMAGENET_STD, loaded.arch
        if loaded.bundle is not None:
            pre = loaded.bundle.config.preprocess
            mean, std, name = pre.mean, pre.std, loaded.bundle.config.name
        info = {
            "arch": loaded.arch,
            "layout": loaded.layout,
            "source_sha256": loaded.source_sha256,
            "which": loaded.which,
            "which_requested": which,
            "prototypes_initialized": loaded.prototypes_initialized,
            "load_notes": list(loaded.notes),
        }
        # the cache key hashes the weights themselves: one file can hold a student and a teacher
        return cls(loaded.model, mean, std, device, name, None, info)

    def preprocess(self, size: tuple[int, int]) -> PreprocessConfig:
        return PreprocessConfig(
            resize="fixed", size=size, patch_size=self.patch_size, mean=self.mean, std=self.std
        )

    @property
    def fingerprint(self) -> str:
        """Identifies the weights: sha256 of the state dict (unless given at construction)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for k, v in sorted(self.model.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) in [0, 255], sides multiples of the patch size -> the model's
        outputs as float32 on the CPU: patch (B,h,w,C), cls (B,C), assign (B,h,w,M)."""
        h, w = images.shape[-2:]
        x = normalize_tensor(images.to(self.device, torch.float32), self.preprocess((h, w)))
        out = cast(Any, self.model).forward_features(x)
        return {k: v.float().cpu() for k, v in out.items()}


def as_frozen(
    model: FrozenModel | LoadedModel | nn.Module, device: str | torch.device = "cpu"
) -> FrozenModel:
    """Accept what callers naturally hold: a `FrozenModel`, a `load_model` result or a bare module."""
    if isinstance(model, FrozenModel):
        return model
    if isinstance(model, LoadedModel):
        return FrozenModel.from_loaded(model, device)
    return FrozenModel(model, device=device)


@dataclass(frozen=True)
class FeatureConfig:
    """How images become cached features.

    - `size`: the model input (height, width); None: the first image's size rounded down to the patch
      size. Every image is resized to it (bicubic, as the server does), so set it for folders of
      images of mixed sizes (VOC, COCO): e.g. 448.
    - `mask_size`: the resolution masks are scored at (nearest resize); None: the input size.
    - `keep_images`: how many resized images to keep for the report's figures.
    - `half`: store patch features in float16 (halves the memory of a large val set).
    """

    size: tuple[int, int] | None = None
    mask_size: tuple[int, int] | None = None
    batch_size: int = 32
    keep_images: int = 8
    half: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_size("size", self.size)
        check_size("mask_size", self.mask_size)
        check_int("batch_size", self.batch_size, 1)
        check_int("keep_images", self.keep_images, 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Features:
    """One data set through a frozen model.

    patch (N, h, w, C) float; cls (N, C); prototype (N, h, w) int64 = argmax of `assign`;
    masks (N, Hm, Wm) uint8 or None; labels (N,) int64 or None; images (n_keep, 3, H, W) uint8.
    """

    patch: torch.Tensor
    cls: torch.Tensor
    prototype: torch.Tensor
    masks: torch.Tensor | None
    labels: torch.Tensor | None
    images: torch.Tensor
    input_size: tuple[int, int]
    patch_size: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.patch.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.patch.shape[1]), int(self.patch.shape[2])

    @property
    def dim(self) -> int:
        return int(self.patch.shape[-1])


def input_size_for(data: EvalDataset, patch_size: int, size: tuple[int, int] | None) -> tuple[int, int]:
    """`size` checked against the patch size, or the first image's size rounded down to it."""
    if size is None:
        if len(data) == 0:
            raise ValueError(f"data set {data.name!r} is empty")
        h, w = data[0].image.shape[:2]
        return max(patch_size, h // patch_size * patch_size), max(patch_size, w // patch_size * patch_size)
    h, w = size
    if h % patch_size or w % patch_size or h <= 0 or w <= 0:
        raise ValueError(f"input size {h}x{w} must be positive multiples of the patch size {patch_size}")
    return int(h), int(w)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (..., H, W) class ids -> uint8 (..., h, w) by nearest neighbour (pixel centres)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.to(torch.uint8)
    lead = mask.shape[:-2]
    m = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    out = F.interpolate(m, size=size, mode="nearest-exact")
    return out.reshape(*lead, *size).to(torch.uint8)


def _cache_key(
    model: FrozenModel, data: EvalDataset, cfg: FeatureConfig, size: tuple[int, int]
) -> str | None:
    if data.fingerprint is None:
        return None
    key = {
        "version": CACHE_VERSION,
        "model": model.fingerprint,
        "mean": model.mean,
        "std": model.std,
        "data": data.fingerprint,
        "size": size,
        "mask_size": cfg.mask_size,
        "half": cfg.half,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def extract_features(
    model: FrozenModel | LoadedModel | nn.Module,
    data: EvalDataset,
    config: FeatureConfig = FeatureConfig(),
    cache_dir: str | os.PathLike[str] | None = None,
) -> Features:
    """Run `data` through the frozen `model` once and keep what the probes need.

    With `cache_dir`, features are stored as safetensors under a key of (weights, data fingerprint,
    sizes, normalisation) and reused by later runs; data without a fingerprint is never cached.
    """
    fm = as_frozen(model)
    size = input_size_for(data, fm.patch_size, config.size)
    mask_size = tuple(config.mask_size) if config.mask_size is not None else size
    key = _cache_key(fm, data, config, size) if cache_dir is not None else None
    path = Path(cache_dir) / f"features-{key}.safetensors" if key and cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return _load(path, size, fm.patch_size, config.keep_images)
        except Exception as e:  # a damaged cache file is recomputed (and rewritten), never trusted
            log.warning("ignoring unreadable feature cache %s: %s", path, e)

    n = len(data)
    if n == 0:
        raise ValueError(f"data set {data.name!r} is empty")
    patches: list[torch.Tensor] = []
    cls: list[torch.Tensor] = []
    protos: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    labels: list[int] = []
    kept: list[torch.Tensor] = []
    has_masks, has_labels = data.has_masks, data.has_labels
    bar = tqdm(total=n, desc=f"features {data.name}", unit="img", disable=not config.progress, leave=False)
    for start in range(0, n, config.batch_size):
        batch: list[torch.Tensor] = []
        for i in range(start, min(n, start + config.batch_size)):
            item = data[i]
            batch.append(resize_to(as_chw_uint8(item.image), size))
            if has_masks:
                if item.mask is None:
                    raise ValueError(f"{data.name}: item {i} has no mask")
                masks.append(resize_mask(torch.as_tensor(item.mask), mask_size))  # type: ignore[arg-type]
            if has_labels:
                if item.label is None:
                    raise ValueError(f"{data.name}: item {i} has no label")
                labels.append(int(item.label))
        images = torch.stack(batch)  # (B, 3, H, W) in [0, 255]
        if len(kept) < config.keep_images:
            kept += [im.round().to(torch.uint8) for im in images[: config.keep_images - len(kept)]]
        out = fm(images)
        patches.append(out["patch"].half() if config.half else out["patch"])
        cls.append(out["cls"])
        protos.append(out["assign"].argmax(-1))
        bar.update(len(batch))
    bar.close()
    feats = Features(
        patch=torch.cat(patches),
        cls=torch.cat(cls),
        prototype=torch.cat(protos),
        masks=torch.stack(masks) if has_masks else None,
        labels=torch.tensor(labels, dtype=torch.long) if has_labels else None,
        images=torch.stack(kept),
        input_size=size,
        patch_size=fm.patch_size,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "patch": feats.patch,
            "cls": feats.cls,
            "prototype": feats.prototype,
            "images": feats.images,
        }
        if feats.masks is not None:
            tensors["masks"] = feats.masks
        if feats.labels is not None:
            tensors["labels"] = feats.labels
        with atomic_path(path) as tmp:  # a temporary per process and thread: concurrent runs are fine
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"key": key or ""})
    return feats


def _load(path: Path, size: tuple[int, int], patch_size: int, keep: int) -> Features:
    t = load_file(str(path))
    return Features(
        patch=t["patch"],
        cls=t["cls"],
        prototype=t["prototype"],
        masks=t.get("masks"),
        labels=t.get("labels"),
        images=t["images"][:keep],
        input_size=size,
        patch_size=patch_size,
        meta={"cache": str(path)},
    )
