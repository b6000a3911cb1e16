"""From nested settings to a typed `Config`: the model shape of `model.preset` -- a named shape,
or `from_init`, the shape of the `checkpoint.init_from` directory -- and the run configs saved
next to checkpoints (`run_config.yaml`), which are read the same way.

A source directory is an HF directory (its config.json, read with the mapping `convert
from-hf` uses, `weights.hf_config`, so every model_type it supports -- gpt_neox, llama, gpt2
-- is covered without another table) or a native checkpoint.dir (its run_config.yaml).
`model.preset=from_init` takes the shape (`FROM_INIT_FIELDS`) from the source; fields set
explicitly still win. `init_source` compares a run's shape with its source.
"""

from __future__ import annotations

import functools
import os

from ..weights.files import RUN_CONFIG, atomic_write, checkpoint_dir, run_config_path
from ..weights.hf_config import model_config_from_hf, read_hf_config
from .errors import ConfigError, suggest
from .presets import MODEL_PRESETS
from .schema import Config, ModelConfig
from .tree import build, config_to_dict, deep_merge, load_raw

FROM_INIT = "from_init"

# model.* fields that model.preset=from_init copies from the source (not vocab_size: the
# tokenizer's padded vocabulary decides it, and rows beyond the source's start at zero)
FROM_INIT_FIELDS = ("arch", "num_layers", "hidden_size", "num_heads", "num_kv_heads",
                    "ffn_hidden_size", "max_seq_len", "rotary_pct", "rotary_base",
                    "parallel_residual", "tie_embeddings", "norm_eps")


def resolve_model_preset(raw: dict) -> dict:
    """Fill model fields from `model.preset`, keeping every field the user set."""
    model = raw.get("model") or {}
    preset = model.get("preset")
    if preset is None:
        return raw
    if preset == FROM_INIT:
        return resolve_from_init(raw)
    if preset not in MODEL_PRESETS:
        raise ConfigError(
            f"model.preset: unknown preset {preset!r}{suggest(str(preset), MODEL_PRESETS)}; "
            f"available: {', '.join(MODEL_PRESETS)}, or from_init (the shape of "
            f"checkpoint.init_from)"
        )
    return deep_merge(raw, {"model": {**MODEL_PRESETS[preset], **model}})


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
    return deep_merge(raw, {"model": {**shape, **model}})


def load_run_config(ckpt_dir: str) -> Config:
    """The run config saved in a checkpoint.dir, or a run directory's checkpoints/
    (unvalidated: it describes what was run)."""
    path = run_config_path(checkpoint_dir(ckpt_dir))
    return build(Config, resolve_model_preset(load_raw(path)), "")


def write_run_config(cfg: Config, ckpt_dir: str) -> None:
    """The resolved run config (tokenizer path made absolute) next to the checkpoints, so
    export and inference can rebuild the model from `checkpoint.dir` alone."""
    import yaml

    raw = config_to_dict(cfg)
    if raw["data"].get("tokenizer"):
        raw["data"]["tokenizer"] = os.path.abspath(raw["data"]["tokenizer"])
    os.makedirs(ckpt_dir, exist_ok=True)
    atomic_write(os.path.join(ckpt_dir, RUN_CONFIG), yaml.safe_dump(raw, sort_keys=False))


def _kind(path: str) -> str:
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    if os.path.exists(os.path.join(path, RUN_CONFIG)):
        return "native"
    return ""


@functools.lru_cache(maxsize=8)
def _read(path: str, stamp: float) -> ModelConfig:
    if _kind(path) == "hf":
        hf_cfg, _ = read_hf_config(path)
        return model_config_from_hf(hf_cfg, ModelConfig())
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
    meta = os.path.join(path, "config.json" if kind == "hf" else RUN_CONFIG)
    try:
        return _read(os.path.abspath(path), os.path.getmtime(meta))
    except ConfigError:
        raise
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"checkpoint.init_from={path}: cannot read its model shape "
                          f"({exc})") from None
