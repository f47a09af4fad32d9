"""The torch backend: the bundle's weights in a `CoTAPViT`, on the CPU (fp32, or bf16 autocast) or
a CUDA device (fp16 or bf16 autocast, fp32 on request). Post-processing runs in torch on the same
device (`TorchOps`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from cotap.core.bundle import WEIGHTS, Bundle
from cotap.server.backends.base import Backend, BackendError, BackendOptions
from cotap.server.backends.torch_ops import TorchOps
from cotap.training.checkpoints import load_state_dict_strict
from cotap.training.distributed import resolve_device as checked_device
from cotap.training.models import CoTAPViT, ViTConfig

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
_threads_lock = threading.Lock()


def resolve_device(device: str) -> torch.device:
    """The training side's device check (auto, cpu, cuda[:N] that exists) as a BackendError; the
    torch backend runs on cpu or cuda."""
    try:
        dev = checked_device(device)
    except ValueError as e:
        raise BackendError(str(e)) from None
    if dev.type not in ("cpu", "cuda"):
        raise BackendError(f"the torch backend runs on cpu or cuda, not {dev.type!r}")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "int8":
        raise BackendError(
            "the torch backend has no int8 path; export an int8 ONNX model (`cotap export onnx "
            "--bundle BUNDLE --precision int8`) and serve it with --backend onnxruntime"
        )
    if precision == "fp16" and device.type == "cpu":
        raise BackendError("fp16 on the CPU is not supported by the torch backend; use fp32 or bf16")
    return precision


class TorchBackend(Backend):
    kind = "torch"

    def __init__(self, bundle: Bundle, options: BackendOptions) -> None:
        super().__init__(bundle, options)
        dev = resolve_device(options.device)
        self.precision = resolve_precision(options.precision, dev)
        if options.intra_op_threads and dev.type == "cpu":
            with _threads_lock:
                torch.set_num_threads(options.intra_op_threads)
        try:
            model = CoTAPViT(ViTConfig.from_dict(bundle.config.model))
            load_state_dict_strict(model, load_safetensors(bundle.read_verified(WEIGHTS)))
        except Exception as e:
            raise BackendError(
                f"bundle {bundle.path}: weights do not load into {bundle.config.arch}: {e}"
            ) from e
        self.model = model.eval().to(dev)
        self._device = dev
        self.device = str(dev)
        self.ops = TorchOps(dev)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision in _AUTOCAST:
            return torch.autocast(self._device.type, dtype=_AUTOCAST[self.precision])
        return contextlib.nullcontext()

    @torch.inference_mode()
    def forward(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))  # (B, 3, H, W)
        if self._device.type == "cuda":
            x = x.pin_memory().to(self._device, non_blocking=True)
        with self._autocast():
            out = self.model.forward_features(x)
        return {k: v.float() for k, v in out.items()}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["threads"] = torch.get_num_threads() if self._device.type == "cpu" else None
        return d

    def close(self) -> None:
        del self.model
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
