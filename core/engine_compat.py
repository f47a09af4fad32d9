"""Can this machine run that TensorRT engine? A pure check on the engine's manifest record.

TensorRT engines are tied to the GPU and the TensorRT version they were built with (the most
common TensorRT complaint: "engine plan file is generated on an incompatible device"). The exporter
records the facts in `EngineArtifact`; the server's TensorRT backend gathers the same facts about
its own GPU and calls `check_engine_compatible` before deserialising, so a mismatch is refused with
a message that says what to rebuild instead of a crash or silent slowness. No tensorrt import here.

Rules (TensorRT documentation, "Engine Compatibility"):

- TensorRT version: by default the runtime must be the exact version the engine was built with
  (major.minor.patch; the build number is compared when both sides give one). Engines built with
  `version_compatible` (TensorRT 8.6 or newer) also run on any later runtime.
- Hardware: `none` needs the same compute capability (and, on a different GPU model of the same
  compute capability, works with a warning: TensorRT may have picked tactics that are slow or
  unavailable there). `same_compute_capability` needs the same compute capability. `ampere_plus`
  needs compute capability 8.0 or newer on a non-Jetson GPU (hardware compatibility is not
  supported on JetPack).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cotap.core.artifacts import INPUT_NAME, OUTPUT_NAMES

HARDWARE_LEVELS = ("none", "ampere_plus", "same_compute_capability")


class EngineCompatibilityError(Exception):
    """An engine that this machine must not load; the message says what to rebuild."""


@dataclass(frozen=True)
class DeviceFacts:
    """A GPU of this machine as TensorRT sees it (the server's and the exporter's TensorRT code,
    which may import torch, read it; core does not)."""

    gpu_name: str
    compute_capability: str  # "8.7"
    tensorrt_version: str  # "10.3.0.26"
    integrated: bool = False  # Jetson / DRIVE (shared memory iGPU)


@dataclass(frozen=True)
class Compatibility:
    """The verdict: `ok`, the reasons when not, and warnings that do not block loading."""

    ok: bool
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)


def parse_version(text: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26); non-numeric tails ('8.6.1.post1') are dropped."""
    parts: list[int] = []
    for piece in str(text).strip().split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts)


def parse_compute_capability(text: str) -> tuple[int, int]:
    """'8.7' -> (8, 7)."""
    try:
        major, minor = str(text).strip().split(".")
        return int(major), int(minor)
    except ValueError as e:
        raise ValueError(f"compute capability must look like '8.7', got {text!r}") from e


def same_tensorrt(built: str, running: str) -> bool:
    """Same major.minor.patch, and the same build number when both versions give one."""
    b, r = parse_version(built), parse_version(running)
    if b[:3] != r[:3]:
        return False
    return len(b) < 4 or len(r) < 4 or b[3] == r[3]


def _get(record: Any, name: str, default: Any = None) -> Any:
    if isinstance(record, Mapping):
        return record.get(name, default)
    return getattr(record, name, default)


def engine_compatibility(record: Any, device: DeviceFacts) -> Compatibility:
    """Compare an engine record (`EngineArtifact` or its dict) with this machine's facts."""
    reasons: list[str] = []
    warnings: list[str] = []
    built_trt = str(_get(record, "tensorrt_version", ""))
    extra = _get(record, "extra", {}) or {}
    version_compatible = bool(extra.get("version_compatible", False))
    if version_compatible:
        if parse_version(device.tensorrt_version) < parse_version(built_trt):
            reasons.append(
                f"it was built with TensorRT {built_trt} (version-compatible) and this machine has the "
                f"older TensorRT {device.tensorrt_version}"
            )
    elif not same_tensorrt(built_trt, device.tensorrt_version):
        reasons.append(
            f"it was built with TensorRT {built_trt} and this machine has TensorRT {device.tensorrt_version}"
        )
    level = str(_get(record, "hardware_compatibility_level", "none"))
    if level not in HARDWARE_LEVELS:
        reasons.append(f"unknown hardware compatibility level {level!r}")
    built_cc = parse_compute_capability(str(_get(record, "compute_capability", "0.0")))
    here_cc = parse_compute_capability(device.compute_capability)
    built_gpu = str(_get(record, "gpu_name", ""))
    if level == "ampere_plus":
        if here_cc < (8, 0):
            reasons.append(
                f"it is an Ampere-plus engine and this GPU ({device.gpu_name}, sm {device.compute_capability}) "
                "is older than Ampere (sm 8.0)"
            )
        if device.integrated:
            reasons.append("hardware-compatible (Ampere-plus) engines are not supported on Jetson/DRIVE")
    elif here_cc != built_cc:
        reasons.append(
            f"it was built for compute capability {built_cc[0]}.{built_cc[1]} ({built_gpu}) and this GPU is "
            f"{device.gpu_name} with compute capability {device.compute_capability}"
        )
    elif level == "none" and built_gpu and built_gpu != device.gpu_name:
        warnings.append(
            f"engine was built on {built_gpu} and runs here on {device.gpu_name} (same compute capability): "
            "it should load, but its tactics were timed on the other GPU; rebuild here for best speed"
        )
    return Compatibility(ok=not reasons, reasons=tuple(reasons), warnings=tuple(warnings))


