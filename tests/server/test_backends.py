"""Backends and their post-processing: NumPy and torch ops against plain references, the ONNX
Runtime backend on an exported tiny bundle, `auto` selection, and clear refusals."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cotap.core.bundle import read_bundle
from cotap.core.wire import SAFETENSORS_MEDIA_TYPE
from cotap.server.backends import BackendError, BackendOptions, NumpyOps, build_backend, choose_backend
from cotap.server.backends.base import PostOps
from cotap.server.backends.torch_ops import TorchOps
from tests.server.helpers import jpeg, run, running, settings_for

CPU = BackendOptions(device="cpu")


def plain_correspondence(src: np.ndarray, tgt: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Loops, float64: for each source patch the best target by cosine, mutual check, top-k."""
    p, q = src.shape[0], tgt.shape[0]
    sim = np.zeros((p, q))
    for i in range(p):
        for j in range(q):
            a, b = src[i].astype(np.float64), tgt[j].astype(np.float64)
            sim[i, j] = a @ b / (np.sqrt(a @ a) * np.sqrt(b @ b))
    match = sim.argmax(1)
    back = sim.argmax(0)
    return {
        "match": match,
        "score": sim[np.arange(p), match],
        "mutual": back[match] == np.arange(p),
        "topk": np.argsort(-sim, 1, kind="stable")[:, :k],
        "sim": sim,
    }


@pytest.mark.parametrize("ops", [NumpyOps(), TorchOps(torch.device("cpu"))], ids=["numpy", "torch"])
def test_post_ops_against_plain_reference(ops: PostOps) -> None:
    rng = np.random.default_rng(0)
    src = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    tgt = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
    assign = rng.random((2, 3, 4, 6)).astype(np.float32)
    conv = (lambda x: torch.from_numpy(x)) if isinstance(ops, TorchOps) else (lambda x: x)
    res = {
        k: ops.to_numpy(v, "float32") for k, v in ops.correspond(conv(src), conv(tgt), 3, False, True).items()
    }
    for n in range(2):
        ref = plain_correspondence(src[n].reshape(12, 8), tgt[n].reshape(10, 8), 3)
        np.testing.assert_array_equal(res["match"][n].ravel(), ref["match"])
        np.testing.assert_allclose(res["score"][n].ravel(), ref["score"], atol=1e-6)
        np.testing.assert_array_equal(res["mutual"][n].ravel(), ref["mutual"])
        np.testing.assert_array_equal(res["match_topk"][n].reshape(12, 3), ref["topk"])
        np.testing.assert_allclose(res["similarity"][n], ref["sim"], atol=1e-6)
    assert res["match"].dtype == np.int32 and res["mutual"].dtype == bool
    mo = {
        k: ops.to_numpy(v, "float32") for k, v in ops.correspond(conv(src), conv(tgt), 1, True, False).items()
    }
    assert set(mo) == {"match", "score", "mutual"}
    np.testing.assert_array_equal(mo["match"], np.where(res["mutual"], res["match"], -1))
    pr = {k: ops.to_numpy(v, "float32") for k, v in ops.prototypes(conv(assign), 2).items()}
    np.testing.assert_array_equal(pr["prototype_id"], assign.argmax(-1))
    np.testing.assert_array_equal(pr["prototype_topk_id"], np.argsort(-assign, -1)[..., :2])
    np.testing.assert_allclose(pr["prototype_prob"], np.sort(assign, -1)[..., ::-1][..., :2], atol=1e-7)
    x = conv(np.array([[3.0, 4.0], [0.0, 0.0]], np.float32))
    np.testing.assert_allclose(ops.to_numpy(ops.l2_normalize(x), "float32"), [[0.6, 0.8], [0, 0]], atol=1e-7)
    assert ops.to_numpy(x, "float16").dtype == np.float16


