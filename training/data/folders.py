"""Datasets over users' own files: an image tree, image + mask folders, and `open_dataset` specs.

Image decoding goes through `cotap.core.images.decode_image` (format allow-list, size guards, EXIF
orientation, mode conversion), the same code the server runs. A file that cannot be read never
stops a run: it is skipped, counted and listed in `.failures`, and the next readable file stands
in for it (deterministically, so every epoch and every worker sees the same substitute).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cotap.core.images import IMAGE_SUFFIXES, DecodeLimits, ImageDecodeError, decode_image
from cotap.training.data.synthetic import IGNORE, SceneConfig, SyntheticScenes

log = logging.getLogger(__name__)

_ORIENTATION_TAG = 0x0112
# Undo PIL's exif_transpose for each EXIF orientation (masks are drawn on the stored pixels).
_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def list_files(root: Path, exts: Iterable[str]) -> list[Path]:
    """Every file under `root` (recursive, following no hidden folders) whose suffix is in `exts`
    (case-insensitive), sorted by relative POSIX path."""
    wanted = {e.lower() if e.startswith(".") else "." + e.lower() for e in exts}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in wanted:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def fingerprint_paths(relative: Sequence[str]) -> str:
    """sha256 of the newline-joined relative path list: identifies a dataset's order and content set."""
    return hashlib.sha256("\n".join(relative).encode()).hexdigest()


def fingerprint_files(paths: Sequence[Path]) -> str:
    """sha256 of each file's absolute path, size and modification time: identifies the exact files
    (for the evaluation feature cache), so another folder with the same file names, or a file
    changed in place, is another data set. (`fingerprint_paths` identifies a data set by its names
    alone, which survives moving it: what a neighbour file is checked against.)"""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(
            f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
        )  # abspath: no per-file symlink walk
    return h.hexdigest()


