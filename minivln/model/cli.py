"""Model commands: ``minivln params PRESET [--json]``."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "params",
        help="print the parameter count of a model preset (total and per part)",
        description="Print the parameter count of a model preset, total and per part.",
    )
    p.add_argument("preset", nargs="?", help="preset name (omit to list the presets)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_params)


def _params(args: argparse.Namespace) -> int:
    from minivln.model.registry import (
        UnknownPresetError,
        get_preset,
        list_models,
        preset_parameters,
    )

    if args.preset is None:
        rows = [(name, preset_parameters(name)["total"]) for name in list_models()]
        if args.json:
            print(json.dumps({name: total for name, total in rows}, indent=2))
        else:
            for name, total in rows:
                print(f"{name:<18} {total:>13,}  {get_preset(name).description}")
        return 0
    try:
        preset = get_preset(args.preset)
    except UnknownPresetError as exc:
        print(f"minivln params: error: {exc}", file=sys.stderr)
        return 2
    counts = preset_parameters(args.preset)
    if args.json:
        out = {"preset": preset.name, "description": preset.description, **counts,
               "config": preset.config.to_dict()}  # fmt: skip
        print(json.dumps(out, indent=2))
        return 0
    total = counts["total"]
    print(f"{preset.name}: {preset.description}")
    for part, n in counts["parts"].items():
        print(f"  {part:<24} {n:>13,}  {100 * n / total:5.1f}%")
    print(f"  {'total':<24} {total:>13,}  ({total / 1e6:.2f}M)")
    return 0
