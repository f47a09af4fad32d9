"""The SDK's pieces without a server: error mapping, backoff, chunk plans, input encoding, answer
decoding (stacked and per-item layouts) and match extraction, each against a plain reference."""

from __future__ import annotations

import dataclasses
import io
import json
import random
import struct
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.numpy import save as save_safetensors

from cotap.client import AsyncClient, Client, errors
from cotap.client.base import dtype_name, encode_all, output_names, pair_inputs
from cotap.client.chunking import PART_OVERHEAD, body_bytes, plan_chunks
from cotap.client.info import ServerInfo, ServerLimits
from cotap.client.inputs import as_list, encode_image, image_size, sniff, to_pil
from cotap.client.protocol import Decoded, correspondences, decode, embeddings, read_metadata
from cotap.client.results import (
    Correspondence,
    CorrespondenceBatch,
    EmbedBatch,
    Embedding,
    Prototypes,
    PrototypesBatch,
    patch_centers,
)
from cotap.client.retry import Attempts, RetryPolicy, retry_after_seconds


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "bad_image", errors.BadImage),
        (413, "payload_too_large", errors.PayloadTooLarge),
        (413, "image_too_large", errors.ImageTooLarge),
        (415, "unsupported_media_type", errors.UnsupportedMediaType),
        (422, "invalid_parameters", errors.InvalidParameters),
        (401, "unauthorized", errors.Unauthorized),
        (404, "model_not_found", errors.ModelNotFound),
        (404, "not_found", errors.NotFound),
        (429, "queue_full", errors.QueueFull),
        (503, "not_ready", errors.NotReady),
        (504, "deadline_exceeded", errors.DeadlineExceeded),
        (500, "internal", errors.ServerError),
    ],
)
def test_envelope_maps_to_typed_exception(status: int, code: str, cls: type[errors.CotapError]) -> None:
    body = json.dumps({"error": {"code": code, "message": "image 2: broken", "request_id": "r1"}}).encode()
    e = errors.error_from_response(status, body, {}, item_offset=10)
    assert type(e) is cls
    assert (e.code, e.status, e.request_id, e.item) == (code, status, "r1", 12)
    assert isinstance(e, errors.CotapError) and "r1" in str(e)
    assert e.message == "image 12: broken"  # the place in the caller's call, as `item` says


@pytest.mark.parametrize(
    ("message", "offset", "item", "expected"),
    [
        ("image 13: not a decodable image", 64, 77, "image 77: not a decodable image"),
        ("pair 1 target: image is 8x8", 30, 31, "pair 31 target: image is 8x8"),
        ("image 0: x", 0, 0, "image 0: x"),
        ("images too large", 5, None, "images too large"),  # no place named: untouched
    ],
)
def test_error_message_names_the_callers_index(
    message: str, offset: int, item: int | None, expected: str
) -> None:
    body = json.dumps({"error": {"code": "bad_image", "message": message}}).encode()
    e = errors.error_from_response(400, body, {}, item_offset=offset)
    assert (e.item, e.message) == (item, expected)


def test_non_envelope_answer_maps_by_status() -> None:
    e = errors.error_from_response(502, b"<html>bad gateway</html>", {"x-request-id": "abc"})
    assert type(e) is errors.ServerError and e.status == 502 and e.request_id == "abc"
    assert "bad gateway" in e.message
    assert type(errors.error_from_response(429, b"", {})) is errors.QueueFull


# -- retry -----------------------------------------------------------------------------------------
def test_backoff_is_full_jitter_under_the_cap() -> None:
    policy = RetryPolicy(base_s=0.1, cap_s=1.0)
    rng = random.Random(0)
    for retry in range(8):
        bound = min(1.0, 0.1 * 2**retry)
        waits = [policy.backoff(retry, rng) for _ in range(200)]
        assert all(0 <= w <= bound for w in waits)
        assert max(waits) > 0.8 * bound and min(waits) < 0.2 * bound  # spread over [0, bound]


def test_retry_after_is_a_floor_and_budget_ends() -> None:
    policy = RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.01)
    attempts = Attempts(policy, random.Random(1))
    w1 = attempts.next_wait(retry_after=2.0)
    assert w1 is not None and 2.0 <= w1 <= 2.01
    assert attempts.next_wait(None) is not None
    assert attempts.next_wait(None) is None  # 3 attempts = 2 retries
    short = Attempts(RetryPolicy(max_attempts=10, max_wait_s=1.0))
    assert short.next_wait(retry_after=5.0) is None  # would wait past max_wait_s


