"""`cotap eval` end to end on a tiny bundle and tiny synthetic scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cotap.cli.main import main
from cotap.core.preprocess import PreprocessConfig
from cotap.training.bundles import write_model_bundle
from cotap.training.models import build_model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("eval") / "b"
    write_model_bundle(
        build_model("cotap_test").eval(), "cotap_test", out, name="tiny",
        preprocess=PreprocessConfig(size=(32, 32), patch_size=8),
    )  # fmt: skip
    return out


def test_eval_linear_writes_json_and_report(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, out = tmp_path / "report", tmp_path / "out.json"
    argv = ["eval", "linear", "--model", str(bundle), "--data", "synthetic:40:0:32", "--val-data",
            "synthetic:16:1:32", "--samples", "320", "--report", str(report), "--json", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    results = json.loads(out.read_text())
    miou = results["results"]["linear"]["metrics"]["miou"]
    assert 0 <= miou <= 1 and summary["metrics"]["linear"]["miou"] == miou
    assert results["model"]["name"] == "tiny" and results["model"]["layout"] == "bundle"
    assert results["data"]["train"]["size"] == 40 and results["data"]["val"]["size"] == 16
    assert results["config"]["linear"]["seed"] == 0 and results["data"]["num_classes"] == 14
    assert results["results"]["linear"]["metrics"]["steps"] == 20
    for name in ("index.html", "features.png", "predictions_linear.png", "results.json"):
        assert (report / name).is_file(), name
    assert "predictions_linear.png" in (report / "index.html").read_text()
    # deterministic: the same command gives the same numbers
    assert main([*argv[:-5], "--json", str(tmp_path / "again.json"), "--quiet"]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["results"]["linear"]["metrics"] == results["results"]["linear"]["metrics"]


def test_eval_val_only_protocols_and_seeds(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["eval", "overcluster,correspondence", "--model", str(bundle), "--data", "synthetic:8:0:32",
            "--clusters", "14,20", "--seeds", "0,1", "--pairs", "4", "--json", str(tmp_path / "o.json"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((tmp_path / "o.json").read_text())
    assert res["data"]["train"] is None and res["data"]["val"]["size"] == 8
    oc = res["results"]["overcluster"]
    assert set(oc["metrics"]["per_k"]) == {"K14", "K20"} and len(oc["per_seed"]) == 2
    assert oc["metrics"]["per_k"]["K20"]["matching"] == "many_to_one"
    assert res["results"]["correspondence"]["metrics"]["pairs"] == 4


def test_eval_errors_are_clear(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "nope", "--model", str(bundle), "--data", "synthetic:4:0:32"]) == 2
    assert "unknown protocol" in capsys.readouterr().err
    assert main(["eval", "linear", "--model", str(bundle), "--data", "synthetic:4:0:32", "--size", "36"]) == 2
    assert "patch size" in capsys.readouterr().err
    assert main(["eval", "linear", "--model", "/nonexistent", "--data", "synthetic:4:0:32"]) == 2


def test_config_file_and_round_trip(bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cotap.training.eval import EvalConfig, config_from_dict
    from cotap.training.eval.protocols import mean_std

    cfg = EvalConfig()
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        config_from_dict({"linear": {"epochs": 3}})
    mean, std = mean_std([{"miou": 0.2, "m": "x", "k": {"a": 1.0}}, {"miou": 0.4, "m": "x", "k": {"a": 3.0}}])
    assert mean == {"miou": pytest.approx(0.3), "m": "x", "k": {"a": 2.0}}
    assert std["miou"] == pytest.approx(0.1414213, rel=1e-5) and std["k"]["a"] == pytest.approx(1.4142135)

    (tmp_path / "eval.yaml").write_text("eval:\n  linear:\n    samples: 32\n  knn:\n    ks: [3]\n")
    argv = ["eval", "linear,knn", "--model", str(bundle), "--data", "synthetic:12:0:32", "--config",
            str(tmp_path / "eval.yaml"), "--json", str(tmp_path / "c.json"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["config"]["linear"]["samples"] == 32 and res["config"]["knn"]["ks"] == [3]
    assert res["results"]["linear"]["metrics"]["steps"] == 2 and "top1@k3" in res["results"]["knn"]["metrics"]
    assert res["data"]["train"]["size"] + res["data"]["val"]["size"] == 12  # split 80/20
