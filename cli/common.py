"""Helpers shared by the subcommands: lazy imports that name the missing extra, size parsing, and
argparse types that refuse a value out of range at parse time (so that none is silently replaced)."""

from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from cotap.core.version import install_hint


class CLIError(Exception):
    """An error the user caused; printed without a traceback, exit status 2."""


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or fail with the pip command that installs the extra providing it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise CLIError(
            f"this command needs the '{extra}' extra ({e.name} is not installed): {install_hint(extra)}"
        ) from e


def parse_size(text: str) -> tuple[int, int]:
    """'224' -> (224, 224); '336x448' -> (336, 448) as (height, width)."""
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x")
            return int(h), int(w)
        s = int(text)
        return s, s
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use 224 or HEIGHTxWIDTH such as 336x448") from e


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'224,336x448' -> [(224, 224), (336, 448)]."""
    return [parse_size(t) for t in text.split(",") if t.strip()]


def existing_dir(text: str) -> str:
    """An argparse type: a folder that exists (checked before any model is loaded)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"image folder not found: {text}" if not path.exists() else f"{text} is a file, not a folder"
        )
    return text


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def ints_at_least(minimum: int) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers, each >= `minimum` ("10,20")."""
    one = int_at_least(minimum)

    def parse(text: str) -> list[int]:
        try:
            values = [one(t.strip()) for t in text.split(",") if t.strip()]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{e} (in {text!r})") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        return values

    return parse


def number_in(low: float, high: float, *, open_ends: bool) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high], or in (low, high) with `open_ends`."""
    if open_ends:
        where = (
            "a positive number" if (low, high) == (0, math.inf) else f"strictly between {low:g} and {high:g}"
        )
    else:
        where = f"between {low:g} and {high:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = low < value < high if open_ends else low <= value <= high
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be {where}, got {text}")
        return value

    return parse
