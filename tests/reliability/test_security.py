"""Security: the API key on every route but health (and the page's own files), compared in constant
time; no pickle on the load path; bundle files cannot escape their directory at server start-up;
no server-side URL fetching; bounded request headers (a real `cotap serve`)."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.server.helpers import jpeg, run, running, settings_for

ROOT = Path(__file__).resolve().parents[2]
KEY = "s3cret-key"
# documented in docs/server.md: probes, the web page's files, the API's description (no data in it)
PUBLIC = {
    "/health/live",
    "/health/ready",
    "/",
    "/static/{name}",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
}
WRONG_AUTH = [
    None,
    "",
    "Bearer",
    "Bearer ",
    "Bearer wrong",
    f"Bearer {KEY[:-1]}",  # a prefix of the key
    f"Bearer {KEY}x",
    f"Basic {KEY}",
    KEY,  # no scheme
    f"Token {KEY}",
]


def _walk(routes: list[Any]) -> list[tuple[str, set[str]]]:
    """(path, methods) of every route, through included routers (mounted without a prefix)."""
    out = []
    for r in routes:
        if hasattr(r, "original_router"):
            out += _walk(r.original_router.routes)
        elif getattr(r, "methods", None):
            out.append((r.path, set(r.methods)))
    return out


def _request_for(path: str, method: str) -> dict[str, Any]:
    url = path.replace("{name}", "app.js")
    if method == "POST":
        field = "source" if path.endswith("correspond") else "image"
        files = [(field, ("a.jpg", jpeg(), "image/jpeg"))]
        if field == "source":
            files.append(("target", ("b.jpg", jpeg(seed=1), "image/jpeg")))
        return {"method": method, "url": url, "files": files}
    return {"method": method, "url": url}


def test_api_key_on_every_route_but_the_public_ones(tiny_bundle: Path) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, api_key=KEY, log_level="warning")) as (app, c):
            routes = [
                (path, m) for path, methods in _walk(app.routes) for m in sorted(methods) if m != "HEAD"
            ]
            paths = {p for p, _ in routes}
            assert {"/v1/embed", "/v1/prototypes", "/v1/correspond", "/v1/models", "/metrics"} <= paths
            assert {"/openapi.json", "/docs"} <= paths
            seen = []
            for path, method in routes:
                req = _request_for(path, method)
                for auth in WRONG_AUTH:
                    headers = {} if auth is None else {"authorization": auth}
                    r = await c.request(**req, headers=headers)
                    if path in PUBLIC:
                        assert r.status_code != 401, (path, auth)
                    else:
                        assert r.status_code == 401, (path, method, auth, r.status_code)
                        assert r.json()["error"]["code"] == "unauthorized"
                        assert r.headers["www-authenticate"] == "Bearer"
                ok = await c.request(**req, headers={"authorization": f"Bearer {KEY}"})
                assert ok.status_code == 200, (path, method, ok.status_code, ok.text[:200])
                seen.append(f"{method} {path}")
            print("\nroutes checked:", seen)
            # an unknown route says 401 too: without the key nothing about the API is revealed
            assert (await c.get("/v2/secret")).status_code == 401

    run(body())


_SECRET_NAME = re.compile(r"(?i)(api_?key|token|secret|passw|authoriz|\b_key\b)")


def test_key_comparison_is_constant_time() -> None:
    """The key is compared with hmac/secrets.compare_digest, and no ==, != or `in` anywhere in the
    server touches a key or token."""
    middleware = (ROOT / "server" / "middleware.py").read_text()
    assert re.search(r"\b(hmac|secrets)\.compare_digest\(", middleware)
    bad = []
    for path in sorted((ROOT / "server").rglob("*.py")):
        src = path.read_text()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops
            ):
                segment = ast.get_source_segment(src, node) or ""
                if _SECRET_NAME.search(segment):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {segment}")
    assert not bad, bad


# -- no pickle on the load path -----------------------------------------------------------------
_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def pickle_uses(path: Path) -> list[str]:
    """Imports of pickling modules, `torch.load` without `weights_only=True`, `np.load` with
    `allow_pickle=True`, and any call of something named `*pickle*`."""
    src = path.read_text()
    out = []
    for node in ast.walk(ast.parse(src)):
        where = (
            f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{getattr(node, 'lineno', 0)}"
        )
        if isinstance(node, ast.Import):
            out += [
                f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in _PICKLE_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _PICKLE_MODULES:
            out.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.get_source_segment(src, node.func.value) or ""
            true = {
                k.arg for k in node.keywords if isinstance(k.value, ast.Constant) and k.value.value is True
            }
            if node.func.attr == "load" and owner.split(".")[-1] == "torch" and "weights_only" not in true:
                out.append(f"{where} torch.load without weights_only=True")
            if node.func.attr == "load" and owner in ("np", "numpy") and "allow_pickle" in true:
                out.append(f"{where} np.load with allow_pickle=True")
            if "pickle" in node.func.attr.lower():
                out.append(f"{where} calls {node.func.attr}")
    return out


def test_pickle_scanner_finds_what_it_should(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import pickle\nimport torch\nimport numpy as np\n"
        "torch.load('x')\ntorch.load('x', weights_only=True)\nnp.load('y', allow_pickle=True)\n"
        "np.load('y')\nimport pandas as pd\npd.read_pickle('z')\n"
    )
    found = pickle_uses(probe)
    assert len(found) == 4, found  # import pickle, bare torch.load, allow_pickle, read_pickle


_LOAD_SCRIPT = r"""
import json, pickle, sys
def refuse(*a, **k):
    raise AssertionError("pickle used while loading or serving a bundle")
