"""Post-processing in torch, on the device the model's outputs live on (shared by the torch and
TensorRT backends): normalisation, prototype top-k and cosine matching never leave the GPU; only
the (usually float16) answer is copied to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cotap.core.wire import (
    MATCH,
    MATCH_TOPK,
    MUTUAL,
    PROTOTYPE_ID,
    PROTOTYPE_PROB,
    PROTOTYPE_TOPK_ID,
    SCORE,
    SCORE_TOPK,
    SIMILARITY,
)
from cotap.server.backends.base import PostOps

_FLOAT = {"float16": torch.float16, "float32": torch.float32}


class TorchOps(PostOps):
    def __init__(self, device: torch.device) -> None:
        self.device = str(device)

    def stack(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(xs))

    @torch.inference_mode()
    def l2_normalize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(x, dim=-1, eps=1e-12)

    @torch.inference_mode()
    def prototypes(self, assign: torch.Tensor, top_k: int | None) -> dict[str, torch.Tensor]:
        ids = assign.argmax(-1)
        if top_k is None:
            return {PROTOTYPE_ID: ids, PROTOTYPE_PROB: assign}
        probs, idx = _topk(assign, top_k)
        return {PROTOTYPE_ID: ids, PROTOTYPE_PROB: probs, PROTOTYPE_TOPK_ID: idx}

    @torch.inference_mode()
    def correspond(
        self, source: torch.Tensor, target: torch.Tensor, top_k: int, mutual_only: bool, dense: bool
    ) -> dict[str, torch.Tensor]:
        n, h, w, c = source.shape
        s = self.l2_normalize(source.float()).reshape(n, h * w, c)  # (N, P, C)
        t = self.l2_normalize(target.float()).reshape(n, -1, c)  # (N, Q, C)
        sim = torch.bmm(s, t.transpose(1, 2))  # (N, P, Q)
        score, match = sim.max(-1)  # (N, P)
        back = sim.argmax(1)  # (N, Q): best source patch of every target patch
        mutual = back.gather(1, match) == torch.arange(h * w, device=sim.device)[None]
        if mutual_only:
            match = torch.where(mutual, match, torch.full_like(match, -1))
            score = torch.where(mutual, score, torch.zeros_like(score))
        out = {
            MATCH: match.reshape(n, h, w),
            SCORE: score.reshape(n, h, w),
            MUTUAL: mutual.reshape(n, h, w),
        }
        if top_k > 1:
            vals, idx = _topk(sim, top_k)
            out[MATCH_TOPK] = idx.reshape(n, h, w, -1)
            out[SCORE_TOPK] = vals.reshape(n, h, w, -1)
        if dense:
            out[SIMILARITY] = sim
        return out

    @torch.inference_mode()
    def to_numpy(self, x: torch.Tensor, float_dtype: str) -> np.ndarray:
        if x.is_floating_point():
            x = x.to(_FLOAT[float_dtype])
        elif x.dtype != torch.bool:
            x = x.to(torch.int32)
        return np.ascontiguousarray(x.detach().cpu().numpy())


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest along the last axis, largest first; equal values go to the
    lowest index like `NumpyOps` and ONNX TopK (`torch.topk` leaves ties unspecified). `topk` finds
    the k-th value, the tied ones are filled in index order: 13 ms against 68 for a full stable sort
    (3 for a bare `topk`) of a 1024 × 1024 similarity on one CPU thread, best of 7."""
    k = min(k, x.shape[-1])
    kth = x.topk(k, dim=-1, largest=True, sorted=True).values[..., -1:]  # (..., 1)
    above, tied = x > kth, x == kth
    room = k - above.sum(-1, keepdim=True)
    take = above | (tied & (tied.cumsum(-1, dtype=torch.int32) <= room))
    if int(take.sum()) != take.numel() // take.shape[-1] * k:  # NaN: fall back to the full sort
        idx = torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]
        return x.gather(-1, idx), idx
    idx = take.nonzero()[:, -1].reshape(*x.shape[:-1], k)  # ascending index within each row
    vals = x.gather(-1, idx)
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    return vals.gather(-1, order), idx.gather(-1, order)
