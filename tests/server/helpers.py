"""Helpers for the server tests: real tiny bundles, photo-like test images, an app running
under its real lifespan with an httpx client, and a gate that holds a (real) backend's forward."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from cotap.core.preprocess import PreprocessConfig
from cotap.server.app import create_app
from cotap.server.backends.base import Backend
from cotap.server.settings import Settings
from cotap.training.bundles import write_model_bundle
from cotap.training.models import build_model


def make_tiny_bundle(
    out: Path,
    seed: int = 0,
    name: str = "tiny",
    preprocess: PreprocessConfig | None = None,
    input_sizes: list[tuple[int, int]] | None = None,
) -> Path:
    torch.manual_seed(seed)
    model = build_model("cotap_test").eval()
    write_model_bundle(
        model,
        "cotap_test",
        out,
        name=name,
        preprocess=preprocess or PreprocessConfig(size=(32, 32), patch_size=8),
        input_sizes=input_sizes,
    )
    return out


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like uint8 (h, w, 3) image: gradients, a few blobs and mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = 120 + 80 * np.sin(x / (7 + 5 * rng.random()) + rng.random() * 6) * np.cos(
            y / (9 + 4 * rng.random())
        )
    for _ in range(3):
        cy, cx, r = rng.random() * h, rng.random() * w, 3 + rng.random() * min(h, w) / 3
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        img[mask] = rng.random(3) * 255
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "JPEG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(h: int = 40, w: int = 48, seed: int = 0) -> bytes:
    return encode(photo(h, w, seed), "JPEG", quality=90)


def parts(field: str, images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart parts for httpx: one JPEG per image under the repeated field `field`."""
    return [(field, (f"{field}{i}.jpg", b, "image/jpeg")) for i, b in enumerate(images)]


def settings_for(*models: Path | str, **kw: Any) -> Settings:
    specs = [str(m) for m in models]
    base: dict[str, Any] = {"models": specs, "max_batch": 8, "max_queue_delay_ms": 2.0, "decode_threads": 2}
    return Settings(**(base | kw))


@asynccontextmanager
async def running(
    settings: Settings, hook: Callable[[Backend], Backend] | None = None, wait: bool = True
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app under its real lifespan (models loaded and warmed), with an in-process client."""
    app = create_app(settings, backend_hook=hook)
    async with app.router.lifespan_context(app):
        if wait:
            assert await app.state.cotap.wait_loaded(60), app.state.cotap.load_error
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield app, client


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Gate:
    """Wraps a real backend: `hold()` makes the next forwards wait until `release()`; `fail_next`
    makes forwards raise, and so does `fail_if(images)` when true; counts the images each forward
    saw."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.fail_next = 0
        self.fail_if: Callable[[np.ndarray], bool] | None = None
        self.batches: list[int] = []
        self.backend: Backend | None = None

    def hold(self) -> None:
        self.open.clear()
        self.entered.clear()

    def release(self) -> None:
        self.open.set()

    def wrap(self, backend: Backend) -> Backend:
        self.backend = backend
        gate = self
        real_forward = backend.forward

        def forward(images: np.ndarray) -> Any:
            gate.entered.set()
            assert gate.open.wait(30), "gate never released"
            gate.batches.append(int(images.shape[0]))
            if gate.fail_next > 0:
                gate.fail_next -= 1
                raise RuntimeError("injected backend failure")
            if gate.fail_if is not None and gate.fail_if(images):
                raise RuntimeError("injected backend failure for these inputs")
            return real_forward(images)

        backend.forward = forward  # type: ignore[method-assign]
        return backend

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10), "no forward started"


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        base, _, lab = key.partition("{")
        if base == name and (not labels or all(f'{k}="{v}"' in lab for k, v in labels.items())):
            return float(value)
    return 0.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, alive: Callable[[], bool], timeout: float = 60, log: Path | None = None) -> None:
    """Poll `url`/health/ready until it answers 200; fail when `alive()` turns false (the server
    process or thread died; the message ends with `log`, if given) or after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        assert alive(), "the server died while starting" + (f":\n{log.read_text()}" if log else "")
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, "the server never became ready"
        time.sleep(0.05)
