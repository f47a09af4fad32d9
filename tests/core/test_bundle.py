from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cotap.core.bundle import (
    CONFIG,
    MANIFEST,
    WEIGHTS,
    BundleConfig,
    BundleError,
    add_files,
    read_bundle,
    write_bundle,
)
from cotap.core.preprocess import PreprocessConfig


def _config() -> BundleConfig:
    return BundleConfig(
        name="t",
        arch="cotap_test",
        model={"patch_size": 8},
        preprocess=PreprocessConfig(size=(32, 32), patch_size=8),
        input_sizes=((32, 32),),
        outputs={"patch": {"dim": 64}, "cls": {"dim": 64}, "assign": {"dim": 64}},
    )


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    write_bundle(tmp_path / "b", _config(), {WEIGHTS: b"weights" * 100, "MODEL_CARD.md": b"# card\n"})
    return tmp_path / "b"


def test_roundtrip(bundle_dir: Path) -> None:
    b = read_bundle(bundle_dir)
    assert b.config == _config()
    assert set(b.files) == {CONFIG, WEIGHTS, "MODEL_CARD.md"}
    assert len(b.sha256) == 64
    assert b.file(WEIGHTS).read_bytes() == b"weights" * 100


def test_one_changed_byte_is_refused(bundle_dir: Path) -> None:
    p = bundle_dir / WEIGHTS
    data = bytearray(p.read_bytes())
    data[10] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.safetensors") as e:
        read_bundle(bundle_dir)
    assert e.value.path == WEIGHTS


def test_changed_config_is_refused(bundle_dir: Path) -> None:
    cfg = json.loads((bundle_dir / CONFIG).read_text())
    cfg["name"] = "other"
    (bundle_dir / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="config.json"):
        read_bundle(bundle_dir)


def test_missing_file_is_named(bundle_dir: Path) -> None:
    (bundle_dir / "MODEL_CARD.md").unlink()
    with pytest.raises(BundleError, match="missing: MODEL_CARD.md"):
        read_bundle(bundle_dir)


def test_unexpected_file_is_named(bundle_dir: Path) -> None:
    (bundle_dir / "engines").mkdir()
    (bundle_dir / "engines" / "x.plan").write_bytes(b"x")
    with pytest.raises(BundleError, match="engines/x.plan"):
        read_bundle(bundle_dir)


def test_a_file_named_as_a_bundle_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "last.pt").write_bytes(b"x")
    with pytest.raises(
        BundleError, match=r"is a file, not a bundle directory.*cotap export bundle --checkpoint"
    ):
        read_bundle(tmp_path / "last.pt")
    with pytest.raises(BundleError, match="bundle directory not found"):
        read_bundle(tmp_path / "nothing")


def test_unknown_schema_version(bundle_dir: Path) -> None:
    m = json.loads((bundle_dir / MANIFEST).read_text())
    m["schema_version"] = 99
    (bundle_dir / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema version 99"):
        read_bundle(bundle_dir)


@pytest.mark.parametrize(
    "entry",
    [
        {"sha256": "0" * 64},
        {"size": "abc", "sha256": "0" * 64},
        {"size": 700},
        [700],
        {"size": 1, "sha256": "x"},
    ],
)
def test_malformed_manifest_entries_are_bundle_errors(bundle_dir: Path, entry: object) -> None:
    """A hand-edited manifest is refused with a message that names the entry, not a KeyError."""
    m = json.loads((bundle_dir / MANIFEST).read_text())
    m["files"][WEIGHTS] = entry
    (bundle_dir / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"manifest.json entry for 'model.safetensors' is malformed"):
        read_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c["outputs"].pop("patch"), r"outputs.patch.dim must be a positive integer"),
        (lambda c: c["outputs"]["assign"].update(dim=0), r"outputs.assign.dim must be a positive integer"),
        (lambda c: c.update(input_sizes=[]), r"input_sizes must list positive sizes"),
        (lambda c: c["model"].pop("patch_size"), r"model.patch_size must be a positive integer"),
    ],
)
def test_incomplete_config_is_refused_even_with_matching_hashes(
    bundle_dir: Path, edit: Callable[[dict[str, Any]], object], match: str
) -> None:
    """A config.json that passes its hash but lacks what a server answers with is refused when the
    bundle is read, not with a 500 at the first request."""
    cfg = json.loads((bundle_dir / CONFIG).read_text())
    edit(cfg)
    raw = json.dumps(cfg).encode()
    (bundle_dir / CONFIG).write_bytes(raw)
    m = json.loads((bundle_dir / MANIFEST).read_text())
    m["files"][CONFIG] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (bundle_dir / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=match):
        read_bundle(bundle_dir)


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/../../b", "a\\b", ""])
def test_escaping_names_are_refused(bundle_dir: Path, name: str) -> None:
    m = json.loads((bundle_dir / MANIFEST).read_text())
    m["files"][name] = {"sha256": "0" * 64, "size": 1}
    (bundle_dir / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError):
        read_bundle(bundle_dir)
    with pytest.raises(BundleError):
        add_files(bundle_dir, {name: b"x"})


def test_symlink_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").write_bytes(b"secret")
    (bundle_dir / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(BundleError, match="link"):
        read_bundle(bundle_dir)


def test_add_files_records_artifact(bundle_dir: Path) -> None:
    before = read_bundle(bundle_dir)
    after = add_files(bundle_dir, {"model.onnx": b"onnx"}, artifacts={"model.onnx": {"gate": "passed"}})
    assert after.has("model.onnx") and after.artifacts["model.onnx"] == {"gate": "passed"}
    assert after.sha256 != before.sha256


def test_add_files_refuses_tampered_bundle(bundle_dir: Path) -> None:
    (bundle_dir / WEIGHTS).write_bytes(b"tampered")
    with pytest.raises(BundleError):
        add_files(bundle_dir, {"model.onnx": b"onnx"})


def test_write_refuses_existing_without_overwrite(bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="exists"):
        write_bundle(bundle_dir, _config(), {WEIGHTS: b"w"})
    b = write_bundle(bundle_dir, _config(), {WEIGHTS: b"w"}, overwrite=True)
    assert not b.has("MODEL_CARD.md")


def test_reading_imports_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, cotap.core.bundle; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )
