"""The command line: every command is listed, and only the command being run is imported."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from minivln.cli import COMMANDS, build_parser, main


def _registered(module: str) -> dict[str, str]:
    sub = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(module).register(sub)
    return {a.dest: a.help for a in sub._choices_actions}


def test_help_lines_match_the_modules():
    seen: dict[str, str] = {}
    for module in dict.fromkeys(m for m, _ in COMMANDS.values()):
        seen.update(_registered(module))
    assert seen == {name: help_line for name, (_, help_line) in COMMANDS.items()}
    assert build_parser(full=True)._subparsers._group_actions[0].choices.keys() == COMMANDS.keys()


def test_help_does_not_import_torch():
    code = ("import sys, contextlib, io\nfrom minivln.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try: main(['--help'])\n    except SystemExit: pass\n"
            "assert 'finetune' in out.getvalue() and 'navigate' in out.getvalue(), out.getvalue()\n"
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_chosen_command_gets_its_real_parser(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "--config" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # unknown command: argparse error, exit 2
        main(["no-such-command"])
    assert exc.value.code == 2
    assert main([]) == 2
