"""The embedded default bundle: verifies, is the documented placeholder, stays small, and its
recipe regenerates the same weights."""

from __future__ import annotations

from pathlib import Path

from cotap.core.bundle import MODEL_CARD, WEIGHTS, read_bundle
from cotap.server.settings import DEFAULT_MODEL_DIR


def test_default_bundle_is_the_documented_placeholder() -> None:
    b = read_bundle(DEFAULT_MODEL_DIR)  # verifies every file's size and sha256
    assert b.config.arch == "cotap_micro8" and b.config.input_sizes == ((64, 64),)
    assert b.config.preprocess.resize == "fixed" and b.config.patch_size == 8
    assert b.config.prototypes_initialized is False
    assert sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir()) < 3 * 1024 * 1024
    card = (DEFAULT_MODEL_DIR / MODEL_CARD).read_text()
    assert "UNTRAINED PLACEHOLDER" in card
    assert b.files[WEIGHTS]["sha256"] in card
    assert "python -m cotap.server.backends.placeholder" in card


def test_recipe_regenerates_identical_weights(tmp_path: Path) -> None:
    """Same tensors (the safetensors header's key order may differ between processes, so the
    file hash is not compared)."""
    import numpy as np
    from safetensors.numpy import load_file

    from cotap.server.backends.placeholder import make_placeholder_default

    fresh = make_placeholder_default(tmp_path / "default")
    shipped = read_bundle(DEFAULT_MODEL_DIR)
    a, b = load_file(fresh.file(WEIGHTS)), load_file(shipped.file(WEIGHTS))
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert fresh.config.to_dict() == shipped.config.to_dict()
