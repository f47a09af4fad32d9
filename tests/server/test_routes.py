"""Every route against a real tiny bundle: outputs equal the model's own forward, binary and JSON
answers agree, prototypes are the argmax of `assign`, correspondences equal a NumPy reference."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_safetensors

from cotap.core.images import load_pixels
from cotap.core.preprocess import PreprocessConfig
from cotap.core.wire import REQUEST_ID_HEADER, SAFETENSORS_MEDIA_TYPE, TIMING_HEADERS
from cotap.training.checkpoints import load_model
from tests.server.helpers import encode, jpeg, make_tiny_bundle, metric, parts, run, running, settings_for

BINARY = {"accept": SAFETENSORS_MEDIA_TYPE}


def reference(bundle: Path, images: list[bytes]) -> dict[str, np.ndarray]:
    """The model's own forward on the same decoded pixels: patch (N,h,w,C), cls (N,C), assign (N,h,w,M)."""
    loaded = load_model(bundle)
    cfg = loaded.bundle.config.preprocess if loaded.bundle else PreprocessConfig()
    x = np.stack([load_pixels(b, cfg)[0] for b in images])
    with torch.inference_mode():
        out = loaded.model.forward_features(torch.from_numpy(x))
    return {k: v.numpy() for k, v in out.items()}


def as_arrays(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in doc.items() if k != "__metadata__"}


def test_health_models_docs_metrics(tiny_bundle: Path) -> None:
    async def body() -> None:
        async with running(settings_for(f"tiny={tiny_bundle}")) as (_, c):
            assert (await c.get("/health/live")).json() == {"status": "live"}
            ready = await c.get("/health/ready")
            assert ready.status_code == 200 and ready.json()["models"] == ["tiny"]
            models = (await c.get("/v1/models")).json()
            m = models["models"][0]
            assert models["default"] == "tiny"
            assert (m["name"], m["arch"], m["patch_size"], m["embed_dim"], m["num_prototypes"]) == (
                "tiny",
                "cotap_test",
                8,
                64,
                64,
            )
            assert m["input_sizes"] == [[32, 32]] and m["backend"] == "torch" and m["device"] == "cpu"
            assert len(m["bundle_sha256"]) == 64 and m["max_batch"] == 8
            assert (
                models["limits"]["max_images_per_request"] == 64
                and models["limits"]["max_body_bytes"] == 32 * 1024 * 1024
            )
            spec = (await c.get("/openapi.json")).json()
            for route in ("/v1/embed", "/v1/prototypes", "/v1/correspond"):
                params = {p["name"] for p in spec["paths"][route]["post"]["parameters"]}
                assert {"model", "dtype"} <= params
                assert "multipart/form-data" in spec["paths"][route]["post"]["requestBody"]["content"]
            assert "top_k" in {p["name"] for p in spec["paths"]["/v1/correspond"]["post"]["parameters"]}
            for route in ("/v1/models", "/health/live", "/health/ready", "/metrics"):
                assert route in spec["paths"]
            docs = await c.get("/docs")
            assert docs.status_code == 200 and "swagger" in docs.text.lower()
            await c.post("/v1/embed", files=parts("image", [jpeg()]))
            text = (await c.get("/metrics")).text
            assert metric(text, "cotap_requests_total", route="/v1/embed", status="200") == 1
            assert metric(text, "cotap_images_total", model="tiny", route="embed") == 1
            assert metric(text, "cotap_ready") == 1
            assert "cotap_stage_seconds_bucket" in text and "cotap_queue_depth" in text

    run(body())


