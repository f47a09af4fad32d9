"""Features on disk, as `embed_folder` writes them and `read_features` reads them back.

Two layouts, both plain safetensors (no pickle), each file written atomically (a temporary file
in the same folder, then a rename), so a crash or Ctrl-C never leaves a half-written file that
counts as done:

- one file per image: `DST/<path of the image under SRC>.safetensors` (`photos/cat.jpg` ->
  `photos/cat.jpg.safetensors`), holding `patch` (h, w, C) and/or `cls` (C,); metadata names the
  source path, model, bundle hash, grid and sizes. The file takes the image's modification time
  as read (as `cp -p`); done = the file exists and is not older than the image.
- shards: `DST/shard-00000.safetensors`, ... holding up to N images each (`patch` (n, h, w, C) and
  `cls` (n, C) when the grids agree, else `patch.0`, `patch.1`, ...), and `DST/index.json` mapping
  every image path to its shard and row. The index is rewritten (atomically) after each shard, so
  done = listed in the index and the shard not older than the image (a shard takes the time of its
  newest image as read). An image changed since is dropped from the index and embedded again into a
  later shard; its old row stays in its shard, unindexed, and `read_features` skips it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from cotap.client.protocol import item_tensor, read_metadata
from cotap.client.results import Embedding
from cotap.core.fsio import TMP_MARK, atomic_write, write_json
from cotap.core.wire import CLS, PATCH, metadata_strings

FEATURES_FORMAT = "cotap-features-v1"
SHARDS_FORMAT = "cotap-feature-shards-v1"
SUFFIX = ".safetensors"
INDEX = "index.json"
FAILURES = "failures.json"
RUN = "embed.json"


def feature_path(dst: Path, rel: str) -> Path:
    """Where the features of the image at `rel` (a POSIX path under the source) go."""
    return dst / (rel + SUFFIX)


def remove_stale_tmp(dst: Path) -> int:
    """Delete temporary files a killed run left behind; returns how many."""
    n = 0
    if not dst.is_dir():
        return 0
    for path in dst.rglob(f".*{TMP_MARK}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            n += 1
    return n


def encode_features(rel: str, e: Embedding) -> bytes:
    """One image's features as a safetensors file body."""
    tensors: dict[str, np.ndarray] = {}
    if e.patch is not None:
        tensors[PATCH] = np.ascontiguousarray(e.patch)
    if e.cls is not None:
        tensors[CLS] = np.ascontiguousarray(e.cls)
    meta = {
        "format": FEATURES_FORMAT,
        "source": rel,
        "model": e.model,
        "bundle_sha256": e.bundle_sha256,
        "grid": list(e.grid),
        "input_size": list(e.input_size),
        "original_size": list(e.original_size),
        "normalized": e.normalized,
    }
    return save_safetensors(tensors, metadata=metadata_strings(meta))


def write_features(dst: Path, rel: str, e: Embedding) -> Path:
    path = feature_path(dst, rel)
    atomic_write(path, encode_features(rel, e))
    return path


def read_feature_file(path: str | Path) -> tuple[str, Embedding]:
    """(source path, Embedding) of a per-image features file."""
    body = Path(path).read_bytes()
    tensors = load_safetensors(body)
    meta = read_metadata(body)
    return str(meta.get("source", "")), Embedding(
        patch=tensors.get(PATCH),
        cls=tensors.get(CLS),
        grid=_pair(meta.get("grid")),
        input_size=_pair(meta.get("input_size")),
        original_size=_pair(meta.get("original_size")),
        model=str(meta.get("model", "")),
        bundle_sha256=str(meta.get("bundle_sha256", "")),
        normalized=bool(meta.get("normalized", False)),
    )


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if v else (0, 0)


