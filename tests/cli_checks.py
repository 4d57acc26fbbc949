"""What the hardening tests share: running the command line in-process, and checking that an error
is one line (tests/ is on sys.path, as for conftest)."""

from __future__ import annotations

import json

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