def test_embed_equals_model_forward_and_binary_equals_json(tiny_bundle: Path) -> None:
    images = [jpeg(40, 48, 0), jpeg(64, 30, 1), jpeg(33, 33, 2)]
    ref = reference(tiny_bundle, images)

    async def body() -> None:
        async with running(settings_for(tiny_bundle)) as (_, c):
            r_json = await c.post("/v1/embed", files=parts("image", images))
            assert r_json.status_code == 200, r_json.text
            assert r_json.headers["content-type"] == "application/json"
            for h in (*TIMING_HEADERS.values(), REQUEST_ID_HEADER, "x-bundle-sha256", "x-model"):
                assert h in r_json.headers
            doc = r_json.json()
            meta = doc["__metadata__"]
            assert meta["grid"] == [4, 4] and meta["stacked"] is True and meta["dtype"] == "float32"
            assert meta["original_sizes"] == [[40, 48], [64, 30], [33, 33]]
            assert meta["bundle_sha256"] == r_json.headers["x-bundle-sha256"]
            got = as_arrays(doc)
            assert got["patch"].shape == (3, 4, 4, 64) and got["cls"].shape == (3, 64)
            np.testing.assert_allclose(got["patch"], ref["patch"], atol=1e-5)
            np.testing.assert_allclose(got["cls"], ref["cls"], atol=1e-5)

            r_bin = await c.post("/v1/embed?dtype=float32", files=parts("image", images), headers=BINARY)
            assert r_bin.headers["content-type"] == SAFETENSORS_MEDIA_TYPE
            tensors = load_safetensors(r_bin.content)
            assert tensors["patch"].dtype == np.float32
            np.testing.assert_array_equal(tensors["patch"], got["patch"].astype(np.float32))
            np.testing.assert_array_equal(tensors["cls"], got["cls"].astype(np.float32))

            r16 = await c.post("/v1/embed", files=parts("image", images), headers=BINARY)
            t16 = load_safetensors(r16.content)
            assert t16["patch"].dtype == np.float16  # the binary default
            np.testing.assert_array_equal(t16["patch"], got["patch"].astype(np.float32).astype(np.float16))
            j16 = as_arrays((await c.post("/v1/embed?dtype=float16", files=parts("image", images))).json())
            np.testing.assert_array_equal(j16["patch"].astype(np.float16), t16["patch"])

            with open_safetensors_metadata(r_bin.content) as m:
                assert m["grid"] == "[4,4]" and m["model"] == "tiny" and m["route"] == "embed"

            rn = await c.post("/v1/embed?normalize=true&outputs=patch", files=parts("image", images))
            n = as_arrays(rn.json())
            assert set(n) == {"patch"}
            expect = ref["patch"] / np.linalg.norm(ref["patch"], axis=-1, keepdims=True)
            np.testing.assert_allclose(n["patch"], expect, atol=1e-5)
            rc = await c.post("/v1/embed?outputs=cls", files=parts("image", images))
            assert set(as_arrays(rc.json())) == {"cls"}

    run(body())


class open_safetensors_metadata:
    """The string metadata of a safetensors body (its JSON header's `__metadata__`)."""

    def __init__(self, data: bytes) -> None:
        import json
        import struct

        (n,) = struct.unpack("<Q", data[:8])
        self.meta = json.loads(data[8 : 8 + n])["__metadata__"]

    def __enter__(self) -> dict[str, str]:
        return self.meta

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/v1/prototypes", "images"),
        ("/v1/prototypes?top_k=3", "images"),
        ("/v1/correspond?top_k=3&dense=true", "pairs"),
        ("/v1/correspond?mutual_only=true", "pairs"),
    ],
)
def test_binary_equals_json_for_every_route(tiny_bundle: Path, path: str, fields: str) -> None:
    images = [jpeg(40, 48, 11), jpeg(48, 40, 12)]
    files = (
        parts("image", images)
        if fields == "images"
        else parts("source", images[:1]) + parts("target", images[1:])
    )

    async def body() -> None:
        async with running(settings_for(tiny_bundle)) as (_, c):
            sep = "&" if "?" in path else "?"
            r_json = await c.post(f"{path}{sep}dtype=float32", files=files)
            r_bin = await c.post(f"{path}{sep}dtype=float32", files=files, headers=BINARY)
            assert r_json.status_code == 200 and r_bin.status_code == 200, (r_json.text, r_bin.text)
            doc = r_json.json()
            tensors = load_safetensors(r_bin.content)
            assert set(tensors) == set(doc) - {"__metadata__"}
            for name, t in tensors.items():
                j = np.asarray(doc[name])
                assert t.shape == j.shape, name
                np.testing.assert_array_equal(t, j.astype(t.dtype), err_msg=name)
            with open_safetensors_metadata(r_bin.content) as m:  # str -> str: other values as JSON
                meta = doc["__metadata__"]
                assert set(m) == set(meta)
                for k, v in meta.items():
                    assert (m[k] if isinstance(v, str) else json.loads(m[k])) == v, k

    run(body())


