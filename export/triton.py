"""A Triton Inference Server model repository from a bundle: `cotap export triton --bundle DIR --out REPO`.

Layout (Triton's "model repository", also what KServe's Triton runtime serves)::

    REPO/<name>/config.pbtxt        platform onnxruntime_onnx, dynamic batching, dims, instance groups
    REPO/<name>/1/model.onnx        the bundle's ONNX model of the chosen precision
    REPO/<name>_trt/config.pbtxt    platform tensorrt_plan, one plan per compute capability, KIND_GPU,
                                    one instance group holding every optimisation profile
    REPO/<name>_trt/1/<target>.plan (only when the bundle has engines)
    REPO/cotap-repository.json      which bundle, files and hashes this was made from, and whether
                                    any failed its accuracy gate (`forced`, `forced_files`)

A model or engine kept with `--force` although its accuracy gate failed is refused unless the
repository export is forced too: Triton serves it without the warning `cotap serve` gives, so a
forced export records it (`forced: true` and `forced_files` in cotap-repository.json, a `cotap_forced` parameter in the
config.pbtxt of each model that serves one).

Dims exclude the batch axis (Triton adds it from `max_batch_size`). With one declared input size the
dims are static; with several, H/W (and the grid) are -1 and clients send one of the declared sizes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cotap.core.artifacts import (
    INPUT_NAME,
    EngineArtifact,
    OnnxArtifact,
    engine_artifacts,
    onnx_artifacts,
    serving_onnx,
    sizes_text,
)
from cotap.core.bundle import Bundle, read_bundle, sha256_file
from cotap.core.fsio import write_json

KINDS = ("KIND_GPU", "KIND_CPU")
# A model name is a folder of the repository and a quoted string in config.pbtxt: no path parts,
# no quotes, and never "." or ".." (which would name the repository or its parent).
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TritonOptions:
    """Repository settings; saved in `cotap-repository.json`."""

    precision: str = "fp32"
    name: str | None = None  # default: the bundle's name
    kind: str = "KIND_GPU"
    instances: int = 1
    max_queue_delay_us: int = 2000
    preferred_batch_sizes: tuple[int, ...] = ()


def check_options(options: TritonOptions, name: str, max_batches: Sequence[int] = ()) -> None:
    """Refuse, before anything is written, what Triton would refuse to load: a name that is not a
    plain folder name, an unknown instance kind, counts below 1, a negative queue delay, or a
    preferred batch size above a model's `max_batch_size` (`max_batches`, when known)."""
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"bad model name {name!r}: use letters, digits, '_', '.' and '-', not starting with '.' or '-'"
        )
    if options.kind not in KINDS:
        raise ValueError(f"instance kind must be one of {KINDS}, not {options.kind!r}")
    if options.instances < 1:
        raise ValueError(f"the instance count must be at least 1, not {options.instances}")
    if options.max_queue_delay_us < 0:
        raise ValueError(f"the queue delay must be 0 or more microseconds, not {options.max_queue_delay_us}")
    limit = min(max_batches, default=2**31 - 1)
    if limit < 1:
        raise ValueError(f"a model's max batch size must be at least 1, not {limit}")
    bad = [b for b in options.preferred_batch_sizes if not 1 <= b <= limit]
    if bad:
        raise ValueError(
            f"preferred batch sizes {bad} are not between 1 and the models' max batch size {limit} "
            "(Triton refuses a preferred size above max_batch_size)"
        )


