"""The SDK and the client commands load neither torch, fastapi nor onnxruntime (DESIGN.md: a plain
`pip install cotap` is the client alone)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "fastapi", "onnxruntime", "starlette", "uvicorn")


def test_sdk_and_client_commands_import_no_heavy_module() -> None:
    code = f"""
import sys
import cotap.client
from cotap.client import Client, AsyncClient, read_features
import cotap.client.plots, cotap.client.folder, cotap.client.store
from cotap.cli.main import build_parser, main
parser = build_parser()
for argv in (["embed", "--help"], ["correspond", "--help"], ["prototypes", "--help"]):
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        assert e.code == 0, e.code
assert main(["health", "--url", "http://127.0.0.1:9", "--timeout", "1"]) == 1
Client("http://127.0.0.1:9").close()
print("HEAVY=" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: cotap embed" in done.stdout and "--shard-size" in done.stdout
    loaded = done.stdout.rsplit("HEAVY=", 1)[1].strip()
    assert loaded == "", f"heavy modules loaded: {loaded}"
