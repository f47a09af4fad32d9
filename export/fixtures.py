"""Fixture images for accuracy gates and int8 calibration: photo-like images generated in code, plus
any image folder the user points at, preprocessed exactly as the server will (`cotap.core`).

Generated fixtures are deterministic (seeded) so that two exports of the same bundle are gated on
the same pixels. They are "photo-like" rather than noise: smooth illumination, a few overlapping
objects with edges and textures, mild sensor noise. Patch features and prototype assignments of
real models only behave like they do on photos when the input has such structure.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cotap.core.images import IMAGE_SUFFIXES, DecodeLimits, decode_image
from cotap.core.preprocess import PreprocessConfig, preprocess_image


class FixtureError(ValueError):
    """A fixture or calibration folder that cannot be used."""


def synthetic_image(seed: int, height: int = 192, width: int = 256) -> Image.Image:
    """One deterministic photo-like RGB image: lit background, textured shapes, blur and noise."""
    return _synthetic_image(seed, height, width).copy()


@functools.lru_cache(maxsize=128)
def _synthetic_image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Background: two-colour gradient under a soft light blob.
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / (height + width)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    light = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.4 * max(height, width)) ** 2))
    bg = bg * (0.6 + 0.4 * light[..., None])
    image = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    # Objects: ellipses, rectangles and polygons of random colours.
    for _ in range(int(rng.integers(3, 7))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        y0, x0 = rng.uniform(-0.1, 0.9) * height, rng.uniform(-0.1, 0.9) * width
        y1, x1 = y0 + rng.uniform(0.15, 0.5) * height, x0 + rng.uniform(0.15, 0.5) * width
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            pts = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(5)]
            draw.polygon(pts, fill=colour)
    arr = np.asarray(image).astype(np.float32)
    # Texture: a sinusoidal grating over a random half-plane, like fabric or foliage.
    freq, angle = rng.uniform(0.05, 0.4), rng.uniform(0, np.pi)
    grating = np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))
    mask = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1) + rng.uniform(-100, 100)) > 0
    arr += (18 * grating * mask)[..., None]
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    noisy = np.asarray(image).astype(np.float64) + rng.normal(0, 3.0, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def synthetic_images(count: int = 8, seed: int = 0) -> list[Image.Image]:
    """`count` fixtures with alternating landscape/portrait aspect ratios (seeds seed..seed+count-1)."""
    shapes = [(192, 256), (256, 192), (224, 224), (180, 320)]
    return [synthetic_image(seed + i, *shapes[i % len(shapes)]) for i in range(count)]


def folder_images(folder: str | os.PathLike[str], limit: int | None = None) -> list[Image.Image]:
    """Decode the JPEG/PNG/WebP files of `folder` (sorted by name, not recursive), upright RGB."""
    root = Path(folder)
    if not root.is_dir():
        raise FixtureError(f"image folder not found: {root}")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FixtureError(f"no .jpg/.jpeg/.png/.webp images in {root}")
    if limit is not None:
        paths = paths[:limit]
    images = []
    for p in paths:
        try:
            image, _ = decode_image(p.read_bytes(), DecodeLimits())
        except ValueError as e:
            raise FixtureError(f"{p}: {e}") from e
        images.append(image)
    return images


def fixed_size_config(base: PreprocessConfig, size: tuple[int, int]) -> PreprocessConfig:
    """The bundle's preprocessing (mean, std, patch size) resizing to exactly `size` = (H, W)."""
    return replace(base, resize="fixed", size=(int(size[0]), int(size[1])))


def preprocess_batch(
    images: Iterable[Image.Image], base: PreprocessConfig, size: tuple[int, int]
) -> np.ndarray:
    """Images -> float32 (N, 3, H, W), normalised as the bundle declares, resized to `size`."""
    cfg = fixed_size_config(base, size)
    return np.stack([preprocess_image(im, cfg) for im in images]).astype(np.float32)


def fixture_images(
    folder: str | os.PathLike[str] | None = None, count: int = 8, seed: int = 0
) -> list[Image.Image]:
    """The gate's fixture set: `count` generated images, then the images of `folder` if given."""
    images = synthetic_images(count, seed)
    if folder is not None:
        images += folder_images(folder)
    return images


def check_sizes(sizes: Sequence[tuple[int, int]], patch_size: int) -> tuple[tuple[int, int], ...]:
    """Validated (H, W) sizes: positive, multiples of the patch size, no duplicates."""
    out: list[tuple[int, int]] = []
    if not sizes:
        raise ValueError("at least one input size is needed")
    for size in sizes:
        h, w = int(size[0]), int(size[1])
        if h <= 0 or w <= 0 or h % patch_size or w % patch_size:
            raise ValueError(f"input size {h}x{w} must be positive multiples of the patch size {patch_size}")
        if (h, w) not in out:
            out.append((h, w))
    return tuple(out)


def write_synthetic_folder(folder: str | os.PathLike[str], count: int = 16, seed: int = 1000) -> Path:
    """Write `count` generated images as PNGs (a stand-in calibration folder; seeds differ from the gate's)."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(synthetic_images(count, seed)):
        image.save(root / f"synthetic-{i:03d}.png")
    return root
