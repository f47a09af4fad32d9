"""TensorRT engines for a target GPU: `cotap export tensorrt --bundle DIR --target NAME`.

Written against TensorRT's documented Python API (8.6 to 10.x; where it ran is in docs/export.md).
`tensorrt` is imported
lazily: without it, `build_engine` raises `TensorRTUnavailable` naming the extra to install; TensorRT
11 and newer are refused the same way (they removed the weakly-typed builder flags used here).

The build: parse the bundle's ONNX model (fp32 for fp32/fp16 targets; the calibrated QDQ model for
int8 targets, or fp32 plus an entropy calibrator and its cache with `int8_mode: entropy`), one
optimisation profile per input size over the target's batch range (a fixed batch on DLA), a separate
static batch-1 calibration profile for entropy calibration, the workspace limit, a timing cache
persisted across builds (keyed by GPU, compute capability, TensorRT and CUDA version), LayerNorm
(INormalizationLayer) and Softmax layers pinned to fp32 with OBEY_PRECISION_CONSTRAINTS, DLA and
hardware/version compatibility as the target says. The
engine is then gated against torch fp32 on the GPU with the ONNX thresholds of its precision and
written into the bundle with an `EngineArtifact` (TensorRT version, GPU, compute capability,
hardware-compatibility level) under `manifest["artifacts"]["engines"]`.

Pure helpers (no tensorrt needed, tested everywhere): `trtexec_command`, `fp32_layer_names`,
`engine_file_name`, `default_timing_cache`, `profile_shapes`, `calibration_shapes`,
`tensorrt_version_refusal`.
"""

from __future__ import annotations

import os
import re
import shlex
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cotap.core.artifacts import (
    ENGINES_KEY,
    INPUT_NAME,
    OUTPUT_NAMES,
    EngineArtifact,
    onnx_artifacts,
    replace_record,
)
from cotap.core.bundle import add_files, read_bundle, sha256_file
from cotap.core.engine_compat import (
    DeviceFacts,
    check_engine_io,
    deserialize_plan,
    pad_batch,
    parse_compute_capability,
    parse_version,
    profile_for,
    set_engine_input_shape,
    set_tensor_addresses,
)
from cotap.core.version import install_hint
from cotap.export.fixtures import check_sizes, fixture_images, folder_images, preprocess_batch
from cotap.export.gate import THRESHOLDS, GateError, GateReport, compare_outputs, torch_outputs
from cotap.export.quantize import FP32_OPS
from cotap.export.targets import Target, dla_batch_refusal

GPU_EXTRA_HINT = install_hint("gpu")
HW_LEVEL_TRTEXEC = {
    "none": "none",
    "ampere_plus": "ampere+",
    "same_compute_capability": "sameComputeCapability",
}
NEWEST_TENSORRT_MAJOR = 10  # TensorRT 11 removed the weakly-typed builder flags (FP16, INT8) set here
CALIBRATION_BATCH = 1  # images per IInt8EntropyCalibrator2.get_batch, and the calibration profile's batch
Shape = tuple[int, int, int, int]