def check_engine_compatible(record: Any, device: DeviceFacts) -> Compatibility:
    """Raise `EngineCompatibilityError` naming what to rebuild when the engine cannot run here."""
    verdict = engine_compatibility(record, device)
    if not verdict.ok:
        target = _get(record, "target", "?")
        file = _get(record, "file", "?")
        raise EngineCompatibilityError(
            f"TensorRT engine {file} (target {target!r}) cannot be loaded here: "
            + "; ".join(verdict.reasons)
            + f". Rebuild it on this machine with `cotap export tensorrt --bundle BUNDLE --target {target}` "
            f"(a target for {device.gpu_name}, sm {device.compute_capability}, TensorRT "
            f"{device.tensorrt_version}), or serve the bundle's ONNX model with onnxruntime instead."
        )
    return verdict


# -- runtime calls shared by the exporter's accuracy gate and the server's backend ---------------
def deserialize_plan(trt: Any, plan: bytes, version_compatible: bool) -> Any | None:
    """The `ICudaEngine` of a serialized plan, or None when TensorRT cannot load it. A
    version-compatible plan embeds the lean runtime (host code), which a runtime only loads with
    `engine_host_code_allowed` set before it deserialises. `trt` is the tensorrt module."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if version_compatible:
        runtime.engine_host_code_allowed = True
    return runtime.deserialize_cuda_engine(plan)


def check_engine_io(trt: Any, engine: Any) -> None:
    """Raise `RuntimeError` unless the engine's I/O tensors are the bundle contract: one input
    `images` and the outputs `OUTPUT_NAMES`, all float32. The runners allocate float32 torch
    buffers for them, so an engine with fp16 I/O (a plan built with `trtexec --inputIOFormats` or
    `--outputIOFormats`, say) would otherwise read or write half-filled buffers without an error."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    problems = []
    if inputs != [INPUT_NAME] or sorted(outputs) != sorted(OUTPUT_NAMES):
        problems.append(
            f"it has inputs {inputs} and outputs {outputs}, the bundle contract is input "
            f"{INPUT_NAME!r} and outputs {list(OUTPUT_NAMES)}"
        )
    dtypes = {n: engine.get_tensor_dtype(n) for n in names}
    wrong = {n: str(d) for n, d in dtypes.items() if d != trt.float32}
    if wrong:
        problems.append(f"I/O tensors must be float32, these are not: {wrong}")
    if problems:
        raise RuntimeError("the TensorRT engine does not fit the bundle contract: " + "; ".join(problems))


def set_tensor_addresses(context: Any, addresses: Mapping[str, int]) -> None:
    """`context.set_tensor_address` for each tensor, raising when TensorRT refuses one (it
    returns False for an unknown name or a misaligned address, and would then run on stale ones)."""
    for name, address in addresses.items():
        if not context.set_tensor_address(name, int(address)):
            raise RuntimeError(f"TensorRT refused the device address of tensor {name!r}")


def set_engine_input_shape(
    context: Any, shape: tuple[int, ...], profile: int, batch: tuple[int, int]
) -> None:
    """`context.set_input_shape` for the images input, raising when TensorRT refuses the shape
    (it returns False for a shape outside the selected profile's min..max)."""
    if not context.set_input_shape(INPUT_NAME, tuple(shape)):
        raise RuntimeError(
            f"TensorRT refused input shape {tuple(shape)} for optimisation profile {profile} "
            f"(batch {batch[0]}..{batch[1]} at its size)"
        )


def profile_for(sizes: Sequence[tuple[int, int]], h: int, w: int) -> int:
    """The optimisation profile serving input size (h, w): its index in the record's `sizes`."""
    try:
        return list(sizes).index((h, w))
    except ValueError:
        raise ValueError(
            f"the TensorRT engine has no optimisation profile for input size {h}x{w} (it serves "
            + ", ".join(f"{a}x{b}" for a, b in sizes)
            + ")"
        ) from None


def pad_batch(images: np.ndarray, min_batch: int) -> np.ndarray:
    """`images` with its last image repeated up to `min_batch` (profiles start at min_batch); the
    caller keeps the first len(images) rows of each output."""
    if len(images) >= min_batch:
        return images
    return np.concatenate([images, np.repeat(images[-1:], min_batch - len(images), axis=0)])
