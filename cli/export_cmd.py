"""`cotap export ...`: checkpoints to bundles (and, with the export extra, ONNX/TensorRT/Triton)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cotap.cli.common import CLIError, existing_dir, int_at_least, parse_size, parse_sizes, require

_TARGETS_HELP = "configs/targets.yaml of the cotap source tree, wherever the command runs"

# Python parameter names in library messages, as the command line spells them.
_CLI_NAMES = (
    ("pass arch= explicitly", "pass --arch explicitly"),
    ("pass overwrite=True", "pass --overwrite"),
    ("pass --overwrite (overwrite=True)", "pass --overwrite"),
    ("pass --force, force=True in Python,", "pass --force"),
)


def _cli_message(e: BaseException) -> str:
    msg = str(e)
    for python, flag in _CLI_NAMES:
        msg = msg.replace(python, flag)
    return msg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="turn checkpoints into bundles and deployable models")
    esub = p.add_subparsers(dest="export_command", required=True, metavar="TARGET")

    b = esub.add_parser(
        "bundle",
        help="checkpoint (cotap, official CoTAP release, DINO .pth) -> bundle directory",
        description="Load a checkpoint strictly and write a verifiable bundle (config.json, "
        "model.safetensors, manifest.json) that `cotap serve` loads.",
    )
    b.add_argument("--checkpoint", required=True, help="checkpoint file or bundle directory")
    b.add_argument(
        "--arch",
        help="registry name such as cotap_vits16; by default the one the checkpoint records, or inferred "
        "from its shapes. Refused if it does not describe the checkpoint's model",
    )
    b.add_argument("--out", required=True, help="output bundle directory")
    b.add_argument(
        "--which",
        choices=["student", "teacher"],
        help="for files holding both (default: the teacher for cotap and DINO checkpoints, the student "
        "for the official release); refused for files holding one model and for bundles",
    )
    b.add_argument("--name", help="model name served by the server (default: the directory name)")
    b.add_argument(
        "--size",
        type=parse_size,
        help="input size, 224 or HxW (default: the model's own img_size, the size it was trained at, "
        "e.g. 64 for cotap_micro8 and 224 for the ViT releases; from a bundle: its preprocessing and sizes)",
    )
    b.add_argument(
        "--resize",
        choices=["fixed", "shorter_side"],
        help="fixed (default): resize to --size; shorter_side: shorter side to --size, rounded to the "
        "patch size",
    )
    b.add_argument("--input-sizes", type=parse_sizes, help="sizes to warm and export, e.g. 224,336x448")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    b.set_defaults(func=_bundle)

    o = esub.add_parser(
        "onnx",
        help="bundle -> ONNX model (fp32/fp16/int8) added to the bundle after an accuracy gate",
        description="Export the bundle's model to ONNX (input `images`, outputs patch/cls/assign, dynamic "
        "batch, the declared input sizes), gate it against the torch fp32 model on fixture images and add "
        "it to the bundle with its report. A failing gate writes nothing unless --force.",
    )
    o.add_argument("--bundle", required=True, help="bundle directory (the ONNX model is added to it)")
    o.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    o.add_argument("--sizes", type=parse_sizes, help="input sizes, e.g. 224,336x448 (default: the bundle's)")
    o.add_argument(
        "--max-batch",
        type=int_at_least(1),
        default=32,
        help="largest batch the model is checked and served at",
    )
    o.add_argument("--opset", type=int_at_least(17), default=17, help="ONNX opset (17 or newer)")
    o.add_argument(
        "--calibration",
        type=existing_dir,
        help="int8 only: image folder for static QDQ calibration (default: dynamic)",
    )
    o.add_argument("--fixtures", type=existing_dir, help="image folder added to the generated gate fixtures")
    o.add_argument("--force", action="store_true", help="write the model even if its gate fails (recorded)")
    o.set_defaults(func=_onnx)

    m = esub.add_parser(
        "matching",
        help="ONNX graph for patch correspondence (best match, score, mutual flag, top-k)",
        description="Write a small ONNX graph taking two patch-feature maps and returning, per source "
        "patch, the best target patch (flat index), its cosine score and whether the match is mutual.",
    )
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", help="add onnx/matching.onnx to this bundle (dim from its config)")
    src.add_argument("--out", help="write the graph to this file instead")
    m.add_argument("--dim", type=int_at_least(1), help="feature width C (with --out; default: dynamic)")
    m.add_argument("--top-k", type=int_at_least(0), default=0, help="also return the k best matches (0: off)")
    m.add_argument("--opset", type=int, default=17)
    m.set_defaults(func=_matching)

    t = esub.add_parser(
        "tensorrt",
        help="build a TensorRT engine for a target GPU (needs the gpu extra and a GPU)",
        description="Build a TensorRT engine from the bundle's ONNX model for one target of a targets "
        "file: an optimisation profile per declared size, fp16/int8, workspace limit, timing cache, "
        "LayerNorm/Softmax kept in fp32. The engine and its record are added to the bundle.",
    )
    t.add_argument("--bundle", required=True)
    t.add_argument("--target", required=True, help="target name in the targets file")
    t.add_argument("--targets", help=f"targets file (YAML; default: {_TARGETS_HELP})")
    t.add_argument("--calibration", type=existing_dir, help="int8: image folder for the entropy calibrator")
    t.add_argument(
        "--timing-cache",
        help="timing cache file (default: $XDG_CACHE_HOME or ~/.cache, then cotap/tensorrt/timing-<gpu>-sm<cc>-trt<version>-cuda<version>.cache, "
        "one per GPU and library versions, kept across builds)",
    )
    t.add_argument("--force", action="store_true", help="keep the engine even if its accuracy gate fails")
    t.set_defaults(func=_tensorrt)

    bt = esub.add_parser(
        "batch",
        help="ONNX models, reports and engines or build scripts for every target of a targets file",
        description="For every target: the ONNX model for its precision and sizes with its accuracy "
        "report, the engine where this machine can build it, otherwise a build.sh with the exact trtexec "
        "command and `cotap export tensorrt` call to run on the device. One failing target does not stop "
        "the others; a summary table and an output-level manifest.json are written.",
    )
    bt.add_argument("--bundle", required=True)
    bt.add_argument("--targets", help=f"targets file (YAML; default: {_TARGETS_HELP})")
    bt.add_argument("--out", required=True, help="output directory, e.g. dist/")
    bt.add_argument("--only", help="comma-separated target names (default: all)")
    bt.add_argument("--calibration", type=existing_dir, help="image folder for int8 targets (static QDQ)")
    bt.add_argument("--force", action="store_true", help="keep models whose gate fails (recorded)")
    bt.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    bt.set_defaults(func=_batch)

    tr = esub.add_parser(
        "triton",
        help="Triton / KServe model repository from a bundle's ONNX models and engines",
        description="Write a Triton model repository: <name>/config.pbtxt (dynamic batching, max batch, "
        "dims, instance groups) and <name>/1/model.onnx, plus a <name>_trt TensorRT variant when the "
        "bundle has engines.",
    )
    tr.add_argument("--bundle", required=True)
    tr.add_argument("--out", required=True, help="model repository directory")
    tr.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    tr.add_argument("--name", help="model name in the repository (default: the bundle's name)")
    tr.add_argument("--kind", choices=["KIND_GPU", "KIND_CPU"], default="KIND_GPU")
    tr.add_argument("--instances", type=int_at_least(1), default=1, help="model instances per device")
    tr.add_argument("--max-queue-delay-us", type=int_at_least(0), default=2000)
    tr.add_argument("--export-missing", action="store_true", help="export the ONNX model first if absent")
    tr.add_argument("--overwrite", action="store_true")
    tr.add_argument(
        "--force",
        action="store_true",
        help="deploy an ONNX model or engine that failed its accuracy gate (kept with --force); "
        "refused otherwise, recorded as forced when given",
    )
    tr.set_defaults(func=_triton)


def _bundle(args: argparse.Namespace) -> int:
    require("torch", "export")
    from cotap.core.bundle import BundleError
    from cotap.export.bundle import export_bundle
    from cotap.training.checkpoints import CheckpointError

    size = args.size[0] if args.size is not None and args.resize == "shorter_side" else args.size
    try:
        bundle = export_bundle(
            args.checkpoint,
            args.out,
            arch=args.arch,
            which=args.which,
            name=args.name,
            size=size,
            resize=args.resize,
            input_sizes=args.input_sizes,
            overwrite=args.overwrite,
        )
    except (CheckpointError, BundleError, ValueError) as e:
        raise CLIError(_cli_message(e)) from e
    print(
        json.dumps(
            {
                "bundle": str(bundle.path),
                "name": bundle.config.name,
                "arch": bundle.config.arch,
                "sha256": bundle.sha256,
                "source": bundle.manifest["source"],
            },
            indent=2,
        )
    )
    return 0


def _onnx(args: argparse.Namespace) -> int:
    require("torch", "export")
    require("onnxruntime", "export")
    from cotap.core.artifacts import onnx_artifacts
    from cotap.core.bundle import BundleError, read_bundle
    from cotap.export.fixtures import FixtureError
    from cotap.export.gate import GateError
    from cotap.export.onnx import export_onnx
    from cotap.training.checkpoints import CheckpointError

    try:
        earlier = read_bundle(args.bundle, verify=False)  # export_onnx verifies the files
        before = {r.file: r for r in onnx_artifacts(earlier)}
        record = export_onnx(
            args.bundle,
            precision=args.precision,
            sizes=args.sizes,
            max_batch=args.max_batch,
            opset=args.opset,
            force=args.force,
            calibration=args.calibration,
            fixtures=args.fixtures,
            progress=True,
        )
    except (GateError, BundleError, CheckpointError, FixtureError, ValueError) as e:
        raise CLIError(_cli_message(e)) from e
    from cotap.export.gate import summary_of

    print(summary_of(record.gate))
    out: dict[str, Any] = {"file": record.file, "sha256": record.sha256, "forced": record.forced}
    old = before.get(record.file)
    if old is not None and old.sha256 != record.sha256:
        # one file per precision and size set: e.g. static int8 (--calibration) replaces dynamic int8
        conversion = old.extra.get("conversion") or {}
        out["replaced"] = {"sha256": old.sha256, "conversion": conversion}
        how = f" ({conversion['mode']} int8)" if "mode" in conversion else ""
        print(f"replaced the earlier {record.file}{how}", file=sys.stderr)
    print(json.dumps(out, indent=2))
    return 0


def _matching(args: argparse.Namespace) -> int:
    require("onnx", "export")
    from cotap.core.bundle import BundleError
    from cotap.export.matching import add_matching_to_bundle, export_matching_onnx

    try:
        if args.bundle:
            info = add_matching_to_bundle(args.bundle, top_k=args.top_k, opset=args.opset)
        else:
            info = export_matching_onnx(args.out, args.dim, top_k=args.top_k, opset=args.opset)
    except (BundleError, ValueError) as e:
        raise CLIError(_cli_message(e)) from e
    print(json.dumps(info, indent=2))
    return 0


def _tensorrt(args: argparse.Namespace) -> int:
    require("torch", "export")
    from cotap.core.bundle import BundleError
    from cotap.core.engine_compat import EngineCompatibilityError
    from cotap.export.targets import TargetError, default_targets_file, load_targets
    from cotap.export.tensorrt import TensorRTUnavailable, build_engine

    try:
        targets_file = default_targets_file() if args.targets is None else args.targets
        targets = load_targets(targets_file)
        if args.target not in targets:
            raise CLIError(f"no target {args.target!r} in {targets_file}; known: {', '.join(targets)}")
        record = build_engine(
            args.bundle,
            targets[args.target],
            calibration=args.calibration,
            timing_cache=args.timing_cache,
            force=args.force,
            progress=True,
        )
    except (TensorRTUnavailable, BundleError, TargetError, EngineCompatibilityError, ValueError) as e:
        raise CLIError(_cli_message(e)) from e
    print(json.dumps(record.to_dict(), indent=2))
    return 0


def _batch(args: argparse.Namespace) -> int:
    require("torch", "export")
    require("onnxruntime", "export")
    from cotap.core.bundle import BundleError
    from cotap.export.batch import export_batch
    from cotap.export.targets import TargetError

    only = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else None
    try:
        result = export_batch(
            args.bundle,
            args.targets,
            args.out,
            only=only,
            calibration=args.calibration,
            force=args.force,
            overwrite=args.overwrite,
            progress=True,
        )
    except (BundleError, TargetError, ValueError, FileExistsError) as e:
        raise CLIError(_cli_message(e)) from e
    print(result.table())
    print(f"manifest: {result.manifest_path}")
    return 0 if result.ok else 1


def _triton(args: argparse.Namespace) -> int:
    from cotap.core.bundle import BundleError
    from cotap.export.triton import TritonOptions, export_triton

    options = TritonOptions(
        precision=args.precision,
        name=args.name,
        kind=args.kind,
        instances=args.instances,
        max_queue_delay_us=args.max_queue_delay_us,
    )
    try:
        written = export_triton(
            args.bundle,
            args.out,
            options,
            export_missing=args.export_missing,
            overwrite=args.overwrite,
            force=args.force,
        )
    except (BundleError, ValueError, FileExistsError) as e:
        raise CLIError(_cli_message(e)) from e
    except Exception as e:  # a failing gate of the model --export-missing exported
        from cotap.export.gate import GateError

        if isinstance(e, GateError):
            raise CLIError(_cli_message(e)) from e
        raise
    index = json.loads((Path(args.out) / "cotap-repository.json").read_text())
    forced = index.get(written[0], {}).get("forced_files") or []
    for file in forced:
        print(
            f"warning: {file} failed its accuracy gate (kept with --force) and is deployed to "
            f"{args.out} as forced (--force)",
            file=sys.stderr,
        )
    print(json.dumps({"repository": str(args.out), "models": written, "forced": forced}, indent=2))
    return 0
