"""Nearest-neighbour image pairs (cotap-method.md §3.1): CLS embeddings of every image with an
initial model, cosine top-k with the image itself at index 0, stored in an `.npz` the trainer reads.

File format (`KNN_FORMAT`): `nns` int64 (N, k), row i = image i's neighbours, most similar first,
`nns[i, 0] == i`; `meta` a JSON string: format, k, n, size, arch, checkpoint sha256, dataset
fingerprint and spec, unreadable files. STEGO/CoTAP release files (`nns` only) load too, with
only the shape and range checks.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from cotap.core.fsio import atomic_path
from cotap.core.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from cotap.core.version import __version__
from cotap.training.checkpoints import load_model
from cotap.training.data.folders import open_dataset
from cotap.training.data.pairs import split_item
from cotap.training.data.views import as_chw_uint8
from cotap.training.models import CoTAPViT
from cotap.training.preprocess import preprocess_tensor

KNN_FORMAT = "cotap-knn-v1"


class KnnFileError(ValueError):
    """A neighbour file that is malformed or does not belong to the dataset at hand."""


class _Preprocessed(Dataset):
    def __init__(self, dataset: Any, preprocess: PreprocessConfig, center_crop: bool) -> None:
        self.dataset, self.preprocess, self.center_crop = dataset, preprocess, center_crop

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        image, _ = split_item(self.dataset[i])
        x = as_chw_uint8(image)  # (3, H, W)
        if self.center_crop:  # the central square: resize-then-center-crop up to border pixels
            h, w = x.shape[-2:]
            s = min(h, w)
            x = x[:, (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        return preprocess_tensor(x, self.preprocess)


def cls_embedding(
    model: CoTAPViT, final_norm: Mapping[str, torch.Tensor] | None = None, plain: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The image embedding neighbours are ranked by: images (B, 3, H, W) -> (B, C).

    By default the model's CLS output (2D, the filter's). With `plain`, the backbone's own CLS
    token after the last block (D), through `final_norm` when given: for a DINO initialisation,
    whose prototypes are still random, this is DINO's CLS feature, what the release's neighbour
    files were built from (cotap-method.md §7.3)."""
    if not plain:
        return lambda x: model.forward_features(x)["cls"]
    if final_norm is not None:
        weight, bias = final_norm["weight"], final_norm["bias"]

    def plain_cls(x: torch.Tensor) -> torch.Tensor:
        cls = model.get_intermediate_layers(x, n=1)[0][:, 0]  # (B, D)
        if final_norm is None:
            return cls
        return F.layer_norm(cls, cls.shape[-1:], weight.to(cls), bias.to(cls), eps=1e-6)  # DINO's eps

    return plain_cls


def embed_cls(
    model: CoTAPViT,
    dataset: Any,
    preprocess: PreprocessConfig,
    batch_size: int = 32,
    progress: bool = True,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    embedding: Callable[[torch.Tensor], torch.Tensor] | None = None,
    center_crop: bool = False,
) -> torch.Tensor:
    """Embeddings (N, C) float32 on the CPU of every image of `dataset`, in order: `embedding`
    (default `cls_embedding(model)`, the model's CLS output) of the images preprocessed by
    `preprocess` (a fixed size, so that images batch), after cropping each to its central square
    with `center_crop`."""
    if device is None:
        device = next(model.parameters()).device
    model = model.eval().to(device)
    embed = embedding or cls_embedding(model)
    loader = DataLoader(
        _Preprocessed(dataset, preprocess, center_crop),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    it: Any = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="embedding CLS", unit="batch")
    out = []
    with torch.inference_mode():
        for x in it:
            out.append(embed(x.to(device)).float().cpu())
    if not out:
        raise ValueError("the dataset is empty")
    return torch.cat(out)