class Refusing(pickle.Unpickler):
    def __init__(self, *a, **k):
        refuse()
import numpy as np
import torch  # imported before the trap is set, so its own start-up is undisturbed
torch.load = refuse
pickle.load = pickle.loads = refuse
pickle.Unpickler = Refusing
real_np_load = np.load
def np_load(*a, allow_pickle=False, **k):
    if allow_pickle:
        refuse()
    return real_np_load(*a, **k)
np.load = np_load
from cotap.server.registry import load_models
from cotap.server.settings import Settings
models = load_models(Settings(models=[sys.argv[1]], max_batch=2))
backend = next(iter(models.values())).backend
out = backend.forward(np.zeros((2, 3, 32, 32), np.float32))
assert out["patch"].shape[0] == 2
files = {m.__file__ for n, m in list(sys.modules.items()) if n.startswith("cotap.") and getattr(m, "__file__", None)}
print(json.dumps(sorted(files)))
"""


def test_no_pickle_on_the_bundle_load_path(tiny_bundle: Path) -> None:
    """A bundle loads, warms and runs with every unpickler trapped; and no module on that path (nor
    anywhere in server/ or core/) unpickles, statically."""
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(tiny_bundle)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = {Path(f) for f in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert any(p.name == "bundle.py" for p in loaded) and any(p.name == "torch_backend.py" for p in loaded)
    files = loaded | set((ROOT / "server").rglob("*.py")) | set((ROOT / "core").rglob("*.py"))
    files = {p.resolve() for p in files if p.resolve().is_relative_to(ROOT)}
    found = [use for p in sorted(files) for use in pickle_uses(p)]
    assert not found, found
    print(f"\nscanned {len(files)} files ({len(loaded)} cotap modules on the load path): no pickle")


# -- bundle files cannot escape ----------------------------------------------------------------------
def _bundle_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(bundle: Path, edit: Any) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _escaping_bundles(src: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (bundle, text its load error must contain)."""
    cases: dict[str, tuple[Path, str]] = {}
    entry = {"sha256": "0" * 64, "size": 1}

    b = _bundle_copy(src, root / "dotdot")
    _edit_manifest(b, lambda m: m["files"].__setitem__("../outside.bin", entry))
    cases["manifest names ../outside.bin"] = (b, "../outside.bin")

    b = _bundle_copy(src, root / "nested_dotdot")
    _edit_manifest(b, lambda m: m["files"].__setitem__("sub/../../outside.bin", entry))
    cases["manifest names sub/../../outside.bin"] = (b, "sub/../../outside.bin")

    b = _bundle_copy(src, root / "absolute")
    _edit_manifest(b, lambda m: m["files"].__setitem__("/etc/hostname", entry))
    cases["manifest names /etc/hostname"] = (b, "/etc/hostname")

    b = _bundle_copy(src, root / "symlink_file")
    outside = root / "elsewhere.safetensors"
    shutil.copy(b / "model.safetensors", outside)
    (b / "model.safetensors").unlink()
    (b / "model.safetensors").symlink_to(outside)
    cases["weights are a symlink to a file outside"] = (b, "model.safetensors")

    b = _bundle_copy(src, root / "symlink_dir")
    (b / "extra").symlink_to(root)
    cases["a symlinked directory inside"] = (b, "extra")
    return cases


