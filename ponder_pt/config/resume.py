"""A resume checked against the checkpoint it resumes, before any process group starts.

The checkpoint's own `run_config.yaml` says what was trained. A different model (its shape,
vocabulary rows, pondering passes or feedback, halting head) cannot be resumed: the weights
would not load, or would load into another function. Each difference is refused, naming the
key and the `--set` that matches the checkpoint. Every other setting that changed (lr, iters,
batch, data) is allowed and listed, so a change is never silent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from ..weights.files import RUN_CONFIG, list_tags, newest_complete, resume_source
from .errors import ConfigError
from .init_source import SHAPE_FIELDS
from .resolve import load_run_config
from .schema import Config
from .tree import config_to_dict

# resumed runs must match these besides SHAPE_FIELDS: (dotted key, what it is)
MODEL_FIELDS = (
    ("model.vocab_size", "vocabulary rows"),
    ("ponder.steps", "pondering passes K"),
    ("ponder.feedback", "pondering feedback"),
    ("ponder.halting.mode", "halting head"),
)
# where this run lives, not what it trains: never listed as a change
LOCATION_KEYS = ("run.dir", "run.overwrite", "log.dir", "checkpoint.dir", "checkpoint.load")


@dataclass
class ResumePlan:
    source: str  # the directory holding the checkpoint
    tag: str
    changes: list  # (dotted key, checkpoint's value, this run's value)

    def describe(self) -> list[str]:
        """The lines a resumed run prints first."""
        lines = [f"resuming from {os.path.join(self.source, self.tag)}"]
        if self.changes:
            lines.append("settings changed since that checkpoint's run:")
            lines += [f"  {key}: {old!r} -> {new!r}" for key, old, new in self.changes]
        return lines


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _model_keys(cfg: Config) -> list[tuple[str, str, Any]]:
    """(dotted key, what it is, value) of everything a resumed run may not change."""
    out = [(key, what, getattr(cfg.model, attr)) for attr, key, what in SHAPE_FIELDS]
    if cfg.model.arch == "gpt2":  # learned positions: one weight row per position
        out.append(("model.max_seq_len", "learned positions", cfg.model.max_seq_len))
    flat = flatten(config_to_dict(cfg))
    return out + [(key, what, flat[key]) for key, what in MODEL_FIELDS]


def _setting(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def model_mismatches(saved: Config, cfg: Config, where: str) -> list[str]:
    theirs = {key: value for key, _, value in _model_keys(saved)}
    out = []
    for key, what, ours in _model_keys(cfg):
        if key in theirs and theirs[key] != ours:
            out.append(f"{key}={_setting(ours)}, but {where} was trained with "
                       f"{_setting(theirs[key])} ({what}): --set {key}={_setting(theirs[key])}")
    return out


def setting_changes(saved: Config, cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) of every other setting that differs."""
    old, new = flatten(config_to_dict(saved)), flatten(config_to_dict(cfg))
    if new.get("data.tokenizer"):  # saved absolute (write_run_config)
        new["data.tokenizer"] = os.path.abspath(new["data.tokenizer"])
    fixed = {key for key, _, _ in _model_keys(cfg)}
    return [(key, old.get(key), value) for key, value in new.items()
            if key not in LOCATION_KEYS and key not in fixed and old.get(key) != value]


def plan_resume(cfg: Config) -> Optional[ResumePlan]:
    """What this run resumes (None: it starts afresh), refusing what it cannot do.

    Raises ConfigError when checkpoint.load names nothing to resume, or the checkpoint's
    model differs from this run's."""
    ckpt, load = cfg.checkpoint.dir, cfg.checkpoint.load
    if load and not os.path.isdir(load):
        raise ConfigError(f"checkpoint.load={load}: no such directory; point it at another "
                          "run's directory or its checkpoints/", headline="cannot resume")
    src = resume_source(ckpt, load) if ckpt else load
    if not src:
        return None
    tag = newest_complete(src)
    if tag is None:
        if src == ckpt or not load:
            return None  # a fresh run (an unfinished save in its own dir is skipped)
        found = list_tags(src)
        raise ConfigError(f"checkpoint.load={load}: no complete checkpoint in {src} ("
                          + (f"tags there: {', '.join(found)}, none complete" if found
                             else "no step_NNNNNNNN tags") + ")", headline="cannot resume")
    if not os.path.exists(os.path.join(src, RUN_CONFIG)):
        return ResumePlan(src, tag, [])  # no record of what was run: nothing to compare
    saved = load_run_config(src)
    where = os.path.join(src, tag)
    problems = model_mismatches(saved, cfg, where)
    if problems:
        raise ConfigError(problems + [
            "a resumed run trains the same model; to train another one, start a new run "
            "(another --out), with checkpoint.init_from for weights that fit it"],
            headline=f"cannot resume {where}: the model differs")
    return ResumePlan(src, tag, setting_changes(saved, cfg))
