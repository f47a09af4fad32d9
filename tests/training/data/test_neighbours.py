"""CLS embeddings, cosine kNN with self first, and the neighbour file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cotap.core.preprocess import PreprocessConfig
from cotap.training.bundles import write_model_bundle
from cotap.training.data.folders import open_dataset
from cotap.training.data.neighbours import (
    KnnFileError,
    build_knn_file,
    embed_cls,
    load_knn_file,
    nearest_neighbours,
    read_knn_meta,
)
from cotap.training.models import build_model
from cotap.training.preprocess import preprocess_tensor


def _brute_force(features: np.ndarray, k: int) -> np.ndarray:
    n = len(features)
    out = np.zeros((n, k), dtype=np.int64)
    for i in range(n):
        sims = []
        for j in range(n):
            a, b = features[i], features[j]
            sims.append((float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)), j))
        others = sorted((s for s in sims if s[1] != i), key=lambda t: -t[0])
        out[i] = [i] + [j for _, j in others[: k - 1]]
    return out


def test_nearest_neighbours_match_a_brute_force_loop() -> None:
    feats = np.random.default_rng(0).standard_normal((23, 5))
    for k in (1, 4, 23):
        assert np.array_equal(nearest_neighbours(feats, k, chunk=7), _brute_force(feats, k))
    assert nearest_neighbours(torch.from_numpy(feats), 3).dtype == np.int64


def test_self_comes_first_even_against_duplicates() -> None:
    feats = np.ones((4, 3))
    nns = nearest_neighbours(feats, 2)
    assert nns[:, 0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        nearest_neighbours(feats, 5)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("knn") / "tiny"
    write_model_bundle(
        build_model("cotap_test").eval(),
        "cotap_test",
        out,
        name="tiny",
        preprocess=PreprocessConfig(size=(32, 32), patch_size=8),
    )
    return out


def test_embed_cls_equals_the_model_on_each_image(bundle: Path) -> None:
    from cotap.training.checkpoints import load_model

    model = load_model(bundle).model
    ds = open_dataset("synthetic:5:0:32")
    pre = PreprocessConfig(size=(32, 32), patch_size=8)
    feats = embed_cls(model, ds, pre, batch_size=2, progress=False)
    assert feats.shape == (5, 64) and feats.dtype == torch.float32
    x = preprocess_tensor(torch.from_numpy(ds[3]).permute(2, 0, 1), pre)[None]
    with torch.inference_mode():
        want = model.forward_features(x)["cls"][0]
    assert torch.allclose(feats[3], want, atol=1e-5)


def test_knn_file_round_trips_and_rejects_mismatches(bundle: Path, tmp_path: Path) -> None:
    spec = "synthetic:12:0:32"
    path = build_knn_file(spec, bundle, k=4, out=tmp_path / "nns.npz", progress=False)
    ds = open_dataset(spec)
    nns = load_knn_file(path, expected_len=12, expected_fingerprint=ds.fingerprint())
    assert nns.shape == (12, 4) and nns.dtype == np.int64
    assert nns[:, 0].tolist() == list(range(12))
    meta = read_knn_meta(path)
    assert meta is not None
    assert meta["k"] == 4 and meta["n"] == 12 and meta["size"] == 32 and meta["arch"] == "cotap_test"
    assert meta["dataset_fingerprint"] == ds.fingerprint() and len(meta["checkpoint_sha256"]) == 64
    with pytest.raises(KnnFileError, match="built for 12 images but the dataset has 13"):
        load_knn_file(path, expected_len=13)
    other = open_dataset("synthetic:12:1:32").fingerprint()
    with pytest.raises(KnnFileError, match="another dataset"):
        load_knn_file(path, expected_fingerprint=other)
    # the same file twice gives the same neighbours (deterministic embedding)
    again = build_knn_file(ds, bundle, k=4, out=tmp_path / "again.npz", progress=False)
    assert np.array_equal(load_knn_file(again), nns)


def test_foreign_and_broken_files(tmp_path: Path) -> None:
    plain = tmp_path / "stego.npz"
    np.savez(plain, nns=np.array([[0, 1], [1, 0], [2, 0]]))
    assert read_knn_meta(plain) is None
    with pytest.warns(UserWarning, match="no dataset fingerprint"):
        assert load_knn_file(plain, expected_len=3, expected_fingerprint="abc").shape == (3, 2)
    bad = tmp_path / "bad.npz"
    np.savez(bad, nns=np.array([[0, 5]]), meta=np.array(json.dumps({"k": 2})))
    with pytest.raises(KnnFileError, match="indices"):
        load_knn_file(bad)
    with pytest.raises(KnnFileError, match="no 'nns'"):
        np.savez(tmp_path / "empty.npz", other=np.zeros(2))
        load_knn_file(tmp_path / "empty.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(KnnFileError, match="not a readable"):
        load_knn_file(tmp_path / "junk.npz")
    with pytest.raises(KnnFileError, match="not found"):
        load_knn_file(tmp_path / "missing.npz")


def _dino_checkpoint(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A DINO-layout backbone (no prototypes, no filter norms) with a non-trivial final norm."""
    from cotap.training.checkpoints import filter_keys

    torch.manual_seed(1)
    model = build_model("cotap_test")
    drop = set(filter_keys(model.config.depth))
    sd = {k: v for k, v in model.state_dict().items() if k not in drop}
    d = model.config.embed_dim
    norm = {"weight": torch.rand(d) + 0.5, "bias": torch.randn(d)}
    torch.save(sd | {"norm.weight": norm["weight"], "norm.bias": norm["bias"]}, path)
    return path, norm


