"""The TensorRT backend: native engines the exporter recorded in the bundle (`artifacts["engines"]`).

An engine only runs on the GPU and TensorRT version it was built for, so every record is checked
against this machine first (`cotap.core.engine_compat`) and a mismatch is refused with what to
rebuild. `tensorrt` is imported lazily (an optional GPU extra); I/O buffers are torch CUDA tensors
and post-processing runs in torch on the same GPU.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from cotap.core.artifacts import INPUT_NAME, OUTPUT_NAMES, EngineArtifact, engine_artifacts
from cotap.core.bundle import Bundle
from cotap.core.engine_compat import DeviceFacts, engine_compatibility
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
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = runtime.deserialize_cuda_engine(bundle.file(record.file).read_bytes())
            if engine is None:
                raise BackendError(
                    f"TensorRT could not deserialise {record.file}; rebuild it on this machine with "
                    f"`cotap export tensorrt --bundle {bundle.path} --target {record.target}`"
                )
            self._engine = engine
            self._context = engine.create_execution_context()
        self._lock = threading.Lock()  # one execution context, used by one thread at a time
        self.ops = TorchOps(self._dev)

    def forward(self, images: np.ndarray) -> dict[str, Any]:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self._dev)  # (B, 3, H, W)
        with self._lock, torch.cuda.device(self._dev):
            ctx = self._context
            ctx.set_input_shape(INPUT_NAME, tuple(x.shape))
            ctx.set_tensor_address(INPUT_NAME, x.data_ptr())
            outs = {}
            for name in OUTPUT_NAMES:
                t = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=torch.float32, device=self._dev)
                ctx.set_tensor_address(name, t.data_ptr())
                outs[name] = t
            stream = torch.cuda.current_stream(self._dev)
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            stream.synchronize()
        return outs

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d |= {
            "engine": self.record.file,
            "target": self.record.target,
            "gate_passed": self.record.gate.get("passed"),
            "forced": self.record.forced,
        }
        return d
