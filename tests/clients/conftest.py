"""Fixtures for the client tests: real tiny bundles and a real server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cotap.core.preprocess import PreprocessConfig
from tests.clients.live import live_server
from tests.server.helpers import Gate, make_tiny_bundle


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture(scope="session")
def varied_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shorter-side resize: images of different shapes get different grids (unstacked answers)."""
    return make_tiny_bundle(
        tmp_path_factory.mktemp("bundles") / "varied",
        name="varied",
        preprocess=PreprocessConfig(resize="shorter_side", size=32, patch_size=8, max_side=64),
        input_sizes=[(32, 32)],
    )


@pytest.fixture(scope="session")
def server_url(tiny_bundle: Path, varied_bundle: Path) -> Iterator[str]:
    """One server for the tests that need no special settings: models `tiny` (default) and `varied`."""
    with live_server(tiny_bundle, varied_bundle) as url:
        yield url


@pytest.fixture
def gate() -> Iterator[Gate]:
    """Holds a real backend's forward until released (to fill queues on purpose)."""
    g = Gate()
    yield g
    g.release()