def test_bundle_paths_cannot_escape_at_start_up(tiny_bundle: Path, tmp_path: Path) -> None:
    async def one(bundle: Path) -> tuple[int, str]:
        async with running(settings_for(bundle), wait=False) as (app, c):
            assert not await app.state.cotap.wait_loaded(30)
            r = await c.get("/health/ready")
            assert r.json()["status"] == "failed"
            refused = await c.post("/v1/embed", files=[("image", ("a.jpg", jpeg(), "image/jpeg"))])
            assert refused.status_code == 503
            return r.status_code, str(app.state.cotap.load_error)

    results = {}
    for name, (bundle, needle) in _escaping_bundles(tiny_bundle, tmp_path).items():
        status, error = run(one(bundle))
        assert status == 503 and "BundleError" in error and needle in error, (name, error)
        results[name] = error
    print("\n" + "\n".join(f"{k}: {v}" for k, v in results.items()))


# -- no server-side URL fetching -----------------------------------------------------------------------
class Listener:
    """A loopback TCP listener that records every connection it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_urls_are_never_fetched(tiny_bundle: Path) -> None:
    listener = Listener()
    url = f"http://127.0.0.1:{listener.port}/x.jpg"

    async def body() -> None:
        async with running(settings_for(tiny_bundle, log_level="warning")) as (_, c):
            answers = [
                await c.post("/v1/embed", json={"images": [url]}),
                await c.post("/v1/embed", json={"images": [f"data:text/uri-list,{url}"]}),
                await c.post("/v1/correspond", json={"pairs": [{"source": url, "target": url}]}),
                await c.post("/v1/embed", files=[("image", ("x.txt", url.encode(), "text/uri-list"))]),
                await c.post(f"/v1/embed?url={url}", files=[("image", ("a.jpg", jpeg(), "image/jpeg"))]),
                await c.post("/v1/embed", json={"url": url, "images": [url]}),
            ]
            await asyncio.sleep(0.3)  # a fetch, had there been one, would have connected by now
            codes = [(r.status_code, r.json()["error"]["code"]) for r in answers]
            assert codes == [
                (400, "bad_image"),
                (400, "bad_image"),
                (400, "bad_image"),
                (400, "bad_image"),
                (422, "invalid_parameters"),
                (400, "bad_image"),  # the images fail before the unknown `url` option is looked at
            ], codes

    try:
        run(body())
        assert listener.connections == 0, "the server connected to a URL it was sent"
    finally:
        listener.close()
    # and nothing in the server could fetch: no HTTP client or socket library is imported
    clients = {"httpx", "requests", "aiohttp", "urllib3", "urllib.request", "http.client", "socket"}
    fetchers = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "server").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        if name in clients or name.split(".")[0] in clients - {"urllib.request", "http.client"}
    ]
    assert not fetchers, fetchers


# -- request headers are bounded (a real `cotap serve`) --------------------------------------------------
def _raw(port: int, payload: bytes) -> bytes:
    """Send `payload` on a fresh connection and read until the server closes it; b"RESET" when the
    server cut the connection before answering (it may, for a request over its limits)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        data = b""
        try:
            s.sendall(payload)
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            return data or b"RESET"
        return data


def test_request_headers_are_bounded(bench: ModuleType, tiny_bundle: Path, tmp_path: Path) -> None:
    settings = {"log_level": "warning", "max_header_bytes": 16384}
    with bench.ServerProcess(tiny_bundle, tmp_path / "serve.log", **settings) as server:
        server.wait_ready()
        port = server.port
        head = b"GET /health/live HTTP/1.1\r\nHost: x\r\n"
        small = _raw(port, head + b"X-Big: " + b"a" * 8000 + b"\r\n\r\n")
        assert small.startswith(b"HTTP/1.1 200"), small[:100]
        # 30 KB of header in three reads: the reads after the request's first one count, 20 KB > 16 KiB
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(head + b"X-Big: " + b"a" * 10_000)
            for _ in range(2):
                time.sleep(0.2)
                with contextlib.suppress(OSError):
                    s.sendall(b"a" * 10_000)
            over = s.recv(65536)
        assert over.startswith(b"HTTP/1.1 431") and b"16384 bytes (max_header_bytes)" in over, over[:300]
        rid = json.loads(over.split(b"\r\n\r\n", 1)[1])["error"]["request_id"]
        assert f"x-request-id: {rid}".encode() in over  # the header as well as the body, as elsewhere
        # a whole 20 KB request in one read: counted as parsed, refused all the same
        one_read = _raw(port, head + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        assert one_read.startswith(b"HTTP/1.1 431") and one_read.count(b"HTTP/1.1") == 1, one_read[:300]
        many = _raw(port, head + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 100) for i in range(200)) + b"\r\n")
        assert many.startswith(b"HTTP/1.1 431"), many[:300]  # 200 headers of 100 bytes: 21 KB in all
        statuses = {}
        for name, payload in {
            "one 300 KB header": head + b"X-Big: " + b"a" * 300_000 + b"\r\n\r\n",
            "50 000 headers": head + b"".join(b"X-%d: a\r\n" % i for i in range(50_000)) + b"\r\n",
            "300 KB URL": b"GET /health/live?" + b"a" * 300_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        }.items():
            answer = _raw(port, payload)
            statuses[name] = answer.split(b"\r\n", 1)[0].decode(errors="replace")
            assert answer == b"RESET" or answer.startswith(b"HTTP/1.1 431"), (name, answer[:200])
            if answer != b"RESET":
                assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "payload_too_large"
        assert any(s.startswith("HTTP/1.1 431") for s in statuses.values()), statuses
        # still serving
        assert _raw(port, head + b"\r\n").startswith(b"HTTP/1.1 200")
        print("\nheader limits:", statuses)