class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a CUDA GPU) is missing on this machine."""


def tensorrt_version_refusal(version: str) -> str | None:
    """Why this module cannot build with TensorRT `version` (None when it can).

    The builder sets the weakly-typed precision flags (`BuilderFlag.FP16`/`INT8`, the implicit
    int8 calibrator), which TensorRT 11 removed; the `gpu` extra pins `tensorrt>=10.0,<11`."""
    major = parse_version(version)[0]
    if major <= NEWEST_TENSORRT_MAJOR:
        return None
    return (
        f"TensorRT {version} is installed, and cotap builds engines with the TensorRT "
        f"{NEWEST_TENSORRT_MAJOR} API (TensorRT 11 removed the weakly-typed FP16/INT8 builder flags it "
        f"uses). Install TensorRT {NEWEST_TENSORRT_MAJOR}: {GPU_EXTRA_HINT}, which pins "
        f"tensorrt>={NEWEST_TENSORRT_MAJOR}.0,<{NEWEST_TENSORRT_MAJOR + 1}"
    )


def import_tensorrt() -> Any:
    """`import tensorrt`, or `TensorRTUnavailable` saying how to get it (also for TensorRT 11+)."""
    try:
        import tensorrt as trt
    except ImportError as e:  # ModuleNotFoundError, or missing libnvinfer*.so
        raise TensorRTUnavailable(
            f"TensorRT is not available ({e}). Install the 'gpu' extra on a machine with an NVIDIA GPU: "
            f"{GPU_EXTRA_HINT} (on Jetson, TensorRT comes with JetPack). Without it, use the ONNX model "
            "with onnxruntime, or run the build.sh written by `cotap export batch` on the device."
        ) from e
    refusal = tensorrt_version_refusal(str(trt.__version__))
    if refusal is not None:
        raise TensorRTUnavailable(refusal)
    return trt


def local_device_facts() -> DeviceFacts | None:
    """This machine's first GPU and TensorRT version, or None without TensorRT or a CUDA GPU."""
    try:
        trt = import_tensorrt()
        import torch
    except (TensorRTUnavailable, ImportError):
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return DeviceFacts(
        gpu_name=torch.cuda.get_device_name(0),
        compute_capability=f"{props.major}.{props.minor}",
        tensorrt_version=str(trt.__version__),
        integrated=bool(getattr(props, "is_integrated", False)),
    )


def build_refusal(target: Target, facts: DeviceFacts | None) -> str | None:
    """Why this machine cannot build `target`'s engine (None when it can)."""
    if facts is None:
        return "TensorRT or a CUDA GPU is missing here"
    if facts.integrated and target.hardware_compatibility != "none":
        return (
            f"hardware compatibility {target.hardware_compatibility!r} is not supported on Jetson/DRIVE "
            f"({facts.gpu_name}); build with hardware_compatibility: none"
        )
    here_cc = parse_compute_capability(facts.compute_capability)
    want_cc = parse_compute_capability(target.compute_capability)
    if target.hardware_compatibility == "ampere_plus":
        if here_cc < (8, 0) or facts.integrated:
            return f"Ampere-plus engines need a data-centre/desktop GPU of sm 8.0+, this is {facts.gpu_name}"
    elif here_cc != want_cc:
        return (
            f"target is sm {target.compute_capability} ({target.gpu}), this GPU is {facts.gpu_name} "
            f"(sm {facts.compute_capability})"
        )
    want_trt = parse_version(target.tensorrt)
    if parse_version(facts.tensorrt_version)[: len(want_trt)] != want_trt:
        return f"target needs TensorRT {target.tensorrt}, this machine has {facts.tensorrt_version}"
    return None


def engine_file_name(target: Target) -> str:
    return f"engines/{target.name}/model.plan"


def cuda_version() -> str:
    """The CUDA runtime version of this process as torch reports it ("12.4"), or "none"."""
    try:
        import torch
    except ImportError:
        return "none"
    return str(torch.version.cuda or "none")


def default_timing_cache(facts: DeviceFacts, cuda: str) -> Path:
    """A timing cache that outlives bundles and builds, one per GPU model, compute capability,
    TensorRT version and CUDA version (`cuda`): the tactic timings it holds are only valid for that
    combination, and TensorRT refuses (`set_timing_cache` returns False) one from another."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cotap" / "tensorrt"
    gpu = re.sub(r"[^a-z0-9]+", "-", facts.gpu_name.lower()).strip("-") or "gpu"
    cc = facts.compute_capability.replace(".", "")
    return root / f"timing-{gpu}-sm{cc}-trt{facts.tensorrt_version}-cuda{cuda}.cache"


def fp32_layer_names(onnx_path: str | os.PathLike[str], op_types: Sequence[str] = FP32_OPS) -> list[str]:
    """Names of the ONNX nodes (TensorRT layers are named after them) to keep in fp32."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in op_types and n.name]


