"""A Hugging Face directory's weights in ponder-pt's naming, and back: GPTNeoXForCausalLM,
LlamaForCausalLM, GPT2LMHeadModel and our pondering exports.

Weights go through a "full" state dict in our naming (unsharded tensors); `layout.shard`
then cuts any TP rank's piece, so reading works at any TP degree.

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

`hf_to_full` first checks the tensors against the shape `cfg` describes (`hf_shapes`): a
missing, unexpected or reshaped tensor is a WeightsMismatchError naming the files (when they
came from `read_hf_weights`) and keys, never a KeyError or a silently dropped tensor. Fewer
vocabulary rows than cfg.vocab_size are fine (they are padded).

`cfg` below is a model config (`ponder_pt.config.ModelConfig` or anything with its fields).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Optional

import torch

from .layout import pad_rows
from .mismatch import check_weights

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


class HFWeights(dict):
    """`read_hf_weights`' tensors, with the directory and files they came from (for errors)."""

    path: Optional[str] = None
    files: tuple = ()


def read_hf_weights(path: str) -> HFWeights:
    sd = HFWeights()
    sd.path = path
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        from safetensors.torch import load_file

        for f in files:
            sd.update(load_file(f))
        sd.files = tuple(files)
        return sd
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not bins:
        raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    for f in bins:
        sd.update(torch.load(f, map_location="cpu", weights_only=True))
    sd.files = tuple(bins)
    return sd


