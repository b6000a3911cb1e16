"""`checkpoint.init_from` checked against the run config before any process starts.

The source's shape (`resolve.source_model`: an HF directory's config.json or a checkpoint.dir's
run_config.yaml) is compared field by field with the run's (`SHAPE_FIELDS`); every difference
is listed with the key to set, like the other config errors.
"""

from __future__ import annotations

import math
from typing import Optional

from .errors import ConfigError
from .resolve import FROM_INIT, source_model

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