def half_cast_probe() -> np.ndarray:
    """float32 values where float16 rounding is delicate: ties, the overflow edge, subnormals."""
    rng = np.random.default_rng(1)
    f16_max, tiny = 65504.0, 2.0**-24  # largest float16, smallest subnormal
    edges = [0.0, -0.0, np.inf, -np.inf, np.nan, f16_max, 65519.99, 65520.0, -65520.0, 1e9,
             tiny, tiny / 2, tiny * 0.51, tiny * 1.5, 6.1e-5, 1 + 2.0**-11, 1 + 3 * 2.0**-11,
             2049.0, 2051.0]  # fmt: skip
    wide = rng.normal(size=4000) * np.exp(rng.uniform(-20, 12, 4000))
    return np.concatenate([np.array(edges), wide]).astype(np.float32).reshape(1, -1, 1)


def test_half_cast_rounds_like_numpy_bit_for_bit() -> None:
    onnx = pytest.importorskip("onnx")  # rebuilds the serialised graph (the export extra)
    import onnxruntime
    from onnx import TensorProto, helper

    from cotap.server.backends.half_cast import CAST_F32_F16_ONNX, HalfCast

    x = half_cast_probe()
    y = HalfCast(onnxruntime)(x)
    with np.errstate(over="ignore"):  # values past 65504 become inf, on purpose
        ref = x.astype(np.float16)  # NumPy's own conversion, element by element
    assert y.dtype == np.float16 and y.shape == x.shape and y.flags.c_contiguous
    np.testing.assert_array_equal(y.view(np.uint16)[~np.isnan(ref)], ref.view(np.uint16)[~np.isnan(ref)])
    assert np.isnan(y[np.isnan(ref)]).all()
    # the serialised graph is the one-node Cast that onnx.helper builds
    graph = onnx.load_from_string(CAST_F32_F16_ONNX).graph
    want = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16)
    assert [n.SerializeToString() for n in graph.node] == [want.SerializeToString()]
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    ops = NumpyOps(half=HalfCast(onnxruntime))
    np.testing.assert_array_equal(ops.to_numpy(x[:, :50].copy(), "float32"), x[:, :50])  # only half is cast
    assert ops.to_numpy(np.arange(3), "float16").dtype == np.int32


def test_torch_backend_refusals(tiny_bundle: Path) -> None:
    b = read_bundle(tiny_bundle)
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA device"):
            build_backend(b, "torch", BackendOptions(device="cuda"))
    with pytest.raises(BackendError, match="fp16 on the CPU"):
        build_backend(b, "torch", BackendOptions(device="cpu", precision="fp16"))
    with pytest.raises(BackendError, match="int8"):
        build_backend(b, "torch", BackendOptions(device="cpu", precision="int8"))
    bf16 = build_backend(b, "torch", BackendOptions(device="cpu", precision="bf16"))
    fp32 = build_backend(b, "torch", CPU)
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    a, c = bf16.forward(x)["patch"], fp32.forward(x)["patch"]
    assert a.dtype == torch.float32 and a.shape == (2, 4, 4, 64)
    cos = torch.nn.functional.cosine_similarity(a, c, dim=-1)
    assert float(cos.min()) > 0.99


def test_onnxruntime_and_tensorrt_refuse_a_bundle_without_artefacts(tiny_bundle: Path) -> None:
    b = read_bundle(tiny_bundle)
    with pytest.raises(BackendError, match="cotap export onnx --bundle"):
        build_backend(b, "onnxruntime", CPU)
    with pytest.raises(BackendError, match="cotap export tensorrt"):
        build_backend(b, "tensorrt", BackendOptions(device="cuda"))
    with pytest.raises(BackendError, match="NVIDIA GPUs only.*--backend onnxruntime"):
        build_backend(b, "tensorrt", CPU)  # never quietly on a GPU when the CPU was asked for
    with pytest.raises(BackendError, match="unknown backend"):
        build_backend(b, "tvm", CPU)
    assert choose_backend(b, "auto", CPU)[0] == "torch"


