"""Records of exported artefacts in a bundle's manifest (`manifest["artifacts"]`).

The exporter writes them, the server reads them; both go through these types so the two cannot
drift. Every ONNX model and TensorRT engine takes images `images` (B, 3, H, W) float32, normalised
with the bundle's mean/std, and returns `patch` (B, h, w, 2D), `cls` (B, 2D) and `assign`
(B, h, w, M) in float32, whatever its internal precision.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Self

from cotap.core.bundle import Bundle

ONNX_KEY = "onnx"
ENGINES_KEY = "engines"
INPUT_NAME = "images"
OUTPUT_NAMES = ("patch", "cls", "assign")
PRECISIONS = ("fp32", "fp16", "int8")


class _Record:
    """JSON round-trip of a record: sizes as lists of [height, width], unknown keys ignored."""

    sizes: tuple[tuple[int, int], ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[call-overload]
        d["sizes"] = [list(s) for s in self.sizes]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}  # type: ignore[attr-defined]
        known["sizes"] = tuple((int(h), int(w)) for h, w in d["sizes"])
        return cls(**known)


@dataclass(frozen=True)
class OnnxArtifact(_Record):
    """One ONNX model file in the bundle and the sizes, batch range and accuracy it was checked at."""

    file: str
    precision: str
    sizes: tuple[tuple[int, int], ...]
    max_batch: int
    opset: int
    sha256: str = ""
    gate: dict[str, Any] = field(default_factory=dict)  # accuracy report against torch fp32
    forced: bool = False  # written although its gate failed
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineArtifact(_Record):
    """One TensorRT engine, tied to the GPU and TensorRT version it was built with."""

    file: str
    target: str
    precision: str
    sizes: tuple[tuple[int, int], ...]
    min_batch: int
    opt_batch: int
    max_batch: int
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    hardware_compatibility_level: str = "none"  # none | ampere_plus | same_compute_capability
    sha256: str = ""
    gate: dict[str, Any] = field(default_factory=dict)
    forced: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def onnx_artifacts(bundle: Bundle) -> list[OnnxArtifact]:
    return [OnnxArtifact.from_dict(d) for d in bundle.artifacts.get(ONNX_KEY, [])]


def serving_onnx(bundle: Bundle) -> dict[str, OnnxArtifact]:
    """The ONNX model to serve per precision, for the server and for Triton alike: among those
    exported for every size the bundle declares (its preprocessing produces those sizes, and a
    model lacks position embeddings for any other), the one for exactly those sizes first, then
    the one for fewest sizes, then manifest order."""
    declared = set(bundle.config.input_sizes)
    covering = [r for r in onnx_artifacts(bundle) if declared <= set(r.sizes)]
    covering.sort(key=lambda r: (set(r.sizes) != declared, len(r.sizes)))  # stable: manifest order last
    chosen: dict[str, OnnxArtifact] = {}
    for r in covering:
        chosen.setdefault(r.precision, r)
    return chosen


def sizes_text(sizes: Iterable[tuple[int, int]]) -> str:
    """[(24, 40), (32, 32)] -> "24x40, 32x32" (height x width, sorted), for messages."""
    return ", ".join(f"{h}x{w}" for h, w in sorted(sizes))


def engine_artifacts(bundle: Bundle) -> list[EngineArtifact]:
    return [EngineArtifact.from_dict(d) for d in bundle.artifacts.get(ENGINES_KEY, [])]


def replace_record(records: list[dict[str, Any]], record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`records` with any entry for the same file replaced by `record` (for `add_files(artifacts=...)`)."""
    return [r for r in records if r.get("file") != record["file"]] + [dict(record)]
