"""`checkpoint.init_from` checked against the run config before any process starts.

The source is an HF directory (its config.json, read with the same mapping `convert from-hf`
uses: `export.from_hf.read_hf_config` + `models.hf.model_config_from_hf`, so every model_type
those support -- gpt_neox, llama, gpt2 -- is covered here without another table) or a native
checkpoint.dir (its run_config.yaml). Its shape is compared field by field with the run's
(`SHAPE_FIELDS`); every difference is listed with the key to set, like the other config errors.
`model.preset=from_init` takes the shape (`FROM_INIT_FIELDS`) from the source instead; fields set
explicitly still win (and are then compared like any other).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

from .loader import ConfigError, _deep_merge
from .schema import ModelConfig

FROM_INIT = "from_init"

# (ModelConfig attribute compared, dotted key to set, what it is)
SHAPE_FIELDS = (
    ("arch", "model.arch", "architecture"),
    ("num_layers", "model.num_layers", "layers"),
    ("hidden_size", "model.hidden_size", "hidden size"),
    ("num_heads", "model.num_heads", "attention heads"),
    ("kv_heads", "model.num_kv_heads", "key/value heads"),
    ("ffn_size", "model.ffn_hidden_size", "FFN size"),
    ("rotary_pct", "model.rotary_pct", "rotary fraction"),
    ("rotary_base", "model.rotary_base", "rotary base"),
    ("parallel_residual", "model.parallel_residual", "parallel residual"),
    ("tie_embeddings", "model.tie_embeddings", "tied input/output embeddings"),
)
# model.* fields that model.preset=from_init copies from the source (not vocab_size: the
# tokenizer's padded vocabulary decides it, and rows beyond the source's start at zero)
FROM_INIT_FIELDS = ("arch", "num_layers", "hidden_size", "num_heads", "num_kv_heads",
                    "ffn_hidden_size", "max_seq_len", "rotary_pct", "rotary_base",
                    "parallel_residual", "tie_embeddings", "norm_eps")


def _kind(path: str) -> str:
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    if os.path.exists(os.path.join(path, "run_config.yaml")):
        return "native"
    return ""


@functools.lru_cache(maxsize=8)
def _read(path: str, stamp: float) -> ModelConfig:
    if _kind(path) == "hf":
        from ..export.from_hf import read_hf_config
        from ..models.hf import model_config_from_hf

        hf_cfg, _ = read_hf_config(path)
        return model_config_from_hf(hf_cfg)
    from ..export.native import load_run_config

    return load_run_config(path).model


def source_model(path: str) -> ModelConfig:
    """The model shape stored at `path` (vocab_size = the source's vocabulary rows)."""
    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint.init_from={path}: no such directory")
    kind = _kind(path)
    if not kind:
        raise ConfigError(f"checkpoint.init_from={path}: neither an HF directory (config.json) "
                          f"nor a checkpoint.dir (run_config.yaml, e.g. from `ponder-pt convert "
                          f"from-hf`)")
    meta = os.path.join(path, "config.json" if kind == "hf" else "run_config.yaml")
    try:
        return _read(os.path.abspath(path), os.path.getmtime(meta))
    except ConfigError:
        raise
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"checkpoint.init_from={path}: cannot read its model shape "
                          f"({exc})") from None


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def init_from_problems(cfg, vocab_size: Optional[int] = None) -> list[str]:
    """Every difference between the run's model and the init_from source, with its fix."""
    path = cfg.checkpoint.init_from
    if not path:
        return []
    try:
        src = source_model(path)
    except ConfigError as exc:
        return exc.problems
    m = cfg.model
    hint = (" (or model.preset=from_init to take the whole shape from it)"
            if m.preset != FROM_INIT else "")
    out = []
    for attr, key, what in SHAPE_FIELDS:
        if attr == "rotary_base" and (src.rotary_pct == 0 or m.rotary_pct == 0):
            continue  # no rotary embedding (gpt2): the base means nothing
        ours, theirs = getattr(m, attr), getattr(src, attr)
        if not _same(ours, theirs):
            value = str(theirs).lower() if isinstance(theirs, bool) else theirs
            out.append(f"{key}={ours} differs from checkpoint.init_from {path} ({what}: "
                       f"{theirs}): set --set {key}={value}{hint}")
    rows = vocab_size if vocab_size is not None else m.vocab_size
    if rows is not None and src.vocab_size is not None and src.vocab_size > rows:
        step = m.make_vocab_size_divisible_by * max(cfg.parallel.tp, 1)
        fit = -(-src.vocab_size // step) * step
        out.append(f"model.vocab_size: the run has {rows} vocabulary rows, checkpoint.init_from "
                   f"{path} has {src.vocab_size}: point data.tokenizer at the source's "
                   f"tokenizer or set --set model.vocab_size={fit}")
    return out


def resolve_from_init(raw: dict) -> dict:
    """`model.preset=from_init`: fill the model fields the user did not set from the source."""
    model = raw.get("model") or {}
    path = (raw.get("checkpoint") or {}).get("init_from")
    if not path:
        raise ConfigError("model.preset=from_init takes the model shape from "
                          "checkpoint.init_from, which is not set: add --set "
                          "checkpoint.init_from=DIR (an HF directory or a checkpoint.dir)")
    if all(key in model for key in FROM_INIT_FIELDS):
        return raw  # a saved run config: nothing to read (the source may be gone)
    src = source_model(str(path))
    shape = {key: getattr(src, key) for key in FROM_INIT_FIELDS}
    return _deep_merge(raw, {"model": {**shape, **model}})
