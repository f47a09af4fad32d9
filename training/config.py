"""The typed configuration of a training run: dataclasses with working defaults, read from YAML,
overridden with `key=value` dotlist arguments, validated with errors that name the key, and written
back resolved (every run directory and checkpoint holds the exact config that produced it).

    cfg = load_config("configs/synthetic-tiny.yaml", ["optim.lr=1e-3", "data.batch_size=4"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that cannot be used, named by its dotted path."""


# -- sections -----------------------------------------------------------------------------------------
@dataclass
class ModelSection:
    arch: str = "cotap_micro8"
    init: str = "scratch"  # "scratch" or any checkpoint `load_model` accepts (bundle, .pth, .ckpt, ...)
    init_which: str | None = None  # "student" | "teacher" for files that hold both
    overrides: dict[str, Any] = field(default_factory=dict)  # ViTConfig fields, for `init: scratch`


@dataclass
class DataSection:
    train: str = "synthetic:256:0:96"  # an image folder or synthetic:N[:seed[:size]]
    knn: str | None = None  # neighbour file from `cotap train knn`; none: each image is its own partner
    k: int = 7  # pair each image with a random one of its k nearest neighbours
    batch_size: int = 8  # anchors per rank (each brings a partner)
    num_workers: int = 0
    views: dict[str, Any] = field(default_factory=dict)  # ViewConfig fields


@dataclass
class HeadsSection:
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    patch_prototypes: int = 512
    cls_prototypes: int = 4096


@dataclass
class LossWeights:
    patch_intra: float = 1.0  # CoTAP cross-image patch loss (§3.2)
    patch_inner: float = 1.0  # Leopart ROI-aligned within-image loss (§3.3)
    cls_inner: float = 1.0  # multi-crop CLS Sinkhorn loss (§3.4)
    cls_intra: float = 1.0  # NN-pair CLS Sinkhorn loss (§3.4)
    entropy: float = 1.0  # prototype entropy loss (§3.5)
    cls_nce: float = 0.0  # not CoTAP: CLS InfoNCE, for from-scratch initialisations (docs/results.md)


@dataclass
class LossSection:
    weights: LossWeights = field(default_factory=LossWeights)
    patch_intra_mode: str = "cotap"  # "cotap" | "l1" (ablation: L1 distillation of the similarity lists)
    tau: float = 0.5
    theta: float = -0.2
    alpha: float = 0.1
    pool_sizes: tuple[int, ...] = (7, 14)  # at a 14-patch grid; scaled to smaller grids
    topk: int = 5
    num_negatives: int = 5
    roi_bins: int = 6  # at a 14-patch grid; scaled to smaller grids
    roi_sampling_ratio: int = 2
    patch_temperature: float = 0.1  # student, within-image loss
    sinkhorn_iterations: int = 3
    sinkhorn_temperature_patch: float = 0.05
    sinkhorn_temperature_cls: float = 0.07
    cls_temperature_inner: float = 0.1
    cls_temperature_intra: float = 0.2
    patch_queue: int = 0  # total over ranks (release: 262144); 0 = Sinkhorn over the batch only
    patch_queue_add: int = 2048  # foreground patches added per step and rank
    cls_queue: int = 0  # total over ranks (release: 32768)
    cls_queue_add: int = 100
    foreground_mass: float = 0.6
    foreground_blur_size: int = 7
    foreground_blur_sigma: float = 0.6
    entropy_temperature: float = 0.1
    cls_nce_temperature: float = 0.2


@dataclass
class BankSection:
    enabled: bool = True  # false: no memory bank, no k-means, prototypes stay as they are
    size: int = 1024
    add_per_step: int = 32
    kmeans_iterations: int = 3000


@dataclass
class OptimSection:
    lr: float = 3e-5  # backbone, prototypes and filter norms
    head_lr_mult: float = 10.0
    min_lr: float = 3e-6  # cosine floor, all groups
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0
    weight_decay: float = 0.024
    weight_decay_end: float = 0.24
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 0.0  # max global grad norm; 0 = off
    ema_start: float = 0.9997
    ema_end: float = 0.9999


@dataclass
class BundleSection:
    enabled: bool = True
    which: str = "teacher"  # "teacher" | "student"
    name: str | None = None  # default: the run name
    size: int | None = None  # fixed input side; default: the global crop size


