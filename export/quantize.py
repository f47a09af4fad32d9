"""fp32 ONNX -> fp16 or int8 ONNX, keeping float32 inputs and outputs (the `cotap.core.artifacts`
contract).

- fp16: ONNX Runtime's converter (`onnxruntime.transformers.float16`), which handles the Cast nodes
  of the legacy exporter's attention (onnxconverter-common does not; see the environment notes).
  LayerNormalization and Softmax stay in fp32: their reductions overflow in fp16 on ViTs.
- int8 dynamic: weights of MatMul/Gemm quantised to QInt8 ahead of time, activations at run time.
- int8 static: a QDQ model calibrated on an image folder (MinMax), symmetric QInt8 activations and
  per-channel weights, which is also the form TensorRT's explicit quantisation reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from PIL import Image

from cotap.core.artifacts import INPUT_NAME
from cotap.core.preprocess import PreprocessConfig
from cotap.export.fixtures import preprocess_batch

FP32_OPS = ("LayerNormalization", "Softmax")  # kept in fp32 inside fp16 models
INT8_OPS = ("MatMul", "Gemm")  # ConvInteger with int8 weights has no CPU kernel; the patch conv stays fp32


@dataclass(frozen=True)
class Int8Config:
    """How an int8 model is made; saved in the manifest record."""

    mode: str = "dynamic"  # dynamic | static
    op_types: tuple[str, ...] = INT8_OPS
    per_channel: bool = True
    calibration_images: int = 0
    calibration_method: str = "minmax"
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs "Please consider to run pre-processing" on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` in place so every node comes after the producers of its inputs (stable)."""
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(name in known for name in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({n for node in rest for n in node.input if n not in known})
            raise ValueError(f"ONNX graph has a cycle or dangling inputs: {missing[:5]}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def inline_weight_identities(model: onnx.ModelProto) -> int:
    """Point the consumers of `Identity(initializer)` at the initializer itself and drop the
    Identity, in place; returns how many. The legacy exporter routes weights a module reuses (the
    object-aware filter runs the last block's attention and MLP a second time) through Identity
    nodes, and ONNX Runtime's quantiser only treats a MatMul input as a weight when it is an
    initializer: without this, those MatMuls stay fp32 (dynamic) or get their per-channel weights
    quantised twice, per-channel then per-tensor (static)."""
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Identity" and n.input[0] in weights and n.output[0] not in outputs
    }
    if not alias:
        return 0
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output and n.output[0] in alias)]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    return len(alias)


def _weights_inlined(src: str | os.PathLike[str]) -> tuple[onnx.ModelProto, int]:
    """(the model at `src` with `inline_weight_identities` applied, how many it inlined); the
    quantisers take the ModelProto itself."""
    model = onnx.load(str(src))
    return model, inline_weight_identities(model)


def to_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> dict[str, Any]:
    """Convert an fp32 ONNX file to fp16 weights and compute, float32 I/O. Returns its settings."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    block = [*DEFAULT_OP_BLOCK_LIST, *FP32_OPS]
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    topological_sort(converted.graph)  # the converter appends its input casts at the end
    onnx.save(converted, str(dst))
    return {
        "converter": "onnxruntime.transformers.float16",
        "fp32_ops": list(FP32_OPS),
        "keep_io_types": True,
    }


def to_int8_dynamic(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], config: Int8Config = Int8Config()
) -> dict[str, Any]:
    """Dynamic quantisation: QInt8 weights, activations quantised per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, inlined = _weights_inlined(src)
    with _quiet_root_logger():
        quantize_dynamic(
            model,
            str(dst),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(config.op_types),
            per_channel=config.per_channel,
        )
    return {
        "mode": "dynamic",
        "weight_type": "QInt8",
        "weight_identities_inlined": inlined,
        "op_types": list(config.op_types),
        "per_channel": config.per_channel,
    }


class ImageCalibrationReader:
    """`onnxruntime.quantization.CalibrationDataReader` over preprocessed images, one per call, at
    every declared size (so each size's activation ranges are seen)."""

    def __init__(
        self, images: Sequence[Image.Image], preprocess: PreprocessConfig, sizes: Sequence[tuple[int, int]]
    ) -> None:
        self.images = list(images)
        self.preprocess = preprocess
        self.sizes = list(sizes)
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for size in self.sizes:
            x = preprocess_batch(self.images, self.preprocess, size)  # (N, 3, H, W)
            for i in range(x.shape[0]):
                yield {INPUT_NAME: x[i : i + 1]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None

    def __len__(self) -> int:
        return len(self.images) * len(self.sizes)


def to_int8_static(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    reader: ImageCalibrationReader,
    config: Int8Config = Int8Config(mode="static"),
) -> dict[str, Any]:
    """Static QDQ quantisation calibrated with `reader` (symmetric QInt8, per-channel weights)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if len(reader) == 0:
        raise ValueError("static int8 needs calibration images")
    tmp_dir = Path(dst).parent
    model, inlined = _weights_inlined(src)
    with _quiet_root_logger():
        quantize_static(
            model,
            str(dst),
            calibration_data_reader=reader,  # type: ignore[arg-type]
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(config.op_types),
            per_channel=config.per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    for leftover in tmp_dir.glob("augmented_model*.onnx"):
        leftover.unlink(missing_ok=True)
    return {
        "mode": "static",
        "format": "QDQ",
        "activation_type": "QInt8",
        "weight_type": "QInt8",
        "symmetric": True,
        "per_channel": config.per_channel,
        "op_types": list(config.op_types),
        "calibrate_method": "MinMax",
        "calibration_samples": len(reader),
        "weight_identities_inlined": inlined,
    }
