"""Synthetic checkpoints in each supported layout, written key by key (not from our state dict)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cotap.export.bundle import export_bundle
from cotap.training.checkpoints import TRAIN_FORMAT, CheckpointError, load_model
from cotap.training.models import build_model

D, DEPTH, HEADS, P, M, GRID = 32, 2, 2, 8, 64, 4


def backbone_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A DINO ViT backbone's tensors by name, as the DINO repository lays them out."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    sd = {
        "cls_token": r(1, 1, D),
        "pos_embed": r(1, 1 + GRID * GRID, D),
        "patch_embed.proj.weight": r(D, 3, P, P),
        "patch_embed.proj.bias": r(D),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd |= {
            b + "norm1.weight": 1 + r(D),
            b + "norm1.bias": r(D),
            b + "attn.qkv.weight": r(3 * D, D),
            b + "attn.qkv.bias": r(3 * D),
            b + "attn.proj.weight": r(D, D),
            b + "attn.proj.bias": r(D),
            b + "norm2.weight": 1 + r(D),
            b + "norm2.bias": r(D),
            b + "mlp.fc1.weight": r(4 * D, D),
            b + "mlp.fc1.bias": r(4 * D),
            b + "mlp.fc2.weight": r(D, 4 * D),
            b + "mlp.fc2.bias": r(D),
        }
    return sd


def filter_tensors(seed: int = 1, every_block: bool = False) -> dict[str, torch.Tensor]:
    """The filter's parameters; the official release instantiates its norms in every block."""
    g = torch.Generator().manual_seed(seed)
    sd = {"kernel": torch.randn(M, D, 3, 3, generator=g)}
    for i in range(DEPTH) if every_block else [DEPTH - 1]:
        b = f"blocks.{i}."
        for name, dim in (("norm_in", D), ("norm_out_patch", 2 * D), ("norm_out_cls", 2 * D)):
            sd[b + name + ".weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
            sd[b + name + ".bias"] = 0.1 * torch.randn(dim, generator=g)
    return sd


def head_tensors() -> dict[str, torch.Tensor]:
    sd = {}
    for h, k in ((0, 16), (1, 32)):
        b = f"projection_heads.{h}."
        sd |= {
            b + "projection_head.0.weight": torch.zeros(64, 2 * D),
            b + "projection_head.0.bias": torch.zeros(64),
            b + "projection_head.2.weight": torch.zeros(64, 64),
            b + "projection_head.2.bias": torch.zeros(64),
            b + "projection_head.4.weight": torch.zeros(16, 64),
            b + "last_layer.weight_g": torch.ones(k, 1),
            b + "last_layer.weight_v": torch.zeros(k, 16),
        }
    return sd


def official_ckpt(student: dict[str, torch.Tensor]) -> dict:
    teacher = {k: v + 1 for k, v in student.items()}
    sd = {"net.model." + k: v for k, v in student.items()}
    sd |= {"net_teacher.model." + k: v for k, v in teacher.items()}
    return {"state_dict": sd, "epoch": 3, "global_step": 1600, "pytorch-lightning_version": "1.8.6"}


@pytest.fixture
def full() -> dict[str, torch.Tensor]:
    """The reference weights: backbone + last-block filter (what our model holds)."""
    return backbone_tensors() | filter_tensors()


@pytest.fixture
def official_path(tmp_path: Path, full: dict[str, torch.Tensor]) -> Path:
    student = backbone_tensors() | filter_tensors(every_block=True) | head_tensors()
    # the unused per-block norms of the release hold other values; only the last block's are used
    for k in list(student):
        if k.startswith("blocks.0.norm_"):
            student[k] = student[k] * 0 + 7
    student |= {k: v for k, v in full.items() if k.startswith(f"blocks.{DEPTH - 1}.norm_")}
    path = tmp_path / "dino+cotap.ckpt"
    torch.save(official_ckpt(student), path)
    return path


def _images() -> torch.Tensor:
    return torch.randn(2, 3, GRID * P, GRID * P, generator=torch.Generator().manual_seed(5))


def _features(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model.forward_features(_images())  # type: ignore[operator]


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in ("patch", "cls", "assign"):
        assert (a[k] - b[k]).abs().max().item() == 0.0, k


def test_official_layout(official_path: Path, full: dict[str, torch.Tensor]) -> None:
    loaded = load_model(official_path, arch="cotap_test")
    assert loaded.layout == "official" and loaded.prototypes_initialized
    for k, v in full.items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    teacher = load_model(official_path, arch="cotap_test", which="teacher")
    assert torch.equal(teacher.model.cls_token, full["cls_token"] + 1)


def test_all_layouts_give_the_same_outputs(
    tmp_path: Path, official_path: Path, full: dict[str, torch.Tensor]
) -> None:
    ref = _features(load_model(official_path).model)  # arch inferred from shapes

    ours = tmp_path / "run.pt"
    cfg = {"patch_size": P, "embed_dim": D, "depth": DEPTH, "num_heads": HEADS, "img_size": GRID * P}
    torch.save(
        {
            "format": TRAIN_FORMAT,
            "arch": "cotap_test",
            "model_config": cfg,
            "step": 20,
            "student": {k: v * 0 for k, v in full.items()},
            "teacher": full,
        },
        ours,
    )
    loaded = load_model(ours)
    assert loaded.layout == "cotap"
    _assert_identical(ref, _features(loaded.model))

    st = tmp_path / "weights.safetensors"
    save_file({"module." + k: v.contiguous() for k, v in full.items()}, st)
    _assert_identical(ref, _features(load_model(st, arch="cotap_test").model))

    bundle = export_bundle(official_path, tmp_path / "bundle", arch="cotap_test", size=GRID * P)
    from_bundle = load_model(bundle.path)
    assert from_bundle.layout == "bundle" and from_bundle.source_sha256 == bundle.sha256
    _assert_identical(ref, _features(from_bundle.model))
    assert bundle.manifest["source"]["layout"] == "official"


@pytest.mark.parametrize("full_checkpoint", [False, True])
def test_dino_layout(tmp_path: Path, official_path: Path, full_checkpoint: bool) -> None:
    backbone = backbone_tensors()
    if full_checkpoint:
        head = {"head.mlp.0.weight": torch.zeros(8, D), "head.last_layer.weight_g": torch.ones(8, 1)}
        obj = {
            "teacher": {"backbone." + k: v for k, v in backbone.items()} | head,
            "student": {"module.backbone." + k: v * 0 for k, v in backbone.items()},
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=P),
        }
    else:
        obj = backbone | {"norm.weight": torch.ones(D), "norm.bias": torch.zeros(D)}
    path = tmp_path / "dino.pth"
    torch.save(obj, path)
    loaded = load_model(path, arch="cotap_test")
    assert loaded.layout == "dino"
    assert not loaded.prototypes_initialized
    assert any("uninitialised" in n for n in loaded.notes)
    torch.manual_seed(123)  # whatever the global RNG holds, the missing parameters are the same
    again = load_model(path, arch="cotap_test").model.state_dict()
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, again[k]), k  # a DINO file gives one model: evals and exports repeat
    ref = load_model(official_path).model
    with torch.no_grad():
        a = loaded.model.get_intermediate_layers(_images(), n=DEPTH)
        b = ref.get_intermediate_layers(_images(), n=DEPTH)
    for x, y in zip(a, b, strict=True):
        assert (x - y).abs().max().item() == 0.0


