"""The web page at GET / in headless Chromium against a real `cotap serve` process: upload two
images, wait for the drawings, check that every canvas shows something, that the prototype legend
is there, and that clicking a patch of A redraws the similarity heatmap over B.

Needs Debian's `chromium` (apt-get install chromium) and Playwright (pip install playwright; no
`playwright install`: the system browser is used). Skips with the reason when either is missing.
Set COTAP_UPDATE_SCREENSHOT=1 to refresh docs/screenshots/web.png, and COTAP_WEB_BUNDLE=DIR to
serve another bundle than the tiny random one (a trained model makes a more telling picture).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cotap.core.preprocess import PreprocessConfig
from tests.server.helpers import free_port, make_tiny_bundle, wait_ready

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "screenshots" / "web.png"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser_path() -> str:
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install playwright")
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium on PATH: apt-get install chromium")
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random bundle (96 x 96 inputs: 12 x 12 patches), or $COTAP_WEB_BUNDLE."""
    given = os.environ.get("COTAP_WEB_BUNDLE")
    if given:
        return Path(given)
    return make_tiny_bundle(
        tmp_path_factory.mktemp("web") / "bundle",
        name="web",
        preprocess=PreprocessConfig(size=(96, 96), patch_size=8),
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, browser_path: str, bundle: Path) -> Iterator[str]:
    """`cotap serve` on a free loopback port with `bundle`."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "cotap.cli.main", "serve", "--model", str(bundle), "--port", str(port)]
    log = open(tmp / "serve.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, lambda: proc.poll() is None, timeout=90, log=tmp / "serve.log")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def scene(seed: int, size: int = 192) -> np.ndarray:
    """A photo-like synthetic scene (uint8 (size, size, 3))."""
    from cotap.training.data.synthetic import SceneConfig, SyntheticScenes

    return SyntheticScenes(seed + 1, seed=7, config=SceneConfig(size=size))[seed].image


def write_images(tmp: Path) -> tuple[Path, Path]:
    a = scene(3, 224)
    # B: the same scene, shifted and slightly zoomed, so that correspondences mean something.
    b = np.asarray(Image.fromarray(a[20:200, 30:210]).resize((200, 200), Image.Resampling.BICUBIC))
    pa, pb = tmp / "a.png", tmp / "b.jpg"
    Image.fromarray(a).save(pa)
    Image.fromarray(b).save(pb, quality=92)
    return pa, pb


CANVAS_STATS = """(id) => {
  const c = document.getElementById(id);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const colours = new Set();
  let lit = 0;
  for (let p = 0; p < d.length; p += 4) {
    if (d[p] + d[p + 1] + d[p + 2] > 30) lit++;
    colours.add((d[p] << 16) | (d[p + 1] << 8) | d[p + 2]);
  }
  return {w: c.width, h: c.height, lit: lit / (d.length / 4), colours: colours.size};
}"""

CANVAS_HASH = """(id) => {
  const c = document.getElementById(id);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let h = 0;
  for (let p = 0; p < d.length; p++) h = (h * 31 + d[p]) >>> 0;
  return h;
}"""


def test_page_draws_features_prototypes_and_correspondences(
    server: str, browser_path: str, bundle: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    from cotap.core.bundle import read_bundle

    config = read_bundle(bundle).config
    gh, gw = config.preprocess.grid(224, 224)

    pa, pb = write_images(tmp_path)
    errors: list[str] = []
    t0 = time.monotonic()
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh user-data-dir
            executable_path=browser_path,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1000},
        )
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('model').options.length > 0", timeout=15000)
        assert config.name in page.inner_text("#model-info")

        page.set_input_files("#file-b", str(pb))  # B first: choosing A then runs once, with both
        page.set_input_files("#file-a", str(pa))
        page.wait_for_selector("#status[data-state=done]", timeout=30000)
        status = page.inner_text("#status")
        assert f"grid {gh}x{gw}" in status and "click a patch" in status, status

        stats: dict[str, Any] = {
            cid: page.evaluate(CANVAS_STATS, cid)
            for cid in ("pca-a", "pca-b", "proto-a", "proto-b", "corr", "heat")
        }
        for cid, s in stats.items():
            assert s["w"] > 0 and s["h"] > 0, (cid, s)
            assert s["lit"] > 0.5, f"{cid} is mostly blank: {s}"
            assert s["colours"] > 8, f"{cid} is nearly uniform: {s}"

        legend = page.locator("#legend-a .legend-item")
        assert legend.count() >= 1
        assert legend.first.inner_text().startswith("#")
        assert page.locator("#legend-b .legend-item").count() >= 1

        heat = page.locator("#heat")
        assert heat.get_attribute("data-selected") == f"{gh // 2},{gw // 2}"  # the centre patch first
        before = page.evaluate(CANVAS_HASH, "heat")
        page.click("#pca-a", position={"x": 4, "y": 4})  # the top-left patch of A
        page.wait_for_function("document.getElementById('heat').dataset.selected === '0,0'", timeout=5000)
        after = page.evaluate(CANVAS_HASH, "heat")
        assert after != before, "the heatmap did not change after selecting another patch"
        assert "A patch (0, 0)" in page.inner_text("#heat-caption")

        # Back to a central patch for the picture (its best match is easy to see).
        box = page.locator("#corr").bounding_box()
        assert box is not None
        page.click("#corr", position={"x": box["height"] * 0.45, "y": box["height"] * 0.45})
        page.wait_for_function("document.getElementById('heat').dataset.selected !== '0,0'", timeout=5000)

        shot = tmp_path / "web.png"
        page.screenshot(path=str(shot), full_page=True)
        context.close()
    elapsed = time.monotonic() - t0
    assert not errors, errors
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("COTAP_UPDATE_SCREENSHOT"):  # 256 colours: a quarter of the bytes in the repo
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        picture = Image.open(shot).convert("RGB")
        picture.quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            SCREENSHOT, optimize=True
        )
    print(
        f"browser test: {elapsed:.1f} s; screenshot sha256 {hashlib.sha256(shot.read_bytes()).hexdigest()[:12]}"
    )


def test_page_maths_equal_numpy(server: str, browser_path: str, tmp_path: Path) -> None:
    """The page's safetensors parser, PCA and prototype colours against plain references."""
    import base64

    from playwright.sync_api import sync_playwright
    from safetensors.numpy import save as save_safetensors

    from cotap.client.plots import prototype_colour

    rng = np.random.default_rng(0)
    # rows with three strong directions (variances 25, 9, 4) plus noise
    basis = np.linalg.qr(rng.normal(size=(16, 3)))[0].T  # (3, 16) orthonormal
    X = (rng.normal(size=(80, 3)) * [5, 3, 2]) @ basis + 0.1 * rng.normal(size=(80, 16)) + 1.5
    Z = X - X.mean(0)
    _, vecs = np.linalg.eigh(Z.T @ Z)
    reference = Z @ vecs[:, ::-1][:, :3]  # (80, 3) projections on the top components

    halves = np.array([0, 1, -2.5, 65504, -1e-7, 6e-5, np.inf, 0.333], np.float16).reshape(2, 4)
    tensors: dict[str, np.ndarray] = {
        "h": halves,
        "f": rng.normal(size=(3, 2)).astype(np.float32),
        "i": np.array([[-1, 7], [2**31 - 1, 0]], np.int32),
        "b": np.array([True, False, True]),
        "patch": rng.normal(size=(2, 2, 3, 4)).astype(np.float16),
        "patch_split.1": rng.normal(size=(2, 3, 4)).astype(np.float16),
    }
    body = save_safetensors(tensors, metadata={"grid": "[2,3]", "model": "m"})

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=browser_path, headless=True, args=CHROMIUM_FLAGS
        )
        page = context.new_page()
        page.goto(server + "/")
        got = page.evaluate(
            "([x, n, c]) => Array.from(pca3(Float64Array.from(x), n, c))",
            [X.ravel().tolist(), 80, 16],
        )
        parsed = page.evaluate(
            """(b64) => {
              const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
              const {tensors, meta} = parseSafetensors(bytes.buffer);
              const out = {meta, items: {}};
              for (const [k, t] of Object.entries(tensors)) {
                out[k] = {shape: t.shape, data: Array.from(t.data, (v) => Number.isFinite(v) ? v : String(v))};
              }
              const second = item(tensors, 'patch', 1);
              out.items.stacked = {shape: second.shape, data: Array.from(second.data)};
              const split = item(tensors, 'patch_split', 1);
              out.items.split = {shape: split.shape, data: Array.from(split.data)};
              return out;
            }""",
            base64.b64encode(body).decode(),
        )
        colours = page.evaluate("() => Array.from({length: 64}, (_, i) => protoColour(i))")
        context.close()

    projections = np.array(got).reshape(80, 3)
    for q in range(3):  # the same components up to sign
        corr = np.corrcoef(projections[:, q], reference[:, q])[0, 1]
        assert abs(corr) > 0.9999, (q, corr)
    assert parsed["meta"] == {"grid": [2, 3], "model": "m"}
    for name, t in tensors.items():
        data = [np.inf if v == "Infinity" else v for v in parsed[name]["data"]]
        assert parsed[name]["shape"] == list(t.shape), name
        assert np.array_equal(np.array(data, np.float64), t.astype(np.float64).ravel()), name
    assert np.array_equal(parsed["items"]["stacked"]["data"], tensors["patch"][1].astype(np.float64).ravel())
    assert parsed["items"]["stacked"]["shape"] == [2, 3, 4]
    assert np.array_equal(
        parsed["items"]["split"]["data"], tensors["patch_split.1"].astype(np.float64).ravel()
    )
    assert [tuple(c) for c in colours] == [prototype_colour(i) for i in range(64)]
