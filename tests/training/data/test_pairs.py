"""Anchor/partner pairs: partner choice, collation shapes, determinism across constructions,
epochs and DataLoader workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cotap.training.data.folders import open_dataset
from cotap.training.data.pairs import PairBatch, PairedViews, ViewBatch, collate_pairs
from cotap.training.data.synthetic import SceneConfig, SyntheticScenes
from cotap.training.data.views import ViewConfig

VIEWS = ViewConfig(global_size=32, local_size=16, num_local=3)
N = 12


def _nns(n: int = N, k: int = 4) -> np.ndarray:
    rng = np.random.default_rng(0)
    rest = np.stack([rng.permutation([j for j in range(n) if j != i])[: k - 1] for i in range(n)])
    return np.concatenate([np.arange(n)[:, None], rest], axis=1)


@pytest.fixture(scope="module")
def scenes() -> SyntheticScenes:
    return SyntheticScenes(N, seed=1, config=SceneConfig(size=48))


def _equal(a: PairBatch, b: PairBatch) -> bool:
    def views_equal(x: ViewBatch, y: ViewBatch) -> bool:
        return all(
            torch.equal(getattr(x, f), getattr(y, f))
            for f in ("student_global", "teacher_global", "student_local", "boxes")
        )

    return (
        views_equal(a.anchor, b.anchor)
        and views_equal(a.partner, b.partner)
        and torch.equal(a.index, b.index)
        and torch.equal(a.partner_index, b.partner_index)
        and torch.equal(a.label, b.label)
    )


def test_collated_shapes_and_labels(scenes: SyntheticScenes) -> None:
    ds = PairedViews(scenes, VIEWS, nns=_nns(), k=4, seed=0)
    batch = collate_pairs([ds[i] for i in range(5)])
    assert len(batch) == 5
    for vb in (batch.anchor, batch.partner):
        assert vb.student_global.shape == (5, 2, 3, 32, 32)
        assert vb.teacher_global.shape == (5, 2, 3, 32, 32)
        assert vb.student_local.shape == (5, 3, 3, 16, 16)
        assert vb.boxes.shape == (5, 5, 4)
    assert batch.index.tolist() == [0, 1, 2, 3, 4]
    assert batch.label.tolist() == [scenes[i].label for i in range(5)]
    moved = batch.to("cpu")
    assert isinstance(moved, PairBatch) and torch.equal(moved.anchor.boxes, batch.anchor.boxes)


def test_partner_is_one_of_the_first_k_neighbours_self_included(scenes: SyntheticScenes) -> None:
    nns = _nns(k=5)
    seen: dict[int, set[int]] = {i: set() for i in range(N)}
    ds = PairedViews(scenes, ViewConfig(global_size=16, local_size=8, num_local=0), nns=nns, k=3, seed=0)
    for epoch in range(12):
        ds.set_epoch(epoch)
        for i in range(N):
            item = ds[i]
            seen[i].add(item["partner_index"])
    for i in range(N):
        assert seen[i] <= set(nns[i, :3].tolist())
    assert sum(i in seen[i] for i in range(N)) >= N // 2  # self is drawn too
    assert sum(len(s) == 3 for s in seen.values()) >= N // 2


def test_without_neighbours_the_partner_is_a_second_crop_set_of_the_same_image(
    scenes: SyntheticScenes,
) -> None:
    ds = PairedViews(scenes, VIEWS, nns=None, seed=0)
    item = ds[3]
    assert item["partner_index"] == 3
    assert not torch.equal(item["anchor"].boxes, item["partner"].boxes)


def test_same_batches_from_two_constructions_and_any_access_order(scenes: SyntheticScenes) -> None:
    a = PairedViews(scenes, VIEWS, nns=_nns(), k=4, seed=5)
    b = PairedViews(SyntheticScenes(N, seed=1, config=SceneConfig(size=48)), VIEWS, nns=_nns(), k=4, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    b[7]  # touching other items first changes nothing
    assert _equal(collate_pairs([a[i] for i in (0, 5, 7)]), collate_pairs([b[i] for i in (0, 5, 7)]))
    b.set_epoch(3)
    assert not _equal(collate_pairs([a[i] for i in (0, 5, 7)]), collate_pairs([b[i] for i in (0, 5, 7)]))
    c = PairedViews(scenes, VIEWS, nns=_nns(), k=4, seed=6)
    c.set_epoch(2)
    assert not _equal(collate_pairs([a[0]]), collate_pairs([c[0]]))


def test_dataloader_workers_give_the_same_batches(scenes: SyntheticScenes) -> None:
    ds = PairedViews(open_dataset("synthetic:8:1:48"), VIEWS, nns=_nns(8, 3), k=3, seed=0)
    order = [3, 1, 6, 0, 2, 7, 5, 4]
    serial = list(DataLoader(ds, batch_size=4, sampler=order, collate_fn=collate_pairs))
    parallel = list(DataLoader(ds, batch_size=4, sampler=order, collate_fn=collate_pairs, num_workers=2))
    assert len(serial) == len(parallel) == 2
    for x, y in zip(serial, parallel, strict=True):
        assert _equal(x, y)
    assert serial[0].label.tolist() == [
        SyntheticScenes(8, 1, SceneConfig(size=48))[i].label for i in order[:4]
    ]


def test_bad_neighbour_arrays_are_refused(scenes: SyntheticScenes) -> None:
    with pytest.raises(ValueError, match="shape"):
        PairedViews(scenes, VIEWS, nns=_nns()[:5])
    with pytest.raises(ValueError, match="k=9"):
        PairedViews(scenes, VIEWS, nns=_nns(k=4), k=9)
    bad = _nns()
    bad[0, 1] = N
    with pytest.raises(ValueError, match="indices"):
        PairedViews(scenes, VIEWS, nns=bad, k=4)
