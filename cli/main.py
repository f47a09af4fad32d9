"""Entry point of the `cotap` console script."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cotap.cli import bundle_cmd, client_cmds, eval_cmd, export_cmd, serve_cmd, train_cmd
from cotap.cli.common import CLIError
from cotap.core.version import __version__

# Each subcommand module exposes register(subparsers); order is the order of `cotap --help`.
COMMANDS = [export_cmd, bundle_cmd, serve_cmd, train_cmd, eval_cmd, client_cmds]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cotap",
        description="CoTAP dense image features: train, export, serve and query patch embeddings.",
    )
    parser.add_argument("--version", action="version", version=f"cotap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"cotap: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cotap: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cotap ... | head`: the reader has gone, which is not an error
        # stdout's buffer cannot be flushed any more; point it at /dev/null so exit does not try
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
