"""Faults: backend and post-processing failures under concurrent load fail only the requests they
hit (500 with the envelope; a failed batch of several requests is rerun request by request) and
the next batch succeeds; a changed or missing bundle file stops
`cotap serve` at start-up (exit 1) with a message naming the file; a client that disconnects
mid-upload costs no inference."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cotap.server import tasks
from cotap.server.backends.base import Backend
from tests.clients.live import live_server, metric
from tests.reliability.corpus import image_parts as parts
from tests.server.helpers import Gate, jpeg, run, running, settings_for
from tests.server.helpers import metric as metric_text


class FailEvery:
    """A backend hook: forwards number k, 2k, 3k, ... raise; records what failed and what ran."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.calls = 0
        self.failed_images = 0
        self.failed_alone = 0  # failed forwards of one image: a one-image request that then fails
        self.ran_images = 0
        self.enabled = False
        self.lock = threading.Lock()

    def wrap(self, backend: Backend) -> Backend:
        real = backend.forward

        def forward(images: np.ndarray) -> Any:
            with self.lock:
                if self.enabled:
                    self.calls += 1
                    if self.calls % self.k == 0:
                        self.failed_images += int(images.shape[0])
                        self.failed_alone += int(images.shape[0] == 1)
                        raise RuntimeError(f"injected failure on forward {self.calls}")
                    self.ran_images += int(images.shape[0])
            time.sleep(0.01)  # long enough for batches to form under concurrent load
            return real(images)

        backend.forward = forward  # type: ignore[method-assign]
        return backend


def test_backend_errors_under_load_fail_only_the_requests_they_hit(tiny_bundle: Path) -> None:
    # a failed batch of several requests is rerun request by request: a request fails only when
    # its own forward fails
    faults = FailEvery(3)

    async def body() -> None:
        settings = settings_for(tiny_bundle, max_batch=4, max_queue_delay_ms=5, log_level="error")
        async with running(settings, hook=faults.wrap) as (_, c):
            images = [jpeg(seed=i) for i in range(24)]

            async def embed(data: bytes) -> Any:
                return await c.post(
                    "/v1/embed?dtype=float32", files=[("image", ("a.jpg", data, "image/jpeg"))]
                )

            refs = [(await embed(x)).json() for x in images]
            faults.enabled = True
            answers = await asyncio.gather(*(embed(x) for x in images))
            faults.enabled = False
            ok = failed = 0
            for ref, r in zip(refs, answers, strict=True):
                if r.status_code == 200:
                    ok += 1
                    for key in ("patch", "cls"):
                        assert np.allclose(r.json()[key], ref[key], atol=1e-5), key
                else:
                    failed += 1
                    err = r.json()["error"]
                    assert r.status_code == 500 and err["code"] == "internal", r.text
                    assert "injected failure" in err["message"] and err["request_id"]
            assert ok + failed == len(images) and ok == faults.ran_images > 0, (ok, failed)
            assert failed == faults.failed_alone, (failed, faults.failed_alone)  # 500 only when alone
            assert (await embed(images[0])).status_code == 200  # the next batch succeeds
            assert (await c.get("/health/ready")).status_code == 200
            text = (await c.get("/metrics")).text
            assert metric_text(text, "cotap_errors_total", code="internal") == failed
            print(
                f"\n24 concurrent requests, every 3rd forward failing: {ok} x 200, {failed} x 500 "
                f"({faults.failed_images} images in failed forwards)"
            )

    run(body())


def test_post_processing_error_fails_only_its_request(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tasks.embed

    def embed(outputs: Any, normalize: bool, dtype: str) -> Any:
        finish = real(outputs, normalize, dtype)

        def failing(ops: Any, slots: Any) -> Any:
            if normalize:
                raise ValueError("injected post-processing failure")
            return finish(ops, slots)

        return failing

    monkeypatch.setattr(tasks, "embed", embed)

    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_queue_delay_ms=50, log_level="error")) as (_, c):
            rs = await asyncio.gather(
                c.post("/v1/embed", files=parts(1, seed=1)),
                c.post("/v1/embed?normalize=true", files=parts(1, seed=2)),
                c.post("/v1/embed", files=parts(2, seed=3)),
            )
            assert [r.status_code for r in rs] == [200, 500, 200]
            assert "injected post-processing failure" in rs[1].json()["error"]["message"]
            assert (await c.post("/v1/embed", files=parts(1))).status_code == 200

    run(body())


