"""What the SDK returns: one small frozen dataclass per image (or pair) holding NumPy arrays, and
`Batch` lists of them with stacking helpers.

Arrays are views into the decoded response (no copy); floats are float16 unless you asked for
`dtype="float32"`. Every result names the model and the bundle hash that produced it, so stored
features can always be traced back to their weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

Size = tuple[int, int]


def _brief(value: Any) -> str:
    return f"{value.dtype}{list(value.shape)}" if isinstance(value, np.ndarray) else repr(value)


class _BriefRepr:
    """`repr` with arrays as dtype and shape (`patch=float16[12, 12, 384]`): a result holds
    thousands of floats, and printing one should show what it is, not its values."""

    def __repr__(self) -> str:
        shown = (
            f"{f.name}={_brief(v)}"
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if (v := getattr(self, f.name)) is not None
        )
        return f"{type(self).__name__}({', '.join(shown)})"


@dataclass(frozen=True, repr=False)
class Embedding(_BriefRepr):
    """Features of one image: `patch` (h, w, C) and `cls` (C,) (None when not asked for)."""

    patch: np.ndarray | None
    cls: np.ndarray | None
    grid: Size  # (h, w) patches
    input_size: Size  # (H, W) pixels the model saw
    original_size: Size  # (height, width) of the upright image sent
    model: str
    bundle_sha256: str
    normalized: bool = False
    request_id: str | None = None


@dataclass(frozen=True, repr=False)
class Prototypes(_BriefRepr):
    """Prototype assignment of one image: `ids` (h, w) is the most probable prototype of each patch;
    `probs` (h, w, M) all probabilities, or (h, w, k) the k largest with `topk_ids` (h, w, k)."""

    ids: np.ndarray
    probs: np.ndarray | None
    topk_ids: np.ndarray | None
    num_prototypes: int
    grid: Size
    input_size: Size
    original_size: Size
    model: str
    bundle_sha256: str
    request_id: str | None = None

    def counts(self) -> np.ndarray:
        """(M,) how many patches each prototype wins."""
        return np.bincount(self.ids.ravel().astype(np.int64), minlength=max(self.num_prototypes, 1))


@dataclass(frozen=True, repr=False)
class Matches(_BriefRepr):
    """Matched patch pairs as grid coordinates: `source` and `target` (K, 2) rows of (row, col),
    `score` (K,) cosine similarity, best first."""

    source: np.ndarray
    target: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return int(self.score.shape[0])


@dataclass(frozen=True, repr=False)
class Correspondence(_BriefRepr):
    """For every patch of the source image its best match in the target: `match` (h, w) flat index
    into the target grid (row * w' + col; -1 where `mutual_only` dropped it), `score` (h, w) cosine
    similarity, `mutual` (h, w) whether the target patch's best match is this patch again.
    With top_k > 1: `match_topk`, `score_topk` (h, w, k); with dense: `similarity` (h*w, h'*w')."""

    match: np.ndarray
    score: np.ndarray
    mutual: np.ndarray
    source_grid: Size
    target_grid: Size
    source_size: Size  # upright (height, width) of the images sent
    target_size: Size
    model: str
    bundle_sha256: str
    match_topk: np.ndarray | None = None
    score_topk: np.ndarray | None = None
    similarity: np.ndarray | None = None
    request_id: str | None = None

    def matches(self, mutual_only: bool = True, min_score: float | None = None) -> Matches:
        """The matched pairs (mutual ones only by default), best score first."""
        keep = self.match >= 0
        if mutual_only:
            keep &= self.mutual.astype(bool)
        score = self.score.astype(np.float32)
        if min_score is not None:
            keep &= score >= min_score
        rows, cols = np.nonzero(keep)
        flat = self.match[rows, cols].astype(np.int64)
        tw = self.target_grid[1]
        s = score[rows, cols]
        order = np.argsort(-s, kind="stable")
        source = np.stack([rows, cols], axis=1)[order]
        target = np.stack([flat // tw, flat % tw], axis=1)[order]
        return Matches(source.astype(np.int64), target.astype(np.int64), s[order])


T = TypeVar("T")


class Batch(list[T], Generic[T]):
    """The results of one call, in input order, with helpers that stack a field across items."""

    def stack(self, name: str) -> np.ndarray:
        """np.stack of one array field over every item (they must share a grid)."""
        arrays = [getattr(item, name) for item in self]
        if any(a is None for a in arrays):
            raise ValueError(f"{name!r} was not asked for")
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot stack {name!r}: the items have different shapes {sorted(shapes)} (different "
                "grids under a shorter-side resize); use the items one by one"
            )
        return np.stack(arrays)

    def _one(self, name: str) -> Any:
        values = {getattr(item, name) for item in self}
        if len(values) > 1:
            raise ValueError(f"the items disagree on {name}: {sorted(values)}")
        return next(iter(values)) if values else None

    @property
    def model(self) -> str | None:
        return self._one("model")  # type: ignore[no-any-return]

    @property
    def bundle_sha256(self) -> str | None:
        return self._one("bundle_sha256")  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        first = f": {self[0]!r}" + (", ..." if len(self) > 1 else "") if self else ""
        return f"{type(self).__name__}({len(self)} items{first})"


class EmbedBatch(Batch[Embedding]):
    @property
    def grid(self) -> Size | None:
        """(h, w) shared by every item (an error if the grids differ)"""
        return self._one("grid")  # type: ignore[no-any-return]

    @property
    def patch(self) -> np.ndarray:
        """(N, h, w, C)"""
        return self.stack("patch")

    @property
    def cls(self) -> np.ndarray:
        """(N, C)"""
        return self.stack("cls")


class PrototypesBatch(Batch[Prototypes]):
    @property
    def ids(self) -> np.ndarray:
        """(N, h, w)"""
        return self.stack("ids")

    @property
    def probs(self) -> np.ndarray:
        """(N, h, w, M or k)"""
        return self.stack("probs")

    @property
    def topk_ids(self) -> np.ndarray:
        """(N, h, w, k), with top_k"""
        return self.stack("topk_ids")

    @property
    def grid(self) -> Size | None:
        """(h, w) shared by every item (an error if the grids differ)"""
        return self._one("grid")  # type: ignore[no-any-return]

    @property
    def num_prototypes(self) -> int | None:
        return self._one("num_prototypes")  # type: ignore[no-any-return]


class CorrespondenceBatch(Batch[Correspondence]):
    @property
    def match(self) -> np.ndarray:
        """(N, h, w)"""
        return self.stack("match")

    @property
    def score(self) -> np.ndarray:
        """(N, h, w)"""
        return self.stack("score")

    @property
    def mutual(self) -> np.ndarray:
        """(N, h, w)"""
        return self.stack("mutual")

    @property
    def match_topk(self) -> np.ndarray:
        """(N, h, w, k), with top_k > 1"""
        return self.stack("match_topk")

    @property
    def score_topk(self) -> np.ndarray:
        """(N, h, w, k), with top_k > 1"""
        return self.stack("score_topk")

    @property
    def similarity(self) -> np.ndarray:
        """(N, h*w, h'*w'), with dense"""
        return self.stack("similarity")


def patch_centers(grid: Size, size: Size) -> np.ndarray:
    """(h, w, 2) the (y, x) pixel centre of every patch in an image of `size` (height, width).

    Both resize policies scale the whole image (fixed: to a set size, shorter side: by one factor
    and rounding), so patch (i, j) covers the same fraction of the original as of the model input.
    """
    h, w = grid
    height, width = size
    ys = (np.arange(h, dtype=np.float64) + 0.5) * height / h
    xs = (np.arange(w, dtype=np.float64) + 0.5) * width / w
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1)
