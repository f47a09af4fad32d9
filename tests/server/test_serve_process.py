"""A real `cotap serve` process on 127.0.0.1: ready, serving, and a SIGTERM drain that finishes the
request in flight, refuses new work and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.server.helpers import free_port, jpeg, wait_ready


def start_serve(bundle: Path, log: Path, **env: str) -> tuple[subprocess.Popen[bytes], int]:
    """`cotap serve` of `bundle` as model `tiny` on a free port, with extra COTAP_* environment."""
    port = free_port()
    cmd = [sys.executable, "-m", "cotap.cli.main", "serve", "--model", f"tiny={bundle}", "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    return proc, port


def test_sigterm_drains_in_flight_and_exits_0(tiny_bundle: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    # A lone image waits up to 10 s for company while another upload is still arriving.
    proc, port = start_serve(tiny_bundle, log, COTAP_MAX_QUEUE_DELAY_MS="10000")
    base = f"http://127.0.0.1:{port}"
    slow = socket.socket()
    try:
        wait_ready(base, lambda: proc.poll() is None, log=log)
        slow.connect(("127.0.0.1", port))  # an upload that stalls half-way: expected company
        slow.sendall(
            b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n"
        )
        time.sleep(0.3)
        result: dict[str, httpx.Response] = {}

        def post() -> None:
            result["r"] = httpx.post(
                f"{base}/v1/embed", files=[("image", ("a.jpg", jpeg(), "image/jpeg"))], timeout=20
            )

        t = threading.Thread(target=post)
        t.start()
        for _ in range(200):  # until the image is queued
            metrics = httpx.get(f"{base}/metrics", timeout=2).text
            if 'cotap_queue_depth{model="tiny"} 1.0' in metrics:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the request never reached the queue")
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        t.join(20)
        assert result["r"].status_code == 200, result["r"].text
        assert time.monotonic() - t_term < 3.0  # the drain ran the queued batch at once, not after 10 s
        assert proc.poll() is None  # still draining: the stalled upload is in flight
        try:
            refused = httpx.post(
                f"{base}/v1/embed", files=[("image", ("a.jpg", jpeg(), "image/jpeg"))], timeout=5
            )
            assert refused.status_code == 503  # no longer admitting
        except httpx.TransportError:
            pass  # or already closed
        slow.close()  # the last in-flight request ends
        assert proc.wait(20) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health/live", timeout=1)
    finally:
        slow.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    msgs = [x["msg"] for x in lines]
    assert msgs.index("ready") < msgs.index("draining") < msgs.index("drained") < msgs.index("stopped")
    served = [x for x in lines if x["msg"] == "request" and x.get("path") == "/v1/embed"]
    assert [x["status"] for x in served][:1] == [200] and len(served[0]["request_id"]) == 32


def test_drain_timeout_bounds_the_whole_stop(tiny_bundle: Path, tmp_path: Path) -> None:
    """An upload that never finishes: the server stops drain_timeout_s (+ about 1 s) after it starts
    draining, not once per shutdown stage (the bug: drain timeout + uvicorn's graceful wait). Timed
    by the process's own log stamps, so a loaded machine's slow interpreter exit does not count."""
    log = tmp_path / "serve.log"
    proc, port = start_serve(tiny_bundle, log, COTAP_DRAIN_TIMEOUT_S="3", COTAP_BODY_TIMEOUT_S="60")
    stalled = socket.socket()
    try:
        wait_ready(f"http://127.0.0.1:{port}", lambda: proc.poll() is None, log=log)
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(
            b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n"
        )
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stalled.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    records = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    stamp = {r["msg"]: datetime.fromisoformat(r["ts"]) for r in records}
    assert "drain timeout: stopping with requests in flight" in stamp and "stopped" in stamp
    took = (stamp["stopped"] - stamp["draining"]).total_seconds()
    print(f"\nstopped {took:.2f} s after draining began")
    assert 3.0 <= took < 5.9, took  # the bug: 3 s drain + 3 s of uvicorn's graceful wait, 6 s or more


def test_serve_exits_1_when_the_model_cannot_load(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cotap.cli.main",
            "serve",
            "--model",
            str(tmp_path / "none"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert b"bundle directory not found" in proc.stderr


def test_serve_exits_2_at_once_when_the_port_is_taken(tiny_bundle: Path) -> None:
    """Refused before any model loads (a big model would otherwise load for minutes first), with
    exit 2 and one line, like a bad setting."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        command = ["serve", "--model", f"tiny={tiny_bundle}", "--port", str(port)]
        proc = subprocess.run(
            [sys.executable, "-m", "cotap.cli.main", *command],
            capture_output=True,
            timeout=60,
        )
    assert proc.returncode == 2, proc.stderr[-500:]
    assert f"cotap: error: cannot listen on 127.0.0.1:{port}".encode() in proc.stderr
    assert b"model loaded" not in proc.stderr and time.monotonic() - t0 < 30
