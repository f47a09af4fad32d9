"""`cotap verify BUNDLE`: check every file of a bundle against its manifest (no torch needed)."""

from __future__ import annotations

import argparse
import json

from cotap.cli.common import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="verify a bundle's files against its manifest")
    p.add_argument("bundle", help="bundle directory")
    p.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    from cotap.core.bundle import BundleError, read_bundle

    try:
        b = read_bundle(args.bundle)
    except BundleError as e:
        raise CLIError(f"bundle refused: {e}") from e
    print(
        json.dumps(
            {
                "bundle": str(b.path),
                "name": b.config.name,
                "arch": b.config.arch,
                "sha256": b.sha256,
                "files": {n: e["size"] for n, e in b.files.items()},
                "verified": True,
            },
            indent=2,
        )
    )
    return 0
