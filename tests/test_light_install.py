"""The default install (``pip install -e '.[deploy]'``: no scipy, no matplotlib): every module imports
without them, the code that used scipy runs without it, the commands that draw PNGs say in one line how
to install the ``plot`` extra, and the demo's picture (an SVG) needs neither."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from scipy import stats as scipy_stats

from minivln.training.plot import bars_svg

REPO = Path(__file__).resolve().parents[1]

# A child Python in which scipy and matplotlib cannot be imported, as in a default install.
BLOCK = textwrap.dedent("""
    import sys

    class Missing:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("scipy", "matplotlib"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Missing())
""")


def run_without_extras(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=600)


def test_every_module_imports_and_the_former_scipy_code_runs_without_scipy_or_matplotlib():
    res = run_without_extras("""
        import importlib, pkgutil
        import minivln
        names = [m.name for m in pkgutil.walk_packages(minivln.__path__, "minivln.") if m.name != "minivln.__main__"]
        for name in names:
            importlib.import_module(name)
        import numpy as np
        from minivln.data.graph import shortest_paths
        from minivln.evaluation.stats import t_test
        from minivln.features.standin import Sparse
        dist, _ = shortest_paths(np.array([[0, 1.0, 0], [1.0, 0, 2.0], [0, 2.0, 0]]))
        p = t_test([0.1, 0.3, 0.2])["p"]
        y = Sparse.of(np.ones(2), [0, 1], [1, 0], (2, 2)).dot(np.eye(2, dtype=np.float32))
        blocked = [m for m in sys.modules if m.split(".")[0] in ("scipy", "matplotlib")]
        print(len(names), dist[0, 2], round(p, 6), y.tolist(), blocked)
    """)
    assert res.returncode == 0, res.stderr
    count, dist, p, *rest = res.stdout.split(" ", 3)
    assert int(count) > 50 and float(dist) == 3.0
    assert float(p) == round(float(scipy_stats.ttest_1samp([0.1, 0.3, 0.2], 0.0).pvalue), 6)
    assert rest == ["[[0.0, 1.0], [1.0, 0.0]] []\n"]


def test_png_commands_say_how_to_install_the_plot_extra(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
    res = run_without_extras("""
        from minivln.cli import main
        for argv in (["plot", sys.argv[1]],
                     ["bench", "figure", "--bench", "b.json", "--point", "a", "b", "c", "--out", sys.argv[2]],
                     ["show", "--preds", "p.json", "--instr-id", "x", "--out", sys.argv[2]]):
            print(main(argv))
    """, str(run), str(tmp_path / "fig.png"))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["2", "2", "2"]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("minivln: error: drawing PNG pictures needs matplotlib")
                                   and "pip install -e '.[plot]'" in line for line in lines)
    assert not (run / "curves.png").exists() and not (tmp_path / "fig.png").exists()


def test_the_table_bars_are_an_svg_without_matplotlib(tmp_path):
    rows = [{"name": name, "sr": sr, "sr_se": 0.03, "spl": sr / 2, "spl_se": 0.02, "episodes": 300}
            for name, sr in (("teacher (released)", 0.6), ("student, two-stage KD", 0.25), ("random walk", 0.05))]
    table = {"table": "demo <table>", "split": "val_unseen", "features": "stand-in", "rows": rows}
    svg = ET.parse(bars_svg(table, tmp_path / "bars.svg")).getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "demo <table>" in texts and all(r["name"] in texts for r in rows)
    assert {"60.0", "30.0", "25.0", "12.5", "5.0", "2.5"} <= set(texts)  # each bar's value, in percent
    bars = [r for r in svg.iter("{http://www.w3.org/2000/svg}rect") if r.find("{http://www.w3.org/2000/svg}title")
            is not None]
    heights = [float(b.get("height")) for b in bars]  # 260 px for 100%
    assert heights == pytest.approx([2.6 * pct for pct in (60, 30, 25, 12.5, 5, 2.5)])