def read_rgb(path: Path, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """uint8 (H, W, 3), upright. Raises `ImageDecodeError` or `OSError`."""
    image, _ = decode_image(path.read_bytes(), limits)
    return np.asarray(image)


class ImageFolder:
    """Every JPEG/PNG/WebP under `root`, sorted; `ds[i]` is uint8 (H, W, 3). A root that holds only
    `images/` + `masks/` (a `write_scenes` output, a segmentation set) is read as its `images/`: the
    masks are labels, not training images (a root with other images besides is read whole).

    Unreadable files are recorded once in `failures` ((path, reason)) and replaced by the next
    readable file in order. With `validate=True` every file is decoded up front and the failures are
    dropped from `paths` (use it before building a neighbour file, so indices mean readable images).
    Failures found inside DataLoader worker processes stay in those workers' copies; they are also
    logged as warnings."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        exts: Sequence[str] = IMAGE_SUFFIXES,
        limits: DecodeLimits = DecodeLimits(),
        validate: bool = False,
        progress: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.limits = limits
        self.paths: list[Path] = list_files(self.root, exts)
        tops = {p.relative_to(self.root).parts[0] for p in self.paths}
        if (self.root / "images").is_dir() and (self.root / "masks").is_dir() and tops <= {"images", "masks"}:
            log.info("%s holds images/ and masks/ only: reading its images/", self.root)
            self.root = self.root / "images"
            self.paths = [p for p in self.paths if p.is_relative_to(self.root)]
        if not self.paths:
            raise ValueError(f"no images ({', '.join(exts)}) found under {self.root}")
        self.failures: list[tuple[str, str]] = []
        self._failed: set[int] = set()
        if validate:
            self.validate(progress=progress)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def relative_paths(self) -> list[str]:
        return [p.relative_to(self.root).as_posix() for p in self.paths]

    def fingerprint(self) -> str:
        return fingerprint_paths(self.relative_paths)

    def _record(self, index: int, reason: str) -> None:
        if index not in self._failed:
            self._failed.add(index)
            self.failures.append((str(self.paths[index]), reason))
            log.warning("skipping unreadable image %s: %s", self.paths[index], reason)

    def _try(self, index: int) -> np.ndarray | None:
        try:
            return read_rgb(self.paths[index], self.limits)
        except (ImageDecodeError, OSError) as e:
            self._record(index, str(e) or type(e).__name__)
            return None

    def __getitem__(self, index: int) -> np.ndarray:
        n = len(self.paths)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"image {index} out of range for {n} images")
        index %= n
        for step in range(n):
            j = (index + step) % n
            if j in self._failed:
                continue
            image = self._try(j)
            if image is not None:
                return image
        raise ValueError(f"none of the {n} images under {self.root} could be read: {self._failure_text()}")

    def _failure_text(self, most: int = 3) -> str:
        """The first failures, "path (reason)", for messages."""
        shown = "; ".join(f"{path} ({reason})" for path, reason in self.failures[:most])
        more = len(self.failures) - most
        return shown + (f"; and {more} more" if more > 0 else "")

    def validate(self, progress: bool = False) -> list[tuple[str, str]]:
        """Decode every file; drop the unreadable ones from `paths`. Returns the failures."""
        it: Iterable[int] = range(len(self.paths))
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=f"checking {self.root.name}", unit="img")
        for i in it:
            if i not in self._failed:
                self._try(i)
        self.paths = [p for i, p in enumerate(self.paths) if i not in self._failed]
        self._failed = set()
        if not self.paths:
            raise ValueError(f"none of the images under {self.root} could be read: {self._failure_text()}")
        return self.failures


def read_mask(path: Path, label_map: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W) class ids from a PNG: L (values) or P (palette indices, not colours); 16-bit
    masks must hold values below 256. `label_map` (256,) remaps ids (e.g. COCO-Stuff fine->coarse)."""
    with Image.open(path) as m:
        if m.mode in ("L", "P"):
            a = np.asarray(m)
        elif m.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            wide = np.asarray(m).astype(np.int64)
            if wide.size and (wide.min() < 0 or wide.max() > 255):
                raise ValueError(f"{path}: mask values must lie in 0..255, found {wide.min()}..{wide.max()}")
            a = wide.astype(np.uint8)
        else:
            raise ValueError(
                f"{path}: mask mode {m.mode} is not supported; save class ids as an L or P (palette) PNG, "
                "one id per pixel, 255 = ignore (colour-coded RGB masks must be converted first)"
            )
    a = np.array(a, dtype=np.uint8)
    if label_map is not None:
        a = label_map[a]
    return a


class SegmentationFolder:
    """Images paired with same-stem PNG masks (uint8 class ids, 255 = ignore); `ds[i]` is
    (image uint8 (H, W, 3), mask uint8 (H, W)).

    Stems are paths relative to each folder without the extension, so nested trees pair too.
    `split`: a text file or list of stems to use (as VOC's ImageSets/Segmentation/val.txt); then
    extra files in either folder are fine. Without it, every image needs a mask and vice versa
    (`strict=False` uses the pairs and ignores the rest). Images are decoded as stored, without
    EXIF rotation, since annotations are drawn on the stored pixels (VOC, COCO)."""

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        masks_dir: str | os.PathLike[str],
        split: str | os.PathLike[str] | Sequence[str] | None = None,
        strict: bool = True,
        label_map: Sequence[int] | np.ndarray | None = None,
        num_classes: int | None = None,
        exts: Sequence[str] = IMAGE_SUFFIXES,
        limits: DecodeLimits = DecodeLimits(),
    ) -> None:
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        for d in (self.images_dir, self.masks_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"folder not found: {d}")
        self.limits = limits
        self.unpaired: list[str] = []
        images = {_stem(p, self.images_dir): p for p in list_files(self.images_dir, exts)}
        masks = {_stem(p, self.masks_dir): p for p in list_files(self.masks_dir, (".png",))}
        if split is not None:
            stems = _read_split(split)
            missing = [s for s in stems if s not in images or s not in masks]
            if missing:
                raise ValueError(
                    f"{len(missing)} stems of the split have no image or no mask, e.g. {missing[:5]} "
                    f"(images in {self.images_dir}, masks in {self.masks_dir})"
                )
        else:
            no_mask = sorted(set(images) - set(masks))
            no_image = sorted(set(masks) - set(images))
            if strict and (no_mask or no_image):
                raise ValueError(
                    f"unpaired files: {len(no_mask)} images without a mask (e.g. {no_mask[:5]}) and "
                    f"{len(no_image)} masks without an image (e.g. {no_image[:5]}); masks are PNGs with the "
                    "image's stem. Pass split=... or strict=False to use only the pairs."
                )
            stems = sorted(set(images) & set(masks))
            self.unpaired = no_mask + no_image
        if not stems:
            raise ValueError(f"no image/mask pairs in {self.images_dir} and {self.masks_dir}")
        self.stems: list[str] = list(stems)
        self.image_paths = [images[s] for s in self.stems]
        self.mask_paths = [masks[s] for s in self.stems]
        self.label_map = None
        if label_map is not None:
            lut = np.asarray(label_map, dtype=np.int64)
            if lut.shape != (256,) or lut.min() < 0 or lut.max() > 255:
                raise ValueError("label_map must hold 256 values in 0..255 (index = stored id)")
            self.label_map = lut.astype(np.uint8)
        self.meta = _find_meta(self.masks_dir)
        self._num_classes = num_classes

    def __len__(self) -> int:
        return len(self.stems)

    @property
    def paths(self) -> list[Path]:
        return self.image_paths

    @property
    def relative_paths(self) -> list[str]:
        return [p.relative_to(self.images_dir).as_posix() for p in self.image_paths]

    def fingerprint(self) -> str:
        return fingerprint_paths(self.relative_paths)

    @property
    def class_names(self) -> list[str] | None:
        names = self.meta.get("class_names") if self.meta else None
        return list(names) if names else None

    @property
    def num_classes(self) -> int:
        """From the constructor, else meta.json beside the masks, else the largest id + 1 (reads all)."""
        if self._num_classes is None:
            if self.meta and "num_classes" in self.meta:
                self._num_classes = int(self.meta["num_classes"])
            elif self.meta and "class_names" in self.meta:
                self._num_classes = len(self.meta["class_names"])
            else:
                top = -1
                for i in range(len(self)):
                    m = self.mask(i)
                    valid = m[m != IGNORE]
                    if valid.size:
                        top = max(top, int(valid.max()))
                self._num_classes = top + 1
        return self._num_classes

    def mask(self, index: int) -> np.ndarray:
        try:
            return read_mask(self.mask_paths[index], self.label_map)
        except OSError as e:  # truncated or not a PNG: PIL's message may not name the file
            raise ValueError(f"{self.mask_paths[index]}: not a readable mask PNG: {e}") from e

    def image(self, index: int) -> np.ndarray:
        path = self.image_paths[index]
        data = path.read_bytes()
        try:
            image, _ = decode_image(data, self.limits)
        except ImageDecodeError as e:  # the decoder's message never names the file
            raise ImageDecodeError(f"{path}: {e}", e.code) from e
        with Image.open(io.BytesIO(data)) as raw:
            orientation = raw.getexif().get(_ORIENTATION_TAG, 1)
        if orientation in _UNDO_ORIENTATION:
            image = image.transpose(_UNDO_ORIENTATION[orientation])
        return np.asarray(image)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"pair {index} out of range for {len(self)} pairs")
        index %= len(self)
        image, mask = self.image(index), self.mask(index)
        if image.shape[:2] != mask.shape:
            raise ValueError(
                f"{self.image_paths[index]} is {image.shape[1]}x{image.shape[0]} but its mask "
                f"{self.mask_paths[index]} is {mask.shape[1]}x{mask.shape[0]}"
            )
        return image, mask


