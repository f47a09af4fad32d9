"""`cotap eval PROTOCOL`: score a model's frozen dense features (linear probe, Hummingbird
retrieval, overclustering, correspondence PCK, CLS kNN) and optionally draw a visual report."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from cotap.cli.common import CLIError, int_at_least, ints_at_least, number_in, parse_size, require
from cotap.core.fsio import write_json

PROTOCOL_HELP = (
    "linear | retrieval | overcluster | correspondence | knn | all, or a comma list such as linear,knn"
)


def _positive_size(text: str) -> tuple[int, int]:
    h, w = parse_size(text)
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: both sides must be at least 1")
    return h, w


_positive = int_at_least(1)
_seed = int_at_least(0)
_positive_float = number_in(0, math.inf, open_ends=True)
_open_fraction = number_in(0, 1, open_ends=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate frozen dense features (linear, retrieval, overcluster, correspondence, knn)",
        description="Evaluate a bundle or checkpoint on frozen features. Data specs: "
        "synthetic:N[:seed[:size]]; a folder with images/ + masks/; a VOC root (optionally ROOT@SPLIT_LIST); "
        "images=DIR,masks=DIR[,split=FILE][,classes=N]; a folder with one image subfolder per class (knn). "
        "See docs/evaluation.md.",
    )
    p.add_argument("protocol", help=PROTOCOL_HELP)
    p.add_argument(
        "--model", required=True, help="bundle directory or checkpoint (cotap, official CoTAP, DINO)"
    )
    p.add_argument("--arch", help="registry name, if it cannot be inferred from the checkpoint")
    p.add_argument("--which", choices=["student", "teacher"], help="for checkpoints holding both")
    p.add_argument(
        "--data", required=True, help="train data spec (the only data for overcluster/correspondence)"
    )
    p.add_argument("--val-data", help="val data spec; without it, --data is split (see --val-fraction)")
    p.add_argument(
        "--val-fraction",
        type=_open_fraction,
        default=0.2,
        help="val share when splitting --data (default 0.2)",
    )
    p.add_argument(
        "--size", type=_positive_size, help="model input size, 128 or HxW (default: the first image's size)"
    )
    p.add_argument(
        "--mask-size", type=_positive_size, help="resolution masks are scored at (default: the input size)"
    )
    p.add_argument("--num-classes", type=_positive, help="number of mask classes, if the data cannot tell")
    p.add_argument("--seed", type=_seed, default=0, help="seed of every protocol (default 0)")
    p.add_argument(
        "--seeds", type=ints_at_least(0), help="run each protocol once per seed, e.g. 0,1,2: mean and std"
    )
    p.add_argument("--config", help="YAML or JSON file of EvalConfig fields (flags given here override it)")
    p.add_argument("--batch-size", type=_positive, help="images per forward pass (default 32)")
    p.add_argument(
        "--samples", type=_positive, help="linear: training budget in image samples (default 4000)"
    )
    p.add_argument("--lr", type=_positive_float, help="linear: Adam learning rate (default 1e-2)")
    p.add_argument("--k", type=_positive, help="retrieval: neighbours (default 30)")
    p.add_argument(
        "--temperature", type=_positive_float, help="retrieval: softmax temperature (default 0.02)"
    )
    p.add_argument("--memory-size", type=_positive, help="retrieval: memory bank patches (default 102400)")
    p.add_argument(
        "--clusters",
        type=ints_at_least(1),
        help="overcluster: K values, e.g. 21,100 (default: the class count)",
    )
    p.add_argument(
        "--pairs", type=_positive, help="correspondence: number of val images to warp (default all)"
    )
    p.add_argument("--knn-k", type=ints_at_least(1), help="knn: k values (default 10,20)")
    p.add_argument("--report", help="write PNG figures and index.html here")
    p.add_argument("--json", help="write the full results (metrics, resolved config, timings) here")
    p.add_argument("--cache", help="cache extracted features in this folder and reuse them")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=_positive, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.error = _one_line_error  # type: ignore[method-assign]
    p.set_defaults(func=_eval)


def _one_line_error(message: str) -> NoReturn:
    """A bad flag is one line, as every other `cotap eval` error, rather than the whole usage."""
    print(f"cotap: error: {message} (see cotap eval --help)", file=sys.stderr)
    raise SystemExit(2)


def _load_config_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CLIError(f"cannot read --config {path}: {e.strerror or e}") from e
    if path.endswith((".yaml", ".yml")):
        yaml = require("yaml", "train")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise CLIError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CLIError(f"{path}: expected a mapping of EvalConfig fields")
    return data.get("eval", data)


def _given(value: Any, default: Any) -> Any:
    """A flag's value when it was given (0 included), else the config's."""
    return default if value is None else value


def _build_config(args: argparse.Namespace) -> Any:
    from cotap.training.eval import EvalConfig, config_from_dict

    path = args.config
    try:
        cfg = config_from_dict(_load_config_file(path)) if path else EvalConfig()
    except ValueError as e:
        raise CLIError(f"--config {path}: {e}") from e
    f = cfg.features
    f = replace(
        f,
        size=_given(args.size, f.size),
        mask_size=_given(args.mask_size, f.mask_size),
        batch_size=_given(args.batch_size, f.batch_size),
        progress=not args.quiet and f.progress,
    )
    lin = replace(
        cfg.linear, samples=_given(args.samples, cfg.linear.samples), lr=_given(args.lr, cfg.linear.lr)
    )
    ret = replace(
        cfg.retrieval,
        k=_given(args.k, cfg.retrieval.k),
        temperature=_given(args.temperature, cfg.retrieval.temperature),
        memory_size=_given(args.memory_size, cfg.retrieval.memory_size),
    )
    clusters = tuple(args.clusters) if args.clusters is not None else cfg.overcluster.clusters
    oc = replace(cfg.overcluster, clusters=clusters)
    corr = replace(cfg.correspondence, pairs=_given(args.pairs, cfg.correspondence.pairs))
    knn = replace(cfg.knn, ks=tuple(args.knn_k) if args.knn_k is not None else cfg.knn.ks)
    cfg = replace(cfg, features=f, linear=lin, retrieval=ret, overcluster=oc, correspondence=corr, knn=knn)
    return cfg.with_seed(args.seed)


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers per protocol (per-class detail stays in --json)."""
    out: dict[str, Any] = {}
    for name, res in results["results"].items():
        m = res["metrics"]
        if name == "overcluster":
            head = {k: v["miou"] for k, v in m["per_k"].items()}
        elif name == "correspondence":
            head = {k: v for k, v in m.items() if k.startswith(("pck", "mutual"))}
        elif name == "knn":
            head = {k: v for k, v in m.items() if k.startswith("top")}
        else:
            head = {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"]}
        if "std" in res:
            std = res["std"]
            if name == "overcluster":
                head |= {f"{k}_std": v["miou"] for k, v in std["per_k"].items()}
            else:
                head |= {f"{k}_std": std[k] for k in list(head) if k in std}
        out[name] = head
    return out


def _eval(args: argparse.Namespace) -> int:
    require("torch", "train")
    import torch

    from cotap.core.bundle import BundleError
    from cotap.training.checkpoints import CheckpointError, check_which, load_model
    from cotap.training.distributed import resolve_device
    from cotap.training.eval import EvalDataset, FrozenModel, evaluate, open_eval_data, split
    from cotap.training.eval.protocols import NEEDS_TRAIN, parse_protocols

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        protocols = parse_protocols(args.protocol)
        config = _build_config(args)
        device = resolve_device(args.device)  # before any data is read or model loaded
        data = open_eval_data(args.data, args.num_classes)
        train: EvalDataset | None
        if args.val_data:
            train, val = data, open_eval_data(args.val_data, args.num_classes)
        elif any(p in NEEDS_TRAIN for p in protocols):
            train, val = split(data, args.val_fraction, args.seed)
        else:
            train, val = None, data
        loaded = load_model(args.model, arch=args.arch, which=args.which)
        check_which(args.which, loaded, args.model)
        model = FrozenModel.from_loaded(loaded, device=device, which=args.which)
        results = evaluate(
            protocols,
            model,
            train,
            val,
            config,
            seeds=args.seeds,
            num_classes=args.num_classes,
            cache_dir=args.cache,
            report_dir=args.report,
        )
    except (CheckpointError, BundleError, ValueError, OSError) as e:  # OSError: unreadable data
        raise CLIError(str(e)) from e
    results["command"] = ["cotap", "eval", *sys.argv[2:]] if sys.argv[1:2] == ["eval"] else None
    if args.report:  # the report's copy gains the command line too
        write_json(Path(args.report) / "results.json", results, default=str)
    if args.json:
        write_json(Path(args.json), results, default=str)
    summary: dict[str, Any] = {"model": results["model"].get("name"), "metrics": _summary(results)}
    summary["time_s"] = round(results["timing_s"]["total"], 1)
    if args.report:
        summary["report"] = results.get("report")
    if args.json:
        summary["json"] = args.json
    print(json.dumps(summary, indent=2))
    return 0
