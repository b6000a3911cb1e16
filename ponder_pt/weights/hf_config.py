"""A Hugging Face directory's config.json as ponder-pt's model shape: the stock GPTNeoXConfig /
LlamaConfig / GPT2Config (our pondering exports' too) and the fields our exports add.

Needs only transformers, imported when a function runs (the config layer reads shapes here
without loading torch).

Every field read here is checked first, so a bad value names its key and the file
("config.json: ponder_steps must be an integer >= 0, got 'three' (DIR/config.json)")
instead of failing later in int() or float(): HFConfigError, a ValueError. The pondering
fields follow the rules of the exported configuration class
(`ponder_pt.export.templates.configuration_ponder.ponder_field_problem`, which an export
carries on its own and so cannot be imported from here; tests hold the two to the same
verdicts).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Optional

# config.json fields of our pondering / pause exports on top of the stock config
PONDER_KEYS = ("ponder_steps", "ponder_scale_embeds", "ponder_scale_initial_by_steps",
               "ponder_top_k", "ponder_feedback", "ponder_halting", "ponder_halt_q",
               "pause_token_id", "default_pauses",
               "ponder_transformers", "thought_count", "thought_scale_embeds",
               "pause_every_token", "auto_map")


class HFConfigError(ValueError):
    """A config.json field has a value ponder-pt cannot use; the message names key and file."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def ponder_field_problem(key: str, value) -> Optional[str]:
    """What is wrong with a pondering field of config.json, or None (null = the default)."""
    if key in ("ponder_steps", "ponder_top_k", "default_pauses", "thought_count",
               "pause_every_token"):
        if value is None or (_is_int(value) and value >= 0):
            return None
        return f"{key} must be an integer >= 0, got {value!r}"
    if key == "thought_scale_embeds" and value is None:  # absent (no latent thoughts)
        return None
    if key in ("ponder_scale_embeds", "ponder_scale_initial_by_steps", "thought_scale_embeds"):
        return None if isinstance(value, bool) else f"{key} must be true or false, got {value!r}"
    if key in ("ponder_feedback", "ponder_halting"):
        allowed = (("embedding", "hidden") if key == "ponder_feedback"
                   else ("off", "pondernet", "palbert"))
        if value is None or value in allowed:
            return None
        return f"{key} must be one of {', '.join(allowed)}, got {value!r}"
    if key == "ponder_halt_q":
        if value is None or (_is_number(value) and 0 < value <= 1):
            return None
        return f"{key} must be a number in (0, 1], got {value!r}"
    if key == "pause_token_id":
        if value is None or (_is_int(value) and value >= 0):
            return None
        return f"{key} must be an integer >= 0 or null, got {value!r}"
    if key == "ponder_transformers":
        if value is None:
            return None
        from packaging.specifiers import InvalidSpecifier, SpecifierSet

        try:
            SpecifierSet(value)
            return None
        except (InvalidSpecifier, TypeError):
            return f"{key} must be a version range such as '>=5.17,<5.26', got {value!r}"
    return None


# the stock fields read below (model_config_from_hf), by the check they get; GPT-2 spells
# its sizes n_*; optional ones may be null (transformers then derives them)
_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "intermediate_size", "max_position_embeddings", "n_layer", "n_embd", "n_head",
          "n_positions")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "n_inner")
_POSITIVE = ("layer_norm_eps", "rms_norm_eps", "layer_norm_epsilon", "rope_theta",
             "rotary_emb_base")
_FRACTIONS = ("rotary_pct", "partial_rotary_factor")
_BOOLS = ("tie_word_embeddings", "use_parallel_residual", "attention_bias", "mlp_bias",
          "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "add_cross_attention")


def stock_field_problem(key: str, value) -> Optional[str]:
    """What is wrong with a stock field that ponder-pt reads, or None."""
    if key in _SIZES or (key in _OPTIONAL_SIZES and value is not None):
        return None if _is_int(value) and value >= 1 else \
            f"{key} must be an integer >= 1, got {value!r}"
    if key in _POSITIVE:
        return None if _is_number(value) and value > 0 else \
            f"{key} must be a number > 0, got {value!r}"
    if key in _FRACTIONS:
        return None if _is_number(value) and 0 <= value <= 1 else \
            f"{key} must be a number in [0, 1], got {value!r}"
    if key in _BOOLS:
        return None if isinstance(value, bool) else f"{key} must be true or false, got {value!r}"
    if key in ("rope_parameters", "rope_scaling") and value is not None:
        if not isinstance(value, dict):
            return f"{key} must be an object, got {value!r}"
        for sub, inner in value.items():
            problem = stock_field_problem(sub, inner)
            if problem:
                return f"{key}.{problem}"
    return None


def config_problems(raw: dict) -> list[str]:
    """Every bad value among the fields of a config.json (a dict) that ponder-pt reads."""
    found = []
    for key, value in raw.items():
        problem = (ponder_field_problem(key, value) if key in PONDER_KEYS
                   else stock_field_problem(key, value))
        if problem:
            found.append(problem)
    return found


def read_hf_config(path: str):
    """(stock GPTNeoXConfig/LlamaConfig/GPT2Config, our extra fields) of an HF dir (ponder
    exports too). HFConfigError naming the key and file for a bad value."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    file = os.path.join(path, "config.json")
    with open(file, encoding="utf-8") as fh:
        try:
            raw = json.load(fh)
        except json.JSONDecodeError as exc:
            raise HFConfigError(f"config.json: not JSON ({exc}) ({file})") from None
    if not isinstance(raw, dict):
        raise HFConfigError(f"config.json: expected a JSON object ({file})")
    found = config_problems(raw)
    if found:
        raise HFConfigError(f"config.json: {'; '.join(found)} ({file})")
    extra = {k: raw.pop(k) for k in PONDER_KEYS if k in raw}
    kind = raw.get("model_type", "").removeprefix("ponder_")
    classes = {"gpt_neox": GPTNeoXConfig, "llama": LlamaConfig, "gpt2": GPT2Config}
    if kind not in classes:
        raise ValueError(f"{path}: unsupported model_type {raw.get('model_type')!r} "
                         "(gpt_neox, llama or gpt2)")
    raw["model_type"] = kind
    raw.pop("architectures", None)
    try:
        return classes[kind].from_dict(raw), extra
    except Exception as exc:  # transformers' strict fields: huggingface_hub's, no ValueError
        if not any(c.__name__ == "StrictDataclassError" for c in type(exc).__mro__):
            raise
        raise HFConfigError(f"config.json: {' '.join(str(exc).split())} ({file})") from None


def _rope(hf_config) -> tuple[float, float]:
    """(theta, partial_rotary_factor) across transformers 4.x / 5.x spellings."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        theta = getattr(hf_config, "rotary_emb_base", 10000.0)
    pct = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None))
    if pct is None:
        pct = getattr(hf_config, "rotary_pct", 1.0)
    if params.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"unsupported rope_type {params.get('rope_type')!r}")
    return float(theta), float(pct)