# -- a changed or missing bundle file stops the server at start-up ---------------------------------------
def _broken_bundles(src: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (bundle, the file name the error must give)."""
    cases = {}

    def copy(name: str) -> Path:
        dst = root / name
        shutil.copytree(src, dst)
        return dst

    b = copy("flipped")
    data = bytearray((b / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF  # same size, other bytes
    (b / "model.safetensors").write_bytes(bytes(data))
    cases["weights: one byte changed"] = (b, "model.safetensors")

    b = copy("truncated")
    (b / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes()[:-100])
    cases["weights: truncated"] = (b, "model.safetensors")

    b = copy("missing")
    (b / "model.safetensors").unlink()
    cases["weights: missing"] = (b, "model.safetensors")

    b = copy("config")
    config = json.loads((b / "config.json").read_text())
    config["name"] = "renamed"
    (b / "config.json").write_text(json.dumps(config))
    cases["config.json: edited"] = (b, "config.json")

    b = copy("extra")
    (b / "notes.txt").write_text("not in the manifest")
    cases["an unexpected file"] = (b, "notes.txt")

    b = copy("no_manifest")
    (b / "manifest.json").unlink()
    cases["manifest.json: missing"] = (b, "manifest.json")
    return cases


def test_changed_or_missing_bundle_file_stops_serve(tiny_bundle: Path, tmp_path: Path) -> None:
    """`cotap serve` on each broken bundle, all at once: exit 1, naming the file (within 60 s)."""
    cases = _broken_bundles(tiny_bundle, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTAP_")}
    procs = {}
    for name, (bundle, _) in cases.items():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "cotap.cli.main", "serve", "--model", str(bundle), "--port", str(port)]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    report = {}
    try:
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=60)
            needle = cases[name][1]
            lines = [json.loads(x) for x in err.decode().splitlines() if x.startswith("{")]
            failure = next(x for x in lines if x["msg"] == "models could not be loaded")
            assert proc.returncode == 1, (name, proc.returncode, err[-500:])
            assert needle in failure["error"], (name, failure)
            report[name] = f"exit {proc.returncode}: {failure['error']}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    print("\n" + "\n".join(f"{k}: {v}" for k, v in report.items()))


# -- a client that disconnects mid-upload costs no inference -----------------------------------------------
def test_disconnect_mid_upload_costs_no_inference(tiny_bundle: Path, gate: Gate) -> None:
    with live_server(tiny_bundle, hook=gate.wrap) as url:
        port = int(url.rsplit(":", 1)[1])
        gate.batches.clear()
        images_before = metric(url, "cotap_images_total")
        image = jpeg()
        part = (
            b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n"
        )
        for cut in (0, len(part) // 2, len(part)):  # nothing sent, half an image, a whole image
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(
                    b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    + f"Content-Length: {len(part) * 3}\r\n\r\n".encode()
                    + part[:cut]
                )
                time.sleep(0.2)  # the server is reading the body
        end = time.monotonic() + 5
        while metric(url, "cotap_requests_in_flight") != 0:
            assert time.monotonic() < end, "a disconnected upload is still counted in flight"
            time.sleep(0.05)
        assert gate.batches == []  # no forward ran
        assert metric(url, "cotap_images_total") == images_before
        assert metric(url, "cotap_queue_depth") == 0
        import httpx

        r = httpx.post(f"{url}/v1/embed", files=[("image", ("a.jpg", image, "image/jpeg"))], timeout=10)
        assert r.status_code == 200 and gate.batches == [1]
