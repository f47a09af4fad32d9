"""Image folders, image + mask folders and dataset specs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cotap.training.data.folders import (
    ImageFolder,
    SegmentationFolder,
    SyntheticImages,
    open_dataset,
    parse_synthetic_spec,
)
from cotap.training.data.synthetic import SceneConfig, SyntheticScenes, write_scenes


def _img(value: int, size: tuple[int, int] = (20, 24)) -> np.ndarray:
    a = np.zeros((*size, 3), dtype=np.uint8)
    a[..., 0] = value
    a[..., 1] = np.arange(size[1], dtype=np.uint8)[None, :]
    return a


def _save(path: Path, array: np.ndarray, fmt: str, **kw: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt, **kw)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _save(root / "b" / "two.png", _img(20), "PNG")
    _save(root / "a.png", _img(10), "PNG")
    _save(root / "b" / "three.JPG", _img(30), "JPEG", quality=100)
    _save(root / "c" / "four.webp", _img(40), "WEBP", lossless=True)
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    _save(root / ".hidden" / "x.png", _img(99), "PNG")
    return root


def test_image_folder_lists_recursively_and_sorted(tree: Path) -> None:
    ds = ImageFolder(tree)
    assert ds.relative_paths == ["a.png", "b/broken.jpg", "b/three.JPG", "b/two.png", "c/four.webp"]
    assert len(ds) == 5
    assert ds[0].shape == (20, 24, 3) and ds[0].dtype == np.uint8
    assert ds[3][0, 0, 0] == 20 and ds[4][0, 0, 0] == 40
    assert ds[-1][0, 0, 0] == 40


def test_unreadable_files_are_skipped_counted_and_listed(tree: Path) -> None:
    ds = ImageFolder(tree)
    first = ds[1]  # broken.jpg: the next readable file (three.JPG) stands in
    assert abs(int(first[0, 0, 0]) - 30) <= 2
    again = ds[1]
    assert np.array_equal(first, again)
    images = [ds[i] for i in range(len(ds))]  # a whole pass never raises
    assert len(images) == 5
    assert len(ds.failures) == 1
    path, reason = ds.failures[0]
    assert path.endswith("broken.jpg") and reason


def test_validate_drops_failures_and_fingerprint_tracks_the_list(tree: Path) -> None:
    ds = ImageFolder(tree)
    before = ds.fingerprint()
    assert before == ImageFolder(tree).fingerprint() and len(before) == 64
    ds.validate()
    assert len(ds) == 4 and "b/broken.jpg" not in ds.relative_paths
    assert [f[0].endswith("broken.jpg") for f in ds.failures] == [True]
    assert ds.fingerprint() != before
    (tree / "a.png").rename(tree / "z.png")
    assert ImageFolder(tree).fingerprint() != before


def test_a_folder_without_readable_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"junk")
    ds = ImageFolder(tmp_path)
    with pytest.raises(ValueError, match="could be read: .*\\("):
        ds[0]
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path, exts=(".png",))
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / "missing")


def _exif_rotated_jpeg(array: np.ndarray, orientation: int) -> bytes:
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=100, exif=exif.tobytes())
    return buf.getvalue()


def test_segmentation_folder_pairs_by_stem_and_reads_palette_and_grey_masks(tmp_path: Path) -> None:
    images, masks = tmp_path / "img", tmp_path / "ann"
    m0 = np.zeros((20, 24), dtype=np.uint8)
    m0[5:10, 5:10] = 3
    m0[0, :] = 255
    m1 = np.full((20, 24), 6, dtype=np.uint8)
    _save(images / "x0.jpg", _img(1), "JPEG")
    _save(images / "sub" / "x1.png", _img(2), "PNG")
    pal = Image.frombytes("P", (24, 20), m0.tobytes())
    pal.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    masks.mkdir()
    pal.save(masks / "x0.png")
    _save(masks / "sub" / "x1.png", m1, "PNG")
    ds = SegmentationFolder(images, masks)
    assert ds.stems == ["sub/x1", "x0"]
    image, mask = ds[1]
    assert image.shape == (20, 24, 3) and np.array_equal(mask, m0)  # palette indices, not colours
    assert np.array_equal(ds[0][1], m1)
    assert ds.num_classes == 7  # no meta.json: largest id + 1, ignoring 255
    assert ds.class_names is None
    lut = np.arange(256)
    lut[6] = 1
    assert ds.__class__(images, masks, label_map=lut)[0][1].max() == 1


def test_segmentation_folder_errors_are_clear(tmp_path: Path) -> None:
    images, masks = tmp_path / "img", tmp_path / "ann"
    _save(images / "a.png", _img(1), "PNG")
    _save(images / "b.png", _img(2), "PNG")
    _save(masks / "a.png", np.zeros((20, 24), np.uint8), "PNG")
    _save(masks / "c.png", np.zeros((20, 24), np.uint8), "PNG")
    with pytest.raises(
        ValueError, match=r"1 images without a mask \(e.g. \['b'\]\) and 1 masks without an image"
    ):
        SegmentationFolder(images, masks)
    assert SegmentationFolder(images, masks, strict=False).stems == ["a"]
    (tmp_path / "val.txt").write_text("a\n")
    assert SegmentationFolder(images, masks, split=tmp_path / "val.txt").stems == ["a"]
    with pytest.raises(ValueError, match="split"):
        SegmentationFolder(images, masks, split=["a", "b"])
    _save(masks / "b.png", np.zeros((10, 10), np.uint8), "PNG")
    with pytest.raises(ValueError, match="24x20 but its mask"):
        SegmentationFolder(images, masks, split=["b"])[0]
    _save(masks / "a.png", np.zeros((20, 24, 3), np.uint8), "PNG")
    with pytest.raises(ValueError, match="RGB"):
        SegmentationFolder(images, masks, split=["a"])[0]


def test_exif_orientation_upright_for_images_stored_for_masks(tmp_path: Path) -> None:
    stored = _img(50, (16, 32))  # 16 rows x 32 columns as stored
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "r.jpg").write_bytes(_exif_rotated_jpeg(stored, 6))
    _save(tmp_path / "ann" / "r.png", np.zeros((16, 32), np.uint8), "PNG")
    assert ImageFolder(tmp_path / "img")[0].shape == (32, 16, 3)  # upright for training
    image, mask = SegmentationFolder(tmp_path / "img", tmp_path / "ann")[0]
    assert image.shape == (16, 32, 3) and mask.shape == (16, 32)  # as annotated
    assert np.abs(image[..., 1].astype(int) - stored[..., 1]).max() <= 3


def test_open_dataset_specs(tmp_path: Path) -> None:
    assert parse_synthetic_spec("synthetic:20") == (20, 0, None)
    assert parse_synthetic_spec("synthetic:20:3:64") == (20, 3, 64)
    for bad in ("synthetic:", "synthetic:x", "synthetic:0", "synthetic:1:2:3:4", "synthetic:5:0:8"):
        with pytest.raises(ValueError):
            parse_synthetic_spec(bad)
    ds = open_dataset("synthetic:5:2:40")
    assert isinstance(ds, SyntheticImages) and len(ds) == 5
    ref = SyntheticScenes(5, 2, SceneConfig(size=40))[4]
    assert np.array_equal(ds[4], ref.image)
    assert ds.item_with_label(4)[1] == ref.label
    out = write_scenes(tmp_path / "syn", 3, config=SceneConfig(size=32))
    folder = open_dataset(out)
    assert isinstance(folder, ImageFolder) and len(folder) == 3  # images/, not the masks
    direct = ImageFolder(out)  # the class itself, as the Python API and neighbour files use it
    assert len(direct) == 3 and direct.relative_paths == folder.relative_paths
    assert direct.fingerprint() == folder.fingerprint()
    Image.new("RGB", (8, 8)).save(out / "loose.png")  # images of its own besides: the root is read whole
    assert len(ImageFolder(out)) == 7 and ImageFolder(out).root == out
    with pytest.raises(FileNotFoundError):
        open_dataset(tmp_path / "nope")
