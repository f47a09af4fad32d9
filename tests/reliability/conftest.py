"""Fixtures for the reliability tests: a tiny real bundle (cotap_test, 32x32, patch 8) and the load
generator of bench/reliability.py (imported from its file: bench/ is scripts, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.server.helpers import Gate, make_tiny_bundle

ROOT = Path(__file__).resolve().parents[2]


def load_bench() -> ModuleType:
    name = "cotap_bench_reliability"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "reliability.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bench() -> ModuleType:
    return load_bench()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@pytest.fixture
def gate() -> Iterator[Gate]:
    """Holds (or fails) a real backend's forward until released."""
    g = Gate()
    yield g
    g.release()