def test_retry_after_parsing() -> None:
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "soon"}) is None
    now = datetime(2030, 1, 1, tzinfo=UTC)
    date = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds({"retry-after": date}, now=now.timestamp()) == pytest.approx(30, abs=1)


# -- chunking --------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, derandomize=True, database=None)  # the same examples every run
@given(
    sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=60),
    per_request=st.integers(1, 12),
    body=st.integers(2000, 40000),
    parts=st.sampled_from([1, 2]),
    cap=st.one_of(st.none(), st.integers(1, 5)),
)
def test_chunks_cover_in_order_and_respect_limits(
    sizes: list[int], per_request: int, body: int, parts: int, cap: int | None
) -> None:
    limits = ServerLimits(max_body_bytes=body, max_images_per_request=per_request, max_queue=100)
    chunks = plan_chunks(sizes, limits, parts_per_item=parts, max_items=cap)
    assert [i for c in chunks for i in c] == list(range(len(sizes)))  # all, once, in order
    most = max(1, per_request // parts) if cap is None else max(1, min(cap, per_request // parts))
    for c in chunks:
        assert len(c) <= most
        chunk_sizes = [sizes[i] for i in c]
        fits = body_bytes(chunk_sizes) + PART_OVERHEAD * (parts - 1) * len(c) <= body
        assert fits or len(c) == 1  # only an item too big on its own may break the body limit


def test_chunks_respect_queue_and_weights() -> None:
    limits = ServerLimits(max_images_per_request=64, max_queue=5)
    assert [len(c) for c in plan_chunks([10] * 12, limits)] == [5, 5, 2]
    chunks = plan_chunks([10] * 6, ServerLimits(), weights=[4, 4, 4, 4, 9, 1], max_weight=10)
    assert [list(c) for c in chunks] == [[0, 1], [2, 3], [4, 5]]


# -- inputs ----------------------------------------------------------------------------------------
def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_inputs_encode_losslessly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    for given_image in (rgb, Image.fromarray(rgb), _png(rgb)):
        enc = encode_image(given_image)
        assert enc.media_type == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(enc.data))), rgb)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(gray).data))), gray)
    # BMP is not accepted by the server: converted to PNG, same pixels.
    Image.fromarray(rgb).save(tmp_path / "x.bmp")
    enc = encode_image(tmp_path / "x.bmp")
    assert sniff(enc.data) == "PNG"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(enc.data))), rgb)
    # JPEG files go untouched.
    Image.fromarray(rgb).save(tmp_path / "x.jpg")
    assert encode_image(str(tmp_path / "x.jpg")).data == (tmp_path / "x.jpg").read_bytes()
    assert image_size(enc) == (20, 30)


def test_inputs_refuse_clearly(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="uint8"):
        encode_image(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="transpose"):
        encode_image(np.zeros((3, 8, 8, 2), np.uint8)[0])
    with pytest.raises(errors.BadImage):
        encode_image(b"definitely not an image")
    with pytest.raises(FileNotFoundError):
        encode_image(tmp_path / "missing.jpg")
    with pytest.raises(TypeError):
        encode_image(12)  # type: ignore[arg-type]


def test_single_or_batch() -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    assert as_list(img)[1] is True
    assert as_list("a.jpg")[1] is True
    items, single = as_list(np.zeros((4, 8, 8, 3), np.uint8))
    assert not single and len(items) == 4
    assert as_list(["a.jpg", b"x"]) == (["a.jpg", b"x"], False)
    assert as_list(iter(["a.jpg"])) == (["a.jpg"], False)  # any iterable of images
    for unordered in ({"a.jpg": img}, {"a.jpg", "b.jpg"}):  # a dict's keys are not its images
        with pytest.raises(TypeError, match="pass a list"):
            as_list(unordered)  # type: ignore[arg-type]


# -- answers ---------------------------------------------------------------------------------------
def _answer(tensors: dict[str, np.ndarray], meta: dict[str, object]) -> Decoded:
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    body = save_safetensors(tensors, metadata=strings)
    return decode(body, {"content-type": "application/x-safetensors", "x-request-id": "rid"})


