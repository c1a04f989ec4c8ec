"""Config files and strict `--config.section.field=value` overrides (pure Python)."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pathlib
import sys
import types
import typing

from dip_jax.config.checks import ConfigError, deferred_checks
from dip_jax.config.train_config import TrainConfig, with_overrides

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def load_config_file(path: str | pathlib.Path) -> TrainConfig:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    if path.suffix != ".py":
        raise ConfigError(f"--config: {path} is not a Python config file (.py with get_config())")
    spec = importlib.util.spec_from_file_location(f"_dip_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module      # as an import would: dataclasses and pickle look it up there
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as e:          # a config file is user code: report where it broke, in one line
        raise ConfigError(f"--config: {path} failed to load: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path} defines no get_config()")
    try:
        cfg = module.get_config()
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"--config: {path}: get_config() failed: {type(e).__name__}: {e}".splitlines()[0]) from None
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"--config: {path}: get_config() returned {type(cfg).__name__}, not TrainConfig")
    return cfg


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _field_type(obj, name: str, key: str):
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"unknown config key {key!r}")
    hints = typing.get_type_hints(type(obj))
    if name not in hints or name not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(f"unknown config key {key!r}")
    return hints[name]


def _coerce(raw: str, tp, optional: bool, key: str):
    text = raw.strip()
    if optional and text.lower() == "none":
        return None
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{key}: a section can only be set to 'none' (or set its fields)")
    try:
        if tp is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if tp is tuple or typing.get_origin(tp) is tuple:
            value = ast.literal_eval(text) if text else ()
            if isinstance(value, list):
                value = tuple(value)
            if isinstance(value, str):
                value = tuple(v for v in value.split(",") if v)
            if not isinstance(value, tuple):
                raise ValueError
            return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    except (ValueError, SyntaxError):
        pass
    raise ConfigError(f"{key}: cannot parse {raw!r} as {getattr(tp, '__name__', tp)}")


def apply_override(cfg: TrainConfig, assignment: str) -> TrainConfig:
    """Apply one `section.field=value` (the `--config.` prefix already removed)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} has no '=value'")
    key, raw = assignment.split("=", 1)
    path = tuple(key.strip().split("."))
    full = "config." + ".".join(path)
    node = cfg
    for i, name in enumerate(path):
        tp, optional = _unwrap_optional(_field_type(node, name, full))
        if i < len(path) - 1:
            node = getattr(node, name)
            if node is None:
                raise ConfigError(f"{full}: section {'.'.join(path[:i + 1])!r} is disabled (None) in this config")
    value = _coerce(raw, tp, optional, full)
    return with_overrides(cfg, path, value)


def apply_overrides(cfg: TrainConfig, assignments: list[str]) -> TrainConfig:
    """Apply every assignment, then check the result once: cross-field rules judge the final
    config, so the order of the overrides does not matter."""
    with deferred_checks():
        for a in assignments:
            cfg = apply_override(cfg, a)
    cfg.check()
    return cfg


def describe(cfg: TrainConfig) -> str:
    """Every section and field with its value in `cfg`, one `--config.KEY=VALUE` per line."""
    lines = []

    def walk(node, prefix):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"  [{prefix}{f.name}]")
                walk(value, f"{prefix}{f.name}.")
            else:
                lines.append(f"    --config.{prefix}{f.name}={value!r}")

    for f in dataclasses.fields(cfg):
        lines.append(f"[{f.name}]")
        section = getattr(cfg, f.name)
        walk(section, f"{f.name}.")
    return "\n".join(lines)


def parse_config_args(argv: list[str]) -> tuple[str | None, str | None, list[str], list[str]]:
    """Split argv into (config path, workdir, overrides, other args), strictly.

    Accepts `--config X`, `--config=X`, `--workdir D`, `--config.a.b=v` and `--config.a.b v`.
    """
    config = workdir = None
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        def value():
            nonlocal i
            if "=" in arg:
                return arg.split("=", 1)[1]
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            i += 1
            return argv[i]
        if arg == "--config" or arg.startswith("--config="):
            config = value()
        elif arg == "--workdir" or arg.startswith("--workdir="):
            workdir = value()
        elif arg.startswith("--config."):
            key = arg[len("--config."):]
            overrides.append(key if "=" in key else f"{key}={value()}")
        else:
            rest.append(arg)
        i += 1
    return config, workdir, overrides, rest
