"""Teacher foreground masks: the kept patches hold at least the asked mass, and no more than needed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cotap.training.foreground import foreground_masks, gaussian_blur, gaussian_kernel1d


def reference_blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """2-D convolution with the outer-product kernel on a reflect-padded map, loop by loop."""
    half = (size - 1) / 2
    taps = [torch.exp(torch.tensor(-0.5 * ((i - half) / sigma) ** 2)) for i in range(size)]
    k1 = torch.stack(taps) / sum(taps)
    k2 = k1[:, None] * k1[None, :]
    pad = size // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    _, _, h, w = x.shape
    out = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            out[:, 0, i, j] = (padded[:, 0, i : i + size, j : j + size] * k2).sum(dim=(-2, -1))
    return out


def test_gaussian_blur_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 8, 9, generator=g)
    assert torch.allclose(gaussian_blur(x, 7, 0.6), reference_blur(x, 7, 0.6), atol=1e-6)
    k = gaussian_kernel1d(7, 0.6)
    assert float(k.sum()) == pytest.approx(1.0) and torch.allclose(k, k.flip(0))
    tiny = torch.rand(1, 1, 2, 2, generator=g)  # too small to reflect: replicate padding
    assert gaussian_blur(tiny, 7, 0.6).shape == tiny.shape


@pytest.mark.parametrize("mass", [0.6, 0.3, 0.9])
def test_mask_holds_the_mass_minimally(mass: float) -> None:
    g = torch.Generator().manual_seed(1)
    b, heads, h, w = 4, 3, 6, 5
    attn = torch.softmax(torch.randn(b, heads, h * w, generator=g) * 2, dim=-1)
    masks = foreground_masks(attn, (h, w), mass=mass)
    assert masks.shape == (b, h, w)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    blurred = gaussian_blur(attn.mean(dim=1).reshape(b, 1, h, w), 7, 0.6).reshape(b, -1)
    share = blurred / blurred.sum(dim=1, keepdim=True)
    flat = masks.reshape(b, -1).bool()
    for i in range(b):
        kept = share[i][flat[i]]
        assert float(kept.sum()) >= mass - 1e-6
        # Minimal: dropping the smallest kept patch falls below the mass.
        assert float(kept.sum() - kept.min()) < mass + 1e-6
        # The kept patches are the largest ones.
        dropped = share[i][~flat[i]]
        if dropped.numel():
            assert float(kept.min()) >= float(dropped.max()) - 1e-7


def test_mask_follows_the_attention_peak_and_bad_input() -> None:
    attn = torch.full((1, 2, 16), 1e-3)
    attn[0, :, 5] = 1.0  # (1, 1) of a 4x4 grid
    masks = foreground_masks(attn, (4, 4))
    assert masks[0, 1, 1] == 1 and masks[0, 3, 3] == 0
    with pytest.raises(ValueError):
        foreground_masks(attn, (3, 4))
    with pytest.raises(ValueError):
        foreground_masks(attn[0], (4, 4))
    with pytest.raises(ValueError):
        foreground_masks(attn, (4, 4), mass=0.0)
