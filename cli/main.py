"""Entry point of the `cotap` console script."""

from __future__ import annotations

import argparse
import os
import select
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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a piped stdout is block-buffered: a closed reader shows up here, not at exit
        return code
    except CLIError as e:
        print(f"cotap: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cotap: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe (a subprocess, a socket): a real error
        # `cotap ... | head`: the reader has had what it wanted, which is not an error. What is left
        # in stdout's buffer cannot be written; point stdout at /dev/null so exit does not try.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports POLLERR for it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # errors and hang-ups are always reported
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or no real stdout
        return False


if __name__ == "__main__":
    sys.exit(main())
