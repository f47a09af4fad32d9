"""TensorRT: what runs everywhere (refusals, trtexec lines, layer names, and the builder's calls
recorded on a fake `tensorrt` module) and, marked `trt`, a real build on a GPU with TensorRT
(skipped here: TensorRT cannot be installed on this machine)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cotap.cli.main import main
from cotap.core.artifacts import engine_artifacts
from cotap.core.bundle import Bundle, read_bundle
from cotap.core.engine_compat import (
    DeviceFacts,
    check_engine_compatible,
    check_engine_io,
    deserialize_plan,
    set_engine_input_shape,
    set_tensor_addresses,
)
from cotap.export.batch import build_script
from cotap.export.onnx import export_onnx
from cotap.export.targets import Target
from cotap.export.tensorrt import (
    CALIBRATION_BATCH,
    EngineRunner,
    TensorRTUnavailable,
    _entropy_calibrator,
    _serialize,
    build_engine,
    build_refusal,
    calibration_shapes,
    default_timing_cache,
    fp32_layer_names,
    import_tensorrt,
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


# -- the builder's calls, recorded on a fake `tensorrt` module (TensorRT cannot be installed here) --
class _Flags:
    """An enum stand-in: every attribute asked for is its own name."""

    def __init__(self, *names: str) -> None:
        for n in names:
            setattr(self, n, n)


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[Any, Any, Any]] = {}

    def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data or b"fresh timings"


class FakeConfig:
    def __init__(self, accept_timing_cache: bool) -> None:
        self.accept = accept_timing_cache
        self.flags: list[str] = []
        self.profiles: list[FakeProfile] = []
        self.calibration_profile: FakeProfile | None = None
        self.int8_calibrator: Any = None
        self.hardware_compatibility_level: Any = None
        self.timing_cache: FakeTimingCache | None = None

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.workspace = size

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_flag(self, flag: str) -> None:
        self.flags.append(flag)

    def set_calibration_profile(self, profile: FakeProfile) -> bool:
        self.calibration_profile = profile
        return True

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if cache.data and not self.accept:  # made on another GPU/TensorRT/CUDA: refused
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.timing_cache


def fake_tensorrt(
    version: str = "10.8.0.43", *, accept_timing_cache: bool = True, same_cc: bool = True
) -> Any:
    """A `tensorrt` stand-in with what `_serialize`, the calibrator and `deserialize_engine` call;
    `trt.configs` and `trt.runtimes` keep what they were given."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    trt.configs = []  # type: ignore[attr-defined]
    trt.runtimes = []  # type: ignore[attr-defined]
    levels = ["NONE", "AMPERE_PLUS"] + (["SAME_COMPUTE_CAPABILITY"] if same_cc else [])

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity: str) -> None:
            pass

    class Layer:
        def __init__(self, kind: str) -> None:
            self.type, self.num_outputs, self.precision, self.outputs = kind, 1, None, {}

        def set_output_type(self, i: int, dtype: str) -> None:
            self.outputs[i] = dtype

    class Network:
        def __init__(self) -> None:
            self.layers = [Layer("NORMALIZATION"), Layer("MATRIX_MULTIPLY"), Layer("SOFTMAX")]
            self.num_layers = len(self.layers)

        def get_layer(self, i: int) -> Layer:
            return self.layers[i]

    class Builder:
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network()

        def create_builder_config(self) -> FakeConfig:
            config = FakeConfig(accept_timing_cache)
            trt.configs.append(config)  # type: ignore[attr-defined]
            return config

        def create_optimization_profile(self) -> FakeProfile:
            return FakeProfile()

        def build_serialized_network(self, network: Network, config: FakeConfig) -> bytes:
            return b"plan"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: Network, logger: Logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            return True

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            self.engine_host_code_allowed = False
            trt.runtimes.append(self)  # type: ignore[attr-defined]

        def deserialize_cuda_engine(self, plan: bytes) -> Any:
            self.host_code_when_deserialised = self.engine_host_code_allowed
            return object()

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            pass

    for name, value in {
        "Logger": Logger,
        "Builder": Builder,
        "OnnxParser": OnnxParser,
        "Runtime": Runtime,
        "IInt8EntropyCalibrator2": IInt8EntropyCalibrator2,
        "MemoryPoolType": _Flags("WORKSPACE"),
        "BuilderFlag": _Flags(
            "FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "GPU_FALLBACK", "VERSION_COMPATIBLE"
        ),
        "LayerType": _Flags("NORMALIZATION", "SOFTMAX"),
        "DeviceType": _Flags("GPU", "DLA"),
        "HardwareCompatibilityLevel": _Flags(*levels),
        "TensorIOMode": _Flags("INPUT", "OUTPUT"),
        "float32": "float32",
        "float16": "float16",
    }.items():
        setattr(trt, name, value)
    return trt


