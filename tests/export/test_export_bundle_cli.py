"""`cotap export bundle`: bit-identical outputs from an official-layout checkpoint; defaults taken
from the source (size, preprocessing); --arch/--which refused where they would mislabel or be ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cotap.cli.main import main
from cotap.core.bundle import WEIGHTS, Bundle, BundleError, read_bundle
from cotap.export.bundle import export_bundle
from cotap.training.checkpoints import TRAIN_FORMAT, load_model
from cotap.training.models import registry
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


# -- defaults from the source, refusals instead of silent mislabelling (review findings) ------------
def _cotap_ckpt(path: Path, img_size: int = 48, arch: str = "cotap_test") -> Path:
    """A cotap training checkpoint of a cotap_test model trained at `img_size` (not the registry's 32)."""
    full = backbone_tensors() | filter_tensors()
    pos = full["pos_embed"]
    grid = img_size // P
    full["pos_embed"] = (
        torch.nn.functional.interpolate(
            pos[:, 1:].reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2), size=(grid, grid)
        )
        .permute(0, 2, 3, 1)
        .reshape(1, grid * grid, -1)
    )
    full["pos_embed"] = torch.cat([pos[:, :1], full["pos_embed"]], dim=1)
    cfg = {"patch_size": P, "embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": img_size}
    torch.save(
        {
            "format": TRAIN_FORMAT,
            "arch": arch,
            "model_config": cfg,
            "step": 7,
            "student": {k: v * 0 for k, v in full.items()},
            "teacher": full,
        },
        path,
    )
    return path