def test_dino_init_ranks_by_dinos_own_cls_feature(tmp_path: Path) -> None:
    """Random prototypes carry no meaning: a DINO checkpoint's neighbours come from the last block's
    CLS token through DINO's final LayerNorm (what the release's neighbour files were built from)."""
    from cotap.training.checkpoints import load_model

    ckpt, norm = _dino_checkpoint(tmp_path / "dino.pth")
    spec = "synthetic:12:0:32"
    path = build_knn_file(spec, ckpt, k=4, out=tmp_path / "nns.npz", progress=False, arch="cotap_test")
    model = load_model(ckpt, arch="cotap_test").model
    ds = open_dataset(spec)
    pre = PreprocessConfig(size=(32, 32), patch_size=8)
    x = torch.stack([preprocess_tensor(torch.from_numpy(ds[i]).permute(2, 0, 1), pre) for i in range(12)])
    with torch.inference_mode():
        tokens = model.get_intermediate_layers(x, n=1)[0]  # (12, 1+N, D)
        cls = tokens[:, 0]
        mu = cls.mean(-1, keepdim=True)
        var = ((cls - mu) ** 2).mean(-1, keepdim=True)
        dino = (cls - mu) / torch.sqrt(var + 1e-6) * norm["weight"] + norm["bias"]
        filtered = model.forward_features(x)["cls"]
    got = load_knn_file(path)
    assert np.array_equal(got, _brute_force(dino.numpy(), 4))
    assert not np.array_equal(got, _brute_force(filtered.numpy(), 4))  # the filter's CLS ranks otherwise
    meta = read_knn_meta(path)
    assert meta is not None and "final norm" in meta["embedding"] and meta["crop"] == "center square"


def test_images_are_center_cropped_to_a_square(tmp_path: Path, bundle: Path) -> None:
    from PIL import Image

    from cotap.training.checkpoints import load_model

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    arrays = [
        rng.integers(0, 256, (40, 64, 3), dtype=np.uint8),
        rng.integers(0, 256, (72, 48, 3), dtype=np.uint8),
    ]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i}.png")
    model = load_model(bundle).model
    pre = PreprocessConfig(size=(32, 32), patch_size=8)
    ds = open_dataset(str(folder))
    cropped = [arrays[0][:, 12:52], arrays[1][12:60]]  # the central squares, cut by hand
    want = torch.stack([preprocess_tensor(torch.from_numpy(c).permute(2, 0, 1), pre) for c in cropped])
    with torch.inference_mode():
        want_cls = model.forward_features(want)["cls"]
    got = embed_cls(model, ds, pre, batch_size=2, progress=False, center_crop=True)
    torch.testing.assert_close(got, want_cls)
    squashed = embed_cls(model, ds, pre, batch_size=2, progress=False, center_crop=False)
    assert not torch.allclose(squashed, want_cls)


@pytest.mark.parametrize(
    ("k", "batch_size", "match"),
    [(0, 8, "k=0 must be between 1"), (9, 8, r"k=9 .*\(8\)"), (3, 0, "batch size")],
)
def test_bad_k_and_batch_size_are_refused_before_any_model_loads(
    tmp_path: Path, k: int, batch_size: int, match: str
) -> None:
    """No embedding pass (minutes on a real dataset) before a k the dataset cannot give is refused:
    the checkpoint here does not even exist."""
    with pytest.raises(ValueError, match=match):
        build_knn_file(
            "synthetic:8:0:32", tmp_path / "missing.pt", k=k, batch_size=batch_size, out=tmp_path / "n.npz"
        )
