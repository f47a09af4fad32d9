"""What each route computes from the model's outputs once all of a request's images have run.

These functions run on an inference worker thread with the backend's `PostOps`, so the work happens
on the model's device and only the final (float16 by default) tensors are copied to the host.
Items that share a grid are stacked along a first axis N; otherwise each item gets its own tensors
named `<name>.<i>` without that axis. `cls` always stacks (it has no grid).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cotap.core.wire import ASSIGN, CLS, PATCH
from cotap.server.backends.base import DeviceArray, PostOps

Slots = list[dict[str, DeviceArray]]
Tensors = dict[str, np.ndarray]


def same_shapes(arrays: Sequence[Any]) -> bool:
    return len({tuple(a.shape) for a in arrays}) <= 1


def _per_item(
    ops: PostOps,
    arrays: Sequence[DeviceArray],
    fn: Callable[[DeviceArray], dict[str, DeviceArray]],
    dtype: str,
) -> Tensors:
    """Apply `fn` to the stacked arrays, or to each item alone (suffixing names) when grids differ."""
    if same_shapes(arrays):
        return {k: ops.to_numpy(v, dtype) for k, v in fn(ops.stack(arrays)).items()}
    out: Tensors = {}
    for i, a in enumerate(arrays):
        for k, v in fn(ops.stack([a])).items():
            out[f"{k}.{i}"] = ops.to_numpy(v, dtype)[0]
    return out


def embed(outputs: Sequence[str], normalize: bool, dtype: str) -> Callable[[PostOps, Slots], Tensors]:
    def finish(ops: PostOps, slots: Slots) -> Tensors:
        def post(x: DeviceArray) -> DeviceArray:
            return ops.l2_normalize(x) if normalize else x

        out: Tensors = {}
        if PATCH in outputs:
            out |= _per_item(ops, [s[PATCH] for s in slots], lambda x: {PATCH: post(x)}, dtype)
        if CLS in outputs:
            out[CLS] = ops.to_numpy(post(ops.stack([s[CLS] for s in slots])), dtype)  # (N, C)
        return out

    return finish


def prototypes(top_k: int | None, dtype: str) -> Callable[[PostOps, Slots], Tensors]:
    def finish(ops: PostOps, slots: Slots) -> Tensors:
        return _per_item(ops, [s[ASSIGN] for s in slots], lambda a: ops.prototypes(a, top_k), dtype)

    return finish


def correspond(top_k: int, mutual_only: bool, dense: bool, dtype: str) -> Callable[[PostOps, Slots], Tensors]:
    """Slots come as source0, target0, source1, target1, ..."""

    def finish(ops: PostOps, slots: Slots) -> Tensors:
        sources = [s[PATCH] for s in slots[0::2]]
        targets = [s[PATCH] for s in slots[1::2]]
        if same_shapes(sources) and same_shapes(targets):
            res = ops.correspond(ops.stack(sources), ops.stack(targets), top_k, mutual_only, dense)
            return {k: ops.to_numpy(v, dtype) for k, v in res.items()}
        out: Tensors = {}
        for i, (s, t) in enumerate(zip(sources, targets, strict=True)):
            res = ops.correspond(ops.stack([s]), ops.stack([t]), top_k, mutual_only, dense)
            out |= {f"{k}.{i}": ops.to_numpy(v, dtype)[0] for k, v in res.items()}
        return out

    return finish