def test_default_size_is_the_models_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Not 224 whatever the model: a checkpoint trained at 48 px gives a 48 px bundle."""
    ckpt = _cotap_ckpt(tmp_path / "run.pt", img_size=48)
    assert main(["export", "bundle", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b")]) == 0
    b = read_bundle(tmp_path / "b")
    assert b.config.input_sizes == ((48, 48),) and b.config.preprocess.size == (48, 48)
    # the official release: img_size from its position table (4x4 patches of 8 px)
    release = tmp_path / "release.ckpt"
    torch.save(official_ckpt(backbone_tensors() | filter_tensors()), release)
    assert main(["export", "bundle", "--checkpoint", str(release), "--out", str(tmp_path / "r")]) == 0
    assert read_bundle(tmp_path / "r").config.input_sizes == ((GRID * P, GRID * P),)
    # an explicit --size still wins
    args = ["export", "bundle", "--checkpoint", str(ckpt), "--out", str(tmp_path / "s"), "--size", "64"]
    assert main(args) == 0
    assert read_bundle(tmp_path / "s").config.input_sizes == ((64, 64),)


def test_a_bundle_keeps_its_preprocessing(tiny_bundle: Bundle, tmp_path: Path) -> None:
    """Re-exporting a bundle keeps its declared sizes (32x32 and 24x40), not one default size."""
    assert (
        main(["export", "bundle", "--checkpoint", str(tiny_bundle.path), "--out", str(tmp_path / "c")]) == 0
    )
    copy = read_bundle(tmp_path / "c")
    assert copy.config.input_sizes == tiny_bundle.config.input_sizes
    assert copy.config.preprocess == tiny_bundle.config.preprocess


def test_arch_that_is_not_the_checkpoints_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _cotap_ckpt(tmp_path / "run.pt")
    out = tmp_path / "b"
    assert (
        main(["export", "bundle", "--checkpoint", str(ckpt), "--arch", "cotap_micro8", "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert "run.pt holds a cotap_test, not a cotap_micro8" in err and "--arch" in err
    assert not out.exists()
    # same structure, another name: the bundle would still be mislabelled
    monkeypatch.setitem(registry._REGISTRY, "cotap_test_alias", registry.model_config("cotap_test"))
    assert (
        main(["export", "bundle", "--checkpoint", str(ckpt), "--arch", "cotap_test_alias", "--out", str(out)])
        == 2
    )
    assert "holds a cotap_test, not a cotap_test_alias" in capsys.readouterr().err
    # the recorded arch itself is fine
    assert (
        main(["export", "bundle", "--checkpoint", str(ckpt), "--arch", "cotap_test", "--out", str(out)]) == 0
    )
    assert read_bundle(out).config.arch == "cotap_test"


def test_bundle_source_refuses_another_arch_and_which(
    tiny_bundle: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = str(tiny_bundle.path)
    out = str(tmp_path / "c")
    assert main(["export", "bundle", "--checkpoint", src, "--which", "student", "--out", out]) == 2
    assert "--which student does not apply to a bundle" in capsys.readouterr().err
    assert main(["export", "bundle", "--checkpoint", src, "--arch", "cotap_micro8", "--out", out]) == 2
    assert "holds a cotap_test, not a cotap_micro8" in capsys.readouterr().err
    assert not Path(out).exists()
    assert main(["export", "bundle", "--checkpoint", src, "--arch", "cotap_test", "--out", out]) == 0


def test_source_records_the_which_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _cotap_ckpt(tmp_path / "run.pt")
    assert export_bundle(ckpt, tmp_path / "t").manifest["source"]["which"] == "teacher"
    assert export_bundle(ckpt, tmp_path / "s", which="student").manifest["source"]["which"] == "student"
    release = tmp_path / "release.ckpt"
    torch.save(official_ckpt(backbone_tensors() | filter_tensors()), release)
    assert export_bundle(release, tmp_path / "r").manifest["source"]["which"] == "student"
    # a file holding one model: nothing to choose, and --which is refused rather than ignored
    single = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in (backbone_tensors() | filter_tensors()).items()}, single)
    assert export_bundle(single, tmp_path / "p").manifest["source"]["which"] is None
    assert (
        main(
            [
                "export",
                "bundle",
                "--checkpoint",
                str(single),
                "--which",
                "teacher",
                "--out",
                str(tmp_path / "q"),
            ]
        )
        == 2
    )
    assert "--which teacher does not apply" in capsys.readouterr().err


def test_messages_name_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _cotap_ckpt(tmp_path / "run.pt")
    (tmp_path / "b").mkdir()
    assert main(["export", "bundle", "--checkpoint", str(ckpt), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite to replace it" in err and "overwrite=True" not in err
    odd = tmp_path / "odd.pth"  # a width no registered model has
    torch.save(
        {"pos_embed": torch.zeros(1, 17, 40), "patch_embed.proj.weight": torch.zeros(40, 3, 8, 8)}, odd
    )
    assert main(["export", "bundle", "--checkpoint", str(odd), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pass --arch explicitly" in err and "arch=" not in err


def test_recorded_arch_with_overrides_and_inherited_resize(tmp_path: Path) -> None:
    """A run with model.overrides records its registry name but not the registry's structure: that
    name is still its own. And `--size` alone keeps a source bundle's resize policy."""
    from cotap.core.preprocess import PreprocessConfig
    from cotap.training.bundles import write_model_bundle
    from cotap.training.models import build_model

    deeper = _cotap_ckpt(tmp_path / "deeper.pt")
    raw = torch.load(deeper, weights_only=True)
    raw["model_config"] = {**raw["model_config"], "use_filter": False}  # an override of cotap_test
    torch.save(raw, deeper)
    assert (
        main(
            [
                "export",
                "bundle",
                "--checkpoint",
                str(deeper),
                "--arch",
                "cotap_test",
                "--out",
                str(tmp_path / "d"),
            ]
        )
        == 0
    )
    src = write_model_bundle(
        build_model("cotap_test").eval(),
        "cotap_test",
        tmp_path / "short",
        name="short",
        preprocess=PreprocessConfig(resize="shorter_side", size=32, patch_size=8),
        input_sizes=[(32, 32)],
    )
    assert (
        main(
            ["export", "bundle", "--checkpoint", str(src.path), "--size", "48", "--out", str(tmp_path / "s2")]
        )
        == 0
    )
    again = read_bundle(tmp_path / "s2").config.preprocess
    assert again.resize == "shorter_side" and again.size == 48
