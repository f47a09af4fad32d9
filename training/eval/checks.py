"""Range checks shared by the evaluation settings (`__post_init__` of every config dataclass), so
that a bad value is refused when the config is built, before any feature is extracted."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def check_int(name: str, value: Any, minimum: int) -> None:
    """`value` is an int (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")


def check_float(name: str, value: Any, minimum: float = 0.0, *, inclusive: bool = False) -> None:
    """`value` is a finite number above `minimum` (at least `minimum` when `inclusive`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (value == minimum and not inclusive):
        raise ValueError(f"{name} must be {'at least' if inclusive else 'above'} {minimum:g}, got {value}")


def check_ints(name: str, values: Any, minimum: int, *, allow_empty: bool = False) -> None:
    """`values` is a tuple or list of ints of at least `minimum` (non-empty unless `allow_empty`)."""
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise ValueError(f"{name} must be a list of integers, got {values!r}")
    if not values and not allow_empty:
        raise ValueError(f"{name} must hold at least one value")
    for v in values:
        check_int(f"every value of {name}", v, minimum)


def check_size(name: str, value: Any) -> None:
    """`value` is None or a (height, width) pair of positive ints."""
    if value is None:
        return
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{name} must be (height, width), got {value!r}")
    for v in value:
        check_int(f"{name} (height, width)", v, 1)
