"""Batch export for a fleet of GPUs: `cotap export batch --bundle DIR --targets FILE --out dist/`.

For every target of the targets file this writes `<out>/<target>/`:

- `model.onnx`: the ONNX model TensorRT builds from (fp32 for fp32/fp16 targets, the calibrated
  QDQ model for int8 ones), gated against torch fp32;
- `report.json`: the target, the gate reports of that model and of the ONNX model at the target's
  precision (the accuracy that precision gives under onnxruntime), warnings, file hashes;
- `model.plan` when this machine can build the engine (matching GPU and TensorRT), otherwise
  `build.sh` with the exact `trtexec` command and the `cotap export tensorrt` call to run on the
  device, plus `targets.yaml` holding that one target.

All ONNX models also go into `<out>/bundle/`, a verified copy of the input bundle (the input bundle
is not modified), with their manifest records. One target's failure is reported and the others go
on. `<out>/manifest.json` lists every target's status and files with their sha256.
"""

from __future__ import annotations

import datetime as _dt
import os
import shlex
import shutil
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cotap.core.artifacts import OnnxArtifact
from cotap.core.bundle import read_bundle, sha256_file
from cotap.core.fsio import write_json
from cotap.core.version import __version__, install_hint
from cotap.export.fixtures import check_sizes, write_synthetic_folder
from cotap.export.gate import GateError
from cotap.export.onnx import export_onnx
from cotap.export.targets import Target, default_targets_file, load_targets
from cotap.export.tensorrt import (
    build_engine,
    build_refusal,
    engine_file_name,
    fp32_layer_names,
    local_device_facts,
    shell_join,
    source_precision,
    trtexec_command,
)

BATCH_FORMAT = "cotap-export-batch"


@dataclass
class TargetResult:
    """What happened to one target."""

    name: str
    status: str  # engine | script | failed
    target: Target
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)  # {precision: summary figures}
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    reason: str | None = None  # why no engine was built here
    sizes: tuple[tuple[int, int], ...] = ()  # resolved input sizes


@dataclass
class BatchResult:
    """All targets, the output directory and its manifest."""

    out: Path
    results: list[TargetResult]
    manifest_path: Path

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.results)

    def table(self) -> str:
        """The summary table printed at the end."""
        rows = [("target", "gpu", "sm", "trt", "precision", "sizes", "batch", "gate", "output")]
        for r in self.results:
            t = r.target
            sizes = ",".join(f"{h}x{w}" for h, w in (r.sizes or t.sizes or ())) or "?"
            gate = "-"
            if r.gate:
                worst = min(g["patch_cos_mean"] for g in r.gate.values())
                passed = all(g["passed"] for g in r.gate.values())
                gate = f"{'pass' if passed else 'FAIL'} cos {worst:.5f}"
            output = {"engine": "model.plan", "script": "build.sh", "failed": f"FAILED: {r.error}"}[r.status]
            rows.append(
                (
                    t.name,
                    t.gpu[:28],
                    t.compute_capability,
                    t.tensorrt,
                    t.precision + (f"+dla{t.dla_core}" if t.dla_core is not None else ""),
                    sizes,
                    f"{t.min_batch}/{t.opt_batch}/{t.max_batch}",
                    gate,
                    output,
                )
            )
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _gate_summary(record: OnnxArtifact) -> dict[str, Any]:
    sizes = record.gate.get("sizes", {})
    return {
        "file": record.file,
        "passed": bool(record.gate.get("passed")),
        "forced": record.forced,
        "patch_cos_mean": min(s["patch_cos_mean"] for s in sizes.values()),
        "patch_cos_min": min(s["patch_cos_min"] for s in sizes.values()),
        "argmax_agreement": min(
            (s["argmax_agreement"] for s in sizes.values() if s["argmax_agreement"] is not None), default=None
        ),
    }