def _answer(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """Read one HTTP answer (status line, headers, body by Content-Length) from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def test_slow_uploads_time_out_and_are_bounded(bench: ModuleType, tiny_bundle: Path, tmp_path: Path) -> None:
    """Trickling bodies answer 408 after body_timeout_s; beyond max_uploads at once, 429 at once;
    trickling headers answer 408 after header_timeout_s, and a silent connection is closed."""
    settings = {"body_timeout_s": 1.5, "header_timeout_s": 1.5, "max_uploads": 2, "log_level": "warning"}
    with bench.ServerProcess(tiny_bundle, tmp_path / "serve.log", **settings) as server:
        server.wait_ready()
        head = (
            b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        slow = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
        try:
            t0 = time.monotonic()
            for s in slow[:2]:
                s.sendall(head + b'{"images": ["')  # and then nothing more
            slow[2].sendall(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never end
            time.sleep(0.3)  # slow[3] sends nothing at all
            third = _raw(server.port, head + b"x" * 100_000)
            assert third.startswith(b"HTTP/1.1 429"), third[:200]
            assert b"retry-after: 1" in third.lower() and b"max_uploads" in third
            answers = [_answer(s) for s in slow[:3]]
            waited = time.monotonic() - t0
            assert slow[3].recv(100) == b""  # closed without an answer: no request ever began
        finally:
            for s in slow:
                s.close()
        status, _, body = answers.pop()
        assert status.startswith("HTTP/1.1 408"), (status, body[:200])
        assert "header_timeout_s" in json.loads(body)["error"]["message"]
        for status, _, body in answers:
            assert status.startswith("HTTP/1.1 408"), (status, body[:200])
            err = json.loads(body)["error"]
            assert err["code"] == "request_timeout" and "body_timeout_s" in err["message"]
        assert 1.4 < waited < 6, waited
        ok = _raw(server.port, b"GET /health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200"), ok[:100]  # nothing lost: still ready


@pytest.mark.parametrize("max_json_depth", [4, 8])  # {"images": ["..."]} is 3 deep, a pairs body 4
def test_json_depth_limit_is_the_setting(tiny_bundle: Path, max_json_depth: int) -> None:
    import base64

    image = base64.b64encode(jpeg()).decode()

    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_json_depth=max_json_depth)) as (_, c):
            ok = await c.post("/v1/embed", json={"images": [image]})  # depth 2
            assert ok.status_code == 200
            deep: Any = [image]
            for _ in range(max_json_depth):
                deep = [deep]
            r = await c.post("/v1/embed", json={"images": deep})
            assert r.status_code == 422 and f"deeper than {max_json_depth}" in r.json()["error"]["message"]

    run(body())


def test_multipart_part_limit_is_the_setting(tiny_bundle: Path) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_parts=3, max_images_per_request=10)) as (_, c):
            files = [("image", (f"{i}.jpg", jpeg(seed=i), "image/jpeg")) for i in range(3)]
            assert (await c.post("/v1/embed", files=files)).status_code == 200
            r = await c.post("/v1/embed", files=[*files, ("image", ("x.jpg", jpeg(), "image/jpeg"))])
            assert r.status_code == 413 and "Maximum number of files is 3" in r.json()["error"]["message"]

    run(body())
