"""The backend interface: a loaded model that turns a batch of normalised images into the model's
outputs, plus the post-processing operations that run where those outputs live (torch on the
model's device, NumPy for ONNX Runtime on the CPU).

Outputs stay in the backend's own array type ("device arrays") until `PostOps.to_numpy`, so that
normalisation, matching and top-k never copy full feature maps off a GPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from cotap.core.bundle import Bundle
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

DeviceArray = Any  # np.ndarray for NumPy ops, torch.Tensor for torch ops


class BackendError(Exception):
    """A backend that cannot run here; the message says why and what to do instead."""


@dataclass(frozen=True)
class BackendOptions:
    """What every backend is told (resolved from the server settings)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 | int8
    intra_op_threads: int = 0  # 0 = the library's default


class PostOps(ABC):
    """Post-processing on one kind of device array. Shapes: N items, grid h×w, C channels."""

    device: str = "cpu"

    @abstractmethod
    def stack(self, xs: Sequence[DeviceArray]) -> DeviceArray:
        """Stack same-shaped arrays along a new first axis."""

    @abstractmethod
    def l2_normalize(self, x: DeviceArray) -> DeviceArray:
        """x / ||x|| along the last axis (zero vectors stay zero)."""

    @abstractmethod
    def prototypes(self, assign: DeviceArray, top_k: int | None) -> dict[str, DeviceArray]:
        """assign (N, h, w, M) -> prototype_id (N, h, w) and prototype_prob (N, h, w, M), or with
        top_k: prototype_prob (N, h, w, k) sorted descending and prototype_topk_id (N, h, w, k)."""

    @abstractmethod
    def correspond(
        self, source: DeviceArray, target: DeviceArray, top_k: int, mutual_only: bool, dense: bool
    ) -> dict[str, DeviceArray]:
        """source (N, h, w, C), target (N, h', w', C) -> for every source patch its best target
        patch by cosine: match (N, h, w) flat index into h'·w', score (N, h, w), mutual (N, h, w);
        top_k > 1 adds match_topk/score_topk (N, h, w, k); dense adds similarity (N, h·w, h'·w').
        mutual_only sets match = -1 and score = 0 where the match is not mutual."""

    @abstractmethod
    def to_numpy(self, x: DeviceArray, float_dtype: str) -> np.ndarray:
        """A host NumPy copy; floats cast to `float_dtype` (on the device first), integer indices
        as int32, booleans unchanged."""


def cuda_index(device: str) -> int | None:
    """The GPU a `--device` of auto, cuda or cuda:N names: N, or None for the current one."""
    if device in ("auto", "cuda"):
        return None
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise BackendError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")


