"""`cotap train`: train a CoTAP backbone from a YAML config, and `cotap train knn`: the
nearest-neighbour pair file the trainer reads.

    cotap train --config configs/synthetic-tiny.yaml --out runs/tiny [key=value ...]
    cotap train --config configs/synthetic-tiny.yaml --out runs/tiny --resume
    torchrun --nproc_per_node 4 -m cotap.cli.main train --config configs/cotap-vits16-coco.yaml --out runs/coco
    cotap train knn --data DIR --checkpoint INIT --k 7 --out nns.npz
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cotap.cli.common import CLIError, int_at_least, require


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a CoTAP backbone (or `train knn`: build the nearest-neighbour pair file)",
        description="Train: cotap train --config FILE --out DIR [--resume] [key=value ...] (overrides after the "
        "options, e.g. optim.lr=1e-4 data.batch_size=16). Under torchrun every rank runs the same command. "
        "Neighbours: cotap train knn --data DIR|synthetic:N --checkpoint INIT --k 7 --out FILE.",
    )
    p.add_argument(
        "words", nargs="*", metavar="key=value", help="config overrides (or `knn` for the knn command)"
    )
    p.add_argument(
        "--config",
        help="YAML config (see configs/); defaults fill what it omits. With --resume and no --config: the run's config.yaml",
    )
    p.add_argument("--out", help="run directory (train) or neighbour file (knn)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--stop-at",
        type=int_at_least(1),
        metavar="STEP",
        help="stop after this step (checkpointed; resume later)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    knn = p.add_argument_group("knn")
    knn.add_argument("--data", help="knn: image folder or synthetic:N[:seed[:size]]")
    knn.add_argument("--checkpoint", help="knn: the model that embeds the CLS tokens (the initial model)")
    knn.add_argument(
        "--k", type=int_at_least(1), help="knn: neighbours kept per image, self first (default 7)"
    )
    knn.add_argument(
        "--size",
        type=int_at_least(1),
        help="knn: each image's central square is resized to SIZExSIZE (default: the model's input size)",
    )
    knn.add_argument(
        "--no-crop", action="store_true", help="knn: squash whole images to SIZExSIZE instead of cropping"
    )
    knn.add_argument("--batch-size", type=int_at_least(1), help="knn: images per forward (default 32)")
    p.set_defaults(func=_train)


KNN_ONLY = ("data", "checkpoint", "k", "size", "no_crop", "batch_size")
TRAIN_ONLY = ("config", "resume", "stop_at", "print_config")


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The flags among `names` given on the command line (as --flag-names)."""
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False)]


def _train(args: argparse.Namespace) -> int:
    if args.words and args.words[0] == "knn":
        return _knn(args)
    stray = _given(args, KNN_ONLY)
    if stray:  # they would be ignored: training reads data, batch size and k from its config
        raise CLIError(
            f"{', '.join(stray)} belong to `cotap train knn`; a training run takes them from its config "
            "(data.train, data.batch_size, data.k, model.init), e.g. data.batch_size=16"
        )
    require("torch", "train")
    require("yaml", "train")
    from cotap.training.config import ConfigError, dump_config, load_config

    bad = [w for w in args.words if "=" not in w]
    if bad:
        raise CLIError(f"overrides must be key=value, got {' '.join(bad)}")
    config_path = args.config
    if config_path is None and args.resume and args.out:
        saved = Path(args.out) / "config.yaml"
        config_path = str(saved) if saved.is_file() else None  # resume with the run's own config
    try:
        config = load_config(config_path, args.words)
    except (ConfigError, TypeError, ValueError) as e:
        raise CLIError(str(e)) from e
    if args.print_config:
        sys.stdout.write(dump_config(config))
        return 0
    if not args.out:
        raise CLIError("--out DIR is required (the run directory)")

    from cotap.training.checkpoints import CheckpointError
    from cotap.training.trainer import TrainError, train

    try:
        result = train(config, args.out, resume=args.resume, stop_at=args.stop_at)
    except (TrainError, CheckpointError, ConfigError) as e:
        raise CLIError(str(e)) from e
    summary = {
        "run_dir": str(result.run_dir),
        "step": result.step,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "bundle": str(result.bundle) if result.bundle else None,
        "plot": str(result.plot) if result.plot else None,
        "steps_per_s": round(result.steps_per_s, 4),
        "last": {k: round(v, 5) for k, v in result.last_metrics.items() if k.startswith("loss")},
    }
    if result.is_main:  # under torchrun every rank returns here; one summary is enough
        print(json.dumps(summary, indent=2))
    return 0


def _knn(args: argparse.Namespace) -> int:
    stray = _given(args, TRAIN_ONLY)
    if stray:
        raise CLIError(f"{', '.join(stray)} belong to `cotap train`, not `cotap train knn`")
    if len(args.words) > 1:
        raise CLIError(f"unexpected arguments after knn: {' '.join(args.words[1:])}")
    missing = [f"--{n}" for n in ("data", "checkpoint", "out") if not getattr(args, n)]
    if missing:
        raise CLIError(f"cotap train knn needs {', '.join(missing)}")
    require("torch", "train")
    from cotap.training.checkpoints import CheckpointError
    from cotap.training.data.neighbours import build_knn_file, read_knn_meta

    try:
        path = build_knn_file(
            args.data,
            args.checkpoint,
            k=7 if args.k is None else args.k,
            out=args.out,
            size=args.size,
            batch_size=32 if args.batch_size is None else args.batch_size,
            center_crop=not args.no_crop,
        )
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    meta = read_knn_meta(path) or {}
    print(
        json.dumps(
            {
                "knn": str(path),
                "k": meta.get("k"),
                "embedding": meta.get("embedding"),
                "crop": meta.get("crop"),
            }
        )
    )
    return 0
