"""Checkpoint -> bundle: `cotap export bundle --checkpoint PATH [--arch NAME] --out DIR`.

Defaults come from the source, never from a fixed number: the input size is the model's own
`img_size` (the grid its position embeddings were trained on: 64 for a `cotap_micro8` run, 224 for a
ViT-S/16 release), and a bundle given as the source keeps its preprocessing and declared sizes.
An `--arch` that does not describe the checkpoint's model, and `--which` where no choice is made,
are refused instead of being ignored or mislabelling the bundle.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from cotap.core.bundle import Bundle, BundleError
from cotap.core.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from cotap.training.bundles import write_model_bundle
from cotap.training.checkpoints import CheckpointError, LoadedModel, check_which, load_model
from cotap.training.models import ViTConfig, model_config

# The fields that make two models different networks. The rest are set per checkpoint (img_size,
# prototypes and kernel size are read from the tensors' shapes) or matter in training only.
STRUCTURE = (
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "in_chans",
    "use_filter",
)


def _structure_diffs(have: ViTConfig | dict[str, Any], wanted: ViTConfig) -> list[str]:
    """'field have vs wanted' for each structural field that differs (a recorded config dict is read
    over the config defaults, as `ViTConfig.from_dict` does)."""
    got = {**ViTConfig().to_dict(), **have} if isinstance(have, dict) else have.to_dict()
    return [f"{f} {got[f]} vs {getattr(wanted, f)}" for f in STRUCTURE if got[f] != getattr(wanted, f)]


def _arch_refusal(requested: str, source: Path, recorded: str | None, diffs: list[str]) -> CheckpointError:
    what = f"is a {recorded} model" if recorded is not None else "holds another model"
    detail = f" (checkpoint vs {requested}: {', '.join(diffs)})" if diffs else ""
    fix = (
        "leave --arch out (the architecture is recorded in it)"
        if recorded is not None
        else "pass the architecture it holds, or leave --arch out to infer it from the tensor shapes"
    )
    return CheckpointError(
        f"--arch {requested} does not match the checkpoint: {source} {what}{detail}; {fix}"
    )


def _registry_config(requested: str) -> ViTConfig:
    try:
        return model_config(requested)
    except KeyError as e:
        raise CheckpointError(str(e.args[0]) if e.args else str(e)) from e


def check_arch(requested: str, loaded: LoadedModel, source: Path) -> None:
    """After loading: `requested`'s registry config must match the loaded model's structure (shapes
    do not show the number of heads, a recorded config may differ from the registry's)."""
    recorded = loaded.arch if loaded.layout in ("bundle", "cotap") else None  # the name the file records
    if recorded == requested:  # a run with model.overrides records its arch name, not the registry's
        return  # structure; load_model refused any other name already
    diffs = _structure_diffs(loaded.model.config, _registry_config(requested))
    if diffs:
        raise _arch_refusal(requested, source, recorded, diffs)


def export_bundle(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    arch: str | None = None,
    which: str | None = None,
    name: str | None = None,
    size: int | tuple[int, int] | None = None,
    resize: str | None = None,
    input_sizes: list[tuple[int, int]] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Load `checkpoint` strictly (any layout `load_model` accepts) and write it as a bundle.

    Defaults: `size` is the model's `img_size` (what it was trained at), `resize` "fixed", mean/std
    ImageNet's; from a bundle, its preprocessing (and, unless size or resize is given, its declared
    input sizes). `arch` must name the model the checkpoint holds (`check_arch`); `which` is for
    files holding a student and a teacher, and is refused for anything else.
    """
    out_path = Path(out)
    if out_path.exists() and not overwrite:  # before the (possibly slow) load
        raise BundleError(f"{out_path} exists; pass --overwrite (overwrite=True) to replace it", out_path)
    src = Path(checkpoint)
    loaded = load_model(checkpoint, arch=arch, which=which)  # refuses an arch other than a recorded one
    check_which(which, loaded, src)
    if arch is not None:
        check_arch(arch, loaded, src)
    used = loaded.which
    patch = loaded.model.patch_size
    inherited = loaded.bundle.config.preprocess if loaded.bundle is not None else None
    if inherited is not None and size is None and resize in (None, inherited.resize):
        # a bundle re-exported as it is: same preprocessing, same declared sizes
        preprocess = dataclasses.replace(inherited, mean=mean or inherited.mean, std=std or inherited.std)
        if input_sizes is None:
            input_sizes = [tuple(s) for s in loaded.bundle.config.input_sizes]  # type: ignore[union-attr,misc]
        size = inherited.size
        resize = inherited.resize
    else:
        resize = resize or (inherited.resize if inherited is not None else "fixed")
        if size is None:
            size = int(loaded.model.config.img_size)  # the grid it was trained on
        if mean is None and inherited is not None:
            mean = inherited.mean
        if std is None and inherited is not None:
            std = inherited.std
        preprocess = PreprocessConfig(
            resize=resize,  # type: ignore[arg-type]
            size=(
                (int(size) if not isinstance(size, tuple) else size[0])
                if resize == "shorter_side"
                else (size if isinstance(size, tuple) else (size, size))
            ),
            patch_size=patch,
            mean=mean or IMAGENET_MEAN,
            std=std or IMAGENET_STD,
        )
    if input_sizes is None and resize == "shorter_side":
        s = int(size) if not isinstance(size, tuple) else size[0]
        input_sizes = [(s, s)]
    source: dict[str, Any] = {
        "checkpoint": str(src.resolve()),
        "sha256": loaded.source_sha256,
        "layout": loaded.layout,
        "which": used,
        "notes": loaded.notes,
    }
    build = {
        "command": "export bundle",
        "arch": loaded.arch,
        "size": list(size) if isinstance(size, tuple) else size,
        "resize": resize,
        "input_sizes": None if input_sizes is None else [list(s) for s in input_sizes],
    }
    return write_model_bundle(
        loaded.model,
        loaded.arch,
        out,
        name=name or out_path.name,
        preprocess=preprocess,
        input_sizes=input_sizes,
        prototypes_initialized=loaded.prototypes_initialized,
        source=source,
        build=build,
        overwrite=overwrite,
    )
