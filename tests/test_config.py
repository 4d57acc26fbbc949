from dataclasses import dataclass, field
from pathlib import Path

import pytest

from minivln.config import ConfigError, load_config, save_config


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Run:
    name: str = "x"
    steps: int = 10
    amp: bool = False
    seed: int | None = None
    optim: Optim = field(default_factory=Optim)
    tasks: list[str] = field(default_factory=lambda: ["mlm", "sap"])


def test_defaults_yaml_overrides_and_round_trip(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("steps: 20\noptim:\n  lr: 0.001\n")
    cfg = load_config(Run, y, ["optim.betas=[0.9, 0.98]", "amp=true", "tasks=[sap]", "seed=3"])
    assert cfg == Run(steps=20, amp=True, seed=3, optim=Optim(lr=0.001, betas=(0.9, 0.98)), tasks=["sap"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Run, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["stepz=3"], "unknown config key.*stepz"),
        (["optim.lrr=3"], "optim.lrr"),
        (["steps=abc"], "steps: expected int"),
        (["steps=1.5"], "steps: expected int"),
        (["amp=maybe"], "amp: expected true/false"),
        (["noequals"], "key=value"),
    ],
)
def test_bad_keys_and_values_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Run, None, overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Run, bad)


def test_configs_ship_in_the_wheel_and_load_by_name(tmp_path):
    """A user who pip-installs the package finds every preset and recipe by name."""
    import subprocess
    import sys
    import zipfile

    from minivln.config import CONFIG_DIR, resolve_config

    assert resolve_config("toy-teacher") == CONFIG_DIR / "toy-teacher.yaml"
    assert resolve_config("r2r-table3.yaml", "experiments") == CONFIG_DIR / "experiments" / "r2r-table3.yaml"
    with pytest.raises(ConfigError, match="toy-teacher"):  # the message lists the presets
        resolve_config("toy-teacherr")
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools installed")
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(repo)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("minivln-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(repo)) for p in CONFIG_DIR.rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
