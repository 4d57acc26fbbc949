"""What the hardening tests share: running the command line in-process, checking that an error is
one line, and a small file system to fill (tests/ is on sys.path, as for conftest)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import SMALL_DUET as SMALL

from minivln.cli import main as cli_main


def finetune_args(data, feats, steps: int = 2) -> list[str]:
    """A tiny toy-world fine-tuning run's overrides (``steps`` iterations, a checkpoint every step)."""
    return ["model=duet-cpu", f"model_overrides={json.dumps(SMALL)}", f"data_dir={data}", f"features={feats}",
            "batch_size=2", "max_action_len=5", "max_instr_len=40", "val_splits=[val_unseen]",
            "val_max_episodes=2", "num_threads=1", f"train.max_steps={steps}", "train.log_every=1",
            "train.ckpt_every=1", "train.progress=false"]


def one_error_line(err: str, *needles: str) -> str:
    """The single ``minivln: error:`` line of ``err`` (nothing else there: no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("minivln: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``minivln ARGS`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = cli_main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (skip, with the reason, where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the tmpfs variant of this test needs one")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or 'not permitted'}); the injected-error "
                    "tests cover the same code")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
