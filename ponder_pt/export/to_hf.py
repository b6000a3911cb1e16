"""Training checkpoint -> Hugging Face directory (`ponder-pt convert to-hf`).

Plain models (ponder.steps = 0) become stock `GPTNeoXForCausalLM` / `LlamaForCausalLM` /
`GPT2LMHeadModel`. Pondering models get model_type `ponder_gpt_neox` / `ponder_llama` /
`ponder_gpt2`. With ponder-pt installed
they load with its registered classes (`ponder_pt.export.hf_auto`), no code from the directory
run; for users without ponder-pt the same classes are copied into the directory
(`modeling_ponder.py`, `configuration_ponder.py`, `auto_map` in config.json), loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`. config.json records the
transformers range this ponder-pt was tested with (`ponder_transformers`); the classes refuse
to load under any other transformers.

All padded vocabulary rows are exported (so a `<pause>` row stays addressable); pause-trained
models record `pause_token_id` and `default_pauses` (pause.inference_pauses) in config.json.
Weights are written as fp32 safetensors; tokenizer files come from `data.tokenizer`. Every
export carries a model card, README.md (export/model_card.py).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from ..config import Config
from ..models.hf import hf_config_from
from ..weights.files import checkpoint_dir, read_meta
from ..weights.hf_weights import full_to_hf
from .model_card import write_card
from .native import read_checkpoint

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
REMOTE_FILES = ("configuration_ponder.py", "modeling_ponder.py")
# The transformers versions the exported pondering code is tested with: pyproject's
# `transformers` requirement, which tests/test_export.py checks this equals. CI runs the
# hf_compat tests at both ends of it.
TESTED_TRANSFORMERS = ">=5.17,<5.26"
STOCK_CLASSES = {"gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}


def pause_fields(cfg: Config) -> dict:
    """pause_token_id / default_pauses for a pause-trained run (every-token pauses: none to
    append, `pause_every_token` slots inside the model), else {}."""
    if cfg.pause.every_token:
        return {"pause_token_id": cfg.pause.token_id, "default_pauses": 0,
                "pause_every_token": int(cfg.pause.every_token)}
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
    if cfg.ponder.steps == 0 and not cfg.thoughts.count and not cfg.pause.every_token:
        for k, v in extra.items():
            setattr(base, k, v)
        base.architectures = [STOCK_CLASSES[cfg.model.arch]]
        return base
    from .templates.configuration_ponder import (PonderGPT2Config, PonderGPTNeoXConfig,
                                                 PonderLlamaConfig)

    cls = {"gpt_neox": PonderGPTNeoXConfig, "llama": PonderLlamaConfig,
           "gpt2": PonderGPT2Config}[cfg.model.arch]
    raw = base.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        raw.pop(key, None)
    raw.update(extra, ponder_steps=cfg.ponder.steps, ponder_scale_embeds=cfg.ponder.scale_embeds,
               ponder_scale_initial_by_steps=cfg.ponder.scale_initial_by_steps,
               ponder_top_k=cfg.ponder.top_k, ponder_feedback=cfg.ponder.feedback,
               ponder_transformers=TESTED_TRANSFORMERS)
    if cfg.ponder.halting.mode != "off":  # adaptive only: fixed-K exports stay as they were
        raw.update(ponder_halting=cfg.ponder.halting.mode, ponder_halt_q=cfg.ponder.halting.q)
    if cfg.thoughts.count:  # latent thoughts only, likewise
        raw.update(thought_count=cfg.thoughts.count,
                   thought_scale_embeds=cfg.thoughts.scale_embeds)
    hf = cls(**raw)
    model_cls = cls.__name__.replace("Config", "ForCausalLM")
    hf.architectures = [model_cls]
    hf.auto_map = {"AutoConfig": f"configuration_ponder.{cls.__name__}",
                   "AutoModelForCausalLM": f"modeling_ponder.{model_cls}"}
    return hf


def save_tokenizer(tok_path: str, out: str, pause_id: Optional[int] = None,
                   samples=(), allow_mismatch: Optional[bool] = None) -> dict:
    """HF tokenizer files for our tokenizer (tokenizer.json as is; a sentencepiece .model
    converted to a tokenizer.json reproducing its normalisation), a `<pause>` token added when
    its id lands on `pause_id`, then loaded back with AutoTokenizer and checked id for id
    against ours on `samples` + built-in probe texts: a difference raises
    TokenizerMismatchError (or only warns when allowed). See export/tokenizer_export.py."""
    from .tokenizer_export import save_tokenizer as _save

    return _save(tok_path, out, pause_id, samples=samples, allow_mismatch=allow_mismatch)


def export_full(cfg: Config, full: dict, out: str, tokenizer_path: Optional[str] = None,
                progress: bool = True, card: Optional[dict] = None) -> str:
    """Write an HF directory from a full state dict in our naming. `card`: what the model card
    says of the weights' history (`model_card.write_card`'s checkpoint / finetune)."""
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
    if cfg.ponder.steps > 0 or cfg.thoughts.count or cfg.pause.every_token:
        for name in REMOTE_FILES:
            shutil.copy(os.path.join(TEMPLATES, name), os.path.join(out, name))
    gen = GenerationConfig(bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id,
                           pad_token_id=hf_cfg.pad_token_id if hf_cfg.pad_token_id is not None
                           else hf_cfg.eos_token_id)
    gen.save_pretrained(out)
    check = None
    if tokenizer_path:
        from .tokenizer_export import training_samples

        check = save_tokenizer(tokenizer_path, out, pause_fields(cfg).get("pause_token_id"),
                               samples=training_samples(cfg, tok))
    with open(os.path.join(out, "ponder_pt_export.json"), "w", encoding="utf-8") as fh:
        json.dump({"ponder_steps": cfg.ponder.steps, "thought_count": cfg.thoughts.count,
                   "arch": cfg.model.arch,
                   "padded_vocab_size": cfg.model.vocab_size, **pause_fields(cfg)}, fh, indent=1)
    write_card(out, cfg, pause_fields(cfg).get("pause_token_id"), TESTED_TRANSFORMERS, check,
               **(card or {}))
    return out


def checkpoint_to_hf(ckpt_dir: str, out: str, tag: Optional[str] = None,
                     progress: bool = True, unsafe_unpickle: bool = False) -> str:
    ckpt_dir = checkpoint_dir(ckpt_dir)  # a run directory: its checkpoints/
    cfg, full, tag = read_checkpoint(ckpt_dir, tag, unsafe_unpickle=unsafe_unpickle)
    state = read_meta(ckpt_dir, tag).get("state") or {}
    steps = int(state.get("step", 0))
    samples = int(state.get("consumed_samples", steps * cfg.train.global_batch))
    export_full(cfg, full, out, cfg.data.tokenizer or None, progress,
                card={"checkpoint": {"tag": tag, "steps": steps,
                                     "tokens": samples * cfg.data.seq_len}})
    return tag


def cmd_to_hf(args) -> int:
    tag = checkpoint_to_hf(args.checkpoint, args.out, args.tag, progress=not args.quiet,
                           unsafe_unpickle=args.unsafe_unpickle)
    print(f"exported {args.checkpoint} ({tag}) -> {args.out}")
    return 0
