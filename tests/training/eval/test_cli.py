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
    same = ["--data", "synthetic:4:0:32", "--val-data", "synthetic:4:0:32"]
    assert main(["eval", "knn", "--model", str(bundle), *same]) == 2
    assert "the training data and the validation data are the same images" in capsys.readouterr().err


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


# -- flags and config values are checked before any work -----------------------------------------
@pytest.mark.parametrize(
    "flag",
    [
        ["--samples", "0"], ["--k", "0"], ["--k", "-1"], ["--knn-k", "0"], ["--knn-k", "10,0"],
        ["--temperature", "-1"], ["--temperature", "0"], ["--memory-size", "-1"], ["--memory-size", "0"],
        ["--mask-size", "0"], ["--size", "0x32"], ["--pairs", "0"], ["--lr", "0"], ["--lr", "nan"],
        ["--batch-size", "0"], ["--clusters", "0"], ["--seeds", "0,-1"], ["--seed", "-1"],
        ["--val-fraction", "1"], ["--num-classes", "0"], ["--threads", "0"], ["--samples", "abc"],
    ],
)  # fmt: skip
def test_out_of_range_flags_are_one_line_errors(flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # the model does not exist: a flag accepted would end in "checkpoint not found" instead
    with pytest.raises(SystemExit) as exc:
        main(["eval", "linear", "--model", "/nonexistent", "--data", "synthetic:4:0:32", *flag])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cotap: error: argument {flag[0]}:"), err


def test_flags_given_override_the_config_file(tmp_path: Path) -> None:
    import argparse

    from cotap.cli.eval_cmd import _build_config
    from cotap.cli.main import build_parser

    (tmp_path / "e.yaml").write_text("linear: {samples: 64}\nretrieval: {k: 7}\nknn: {ks: [3, 5]}\n")
    base = ["eval", "all", "--model", "m", "--data", "d", "--config", str(tmp_path / "e.yaml")]
    args: argparse.Namespace = build_parser().parse_args(base)
    cfg = _build_config(args)
    assert cfg.linear.samples == 64 and cfg.retrieval.k == 7 and cfg.knn.ks == (3, 5)
    args = build_parser().parse_args([*base, "--samples", "1", "--k", "1", "--knn-k", "1", "--seed", "0"])
    cfg = _build_config(args)
    assert cfg.linear.samples == 1 and cfg.retrieval.k == 1 and cfg.knn.ks == (1,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("linear: {samples: abc}", "config.linear.samples: expected an integer, got 'abc'"),
        ("linear: {samples: 0}", "config.linear: samples must be at least 1, got 0"),
        ("linear: {lr: -0.1}", "config.linear: lr must be above 0"),
        ("retrieval: {memory_size: 1.5}", "config.retrieval.memory_size: expected an integer"),
        ("knn: {ks: 10}", "config.knn.ks: expected a list"),
        ("knn: {ks: [10, x]}", "config.knn.ks[1]: expected an integer"),
        ("features: {size: [32, 32, 3]}", "config.features.size: expected 2 values"),
        ("features: {half: 'yes'}", "config.features.half: expected true or false"),
        ("correspondence: {pairs: 0}", "config.correspondence: pairs must be at least 1"),
        ("report_images: -1", "config: report_images must be at least 0"),
        ("linear: [1, 2]", "config.linear: expected a mapping"),
        ("linear: {samples: [1", "not valid YAML"),
    ],
)
def test_config_file_values_are_checked_when_read(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "e.yaml").write_text(text + "\n")
    argv = ["eval", "linear", "--model", "/nonexistent", "--data", "synthetic:4:0:32", "--config",
            str(tmp_path / "e.yaml"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cotap: error: --config") or "not valid YAML" in err, err
    assert message in err and err.count("\n") == 1, err


def test_config_values_are_converted_and_range_checked() -> None:
    from cotap.training.eval import EvalConfig, LinearConfig, RetrievalConfig, config_from_dict

    cfg = config_from_dict(
        {"linear": {"lr": "1e-2", "weight_decay": 0}, "features": {"size": 64, "mask_size": [16, 24]},
         "correspondence": {"warp": {"scale": [1, 2]}, "alphas": [0.1]}}
    )  # fmt: skip
    assert cfg.linear.lr == 0.01 and isinstance(cfg.linear.weight_decay, float)  # YAML reads 1e-2 as text
    assert cfg.features.size == (64, 64) and cfg.features.mask_size == (16, 24)
    assert cfg.correspondence.warp.scale == (1.0, 2.0) and cfg.correspondence.alphas == (0.1,)
    assert config_from_dict(EvalConfig().to_dict()) == EvalConfig()
    with pytest.raises(ValueError, match="expected an integer, got True"):
        config_from_dict({"linear": {"samples": True}})
    # the API refuses what the CLI refuses
    with pytest.raises(ValueError, match="samples must be at least 1"):
        LinearConfig(samples=0)
    with pytest.raises(ValueError, match="memory_size must be at least 1"):
        RetrievalConfig(memory_size=-1)
    with pytest.raises(ValueError, match="temperature must be above 0"):
        RetrievalConfig(temperature=-1.0)


def test_unavailable_device_is_a_clear_error_before_any_work(
    bundle: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cotap.training.eval.features import FrozenModel, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # the data does not exist: the device is checked first
    argv = ["eval", "linear", "--model", str(bundle), "--data", "/nonexistent", "--device", "cuda"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cotap: error: device 'cuda' asked for") and "use cpu" in err, err
    assert main([*argv[:-1], "cuda:x"]) == 2
    assert "unknown device 'cuda:x'" in capsys.readouterr().err
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        FrozenModel(build_model("cotap_test"), device="cuda")


def test_json_records_sizes_which_weights_and_preprocessing(tmp_path: Path) -> None:
    from cotap.training.checkpoints import TRAIN_FORMAT
    from cotap.training.eval.features import FrozenModel

    torch.manual_seed(0)
    student, teacher = build_model("cotap_test").eval(), build_model("cotap_test").eval()
    ckpt = tmp_path / "run.pt"
    torch.save(
        {"format": TRAIN_FORMAT, "arch": "cotap_test", "model_config": student.config.to_dict(), "step": 3,
         "student": student.state_dict(), "teacher": teacher.state_dict()},
        ckpt,
    )  # fmt: skip
    results = {}
    for which in ("student", None):
        out = tmp_path / f"{which}.json"
        argv = ["eval", "overcluster", "--model", str(ckpt), "--data", "synthetic:4:0:32", "--json", str(out), "--quiet"]  # fmt: skip
        assert main(argv + (["--which", which] if which else [])) == 0
        results[which] = json.loads(out.read_text())
    st, default = results["student"], results[None]
    assert st["model"]["which"] == "student" and st["model"]["which_requested"] == "student"
    assert default["model"]["which"] == "teacher" and default["model"]["which_requested"] is None
    assert st["model"]["source_sha256"] == default["model"]["source_sha256"]  # one file ...
    assert st["model"]["weights_sha256"] == FrozenModel(student).fingerprint  # ... two models
    assert default["model"]["weights_sha256"] == FrozenModel(teacher).fingerprint
    # the sizes actually used, not null
    assert st["config"]["features"]["size"] == [32, 32] and st["config"]["features"]["mask_size"] == [32, 32]
    assert st["results"]["overcluster"]["config"]["features"]["size"] == [32, 32]
    pre = st["preprocess"]
    assert pre["input_size"] == [32, 32] and pre["grid"] == [4, 4] and pre["mask_size"] == [32, 32]
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and "bicubic" in pre["interpolation"]
    assert st["environment"]["device"] == "cpu"


def test_which_is_refused_for_a_file_holding_one_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As in `cotap export bundle`: --which on a bundle or a single-model file is an error, not ignored."""
    from cotap.core.preprocess import PreprocessConfig
    from cotap.training.bundles import write_model_bundle

    write_model_bundle(
        build_model("cotap_test"),
        "cotap_test",
        tmp_path / "b",
        name="t",
        preprocess=PreprocessConfig(size=(32, 32), patch_size=8),
    )
    torch.save(build_model("cotap_test").state_dict(), tmp_path / "plain.pth")
    for model, message in (
        (tmp_path / "b", "does not apply to a bundle"),
        (tmp_path / "plain.pth", "holds a single model"),
    ):
        argv = [
            "eval",
            "overcluster",
            "--model",
            str(model),
            "--which",
            "student",
            "--data",
            "synthetic:4:0:32",
        ]
        assert main([*argv, "--json", str(tmp_path / "r.json"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "--which student does not apply" in err and message in err, err
    assert not (tmp_path / "r.json").exists()


def test_one_input_size_for_both_splits() -> None:
    from cotap.training.eval import EvalConfig, Evaluator, FeatureConfig, open_eval_data

    # without --size, the first train image decides for train and val alike (and is recorded)
    train, val = open_eval_data("synthetic:3:0:32"), open_eval_data("synthetic:2:1:48")
    ev = Evaluator(build_model("cotap_test"), train, val, EvalConfig(features=FeatureConfig(progress=False)))
    assert ev.features("val").input_size == (32, 32) and ev.features("val").masks.shape[-2:] == (32, 32)
    assert ev.config.features.size == (32, 32) and ev.preprocess()["input_size"] == [32, 32]
