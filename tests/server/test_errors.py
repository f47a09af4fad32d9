"""Every error status answers the one envelope with the right code, and bad input never becomes a
500 or hurts another request."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cotap.core.wire import REQUEST_ID_HEADER, SAFETENSORS_MEDIA_TYPE
from cotap.server.backends.base import Backend
from tests.server.helpers import Gate, encode, jpeg, metric, parts, photo, run, running, settings_for


def envelope(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["request_id"] == r.headers[REQUEST_ID_HEADER]
    assert body["error"]["message"]
    return str(body["error"]["message"])


def test_the_body_limit_is_inclusive_with_and_without_content_length(tiny_bundle: Path) -> None:
    """A body of exactly max_body_bytes is read; one byte more is 413, whether its length is declared
    or it arrives chunked."""
    import base64
    from collections.abc import AsyncIterator

    limit = 4096
    image = base64.b64encode(jpeg()).decode()

    def body_of(size: int) -> bytes:
        doc = ('{"images": ["' + image + '"]}').encode()
        assert len(doc) <= size
        return doc[:-1] + b" " * (size - len(doc)) + b"}"  # JSON whitespace pads it to size

    async def chunked(data: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_body_bytes=limit)) as (_, c):
            headers = {"content-type": "application/json"}
            for size, status in ((limit, 200), (limit + 1, 413)):
                data = body_of(size)
                r = await c.post("/v1/embed", content=data, headers=headers)
                assert r.status_code == status, (size, r.text)
                r = await c.post("/v1/embed", content=chunked(data), headers=headers)
                assert r.status_code == status, ("chunked", size, r.text)

    run(body())


def test_no_images_is_worded_for_the_body_that_was_sent(tiny_bundle: Path) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle)) as (_, c):
            msg = envelope(await c.post("/v1/embed", json={"images": []}), 422, "invalid_parameters")
            assert 'base64 images in "images"' in msg
            msg = envelope(await c.post("/v1/correspond", json={"pairs": []}), 422, "invalid_parameters")
            assert 'pairs in "pairs"' in msg
            only_an_option = (
                b'--b\r\nContent-Disposition: form-data; name="normalize"\r\n\r\ntrue\r\n--b--\r\n'
            )
            r = await c.post(
                "/v1/embed",
                content=only_an_option,
                headers={"content-type": "multipart/form-data; boundary=b"},
            )
            msg = envelope(r, 422, "invalid_parameters")
            assert "image parts (field 'image')" in msg

    run(body())


def test_4xx_statuses(tiny_bundle: Path) -> None:
    async def body() -> None:
        settings = settings_for(
            tiny_bundle, max_body_bytes=64 * 1024, max_pixels=100 * 100, max_images_per_request=3
        )
        async with running(settings) as (_, c):
            # 400: not an image, truncated JPEG, bad base64
            msg = envelope(
                await c.post("/v1/embed", files=parts("image", [jpeg(), b"not an image"])), 400, "bad_image"
            )
            assert msg.startswith("image 1")
            envelope(await c.post("/v1/embed", files=parts("image", [jpeg()[:200]])), 400, "bad_image")
            envelope(await c.post("/v1/embed", json={"images": ["%%%"]}), 400, "bad_image")
            # 404: route and model
            envelope(await c.get("/v2/nothing"), 404, "not_found")
            msg = envelope(
                await c.post("/v1/embed?model=nope", files=parts("image", [jpeg()])), 404, "model_not_found"
            )
            assert "tiny" in msg
            # 413: body, image pixels, images per request, multipart parts
            big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
            envelope(
                await c.post("/v1/embed", files=parts("image", [encode(big, "PNG")])),
                413,
                "payload_too_large",
            )
            envelope(
                await c.post("/v1/embed", files=parts("image", [jpeg(120, 120)])), 413, "image_too_large"
            )
            envelope(await c.post("/v1/embed", files=parts("image", [jpeg()] * 4)), 413, "payload_too_large")
            # 415: content type and image format
            envelope(
                await c.post("/v1/embed", content=b"abc", headers={"content-type": "text/plain"}),
                415,
                "unsupported_media_type",
            )
            envelope(await c.post("/v1/embed", content=b"abc"), 415, "unsupported_media_type")
            gif = encode(photo(40, 40), "GIF")
            envelope(await c.post("/v1/embed", files=parts("image", [gif])), 415, "unsupported_media_type")
            # 422: bad or unknown options, conflicts, limits that are parameters
            envelope(
                await c.post("/v1/prototypes?top_k=0", files=parts("image", [jpeg()])),
                422,
                "invalid_parameters",
            )
            envelope(
                await c.post("/v1/prototypes?top_k=65", files=parts("image", [jpeg()])),
                422,
                "invalid_parameters",
            )
            envelope(
                await c.post("/v1/embed?outputs=assign", files=parts("image", [jpeg()])),
                422,
                "invalid_parameters",
            )
            envelope(
                await c.post("/v1/embed?topk=3", files=parts("image", [jpeg()])), 422, "invalid_parameters"
            )
            envelope(
                await c.post("/v1/embed?dtype=int8", files=parts("image", [jpeg()])),
                422,
                "invalid_parameters",
            )
            envelope(
                await c.post("/v1/embed", files=[("photo", ("a.jpg", jpeg(), "image/jpeg"))]),
                422,
                "invalid_parameters",
            )
            envelope(await c.post("/v1/embed", files=[]), 415, "unsupported_media_type")
            envelope(await c.post("/v1/embed", json={"images": []}), 422, "invalid_parameters")
            envelope(
                await c.post("/v1/embed?normalize=true", json={"images": [], "normalize": False}),
                422,
                "invalid_parameters",
            )
            envelope(
                await c.post("/v1/embed", content=b"{nope", headers={"content-type": "application/json"}),
                422,
                "invalid_parameters",
            )
            deep: Any = ["x"]
            for _ in range(20):
                deep = [deep]
            envelope(await c.post("/v1/embed", json={"images": deep}), 422, "invalid_parameters")
            envelope(
                await c.post(
                    "/v1/correspond", files=parts("source", [jpeg()] * 2) + parts("target", [jpeg()])
                ),
                422,
                "invalid_parameters",
            )
            envelope(
                await c.post(
                    "/v1/correspond?top_k=17", files=parts("source", [jpeg()]) + parts("target", [jpeg()])
                ),
                422,
                "invalid_parameters",
            )
            envelope(await c.get("/v1/embed"), 405, "invalid_parameters")
            # an option given twice in the query, or an empty model name: never silently one of them
            msg = envelope(
                await c.post("/v1/prototypes?top_k=1&top_k=2", files=parts("image", [jpeg()])),
                422,
                "invalid_parameters",
            )
            assert "top_k given more than once" in msg
            envelope(
                await c.post("/v1/embed?model=tiny&model=tiny", files=parts("image", [jpeg()])),
                422,
                "invalid_parameters",
            )
            msg = envelope(
                await c.post("/v1/embed?model=", files=parts("image", [jpeg()])), 422, "invalid_parameters"
            )
            assert "model is empty" in msg
            ok = await c.post("/v1/embed?outputs=cls&outputs=patch", files=parts("image", [jpeg()]))
            assert ok.status_code == 200  # a list option may repeat

    run(body())


def test_json_answer_that_cannot_fit_is_refused_before_inference(tiny_bundle: Path, gate: Gate) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_json_bytes=2000), hook=gate.wrap) as (_, c):
            gate.batches.clear()
            # one 40x48 image: 4x4 patches x 64 + cls 64 = 1088 numbers, at least 2176 bytes of JSON
            msg = envelope(
                await c.post("/v1/embed", files=parts("image", [jpeg()])), 413, "payload_too_large"
            )
            assert "at least 2176 bytes" in msg and SAFETENSORS_MEDIA_TYPE in msg
            assert gate.batches == []  # no model time spent on it
            msg = envelope(
                await c.post("/v1/prototypes", files=parts("image", [jpeg()])), 413, "payload_too_large"
            )
            assert "at least 2080 bytes" in msg  # 16 patches x (id + 64 probabilities)
            ok = await c.post("/v1/embed?outputs=cls", files=parts("image", [jpeg()]))
            assert ok.status_code == 200 and gate.batches == [1]

    run(body())


def test_413_for_an_option_part_over_max_field_bytes(tiny_bundle: Path) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_field_bytes=1024)) as (_, c):
            files = parts("image", [jpeg()])
            ok = await c.post("/v1/embed", files=files, data={"outputs": "cls"})
            assert ok.status_code == 200 and set(ok.json()) == {"cls", "__metadata__"}
            msg = envelope(
                await c.post("/v1/embed", files=files, data={"outputs": "c" * 2000}), 413, "payload_too_large"
            )
            assert "maximum size" in msg

    run(body())


def test_dense_cap_and_json_cap(tiny_bundle: Path) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_dense_elements=16 * 16, max_json_bytes=4096)) as (
            _,
            c,
        ):
            one = parts("source", [jpeg()]) + parts("target", [jpeg(seed=2)])
            r = await c.post(
                "/v1/correspond?dense=true", files=one, headers={"accept": SAFETENSORS_MEDIA_TYPE}
            )
            assert r.status_code == 200  # 1 pair x 16 x 16 = the cap
            msg = envelope(
                await c.post("/v1/correspond?dense=true", files=one * 2), 422, "invalid_parameters"
            )
            assert "max_dense_elements" in msg
            msg = envelope(
                await c.post("/v1/embed", files=parts("image", [jpeg()])), 413, "payload_too_large"
            )
            assert SAFETENSORS_MEDIA_TYPE in msg
            r = await c.post(
                "/v1/embed", files=parts("image", [jpeg()]), headers={"accept": SAFETENSORS_MEDIA_TYPE}
            )
            assert r.status_code == 200

    run(body())


def test_401_api_key(tiny_bundle: Path) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, api_key="s3cret")) as (_, c):
            envelope(await c.post("/v1/embed", files=parts("image", [jpeg()])), 401, "unauthorized")
            r = await c.get("/v1/models", headers={"authorization": "Bearer wrong"})
            assert "invalid" in envelope(r, 401, "unauthorized") and r.headers["www-authenticate"] == "Bearer"
            envelope(await c.get("/metrics"), 401, "unauthorized")
            envelope(
                await c.get("/v1/models", headers={"authorization": "Basic s3cret"}), 401, "unauthorized"
            )
            spec = await c.get("/openapi.json")  # the description is public: /docs loads in a browser
            assert spec.status_code == 200 and spec.json()["security"] == [{"bearer": []}]
            assert spec.json()["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
            assert (await c.get("/docs")).status_code == 200
            assert (await c.get("/health/ready")).status_code == 200
            assert (await c.get("/health/live")).status_code == 200
            assert (await c.head("/health/live")).status_code == 200  # probes that send HEAD
            assert (await c.head("/health/ready")).status_code == 200
            ok = await c.post(
                "/v1/embed", files=parts("image", [jpeg()]), headers={"authorization": "Bearer s3cret"}
            )
            assert ok.status_code == 200
            scrape = await c.get("/metrics", headers={"authorization": "Bearer s3cret"})
            assert scrape.status_code == 200
            # refused before routing, still counted under its route; only answered work times "total"
            text = scrape.text
            assert metric(text, "cotap_requests_total", route="/v1/embed", status="401") == 1
            assert metric(text, "cotap_requests_total", route="unmatched", status="401") == 0
            assert metric(text, "cotap_stage_seconds_count", stage="total") == 1

    run(body())


def test_503_while_loading_then_ready(tiny_bundle: Path) -> None:
    loading = threading.Event()

    def slow(backend: Backend) -> Backend:
        assert loading.wait(20)
        return backend

    async def body() -> None:
        async with running(settings_for(tiny_bundle), hook=slow, wait=False) as (app, c):
            r = await c.get("/health/ready")
            assert r.status_code == 503 and r.json()["status"] == "starting"
            assert (await c.get("/health/live")).status_code == 200
            assert "loading" in envelope(
                await c.post("/v1/embed", files=parts("image", [jpeg()])), 503, "not_ready"
            )
            envelope(await c.get("/v1/models"), 503, "not_ready")
            loading.set()
            assert await app.state.cotap.wait_loaded(20)
            assert (await c.get("/health/ready")).status_code == 200

    try:
        run(body())
    finally:
        loading.set()


def test_503_when_loading_fails(tmp_path: Path) -> None:
    async def body() -> None:
        async with running(settings_for(tmp_path / "missing"), wait=False) as (app, c):
            assert not await app.state.cotap.wait_loaded(20)
            r = await c.get("/health/ready")
            assert (
                r.status_code == 503 and r.json()["status"] == "failed" and "not found" in r.json()["error"]
            )
            assert "failed to load" in envelope(
                await c.post("/v1/embed", files=parts("image", [jpeg()])), 503, "not_ready"
            )

    run(body())


def test_bad_image_does_not_fail_a_good_one_in_flight(tiny_bundle: Path, gate: Gate) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_queue_delay_ms=200), hook=gate.wrap) as (_, c):
            good = [c.post("/v1/embed", files=parts("image", [jpeg(seed=i)])) for i in range(3)]
            bad = c.post("/v1/embed", files=parts("image", [b"garbage"]))
            results = await asyncio.gather(*good, bad)
            assert [r.status_code for r in results] == [200, 200, 200, 400]

    run(body())


def test_500_backend_error_fails_only_its_batch(tiny_bundle: Path, gate: Gate) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_batch=2), hook=gate.wrap) as (app, c):
            gate.batches.clear()
            gate.fail_next = 1
            gate.hold()
            first = asyncio.ensure_future(
                c.post("/v1/embed", files=parts("image", [jpeg(seed=1), jpeg(seed=2)]))
            )
            await gate.wait_entered()  # batch 1 (this request's two images) is in forward and will raise
            second = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg(seed=3)])))
            while app.state.cotap.scheduler.depth < 1:
                await asyncio.sleep(0.01)
            gate.release()
            r1, r2 = await asyncio.gather(first, second)
            assert "injected backend failure" in envelope(r1, 500, "internal")
            assert r2.status_code == 200
            assert gate.batches == [2, 1]
            r3 = await c.post("/v1/embed", files=parts("image", [jpeg()]))
            assert r3.status_code == 200

    run(body())


def test_a_failed_batch_of_several_requests_fails_only_the_culprit(tiny_bundle: Path, gate: Gate) -> None:
    # the backend cannot run one request's input (think: out of memory for its size): batched with
    # others, the batch fails; each request is then run alone and only that one gets the 500
    black = encode(np.zeros((40, 48, 3), np.uint8), "PNG")

    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_batch=2), hook=gate.wrap) as (app, c):
            gate.fail_if = lambda images: bool((images.std(axis=(2, 3)).max(1) < 1e-6).any())  # a flat image
            gate.batches.clear()
            gate.hold()
            first = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg(seed=1)])))
            await gate.wait_entered()  # the worker is busy: the next two requests queue together
            bad = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [black])))
            good = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg(seed=2)])))
            while app.state.cotap.scheduler.depth < 2:
                await asyncio.sleep(0.01)
            gate.release()
            r1, r_bad, r_good = await asyncio.gather(first, bad, good)
            assert r1.status_code == 200 and r_good.status_code == 200
            assert "for these inputs" in envelope(r_bad, 500, "internal")
            assert gate.batches == [1, 2, 1, 1]  # the batch of two failed, then each alone
            alone = await c.post("/v1/embed", files=parts("image", [jpeg(seed=2)]))
            assert np.array_equal(np.array(r_good.json()["patch"]), np.array(alone.json()["patch"]))

    run(body())


def test_a_failed_batch_frees_its_memory_before_the_reruns(tiny_bundle: Path, gate: Gate) -> None:
    # out of memory in a batch: the reruns must not run while the failed forward's tensors are
    # still held by its traceback
    import weakref

    class Activations:  # stands for what the failed forward allocated
        pass

    held: list[weakref.ref[Activations]] = []
    alive_at_rerun: list[bool] = []

    async def body() -> None:
        async with running(settings_for(tiny_bundle, max_batch=2), hook=gate.wrap) as (app, c):
            assert gate.backend is not None
            real = gate.backend.forward

            def forward(images: np.ndarray) -> Any:
                if images.shape[0] > 1:
                    activations = Activations()
                    held.append(weakref.ref(activations))
                    raise MemoryError(f"out of memory ({activations!r} allocated)")
                alive_at_rerun.append(bool(held) and held[0]() is not None)
                return real(images)

            gate.backend.forward = forward  # type: ignore[method-assign]
            gate.hold()
            first = asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg(seed=1)])))
            await gate.wait_entered()
            more = [
                asyncio.ensure_future(c.post("/v1/embed", files=parts("image", [jpeg(seed=s)])))
                for s in (2, 3)
            ]
            while app.state.cotap.scheduler.depth < 2:
                await asyncio.sleep(0.01)
            gate.release()
            assert [r.status_code for r in await asyncio.gather(first, *more)] == [200, 200, 200]

    run(body())
    assert len(held) == 1 and alive_at_rerun == [False, False, False]  # the first request, then two reruns


def test_cors_preflight_and_headers_on_errors(tiny_bundle: Path) -> None:
    origin = "https://app.example"

    async def body() -> None:
        async with running(settings_for(tiny_bundle, cors_origins=[origin], api_key="k")) as (_, c):
            pre = await c.options(
                "/v1/embed",
                headers={
                    "origin": origin,
                    "access-control-request-method": "POST",
                    "access-control-request-headers": "authorization",
                },
            )
            assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin
            denied = await c.post("/v1/embed", files=parts("image", [jpeg()]), headers={"origin": origin})
            envelope(denied, 401, "unauthorized")
            assert denied.headers["access-control-allow-origin"] == origin  # the page can read the error
            ok = await c.post(
                "/v1/embed",
                files=parts("image", [jpeg()]),
                headers={"origin": origin, "authorization": "Bearer k"},
            )
            assert ok.status_code == 200
            exposed = ok.headers["access-control-expose-headers"].lower()
            assert "x-inference-time-ms" in exposed and "retry-after" in exposed  # for 429/503 in pages
            other = await c.post(
                "/v1/embed", files=parts("image", [jpeg()]), headers={"origin": "https://evil.example"}
            )
            assert "access-control-allow-origin" not in other.headers
            refused = await c.options(
                "/v1/embed",
                headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
            )
            msg = envelope(refused, 400, "invalid_parameters")
            assert "CORS preflight refused" in msg and "origin" in msg.lower()

    run(body())
