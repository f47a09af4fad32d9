"""Procedural synthetic scenes with per-pixel class masks, deterministic by seed and versioned.

Each image is a scene: one to three "stuff" regions (texture classes) tile the background, and one
to four "thing" objects (a class-specific shape filled with a class-specific texture family) are
drawn on top, later ones occluding earlier ones. Colours are drawn at random for every region and
object, so class identity lives in shape and texture pattern, never in colour alone; scale,
rotation, aspect, texture frequency and phase vary within a class, so instances share a pattern
without being copies. That is what makes semantic concentration measurable on them.

Item `i` of `SyntheticScenes(n, seed, config)` depends only on `(seed, i, config)`: its generator is
`np.random.default_rng([seed, i])`. Any change to the pixels or masks produced for a given
`(seed, i, config)` must bump `SYNTHETIC_VERSION`. See docs/data.md for the class list.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cotap.core.fsio import write_json

SYNTHETIC_VERSION = "1"
IGNORE = 255

THING_NAMES = ("disc", "square", "triangle", "star", "cross", "crescent", "ring", "capsule")
STUFF_NAMES = ("stripes", "bricks", "blobs", "waves", "grain", "gradient")

FloatArray = np.ndarray


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. Sizes and scales are fractions of the image side unless named `_px`.

    - `num_thing_classes` / `num_stuff_classes`: how many of the built-in families to use (the
      first ones of `THING_NAMES` / `STUFF_NAMES`).
    - `objects`: inclusive range of things per image; `stuff_regions`: of background regions.
    - `scale`: range of an object's size as a fraction of the image side: the radius of the disc
      of equal area (every shape covers pi * (scale * size)^2 pixels before aspect and occlusion).
    - `aspect_jitter`: an object's aspect ratio is exp(U(-j, j)).
    - `min_visible`: an object whose visible part is smaller than this fraction of its in-image
      area (occlusion) is marked ignore (255) in the mask: an ambiguous sliver, not a label.
    - `min_region`: background regions smaller than this fraction of the image are merged away.
    - `boundary_ignore`: pixels within this many pixels of a class boundary are marked 255.
    - `noise_std`: standard deviation of per-pixel uniform noise in grey levels (one value per
      pixel, added to all three channels); `blur`: a 3x3 binomial blur (sigma
      about 0.7 px) before the noise; `lighting`: maximum strength of a linear illumination ramp.
    """

    size: int = 128
    num_thing_classes: int = len(THING_NAMES)
    num_stuff_classes: int = len(STUFF_NAMES)
    objects: tuple[int, int] = (1, 4)
    stuff_regions: tuple[int, int] = (1, 3)
    scale: tuple[float, float] = (0.1, 0.24)
    aspect_jitter: float = 0.2
    min_visible: float = 0.2
    min_region: float = 0.06
    boundary_ignore: int = 0
    noise_std: float = 3.0
    blur: bool = True
    lighting: float = 0.25

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        if not 1 <= self.num_thing_classes <= len(THING_NAMES):
            raise ValueError(f"num_thing_classes must be in 1..{len(THING_NAMES)}")
        if not 1 <= self.num_stuff_classes <= len(STUFF_NAMES):
            raise ValueError(f"num_stuff_classes must be in 1..{len(STUFF_NAMES)}")
        for name in ("objects", "stuff_regions", "scale"):
            lo, hi = getattr(self, name)
            if lo > hi or lo <= 0:
                raise ValueError(f"{name} must be a positive (low, high) range, got {(lo, hi)}")
        if self.scale[1] > 0.5:
            raise ValueError("scale above 0.5 of the image side leaves no scene")
        object.__setattr__(self, "objects", tuple(int(v) for v in self.objects))
        object.__setattr__(self, "stuff_regions", tuple(int(v) for v in self.stuff_regions))
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SceneConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k, v in known.items():
            if isinstance(v, list):
                known[k] = tuple(v)
        return cls(**known)


@dataclass
class Scene:
    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # uint8 (H, W): class id per pixel, 255 = ignore
    label: int  # the thing class with the most visible pixels (ids 0..T-1 are things)