def build_script(target: Target, sizes: Sequence[tuple[int, int]], fp32_layers: Sequence[str]) -> str:
    """`build.sh` for the device: trtexec (option 1) and the cotap call that records the engine (option 2)."""
    trtexec = trtexec_command(target, sizes, fp32_layers=fp32_layers)
    platform = f"JetPack {target.jetpack} / " if target.jetpack else ""
    entropy = target.precision == "int8" and target.int8_mode == "entropy"
    lines = [
        "#!/usr/bin/env bash",
        f"# Build the TensorRT engine of target {target.name!r}: {target.gpu}, sm {target.compute_capability},",
        f"# {platform}TensorRT {target.tensorrt}, {target.precision}, batch "
        f"{target.min_batch}..{target.max_batch} (opt {target.opt_batch}). Run it ON that device.",
        "# Written by `cotap export batch`; the engine only loads where this GPU and TensorRT version match.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'MODE="${1:-cotap}"   # cotap | trtexec',
        "",
        'if [ "$MODE" = "trtexec" ]; then',
        "  # trtexec ships with TensorRT (on Jetson: /usr/src/tensorrt/bin/trtexec).",
        '  TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
    ]
    if entropy:
        # trtexec's --calib only reads a cache: when the file is missing it calibrates on random
        # inputs, and the engine builds without an error but with meaningless int8 scales.
        cached = shlex.quote(f"../bundle/engines/{target.name}/calibration.cache")
        lines += [
            "  # int8 entropy calibration: calibration.cache comes from a `cotap export tensorrt` run "
            f"({cached}); trtexec only reads it.",
            "  if [ ! -s calibration.cache ]; then",
            "    echo 'calibration.cache is missing here, and trtexec would calibrate int8 on random inputs: "
            f"run this script in cotap mode first, then copy' {cached} 'here.' >&2",
            "    exit 1",
            "  fi",
        ]
    cmd = shell_join(trtexec).replace("trtexec", '"$TRTEXEC"', 1)
    lines += ["  " + cmd.replace("\n", "\n  "), "  exit 0", "fi", ""]
    lines += [
        "# cotap builds the same engine, gates it against torch fp32 on this GPU and records it (TensorRT",
        "# version, GPU, compute capability) in the bundle manifest. Needs: "
        + install_hint("export,gpu")
        + ".",
        "cotap export tensorrt --bundle ../bundle --target "
        + f"{target.name} --targets targets.yaml --timing-cache timing.cache"
        + (' --calibration "${CALIBRATION_DIR:?set CALIBRATION_DIR to an image folder}"' if entropy else ""),
        "",
    ]
    return "\n".join(lines)


def _one_target(
    target: Target,
    bundle_dir: Path,
    out: Path,
    exports: dict[tuple[str, tuple[tuple[int, int], ...]], OnnxArtifact],
    calibration: Path | None,
    force: bool,
    progress: bool,
) -> TargetResult:
    result = TargetResult(name=target.name, status="failed", target=target)
    bundle = read_bundle(bundle_dir)
    sizes = check_sizes(list(target.sizes or bundle.config.input_sizes), bundle.config.patch_size)
    result.sizes = sizes
    tdir = out / target.name
    tdir.mkdir(parents=True, exist_ok=True)
    records: dict[str, OnnxArtifact] = {}
    for precision in dict.fromkeys([source_precision(target), target.precision]):
        key = (precision, sizes)
        if key not in exports:
            calib = None
            if precision == "int8":
                if calibration is None:
                    calib = write_synthetic_folder(out / ".calibration-synthetic")
                    result.warnings.append(
                        "int8 calibrated on generated fixture images; pass --calibration with real photos"
                    )
                else:
                    calib = calibration
            exports[key] = export_onnx(
                bundle_dir,
                precision,
                sizes=sizes,
                max_batch=target.max_batch,
                force=force,
                calibration=calib,
                progress=progress,
            )
        records[precision] = exports[key]
        result.gate[precision] = _gate_summary(exports[key])
        if exports[key].forced:
            result.warnings.append(f"{precision} ONNX model failed its gate and was kept (--force)")
    source = records[source_precision(target)]
    onnx_path = tdir / "model.onnx"
    _link_or_copy(bundle_dir / source.file, onnx_path)
    (tdir / "targets.yaml").write_text(_target_yaml(target))
    facts = local_device_facts()
    refusal = build_refusal(target, facts)
    if refusal is None:
        engine = build_engine(bundle_dir, target, calibration=calibration, force=force, progress=progress)
        _link_or_copy(bundle_dir / engine_file_name(target), tdir / "model.plan")
        result.status = "engine"
        result.gate[f"tensorrt-{target.precision}"] = {
            "file": engine.file,
            "passed": bool(engine.gate.get("passed")),
            "forced": engine.forced,
            "patch_cos_mean": min(s["patch_cos_mean"] for s in engine.gate["sizes"].values()),
        }
    else:
        result.reason = refusal
        script = tdir / "build.sh"
        script.write_text(build_script(target, sizes, fp32_layer_names(onnx_path)))
        script.chmod(0o755)
        result.status = "script"
    report = {
        "target": target.to_dict(),
        "sizes": [list(s) for s in sizes],
        "status": result.status,
        "engine_not_built_because": result.reason,
        "onnx": {p: r.to_dict() for p, r in records.items()},
        "build_input": source.file,
        "warnings": result.warnings,
    }
    write_json(tdir / "report.json", report, sort_keys=True)
    result.files = {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(tdir.iterdir())
        if p.is_file()
    }
    return result


