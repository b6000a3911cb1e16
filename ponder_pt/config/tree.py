"""Settings as nested dicts (named presets, YAML files, `--set dotted.key=value`) and their
typed dataclasses, both ways: `build` checks every key and value against the dataclass fields,
`config_to_dict` / `config_to_yaml` write a config back out.

The pretraining config and the fine-tuning config (`ponder_pt.early_exit.config`) share it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from typing import Any, Union

import yaml

from .errors import ConfigError, suggest
from .presets import RUN_PRESETS


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], '3e-4' parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. --set train.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key; expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def load_raw(name_or_path: str | None) -> dict:
    """The user's layer of settings (preset and/or YAML file) as a nested dict."""
    if name_or_path is None:
        return {}
    if name_or_path in RUN_PRESETS:
        return copy.deepcopy(RUN_PRESETS[name_or_path])
    looks_like_file = name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path
    if not os.path.exists(name_or_path):
        if looks_like_file:
            raise ConfigError(f"--config {name_or_path!r}: no such file")
        raise ConfigError(
            f"--config {name_or_path!r} is neither a YAML file nor a named config"
            f"{suggest(name_or_path, RUN_PRESETS)}; named configs: {', '.join(sorted(RUN_PRESETS))}"
        )
    raw = load_raw_yaml(name_or_path)
    base = raw.pop("base", None)
    if base is not None:
        raw = deep_merge(load_raw(str(base)), raw)
    return raw


def load_raw_yaml(path: str) -> dict:
    """A YAML config file as a nested dict (a mapping of sections)."""
    if not os.path.exists(path):
        raise ConfigError(f"--config {path!r}: no such file")
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: top level must be a mapping of sections")
    return raw


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(key, value, args[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int,)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            as_float = None
        if as_float is not None and as_float.is_integer() and not isinstance(value, bool):
            return int(as_float)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list and typing.get_args(tp) == (int,):  # e.g. [2, 3] or "2,3"
        items = value if isinstance(value, list) else (
            value.replace(",", " ").split() if isinstance(value, str) else [value])
        return [_coerce(key, item, int) for item in items]
    elif tp is list or origin is list:
        if isinstance(value, list):
            return [str(v) for v in value]
        if isinstance(value, str):
            return value.replace(",", " ").split()
    else:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems, kwargs = [], {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            problems.append(f"{dotted}: unknown key{suggest(key, fields)}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(f"{dotted}: expected a section (mapping), got {value!r}")
                continue
            try:
                kwargs[key] = build(tp, value, f"{dotted}.")
            except ConfigError as exc:
                problems.extend(exc.problems)
            continue
        try:
            kwargs[key] = _coerce(dotted, value, tp)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return cls(**kwargs)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
