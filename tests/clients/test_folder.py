"""`embed_folder` in-process against a real server: outputs equal `Client.embed`, failures are
listed and nothing is lost, reruns skip finished images, interruptions keep what finished,
shards and their index, and a folder never mixes two models."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from cotap.client import Client, FolderInterrupted, Unreachable, read_features
from cotap.client.retry import RetryPolicy
from cotap.client.store import feature_path
from tests.clients.folders import image_folder
from tests.clients.live import live_server, metric, slow


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
        with pytest.raises(FolderInterrupted) as stopped:  # a KeyboardInterrupt: it stops the script
            client.embed_folder(
                src, dst, images_per_request=2, concurrency=2, progress=False, on_written=stop_at_ten
            )
        first = stopped.value.report
        assert isinstance(stopped.value, KeyboardInterrupt)
        assert first.interrupted and first.written == 10 and "interrupted" in first.summary()
        assert "20 not reached" in first.summary() and first.remaining == 20 and not first.failures
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

        with pytest.raises(FolderInterrupted) as stopped:
            client.embed_folder(src, tmp_path / "shards", shard_size=4, progress=False, on_written=stop)
        assert stopped.value.report.interrupted
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


@pytest.mark.parametrize("shard_size", [None, 3])
def test_an_image_changed_since_its_run_is_embedded_again(
    server_url: str, tmp_path: Path, shard_size: int | None
) -> None:
    """Like make: features older than their image are dropped and redone; read back are the new ones."""
    src, dst = tmp_path / "src", tmp_path / "out"
    paths = image_folder(src, 6)
    changed, other = src / paths[1], src / paths[4]
    with Client(server_url) as client:
        first = client.embed_folder(src, dst, shard_size=shard_size, progress=False)
        assert first.ok and first.written == 6
        before = _features(dst)[paths[1]]
        then = changed.stat().st_mtime_ns
        changed.write_bytes(other.read_bytes())  # other pixels, dated 2 s later (any clock tick)
        os.utime(changed, ns=(then, then + 2_000_000_000))
        again = client.embed_folder(src, dst, shard_size=shard_size, progress=False)
        assert (again.skipped, again.written, again.stale) == (5, 1, 1) and again.ok
        assert again.summary().endswith("; 1 had changed since their features were written and were redone")
        now = dict(read_features(dst))
        assert len(list(read_features(dst))) == 6  # the superseded row is not read back
        assert np.array_equal(now[paths[1]].patch, now[paths[4]].patch)  # type: ignore[arg-type]
        assert not np.array_equal(now[paths[1]].patch, before)  # type: ignore[arg-type]
        third = client.embed_folder(src, dst, shard_size=shard_size, progress=False)
        assert (third.skipped, third.written, third.stale) == (6, 0, 0)

        # An image dated an hour ahead (a camera clock, an archive): redone once, then settled.
        ahead = time.time_ns() + 3600 * 10**9
        os.utime(other, ns=(ahead, ahead))
        fourth = client.embed_folder(src, dst, shard_size=shard_size, progress=False)
        fifth = client.embed_folder(src, dst, shard_size=shard_size, progress=False)
        assert (fourth.written, fourth.stale, fifth.written, fifth.stale) == (1, 1, 0, 0)

        # Changed into something that fails: its old features are gone, not silently kept.
        changed.write_bytes(b"not an image any more")
        os.utime(changed, ns=(ahead, ahead + 10**9))
        broken = client.embed_folder(src, dst, shard_size=shard_size, progress=False)
    assert broken.stale == 1 and [f.path for f in broken.failures] == [paths[1]]
    assert paths[1] not in dict(read_features(dst)) and len(list(read_features(dst))) == 5


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


def test_refuses_another_source_folder(server_url: str, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    image_folder(tmp_path / "setA", 3)
    (tmp_path / "setB").mkdir()
    for i, name in enumerate(image_folder(tmp_path / "tmpB", 4)):  # other pictures, same names
        target = tmp_path / "setB" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((tmp_path / "tmpB" / name).read_bytes() if i else b"")
    with Client(server_url) as client:
        assert client.embed_folder(tmp_path / "setA", dst, progress=False).ok
        record = (dst / "embed.json").read_text()
        before = _features(dst)
        with pytest.raises(ValueError, match="another source folder") as e:
            client.embed_folder(tmp_path / "setB", dst, progress=False)
        assert str((tmp_path / "setA").resolve()) in str(e.value)
        assert str((tmp_path / "setB").resolve()) in str(e.value)
        assert (dst / "embed.json").read_text() == record  # untouched
        after = _features(dst)
        assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in after)
        assert client.embed_folder(tmp_path / "setA", dst, progress=False).skipped == 3  # same src: fine
        redo = client.embed_folder(tmp_path / "setB", dst, overwrite=True, progress=False)
    assert redo.written == 3 and len(redo.failures) == 1  # the empty file
    assert str((tmp_path / "setB").resolve()) in (dst / "embed.json").read_text()
    kept = _features(dst)  # setA's features of the image that failed in setB are gone too
    assert len(kept) == 3 and redo.failures[0].path not in kept, (redo.failures[0].path, sorted(kept))


def test_a_server_gone_mid_run_stops_the_run(tiny_bundle: Path, tmp_path: Path) -> None:
    """The server stops after 6 images: the run ends with one `Unreachable` that says to rerun (not
    one failure per remaining image); what was written is kept, and a rerun against a server with
    the same bundle does the rest."""
    src, dst = tmp_path / "src", tmp_path / "out"
    image_folder(src, 40)
    server = live_server(tiny_bundle, hook=slow(0.02))
    url = server.__enter__()
    written: list[str] = []

    def stop_server_at_six(rel: str) -> None:
        written.append(rel)
        if len(written) == 6:
            server.__exit__(None, None, None)

    retry = RetryPolicy(base_s=0.01, cap_s=0.05)
    try:
        with Client(url, retry=retry) as client, pytest.raises(Unreachable) as e:
            client.embed_folder(
                src, dst, images_per_request=2, concurrency=2, progress=False, on_written=stop_server_at_six
            )
    finally:
        if len(written) < 6:
            server.__exit__(None, None, None)
    assert "run the same command again to resume" in str(e.value)
    assert f"of 40 images ({len(written)} written by this run" in str(e.value)
    kept = {rel for rel, _ in read_features(dst)}
    assert kept == set(written) and 6 <= len(kept) < 40
    listed = json.loads((dst / "failures.json").read_text())
    assert listed["interrupted"] and not [f for f in listed["failures"] if f["code"] == "unreachable"]
    with live_server(tiny_bundle) as url2, Client(url2) as client:
        rest = client.embed_folder(src, dst, progress=False)
    assert rest.ok and rest.skipped == len(kept) and rest.written == 40 - len(kept)
