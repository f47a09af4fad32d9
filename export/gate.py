"""The accuracy gate: an exported model's outputs against the torch fp32 model on fixture images.

Per declared size it measures, over every patch of every fixture image:

- the cosine similarity of `patch` vectors (mean and min) and of `cls` vectors,
- the agreement of the prototype argmax of `assign` (the prototype id the server returns).

Argmax agreement is only meaningful where the reference has a clear winner. A model whose
prototypes are not trained (random init, or a DINO backbone before k-means) assigns nearly
uniformly, and a 1e-6 perturbation flips its argmax. So agreement is computed over the patches
whose reference top-1 minus top-2 probability is at least `margin`, a per-precision value above
that precision's expected error, and the fraction of patches left out is reported beside it. When
every patch is left out, agreement is reported as null and does not fail the gate (the cosine
checks still do).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from cotap.core.artifacts import INPUT_NAME, OUTPUT_NAMES
from cotap.core.preprocess import PreprocessConfig
from cotap.export.fixtures import preprocess_batch
from cotap.training.models import CoTAPViT


@dataclass(frozen=True)
class GateThresholds:
    """Pass marks for one precision."""

    patch_cos_mean: float
    patch_cos_min: float
    cls_cos_mean: float
    argmax_agreement: float
    margin: float  # patches whose reference top-1 minus top-2 assign probability is below are excluded


THRESHOLDS: dict[str, GateThresholds] = {
    "fp32": GateThresholds(
        patch_cos_mean=0.9999, patch_cos_min=0.999, cls_cos_mean=0.9999, argmax_agreement=0.99, margin=1e-4
    ),
    "fp16": GateThresholds(
        patch_cos_mean=0.999, patch_cos_min=0.99, cls_cos_mean=0.999, argmax_agreement=0.98, margin=1e-3
    ),
    "int8": GateThresholds(
        patch_cos_mean=0.99, patch_cos_min=0.9, cls_cos_mean=0.99, argmax_agreement=0.95, margin=1e-2
    ),
}


class GateError(Exception):
    """The exported model's outputs drift too far from torch fp32; `report` holds the numbers."""

    def __init__(self, message: str, report: GateReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class SizeReport:
    """Gate figures at one input size."""

    size: tuple[int, int]
    images: int
    patches: int
    patch_cos_mean: float
    patch_cos_min: float
    patch_max_abs: float
    cls_cos_mean: float
    cls_cos_min: float
    argmax_agreement: float | None  # None when every patch was excluded
    argmax_excluded_fraction: float
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["passed"] = self.passed
        return d


@dataclass
class GateReport:
    """The whole gate: thresholds, per-size figures, verdict. Stored in the manifest record."""

    precision: str
    thresholds: GateThresholds
    sizes: list[SizeReport]
    sources: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(s.passed for s in self.sizes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "passed": self.passed,
            "thresholds": asdict(self.thresholds),
            "sizes": {f"{s.size[0]}x{s.size[1]}": s.to_dict() for s in self.sizes},
            "sources": self.sources,
            "runtime": self.runtime,
        }

    def summary(self) -> str:
        """One line per size with the figures and what failed."""
        return summary_of(self.to_dict())


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of a and b, both (..., C) -> (...,), in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return num / np.maximum(den, 1e-30)


def compare_outputs(
    ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], thresholds: GateThresholds
) -> SizeReport:
    """Figures and failures for outputs of one size: ref/got hold patch (N,h,w,C), cls (N,C), assign (N,h,w,M)."""
    for name in OUTPUT_NAMES:
        if ref[name].shape != got[name].shape:
            raise ValueError(f"output {name!r} has shape {got[name].shape}, torch gives {ref[name].shape}")
    n = ref["patch"].shape[0]
    pcos = cosine_rows(ref["patch"], got["patch"]).reshape(-1)
    ccos = cosine_rows(ref["cls"], got["cls"]).reshape(-1)
    m = ref["assign"].shape[-1]
    ra = ref["assign"].reshape(-1, m).astype(np.float64)
    ga = got["assign"].reshape(-1, m)
    top2 = np.sort(ra, axis=-1)[:, -2:] if m > 1 else np.concatenate([np.zeros_like(ra), ra], -1)
    clear = (top2[:, 1] - top2[:, 0]) >= thresholds.margin
    agreement = float((ra.argmax(-1)[clear] == ga.argmax(-1)[clear]).mean()) if clear.any() else None
    report = SizeReport(
        size=(0, 0),
        images=n,
        patches=int(pcos.size),
        patch_cos_mean=float(pcos.mean()),
        patch_cos_min=float(pcos.min()),
        patch_max_abs=float(np.abs(ref["patch"].astype(np.float64) - got["patch"]).max()),
        cls_cos_mean=float(ccos.mean()),
        cls_cos_min=float(ccos.min()),
        argmax_agreement=agreement,
        argmax_excluded_fraction=float(1.0 - clear.mean()),
    )
    t = thresholds
    if not report.patch_cos_mean >= t.patch_cos_mean:
        report.failures.append(f"patch cos mean {report.patch_cos_mean:.6f} < {t.patch_cos_mean}")
    if not report.patch_cos_min >= t.patch_cos_min:
        report.failures.append(f"patch cos min {report.patch_cos_min:.6f} < {t.patch_cos_min}")
    if not report.cls_cos_mean >= t.cls_cos_mean:
        report.failures.append(f"cls cos mean {report.cls_cos_mean:.6f} < {t.cls_cos_mean}")
    if agreement is not None and not agreement >= t.argmax_agreement:
        report.failures.append(f"argmax agreement {100 * agreement:.2f}% < {100 * t.argmax_agreement:.0f}%")
    return report