def _target_yaml(target: Target) -> str:
    import yaml

    body = {
        k: v for k, v in target.to_dict().items() if k not in ("name", "min_batch", "opt_batch", "max_batch")
    }
    body["batch"] = {"min": target.min_batch, "opt": target.opt_batch, "max": target.max_batch}
    if body.get("sizes") is not None:
        body["sizes"] = [f"{h}x{w}" for h, w in body["sizes"]]
    return yaml.safe_dump({"targets": {target.name: body}}, sort_keys=False)


def export_batch(
    bundle_dir: str | os.PathLike[str],
    targets_file: str | os.PathLike[str] | None,
    out: str | os.PathLike[str],
    *,
    only: Sequence[str] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    force: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> BatchResult:
    """Export every target (or those in `only`); see the module docstring for the output tree.
    `targets_file` None: the shipped `configs/targets.yaml` (`default_targets_file`)."""
    targets_file = default_targets_file() if targets_file is None else Path(targets_file)
    targets = load_targets(targets_file)
    if only:
        missing = sorted(set(only) - set(targets))
        if missing:
            raise ValueError(f"unknown targets {missing}; known: {', '.join(targets)}")
        targets = {k: v for k, v in targets.items() if k in set(only)}
    source = read_bundle(bundle_dir)  # verified before anything is written
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle_copy = out_dir / "bundle"
    shutil.copytree(source.path, bundle_copy)
    read_bundle(bundle_copy)
    calib = None if calibration is None else Path(calibration)
    exports: dict[tuple[str, tuple[tuple[int, int], ...]], OnnxArtifact] = {}
    results: list[TargetResult] = []
    bar = tqdm(list(targets.values()), desc="export batch", unit="target", disable=not progress)
    for target in bar:
        bar.set_postfix_str(target.name)
        try:
            results.append(_one_target(target, bundle_copy, out_dir, exports, calib, force, progress))
        except Exception as e:  # one target's failure never stops the others
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            failed = TargetResult(name=target.name, status="failed", target=target, error=message)
            if not isinstance(e, GateError | ValueError):
                failed.warnings.append(traceback.format_exc(limit=3))
            results.append(failed)
    shutil.rmtree(out_dir / ".calibration-synthetic", ignore_errors=True)
    facts = local_device_facts()
    manifest = {
        "format": BATCH_FORMAT,
        "producer": {"name": "cotap", "version": __version__},
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "bundle": {
            "source": str(source.path.resolve()),
            "name": source.config.name,
            "arch": source.config.arch,
            "source_manifest_sha256": source.sha256,
            "copy": "bundle",
            "copy_manifest_sha256": read_bundle(bundle_copy).sha256,
        },
        "targets_file": str(Path(targets_file).resolve()),
        "build_machine": None if facts is None else facts.__dict__,
        "targets": {
            r.name: {
                "status": r.status,
                "dir": r.name,
                "gpu": r.target.gpu,
                "compute_capability": r.target.compute_capability,
                "tensorrt": r.target.tensorrt,
                "precision": r.target.precision,
                "gate": r.gate,
                "files": r.files,
                "warnings": r.warnings,
                "error": r.error,
                "engine_not_built_because": r.reason,
            }
            for r in results
        },
    }
    manifest_path = out_dir / "manifest.json"
    write_json(manifest_path, manifest, sort_keys=True)
    return BatchResult(out=out_dir, results=results, manifest_path=manifest_path)
