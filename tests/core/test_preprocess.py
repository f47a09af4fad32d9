from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cotap.core.preprocess import PreprocessConfig, preprocess_image
from cotap.training.preprocess import preprocess_tensor


def test_fixed_policy() -> None:
    c = PreprocessConfig(size=(224, 320), patch_size=16)
    assert c.output_size(480, 640) == (224, 320)
    assert c.grid(10, 10) == (14, 20)


def test_shorter_side_policy_rounds_to_patch() -> None:
    c = PreprocessConfig(resize="shorter_side", size=224, patch_size=16, max_side=1024)
    assert c.output_size(480, 640) == (224, 304)  # 298.7 -> 304
    assert c.output_size(640, 480) == (304, 224)
    h, w = c.output_size(100, 10000)
    assert max(h, w) <= 1024 and h % 16 == 0 and w % 16 == 0 and min(h, w) >= 16


def test_invalid_configs() -> None:
    with pytest.raises(ValueError, match="multiple"):
        PreprocessConfig(size=(225, 224), patch_size=16)
    with pytest.raises(ValueError, match="policy"):
        PreprocessConfig(resize="crop")  # type: ignore[arg-type]


def test_roundtrip_dict() -> None:
    c = PreprocessConfig(
        resize="shorter_side", size=336, patch_size=8, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)
    )
    assert PreprocessConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "shape,size",
    [
        ((97, 131), (64, 96)),
        ((40, 50), (64, 64)),
        ((64, 64), (64, 64)),
        ((480, 640), (224, 224)),
        ((300, 200), (224, 224)),
        ((241, 196), (128, 176)),
    ],
)
def test_torch_and_pillow_agree(shape: tuple[int, int], size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    # smooth content plus noise: a realistic mix of edges and gradients
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    base = (127 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None]).repeat(3, axis=2)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    c = PreprocessConfig(size=size, patch_size=8)
    ref = preprocess_image(Image.fromarray(pixels), c)
    ours = preprocess_tensor(torch.from_numpy(pixels).permute(2, 0, 1), c).numpy()
    assert ours.shape == ref.shape == (3, *size)
    one_level = 1 / 255 / min(c.std)
    diff = np.abs(ours - ref)
    assert diff.mean() < 0.3 * one_level
    assert diff.max() <= 3.01 * one_level