def torch_outputs(model: CoTAPViT, x: np.ndarray, chunk: int = 16) -> dict[str, np.ndarray]:
    """The fp32 reference: model.forward_features on x (N, 3, H, W), as numpy."""
    outs: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUT_NAMES}
    model = model.float().eval()
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            o = model.forward_features(torch.from_numpy(x[i : i + chunk]))
            for k in OUTPUT_NAMES:
                outs[k].append(o[k].numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def ort_session(path: str | os.PathLike[str], threads: int = 0) -> Any:
    """A CPU ONNX Runtime session (errors only in the log)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_outputs(session: Any, x: np.ndarray, chunk: int = 16) -> dict[str, np.ndarray]:
    """Run x (N, 3, H, W) through an ONNX Runtime session in batches of `chunk`."""
    outs: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUT_NAMES}
    for i in range(0, x.shape[0], chunk):
        res = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x[i : i + chunk]})
        for k, v in zip(OUTPUT_NAMES, res, strict=True):
            outs[k].append(np.asarray(v, dtype=np.float32))
    return {k: np.concatenate(v) for k, v in outs.items()}


def run_gate(
    onnx_path: str | os.PathLike[str],
    model: CoTAPViT,
    preprocess: PreprocessConfig,
    sizes: Sequence[tuple[int, int]],
    precision: str,
    images: Sequence[Image.Image],
    *,
    max_batch: int = 32,
    thresholds: GateThresholds | None = None,
    sources: Mapping[str, Any] | None = None,
) -> GateReport:
    """Gate an ONNX file against `model` (torch fp32) at every size; raises nothing, returns the report."""
    import onnxruntime as ort

    if not images:
        raise ValueError("the gate needs at least one fixture image")
    t = thresholds or THRESHOLDS[precision]
    session = ort_session(onnx_path)
    chunk = max(1, min(max_batch, 16))
    reports = []
    for size in sizes:
        x = preprocess_batch(images, preprocess, size)  # (N, 3, H, W)
        report = compare_outputs(torch_outputs(model, x, chunk), ort_outputs(session, x, chunk), t)
        report.size = (int(size[0]), int(size[1]))
        reports.append(report)
    return GateReport(
        precision=precision,
        thresholds=t,
        sizes=reports,
        sources=dict(sources or {}),
        runtime={
            "reference": f"torch {torch.__version__} fp32 eager",
            "candidate": f"onnxruntime {ort.__version__} CPUExecutionProvider",
            "batch": chunk,
        },
    )


def summary_of(gate: Mapping[str, Any]) -> str:
    """The one-line-per-size summary of a stored gate report (`OnnxArtifact.gate`)."""
    t = gate.get("thresholds", {})
    lines = []
    for name, s in gate.get("sizes", {}).items():
        agree = s.get("argmax_agreement")
        agree_text = "n/a" if agree is None else f"{100 * agree:.2f}%"
        line = (
            f"{gate.get('precision')} {name}: patch cos mean {s['patch_cos_mean']:.6f} "
            f"min {s['patch_cos_min']:.6f}, cls cos mean {s['cls_cos_mean']:.6f}, argmax agreement "
            f"{agree_text} ({100 * s['argmax_excluded_fraction']:.1f}% excluded, margin < {t.get('margin')})"
        )
        if s.get("failures"):
            line += " FAILED: " + "; ".join(s["failures"])
        lines.append(line)
    return "\n".join(lines)
