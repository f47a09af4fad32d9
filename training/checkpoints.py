"""Checkpoint loading: our training checkpoints, the official CoTAP release, DINO `.pth` files and
bundles all become a `CoTAPViT`, strictly.

Loading never guesses silently: prefixes are stripped as prefixes, known extras (teacher copies,
projection heads, DINO's final norm and head, the release's unused per-block filter norms) are
dropped by rule, and any other missing or unexpected key, or a shape mismatch, raises a
`CheckpointError` that names the keys. Pickles are read with `torch.load(weights_only=True)` only.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors

from cotap.core.bundle import WEIGHTS, Bundle, read_bundle, sha256_file
from cotap.training.models import CoTAPViT, ViTConfig, list_models, model_config

TRAIN_FORMAT = "cotap-train-v1"
FILTER_NORMS = ("norm_in", "norm_out_patch", "norm_out_cls")

StateDict = dict[str, torch.Tensor]


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded exactly, with the keys at fault."""


@dataclass
class LoadedModel:
    model: CoTAPViT
    arch: str
    layout: str  # "cotap" | "official" | "dino" | "plain" | "bundle"
    source_sha256: str
    prototypes_initialized: bool
    notes: list[str] = field(default_factory=list)
    bundle: Bundle | None = None
    # DINO's final LayerNorm ("weight", "bias"), which the model drops (the filter's output norm
    # replaces it); kept for what needs DINO's own CLS feature, such as neighbour files.
    final_norm: StateDict | None = None
    # the network taken from a file that holds a student and a teacher; None for single-model files
    which: str | None = None


