"""The `moeify` command line: parses, reports, and hands work to the library (it converts nothing itself).

One module per command, each with `add_parser(subparsers)` and `run(args) -> exit code`; the library code each
command runs is imported only when it runs, so `moeify --help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import MoeifyError
from . import convert, evaluate, info, merge, push, route_stats, train, verify

# In the order `moeify --help` lists them.
COMMANDS = {
    "convert": convert,
    "verify": verify,
    "info": info,
    "push": push,
    "merge": merge,
    "train": train,
    "eval": evaluate,
    "route-stats": route_stats,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `moeify` command."""
    parser = argparse.ArgumentParser(
        prog="moeify", description="Upcycle dense Hugging Face LMs into Mixture-of-Experts."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `moeify` console script; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # KEY=VALUE overrides after an option: `moeify train R.yaml --dry-run lora.r=8`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command].run(args)
    except MoeifyError as err:
        print(f"moeify {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moeify {args.command}: interrupted; nothing was left half-written.", file=sys.stderr)
        return 130
