"""Client and AsyncClient against a real server on loopback: results equal the server's raw answers
(decoded here by hand, without the SDK or the safetensors library), every input kind works, and
the error envelope becomes typed exceptions."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from cotap.client import (
    AsyncClient,
    BadImage,
    Client,
    Correspondence,
    CorrespondenceBatch,
    EmbedBatch,
    Embedding,
    Health,
    InvalidParameters,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    Prototypes,
    Timeout,
    Unauthorized,
    Unreachable,
)
from cotap.client.retry import RetryPolicy
from tests.clients.live import live_server
from tests.server.helpers import jpeg, photo

DTYPES = {"F16": "<f2", "F32": "<f4", "I32": "<i4", "I64": "<i8", "BOOL": "|b1"}


def raw(
    url: str, route: str, files: list[tuple[str, Any]], **params: Any
) -> tuple[dict[str, np.ndarray], dict]:
    """POST with plain httpx and decode the safetensors body by hand."""
    r = httpx.post(
        f"{url}{route}",
        files=files,
        params=params,
        headers={"Accept": "application/x-safetensors"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.content
    n = struct.unpack("<Q", body[:8])[0]
    header = json.loads(body[8 : 8 + n])
    meta = header.pop("__metadata__")
    out = {}
    for name, t in header.items():
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(body[8 + n + start : 8 + n + end], dtype=DTYPES[t["dtype"]]).reshape(
            t["shape"]
        )
    return out, meta


def images(n: int, h: int = 40, w: int = 48) -> list[bytes]:
    return [jpeg(h, w, seed=i) for i in range(n)]


def test_embed_equals_the_raw_answer(server_url: str) -> None:
    imgs = images(3)
    expected, meta = raw(server_url, "/v1/embed", [("image", ("x.jpg", b, "image/jpeg")) for b in imgs])
    with Client(server_url) as client:
        batch = client.embed(imgs)
        one = client.embed(imgs[1])
    assert isinstance(batch, EmbedBatch) and isinstance(one, Embedding)
    assert batch.patch.dtype == np.float16 and batch.patch.shape == expected["patch"].shape
    assert np.array_equal(batch.patch, expected["patch"])
    assert np.array_equal(batch.cls, expected["cls"])
    assert np.array_equal(one.patch, expected["patch"][1])
    assert batch.model == meta["model"] == "tiny"
    assert batch.bundle_sha256 == meta["bundle_sha256"]
    assert one.grid == (4, 4) and one.original_size == (40, 48) and one.input_size == (32, 32)
    assert one.request_id


def test_prototypes_and_correspondence_equal_the_raw_answers(server_url: str) -> None:
    a, b = jpeg(seed=5), jpeg(seed=6)
    expected, _ = raw(server_url, "/v1/prototypes", [("image", ("a.jpg", a, "image/jpeg"))], top_k=3)
    corr_expected, corr_meta = raw(
        server_url,
        "/v1/correspond",
        [("source", ("a.jpg", a, "image/jpeg")), ("target", ("b.jpg", b, "image/jpeg"))],
        top_k=2,
        dense="true",
    )
    with Client(server_url) as client:
        p = client.prototypes(a, top_k=3)
        full = client.prototypes(a, dtype="float32")  # float16 ties near 1/64 would blur argmax
        c = client.correspond(a, b, top_k=2, dense=True)
    assert isinstance(p, Prototypes)
    assert np.array_equal(p.ids, expected["prototype_id"][0])
    assert np.array_equal(p.probs, expected["prototype_prob"][0])
    assert np.array_equal(p.topk_ids, expected["prototype_topk_id"][0])
    assert full.probs is not None and full.probs.shape == (4, 4, 64) and full.topk_ids is None
    assert np.array_equal(full.probs.argmax(-1), p.ids)
    assert isinstance(c, Correspondence)
    for name, got in [
        ("match", c.match),
        ("score", c.score),
        ("mutual", c.mutual),
        ("match_topk", c.match_topk),
        ("score_topk", c.score_topk),
        ("similarity", c.similarity),
    ]:
        assert np.array_equal(got, corr_expected[name][0]), name
    assert c.source_grid == tuple(json.loads(corr_meta["source_grid"]))
    # the matches are what the dense similarity says
    sim = c.similarity.astype(np.float32)
    assert np.array_equal(c.match.ravel(), sim.argmax(1))


def test_every_input_kind_gives_the_same_features(server_url: str, tmp_path: Path) -> None:
    pixels = photo(40, 48, seed=9)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    (tmp_path / "x.png").write_bytes(png.getvalue())
    with Client(server_url, image_format="PNG") as client:
        results = [
            client.embed(x, outputs=["cls"], dtype="float32")
            for x in (
                pixels,
                Image.fromarray(pixels),
                png.getvalue(),
                tmp_path / "x.png",
                str(tmp_path / "x.png"),
            )
        ]
        stacked = client.embed(np.stack([pixels, pixels]), outputs=["cls"], dtype="float32")
    for r in results[1:]:
        assert r.patch is None and r.cls is not None and r.cls.dtype == np.float32
        assert np.array_equal(r.cls, results[0].cls)
    assert np.allclose(stacked.cls[1], results[0].cls, atol=1e-5)  # batch of 2: other float rounding


def test_options_reach_the_server(server_url: str) -> None:
    img = jpeg(seed=3)
    with Client(server_url) as client:
        plain = client.embed(img, dtype="float32")
        normed = client.embed(img, normalize=True, dtype="float32")
        other = client.embed(img, model="varied")
    assert normed.normalized and not plain.normalized
    assert np.allclose(np.linalg.norm(normed.patch, axis=-1), 1, atol=1e-4)
    ref = plain.patch / np.linalg.norm(plain.patch, axis=-1, keepdims=True)
    assert np.allclose(normed.patch, ref, atol=1e-5)
    assert other.model == "varied" and other.bundle_sha256 != plain.bundle_sha256


def test_items_with_different_grids(server_url: str) -> None:
    """Shorter-side resize: differently shaped images come back as per-item tensors."""
    imgs = [jpeg(40, 40, 1), jpeg(40, 80, 2), jpeg(40, 40, 3)]
    expected, _ = raw(
        server_url, "/v1/embed", [("image", ("x.jpg", b, "image/jpeg")) for b in imgs], model="varied"
    )
    assert "patch.1" in expected  # the server did not stack them
    with Client(server_url, model="varied") as client:
        batch = client.embed(imgs)
        corr = client.correspond(imgs[:2], imgs[1:])
    assert [e.grid for e in batch] == [(4, 4), (4, 8), (4, 4)]
    for i, e in enumerate(batch):
        assert np.array_equal(e.patch, expected[f"patch.{i}"])
    with pytest.raises(ValueError, match="different shapes"):
        _ = batch.patch
    assert isinstance(corr, CorrespondenceBatch) and [c.target_grid for c in corr] == [(4, 8), (4, 4)]
    assert corr[0].match.max() < 32 and corr[1].source_grid == (4, 8)


def test_errors_are_typed(server_url: str) -> None:
    good = jpeg()
    truncated = good[: len(good) // 3]
    with Client(server_url) as client:
        with pytest.raises(BadImage) as e:
            client.embed([good, good, truncated, good])
        assert e.value.item == 2 and e.value.status == 400 and e.value.request_id
        with pytest.raises(ModelNotFound):
            client.embed(good, model="nope")
        with pytest.raises(InvalidParameters, match="top_k"):
            client.prototypes(good, top_k=65)
        with pytest.raises(BadImage):  # refused before sending: not an image at all
            client.embed(b"hello")
        with pytest.raises(ValueError, match="equal length"):
            client.correspond([good, good], [good])


def test_unreachable_server_fails_after_retries() -> None:
    with Client("http://127.0.0.1:9", retry=RetryPolicy(max_attempts=3, base_s=0.01)) as client:
        with pytest.raises(Unreachable):
            client.models()
        assert client.stats.retries == 2
        h = client.health()
    assert not h.live and h.status == "unreachable"


def test_wait_until_ready_waits_for_a_server_that_starts_late(tiny_bundle: Path) -> None:
    """The first calls are refused (nothing listens yet): it asks again until the server is ready."""
    with live_server(tiny_bundle, start_after_s=1.0) as url, Client(url) as client:
        assert client.health().status == "unreachable"
        t0 = time.monotonic()
        health = client.wait_until_ready(timeout=30, interval=0.1)
        assert health.ready and health.models == ["tiny"] and time.monotonic() - t0 > 0.3
        assert client.embed(np.zeros((40, 48, 3), np.uint8)).grid == (4, 4)


def test_a_timeout_names_the_request_and_the_limit() -> None:
    """A server that accepts and never answers: `Timeout` at the client's limit, not retried, and
    its message says which request waited how long."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with Client(url, timeout=0.5) as client:
            t0 = time.monotonic()
            with pytest.raises(Timeout, match=r"to GET /v1/models within 0.5 s \(ReadTimeout\)") as raised:
                client.embed(np.zeros((40, 48, 3), np.uint8))
            assert time.monotonic() - t0 < 2 and client.stats.retries == 0
    assert raised.value.code == "timeout" and raised.value.status is None