def test_tensorrt_device_names() -> None:
    from cotap.server.backends.tensorrt_backend import engine_device_index

    assert engine_device_index("auto") is None and engine_device_index("cuda") is None
    assert engine_device_index("cuda:1") == 1
    for bad in ("cuda:x", "mps", "gpu"):
        with pytest.raises(BackendError, match="unknown device"):
            engine_device_index(bad)


@pytest.fixture(scope="module")
def onnx_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("cotap.export.onnx") is None:
        pytest.skip("cotap.export.onnx (the exporter) is not there yet")
    from cotap.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "tiny"
    shutil.copytree(tiny_bundle, out)
    export_onnx(out, "fp32", max_batch=8)
    return out


def test_onnxruntime_backend_serves_what_torch_serves(onnx_bundle: Path) -> None:
    b = read_bundle(onnx_bundle)
    assert choose_backend(b, "auto", CPU)[0] == "onnxruntime"
    ort = build_backend(b, "onnxruntime", CPU)
    assert ort.describe()["providers"] == ["CPUExecutionProvider"] and ort.max_batch == 8
    assert ort.sizes == frozenset({(32, 32)})
    from cotap.server.backends.half_cast import HalfCast

    assert isinstance(ort.ops, NumpyOps) and isinstance(ort.ops._half, HalfCast)  # the answers' cast
    probe = half_cast_probe()[:, 19:]  # finite values
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(ort.ops.to_numpy(probe, "float16"), probe.astype(np.float16))
    with pytest.raises(BackendError, match="no int8 ONNX model"):
        build_backend(b, "onnxruntime", BackendOptions(device="cpu", precision="int8"))
    images = [jpeg(40, 48, i) for i in range(3)]

    async def answers(backend: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load

        async with running(settings_for(onnx_bundle, backend=backend)) as (_, c):
            models = (await c.get("/v1/models")).json()["models"][0]
            assert models["backend"] == backend
            files = [("image", (f"{i}.jpg", x, "image/jpeg")) for i, x in enumerate(images)]
            r = await c.post(
                "/v1/embed?dtype=float32", files=files, headers={"accept": SAFETENSORS_MEDIA_TYPE}
            )
            p = await c.post("/v1/prototypes", files=files, headers={"accept": SAFETENSORS_MEDIA_TYPE})
            return load(r.content) | load(p.content)

    via_ort = run(answers("onnxruntime"))
    via_torch = run(answers("torch"))
    np.testing.assert_allclose(via_ort["patch"], via_torch["patch"], atol=1e-4)
    np.testing.assert_allclose(via_ort["cls"], via_torch["cls"], atol=1e-4)
    agree = (via_ort["prototype_id"] == via_torch["prototype_id"]).mean()
    assert agree > 0.95


def test_onnxruntime_io_bound_to_torch_serves_the_same(onnx_bundle: Path) -> None:
    # what runs on a GPU (inputs/outputs bound to torch tensors, post-processing in TorchOps), run
    # here on the CPU: the same answers as ONNX Runtime's plain NumPy path
    from cotap.server.backends.onnxruntime_backend import OnnxRuntimeBackend

    b = read_bundle(onnx_bundle)
    plain = OnnxRuntimeBackend(b, CPU)
    bound = OnnxRuntimeBackend(b, CPU, bind_torch=True)
    assert isinstance(plain.ops, NumpyOps) and isinstance(bound.ops, TorchOps)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    a, t = plain.forward(x), bound.forward(x)
    for name in ("patch", "cls", "assign"):
        assert isinstance(t[name], torch.Tensor) and tuple(t[name].shape) == a[name].shape, name
        np.testing.assert_array_equal(t[name].numpy(), a[name], err_msg=name)
    images = [jpeg(40, 48, i) for i in range(3)]

    async def answers(bind: bool) -> dict[str, np.ndarray]:
        from safetensors.numpy import load

        def hook(backend: Any) -> Any:
            return OnnxRuntimeBackend(backend.bundle, backend.options, bind_torch=bind)

        async with running(settings_for(onnx_bundle, backend="onnxruntime"), hook=hook) as (_, c):
            files = [("image", (f"{i}.jpg", x, "image/jpeg")) for i, x in enumerate(images)]
            pairs = [("source", files[0][1]), ("target", files[1][1])]
            out: dict[str, np.ndarray] = {}
            for path, f in (
                ("/v1/embed?dtype=float32&normalize=true", files),
                ("/v1/prototypes?top_k=3&dtype=float32", files),
                ("/v1/correspond?top_k=2&dense=true&dtype=float32", pairs),
            ):
                r = await c.post(path, files=f, headers={"accept": SAFETENSORS_MEDIA_TYPE})
                assert r.status_code == 200, r.text
                out |= {f"{path.split('?')[0]}:{k}": v for k, v in load(r.content).items()}
            return out

    on_host, bound_answers = run(answers(False)), run(answers(True))
    assert set(on_host) == set(bound_answers) and len(on_host) >= 10
    for k, v in on_host.items():
        np.testing.assert_allclose(bound_answers[k], v, atol=1e-5, err_msg=k)


def test_backends_load_only_the_bytes_the_manifest_pins(onnx_bundle: Path, tmp_path: Path) -> None:
    """A file replaced after the bundle was opened (and verified) is refused as it is loaded: the
    backends hash the bytes they load, not the file some time before."""
    from cotap.core.artifacts import serving_onnx
    from cotap.core.bundle import WEIGHTS, BundleError

    copy = tmp_path / "b"
    shutil.copytree(onnx_bundle, copy)
    b = read_bundle(copy)
    record = serving_onnx(b)["fp32"]
    for name in (WEIGHTS, record.file):
        data = bytearray((copy / name).read_bytes())
        data[-1] ^= 1
        (copy / name).write_bytes(bytes(data))
    with pytest.raises(
        BackendError, match=r"model.safetensors does not match its sha256.*after the bundle was opened"
    ):
        build_backend(b, "torch", CPU)
    with pytest.raises(
        BackendError, match=r"model-fp32.onnx does not match its sha256.*after the bundle was opened"
    ):
        build_backend(b, "onnxruntime", CPU)
    with pytest.raises(BundleError, match="after the bundle was opened"):
        b.read_verified(WEIGHTS)


def test_onnxruntime_refuses_sizes_it_was_not_exported_for(onnx_bundle: Path) -> None:
    """A bundle whose declared size has no ONNX model is refused at load time."""
    import json

    b = read_bundle(onnx_bundle)
    assert b.artifacts["onnx"][0]["sizes"] == [[32, 32]]
    rec = dict(b.artifacts["onnx"][0], sizes=[[24, 40]])
    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    manifest["artifacts"]["onnx"] = [rec]
    from dataclasses import replace

    fake = replace(b, manifest=manifest)
    with pytest.raises(BackendError, match=r"covers its input sizes \(32x32; exported: .*: 24x40\)"):
        build_backend(fake, "onnxruntime", CPU)
    name, notes = choose_backend(fake, "auto", CPU)  # auto passes over it, to torch
    assert name == "torch" and any("no ONNX model for all its input sizes" in n for n in notes)


@pytest.mark.trt
@pytest.mark.gpu  # TensorRT installed on a machine without a GPU: skipped, not failed
def test_tensorrt_backend_checks_the_engine_against_this_gpu(tiny_bundle: Path) -> None:
    from cotap.server.backends.tensorrt_backend import device_facts

    facts, why = device_facts()
    assert facts is not None, why
    assert facts.compute_capability.count(".") == 1


def test_onnxruntime_tensorrt_provider_gets_a_profile_and_a_cache_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The TensorRT EP's options (no onnxruntime-gpu here: a plain stand-in lists its providers)."""
    from cotap.core.artifacts import OnnxArtifact
    from cotap.server.backends.onnxruntime_backend import (
        choose_providers,
        tensorrt_profile_options,
        with_tensorrt_profile,
    )

    class GpuOrt:
        @staticmethod
        def get_available_providers() -> list[str]:
            return ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not" / "there"))
    providers, gpu = choose_providers(GpuOrt(), "cuda:1")
    cache = tmp_path / "not" / "there" / "cotap" / "ort-trt"
    assert gpu and providers[0] == (
        "TensorrtExecutionProvider",
        {"device_id": 1, "trt_engine_cache_enable": True},
    )
    record = OnnxArtifact(
        file="onnx/model-fp16.onnx",
        precision="fp16",
        sizes=((32, 32), (24, 40)),
        max_batch=16,
        opset=17,
        sha256="ab" * 32,
    )
    # one profile covering every size and batch: ONNX Runtime keeps its context on profile 0
    assert tensorrt_profile_options(record) == {
        "trt_profile_min_shapes": "images:1x3x24x32",
        "trt_profile_opt_shapes": "images:8x3x32x32",
        "trt_profile_max_shapes": "images:16x3x32x40",
    }
    small = OnnxArtifact(
        file="onnx/model-fp32.onnx", precision="fp32", sizes=((96, 96),), max_batch=2, opset=17
    )
    assert tensorrt_profile_options(small)["trt_profile_opt_shapes"] == "images:2x3x96x96"
    with_profile = with_tensorrt_profile(providers, record)
    assert with_profile[0][1]["trt_profile_max_shapes"] == "images:16x3x32x40"
    own = cache / ("ab" * 8)  # engines of this model only: the EP's cache key ignores the weights
    assert with_profile[0][1]["trt_engine_cache_path"] == str(own)
    assert own.is_dir()  # with its parents: ONNX Runtime itself creates the last component only
    assert with_profile[1:] == providers[1:]  # the CUDA and CPU providers are unchanged
    assert choose_providers(GpuOrt(), "cpu") == (["CPUExecutionProvider"], False)


def test_tensorrt_backend_selects_the_profile_of_each_size() -> None:
    """Profile i serves record.sizes[i]; a fake execution context records what it is told."""
    from cotap.core.engine_compat import pad_batch
    from cotap.server.backends.tensorrt_backend import ProfileBinding

    class Context:
        def __init__(self) -> None:
            self.calls: list[tuple[Any, ...]] = []

        def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
            self.calls.append(("profile", profile, stream))
            return True

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            self.calls.append(("shape", name, shape))
            return 2 <= shape[0] <= 8  # the profiles' batch range

    ctx = Context()
    binding = ProfileBinding(ctx, [(32, 32), (24, 40)], (2, 8))
    assert binding.bind((2, 3, 32, 32), 7) == 0  # a fresh context is on profile 0 already
    assert binding.bind((4, 3, 24, 40), 7) == 1
    assert binding.bind((8, 3, 24, 40), 7) == 1  # no switch while the size stays
    assert binding.bind((2, 3, 32, 32), 7) == 0
    assert ctx.calls == [
        ("shape", "images", (2, 3, 32, 32)),
        ("profile", 1, 7),
        ("shape", "images", (4, 3, 24, 40)),
        ("shape", "images", (8, 3, 24, 40)),
        ("profile", 0, 7),
        ("shape", "images", (2, 3, 32, 32)),
    ]
    with pytest.raises(RuntimeError, match=r"refused input shape \(9, 3, 32, 32\).*batch 2\.\.8"):
        binding.bind((9, 3, 32, 32), 7)
    with pytest.raises(BackendError, match="no optimisation profile for input size 48x48"):
        binding.bind((2, 3, 48, 48), 7)
    # batches under the engine's min_batch are padded with their last image
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    padded = pad_batch(x, 4)
    assert padded.shape == (4, 3, 2, 2)
    np.testing.assert_array_equal(padded[:2], x)
    np.testing.assert_array_equal(padded[2], x[1])
    np.testing.assert_array_equal(padded[3], x[1])
    assert pad_batch(x, 1) is x
