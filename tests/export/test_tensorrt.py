"""TensorRT: what runs everywhere (refusals, trtexec lines, layer names) and, marked `trt`, a real
build on a GPU with TensorRT (skipped here: TensorRT cannot be installed on this machine)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from cotap.cli.main import main
from cotap.core.artifacts import engine_artifacts
from cotap.core.bundle import Bundle, read_bundle
from cotap.core.engine_compat import DeviceFacts, check_engine_compatible
from cotap.export.onnx import export_onnx
from cotap.export.targets import Target
from cotap.export.tensorrt import (
    EngineRunner,
    TensorRTUnavailable,
    build_engine,
    build_refusal,
    fp32_layer_names,
    local_device_facts,
    trtexec_command,
)
from cotap.training.checkpoints import load_model

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
ROOT = Path(__file__).resolve().parents[2]


def target(**kw: object) -> Target:
    base: dict[str, object] = dict(
        name="t", gpu="NVIDIA T4", family="datacenter", compute_capability="7.5", tensorrt="10.8"
    )
    base.update(kw)
    return Target(**base)  # type: ignore[arg-type]


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown where TensorRT is missing")
def test_without_tensorrt_the_extra_is_named(tiny_bundle: Bundle, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(TensorRTUnavailable, match=r"pip install -e '\.\[gpu\]'"):
        build_engine(tiny_bundle.path, target())
    code = main(
        ["export", "tensorrt", "--bundle", str(tiny_bundle.path), "--target", "t4",
         "--targets", str(ROOT / "configs" / "targets.yaml")]
    )  # fmt: skip
    assert code == 2
    assert "pip install -e '.[gpu]'" in capsys.readouterr().err
    assert local_device_facts() is None


def test_build_refusal_names_the_mismatch() -> None:
    t4 = DeviceFacts("Tesla T4", "7.5", "10.8.0.43")
    assert build_refusal(target(), t4) is None
    assert "this GPU is NVIDIA H100" in str(
        build_refusal(target(), DeviceFacts("NVIDIA H100", "9.0", "10.8.0.43"))
    )
    assert "needs TensorRT 10.8" in str(build_refusal(target(), DeviceFacts("Tesla T4", "7.5", "10.3.0.1")))
    ampere = target(compute_capability="8.9", hardware_compatibility="ampere_plus")
    assert build_refusal(ampere, DeviceFacts("NVIDIA H100", "9.0", "10.8.0.43")) is None
    assert build_refusal(target(), None) is not None


def test_fp32_layers_and_trtexec_line(tiny_bundle: Bundle) -> None:
    record = export_onnx(tiny_bundle.path, "fp32", sizes=[(32, 32)])
    names = fp32_layer_names(tiny_bundle.path / record.file)
    # 2 LayerNorms per block (2 blocks), the filter's norm1/norm2/norm_in/2 output norms: 9;
    # softmax: 1 per block + the filter's patch and CLS softmax: 4
    assert sum("LayerNormalization" in n for n in names) == 9
    assert sum("Softmax" in n for n in names) == 4
    cmd = trtexec_command(
        target(precision="int8", int8_mode="entropy", dla_core=None), [(32, 32)], fp32_layers=names
    )
    assert "--int8" in cmd and "--calib=calibration.cache" in cmd and "--profile=0" not in cmd
    spec = next(c for c in cmd if c.startswith("--layerPrecisions="))
    assert spec.count(":fp32") == len(names)
    assert "--precisionConstraints=obey" not in trtexec_command(
        target(precision="fp32"), [(32, 32)], fp32_layers=names
    )


@pytest.mark.trt
def test_build_engine_on_this_gpu(tiny_bundle: Bundle, tmp_path: Path) -> None:
    facts = local_device_facts()
    if facts is None:
        pytest.skip("TensorRT is installed but no CUDA GPU is visible")
    here = target(
        gpu=facts.gpu_name,
        compute_capability=facts.compute_capability,
        tensorrt=".".join(facts.tensorrt_version.split(".")[:2]),
        family="desktop",
        precision="fp16",
        min_batch=1,
        opt_batch=2,
        max_batch=4,
        workspace_mb=512,
    )
    record = build_engine(tiny_bundle.path, here, timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    bundle = read_bundle(tiny_bundle.path)
    assert engine_artifacts(bundle) == [record]
    assert record.gate["passed"] and record.extra["fp32_layers"] > 0
    assert check_engine_compatible(record, facts).ok
    runner = EngineRunner(bundle.file(record.file).read_bytes(), record.sizes)
    x = np.random.default_rng(0).standard_normal((3, 3, 24, 40)).astype(np.float32)
    got = runner(x)
    with torch.no_grad():
        ref = load_model(bundle.path).model.forward_features(torch.from_numpy(x))
    np.testing.assert_allclose(got["patch"], ref["patch"].numpy(), atol=5e-2)
