"""Reliability load tests of a real `cotap serve` process on 127.0.0.1: overload, soak and drain.

    python bench/reliability.py overload [--factor 2] [--burst-seconds 25] [--json out.json]
    python bench/reliability.py soak --seconds 600 [--rate 20] [--json out.json]
    python bench/reliability.py drain [--clients 8] [--json out.json]

- overload: measure capacity in a closed loop, then offer `factor` x capacity in an open loop for a
  bounded time and request count. Every answer must be 200 with the features of a reference
  computed once per image, or 429 with `Retry-After`; queue depth (sampled from /metrics) and the
  latency of admitted requests stay bounded; service is normal right after the burst.
- soak: a constant-rate load (keep-alive and fresh connections, a few bad images among them) for a
  fixed time; the server's resident memory, open file descriptors and threads are read from /proc
  after warm-up and at the end.
- drain: clients keep sending (each request its own connection and `x-request-id`) and SIGTERM
  arrives mid-load: every request the server logged must have been answered to its client with that
  status (200 with correct features, or 503 before work began), requests it never logged got no
  answer (closed or refused), and the process must exit 0 before its drain timeout.

Each subcommand starts its own server (the embedded default model unless --bundle). The tests in
tests/reliability/ import this file and run short versions of the same functions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
SAFETENSORS = "application/x-safetensors"


# -- inputs ---------------------------------------------------------------------------------------------
def photos(n: int, h: int = 96, w: int = 128, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: colour gradients, a few ellipses and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for _ in range(n):
        img = rng.uniform(40, 200, 3)[None, None, :] + rng.normal(0, 50, 3) * (x / w)[..., None]
        for _ in range(4):
            cy, cx, ry, rx = (
                rng.uniform(0, h),
                rng.uniform(0, w),
                rng.uniform(8, h / 2),
                rng.uniform(8, w / 2),
            )
            img[((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1] = rng.uniform(0, 255, 3)
        img = img + rng.normal(0, 5, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def request_bytes(
    path: str, images: list[bytes], *, request_id: str | None = None, close: bool = False
) -> bytes:
    """A complete HTTP/1.1 multipart request (one `image` part per image), safetensors answer."""
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode()
            + data
            + b"\r\n"
            for i, data in enumerate(images)
        )
        + f"--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nAccept: {SAFETENSORS}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n"
    )
    if request_id:
        head += f"X-Request-Id: {request_id}\r\n"
    if close:
        head += "Connection: close\r\n"
    return (head + "\r\n").encode() + body


def get_bytes(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()


# -- a minimal HTTP/1.1 client (cheap enough that the load generator leaves the cores to the server) --
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> Answer:
    t0 = time.perf_counter()
    writer.write(raw)
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("closed before an answer")
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while (h := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(status, headers, body, time.perf_counter() - t0)


async def one_shot(port: int, raw: bytes, timeout: float = 60) -> Answer:
    """One request on its own connection."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        return await asyncio.wait_for(exchange(reader, writer, raw), timeout)
    finally:
        writer.close()


