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

import math
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


def reference_matching(source: np.ndarray, target: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    """What the graph computes, in plain NumPy float64 (the parity check's reference)."""
    b, hs, ws, c = source.shape
    s = source.reshape(b, hs * ws, c).astype(np.float64)
    t = target.reshape(b, -1, c).astype(np.float64)
    s /= np.maximum(np.linalg.norm(s, axis=-1, keepdims=True), EPS)
    t /= np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), EPS)
    sim = s @ t.transpose(0, 2, 1)  # (B, hs*ws, ht*wt)
    match = sim.argmax(-1)
    back = sim.argmax(-2)  # best source of each target patch
    out = {
        wire.MATCH: match.reshape(b, hs, ws),
        wire.SCORE: sim.max(-1).reshape(b, hs, ws),
        wire.MUTUAL: (np.take_along_axis(back, match, 1) == np.arange(hs * ws)).reshape(b, hs, ws),
    }
    if top_k:
        order = np.argsort(-sim, axis=-1, kind="stable")[..., :top_k]
        out[wire.MATCH_TOPK] = order.reshape(b, hs, ws, top_k)
        out[wire.SCORE_TOPK] = np.take_along_axis(sim, order, -1).reshape(b, hs, ws, top_k)
    return out


def check_matching(
    path: str | os.PathLike[str], dim: int | None, top_k: int, seed: int = 0
) -> dict[str, Any]:
    """Parity report of the graph at `path` on ONNX Runtime against `reference_matching`, on random
    features at two grid pairs: scores within 1e-5, and the same matches wherever the reference's
    best and second-best scores are more than 1e-5 apart (closer ones are ties in float32)."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        return {"passed": None, "skipped": "onnxruntime is not installed"}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    width = dim or 32
    worst_score, compared, agree, mutual_agree = 0.0, 0, 0, 0
    rows = max(6, math.ceil(top_k / 3))  # both target grids (rows × 3, rows × 7) hold top_k patches
    names = [o.name for o in session.get_outputs()]
    for (hs, ws), (ht, wt) in (((4, 5), (rows, 3)), ((7, 7), (rows, 7))):
        src = rng.normal(size=(2, hs, ws, width)).astype(np.float32)
        tgt = rng.normal(size=(2, ht, wt, width)).astype(np.float32)
        got = dict(zip(names, session.run(names, {"source": src, "target": tgt}), strict=True))
        want = reference_matching(src, tgt, max(top_k, 2))  # the best two tell ties apart
        worst_score = max(worst_score, float(np.abs(got[wire.SCORE] - want[wire.SCORE]).max()))
        best_two = want[wire.SCORE_TOPK][..., :2]
        clear = best_two[..., 0] - best_two[..., 1] > 1e-5  # not a float32 tie
        compared += int(clear.sum())
        agree += int((got[wire.MATCH] == want[wire.MATCH])[clear].sum())
        mutual_agree += int((got[wire.MUTUAL] == want[wire.MUTUAL])[clear].sum())
        if top_k:
            diff = got[wire.SCORE_TOPK] - want[wire.SCORE_TOPK][..., :top_k]
            worst_score = max(worst_score, float(np.abs(diff).max()))
    passed = worst_score <= 1e-5 and agree == compared and mutual_agree == compared
    return {
        "passed": passed,
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "reference": "numpy float64",
        "score_max_abs": worst_score,
        "patches_compared": compared,
        "match_agreement": agree / max(compared, 1),
        "mutual_agreement": mutual_agree / max(compared, 1),
    }


class MatchingParityError(ValueError):
    """The exported matching graph does not compute what the reference computes."""


def export_matching_onnx(
    out: str | os.PathLike[str], dim: int | None, top_k: int = 0, opset: int = 17
) -> dict[str, Any]:
    """Write the matching graph to `out`, checked against the NumPy reference on ONNX Runtime
    (`MatchingParityError` when it disagrees); returns its record (file, dim, top_k, opset, sha256,
    outputs, parity report)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = matching_graph(dim, top_k, opset)
    onnx.save(model, str(path))
    try:
        parity = check_matching(path, dim, top_k)
        if parity["passed"] is False:
            raise MatchingParityError(f"the matching graph disagrees with its reference: {parity}")
    except BaseException:
        path.unlink(missing_ok=True)  # an unchecked graph is not left behind
        raise
    return {
        "file": str(path),
        "dim": dim,
        "top_k": top_k,
        "opset": opset,
        "similarity": "cosine",
        "inputs": ["source", "target"],
        "outputs": [o.name for o in model.graph.output],
        "sha256": sha256_file(path),
        "parity": parity,
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