@dataclass
class TrainConfig:
    name: str = "cotap-run"
    seed: int = 0
    max_steps: int = 1000
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # step checkpoints kept besides last.pt (0 = keep all)
    progress: bool = True
    plot: bool = True
    find_unused_parameters: str = "auto"  # auto | true | false (DDP)
    num_threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    heads: HeadsSection = field(default_factory=HeadsSection)
    loss: LossSection = field(default_factory=LossSection)
    bank: BankSection = field(default_factory=BankSection)
    optim: OptimSection = field(default_factory=OptimSection)
    bundle: BundleSection = field(default_factory=BundleSection)

    def validate(self) -> TrainConfig:
        """Cross-field checks; raises ConfigError naming the key."""
        checks: list[tuple[bool, str, str]] = [
            (self.max_steps >= 1, "max_steps", "must be at least 1"),
            (self.amp in ("auto", "off", "bf16", "fp16"), "amp", "must be auto, off, bf16 or fp16"),
            (self.log_every >= 1, "log_every", "must be at least 1"),
            (self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1"),
            (self.keep_checkpoints >= 0, "keep_checkpoints", "must be ≥ 0"),
            (self.num_threads >= 0, "num_threads", "must be ≥ 0 (0 = torch's default)"),
            (
                self.find_unused_parameters in ("auto", "true", "false"),
                "find_unused_parameters",
                "auto|true|false",
            ),
            (self.model.init_which in (None, "student", "teacher"), "model.init_which", "student or teacher"),
            (self.data.batch_size >= 1, "data.batch_size", "must be at least 1"),
            (self.data.k >= 1, "data.k", "must be at least 1"),
            (self.data.num_workers >= 0, "data.num_workers", "must be ≥ 0"),
            (self.loss.patch_intra_mode in ("cotap", "l1"), "loss.patch_intra_mode", "must be cotap or l1"),
            (self.loss.topk >= 1, "loss.topk", "must be at least 1"),
            (self.loss.num_negatives >= 0, "loss.num_negatives", "must be ≥ 0"),
            (
                len(self.loss.pool_sizes) >= 1 and min(self.loss.pool_sizes) >= 1,
                "loss.pool_sizes",
                "positive sizes",
            ),
            (self.loss.roi_bins >= 1, "loss.roi_bins", "must be at least 1"),
            (self.loss.roi_sampling_ratio >= 1, "loss.roi_sampling_ratio", "must be at least 1"),
            (self.loss.sinkhorn_iterations >= 0, "loss.sinkhorn_iterations", "must be ≥ 0"),
            (0 < self.loss.foreground_mass <= 1, "loss.foreground_mass", "must be in (0, 1]"),
            (self.loss.patch_queue >= 0 and self.loss.cls_queue >= 0, "loss.*_queue", "sizes must be ≥ 0"),
            (
                self.bank.size >= 1 and self.bank.add_per_step >= 1,
                "bank",
                "size and add_per_step must be ≥ 1",
            ),
            (self.optim.lr > 0, "optim.lr", "must be positive"),
            (self.optim.min_lr >= 0, "optim.min_lr", "must be ≥ 0"),
            (self.optim.warmup_steps >= 0, "optim.warmup_steps", "must be ≥ 0"),
            (self.optim.clip_grad >= 0, "optim.clip_grad", "must be ≥ 0 (0 = off)"),
            (
                0 <= self.optim.ema_start <= 1 and 0 <= self.optim.ema_end <= 1,
                "optim.ema_*",
                "must lie in [0, 1]",
            ),
            (self.bundle.which in ("teacher", "student"), "bundle.which", "must be teacher or student"),
        ]
        temps = {
            k: getattr(self.loss, k)
            for k in (
                "tau",
                "patch_temperature",
                "sinkhorn_temperature_patch",
                "sinkhorn_temperature_cls",
                "cls_temperature_inner",
                "cls_temperature_intra",
                "entropy_temperature",
                "cls_nce_temperature",
            )
        }
        checks += [(v > 0, f"loss.{k}", "must be positive") for k, v in temps.items()]
        weights = dataclasses.asdict(self.loss.weights)
        checks += [(v >= 0, f"loss.weights.{k}", "must be ≥ 0") for k, v in weights.items()]
        checks.append(
            (any(v > 0 for v in weights.values()), "loss.weights", "at least one weight must be positive")
        )
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"config key {key}: {msg}")
        return self


# -- conversion ---------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            f"config key {path}: {value!r} is not a valid {' or '.join(_type_name(a) for a in args)}"
        )
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"config key {path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key {path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key {path}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 3e-5 as a string
            except ValueError:
                pass
        raise ConfigError(f"config key {path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key {path}: expected a string, got {value!r}")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"config key {path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key {path}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {path}: expected a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    raise ConfigError(f"config key {path}: unsupported type {tp}")


def _build(cls: type[T], data: Any, path: str = "") -> T:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section {path or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = path or "the top level"
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)} in {where}; valid: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    return _build(TrainConfig, data).validate()


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain, YAML/JSON-friendly dict (tuples become lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return x

    return typing.cast(dict[str, Any], plain(dataclasses.asdict(cfg)))


def parse_override(item: str) -> tuple[list[str], Any]:
    """'optim.lr=1e-3' -> (['optim', 'lr'], 0.001 or '1e-3'); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (creating sections); returns the same dict."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults ← YAML file (if any) ← overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        data = loaded or {}
    return config_from_dict(apply_overrides(data, overrides))


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# What may differ when a run is resumed: how long it runs, how it reports and saves, where it runs.
# Anything else (data, seeds, losses, optimiser, model) would make the resumed run another run.
RESUMABLE_KEYS = (
    "name",
    "max_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "progress",
    "plot",
    "device",
    "num_threads",
    "data.num_workers",
    "bundle.",
)


def flat_items(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"a.b.c": value}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= flat_items(v, key + ".")
        else:
            out[key] = v
    return out


def resume_changes(saved: Mapping[str, Any], given: TrainConfig) -> list[str]:
    """The settings `given` changes from a run's `saved` config that a resume cannot take
    ("key: saved -> given"); empty when the run can continue as asked."""
    before, after = flat_items(saved), flat_items(config_to_dict(given))
    changed = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key) or key in RESUMABLE_KEYS:
            continue
        if any(key.startswith(p) for p in RESUMABLE_KEYS if p.endswith(".")):
            continue
        changed.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changed
