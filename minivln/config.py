"""Typed dataclass configs with YAML presets and ``key.sub=value`` command-line overrides.

A config is a (possibly nested) dataclass.  ``load_config(Cls, yaml_path, overrides)`` starts from the
dataclass defaults, applies the YAML file, then the overrides, checking every key and converting
every value to the field's type; unknown keys are an error that names them.  A float that is NaN or
infinite is an error naming its key too (:func:`check_finite`; a field that gives such values a meaning
says so with ``field(metadata={NONFINITE: "what they mean"})``).  ``save_config`` writes the resolved
config next to a run so that it can be re-run exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from minivln.paths import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit the config's fields; the message names the key."""


def _yaml_cause(exc: yaml.YAMLError) -> str:
    """What a YAML error says, in one line (without where)."""
    problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    context = getattr(exc, "context", None)
    return problem + (f" ({context})" if context else "")


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: ``"line 3, column 7: mapping values are not allowed here"``."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + _yaml_cause(exc)


def read_yaml(path: str | os.PathLike, what: str = "") -> Any:
    """Parse a YAML file; a missing, unreadable or invalid file is a one-line :class:`ConfigError`
    naming the file, the line and the column."""
    p = Path(path)
    label = f"{what} {p}" if what else str(p)
    if not p.is_file():
        raise ConfigError(f"{label} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label} cannot be read: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: invalid YAML: {_yaml_cause(exc)}") from None


def _yaml_value(raw: str, key: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: {raw!r} is not a valid YAML value ({yaml_problem(exc)})") from None


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _yaml_value(value, key)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_convert(v, inner, key) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):  # dict[str, SomeConfig]
            return {k: _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        if isinstance(value, bool) and tp is not str:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    return value


#: field metadata key of a float field that may be NaN or infinite (the value says what they mean)
NONFINITE = "nonfinite"


def check_finite(cfg: Any, prefix: str = "") -> None:
    """A :class:`ConfigError` naming the first float of ``cfg`` (a config dataclass: nested configs,
    lists and mappings included) that is NaN or infinite; NaN compares false with every bound, so
    range checks alone let it through (``kd_weight: .nan`` would train with distillation silently off).
    Fields whose metadata has :data:`NONFINITE` are skipped."""
    for f in dataclasses.fields(cfg):
        if not f.metadata.get(NONFINITE):
            _check_finite_value(getattr(cfg, f.name), prefix + f.name)


def _check_finite_value(value: Any, key: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value} is not a finite number (NaN and infinities are refused)")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        check_finite(value, key + ".")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite_value(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_finite_value(v, key)


def _unknown_keys_error(cls: type, unknown: list[str], prefix: str) -> ConfigError:
    names = sorted(f.name for f in dataclasses.fields(cls))
    shown = []
    for k in unknown:
        near = difflib.get_close_matches(k, names, n=1)
        shown.append(prefix + k + (f" (did you mean {prefix + near[0]}?)" if near else ""))
    return ConfigError(f"unknown config key(s) {', '.join(shown)}; {cls.__name__} has {', '.join(names)}")


def _check_keys(cls: type, data: dict, prefix: str = "") -> None:
    """Unknown keys of ``data`` (nested mappings of nested configs included) are a ConfigError."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise _unknown_keys_error(cls, unknown, prefix)
    for k, v in data.items():
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            _check_keys(hints[k], v, f"{prefix}{k}.")


def _from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise _unknown_keys_error(cls, unknown, prefix)
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    base = cls()  # defaults for everything not given
    return dataclasses.replace(base, **kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings (values parsed as YAML scalars) to a nested dict."""
    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = _yaml_value(raw, key.strip()) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = value
    return out


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The YAML presets shipped with the package (``configs/`` in a checkout links here)."""


def resolve_config(path: str | os.PathLike, subdir: str = "") -> Path:
    """A config file by path, or by the name of a shipped preset (``toy-teacher`` or
    ``toy-teacher.yaml`` -> ``minivln/configs/toy-teacher.yaml``); ConfigError lists the presets."""
    p = Path(path)
    if p.is_file():
        return p
    folder = CONFIG_DIR / subdir if subdir else CONFIG_DIR
    if len(p.parts) == 1:
        for cand in (folder / p.name, folder / f"{p.name}.yaml"):
            if cand.is_file():
                return cand
    known = ", ".join(sorted(q.stem for q in folder.glob("*.yaml")))
    raise ConfigError(f"config file {p} does not exist (nor a shipped preset of that name: {known})")


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Defaults <- YAML file (a path or a shipped preset's name) <- overrides, type-checked."""
    data: dict = {}
    if path is not None:
        p = resolve_config(path)
        loaded = read_yaml(p, "config file") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        try:
            _check_keys(cls, loaded)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc}") from None
        data = loaded
    # nested dataclass defaults must merge with partial YAML mappings
    merged = _merge(to_dict(cls()), apply_overrides(data, overrides or []))
    cfg = _from_dict(cls, merged)
    check_finite(cfg)
    return cfg


