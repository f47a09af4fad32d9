"""Deployment targets (`configs/targets.yaml`): which GPU, which TensorRT, which precision and shapes.

A target is what one engine is built for. The file is validated on load: unknown keys, impossible
batch ranges, malformed compute capabilities or versions, DLA on a GPU without one or with a batch
range (DLA runs static shapes only: min = opt = max), and hardware compatibility other than `none`
on Jetson (TensorRT supports hardware-compatible engines on data-centre/desktop GPUs only) are
refused with the target's name in the message.

```yaml
defaults: {workspace_mb: 2048}
targets:
  orin-nano:
    gpu: Jetson Orin Nano
    family: jetson
    compute_capability: "8.7"
    tensorrt: "10.3"
    jetpack: "6.1"
    precision: fp16
    sizes: [224]
    batch: {min: 1, opt: 2, max: 4}
```
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cotap.core.artifacts import PRECISIONS
from cotap.core.engine_compat import HARDWARE_LEVELS, parse_compute_capability, parse_version

FAMILIES = ("jetson", "datacenter", "desktop")

# The shipped targets file, found from this module rather than the working directory: the checkout's
# configs/targets.yaml (this file is <checkout>/export/targets.py; the package does not ship configs).
DEFAULT_TARGETS = Path(__file__).resolve().parent.parent / "configs" / "targets.yaml"
INT8_MODES = ("qdq", "entropy")


class TargetError(ValueError):
    """A targets file that cannot be used."""


@dataclass(frozen=True)
class Target:
    """One engine build: GPU, TensorRT version, precision, input sizes, batch range, memory, DLA."""

    name: str
    gpu: str
    family: str
    compute_capability: str
    tensorrt: str  # version prefix the engine is built with, e.g. "10.3"
    precision: str = "fp16"
    jetpack: str | None = None
    sizes: tuple[tuple[int, int], ...] | None = None  # None: the bundle's declared sizes
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mb: int = 2048
    dla_core: int | None = None  # DLA core to use (Jetson AGX/NX); layers it lacks fall back to the GPU
    hardware_compatibility: str = "none"  # none | ampere_plus | same_compute_capability
    version_compatible: bool = False
    int8_mode: str = "qdq"  # qdq: explicit quantisation from a QDQ ONNX; entropy: calibrator + cache
    builder_optimization_level: int = 3
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sizes"] = None if self.sizes is None else [list(s) for s in self.sizes]
        return d


def _size(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, str):
        parts = value.lower().split("x")
        try:
            if len(parts) == 1:
                return int(parts[0]), int(parts[0])
            if len(parts) == 2:
                return int(parts[0]), int(parts[1])
        except ValueError:
            pass
    if isinstance(value, list | tuple) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise TargetError(f"{where}: bad size {value!r}; use 224, '336x448' or [336, 448]")


def target_from_dict(name: str, raw: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> Target:
    """Validate one target's settings (defaults applied first)."""
    where = f"target {name!r}"
    d: dict[str, Any] = {**(defaults or {}), **raw}
    batch = d.pop("batch", None)
    if batch is not None:
        if not isinstance(batch, Mapping) or set(batch) - {"min", "opt", "max"}:
            raise TargetError(f"{where}: batch must be a mapping with min, opt and max")
        d.update({f"{k}_batch": v for k, v in batch.items()})
    known = {f.name for f in fields(Target)} - {"name"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise TargetError(f"{where}: unknown keys {unknown}; known: {sorted(known | {'batch'})}")
    for key in ("gpu", "family", "compute_capability", "tensorrt"):
        if key not in d:
            raise TargetError(f"{where}: missing {key!r}")
    d["compute_capability"] = str(d["compute_capability"])
    d["tensorrt"] = str(d["tensorrt"])
    if d.get("jetpack") is not None:
        d["jetpack"] = str(d["jetpack"])
    if d.get("sizes") is not None:
        if not isinstance(d["sizes"], list | tuple) or not d["sizes"]:
            raise TargetError(f"{where}: sizes must be a non-empty list")
        d["sizes"] = tuple(_size(s, where) for s in d["sizes"])
    try:
        target = Target(name=name, **d)
    except TypeError as e:
        raise TargetError(f"{where}: {e}") from e
    _validate(target)
    return target


def dla_batch_refusal(t: Target) -> str | None:
    """Why `t`'s batch range cannot run on its DLA (None when it can, or when it uses no DLA).

    The DLA runs static shapes only: every optimisation profile of a DLA engine needs
    min = opt = max, so a DLA target has one fixed batch size (the server pads smaller batches up
    to it)."""
    if t.dla_core is None or t.min_batch == t.opt_batch == t.max_batch:
        return None
    return (
        f"DLA engines need a fixed batch (min = opt = max; the DLA runs static shapes only), got "
        f"{t.min_batch}/{t.opt_batch}/{t.max_batch}; use e.g. batch: {{min: 1, opt: 1, max: 1}}"
    )


def _validate(t: Target) -> None:
    where = f"target {t.name!r}"
    if t.family not in FAMILIES:
        raise TargetError(f"{where}: family {t.family!r} is not one of {FAMILIES}")
    try:
        cc = parse_compute_capability(t.compute_capability)
        parse_version(t.tensorrt)
    except ValueError as e:
        raise TargetError(f"{where}: {e}") from e
    if t.precision not in PRECISIONS:
        raise TargetError(f"{where}: precision {t.precision!r} is not one of {PRECISIONS}")
    if not 1 <= t.min_batch <= t.opt_batch <= t.max_batch:
        raise TargetError(
            f"{where}: batch range must satisfy 1 <= min <= opt <= max, got "
            f"{t.min_batch}/{t.opt_batch}/{t.max_batch}"
        )
    if t.workspace_mb <= 0:
        raise TargetError(f"{where}: workspace_mb must be positive")
    if t.hardware_compatibility not in HARDWARE_LEVELS:
        raise TargetError(f"{where}: hardware_compatibility must be one of {HARDWARE_LEVELS}")
    if t.family == "jetson" and t.hardware_compatibility != "none":
        raise TargetError(
            f"{where}: hardware_compatibility {t.hardware_compatibility!r} is not supported on Jetson "
            "(TensorRT builds hardware-compatible engines for data-centre/desktop GPUs only); use none"
        )
    if t.hardware_compatibility == "ampere_plus" and cc < (8, 0):
        raise TargetError(f"{where}: ampere_plus needs a GPU of compute capability 8.0 or newer")
    if t.dla_core is not None:
        if t.family != "jetson" or t.dla_core < 0:
            raise TargetError(f"{where}: dla_core is only for Jetson targets with a DLA (core 0 or 1)")
        if t.precision == "fp32":
            raise TargetError(f"{where}: DLA runs fp16 or int8 only")
        refusal = dla_batch_refusal(t)
        if refusal is not None:
            raise TargetError(f"{where}: {refusal}")
    if t.int8_mode not in INT8_MODES:
        raise TargetError(f"{where}: int8_mode must be one of {INT8_MODES}")
    if not 0 <= t.builder_optimization_level <= 5:
        raise TargetError(f"{where}: builder_optimization_level must be 0..5")
    if t.version_compatible and parse_version(t.tensorrt) < (8, 6):
        raise TargetError(f"{where}: version-compatible engines need TensorRT 8.6 or newer")


def default_targets_file() -> Path:
    """The shipped `configs/targets.yaml`, independent of the working directory; a clear error
    naming the path when this install has no source tree around it."""
    if not DEFAULT_TARGETS.is_file():
        raise TargetError(
            f"the default targets file {DEFAULT_TARGETS} is missing (it is configs/targets.yaml of the "
            "cotap source tree, which this install does not include); pass --targets FILE"
        )
    return DEFAULT_TARGETS


def load_targets(path: str | os.PathLike[str] | None = None) -> dict[str, Target]:
    """Read and validate a targets YAML file: {name: Target} in file order. `path` None: the shipped
    `configs/targets.yaml` (`default_targets_file`)."""
    import yaml

    p = default_targets_file() if path is None else Path(path)
    if not p.is_file():
        raise TargetError(f"targets file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise TargetError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(raw, Mapping) or not isinstance(raw.get("targets"), Mapping) or not raw["targets"]:
        raise TargetError(f"{p}: expected a mapping with a non-empty 'targets' mapping")
    unknown = sorted(set(raw) - {"defaults", "targets"})
    if unknown:
        raise TargetError(f"{p}: unknown top-level keys {unknown}; use 'defaults' and 'targets'")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise TargetError(f"{p}: 'defaults' must be a mapping")
    out: dict[str, Target] = {}
    for name, body in raw["targets"].items():
        if not isinstance(body, Mapping):
            raise TargetError(f"{p}: target {name!r} must be a mapping")
        out[str(name)] = target_from_dict(str(name), body, defaults)
    return out