# -- reading ---------------------------------------------------------------------------------------
def torch_load_safely(path: Path) -> Any:
    """`torch.load(weights_only=True)` of a checkpoint file, with errors that say what the file is and
    what to do (a refused pickle, a file that is no checkpoint) as `CheckpointError`."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or a raw pickle
        raise CheckpointError(
            f"{path} is not a checkpoint: expected a torch.save file (.pt/.pth/.ckpt; zip, or a pickle of "
            "protocol 2 or newer, which is what weights_only loading reads), a .safetensors file or a "
            "bundle directory"
        )
    try:
        # DINO's full checkpoints carry their argparse Namespace; it is a plain attribute bag.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        culprit = f" (it pickles {found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True){culprit}. cotap never unpickles "
            "arbitrary objects. If you trust the file, re-save only its tensors, e.g. "
            "torch.save({'state_dict': ckpt['state_dict']}, 'clean.ckpt') after loading it yourself. "
            f"Underlying error: {msg.splitlines()[0] if msg else type(e).__name__}"
        ) from e


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def strip_prefixes(sd: Mapping[str, torch.Tensor], prefixes: Iterable[str]) -> StateDict:
    """Strip any of `prefixes` from the start of each key, repeatedly (never substrings elsewhere)."""
    prefixes = tuple(prefixes)
    out: StateDict = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        if k in out:
            raise CheckpointError(f"two keys map to {k!r} after stripping prefixes {prefixes}")
        out[k] = v
    return out


# -- layouts ---------------------------------------------------------------------------------------
def _official(ckpt: Mapping[str, Any], which: str) -> tuple[StateDict, list[str]]:
    sd = ckpt["state_dict"]
    prefix = {"student": "net.model.", "teacher": "net_teacher.model."}[which]
    other = "net_teacher." if which == "student" else "net."
    kept: StateDict = {}
    dropped: list[str] = []
    for k, v in sd.items():
        if k.startswith(prefix):
            kept[k[len(prefix) :]] = v
        elif k.startswith(other) or k.startswith("net_teacher.") or k.startswith("net."):
            dropped.append(k)
        else:
            kept[k] = v  # left for the strict check to name
    notes = [f"official release layout: took the {which} (`{prefix}*`), dropped {len(dropped)} other keys"]
    return kept, notes


def _dino(ckpt: Mapping[str, Any], which: str) -> tuple[StateDict, list[str]]:
    notes: list[str] = []
    if not _is_state_dict(ckpt):
        if which in ckpt and _is_state_dict(ckpt[which]):
            notes.append(f"DINO full checkpoint: took `{which}`")
            ckpt = ckpt[which]
        else:
            raise CheckpointError(f"no `{which}` state dict in checkpoint with keys {sorted(ckpt)[:10]}")
    sd = strip_prefixes(ckpt, ("module.", "backbone.", "_orig_mod."))
    return sd, notes


def _drop_known_extras(sd: StateDict, depth: int, layout: str) -> tuple[StateDict, list[str]]:
    """Remove keys that a layout is known to carry beside the model, by rule."""
    last = depth - 1
    dropped: list[str] = []
    kept: StateDict = {}
    for k, v in sd.items():
        drop = False
        if k.startswith("projection_heads.") or (layout == "dino" and k.startswith("head.")):
            drop = True
        elif layout == "dino" and k in ("norm.weight", "norm.bias"):
            drop = True  # CoTAP has no final norm; the filter's output norm replaces it
        else:
            m = re.fullmatch(r"blocks\.(\d+)\.(norm_in|norm_out_patch|norm_out_cls)\.(weight|bias)", k)
            if m and int(m.group(1)) != last:
                drop = True  # the release instantiates the filter norms in every block; only the last is used
        if drop:
            dropped.append(k)
        else:
            kept[k] = v
    return kept, (
        [f"dropped {len(dropped)} keys not part of the model (heads, unused norms)"] if dropped else []
    )


def _infer_config(sd: StateDict, arch: str | None) -> tuple[str, ViTConfig, list[str]]:
    """The model config a state dict fits: from `arch` when given, else by matching shapes to the registry."""
    notes: list[str] = []
    try:
        d = sd["pos_embed"].shape[-1]
        n0 = sd["pos_embed"].shape[1] - 1
        p = sd["patch_embed.proj.weight"].shape[-1]
    except KeyError as e:
        raise CheckpointError(f"not a ViT state dict: missing key {e.args[0]!r}") from e
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    grid = math.isqrt(n0)
    if grid * grid != n0:
        raise CheckpointError(f"pos_embed holds {n0} patch positions, not a square grid")
    overrides: dict[str, Any] = {"img_size": grid * p}
    if "kernel" in sd:
        overrides["num_prototypes"] = sd["kernel"].shape[0]
        overrides["kernel_size"] = sd["kernel"].shape[-1]
    if arch is None:
        candidates = [
            name
            for name in list_models()
            if (c := model_config(name)).embed_dim == d and c.depth == depth and c.patch_size == p
        ]
        if not candidates:
            raise CheckpointError(
                f"no registered model has width {d}, depth {depth}, patch {p}; pass arch= explicitly "
                f"(known: {', '.join(list_models())})"
            )
        arch = candidates[0]
        notes.append(f"architecture inferred from shapes: {arch}")
    try:
        config = model_config(arch, **overrides)
    except KeyError as e:
        raise CheckpointError(str(e)) from e
    if (config.embed_dim, config.depth, config.patch_size) != (d, depth, p):
        raise CheckpointError(
            f"checkpoint has width {d}, depth {depth}, patch {p} but {arch} has "
            f"{config.embed_dim}, {config.depth}, {config.patch_size}"
        )
    return arch, config, notes


def load_state_dict_strict(
    model: CoTAPViT, sd: Mapping[str, torch.Tensor], allowed_missing: Iterable[str] = ()
) -> list[str]:
    """Load `sd` into `model`; any missing (beyond `allowed_missing`) or unexpected key, or any shape
    mismatch, raises `CheckpointError` naming them. Returns the keys that were allowed to be missing."""
    expected = model.state_dict()
    allowed = set(allowed_missing)
    missing = sorted(set(expected) - set(sd) - allowed)
    unexpected = sorted(set(sd) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(sd) & set(expected))
        if sd[k].shape != expected[k].shape
    ]
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if problems:
        raise CheckpointError("checkpoint does not match the model exactly: " + " | ".join(problems))
    model.load_state_dict({**{k: expected[k] for k in allowed if k not in sd}, **sd}, strict=True)
    return sorted(allowed - set(sd))


def filter_keys(depth: int) -> list[str]:
    """The parameters a DINO backbone lacks: the prototypes and the last block's filter norms."""
    last = depth - 1
    return ["kernel"] + [f"blocks.{last}.{n}.{p}" for n in FILTER_NORMS for p in ("weight", "bias")]


def _build(sd: StateDict, arch: str | None, layout: str) -> tuple[CoTAPViT, str, bool, list[str]]:
    arch_name, config, notes = _infer_config(sd, arch)
    sd, dropped = _drop_known_extras(sd, config.depth, layout)
    # Parameters a layout lacks (a DINO file's prototypes and filter norms) keep their initial
    # values: drawn from a fixed seed, so that the same file always gives the same model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CoTAPViT(config)
    allowed = filter_keys(config.depth) if layout == "dino" else []
    absent = load_state_dict_strict(model, sd, allowed_missing=allowed)
    initialized = "kernel" not in absent
    if not initialized:
        notes.append(
            "the object-aware filter's prototypes are not in this checkpoint: they start uninitialised "
            "(random) and must be set by k-means in training before the `assign` output means anything"
        )
    return model.eval(), arch_name, initialized, notes + dropped


def _check_arch(asked: str | None, recorded: str | None, where: str) -> None:
    """A checkpoint that records its architecture is that architecture: asking for another one
    would only mislabel it (a bundle named cotap_vits16 holding a micro model)."""
    if asked and recorded and asked != recorded:
        raise CheckpointError(
            f"{where} holds a {recorded}, not a {asked}: drop the architecture you named "
            f"(--arch / model.arch), or name {recorded}"
        )