def serialize(
    trt: Any, t: Target, tmp_path: Path, sizes: Any = ((32, 32), (24, 40)), calibrator: Any = None
) -> FakeConfig:
    _serialize(trt, tmp_path / "model.onnx", t, sizes, tmp_path / "timing.cache", calibrator, False)
    config: FakeConfig = trt.configs[-1]
    return config


@pytest.mark.parametrize(("version", "refused"), [("10.8.0.43", False), ("11.0.0.7", True)])
def test_tensorrt_11_is_refused(monkeypatch: pytest.MonkeyPatch, version: str, refused: bool) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version))
    if not refused:
        assert import_tensorrt().__version__ == version
        return
    with pytest.raises(TensorRTUnavailable, match=r"TensorRT 11\.0\.0\.7 is installed.*tensorrt>=10\.0,<11"):
        import_tensorrt()


def test_one_profile_per_size_and_a_static_calibration_profile(tmp_path: Path) -> None:
    trt = fake_tensorrt()
    t = target(precision="int8", int8_mode="entropy", min_batch=2, opt_batch=8, max_batch=16)
    images = np.zeros((5, 3, 32, 32), np.float32)
    calibrator = _entropy_calibrator(trt, images, tmp_path / "calibration.cache")
    config = serialize(trt, t, tmp_path, calibrator=calibrator)
    assert [p.shapes["images"] for p in config.profiles] == [  # profile i serves sizes[i]
        ((2, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32)),
        ((2, 3, 24, 40), (8, 3, 24, 40), (16, 3, 24, 40)),
    ]
    # TensorRT calibrates at the calibration profile's opt shape: its batch is what get_batch hands over
    assert config.calibration_profile is not None and config.calibration_profile not in config.profiles
    low, opt, high = config.calibration_profile.shapes["images"]
    assert low == opt == high == (CALIBRATION_BATCH, 3, 32, 32) == calibration_shapes((32, 32))[1]
    assert calibrator.get_batch_size() == CALIBRATION_BATCH == 1
    assert config.int8_calibrator is calibrator and {"INT8", "FP16"} <= set(config.flags)


def test_dla_needs_a_fixed_batch(tmp_path: Path) -> None:
    dla = target(family="jetson", compute_capability="8.7", dla_core=0, min_batch=1, opt_batch=1, max_batch=4)
    with pytest.raises(ValueError, match="fixed batch"):
        serialize(fake_tensorrt(), dla, tmp_path)
    fixed = target(
        family="jetson", compute_capability="8.7", dla_core=0, min_batch=2, opt_batch=2, max_batch=2
    )
    config = serialize(fake_tensorrt(), fixed, tmp_path, sizes=((32, 32),))
    low, opt, high = config.profiles[0].shapes["images"]
    assert low == opt == high == (2, 3, 32, 32) and "GPU_FALLBACK" in config.flags


def test_hardware_compatibility_levels(tmp_path: Path) -> None:
    same_cc = target(hardware_compatibility="same_compute_capability")
    assert (
        serialize(fake_tensorrt(), same_cc, tmp_path).hardware_compatibility_level
        == "SAME_COMPUTE_CAPABILITY"
    )
    with pytest.raises(
        RuntimeError, match=r"\(10\.2\.0\.1\) has no HardwareCompatibilityLevel\.SAME_COMPUTE"
    ):
        serialize(fake_tensorrt("10.2.0.1", same_cc=False), same_cc, tmp_path)
    assert serialize(fake_tensorrt(), target(), tmp_path).hardware_compatibility_level is None
    orin = DeviceFacts("Orin", "8.7", "10.3.0.30", integrated=True)
    jetson = target(
        family="jetson",
        compute_capability="8.7",
        tensorrt="10.3",
        hardware_compatibility="same_compute_capability",
    )
    assert "not supported on Jetson" in str(build_refusal(jetson, orin))
    assert build_refusal(target(family="jetson", compute_capability="8.7", tensorrt="10.3"), orin) is None


def test_a_refused_timing_cache_is_replaced_with_a_warning(tmp_path: Path) -> None:
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"timings from another GPU")
    with pytest.warns(UserWarning, match="was refused; building without it"):
        config = serialize(fake_tensorrt(accept_timing_cache=False), target(), tmp_path)
    assert config.timing_cache is not None and config.timing_cache.data == b""  # built from an empty cache
    assert cache.read_bytes() == b"fresh timings"  # this build's cache replaces the refused one
    cache.write_bytes(b"timings from this GPU")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = serialize(fake_tensorrt(), target(), tmp_path)
    assert config.timing_cache is not None and config.timing_cache.data == b"timings from this GPU"