def profile_shapes(target: Target, size: tuple[int, int]) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) input shapes of the optimisation profile serving `size` (H, W): the
    target's batch range at that size (on DLA a fixed batch: `Target` validation refuses others)."""
    h, w = size
    return (
        (target.min_batch, 3, h, w),
        (target.opt_batch, 3, h, w),
        (target.max_batch, 3, h, w),
    )


def calibration_shapes(size: tuple[int, int]) -> tuple[Shape, Shape, Shape]:
    """(min, opt, max) of the int8 entropy calibration profile: static, `CALIBRATION_BATCH` images
    of `size`. TensorRT calibrates at the calibration profile's opt shape, so its batch must be the
    number of images the calibrator's `get_batch` hands over per call."""
    shape = (CALIBRATION_BATCH, 3, size[0], size[1])
    return shape, shape, shape


def source_precision(target: Target) -> str:
    """Precision of the ONNX model TensorRT builds from (TensorRT lowers fp32 to fp16 itself)."""
    return "int8" if target.precision == "int8" and target.int8_mode == "qdq" else "fp32"


def trtexec_command(
    target: Target,
    sizes: Sequence[tuple[int, int]],
    *,
    onnx: str = "model.onnx",
    engine: str = "model.plan",
    timing_cache: str = "timing.cache",
    fp32_layers: Sequence[str] = (),
    calibration_cache: str | None = None,
) -> list[str]:
    """The `trtexec` argument list that builds the same engine as `build_engine` for `target`.

    Several sizes become several optimisation profiles (`--profile=i`, trtexec of TensorRT 10).
    """
    cmd = ["trtexec", f"--onnx={onnx}", f"--saveEngine={engine}"]
    multi = len(sizes) > 1
    for i, size in enumerate(sizes):
        if multi:
            cmd.append(f"--profile={i}")
        low, opt, high = ("x".join(str(d) for d in shape) for shape in profile_shapes(target, size))
        cmd += [
            f"--minShapes={INPUT_NAME}:{low}",
            f"--optShapes={INPUT_NAME}:{opt}",
            f"--maxShapes={INPUT_NAME}:{high}",
        ]
    if target.precision in ("fp16", "int8"):
        cmd.append("--fp16")
    if target.precision == "int8":
        cmd.append("--int8")
        if target.int8_mode == "entropy":
            cmd.append(f"--calib={calibration_cache or 'calibration.cache'}")
    cmd += [f"--memPoolSize=workspace:{target.workspace_mb}M", f"--timingCacheFile={timing_cache}"]
    if target.dla_core is not None:
        cmd += [f"--useDLACore={target.dla_core}", "--allowGPUFallback"]
    if target.hardware_compatibility != "none":
        cmd.append(f"--hardwareCompatibilityLevel={HW_LEVEL_TRTEXEC[target.hardware_compatibility]}")
    if target.version_compatible:
        cmd.append("--versionCompatible")
    cmd.append(f"--builderOptimizationLevel={target.builder_optimization_level}")
    if target.precision != "fp32" and fp32_layers:
        spec = ",".join(f"{name}:fp32" for name in fp32_layers)
        cmd += ["--precisionConstraints=obey", f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    cmd.append("--skipInference")
    return cmd


def shell_join(cmd: Sequence[str]) -> str:
    """A copy-pasteable, line-continued shell command."""
    return " \\\n    ".join(shlex.quote(c) for c in cmd)


# -- the build (needs TensorRT and a GPU) -----------------------------------------------------------
def _ensure_onnx(
    bundle_dir: Path, target: Target, sizes: tuple[tuple[int, int], ...], calibration: str | None, force: bool
) -> Any:
    """The bundle's ONNX record to build from, exported (and gated) first when missing."""
    from cotap.export.onnx import export_onnx

    precision = source_precision(target)
    for rec in onnx_artifacts(read_bundle(bundle_dir)):
        static = rec.extra.get("conversion", {}).get("mode") == "static"
        if rec.precision == precision and set(sizes) <= set(rec.sizes) and (precision != "int8" or static):
            return rec
    calib = calibration
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if precision == "int8" and calib is None:
        from cotap.export.fixtures import write_synthetic_folder

        tmp = tempfile.TemporaryDirectory(prefix=".cotap-calib-")
        calib = str(write_synthetic_folder(tmp.name))
    try:
        return export_onnx(
            bundle_dir,
            precision,
            sizes=sizes,
            max_batch=target.max_batch,
            force=force,
            calibration=calib if precision == "int8" else None,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()


def _entropy_calibrator(trt: Any, images: np.ndarray, cache: Path) -> Any:
    """An IInt8EntropyCalibrator2 over preprocessed images (N, 3, H, W), `CALIBRATION_BATCH` per
    batch (the batch of the calibration profile, `calibration_shapes`), cached."""

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.images = images
            self.index = 0
            self.device: Any = None  # the torch CUDA tensor of the batch TensorRT is reading

        def get_batch_size(self) -> int:
            return CALIBRATION_BATCH

        def get_batch(self, names: list[str]) -> list[int] | None:
            import torch

            batch = self.images[self.index : self.index + CALIBRATION_BATCH]
            if len(batch) < CALIBRATION_BATCH:  # a short last batch would not match the profile
                return None
            self.device = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).cuda()
            self.index += CALIBRATION_BATCH
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: bytes) -> None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_bytes(bytes(data))

    return Calibrator()


