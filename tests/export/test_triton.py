"""The Triton repository: config.pbtxt parses back as protobuf text format with the right dims.

The parser is a subset of Triton's `ModelConfig` (model_config.proto, same field numbers) built
from a descriptor here, so the test needs no tritonclient and rejects any field Triton lacks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from cotap.cli.main import main
from cotap.core.artifacts import ENGINES_KEY, EngineArtifact
from cotap.core.bundle import Bundle, add_files, sha256_bytes
from cotap.export import triton
from cotap.export.gate import GateThresholds
from cotap.export.onnx import export_onnx
from cotap.export.triton import TritonOptions, export_triton

F = descriptor_pb2.FieldDescriptorProto


def _field(
    msg: Any, name: str, number: int, ftype: int, label: int = F.LABEL_OPTIONAL, type_name: str = ""
) -> None:
    f = msg.field.add(name=name, number=number, type=ftype, label=label)
    if type_name:
        f.type_name = type_name


def _map(msg: Any, name: str, number: int, value_type: int, value_type_name: str = "") -> None:
    entry = msg.nested_type.add(name="".join(p.title() for p in name.split("_")) + "Entry")
    entry.options.map_entry = True
    _field(entry, "key", 1, F.TYPE_STRING)
    _field(entry, "value", 2, value_type, type_name=value_type_name)
    _field(msg, name, number, F.TYPE_MESSAGE, F.LABEL_REPEATED, f".inference.ModelConfig.{entry.name}")


def model_config_class() -> Any:
    fd = descriptor_pb2.FileDescriptorProto(
        name="model_config_subset.proto", package="inference", syntax="proto3"
    )
    dt = fd.enum_type.add(name="DataType")
    for i, n in enumerate(["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8"]):
        dt.value.add(name=n, number=i)
    dt.value.add(name="TYPE_FP16", number=10)
    dt.value.add(name="TYPE_FP32", number=11)
    dt.value.add(name="TYPE_INT64", number=8)

    latest = fd.message_type.add(name="Latest")
    _field(latest, "num_versions", 1, F.TYPE_UINT32)
    vp = fd.message_type.add(name="ModelVersionPolicy")
    _field(vp, "latest", 1, F.TYPE_MESSAGE, type_name=".inference.Latest")

    for mname in ("ModelInput", "ModelOutput"):
        m = fd.message_type.add(name=mname)
        _field(m, "name", 1, F.TYPE_STRING)
        _field(m, "data_type", 2, F.TYPE_ENUM, type_name=".inference.DataType")
        _field(m, "dims", 4 if mname == "ModelInput" else 3, F.TYPE_INT64, F.LABEL_REPEATED)

    db = fd.message_type.add(name="ModelDynamicBatching")
    _field(db, "preferred_batch_size", 1, F.TYPE_INT32, F.LABEL_REPEATED)
    _field(db, "max_queue_delay_microseconds", 2, F.TYPE_UINT64)

    ig = fd.message_type.add(name="ModelInstanceGroup")
    kind = ig.enum_type.add(name="Kind")
    for i, n in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=n, number=i)
    _field(ig, "count", 2, F.TYPE_INT32)
    _field(ig, "kind", 4, F.TYPE_ENUM, type_name=".inference.ModelInstanceGroup.Kind")
    _field(ig, "profile", 5, F.TYPE_STRING, F.LABEL_REPEATED)

    param = fd.message_type.add(name="ModelParameter")
    _field(param, "string_value", 1, F.TYPE_STRING)

    mc = fd.message_type.add(name="ModelConfig")
    _field(mc, "name", 1, F.TYPE_STRING)
    _field(mc, "platform", 2, F.TYPE_STRING)
    _field(mc, "version_policy", 3, F.TYPE_MESSAGE, type_name=".inference.ModelVersionPolicy")
    _field(mc, "max_batch_size", 4, F.TYPE_INT32)
    _field(mc, "input", 5, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".inference.ModelInput")
    _field(mc, "output", 6, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".inference.ModelOutput")
    _field(mc, "instance_group", 7, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".inference.ModelInstanceGroup")
    _field(mc, "default_model_filename", 8, F.TYPE_STRING)
    _map(mc, "cc_model_filenames", 9, F.TYPE_STRING)
    _field(mc, "dynamic_batching", 11, F.TYPE_MESSAGE, type_name=".inference.ModelDynamicBatching")
    _map(mc, "parameters", 14, F.TYPE_MESSAGE, ".inference.ModelParameter")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse(path: Path) -> Any:
    msg = model_config_class()()
    text_format.Parse(path.read_text(), msg)
    return msg


def test_onnx_repository_parses_with_right_dims(
    bundle_factory: Callable[..., Bundle], tmp_path: Path
) -> None:
    one_size = bundle_factory("one", ((32, 32),))
    export_onnx(one_size.path, "fp32", max_batch=16)
    repo = tmp_path / "repo"
    assert export_triton(one_size.path, repo, TritonOptions(instances=2)) == ["tiny"]
    cfg = parse(repo / "tiny" / "config.pbtxt")
    assert cfg.name == "tiny" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("images", [3, 32, 32])]
    assert {o.name: list(o.dims) for o in cfg.output} == {
        "patch": [4, 4, 64],
        "cls": [64],
        "assign": [4, 4, 64],
    }
    assert all(o.data_type == 11 for o in [*cfg.input, *cfg.output])  # TYPE_FP32
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, 1)]  # KIND_GPU
    assert cfg.parameters["cotap_bundle_sha256"].string_value
    assert (repo / "tiny" / "1" / "model.onnx").is_file()
    assert not (repo / "tiny_trt").exists()


def test_two_sizes_and_engines_give_dynamic_dims_and_a_plan_model(
    tiny_bundle: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export_onnx(tiny_bundle.path, "fp32", max_batch=8)  # both declared sizes
    plan = b"not a real plan: the repository layout is under test"
    record = EngineArtifact(
        file="engines/t4/model.plan",
        target="t4",
        precision="fp16",
        sizes=((32, 32), (24, 40)),
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        tensorrt_version="10.8.0.43",
        gpu_name="Tesla T4",
        compute_capability="7.5",
        sha256=sha256_bytes(plan),
    )
    add_files(tiny_bundle.path, {record.file: plan}, artifacts={ENGINES_KEY: [record.to_dict()]})
    repo = tmp_path / "repo"
    assert (
        main(["export", "triton", "--bundle", str(tiny_bundle.path), "--out", str(repo), "--name", "feat"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["models"] == ["feat", "feat_trt"]
    onnx_cfg = parse(repo / "feat" / "config.pbtxt")
    assert list(onnx_cfg.input[0].dims) == [3, -1, -1]
    assert {o.name: list(o.dims) for o in onnx_cfg.output}["patch"] == [-1, -1, 64]
    trt_cfg = parse(repo / "feat_trt" / "config.pbtxt")
    assert trt_cfg.platform == "tensorrt_plan" and trt_cfg.max_batch_size == 8
    assert dict(trt_cfg.cc_model_filenames) == {"7.5": "t4.plan"}
    # one group whose instances each hold every profile (one group per profile would give each
    # instance a single size, and a request of the other size no instance)
    assert [(g.count, g.kind, list(g.profile)) for g in trt_cfg.instance_group] == [(1, 1, ["0", "1"])]
    assert (repo / "feat_trt" / "1" / "t4.plan").read_bytes() == plan
    index = json.loads((repo / "cotap-repository.json").read_text())
    assert index["feat"]["models"] == ["feat", "feat_trt"]


def engine_record(
    target: str, cc: str, sizes: tuple[tuple[int, int], ...] = ((32, 32), (24, 40))
) -> EngineArtifact:
    plan = f"plan of {target}".encode()
    return EngineArtifact(
        file=f"engines/{target}/model.plan",
        target=target,
        precision="fp16",
        sizes=sizes,
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        tensorrt_version="10.8.0.43",
        gpu_name="some GPU",
        compute_capability=cc,
        sha256=sha256_bytes(plan),
    )


def add_engines(bundle: Bundle, *records: EngineArtifact) -> None:
    plans: dict[str, bytes] = {r.file: f"plan of {r.target}".encode() for r in records}
    add_files(bundle.path, plans, artifacts={ENGINES_KEY: [r.to_dict() for r in records]})


@pytest.mark.parametrize(
    ("records", "kind", "message"),
    [
        (
            (engine_record("a10", "8.6"), engine_record("a6000", "8.6")),
            "KIND_GPU",
            r"targets 'a10' and 'a6000' are both for compute capability 8\.6",
        ),
        (
            (engine_record("t4", "7.5"), engine_record("l4", "8.9", ((32, 32),))),
            "KIND_GPU",
            r"profiles differ \(t4: 32x32, 24x40; l4: 32x32\)",
        ),
        (
            (engine_record("t4", "7.5"), engine_record("l4", "8.9", ((24, 40), (32, 32)))),
            "KIND_GPU",
            r"profiles differ \(t4: 32x32, 24x40; l4: 24x40, 32x32\)",  # profile i: one size in all
        ),
        ((engine_record("t4", "7.5"),), "KIND_CPU", "GPUs only .*KIND_GPU"),
    ],
    ids=["same-cc", "profile-counts", "profile-order", "kind-cpu"],
)
def test_engines_triton_cannot_serve_are_refused_before_writing(
    tiny_bundle: Bundle, tmp_path: Path, records: tuple[EngineArtifact, ...], kind: str, message: str
) -> None:
    export_onnx(tiny_bundle.path, "fp32", max_batch=8)
    add_engines(tiny_bundle, *records)
    with pytest.raises(ValueError, match=message):
        export_triton(tiny_bundle.path, tmp_path / "repo", TritonOptions(kind=kind))
    assert not (tmp_path / "repo").exists()


def test_two_compute_capabilities_share_one_model(tiny_bundle: Bundle, tmp_path: Path) -> None:
    export_onnx(tiny_bundle.path, "fp32", max_batch=8)
    add_engines(tiny_bundle, engine_record("t4", "7.5"), engine_record("l4", "8.9"))
    export_triton(tiny_bundle.path, tmp_path / "repo", TritonOptions(instances=2))
    cfg = parse(tmp_path / "repo" / "tiny_trt" / "config.pbtxt")
    assert dict(cfg.cc_model_filenames) == {"7.5": "t4.plan", "8.9": "l4.plan"}
    assert [(g.count, list(g.profile)) for g in cfg.instance_group] == [(2, ["0", "1"])]
    for target in ("t4", "l4"):
        assert (
            tmp_path / "repo" / "tiny_trt" / "1" / f"{target}.plan"
        ).read_bytes() == f"plan of {target}".encode()


def test_an_ampere_plus_plan_is_the_default_and_no_other(tiny_bundle: Bundle, tmp_path: Path) -> None:
    """Triton loads `default_model_filename` on a GPU that `cc_model_filenames` does not list (an
    A100 at 8.0, an H200 at 9.0): only an Ampere-plus engine runs there; a T4 plan would not."""
    export_onnx(tiny_bundle.path, "fp32", max_batch=8)
    l4 = dataclasses.replace(engine_record("l4-h100", "8.9"), hardware_compatibility_level="ampere_plus")
    add_engines(tiny_bundle, engine_record("t4", "7.5"), l4)
    export_triton(tiny_bundle.path, tmp_path / "both")
    both = parse(tmp_path / "both" / "tiny_trt" / "config.pbtxt")
    assert both.default_model_filename == "l4-h100.plan"
    add_engines(tiny_bundle, engine_record("t4", "7.5"))
    export_triton(tiny_bundle.path, tmp_path / "t4")
    assert "default_model_filename" not in (tmp_path / "t4" / "tiny_trt" / "config.pbtxt").read_text()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (TritonOptions(name=".."), "bad model name '..'"),
        (TritonOptions(name="."), "bad model name '.'"),
        (TritonOptions(name="a/b"), "bad model name"),
        (TritonOptions(name='a"b'), "bad model name"),
        (TritonOptions(preferred_batch_sizes=(4, 64)), r"preferred batch sizes \[64\] .* max batch size 8"),
        (TritonOptions(max_queue_delay_us=-5), "queue delay must be 0 or more"),
        (TritonOptions(instances=0), "instance count must be at least 1"),
        (TritonOptions(kind="KIND_TPU"), "instance kind must be one of"),
    ],
)
def test_options_triton_would_refuse_are_refused_and_nothing_is_touched(
    tiny_bundle: Bundle, tmp_path: Path, options: TritonOptions, message: str
) -> None:
    """Before this check `--name .. --overwrite` deleted the repository's parent folder."""
    export_onnx(tiny_bundle.path, "fp32", max_batch=8)
    repo = tmp_path / "deploy" / "repo"
    export_triton(tiny_bundle.path, repo, TritonOptions(name="other"))
    (tmp_path / "deploy" / "keep.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=message):
        export_triton(tiny_bundle.path, repo, options, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_failed_write_leaves_the_repository_as_it_was(
    tiny_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The models are written beside the repository and moved in at the end: an error half-way
    (a disk full, say) leaves the old model in place and no staging folder behind."""
    export_onnx(tiny_bundle.path, "fp32", max_batch=8)
    repo = tmp_path / "repo"
    export_triton(tiny_bundle.path, repo)
    old = (repo / "tiny" / "config.pbtxt").read_text()

    def disk_full(*args: Any, **kwargs: Any) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(triton, "config_pbtxt", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_triton(tiny_bundle.path, repo, TritonOptions(instances=3), overwrite=True)
    assert (repo / "tiny" / "config.pbtxt").read_text() == old
    assert (repo / "tiny" / "1" / "model.onnx").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_failed_move_puts_the_old_models_back(
    tiny_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export_onnx(tiny_bundle.path, "fp32", max_batch=8)
    repo = tmp_path / "repo"
    export_triton(tiny_bundle.path, repo)
    old = (repo / "tiny" / "config.pbtxt").read_text()
    real_rename = Path.rename
    failed: list[Path] = []

    def rename(self: Path, target: Any) -> Path:
        if Path(target) == repo / "tiny" and not failed:  # the new model's move in fails (once)
            failed.append(self)
            raise OSError(18, "Invalid cross-device link")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="cross-device"):
        export_triton(tiny_bundle.path, repo, TritonOptions(instances=3), overwrite=True)
    monkeypatch.undo()
    assert failed and "new" in failed[0].parts  # it was the new model's move that failed
    assert (repo / "tiny" / "config.pbtxt").read_text() == old
    assert not [p for p in [*tmp_path.iterdir(), *repo.iterdir()] if p.name.startswith(".cotap")]


def test_a_repository_on_its_own_filesystem_is_staged_inside_it(
    tiny_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repository that is a volume's mount point (or whose parent is read-only): the models are
    staged in a hidden folder inside it, so the final moves stay on one filesystem."""
    export_onnx(tiny_bundle.path, "fp32", max_batch=8)
    repo = tmp_path / "volume"
    monkeypatch.setattr(triton.os, "access", lambda path, mode: False)  # the parent is not writable
    assert triton._staging_parent(repo.parent / "missing") == repo.parent / "missing"
    repo.mkdir()
    assert triton._staging_parent(repo) == repo
    export_triton(tiny_bundle.path, repo)
    assert sorted(p.name for p in repo.iterdir()) == ["cotap-repository.json", "tiny"]


def test_a_bad_name_is_refused_before_export_missing_touches_the_bundle(
    tiny_bundle: Bundle, tmp_path: Path
) -> None:
    before = (tiny_bundle.path / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="bad model name"):
        export_triton(tiny_bundle.path, tmp_path / "repo", TritonOptions(name=".."), export_missing=True)
    assert (tiny_bundle.path / "manifest.json").read_bytes() == before


def test_missing_onnx_model_is_explained(tiny_bundle: Bundle, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cotap export onnx"):
        export_triton(tiny_bundle.path, tmp_path / "repo", TritonOptions(precision="fp16"))


@pytest.mark.parametrize("sizes", [[(48, 48)], [(32, 32)]], ids=["undeclared", "some-declared"])
def test_a_model_without_every_declared_size_is_refused(
    tiny_bundle: Bundle, tmp_path: Path, sizes: list[tuple[int, int]]
) -> None:
    """As the server refuses it: the bundle's preprocessing makes 32x32 and 24x40 inputs."""
    export_onnx(tiny_bundle.path, "fp32", sizes=sizes, max_batch=2)
    exported = ", ".join(f"{h}x{w}" for h, w in sizes)
    with pytest.raises(
        ValueError,
        match=rf"no fp32 ONNX model for all the sizes it declares \(24x40, 32x32; exported: {exported}\)",
    ):
        export_triton(tiny_bundle.path, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    names = export_triton(
        tiny_bundle.path, tmp_path / "repo", export_missing=True
    )  # exports the declared sizes
    assert names == ["tiny"]
    assert list(parse(tmp_path / "repo" / "tiny" / "config.pbtxt").input[0].dims) == [3, -1, -1]


IMPOSSIBLE = GateThresholds(
    patch_cos_mean=1.1, patch_cos_min=1.1, cls_cos_mean=1.1, argmax_agreement=1.0, margin=0.0
)


def test_forced_models_are_refused_unless_forced_and_then_recorded(
    bundle_factory: Callable[..., Bundle], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model kept with --force although its gate failed: Triton would serve it with no warning."""
    one = bundle_factory("one", ((32, 32),))
    record = export_onnx(one.path, "fp32", max_batch=4, force=True, thresholds=IMPOSSIBLE)
    assert record.forced
    repo = tmp_path / "repo"
    with pytest.raises(ValueError, match=r"onnx/model-fp32\.onnx .* failed its accuracy gate .*--force"):
        export_triton(one.path, repo)
    assert not repo.exists()
    assert main(["export", "triton", "--bundle", str(one.path), "--out", str(repo)]) == 2
    assert "failed its accuracy gate" in capsys.readouterr().err and not repo.exists()

    assert main(["export", "triton", "--bundle", str(one.path), "--out", str(repo), "--force"]) == 0
    captured = capsys.readouterr()
    assert "warning: onnx/model-fp32.onnx failed its accuracy gate" in captured.err
    assert json.loads(captured.out)["forced"] == ["onnx/model-fp32.onnx"]
    index = json.loads((repo / "cotap-repository.json").read_text())
    assert index["tiny"]["forced"] is True and index["tiny"]["forced_files"] == ["onnx/model-fp32.onnx"]
    assert parse(repo / "tiny" / "config.pbtxt").parameters["cotap_forced"].string_value == "true"


def test_forced_engines_are_refused_unless_forced(tiny_bundle: Bundle, tmp_path: Path) -> None:
    export_onnx(tiny_bundle.path, "fp32", max_batch=8)
    forced = dataclasses.replace(engine_record("t4", "7.5"), forced=True)
    add_engines(tiny_bundle, forced)
    with pytest.raises(ValueError, match=r"engines/t4/model\.plan .* failed its accuracy gate"):
        export_triton(tiny_bundle.path, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    export_triton(tiny_bundle.path, tmp_path / "repo", force=True)
    assert "cotap_forced" not in parse(tmp_path / "repo" / "tiny" / "config.pbtxt").parameters
    trt = parse(tmp_path / "repo" / "tiny_trt" / "config.pbtxt")
    assert trt.parameters["cotap_forced"].string_value == "true"
    index = json.loads((tmp_path / "repo" / "cotap-repository.json").read_text())
    assert index["tiny"]["forced"] is True and index["tiny"]["forced_files"] == ["engines/t4/model.plan"]


def test_unforced_repository_records_forced_false(
    bundle_factory: Callable[..., Bundle], tmp_path: Path
) -> None:
    one = bundle_factory("one", ((32, 32),))
    export_onnx(one.path, "fp32", max_batch=4)
    export_triton(one.path, tmp_path / "repo")
    index = json.loads((tmp_path / "repo" / "cotap-repository.json").read_text())
    assert index["tiny"]["forced"] is False and index["tiny"]["forced_files"] == []
    assert "cotap_forced" not in parse(tmp_path / "repo" / "tiny" / "config.pbtxt").parameters