class NumpyOps(PostOps):
    """Post-processing in NumPy, for backends whose outputs arrive on the host. `half` casts
    float32 to float16 when given (NumPy's own cast is not vectorised: 0.7 ms per ViT-S answer)."""

    device = "cpu"

    def __init__(self, half: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self._half = half

    def stack(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(list(xs))

    def l2_normalize(self, x: np.ndarray) -> np.ndarray:
        norm = np.sqrt(np.einsum("...c,...c->...", x, x, dtype=np.float32))[..., None]
        return x / np.maximum(norm, np.float32(1e-12))

    def prototypes(self, assign: np.ndarray, top_k: int | None) -> dict[str, np.ndarray]:
        ids = assign.argmax(-1)
        if top_k is None:
            return {PROTOTYPE_ID: ids, PROTOTYPE_PROB: assign}
        idx = _topk_indices(assign, top_k)
        return {
            PROTOTYPE_ID: ids,
            PROTOTYPE_PROB: np.take_along_axis(assign, idx, -1),
            PROTOTYPE_TOPK_ID: idx,
        }

    def correspond(
        self, source: np.ndarray, target: np.ndarray, top_k: int, mutual_only: bool, dense: bool
    ) -> dict[str, np.ndarray]:
        n, h, w, c = source.shape
        s = self.l2_normalize(source).reshape(n, h * w, c)  # (N, P, C)
        t = self.l2_normalize(target).reshape(n, -1, c)  # (N, Q, C)
        sim = np.matmul(s, t.transpose(0, 2, 1))  # (N, P, Q)
        match = sim.argmax(-1)  # (N, P)
        score = np.take_along_axis(sim, match[..., None], -1)[..., 0]
        back = sim.argmax(1)  # (N, Q): best source patch of every target patch
        mutual = np.take_along_axis(back, match, 1) == np.arange(h * w)[None]
        if mutual_only:
            match = np.where(mutual, match, -1)
            score = np.where(mutual, score, np.float32(0))
        out = {
            MATCH: match.reshape(n, h, w),
            SCORE: score.reshape(n, h, w),
            MUTUAL: mutual.reshape(n, h, w),
        }
        if top_k > 1:
            idx = _topk_indices(sim, top_k)  # (N, P, k)
            out[MATCH_TOPK] = idx.reshape(n, h, w, -1)
            out[SCORE_TOPK] = np.take_along_axis(sim, idx, -1).reshape(n, h, w, -1)
        if dense:
            out[SIMILARITY] = sim
        return out

    def to_numpy(self, x: np.ndarray, float_dtype: str) -> np.ndarray:
        x = np.asarray(x)
        if self._half is not None and x.dtype == np.float32 and float_dtype == "float16":
            return self._half(x)
        if x.dtype.kind == "f":
            return np.ascontiguousarray(x, dtype=np.dtype(float_dtype))
        if x.dtype.kind in "iu":
            return np.ascontiguousarray(x, dtype=np.int32)
        return np.ascontiguousarray(x)


def _topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values along the last axis, largest first; equal values go to the
    lowest index, as with argmax, torch's stable sort and ONNX TopK (flat images tie everywhere).
    A partition, not a full sort: 12 against 64 ms for a 1024 × 1024 similarity here (best of 7)."""
    k = min(k, x.shape[-1])
    if k < 1:
        return np.zeros((*x.shape[:-1], 0), np.int64)
    flat = x.reshape(-1, x.shape[-1])  # (R, n)
    kth = -np.partition(-flat, k - 1, axis=-1)[:, k - 1 : k]  # (R, 1): the k-th largest value
    above, tied = flat > kth, flat == kth
    room = k - above.sum(-1, keepdims=True)  # how many of the tied values make it, lowest first
    take = above | (tied & (np.cumsum(tied, axis=-1, dtype=np.int32) <= room))
    if int(take.sum()) != take.shape[0] * k:  # NaN: no order to speak of; fall back to a full sort
        return np.argsort(-x, axis=-1, kind="stable")[..., :k]
    idx = np.nonzero(take)[1].reshape(-1, k)  # ascending index within each row
    order = np.argsort(-np.take_along_axis(flat, idx, -1), axis=-1, kind="stable")
    return np.take_along_axis(idx, order, -1).reshape(*x.shape[:-1], k)


class Backend(ABC):
    """A model loaded for inference. `forward` is called from worker threads, possibly several at
    once, and must be safe for that (or serialise itself)."""

    kind: ClassVar[str] = ""

    def __init__(self, bundle: Bundle, options: BackendOptions) -> None:
        self.bundle = bundle
        self.options = options
        self.device = "cpu"
        self.precision = "fp32"
        self.max_batch: int | None = None  # a limit of the artefact (ONNX/engine), if any
        self.sizes: frozenset[tuple[int, int]] | None = None  # input (H, W) it can run; None = any
        self.ops: PostOps = NumpyOps()
        self.warnings: list[str] = []  # served anyway, but worth saying (in /v1/models and the log)
        self.selection_notes: list[str] = []  # why `auto` passed over other backends

    @abstractmethod
    def forward(self, images: np.ndarray) -> dict[str, DeviceArray]:
        """images float32 (B, 3, H, W), normalised -> {"patch": (B, h, w, 2D), "cls": (B, 2D),
        "assign": (B, h, w, M)} as float32 device arrays."""

    def describe(self) -> dict[str, Any]:
        """What /v1/models reports about this backend."""
        return {
            "backend": self.kind,
            "device": self.device,
            "precision": self.precision,
            "warnings": list(self.warnings),
        }

    def close(self) -> None:  # noqa: B027 (optional hook, a no-op by default)
        """Release the model (called at shutdown)."""
