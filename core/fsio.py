"""Files that appear whole or not at all: every writer of checkpoints, neighbour files, feature
caches and extracted features goes through here, so that a reader never sees half a file, a failed
or interrupted write leaves no temporary file behind, and a renamed file's bytes are on disk first
(fsync before the rename: after a power cut the old file or the whole new one, not an empty one)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"  # in every temporary name: `.{name}.tmp-{pid}-{thread}`, so sweepers can find them


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary sibling of `path` to write to; renamed over `path` when the block ends, deleted
    when it raises (Ctrl+C included). Unique per process and thread, so concurrent writers of one
    file never share a temporary."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(
    path: str | os.PathLike[str],
    doc: Any,
    *,
    indent: int = 2,
    sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """`doc` as JSON (and a newline) to `path`, atomically; `default` as in `json.dumps`."""
    text = json.dumps(doc, indent=indent, sort_keys=sort_keys, default=default)
    atomic_write(path, (text + "\n").encode())
