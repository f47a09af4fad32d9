"""The CUDA paths: the torch backend in fp16/bf16 against fp32 on the CPU, post-processing on the
device against the NumPy reference, the server end to end on the GPU, and ONNX Runtime's CUDA
provider. Marked `gpu`: skipped where there is no CUDA device (CI; docs/benchmarks.md says where
they ran)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cotap.core.bundle import read_bundle
from cotap.server.backends import BackendOptions, NumpyOps, build_backend
from tests.server.helpers import jpeg, parts, run, running, settings_for

pytestmark = pytest.mark.gpu

CPU = BackendOptions(device="cpu")


def _cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1).min())


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_torch_cuda_backend_serves_what_the_cpu_serves(tiny_bundle: Path, precision: str) -> None:
    b = read_bundle(tiny_bundle)
    gpu = build_backend(b, "torch", BackendOptions(device="cuda", precision=precision))
    cpu = build_backend(b, "torch", CPU)
    assert gpu.describe()["device"].startswith("cuda") and gpu.describe()["precision"] == precision
    x = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    got, want = gpu.forward(x), cpu.forward(x)
    assert got["patch"].is_cuda and got["patch"].dtype == torch.float32  # float32 out of every precision
    floor = 0.9999 if precision == "fp32" else 0.99
    for name in ("patch", "cls", "assign"):
        assert got[name].shape == want[name].shape
        assert _cosine_min(got[name], want[name]) > floor, name


def test_post_processing_runs_on_the_device_and_matches_numpy(tiny_bundle: Path) -> None:
    """Matching, top-k and normalisation on the GPU give what NumPy gives on the same features."""
    backend = build_backend(read_bundle(tiny_bundle), "torch", BackendOptions(device="cuda"))
    ops, ref = backend.ops, NumpyOps()
    assert ops.device.startswith("cuda")
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    out = backend.forward(x)
    src, tgt = out["patch"][:1], out["patch"][1:]
    on_gpu = ops.correspond(src, tgt, 3, False, True)
    assert all(v.is_cuda for v in on_gpu.values())  # nothing crossed to the host before encoding
    host = ref.correspond(src.cpu().numpy(), tgt.cpu().numpy(), 3, False, True)
    for name, value in on_gpu.items():
        got, want = ops.to_numpy(value, "float32"), ref.to_numpy(host[name], "float32")
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, want, atol=1e-5)
        else:
            np.testing.assert_array_equal(got, want)
    probs = ops.prototypes(out["assign"], 2)
    np.testing.assert_array_equal(
        ops.to_numpy(probs["prototype_id"], "float32"), out["assign"].argmax(-1).cpu().numpy()
    )


def test_server_on_the_gpu_answers_like_the_cpu_server(tiny_bundle: Path) -> None:
    async def body() -> None:
        answers = {}
        for device, precision in (("cpu", "fp32"), ("cuda", "fp16")):
            async with running(settings_for(tiny_bundle, device=device, precision=precision)) as (_, c):
                model = (await c.get("/v1/models")).json()["models"][0]
                assert model["device"].startswith(device) and model["precision"] == precision
                r = await c.post("/v1/embed", files=parts("image", [jpeg(), jpeg(seed=1)]))
                assert r.status_code == 200, r.text
                answers[device] = np.asarray(r.json()["patch"], np.float32)
                pair = parts("source", [jpeg()]) + parts("target", [jpeg(48, 40)])
                r = await c.post("/v1/correspond", files=pair)
                assert r.status_code == 200, r.text
        cos = (answers["cpu"] * answers["cuda"]).sum(-1) / (
            np.linalg.norm(answers["cpu"], axis=-1) * np.linalg.norm(answers["cuda"], axis=-1)
        )
        assert float(cos.min()) > 0.99

    run(body())


def test_onnxruntime_cuda_provider(tiny_bundle: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (onnxruntime-gpu is not installed)")
    if importlib.util.find_spec("cotap.export.onnx") is None:
        pytest.skip("the exporter is not installed")
    from cotap.export.onnx import export_onnx

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    export_onnx(bundle, "fp32", max_batch=4)
    b = read_bundle(bundle)
    gpu = build_backend(b, "onnxruntime", BackendOptions(device="cuda"))
    assert any(
        p in gpu.describe()["providers"] for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    )
    x = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)
    got, want = gpu.forward(x), build_backend(b, "torch", CPU).forward(x)
    patch = torch.from_numpy(gpu.ops.to_numpy(got["patch"], "float32"))
    assert _cosine_min(patch, want["patch"]) > 0.9999