def nearest_neighbours(features: torch.Tensor | np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """Cosine top-k (N, C) -> int64 (N, k), most similar first, each image itself at index 0."""
    f = torch.as_tensor(features).float()
    if f.dim() != 2:
        raise ValueError(f"features must be (N, C), got {tuple(f.shape)}")
    n = f.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of images ({n})")
    f = F.normalize(f, dim=1)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        sim = f[start:stop] @ f.T  # (chunk, N)
        rows = torch.arange(stop - start)
        sim[rows, rows + start] = float("inf")  # self first, even against exact duplicates
        out[start:stop] = sim.topk(k, dim=1).indices.cpu().numpy()
    return out


def dataset_fingerprint(dataset: Any) -> str | None:
    fn = getattr(dataset, "fingerprint", None)
    return str(fn()) if callable(fn) else None


def build_knn_file(
    dataset: Any,
    checkpoint: str | os.PathLike[str],
    k: int = 7,
    out: str | os.PathLike[str] | None = None,
    size: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    arch: str | None = None,
    center_crop: bool = True,
) -> Path:
    """Embed every image of `dataset` (a dataset, a folder or `synthetic:N[:seed[:size]]`) with the
    model in `checkpoint` (anything `load_model` reads), at `size` x `size` (default: the model's
    img_size) from each image's central square (the whole image squashed without `center_crop`),
    and write the top-k neighbour file to `out` (default `nns_k{k}_{size}.npz`).

    A model with trained prototypes embeds with its CLS output; one without (a DINO checkpoint)
    with the backbone's CLS token through DINO's final norm, the feature the release used."""
    spec = None
    if isinstance(dataset, (str, os.PathLike)):
        spec = os.fspath(dataset)
        dataset = open_dataset(spec)
    if not 1 <= k <= len(dataset):  # before the (long) embedding pass, not after it
        raise ValueError(f"k={k} must be between 1 and the number of images ({len(dataset)})")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    loaded = load_model(checkpoint, arch=arch)
    model = loaded.model
    patch = model.config.patch_size
    size = int(size or model.config.img_size)
    if size % patch:
        raise ValueError(f"size {size} is not a multiple of the model's patch size {patch}")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if loaded.bundle is not None:
        mean, std = loaded.bundle.config.preprocess.mean, loaded.bundle.config.preprocess.std
    pre = PreprocessConfig(resize="fixed", size=(size, size), patch_size=patch, mean=mean, std=std)
    if device is not None:
        model = model.to(device)
    plain = not loaded.prototypes_initialized
    embedding = cls_embedding(model, loaded.final_norm, plain)
    if not plain:
        described = "the model's CLS output (object-aware filter)"
    elif loaded.final_norm is not None:
        described = "the backbone's CLS token through the checkpoint's final norm (DINO's CLS feature)"
    else:
        described = "the backbone's CLS token (the prototypes are not initialised)"
    features = embed_cls(
        model, dataset, pre, batch_size, progress, num_workers, embedding=embedding, center_crop=center_crop
    )
    nns = nearest_neighbours(features, k)
    failures = list(getattr(dataset, "failures", []) or [])
    meta = {
        "format": KNN_FORMAT,
        "k": int(k),
        "n": int(nns.shape[0]),
        "size": size,
        "crop": "center square" if center_crop else "none (squashed)",
        "embedding": described,
        "arch": loaded.arch,
        "checkpoint": os.fspath(checkpoint),
        "checkpoint_sha256": loaded.source_sha256,
        "dataset": spec,
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "failures": [list(f) for f in failures],
        "producer": f"cotap {__version__}",
    }
    path = Path(out) if out is not None else Path(f"nns_k{k}_{size}.npz")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, nns=nns, meta=np.array(json.dumps(meta)))
    return path


def read_knn_meta(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The `meta` of a neighbour file, or None for files without one (STEGO/CoTAP release)."""
    with np.load(path, allow_pickle=False) as z:
        if "meta" not in z.files:
            return None
        return dict(json.loads(str(z["meta"])))


def load_knn_file(
    path: str | os.PathLike[str],
    expected_len: int | None = None,
    expected_fingerprint: str | None = None,
) -> np.ndarray:
    """int64 (N, k) neighbour indices, checked: shape, index range, and when given the dataset length
    and fingerprint (which must match the file's when it records one)."""
    p = Path(path)
    if not p.is_file():
        raise KnnFileError(f"neighbour file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "nns" not in z.files:
                raise KnnFileError(f"{p} has no 'nns' array (found {z.files})")
            nns = z["nns"]
            meta = json.loads(str(z["meta"])) if "meta" in z.files else None
    except KnnFileError:
        raise
    except Exception as e:
        raise KnnFileError(f"{p} is not a readable .npz neighbour file: {e}") from e
    if nns.ndim != 2 or nns.shape[0] == 0 or nns.shape[1] == 0:
        raise KnnFileError(f"{p}: nns must be a non-empty (N, k) array, got shape {nns.shape}")
    if not np.issubdtype(nns.dtype, np.integer):
        raise KnnFileError(f"{p}: nns must hold integer indices, got {nns.dtype}")
    n = nns.shape[0]
    if nns.min() < 0 or nns.max() >= n:
        raise KnnFileError(f"{p}: indices must lie in [0, {n}), found {nns.min()}..{nns.max()}")
    if expected_len is not None and n != expected_len:
        raise KnnFileError(
            f"{p} was built for {n} images but the dataset has {expected_len}; rebuild it "
            "(cotap train knn) for this dataset"
        )
    if expected_fingerprint is not None:
        recorded = meta.get("dataset_fingerprint") if meta else None
        if recorded is None:
            warnings.warn(f"{p} records no dataset fingerprint; trusting that it matches", stacklevel=2)
        elif recorded != expected_fingerprint:
            raise KnnFileError(
                f"{p} was built for another dataset (fingerprint {recorded[:12]}..., this dataset "
                f"{expected_fingerprint[:12]}...): same length does not mean the same images; rebuild it"
            )
    return nns.astype(np.int64, copy=False)