def _stem(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def _read_split(split: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    if isinstance(split, (str, os.PathLike)):
        lines = Path(split).read_text().splitlines()
        return [ln.split()[0] for ln in lines if ln.strip()]
    return [str(s) for s in split]


def _find_meta(masks_dir: Path) -> dict[str, Any] | None:
    for candidate in (masks_dir / "meta.json", masks_dir.parent / "meta.json"):
        if candidate.is_file():
            try:
                meta = json.loads(candidate.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{candidate} is not valid JSON: {e}") from e
            return meta if isinstance(meta, dict) else None
    return None


class SyntheticImages:
    """`SyntheticScenes` seen as an image dataset: `ds[i]` is the uint8 (H, W, 3) image;
    `item_with_label(i)` also gives the scene's label, and `scenes` the underlying dataset."""

    def __init__(self, scenes: SyntheticScenes) -> None:
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.scenes[index].image

    def item_with_label(self, index: int) -> tuple[np.ndarray, int]:
        scene = self.scenes[index]
        return scene.image, scene.label

    def fingerprint(self) -> str:
        return self.scenes.fingerprint()

    @property
    def failures(self) -> list[tuple[str, str]]:
        return []


def parse_synthetic_spec(spec: str) -> tuple[int, int, int | None]:
    """ "synthetic:N[:seed[:size]]" -> (N, seed, size or None)."""
    parts = spec.split(":")
    if parts[0] != "synthetic" or not 2 <= len(parts) <= 4:
        raise ValueError(f"expected synthetic:N[:seed[:size]], got {spec!r}")
    try:
        values = [int(p) for p in parts[1:]]
    except ValueError as e:
        raise ValueError(f"expected integers in {spec!r} (synthetic:N[:seed[:size]])") from e
    n = values[0]
    seed = values[1] if len(values) > 1 else 0
    size = values[2] if len(values) > 2 else None
    if n < 1 or seed < 0 or (size is not None and size < 16):
        raise ValueError(f"{spec!r}: N must be positive, seed non-negative, size at least 16")
    return n, seed, size


def open_dataset(
    spec: str | os.PathLike[str], *, scene_config: SceneConfig | None = None, **kwargs: Any
) -> Any:
    """A dataset whose items are (or start with) uint8 (H, W, 3) images, from a CLI-style spec:

    - `synthetic:N[:seed[:size]]`: N synthetic scenes (labels via `item_with_label`);
    - a folder written by `write_scenes` or laid out as `images/` + `masks/`: the images;
    - any other folder: an `ImageFolder` over its image tree (`kwargs` go to it).
    """
    text = os.fspath(spec)
    if text.startswith("synthetic:"):
        n, seed, size = parse_synthetic_spec(text)
        cfg = scene_config or SceneConfig()
        if size is not None:
            cfg = SceneConfig.from_dict({**cfg.to_dict(), "size": size})
        return SyntheticImages(SyntheticScenes(n, seed, cfg))
    root = Path(text)
    if not root.exists():
        raise FileNotFoundError(f"dataset not found: {text} (a folder, or synthetic:N[:seed[:size]])")
    if not root.is_dir():
        raise ValueError(f"dataset must be a folder or synthetic:N[:seed[:size]], got the file {text}")
    return ImageFolder(root, **kwargs)