def _dims(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def io_dims(sizes: Sequence[tuple[int, int]], patch: int, dim: int, prototypes: int) -> dict[str, list[int]]:
    """Per-tensor dims without the batch axis: -1 for H/W/grid when several sizes are served."""
    if len(set(sizes)) == 1:
        h, w = sizes[0]
        gh, gw = h // patch, w // patch
    else:
        h = w = gh = gw = -1
    return {INPUT_NAME: [3, h, w], "patch": [gh, gw, dim], "cls": [dim], "assign": [gh, gw, prototypes]}


def config_pbtxt(
    name: str,
    platform: str,
    max_batch: int,
    dims: dict[str, list[int]],
    options: TritonOptions,
    *,
    default_model_filename: str | None = None,
    cc_model_filenames: dict[str, str] | None = None,
    parameters: dict[str, str] | None = None,
    profiles: int = 0,
) -> str:
    """The text-format `ModelConfig` for one model (the values checked by `check_options` and
    `plans_by_compute_capability`)."""
    lines = [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {max_batch}",
        "version_policy: { latest: { num_versions: 1 } }",
    ]
    if default_model_filename:
        lines.append(f'default_model_filename: "{default_model_filename}"')
    for cc, fn in sorted((cc_model_filenames or {}).items()):
        lines.append(f'cc_model_filenames: {{ key: "{cc}" value: "{fn}" }}')
    lines += [
        "input [",
        f'  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: {_dims(dims[INPUT_NAME])} }}',
        "]",
        "output [",
    ]
    outs = [
        f'  {{ name: "{k}" data_type: TYPE_FP32 dims: {_dims(dims[k])} }}' for k in ("patch", "cls", "assign")
    ]
    lines += [",\n".join(outs), "]", "dynamic_batching {"]
    if options.preferred_batch_sizes:
        lines.append(f"  preferred_batch_size: {_dims(options.preferred_batch_sizes)}")
    lines += [
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}",
        "}",
        "instance_group [",
    ]
    group = f"  {{ count: {options.instances} kind: {options.kind}"
    if profiles > 1:  # a plan with one optimisation profile per size: every instance gets them all
        group += " profile: [ " + ", ".join(f'"{i}"' for i in range(profiles)) + " ]"
    lines += [group + " }", "]"]
    for key, value in sorted((parameters or {}).items()):
        lines.append(f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def plans_by_compute_capability(engines: Sequence[EngineArtifact], kind: str) -> dict[str, str]:
    """{compute capability: plan file name} for the `tensorrt_plan` model, checked before anything
    is written. Triton picks one plan per GPU by its compute capability (`cc_model_filenames`), so
    two engines for one compute capability are refused (one would be dropped silently); all share
    the config's instance group and profile i of every plan serves the same input size, so their
    sizes must be the same, in the same order; and TensorRT plans run on GPUs only."""
    if not engines:
        return {}
    if kind != "KIND_GPU":
        raise ValueError(
            f"the bundle has TensorRT engines, which Triton runs on GPUs only (instance kind KIND_GPU), "
            f"not {kind}; export to Triton with --kind KIND_GPU, or from a copy of the bundle without engines"
        )
    by_cc: dict[str, str] = {}
    targets: dict[str, str] = {}
    for e in engines:
        if e.compute_capability in targets:
            raise ValueError(
                f"engines of targets {targets[e.compute_capability]!r} and {e.target!r} are both for "
                f"compute capability {e.compute_capability}; Triton loads one plan per compute capability "
                "(cc_model_filenames): remove one from the bundle's manifest before exporting"
            )
        targets[e.compute_capability] = e.target
        by_cc[e.compute_capability] = f"{e.target}.plan"
    sizes = {e.target: tuple(e.sizes) for e in engines}
    if len(set(sizes.values())) > 1:
        raise ValueError(
            "the engines' optimisation profiles differ ("
            + "; ".join(f"{t}: " + ", ".join(f"{h}x{w}" for h, w in s) for t, s in sizes.items())
            + "); the tensorrt_plan model lists the same profiles for every plan, and profile i must "
            "serve the same input size in each, so build every engine for the same input sizes"
        )
    return by_cc


def default_plan(engines: Sequence[EngineArtifact]) -> str | None:
    """The plan Triton loads on a GPU whose compute capability `cc_model_filenames` does not list:
    an Ampere-plus engine (it runs on every GPU of compute capability 8.0 or more), else none, so
    that such a GPU gets Triton's clear "unable to find" error and not an engine built for another."""
    portable = [e for e in engines if e.hardware_compatibility_level == "ampere_plus"]
    return f"{portable[0].target}.plan" if portable else None


def forced_files(record: OnnxArtifact | None, engines: Sequence[EngineArtifact]) -> list[str]:
    """The bundle files a repository would serve although their accuracy gate failed (`forced`)."""
    return [r.file for r in (record, *engines) if r is not None and r.forced]


def export_triton(
    bundle_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: TritonOptions = TritonOptions(),
    *,
    export_missing: bool = False,
    overwrite: bool = False,
    force: bool = False,
) -> list[str]:
    """Write the repository; returns the model names written. Needs an ONNX model in the bundle for
    all its declared sizes (`serving_onnx`, as the server; `cotap export onnx`), or
    `export_missing=True` to export one first. A model or engine whose accuracy gate failed (kept
    with `--force`) is refused unless `force`; then it is recorded as forced (`forced_files`)."""
    bundle = read_bundle(bundle_dir)
    engines = engine_artifacts(bundle)
    by_cc = plans_by_compute_capability(engines, options.kind)  # refused before anything is written
    name = options.name or bundle.config.name
    check_options(options, name)  # before anything is written, --export-missing's export included
    record = serving_onnx(bundle).get(options.precision)
    forced = forced_files(record, engines)  # refused before anything is written
    if forced and not force:
        one = len(forced) == 1
        raise ValueError(
            f"{', '.join(forced)} of bundle {bundle.path} failed {'its' if one else 'their'} accuracy gate "
            f"and {'was' if one else 'were'} kept only with --force; Triton would serve "
            f"{'it' if one else 'them'} without any warning. Re-export so that the gate passes, or pass "
            "--force to deploy anyway (recorded as forced in cotap-repository.json and config.pbtxt)"
        )
    if record is None:
        if not export_missing:
            others = [r for r in onnx_artifacts(bundle) if r.precision == options.precision]
            what = (
                f"no {options.precision} ONNX model"
                if not others
                else f"no {options.precision} ONNX model for all the sizes it declares "
                f"({sizes_text(bundle.config.input_sizes)}; exported: "
                + "; ".join(sizes_text(r.sizes) for r in others)
                + ")"
            )
            raise ValueError(
                f"bundle {bundle.path} has {what}; run `cotap export onnx --bundle "
                f"{bundle.path} --precision {options.precision}` first (or pass --export-missing)"
            )
        from cotap.export.onnx import export_onnx

        export_onnx(bundle.path, options.precision)
        bundle = read_bundle(bundle.path)
        record = serving_onnx(bundle)[options.precision]
        forced = forced_files(record, engines)
    repo = Path(out)
    check_options(options, name, [record.max_batch, *(e.max_batch for e in engines)])
    targets = [repo / name, repo / f"{name}_trt"]
    if any(t.exists() for t in targets) and not overwrite:
        raise FileExistsError(f"{targets[0]} exists in {repo}; pass --overwrite to replace it")
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".cotap-{name}-", dir=_staging_parent(repo)))
    try:
        written, files = _write_models(bundle, record, engines, by_cc, staging / "new", name, options)
        _swap_in(repo, targets, staging, written)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    index = repo / "cotap-repository.json"
    existing = json.loads(index.read_text()) if index.is_file() else {}
    existing[name] = {
        "bundle": str(bundle.path.resolve()),
        "bundle_sha256": bundle.sha256,
        "models": written,
        "files": files,
        "options": asdict(options),
        "forced": bool(forced),
        "forced_files": forced,
        "config_sha256": {m: sha256_file(repo / m / "config.pbtxt") for m in written},
    }
    write_json(index, existing, sort_keys=True)
    return written


