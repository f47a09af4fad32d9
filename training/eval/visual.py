"""Pictures of dense features, drawn with Pillow: PCA colouring, prototype maps, class maps beside
ground truth, and correspondence lines between an image pair.

Inputs are tensors in the protocol's shapes: images uint8 (3, H, W), patch features (h, w, C),
per-patch or per-pixel integer maps (h, w) / (H, W). Outputs are PIL RGB images.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

IGNORE_COLOUR = (0, 0, 0)


def palette(n: int) -> np.ndarray:
    """uint8 (n, 3): a fixed palette of distinguishable colours (golden-ratio hues, alternating
    lightness), the same for every figure so a class or prototype keeps its colour."""
    out = []
    for i in range(n):
        h = (i * 0.61803398875 + 0.05) % 1.0
        s = 0.75 if i % 3 else 0.55
        v = (0.95, 0.75, 0.55)[i % 3]
        out.append([round(c * 255) for c in colorsys.hsv_to_rgb(h, s, v)])
    return np.asarray(out, dtype=np.uint8).reshape(n, 3)


def colorize(labels: torch.Tensor | np.ndarray, n: int, ignore: int = 255) -> np.ndarray:
    """Integer map (H, W) -> uint8 (H, W, 3) in `palette(n)`; `ignore` (and ids >= n) black."""
    lab = np.asarray(labels, dtype=np.int64)
    pal = np.concatenate([palette(n), np.zeros((1, 3), dtype=np.uint8)])
    return pal[np.where((lab < 0) | (lab >= n) | (lab == ignore), n, lab)]


def pca_rgb(features: Sequence[torch.Tensor] | torch.Tensor) -> list[np.ndarray]:
    """Patch features [(h, w, C), ...] -> [uint8 (h, w, 3)]: the first three principal components,
    fitted jointly on the given maps, each stretched over its 1st..99th percentile to 0..255.
    Component signs are fixed (largest loading positive) so colours are reproducible."""
    maps = list(features)
    x = torch.cat([f.reshape(-1, f.shape[-1]).float() for f in maps])
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # v (r, C): principal directions
    comps = v[:3]
    if comps.shape[0] < 3:
        comps = torch.cat([comps, torch.zeros(3 - comps.shape[0], x.shape[1])])
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
    y = x @ comps.T  # (N, 3)
    lo = torch.quantile(y, 0.01, dim=0)
    hi = torch.quantile(y, 0.99, dim=0)
    y = ((y - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    rgb = (y * 255).round().to(torch.uint8).numpy()
    out, start = [], 0
    for f in maps:
        n = f.shape[0] * f.shape[1]
        out.append(rgb[start : start + n].reshape(f.shape[0], f.shape[1], 3))
        start += n
    return out


def to_pil(image: torch.Tensor | np.ndarray) -> Image.Image:
    """uint8 (3, H, W) tensor or (H, W, 3) array -> PIL RGB."""
    a = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)), "RGB")


def upscale(rgb: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """uint8 (h, w, 3) -> PIL of `size` = (H, W), nearest (patches stay visible as blocks)."""
    return Image.fromarray(np.ascontiguousarray(rgb), "RGB").resize(
        (size[1], size[0]), Image.Resampling.NEAREST
    )


def overlay(image: Image.Image, colours: Image.Image, alpha: float = 0.55) -> Image.Image:
    """Blend a colour map over an image (resized to it)."""
    return Image.blend(image.convert("RGB"), colours.convert("RGB").resize(image.size), alpha)


def grid(
    rows: Sequence[Sequence[Image.Image]], titles: Sequence[str] = (), pad: int = 4, min_side: int = 128
) -> Image.Image:
    """A table of equally sized tiles (all resized to the first tile, enlarged by an integer factor
    until its longer side reaches `min_side`), with column titles on top."""
    if not rows or not rows[0]:
        raise ValueError("a figure needs at least one tile")
    w, h = rows[0][0].size
    factor = max(1, math.ceil(min_side / max(w, h)))
    w, h = w * factor, h * factor
    cols = max(len(r) for r in rows)
    top = 14 if titles else 0
    canvas = Image.new("RGB", (cols * (w + pad) + pad, top + len(rows) * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((pad + c * (w + pad), 1), title[: max(4, w // 6)], fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            canvas.paste(
                tile.convert("RGB").resize((w, h), Image.Resampling.NEAREST),
                (pad + c * (w + pad), top + pad + r * (h + pad)),
            )
    return canvas


def correspondence_figure(
    source: torch.Tensor,
    target: torch.Tensor,
    source_xy: np.ndarray,
    target_xy: np.ndarray,
    correct: np.ndarray,
    max_lines: int = 48,
    seed: int = 0,
    min_side: int = 192,
) -> Image.Image:
    """Source and target side by side with lines from source points to their matches: green where
    the match is correct, red where it is not. Shows a seeded sample of at most `max_lines`."""
    a, b = to_pil(source), to_pil(target)
    w, h = a.size
    scale = max(1, math.ceil(min_side / max(w, h)))
    canvas = Image.new("RGB", (2 * w * scale + 8, h * scale), (255, 255, 255))
    canvas.paste(a.resize((w * scale, h * scale), Image.Resampling.BICUBIC), (0, 0))
    canvas.paste(b.resize((w * scale, h * scale), Image.Resampling.BICUBIC), (w * scale + 8, 0))
    draw = ImageDraw.Draw(canvas)
    n = len(source_xy)
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(n)[:max_lines] if n > max_lines else np.arange(n)
    for i in chosen:
        x0, y0 = source_xy[i] * scale
        x1, y1 = target_xy[i] * scale
        x1 += w * scale + 8
        colour = (40, 200, 60) if correct[i] else (230, 40, 40)
        draw.line([(x0, y0), (x1, y1)], fill=colour, width=1)
        draw.ellipse([x0 - 2, y0 - 2, x0 + 2, y0 + 2], fill=colour)
        draw.ellipse([x1 - 2, y1 - 2, x1 + 2, y1 + 2], fill=colour)
    return canvas
