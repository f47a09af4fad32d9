"""A small ONNX graph for patch correspondence, so GPU backends match on the device.

Inputs `source` (B, hs, ws, C) and `target` (B, ht, wt, C), float32 patch features (the model's
`patch` output). Outputs, per source patch, with cosine similarity:

- `match` (B, hs, ws) int64: flat index (row-major) of the most similar target patch,
- `score` (B, hs, ws) float32: that cosine similarity,
- `mutual` (B, hs, ws) bool: whether that target patch's best source patch is this one,
- with `top_k` > 0, `match_topk` and `score_topk` (B, hs, ws, k), best first.

Ties go to the lowest index (ONNX ArgMax/TopK), as numpy's argmax. Names come from `cotap.core.wire`.
The graph is built with `onnx.helper` directly: no torch, a few nodes, any grid sizes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cotap.core import wire
from cotap.core.artifacts import replace_record
from cotap.core.bundle import add_files, read_bundle, sha256_file

MATCHING_KEY = "matching"  # manifest["artifacts"]["matching"]: list of records
MATCHING_FILE = "onnx/matching.onnx"
EPS = 1e-12


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def matching_graph(dim: int | None, top_k: int = 0, opset: int = 17) -> onnx.ModelProto:
    """The matching model for features of width `dim` (None: any width)."""
    if top_k < 0:
        raise ValueError(f"top_k must be 0 (off) or positive, got {top_k}")
    if dim is not None and dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    if opset < 15:
        raise ValueError("the matching graph needs opset 15 or newer (Shape with start/end)")
    c: int | str = dim if dim is not None else "C"
    inputs = [
        helper.make_tensor_value_info("source", TensorProto.FLOAT, ["B", "hs", "ws", c]),
        helper.make_tensor_value_info("target", TensorProto.FLOAT, ["B", "ht", "wt", c]),
    ]
    inits = [
        _const("minus_one", np.array([-1], np.int64)),
        _const("axis_last", np.array([-1], np.int64)),
        _const("eps", np.array(EPS, np.float32)),
        _const("zero", np.array(0, np.int64)),
        _const("one", np.array(1, np.int64)),
    ]
    n = helper.make_node
    nodes = []
    for side in ("source", "target"):
        nodes += [
            n("Shape", [side], [f"{side}_b"], start=0, end=1),
            n("Shape", [side], [f"{side}_c"], start=3),
            n("Concat", [f"{side}_b", "minus_one", f"{side}_c"], [f"{side}_flat_shape"], axis=0),
            n("Reshape", [side, f"{side}_flat_shape"], [f"{side}_flat"]),  # (B, N, C)
            n("Mul", [f"{side}_flat", f"{side}_flat"], [f"{side}_sq"]),
            n("ReduceSum", [f"{side}_sq", "axis_last"], [f"{side}_sumsq"], keepdims=1),
            n("Sqrt", [f"{side}_sumsq"], [f"{side}_norm"]),
            n("Max", [f"{side}_norm", "eps"], [f"{side}_safe_norm"]),
            n("Div", [f"{side}_flat", f"{side}_safe_norm"], [f"{side}_unit"]),  # (B, N, C)
        ]
    nodes += [
        n("Transpose", ["target_unit"], ["target_unit_t"], perm=[0, 2, 1]),  # (B, C, Nt)
        n("MatMul", ["source_unit", "target_unit_t"], ["similarity"]),  # (B, Ns, Nt)
        n("ArgMax", ["similarity"], ["match_flat"], axis=2, keepdims=0, select_last_index=0),  # (B, Ns)
        n("Unsqueeze", ["match_flat", "axis_last"], ["match_idx"]),  # (B, Ns, 1)
        n("GatherElements", ["similarity", "match_idx"], ["score_col"], axis=2),  # (B, Ns, 1)
        n("Squeeze", ["score_col", "axis_last"], ["score_flat"]),  # (B, Ns)
        n("ArgMax", ["similarity"], ["back"], axis=1, keepdims=0, select_last_index=0),  # (B, Nt)
        n("GatherElements", ["back", "match_flat"], ["back_of_match"], axis=1),  # (B, Ns)
        n("Shape", ["similarity"], ["ns"], start=1, end=2),
        n("Squeeze", ["ns"], ["ns_scalar"]),
        n("Range", ["zero", "ns_scalar", "one"], ["source_ids"]),  # (Ns,)
        n("Equal", ["back_of_match", "source_ids"], ["mutual_flat"]),  # (B, Ns)
        n("Shape", ["source"], ["grid_shape"], start=0, end=3),  # (B, hs, ws)
        n("Reshape", ["match_flat", "grid_shape"], [wire.MATCH]),
        n("Reshape", ["score_flat", "grid_shape"], [wire.SCORE]),
        n("Reshape", ["mutual_flat", "grid_shape"], [wire.MUTUAL]),
    ]
    grid = ["B", "hs", "ws"]
    outputs = [
        helper.make_tensor_value_info(wire.MATCH, TensorProto.INT64, grid),
        helper.make_tensor_value_info(wire.SCORE, TensorProto.FLOAT, grid),
        helper.make_tensor_value_info(wire.MUTUAL, TensorProto.BOOL, grid),
    ]
    if top_k:
        inits += [_const("k", np.array([top_k], np.int64))]
        nodes += [
            n(
                "TopK",
                ["similarity", "k"],
                ["topk_score_flat", "topk_match_flat"],
                axis=2,
                largest=1,
                sorted=1,
            ),
            n("Concat", ["grid_shape", "k"], ["topk_shape"], axis=0),
            n("Reshape", ["topk_match_flat", "topk_shape"], [wire.MATCH_TOPK]),
            n("Reshape", ["topk_score_flat", "topk_shape"], [wire.SCORE_TOPK]),
        ]
        outputs += [
            helper.make_tensor_value_info(wire.MATCH_TOPK, TensorProto.INT64, [*grid, top_k]),
            helper.make_tensor_value_info(wire.SCORE_TOPK, TensorProto.FLOAT, [*grid, top_k]),
        ]
    graph = helper.make_graph(nodes, "cotap_matching", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="cotap.export.matching"
    )
    model.ir_version = min(model.ir_version, 10)  # readable by older runtimes
    onnx.checker.check_model(model, full_check=True)
    return model


def export_matching_onnx(
    out: str | os.PathLike[str], dim: int | None, top_k: int = 0, opset: int = 17
) -> dict[str, Any]:
    """Write the matching graph to `out`; returns its record (file, dim, top_k, opset, sha256, outputs)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = matching_graph(dim, top_k, opset)
    onnx.save(model, str(path))
    return {
        "file": str(path),
        "dim": dim,
        "top_k": top_k,
        "opset": opset,
        "similarity": "cosine",
        "inputs": ["source", "target"],
        "outputs": [o.name for o in model.graph.output],
        "sha256": sha256_file(path),
    }


def add_matching_to_bundle(
    bundle_dir: str | os.PathLike[str], top_k: int = 0, opset: int = 17
) -> dict[str, Any]:
    """Add `onnx/matching.onnx` for the bundle's patch width, recorded under artifacts["matching"]."""
    bundle = read_bundle(bundle_dir)
    with tempfile.TemporaryDirectory(prefix=".cotap-matching-") as tmp:
        record = export_matching_onnx(Path(tmp) / "matching.onnx", bundle.config.embed_dim, top_k, opset)
        src = Path(record["file"])
        record["file"] = MATCHING_FILE
        records = replace_record(list(bundle.artifacts.get(MATCHING_KEY, [])), record)
        add_files(bundle.path, {MATCHING_FILE: src}, artifacts={MATCHING_KEY: records})
    return record
