"""Closed-loop load test of `cotap serve`, against the raw backend and a naive JSON server.

In one run, on the same model and the same machine:

1. the raw backend (the class the server uses, same session options) at batch 1, 2, 4, ...:
   images/s and single-image latency; measured before and after the server sweep;
2. `cotap serve` in a subprocess, driven by a minimal keep-alive HTTP/1.1 client (prebuilt
   requests, so the load generator costs little CPU) at each concurrency: one photo-like JPEG per
   request, safetensors answers; images/s, p50/p95/p99 latency, bytes per image, mean batch size;
3. `/v1/correspond` on one pair against `/v1/embed` of the same two images;
4. a naive server (FastAPI, one image per forward, JSON float lists: what users hand-roll) on the
   same ONNX model, at concurrency 1 and 8.

    python bench/serve.py --arch cotap_vits16 --size 224 --backend onnxruntime --seconds 12

Random weights are fine: speed does not depend on them. Results print as a table and go to --json.
"""

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cotap.core.wire import TIMING_HEADERS

ROOT = Path(__file__).resolve().parents[1]


# -- inputs ------------------------------------------------------------------------------------------
def photo_jpegs(n: int, h: int = 480, w: int = 640, quality: int = 85, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth colour fields, a few objects with edges, texture and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(n):
        img = np.empty((h, w, 3), np.float32)
        base = rng.uniform(40, 200, 3)
        for c in range(3):
            gx, gy = rng.normal(0, 60, 2)
            img[..., c] = base[c] + gx * x / w + gy * y / h
        for _ in range(rng.integers(3, 8)):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ry, rx = rng.uniform(20, h / 3), rng.uniform(20, w / 3)
            mask = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
            shade = 1 + 0.3 * np.sin(x[mask] / rng.uniform(3, 12)) * np.cos(y[mask] / rng.uniform(3, 12))
            img[mask] = rng.uniform(0, 255, 3) * shade[:, None]
        img += rng.normal(0, 6, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def prepare_bundle(work: Path, arch: str, size: int, backend: str, precision: str, max_batch: int) -> Path:
    """A random-init bundle of `arch` at a fixed `size` (and its ONNX model for onnxruntime)."""
    import torch

    from cotap.core.artifacts import onnx_artifacts
    from cotap.core.bundle import read_bundle
    from cotap.core.preprocess import PreprocessConfig
    from cotap.training.bundles import write_model_bundle
    from cotap.training.models import build_model

    path = work / f"{arch}-{size}"
    if not path.exists():
        torch.manual_seed(0)
        model = build_model(arch).eval()
        patch = model.patch_size
        write_model_bundle(
            model, arch, path, name="bench", preprocess=PreprocessConfig(size=(size, size), patch_size=patch)
        )
    if backend == "onnxruntime" and not any(
        r.precision == precision for r in onnx_artifacts(read_bundle(path))
    ):
        from cotap.export.onnx import export_onnx

        print(f"exporting {precision} ONNX of {arch} ...", flush=True)
        export_onnx(path, precision, max_batch=max_batch, progress=True)
    return path


# -- raw backend ----------------------------------------------------------------------------------------
def raw_backend(bundle: Path, args: argparse.Namespace) -> Any:
    """The backend class the server uses, with the same options."""
    from cotap.core.bundle import read_bundle
    from cotap.server.backends import BackendOptions, build_backend

    return build_backend(
        read_bundle(bundle),
        args.backend,
        BackendOptions(device=args.device, precision=args.precision, intra_op_threads=args.intra_op_threads),
    )


def bench_raw(backend: Any, pixels: np.ndarray, batches: list[int], seconds: float) -> dict[str, Any]:
    """Forward passes only, per batch size: images/s (wall), CPU-ms per image and the median
    single-image latency."""
    res: dict[str, Any] = {"images_per_s": {}, "cpu_ms_per_image": {}, "single_ms": None}
    for b in batches:
        x = np.ascontiguousarray(np.resize(pixels, (b, *pixels.shape[1:])))
        backend.forward(x)
        times: list[float] = []
        c0 = time.process_time()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            t0 = time.perf_counter()
            backend.forward(x)
            times.append(time.perf_counter() - t0)
        cpu = time.process_time() - c0
        res["images_per_s"][b] = b / statistics.median(times)
        res["cpu_ms_per_image"][b] = 1000 * cpu / (b * len(times))
        if b == 1:
            res["single_ms"] = 1000 * statistics.median(times)
    return res


def gpu_available(backend: str, device: str) -> bool:
    """Whether `backend` would run on a GPU with `--device device` here."""
    if device == "cpu":
        return False
    if backend == "onnxruntime":
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    import torch

    return bool(torch.cuda.is_available())


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; VMs of one name can differ in speed)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor()


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- a minimal HTTP/1.1 client ---------------------------------------------------------------------------
def multipart(fields: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def http_request(path: str, fields: list[tuple[str, bytes]], accept: str | None) -> bytes:
    body, ctype = multipart(fields)
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    if accept:
        head += f"Accept: {accept}\r\n"
    return (head + "\r\n").encode() + body


_STAGE_OF_HEADER = {header.encode(): stage for stage, header in TIMING_HEADERS.items()}


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    raw: bytes,
    timings: dict[str, float] | None = None,
) -> tuple[int, int]:
    """Send one prebuilt request, read its answer: (status, body bytes). With `timings`, the
    server's stage timing headers (ms) go there by stage name."""
    writer.write(raw)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif timings is not None and name in _STAGE_OF_HEADER:
            timings[_STAGE_OF_HEADER[name]] = float(value)
    await reader.readexactly(length)
    return status, length


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    images: int
    seconds: float
    images_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    request_bytes_per_image: float
    response_bytes_per_image: float
    server_cpu_ms_per_image: float = float("nan")  # the server process, all threads
    client_cpu_ms_per_image: float = float("nan")  # this load generator
    errors: dict[str, int] = field(default_factory=dict)
    mean_batch: float | None = None


async def closed_loop(
    port: int,
    requests: list[bytes],
    images_per_request: int,
    concurrency: int,
    seconds: float,
    warmup: float,
    pid: int,
) -> LoadResult:
    """`concurrency` connections, each sending its next request as soon as the last answer is in."""
    lat: list[float] = []
    sizes: list[int] = []
    errors: dict[str, int] = {}
    state = {"measure": False, "stop": False}

    async def worker(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        try:
            while not state["stop"]:
                raw = requests[i % len(requests)]
                i += concurrency
                t0 = time.perf_counter()
                status, n = await _exchange(reader, writer, raw)
                if state["measure"]:
                    if status == 200:
                        lat.append(time.perf_counter() - t0)
                        sizes.append(n)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(worker(k)) for k in range(concurrency)]
    await asyncio.sleep(warmup)
    state["measure"] = True
    t0, s0, c0 = time.perf_counter(), proc_cpu_s(pid), time.process_time()
    await asyncio.sleep(seconds)
    state["measure"] = False
    elapsed, s1, c1 = time.perf_counter() - t0, proc_cpu_s(pid), time.process_time()
    state["stop"] = True
    await asyncio.gather(*tasks, return_exceptions=True)
    q = np.percentile(np.array(lat) * 1000, [50, 95, 99]) if lat else [float("nan")] * 3
    images = len(lat) * images_per_request
    return LoadResult(
        concurrency=concurrency,
        requests=len(lat),
        images=images,
        seconds=elapsed,
        images_per_s=images / elapsed,
        p50_ms=float(q[0]),
        p95_ms=float(q[1]),
        p99_ms=float(q[2]),
        request_bytes_per_image=statistics.mean(len(r) for r in requests) / images_per_request,
        response_bytes_per_image=(statistics.mean(sizes) / images_per_request) if sizes else 0.0,
        server_cpu_ms_per_image=1000 * (s1 - s0) / max(1, images),
        client_cpu_ms_per_image=1000 * (c1 - c0) / max(1, images),
        errors=errors,
    )


async def alternate(
    port: int, pid: int, kinds: dict[str, list[bytes]], pairs: int, raw_step: Any = None
) -> dict[str, dict[str, float]]:
    """One connection, requests of each kind in turn (and `raw_step()` if given), `pairs` times:
    slow drifts of the machine's load hit every kind alike. Per kind: median latency, server
    CPU-ms per request, and the medians of the server's stage timing headers (`server_<stage>_ms`:
    decode, queue, inference, total inside the server)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lat: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    stages: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    raw: list[float] = []
    try:
        for i in range(pairs + 1):  # the first turn warms up
            for name, reqs in kinds.items():
                timings: dict[str, float] = {}
                c0, t0 = proc_cpu_s(pid), time.perf_counter()
                status, _ = await _exchange(reader, writer, reqs[i % len(reqs)], timings)
                t1, c1 = time.perf_counter(), proc_cpu_s(pid)
                if status != 200:
                    raise RuntimeError(f"{name}: HTTP {status}")
                if i:
                    lat[name].append(t1 - t0)
                    cpu[name].append(c1 - c0)
                    for stage, ms in timings.items():
                        stages[name].setdefault(stage, []).append(ms)
            if raw_step is not None:
                t0 = time.perf_counter()
                raw_step()
                if i:
                    raw.append(time.perf_counter() - t0)
    finally:
        writer.close()
    out = {
        k: {
            "p50_ms": 1000 * statistics.median(lat[k]),
            "cpu_ms": 1000 * statistics.mean(cpu[k]),
            **{f"server_{stage}_ms": statistics.median(v) for stage, v in stages[k].items()},
        }
        for k in kinds
    }
    if raw:
        out["raw"] = {"p50_ms": 1000 * statistics.median(raw)}
    return out


# -- servers ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server never became ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def mean_batch_size(port: int) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("cotap_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("cotap_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def naive_app(onnx_path: str, size: int, intra_op_threads: int, device: str = "cpu") -> Any:
    """What users hand-roll: one image per forward, full decode, JSON float lists.

    `/embed` returns a dict without a declared type, FastAPI's default path (`jsonable_encoder`
    walks every float in Python, then `json.dumps`), as FastAPI examples and hand-rolled feature
    servers do. `/embed_typed` declares `-> dict[str, Any]`, which lets pydantic serialise in Rust:
    a naive server whose author knew that trick."""
    import onnxruntime as ort
    from fastapi import FastAPI, UploadFile

    so = ort.SessionOptions()
    if intra_op_threads:
        so.intra_op_num_threads = intra_op_threads
    from cotap.server.backends.onnxruntime_backend import choose_providers

    providers, _ = choose_providers(ort, device)  # the server's device, so both run on one kind of hardware
    sess = ort.InferenceSession(onnx_path, so, providers=providers)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    app = FastAPI()

    def features(image: UploadFile) -> tuple[np.ndarray, np.ndarray]:
        pil = Image.open(image.file).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        x = ((np.asarray(pil, np.float32) / 255 - mean) / std).transpose(2, 0, 1)[None]
        patch, cls, _ = sess.run(["patch", "cls", "assign"], {"images": np.ascontiguousarray(x)})
        return patch[0], cls[0]

    # (no `from __future__ import annotations` in this module: FastAPI reads these types)
    @app.post("/embed")
    def embed(image: UploadFile):  # no return type: the naive default
        patch, cls = features(image)
        return {"patch": patch.tolist(), "cls": cls.tolist()}

    @app.post("/embed_typed")
    def embed_typed(image: UploadFile) -> dict[str, Any]:
        patch, cls = features(image)
        return {"patch": patch.tolist(), "cls": cls.tolist()}

    return app


def run_naive_server(args: argparse.Namespace) -> None:
    import uvicorn

    app = naive_app(args.naive_onnx, args.size, args.intra_op_threads, args.device)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# -- the run ------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--arch", default="cotap_vits16")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--backend", default="onnxruntime", choices=["torch", "onnxruntime", "tensorrt"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--intra-op-threads", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue-delay-ms", type=float, default=3.0)
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--raw-batches", default="1,2,4,8,16")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the whole sequence")
    p.add_argument("--blocks", type=int, default=3, help="interleaved raw/server/naive blocks per round")
    p.add_argument("--pairs", type=int, default=30, help="alternating requests per kind at concurrency 1")
    p.add_argument("--seconds", type=float, default=6.0, help="measured seconds per point and round")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each point")
    p.add_argument("--raw-seconds", type=float, default=2.0, help="per batch size and round")
    p.add_argument("--images", type=int, default=32, help="distinct 640x480 JPEGs cycled through")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-serve"))
    p.add_argument("--json", help="write all results here")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--naive-onnx", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.precision == "auto":  # what the server picks: fp16 on a GPU, fp32 on the CPU
        args.precision = "fp16" if gpu_available(args.backend, args.device) else "fp32"
    if args.naive_server:
        run_naive_server(args)
        return

    from cotap.core.artifacts import onnx_artifacts
    from cotap.core.bundle import read_bundle
    from cotap.core.images import load_pixels
    from cotap.core.wire import SAFETENSORS_MEDIA_TYPE

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = prepare_bundle(work, args.arch, args.size, args.backend, args.precision, args.max_batch)
    jpegs = photo_jpegs(args.images)
    cfg = read_bundle(bundle).config.preprocess
    pixels = np.stack([load_pixels(j, cfg)[0] for j in jpegs[:16]])
    batches = [int(b) for b in args.raw_batches.split(",")]
    concurrency = [int(x) for x in args.concurrency.split(",")]
    results: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": os.getloadavg(),
        },
        "versions": versions(),
        "args": vars(args),
        "rounds": [],
    }
    port = free_port()
    cmd = [
        sys.executable, "-m", "cotap.cli.main", "serve", "--model", f"bench={bundle}", "--port", str(port),
        "--backend", args.backend, "--device", args.device, "--precision", args.precision,
        "--max-batch", str(args.max_batch), "--max-queue-delay-ms", str(args.max_queue_delay_ms),
        "--intra-op-threads", str(args.intra_op_threads), "--log-level", "warning",
    ]  # fmt: skip
    results["server_command"] = " ".join(["cotap", *cmd[3:]])
    server = subprocess.Popen(cmd)
    naive = None
    procs = [server]
    try:
        wait_http(port, "/health/ready", server)
        if not args.skip_naive and args.backend != "onnxruntime":
            results["naive_skipped"] = "the naive server runs the ONNX model: use --backend onnxruntime"
            print(f"naive server skipped: {results['naive_skipped']}", flush=True)
        if not args.skip_naive and args.backend == "onnxruntime":
            rec = next(r for r in onnx_artifacts(read_bundle(bundle)) if r.precision == args.precision)
            nport = free_port()
            naive = subprocess.Popen(
                [sys.executable, __file__, "--naive-server", "--naive-onnx", str(bundle / rec.file), "--port", str(nport),
                 "--size", str(args.size), "--intra-op-threads", str(args.intra_op_threads), "--device", args.device]
            )  # fmt: skip
            procs.append(naive)
            wait_http(nport, "/docs", naive)
        backend = raw_backend(bundle, args)
        results["raw_backend"] = backend.describe()
        embed = [http_request("/v1/embed", [("image", j)], SAFETENSORS_MEDIA_TYPE) for j in jpegs]
        pairs = [(jpegs[i], jpegs[i + 1]) for i in range(0, len(jpegs) - 1, 2)]
        corr = [
            http_request("/v1/correspond", [("source", a), ("target", b)], SAFETENSORS_MEDIA_TYPE)
            for a, b in pairs
        ]
        emb2 = [
            http_request("/v1/embed", [("image", a), ("image", b)], SAFETENSORS_MEDIA_TYPE) for a, b in pairs
        ]
        nreq = [http_request("/embed", [("image", j)], None) for j in jpegs]
        nreq_typed = [http_request("/embed_typed", [("image", j)], None) for j in jpegs]
        one = np.ascontiguousarray(pixels[:1])

        def load(reqs: list[bytes], per: int, c: int, on: int, pid: int) -> dict[str, Any]:
            return asdict(asyncio.run(closed_loop(on, reqs, per, c, args.seconds, args.warmup, pid)))

        for k in range(args.rounds):
            rnd: dict[str, Any] = {"loadavg": os.getloadavg()}
            rnd["raw"] = bench_raw(backend, pixels, batches, args.raw_seconds)
            raw_ips = rnd["raw"]["images_per_s"]
            best = max(raw_ips, key=raw_ips.__getitem__)
            print(f"[{k}] raw img/s {json.dumps({b: round(v, 1) for b, v in raw_ips.items()})}", flush=True)
            rnd["server"] = []
            for c in concurrency:
                s0 = mean_batch_size(port)
                r = load(embed, 1, c, port, server.pid)
                s1 = mean_batch_size(port)
                r["mean_batch"] = (s1[0] - s0[0]) / max(1.0, s1[1] - s0[1])
                rnd["server"].append(r)
                print(
                    f"[{k}] server c={c}: {r['images_per_s']:.1f} img/s p50 {r['p50_ms']:.1f} ms "
                    f"p99 {r['p99_ms']:.1f} ms batch {r['mean_batch']:.2f} cpu {r['server_cpu_ms_per_image']:.1f} ms/img",
                    flush=True,
                )
            # interleaved blocks: raw at its best batch, the server at c=8, the naive server at c=8
            rnd["blocks"] = []
            for _ in range(args.blocks):
                block: dict[str, Any] = {"raw": bench_raw(backend, pixels, [best], args.raw_seconds)}
                block["server"] = load(embed, 1, 8, port, server.pid)
                if naive is not None:
                    block["naive"] = load(nreq, 1, 8, nport, naive.pid)
                    block["naive_typed"] = load(nreq_typed, 1, 8, nport, naive.pid)
                rnd["blocks"].append(block)
                print(
                    f"[{k}] block: raw b={best} {block['raw']['images_per_s'][best]:.1f} img/s | server c=8 "
                    f"{block['server']['images_per_s']:.1f} | naive c=8 "
                    f"{block['naive']['images_per_s'] if naive is not None else float('nan'):.1f} | naive typed c=8 "
                    f"{block['naive_typed']['images_per_s'] if naive is not None else float('nan'):.1f}",
                    flush=True,
                )
            # c=1: alternate a raw single-image forward and a server request; correspond and embed
            rnd["latency_c1"] = asyncio.run(
                alternate(port, server.pid, {"embed": embed}, args.pairs, lambda: backend.forward(one))
            )
            rnd["correspond_vs_embed"] = asyncio.run(
                alternate(port, server.pid, {"correspond": corr, "embed": emb2}, args.pairs)
            )
            lc, ce = rnd["latency_c1"], rnd["correspond_vs_embed"]
            print(
                f"[{k}] c=1 p50: server {lc['embed']['p50_ms']:.1f} ms vs raw single {lc['raw']['p50_ms']:.1f} ms | "
                f"correspond {ce['correspond']['p50_ms']:.1f} ms ({ce['correspond']['cpu_ms']:.0f} cpu-ms) vs "
                f"embed of the two {ce['embed']['p50_ms']:.1f} ms ({ce['embed']['cpu_ms']:.0f} cpu-ms)",
                flush=True,
            )
            st = c1_stages(lc["embed"], lc["raw"]["p50_ms"])
            if st:
                print(
                    f"[{k}] c=1 over raw: decode {st['c1_server_decode_ms']:.2f} | queue {st['c1_server_queue_ms']:.2f} | "
                    f"inference - raw {st['c1_inference_minus_raw_ms']:.2f} | rest in server "
                    f"{st['c1_server_other_ms']:.2f} | HTTP {st['c1_http_ms']:.2f} ms (medians)",
                    flush=True,
                )
            results["rounds"].append(rnd)
        backend.close()
    finally:
        for proc in procs:
            stop(proc)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["summary"] = summarize(results)
    print(json.dumps(results["summary"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("cotap", "torch", "onnxruntime", "fastapi", "uvicorn", "numpy", "pillow"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def c1_stages(embed: dict[str, float], raw_ms: float) -> dict[str, float]:
    """Where the c=1 time over the raw forward goes, from the medians of the server's timing
    headers: decode, queue, inference (minus the raw forward), the rest inside the server (body,
    parsing, routing, encoding) and the HTTP round trip outside it."""
    if "server_total_ms" not in embed:
        return {}
    stages = {f"c1_{k}": v for k, v in embed.items() if k.startswith("server_")}
    inside = sum(embed.get(f"server_{k}_ms", 0.0) for k in ("decode", "queue", "inference"))
    return stages | {
        "c1_inference_minus_raw_ms": embed.get("server_inference_ms", float("nan")) - raw_ms,
        "c1_server_other_ms": embed["server_total_ms"] - inside,
        "c1_http_ms": embed["p50_ms"] - embed["server_total_ms"],
    }


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """Ratios within each interleaved block or alternating series, then medians over them."""
    blocks, series = [], []
    for rnd in r["rounds"]:
        for b in rnd["blocks"]:
            raw_b, raw_ips = next(iter(b["raw"]["images_per_s"].items()))
            x = {
                "loadavg_1min": rnd["loadavg"][0],
                "raw_best_batch": raw_b,
                "raw_best_images_per_s": raw_ips,
                "raw_cpu_ms_per_image": b["raw"]["cpu_ms_per_image"][raw_b],
                "server_c8_images_per_s": b["server"]["images_per_s"],
                "server_c8_over_raw_best": b["server"]["images_per_s"] / raw_ips,
                "server_c8_cpu_ms_per_image": b["server"]["server_cpu_ms_per_image"],
                "raw_over_server_cpu_per_image": b["raw"]["cpu_ms_per_image"][raw_b]
                / b["server"]["server_cpu_ms_per_image"],
                "server_c8_p50_ms": b["server"]["p50_ms"],
                "response_bytes_per_image": b["server"]["response_bytes_per_image"],
                "request_bytes_per_image": b["server"]["request_bytes_per_image"],
            }
            if "naive" in b:
                x |= {
                    "naive_c8_images_per_s": b["naive"]["images_per_s"],
                    "server_over_naive_c8": b["server"]["images_per_s"] / b["naive"]["images_per_s"],
                    "naive_cpu_ms_per_image": b["naive"]["server_cpu_ms_per_image"],
                    "naive_over_server_cpu_per_image": b["naive"]["server_cpu_ms_per_image"]
                    / b["server"]["server_cpu_ms_per_image"],
                    "naive_response_bytes_per_image": b["naive"]["response_bytes_per_image"],
                    "naive_typed_c8_images_per_s": b["naive_typed"]["images_per_s"],
                    "server_over_naive_typed_c8": b["server"]["images_per_s"]
                    / b["naive_typed"]["images_per_s"],
                    "naive_typed_cpu_ms_per_image": b["naive_typed"]["server_cpu_ms_per_image"],
                }
            blocks.append(x)
        lc, ce = rnd["latency_c1"], rnd["correspond_vs_embed"]
        series.append(
            {
                "server_c1_p50_ms": lc["embed"]["p50_ms"],
                "raw_single_ms": lc["raw"]["p50_ms"],
                "server_c1_p50_minus_raw_single_ms": lc["embed"]["p50_ms"] - lc["raw"]["p50_ms"],
                "correspond_p50_ms": ce["correspond"]["p50_ms"],
                "embed_two_p50_ms": ce["embed"]["p50_ms"],
                "correspond_over_embed_p50": ce["correspond"]["p50_ms"] / ce["embed"]["p50_ms"],
                "correspond_over_embed_server_cpu": ce["correspond"]["cpu_ms"] / ce["embed"]["cpu_ms"],
                **c1_stages(lc["embed"], lc["raw"]["p50_ms"]),
            }
        )

    def med(rows: list[dict[str, Any]]) -> dict[str, float]:
        keys = [k for k in rows[0] if isinstance(rows[0][k], int | float)]
        return {k: statistics.median(x[k] for x in rows if k in x) for k in keys}

    return {"blocks_median": med(blocks), "c1_median": med(series), "blocks": blocks, "c1": series}


if __name__ == "__main__":
    main()
