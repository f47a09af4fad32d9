"""Bundle -> ONNX model inside the bundle, gated for accuracy: `cotap export onnx`.

The model is exported in fp32 (legacy TorchScript exporter, opset 17, dynamic batch, position
embeddings precomputed per declared size: `cotap.export.graph`), converted to the requested
precision (`cotap.export.quantize`), checked with `onnx.checker`, gated against the torch fp32 model
(`cotap.export.gate`) and only then added to the bundle with its `OnnxArtifact` record under
`manifest["artifacts"]["onnx"]`. A failing gate writes nothing unless forced.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx
from tqdm import tqdm

from cotap.core.artifacts import ONNX_KEY, PRECISIONS, OnnxArtifact, replace_record
from cotap.core.bundle import add_files, read_bundle, sha256_file
from cotap.core.version import environment
from cotap.export.fixtures import check_sizes, fixture_images, folder_images
from cotap.export.gate import GateError, GateThresholds, run_gate
from cotap.export.graph import DEFAULT_OPSET, export_fp32
from cotap.export.quantize import ImageCalibrationReader, to_fp16, to_int8_dynamic, to_int8_static
from cotap.training.checkpoints import load_model

SIZE_STRATEGY = "pos-table"  # per-size position embeddings in one graph (see cotap.export.graph)
FIXTURE_COUNT = 8


def onnx_file_name(
    precision: str, sizes: Sequence[tuple[int, int]], declared: Sequence[tuple[int, int]]
) -> str:
    """`onnx/model-<precision>.onnx` for the bundle's declared sizes, else with the sizes in the name;
    the same sizes in any order name the same file (one model holds them all)."""
    if set(sizes) == set(declared):
        return f"onnx/model-{precision}.onnx"
    tag = "_".join(f"{h}x{w}" for h, w in sorted(set(sizes)))
    return f"onnx/model-{precision}-{tag}.onnx"


def export_onnx(
    bundle_dir: str | os.PathLike[str],
    precision: str = "fp32",
    sizes: Sequence[tuple[int, int]] | None = None,
    max_batch: int = 32,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    calibration: str | os.PathLike[str] | None = None,
    fixtures: str | os.PathLike[str] | None = None,
    *,
    thresholds: GateThresholds | None = None,
    fixture_count: int = FIXTURE_COUNT,
    progress: bool = False,
) -> OnnxArtifact:
    """Export the bundle's model to ONNX at `precision`, gate it, add it to the bundle, return its record.

    `sizes` default to the bundle's declared input sizes; every one is gated. For int8,
    `calibration` (an image folder) selects static QDQ quantisation, otherwise dynamic. `fixtures`
    adds an image folder to the generated fixture images. A failing gate raises `GateError` and
    leaves the bundle untouched unless `force`, in which case the record says `forced: true`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if calibration is not None and precision != "int8":
        raise ValueError("--calibration is only used for int8 (static QDQ quantisation)")
    bundle = read_bundle(bundle_dir)
    cfg = bundle.config
    sizes = check_sizes(list(sizes) if sizes is not None else list(cfg.input_sizes), cfg.patch_size)
    steps = tqdm(total=4, desc=f"export onnx {precision}", disable=not progress, unit="step")

    loaded = load_model(bundle.path)
    model = loaded.model.float().eval()
    images = fixture_images(fixtures, count=fixture_count)
    file_name = onnx_file_name(precision, sizes, cfg.input_sizes)
    conversion: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=".cotap-onnx-") as tmp:
        fp32_path = Path(tmp) / "model-fp32.onnx"
        steps.set_postfix_str("trace")
        export_fp32(model, sizes, fp32_path, opset=opset)
        steps.update()
        steps.set_postfix_str("convert")
        out_path = Path(tmp) / "model.onnx"
        if precision == "fp32":
            out_path = fp32_path
        elif precision == "fp16":
            conversion = to_fp16(fp32_path, out_path)
        elif calibration is not None:
            reader = ImageCalibrationReader(folder_images(calibration), cfg.preprocess, sizes)
            conversion = to_int8_static(fp32_path, out_path, reader)
            conversion["calibration_folder"] = str(Path(calibration).resolve())
        else:
            conversion = to_int8_dynamic(fp32_path, out_path)
        onnx.checker.check_model(str(out_path), full_check=True)
        steps.update()
        steps.set_postfix_str("gate")
        report = run_gate(
            out_path,
            model,
            cfg.preprocess,
            sizes,
            precision,
            images,
            max_batch=max_batch,
            thresholds=thresholds,
            sources={
                "synthetic": fixture_count,
                "folder": None if fixtures is None else str(Path(fixtures).resolve()),
                "images": len(images),
            },
        )
        steps.update()
        if not report.passed and not force:
            steps.close()
            raise GateError(
                f"accuracy gate failed for {precision} ONNX of {bundle.path}; nothing was written "
                f"(pass --force, force=True in Python, to write it anyway):\n{report.summary()}",
                report,
            )
        steps.set_postfix_str("write")
        record = OnnxArtifact(
            file=file_name,
            precision=precision,
            sizes=sizes,
            max_batch=max_batch,
            opset=opset,
            sha256=sha256_file(out_path),
            gate=report.to_dict(),
            forced=force and not report.passed,
            extra={
                "size_strategy": SIZE_STRATEGY,
                "exporter": "torch.onnx.export(dynamo=False)",
                "conversion": conversion,
                "bytes": out_path.stat().st_size,
                "config": {
                    "precision": precision,
                    "sizes": [list(s) for s in sizes],
                    "max_batch": max_batch,
                    "opset": opset,
                    "force": force,
                    "calibration": None if calibration is None else str(calibration),
                    "fixtures": None if fixtures is None else str(fixtures),
                    "fixture_count": fixture_count,
                    "thresholds": asdict(report.thresholds),
                },
                "versions": environment("torch", "onnx", "onnxruntime"),
            },
        )
        records = list(read_bundle(bundle.path).artifacts.get(ONNX_KEY, []))
        add_files(
            bundle.path,
            {file_name: out_path},
            artifacts={ONNX_KEY: replace_record(records, record.to_dict())},
        )
        steps.update()
    steps.close()
    return record
