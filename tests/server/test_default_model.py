"""The embedded default bundle: verifies, is the trained model of the synthetic-scenes experiment
(not the old placeholder), stays under the 25 MB budget, documents itself, and was built by the
recipe in `configs/default-model.yaml`."""

from __future__ import annotations

import json
from pathlib import Path

from cotap.core.bundle import MANIFEST, MODEL_CARD, WEIGHTS, read_bundle
from cotap.server.settings import DEFAULT_MODEL_DIR

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "default-model.yaml"


def test_default_bundle_is_the_trained_small_model() -> None:
    b = read_bundle(DEFAULT_MODEL_DIR)  # verifies every file's size and sha256
    assert b.config.name == "default" and b.config.arch == "cotap_micro8"
    assert b.config.input_sizes == ((96, 96),) and b.config.patch_size == 8
    assert b.config.preprocess.resize == "fixed"
    assert sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir()) < 25 * 1024 * 1024
    card = (DEFAULT_MODEL_DIR / MODEL_CARD).read_text()
    assert "UNTRAINED PLACEHOLDER" not in card
    assert b.files[WEIGHTS]["sha256"] in card
    assert "configs/default-model.yaml" in card and "linear" in card
    assert b.manifest["source"]["which"] == "teacher" and b.manifest["build"]["step"] > 0


def test_default_bundle_was_built_by_the_recipe() -> None:
    """The resolved training config stored in the manifest is the recipe file's, key for key (the
    shipped weights come from the experiment's run of the same config, named after the variant)."""
    import pytest

    yaml = pytest.importorskip("yaml")
    from cotap.training.config import config_to_dict, load_config

    built = json.loads((DEFAULT_MODEL_DIR / MANIFEST).read_text())["build"]["config"]
    assert yaml.safe_load(RECIPE.read_text())["name"] == "default-model"
    recipe = config_to_dict(load_config(RECIPE))
    assert {**recipe, "name": built["name"]} == built