class ShardWriter:
    """Collects features and writes them `shard_size` at a time, updating `index.json` after each
    shard. Not thread-safe: one writer thread (embed_folder's main loop) owns it."""

    def __init__(self, dst: Path, shard_size: int, header: dict[str, Any], fresh: bool = False) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be at least 1")
        self.dst = dst
        self.shard_size = shard_size
        self.buffer: list[tuple[str, Embedding]] = []
        self._newest_source_ns: int | None = None  # the shard takes its newest image's time
        index_path = dst / INDEX
        if index_path.exists() and not fresh:
            self.index = json.loads(index_path.read_text())
            if self.index.get("format") != SHARDS_FORMAT:
                raise ValueError(f"{index_path} is not a cotap feature index")
        else:
            self.index = {"format": SHARDS_FORMAT, **header, "shards": [], "items": {}}
        self.index.update(header)

    @property
    def shard_of(self) -> dict[str, str]:
        """The shard file that holds each image's features."""
        return {rel: place[0] for rel, place in self.index["items"].items()}

    def add(self, rel: str, e: Embedding, source_mtime_ns: int | None = None) -> None:
        """Buffer one image's features (`source_mtime_ns`: the image's time when it was read)."""
        self.buffer.append((rel, e))
        if source_mtime_ns is not None:
            self._newest_source_ns = max(self._newest_source_ns or source_mtime_ns, source_mtime_ns)
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def forget(self, rels: Sequence[str]) -> None:
        """Drop these images from the index (their rows stay in their shards, unread)."""
        dropped = [rel for rel in rels if self.index["items"].pop(rel, None) is not None]
        if dropped:
            write_json(self.dst / INDEX, self.index)

    def flush(self) -> None:
        """Write what is buffered as one shard, then the index that lists it."""
        if not self.buffer:
            return
        name = f"shard-{len(self.index['shards']):05d}{SUFFIX}"
        atomic_write(self.dst / name, self._encode(self.buffer))
        if self._newest_source_ns is not None:  # as `cp -p`: not older than any of its images
            os.utime(self.dst / name, ns=(self._newest_source_ns, self._newest_source_ns))
            self._newest_source_ns = None
        paths = [rel for rel, _ in self.buffer]
        self.index["shards"].append({"file": name, "count": len(paths)})
        for row, rel in enumerate(paths):
            self.index["items"][rel] = [name, row]
        write_json(self.dst / INDEX, self.index)
        self.buffer = []

    @staticmethod
    def _encode(items: list[tuple[str, Embedding]]) -> bytes:
        tensors: dict[str, np.ndarray] = {}
        for name in (PATCH, CLS):
            arrays = [getattr(e, name) for _, e in items]
            if any(a is None for a in arrays):
                continue
            if len({a.shape for a in arrays}) == 1:
                tensors[name] = np.stack(arrays)
            else:
                tensors |= {f"{name}.{i}": np.ascontiguousarray(a) for i, a in enumerate(arrays)}
        meta = {
            "format": SHARDS_FORMAT,
            "paths": [rel for rel, _ in items],
            "grids": [list(e.grid) for _, e in items],
            "input_sizes": [list(e.input_size) for _, e in items],
            "original_sizes": [list(e.original_size) for _, e in items],
            "model": items[0][1].model,
            "bundle_sha256": items[0][1].bundle_sha256,
            "normalized": items[0][1].normalized,
        }
        return save_safetensors(tensors, metadata=metadata_strings(meta))


def read_shard(path: str | Path) -> list[tuple[str, Embedding]]:
    """Every (source path, Embedding) of one shard, in row order."""
    body = Path(path).read_bytes()
    tensors = load_safetensors(body)
    meta = read_metadata(body)
    out = []
    for i, rel in enumerate(meta["paths"]):
        out.append(
            (
                rel,
                Embedding(
                    patch=item_tensor(tensors, PATCH, i),
                    cls=item_tensor(tensors, CLS, i),
                    grid=_pair(meta["grids"][i]),
                    input_size=_pair(meta["input_sizes"][i]),
                    original_size=_pair(meta["original_sizes"][i]),
                    model=str(meta.get("model", "")),
                    bundle_sha256=str(meta.get("bundle_sha256", "")),
                    normalized=bool(meta.get("normalized", False)),
                ),
            )
        )
    return out


def read_features(dst: str | Path) -> Iterator[tuple[str, Embedding]]:
    """Every (source path, Embedding) that `embed_folder` wrote to `dst`, in either layout."""
    dst = Path(dst)
    index_path = dst / INDEX
    if index_path.exists():
        index = json.loads(index_path.read_text())
        items = index["items"]
        for shard in index["shards"]:
            for row, (rel, e) in enumerate(read_shard(dst / shard["file"])):
                if items.get(rel) == [shard["file"], row]:  # not a row superseded by a later shard
                    yield rel, e
        return
    for path in sorted(dst.rglob(f"*{SUFFIX}")):
        if path.name.startswith(".") or TMP_MARK in path.name:
            continue
        yield read_feature_file(path)