def model_config_from_hf(hf_config, base):
    """`base` (a ModelConfig) with the shape of a GPTNeoXConfig / LlamaConfig / GPT2Config
    (the fields HF has no equivalent of stay as in `base`).

    vocab_size is HF's; pad it for TP (`ponder_pt.tokenizer.pad_vocab_size`) before building
    a model at TP > 1 if it does not divide -- `load_hf_state_dict` zero-fills extra rows.
    """
    kind = hf_config.model_type
    if kind == "gpt2":
        return _gpt2_model_config(hf_config, base)
    theta, pct = _rope(hf_config)
    common = dict(preset=None, num_layers=hf_config.num_hidden_layers,
                  hidden_size=hf_config.hidden_size, num_heads=hf_config.num_attention_heads,
                  ffn_hidden_size=hf_config.intermediate_size,
                  max_seq_len=hf_config.max_position_embeddings, rotary_base=theta,
                  tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
                  vocab_size=hf_config.vocab_size)
    if kind == "gpt_neox":
        if hf_config.hidden_act != "gelu" or not getattr(hf_config, "attention_bias", True):
            raise ValueError("only hidden_act=gelu with attention biases is supported for gpt_neox")
        return replace(base, **common, arch="gpt_neox", num_kv_heads=None, rotary_pct=pct,
                       parallel_residual=bool(hf_config.use_parallel_residual),
                       norm_eps=hf_config.layer_norm_eps)
    if kind == "llama":
        if hf_config.hidden_act != "silu" or getattr(hf_config, "attention_bias", False) \
                or getattr(hf_config, "mlp_bias", False):
            raise ValueError("only silu LLaMA without biases is supported")
        head_dim = getattr(hf_config, "head_dim", None)
        if head_dim and head_dim != hf_config.hidden_size // hf_config.num_attention_heads:
            raise ValueError("head_dim != hidden/heads is not supported")
        return replace(base, **common, arch="llama",
                       num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
                       rotary_pct=pct, parallel_residual=False, norm_eps=hf_config.rms_norm_eps)
    raise ValueError(f"unsupported HF model_type {kind!r}")


GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation


def _gpt2_model_config(hf_config, base):
    c = hf_config
    if c.activation_function not in GPT2_ACTIVATIONS:
        raise ValueError(f"GPT-2 with activation_function={c.activation_function!r} is not "
                         f"supported (only {', '.join(GPT2_ACTIVATIONS)})")
    if not getattr(c, "scale_attn_weights", True) or \
            getattr(c, "scale_attn_by_inverse_layer_idx", False) or \
            getattr(c, "add_cross_attention", False):
        raise ValueError("GPT-2 with scale_attn_weights=False, scale_attn_by_inverse_layer_idx "
                         "or cross-attention is not supported")
    if not getattr(c, "tie_word_embeddings", True):
        raise ValueError("GPT-2 with untied embeddings (tie_word_embeddings=False) is not "
                         "supported: model.arch=gpt2 ties the head to the input embedding")
    return replace(base, preset=None, arch="gpt2", num_layers=c.n_layer, hidden_size=c.n_embd,
                   num_heads=c.n_head, num_kv_heads=None,
                   ffn_hidden_size=c.n_inner or 4 * c.n_embd, max_seq_len=c.n_positions,
                   rotary_pct=0.0, parallel_residual=False, tie_embeddings=True,
                   norm_eps=c.layer_norm_epsilon, vocab_size=c.vocab_size)
