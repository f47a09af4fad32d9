"""The evaluation API: `evaluate(protocol, model, train_data, val_data, config)` runs one protocol
(or several, sharing the frozen features) and returns a JSON-ready results dict.

Protocols and the data they need:

| protocol       | train data   | val data     | score                                  |
|----------------|--------------|--------------|----------------------------------------|
| linear         | masks        | masks        | mIoU of a 1x1 linear head              |
| retrieval      | masks        | masks        | mIoU of Hummingbird label transfer     |
| overcluster    | -            | masks        | mIoU after Hungarian / many-to-one     |
| correspondence | -            | any images   | PCK of NN matches under a known warp   |
| knn            | image labels | image labels | top-1 of CLS kNN                       |
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from cotap.core.version import environment
from cotap.training.checkpoints import LoadedModel
from cotap.training.eval.checks import check_int
from cotap.training.eval.correspondence import CorrespondenceConfig, run_correspondence
from cotap.training.eval.datasets import EvalDataset
from cotap.training.eval.features import (
    FeatureConfig,
    Features,
    FrozenModel,
    as_frozen,
    extract_features,
    input_size_for,
)
from cotap.training.eval.knn import KnnConfig, run_knn
from cotap.training.eval.linear import LinearConfig, run_linear
from cotap.training.eval.overcluster import OverclusterConfig, run_overcluster
from cotap.training.eval.report import Report, feature_figure, pair_figure, prediction_figure
from cotap.training.eval.retrieval import RetrievalConfig, run_retrieval

PROTOCOLS = ("linear", "retrieval", "overcluster", "correspondence", "knn")
NEEDS_TRAIN = {"linear", "retrieval", "knn"}


@dataclass(frozen=True)
class EvalConfig:
    """Every protocol's settings; defaults are the documented protocol (docs/evaluation.md)."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    overcluster: OverclusterConfig = field(default_factory=OverclusterConfig)
    correspondence: CorrespondenceConfig = field(default_factory=CorrespondenceConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    report_images: int = 6

    def __post_init__(self) -> None:
        check_int("report_images", self.report_images, 0)

    def with_seed(self, seed: int) -> EvalConfig:
        """The same config with every protocol's seed set to `seed`."""
        return replace(
            self,
            linear=replace(self.linear, seed=seed),
            retrieval=replace(self.retrieval, seed=seed),
            overcluster=replace(self.overcluster, seed=seed),
            correspondence=replace(self.correspondence, seed=seed),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_protocols(protocol: str | Sequence[str]) -> list[str]:
    """'linear' | 'linear,knn' | 'all' | a list -> validated protocol names in the order given."""
    names = protocol.split(",") if isinstance(protocol, str) else list(protocol)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(PROTOCOLS)
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown or not names:
        raise ValueError(
            f"unknown protocol {unknown or protocol!r}; choose from {', '.join(PROTOCOLS)} or all"
        )
    return names


class Evaluator:
    """One model and one train/val pair; features are extracted at most once per split and shared
    by every protocol run through it."""

    def __init__(
        self,
        model: FrozenModel | LoadedModel | nn.Module,
        train_data: EvalDataset | None,
        val_data: EvalDataset,
        config: EvalConfig | None = None,
        *,
        num_classes: int | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        report_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        fingerprint = val_data.fingerprint
        if train_data is not None and fingerprint is not None and train_data.fingerprint == fingerprint:
            raise ValueError(
                f"the training data and the validation data are the same images ({val_data.name}): "
                "the probes would be scored on what they were fitted to; give other validation data, "
                "or none to split the data (--val-fraction)"
            )
        self.model = as_frozen(model)
        self.train_data = train_data
        self.val_data = val_data
        self.config = config or EvalConfig()
        self.cache_dir = cache_dir
        self.report = Report(report_dir) if report_dir is not None else None
        self._num_classes = num_classes
        self._features: dict[str, Features] = {}
        self._sizes_fixed = False
        self.timing: dict[str, float] = {}

    def _fix_sizes(self) -> None:
        """Resolve the input size once for every split and protocol (`FeatureConfig.size`, else the
        first train image's size, the first val image's without train data, rounded down to the patch
        size) and the mask size (default: the input size), and write both into `self.config` so
        that the results record the sizes actually used."""
        if self._sizes_fixed:
            return
        f = self.config.features
        first = self.train_data if self.train_data is not None and len(self.train_data) else self.val_data
        size = input_size_for(first, self.model.patch_size, f.size)
        mask_size = (int(f.mask_size[0]), int(f.mask_size[1])) if f.mask_size is not None else size
        self.config = replace(self.config, features=replace(f, size=size, mask_size=mask_size))
        self._sizes_fixed = True

    def preprocess(self) -> dict[str, Any]:
        """How images became model inputs and masks became targets (recorded in the results)."""
        self._fix_sizes()
        f = self.config.features
        assert f.size is not None and f.mask_size is not None
        p = self.model.patch_size
        return {
            "input_size": list(f.size),
            "grid": [f.size[0] // p, f.size[1] // p],
            "mask_size": list(f.mask_size),
            "resize": "fixed (every image to input_size, aspect ratio not kept)",
            "interpolation": "bicubic (Pillow-equivalent, as the server)",
            "mask_interpolation": "nearest",
            "normalize": "(x / 255 - mean) / std",
            "mean": list(self.model.mean),
            "std": list(self.model.std),
        }

    # -- shared pieces ---------------------------------------------------------------------------
    def features(self, split: str) -> Features:
        self._fix_sizes()
        if split not in self._features:
            data = self.train_data if split == "train" else self.val_data
            if data is None:
                raise ValueError("this protocol needs train data (--data) as well as val data")
            t0 = time.perf_counter()
            self._features[split] = extract_features(self.model, data, self.config.features, self.cache_dir)
            self.timing[f"features_{split}"] = time.perf_counter() - t0
        return self._features[split]

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            for d in (self.train_data, self.val_data):
                if d is not None and d.num_classes is not None:
                    self._num_classes = d.num_classes
                    break
            else:
                raise ValueError("cannot tell the number of classes of this data; pass num_classes")
        return self._num_classes

    @property
    def class_names(self) -> list[str] | None:
        for d in (self.train_data, self.val_data):
            if d is not None and d.class_names is not None and len(d.class_names) == self.num_classes:
                return d.class_names
        return None

    def _require(self, protocol: str, masks: bool = False, labels: bool = False) -> None:
        splits = [("val", self.val_data)]
        if protocol in NEEDS_TRAIN:
            if self.train_data is None:
                raise ValueError(f"{protocol} needs train data as well as val data")
            splits.append(("train", self.train_data))
        for name, d in splits:
            if masks and not d.has_masks:
                raise ValueError(f"{protocol} needs masks, but the {name} data {d.name!r} has none")
            if labels and not d.has_labels:
                raise ValueError(f"{protocol} needs image labels, but the {name} data {d.name!r} has none")

    # -- protocols ----------------------------------------------------------------------------------
    def run(self, protocol: str, seed: int | None = None, figures: bool = True) -> dict[str, Any]:
        """Run one protocol (with every seed set to `seed` if given); returns {"metrics", "config",
        "timing_s"} and, with a report and `figures`, adds its figures."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
        self._fix_sizes()
        cfg = self.config if seed is None else self.config.with_seed(seed)
        report = self.report if figures else None
        keep = cfg.report_images if report is not None else 0
        progress = cfg.features.progress
        before = dict(self.timing)
        t0 = time.perf_counter()
        sub_cfg: Any
        if protocol in ("linear", "retrieval"):
            self._require(protocol, masks=True)
            train, val = self.features("train"), self.features("val")
            t0 = time.perf_counter()
            if protocol == "linear":
                sub_cfg = cfg.linear
                metrics, preds = run_linear(
                    train, val, self.num_classes, cfg.linear, self.class_names, keep, progress
                )
            else:
                sub_cfg = cfg.retrieval
                metrics, preds = run_retrieval(
                    train, val, self.num_classes, cfg.retrieval, self.class_names, keep, progress
                )
            if report is not None and len(preds):
                report.add(
                    protocol, f"predictions_{protocol}", prediction_figure(val, preds, self.num_classes, keep),
                    f"{protocol}: image, ground truth, prediction (mIoU {metrics['miou']:.3f})",
                )  # fmt: skip
        elif protocol == "overcluster":
            self._require(protocol, masks=True)
            val = self.features("val")
            t0 = time.perf_counter()
            sub_cfg = cfg.overcluster
            metrics, kept = run_overcluster(val, self.num_classes, cfg.overcluster, self.class_names, keep)
            if report is not None:
                for k, preds in kept.items():
                    report.add(
                        protocol, f"predictions_overcluster_K{k}", prediction_figure(val, preds, self.num_classes, keep),
                        f"k-means K={k} ({metrics['per_k'][f'K{k}']['matching']}): image, ground truth, "
                        f"clusters mapped to classes (mIoU {metrics['per_k'][f'K{k}']['miou']:.3f})",
                    )  # fmt: skip
        elif protocol == "correspondence":
            sub_cfg = cfg.correspondence
            metrics, pairs = run_correspondence(
                self.model, self.val_data, cfg.correspondence, cfg.features.size, keep, progress
            )
            if report is not None:
                side = cfg.correspondence.mutual_alpha * max(metrics["grid"])
                for i, pair in enumerate(pairs[:keep]):
                    report.add(
                        protocol, f"correspondence_{i}", pair_figure(pair, self.model.patch_size, side, seed=i),
                        f"pair {i}: matches of a sample of patches; green within "
                        f"{cfg.correspondence.mutual_alpha:g}·max(h,w) patches of the truth, red beyond",
                    )  # fmt: skip
        else:  # knn
            self._require(protocol, labels=True)
            train, val = self.features("train"), self.features("val")
            t0 = time.perf_counter()
            sub_cfg = cfg.knn
            assert train.labels is not None and val.labels is not None
            if len(torch.unique(train.labels)) < 2:  # every val image would be right by default
                name = self.train_data.name if self.train_data is not None else "train"
                raise ValueError(f"knn needs train images of at least 2 classes; all of {name!r} are of one")
            k = max(self.num_classes, int(train.labels.max()) + 1, int(val.labels.max()) + 1)
            metrics = run_knn(train.cls, train.labels, val.cls, val.labels, k, cfg.knn)
        timing = {k: v for k, v in self.timing.items() if before.get(k) != v}
        timing["protocol"] = time.perf_counter() - t0
        return {
            "metrics": metrics,
            "config": {protocol: asdict(sub_cfg), "features": cfg.features.to_dict()},
            "timing_s": timing,
        }

    def run_seeds(self, protocol: str, seeds: Sequence[int]) -> dict[str, Any]:
        """Run a protocol once per seed on the same features: "metrics" holds the mean and "std"
        the sample standard deviation (ddof 1) of every numeric metric, "per_seed" each run."""
        if len(seeds) == 1 or protocol == "knn":  # kNN has no randomness
            return self.run(protocol, seeds[0])
        runs = [self.run(protocol, s, figures=i == 0) for i, s in enumerate(seeds)]
        mean, std = mean_std([r["metrics"] for r in runs])
        return {
            "metrics": mean,
            "std": std,
            "seeds": list(seeds),
            "per_seed": [r["metrics"] for r in runs],
            "config": runs[0]["config"],
            "timing_s": {
                k: sum(r["timing_s"].get(k, 0.0) for r in runs)
                for k in {k for r in runs for k in r["timing_s"]}
            },
        }

    def run_all(self, protocols: str | Sequence[str], seeds: Sequence[int] | None = None) -> dict[str, Any]:
        """Run the protocols in order (each over `seeds` when given) and return the full results
        dict; with a report directory, also write the figures and the page."""
        names = parse_protocols(protocols)
        t0 = time.perf_counter()
        torch_threads = torch.get_num_threads()
        results = {name: self.run(name) if not seeds else self.run_seeds(name, seeds) for name in names}
        out: dict[str, Any] = {
            "protocol": ",".join(names),
            "results": results,
            "model": {
                "name": self.model.name,
                "patch_size": self.model.patch_size,
                **self.model.info,
                "weights_sha256": self.model.fingerprint,
            },
            "preprocess": self.preprocess(),
            "data": {
                "train": self.train_data.describe() if self.train_data is not None else None,
                "val": self.val_data.describe(),
                "num_classes": self._num_classes,
                "class_names": self.class_names if self._num_classes is not None else None,
            },
            "config": self.config.to_dict(),
            "seeds": list(seeds) if seeds else None,
            "timing_s": {"total": time.perf_counter() - t0, **self.timing},
            "environment": {
                **environment("torch", "numpy", "pillow"),
                "torch_build": torch.__version__,
                "threads": torch_threads,
                "device": str(self.model.device),
            },
        }
        if len(names) == 1:
            out["metrics"] = results[names[0]]["metrics"]
        if self.report is not None:
            val = self._features.get("val")
            if val is None:  # correspondence alone: a few val images for the feature pictures
                n = min(self.config.report_images, len(self.val_data))
                fc = replace(self.config.features, keep_images=n)
                val = extract_features(self.model, self.val_data.subset(range(n)), fc)
            m = (
                int(getattr(getattr(self.model.model, "config", None), "num_prototypes", 0))
                or int(val.prototype.max()) + 1
            )
            self.report.add(
                "features", "features", feature_figure(val, m, self.config.report_images),
                "PCA of the patch features (3 components as RGB, fitted on these images) and the prototype "
                "map (argmax of assign, fixed palette)",
            )  # fmt: skip
            out["report"] = str(self.report.dir / "index.html")
            self.report.write(out, title=f"cotap eval {out['protocol']}: {self.model.name}")
        return out


def mean_std(runs: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mean and sample std (ddof 1) of the numeric leaves of same-shaped metric dicts; other
    leaves (names, lists) are taken from the first run."""
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    for key, first in runs[0].items():
        values = [r.get(key) for r in runs]
        if isinstance(first, dict):
            m, s = mean_std([v if isinstance(v, dict) else {} for v in values])
            mean[key], std[key] = m, s
        elif (
            isinstance(first, (int, float))
            and not isinstance(first, bool)
            and all(isinstance(v, (int, float)) for v in values)
        ):
            t = torch.tensor([float(v) for v in values], dtype=torch.float64)  # type: ignore[arg-type]
            mean[key] = float(t.mean())
            std[key] = float(t.std()) if len(values) > 1 else 0.0
        else:
            mean[key] = first
    return mean, std


def evaluate(
    protocol: str | Sequence[str],
    model: FrozenModel | LoadedModel | nn.Module,
    train_data: EvalDataset | None,
    val_data: EvalDataset,
    config: EvalConfig | None = None,
    *,
    seeds: Sequence[int] | None = None,
    num_classes: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    report_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Evaluate frozen features with one protocol ('linear'), several ('linear,knn') or 'all'.

    `seeds`: run each protocol once per seed on the same features and report mean and std (the
    config's own seeds are used when None). Returns {"protocol", "results": {name: {"metrics",
    "config", "timing_s"[, "std", "per_seed"]}}, "metrics" (when one protocol), "model", "data",
    "config", "seeds", "timing_s", "environment"[, "report"]}.
    """
    ev = Evaluator(
        model,
        train_data,
        val_data,
        config,
        num_classes=num_classes,
        cache_dir=cache_dir,
        report_dir=report_dir,
    )
    return ev.run_all(protocol, seeds)


def config_from_dict(d: dict[str, Any]) -> EvalConfig:
    """Rebuild an `EvalConfig` from a (possibly partial) nested dict such as `EvalConfig.to_dict()`
    output or a YAML file; lists become tuples, unknown keys are an error."""
    return _build(EvalConfig, d, "config")


def _build(cls: Any, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, v in values.items():
        t = hints[name]
        if dataclasses.is_dataclass(t) and isinstance(t, type):
            kwargs[name] = _build(t, v, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(v, t, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # the range checks of the configs' __post_init__
        raise ValueError(f"{where}: {e}") from e


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` (from YAML/JSON) checked against the field's type `hint`: ints stay ints (a bool is
    not one), ints and numeric strings become floats (YAML reads `1e-2` as a string), lists become
    tuples, a single int is a square size; anything else is an error naming the field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], where)
        return value
    if origin is tuple:
        if args == (int, int) and isinstance(value, int) and not isinstance(value, bool):
            value = [value, value]  # size: 448 means 448x448
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in _TYPE_WORDS:
        if isinstance(value, hint):
            return value
    else:
        return value
    raise ValueError(f"{where}: expected {_TYPE_WORDS[hint]}, got {value!r}")
