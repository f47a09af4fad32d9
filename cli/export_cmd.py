"""`cotap export ...`: checkpoints to bundles (and, with the export extra, ONNX/TensorRT/Triton)."""

from __future__ import annotations

import argparse
import json

from cotap.cli.common import CLIError, parse_size, parse_sizes, require


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
    b.add_argument("--arch", help="registry name such as cotap_vits16 (inferred from shapes if omitted)")
    b.add_argument("--out", required=True, help="output bundle directory")
    b.add_argument("--which", choices=["student", "teacher"], help="for files holding both")
    b.add_argument("--name", help="model name served by the server (default: the directory name)")
    b.add_argument("--size", type=parse_size, default=(224, 224), help="fixed input size, 224 or HxW")
    b.add_argument(
        "--resize",
        choices=["fixed", "shorter_side"],
        default="fixed",
        help="fixed: resize to --size; shorter_side: shorter side to --size, rounded to the patch size",
    )
    b.add_argument("--input-sizes", type=parse_sizes, help="sizes to warm and export, e.g. 224,336x448")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    b.set_defaults(func=_bundle)


def _bundle(args: argparse.Namespace) -> int:
    require("torch", "export")
    from cotap.core.bundle import BundleError
    from cotap.export.bundle import export_bundle
    from cotap.training.checkpoints import CheckpointError

    size = args.size[0] if args.resize == "shorter_side" else args.size
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
        raise CLIError(str(e)) from e
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
