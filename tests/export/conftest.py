"""Tiny real bundles for the export tests (cotap_test: D32, depth 2, patch 8)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cotap.core.bundle import Bundle
from cotap.core.preprocess import PreprocessConfig
from cotap.training.bundles import write_model_bundle
from cotap.training.models import build_model

TWO_SIZES = ((32, 32), (24, 40))


def make_bundle(path: Path, sizes: tuple[tuple[int, int], ...] = TWO_SIZES, seed: int = 0) -> Bundle:
    torch.manual_seed(seed)
    model = build_model("cotap_test").eval()
    return write_model_bundle(
        model,
        "cotap_test",
        path,
        name="tiny",
        preprocess=PreprocessConfig(size=sizes[0], patch_size=8),
        input_sizes=sizes,
    )


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Bundle:
    """A cotap_test bundle declaring two input sizes, 32x32 and 24x40."""
    return make_bundle(tmp_path / "tiny")


@pytest.fixture
def bundle_factory(tmp_path: Path) -> Callable[..., Bundle]:
    def factory(name: str = "b", sizes: tuple[tuple[int, int], ...] = TWO_SIZES) -> Bundle:
        return make_bundle(tmp_path / name, sizes)

    return factory
