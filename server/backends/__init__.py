"""Backends behind one interface (`base.Backend`) and the choice between them.

`auto` takes TensorRT when an engine in the bundle runs on this machine, else ONNX Runtime when
the bundle has an ONNX model (and it can use the GPU, or there is none for torch), else torch.
Heavy libraries are imported only for the backend chosen.
"""

from __future__ import annotations

import importlib.util

from cotap.core.artifacts import serving_onnx
from cotap.core.bundle import Bundle
from cotap.core.version import install_hint
from cotap.server.backends.base import Backend, BackendError, BackendOptions, NumpyOps, PostOps

BACKENDS = ("torch", "onnxruntime", "tensorrt")

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BackendOptions",
    "NumpyOps",
    "PostOps",
    "build_backend",
    "choose_backend",
]


def _torch_has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _ort_has_gpu() -> bool:
    if importlib.util.find_spec("onnxruntime") is None:
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def choose_backend(bundle: Bundle, name: str, options: BackendOptions) -> tuple[str, list[str]]:
    """(backend name, why the better ones were passed over) for `name` in auto|torch|onnxruntime|tensorrt."""
    if name != "auto":
        if name not in BACKENDS:
            raise BackendError(f"unknown backend {name!r}: use auto, {', '.join(BACKENDS)}")
        return name, []
    notes: list[str] = []
    if importlib.util.find_spec("tensorrt") is not None and options.device != "cpu":
        from cotap.server.backends.tensorrt_backend import engine_device_index, usable_engine

        record, _, reason = usable_engine(bundle, options.precision, engine_device_index(options.device))
        if record is not None:
            return "tensorrt", notes
        notes.append(f"tensorrt: {reason}")
    else:
        notes.append("tensorrt: not installed or device is cpu")
    if importlib.util.find_spec("onnxruntime") is None:
        notes.append("onnxruntime: not installed")
    elif not serving_onnx(bundle):
        notes.append(
            "onnxruntime: the bundle has no ONNX model for all its input sizes (cotap export onnx --bundle BUNDLE)"
        )
    elif options.device == "cpu" or not _torch_has_cuda() or _ort_has_gpu():
        return "onnxruntime", notes
    else:
        notes.append("onnxruntime: CPU-only build while torch has a GPU")
    if importlib.util.find_spec("torch") is None:
        raise BackendError(
            "no backend can serve this bundle: torch is not installed and "
            + "; ".join(notes)
            + f". Install torch first (pip install torch, or your CUDA build), then {install_hint('train')}; "
            "or export an ONNX model into the bundle (cotap export onnx --bundle BUNDLE)"
        )
    return "torch", notes


def build_backend(bundle: Bundle, name: str, options: BackendOptions) -> Backend:
    """Load `bundle` on the backend `name` (or the one `auto` picks). Raises `BackendError`."""
    chosen, notes = choose_backend(bundle, name, options)
    backend: Backend
    if chosen == "torch":
        if importlib.util.find_spec("torch") is None:
            raise BackendError(
                f"the torch backend needs torch: pip install torch, then {install_hint('train')}"
            )
        from cotap.server.backends.torch_backend import TorchBackend

        backend = TorchBackend(bundle, options)
    elif chosen == "onnxruntime":
        from cotap.server.backends.onnxruntime_backend import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(bundle, options)
    else:
        from cotap.server.backends.tensorrt_backend import TensorRTBackend

        backend = TensorRTBackend(bundle, options)
    backend.selection_notes = notes
    return backend