class Pool:
    """Keep-alive connections to the server, opened as needed (open-loop load needs many at once)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.opened = 0
        self.stale = 0  # reused connections found closed by the server (keep-alive timeout)
        self.stale_idle_s: list[float] = []  # how long each had been idle

    async def send(self, raw: bytes, timeout: float = 60) -> Answer:
        reused = bool(self.idle)
        if reused:
            reader, writer, last_used = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(HOST, self.port)
            self.opened += 1
        try:
            answer = await asyncio.wait_for(exchange(reader, writer, raw), timeout)
        except (ConnectionResetError, BrokenPipeError):
            writer.close()
            if not reused:
                raise
            self.stale_idle_s.append(time.perf_counter() - last_used)
            # an idle keep-alive connection the server closed meanwhile (its keep-alive timeout):
            # the request never reached it; send it again on a new connection, as HTTP clients do
            self.stale += 1
            return await self.send(raw, timeout)
        except BaseException:
            writer.close()
            raise
        if answer.headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer, time.perf_counter()))
        return answer

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


def features(body: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return {k: v.astype(np.float32) for k, v in load(body).items()}


def same_features(body: bytes, ref: dict[str, np.ndarray]) -> bool:
    """The answer holds the reference's patch and cls (float32 answers; batching may move the last
    bits, so a small tolerance)."""
    try:
        got = features(body)
    except Exception:
        return False
    return all(k in got and np.allclose(got[k], v, rtol=1e-3, atol=1e-4) for k, v in ref.items())


def server_s(answer: Answer) -> float:
    """The server's own view of a request's time (its x-total-time-ms header), in seconds."""
    return float(answer.headers.get("x-total-time-ms", "nan")) / 1000


def stages_p99(answers: list[Answer]) -> dict[str, float]:
    out = {}
    for stage in ("decode", "queue", "inference", "total"):
        values = [float(a.headers.get(f"x-{stage}-time-ms", "nan")) for a in answers]
        out[stage] = round(float(np.nanpercentile(values, 99)), 2) if values else float("nan")
    return out


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            if key.split("{")[0] == name:
                total += float(value)
    return total


def percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    ms = np.array(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


# -- the server process ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class ProcStats:
    rss_kb: int
    threads: int
    fds: int


class ServerProcess:
    """`cotap serve` in a subprocess on a free loopback port, its output in `log`."""

    def __init__(self, bundle: Path | None, log: Path, **settings: Any) -> None:
        self.port = free_port()
        self.log = log
        self.settings = settings
        cmd = [sys.executable, "-m", "cotap.cli.main", "serve", "--host", HOST, "--port", str(self.port)]
        if bundle is not None:
            cmd += ["--model", f"bench={bundle}"]
        for key, value in settings.items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("COTAP_")}
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 120) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                if asyncio.run(one_shot(self.port, get_bytes("/health/ready"), 2)).status == 200:
                    return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"server never became ready: {self.log_tail()}")

    def stats(self) -> ProcStats:
        status = Path(f"/proc/{self.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return ProcStats(
            rss_kb=int(fields["VmRSS"].split()[0]),
            threads=int(fields["Threads"]),
            fds=len(os.listdir(f"/proc/{self.pid}/fd")),
        )

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if it did not exit in `timeout`, seconds to exit)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def log_tail(self, n: int = 8) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def references(port: int, images: list[bytes]) -> list[dict[str, np.ndarray]]:
    """Features of every image, one idle request each (float32)."""

    async def go() -> list[dict[str, np.ndarray]]:
        out = []
        for data in images:
            a = await one_shot(port, request_bytes("/v1/embed?dtype=float32", [data]))
            if a.status != 200:
                raise RuntimeError(f"reference request failed: {a.status} {a.body[:200]!r}")
            out.append(features(a.body))
        return out

    return asyncio.run(go())


def served_model(port: int) -> dict[str, Any]:
    """What the server serves (from /v1/models): name, arch, input sizes, bundle hash, backend."""
    info = json.loads(asyncio.run(one_shot(port, get_bytes("/v1/models"), 10)).body)["models"][0]
    keys = ("name", "arch", "input_sizes", "bundle_sha256", "backend", "device", "precision")
    return {k: info.get(k) for k in keys}


async def scrape(port: int) -> str:
    return (await one_shot(port, get_bytes("/metrics"), 10)).body.decode()


# -- overload -------------------------------------------------------------------------------------------
@dataclass
class OverloadReport:
    server: dict[str, Any]
    model: dict[str, Any]
    images: int
    idle_p50_ms: float
    capacity_concurrency: int
    capacity_seconds: float
    capacity_rps: float
    capacity_latency: dict[str, float]
    offered_rps: float
    sent_rps: float  # as actually sent (the schedule, unless this client fell behind)
    burst_seconds: float
    sent: int
    answered: int
    ok: int
    refused_429: int
    retry_after_missing: int
    wrong_answers: int
    other_statuses: dict[str, int]
    transport_errors: int
    keepalive_resent: int  # sent again: their idle connection had passed the server's keep-alive timeout
    admitted_latency: dict[str, float]  # as the client saw it
    refused_latency: dict[str, float]
    admitted_server_latency: dict[str, float]  # x-total-time-ms: from the app's first byte to its answer
    refused_server_latency: dict[str, float]
    admitted_stages_p99_ms: dict[str, float]  # the server's x-*-time-ms headers of admitted requests
    max_queue_depth_seen: float
    after_burst: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def problems(self, latency_bound_s: float) -> list[str]:
        """What breaks the overload contract (empty when it holds)."""
        p = []
        if self.other_statuses:
            p.append(f"statuses other than 200/429: {self.other_statuses}")
        if self.transport_errors:
            p.append(f"{self.transport_errors} requests got no answer")
        if self.wrong_answers:
            p.append(f"{self.wrong_answers} admitted requests answered with wrong features")
        if self.retry_after_missing:
            p.append(f"{self.retry_after_missing} answers 429 without Retry-After")
        if self.refused_429 == 0:
            p.append("no request was refused: the load never exceeded capacity")
        if self.max_queue_depth_seen > int(self.server["max_queue"]):
            p.append(f"queue depth {self.max_queue_depth_seen} over max_queue {self.server['max_queue']}")
        if self.admitted_latency["p99_ms"] > latency_bound_s * 1000:
            p.append(f"p99 of admitted {self.admitted_latency['p99_ms']} ms over {latency_bound_s} s")
        if self.after_burst["ok"] != self.after_burst["requests"]:
            p.append(f"after the burst: {self.after_burst}")
        return p


async def closed_loop(
    port: int, raws: list[bytes], concurrency: int, seconds: float, max_requests: int = 200_000
) -> tuple[int, list[float], Counter[int]]:
    """`concurrency` keep-alive clients, each sending its next request when the last is answered,
    for `seconds` or `max_requests` in all."""
    lat: list[float] = []
    statuses: Counter[int] = Counter()
    end = time.perf_counter() + seconds

    async def client(k: int) -> None:
        pool = Pool(port)
        i = k
        try:
            while time.perf_counter() < end and i < max_requests:
                a = await pool.send(raws[i % len(raws)])
                statuses[a.status] += 1
                if a.status == 200:
                    lat.append(a.seconds)
                i += concurrency
        finally:
            pool.close()

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return len(lat), lat, statuses


async def open_loop(
    port: int,
    raws: list[bytes],
    refs: list[dict[str, np.ndarray]],
    rate: float,
    seconds: float,
    max_requests: int,
) -> tuple[list[tuple[int, Answer | None, bool]], float, float, int]:
    """Requests sent on a fixed schedule (`rate` per second), whatever the answers: (image index,
    answer or None on a transport error, features correct) per request, the max queue depth
    sampled meanwhile, the seconds the sending took (longer than planned if this client lags), and
    how many requests were sent again because their idle keep-alive connection had been closed."""
    pool = Pool(port)
    n = min(max_requests, int(rate * seconds))
    results: list[tuple[int, Answer | None, bool]] = []
    errors: Counter[str] = Counter()
    depth = 0.0
    done = asyncio.Event()

    async def one(i: int) -> None:
        k = i % len(raws)
        try:
            a = await pool.send(raws[k])
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
            errors[f"{type(e).__name__}: {e}"[:120]] += 1
            results.append((k, None, False))
            return
        results.append((k, a, a.status == 200 and same_features(a.body, refs[k])))

    async def sample() -> None:
        nonlocal depth
        while not done.is_set():
            with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError):
                depth = max(depth, metric(await scrape(port), "cotap_queue_depth"))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    t0 = time.perf_counter()
    tasks = []
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    send_seconds = time.perf_counter() - t0
    await asyncio.gather(*tasks)
    done.set()
    await sampler
    pool.close()
    if errors or pool.stale:
        idle = (
            f"idle {min(pool.stale_idle_s):.1f}-{max(pool.stale_idle_s):.1f} s" if pool.stale_idle_s else ""
        )
        print(
            f"transport errors: {dict(errors)}; stale keep-alive resent: {pool.stale} {idle}", file=sys.stderr
        )
    return results, depth, send_seconds, pool.stale


def run_overload(
    bundle: Path | None,
    work: Path,
    *,
    factor: float = 2.0,
    capacity_seconds: float = 10.0,
    burst_seconds: float = 25.0,
    max_requests: int = 20_000,
    concurrency: int = 16,
    n_images: int = 16,
    image_size: tuple[int, int] = (96, 128),
    after_requests: int = 20,
    **settings: Any,
) -> OverloadReport:
    server_settings = {"max_batch": 8, "max_queue": 32, "max_queue_delay_ms": 2, "log_level": "warning"}
    server_settings |= settings
    images = photos(n_images, *image_size)
    raws = [request_bytes("/v1/embed?dtype=float32", [x]) for x in images]
    with ServerProcess(bundle, work / "overload-server.log", **server_settings) as server:
        server.wait_ready()
        model = served_model(server.port)
        refs = references(server.port, images)

        async def measure() -> OverloadReport:
            # idle single-request latency, then capacity (closed loop, saturating)
            idle = [(await one_shot(server.port, raws[i % len(raws)])).seconds for i in range(10)]
            await closed_loop(server.port, raws, concurrency, min(2.0, capacity_seconds / 3))  # warm-up
            done, lat, _ = await closed_loop(server.port, raws, concurrency, capacity_seconds)
            capacity = done / capacity_seconds
            rate = factor * capacity
            results, depth, send_s, resent = await open_loop(
                server.port, raws, refs, rate, burst_seconds, max_requests
            )
            # right after the burst: sequential normal requests
            after: list[Answer] = [
                await one_shot(server.port, raws[i % len(raws)]) for i in range(after_requests)
            ]
            after_ok = [
                a
                for i, a in enumerate(after)
                if a.status == 200 and same_features(a.body, refs[i % len(refs)])
            ]
            answers = [a for _, a, _ in results if a is not None]
            statuses = Counter(a.status for a in answers)
            other = {str(s): c for s, c in statuses.items() if s not in (200, 429)}
            return OverloadReport(
                server=server_settings,
                model=model,
                images=len(images),
                idle_p50_ms=round(float(np.median(idle)) * 1000, 2),
                capacity_concurrency=concurrency,
                capacity_seconds=capacity_seconds,
                capacity_rps=round(capacity, 1),
                capacity_latency=percentiles(lat),
                offered_rps=round(rate, 1),
                sent_rps=round(len(results) / max(send_s, 1e-9), 1),
                burst_seconds=burst_seconds,
                sent=len(results),
                answered=len(answers),
                ok=statuses[200],
                refused_429=statuses[429],
                retry_after_missing=sum(
                    1 for a in answers if a.status == 429 and "retry-after" not in a.headers
                ),
                wrong_answers=sum(
                    1 for _, a, good in results if a is not None and a.status == 200 and not good
                ),
                other_statuses=other,
                transport_errors=len(results) - len(answers),
                keepalive_resent=resent,
                admitted_latency=percentiles([a.seconds for a in answers if a.status == 200]),
                refused_latency=percentiles([a.seconds for a in answers if a.status == 429]),
                admitted_server_latency=percentiles([server_s(a) for a in answers if a.status == 200]),
                refused_server_latency=percentiles([server_s(a) for a in answers if a.status == 429]),
                admitted_stages_p99_ms=stages_p99([a for a in answers if a.status == 200]),
                max_queue_depth_seen=depth,
                after_burst={
                    "requests": len(after),
                    "ok": len(after_ok),
                    **percentiles([a.seconds for a in after]),
                },
            )

        return asyncio.run(measure())


# -- soak -----------------------------------------------------------------------------------------------
@dataclass
class SoakReport:
    server: dict[str, Any]
    model: dict[str, Any]
    seconds: float
    warmup_seconds: float
    rate: float
    sent: int
    statuses: dict[str, int]
    wrong_answers: int
    transport_errors: int
    connections_opened: int
    latency: dict[str, float]
    after_warmup: dict[str, int]
    end: dict[str, int]
    rss_growth_pct: float
    samples: list[dict[str, float]]

    def problems(self, max_rss_growth_pct: float = 5.0) -> list[str]:
        p = []
        if self.rss_growth_pct >= max_rss_growth_pct:
            p.append(f"RSS grew {self.rss_growth_pct:.2f} % (limit {max_rss_growth_pct} %)")
        if self.end["fds"] > self.after_warmup["fds"]:
            p.append(f"file descriptors grew {self.after_warmup['fds']} -> {self.end['fds']}")
        if self.end["threads"] > self.after_warmup["threads"]:
            p.append(f"threads grew {self.after_warmup['threads']} -> {self.end['threads']}")
        if self.wrong_answers or self.transport_errors:
            p.append(f"{self.wrong_answers} wrong answers, {self.transport_errors} unanswered")
        unexpected = {s: n for s, n in self.statuses.items() if s not in ("200", "400")}
        if unexpected:
            p.append(f"unexpected statuses {unexpected}")
        return p


def run_soak(
    bundle: Path | None,
    work: Path,
    *,
    seconds: float = 600.0,
    warmup_seconds: float = 60.0,
    rate: float = 20.0,
    sample_every: float = 5.0,
    n_images: int = 16,
    image_size: tuple[int, int] = (96, 128),
    fresh_every: int = 10,
    bad_every: int = 20,
    burst: int = 16,
    **settings: Any,
) -> SoakReport:
    """A constant `rate` of requests for `seconds` (bounded: rate x seconds requests). Every
    `fresh_every`-th request opens its own connection, every `bad_every`-th sends a broken image
    (400), the rest reuse keep-alive connections; /proc is sampled every `sample_every` s. First,
    a few bursts of `burst` concurrent requests make every bounded thread pool (decoding, ...)
    start all its threads, so that a pool thread started late is not mistaken for a leak."""
    server_settings = {"max_batch": 8, "max_queue": 64, "log_level": "warning"} | settings
    images = photos(n_images, *image_size)
    raws = [request_bytes("/v1/embed?dtype=float32", [x]) for x in images]
    bad = request_bytes("/v1/embed", [images[0][: len(images[0]) // 3]])
    with ServerProcess(bundle, work / "soak-server.log", **server_settings) as server:
        server.wait_ready()
        model = served_model(server.port)
        refs = references(server.port, images)

        async def load() -> SoakReport:
            for _ in range(5):
                await asyncio.gather(*(one_shot(server.port, raws[i % len(raws)]) for i in range(burst)))
            pool = Pool(server.port)
            statuses: Counter[str] = Counter()
            lat: list[float] = []
            wrong = unanswered = 0
            samples: list[dict[str, float]] = []
            after_warmup: ProcStats | None = None
            n = int(rate * seconds)
            t0 = time.perf_counter()
            next_sample = 0.0
            tasks: set[asyncio.Task[None]] = set()

            async def one(i: int) -> None:
                nonlocal wrong, unanswered
                k = i % len(raws)
                raw = bad if i % bad_every == bad_every - 1 else raws[k]
                try:
                    if i % fresh_every == 0:
                        a = await one_shot(server.port, raw)
                    else:
                        a = await pool.send(raw)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
                    unanswered += 1
                    return
                statuses[str(a.status)] += 1
                if raw is not bad and a.status == 200:
                    lat.append(a.seconds)
                    wrong += not same_features(a.body, refs[k])

            for i in range(n):
                now = time.perf_counter() - t0
                if now >= next_sample:
                    s = server.stats()
                    samples.append({"t": round(now, 1), **asdict(s)})
                    if after_warmup is None and now >= warmup_seconds:
                        after_warmup = s
                    next_sample += sample_every
                delay = t0 + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)
            pool.close()
            await asyncio.sleep(1.0)  # let the server settle (closed connections, finished answers)
            end = server.stats()
            samples.append({"t": round(time.perf_counter() - t0, 1), **asdict(end)})
            base = after_warmup or end
            return SoakReport(
                server=server_settings,
                model=model,
                seconds=seconds,
                warmup_seconds=warmup_seconds,
                rate=rate,
                sent=n,
                statuses=dict(statuses),
                wrong_answers=wrong,
                transport_errors=unanswered,
                connections_opened=pool.opened + n // fresh_every,
                latency=percentiles(lat),
                after_warmup=asdict(base),
                end=asdict(end),
                rss_growth_pct=round(100.0 * (end.rss_kb - base.rss_kb) / base.rss_kb, 2),
                samples=samples,
            )

        return asyncio.run(load())


# -- drain ----------------------------------------------------------------------------------------------
@dataclass
class DrainReport:
    server: dict[str, Any]
    model: dict[str, Any]
    clients: int
    load_seconds_before: float
    sent: int
    outcomes: dict[str, int]  # client side: 200, 503, closed (no answer), refused (no connection)
    in_flight_at_sigterm: int
    completed_after_sigterm: int
    wrong_answers: int
    logged: int
    mismatches: list[str]
    exit_code: int | None
    drain_seconds: float
    drain_log: dict[str, Any]

    def problems(self) -> list[str]:
        p = []
        if self.exit_code != 0:
            p.append(f"exit code {self.exit_code}")
        if self.drain_seconds > float(self.server["drain_timeout_s"]):
            p.append(
                f"took {self.drain_seconds:.2f} s, over the drain timeout {self.server['drain_timeout_s']} s"
            )
        if self.mismatches:
            p.append(f"{len(self.mismatches)} requests lost or misreported: {self.mismatches[:5]}")
        if self.wrong_answers:
            p.append(f"{self.wrong_answers} wrong answers")
        unexpected = set(self.outcomes) - {"200", "503", "closed", "refused"}
        if unexpected:
            p.append(f"unexpected outcomes {unexpected}")
        if self.drain_log.get("msg") != "drained":
            p.append(f"the drain did not finish idle: {self.drain_log}")
        return p


def run_drain(
    bundle: Path | None,
    work: Path,
    *,
    clients: int = 8,
    load_seconds_before: float = 3.0,
    max_seconds_after: float = 60.0,
    n_images: int = 8,
    image_size: tuple[int, int] = (96, 128),
    slow_images: int = 4,
    max_requests: int = 100_000,
    **settings: Any,
) -> DrainReport:
    """`clients` loops send requests (each on its own connection with its own x-request-id; some
    carry `slow_images` images so work is queued at any moment) until the server stops accepting
    connections; SIGTERM after `load_seconds_before`."""
    server_settings: dict[str, Any] = {
        "max_batch": 8,
        "max_queue": 64,
        "drain_timeout_s": 30,
        "log_level": "info",
    } | settings
    images = photos(n_images, *image_size)
    with ServerProcess(bundle, work / "drain-server.log", **server_settings) as server:
        server.wait_ready()
        model = served_model(server.port)
        refs = references(server.port, images)
        sent: dict[str, tuple[float, list[int]]] = {}  # rid -> (t sent, image indexes)
        outcome: dict[str, tuple[str, float]] = {}  # rid -> (200 | 503 | closed | refused, t answered)
        wrong = 0
        t_term = 0.0
        exit_box: dict[str, Any] = {}

        async def client(k: int) -> None:
            nonlocal wrong
            i = k
            end = time.monotonic() + load_seconds_before + max_seconds_after
            while time.monotonic() < end and i < max_requests:
                idx = [(i + j) % len(images) for j in range(slow_images if i % 3 == 0 else 1)]
                rid = f"drain-{k}-{i}"
                raw = request_bytes(
                    "/v1/embed?dtype=float32", [images[j] for j in idx], request_id=rid, close=True
                )
                sent[rid] = (time.monotonic(), idx)
                try:
                    reader, writer = await asyncio.open_connection(HOST, server.port)
                except OSError:
                    outcome[rid] = ("refused", time.monotonic())
                    return  # the server no longer accepts connections: this client is done
                try:
                    a = await asyncio.wait_for(exchange(reader, writer, raw), 60)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    outcome[rid] = ("closed", time.monotonic())
                    continue
                finally:
                    writer.close()
                outcome[rid] = (str(a.status), time.monotonic())
                if a.status == 200:
                    got = features(a.body)
                    for n, j in enumerate(idx):
                        ok = all(
                            np.allclose(got[key][n], refs[j][key][0], rtol=1e-3, atol=1e-4)
                            for key in ("patch", "cls")
                        )
                        wrong += not ok
                elif a.status == 503:
                    await asyncio.sleep(0.02)  # a client that backs off a little (Retry-After says 1 s)
                i += clients

        async def main() -> None:
            nonlocal t_term
            tasks = [asyncio.create_task(client(k)) for k in range(clients)]
            await asyncio.sleep(load_seconds_before)
            t_term = time.monotonic()
            waiter = asyncio.create_task(
                asyncio.to_thread(server.terminate, float(server_settings["drain_timeout_s"]) + 15)
            )
            await asyncio.gather(*tasks)
            exit_box["code"], exit_box["seconds"] = await waiter

        asyncio.run(main())
        logged = {
            x["request_id"]: x["status"]
            for x in server.log_lines()
            if x.get("msg") == "request" and str(x.get("request_id", "")).startswith("drain-")
        }
        drain_log = next(
            (
                x
                for x in server.log_lines()
                if x.get("msg") in ("drained", "drain timeout: stopping with requests in flight")
            ),
            {},
        )
    mismatches = []
    for rid in sent:
        got = outcome.get(rid, ("missing", 0.0))[0]
        if rid in logged:
            if str(logged[rid]) != got or got not in ("200", "503"):
                mismatches.append(f"{rid}: server logged {logged[rid]}, client got {got}")
        elif got not in ("closed", "refused"):
            mismatches.append(f"{rid}: never logged by the server, client got {got}")
    outcomes = Counter(v[0] for v in outcome.values())
    in_flight = [
        rid for rid, (t, _) in sent.items() if t < t_term and outcome.get(rid, ("", 0.0))[1] >= t_term
    ]
    return DrainReport(
        server=server_settings,
        model=model,
        clients=clients,
        load_seconds_before=load_seconds_before,
        sent=len(sent),
        outcomes=dict(outcomes),
        in_flight_at_sigterm=len(in_flight),
        completed_after_sigterm=sum(1 for rid in in_flight if outcome[rid][0] == "200"),
        wrong_answers=wrong,
        logged=len(logged),
        mismatches=mismatches,
        exit_code=exit_box.get("code"),
        drain_seconds=round(float(exit_box.get("seconds", float("nan"))), 3),
        drain_log={k: v for k, v in drain_log.items() if k in ("msg", "in_flight", "seconds")},
    )


# -- command line ---------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
    }


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in args.set or []:
        key, _, value = pair.partition("=")
        number: Any = value
        for kind in (int, float):
            with contextlib.suppress(ValueError):
                number = kind(value)
                break
        out[key.replace("-", "_")] = number
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("test", choices=["overload", "soak", "drain"])
    p.add_argument("--bundle", type=Path, help="bundle to serve (default: the embedded default model)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-reliability")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--set", action="append", metavar="SETTING=VALUE", help="server setting (repeatable)")
    p.add_argument("--factor", type=float, default=2.0, help="overload: offered load / capacity")
    p.add_argument("--capacity-seconds", type=float, default=10.0)
    p.add_argument("--burst-seconds", type=float, default=25.0)
    p.add_argument("--max-requests", type=int, default=20_000, help="overload: cap on burst requests")
    p.add_argument("--concurrency", type=int, default=16, help="overload: closed-loop clients")
    p.add_argument("--seconds", type=float, default=600.0, help="soak: duration")
    p.add_argument("--warmup-seconds", type=float, default=60.0, help="soak: before the baseline sample")
    p.add_argument("--rate", type=float, default=20.0, help="soak: requests per second")
    p.add_argument("--clients", type=int, default=8, help="drain: client loops")
    args = p.parse_args()
    settings = _settings(args)
    t0 = time.time()
    report: Any
    if args.test == "overload":
        report = run_overload(
            args.bundle,
            args.work,
            factor=args.factor,
            capacity_seconds=args.capacity_seconds,
            burst_seconds=args.burst_seconds,
            max_requests=args.max_requests,
            concurrency=args.concurrency,
            **settings,
        )
        problems = report.problems(latency_bound_s=float(settings.get("deadline_ms", 30000)) / 1000)
    elif args.test == "soak":
        report = run_soak(
            args.bundle,
            args.work,
            seconds=args.seconds,
            warmup_seconds=args.warmup_seconds,
            rate=args.rate,
            **settings,
        )
        problems = report.problems()
    else:
        report = run_drain(args.bundle, args.work, clients=args.clients, **settings)
        problems = report.problems()
    out = {
        "test": args.test,
        "machine": machine(),
        "wall_s": round(time.time() - t0, 1),
        "report": asdict(report),
        "problems": problems,
    }
    text = json.dumps(out, indent=2, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    summary = {k: v for k, v in out["report"].items() if k != "samples"}
    print(json.dumps({**out, "report": summary}, indent=2, default=str))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
