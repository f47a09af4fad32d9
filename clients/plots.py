"""Pictures of the answers, drawn with Pillow alone: the prototype map over an image (with a
legend), and matched patches of two images joined by lines.

The prototype colours are the same as the web page's (`server/static/app.js`, `protoColour`), so a
prototype looks the same wherever it is shown.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cotap.client.inputs import ImageInput, to_pil
from cotap.client.results import Correspondence, Prototypes, patch_centers

GOLDEN = 0.6180339887498949
BACKGROUND = (24, 24, 28)
TEXT = (235, 235, 235)


def prototype_colour(i: int) -> tuple[int, int, int]:
    """A distinct colour for prototype i: golden-ratio hues, three saturations, two values."""
    h = (i * GOLDEN) % 1.0
    s = 0.55 + 0.45 * ((i % 3) / 2)
    v = 0.95 - 0.2 * ((i // 3) % 2)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255 + 0.5), int(g * 255 + 0.5), int(b * 255 + 0.5)


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8: `prototype_colour` of 0..n-1."""
    return np.array([prototype_colour(i) for i in range(n)], dtype=np.uint8).reshape(n, 3)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(image: Image.Image, max_side: int, min_side: int = 256) -> Image.Image:
    """Scale so the longer side is at most `max_side` and the shorter at least `min_side`."""
    w, h = image.size
    scale = min(max_side / max(w, h), max(1.0, min_side / min(w, h)))
    if abs(scale - 1.0) < 1e-6:
        return image
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def prototype_overlay(
    image: ImageInput,
    prototypes: Prototypes,
    *,
    alpha: float = 0.55,
    legend: int = 12,
    max_side: int = 768,
) -> Image.Image:
    """The image with each patch tinted by its prototype's colour, and a legend of the `legend`
    prototypes that cover most patches (id and share of patches)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    base = _fit(to_pil(image), max_side)
    ids = np.asarray(prototypes.ids, dtype=np.int64)  # (h, w)
    m = max(int(prototypes.num_prototypes), int(ids.max(initial=0)) + 1)
    colours = palette(m)[ids]  # (h, w, 3)
    tint = Image.fromarray(colours, "RGB").resize(base.size, Image.Resampling.NEAREST)
    out = Image.blend(base, tint, alpha)
    if legend <= 0:
        return out
    counts = np.bincount(ids.ravel(), minlength=m)
    top = [int(i) for i in np.argsort(-counts, kind="stable")[:legend] if counts[i] > 0]
    font = _font(13)
    row, pad, cols = 20, 8, max(1, out.width // 150)
    rows = -(-len(top) // cols)
    canvas = Image.new("RGB", (out.width, out.height + pad * 2 + rows * row), BACKGROUND)
    canvas.paste(out, (0, 0))
    draw = ImageDraw.Draw(canvas)
    total = max(1, int(counts.sum()))
    for k, pid in enumerate(top):
        x = pad + (k % cols) * (out.width // cols)
        y = out.height + pad + (k // cols) * row
        draw.rectangle([x, y + 2, x + 14, y + 16], fill=prototype_colour(pid))
        draw.text((x + 20, y + 2), f"#{pid}  {100 * counts[pid] / total:.0f}%", fill=TEXT, font=font)
    return canvas


def _position_colour(y: float, x: float) -> tuple[int, int, int]:
    """A colour that varies smoothly with a point's place in the image (y, x in [0, 1])."""
    r, g, b = colorsys.hsv_to_rgb((0.8 * x + 0.2 * y) % 1.0, 0.85, 0.6 + 0.4 * (1 - y))
    return int(r * 255), int(g * 255), int(b * 255)


def correspondence_lines(
    source: ImageInput,
    target: ImageInput,
    corr: Correspondence,
    *,
    mutual_only: bool = True,
    min_score: float | None = None,
    max_lines: int = 300,
    height: int = 384,
    gap: int = 12,
) -> Image.Image:
    """Source and target side by side (both `height` pixels tall) with a line from each matched
    source patch to its match: mutual matches only by default, the `max_lines` best scores,
    coloured by where they start."""
    a, b = to_pil(source), to_pil(target)
    a = a.resize((max(1, round(a.width * height / a.height)), height), Image.Resampling.BICUBIC)
    b = b.resize((max(1, round(b.width * height / b.height)), height), Image.Resampling.BICUBIC)
    header = 24
    canvas = Image.new("RGB", (a.width + gap + b.width, height + header), BACKGROUND)
    canvas.paste(a, (0, header))
    canvas.paste(b, (a.width + gap, header))
    matches = corr.matches(mutual_only=mutual_only, min_score=min_score)
    shown = min(len(matches), max_lines)
    ca = patch_centers(corr.source_grid, (height, a.width))  # (h, w, 2) y, x
    cb = patch_centers(corr.target_grid, (height, b.width))
    draw = ImageDraw.Draw(canvas)
    for k in range(shown):
        (si, sj), (ti, tj) = matches.source[k], matches.target[k]
        y0, x0 = ca[si, sj]
        y1, x1 = cb[ti, tj]
        colour = _position_colour(y0 / height, x0 / a.width)
        p0 = (x0, y0 + header)
        p1 = (x1 + a.width + gap, y1 + header)
        draw.line([p0, p1], fill=colour, width=2)
        for px, py in (p0, p1):
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour, outline=(0, 0, 0))
    kind = "mutual matches" if mutual_only else "matches"
    mean = float(matches.score[:shown].mean()) if shown else 0.0
    text = (
        f"{shown} of {len(matches)} {kind} shown (of {corr.match.size} source patches), mean score {mean:.3f}"
    )
    draw.text((6, 5), text, fill=TEXT, font=_font(14))
    return canvas


def image_format(path: str | Path) -> str:
    """The Pillow format a plot written to `path` gets, from its extension (.png, .jpg, .webp, ...;
    PNG when there is none); ValueError for an extension Pillow cannot write."""
    suffix = Path(path).suffix.lower()
    if not suffix:
        return "PNG"
    Image.init()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(
            f"cannot tell which image format to write from the extension {suffix!r} of {path}: "
            "use .png, .jpg, .webp, .bmp or .tif"
        )
    return fmt


def save(image: Image.Image, path: str | Path) -> Path:
    """Write the plot in the format its extension names (`image_format`: PNG, JPEG, WebP, ...),
    creating the folder; returns the path."""
    path = Path(path)
    fmt = image_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 92} if fmt in ("JPEG", "WEBP") else {}
    image.save(path, fmt, **options)
    return path
