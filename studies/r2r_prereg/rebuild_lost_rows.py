"""Put the rows a committed table scored back into a new experiment directory (one-off, 2026-12-07).

The pre-registered R2R runs (docs/preregistration.md) lived in ``runs/r2r-prereg-tables`` on a machine
that was replaced between two sittings; only what had been committed survived: the table
``docs/results/r2r_prereg_table3.json`` with its rows' submissions (the student alone, seeds 0-3).  This
script writes, into a new directory pinned at the same commit, what the driver needs to count those rows
as scored -- so that it neither trains nor scores them again:

* ``scores/RUN/submission_val_unseen.json`` (the committed submission) and ``metrics_val_unseen.json``
  (re-scored from it);
* the done marks ``done/score-RUN.json`` and ``done/train-RUN.json`` (the recipe's spec, the row's
  commit, ``rebuilt_from``; no ``seconds``: the times were lost);
* ``runs/RUN/config.yaml``, the config the recipe gives the run (what its row reads: steps, batch, seed),
  and ``runs/RUN/rebuilt.txt`` saying so.

Their weights are gone: the driver trains a lost *pretraining* run again when a pending run needs it
(:func:`minivln.experiment.requeue_lost`), and never a scored run.  Nothing already in the directory is
overwritten.  Since 2026-12-07 the directory's record is committed at each sitting's end instead
(``minivln experiment ... --save-record``), so this is needed once.

    python studies/r2r_prereg/rebuild_lost_rows.py --out runs/r2r-prereg-tables features=FEATS.hdf5 data_dir=DATA
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from minivln.config import ConfigError, load_config, save_config
from minivln.evaluation.evaluator import Evaluator
from minivln.experiment import (
    _done_file,
    load_recipe,
    plan,
    repo_root,
    score_key,
)
from minivln.paths import atomic_write_text, resolve_data_dir
from minivln.training.finetune import FinetuneConfig

NOTE = ("rebuilt from the committed table after the machine that trained it was replaced (2026-12-07); "
        "its weights and log were lost")


def rebuild(recipe_name: str, table_path: Path, out: Path, overrides: list[str]) -> list[str]:
    recipe = load_recipe(recipe_name, overrides)
    table = json.loads(table_path.read_text())
    pin = json.loads((out / "pin.json").read_text())["commit"]
    code = out / "code"
    jobs = {j.name: j for j in plan(recipe, out, code)}
    evaluator = Evaluator(recipe.task, recipe.split, resolve_data_dir(None))
    rows = {r.name: r for r in recipe.rows}
    done = []
    for rec in table["rows"]:
        row = rows.get(rec["name"])
        if row is None or not row.run:
            continue
        if rec["commit"] != pin:
            raise ConfigError(f"row {rec['name']!r} was trained at {rec['commit'][:12]}, {out} is pinned at {pin[:12]}")
        key = score_key(row, recipe.split)
        train, score = jobs[f"train:{row.run}"], jobs[f"score:{key}"]
        targets = [_done_file(out, train), _done_file(out, score), out / "scores" / key, train.run_dir]
        if any(t.exists() for t in targets):
            raise ConfigError(f"{out} already has {row.run}'s files: nothing rebuilt")
        entries = json.loads(gzip.decompress((repo_root() / rec["submission"]).read_bytes()))
        summary, _ = evaluator.score(entries)
        if abs(summary["sr"] - rec["sr"]) > 1e-12:
            raise ConfigError(f"{rec['submission']} does not re-score to its row's SR")
        sdir = out / "scores" / key
        sdir.mkdir(parents=True)
        atomic_write_text(sdir / f"submission_{recipe.split}.json", json.dumps(entries))
        atomic_write_text(sdir / f"metrics_{recipe.split}.json", json.dumps(
            {**summary, "features": table["features"], "checkpoint": str(train.weights), "split": recipe.split,
             "instructions": len(entries)}, indent=2) + "\n")
        base = {"commit": rec["commit"], "rebuilt_from": f"{table_path.name} (written {table['written']}), "
                f"{rec['submission']}", "note": NOTE}
        (out / "done").mkdir(exist_ok=True)
        atomic_write_text(_done_file(out, score), json.dumps({"job": score.name, "spec": score.spec, **base},
                                                              indent=1) + "\n")
        atomic_write_text(_done_file(out, train), json.dumps({"job": train.name, "spec": train.spec,
                                                              "recipe_argv": train.argv, **base}, indent=1) + "\n")
        train.run_dir.mkdir(parents=True)
        cfg = load_config(FinetuneConfig, code / train.config, train.overrides + [f"train.run_dir={train.run_dir}"])
        save_config(cfg, train.run_dir / "config.yaml")
        atomic_write_text(train.run_dir / "rebuilt.txt", f"{NOTE}; config.yaml is the recipe's config for it, "
                                                          f"not the file the run wrote\n")
        done.append(row.run)
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the new experiment directory (pinned already)")
    ap.add_argument("--recipe", default="r2r-prereg-table3")
    ap.add_argument("--table", default="docs/results/r2r_prereg_table3.json")
    ap.add_argument("overrides", nargs="+", metavar="key=value",
                    help="the recipe's inputs as its driver gets them: features=FEATS.hdf5 data_dir=DATA")
    args = ap.parse_args()
    runs = rebuild(args.recipe, repo_root() / args.table, Path(args.out).resolve(), args.overrides)
    print(f"rebuilt {len(runs)} scored rows in {args.out}: {', '.join(runs)}")


if __name__ == "__main__":
    main()
