"""Hugging Face <-> ponder-pt weights and configs (GPTNeoXForCausalLM, LlamaForCausalLM,
GPT2LMHeadModel).

Weights go through a "full" state dict in our naming (unsharded tensors), which is then
sharded for this rank with the same rule megatron's CPU init uses (`parallel.shard`), so
loading works at any TP degree. Export gathers the TP shards (collective over the TP group).

Layout notes:
* fused QKV: per KV group [q x (heads/kv_heads), k, v] x head_dim -- GPT-NeoX's own
  per-head [q, k, v] interleave when kv_heads == heads; LLaMA's separate q/k/v are regrouped.
* LLaMA gate/up are fused as fc1 = [gate; up] and TP-split with stride 2.
* transformers 5 names GPT-NeoX's head `lm_head`; `embed_out` (older checkpoints) is accepted.
* GPT-2's Conv1D weights are stored [in, out] (transposed to our [out, in]); its `c_attn`
  is [q | k | v] along the output dim, each head-contiguous, and is regrouped into our
  per-head [q, k, v] layout before any TP split, so a contiguous TP shard of the fused QKV
  (weight rows and bias) still holds whole heads. `wpe` (positions) is replicated over TP.
  Stock GPT-2 directories (openai-community/gpt2) store GPT2Model keys without the
  `transformer.` prefix and unused `attn.bias` mask buffers: both are accepted.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from ..config.schema import ModelConfig
from . import parallel as par

_PREFIX = {"gpt_neox": "gpt_neox.", "llama": "model."}
_LAYER_KEYS = {
    "gpt_neox": {
        "ln1": "input_layernorm", "ln2": "post_attention_layernorm",
        "attn.qkv": "attention.query_key_value", "attn.dense": "attention.dense",
        "mlp.fc1": "mlp.dense_h_to_4h", "mlp.fc2": "mlp.dense_4h_to_h",
    },
    "llama": {
        "ln1": "input_layernorm", "ln2": "post_attention_layernorm",
        "attn.dense": "self_attn.o_proj", "mlp.fc2": "mlp.down_proj",
    },
}
_TOP_KEYS = {
    "gpt_neox": {"embed": "embed_in", "final_norm": "final_layer_norm"},
    "llama": {"embed": "embed_tokens", "final_norm": "norm"},
}


# --------------------------------------------------------------------------- configs


def hf_config_from(cfg: ModelConfig, vocab_size: Optional[int] = None):
    """A transformers config (GPTNeoXConfig, LlamaConfig or GPT2Config) for our model shape.

    vocab_size: HF vocabulary rows if not all of cfg.vocab_size (see `to_hf_state_dict`).
    Token ids (bos/eos/pad) are left at transformers' defaults: set them from the tokenizer.
    Raises ValueError when the stock class cannot represent the model: the rules are
    `ponder_pt.config.exportable`, which config validation applies before training too.
    """
    from ..config.exportable import export_problems

    found = export_problems(cfg)
    if found:
        raise ValueError(f"{cfg.arch} export impossible: " + "; ".join(found))
    rope = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    common = dict(vocab_size=vocab_size or cfg.vocab_size, hidden_size=cfg.hidden_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  intermediate_size=cfg.ffn_size, max_position_embeddings=cfg.max_seq_len,
                  tie_word_embeddings=cfg.tie_embeddings)
    if cfg.arch == "gpt_neox":
        from transformers import GPTNeoXConfig

        rope["partial_rotary_factor"] = float(cfg.rotary_pct)
        return GPTNeoXConfig(**common, hidden_act="gelu", layer_norm_eps=cfg.norm_eps,
                             use_parallel_residual=cfg.parallel_residual, attention_bias=True,
                             rope_parameters=rope, attention_dropout=cfg.dropout,
                             hidden_dropout=cfg.dropout)
    if cfg.arch == "gpt2":
        from transformers import GPT2Config

        rows = vocab_size or cfg.vocab_size
        eot = 50256 if rows > 50256 else None  # GPT-2's <|endoftext|>, when it exists
        return GPT2Config(vocab_size=rows, n_positions=cfg.max_seq_len,
                          bos_token_id=eot, eos_token_id=eot,
                          n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                          n_inner=None if cfg.ffn_size == 4 * cfg.hidden_size else cfg.ffn_size,
                          activation_function="gelu_new", resid_pdrop=cfg.dropout,
                          embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                          layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=True,
                          scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                          reorder_and_upcast_attn=False)
    if cfg.arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common, num_key_value_heads=cfg.kv_heads, hidden_act="silu",
                           rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
                           attention_bias=False, mlp_bias=False, attention_dropout=cfg.dropout)
    raise ValueError(f"unknown arch {cfg.arch!r}")


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


def model_config_from_hf(hf_config, base: Optional[ModelConfig] = None) -> ModelConfig:
    """Our ModelConfig for a GPTNeoXConfig / LlamaConfig (fields not in HF come from `base`).

    vocab_size is HF's; pad it for TP (`ponder_pt.tokenizer.pad_vocab_size`) before building
    a model at TP > 1 if it does not divide -- `load_hf_state_dict` zero-fills extra rows.
    """
    base = base or ModelConfig()
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


def _gpt2_model_config(hf_config, base: ModelConfig) -> ModelConfig:
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


# --------------------------------------------------------------------------- tensors


def _qkv_from_hf(q, k, v, cfg: ModelConfig):
    """Separate q [H*d, h], k/v [Hkv*d, h] -> fused grouped layout [(Hkv*(g+2))*d, h]."""
    g, d, nkv = cfg.num_heads // cfg.kv_heads, cfg.head_dim, cfg.kv_heads
    rest = q.shape[1:]
    parts = [q.reshape(nkv, g, d, *rest), k.reshape(nkv, 1, d, *rest), v.reshape(nkv, 1, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _qkv_to_hf(qkv, cfg: ModelConfig):
    g, d, nkv = cfg.num_heads // cfg.kv_heads, cfg.head_dim, cfg.kv_heads
    rest = qkv.shape[1:]
    t = qkv.reshape(nkv, g + 2, d, *rest)
    return (t[:, :g].reshape(-1, *rest), t[:, g].reshape(-1, *rest), t[:, g + 1].reshape(-1, *rest))


def _pad_rows(t: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    if t.shape[0] > rows:
        raise ValueError(f"{name}: HF has {t.shape[0]} vocabulary rows, model.vocab_size is {rows}")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


_GPT2_LINEAR = {"attn.dense": "attn.c_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _gpt2_to_full(sd: dict, cfg: ModelConfig) -> dict:
    # GPT2LMHeadModel keys are `transformer.*`; a bare GPT2Model (stock GPT-2 dirs) has none
    pre = "transformer." if "transformer.wte.weight" in sd else ""
    h = cfg.hidden_size
    out = {"embed.weight": _pad_rows(sd[pre + "wte.weight"], cfg.vocab_size, "embed.weight"),
           "pos_embed.weight": sd[pre + "wpe.weight"],
           "final_norm.weight": sd[pre + "ln_f.weight"], "final_norm.bias": sd[pre + "ln_f.bias"]}
    for i in range(cfg.num_layers):
        hp, op = f"{pre}h.{i}.", f"layers.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            for suf in ("weight", "bias"):
                out[f"{op}{ours}.{suf}"] = sd[f"{hp}{theirs}.{suf}"]
        w = sd[hp + "attn.c_attn.weight"].t()  # Conv1D [h, 3h] -> [3h, h] = [q; k; v]
        out[op + "attn.qkv.weight"] = _qkv_from_hf(*w.split(h, dim=0), cfg)
        out[op + "attn.qkv.bias"] = _qkv_from_hf(*sd[hp + "attn.c_attn.bias"].split(h), cfg)
        for ours, theirs in _GPT2_LINEAR.items():
            out[f"{op}{ours}.weight"] = sd[f"{hp}{theirs}.weight"].t()
            out[f"{op}{ours}.bias"] = sd[f"{hp}{theirs}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def _full_to_gpt2(full: dict, cfg: ModelConfig, rows: int) -> dict:
    pre = "transformer."
    embed = full["embed.weight"][:rows]
    sd = {pre + "wte.weight": embed, pre + "wpe.weight": full["pos_embed.weight"],
          pre + "ln_f.weight": full["final_norm.weight"], pre + "ln_f.bias": full["final_norm.bias"],
          "lm_head.weight": embed}
    for i in range(cfg.num_layers):
        hp, op = f"{pre}h.{i}.", f"layers.{i}."
        for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
            for suf in ("weight", "bias"):
                sd[f"{hp}{theirs}.{suf}"] = full[f"{op}{ours}.{suf}"]
        qkv = _qkv_to_hf(full[op + "attn.qkv.weight"], cfg)
        sd[hp + "attn.c_attn.weight"] = torch.cat(qkv).t()  # -> Conv1D [h, 3h]
        sd[hp + "attn.c_attn.bias"] = torch.cat(_qkv_to_hf(full[op + "attn.qkv.bias"], cfg))
        for ours, theirs in _GPT2_LINEAR.items():
            sd[f"{hp}{theirs}.weight"] = full[f"{op}{ours}.weight"].t()
            sd[f"{hp}{theirs}.bias"] = full[f"{op}{ours}.bias"]
    return {k: v.contiguous() for k, v in sd.items()}


def hf_to_full(sd: dict, cfg: ModelConfig) -> dict:
    """HF state dict -> full (unsharded) tensors under our parameter names.

    An HF vocabulary smaller than cfg.vocab_size (padded for TP) gets zero rows appended to
    the embedding and the output head.
    """
    if cfg.arch == "gpt2":
        return _gpt2_to_full(sd, cfg)
    arch, pre = cfg.arch, _PREFIX[cfg.arch]
    out = {ours: sd[pre + theirs + ".weight"] for ours, theirs in
           [("embed", _TOP_KEYS[arch]["embed"]), ("final_norm", _TOP_KEYS[arch]["final_norm"])]}
    out = {k + ".weight": v for k, v in out.items()}
    if arch == "gpt_neox":
        out["final_norm.bias"] = sd[pre + "final_layer_norm.bias"]
    if not cfg.tie_embeddings:
        head = sd.get("lm_head.weight", sd.get("embed_out.weight"))
        if head is None:
            raise KeyError("HF state dict has no lm_head.weight / embed_out.weight")
        out["output.weight"] = head
    for name in ("embed.weight", "output.weight"):
        if name in out:
            out[name] = _pad_rows(out[name], cfg.vocab_size, name)
    suffixes = ("weight", "bias") if arch == "gpt_neox" else ("weight",)
    for i in range(cfg.num_layers):
        hp, op = f"{pre}layers.{i}.", f"layers.{i}."
        for ours, theirs in _LAYER_KEYS[arch].items():
            for suf in suffixes:
                out[f"{op}{ours}.{suf}"] = sd[f"{hp}{theirs}.{suf}"]
        if arch == "llama":
            out[op + "attn.qkv.weight"] = _qkv_from_hf(
                *(sd[f"{hp}self_attn.{n}_proj.weight"] for n in "qkv"), cfg)
            out[op + "mlp.fc1.weight"] = torch.cat(
                [sd[hp + "mlp.gate_proj.weight"], sd[hp + "mlp.up_proj.weight"]], dim=0)
    return out


def full_to_hf(full: dict, cfg: ModelConfig, vocab_size: Optional[int] = None) -> dict:
    """Inverse of `hf_to_full` (includes lm_head.weight also when tied, like HF's state_dict).

    vocab_size: keep only the first rows of the embedding / head (drop TP padding).
    """
    rows = vocab_size or cfg.vocab_size
    if cfg.arch == "gpt2":
        return _full_to_gpt2(full, cfg, rows)
    arch, pre = cfg.arch, _PREFIX[cfg.arch]
    embed = full["embed.weight"][:rows]
    sd = {pre + _TOP_KEYS[arch]["embed"] + ".weight": embed,
          pre + _TOP_KEYS[arch]["final_norm"] + ".weight": full["final_norm.weight"]}
    if arch == "gpt_neox":
        sd[pre + "final_layer_norm.bias"] = full["final_norm.bias"]
    sd["lm_head.weight"] = embed if cfg.tie_embeddings else full["output.weight"][:rows]
    suffixes = ("weight", "bias") if arch == "gpt_neox" else ("weight",)
    for i in range(cfg.num_layers):
        hp, op = f"{pre}layers.{i}.", f"layers.{i}."
        for ours, theirs in _LAYER_KEYS[arch].items():
            for suf in suffixes:
                sd[f"{hp}{theirs}.{suf}"] = full[f"{op}{ours}.{suf}"]
        if arch == "llama":
            q, k, v = _qkv_to_hf(full[op + "attn.qkv.weight"], cfg)
            sd[hp + "self_attn.q_proj.weight"] = q
            sd[hp + "self_attn.k_proj.weight"] = k
            sd[hp + "self_attn.v_proj.weight"] = v
            gate, up = full[op + "mlp.fc1.weight"].chunk(2, dim=0)
            sd[hp + "mlp.gate_proj.weight"] = gate
            sd[hp + "mlp.up_proj.weight"] = up
    return {k: v.contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------- model io


def load_hf_state_dict(model: torch.nn.Module, sd: dict, cfg: Optional[ModelConfig] = None) -> None:
    """Copy an HF state dict into `model` (this rank's shards). Every TP rank calls it."""
    load_full_state_dict(model, hf_to_full(sd, cfg or model.cfg), source="HF")


def load_full_state_dict(model: torch.nn.Module, full: dict, source: str = "source") -> None:
    """Copy unsharded weights (our names) into `model`, keeping this rank's TP shard of each."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(full))
    if missing:
        raise KeyError(f"{source}: no weights for {missing}")
    with torch.no_grad():
        for name, p in params.items():
            spec = par.partition_spec(p)
            t = par.shard(full[name], *spec) if spec else full[name]
            if t.shape != p.shape:
                raise ValueError(f"{name}: {source} gives {tuple(t.shape)} for this rank, "
                                 f"model has {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))


def full_state_dict(model: torch.nn.Module) -> dict:
    """Unsharded copies of every parameter (collective over the TP group)."""
    return {name: par.gather_full(p) for name, p in model.named_parameters()}


def to_hf_state_dict(model: torch.nn.Module, cfg: Optional[ModelConfig] = None,
                     vocab_size: Optional[int] = None) -> dict:
    """HF state dict of `model`, TP shards gathered (collective: every TP rank calls it).

    vocab_size: export only that many vocabulary rows (default: all padded rows; pair with
    `hf_config_from(cfg, vocab_size=...)`).
    """
    return full_to_hf(full_state_dict(model), cfg or model.cfg, vocab_size)
