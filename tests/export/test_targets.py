"""Targets files: the shipped sample loads, bad targets are refused with the target's name."""

from __future__ import annotations

from pathlib import Path

import pytest

from cotap.cli.main import main
from cotap.export import targets as targets_module
from cotap.export.targets import DEFAULT_TARGETS, TargetError, load_targets

ROOT = Path(__file__).resolve().parents[2]

BASE = """
targets:
  x:
    gpu: NVIDIA T4
    family: datacenter
    compute_capability: "7.5"
    tensorrt: "10.8"
"""


def test_shipped_targets_cover_edge_and_datacentre() -> None:
    targets = load_targets(ROOT / "configs" / "targets.yaml")
    gpus = " ".join(t.gpu for t in targets.values())
    for name in ("Orin Nano", "AGX Orin", "T4", "L4", "H100"):
        assert name in gpus
    nano = targets["orin-nano"]
    assert (nano.compute_capability, nano.jetpack, nano.sizes) == ("8.7", "6.1", ((224, 224),))
    assert (nano.min_batch, nano.opt_batch, nano.max_batch, nano.workspace_mb) == (1, 2, 4, 1024)
    dla = targets["agx-orin-dla"]
    assert dla.dla_core == 0 and dla.min_batch == dla.opt_batch == dla.max_batch  # DLA: static shapes
    assert targets["l4-h100"].hardware_compatibility == "ampere_plus"
    assert targets["agx-orin"].precision == "int8" and targets["t4"].sizes is None


def test_defaults_and_batch_mapping(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text(
        "defaults: {workspace_mb: 100, precision: int8}\n" + BASE + "    batch: {min: 2, opt: 4, max: 8}\n"
    )
    t = load_targets(p)["x"]
    assert (t.workspace_mb, t.precision, t.min_batch, t.opt_batch, t.max_batch) == (100, "int8", 2, 4, 8)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    batch: {min: 4, opt: 2, max: 8}\n", "1 <= min <= opt <= max"),
        ("    precision: bf16\n", "precision"),
        ("    colour: red\n", "unknown keys \\['colour'\\]"),
        ("    dla_core: 0\n", "dla_core is only for Jetson"),
        ("    hardware_compatibility: ampere_plus\n", "ampere_plus needs"),  # T4 is Turing
        ("    sizes: ['33xq']\n", "bad size"),
        ("    workspace_mb: 0\n", "workspace_mb"),
    ],
)
def test_bad_targets_are_refused(tmp_path: Path, extra: str, message: str) -> None:
    assert_refused(tmp_path / "t.yaml", BASE + extra, message)


def assert_refused(path: Path, text: str, message: str) -> None:
    """`text` as a targets file is refused with `message`, naming the target."""
    path.write_text(text)
    with pytest.raises(TargetError, match=message) as err:
        load_targets(path)
    assert "'x'" in str(err.value)


JETSON = """
targets:
  x:
    gpu: Jetson AGX Orin
    family: jetson
    compute_capability: "8.7"
    tensorrt: "10.3"
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("    hardware_compatibility: same_compute_capability\n", "not supported on Jetson"),
        ("    hardware_compatibility: ampere_plus\n", "not supported on Jetson"),
        ("    dla_core: 0\n    batch: {min: 1, opt: 1, max: 4}\n", r"DLA engines need a fixed batch.*1/1/4"),
        ("    dla_core: 0\n", "DLA engines need a fixed batch"),  # the default batch 1/8/32
    ],
)
def test_bad_jetson_targets_are_refused(tmp_path: Path, extra: str, message: str) -> None:
    p = tmp_path / "t.yaml"
    assert_refused(p, JETSON + extra, message)
    p.write_text(JETSON + "    dla_core: 1\n    batch: {min: 4, opt: 4, max: 4}\n")
    assert load_targets(p)["x"].max_batch == 4


def test_malformed_files_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text("targets: []\n")
    with pytest.raises(TargetError, match="non-empty 'targets'"):
        load_targets(p)
    p.write_text(BASE.replace('compute_capability: "7.5"', "compute_capability: seven"))
    with pytest.raises(TargetError, match="compute capability"):
        load_targets(p)
    with pytest.raises(TargetError, match="not found"):
        load_targets(tmp_path / "missing.yaml")


def test_default_targets_file_does_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cotap export tensorrt|batch` without --targets find the shipped file from any directory."""
    assert DEFAULT_TARGETS == ROOT / "configs" / "targets.yaml"
    assert list(load_targets()) == list(load_targets(DEFAULT_TARGETS))
    monkeypatch.chdir(tmp_path)  # no configs/ here
    bundle = str(tmp_path / "no-bundle")  # both commands look the target up before the bundle
    assert main(["export", "tensorrt", "--bundle", bundle, "--target", "nope"]) == 2
    err = capsys.readouterr().err
    assert f"no target 'nope' in {DEFAULT_TARGETS}; known: orin-nano" in err
    assert main(["export", "batch", "--bundle", bundle, "--out", "dist", "--only", "nope"]) == 2
    assert "unknown targets ['nope']; known: orin-nano" in capsys.readouterr().err
    assert not (tmp_path / "dist").exists()


def test_missing_default_targets_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "configs" / "targets.yaml"
    monkeypatch.setattr(targets_module, "DEFAULT_TARGETS", missing)
    with pytest.raises(TargetError, match="pass --targets FILE"):
        load_targets()
    assert main(["export", "tensorrt", "--bundle", str(tmp_path), "--target", "t4"]) == 2
    err = capsys.readouterr().err
    assert f"the default targets file {missing} is missing" in err and "--targets FILE" in err
