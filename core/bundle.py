"""The bundle: a self-describing, verifiable model directory that a server loads without training code.

Layout (DESIGN.md, "The bundle")::

    config.json        architecture, preprocessing, input sizes, outputs
    model.safetensors  weights (no pickle)
    manifest.json      schema version, sha256 and size of every other file, provenance, parity reports
    onnx/              optional, written by the exporter: model-<precision>[-<sizes>].onnx (one per
                       precision and size set; DESIGN.md's single model.onnx cannot hold fp32, fp16
                       and int8 side by side) and matching.onnx (the correspondence graph)
    engines/<target>/  optional TensorRT engines
    MODEL_CARD.md      optional

Reading verifies every listed file's size and sha256 and refuses missing, changed, unexpected or
escaping files before anything is used. This module imports no torch.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cotap.core.preprocess import PreprocessConfig
from cotap.core.version import __version__
from cotap.core.wire import ASSIGN, CLS, PATCH

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
FORMAT = "cotap-bundle"

MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
MODEL_CARD = "MODEL_CARD.md"

_CHUNK = 1 << 20


class BundleError(Exception):
    """A bundle that cannot be used; `path` names the offending file when there is one."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_relative_name(name: str) -> str:
    """A file name inside a bundle: relative, POSIX, no `..`, no drive or root. Returns it unchanged."""
    p = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or "\x00" in name
        or p.is_absolute()
        or any(part in ("..", "") for part in p.parts)
        or name != p.as_posix()
        or ":" in p.parts[0]
    ):
        raise BundleError(f"bundle file name {name!r} escapes or is not a plain relative path", name)
    return name