def _progress_monitor(trt: Any, enabled: bool) -> Any | None:
    """A tqdm-backed IProgressMonitor (TensorRT 10+), so a minutes-long build is never silent."""
    if not enabled or not hasattr(trt, "IProgressMonitor"):
        return None
    from tqdm import tqdm

    class Monitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=parent_phase is None)

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(1)
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Monitor()


def _hardware_level(trt: Any, level: str) -> Any | None:
    """The `trt.HardwareCompatibilityLevel` member for a target's level (None for "none"), or a
    clear error when this TensorRT lacks it (SAME_COMPUTE_CAPABILITY came in a later 10.x)."""
    if level == "none":
        return None
    member = {"ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}[level]
    levels = getattr(trt, "HardwareCompatibilityLevel", None)
    if levels is None or not hasattr(levels, member):
        raise RuntimeError(
            f"this TensorRT ({trt.__version__}) has no HardwareCompatibilityLevel.{member}: build the "
            f"target with hardware_compatibility: none, or with a newer TensorRT 10 release"
        )
    return getattr(levels, member)


def _load_timing_cache(config: Any, path: Path) -> None:
    """Give the builder the timing cache at `path` (an empty one when there is none). A cache that
    TensorRT cannot read or refuses as made elsewhere (`set_timing_cache` returns False) is
    skipped with a warning: the build starts from an empty cache and its own cache replaces it."""
    data = path.read_bytes() if path.is_file() else b""
    cache = None
    try:
        cache = config.create_timing_cache(data)
    except Exception as e:  # a truncated or corrupt file
        warnings.warn(f"timing cache {path} is unreadable ({e}); building without it", stacklevel=3)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    if cache is not None:
        warnings.warn(
            f"timing cache {path} was made on another GPU, TensorRT or CUDA version and was refused; "
            "building without it (this build's cache replaces it)",
            stacklevel=3,
        )
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise RuntimeError("TensorRT refused an empty timing cache")


def _serialize(
    trt: Any,
    onnx_path: Path,
    target: Target,
    sizes: Sequence[tuple[int, int]],
    timing_cache: Path,
    calibrator: Any | None,
    progress: bool,
) -> tuple[bytes, int]:
    """Build the serialized engine; returns (plan bytes, number of layers pinned to fp32).

    Profile i serves sizes[i] (the server and `EngineRunner` select it by that order). With an
    entropy calibrator, calibration runs on its own static profile (`calibration_shapes`) at
    sizes[0], whose batch is the calibrator's."""
    dla = dla_batch_refusal(target)
    if dla is not None:
        raise ValueError(f"target {target.name!r}: {dla}")
    hardware_level = _hardware_level(trt, target.hardware_compatibility)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if parse_version(trt.__version__) < (10,):  # explicit batch is the only mode from TensorRT 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, target.workspace_mb << 20)
    for size in sizes:
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, *profile_shapes(target, size))
        config.add_optimization_profile(profile)
    pinned = 0
    if target.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        keep = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in keep:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
                pinned += 1
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    if target.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if calibrator is not None:
            config.int8_calibrator = calibrator
            calibration = builder.create_optimization_profile()
            calibration.set_shape(INPUT_NAME, *calibration_shapes(sizes[0]))
            if config.set_calibration_profile(calibration) is False:
                raise RuntimeError("TensorRT refused the int8 calibration profile")
    if target.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = target.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if hardware_level is not None:
        config.hardware_compatibility_level = hardware_level
    if target.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    config.builder_optimization_level = target.builder_optimization_level
    monitor = _progress_monitor(trt, progress)
    if monitor is not None:
        config.progress_monitor = monitor
    _load_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(
            f"TensorRT failed to build the engine for target {target.name!r} (see its log above)"
        )
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(plan), pinned


