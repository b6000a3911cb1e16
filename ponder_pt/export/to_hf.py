"""Training checkpoint -> Hugging Face directory (`ponder-pt convert to-hf`).

Plain models (ponder.steps = 0) become stock `GPTNeoXForCausalLM` / `LlamaForCausalLM`.
Pondering models get our small HF class written into the directory (`modeling_ponder.py`,
`configuration_ponder.py`, `auto_map` in config.json): load them with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

All padded vocabulary rows are exported (so a `<pause>` row stays addressable); pause-trained
models record `pause_token_id` and `default_pauses` (pause.inference_pauses) in config.json.
Weights are written as fp32 safetensors; tokenizer files come from `data.tokenizer`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from ..config import Config
from ..models.hf import full_to_hf, hf_config_from
from .native import read_checkpoint

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
REMOTE_FILES = ("configuration_ponder.py", "modeling_ponder.py")


def pause_fields(cfg: Config) -> dict:
    """pause_token_id / default_pauses for a pause-trained run, else {}."""
    if cfg.pause.rate > 0 or cfg.pause.token_id is not None:
        return {"pause_token_id": cfg.pause.token_id,
                "default_pauses": int(cfg.pause.inference_pauses)}
    return {}


def build_hf_config(cfg: Config, tokenizer=None):
    """Stock config for a plain model, our Ponder*Config for a pondering one."""
    base = hf_config_from(cfg.model)
    extra = pause_fields(cfg)
    if tokenizer is not None:
        extra.update(bos_token_id=tokenizer.eod_id, eos_token_id=tokenizer.eod_id,
                     pad_token_id=tokenizer.pad_id)
    if cfg.ponder.steps == 0:
        for k, v in extra.items():
            setattr(base, k, v)
        base.architectures = ["GPTNeoXForCausalLM" if cfg.model.arch == "gpt_neox"
                              else "LlamaForCausalLM"]
        return base
    from .templates.configuration_ponder import PonderGPTNeoXConfig, PonderLlamaConfig

    cls = PonderGPTNeoXConfig if cfg.model.arch == "gpt_neox" else PonderLlamaConfig
    raw = base.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        raw.pop(key, None)
    raw.update(extra, ponder_steps=cfg.ponder.steps, ponder_scale_embeds=cfg.ponder.scale_embeds,
               ponder_scale_initial_by_steps=cfg.ponder.scale_initial_by_steps,
               ponder_top_k=cfg.ponder.top_k, ponder_feedback=cfg.ponder.feedback)
    hf = cls(**raw)
    model_cls = cls.__name__.replace("Config", "ForCausalLM")
    hf.architectures = [model_cls]
    hf.auto_map = {"AutoConfig": f"configuration_ponder.{cls.__name__}",
                   "AutoModelForCausalLM": f"modeling_ponder.{model_cls}"}
    return hf


def save_tokenizer(tok_path: str, out: str, pause_id: Optional[int] = None) -> None:
    """tokenizer.json -> PreTrainedTokenizerFast files; sentencepiece .model ->
    LlamaTokenizer files. A `<pause>` token is added when its id lands on `pause_id`.

    Caveat: transformers' LLaMA tokenizer applies LLaMA's normalisation (byte fallback for
    newlines etc.), so a sentencepiece model trained with other settings encodes plain text
    the same but may differ on newlines / unusual whitespace."""
    from ..tokenizer import PAUSE_TOKEN, load_tokenizer

    ours = load_tokenizer(tok_path)
    eos = ours.id_to_token(ours.eod_id)
    if ours.kind == "bpe":
        from transformers import PreTrainedTokenizerFast

        kw = {"eos_token": eos, "bos_token": eos, "unk_token": eos}
        if ours.pad_id is not None:
            kw["pad_token"] = ours.id_to_token(ours.pad_id)
        hf = PreTrainedTokenizerFast(tokenizer_file=ours.path, **kw)
    else:
        from transformers import LlamaTokenizer

        # transformers builds its (fast) LLaMA tokenizer from the .model file in the directory
        shutil.copy(ours.path, os.path.join(out, "tokenizer.model"))
        hf = LlamaTokenizer.from_pretrained(out, add_bos_token=False, add_eos_token=False)
    if pause_id is not None and ours.own_pause_id is None and len(hf) == pause_id:
        hf.add_tokens([PAUSE_TOKEN], special_tokens=True)
    hf.save_pretrained(out)


def export_full(cfg: Config, full: dict, out: str, tokenizer_path: Optional[str] = None,
                progress: bool = True) -> str:
    """Write an HF directory from a full state dict in our naming."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import GenerationConfig

    os.makedirs(out, exist_ok=True)
    tok = None
    if tokenizer_path:
        from ..tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
    hf_cfg = build_hf_config(cfg, tok)
    sd = full_to_hf(full, cfg.model)
    if cfg.model.tie_embeddings:
        sd.pop("lm_head.weight", None)
    tensors = {}
    for name, t in tqdm(sd.items(), desc="converting", unit="tensor", disable=not progress):
        tensors[name] = t.detach().to(torch.float32).contiguous().clone()
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    hf_cfg.save_pretrained(out)
    if cfg.ponder.steps > 0:
        for name in REMOTE_FILES:
            shutil.copy(os.path.join(TEMPLATES, name), os.path.join(out, name))
    gen = GenerationConfig(bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id,
                           pad_token_id=hf_cfg.pad_token_id if hf_cfg.pad_token_id is not None
                           else hf_cfg.eos_token_id)
    gen.save_pretrained(out)
    if tokenizer_path:
        save_tokenizer(tokenizer_path, out, pause_fields(cfg).get("pause_token_id"))
    with open(os.path.join(out, "ponder_pt_export.json"), "w", encoding="utf-8") as fh:
        json.dump({"ponder_steps": cfg.ponder.steps, "arch": cfg.model.arch,
                   "padded_vocab_size": cfg.model.vocab_size, **pause_fields(cfg)}, fh, indent=1)
    return out


def checkpoint_to_hf(ckpt_dir: str, out: str, tag: Optional[str] = None,
                     progress: bool = True) -> str:
    cfg, full, tag = read_checkpoint(ckpt_dir, tag)
    export_full(cfg, full, out, cfg.data.tokenizer or None, progress)
    return tag


def cmd_to_hf(args) -> int:
    tag = checkpoint_to_hf(args.checkpoint, args.out, args.tag, progress=not args.quiet)
    print(f"exported {args.checkpoint}/{tag} -> {args.out}")
    return 0
