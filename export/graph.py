"""The torch module that becomes the ONNX graph, and the fp32 export itself.

Size strategy (see docs/export.md): the graph has dynamic batch, height and width axes, but it
carries the position embeddings precomputed for each declared input size in one flat table and
picks the rows of the input's size with integer shape arithmetic (Shape, Abs, Clip, ReduceSum,
Range, Gather). There is no bicubic Resize in the graph (ONNX Runtime's and TensorRT's cubic
resize differ from torch's, and TensorRT handles it poorly), several sizes live in one model, and a
size that was not declared selects no rows, so the position-embedding Add fails loudly instead of
returning silently wrong features. Everything after the position embedding is the model's own
forward, so the graph cannot drift from the torch reference.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cotap.core.artifacts import INPUT_NAME, OUTPUT_NAMES
from cotap.training.models import CoTAPViT

DEFAULT_OPSET = 17  # LayerNormalization is an ONNX op from 17 on (TensorRT's INormalizationLayer)


class SizeTableViT(nn.Module):
    """`CoTAPViT.forward_features` with position embeddings looked up per declared size.

    images (B, 3, H, W) -> patch (B, h, w, 2D), cls (B, 2D), assign (B, h, w, M); (H, W) must be
    one of `sizes`.
    """

    pos_table: torch.Tensor
    size_keys: torch.Tensor

    def __init__(self, model: CoTAPViT, sizes: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        p = model.patch_size
        self.sizes = tuple((int(h), int(w)) for h, w in sizes)
        tables, keys, offset = [], [], 0
        with torch.no_grad():
            for h, w in self.sizes:
                if h % p or w % p:
                    raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {p}")
                table = model.interpolate_pos_encoding(h // p, w // p)[0].float()  # (1+N, D)
                tables.append(table)
                keys.append([h, w, offset, table.shape[0]])
                offset += table.shape[0]
        self.model = copy.deepcopy(model).eval()
        self.register_buffer("pos_table", torch.cat(tables).contiguous())  # (sum(1+N_i), D)
        self.register_buffer("size_keys", torch.tensor(keys, dtype=torch.int64))  # (S, 4): H, W, start, len
        self._hw: torch.Tensor | None = None
        # The model's own forward calls interpolate_pos_encoding(gh, gw); answer from the table.
        object.__setattr__(self.model, "interpolate_pos_encoding", self._lookup)

    def _lookup(self, gh: int, gw: int) -> torch.Tensor:
        hw = self._hw  # (2,) int64: the input's H and W as graph values
        assert hw is not None
        k = self.size_keys
        match = torch.clamp(1 - (hw[0] - k[:, 0]).abs() - (hw[1] - k[:, 1]).abs(), min=0)  # (S,) 0/1
        start = (match * k[:, 2]).sum()
        length = (match * k[:, 3]).sum()  # 0 for an undeclared size
        rows = start + torch.arange(length)  # type: ignore[call-overload]  # a graph value under tracing
        return self.pos_table.index_select(0, rows).unsqueeze(0)  # (1, 1+N, D)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._hw = torch._shape_as_tensor(images)[2:]
        out = self.model.forward_features(images)
        return out["patch"], out["cls"], out["assign"]


def export_fp32(
    model: CoTAPViT,
    sizes: Sequence[tuple[int, int]],
    path: str | os.PathLike[str],
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Trace `model` at the declared `sizes` into an fp32 ONNX file (legacy TorchScript exporter)."""
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} is too old: LayerNormalization needs opset {DEFAULT_OPSET} or newer")
    graph = SizeTableViT(model, sizes).eval()
    h, w = graph.sizes[0]
    example = torch.zeros(1, 3, h, w)
    axes = {
        INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
        "patch": {0: "batch", 1: "grid_h", 2: "grid_w"},
        "cls": {0: "batch"},
        "assign": {0: "batch", 1: "grid_h", 2: "grid_w"},
    }
    out = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings about shape checks in the model's forward and the exporter's deprecation
        # notice are expected: shapes stay symbolic through the dynamic axes.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (example,),
            str(out),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return out
