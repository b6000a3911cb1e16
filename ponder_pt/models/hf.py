"""Weights in and out of a built model (this rank's tensor-parallel shards), and the
transformers config that describes our model shape.

Weights go through a "full" state dict in our naming (unsharded tensors; HF's names map to
ours in `ponder_pt.weights.hf_weights`), which is sharded for this rank with the same rule
megatron's CPU init uses (`parallel.shard`), so loading works at any TP degree. Export gathers
the TP shards (collective over the TP group).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ..config.resolve import load_run_config
from ..config.schema import ModelConfig
from ..weights.hf_weights import full_to_hf, hf_to_full, read_hf_weights
from ..weights.layout import pad_vocab
from ..weights.mismatch import WeightsMismatchError
from ..weights.native import read_weights
from . import parallel as par

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


# --------------------------------------------------------------------------- model io


def load_hf_state_dict(model: torch.nn.Module, sd: dict, cfg: Optional[ModelConfig] = None) -> None:
    """Copy an HF state dict into `model` (this rank's shards). Every TP rank calls it."""
    load_full_state_dict(model, hf_to_full(sd, cfg or model.cfg), source="HF")


def load_full_state_dict(model: torch.nn.Module, full: dict, source: str = "source",
                         keep_fresh: tuple = ()) -> None:
    """Copy unsharded weights (our names) into `model`, keeping this rank's TP shard of each.
    keep_fresh: name prefixes the source may lack entirely (they keep their initialisation)."""
    params = dict(model.named_parameters())
    for prefix in keep_fresh:
        if not any(name.startswith(prefix) for name in full):
            params = {n: p for n, p in params.items() if not n.startswith(prefix)}
    missing = sorted(set(params) - set(full))
    if missing:  # (tensors `model` lacks are fine: a pipeline stage holds some layers only)
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                          else "")
        raise WeightsMismatchError(f"{source}: no weights for {len(missing)} tensors of the "
                                   f"model ({shown}): it was saved from a model of another "
                                   "shape; make the run's model.* match it")
    with torch.no_grad():
        for name, p in params.items():
            spec = par.partition_spec(p)
            t = par.shard(full[name], *spec) if spec else full[name]
            if t.shape != p.shape:
                raise WeightsMismatchError(
                    f"{source}: {name} is {tuple(t.shape)} for this rank there, "
                    f"{tuple(p.shape)} in the model: it was saved from a model of another "
                    "shape; make the run's model.* match it")
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


def load_initial_weights(model: torch.nn.Module, path: str, unsafe_unpickle: bool = False
                         ) -> None:
    """Copy the weights of an HF dir or a checkpoint.dir into `model` (this rank's shards):
    the trainer's `checkpoint.init_from`. Vocabulary rows beyond the source's (TP padding, a
    new <pause>) are zero. A checkpoint.dir is read without running code from it unless
    `unsafe_unpickle` (checkpoint.unsafe_unpickle, see weights.native.load_checkpoint_file)."""
    cfg = model.cfg
    if os.path.exists(os.path.join(path, "config.json")):
        full = hf_to_full(read_hf_weights(path), cfg)
    else:
        src_cfg = load_run_config(path)
        full, _ = read_weights(path, src_cfg, unsafe_unpickle=unsafe_unpickle)
        for key in ("arch", "num_layers", "hidden_size", "num_heads", "kv_heads", "ffn_size",
                    "tie_embeddings"):
            if getattr(src_cfg.model, key) != getattr(cfg, key):
                raise ValueError(f"checkpoint.init_from {path}: model.{key} is "
                                 f"{getattr(src_cfg.model, key)} there, {getattr(cfg, key)} here")
        pad_vocab(full, cfg.vocab_size)
    # a fixed-K pondering source has no halting head: an adaptive run starts it fresh
    load_full_state_dict(model, full, source=f"checkpoint.init_from {path}",
                         keep_fresh=("halting.",))
