"""Build a `Config` from a named preset or a YAML file plus `--set dotted.key=value` overrides.

Resolution order (later wins): dataclass defaults < named run preset (or the YAML file's
`base:` preset) < the YAML file < `--set` overrides. `model.preset` then fills every model
field the user did not set explicitly (`resolve.resolve_model_preset`).
"""

from __future__ import annotations

from typing import Iterable

from .resolve import resolve_model_preset
from .schema import Config
from .tree import build, load_raw, parse_override, set_path
from .validate import check


def load_config(name_or_path: str | None = None, overrides: Iterable[str] = (),
                validate: bool = True) -> Config:
    """The one entry point every command uses to obtain its configuration."""
    raw = load_raw(name_or_path)
    for text in overrides:
        path, value = parse_override(text)
        set_path(raw, path, value)
    raw = resolve_model_preset(raw)
    cfg = build(Config, raw, "")
    if validate:
        check(cfg)
    return cfg
