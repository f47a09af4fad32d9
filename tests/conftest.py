"""Shared fixtures: seeded torch, tiny images. Markers gpu/trt skip cleanly where unavailable."""

from __future__ import annotations

import importlib.util

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="no CUDA device on this machine"))
        if "trt" in item.keywords and not has_trt:
            item.add_marker(
                pytest.mark.skip(
                    reason="tensorrt is not installed (its libraries come from NVIDIA's index, unreachable here)"
                )
            )