def _staging_parent(repo: Path) -> Path:
    """Where the models are written before they move in: beside the repository when that is on the
    same filesystem and writable (Triton never sees them there), else inside it, as a hidden folder
    (a repository that is a volume's mount point: a rename across filesystems would fail)."""
    parent = repo.resolve().parent
    try:
        same = parent.stat().st_dev == repo.stat().st_dev and os.access(parent, os.W_OK)
    except OSError:
        same = False
    return parent if same else repo


def _swap_in(repo: Path, targets: Sequence[Path], staging: Path, written: Sequence[str]) -> None:
    """Move the staged models (`staging/new/<model>`) into `repo`, the old ones (`targets`) aside
    into `staging/old` first; if any move fails, the old models are put back."""
    old = staging / "old"
    old.mkdir()
    moved: list[Path] = []
    installed: list[Path] = []
    try:
        for t in targets:
            if t.exists():
                t.rename(old / t.name)
                moved.append(t)
        for model in written:
            (staging / "new" / model).rename(repo / model)
            installed.append(repo / model)
    except BaseException:
        for p in installed:
            shutil.rmtree(p, ignore_errors=True)
        for t in moved:
            (old / t.name).rename(t)
        raise


def _write_models(
    bundle: Bundle,
    record: OnnxArtifact,
    engines: Sequence[EngineArtifact],
    by_cc: dict[str, str],
    repo: Path,
    name: str,
    options: TritonOptions,
) -> tuple[list[str], dict[str, str]]:
    """Write the ONNX model (and the TensorRT model when there are engines) into `repo`; returns
    the model names and {repository path: sha256} of the model files."""
    cfg = bundle.config
    params = {"cotap_bundle_sha256": bundle.sha256, "cotap_precision": record.precision}
    written: list[str] = []
    files: dict[str, str] = {}

    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(bundle.read_verified(record.file))
    dims = io_dims(record.sizes, cfg.patch_size, cfg.embed_dim, cfg.num_prototypes)
    onnx_params = {**params, "cotap_forced": "true"} if record.forced else params
    (model_dir / "config.pbtxt").write_text(
        config_pbtxt(name, "onnxruntime_onnx", record.max_batch, dims, options, parameters=onnx_params)
    )
    written.append(name)
    files[f"{name}/1/model.onnx"] = record.sha256

    if engines:
        trt_name = f"{name}_trt"
        trt_dir = repo / trt_name
        (trt_dir / "1").mkdir(parents=True)
        for e in engines:
            fn = by_cc[e.compute_capability]
            (trt_dir / "1" / fn).write_bytes(bundle.read_verified(e.file))
            files[f"{trt_name}/1/{fn}"] = e.sha256
        # every engine has the same sizes (plans_by_compute_capability)
        trt_dims = io_dims(engines[0].sizes, cfg.patch_size, cfg.embed_dim, cfg.num_prototypes)
        max_batch = min(e.max_batch for e in engines)
        (trt_dir / "config.pbtxt").write_text(
            config_pbtxt(
                trt_name,
                "tensorrt_plan",
                max_batch,
                trt_dims,
                options,
                default_model_filename=default_plan(engines),
                cc_model_filenames=by_cc,
                parameters={
                    **params,
                    "cotap_precision": engines[0].precision,
                    **({"cotap_forced": "true"} if any(e.forced for e in engines) else {}),
                },
                profiles=len(engines[0].sizes),
            )
        )
        written.append(trt_name)
    return written, files