def test_timing_cache_key_names_gpu_and_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    a10 = default_timing_cache(DeviceFacts("NVIDIA A10", "8.6", "10.8.0.43"), "12.4")
    assert a10 == tmp_path / "cotap" / "tensorrt" / "timing-nvidia-a10-sm86-trt10.8.0.43-cuda12.4.cache"
    a6000 = default_timing_cache(DeviceFacts("NVIDIA RTX A6000", "8.6", "10.8.0.43"), "12.4")
    assert len({a10, a6000, default_timing_cache(DeviceFacts("NVIDIA A10", "8.6", "10.8.0.43"), "12.8")}) == 3


def test_version_compatible_engines_allow_host_code() -> None:
    trt = fake_tensorrt()
    deserialize_plan(trt, b"plan", version_compatible=True)
    deserialize_plan(trt, b"plan", version_compatible=False)
    assert [r.host_code_when_deserialised for r in trt.runtimes] == [True, False]


def test_a_refused_input_shape_is_an_error() -> None:
    class Context:
        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            return shape[0] <= 4

    set_engine_input_shape(Context(), (4, 3, 32, 32), 0, (1, 4))
    with pytest.raises(
        RuntimeError, match=r"refused input shape \(5, 3, 32, 32\) for optimisation profile 1"
    ):
        set_engine_input_shape(Context(), (5, 3, 32, 32), 1, (1, 4))


class FakeEngine:
    """The I/O tensor queries of an ICudaEngine: {name: (mode, dtype)}."""

    def __init__(self, io: dict[str, tuple[str, str]]) -> None:
        self.io = io
        self.num_io_tensors = len(io)

    def get_tensor_name(self, i: int) -> str:
        return list(self.io)[i]

    def get_tensor_mode(self, name: str) -> str:
        return self.io[name][0]

    def get_tensor_dtype(self, name: str) -> str:
        return self.io[name][1]


def test_engine_io_must_be_the_float32_contract() -> None:
    trt = fake_tensorrt()
    io = {"images": ("INPUT", "float32"), **{n: ("OUTPUT", "float32") for n in ("patch", "cls", "assign")}}
    check_engine_io(trt, FakeEngine(io))
    # fp16 I/O (trtexec --outputIOFormats=fp16:chw) would be read through float32 buffers
    with pytest.raises(RuntimeError, match=r"must be float32, these are not: \{'patch': 'float16'\}"):
        check_engine_io(trt, FakeEngine({**io, "patch": ("OUTPUT", "float16")}))
    missing = {k: v for k, v in io.items() if k != "assign"}
    with pytest.raises(RuntimeError, match=r"outputs \['patch', 'cls'\], the bundle contract"):
        check_engine_io(trt, FakeEngine(missing))


def test_a_refused_tensor_address_is_an_error() -> None:
    class Context:
        def __init__(self) -> None:
            self.addresses: dict[str, int] = {}

        def set_tensor_address(self, name: str, address: int) -> bool:
            if name not in ("images", "patch"):
                return False
            self.addresses[name] = address
            return True

    ctx = Context()
    set_tensor_addresses(ctx, {"images": 256, "patch": 512})
    assert ctx.addresses == {"images": 256, "patch": 512}
    with pytest.raises(RuntimeError, match="refused the device address of tensor 'cls'"):
        set_tensor_addresses(ctx, {"images": 256, "cls": 1024})


def _run_build_sh(t: Target, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The target's build.sh in trtexec mode, with a stand-in trtexec that records its call."""
    script = tmp_path / "build.sh"
    script.write_text(build_script(t, [(32, 32)], ["/blocks.0/norm1/LayerNormalization"]))
    fake = tmp_path / "fake-trtexec"
    fake.write_text('#!/usr/bin/env bash\necho "$@" > "$(dirname "$0")/trtexec-called"\n')
    fake.chmod(0o755)
    env = {**os.environ, "TRTEXEC": str(fake)}
    return subprocess.run(["bash", str(script), "trtexec"], env=env, capture_output=True, text=True)


def test_trtexec_never_calibrates_int8_on_random_data(tmp_path: Path) -> None:
    """trtexec --calib only reads a cache; without the file it calibrates on random inputs."""
    entropy = target(precision="int8", int8_mode="entropy")
    done = _run_build_sh(entropy, tmp_path)
    assert done.returncode == 1 and "trtexec would calibrate int8 on random inputs" in done.stderr
    assert "../bundle/engines/t/calibration.cache" in done.stderr
    assert not (tmp_path / "trtexec-called").exists()
    (tmp_path / "calibration.cache").write_bytes(b"TRT-100800-EntropyCalibration2\n")
    done = _run_build_sh(entropy, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--calib=calibration.cache" in (tmp_path / "trtexec-called").read_text()
    (tmp_path / "calibration.cache").unlink()
    (tmp_path / "trtexec-called").unlink()
    assert _run_build_sh(target(precision="fp16"), tmp_path).returncode == 0  # no cache needed
    assert (tmp_path / "trtexec-called").exists()
