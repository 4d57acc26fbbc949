"""The one command line: ``minivln <command> ...``.

Each command lives next to the code it drives and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (a callable taking the parsed args and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from minivln import __version__
from minivln.config import ConfigError
from minivln.paths import DataError

# Modules that define commands, in the order they appear in ``minivln --help``.
COMMAND_MODULES = [
    "minivln.demo",
    "minivln.data.cli",
    "minivln.data.toy_cli",
    "minivln.features.cli",
    "minivln.model.cli",
    "minivln.evaluation.cli",
    "minivln.training.plot",
    "minivln.model.parity",
    "minivln.model.bench",
    "minivln.training.pretrain",
    "minivln.training.finetune",
    "minivln.training.navigate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minivln",
        description="MiniVLN: small, fast vision-and-language navigation agents.",
    )
    parser.add_argument("--version", action="version", version=f"minivln {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (DataError, ConfigError) as exc:
        print(f"minivln: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
