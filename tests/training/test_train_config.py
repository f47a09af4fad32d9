"""Typed config: YAML + dotlist overrides, clear errors, and the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cotap.training.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_paper_recipe() -> None:
    cfg = TrainConfig().validate()
    assert cfg.optim.lr == 3e-5 and cfg.optim.head_lr_mult == 10 and cfg.optim.min_lr == 3e-6
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (0.024, 0.24)
    assert (cfg.optim.ema_start, cfg.optim.ema_end) == (0.9997, 0.9999)
    assert (cfg.heads.patch_prototypes, cfg.heads.cls_prototypes) == (512, 4096)
    assert (cfg.loss.tau, cfg.loss.theta, cfg.loss.alpha, cfg.loss.topk, cfg.loss.num_negatives) == (
        0.5,
        -0.2,
        0.1,
        5,
        5,
    )
    weights = config_to_dict(cfg)["loss"]["weights"]
    assert weights.pop("cls_nce") == 0.0  # not CoTAP: off unless a config turns it on
    assert all(v == 1.0 for v in weights.values())


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\noptim:\n  lr: 3e-5\nloss:\n  pool_sizes: [7, 14]\n")
    cfg = load_config(
        path,
        [
            "optim.lr=1e-3",
            "data.batch_size=4",
            "loss.weights.cls_intra=0",
            "bank.enabled=false",
            "model.init_which=teacher",
        ],
    )
    assert cfg.name == "x" and cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 4 and cfg.loss.weights.cls_intra == 0.0 and cfg.bank.enabled is False
    assert cfg.loss.pool_sizes == (7, 14) and cfg.model.init_which == "teacher"
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["optim.lrr=1"], "unknown config key.*lrr.*valid: lr"),
        (["optim.lr=fast"], "optim.lr: expected a number"),
        (["data.batch_size=2.5"], "data.batch_size: expected an integer"),
        (["bank.enabled=maybe"], "bank.enabled: expected true/false"),
        (["loss.pool_sizes=7"], "loss.pool_sizes: expected a list"),
        (["amp=fp8"], "amp: must be auto"),
        (["loss.patch_intra_mode=kl"], "patch_intra_mode"),
        (["max_steps=0"], "max_steps"),
        (["loss.weights.entropy=-1"], "loss.weights.entropy"),
        (["optim=3"], "optim: expected a mapping|section optim"),
        (["nokey"], "not key=value"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")


@pytest.mark.parametrize("name", ["synthetic-tiny.yaml", "cotap-vits16-coco.yaml", "pretrain-synthetic.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.max_steps >= 1
    if name == "cotap-vits16-coco.yaml":
        assert cfg.model.arch == "cotap_vits16" and cfg.optim.lr == 3e-5 and cfg.loss.patch_queue == 262144
    if name == "pretrain-synthetic.yaml":
        w = cfg.loss.weights
        assert (
            (w.patch_intra, w.patch_inner, w.entropy) == (0, 0, 0)
            and w.cls_inner > 0
            and not cfg.bank.enabled
        )
