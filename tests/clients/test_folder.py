"""`embed_folder` in-process against a real server: outputs equal `Client.embed`, failures are
listed and nothing is lost, reruns skip finished images, interruptions keep what finished,
shards and their index, and a folder never mixes two models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cotap.client import Client, read_features
from cotap.client.store import feature_path
from tests.clients.folders import image_folder
from tests.clients.live import metric


def _features(dst: Path) -> dict[str, np.ndarray]:
    return {rel: e.patch for rel, e in read_features(dst)}  # type: ignore[misc]


def test_folder_to_files_lists_failures_and_resumes(server_url: str, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "out"
    paths = image_folder(src, 24, corrupt=(7,))
    (src / "part0" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    (src / "part1" / "garbage.png").write_bytes(b"\x89PNG but not really")
    with Client(server_url) as client:
        report = client.embed_folder(src, dst, images_per_request=4, concurrency=3, progress=False)
        assert report.total == 25 and report.written == 23 and report.skipped == 0
        failed = {f.path: f for f in report.failures}
        assert set(failed) == {"part1/img0007.jpg", "part1/garbage.png"}
        assert failed["part1/img0007.jpg"].code == "bad_image" and failed["part1/img0007.jpg"].request_id
        assert failed["part1/garbage.png"].code == "bad_image"  # refused before sending
        assert not report.ok and report.remaining == 2
        listed = json.loads((dst / "failures.json").read_text())
        assert listed["count"] == 2 and {f["path"] for f in listed["failures"]} == set(failed)
        run = json.loads((dst / "embed.json").read_text())
        assert run["bundle_sha256"] == client.models().model().bundle_sha256  # type: ignore[union-attr]

        # every output equals what Client.embed answers for the same file
        written = _features(dst)
        assert len(written) == 23
        good = [p for p in paths if p != "part1/img0007.jpg"]
        direct = client.embed([src / p for p in good[:6]])
        for p, e in zip(good[:6], direct, strict=True):
            assert np.array_equal(written[p], e.patch)
        assert feature_path(dst, good[0]).name == Path(good[0]).name + ".safetensors"

        mtimes = {p: feature_path(dst, p).stat().st_mtime_ns for p in good}
        before = metric(server_url, "cotap_images_total")
        again = client.embed_folder(src, dst, images_per_request=4, progress=False)
        assert again.skipped == 23 and again.written == 0 and len(again.failures) == 2
        assert metric(server_url, "cotap_images_total") == before  # nothing was run again
        assert {p: feature_path(dst, p).stat().st_mtime_ns for p in good} == mtimes


def test_interrupted_run_keeps_what_finished(server_url: str, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "out"
    image_folder(src, 30)
    seen: list[str] = []

    def stop_at_ten(rel: str) -> None:
        seen.append(rel)
        if len(seen) == 10:
            raise KeyboardInterrupt

    with Client(server_url) as client:
        first = client.embed_folder(
            src, dst, images_per_request=2, concurrency=2, progress=False, on_written=stop_at_ten
        )
        assert first.interrupted and first.written == 10 and "interrupted" in first.summary()
        on_disk = {rel for rel, _ in read_features(dst)}
        assert on_disk == set(seen)
        second = client.embed_folder(src, dst, images_per_request=2, progress=False)
    assert second.ok and second.skipped == 10 and second.written == 20
    assert len({rel for rel, _ in read_features(dst)}) == 30


def test_shards_with_index(server_url: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    paths = image_folder(src, 21, corrupt=(4,))
    with Client(server_url) as client:
        files = client.embed_folder(src, tmp_path / "files", progress=False)
        seen: list[str] = []

        def stop(rel: str) -> None:
            seen.append(rel)
            if len(seen) == 9:
                raise KeyboardInterrupt

        part = client.embed_folder(src, tmp_path / "shards", shard_size=4, progress=False, on_written=stop)
        assert part.interrupted
        index = json.loads((tmp_path / "shards" / "index.json").read_text())
        assert len(index["items"]) == 9  # two full shards and the flushed remainder
        rest = client.embed_folder(src, tmp_path / "shards", shard_size=4, progress=False)
    assert files.written == 20 and rest.written == 11 and rest.skipped == 9 and len(rest.failures) == 1
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert set(index["items"]) == set(paths) - {paths[[p.endswith("img0004.jpg") for p in paths].index(True)]}
    assert index["bundle_sha256"] and all(s["count"] <= 4 for s in index["shards"])
    a, b = _features(tmp_path / "files"), _features(tmp_path / "shards")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k])


def test_refuses_to_mix_models(server_url: str, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "out"
    image_folder(src, 3)
    with Client(server_url) as client:
        assert client.embed_folder(src, dst, progress=False).ok
        with pytest.raises(ValueError, match="bundle_sha256"):
            client.embed_folder(src, dst, model="varied", progress=False)
        with pytest.raises(ValueError, match="normalize"):
            client.embed_folder(src, dst, normalize=True, progress=False)
        redo = client.embed_folder(src, dst, model="varied", overwrite=True, progress=False)
    assert redo.written == 3 and {e.model for _, e in read_features(dst)} == {"varied"}