def test_renamed_key_is_named(tmp_path: Path, full: dict[str, torch.Tensor]) -> None:
    sd = dict(full)
    sd["blocks.0.attn.qkvx.weight"] = sd.pop("blocks.0.attn.qkv.weight")
    path = tmp_path / "bad.ckpt"
    torch.save(official_ckpt(sd), path)
    with pytest.raises(CheckpointError) as e:
        load_model(path, arch="cotap_test")
    assert "blocks.0.attn.qkv.weight" in str(e.value) and "blocks.0.attn.qkvx.weight" in str(e.value)


def test_missing_key_is_named(tmp_path: Path, full: dict[str, torch.Tensor]) -> None:
    sd = dict(full)
    del sd["blocks.1.mlp.fc2.bias"]
    path = tmp_path / "bad.ckpt"
    torch.save(official_ckpt(sd), path)
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias"):
        load_model(path, arch="cotap_test")


def test_missing_kernel_in_official_is_an_error(tmp_path: Path, full: dict[str, torch.Tensor]) -> None:
    sd = {k: v for k, v in full.items() if k != "kernel"}
    path = tmp_path / "bad.ckpt"
    torch.save(official_ckpt(sd), path)
    with pytest.raises(CheckpointError, match="missing keys: kernel"):
        load_model(path, arch="cotap_test")


def test_shape_mismatch_is_named(tmp_path: Path, full: dict[str, torch.Tensor]) -> None:
    with pytest.raises(CheckpointError, match="no registered model"):
        load_model(_save(tmp_path, {**full, "pos_embed": torch.zeros(1, 17, 48)}))
    sd = {**full, "blocks.0.mlp.fc1.bias": torch.zeros(7)}
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc1\.bias: checkpoint \(7,\)"):
        load_model(_save(tmp_path, sd), arch="cotap_test")


def _save(tmp_path: Path, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "x.pth"
    torch.save(sd, path)
    return path


def test_pickled_objects_are_refused(tmp_path: Path, full: dict[str, torch.Tensor]) -> None:
    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save(
        {"state_dict": {"net.model." + k: v for k, v in full.items()}, "hyper_parameters": Evil()}, path
    )
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(path)


def test_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        load_model(_save(tmp_path, {"foo": 1}))  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth")


def test_a_file_that_is_no_checkpoint_is_named_so(tmp_path: Path) -> None:
    """Not pickle advice for a text file: it is not a checkpoint at all."""
    (tmp_path / "notes.md").write_text("# notes\n")
    with pytest.raises(CheckpointError, match=r"notes.md is not a checkpoint: expected a torch.save file"):
        load_model(tmp_path / "notes.md")
    legacy = tmp_path / "legacy.pt"  # the pre-zip torch.save format still loads
    torch.save(build_model("cotap_test").state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert load_model(legacy, arch="cotap_test").layout in ("plain", "dino")
