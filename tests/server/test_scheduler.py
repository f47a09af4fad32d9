"""Dynamic batching under concurrency, the bounded queue (429 at once), deadlines (504), dropped
work of disconnected clients, and an in-process drain."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from cotap.server.app import create_app
from tests.server.helpers import Gate, jpeg, metric, parts, run, running, settings_for


async def wait_depth(app: Any, n: int) -> None:
    for _ in range(500):
        if app.state.cotap.scheduler.depth >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"queue never reached {n}")


def test_concurrent_requests_are_batched(tiny_bundle: Path, gate: Gate) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_batch=8), hook=gate.wrap) as (app, c):
            gate.batches.clear()
            gate.hold()
            first = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg()])))
            await gate.wait_entered()
            rest = [
                asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg(seed=i)])))
                for i in range(6)
            ]
            await wait_depth(app, 6)
            gate.release()
            responses = await asyncio.gather(first, *rest)
            assert all(r.status_code == 200 for r in responses)
            assert gate.batches == [1, 6]
            text = (await c.get("/metrics")).text
            count = metric(text, "cotap_batch_size_count", model="tiny")
            ones = metric(text, "cotap_batch_size_bucket", model="tiny", le="1.0")
            assert count == 2 and ones == 1  # one batch of 1, one of more than 1
            assert metric(text, "cotap_batch_size_sum", model="tiny") == 7
            queue = [float(r.headers["x-queue-time-ms"]) for r in responses[1:]]
            assert min(queue) > 0

    run(body())


def test_batches_are_capped_and_keyed_by_model(tiny_bundle: Path, other_bundle: Path, gate: Gate) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, other_bundle, max_batch=4), hook=gate.wrap) as (app, c):
            gate.batches.clear()
            gate.hold()
            first = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg()])))
            await gate.wait_entered()
            many = asyncio.ensure_future(
                c.post("/v1/embed", files=parts("image", [jpeg(seed=i) for i in range(6)]))
            )
            other = asyncio.ensure_future(c.post("/v1/embed?model=other", files=parts("image", [jpeg()])))
            await wait_depth(app, 7)
            gate.release()
            rs = await asyncio.gather(first, many, other)
            assert [r.status_code for r in rs] == [200, 200, 200]
            assert sorted(gate.batches) == [1, 1, 2, 4]  # tiny: 1, 4, 2; other: 1 (never mixed)

    run(body())


def test_full_queue_answers_429_at_once(tiny_bundle: Path, gate: Gate) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_queue=2, retry_after_s=3), hook=gate.wrap) as (
            app,
            c,
        ):
            gate.hold()
            running_req = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg()])))
            await gate.wait_entered()
            queued = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg(), jpeg(seed=1)])))
            await wait_depth(app, 2)
            t0 = time.monotonic()
            r = await c.post("/v1/embed", files=parts("image", [jpeg()]))
            assert time.monotonic() - t0 < 1.0
            assert r.status_code == 429 and r.headers["retry-after"] == "3"
            assert r.json()["error"]["code"] == "queue_full"
            gate.release()
            assert [x.status_code for x in await asyncio.gather(running_req, queued)] == [200, 200]
            assert (await c.post("/v1/embed", files=parts("image", [jpeg()]))).status_code == 200

    run(body())


def test_deadline_answers_504_and_drops_the_work(tiny_bundle: Path, gate: Gate) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, deadline_ms=300), hook=gate.wrap) as (_, c):
            gate.batches.clear()
            gate.hold()
            first = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg()])))
            await gate.wait_entered()
            late = await c.post("/v1/embed", files=parts("image", [jpeg(seed=5), jpeg(seed=6)]))
            assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
            gate.release()
            r = await first  # its deadline passed too, while in forward: answered 504 as well
            assert r.status_code == 504
            ok = await c.post("/v1/embed", files=parts("image", [jpeg()]))
            assert ok.status_code == 200
            assert gate.batches == [1, 1]  # the late request's two images never ran
            text = (await c.get("/metrics")).text
            assert metric(text, "cotap_dropped_images_total", reason="deadline") == 2
            assert metric(text, "cotap_dropped_images_total", reason="cancelled") == 0  # not a disconnect

    run(body())


def test_disconnected_client_work_is_not_run(tiny_bundle: Path, gate: Gate) -> None:
    """A raw ASGI call whose client goes away while its images wait in the queue (filling it): the
    images never run, and their places are free for the next request at once, while the worker is
    still busy."""

    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_queue=3), hook=gate.wrap) as (app, c):
            gate.batches.clear()
            gate.hold()
            first = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg()])))
            await gate.wait_entered()
            req = httpx.Request(
                "POST",
                "http://test/v1/embed",
                files=parts("image", [jpeg(seed=1), jpeg(seed=2), jpeg(seed=3)]),
            )
            payload = req.read()
            gone = asyncio.Event()
            sent: list[dict[str, Any]] = []
            messages = [{"type": "http.request", "body": payload, "more_body": False}]

            async def receive() -> dict[str, Any]:
                if messages:
                    return messages.pop(0)
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/embed",
                "raw_path": b"/v1/embed",
                "query_string": b"",
                "root_path": "",
                "headers": [(k.lower().encode(), v.encode()) for k, v in req.headers.items()],
                "client": ("127.0.0.1", 1234),
                "server": ("test", 80),
            }
            call = asyncio.ensure_future(app(scope, receive, send))
            await wait_depth(app, 3)
            gone.set()  # the client leaves while its three images are queued
            await asyncio.wait_for(call, 10)
            assert app.state.cotap.scheduler.depth == 3  # nothing has purged them yet
            admitted = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg()])))
            for _ in range(500):  # admitted and queued: the dead images gave their places back
                if app.state.cotap.scheduler.depth == 1 and not admitted.done():
                    break
                await asyncio.sleep(0.01)
            assert app.state.cotap.scheduler.depth == 1 and not admitted.done()
            gate.release()
            assert (await first).status_code == 200
            assert (await admitted).status_code == 200
            assert gate.batches == [1, 1]  # the disconnected request's images never reached the model
            text = (await c.get("/metrics")).text
            assert metric(text, "cotap_dropped_images_total", reason="cancelled") == 3
            assert sent and sent[0]["status"] == 499

    run(body())


def test_drain_finishes_in_flight_and_refuses_new_work(tiny_bundle: Path, gate: Gate) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle), hook=gate.wrap) as (app, c):
            state = app.state.cotap
            gate.hold()
            running_req = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg()])))
            await gate.wait_entered()
            queued = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg(seed=1)])))
            await wait_depth(app, 1)
            state.begin_drain()  # what SIGTERM does
            ready = await c.get("/health/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            refused = await c.post("/v1/embed", files=parts("image", [jpeg()]))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
            assert refused.headers["retry-after"] == "1"
            assert state.in_flight == 2
            gate.release()
            assert [r.status_code for r in await asyncio.gather(running_req, queued)] == [200, 200]
            assert state.in_flight == 0

    run(body())


def test_a_lone_request_does_not_wait_for_company(tiny_bundle: Path) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_queue_delay_ms=2000)) as (_, c):
            t0 = time.monotonic()
            r = await c.post("/v1/embed", files=parts("image", [jpeg()]))
            assert r.status_code == 200 and time.monotonic() - t0 < 1.0
            assert float(r.headers["x-queue-time-ms"]) < 500

    run(body())


def test_create_app_defaults_to_the_embedded_model() -> None:
    async def body() -> None:
        from cotap.server.settings import Settings

        app = create_app(Settings(max_batch=2))
        async with app.router.lifespan_context(app):
            assert await app.state.cotap.wait_loaded(60), app.state.cotap.load_error
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                m = (await c.get("/v1/models")).json()["models"][0]
                assert (
                    m["name"] == "default" and m["arch"] == "cotap_micro8" and m["input_sizes"] == [[96, 96]]
                )
                r = await c.post("/v1/embed", files=parts("image", [jpeg(80, 60)]))
                assert r.status_code == 200 and r.json()["__metadata__"]["grid"] == [12, 12]

    run(body())
