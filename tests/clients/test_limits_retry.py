"""Splitting by the limits `/v1/models` reports, and riding out 429s: real servers with small
limits, counted from the server's own metrics."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cotap.client import AsyncClient, Client, QueueFull
from cotap.client.retry import RetryPolicy
from tests.clients.live import live_server, metric, slow
from tests.server.helpers import Gate, jpeg, photo

FAST_RETRY = RetryPolicy(max_attempts=60, base_s=0.02, cap_s=0.3, max_wait_s=60)


def test_chunks_follow_the_reported_image_limit(tiny_bundle: Path) -> None:
    imgs = [jpeg(seed=i) for i in range(10)]
    with live_server(tiny_bundle, max_images_per_request=3) as url, Client(url) as client:
        assert client.models().limits.max_images_per_request == 3
        batch = client.embed(imgs)
        assert metric(url, "cotap_requests_total", route="/v1/embed", status="200") == 4  # 3+3+3+1
        assert metric(url, "cotap_errors_total") == 0
        singles = [client.embed(x) for x in imgs[:3]]
        corr = client.correspond(imgs[:4], imgs[4:8])  # a pair counts two: 1 pair per request
        assert metric(url, "cotap_requests_total", route="/v1/correspond", status="200") == 4
        assert metric(url, "cotap_errors_total") == 0
    assert len(batch) == 10 and len(corr) == 4
    for s, b in zip(singles, batch, strict=False):
        assert np.allclose(s.patch.astype(np.float32), b.patch.astype(np.float32), atol=2e-2)


def test_chunks_follow_the_body_and_dense_limits(tiny_bundle: Path) -> None:
    rng = np.random.default_rng(0)
    noisy = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(8)]  # ~7 KB as PNG
    with (
        live_server(tiny_bundle, max_body_bytes=20_000, max_dense_elements=600) as url,
        Client(url) as client,
    ):
        batch = client.embed(noisy)
        embeds = metric(url, "cotap_requests_total", route="/v1/embed", status="200")
        pairs = [jpeg(seed=i) for i in range(5)]
        corr = client.correspond(pairs, pairs[::-1], dense=True)  # 16 x 16 = 256 values a pair
        dense = metric(url, "cotap_requests_total", route="/v1/correspond", status="200")
        assert metric(url, "cotap_errors_total") == 0
    assert len(batch) == 8 and 3 <= embeds <= 8
    assert dense == 3  # 2 + 2 + 1 pairs under 600 values
    assert all(c.similarity is not None and c.similarity.shape == (16, 16) for c in corr)


def test_a_429_storm_is_ridden_out(tiny_bundle: Path) -> None:
    imgs = [photo(40, 48, seed=i) for i in range(6)]
    with live_server(
        tiny_bundle, hook=slow(0.03), max_queue=4, max_batch=4, retry_after_s=0, max_queue_delay_ms=1.0
    ) as url:
        with Client(url, retry=FAST_RETRY) as ref_client:  # may meet a 429 itself (4 + 2 images)
            reference = ref_client.embed(imgs, dtype="float32").patch
            ref_retries = ref_client.stats.retries
        clients = [Client(url, retry=FAST_RETRY, images_per_request=2, max_in_flight=3) for _ in range(4)]
        results: dict[int, np.ndarray] = {}
        failures: list[BaseException] = []

        def work(k: int) -> None:
            try:
                results[k] = clients[k % 4].embed(imgs, dtype="float32").patch
            except BaseException as e:
                failures.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        refused = metric(url, "cotap_errors_total", code="queue_full")
        retries = ref_retries + sum(c.stats.retries for c in clients)
        for c in clients:
            c.close()
    assert not failures, failures
    assert sorted(results) == list(range(8))
    for patch in results.values():
        assert np.allclose(patch, reference, atol=1e-4)
    assert refused > 0, "the storm never filled the queue"
    assert retries == refused  # every 429 was retried, none given up
    print(f"429 storm: {int(refused)} refusals, all retried; 8 x 6 images delivered")


def test_retry_after_is_honoured(tiny_bundle: Path, gate: Gate) -> None:
    with live_server(tiny_bundle, hook=gate.wrap, max_queue=1, max_batch=1, retry_after_s=1) as url:
        blocked = [Client(url) for _ in range(2)]
        gate.hold()
        first = threading.Thread(target=blocked[0].embed, args=(jpeg(),))
        first.start()
        assert gate.entered.wait(10)  # one image in the model, held
        second = threading.Thread(target=blocked[1].embed, args=(jpeg(),))
        second.start()
        for _ in range(250):  # until the queue holds the second one
            if metric(url, "cotap_queue_depth") == 1:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the second request never reached the queue")
        threading.Timer(0.3, gate.release).start()
        with Client(url, retry=RetryPolicy(max_attempts=5, base_s=0.01, cap_s=0.01)) as client:
            client.models()
            t0 = time.monotonic()
            e = client.embed(jpeg(seed=1))
            waited = time.monotonic() - t0
            assert client.stats.retries >= 1
        with Client(url, retry=RetryPolicy(max_attempts=1)) as impatient:
            gate.hold()
            try:
                third = threading.Thread(target=blocked[0].embed, args=(jpeg(),))
                third.start()
                assert gate.entered.wait(10)
                fourth = threading.Thread(target=blocked[1].embed, args=(jpeg(),))
                fourth.start()
                for _ in range(250):
                    if metric(url, "cotap_queue_depth") == 1:
                        break
                    time.sleep(0.02)
                else:
                    raise AssertionError("the queued request never reached the queue")
                with pytest.raises(QueueFull) as refused:
                    impatient.embed(jpeg())
            finally:
                gate.release()
        for t in (first, second, third, fourth):
            t.join(10)
        for c in blocked:
            c.close()
    assert e.patch is not None
    assert waited >= 1.0, f"retried after {waited:.2f} s, before the server's Retry-After of 1 s"
    assert refused.value.status == 429


def test_a_split_call_never_holds_more_images_than_the_queue(tiny_bundle: Path) -> None:
    """max_queue 4: a call of 12 images goes out in requests of 4 (the queue cap), and with
    max_in_flight=4 still one at a time (3 x 4 in flight would be refused with 429 and retried)."""
    imgs = [jpeg(seed=i) for i in range(12)]
    with live_server(tiny_bundle, hook=slow(0.05), max_queue=4, max_batch=4, retry_after_s=0) as url:
        with Client(url, max_in_flight=4, retry=FAST_RETRY) as client:
            batch = client.embed(imgs, dtype="float32")
            assert client.stats.retries == 0
            reference = [client.embed(x, dtype="float32").patch for x in imgs[:3]]

        async def main() -> Any:
            async with AsyncClient(url, max_in_flight=4, retry=FAST_RETRY) as client:
                result = await client.embed(imgs, dtype="float32")
                assert client.stats.retries == 0
                return result

        async_batch = asyncio.run(main())
        assert metric(url, "cotap_errors_total", code="queue_full") == 0
        assert metric(url, "cotap_requests_total", route="/v1/embed", status="200") == 3 + 3 + 3
    assert len(batch) == 12 and np.array_equal(batch.patch, async_batch.patch)
    for got, want in zip(batch.patch[:3], reference, strict=True):
        assert np.allclose(got, want, atol=1e-4)
