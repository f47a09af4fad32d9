"""float32 -> float16 through ONNX Runtime's Cast kernel.

NumPy's `astype(float16)` converts value by value (0.7 ms for one ViT-S/16 answer of 197 x 768
floats here); ONNX Runtime's Cast is vectorised (0.03 ms) and rounds the same way (to nearest,
ties to even; overflow to inf; NaN stays NaN), which a test checks bit for bit wherever the suite
runs (verified: x86-64, onnxruntime 1.32). The float16 answer is the binary default, so this sits
on every request's path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# ModelProto (IR 7, opset 13): y = Cast(x, to=FLOAT16), x float32 of any shape. Serialised here
# because the `onnx` package is not a serving dependency; tests rebuild it with `onnx.helper`.
CAST_F32_F16_ONNX = (
    b'\x08\x07\x12\x05cotap:5\n\x17\n\x01x\x12\x01y"\x04Cast*\t\n\x02to\x18\n\xa0\x01\x02\x12\x04cast'
    b"Z\t\n\x01x\x12\x04\n\x02\x08\x01b\t\n\x01y\x12\x04\n\x02\x08\nB\x04\n\x00\x10\r"
)


class HalfCast:
    """A callable float32 array -> float16 array (same shape, C order), safe from any thread."""

    def __init__(self, ort: Any) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1  # one answer at a time, on the worker thread that asks
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # no memory arena: it never shrinks, so one large answer (a dense similarity) would keep its
        # peak for good; plain allocations cost 0.01 ms per ViT-S answer
        so.enable_cpu_mem_arena = False
        self._session = ort.InferenceSession(CAST_F32_F16_ONNX, so, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]
        return out