def test_wait_until_ready_gives_up_after_its_timeout() -> None:
    with Client("http://127.0.0.1:9") as client:
        t0 = time.monotonic()
        with pytest.raises(Unreachable, match="could not be reached within 0.6 s"):
            client.wait_until_ready(timeout=0.6, interval=0.2)
        assert time.monotonic() - t0 < 3


def test_async_wait_until_ready(server_url: str) -> None:
    async def main() -> Health:
        async with AsyncClient(server_url) as client:
            return await client.wait_until_ready(timeout=5)

    assert asyncio.run(main()).ready


def test_models_and_health(server_url: str) -> None:
    with Client(server_url) as client:
        info = client.models()
        health = client.health()
    assert info.default == "tiny" and [m.name for m in info.models] == ["tiny", "varied"]
    tiny = info.model()
    assert tiny is not None and tiny.patch_size == 8 and tiny.embed_dim == 64 and tiny.grid(40, 48) == (4, 4)
    assert info.limits.max_images_per_request == 64
    assert health.live and health.ready and health.status == "ready"


def test_api_key(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with live_server(tiny_bundle, api_key="s3cret") as url:
        with Client(url) as client, pytest.raises(Unauthorized) as e:
            client.embed(jpeg())
        assert e.value.status == 401
        with Client(url, api_key="s3cret") as client:
            assert client.embed(jpeg()).patch is not None
        monkeypatch.setenv("COTAP_API_KEY", "s3cret")
        monkeypatch.setenv("COTAP_URL", url)
        with Client() as client:  # both from the environment
            assert client.url == url
            assert client.models().default == "tiny"


def test_oversized_image_is_refused_before_sending(tiny_bundle: Path) -> None:
    with live_server(tiny_bundle, max_body_bytes=4096) as url, Client(url) as client:
        big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # ~12 KB as PNG
        with pytest.raises(PayloadTooLarge, match="bytes per request") as e:
            client.embed([jpeg(), big])
        assert e.value.item == 1 and client.stats.requests == 1  # only GET /v1/models went out


def test_async_client_equals_sync(server_url: str) -> None:
    imgs = images(5)

    async def main() -> tuple[Any, Any, Any]:
        async with AsyncClient(server_url, images_per_request=2) as client:
            return await asyncio.gather(
                client.embed(imgs), client.prototypes(imgs[0]), client.correspond(imgs[0], imgs[1])
            )

    batch, protos, corr = asyncio.run(main())
    with Client(server_url) as client:
        ref = client.embed(imgs)
        ref_p = client.prototypes(imgs[0])
        ref_c = client.correspond(imgs[0], imgs[1])
    assert np.array_equal(batch.patch, ref.patch) and np.array_equal(batch.cls, ref.cls)
    assert np.array_equal(protos.ids, ref_p.ids)
    assert np.array_equal(corr.match, ref_c.match)


# -- review fixes ---------------------------------------------------------------------------------
def _with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_a_pil_image_is_embedded_upright_like_its_file(server_url: str, tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_with_orientation(photo(40, 56, seed=4), 6))  # displayed rotated 90 clockwise
    stored = np.asarray(Image.open(path))  # the JPEG's pixels as stored (sideways)
    with Client(server_url) as client:
        from_file = client.embed(path, dtype="float32")
        from_pil = client.embed(Image.open(path), dtype="float32")
        upright = client.embed(np.ascontiguousarray(np.rot90(stored, k=-1)), dtype="float32")
        sideways = client.embed(stored, dtype="float32")
    assert from_file.original_size == from_pil.original_size == (56, 40)
    assert np.array_equal(from_pil.patch, from_file.patch)  # the server's own EXIF handling
    assert np.array_equal(from_pil.patch, upright.patch)  # the plain reference: rotated by hand
    assert not np.allclose(from_pil.patch, sideways.patch, atol=1e-2)


def test_transparency_is_white_whatever_the_encoding(server_url: str, tmp_path: Path) -> None:
    rgba = np.dstack([photo(40, 48, seed=2), np.full((40, 48), 255, np.uint8)])
    rgba[:, :20, 3] = 0  # fully transparent on the left: white, as the server makes it for files
    composited = rgba[..., :3].copy()
    composited[:, :20] = 255  # the plain reference
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    with Client(server_url, image_format="jpeg") as jpeg_client, Client(server_url) as png_client:
        as_jpeg = jpeg_client.embed(rgba, dtype="float32")
        reference_jpeg = jpeg_client.embed(composited, dtype="float32")
        as_png = png_client.embed(Image.open(tmp_path / "x.png"), dtype="float32")
        the_file = png_client.embed(tmp_path / "x.png", dtype="float32")
    assert np.array_equal(as_jpeg.patch, reference_jpeg.patch)
    assert np.array_equal(as_png.patch, the_file.patch)


def test_errors_of_split_calls_name_the_callers_index(server_url: str) -> None:
    good = jpeg()
    truncated = good[: len(good) // 3]
    with Client(server_url, images_per_request=2) as client:
        with pytest.raises(BadImage) as e:
            client.embed([good] * 5 + [truncated, good])
        assert e.value.item == 5 and e.value.message.startswith("image 5: ")
        with pytest.raises(BadImage) as e:
            client.correspond([good] * 3, [good, good, truncated])  # one pair per request
        assert e.value.item == 2 and e.value.message.startswith("pair 2 target: ")
        sent = client.stats.requests
        with pytest.raises(BadImage) as e:  # caught before sending: same place, no object repr
            client.embed([good, good, b"hello"])
        assert e.value.item == 2 and e.value.message.startswith("image 2: not a readable image")
        assert "object at 0x" not in str(e.value) and client.stats.requests == sent
    with Client(server_url) as client, pytest.raises(BadImage) as e:
        client.correspond([good, b"nope"], [good, good])
    assert e.value.item == 1 and e.value.message.startswith("pair 1 source: ")


@pytest.mark.parametrize("path", ["/api", "/v1"])
def test_a_wrong_base_url_is_not_an_empty_server(server_url: str, path: str) -> None:
    url = server_url + path
    with Client(url) as client:
        with pytest.raises(NotFound, match="does not look like a cotap server") as e:
            client.models()
        assert f"{url}/v1/models answered 404" in e.value.message and e.value.status == 404
        with pytest.raises(NotFound, match="does not look like a cotap server"):
            client.embed(jpeg())

    async def main() -> None:
        async with AsyncClient(url) as client:
            await client.embed(jpeg())

    with pytest.raises(NotFound, match="does not look like a cotap server"):
        asyncio.run(main())


def test_option_types_reach_the_server(server_url: str) -> None:
    img = jpeg(seed=8)
    with Client(server_url) as client:
        loose = client.embed(img, outputs="cls", dtype=np.float32)
        strict = client.embed(img, outputs=("cls",), dtype="float32")
        half = client.embed(img, dtype=np.dtype("float16"))
        with pytest.raises(InvalidParameters, match="dtype"):
            client.embed(img, dtype=np.float64)
    assert loose.patch is None and strict.patch is None
    assert loose.cls is not None and loose.cls.dtype == np.float32
    assert np.array_equal(loose.cls, strict.cls)
    assert half.patch is not None and half.patch.dtype == np.float16


def test_progress_bar_for_long_calls(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    imgs = images(5)
    with Client(server_url, images_per_request=2) as client:
        quiet = client.embed(imgs)
        assert capsys.readouterr().err == ""
        shown = client.embed(imgs, progress=True)
        assert "5/5" in capsys.readouterr().err
        client.correspond(imgs[:3], imgs[2:], progress=True)
        assert "3/3" in capsys.readouterr().err

    async def main() -> Any:
        async with AsyncClient(server_url, images_per_request=2) as client:
            return await client.prototypes(imgs, progress=True)

    assert len(asyncio.run(main())) == 5 and "5/5" in capsys.readouterr().err
    assert np.array_equal(quiet.patch, shown.patch)


def test_a_jpeg_file_and_its_decoded_pixels_differ_slightly(server_url: str, tmp_path: Path) -> None:
    """docs/client.md: the server decodes a large JPEG in draft mode (DCT-domain downscaling), so a
    JPEG sent as a file and the same JPEG decoded here into an array give close, not equal,
    features; lossless files give equal ones."""
    big = photo(256, 256, seed=3)
    Image.fromarray(big).save(tmp_path / "x.jpg", quality=95)
    Image.fromarray(big).save(tmp_path / "x.png")
    with Client(server_url) as client:
        jpeg_file = client.embed(tmp_path / "x.jpg", dtype="float32").patch
        jpeg_pixels = client.embed(np.asarray(Image.open(tmp_path / "x.jpg")), dtype="float32").patch
        png_file = client.embed(tmp_path / "x.png", dtype="float32").patch
        png_pixels = client.embed(big, dtype="float32").patch
    assert np.array_equal(png_file, png_pixels)
    assert not np.array_equal(jpeg_file, jpeg_pixels)
    cos = (jpeg_file * jpeg_pixels).sum(-1) / (
        np.linalg.norm(jpeg_file, axis=-1) * np.linalg.norm(jpeg_pixels, axis=-1)
    )
    assert cos.mean() > 0.9
