"""The TensorRT backend: native engines the exporter recorded in the bundle (`artifacts["engines"]`).

An engine only runs on the GPU and TensorRT version it was built for, so every record is checked
against this machine first (`cotap.core.engine_compat`) and a mismatch is refused with what to
rebuild. `tensorrt` is imported lazily (an optional GPU extra); I/O buffers are torch CUDA tensors
and post-processing runs in torch on the same GPU.

An engine carries one optimisation profile per input size, in the order of its record's `sizes`
(the exporter builds them so); `forward` selects the profile of the batch's (H, W), pads batches
smaller than the record's `min_batch`, and runs on the backend's own CUDA stream, ordered after the
input copy and before whatever the caller's stream does with the outputs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from cotap.core.artifacts import INPUT_NAME, OUTPUT_NAMES, EngineArtifact, engine_artifacts
from cotap.core.bundle import Bundle
from cotap.core.engine_compat import (
    DeviceFacts,
    check_engine_io,
    deserialize_plan,
    engine_compatibility,
    pad_batch,
    profile_for,
    set_engine_input_shape,
    set_tensor_addresses,
)
from cotap.server.backends.base import Backend, BackendError, BackendOptions, cuda_index


def engine_device_index(device: str) -> int | None:
    """The CUDA device index `--device` names for TensorRT (None: the current one); engines never
    run on the CPU."""
    if device == "cpu":
        raise BackendError(
            "TensorRT engines run on NVIDIA GPUs only; for --device cpu serve the bundle with "
            "--backend onnxruntime or --backend torch"
        )
    return cuda_index(device)


def device_facts(index: int | None = None) -> tuple[DeviceFacts | None, str]:
    """GPU `index` (default: the current one) as TensorRT sees it, or None with the reason it
    cannot run engines."""
    try:
        import tensorrt as trt
        import torch
    except Exception as e:  # ModuleNotFoundError, or missing libnvinfer*.so
        return None, f"tensorrt cannot be imported here ({e}); install the 'gpu' extra from NVIDIA's index"
    if not torch.cuda.is_available():
        return None, "no CUDA device visible to torch; TensorRT engines need one"
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        return None, f"device cuda:{index} does not exist: {count} CUDA device(s)"
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    return (
        DeviceFacts(
            gpu_name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            tensorrt_version=str(trt.__version__),
            integrated=bool(getattr(props, "is_integrated", False)),
        ),
        "",
    )


def usable_engine(
    bundle: Bundle, precision: str, device_index: int | None = None
) -> tuple[EngineArtifact | None, list[str], str]:
    """(an engine that runs on GPU `device_index` here or None, warnings, the reason when None).
    Never raises."""
    records = engine_artifacts(bundle)
    if not records:
        return (
            None,
            [],
            (
                f"bundle {bundle.config.name!r} has no TensorRT engine: build one on this machine with "
                f"`cotap export tensorrt --bundle {bundle.path} --target TARGET`"
            ),
        )
    facts, why = device_facts(device_index)
    if facts is None:
        return None, [], why
    reasons = []
    declared = set(bundle.config.input_sizes)
    for r in records:
        if precision not in ("auto", r.precision):
            reasons.append(f"{r.file}: precision {r.precision}, asked for {precision}")
            continue
        if not declared <= set(r.sizes):
            reasons.append(
                f"{r.file}: built for sizes {[list(s) for s in r.sizes]}, the bundle declares {sorted(declared)}"
            )
            continue
        verdict = engine_compatibility(r, facts)
        if verdict.ok:
            return r, list(verdict.warnings), ""
        reasons.append(f"{r.file} (target {r.target!r}): " + "; ".join(verdict.reasons))
    return (
        None,
        [],
        (
            "no TensorRT engine in the bundle runs here: "
            + " | ".join(reasons)
            + f". Rebuild one on this machine ({facts.gpu_name}, sm {facts.compute_capability}, TensorRT "
            f"{facts.tensorrt_version}) with `cotap export tensorrt --bundle {bundle.path} --target TARGET`, "
            "or serve the ONNX model with --backend onnxruntime"
        ),
    )


class ProfileBinding:
    """Which profile an execution context has selected, and the input shape set on it.

    TensorRT uses profile 0 until told otherwise, so every other size needs
    `set_optimization_profile_async` (enqueued on the stream that runs the engine) before its
    shape is set; `set_input_shape` returns False for a shape outside the profile, which is an
    error here rather than a silent wrong-shaped run."""

    def __init__(self, context: Any, sizes: Sequence[tuple[int, int]], batch: tuple[int, int]) -> None:
        self.context = context
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.batch = batch  # (min, max) of every profile
        self.active = 0  # a fresh context runs profile 0

    def bind(self, shape: tuple[int, ...], stream_handle: int) -> int:
        """Select the profile of `shape` (B, 3, H, W) and set the input shape; returns the profile."""
        try:
            profile = profile_for(self.sizes, int(shape[2]), int(shape[3]))
        except ValueError as e:
            raise BackendError(str(e)) from None
        if profile != self.active:
            if not self.context.set_optimization_profile_async(profile, stream_handle):
                raise RuntimeError(f"TensorRT could not select optimisation profile {profile}")
            self.active = profile
        set_engine_input_shape(self.context, tuple(shape), profile, self.batch)
        return profile


class TensorRTBackend(Backend):
    kind = "tensorrt"

    def __init__(self, bundle: Bundle, options: BackendOptions) -> None:
        super().__init__(bundle, options)
        index = engine_device_index(options.device)
        record, warnings, reason = usable_engine(bundle, options.precision, index)
        if record is None:
            raise BackendError(reason)
        import tensorrt as trt
        import torch

        from cotap.server.backends.torch_ops import TorchOps

        self.warnings += warnings
        self._torch = torch
        self.record = record
        self.precision = record.precision
        self.max_batch = record.max_batch
        self.sizes = frozenset(record.sizes)
        self._dev = torch.device("cuda", torch.cuda.current_device() if index is None else index)
        self.device = str(self._dev)
        with torch.cuda.device(self._dev):  # TensorRT works on the current CUDA device
            compatible = bool((record.extra or {}).get("version_compatible", False))
            engine = deserialize_plan(trt, bundle.read_verified(record.file), compatible)
            if engine is None:
                raise BackendError(
                    f"TensorRT could not deserialise {record.file}; rebuild it on this machine with "
                    f"`cotap export tensorrt --bundle {bundle.path} --target {record.target}`"
                )
            try:
                check_engine_io(trt, engine)
            except RuntimeError as e:
                raise BackendError(
                    f"{record.file}: {e}; rebuild it with `cotap export tensorrt --bundle {bundle.path} "
                    f"--target {record.target}`"
                ) from None
            self._engine = engine
            self._context = engine.create_execution_context()
            self._stream = torch.cuda.Stream(self._dev)  # the engine's own stream, not the default one
        self._profiles = ProfileBinding(self._context, record.sizes, (record.min_batch, record.max_batch))
        self._lock = threading.Lock()  # one execution context, used by one thread at a time
        self.ops = TorchOps(self._dev)

    def forward(self, images: np.ndarray) -> dict[str, Any]:
        torch = self._torch
        n = len(images)
        padded = pad_batch(np.ascontiguousarray(images, dtype=np.float32), self.record.min_batch)
        with self._lock, torch.cuda.device(self._dev):
            caller = torch.cuda.current_stream(self._dev)
            x = torch.from_numpy(padded).to(self._dev)  # (B, 3, H, W), copied on the caller's stream
            outs = {}
            ctx, stream = self._context, self._stream
            self._profiles.bind(tuple(x.shape), stream.cuda_stream)
            for name in OUTPUT_NAMES:  # allocated on the caller's stream, which consumes them
                shape = tuple(ctx.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=torch.float32, device=self._dev)
            set_tensor_addresses(
                ctx, {INPUT_NAME: x.data_ptr(), **{k: v.data_ptr() for k, v in outs.items()}}
            )
            stream.wait_stream(caller)  # the input copy and the output allocations come first
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            caller.wait_stream(stream)  # work the caller queues on its stream reads finished outputs
            stream.synchronize()  # and the context is idle before the next forward rebinds it
        return {k: v[:n] for k, v in outs.items()} if len(padded) > n else outs

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d |= {
            "engine": self.record.file,
            "target": self.record.target,
            "gate_passed": self.record.gate.get("passed"),
            "forced": self.record.forced,
        }
        return d
