"""The one command line: ``minivln <command> ...``.

Each command lives next to the code it drives and exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (a callable taking the parsed args and returning an exit code).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import signal
import sys
import warnings

from minivln import __version__
from minivln.config import ConfigError
from minivln.paths import DataError, describe_os_error, error_number

#: what the environment, not the code, gets wrong: reported as one line like bad input (exit 2)
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
                      errno.EISDIR, getattr(errno, "EDQUOT", errno.ENOSPC)}

# command -> (module whose ``register`` defines it, the one-line help ``minivln --help`` shows).
# Only the module of the command being run is imported, so ``minivln --help`` and light commands
# don't pay for torch; ``tests/test_cli.py`` checks each help line against the module's own.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("minivln.demo", "zero-download demo: toy world, stand-in features, agents, official metrics"),
    "download": ("minivln.data.cli", "fetch and verify the public connectivity, R2R and REVERIE files"),
    "graphs": ("minivln.data.cli", "build (and cache) the navigation graphs of every house"),
    "toy": ("minivln.data.toy_cli", "generate the toy world (small seeded houses in the real data formats)"),
    "features": ("minivln.features.cli", "stand-in view/object features: build, probe, inspect"),
    "params": ("minivln.model.cli", "print the parameter count of a model preset (total and per part)"),
    "eval": ("minivln.evaluation.cli", "score a submission (R2R / REVERIE leaderboard format) against a split"),
    "plot": ("minivln.training.plot", "draw a run's loss and validation SR/SPL curves to RUN_DIR/curves.png"),
    "parity": ("minivln.model.parity",
               "replay the reference DUET fixture through our network and map; compare everything"),
    "bench": ("minivln.bench.cli", "benchmarks: model (latency per episode, teacher vs student), gemm (fp32 GFLOP/s), "
                                   "figure (SR vs latency), train (training iterations/s)"),
    "pretrain": ("minivln.training.pretrain", "pretrain DUET (MLM, SAP, MRC, REVERIE OG) on ground-truth path prefixes"),
    "finetune": ("minivln.training.finetune", "fine-tune a DUET agent on R2R or REVERIE (DAgger, DUET's recipe)"),
    "navigate": ("minivln.deploy.cli", "run a trained agent on a split; write the submission (+ metrics)"),
    "export": ("minivln.deploy.cli", "export a checkpoint's network to ONNX (fp32 + int8 graphs) for ONNX Runtime"),
    "show": ("minivln.show", "draw one episode top-down (graph, ground truth, agent's path) to a PNG"),
    "experiment": ("minivln.experiment", "run a paper table's grid of runs from a recipe (resumable, pinned code)"),
}

# Modules that define commands, in ``minivln --help`` order.
COMMAND_MODULES = list(dict.fromkeys(module for module, _ in COMMANDS.values()))


def _register_module(sub: argparse._SubParsersAction, module: str, wanted: str) -> None:
    """Let ``module`` add its parsers; keep only the one named ``wanted``."""
    before = set(sub.choices)
    importlib.import_module(module).register(sub)
    for name in set(sub.choices) - before - {wanted}:  # a module may register several commands
        del sub.choices[name]
        sub._choices_actions[:] = [a for a in sub._choices_actions if a.dest != name]


def build_parser(argv: list[str] | None = None, *, full: bool = False) -> argparse.ArgumentParser:
    """The top-level parser.  Every command appears (with its help line), but only the command named
    in ``argv`` gets its real parser (``full=True``: all of them, importing every module)."""
    parser = argparse.ArgumentParser(
        prog="minivln",
        description="MiniVLN: small, fast vision-and-language navigation agents.",
    )
    parser.add_argument("--version", action="version", version=f"minivln {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None)
    if full:
        for module in COMMAND_MODULES:
            importlib.import_module(module).register(sub)
        return parser
    if chosen in COMMANDS:  # its real parser first (its module may define more commands: dropped)
        _register_module(sub, COMMANDS[chosen][0], chosen)
    for name, (_, help_line) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_line)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after options land in the command's positional list, if it has one
        dest = getattr(args, "extra_positionals", None)
        if dest is None or any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, dest, list(getattr(args, dest)) + extra)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    format_warning = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        return int(args.func(args) or 0)
    except (DataError, ConfigError, FileExistsError) as exc:  # bad input: a message, exit 2, nothing overwritten
        print(f"minivln: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C (or SIGTERM, in training): one line naming the checkpoint, 128 + signal
        print(f"minivln: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    except OSError as exc:  # a read-only or full disk, a missing file: the same one line
        if error_number(exc) not in ENVIRONMENT_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"minivln: error: {where}{describe_os_error(exc, exc.filename)}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = format_warning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line, like errors (Python's default adds the file, line and source)."""
    return f"minivln: warning: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
