"""`cotap export bundle` from an official-layout checkpoint gives bit-identical outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cotap.cli.main import main
from cotap.core.bundle import WEIGHTS, BundleError, read_bundle
from cotap.training.checkpoints import load_model
from tests.training.test_checkpoints import (
    GRID,
    P,
    backbone_tensors,
    filter_tensors,
    head_tensors,
    official_ckpt,
)


def test_cli_bundle_is_identical_to_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "release.ckpt"
    torch.save(official_ckpt(backbone_tensors() | filter_tensors(every_block=True) | head_tensors()), ckpt)
    out = tmp_path / "bundle"
    assert (
        main(
            [
                "export",
                "bundle",
                "--checkpoint",
                str(ckpt),
                "--arch",
                "cotap_test",
                "--out",
                str(out),
                "--size",
                str(GRID * P),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["source"]["layout"] == "official"
    bundle = read_bundle(out)
    assert bundle.config.input_sizes == ((GRID * P, GRID * P),)
    x = torch.randn(3, 3, GRID * P, GRID * P)
    with torch.no_grad():
        a = load_model(ckpt, arch="cotap_test").model.forward_features(x)
        b = load_model(out).model.forward_features(x)
    for k in a:
        assert (a[k] - b[k]).abs().max().item() == 0.0

    assert main(["verify", str(out)]) == 0
    data = bytearray((out / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (out / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BundleError):
        read_bundle(out)
    assert main(["verify", str(out)]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_cli_reports_bad_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, ckpt)
    assert main(["export", "bundle", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b")]) == 2
    assert "not a ViT state dict: missing key 'pos_embed'" in capsys.readouterr().err