@dataclass(frozen=True)
class BundleConfig:
    """What `config.json` holds: enough to rebuild the model and feed it."""

    name: str
    arch: str
    model: dict[str, Any]
    preprocess: PreprocessConfig
    input_sizes: tuple[tuple[int, int], ...]
    outputs: dict[str, dict[str, Any]]
    prototypes_initialized: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def patch_size(self) -> int:
        return int(self.model["patch_size"])

    @property
    def embed_dim(self) -> int:
        """Width of the `patch` and `cls` outputs (2D)."""
        return int(self.outputs["patch"]["dim"])

    @property
    def num_prototypes(self) -> int:
        return int(self.outputs["assign"]["dim"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "arch": self.arch,
            "model": dict(self.model),
            "preprocess": self.preprocess.to_dict(),
            "input_sizes": [list(s) for s in self.input_sizes],
            "outputs": self.outputs,
            "prototypes_initialized": self.prototypes_initialized,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BundleConfig:
        """The config of config.json, checked: every output a server answers with is declared with a
        positive width, and there is at least one positive input size (else `BundleError`)."""
        try:
            config = cls(
                name=str(d["name"]),
                arch=str(d["arch"]),
                model=dict(d["model"]),
                preprocess=PreprocessConfig.from_dict(d["preprocess"]),
                input_sizes=tuple((int(h), int(w)) for h, w in d["input_sizes"]),
                outputs={k: dict(v) for k, v in d["outputs"].items()},
                prototypes_initialized=bool(d.get("prototypes_initialized", True)),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"config.json is malformed: {e!r}", CONFIG) from e
        problems = [
            f"outputs.{name}.dim must be a positive integer"
            for name in (PATCH, CLS, ASSIGN)
            if not _int_at_least(config.outputs.get(name, {}).get("dim"), 1)
        ]
        if not _int_at_least(config.model.get("patch_size"), 1):
            problems.append("model.patch_size must be a positive integer")
        if not config.input_sizes or any(h < 1 or w < 1 for h, w in config.input_sizes):
            problems.append(f"input_sizes must list positive sizes, got {list(config.input_sizes)}")
        if not config.name:
            problems.append("name is empty")
        if problems:
            raise BundleError(f"config.json is malformed: {'; '.join(problems)}", CONFIG)
        return config


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    config: BundleConfig
    manifest: dict[str, Any]
    sha256: str  # sha256 of manifest.json, which pins every other file

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest["files"])

    @property
    def artifacts(self) -> dict[str, Any]:
        return dict(self.manifest.get("artifacts", {}))

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def file(self, name: str) -> Path:
        """The path of a listed file; refuses names the manifest does not list."""
        check_relative_name(name)
        if name not in self.manifest["files"]:
            raise BundleError(f"bundle {self.path} has no file {name!r}", name)
        return self.path / name

    def read_verified(self, name: str) -> bytes:
        """The bytes of a listed file, checked against its manifest sha256 as they are used: a file
        replaced after `read_bundle` verified the directory is refused, not loaded."""
        data = self.file(name).read_bytes()
        if sha256_bytes(data) != self.manifest["files"][name]["sha256"]:
            raise BundleError(
                f"bundle file changed: {name} does not match its sha256 in manifest.json "
                "(it changed after the bundle was opened)",
                name,
            )
        return data


def _listing(root: Path) -> dict[str, Path]:
    """Every regular file under root by its relative POSIX name; links and odd entries are refused."""
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                raise BundleError(f"bundle holds a symbolic link {d!r}", d)
        for fn in filenames:
            full = Path(dirpath) / fn
            rel = full.relative_to(root).as_posix()
            if full.is_symlink() or not full.is_file():
                raise BundleError(f"bundle file {rel!r} is a link or not a regular file", rel)
            out[rel] = full
    return out


def _int_at_least(value: Any, low: int) -> bool:
    return type(value) is int and value >= low  # not bool, not a float or a string of digits


def _check_entry(name: str, entry: Any) -> None:
    """A manifest entry is {"size": bytes, "sha256": 64 hex digits}; anything else is refused."""
    ok = (
        isinstance(entry, dict)
        and _int_at_least(entry.get("size"), 0)
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
        and all(c in "0123456789abcdef" for c in entry["sha256"])
    )
    if not ok:
        raise BundleError(
            f'manifest.json entry for {name!r} is malformed: expected {{"size": bytes, "sha256": '
            f"64 lowercase hex digits}}, got {json.dumps(entry)[:200]}",
            MANIFEST,
        )


def _verify(root: Path, manifest: Mapping[str, Any]) -> None:
    listed = manifest.get("files")
    if not isinstance(listed, dict) or CONFIG not in listed:
        raise BundleError("manifest.json lists no files or no config.json", MANIFEST)
    present = _listing(root)
    present.pop(MANIFEST, None)
    for name in listed:
        check_relative_name(name)
    missing = sorted(set(listed) - set(present))
    if missing:
        raise BundleError(
            f"bundle file missing: {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            missing[0],
        )
    unexpected = sorted(set(present) - set(listed))
    if unexpected:
        raise BundleError(f"unexpected file in bundle: {unexpected[0]} (not in manifest.json)", unexpected[0])
    for name, entry in listed.items():
        _check_entry(name, entry)
        path = present[name]
        size = path.stat().st_size
        if size != entry["size"]:
            raise BundleError(
                f"bundle file changed: {name} is {size} bytes, manifest says {entry['size']}", name
            )
    for name, entry in listed.items():
        if sha256_file(present[name]) != entry["sha256"]:
            raise BundleError(f"bundle file changed: {name} does not match its sha256 in manifest.json", name)


def read_bundle(path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Open a bundle directory, verifying every file before returning. Raises `BundleError`."""
    root = Path(path)
    if root.is_file():
        raise BundleError(
            f"{root} is a file, not a bundle directory; a checkpoint becomes a bundle with "
            f"`cotap export bundle --checkpoint {root} --out DIR`",
            root,
        )
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}", root)
    manifest_path = root / MANIFEST
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError as e:
        raise BundleError(f"bundle file missing: {MANIFEST} in {root}", MANIFEST) from e
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BundleError(f"manifest.json is not valid JSON: {e}", MANIFEST) from e
    if not isinstance(manifest, dict):
        raise BundleError("manifest.json is not an object", MANIFEST)
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise BundleError(
            f"unknown bundle schema version {version!r}; this cotap ({__version__}) reads {sorted(SUPPORTED_SCHEMA_VERSIONS)}",
            MANIFEST,
        )
    if verify:
        _verify(root, manifest)
    try:
        config_dict = json.loads((root / CONFIG).read_bytes())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"config.json unreadable: {e}", CONFIG) from e
    return Bundle(
        path=root, config=BundleConfig.from_dict(config_dict), manifest=manifest, sha256=sha256_bytes(raw)
    )


def _write_json(path: Path, obj: Any) -> bytes:
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    path.write_bytes(data)
    return data


def _place(root: Path, name: str, content: bytes | os.PathLike[str]) -> None:
    dest = root / check_relative_name(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes | bytearray):
        dest.write_bytes(content)
    else:
        shutil.copyfile(content, dest)


def _entries(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"sha256": sha256_file(root / n), "size": (root / n).stat().st_size} for n in sorted(names)}


def write_bundle(
    out_dir: str | os.PathLike[str],
    config: BundleConfig,
    files: Mapping[str, bytes | os.PathLike[str]],
    *,
    source: Mapping[str, Any] | None = None,
    build: Mapping[str, Any] | None = None,
    artifacts: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Write a bundle atomically (into a temporary sibling, then renamed) and return it, verified.

    `files` maps bundle-relative names to bytes or source paths and must include `model.safetensors`;
    `config.json` and `manifest.json` are written here. `source` records provenance (checkpoint
    path, sha256, layout); `build` the resolved settings that produced it; `artifacts` per-file
    reports such as ONNX parity.
    """
    out = Path(out_dir)
    if WEIGHTS not in files:
        raise BundleError(f"a bundle needs {WEIGHTS}", WEIGHTS)
    for reserved in (CONFIG, MANIFEST):
        if reserved in files:
            raise BundleError(f"{reserved} is written by write_bundle, not passed in", reserved)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} exists; pass overwrite=True to replace it", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_json(tmp / CONFIG, config.to_dict())
        for name, content in files.items():
            _place(tmp, name, content)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "format": FORMAT,
            "producer": {"name": "cotap", "version": __version__},
            "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "files": _entries(tmp, [CONFIG, *files]),
            "source": dict(source or {}),
            "build": dict(build or {}),
            "artifacts": dict(artifacts or {}),
        }
        _write_json(tmp / MANIFEST, manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_bundle(out)


def add_files(
    bundle_dir: str | os.PathLike[str],
    files: Mapping[str, bytes | os.PathLike[str]],
    artifacts: Mapping[str, Any] | None = None,
) -> Bundle:
    """Add (or replace) files in a verified bundle and record their reports under `artifacts`.

    The bundle is verified first, so a tampered bundle is never re-signed. The manifest is replaced
    atomically after the files are in place.
    """
    bundle = read_bundle(bundle_dir)
    root = bundle.path
    for reserved in (CONFIG, MANIFEST):
        if reserved in files:
            raise BundleError(f"{reserved} cannot be replaced with add_files", reserved)
    for name, content in files.items():
        _place(root, name, content)
    manifest = dict(bundle.manifest)
    manifest["files"] = {**manifest["files"], **_entries(root, list(files))}
    manifest["artifacts"] = {**manifest.get("artifacts", {}), **dict(artifacts or {})}
    tmp = root / (MANIFEST + ".tmp")
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    tmp.write_bytes(data)
    os.replace(tmp, root / MANIFEST)
    return read_bundle(root)
