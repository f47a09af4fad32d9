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


def test_serve_extra_alone_serves_the_default_model() -> None:
    """`pip install 'cotap[serve]'` has no torch: the embedded default carries its gated ONNX model,
    so the server picks ONNX Runtime and answers without importing torch."""
    import subprocess
    import sys

    code = """
import asyncio, io, sys
sys.modules["torch"] = None  # as if torch were not installed
import httpx
from PIL import Image
from cotap.server import create_app
from cotap.server.settings import Settings

async def main():
    app = create_app(Settings(max_batch=2))
    async with app.router.lifespan_context(app):
        assert await app.state.cotap.wait_loaded(60), app.state.cotap.load_error
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            model = (await c.get("/v1/models")).json()["models"][0]
            buf = io.BytesIO()
            Image.new("RGB", (80, 60), (200, 30, 30)).save(buf, "JPEG")
            r = await c.post("/v1/embed", files={"image": ("a.jpg", buf.getvalue(), "image/jpeg")})
            print("RESULT", model["backend"], r.status_code, r.json()["__metadata__"]["grid"])

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT onnxruntime 200 [12, 12]" in done.stdout, done.stdout + done.stderr[-2000:]
