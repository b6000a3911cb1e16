"""Open Hugging Face directories without running code from them unless the user asks.

ponder-pt registers its pondering classes (the same modules the export copies into the
directory, `ponder_pt.export.templates`) with transformers' Auto classes under the model types
the export writes (`ponder_gpt_neox`, `ponder_llama`, `ponder_gpt2`). transformers then prefers
these registered classes to the directory's `auto_map` copy, so ponder exports load with the
installed package's code. Any other directory whose config (or tokenizer config) names code
through `auto_map` is refused unless `trust_remote_code` is set (`--trust-remote-code`).

    register_auto_classes()
    model = from_pretrained(AutoModelForCausalLM, path, trust_remote_code=False, dtype=...)
"""

from __future__ import annotations

import json
import os

TRUST_FLAG = "--trust-remote-code"


class RemoteCodeRefused(ValueError):
    """A model directory needs code that ponder-pt and transformers do not ship."""


def register_auto_classes() -> None:
    """AutoConfig / AutoModelForCausalLM know ponder_gpt_neox, ponder_llama and ponder_gpt2
    (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .templates.configuration_ponder import (PonderGPT2Config, PonderGPTNeoXConfig,
                                                 PonderLlamaConfig)
    from .templates.modeling_ponder import (PonderGPT2ForCausalLM, PonderGPTNeoXForCausalLM,
                                            PonderLlamaForCausalLM)

    for config_cls, model_cls in ((PonderGPTNeoXConfig, PonderGPTNeoXForCausalLM),
                                  (PonderLlamaConfig, PonderLlamaForCausalLM),
                                  (PonderGPT2Config, PonderGPT2ForCausalLM)):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return {}


def remote_code_reason(path: str) -> str | None:
    """Why loading the local directory `path` would run code from it, or None.

    config.json's `auto_map` is only used when its model_type is unknown to transformers
    (ponder types are registered above); a tokenizer `auto_map` is always code."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    register_auto_classes()
    cfg = _read_json(os.path.join(path, "config.json"))
    if cfg.get("auto_map") and cfg.get("model_type") not in CONFIG_MAPPING:
        return (f"its config.json (model_type {cfg.get('model_type')!r}) maps to code in the "
                f"directory ({', '.join(sorted(set(cfg['auto_map'].values()), key=str))})")
    tok = _read_json(os.path.join(path, "tokenizer_config.json"))
    if tok.get("auto_map"):
        return "its tokenizer_config.json maps the tokenizer to code in the directory"
    return None


def refuse_remote_code(path: str, trust_remote_code: bool) -> None:
    """Raise RemoteCodeRefused when `path` (a local directory) needs code and the user did not
    opt in. Hub names are checked by transformers itself (see from_pretrained below)."""
    if trust_remote_code or not os.path.isdir(path):
        return
    reason = remote_code_reason(path)
    if reason:
        raise RemoteCodeRefused(
            f"{path}: refusing to run code from the model directory: {reason}. Inspect the "
            f"files, then pass {TRUST_FLAG} to run them.")


def from_pretrained(auto_cls, path: str, trust_remote_code: bool = False, **kwargs):
    """`auto_cls.from_pretrained` with ponder classes registered and remote code refused unless
    asked for; transformers' own refusal (hub names) is re-raised naming our flag. A bad value
    in config.json is re-raised as a PonderConfigError (a ValueError) naming the file: the
    Auto classes build a registered config from its dict, which knows no path."""
    from .templates.configuration_ponder import config_error_at

    register_auto_classes()
    refuse_remote_code(path, trust_remote_code)
    try:
        return auto_cls.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as exc:
        named = config_error_at(exc, path)
        if named is not None:
            raise named from None
        if trust_remote_code or "trust_remote_code" not in str(exc):
            raise
        raise RemoteCodeRefused(f"{path}: the model needs code that ponder-pt does not ship; "
                                f"pass {TRUST_FLAG} to run it ({exc})") from exc
    except Exception as exc:  # transformers' strict config fields (no ValueError)
        named = config_error_at(exc, path)
        if named is None:
            raise
        raise named from None
