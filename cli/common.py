"""Helpers shared by the subcommands: lazy imports that name the missing extra, size parsing."""

from __future__ import annotations

import argparse
import importlib
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