# -- small vectorised helpers ------------------------------------------------------------------------
_TAU = np.float32(2 * math.pi)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[FloatArray, FloatArray]:
    """Pixel-centre coordinates (x, y), each (size, size) float32, in pixels."""
    r = np.arange(size, dtype=np.float32) + np.float32(0.5)
    x, y = np.meshgrid(r, r)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=32)
def _interp(size: int, grid: int) -> FloatArray:
    """(size, grid) bilinear interpolation matrix from a coarse grid to `size` samples."""
    pos = (np.arange(size, dtype=np.float64) + 0.5) / size * (grid - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, grid - 2)
    frac = pos - lo
    m = np.zeros((size, grid), dtype=np.float32)
    m[np.arange(size), lo] = 1 - frac
    m[np.arange(size), lo + 1] = frac
    m.setflags(write=False)
    return m


def _smooth_noise(rng: np.random.Generator, size: int, grid: int) -> FloatArray:
    """Smooth zero-mean noise (size, size), roughly unit variance, with `grid` cells per side."""
    m = _interp(size, grid)
    g = rng.standard_normal((grid, grid), dtype=np.float32)
    return m @ g @ m.T


def _frac(x: FloatArray) -> FloatArray:
    """x - floor(x): the fractional part in [0, 1) (cheaper than np.remainder)."""
    return x - np.floor(x)