def _qkv_from_hf(q, k, v, cfg):
    """Separate q [H*d, h], k/v [Hkv*d, h] -> fused grouped layout [(Hkv*(g+2))*d, h]."""
    g, d, nkv = cfg.num_heads // cfg.kv_heads, cfg.head_dim, cfg.kv_heads
    rest = q.shape[1:]
    parts = [q.reshape(nkv, g, d, *rest), k.reshape(nkv, 1, d, *rest), v.reshape(nkv, 1, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _qkv_to_hf(qkv, cfg):
    g, d, nkv = cfg.num_heads // cfg.kv_heads, cfg.head_dim, cfg.kv_heads
    rest = qkv.shape[1:]
    t = qkv.reshape(nkv, g + 2, d, *rest)
    return (t[:, :g].reshape(-1, *rest), t[:, g].reshape(-1, *rest), t[:, g + 1].reshape(-1, *rest))


_GPT2_LINEAR = {"attn.dense": "attn.c_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _gpt2_to_full(sd: dict, cfg) -> dict:
    # GPT2LMHeadModel keys are `transformer.*`; a bare GPT2Model (stock GPT-2 dirs) has none
    pre = "transformer." if "transformer.wte.weight" in sd else ""
    h = cfg.hidden_size
    out = {"embed.weight": pad_rows(sd[pre + "wte.weight"], cfg.vocab_size, "embed.weight", "HF"),
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


def _full_to_gpt2(full: dict, cfg, rows: int) -> dict:
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


def _layer_names(cfg):
    """(our name, HF's name) of each per-layer tensor that maps one to one (GPT-NeoX, LLaMA;
    LLaMA's separate q/k/v and gate/up are regrouped by the callers)."""
    pre = _PREFIX[cfg.arch]
    suffixes = ("weight", "bias") if cfg.arch == "gpt_neox" else ("weight",)
    for i in range(cfg.num_layers):
        for ours, theirs in _LAYER_KEYS[cfg.arch].items():
            for suf in suffixes:
                yield f"layers.{i}.{ours}.{suf}", f"{pre}layers.{i}.{theirs}.{suf}"


# adaptive pondering's halting head: ours <-> the export's (the same tensors)
HALTING_NAMES = {"halting.proj.weight": "ponder_halting.weight",
                 "halting.proj.bias": "ponder_halting.bias"}


def hf_shapes(cfg, gpt2_prefix: str = "transformer.") -> dict:
    """HF name -> shape of every tensor of an HF model of shape `cfg` (cfg.vocab_size rows;
    `lm_head` only when untied; GPT-2's keys under `gpt2_prefix`)."""
    h, f, rows = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    if cfg.arch == "gpt2":
        p = gpt2_prefix
        out = {p + "wte.weight": (rows, h), p + "wpe.weight": (cfg.max_seq_len, h),
               p + "ln_f.weight": (h,), p + "ln_f.bias": (h,)}
        for i in range(cfg.num_layers):
            hp = f"{p}h.{i}."
            out.update({hp + n: (h,) for n in ("ln_1.weight", "ln_1.bias", "ln_2.weight",
                                               "ln_2.bias", "attn.c_proj.bias", "mlp.c_proj.bias")})
            out.update({hp + "attn.c_attn.weight": (h, q + 2 * kv),  # Conv1D: [in, out]
                        hp + "attn.c_attn.bias": (q + 2 * kv,), hp + "attn.c_proj.weight": (q, h),
                        hp + "mlp.c_fc.weight": (h, f), hp + "mlp.c_fc.bias": (f,),
                        hp + "mlp.c_proj.weight": (f, h)})
        return out
    pre, top = _PREFIX[cfg.arch], _TOP_KEYS[cfg.arch]
    out = {pre + top["embed"] + ".weight": (rows, h), pre + top["final_norm"] + ".weight": (h,)}
    if cfg.arch == "gpt_neox":
        out[pre + "final_layer_norm.bias"] = (h,)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (rows, h)
    weights = {"ln1": (h,), "ln2": (h,), "attn.qkv": (q + 2 * kv, h), "attn.dense": (h, q),
               "mlp.fc1": (f, h), "mlp.fc2": (h, f)}
    for ours, theirs in _layer_names(cfg):
        module, suffix = ours.split(".", 2)[2].rsplit(".", 1)
        out[theirs] = weights[module] if suffix == "weight" else weights[module][:1]
    for i in range(cfg.num_layers if cfg.arch == "llama" else 0):
        hp = f"{pre}layers.{i}."
        out.update({hp + "self_attn.q_proj.weight": (q, h), hp + "self_attn.k_proj.weight": (kv, h),
                    hp + "self_attn.v_proj.weight": (kv, h), hp + "mlp.gate_proj.weight": (f, h),
                    hp + "mlp.up_proj.weight": (f, h)})
    return out


# what an HF file may hold beyond the model's tensors: buffers older transformers saved
# (attention masks, rotary frequencies)
_BUFFERS = re.compile(r"(\.attn\.(bias|masked_bias)|\.attention\.(bias|masked_bias)"
                      r"|rotary_emb\.inv_freq)$")


def check_hf_weights(sd: dict, cfg) -> None:
    """WeightsMismatchError unless `sd` holds exactly the tensors of an HF model of shape `cfg`
    (see the module docstring); `sd` from `read_hf_weights` is named by its files."""
    prefix = "" if cfg.arch == "gpt2" and "transformer.wte.weight" not in sd \
        and "wte.weight" in sd else "transformer."
    expected = hf_shapes(cfg, prefix)
    found = {k: tuple(v.shape) for k, v in sd.items()
             if not _BUFFERS.search(k) and k not in HALTING_NAMES.values()}
    if "embed_out.weight" in found and "lm_head.weight" not in found:  # GPT-NeoX's old name
        found["lm_head.weight"] = found.pop("embed_out.weight")
    if cfg.tie_embeddings:
        found.pop("lm_head.weight", None)  # a tied head is the embedding
    for name, shape in list(expected.items()):  # fewer vocabulary rows are padded
        if shape[0] == cfg.vocab_size and len(shape) == 2 and name in found \
                and found[name][1:] == shape[1:] and found[name][0] <= shape[0]:
            expected[name] = found[name]
    path, files = getattr(sd, "path", None), getattr(sd, "files", ())
    if len(files) == 1:
        weights = files[0]
    else:
        weights = f"{path} ({len(files)} weight files)" if files else "the HF state dict"
    gpt2 = cfg.arch == "gpt2"
    sizes = {"vocab_size": cfg.vocab_size, "n_embd" if gpt2 else "hidden_size": cfg.hidden_size,
             "n_inner" if gpt2 else "intermediate_size": cfg.ffn_size,
             "n_positions" if gpt2 else "max_position_embeddings": cfg.max_seq_len}
    check_weights(expected, found, weights=weights,
                  config=os.path.join(path, "config.json") if path else "the model config",
                  layer_key="n_layer" if gpt2 else "num_hidden_layers", sizes=sizes,
                  fix="re-export the checkpoint with `ponder-pt convert to-hf` if ponder-pt "
                      "wrote it")


def hf_to_full(sd: dict, cfg) -> dict:
    """HF state dict -> full (unsharded) tensors under our parameter names.

    An HF vocabulary smaller than cfg.vocab_size (padded for TP) gets zero rows appended to
    the embedding and the output head. An adaptive pondering export's halting head comes
    along under our names. Tensors that do not match `cfg` are refused (`check_hf_weights`).
    """
    check_hf_weights(sd, cfg)
    out = _backbone_to_full(sd, cfg)
    out.update({ours: sd[theirs] for ours, theirs in HALTING_NAMES.items() if theirs in sd})
    return out


def _backbone_to_full(sd: dict, cfg) -> dict:
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
            out[name] = pad_rows(out[name], cfg.vocab_size, name, "HF")
    for ours, theirs in _layer_names(cfg):
        out[ours] = sd[theirs]
    for i in range(cfg.num_layers if arch == "llama" else 0):
        hp, op = f"{pre}layers.{i}.", f"layers.{i}."
        out[op + "attn.qkv.weight"] = _qkv_from_hf(
            *(sd[f"{hp}self_attn.{n}_proj.weight"] for n in "qkv"), cfg)
        out[op + "mlp.fc1.weight"] = torch.cat(
            [sd[hp + "mlp.gate_proj.weight"], sd[hp + "mlp.up_proj.weight"]], dim=0)
    return out


def full_to_hf(full: dict, cfg, vocab_size: Optional[int] = None) -> dict:
    """Inverse of `hf_to_full` (includes lm_head.weight also when tied, like HF's state_dict).

    vocab_size: keep only the first rows of the embedding / head (drop TP padding).
    """
    sd = _full_to_backbone(full, cfg, vocab_size)
    sd.update({theirs: full[ours].contiguous() for ours, theirs in HALTING_NAMES.items()
               if ours in full})
    return sd


def _full_to_backbone(full: dict, cfg, vocab_size: Optional[int]) -> dict:
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
    for ours, theirs in _layer_names(cfg):
        sd[theirs] = full[ours]
    for i in range(cfg.num_layers if arch == "llama" else 0):
        hp, op = f"{pre}layers.{i}.", f"layers.{i}."
        q, k, v = _qkv_to_hf(full[op + "attn.qkv.weight"], cfg)
        sd[hp + "self_attn.q_proj.weight"] = q
        sd[hp + "self_attn.k_proj.weight"] = k
        sd[hp + "self_attn.v_proj.weight"] = v
        gate, up = full[op + "mlp.fc1.weight"].chunk(2, dim=0)
        sd[hp + "mlp.gate_proj.weight"] = gate
        sd[hp + "mlp.up_proj.weight"] = up
    return {k: v.contiguous() for k, v in sd.items()}

