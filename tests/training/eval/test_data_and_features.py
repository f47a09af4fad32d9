"""Evaluation data specs and frozen feature extraction (with its disk cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cotap.core.preprocess import IMAGENET_MEAN, IMAGENET_STD
from cotap.training.data.synthetic import SceneConfig, SyntheticScenes, write_scenes
from cotap.training.eval import EvalConfig
from cotap.training.eval.datasets import from_arrays, open_eval_data, split
from cotap.training.eval.features import FeatureConfig, FrozenModel, extract_features, resize_mask
from cotap.training.models import build_model


def test_synthetic_spec_gives_masks_and_labels() -> None:
    d = open_eval_data("synthetic:5:3:32")
    ref = SyntheticScenes(5, 3, SceneConfig(size=32))
    assert len(d) == 5 and d.num_classes == ref.num_classes and d.class_names == ref.class_names
    item = d[4]
    assert np.array_equal(item.image, ref[4].image) and np.array_equal(item.mask, ref[4].mask)
    assert item.label == ref[4].label and d.fingerprint == ref.fingerprint()


def test_write_scenes_folder_reads_back_with_labels(tmp_path: Path) -> None:
    write_scenes(tmp_path / "s", 4, seed=2, config=SceneConfig(size=32))
    d = open_eval_data(tmp_path / "s")
    ref = SyntheticScenes(4, 2, SceneConfig(size=32))
    assert d.has_masks and d.has_labels and d.num_classes == ref.num_classes
    for i in range(4):
        assert np.array_equal(d[i].mask, ref[i].mask) and d[i].label == ref[i].label
        assert np.array_equal(d[i].image, ref[i].image)  # PNG: lossless


def _voc(root: Path, stems: list[str]) -> None:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for i, s in enumerate(stems):
        Image.new("RGB", (20, 16), (i * 40, 0, 0)).save(root / "JPEGImages" / f"{s}.jpg")
        m = np.full((16, 20), i, dtype=np.uint8)
        m[0] = 255
        Image.fromarray(m, "L").save(root / "SegmentationClass" / f"{s}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(stems[1:]) + "\n")


def test_voc_layout_with_a_split_list(tmp_path: Path) -> None:
    _voc(tmp_path / "VOC2012", ["a", "b", "c"])
    d = open_eval_data(f"{tmp_path / 'VOC2012'}@ImageSets/Segmentation/val.txt")
    assert len(d) == 2 and d.num_classes == 21 and d.class_names[15] == "person"
    assert d[0].mask[1, 0] == 1 and d[0].mask[0, 0] == 255 and not d.has_labels
    explicit = open_eval_data(
        f"images={tmp_path / 'VOC2012/JPEGImages'},masks={tmp_path / 'VOC2012/SegmentationClass'}"
    )
    assert len(explicit) == 3 and explicit.num_classes == 3  # largest id + 1


def test_class_folder_and_bad_specs(tmp_path: Path) -> None:
    for c, name in enumerate(["cat", "dog"]):
        (tmp_path / "cls" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (c * 200, i, 0)).save(tmp_path / "cls" / name / f"{i}.png")
    d = open_eval_data(tmp_path / "cls")
    assert [d[i].label for i in range(4)] == [0, 0, 1, 1] and d.class_names == ["cat", "dog"]
    assert not d.has_masks
    (tmp_path / "cls" / "dog" / "2.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="2.png"):
        open_eval_data(tmp_path / "cls")[4]
    with pytest.raises(FileNotFoundError):
        open_eval_data(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no known layout"):
        open_eval_data(tmp_path / "empty")


def test_split_is_seeded_and_disjoint() -> None:
    d = open_eval_data("synthetic:10:0:16")
    tr, va = split(d, 0.3, seed=1)
    _, va2 = split(d, 0.3, seed=1)
    assert len(va) == 3 and len(tr) == 7
    assert [va[i].label for i in range(3)] == [va2[i].label for i in range(3)]
    assert tr.fingerprint != va.fingerprint


def test_resize_mask_is_nearest() -> None:
    m = torch.tensor([[0, 1], [2, 255]], dtype=torch.uint8)
    assert torch.equal(resize_mask(m, (4, 4)), m.repeat_interleave(2, 0).repeat_interleave(2, 1))
    big = torch.arange(16, dtype=torch.uint8).reshape(4, 4)
    assert set(resize_mask(big, (2, 2)).flatten().tolist()) <= set(range(16))


def test_extract_features_matches_the_model_and_caches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("cotap_test").eval()
    g = np.random.default_rng(0)
    images = g.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    masks = g.integers(0, 3, (5, 32, 32), dtype=np.uint8)
    data = from_arrays(images, masks, labels=[0, 1, 0, 1, 1])
    cfg = FeatureConfig(batch_size=2, keep_images=3, mask_size=(16, 16), progress=False)
    feats = extract_features(model, data, cfg)
    assert feats.patch.shape == (5, 4, 4, 64) and feats.cls.shape == (5, 64)
    assert feats.masks.shape == (5, 16, 16) and feats.images.shape == (3, 3, 32, 32)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        ref = model.forward_features(x)
    assert torch.allclose(feats.patch, ref["patch"], atol=1e-5)
    assert torch.equal(feats.prototype, ref["assign"].argmax(-1))
    # disk cache: only data with a fingerprint is cached; a second run reads the file back
    syn = open_eval_data("synthetic:3:0:32")
    a = extract_features(FrozenModel(model), syn, cfg, cache_dir=tmp_path)
    files = list(tmp_path.glob("features-*.safetensors"))
    assert len(files) == 1
    b = extract_features(FrozenModel(model), syn, cfg, cache_dir=tmp_path)
    assert b.meta.get("cache") == str(files[0])
    assert torch.equal(a.patch, b.patch) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)


def test_the_feature_cache_tells_folders_with_the_same_names_apart(tmp_path: Path) -> None:
    """Two scene folders with the same file names, and a folder whose image changed in place:
    each is another data set to the cache (a key of the file names alone reused stale features)."""
    model = FrozenModel(build_model("cotap_test").eval())
    cfg = FeatureConfig(progress=False)
    write_scenes(tmp_path / "a", 3, seed=0, config=SceneConfig(size=32))
    write_scenes(tmp_path / "b", 3, seed=1, config=SceneConfig(size=32))
    a, b = open_eval_data(tmp_path / "a"), open_eval_data(tmp_path / "b")
    assert a.fingerprint != b.fingerprint
    fa = extract_features(model, a, cfg, cache_dir=tmp_path / "cache")
    fb = extract_features(model, b, cfg, cache_dir=tmp_path / "cache")
    assert not torch.equal(fa.patch, fb.patch)
    first = next(iter(sorted((tmp_path / "a" / "images").iterdir())))
    first.write_bytes(next(iter(sorted((tmp_path / "b" / "images").iterdir()))).read_bytes())
    again = extract_features(model, open_eval_data(tmp_path / "a"), cfg, cache_dir=tmp_path / "cache")
    assert torch.equal(again.patch[0], fb.patch[0]) and torch.equal(again.patch[1:], fa.patch[1:])


def test_bad_sizes_are_errors() -> None:
    data = from_arrays(np.zeros((1, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        extract_features(build_model("cotap_test"), data, FeatureConfig(size=(30, 32), progress=False))


def test_cache_tells_student_from_teacher_and_survives_damage(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b = build_model("cotap_test").eval(), build_model("cotap_test").eval()
    data = open_eval_data("synthetic:2:0:32")
    cfg = FeatureConfig(progress=False)
    fa = extract_features(a, data, cfg, cache_dir=tmp_path)
    fb = extract_features(b, data, cfg, cache_dir=tmp_path)
    assert not torch.equal(fa.patch, fb.patch) and len(list(tmp_path.glob("*.safetensors"))) == 2
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(b"damaged")
    again = extract_features(a, data, cfg, cache_dir=tmp_path)
    assert torch.equal(again.patch, fa.patch)
    assert not list(tmp_path.glob("*.tmp"))


def test_as_chw_uint8_copies_read_only_images_without_a_warning() -> None:
    import warnings

    from cotap.training.data.views import as_chw_uint8

    pixels = np.asarray(Image.fromarray(np.arange(60, dtype=np.uint8).reshape(4, 5, 3)))  # read-only
    assert not pixels.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a non-writable array
        chw = as_chw_uint8(pixels)
    assert chw.shape == (3, 4, 5) and torch.equal(chw, torch.from_numpy(pixels.copy()).permute(2, 0, 1))
    assert not np.shares_memory(chw.numpy(), pixels)  # a copy (torch warns only once per process)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        as_chw_uint8(np.zeros((4, 5, 2), np.uint8))


def test_class_folder_needs_two_classes_and_names_ignored_images(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i in range(22):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(root / f"{i:05d}.png")
    Image.new("RGB", (16, 16)).save(root / "sub" / "a.png")
    with pytest.raises(ValueError, match=r"at least 2 subfolders.*found 1 \(sub\).*22 images directly in"):
        open_eval_data(root)
    (root / "other").mkdir()  # an empty folder is no class
    with pytest.raises(ValueError, match="found 1"):
        open_eval_data(root)
    Image.new("RGB", (16, 16)).save(root / "other" / "b.png")
    with caplog.at_level("WARNING"):
        d = open_eval_data(root)
    assert len(d) == 2 and d.class_names == ["other", "sub"]
    assert "22 images directly in" in caplog.text and "ignored" in caplog.text


def test_knn_refuses_train_labels_of_one_class() -> None:
    from cotap.training.eval import evaluate

    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    train = from_arrays(images[:4], labels=[0, 0, 0, 0], num_classes=2)
    val = from_arrays(images[4:], labels=[0, 1], num_classes=2)
    cfg = EvalConfig(features=FeatureConfig(progress=False))
    with pytest.raises(ValueError, match="at least 2 classes"):
        evaluate("knn", build_model("cotap_test"), train, val, cfg)


def test_broken_files_in_a_mask_folder_are_named(tmp_path: Path) -> None:
    write_scenes(tmp_path / "s", 3, seed=0, config=SceneConfig(size=32))
    d = open_eval_data(tmp_path / "s")
    (tmp_path / "s" / "images" / "00001.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"00001\.png: not a decodable image"):
        d[1]
    mask = tmp_path / "s" / "masks" / "00002.png"
    mask.write_bytes(mask.read_bytes()[:60])  # truncated
    with pytest.raises(ValueError, match=r"masks/00002\.png: not a readable mask"):
        d[2]
    with pytest.raises(ValueError, match=r"00001\.png"):  # and so does feature extraction
        extract_features(build_model("cotap_test"), d, FeatureConfig(progress=False))