def test_metadata_is_read_from_the_header() -> None:
    body = save_safetensors({"x": np.zeros(2, np.float16)}, metadata={"model": "123", "grid": "[2,3]"})
    n = struct.unpack("<Q", body[:8])[0]
    assert json.loads(body[8 : 8 + n])["__metadata__"]["grid"] == "[2,3]"
    assert read_metadata(body) == {"model": "123", "grid": [2, 3]}  # model names stay strings


def test_stacked_and_per_item_layouts_give_the_same_items() -> None:
    rng = np.random.default_rng(1)
    patch = rng.normal(size=(2, 3, 4, 5)).astype(np.float16)
    cls = rng.normal(size=(2, 5)).astype(np.float16)
    common = {"items": 2, "model": "m", "bundle_sha256": "h", "original_sizes": [[30, 40], [31, 41]]}
    stacked = _answer(
        {"patch": patch, "cls": cls}, {**common, "grid": [3, 4], "input_sizes": [[24, 32], [24, 32]]}
    )
    split = _answer(
        {"patch.0": patch[0], "patch.1": patch[1], "cls": cls},
        {**common, "grids": [[3, 4], [3, 4]], "input_sizes": [[24, 32], [24, 32]]},
    )
    for dec in (stacked, split):
        items = embeddings(dec, 2)
        for i, e in enumerate(items):
            assert np.array_equal(e.patch, patch[i]) and np.array_equal(e.cls, cls[i])
            assert e.grid == (3, 4) and e.original_size == tuple(common["original_sizes"][i])  # type: ignore[index]
            assert (e.model, e.bundle_sha256, e.request_id) == ("m", "h", "rid")
        assert np.array_equal(EmbedBatch(items).patch, patch)
    with pytest.raises(errors.ServerError, match="sent 3"):
        embeddings(stacked, 3)


def test_wrong_content_type_is_a_server_error() -> None:
    with pytest.raises(errors.ServerError, match="expected"):
        decode(b"{}", {"content-type": "application/json"})


def test_batch_refuses_to_stack_different_grids() -> None:
    a = Embedding(np.zeros((2, 2, 4)), None, (2, 2), (16, 16), (16, 16), "m", "h")
    b = Embedding(np.zeros((2, 3, 4)), None, (2, 3), (16, 24), (16, 24), "m", "h")
    with pytest.raises(ValueError, match="different shapes"):
        _ = EmbedBatch([a, b]).patch
    with pytest.raises(ValueError, match="not asked for"):
        _ = EmbedBatch([a]).cls
    assert EmbedBatch([a, b]).model == "m"
    with pytest.raises(ValueError, match="disagree on grid"):
        _ = EmbedBatch([a, b]).grid
    assert EmbedBatch([a, a]).grid == (2, 2)


def test_results_print_their_arrays_by_dtype_and_shape() -> None:
    e = Embedding(np.zeros((12, 12, 384), np.float16), None, (12, 12), (96, 96), (480, 640), "m", "h")
    assert repr(e) == (
        "Embedding(patch=float16[12, 12, 384], grid=(12, 12), input_size=(96, 96), "
        "original_size=(480, 640), model='m', bundle_sha256='h', normalized=False)"
    )
    assert repr(EmbedBatch([e, e])) == f"EmbedBatch(2 items: {e!r}, ...)"
    assert repr(EmbedBatch([])) == "EmbedBatch(0 items)"


def test_batches_stack_every_array_field_of_their_items() -> None:
    """Each result's array fields are reachable on its batch, stacked (N, ...)."""
    pairs = ((Embedding, EmbedBatch), (Prototypes, PrototypesBatch), (Correspondence, CorrespondenceBatch))
    for item_type, batch_type in pairs:
        arrays = [f.name for f in dataclasses.fields(item_type) if "ndarray" in str(f.type)]
        assert arrays, item_type
        for name in arrays:
            assert isinstance(getattr(batch_type, name, None), property), (batch_type, name)


