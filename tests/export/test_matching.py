"""The matching ONNX graph against a plain numpy reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cotap.cli.main import main
from cotap.core.bundle import Bundle, read_bundle
from cotap.export.matching import MATCHING_FILE, export_matching_onnx


def reference(src: np.ndarray, tgt: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Loops over patches: cosine, best target, mutual check, top-k."""
    b, hs, ws, _ = src.shape
    out: dict[str, np.ndarray] = {
        "match": np.zeros((b, hs, ws), np.int64),
        "score": np.zeros((b, hs, ws), np.float32),
        "mutual": np.zeros((b, hs, ws), bool),
        "match_topk": np.zeros((b, hs, ws, k), np.int64),
        "score_topk": np.zeros((b, hs, ws, k), np.float32),
    }
    for i in range(b):
        s = src[i].reshape(-1, src.shape[-1]).astype(np.float64)
        t = tgt[i].reshape(-1, tgt.shape[-1]).astype(np.float64)
        s = s / np.linalg.norm(s, axis=1, keepdims=True)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        sim = s @ t.T
        for p in range(sim.shape[0]):
            j = int(np.argmax(sim[p]))
            back = int(np.argmax(sim[:, j]))
            y, x = divmod(p, ws)
            out["match"][i, y, x] = j
            out["score"][i, y, x] = sim[p, j]
            out["mutual"][i, y, x] = back == p
            order = np.argsort(-sim[p], kind="stable")[:k]
            out["match_topk"][i, y, x] = order
            out["score_topk"][i, y, x] = sim[p, order]
    return out


@pytest.mark.parametrize(("dim", "k"), [(16, 3), (None, 0)])
def test_matching_graph_matches_numpy(tmp_path: Path, dim: int | None, k: int) -> None:
    rec = export_matching_onnx(tmp_path / "m.onnx", dim, top_k=k)
    sess = ort.InferenceSession(rec["file"], providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    src = rng.standard_normal((2, 3, 4, 16)).astype(np.float32)
    tgt = rng.standard_normal((2, 5, 2, 16)).astype(np.float32)
    tgt[0, 1, 1] = src[0, 2, 3] * 3.0  # an exact (mutual) match, scale-invariant
    names = [o.name for o in sess.get_outputs()]
    assert names == ["match", "score", "mutual"] + (["match_topk", "score_topk"] if k else [])
    got = dict(zip(names, sess.run(None, {"source": src, "target": tgt}), strict=True))
    ref = reference(src, tgt, k)
    np.testing.assert_array_equal(got["match"], ref["match"])
    np.testing.assert_allclose(got["score"], ref["score"], atol=1e-5)
    np.testing.assert_array_equal(got["mutual"], ref["mutual"])
    assert got["match"][0, 2, 3] == 1 * 2 + 1 and got["mutual"][0, 2, 3]
    assert 0 < got["mutual"].sum() < got["mutual"].size
    if k:
        np.testing.assert_array_equal(got["match_topk"], ref["match_topk"])
        np.testing.assert_allclose(got["score_topk"], ref["score_topk"], atol=1e-5)


def test_matching_cli_adds_graph_to_bundle(tiny_bundle: Bundle, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "matching", "--bundle", str(tiny_bundle.path), "--top-k", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    bundle = read_bundle(tiny_bundle.path)
    assert info["file"] == MATCHING_FILE and bundle.has(MATCHING_FILE)
    assert bundle.artifacts["matching"][0]["dim"] == 64 and bundle.artifacts["matching"][0]["top_k"] == 2
    sess = ort.InferenceSession(str(bundle.file(MATCHING_FILE)), providers=["CPUExecutionProvider"])
    feats = np.random.default_rng(1).standard_normal((1, 4, 4, 64)).astype(np.float32)
    match, score, mutual, *_ = sess.run(None, {"source": feats, "target": feats})
    np.testing.assert_array_equal(match.reshape(-1), np.arange(16))  # every patch finds itself
    assert mutual.all() and np.allclose(score, 1.0, atol=1e-5)


def test_bad_top_k_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="top_k"):
        export_matching_onnx(tmp_path / "m.onnx", 8, top_k=-1)


def test_export_records_a_parity_report_and_refuses_a_wrong_graph(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every exported artefact carries its parity report (DESIGN.md, the bundle); a graph that
    disagrees with the reference is not written."""
    import cotap.export.matching as matching

    assert export_matching_onnx(tmp_path / "k64.onnx", 16, top_k=64)["parity"][
        "passed"
    ]  # the server's largest k
    rec = export_matching_onnx(tmp_path / "m.onnx", 16, top_k=2)
    parity = rec["parity"]
    assert parity["passed"] is True and parity["score_max_abs"] <= 1e-5
    assert parity["patches_compared"] > 100 and parity["match_agreement"] == 1.0
    # the reference itself agrees with this file's plain loop version
    rng = np.random.default_rng(3)
    src, tgt = rng.standard_normal((1, 3, 2, 8)), rng.standard_normal((1, 2, 4, 8))
    mine, theirs = matching.reference_matching(src, tgt, 3), reference(src, tgt, 3)
    for name in ("match", "mutual", "match_topk"):
        np.testing.assert_array_equal(mine[name], theirs[name])
    np.testing.assert_allclose(mine["score"], theirs["score"], atol=1e-12)

    def wrong(source: np.ndarray, target: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
        out = reference(source, target, top_k)
        out["match"] = (out["match"] + 1) % (target.shape[1] * target.shape[2])
        return out

    monkeypatch.setattr(matching, "reference_matching", wrong)
    with pytest.raises(matching.MatchingParityError, match="disagrees"):
        export_matching_onnx(tmp_path / "bad.onnx", 16)
    assert not (tmp_path / "bad.onnx").exists()


def test_ties_go_to_the_lowest_index_like_the_servers_post_processing(tmp_path: Path) -> None:
    """Identical patches (a flat image) tie everywhere: the graph answers as NumpyOps and TorchOps do."""
    rec = export_matching_onnx(tmp_path / "m.onnx", 4, top_k=3)
    sess = ort.InferenceSession(rec["file"], providers=["CPUExecutionProvider"])
    src, tgt = np.ones((1, 2, 2, 4), np.float32), np.ones((1, 2, 3, 4), np.float32)
    tgt[0, 0, 0] = [1, 0, 0, 0]  # the first target patch is the worst match; the rest tie
    got = dict(
        zip([o.name for o in sess.get_outputs()], sess.run(None, {"source": src, "target": tgt}), strict=True)
    )
    assert (got["match"] == 1).all() and (got["match_topk"] == [1, 2, 3]).all()
    assert got["mutual"].ravel().tolist() == [True, False, False, False]  # target 1's best source is source 0