class EngineRunner:
    """Runs a serialized engine on torch CUDA tensors through the I/O tensor API (TensorRT 8.5+)."""

    def __init__(
        self,
        plan: bytes,
        sizes: Sequence[tuple[int, int]],
        *,
        batch: tuple[int, int] = (1, 1 << 30),
        version_compatible: bool = False,
    ) -> None:
        """`sizes`: profile i serves sizes[i]; `batch`: the profiles' (min, max) batch, for messages."""
        import torch

        trt = import_tensorrt()
        self.trt, self.torch = trt, torch
        self.engine = deserialize_plan(trt, plan, version_compatible)
        if self.engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()
        self.sizes = [(int(h), int(w)) for h, w in sizes]  # profile i serves sizes[i]
        self.batch = batch
        self.stream = torch.cuda.Stream()
        check_engine_io(trt, self.engine)  # names, and float32 like the buffers allocated below

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        h, w = images.shape[-2:]
        profile = profile_for(self.sizes, int(h), int(w))
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).cuda()
        self.stream.wait_stream(torch.cuda.current_stream())  # the input copy is done first
        with torch.cuda.stream(self.stream):
            if not self.context.set_optimization_profile_async(profile, self.stream.cuda_stream):
                raise RuntimeError(f"TensorRT could not select optimisation profile {profile}")
            set_engine_input_shape(self.context, tuple(x.shape), profile, self.batch)
            outs = {}
            for name in OUTPUT_NAMES:
                shape = tuple(self.context.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            set_tensor_addresses(
                self.context, {INPUT_NAME: x.data_ptr(), **{k: v.data_ptr() for k, v in outs.items()}}
            )
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}