def test_matches_equal_a_plain_loop() -> None:
    rng = np.random.default_rng(2)
    h, w, th, tw = 3, 4, 5, 2
    match = rng.integers(-1, th * tw, (h, w)).astype(np.int32)
    score = rng.random((h, w)).astype(np.float16)
    mutual = rng.random((h, w)) > 0.4
    c = Correspondence(match, score, mutual, (h, w), (th, tw), (30, 40), (50, 20), "m", "x")
    expected = []
    for i in range(h):
        for j in range(w):
            if match[i, j] >= 0 and mutual[i, j] and float(score[i, j]) >= 0.2:
                expected.append((float(score[i, j]), (i, j), divmod(int(match[i, j]), tw)))
    expected.sort(key=lambda t: -t[0])
    got = c.matches(mutual_only=True, min_score=0.2)
    assert len(got) == len(expected)
    assert [tuple(s) for s in got.source] == [e[1] for e in expected]
    assert [tuple(t) for t in got.target] == [e[2] for e in expected]
    assert np.allclose(got.score, [e[0] for e in expected])
    assert len(c.matches(mutual_only=False)) == int((match >= 0).sum())


def test_patch_centres() -> None:
    c = patch_centers((2, 4), (20, 80))
    assert c.shape == (2, 4, 2)
    assert tuple(c[0, 0]) == (5.0, 10.0) and tuple(c[1, 3]) == (15.0, 70.0)


def test_server_info_tolerates_unknown_and_missing_fields() -> None:
    info = ServerInfo.from_dict(
        {
            "default": "a",
            "models": [{"name": "a", "bundle_sha256": "h", "new_field": 1, "preprocess": {"bogus": 1}}],
            "limits": {"max_images_per_request": 3, "max_queue": 2, "something_new": 5},
        }
    )
    assert info.model().name == "a" and info.model("b") is None  # type: ignore[union-attr]
    assert info.limits.images_per_request == 2  # never more than the queue holds
    assert info.limits.raw["something_new"] == 5


def test_correspondence_items_carry_grids_and_sizes() -> None:
    dec = _answer(
        {
            "match": np.array([[[0, 3], [1, -1]]], np.int32),
            "score": np.ones((1, 2, 2), np.float16),
            "mutual": np.array([[[True, False], [True, False]]]),
        },
        {
            "pairs": 1,
            "model": "m",
            "bundle_sha256": "h",
            "source_grid": [2, 2],
            "target_grid": [2, 2],
            "original_sizes": [[[16, 16], [32, 24]]],
        },
    )
    (c,) = correspondences(dec, 1)
    assert c.source_grid == (2, 2) and c.target_size == (32, 24)
    assert [tuple(t) for t in c.matches().target] == [(0, 0), (0, 1)]


