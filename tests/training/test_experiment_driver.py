"""bench/experiment.py, the synthetic-scenes experiment driver: its configs resolve, the table reads
the per-(model, protocol, seed) JSONs into mean ± sample std, and finished work is never redone."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("experiment_driver", ROOT / "bench" / "experiment.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "experiment_driver", mod)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RUNS", tmp_path)
    return mod


def _write(driver: ModuleType, model: str, protocol: str, seed: int, metrics: dict[str, object]) -> None:
    out = driver.RUNS / "eval" / model / f"{protocol}_s{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"metrics": metrics, "results": {protocol: {"metrics": metrics}}}))


def test_configs_resolve_and_variants_differ_by_one_override(driver: ModuleType) -> None:
    from cotap.training.config import config_to_dict, load_config

    base = config_to_dict(load_config(ROOT / "configs" / "exp-cotap.yaml"))
    pre = load_config(ROOT / "configs" / "exp-pretrain.yaml")
    assert pre.loss.weights.patch_intra == 0 and not pre.bank.enabled and pre.data.train == driver.TRAIN_SPEC
    assert base["data"]["train"] == driver.TRAIN_SPEC
    by_name = {v.name: v for v in driver.VARIANTS}
    for v in (v for v in driver.VARIANTS if v.equal_compute):
        cfg = config_to_dict(load_config(ROOT / "configs" / "exp-cotap.yaml", v.overrides))
        # experiment B (another initialisation) varies around its own +CoTAP run
        ref = by_name["weak-cotap"] if v.name.startswith("weak-") else None
        ref_cfg = (
            base
            if ref is None
            else config_to_dict(load_config(ROOT / "configs" / "exp-cotap.yaml", ref.overrides))
        )
        changed = {k for k in ref_cfg if cfg[k] != ref_cfg[k]}
        extra = len(v.overrides) - (0 if ref is None else len(ref.overrides))
        assert extra == len(changed) <= 1, (v.name, changed)
        # equal compute: steps, batch and crops never change between variants
        assert (cfg["max_steps"], cfg["data"]["batch_size"], cfg["data"]["views"]) == (
            base["max_steps"],
            base["data"]["batch_size"],
            base["data"]["views"],
        )


def test_table_is_mean_and_sample_std_of_the_seed_files(driver: ModuleType) -> None:
    values = [0.031, 0.036, 0.040]
    for seed, v in enumerate(values):
        _write(driver, "cotap", "linear", seed, {"miou": v})
    _write(
        driver,
        "cotap",
        "overcluster",
        0,
        {"miou": 0.05, "per_k": {"K14": {"miou": 0.05}, "K56": {"miou": 0.07}}},
    )
    (driver.RUNS / "eval" / "cotap" / "knn_s0.partial.json").write_text("{}")  # an interrupted eval
    vals = driver.metric_values("cotap", "linear")
    assert vals == {"miou": values}
    assert driver.metric_values("cotap", "overcluster") == {"miou@14": [0.05], "miou@56": [0.07]}
    row = next(r for r in driver.table().splitlines() if r.startswith("| +CoTAP (full) |"))
    mean, std = statistics.fmean(values) * 100, statistics.stdev(values) * 100
    assert f"| {mean:.1f} ± {std:.1f} |" in row and "| 5.0 | 7.0 |" in row
    assert row.endswith("| 4/7 |")  # 3 linear seeds + overcluster; the partial knn file does not count
    assert driver.best_variant() == "cotap"


def test_finished_work_is_skipped(driver: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(driver, "run", lambda cmd, logfile: calls.append(list(cmd)))
    monkeypatch.setattr(driver, "ROOT", driver.RUNS)
    done = driver.RUNS / "done"
    (done / "bundle").mkdir(parents=True)
    (done / "bundle" / "manifest.json").write_text("{}")
    driver.train("configs/exp-cotap.yaml", done)
    _write(driver, "cotap", "knn", 0, {"top1@k20": 0.1})
    driver.evaluate("cotap", "knn", 0)
    assert calls == []
    half = driver.RUNS / "half"
    (half / "checkpoints").mkdir(parents=True)
    (half / "checkpoints" / "last.pt").write_bytes(b"")
    driver.train("configs/exp-cotap.yaml", half, ("data.knn=null",))
    assert calls and "--resume" in calls[0] and calls[0][-1] == "data.knn=null"