def build_engine(
    bundle_dir: str | os.PathLike[str],
    target: Target,
    *,
    calibration: str | os.PathLike[str] | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = False,
    fixture_count: int = 8,
) -> EngineArtifact:
    """Build, gate and add `target`'s engine to the bundle; returns its record. Needs TensorRT + GPU."""
    trt = import_tensorrt()
    facts = local_device_facts()
    if facts is None:
        raise TensorRTUnavailable("no CUDA GPU is visible: TensorRT engines are built on the GPU they run on")
    refusal = build_refusal(target, facts)
    if refusal is not None:
        raise ValueError(
            f"cannot build target {target.name!r} here: {refusal}. Build it on the device with the "
            "build.sh that `cotap export batch` writes, or pick a target matching this machine."
        )
    bundle = read_bundle(bundle_dir)
    cfg = bundle.config
    sizes = check_sizes(list(target.sizes or cfg.input_sizes), cfg.patch_size)
    source = _ensure_onnx(
        bundle.path, target, sizes, None if calibration is None else str(calibration), force
    )
    onnx_path = bundle.path / source.file
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(facts, cuda_version())
    name = engine_file_name(target)
    with tempfile.TemporaryDirectory(prefix=".cotap-trt-") as tmp:
        calib_cache = Path(tmp) / "calibration.cache"
        calibrator = None
        if target.precision == "int8" and target.int8_mode == "entropy":
            images = folder_images(calibration) if calibration else fixture_images(count=32)
            calibrator = _entropy_calibrator(
                trt, preprocess_batch(images, cfg.preprocess, sizes[0]), calib_cache
            )
        plan, pinned = _serialize(trt, onnx_path, target, sizes, cache_path, calibrator, progress)
        report = _gate_engine(plan, bundle.path, target, sizes, fixture_count)
        if not report.passed and not force:
            raise GateError(
                f"accuracy gate failed for the {target.precision} TensorRT engine of target {target.name!r}; "
                f"nothing was written (pass --force to keep it):\n{report.summary()}",
                report,
            )
        plan_path = Path(tmp) / "model.plan"
        plan_path.write_bytes(plan)
        files: dict[str, Path] = {name: plan_path}
        if calib_cache.is_file():
            files[f"engines/{target.name}/calibration.cache"] = calib_cache
        record = EngineArtifact(
            file=name,
            target=target.name,
            precision=target.precision,
            sizes=sizes,
            min_batch=target.min_batch,
            opt_batch=target.opt_batch,
            max_batch=target.max_batch,
            tensorrt_version=facts.tensorrt_version,
            gpu_name=facts.gpu_name,
            compute_capability=facts.compute_capability,
            hardware_compatibility_level=target.hardware_compatibility,
            sha256=sha256_file(plan_path),
            gate=report.to_dict(),
            forced=force and not report.passed,
            extra={
                "onnx": {"file": source.file, "sha256": source.sha256, "precision": source.precision},
                "version_compatible": target.version_compatible,
                "workspace_mb": target.workspace_mb,
                "dla_core": target.dla_core,
                "int8_mode": target.int8_mode if target.precision == "int8" else None,
                "fp32_layers": pinned,
                "builder_optimization_level": target.builder_optimization_level,
                "timing_cache": str(cache_path),
                "jetpack": target.jetpack,
                "target": target.to_dict(),
            },
        )
        records = list(read_bundle(bundle.path).artifacts.get(ENGINES_KEY, []))
        add_files(bundle.path, files, artifacts={ENGINES_KEY: replace_record(records, record.to_dict())})
    return record


def _gate_engine(
    plan: bytes, bundle_dir: Path, target: Target, sizes: Sequence[tuple[int, int]], fixture_count: int
) -> GateReport:
    """The ONNX gate, run on the engine: torch fp32 (CPU) against TensorRT on this GPU."""
    from cotap.training.checkpoints import load_model

    bundle = read_bundle(bundle_dir)
    model = load_model(bundle_dir).model.float().eval()
    runner = EngineRunner(
        plan,
        sizes,
        batch=(target.min_batch, target.max_batch),
        version_compatible=target.version_compatible,
    )
    images = fixture_images(count=fixture_count)
    thresholds = THRESHOLDS[target.precision]
    reports = []
    for size in sizes:
        x = preprocess_batch(images, bundle.config.preprocess, size)
        chunk = max(target.min_batch, min(target.max_batch, len(x)))
        got: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUT_NAMES}
        for i in range(0, len(x), chunk):
            part = x[i : i + chunk]
            out = runner(pad_batch(part, target.min_batch))  # profiles start at min_batch
            for k in OUTPUT_NAMES:
                got[k].append(out[k][: len(x[i : i + chunk])])
        report = compare_outputs(
            torch_outputs(model, x), {k: np.concatenate(v) for k, v in got.items()}, thresholds
        )
        report.size = (int(size[0]), int(size[1]))
        reports.append(report)
    trt = import_tensorrt()
    return GateReport(
        precision=target.precision,
        thresholds=thresholds,
        sizes=reports,
        sources={"synthetic": fixture_count},
        runtime={"reference": "torch fp32 eager (CPU)", "candidate": f"TensorRT {trt.__version__}"},
    )
