"""`export_onnx`: fp32/fp16/int8 models of a tiny bundle pass their gates, two sizes live in one
model, records land in the manifest, and a perturbed model is refused unless forced."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cotap.cli.main import main
from cotap.core.artifacts import OnnxArtifact, onnx_artifacts
from cotap.core.bundle import MANIFEST, Bundle, read_bundle, sha256_file
from cotap.export import onnx as onnx_export
from cotap.export.fixtures import synthetic_images
from cotap.export.gate import GateError
from cotap.export.graph import export_fp32
from cotap.export.onnx import export_onnx, onnx_file_name
from cotap.training.checkpoints import load_model
from tests.export.conftest import TWO_SIZES


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch(bundle: Bundle, x: np.ndarray) -> dict[str, np.ndarray]:
    model = load_model(bundle.path).model.eval()
    with torch.no_grad():
        out = model.forward_features(torch.from_numpy(x))
    return {k: v.numpy() for k, v in out.items()}


def test_fp32_two_sizes_in_one_model(tiny_bundle: Bundle) -> None:
    record = export_onnx(tiny_bundle.path, "fp32", max_batch=4)
    bundle = read_bundle(tiny_bundle.path)
    assert record.file == "onnx/model-fp32.onnx" and bundle.has(record.file)
    assert onnx_artifacts(bundle) == [record]
    assert record.sha256 == sha256_file(bundle.file(record.file))
    assert record.sizes == TWO_SIZES and record.opset == 17 and not record.forced
    assert record.gate["passed"] and set(record.gate["sizes"]) == {"32x32", "24x40"}

    model = onnx.load(str(bundle.file(record.file)))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["patch", "cls", "assign"]
    assert not any(n.op_type == "Resize" for n in model.graph.node)  # no in-graph bicubic
    sess = _session(bundle.file(record.file))
    rng = np.random.default_rng(0)
    for h, w in TWO_SIZES:
        for batch in (1, 3):  # dynamic batch
            x = rng.standard_normal((batch, 3, h, w)).astype(np.float32)
            got = dict(zip(["patch", "cls", "assign"], sess.run(None, {"images": x}), strict=True))
            ref = _torch(bundle, x)
            assert got["patch"].shape == (batch, h // 8, w // 8, 64)
            assert got["assign"].shape == (batch, h // 8, w // 8, 64)
            for k in ref:
                assert got[k].dtype == np.float32
                np.testing.assert_allclose(got[k], ref[k], atol=2e-5, rtol=1e-4)


def test_the_same_sizes_in_any_order_name_one_file() -> None:
    declared = [(32, 32), (24, 40)]
    assert onnx_file_name("fp16", declared[::-1], declared) == "onnx/model-fp16.onnx"
    three = [(48, 48), (32, 32), (24, 40)]
    assert onnx_file_name("int8", three, declared) == onnx_file_name("int8", three[::-1], declared)
    assert onnx_file_name("int8", three, declared) == "onnx/model-int8-24x40_32x32_48x48.onnx"


def test_undeclared_size_is_refused_by_the_graph(tiny_bundle: Bundle) -> None:
    record = export_onnx(tiny_bundle.path, "fp32", sizes=[(32, 32)])
    assert record.file == "onnx/model-fp32-32x32.onnx"
    sess = _session(tiny_bundle.path / record.file)
    sess.run(None, {"images": np.zeros((1, 3, 32, 32), np.float32)})
    with pytest.raises(Exception, match="Add|broadcast"):
        sess.run(None, {"images": np.zeros((1, 3, 24, 40), np.float32)})


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_passes_its_gate(tiny_bundle: Bundle, precision: str) -> None:
    record = export_onnx(tiny_bundle.path, precision, sizes=[(24, 40)])
    assert record.precision == precision and record.gate["passed"] and not record.forced
    size = record.gate["sizes"]["24x40"]
    assert size["patch_cos_mean"] >= record.gate["thresholds"]["patch_cos_mean"]
    model = onnx.load(str(tiny_bundle.path / record.file))
    elem = {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    assert set(elem.values()) == {onnx.TensorProto.FLOAT}  # float32 I/O whatever the inside
    if precision == "fp16":
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        ln = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
        assert ln and all("Cast" not in n.name for n in ln)
        assert record.extra["conversion"]["fp32_ops"] == ["LayerNormalization", "Softmax"]
    else:
        assert record.extra["conversion"]["mode"] == "dynamic"
        fp32 = export_onnx(tiny_bundle.path, "fp32", sizes=[(24, 40)])
        weights = weight_matmuls(onnx.load(str(tiny_bundle.path / fp32.file)))
        # Every MatMul by a weight is int8, the object filter's reused weights included.
        assert sum(n.op_type == "MatMulInteger" for n in model.graph.node) == len(weights)
        assert record.extra["conversion"]["weight_identities_inlined"] > 0


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """The weight of each MatMul by a weight: an initializer, or an Identity of one (how the
    legacy exporter feeds weights a module reuses, like the object-aware filter's)."""
    weights = {i.name: i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Identity" and n.input[0] in weights:
            weights[n.output[0]] = n.input[0]
    return [weights[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def test_static_int8_calibrated_on_a_folder(tiny_bundle: Bundle, tmp_path: Path) -> None:
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, im in enumerate(synthetic_images(4, seed=100)):
        im.save(folder / f"{i}.png")
    record = export_onnx(tiny_bundle.path, "int8", sizes=[(32, 32)], calibration=folder)
    assert record.gate["passed"]
    conv = record.extra["conversion"]
    assert conv["mode"] == "static" and conv["format"] == "QDQ" and conv["calibration_samples"] == 4
    model = onnx.load(str(tiny_bundle.path / record.file))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    # Each weight is dequantised per channel straight from its int8 initializer, never quantised a
    # second time (per tensor, after an Identity) as it was before the Identities were inlined.
    inits = {i.name for i in model.graph.initializer}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    fp32 = export_onnx(tiny_bundle.path, "fp32", sizes=[(32, 32)])
    shared = weight_matmuls(onnx.load(str(tiny_bundle.path / fp32.file)))
    assert len(shared) > len(set(shared))  # the filter reuses the last block's weights
    assert len(weight_dq) == len(set(shared))
    dq_outputs = {n.output[0] for n in weight_dq}
    assert not [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in dq_outputs]


def test_cli_says_when_static_int8_replaces_dynamic_int8(
    tiny_bundle: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cotap.cli.main import main

    dynamic = export_onnx(tiny_bundle.path, "int8", sizes=[(32, 32)])
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, im in enumerate(synthetic_images(2, seed=100)):
        im.save(folder / f"{i}.png")
    argv = ["export", "onnx", "--bundle", str(tiny_bundle.path), "--precision", "int8", "--sizes", "32"]
    assert main([*argv, "--calibration", str(folder)]) == 0
    out, err = capsys.readouterr()
    answer = json.loads(out[out.index("{") :])
    assert answer["file"] == dynamic.file and answer["replaced"]["sha256"] == dynamic.sha256
    assert answer["replaced"]["conversion"]["mode"] == "dynamic"
    assert f"replaced the earlier {dynamic.file} (dynamic int8)" in err
    assert [r.extra["conversion"]["mode"] for r in onnx_artifacts(read_bundle(tiny_bundle.path))] == [
        "static"
    ]


def _perturbing_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """Export a copy of the model whose first block's weights carry noise (the bundle is intact)."""

    def perturbed(model: Any, sizes: Any, path: Any, opset: int = 17) -> Path:
        bad = copy.deepcopy(model)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in bad.blocks[0].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        return export_fp32(bad, sizes, path, opset)

    monkeypatch.setattr(onnx_export, "export_fp32", perturbed)


def test_gate_fails_on_a_perturbed_model(tiny_bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    _perturbing_export(monkeypatch)
    before = (tiny_bundle.path / MANIFEST).read_bytes()
    with pytest.raises(GateError, match="patch cos mean") as err:
        export_onnx(tiny_bundle.path, "fp32")
    assert not err.value.report.passed
    assert "nothing was written" in str(err.value)
    assert (tiny_bundle.path / MANIFEST).read_bytes() == before
    assert not (tiny_bundle.path / "onnx").exists()

    record = export_onnx(tiny_bundle.path, "fp32", force=True)
    assert record.forced and not record.gate["passed"]
    manifest = json.loads((tiny_bundle.path / MANIFEST).read_text())
    (stored,) = manifest["artifacts"]["onnx"]
    assert OnnxArtifact.from_dict(stored).forced
    read_bundle(tiny_bundle.path)


def test_cli_gate_failure_names_the_flag(
    tiny_bundle: Bundle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command line says --force, not the Python keyword force=True."""
    _perturbing_export(monkeypatch)
    assert main(["export", "onnx", "--bundle", str(tiny_bundle.path), "--sizes", "32"]) == 2
    err = capsys.readouterr().err
    assert "accuracy gate failed" in err and "pass --force to write it anyway" in err
    assert "force=True" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["onnx", "--precision", "int8", "--calibration", "NODIR"],
        ["onnx", "--fixtures", "NODIR"],
        ["onnx", "--max-batch", "0"],
        ["tensorrt", "--target", "x", "--calibration", "NODIR"],
        ["batch", "--targets", "t.yaml", "--out", "o", "--calibration", "NODIR"],
    ],
)
def test_bad_folders_and_numbers_are_refused_before_the_model_loads(
    tiny_bundle: Bundle, argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused as the command line is read (exit 2, the flag named), not after tracing the model."""
    argv = [a.replace("NODIR", str(tmp_path / "nodir")) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(["export", argv[0], "--bundle", str(tiny_bundle.path), *argv[1:]])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert ("image folder not found" in err or "must be at least 1" in err) and "--" in err, err
    assert not list(tiny_bundle.path.glob("onnx/*"))


def test_re_export_replaces_its_record(tiny_bundle: Bundle) -> None:
    export_onnx(tiny_bundle.path, "fp32", sizes=[(32, 32)], max_batch=2)
    export_onnx(tiny_bundle.path, "fp32", sizes=[(32, 32)], max_batch=8)
    (rec,) = onnx_artifacts(read_bundle(tiny_bundle.path))
    assert rec.max_batch == 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "bf16"}, "unknown precision"),
        ({"sizes": [(30, 32)]}, "multiples of the patch size"),
        ({"max_batch": 0}, "max_batch"),
        ({"opset": 13}, "opset 13 is too old"),
        ({"calibration": "x"}, "only used for int8"),
    ],
)
def test_bad_arguments_are_refused(tiny_bundle: Bundle, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        export_onnx(tiny_bundle.path, **kwargs)
