"""Synthetic scenes: determinism, valid masks, class coverage, colour not a class cue, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cotap.training.data.folders import SegmentationFolder
from cotap.training.data.synthetic import (
    IGNORE,
    SYNTHETIC_VERSION,
    SceneConfig,
    SyntheticScenes,
    write_scenes,
)

SMALL = SceneConfig(size=64)


@pytest.fixture(scope="module")
def scenes() -> list:
    ds = SyntheticScenes(300, seed=3, config=SMALL)
    return [ds[i] for i in range(len(ds))]


def test_same_seed_and_index_give_identical_bytes_whatever_the_access_order() -> None:
    a = SyntheticScenes(10, seed=5)
    b = SyntheticScenes(10, seed=5)
    first = {i: a[i] for i in (7, 2, 9, 0)}
    second = {i: b[i] for i in (0, 9, 2, 7)}
    again = a[2]
    for i in first:
        assert first[i].image.tobytes() == second[i].image.tobytes()
        assert first[i].mask.tobytes() == second[i].mask.tobytes()
        assert first[i].label == second[i].label
    assert again.image.tobytes() == first[2].image.tobytes()
    assert a[-1].image.tobytes() == a[9].image.tobytes()


def test_different_items_and_seeds_differ() -> None:
    a = SyntheticScenes(4, seed=0)
    b = SyntheticScenes(4, seed=1)
    assert a[0].image.tobytes() != a[1].image.tobytes()
    assert a[0].image.tobytes() != b[0].image.tobytes()
    with pytest.raises(IndexError):
        a[4]


def test_masks_are_valid_and_labels_are_the_largest_thing(scenes: list) -> None:
    ds = SyntheticScenes(1, config=SMALL)
    t = len(ds.thing_classes)
    for s in scenes:
        assert s.image.dtype == np.uint8 and s.image.shape == (64, 64, 3)
        assert s.mask.dtype == np.uint8 and s.mask.shape == (64, 64)
        ids = set(np.unique(s.mask).tolist()) - {IGNORE}
        assert ids <= set(range(ds.num_classes))
        counts = np.bincount(s.mask.ravel(), minlength=256)[:t]
        assert 0 <= s.label < t
        assert counts[s.label] == counts.max() > 0
        assert (s.mask == IGNORE).mean() < 0.2


def test_every_class_appears_over_a_few_hundred_images(scenes: list) -> None:
    ds = SyntheticScenes(1, config=SMALL)
    pixels = np.zeros(256, dtype=np.int64)
    labels = np.zeros(len(ds.thing_classes), dtype=np.int64)
    for s in scenes:
        pixels += np.bincount(s.mask.ravel(), minlength=256)
        labels[s.label] += 1
    assert (pixels[: ds.num_classes] > 0).all(), pixels[: ds.num_classes]
    assert (labels >= 10).all(), labels  # every thing class is some image's label
    assert ds.class_names[: len(ds.thing_classes)] == [
        "disc", "square", "triangle", "star", "cross", "crescent", "ring", "capsule",
    ]  # fmt: skip
    assert ds.stuff_classes == list(range(8, 14))


def test_colour_alone_does_not_identify_classes(scenes: list) -> None:
    """Mean colour of each class's pixels per image: between-class spread is small next to the
    within-class spread, so a colour-only classifier cannot recover the class."""
    per_class: dict[int, list[np.ndarray]] = {}
    for s in scenes:
        for c in np.unique(s.mask):
            if c != IGNORE:
                sel = s.mask == c
                if sel.sum() >= 30:
                    per_class.setdefault(int(c), []).append(s.image[sel].mean(axis=0))
    means = {c: np.stack(v) for c, v in per_class.items() if len(v) >= 10}
    assert len(means) == 14
    grand = np.concatenate(list(means.values())).mean(axis=0)
    between = np.mean([np.sum((m.mean(axis=0) - grand) ** 2) for m in means.values()])
    within = np.mean([np.mean(np.sum((m - m.mean(axis=0)) ** 2, axis=1)) for m in means.values()])
    assert between < 0.1 * within, (between, within)


def test_config_validation_and_round_trip() -> None:
    cfg = SceneConfig(size=96, objects=(2, 3), num_thing_classes=4)
    assert SceneConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        SceneConfig(num_thing_classes=99)
    with pytest.raises(ValueError):
        SceneConfig(objects=(3, 1))
    ds = SyntheticScenes(20, config=cfg)
    assert ds.num_classes == 4 + 6 and len(ds.class_names) == 10
    for i in range(20):
        m = ds[i].mask
        assert m.shape == (96, 96)
        assert set(np.unique(m).tolist()) - {IGNORE} <= set(range(10))


def test_boundary_ignore_marks_pixels_between_classes() -> None:
    plain = SyntheticScenes(3, config=SceneConfig(size=64))[0]
    marked = SyntheticScenes(3, config=SceneConfig(size=64, boundary_ignore=1))[0]
    assert np.array_equal(plain.image, marked.image)
    changed = marked.mask != plain.mask
    assert changed.any() and (marked.mask[changed] == IGNORE).all()
    # every pixel left labelled has 4-neighbours of its own class only (or ignore)
    m = marked.mask
    inner = m[1:-1, 1:-1]
    for nb in (m[:-2, 1:-1], m[2:, 1:-1], m[1:-1, :-2], m[1:-1, 2:]):
        bad = (inner != IGNORE) & (nb != IGNORE) & (nb != inner)
        assert not bad.any()


def test_write_scenes_layout_reads_back_through_segmentation_folder(tmp_path: Path) -> None:
    cfg = SceneConfig(size=48)
    out = write_scenes(tmp_path / "syn", 6, seed=2, config=cfg)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(6)]
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{i:05d}.png" for i in range(6)]
    meta = json.loads((out / "meta.json").read_text())
    ds = SyntheticScenes(6, seed=2, config=cfg)
    assert meta["version"] == SYNTHETIC_VERSION and meta["seed"] == 2
    assert SceneConfig.from_dict(meta["config"]) == cfg
    assert meta["class_names"] == ds.class_names
    assert meta["labels"] == [ds[i].label for i in range(6)]
    with Image.open(out / "masks" / "00000.png") as m:
        assert m.mode == "P"
    seg = SegmentationFolder(out / "images", out / "masks")
    assert len(seg) == 6 and seg.num_classes == ds.num_classes and seg.class_names == ds.class_names
    for i in range(6):
        image, mask = seg[i]
        assert np.array_equal(image, ds[i].image)  # PNG is lossless
        assert np.array_equal(mask, ds[i].mask)


def test_write_scenes_jpeg(tmp_path: Path) -> None:
    out = write_scenes(tmp_path, 2, config=SceneConfig(size=32), image_format="jpg")
    assert (out / "images" / "00001.jpg").is_file()
    with pytest.raises(ValueError):
        write_scenes(tmp_path / "x", 1, image_format="gif")