def check_which(which: str | None, loaded: LoadedModel, source: str | os.PathLike[str]) -> None:
    """`which` picks the student or the teacher of a file that holds both; for a file holding one
    model it would be silently meaningless, so commands that take `--which` refuse it."""
    if which is None or loaded.which is not None:
        return
    if loaded.layout == "bundle":
        raise CheckpointError(
            f"--which {which} does not apply to a bundle ({source} holds one model); leave --which out"
        )
    raise CheckpointError(
        f"--which {which} does not apply: {source} holds a single model (layout {loaded.layout}), "
        "not a student and a teacher; leave --which out"
    )


def _final_norm(sd: StateDict, layout: str) -> StateDict | None:
    if layout != "dino" or "norm.weight" not in sd or "norm.bias" not in sd:
        return None
    return {"weight": sd["norm.weight"], "bias": sd["norm.bias"]}


def detect_layout(ckpt: Any) -> str:
    if isinstance(ckpt, Mapping):
        if ckpt.get("format") == TRAIN_FORMAT:
            return "cotap"
        sd = ckpt.get("state_dict")
        if isinstance(sd, Mapping) and any(k.startswith("net.model.") for k in sd):
            return "official"
        if _is_state_dict(ckpt) or any(isinstance(ckpt.get(k), Mapping) for k in ("teacher", "student")):
            return "dino"
    keys = sorted(ckpt)[:12] if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise CheckpointError(
        f"unrecognised checkpoint layout (top-level keys: {keys}); expected a cotap training checkpoint, "
        "an official CoTAP Lightning checkpoint (`state_dict` with `net.model.*`), a DINO .pth or a bundle"
    )


def load_model(
    path: str | os.PathLike[str], arch: str | None = None, which: str | None = None
) -> LoadedModel:
    """Load any supported checkpoint into a `CoTAPViT` in eval mode.

    Args:
        path: a cotap training checkpoint, an official CoTAP release `.ckpt`, a DINO `.pth` (plain
            backbone or full checkpoint), a `.safetensors` state dict, or a bundle directory.
        arch: registry name; inferred from tensor shapes when omitted.
        which: `"student"` or `"teacher"` for files that hold both. Defaults: the student for the
            official release (what its authors evaluate), the teacher for DINO and cotap checkpoints.
    """
    p = Path(path)
    if p.is_dir():
        bundle = read_bundle(p)
        _check_arch(arch, bundle.config.arch, f"bundle {p}")
        sd = load_safetensors_bytes(bundle.read_verified(WEIGHTS))  # the bytes that were hashed
        cfg = ViTConfig.from_dict(bundle.config.model)
        model = CoTAPViT(cfg)
        load_state_dict_strict(model, sd)
        return LoadedModel(
            model.eval(),
            bundle.config.arch,
            "bundle",
            bundle.sha256,
            bundle.config.prototypes_initialized,
            [f"bundle {bundle.config.name}"],
            bundle,
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if which not in (None, "student", "teacher"):
        raise CheckpointError(f"which must be 'student' or 'teacher', not {which!r}")
    digest = sha256_file(p)
    if p.suffix == ".safetensors":
        sd = strip_prefixes(load_safetensors(p), ("module.", "backbone."))
        layout = "plain" if "kernel" in sd else "dino"
        model, arch_name, init, notes = _build(sd, arch, layout)
        return LoadedModel(model, arch_name, layout, digest, init, notes, final_norm=_final_norm(sd, layout))
    ckpt = torch_load_safely(p)
    layout = detect_layout(ckpt)
    if layout == "cotap":
        w = which or "teacher"
        sd = dict(ckpt[w])
        _check_arch(arch, ckpt.get("arch"), str(p))
        arch = ckpt.get("arch") or arch
        notes = [f"cotap training checkpoint at step {ckpt.get('step')}: took the {w}"]
        model_cfg = ckpt.get("model_config")
        if model_cfg:
            model = CoTAPViT(ViTConfig.from_dict(model_cfg))
            load_state_dict_strict(model, sd)
            init = bool(ckpt.get("prototypes_initialized", True))
            return LoadedModel(model.eval(), str(arch or "unknown"), layout, digest, init, notes, which=w)
        model, arch_name, init, more = _build(sd, arch, "plain")
        return LoadedModel(model, arch_name, layout, digest, init, notes + more, which=w)
    took: str | None
    if layout == "official":
        took = which or "student"
        sd, notes = _official(ckpt, took)
    else:
        took = None if _is_state_dict(ckpt) else which or "teacher"
        sd, notes = _dino(ckpt, which or "teacher")
        if "kernel" in sd:
            layout = "plain"
    model, arch_name, init, more = _build(sd, arch, layout)
    return LoadedModel(
        model, arch_name, layout, digest, init, notes + more, final_norm=_final_norm(sd, layout), which=took
    )