def _merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------- runs

#: Keys of a run's config that name the run rather than what it computes (never "changes" on resume).
RUN_KEYS = ("train.run_dir", "train.resume")
RUN_CONFIG = "config.yaml"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"optim": {"lr": 1}}}`` -> ``{"train.optim.lr": 1}`` (lists are values)."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = to_dict(data)
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: Any, new: Any, ignore: tuple[str, ...] = RUN_KEYS) -> dict[str, tuple[Any, Any]]:
    """``{key: (old value, new value)}`` for every (dotted) key whose value differs."""
    a, b = flatten(old), flatten(new)
    missing = object()
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k, missing) != b.get(k, missing)}


def _shown(value: Any) -> str:
    return "(unset)" if not isinstance(value, (str, int, float, bool, list, tuple, dict, type(None))) else repr(value)


def override_keys(overrides: list[str]) -> list[str]:
    return [item.split("=", 1)[0].strip() for item in overrides if "=" in item]


def load_run_config(cls: type[T], run_dir: str | os.PathLike, path: str | os.PathLike | None = None,
                    overrides: list[str] | None = None, *, resume: bool = False) -> tuple[T, str]:
    """The config of a training run started or resumed from the command line, and a one-line note
    ("" when there is nothing to say).

    A new run: ``path`` <- ``overrides`` (as :func:`load_config`), with ``train.run_dir = run_dir``.

    A resumed run (``resume``) needs only its directory: its saved ``RUN/config.yaml`` is the base and
    ``overrides`` apply on top; the note names every value they change (e.g. a larger
    ``train.max_steps`` to extend the run).  ``path`` may be given again with the same overrides (the
    experiment runner does): values equal to the saved ones are no change.  A value of ``path`` that
    differs from the saved config and is not an override is a :class:`ConfigError` rather than a
    silent change of the run.
    """
    overrides = list(overrides or [])
    run = Path(run_dir)
    fixed = [f"train.run_dir={run}"] + (["train.resume=true"] if resume else [])
    saved_file = run / RUN_CONFIG
    if not resume or not saved_file.is_file():
        if resume and path is None:
            raise ConfigError(f"cannot resume {run}: {saved_file} does not exist (not a run directory, or one "
                              "that never started); start the run with --config/overrides, without --resume")
        return load_config(cls, path, overrides + fixed), ""
    saved = load_config(cls, saved_file, fixed)
    if path is None:
        cfg = load_config(cls, saved_file, overrides + fixed)
    else:
        cfg = load_config(cls, path, overrides + fixed)
        given = override_keys(overrides)
        stray = {k: v for k, v in config_changes(saved, cfg).items()
                 if not any(k == g or k.startswith(g + ".") for g in given)}
        if stray:
            shown = ", ".join(f"{k}: {_shown(a)} in the run, {_shown(b)} in {path}"
                              for k, (a, b) in list(stray.items())[:4])
            more = f" (+{len(stray) - 4} more)" if len(stray) > 4 else ""
            raise ConfigError(
                f"cannot resume {run}: --config {path} differs from the run's saved {saved_file}: {shown}{more}; "
                "resume with the run directory alone (no --config), or give the values to change as key=value")
    changes = config_changes(saved, cfg)
    if not changes:
        return cfg, ""
    shown = ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in changes.items())
    return cfg, f"resuming {run} with changes to its saved config {saved_file}: {shown}"
