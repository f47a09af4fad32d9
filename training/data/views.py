"""Multi-crop views for CoTAP (cotap-method.md §4), in plain torch (there is no torchvision here).

One image gives 2 global and L local crops (RandomResizedCrop sampling, no flip), resampled until
every crop overlaps every global crop by more than a fraction of the image area, with the box of
each crop in normalised original-image coordinates so the losses can ROI-align any two crops on
their overlap. The student sees photometrically augmented crops (colour jitter in random order,
grayscale, Gaussian blur, as DINO/Leopart); the teacher sees the same global crops un-augmented.

Deviation from the release code, on purpose: the photometric draws are per crop of each image,
where the release applied one draw per crop index to the whole batch (a torchvision artefact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch
import torch.nn.functional as F

from cotap.core.preprocess import IMAGENET_MEAN, IMAGENET_STD
from cotap.training.foreground import gaussian_kernel1d
from cotap.training.preprocess import resize_to

Box: TypeAlias = tuple[int, int, int, int]  # integer pixels (top, left, height, width)

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)


@dataclass(frozen=True)
class ViewConfig:
    """Crop sizes and scales, overlap constraints and the student's photometric augmentation."""

    global_size: int = 224
    local_size: int = 96
    num_local: int = 4
    global_scale: tuple[float, float] = (0.25, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.1)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    min_overlap_global: float = 0.02  # global-global overlap, fraction of the image area
    min_overlap_local: float = 0.01  # each local with each global
    max_tries: int = 50
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_kernel: int = 7
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.global_size < 1 or self.local_size < 1 or self.num_local < 0:
            raise ValueError("crop sizes must be positive and num_local non-negative")
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be a positive (low, high) range, got {(lo, hi)}")
            object.__setattr__(self, name, (float(lo), float(hi)))
        if self.global_scale[1] > 1 or self.local_scale[1] > 1:
            raise ValueError("crop scales are fractions of the image area, at most 1")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd and positive, got {self.blur_kernel}")
        if self.hue > 0.5:
            raise ValueError("hue jitter is at most 0.5")
        for name in ("jitter_p", "grayscale_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def num_crops(self) -> int:
        return 2 + self.num_local


@dataclass
class Views:
    """The crops of one image. Boxes are (x0, y0, x1, y1) in [0, 1] of the original image,
    globals first: row 0 and 1 the global crops, rows 2.. the local crops."""

    student_global: torch.Tensor  # (2, 3, Hg, Wg) float32, augmented, normalised
    teacher_global: torch.Tensor  # (2, 3, Hg, Wg) float32, the same crops un-augmented, normalised
    student_local: torch.Tensor  # (L, 3, Hl, Wl) float32, augmented, normalised
    boxes: torch.Tensor  # (2 + L, 4) float32


# -- random numbers, all from the caller's generator -------------------------------------------------
def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi)."""
    return int(torch.randint(lo, hi, (1,), generator=g))


def _bernoulli(g: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand((), generator=g, dtype=torch.float64)) < p


# -- geometry ------------------------------------------------------------------------------------------
def random_resized_crop_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> Box:
    """torchvision's RandomResizedCrop.get_params: 10 tries at a random area and log-uniform aspect,
    then a centre crop clamped to the ratio range. Returns (top, left, h, w) in pixels."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(g, 0, height - h + 1), _randint(g, 0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _intersection(a: Box, b: Box) -> Box:
    top, left = max(a[0], b[0]), max(a[1], b[1])
    bottom, right = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return top, left, max(0, bottom - top), max(0, right - left)


def _overlap(a: Box, b: Box) -> int:
    _, _, h, w = _intersection(a, b)
    return h * w


