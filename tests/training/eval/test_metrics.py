"""Confusion, IoU and matchings against plain loops on hand-made label maps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cotap.training.eval.metrics import (
    confusion_matrix,
    hungarian_match,
    many_to_one_match,
    matched_confusion,
    mean_iou,
    per_class_iou,
    pixel_accuracy,
    segmentation_metrics,
)


def reference_miou(pred: list[int], target: list[int], num_classes: int) -> float:
    """Over the classes with TP + FP + FN > 0 (CoTAP's tester, STEGO, mmseg)."""
    ious = []
    for c in range(num_classes):
        pairs = [(p, t) for p, t in zip(pred, target, strict=True) if t != 255]
        if not any(t == c or p == c for p, t in pairs):
            continue
        inter = sum(1 for p, t in pairs if p == c and t == c)
        union = sum(1 for p, t in pairs if p == c or t == c)
        ious.append(inter / union)
    return sum(ious) / len(ious)


def test_confusion_counts_match_a_loop_and_skip_ignore() -> None:
    target = torch.tensor([[0, 0, 1, 255], [2, 2, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 2]])
    conf = confusion_matrix(pred, target, 3)
    ref = torch.zeros(3, 3, dtype=torch.long)
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
        if t != 255:
            ref[t, p] += 1
    assert torch.equal(conf, ref)
    assert int(conf.sum()) == 7


def test_miou_matches_reference_on_random_maps() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        target = torch.randint(0, 5, (3, 9, 7), generator=g)
        target[target == 4] = 255  # class 4 never appears: an ignore region instead
        pred = torch.randint(0, 5, (3, 9, 7), generator=g)
        conf = confusion_matrix(pred, target, 5)
        ref = reference_miou(pred.flatten().tolist(), target.flatten().tolist(), 5)
        assert mean_iou(conf) == pytest.approx(ref)
        # class 4 is absent from the ground truth but predicted: averaged, with IoU 0
        assert per_class_iou(conf)[4] == 0


def test_a_class_only_predicted_counts_with_iou_zero() -> None:
    """Ground truth {0, 1}, class 2 predicted on 2 of class 0's pixels: three classes averaged."""
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    pred = torch.tensor([0, 0, 2, 2, 1, 1, 1, 1])
    conf = confusion_matrix(pred, target, 3)
    # class 0: inter 2, union 4; class 1: inter 4, union 4; class 2: inter 0, union 2
    assert mean_iou(conf) == pytest.approx((0.5 + 1 + 0) / 3)
    m = segmentation_metrics(conf, ["a", "b", "c"])
    assert m["per_class_iou"] == {"a": 0.5, "b": 1.0, "c": 0.0} and m["classes_present"] == 2
    assert segmentation_metrics(confusion_matrix(pred[4:], target[4:], 3))["per_class_iou"]["0"] is None


def test_hand_computed_iou() -> None:
    target = torch.tensor([0, 0, 0, 1, 1, 255])
    pred = torch.tensor([0, 0, 1, 1, 0, 1])
    conf = confusion_matrix(pred, target, 2)
    # class 0: inter 2, union {0,1,2,4} = 4; class 1: inter 1, union {2,3,4} = 3
    assert per_class_iou(conf).tolist() == pytest.approx([0.5, 1 / 3])
    assert mean_iou(conf) == pytest.approx((0.5 + 1 / 3) / 2)
    assert pixel_accuracy(conf) == pytest.approx(3 / 5)
    m = segmentation_metrics(conf, ["a", "b"])
    assert m["per_class_iou"] == {"a": pytest.approx(0.5), "b": pytest.approx(1 / 3)}


def test_bad_ids_are_errors() -> None:
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 2)
    with pytest.raises(ValueError, match="undefined"):
        mean_iou(np.zeros((2, 2)))


def test_hungarian_picks_the_best_one_to_one_map() -> None:
    # clusters x classes: cluster 0 is mostly class 2, cluster 1 class 0, cluster 2 class 1,
    # but greedy argmax would give cluster 3 class 2 as well
    overlap = np.array([[1, 0, 9], [8, 1, 0], [0, 7, 2], [0, 0, 5]])
    mapping = hungarian_match(overlap)
    assert mapping.tolist() == [2, 0, 1, -1]
    best = max(
        sum(overlap[k, c] for k, c in zip(perm, range(3), strict=False))
        for perm in itertools.permutations(range(4), 3)
    )
    assert sum(overlap[k, mapping[k]] for k in range(4) if mapping[k] >= 0) == best
    assert many_to_one_match(overlap).tolist() == [2, 0, 1, 2]


def test_matched_confusion_counts_unmatched_clusters_as_misses() -> None:
    overlap = np.array([[4, 0], [0, 3], [2, 1]])  # cluster 2 unmatched under Hungarian
    conf = matched_confusion(overlap, hungarian_match(overlap))
    assert conf.tolist() == [[4, 0, 2], [0, 3, 1]]
    assert per_class_iou(conf).tolist() == pytest.approx([4 / 6, 3 / 4])
    conf_m2o = matched_confusion(overlap, many_to_one_match(overlap))
    assert conf_m2o.tolist() == [[6, 0, 0], [1, 3, 0]]
    assert per_class_iou(conf_m2o).tolist() == pytest.approx([6 / 7, 3 / 4])