def _sq(wave: FloatArray, sharp: float = 2.5) -> FloatArray:
    """A soft square wave in [0, 1] from a wave in [-1, 1]: crisp edges, a pixel or so of ramp."""
    return np.clip(0.5 + sharp * wave, 0.0, 1.0)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.asarray(rgb, dtype=np.float32) * np.float32(255)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours (RGB 0..255) with a clear brightness difference, in random order."""
    h1 = rng.random()
    h2 = (h1 + rng.uniform(-0.5, 0.5)) % 1.0
    s1, s2 = rng.uniform(0.0, 0.9, size=2)
    v1 = rng.uniform(0.15, 0.55)
    v2 = min(1.0, v1 + rng.uniform(0.3, 0.6))
    a, b = _hsv_to_rgb(h1, s1, v1), _hsv_to_rgb(h2, s2, v2)
    return (a, b) if rng.random() < 0.5 else (b, a)


# -- thing shapes and textures, in object coordinates (u, v): the unit circle is the radius ------------
def _shape_disc(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> np.ndarray:
    return u * u + v * v <= 1.0


def _shape_square(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85


_S3 = np.float32(math.sqrt(3) / 2)


def _shape_triangle(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> np.ndarray:
    return (v >= -0.6) & (_S3 * u + 0.5 * v <= 0.6) & (-_S3 * u + 0.5 * v <= 0.6)


def _shape_star(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> np.ndarray:
    inner = rng.uniform(0.42, 0.52)
    phi = np.arctan2(v, u)
    lobe = (0.5 + 0.5 * np.cos(5 * phi)) ** 2
    return u * u + v * v <= (inner + (1.05 - inner) * lobe) ** 2


def _shape_cross(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> np.ndarray:
    w = rng.uniform(0.3, 0.38)
    au, av = np.abs(u), np.abs(v)
    return ((au <= w) & (av <= 0.95)) | ((av <= w) & (au <= 0.95))


def _shape_crescent(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> np.ndarray:
    off = rng.uniform(0.45, 0.6)
    return (u * u + v * v <= 1.0) & ((u - off) ** 2 + v * v >= 0.8**2)


def _shape_ring(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> np.ndarray:
    inner = rng.uniform(0.45, 0.58)
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= inner * inner)


def _shape_capsule(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> np.ndarray:
    du = np.maximum(np.abs(u) - 0.55, 0.0)
    return du * du + v * v <= 0.42**2


def _tex_rings(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> FloatArray:
    f = rng.uniform(2.0, 3.0)
    return _sq(np.sin(_TAU * f * np.sqrt(u * u + v * v) + rng.uniform(0, 6.3)))


def _tex_checks(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> FloatArray:
    f = rng.uniform(1.2, 1.7)
    a, b = rng.uniform(0, 6.3, size=2)
    return _sq(np.sin(_TAU * f * u + a) * np.sin(_TAU * f * v + b), 4.0)


def _tex_stripes(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> FloatArray:
    f = rng.uniform(2.8, 4.0)
    return _sq(np.sin(_TAU * f * v + rng.uniform(0, 6.3)))


def _tex_dots(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> FloatArray:
    f = rng.uniform(2.4, 3.2)
    a, b = rng.uniform(0, 1, size=2)
    du = _frac(u * f + a) - 0.5
    dv = _frac(v * f + b) - 0.5
    return _sq((0.09 - (du * du + dv * dv)) * 12.0, 4.0)


def _tex_grid(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> FloatArray:
    f = rng.uniform(2.0, 2.8)
    a, b = rng.uniform(0, 6.3, size=2)
    lines = np.maximum(np.abs(np.cos(math.pi * f * u + a)), np.abs(np.cos(math.pi * f * v + b)))
    return _sq((lines - 0.8) * 3.0, 4.0)


def _tex_zigzag(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> FloatArray:
    f, g = rng.uniform(2.5, 3.3), rng.uniform(1.5, 2.2)
    tri = np.abs(_frac(u * g) - 0.5) * 2 - 0.5  # triangle wave in [-0.5, 0.5]
    return _sq(np.sin(_TAU * f * (v + 0.35 * tri) + rng.uniform(0, 6.3)))


def _tex_spokes(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> FloatArray:
    k = int(rng.integers(7, 11))
    return _sq(np.sin(k * np.arctan2(v, u) + rng.uniform(0, 6.3)))


def _tex_wavy(u: FloatArray, v: FloatArray, rng: np.random.Generator) -> FloatArray:
    f, g = rng.uniform(2.2, 3.0), rng.uniform(0.6, 1.0)
    return _sq(np.sin(_TAU * f * (u + 0.12 * np.sin(_TAU * g * v * 1.5)) + rng.uniform(0, 6.3)))


ShapeFn = Callable[[FloatArray, FloatArray, np.random.Generator], np.ndarray]
TextureFn = Callable[[FloatArray, FloatArray, np.random.Generator], FloatArray]

# Per class: shape, texture, the radius factor that gives the shape the area of the unit disc (so
# every class covers about the same area at the same scale and image labels stay balanced), and the
# shape's largest radius after that factor (the bounding box of the drawing).
_THINGS: tuple[tuple[ShapeFn, TextureFn, float, float], ...] = (
    (_shape_disc, _tex_rings, 1.0, 1.0),
    (_shape_square, _tex_checks, 1.043, 1.2),
    (_shape_triangle, _tex_stripes, 1.294, 1.2),
    (_shape_star, _tex_dots, 1.385, 1.05),
    (_shape_cross, _tex_grid, 1.22, 1.02),
    (_shape_crescent, _tex_zigzag, 1.407, 1.0),
    (_shape_ring, _tex_spokes, 1.172, 1.0),
    (_shape_capsule, _tex_wavy, 1.456, 0.97),
)


# -- stuff textures, in image coordinates normalised to [0, 1] ----------------------------------------
def _rotated(x: FloatArray, y: FloatArray, rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
    th = rng.uniform(0, math.pi)
    c, s = np.float32(math.cos(th)), np.float32(math.sin(th))
    return c * x + s * y, c * y - s * x


def _stuff_stripes(x: FloatArray, y: FloatArray, rng: np.random.Generator) -> FloatArray:
    p, _ = _rotated(x, y, rng)
    return _sq(np.sin(_TAU * rng.uniform(6.0, 9.0) * p + rng.uniform(0, 6.3)), 3.0)


def _stuff_bricks(x: FloatArray, y: FloatArray, rng: np.random.Generator) -> FloatArray:
    p, q = _rotated(x, y, rng)
    h = rng.uniform(0.06, 0.08)
    qh = q / np.float32(h)
    row = np.floor(qh)
    across = qh - row
    odd = row - 2 * np.floor(row * np.float32(0.5))  # 0 or 1: alternate rows shift by half a brick
    along = _frac(p / np.float32(2 * h) + np.float32(0.5) * odd)
    mortar = (across < 0.2) | (along < 0.1)
    return mortar.astype(np.float32)


def _stuff_blobs(x: FloatArray, y: FloatArray, rng: np.random.Generator) -> FloatArray:
    n = _smooth_noise(rng, x.shape[0], int(rng.integers(6, 9)))
    return _sq(n * 3.0, 1.0)


def _stuff_waves(x: FloatArray, y: FloatArray, rng: np.random.Generator) -> FloatArray:
    p, q = _rotated(x, y, rng)
    f, g, a = rng.uniform(10.0, 13.0), rng.uniform(1.5, 2.5), rng.uniform(0.03, 0.05)
    return _sq(np.sin(_TAU * f * (q + a * np.sin(_TAU * g * p)) + rng.uniform(0, 6.3)), 2.0)


def _stuff_grain(x: FloatArray, y: FloatArray, rng: np.random.Generator) -> FloatArray:
    fine = rng.random(x.shape, dtype=np.float32)
    coarse = _smooth_noise(rng, x.shape[0], 24)
    return np.clip(0.15 + 0.7 * fine + 0.12 * coarse, 0.0, 1.0)


def _stuff_gradient(x: FloatArray, y: FloatArray, rng: np.random.Generator) -> FloatArray:
    p, _ = _rotated(x, y, rng)
    lo, hi = float(p.min()), float(p.max())
    return (p - lo) / max(hi - lo, 1e-6) + 0.08 * _smooth_noise(rng, x.shape[0], 4)


_STUFF: tuple[TextureFn, ...] = (
    _stuff_stripes,
    _stuff_bricks,
    _stuff_blobs,
    _stuff_waves,
    _stuff_grain,
    _stuff_gradient,
)


# -- the generator -------------------------------------------------------------------------------------
def _regions(rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    """int (S, S) region index per pixel: a warped Voronoi partition without tiny regions."""
    s = cfg.size
    k = int(rng.integers(cfg.stuff_regions[0], cfg.stuff_regions[1] + 1))
    if k == 1:
        return np.zeros((s, s), dtype=np.intp)
    x, y = _grid(s)
    seeds = rng.uniform(0.1, 0.9, size=(k, 2)).astype(np.float32) * s
    dist = np.stack(
        [
            ((x - sx) ** 2 + (y - sy) ** 2) / (s * s) + 0.03 * _smooth_noise(rng, s, 4)
            for sx, sy in seeds.tolist()
        ]
    )  # (k, S, S)
    alive = np.ones(k, dtype=bool)
    while True:
        live = np.flatnonzero(alive).tolist()
        region = np.full((s, s), live[0], dtype=np.intp)
        best = dist[live[0]].copy()
        for j in live[1:]:
            closer = dist[j] < best
            region[closer] = j
            np.minimum(best, dist[j], out=best)
        area = np.bincount(region.ravel(), minlength=k) / (s * s)
        small = alive & (area < cfg.min_region)
        if not small.any():
            return region
        alive[np.flatnonzero(small)[np.argmin(area[small])]] = False


def _near_boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """bool (H, W): pixels within `width` (chessboard distance) of a pixel of another class."""
    edge = np.zeros(mask.shape, dtype=bool)
    d = mask[1:, :] != mask[:-1, :]
    edge[1:, :] |= d
    edge[:-1, :] |= d
    d = mask[:, 1:] != mask[:, :-1]
    edge[:, 1:] |= d
    edge[:, :-1] |= d
    for _ in range(width - 1):
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:-1] |= edge[1:]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        edge = grown
    return edge


def _blur3_planar(img: FloatArray) -> FloatArray:
    """3x3 binomial blur (sigma about 0.7 px) of (C, H, W) with edge replication."""
    out = img * np.float32(2)
    out[:, 1:] += img[:, :-1]
    out[:, :-1] += img[:, 1:]
    out[:, 0] += img[:, 0]
    out[:, -1] += img[:, -1]
    res = out * np.float32(2)
    res[:, :, 1:] += out[:, :, :-1]
    res[:, :, :-1] += out[:, :, 1:]
    res[:, :, 0] += out[:, :, 0]
    res[:, :, -1] += out[:, :, -1]
    res *= np.float32(1 / 16)
    return res


def generate_scene(rng: np.random.Generator, cfg: SceneConfig) -> Scene:
    """One scene from a generator; `SyntheticScenes` seeds it per item.

    Painting works on two maps: `tex` (H, W) the texture value in [0, 1] and `owner` (H, W) which
    region or object owns the pixel; each owner has two colours, mixed by `tex` at the end."""
    s = cfg.size
    n_things = cfg.num_thing_classes
    x, y = _grid(s)
    xn, yn = x / np.float32(s), y / np.float32(s)
    colours: list[tuple[np.ndarray, np.ndarray]] = []

    # Background: stuff regions, each a stuff class with its own colours and texture parameters.
    region = _regions(rng, cfg)
    n_regions = int(region.max()) + 1
    stuff = rng.integers(0, cfg.num_stuff_classes, size=n_regions)
    tex = np.empty((s, s), dtype=np.float32)
    mask = np.empty((s, s), dtype=np.uint8)
    for r in range(n_regions):
        t = _STUFF[int(stuff[r])](xn, yn, rng)
        colours.append(_colours(rng))
        if n_regions == 1:
            tex[:] = t
        else:
            np.copyto(tex, t, where=region == r)
    np.take(np.asarray(n_things + stuff, dtype=np.uint8), region, out=mask)
    owner = region.astype(np.intp, copy=False)

    # Things, later ones in front. `owner` - n_regions is the object index.
    count = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
    classes = rng.integers(0, n_things, size=count)
    full_area = np.zeros(count, dtype=np.int64)
    for k in range(count):
        cls = int(classes[k])
        shape_fn, texture_fn, area_factor, extent = _THINGS[cls]
        radius = rng.uniform(*cfg.scale) * s * area_factor
        cx, cy = rng.uniform(0.1, 0.9, size=2) * s
        theta = rng.uniform(0, 2 * math.pi)
        stretch = math.exp(rng.uniform(-cfg.aspect_jitter, cfg.aspect_jitter) / 2)
        reach = extent * radius * max(stretch, 1 / stretch) + 1
        x0, x1 = max(0, int(cx - reach)), min(s, int(cx + reach) + 2)
        y0, y1 = max(0, int(cy - reach)), min(s, int(cy + reach) + 2)
        dx = (x[y0:y1, x0:x1] - np.float32(cx)) / np.float32(radius)
        dy = (y[y0:y1, x0:x1] - np.float32(cy)) / np.float32(radius)
        c, sn = np.float32(math.cos(theta)), np.float32(math.sin(theta))
        u = (c * dx + sn * dy) / np.float32(stretch)
        v = (c * dy - sn * dx) * np.float32(stretch)
        inside = shape_fn(u, v, rng)
        np.copyto(tex[y0:y1, x0:x1], texture_fn(u, v, rng), where=inside)
        colours.append(_colours(rng))
        mask[y0:y1, x0:x1][inside] = cls
        owner[y0:y1, x0:x1][inside] = n_regions + k
        full_area[k] = int(inside.sum())

    # Heavily occluded objects leave slivers: marked ignore rather than labelled.
    visible = np.bincount(owner.ravel(), minlength=n_regions + count)[n_regions:]
    min_px = max(4.0, 0.002 * s * s)
    for sliver in np.flatnonzero((visible < cfg.min_visible * full_area) | (visible < min_px)).tolist():
        mask[owner == n_regions + sliver] = IGNORE
    if cfg.boundary_ignore > 0:
        mask[_near_boundary(mask, cfg.boundary_ignore)] = IGNORE
    thing_pixels = np.bincount(mask.ravel(), minlength=256)[:n_things]
    if thing_pixels.max() > 0:
        label = int(np.argmax(thing_pixels))
    else:  # every object was marked ignore (only with aggressive settings): the front one names it
        label = int(classes[-1])

    # Colour, then photometric realism: a light ramp, a mild blur, sensor noise.
    c0 = np.stack([a for a, _ in colours])  # (owners, 3)
    dc = np.stack([b for _, b in colours]) - c0
    light = None
    if cfg.lighting > 0:
        gx, gy = rng.uniform(-cfg.lighting, cfg.lighting, size=2).astype(np.float32)
        light = 1 + gx * (xn - 0.5) + gy * (yn - 0.5)
    img = np.empty((3, s, s), dtype=np.float32)
    for ch in range(3):
        plane = np.take(c0[:, ch], owner) + tex * np.take(dc[:, ch], owner)
        img[ch] = plane * light if light is not None else plane
    if cfg.blur:
        img = _blur3_planar(img)
    if cfg.noise_std > 0:  # uniform grey-level noise with standard deviation noise_std, shared by channels
        raw = np.frombuffer(rng.bytes(s * s), dtype=np.uint8).reshape(s, s).astype(np.float32)
        raw -= np.float32(127.5)
        raw *= np.float32(cfg.noise_std * math.sqrt(12) / 256)
        img += raw
    img += np.float32(0.5)
    np.clip(img, 0, 255, out=img)
    image = np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0))
    return Scene(image=image, mask=mask, label=label)


class SyntheticScenes:
    """`n` scenes; item i is generated on access from `np.random.default_rng([seed, i])`."""

    def __init__(self, n: int, seed: int = 0, config: SceneConfig = SceneConfig()) -> None:
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.n, self.seed, self.config = int(n), int(seed), config

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Scene:
        i = int(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"scene {i} out of range for {self.n} scenes")
        return generate_scene(np.random.default_rng([self.seed, i]), self.config)

    @property
    def thing_classes(self) -> list[int]:
        """Class ids of the things: 0..T-1 (image-level labels are among these)."""
        return list(range(self.config.num_thing_classes))

    @property
    def stuff_classes(self) -> list[int]:
        """Class ids of the stuff (background textures): T..T+S-1."""
        t = self.config.num_thing_classes
        return list(range(t, t + self.config.num_stuff_classes))

    @property
    def class_names(self) -> list[str]:
        return [*THING_NAMES[: self.config.num_thing_classes], *STUFF_NAMES[: self.config.num_stuff_classes]]

    @property
    def num_classes(self) -> int:
        return self.config.num_thing_classes + self.config.num_stuff_classes

    def spec(self) -> str:
        """The `open_dataset` spec of these scenes (only configs that differ from the default in
        size alone have one)."""
        if self.config != SceneConfig(size=self.config.size):
            raise ValueError("scenes with a custom SceneConfig (beyond size) have no synthetic:... spec")
        return f"synthetic:{self.n}:{self.seed}:{self.config.size}"

    def fingerprint(self) -> str:
        """Identifies the exact images: generator version, n, seed and config."""
        key = json.dumps(
            {"version": SYNTHETIC_VERSION, "n": self.n, "seed": self.seed, "config": self.config.to_dict()},
            sort_keys=True,
        )
        return hashlib.sha256(key.encode()).hexdigest()

    def meta(self, labels: list[int] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "generator": "cotap.training.data.synthetic",
            "version": SYNTHETIC_VERSION,
            "n": self.n,
            "seed": self.seed,
            "config": self.config.to_dict(),
            "class_names": self.class_names,
            "num_classes": self.num_classes,
            "thing_classes": self.thing_classes,
            "stuff_classes": self.stuff_classes,
            "ignore_index": IGNORE,
        }
        if labels is not None:
            d["labels"] = labels
        return d


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples, flattened); index 255 is (224, 224, 192)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def write_scenes(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    config: SceneConfig = SceneConfig(),
    image_format: str = "png",
    progress: bool = False,
) -> Path:
    """Write `images/{i:05d}.{png|jpg|webp}`, `masks/{i:05d}.png` (palette PNG, index = class id,
    255 = ignore) and `meta.json` (version, seed, config, class names, labels) under `out_dir`."""
    fmt = image_format.lower().lstrip(".")
    pil_format = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}.get(fmt)
    if pil_format is None:
        raise ValueError(f"image_format must be png, jpg or webp, not {image_format!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(n, seed, config)
    palette = voc_palette()
    labels: list[int] = []
    it: Any = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="synthetic scenes", unit="img")
    for i in it:
        scene = scenes[i]
        labels.append(scene.label)
        extra = {"quality": 95} if pil_format in ("JPEG", "WEBP") else {}
        Image.fromarray(scene.image).save(out / "images" / f"{i:05d}.{fmt}", pil_format, **extra)
        m = Image.frombytes("P", (scene.mask.shape[1], scene.mask.shape[0]), scene.mask.tobytes())
        m.putpalette(palette)
        m.save(out / "masks" / f"{i:05d}.png", "PNG")
    write_json(out / "meta.json", scenes.meta(labels), indent=1)
    return out
