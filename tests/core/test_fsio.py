"""Atomic writes: the whole new file or the old one, and no temporary left behind on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cotap.core.fsio import TMP_MARK, atomic_path, atomic_write, write_json


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.bin"
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        assert TMP_MARK in tmp.name and tmp.parent == target.parent
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]


def test_write_json_round_trips_with_options(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"b": 1, "a": Path("x")}, sort_keys=True, default=str)
    text = (tmp_path / "a.json").read_text()
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": "x", "b": 1}