def _fallback_global(first: Box, h: int, w: int, height: int, width: int) -> Box:
    """A crop of size (h, w) centred on the first global crop, kept inside the image."""
    top = min(max(0, first[0] + first[2] // 2 - h // 2), height - h)
    left = min(max(0, first[1] + first[3] // 2 - w // 2), width - w)
    return top, left, h, w


def _fallback_local(both: Box, target_area: float, aspect: float, height: int, width: int) -> Box:
    """A local crop of about `target_area` that lies inside the globals' intersection `both` when that
    is larger, and contains it otherwise: either way it overlaps each global by at least
    min(target_area, area(both))."""
    it, il, ih, iw = both
    w = max(1, round(math.sqrt(target_area * aspect)))
    if ih * iw >= target_area:
        w = min(w, iw)
        h = min(ih, max(1, round(target_area / w)))
        return it + (ih - h) // 2, il + (iw - w) // 2, h, w
    w = min(width, max(w, iw))
    h = min(height, max(ih, max(1, round(target_area / w))))
    lo_t, hi_t = max(0, it + ih - h), min(it, height - h)
    lo_l, hi_l = max(0, il + iw - w), min(il, width - w)
    return (lo_t + hi_t) // 2, (lo_l + hi_l) // 2, h, w


def sample_crops(height: int, width: int, config: ViewConfig, g: torch.Generator) -> list[Box]:
    """2 global then `num_local` local crops (top, left, h, w) meeting the overlap constraints."""
    area = height * width
    need_g = config.min_overlap_global * area
    need_l = config.min_overlap_local * area
    for _ in range(max(1, config.max_tries)):  # the pair is resampled jointly: symmetric in g0, g1
        g0 = random_resized_crop_params(height, width, config.global_scale, config.ratio, g)
        g1 = random_resized_crop_params(height, width, config.global_scale, config.ratio, g)
        if _overlap(g0, g1) > need_g:
            break
    else:
        g1 = _fallback_global(g0, g1[2], g1[3], height, width)
        if _overlap(g0, g1) <= need_g:
            g1 = g0
    crops = [g0, g1]
    both = _intersection(g0, g1)
    for _ in range(config.num_local):
        for _ in range(max(1, config.max_tries)):
            c = random_resized_crop_params(height, width, config.local_scale, config.ratio, g)
            if _overlap(c, g0) > need_l and _overlap(c, g1) > need_l:
                break
        else:
            target = area * _uniform(g, *config.local_scale)
            aspect = math.exp(_uniform(g, math.log(config.ratio[0]), math.log(config.ratio[1])))
            c = _fallback_local(both, target, aspect, height, width)
        crops.append(c)
    return crops


def crop_boxes(crops: list[Box], height: int, width: int) -> torch.Tensor:
    """(top, left, h, w) pixel crops -> (N, 4) float32 (x0, y0, x1, y1) normalised to the image."""
    return torch.tensor(
        [[c[1] / width, c[0] / height, (c[1] + c[3]) / width, (c[0] + c[2]) / height] for c in crops],
        dtype=torch.float32,
    )


def overlap_boxes(box_a: torch.Tensor, box_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The intersection of two boxes (x0, y0, x1, y1) given in the same frame, expressed in box a's
    own normalised coordinates and in box b's: what ROI-align needs to pool both crops' feature maps
    over their common region. None when they do not overlap."""
    rel_a, rel_b, valid = overlap_boxes_batched(box_a, box_b)
    if not bool(valid):
        return None
    return rel_a, rel_b


def overlap_boxes_batched(
    box_a: torch.Tensor, box_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched `overlap_boxes` over (..., 4) (broadcasting): (rel_a (..., 4), rel_b (..., 4),
    valid (...) bool). Where a pair does not overlap, valid is False and the boxes are degenerate."""
    x0 = torch.maximum(box_a[..., 0], box_b[..., 0])
    y0 = torch.maximum(box_a[..., 1], box_b[..., 1])
    x1 = torch.minimum(box_a[..., 2], box_b[..., 2])
    y1 = torch.minimum(box_a[..., 3], box_b[..., 3])
    valid = (x1 > x0) & (y1 > y0)
    x1, y1 = torch.maximum(x1, x0), torch.maximum(y1, y0)
    inter = torch.stack([x0, y0, x1, y1], dim=-1)

    def relative(box: torch.Tensor) -> torch.Tensor:
        origin = torch.cat([box[..., :2], box[..., :2]], dim=-1)
        extent = torch.cat([box[..., 2:] - box[..., :2]] * 2, dim=-1)
        return (inter - origin) / extent

    return relative(box_a), relative(box_b), valid


# -- photometric augmentation (float images in [0, 1], (..., 3, H, W)) --------------------------------
def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 1, H, W) luma with torchvision's weights."""
    r, g, b = x.unbind(dim=-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def adjust_brightness(x: torch.Tensor, factor: float) -> torch.Tensor:
    return (x * factor).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return (factor * x + (1 - factor) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    return (factor * x + (1 - factor) * grayscale(x)).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> HSV with hue in [0, 1)."""
    r, g, b = x.unbind(dim=-3)
    maxc, _ = x.max(dim=-3)
    minc, _ = x.min(dim=-3)
    delta = maxc - minc
    flat = delta == 0
    safe = torch.where(flat, torch.ones_like(delta), delta)
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack([h, s, maxc], dim=-3)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) HSV (hue in [0, 1)) -> RGB, by the closed form c = v - v s clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 h) mod 6 and n = 5, 3, 1 for r, g, b."""
    h, s, v = x[..., 0:1, :, :], x[..., 1:2, :, :], x[..., 2:3, :, :]
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(3, 1, 1)
    k = torch.remainder(n + h * 6.0, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0, 1)


def adjust_hue(x: torch.Tensor, factor: float) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[..., 0, :, :] + factor, 1.0)
    return hsv_to_rgb(torch.stack([h, hsv[..., 1, :, :], hsv[..., 2, :, :]], dim=-3))


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (..., C, H, W) with reflect padding (torchvision's), as sums of
    shifted slices (much faster on CPU than a depthwise conv2d)."""
    k = gaussian_kernel1d(kernel_size, sigma).tolist()
    pad = kernel_size // 2
    h, w = x.shape[-2:]
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, h, w)
    mode = "reflect" if min(h, w) > pad else "replicate"
    p = F.pad(flat, (pad, pad, pad, pad), mode=mode)[:, 0]  # (N, H + 2p, W + 2p)
    rows = k[0] * p[:, :, 0:w]
    for i in range(1, kernel_size):
        rows = rows + k[i] * p[:, :, i : i + w]
    out = k[0] * rows[:, 0:h]
    for i in range(1, kernel_size):
        out = out + k[i] * rows[:, i : i + h]
    return out.reshape(*lead, h, w)


def color_jitter(x: torch.Tensor, config: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """torchvision's ColorJitter: the four factors drawn, then applied in a random order."""
    order = torch.randperm(4, generator=g).tolist()
    b = _uniform(g, max(0.0, 1 - config.brightness), 1 + config.brightness) if config.brightness else None
    c = _uniform(g, max(0.0, 1 - config.contrast), 1 + config.contrast) if config.contrast else None
    s = _uniform(g, max(0.0, 1 - config.saturation), 1 + config.saturation) if config.saturation else None
    h = _uniform(g, -config.hue, config.hue) if config.hue else None
    for op in order:
        if op == 0 and b is not None:
            x = adjust_brightness(x, b)
        elif op == 1 and c is not None:
            x = adjust_contrast(x, c)
        elif op == 2 and s is not None:
            x = adjust_saturation(x, s)
        elif op == 3 and h is not None:
            x = adjust_hue(x, h)
    return x


def photometric(x: torch.Tensor, config: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """The student's augmentation of one crop (3, H, W) in [0, 1]: jitter (p), grayscale (p), blur (p)."""
    if _bernoulli(g, config.jitter_p):
        x = color_jitter(x, config, g)
    if _bernoulli(g, config.grayscale_p):
        x = grayscale(x).expand_as(x).contiguous()
    if _bernoulli(g, config.blur_p):
        x = gaussian_blur(x, config.blur_kernel, _uniform(g, *config.blur_sigma))
    return x


# -- putting it together -------------------------------------------------------------------------------
def as_chw_uint8(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (H, W, 3) array or (3, H, W) tensor (grey (H, W) is repeated) -> uint8 tensor (3, H, W)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"expected a uint8 image, got {image.dtype}")
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got {image.shape}")
        if not image.flags.writeable:  # backed by a PIL image: torch warns on read-only memory
            image = image.copy()
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 tensor, got {image.dtype}")
    if image.dim() == 2:
        image = image.unsqueeze(0).expand(3, -1, -1)
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got {tuple(image.shape)}")
    return image


def _normalize(x: torch.Tensor, config: ViewConfig) -> torch.Tensor:
    mean = torch.tensor(config.mean, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(config.std, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


def make_views(image: np.ndarray | torch.Tensor, config: ViewConfig, generator: torch.Generator) -> Views:
    """The crops of one image; every random draw comes from `generator`, geometry first."""
    img = as_chw_uint8(image)
    height, width = img.shape[-2:]
    crops = sample_crops(height, width, config, generator)
    resized = []
    for i, (top, left, h, w) in enumerate(crops):
        size = config.global_size if i < 2 else config.local_size
        patch = img[:, top : top + h, left : left + w]
        resized.append(resize_to(patch, (size, size)) / 255.0)  # float32 (3, size, size) in [0, 1]
    student = [photometric(x, config, generator) for x in resized]
    glob = torch.stack([_normalize(x, config) for x in student[:2]])
    teacher = torch.stack([_normalize(x, config) for x in resized[:2]])
    if config.num_local:
        local = torch.stack([_normalize(x, config) for x in student[2:]])
    else:
        local = torch.empty(0, 3, config.local_size, config.local_size)
    return Views(
        student_global=glob,
        teacher_global=teacher,
        student_local=local,
        boxes=crop_boxes(crops, height, width),
    )