def test_json_base64_body_with_options_equals_multipart(tiny_bundle: Path) -> None:
    images = [jpeg(40, 40, 3), jpeg(50, 36, 4)]

    async def body() -> None:
        async with running(settings_for(tiny_bundle)) as (_, c):
            multipart = as_arrays(
                (await c.post("/v1/embed?outputs=cls&normalize=true", files=parts("image", images))).json()
            )
            b64 = [base64.b64encode(b).decode() for b in images]
            b64[1] = "data:image/jpeg;base64," + b64[1]
            r = await c.post("/v1/embed", json={"images": b64, "outputs": ["cls"], "normalize": True})
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(as_arrays(r.json())["cls"], multipart["cls"])
            pairs = {"pairs": [{"source": b64[0], "target": b64[1]}], "top_k": 2}
            rj = await c.post("/v1/correspond", json=pairs)
            rm = await c.post(
                "/v1/correspond?top_k=2", files=parts("source", images[:1]) + parts("target", images[1:])
            )
            assert rj.status_code == rm.status_code == 200
            for k, v in as_arrays(rm.json()).items():
                np.testing.assert_array_equal(as_arrays(rj.json())[k], v)

    run(body())


def test_large_bodies_are_parsed_off_the_event_loop(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bodies of 1 MiB or more parse on the decode pool (the loop keeps serving); same answers
    from cotap.server import codecs

    threads: list[str] = []  # where each body was parsed
    real_json, real_multipart = codecs.parse_json, codecs.parse_multipart

    def spy_json(*a: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_json(*a)

    async def spy_multipart(*a: Any) -> Any:
        threads.append(threading.current_thread().name)
        return await real_multipart(*a)

    monkeypatch.setattr(codecs, "parse_json", spy_json)
    monkeypatch.setattr(codecs, "parse_multipart", spy_multipart)
    rng = np.random.default_rng(0)
    noise = encode(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8), "PNG")  # about 1.4 MB
    small = jpeg(40, 40, 3)
    assert len(noise) > codecs.INLINE_PARSE_BYTES > len(small)

    async def body() -> None:
        async with running(settings_for(tiny_bundle)) as (_, c):
            answers = []
            for images in ([small, noise], [small]):
                threads.clear()
                m = await c.post("/v1/embed?outputs=cls", files=parts("image", images))
                j = await c.post(
                    "/v1/embed",
                    json={"images": [base64.b64encode(b).decode() for b in images], "outputs": ["cls"]},
                )
                assert m.status_code == j.status_code == 200, (m.text, j.text)
                np.testing.assert_array_equal(as_arrays(m.json())["cls"], as_arrays(j.json())["cls"])
                answers.append(as_arrays(m.json())["cls"][0])
                loop_thread = threading.main_thread().name
                on_pool = [t != loop_thread for t in threads]
                assert on_pool == ([True, True] if len(images) == 2 else [False, False]), threads
            np.testing.assert_allclose(answers[0], answers[1], atol=1e-5)  # the small image alone or batched

    run(body())


def test_prototypes_are_argmax_of_assign(tiny_bundle: Path) -> None:
    images = [jpeg(40, 48, 5), jpeg(48, 40, 6)]
    ref = reference(tiny_bundle, images)["assign"]  # (N, 4, 4, M)

    async def body() -> None:
        async with running(settings_for(tiny_bundle)) as (_, c):
            full = await c.post("/v1/prototypes", files=parts("image", images))
            assert full.status_code == 200, full.text
            got = as_arrays(full.json())
            np.testing.assert_array_equal(got["prototype_id"], ref.argmax(-1))
            assert got["prototype_prob"].shape == (2, 4, 4, 64)
            np.testing.assert_allclose(got["prototype_prob"], ref, atol=1e-6)
            assert full.json()["__metadata__"]["num_prototypes"] == 64
            top = await c.post("/v1/prototypes?top_k=3", files=parts("image", images), headers=BINARY)
            t = load_safetensors(top.content)
            order = np.argsort(-ref, axis=-1)[..., :3]
            np.testing.assert_array_equal(t["prototype_topk_id"], order)
            np.testing.assert_allclose(
                t["prototype_prob"].astype(np.float32), np.take_along_axis(ref, order, -1), atol=1e-3
            )
            np.testing.assert_array_equal(t["prototype_id"], ref.argmax(-1))
            assert t["prototype_id"].dtype == np.int32

    run(body())


def numpy_correspondence(
    src: np.ndarray, tgt: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Plain reference: src (h,w,C), tgt (h',w',C) -> match, score, mutual (h,w) and the similarity."""
    a = src.reshape(-1, src.shape[-1]).astype(np.float64)
    b = tgt.reshape(-1, tgt.shape[-1]).astype(np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    sim = a @ b.T
    match = np.array([int(np.argmax(row)) for row in sim])
    score = np.array([sim[i, j] for i, j in enumerate(match)])
    mutual = np.array([int(np.argmax(sim[:, j])) == i for i, j in enumerate(match)])
    h, w = src.shape[:2]
    return match.reshape(h, w), score.reshape(h, w), mutual.reshape(h, w), sim


def test_correspond_equals_numpy_reference_from_embed(tiny_bundle: Path) -> None:
    sources = [jpeg(40, 48, 7), jpeg(40, 40, 8)]
    targets = [jpeg(44, 40, 9), jpeg(40, 40, 8)]  # the second pair matches an image with itself

    async def body() -> None:
        async with running(settings_for(tiny_bundle)) as (_, c):
            emb = lambda imgs: c.post("/v1/embed?outputs=patch", files=parts("image", imgs))  # noqa: E731
            s_patch = as_arrays((await emb(sources)).json())["patch"]
            t_patch = as_arrays((await emb(targets)).json())["patch"]
            r = await c.post(
                "/v1/correspond?top_k=3&dense=true",
                files=parts("source", sources) + parts("target", targets),
            )
            assert r.status_code == 200, r.text
            got = as_arrays(r.json())
            meta = r.json()["__metadata__"]
            assert meta["source_grid"] == [4, 4] and meta["target_grid"] == [4, 4] and meta["pairs"] == 2
            for i in range(2):
                match, score, mutual, sim = numpy_correspondence(s_patch[i], t_patch[i])
                np.testing.assert_array_equal(got["match"][i], match)
                np.testing.assert_allclose(got["score"][i], score, atol=1e-5)
                np.testing.assert_array_equal(got["mutual"][i], mutual)
                np.testing.assert_allclose(got["similarity"][i], sim, atol=1e-5)
                top = np.argsort(-sim, axis=1, kind="stable")[:, :3]
                np.testing.assert_array_equal(got["match_topk"][i].reshape(-1, 3), top)
                np.testing.assert_allclose(
                    got["score_topk"][i].reshape(-1, 3), np.take_along_axis(sim, top, 1), atol=1e-5
                )
            # an image against itself: every patch matches itself, mutually, with cosine 1
            np.testing.assert_array_equal(got["match"][1].ravel(), np.arange(16))
            assert got["mutual"][1].all()
            mo = as_arrays(
                (
                    await c.post(
                        "/v1/correspond?mutual_only=true",
                        files=parts("source", sources) + parts("target", targets),
                    )
                ).json()
            )
            np.testing.assert_array_equal(mo["match"], np.where(got["mutual"], got["match"], -1))
            np.testing.assert_array_equal(mo["score"], np.where(got["mutual"], got["score"], 0))
            assert "similarity" not in mo and "match_topk" not in mo

    run(body())


def test_several_models_by_name(tiny_bundle: Path, other_bundle: Path) -> None:
    image = [jpeg()]

    async def body() -> None:
        async with running(settings_for(f"a={tiny_bundle}", other_bundle)) as (_, c):
            names = [m["name"] for m in (await c.get("/v1/models")).json()["models"]]
            assert names == ["a", "other"]
            first = await c.post("/v1/embed", files=parts("image", image))
            second = await c.post("/v1/embed?model=other", files=parts("image", image))
            assert first.headers["x-model"] == "a" and second.headers["x-model"] == "other"
            assert first.headers["x-bundle-sha256"] != second.headers["x-bundle-sha256"]
            assert not np.allclose(as_arrays(first.json())["cls"], as_arrays(second.json())["cls"])

    run(body())


def test_items_with_different_grids_get_suffixed_tensors(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(
        tmp_path / "short",
        preprocess=PreprocessConfig(resize="shorter_side", size=32, patch_size=8),
        input_sizes=[(32, 32)],
    )
    images = [jpeg(40, 40, 1), jpeg(40, 80, 2)]  # -> 32x32 (4x4) and 32x64 (4x8)

    async def body() -> None:
        async with running(settings_for(bundle)) as (_, c):
            r = await c.post("/v1/embed", files=parts("image", images), headers=BINARY)
            t = load_safetensors(r.content)
            assert t["patch.0"].shape == (4, 4, 64) and t["patch.1"].shape == (4, 8, 64)
            assert t["cls"].shape == (2, 64) and "patch" not in t
            with open_safetensors_metadata(r.content) as m:
                assert m["grids"] == "[[4,4],[4,8]]" and m["stacked"] == "false"
            ref = reference(bundle, images[1:])
            np.testing.assert_allclose(t["patch.1"].astype(np.float32), ref["patch"][0], atol=2e-3)
            p = load_safetensors(
                (await c.post("/v1/prototypes", files=parts("image", images), headers=BINARY)).content
            )
            assert p["prototype_id.0"].shape == (4, 4) and p["prototype_id.1"].shape == (4, 8)
            cr = await c.post(
                "/v1/correspond",
                files=parts("source", images[:1] * 2) + parts("target", images[::-1]),
                headers=BINARY,
            )
            ct = load_safetensors(cr.content)
            assert (
                ct["match.0"].shape == (4, 4)
                and int(ct["match.0"].max()) < 32
                and int(ct["match.1"].max()) < 16
            )

    run(body())


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_png_and_webp_are_accepted(tiny_bundle: Path, fmt: str) -> None:
    from tests.server.helpers import encode, photo

    data = encode(photo(36, 36, 3), fmt)

    async def body() -> None:
        async with running(settings_for(tiny_bundle)) as (_, c):
            r = await c.post(
                "/v1/embed?outputs=cls", files=[("image", ("x", data, "application/octet-stream"))]
            )
            assert r.status_code == 200, r.text

    run(body())


@pytest.mark.parametrize(
    ("accept", "binary"),
    [
        (SAFETENSORS_MEDIA_TYPE, True),
        (f"{SAFETENSORS_MEDIA_TYPE}, */*;q=0.1", True),
        (f"application/json, {SAFETENSORS_MEDIA_TYPE};q=0.9", False),  # JSON preferred
        (f"{SAFETENSORS_MEDIA_TYPE};q=0, application/json", False),  # explicitly not acceptable
        (f"{SAFETENSORS_MEDIA_TYPE};q=0.5, application/*;q=0.4", True),
        ("application/*", False),  # binary only when asked for by name
        ("", False),
    ],
)
def test_accept_q_values_choose_the_answer(tiny_bundle: Path, accept: str, binary: bool) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle)) as (_, c):
            headers = {"accept": accept} if accept else {}
            r = await c.post("/v1/embed?outputs=cls", files=parts("image", [jpeg()]), headers=headers)
            assert r.status_code == 200, r.text
            want = SAFETENSORS_MEDIA_TYPE if binary else "application/json"
            assert r.headers["content-type"].startswith(want), (accept, r.headers["content-type"])

    run(body())


def test_web_page_is_served_without_the_api_key(tiny_bundle: Path) -> None:
    from cotap.server.settings import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR.parent / "static" / "index.html").is_file():
        pytest.skip("no web page in server/static yet")

    async def body() -> None:
        async with running(settings_for(tiny_bundle, api_key="k")) as (_, c):
            page = await c.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert (await c.get("/static/app.js")).status_code == 200
            assert (await c.get("/v1/models")).status_code == 401  # the data still needs the key
            assert (await c.get("/static/nope.js")).status_code == 404

    run(body())