# -- review fixes: inputs as the server sees them ----------------------------------------------------
def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _smooth(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([255 * x / w, 255 * y / h, 128 + 100 * np.sin(x / 7) * np.cos(y / 5)], -1)
    return rgb.astype(np.uint8)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Plain reference: colour * alpha + white * (1 - alpha), in floats."""
    a = rgba[..., 3:].astype(np.float64) / 255
    return rgba[..., :3].astype(np.float64) * a + 255.0 * (1 - a)


def test_pil_images_are_sent_upright() -> None:
    """EXIF orientation 6 (display rotated 90 degrees clockwise): the pixels sent are the upright
    ones, as the server makes them for a file."""
    pixels = _smooth(24, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", exif=exif.tobytes())
    stored = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    upright = np.rot90(stored, k=-1)  # 6 = rotate 90 clockwise to display
    pil = Image.open(io.BytesIO(buf.getvalue()))
    assert pil.getexif().get(0x0112) == 6
    for fmt in ("PNG", "WEBP"):
        enc = encode_image(pil, fmt)  # type: ignore[arg-type]
        assert np.array_equal(_decoded(enc.data), upright), fmt
        assert image_size(enc) == (40, 24)
    assert np.array_equal(np.asarray(to_pil(pil)), upright)


def test_transparency_is_composited_over_white_for_every_format(tmp_path: Path) -> None:
    rgba = np.dstack([_smooth(32, 48), np.zeros((32, 48), np.uint8)])
    rgba[:, 24:, 3] = 255  # left half fully transparent, right half opaque
    rgba[:8, 24:, 3] = 128  # and a half-transparent band
    reference = _over_white(rgba)
    for fmt, tolerance in (("PNG", 0.5), ("WEBP", 0.5), ("JPEG", 6.0)):
        got = _decoded(encode_image(rgba, fmt).data).astype(np.float64)  # type: ignore[arg-type]
        assert np.abs(got - reference).mean() < tolerance / 3, fmt
        assert np.abs(got[:, :20] - 255).max() <= tolerance, fmt  # transparent: white, not the colour
    # a palette image with a transparent colour (a GIF, or a small PNG), in memory and as a file
    pal = Image.fromarray(_smooth(32, 48)).quantize(16)
    index = pal.getpixel((0, 0))
    pal.info["transparency"] = index
    want = _over_white(np.asarray(pal.convert("RGBA")))
    assert (np.asarray(pal.convert("RGBA"))[..., 3] == 0).any()
    pal.save(tmp_path / "x.gif", transparency=index)
    gif = Image.open(tmp_path / "x.gif")
    want_gif = _over_white(np.asarray(Image.open(tmp_path / "x.gif").convert("RGBA")))
    assert (np.asarray(gif.convert("RGBA"))[..., 3] == 0).any()
    for given_image, reference in ((pal, want), (gif, want_gif), (tmp_path / "x.gif", want_gif)):
        got = _decoded(encode_image(given_image).data).astype(np.float64)  # type: ignore[arg-type]
        assert np.abs(got - reference).max() <= 0.5, type(given_image).__name__


def test_unreadable_images_name_their_place_without_object_reprs(tmp_path: Path) -> None:
    good = _png(np.zeros((20, 20, 3), np.uint8))
    (tmp_path / "bad.jpg").write_bytes(b"no jpeg here")
    with pytest.raises(errors.BadImage) as e:
        encode_all([good, good, b"garbage bytes"], "PNG")
    assert e.value.item == 2
    assert e.value.message == "image 2: not a readable image (cannot identify image file)"
    with pytest.raises(errors.BadImage) as e:
        encode_all([tmp_path / "bad.jpg"], "PNG", "target")
    assert e.value.item == 0 and "object at 0x" not in str(e.value)
    assert e.value.message.startswith(f"pair 0 target: {tmp_path / 'bad.jpg'}: not a readable image")


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_image_format_is_checked_when_the_client_is_made(cls: type) -> None:
    assert cls("http://127.0.0.1:9", image_format="jpeg").image_format == "JPEG"
    assert cls("http://127.0.0.1:9", image_format="jpg").image_format == "JPEG"
    assert cls("http://127.0.0.1:9", image_format="WebP").image_format == "WEBP"
    with pytest.raises(ValueError, match="one of PNG, JPEG, WEBP") as e:
        cls("http://127.0.0.1:9", image_format="GIF")
    assert "'GIF'" in str(e.value)


def test_option_types_are_normalised() -> None:
    assert output_names("cls") == ["cls"]
    assert output_names("patch,cls") == ["patch", "cls"]
    assert output_names(("patch",)) == ["patch"]
    assert dtype_name(np.float32) == "float32"
    assert dtype_name(np.dtype("float16")) == "float16"
    assert dtype_name("float32") == "float32"
    assert dtype_name("bfloat17") == "bfloat17"  # unknown names: the server says what it takes
    assert dtype_name(None) is None
    with pytest.raises(
        ValueError, match=r"source is one image but target is a sequence of 1.*correspond\(\[a\], \[b\]\)"
    ):
        pair_inputs("a.jpg", ["b.png"])
    with pytest.raises(ValueError, match="target is one image but source is a sequence of 2"):
        pair_inputs(["a.jpg", "b.jpg"], "b.png")
    with pytest.raises(ValueError, match="got 2 sources and 1 targets"):
        pair_inputs(["a.jpg", "b.jpg"], ["c.jpg"])


def test_empty_calls_and_closed_clients_fail_clearly() -> None:
    client = Client("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="no images"):
        client.embed([])
    with pytest.raises(ValueError, match="no images"):
        client.prototypes(np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no pairs"):
        client.correspond([], [])
    assert client.stats.requests == 0  # refused before anything was sent
    client.close()
    for call in (lambda: client.embed(np.zeros((8, 8, 3), np.uint8)), client.models, client.health):
        with pytest.raises(RuntimeError, match="client is closed"):
            call()


def test_requests_in_flight_never_exceed_the_queue() -> None:
    limits = ServerLimits(max_queue=256)
    assert limits.requests_in_flight(4, 64) == 4
    assert limits.requests_in_flight(8, 64) == 4
    assert ServerLimits(max_queue=5).requests_in_flight(4, 5) == 1
    assert ServerLimits(max_queue=10).requests_in_flight(4, 3) == 3
    assert ServerLimits(max_queue=2).requests_in_flight(4, 8) == 1  # never 0
