"""The torch twin of `cotap.core.preprocess`: the same resize policy and normalisation on tensors.

Resizing reproduces Pillow's separable bicubic resampling (a = -0.5, support widened by the scale
when downsampling, 8-bit rounding between and after the passes) with two matrix products, so
training sees what the server sees. A test keeps the two within a fraction of a grey level on average.
"""

from __future__ import annotations

import functools

import torch

from cotap.core.preprocess import PreprocessConfig

_A = -0.5  # Pillow's bicubic


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    x2, x3 = x * x, x * x * x
    near = (_A + 2) * x3 - (_A + 3) * x2 + 1
    far = _A * x3 - 5 * _A * x2 + 8 * _A * x - 4 * _A
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(in_size: int, out_size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(out_size, in_size) matrix of Pillow's normalised bicubic coefficients for one axis."""
    return _resize_weights(in_size, out_size).to(dtype, copy=True)  # never hand out the cached tensor


@functools.lru_cache(maxsize=512)
def _resize_weights(in_size: int, out_size: int) -> torch.Tensor:
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    centers = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    xs = torch.arange(in_size, dtype=torch.float64)
    lo = torch.clamp((centers - support + 0.5).floor(), min=0)  # int() truncation of a positive number
    hi = torch.clamp((centers + support + 0.5).floor(), max=in_size)
    w = _bicubic((xs[None, :] - centers[:, None] + 0.5) / filterscale)
    inside = (xs[None, :] >= lo[:, None]) & (xs[None, :] < hi[:, None])
    w = torch.where(inside, w, torch.zeros_like(w))
    return w / w.sum(dim=1, keepdim=True)


def resize_tensor(image: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 or float (..., 3, H, W) in [0, 255] -> float32 (..., 3, h, w) in [0, 255], 8-bit levels."""
    h, w = config.output_size(image.shape[-2], image.shape[-1])
    return resize_to(image, (h, w))


def resize_to(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pillow-equivalent bicubic resize of (..., C, H, W) in [0, 255] to `size` = (h, w)."""
    h, w = size
    x = image.to(torch.float32)

    def horizontal(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == w:
            return x
        wx = resize_weights(x.shape[-1], w, torch.float32).to(x.device)
        return (x @ wx.T).round_().clamp_(0, 255)

    def vertical(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] == h:
            return x
        wy = resize_weights(x.shape[-2], h, torch.float32).to(x.device)
        return (wy @ x).round_().clamp_(0, 255)

    # Pillow 13 does not always run the horizontal pass first; running first the pass with the
    # smaller intermediate matches it in most shapes. Where the order differs, the 8-bit rounding
    # between passes differs by a level or two at some pixels (the test bounds it).
    if h * x.shape[-1] < x.shape[-2] * w:
        return horizontal(vertical(x))
    return vertical(horizontal(x))


def normalize_tensor(image: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """float (..., 3, H, W) in [0, 255] -> standardised with the config's mean and std."""
    mean = torch.tensor(config.mean, dtype=image.dtype, device=image.device).view(3, 1, 1)
    std = torch.tensor(config.std, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image / 255 - mean) / std


def preprocess_tensor(image: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 (3, H, W) -> the normalised float32 (3, h, w) model input."""
    return normalize_tensor(resize_tensor(image, config), config)
