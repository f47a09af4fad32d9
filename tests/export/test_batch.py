"""`cotap export batch`: three targets -> ONNX models, reports, build scripts and a manifest; one
failing target does not stop the others."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import onnx
import pytest

from cotap.cli.main import main
from cotap.core.artifacts import onnx_artifacts
from cotap.core.bundle import Bundle, read_bundle, sha256_file
from cotap.export.batch import export_batch
from cotap.export.targets import load_targets

TARGETS = """
defaults: {workspace_mb: 512}
targets:
  nano:
    gpu: Jetson Orin Nano
    family: jetson
    compute_capability: "8.7"
    jetpack: "6.1"
    tensorrt: "10.3"
    precision: fp16
    sizes: [32]
    batch: {min: 1, opt: 2, max: 4}
  orin:
    gpu: Jetson AGX Orin
    family: jetson
    compute_capability: "8.7"
    tensorrt: "10.3"
    precision: int8
    sizes: ["24x40"]
    dla_core: 0
    batch: {min: 2, opt: 2, max: 2}
  l4:
    gpu: NVIDIA L4
    family: datacenter
    compute_capability: "8.9"
    tensorrt: "10.8"
    precision: fp16
    hardware_compatibility: ampere_plus
    batch: {min: 1, opt: 8, max: 16}
"""


def test_batch_of_three_targets(
    tiny_bundle: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    targets = tmp_path / "targets.yaml"
    targets.write_text(TARGETS)
    before = tiny_bundle.sha256
    out = tmp_path / "dist"
    code = main(
        ["export", "batch", "--bundle", str(tiny_bundle.path), "--targets", str(targets), "--out", str(out)]
    )
    assert code == 0
    table = capsys.readouterr().out
    for name in ("nano", "orin", "l4"):
        assert name in table
    assert table.count("build.sh") == 3

    assert read_bundle(tiny_bundle.path).sha256 == before  # the input bundle is untouched
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "cotap-export-batch" and manifest["build_machine"] is None
    assert set(manifest["targets"]) == {"nano", "orin", "l4"}
    copy = read_bundle(out / "bundle")
    by_file = {r.file: r for r in onnx_artifacts(copy)}
    for name, entry in manifest["targets"].items():
        assert entry["status"] == "script" and entry["error"] is None
        tdir = out / name
        for fn in ("model.onnx", "report.json", "build.sh", "targets.yaml"):
            assert (tdir / fn).is_file(), (name, fn)
            assert entry["files"][fn]["sha256"] == sha256_file(tdir / fn)
        report = json.loads((tdir / "report.json").read_text())
        source = by_file[report["build_input"]]
        assert sha256_file(tdir / "model.onnx") == source.sha256
        assert all(r["gate"]["passed"] for r in report["onnx"].values())
        onnx.checker.check_model(str(tdir / "model.onnx"))

    nano = json.loads((out / "nano" / "report.json").read_text())
    assert set(nano["onnx"]) == {"fp32", "fp16"} and nano["sizes"] == [[32, 32]]
    assert nano["build_input"] == "onnx/model-fp32-32x32.onnx"  # TensorRT lowers fp32 to fp16 itself
    orin = json.loads((out / "orin" / "report.json").read_text())
    assert orin["onnx"]["int8"]["extra"]["conversion"]["mode"] == "static"  # QDQ for TensorRT
    assert any("calibrated on generated fixture images" in w for w in orin["warnings"])
    l4 = json.loads((out / "l4" / "report.json").read_text())
    assert l4["sizes"] == [[32, 32], [24, 40]]  # the bundle's declared sizes

    script = (out / "nano" / "build.sh").read_text()
    for flag in (
        "--onnx=model.onnx",
        "--saveEngine=model.plan",
        "--minShapes=images:1x3x32x32",
        "--optShapes=images:2x3x32x32",
        "--maxShapes=images:4x3x32x32",
        "--fp16",
        "--memPoolSize=workspace:512M",
        "--timingCacheFile=timing.cache",
        "--precisionConstraints=obey",
        "LayerNormalization:fp32",
        "cotap export tensorrt --bundle ../bundle --target nano",
    ):
        assert flag in script, flag
    orin_script = (out / "orin" / "build.sh").read_text()
    assert "--int8" in orin_script and "--useDLACore=0" in orin_script and "--allowGPUFallback" in orin_script
    for flag in (
        "--minShapes=images:2x3x24x40",
        "--optShapes=images:2x3x24x40",
        "--maxShapes=images:2x3x24x40",
    ):
        assert flag in orin_script, flag  # DLA: one fixed batch
    l4_script = (out / "l4" / "build.sh").read_text()
    assert "--hardwareCompatibilityLevel=ampere+" in l4_script and "--profile=1" in l4_script
    subprocess.run(["bash", "-n", str(out / "l4" / "build.sh")], check=True)  # valid shell
    assert load_targets(out / "orin" / "targets.yaml")["orin"] == load_targets(targets)["orin"]


def test_one_failing_target_does_not_stop_the_others(tiny_bundle: Bundle, tmp_path: Path) -> None:
    targets = tmp_path / "targets.yaml"
    targets.write_text(
        TARGETS.replace('sizes: ["24x40"]', 'sizes: ["24x44"]')  # not a multiple of the patch size
    )
    result = export_batch(tiny_bundle.path, targets, tmp_path / "dist", only=["nano", "orin"])
    status = {r.name: r.status for r in result.results}
    assert status == {"nano": "script", "orin": "failed"} and not result.ok
    failed = next(r for r in result.results if r.name == "orin")
    assert failed.error is not None and "24x44" in failed.error
    assert "FAILED" in result.table()
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["targets"]["orin"]["status"] == "failed"
    with pytest.raises(FileExistsError):
        export_batch(tiny_bundle.path, targets, tmp_path / "dist", only=["nano"])
